"""The config settings the data rules check: ``defaults.prompt_template`` is refused with the others."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import ConfigError, load_config
from daemon.data.jobsettings import defaults_problems

ROOT = Path(__file__).resolve().parent.parent.parent
UNCLOSED = "the '{' at character 7 is not closed by '}' (write '{{' for a literal brace)"


def test_a_malformed_default_prompt_template_is_listed_with_the_other_problems():
    """load_config with the data rules' check names defaults.prompt_template beside every other problem;
    the config package alone leaves the template to them (it imports no room)."""
    overrides = {"defaults": {"epochs": 0, "prompt_template": "Note: {Triage"}}
    with pytest.raises(ConfigError) as info:
        load_config(None, env={}, overrides=overrides, checks=(defaults_problems,))
    assert info.value.problems == ["defaults.epochs: must be at least 1", f"defaults.prompt_template: {UNCLOSED}"]
    with pytest.raises(ConfigError) as info:
        load_config(None, env={}, overrides=overrides)
    assert info.value.problems == ["defaults.epochs: must be at least 1"]
    assert defaults_problems(load_config(None, env={}, overrides={"defaults": {"prompt_template": ["Age"]}})) == []


def test_every_command_refuses_a_config_whose_prompt_template_is_malformed(tmp_path):
    """`fine-tuner config` reading a config.yaml with a malformed defaults.prompt_template exits 2 naming it."""
    config = tmp_path / "c.yaml"
    config.write_text("defaults:\n  prompt_template: 'Note: {Triage'\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINE_TUNER_")}
    res = subprocess.run([sys.executable, "-m", "daemon", "config", "--config", str(config)], cwd=tmp_path,
                         env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    assert (res.returncode, f"defaults.prompt_template: {UNCLOSED}" in res.stderr) == (2, True)
