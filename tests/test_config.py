"""Configuration: defaults, the example file, precedence, and errors that name the key."""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from pathlib import Path

import pytest
import yaml

from daemon.config import (
    MAX_COMPANION_BYTES,
    MAX_TOPICS,
    MAX_TOPICS_CHARS,
    PROCESS_VARIABLES,
    SECTIONS,
    ConfigError,
    Defaults,
    load_config,
    read_config_file,
)
from daemon.data.jobsettings import JOB_KEYS, job_settings, read_job_file

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


def test_process_variables_are_not_settings_but_other_names_still_are():
    """FINE_TUNER_CACHE_DIR and FINE_TUNER_LLAMA_SERVER leave the configuration as it is; a misspelt
    FINE_TUNER_* name is still an unknown key."""
    env = {"FINE_TUNER_CACHE_DIR": "/srv/cache", "FINE_TUNER_LLAMA_SERVER": "/opt/llama-server"}
    assert load_config(None, env=env) == load_config(None, env={})
    with pytest.raises(ConfigError) as info:
        load_config(None, env={**env, "FINE_TUNER_CACHE_DIRS": "/srv/cache"})
    assert [p.split(" (known:")[0] for p in info.value.problems] == ["defaults.cache_dirs: unknown key"]


def test_every_fine_tuner_variable_read_directly_is_a_process_variable():
    """The FINE_TUNER_* names the code reads straight from the environment are exactly
    PROCESS_VARIABLES, so that none of them is refused as an unknown setting."""
    read = re.compile(r"""(?:env|environ)(?:\.get\(|\[)\s*["'](FINE_TUNER_[A-Z0-9_]+)["']""")
    sources = [*(ROOT / "daemon").rglob("*.py"), *(ROOT / "scripts").rglob("*.py")]
    found = {name for path in sources for name in read.findall(path.read_text(encoding="utf-8"))}
    assert found == PROCESS_VARIABLES == {"FINE_TUNER_CONFIG", "FINE_TUNER_CACHE_DIR", "FINE_TUNER_LLAMA_SERVER"}


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
    s = job_settings(Defaults(model="m", batch_size=3), {"epochs": 5, "topics": ["a", "b"], "force": True})
    assert (s.model, s.epochs, s.topics, s.force, s.batch_size) == ("m", 5, "a, b", True, 3)
    with pytest.raises(ConfigError) as info:
        job_settings(Defaults(), {"epochs": 0, "approach": "magic", "colour": "red"}, source="x.job.yaml")
    assert len(info.value.problems) == 3
    assert "x.job.yaml" in str(info.value)


# --- hostile config and job files -----------------------------------------------------------------

def _job_error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        read_job_file(path)
    return info.value


def test_job_file_not_utf8_is_a_config_error(tmp_path):
    """A job file that is not UTF-8 is a ConfigError naming only its base name, quoting nothing."""
    path = tmp_path / "latin.job.yaml"
    path.write_bytes(b"topics: Erk\xe4ltung\n")
    error = _job_error(path)
    assert (error.source, error.problems) == ("latin.job.yaml", ["the file is not UTF-8 text (save it as UTF-8)"])
    assert str(tmp_path) not in str(error)
    assert "Erk" not in str(error)
    assert error.hint == "fix the job file and drop it again"


def test_deeply_nested_yaml_is_a_config_error(tmp_path):
    """Lists nested 5,000 deep are a ConfigError, not a RecursionError, in a job file and a config."""
    path = tmp_path / "deep.job.yaml"
    path.write_bytes(b"force: " + b"[" * 5000 + b"]" * 5000 + b"\n")
    error = _job_error(path)
    assert (error.source, error.problems) == (
        "deep.job.yaml", ["lists or mappings are nested more than 32 levels deep (line 1)"])
    config = tmp_path / "c.yaml"
    config.write_bytes(b"defaults:\n  topics: " + b"{a: " * 3000 + b"1" + b"}" * 3000 + b"\n")
    with pytest.raises(ConfigError) as info:
        load_config(config, env={})
    assert info.value.problems == ["lists or mappings are nested more than 32 levels deep (line 2)"]


def test_lone_surrogate_is_a_config_error(tmp_path):
    """A \\ud800 escape (not valid Unicode) in a job file is a ConfigError naming the file and line."""
    path = tmp_path / "s.job.yaml"
    path.write_bytes(b'model: llama3.2:1b\ntopics: "flu \\ud800"\n')
    error = _job_error(path)
    assert (error.source, error.problems) == (
        "s.job.yaml", ["a text value holds a lone surrogate escape (\\uD800-\\uDFFF), which is not "
                       "valid Unicode (line 2)"])


