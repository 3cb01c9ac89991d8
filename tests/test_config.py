"""Configuration: defaults, the example file, precedence, and errors that name the key."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from daemon.config import SECTIONS, ConfigError, Defaults, job_settings, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_example_config_documents_every_key_with_its_default():
    """config.example.yaml loads, has every key of every section, and its values are the defaults."""
    example = ROOT / "config.example.yaml"
    raw = yaml.safe_load(example.read_text())
    for name, cls in SECTIONS.items():
        assert set(raw[name]) == set(typing.get_type_hints(cls)), name
    loaded = load_config(example, env={})
    assert dataclasses.replace(loaded, source=None) == load_config(None, env={})


def test_file_then_env_then_overrides(tmp_path):
    """Later layers win: file < FINE_TUNER_* environment < overrides."""
    path = tmp_path / "c.yaml"
    path.write_text("defaults:\n  epochs: 5\n  model: from-file\nollama:\n  host: http://file:1\n")
    env = {"FINE_TUNER_EPOCHS": "7", "FINE_TUNER_OLLAMA__HOST": "http://env:2"}
    cfg = load_config(path, env=env, overrides={"defaults": {"epochs": 9}})
    assert (cfg.defaults.epochs, cfg.defaults.model, cfg.ollama.host) == (9, "from-file", "http://env:2")


def test_env_values_are_parsed_by_type():
    """Environment strings become bools, floats, lists of the field's type."""
    cfg = load_config(None, env={"FINE_TUNER_FALLBACK": "false", "FINE_TUNER_LEARNING_RATE": "0.002",
                                 "FINE_TUNER_TRAINING__LORA_TARGET_MODULES": "q_proj, v_proj",
                                 "FINE_TUNER_DEBUG": "1"})
    assert cfg.defaults.fallback is False
    assert cfg.defaults.learning_rate == 0.002
    assert cfg.training.lora_target_modules == ("q_proj", "v_proj")
    assert cfg.debug is True


def test_config_path_from_environment(tmp_path):
    """FINE_TUNER_CONFIG names the file when no path is passed."""
    path = tmp_path / "c.yaml"
    path.write_text("defaults:\n  topics: cardiac\n")
    assert load_config(None, env={"FINE_TUNER_CONFIG": str(path)}).defaults.topics == "cardiac"


def test_unknown_keys_and_wrong_types_are_all_named(tmp_path):
    """One ConfigError lists every problem with its key."""
    path = tmp_path / "c.yaml"
    path.write_text("defaults:\n  epoch: 3\n  batch_size: four\nollama:\n  register: maybe\nwatchh: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    problems = info.value.problems
    assert any(p.startswith("defaults.epoch: unknown key") for p in problems)
    assert any(p.startswith("defaults.batch_size: expected int") for p in problems)
    assert any(p.startswith("ollama.register: must be one of") for p in problems)
    assert any(p.startswith("watchh: unknown section") for p in problems)
    assert len(problems) == 4
    assert str(path) in str(info.value)


def test_invalid_yaml_is_a_config_error(tmp_path):
    """A YAML syntax error names the file and the line."""
    path = tmp_path / "c.yaml"
    path.write_text("defaults:\n  epochs: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(path, env={})


def test_yaml_tags_are_refused(tmp_path):
    """The config is read with safe_load: a python tag is an error, not code execution."""
    path = tmp_path / "c.yaml"
    path.write_text("defaults: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError):
        load_config(path, env={})


def test_job_settings_merge_and_validate():
    """A job file's values override the defaults; bad keys and values are named."""
    s = job_settings(Defaults(model="m"), {"epochs": 2, "topics": ["a", "b"], "force": True})
    assert (s.model, s.epochs, s.topics, s.force, s.batch_size) == ("m", 2, "a, b", True, 4)
    with pytest.raises(ConfigError) as info:
        job_settings(Defaults(), {"epochs": 0, "approach": "magic", "colour": "red"}, source="x.job.yaml")
    assert len(info.value.problems) == 3
    assert "x.job.yaml" in str(info.value)