def test_huge_number_or_impossible_date_is_a_config_error(tmp_path):
    """An integer of 5,000 digits (over Python's conversion limit) or a date with month 13 is a
    ConfigError, not a ValueError."""
    path = tmp_path / "n.job.yaml"
    path.write_text("topics: flu\nepochs: " + "9" * 5000 + "\n")
    error = _job_error(path)
    assert (error.source, error.problems) == ("n.job.yaml", ["a number has too many digits (line 2)"])
    path.write_text("topics: 2024-13-45\n")
    assert _job_error(path).problems == ["a date or time that does not exist (such as month 13) (line 1)"]


def test_duplicate_keys_are_refused(tmp_path):
    """A key given twice in one mapping is a ConfigError naming the key, in a job file and a config."""
    path = tmp_path / "d.job.yaml"
    path.write_text("model: llama3.2:1b\ntopics: flu\nmodel: mistral:7b\n")
    assert _job_error(path).problems == ["the key 'model' appears more than once in the same mapping (line 3)"]
    as_json = tmp_path / "d.job.json"
    as_json.write_text('{"epochs": 1, "epochs": 2}')
    assert _job_error(as_json).problems == [
        "the key 'epochs' appears more than once in the same mapping (line 1)"]
    config = tmp_path / "c.yaml"
    config.write_text("defaults:\n  epochs: 1\nwatch:\n  workers: 2\ndefaults:\n  epochs: 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(config, env={})
    assert info.value.problems == ["the key 'defaults' appears more than once in the same mapping (line 5)"]


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    """A key that overrides one merged in with '<<' is not a duplicate (the config file, the only
    file that may use aliases)."""
    path = tmp_path / "c.yaml"
    path.write_text("a: &x {epochs: 1, topics: flu}\nb:\n  <<: *x\n  epochs: 4\n")
    assert read_config_file(path) == {"a": {"epochs": 1, "topics": "flu"}, "b": {"epochs": 4, "topics": "flu"}}


def test_yaml_aliases_in_a_job_file_are_refused(tmp_path):
    """A job file whose topics repeat one anchored 10,000-character string 10,000 times (50 KB
    that would expand to 100 MB) is refused before it expands, naming the line; so is a merge."""
    path = tmp_path / "bomb.job.yaml"
    path.write_text("model: llama3.2:1b\ntopics: [&t " + "x" * 10_000 + ", *t" * 9_999 + "]\n")
    assert path.stat().st_size < 51_000
    error = _job_error(path)
    assert (error.source, error.problems) == (
        "bomb.job.yaml", ["the file uses a YAML alias (*name), which job and mapping files may not use: "
                          "write each value out in full (line 2)"])
    assert "xxxx" not in str(error)
    merge = tmp_path / "merge.job.yaml"
    merge.write_text("a: &x {epochs: 1}\nb:\n  <<: *x\n")
    assert _job_error(merge).problems == [
        "the file uses a YAML alias (*name), which job and mapping files may not use: "
        "write each value out in full (line 3)"]


def test_topics_over_their_limits_are_refused_naming_the_limit():
    """topics over 50 entries or 2,000 characters (a list, or comma-separated text) is a ConfigError
    naming the key, the size and the limit; at the limits they are accepted."""
    at_limit = job_settings(Defaults(), {"topics": ["t"] * MAX_TOPICS})
    assert at_limit.topics == ", ".join(["t"] * 50)
    assert job_settings(Defaults(), {"topics": "y" * MAX_TOPICS_CHARS}).topics == "y" * 2000
    cases = [(["t"] * 51, "topics: 51 topics, over the limit of 50"),
             (["t"] * 10_000, "topics: 10000 topics, over the limit of 50"),
             (", ".join(["t"] * 51), "topics: 51 topics, over the limit of 50"),
             ("y" * 2001, "topics: 2001 characters, over the limit of 2000"),
             (["y" * 1000, "z" * 1000], "topics: 2002 characters, over the limit of 2000")]
    for topics, problem in cases:
        with pytest.raises(ConfigError) as info:
            job_settings(Defaults(), {"topics": topics}, source="t.job.yaml")
        assert (info.value.source, info.value.problems) == ("t.job.yaml", [problem])
    with pytest.raises(ConfigError) as info:
        load_config(None, env={"FINE_TUNER_TOPICS": "y" * 2001})
    assert info.value.problems == ["defaults.topics: 2001 characters, over the limit of 2000"]


def test_prompt_template_and_unknown_keys_are_bounded():
    """A column-list prompt_template over 16,384 characters, a format string over 65,536 and more
    than ten unknown keys are refused with the key and the limit; only ten unknown keys are named."""
    columns = [f"{i:05d}" + "c" * 995 for i in range(17)]  # 17,000 characters
    with pytest.raises(ConfigError) as info:
        job_settings(Defaults(), {"prompt_template": columns})
    assert info.value.problems == ["prompt_template: the list of columns holds 17000 characters, over the "
                                   "limit of 16384"]
    with pytest.raises(ConfigError) as info:
        job_settings(Defaults(), {"prompt_template": "{a}" + "b" * 65_536})
    assert info.value.problems == ["prompt_template: the format string is longer than 65536 characters"]
    with pytest.raises(ConfigError) as info:
        job_settings(Defaults(), {f"k{i}": 1 for i in range(5000)})
    known = ", ".join(JOB_KEYS)
    assert info.value.problems == [f"k{i}: unknown key (known: {known})" for i in range(10)] + [
        "and 4990 more unknown keys"]


def test_job_file_over_the_size_limit_is_refused_unparsed(tmp_path):
    """A job file larger than MAX_COMPANION_BYTES is refused before it is parsed."""
    path = tmp_path / "big.job.yaml"
    path.write_bytes(b"topics: [" + b"a, " * (MAX_COMPANION_BYTES // 3) + b"]\n")
    size = path.stat().st_size
    error = _job_error(path)
    assert (error.source, error.problems) == (
        "big.job.yaml", [f"the file is {size} bytes, over the limit of 262144 bytes"])


@pytest.mark.timeout(20)
def test_job_file_fifo_symlink_or_folder_is_refused(tmp_path):
    """A FIFO in place of a job file is refused without blocking; a symbolic link is not followed;
    a folder cannot be read."""
    folder = tmp_path / "f.job.yaml"
    folder.mkdir()
    assert _job_error(folder).problems == ["cannot read the file: Is a directory"]
    fifo = tmp_path / "p.job.yaml"
    os.mkfifo(fifo)
    assert _job_error(fifo).problems == ["the file is not a regular file (a FIFO, socket or device)"]
    target = tmp_path / "real.yaml"
    target.write_text("topics: flu\n")
    link = tmp_path / "l.job.yaml"
    link.symlink_to(target)
    assert _job_error(link).problems == [
        "the file is a symbolic link; links are not followed (put the file itself there)"]


def test_job_file_top_level_must_be_a_mapping(tmp_path):
    """A job file holding a list or a single value is a ConfigError naming only its base name."""
    path = tmp_path / "work" / ".claim-x" / "l.job.yaml"
    path.parent.mkdir(parents=True)
    path.write_text("- model\n- topics\n")
    error = _job_error(path)
    assert (error.source, error.problems) == (
        "l.job.yaml", ["the top level must be a mapping of job settings (key: value lines), not a list"])
    assert str(tmp_path) not in str(error)
    path.write_text("just words\n")
    assert _job_error(path).problems == [
        "the top level must be a mapping of job settings (key: value lines), not a single value"]
    missing = _job_error(tmp_path / "gone.job.yaml")
    assert (missing.source, missing.problems) == ("gone.job.yaml", ["cannot read the file: No such file or directory"])


def test_job_file_name_is_escaped_in_errors(tmp_path):
    """A job file name with control characters or non-UTF-8 bytes is escaped in the error's source."""
    name = os.fsdecode(b"M\xe4rz\x1b[2J.job.yaml")
    path = tmp_path / name
    path.write_text("- a\n")
    assert _job_error(path).source == "M\\xe4rz\\x1b[2J.job.yaml"


VALID_MODEL_NAMES = ["llama3.2:1b", "tiny-llama:latest", "library/llama3:8b", "registry.example.com:5000/team/model:v1",
                     "hf.co/org/Model-GGUF:Q4_K_M", "Qwen/Qwen2.5-0.5B", "mistral", "_x"]
INVALID_MODEL_NAMES = [
    ("/etc/shadow", "a filesystem path"),
    ("../../etc/shadow", "a filesystem path"),
    ("./x", "a filesystem path"),
    ("~/models/x", "a filesystem path"),
    ("a/../b", "a filesystem path"),
    ("C:\\models\\x", "a filesystem path"),
    ("a b", "it holds whitespace or control characters"),
    ("x\x1b[2Jy", "it holds whitespace or control characters"),
    ("llama\n", "it holds whitespace or control characters"),
    ("m" * 201, "it is longer than 200 characters"),
    ("a:b:c", "not of the form [host[:port]/][namespace/]name[:tag]"),
    ("a/b/c/d", "not of the form [host[:port]/][namespace/]name[:tag]"),
    ("-x", "not of the form [host[:port]/][namespace/]name[:tag]"),
    ("model:", "not of the form [host[:port]/][namespace/]name[:tag]"),
    ("mödel", "not of the form [host[:port]/][namespace/]name[:tag]"),
]
NAME_RULE = ("; use [host[:port]/][namespace/]name[:tag] made of letters, digits, '_', '.' and '-', "
             "e.g. llama3.2:1b")


@pytest.mark.parametrize("name", VALID_MODEL_NAMES)
def test_valid_ollama_model_names_are_accepted(name):
    """Ollama names with a host, port, namespace and tag are accepted for model and output_model."""
    s = job_settings(Defaults(), {"model": name, "output_model": name})
    assert (s.model, s.output_model) == (name, name)


@pytest.mark.parametrize(("name", "reason"), INVALID_MODEL_NAMES)
def test_invalid_model_names_are_config_errors(name, reason):
    """Paths, whitespace, control characters and malformed names are refused, naming the key only."""
    with pytest.raises(ConfigError) as info:
        job_settings(Defaults(), {"model": name, "output_model": name}, source="x.job.yaml")
    assert info.value.problems == [f"model: not a valid Ollama model name ({reason}){NAME_RULE}",
                                   f"output_model: not a valid Ollama model name ({reason}){NAME_RULE}"]
    if reason.startswith("it holds"):
        assert name not in str(info.value)


def test_empty_model_name_is_refused():
    """An empty model is 'required'; an empty output_model is not a valid name."""
    with pytest.raises(ConfigError) as info:
        job_settings(Defaults(), {"model": "", "output_model": ""})
    assert info.value.problems == ["model: required (set it in the job file or in the config's defaults)",
                                   f"output_model: not a valid Ollama model name (it is empty){NAME_RULE}"]


def test_model_names_in_the_config_are_checked(tmp_path):
    """defaults.model and the keys of base_models must be Ollama names; valid ones still map to weights."""
    path = tmp_path / "c.yaml"
    path.write_text("defaults:\n  model: ../weights\nbase_models:\n  /etc/shadow: /srv/x\n  "
                    "\"a\\x1bb\": /srv/y\n  llama3.2:1b: /srv/llama\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.problems == [
        f"base_models./etc/shadow: not a valid Ollama model name (a filesystem path){NAME_RULE}",
        f"base_models.a\\x1bb: not a valid Ollama model name (it holds whitespace or control characters){NAME_RULE}",
        f"defaults.model: not a valid Ollama model name (a filesystem path){NAME_RULE}",
    ]
    path.write_text("base_models:\n  llama3.2:1b: /srv/llama\n  hf.co/org/M-GGUF:Q4_K_M: org/M\n")
    assert load_config(path, env={}).base_models == {"llama3.2:1b": "/srv/llama", "hf.co/org/M-GGUF:Q4_K_M": "org/M"}


# --- value ranges ---------------------------------------------------------------------------------

def test_non_finite_floats_are_refused(tmp_path):
    """.nan, .inf and -.inf in the file, and "nan"/"inf" in the environment, name each key once."""
    path = tmp_path / "c.yaml"
    path.write_text("defaults:\n  learning_rate: .nan\n  validation_fraction: .inf\nollama:\n"
                    "  connect_timeout_s: -.inf\nwatch:\n  settle_s: .NaN\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={"FINE_TUNER_TRAINING__GRACE_S": "inf", "FINE_TUNER_WATCH__RESCAN_S": "nan"})
    assert info.value.problems == [
        "defaults.learning_rate: must be a finite number",
        "defaults.validation_fraction: must be a finite number",
        "ollama.connect_timeout_s: must be a finite number",
        "training.grace_s: must be a finite number",
        "watch.settle_s: must be a finite number",
        "watch.rescan_s: must be a finite number",
    ]


def test_out_of_range_values_are_each_named(tmp_path):
    """Negative, zero and too-large timeouts, workers, retries and backoff are named one by one."""
    path = tmp_path / "c.yaml"
    path.write_text(
        "ollama:\n  connect_timeout_s: 0\n  read_timeout_s: -1\n  create_timeout_s: 0.0\n  retries: 21\n"
        "  backoff_s: 2.0\n  backoff_max_s: 1.0\n"
        "training:\n  timeout_s: 0\n  grace_s: -1\n  lora_dropout: 1.0\n  warmup_ratio: 1.5\n"
        "watch:\n  pair_timeout_s: 86401\n  settle_s: -0.5\n  job_wait_s: -1\n  rescan_s: 0\n"
        "  workers: 65\n  stop_timeout_s: -1\n  max_attempts: 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.problems == [
        "ollama.connect_timeout_s: must be greater than 0",
        "ollama.read_timeout_s: must be greater than 0",
        "ollama.create_timeout_s: must be greater than 0",
        "ollama.retries: must be at most 20",
        "training.lora_dropout: must be in [0, 1)",
        "training.warmup_ratio: must be at most 1",
        "training.timeout_s: must be greater than 0",
        "training.grace_s: must not be negative",
        "watch.pair_timeout_s: must be at most 86400",
        "watch.settle_s: must not be negative",
        "watch.job_wait_s: must not be negative",
        "watch.rescan_s: must be greater than 0",
        "watch.workers: must be at most 64",
        "watch.stop_timeout_s: must not be negative",
        "watch.max_attempts: must be at least 1",
        "ollama.backoff_max_s: must be at least ollama.backoff_s (2)",
    ]
    assert load_config(None, env={"FINE_TUNER_WATCH__WORKERS": "64", "FINE_TUNER_OLLAMA__RETRIES": "0",
                                  "FINE_TUNER_WATCH__RESCAN_S": "86400"}).watch.workers == 64


def test_ollama_max_response_bytes_is_a_positive_integer(tmp_path):
    """ollama.max_response_bytes defaults to 8 MiB, is set from the file or FINE_TUNER_OLLAMA__MAX_RESPONSE_BYTES,
    and zero, a negative number or a fraction are refused naming the key."""
    path = tmp_path / "c.yaml"
    path.write_text("ollama:\n  max_response_bytes: 65536\n")
    from_env = load_config(None, env={"FINE_TUNER_OLLAMA__MAX_RESPONSE_BYTES": "1024"})
    assert (load_config(None, env={}).ollama.max_response_bytes, load_config(path, env={}).ollama.max_response_bytes,
            from_env.ollama.max_response_bytes) == (8 * 1024 * 1024, 65536, 1024)
    problems = []
    for value in ("0", "-5", "1.5"):
        with pytest.raises(ConfigError) as info:
            load_config(None, env={"FINE_TUNER_OLLAMA__MAX_RESPONSE_BYTES": value})
        problems += info.value.problems
    assert problems == ["ollama.max_response_bytes: must be greater than 0",
                        "ollama.max_response_bytes: must be greater than 0",
                        "ollama.max_response_bytes: expected int, got str"]


def test_non_finite_floats_inside_training_axolotl_are_refused(tmp_path):
    """A nan or inf anywhere in training.axolotl's extra settings (nested too) names its key; finite
    numbers pass."""
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  axolotl:\n    max_grad_norm: .nan\n    adam_beta2: 0.95\n"
                    "    fsdp_config:\n      limits: [1.0, -.inf]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.problems == ["training.axolotl: max_grad_norm: must be a finite number (not nan or inf)",
                                   "training.axolotl: fsdp_config: must be a finite number (not nan or inf)"]
    assert load_config(overrides={"training": {"axolotl": {"adam_beta2": 0.95}}}, env={}).training.axolotl == {
        "adam_beta2": 0.95}


def test_job_learning_rate_must_be_finite():
    """A job's learning_rate of inf or nan is refused like a non-positive one."""
    with pytest.raises(ConfigError) as info:
        job_settings(Defaults(), {"learning_rate": float("inf")})
    assert info.value.problems == ["learning_rate: must be a finite number"]
    with pytest.raises(ConfigError) as info:
        job_settings(Defaults(), {"learning_rate": float("nan")})
    assert info.value.problems == ["learning_rate: must be a finite number"]


VALID_HOSTS = ["127.0.0.1", "127.0.0.1:11434", "localhost:8080", "http://localhost", "https://ollama.example.com",
               "http://ollama.example.com:8080/proxy/", "[::1]:11434", "http://[::1]:8080", "0.0.0.0",
               ":11434", "example.com", ""]
INVALID_HOSTS = [
    ("http://[::1", "not a well-formed URL"),
    ("ht!tp://x", "the scheme must be http or https"),
    ("ftp://x", "the scheme must be http or https"),
    ("http://host:99999", "the port must be a number from 1 to 65535"),
    ("host:0", "the port must be a number from 1 to 65535"),
    ("host:abc", "the port must be a number from 1 to 65535"),
    ("http://", "it names no host"),
    ("https://:8080", "it names no host"),
    ("exa mple.com", "it holds whitespace or control characters"),
    ("http://x\x1b", "it holds whitespace or control characters"),
    ("http://ho!st:80", "the host name has characters other than letters, digits, '.', '-' and '_'"),
    ("http://user:pw@host", "it must not hold a user name, password, query or fragment"),
    ("http://host/?q=1", "it must not hold a user name, password, query or fragment"),
]
HOST_RULE = "; use http(s)://host[:port][/path] or host[:port]"


@pytest.mark.parametrize("host", VALID_HOSTS)
def test_valid_ollama_hosts_are_accepted(host):
    """Every host form ollama.parse_host understands is accepted."""
    assert load_config(None, env={"FINE_TUNER_OLLAMA__HOST": host}).ollama.host == (host or None)


@pytest.mark.parametrize(("host", "reason"), INVALID_HOSTS)
def test_invalid_ollama_hosts_are_refused(tmp_path, host, reason):
    """A malformed ollama.host is a ConfigError naming the key and why, without echoing the value."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"ollama": {"host": host}}))
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.problems == [f"ollama.host: {reason}{HOST_RULE}"]


def test_paths_group_names_an_existing_group(tmp_path):
    """paths.group takes a group of this machine (from the file or FINE_TUNER_PATHS__GROUP); unset is None."""
    path = tmp_path / "c.yaml"
    path.write_text("paths:\n  group: root\n")
    from_env = load_config(None, env={"FINE_TUNER_PATHS__GROUP": "root"})
    assert (load_config(path, env={}).paths.group, from_env.paths.group,
            load_config(None, env={}).paths.group) == ("root", "root", None)


def test_paths_group_that_does_not_exist_is_refused_with_what_to_do(tmp_path):
    """A paths.group that is no group of this machine is a ConfigError naming it and saying what to do."""
    with pytest.raises(ConfigError) as info:
        load_config(None, env={"FINE_TUNER_PATHS__GROUP": "no-such-group-4242"})
    assert info.value.problems == [
        "paths.group: there is no group 'no-such-group-4242' on this machine: create it (groupadd) and add the "
        "service user and the analysts to it, or remove the setting"]


def test_topic_definition_and_group_by_in_jobs_and_config():
    """Both are job keys and settings; a blank or oversized value is refused naming the key."""
    from daemon.config import MAX_DEFINITION_CHARS, Defaults

    settings = job_settings(Defaults(model="m"), {"topic_definition": "Match: a respiratory infection.",
                                                  "group_by": "Site"})
    assert (settings.topic_definition, settings.group_by) == ("Match: a respiratory infection.", "Site")
    with pytest.raises(ConfigError) as err:
        job_settings(Defaults(model="m"), {"topic_definition": "x" * (MAX_DEFINITION_CHARS + 1), "group_by": " "})
    assert err.value.problems == [f"topic_definition: {MAX_DEFINITION_CHARS + 1} characters, over the limit of "
                                  f"{MAX_DEFINITION_CHARS}", "group_by: must not be blank (leave the key out instead)"]
    cfg = load_config(env={"FINE_TUNER_EVALUATION__GROUP_BY": "Site"},
                      overrides={"defaults": {"topic_definition": "c"}})
    assert (cfg.evaluation.group_by, cfg.defaults.topic_definition) == ("Site", "c")
    with pytest.raises(ConfigError, match="evaluation.group_by: must not be blank"):
        load_config(env={}, overrides={"evaluation": {"group_by": ""}})


def test_code_knowledge_in_jobs_and_config(tmp_path):
    """code_knowledge is a job key and a defaults setting (auto unless set); YAML's bare on and off
    read as the words, not booleans; any other value is refused naming the key."""
    from daemon.config import Defaults

    assert (Defaults().code_knowledge, job_settings(Defaults(model="m")).code_knowledge) == ("auto", "auto")
    config = tmp_path / "config.yaml"
    config.write_text("defaults:\n  model: m\n  code_knowledge: off\n")
    cfg = load_config(config, env={})
    assert cfg.defaults.code_knowledge == "off"
    job = tmp_path / "visits.job.yaml"
    job.write_text("code_knowledge: on\n")
    assert job_settings(cfg.defaults, read_job_file(job)).code_knowledge == "on"
    assert job_settings(cfg.defaults, {}).code_knowledge == "off"
    assert load_config(None, env={"FINE_TUNER_DEFAULTS__CODE_KNOWLEDGE": "on"}).defaults.code_knowledge == "on"
    with pytest.raises(ConfigError) as err:
        job_settings(Defaults(model="m"), {"code_knowledge": "always"})
    assert err.value.problems == ["code_knowledge: must be one of auto, on, off"]
    with pytest.raises(ConfigError) as err:
        load_config(None, env={}, overrides={"defaults": {"code_knowledge": "yes"}})
    assert err.value.problems == ["defaults.code_knowledge: must be one of auto, on, off"]

def test_the_openai_section_from_the_environment():
    """FINE_TUNER_OPENAI__* set the openai section like any other; evaluation.backend takes openai."""
    cfg = load_config(None, env={"FINE_TUNER_OPENAI__BASE_URL": "http://127.0.0.1:8080/v1",
                                 "FINE_TUNER_OPENAI__MODEL": "gemma-3-270m",
                                 "FINE_TUNER_OPENAI__API_KEY_ENV": "LLM_KEY",
                                 "FINE_TUNER_OPENAI__PARALLEL": "8", "FINE_TUNER_EVALUATION__BACKEND": "openai"})
    o = cfg.openai
    assert (o.base_url, o.model, o.api_key_env, o.parallel, o.retries, o.read_timeout_s, cfg.evaluation.backend) == (
        "http://127.0.0.1:8080/v1", "gemma-3-270m", "LLM_KEY", 8, 3, 120.0, "openai")
    assert load_config(None, env={}).openai.base_url is None


def test_the_metrics_section_from_the_environment():
    """FINE_TUNER_METRICS__* set the metrics section; by default it is off (no port, no textfile)."""
    cfg = load_config(None, env={"FINE_TUNER_METRICS__PORT": "9464",
                                 "FINE_TUNER_METRICS__TEXTFILE": "m/fine_tuner.prom",
                                 "FINE_TUNER_METRICS__TEXTFILE_EVERY_S": "5"})
    m = cfg.metrics
    assert (m.port, m.host, m.textfile, m.textfile_every_s) == (9464, "127.0.0.1", "m/fine_tuner.prom", 5.0)
    d = load_config(None, env={}).metrics
    assert (d.port, d.host, d.textfile, d.textfile_every_s) == (None, "127.0.0.1", None, 15.0)


def test_metrics_settings_that_cannot_work_are_named():
    """Port 0 or over 65535, a host that is no address, a textfile not ending in .prom are refused."""
    host_rule = ("metrics.host: must be an IP address or a host name of this machine, e.g. 127.0.0.1 "
                 "(loopback: only this machine's Prometheus can scrape it)")
    prom_rule = ("metrics.textfile: must be a path ending in .prom (the only files node exporter's textfile "
                 "collector reads), without control characters")
    cases = [
        ({"port": 0}, ["metrics.port: must be at least 1"]),
        ({"port": 65536, "textfile_every_s": 0.0}, ["metrics.port: must be at most 65535",
                                                    "metrics.textfile_every_s: must be greater than 0"]),
        ({"host": "my host"}, [host_rule]),
        ({"host": ""}, [host_rule]),
        ({"textfile": "metrics.txt"}, [prom_rule]),
        ({"textfile": "a\nb.prom"}, [prom_rule]),
    ]
    for values, problems in cases:
        with pytest.raises(ConfigError) as info:
            load_config(None, env={}, overrides={"metrics": values})
        assert info.value.problems == problems, values


def test_openai_settings_that_cannot_work_are_named_without_their_values():
    """A base_url that is not a plain http(s) URL (credentials in it included), a key where the
    variable's name belongs, and numbers out of range are refused naming the key, never the value."""
    url_rule = "; use http(s)://host[:port][/path], e.g. http://127.0.0.1:8080/v1"
    cases = [
        ({"base_url": "127.0.0.1:8080/v1"}, [f"openai.base_url: it must start with http:// or https://{url_rule}"]),
        ({"base_url": "ftp://host/v1"}, [f"openai.base_url: it must start with http:// or https://{url_rule}"]),
        ({"base_url": "http://user:ZZSECRET@host/v1"}, [
            "openai.base_url: it must not hold a user name or password: put the API key in an environment variable "
            f"and name that variable in openai.api_key_env{url_rule}"]),
        ({"base_url": "https://host/v1?key=ZZSECRET"},
         [f"openai.base_url: it must not hold a query or fragment{url_rule}"]),
        ({"base_url": "http://host:0/v1"}, [f"openai.base_url: the port must be a number from 1 to 65535{url_rule}"]),
        ({"base_url": "http:///v1"}, [f"openai.base_url: it names no host{url_rule}"]),
        ({"api_key_env": "sk-ZZSECRET"}, [
            "openai.api_key_env: must be the name of an environment variable (letters, digits and '_', not starting "
            "with a digit, at most 128 characters) that holds the key, never the key itself"]),
        ({"model": "my model"}, ["openai.model: must be the served model's name: 1 to 200 characters without "
                                 "whitespace or control characters"]),
        ({"parallel": 0, "retries": 21, "read_timeout_s": 0.0}, [
            "openai.read_timeout_s: must be greater than 0", "openai.retries: must be at most 20",
            "openai.parallel: must be at least 1"]),
        ({"backoff_s": 2.0, "backoff_max_s": 1.0}, ["openai.backoff_max_s: must be at least openai.backoff_s (2)"]),
    ]
    for values, problems in cases:
        with pytest.raises(ConfigError) as info:
            load_config(None, env={}, overrides={"openai": values})
        assert info.value.problems == problems, values
        assert "ZZSECRET" not in str(info.value)


def test_the_config_file_is_the_first_of_flag_env_root_and_system(tmp_path):
    """find_config_file: --config, then $FINE_TUNER_CONFIG, then <root>/config.yaml, then the
    system's file; none of them: no file, and the places it looked at."""
    from daemon.config import ConfigFile, find_config_file

    root, system = tmp_path / "root", tmp_path / "etc" / "config.yaml"
    root.mkdir()
    (tmp_path / "etc").mkdir()
    assert find_config_file(None, {}, root, system=system) == ConfigFile(
        None, "none", (str(root / "config.yaml"), str(system)))
    system.write_text("{}\n")
    assert find_config_file(None, {}, root, system=system) == ConfigFile(str(system), "system")
    (root / "config.yaml").write_text("{}\n")
    assert find_config_file(None, {}, root, system=system) == ConfigFile(str(root / "config.yaml"), "root")
    env = {"FINE_TUNER_CONFIG": "/e.yaml"}
    assert find_config_file(None, env, root, system=system) == ConfigFile("/e.yaml", "FINE_TUNER_CONFIG")
    assert find_config_file("/f.yaml", env, root, system=system) == ConfigFile("/f.yaml", "--config")


def test_a_found_config_file_must_be_a_regular_file_nobody_else_can_change(tmp_path):
    """A config.yaml found by its place that others may write, or that is a folder, is a
    ConfigError naming it."""
    from daemon.config import find_config_file

    system = tmp_path / "absent.yaml"
    (tmp_path / "config.yaml").mkdir()
    with pytest.raises(ConfigError) as info:
        find_config_file(None, {}, tmp_path, system=system)
    assert info.value.problems == ["not a regular file"]
    (tmp_path / "config.yaml").rmdir()
    (tmp_path / "config.yaml").write_text("{}\n")
    (tmp_path / "config.yaml").chmod(0o646)
    with pytest.raises(ConfigError) as info:
        find_config_file(None, {}, tmp_path, system=system)
    assert info.value.problems == ["writable by its group or by others: only a file nobody else can change is "
                                   "read without --config"]


def test_compare_is_a_job_key_and_an_evaluation_setting_with_three_values(tmp_path):
    """`compare` in a job file takes all, base or none (unset: evaluation.compare); anything else is
    a ConfigError naming the key, as is a bad evaluation.compare in the config."""
    assert job_settings(Defaults(), {}).compare is None
    assert job_settings(Defaults(), {"compare": "none"}).compare == "none"
    with pytest.raises(ConfigError) as info:
        job_settings(Defaults(), {"compare": "some"})
    assert info.value.problems == ["compare: must be one of all, base, none"]
    assert load_config(None, {"FINE_TUNER_EVALUATION__COMPARE": "base"}).evaluation.compare == "base"
    with pytest.raises(ConfigError) as info:
        load_config(None, {}, overrides={"evaluation": {"compare": "everything"}})
    assert info.value.problems == ["evaluation.compare: must be one of all, base, none"]
