"""Configuration: frozen dataclasses and ``load_config(path, env, overrides)``.

Precedence: built-in defaults, then one YAML file (``--config FILE`` or ``FINE_TUNER_CONFIG``), then
``FINE_TUNER_<SECTION>__<KEY>`` environment variables (for example ``FINE_TUNER_OLLAMA__HOST``;
``FINE_TUNER_<KEY>`` alone addresses ``defaults``), then CLI overrides (later wins). Every problem
is collected and raised once as a ``ConfigError`` naming each key. Unknown keys and wrong types are
errors. This module neither logs nor creates folders.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

APPROACHES = ("auto", "fine_tune", "model_set")
REGISTER_MODES = ("auto", "required", "off")


@dataclass(frozen=True)
class Defaults:
    """Per-job settings used when a job file or CLI flag does not set them."""

    model: str = "llama3.2:1b"
    topics: str = ""
    epochs: int = 3
    learning_rate: float = 1e-4
    batch_size: int = 4
    approach: str = "auto"
    fallback: bool = True
    min_rows: int = 50
    few_shot_per_rating: int = 2
    few_shot_max_chars: int = 12000
    validation_fraction: float = 0.1
    seed: int = 42
    mapping: str | None = None  # a default rating mapping file used when a drop has none


@dataclass(frozen=True)
class OllamaConfig:
    host: str | None = None  # None: OLLAMA_HOST, else http://127.0.0.1:11434
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 60.0
    create_timeout_s: float = 600.0
    retries: int = 3
    backoff_s: float = 0.5
    backoff_max_s: float = 8.0
    register: str = "auto"


@dataclass(frozen=True)
class TrainingConfig:
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    sequence_len: int = 2048
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.03
    logging_steps: int = 1
    timeout_s: float = 6 * 3600.0
    grace_s: float = 10.0
    allow_download: bool = False
    device: str = "auto"  # auto | cpu | cuda | mps


@dataclass(frozen=True)
class PathsConfig:
    root: str = "."
    inbox: str = "inbox"
    outputs: str = "outputs"
    state_dir: str | None = None  # None: $STATE_DIRECTORY, else <root>/.fine-tuner
    log_dir: str | None = None  # None: $LOGS_DIRECTORY, else the state directory


@dataclass(frozen=True)
class WatchConfig:
    pair_timeout_s: float = 5.0
    settle_s: float = 0.5
    job_wait_s: float = 0.0  # a complete dataset+mapping without a job file waits this long for one
    rescan_s: float = 30.0
    polling: bool = False
    max_input_bytes: int = 512 * 1024 * 1024
    workers: int = 2
    stop_timeout_s: float = 60.0
    max_attempts: int = 3
    recent: int = 20


@dataclass(frozen=True)
class Config:
    defaults: Defaults = field(default_factory=Defaults)
    ollama: OllamaConfig = field(default_factory=OllamaConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    base_models: Mapping[str, str] = field(default_factory=dict)
    paths: PathsConfig = field(default_factory=PathsConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    debug: bool = False
    source: str | None = None  # the YAML file this came from, for messages


SECTIONS = {"defaults": Defaults, "ollama": OllamaConfig, "training": TrainingConfig,
            "paths": PathsConfig, "watch": WatchConfig}


# --- type coercion -----------------------------------------------------------------------------

def _coerce(value: Any, hint: Any, key: str, from_text: bool, problems: list[str]) -> Any:
    """Check ``value`` against the annotation ``hint``; strings from the environment are parsed."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (from_text and value in ("", "null", "none", "None")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, from_text, problems)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_text and isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_text and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        if from_text and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        problems.append(f"{key}: expected a list of strings")
        return None
    expected = getattr(hint, "__name__", str(hint))
    problems.append(f"{key}: expected {expected}, got {type(value).__name__}")
    return None


def _build_section(cls: type, values: Mapping[str, Any], prefix: str, problems: list[str],
                   from_text: bool = False) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in hints:
            problems.append(f"{prefix}{key}: unknown key (known: {', '.join(sorted(hints))})")
            continue
        out[key] = _coerce(value, hints[key], f"{prefix}{key}", from_text, problems)
    return out


def _check_values(cfg: Config, problems: list[str]) -> None:
    d, o, t, w = cfg.defaults, cfg.ollama, cfg.training, cfg.watch
    if d.approach not in APPROACHES:
        problems.append(f"defaults.approach: must be one of {', '.join(APPROACHES)}")
    if o.register not in REGISTER_MODES:
        problems.append(f"ollama.register: must be one of {', '.join(REGISTER_MODES)}")
    for key, value in (("defaults.epochs", d.epochs), ("defaults.batch_size", d.batch_size),
                       ("defaults.few_shot_per_rating", d.few_shot_per_rating),
                       ("training.lora_r", t.lora_r), ("training.sequence_len", t.sequence_len),
                       ("training.gradient_accumulation_steps", t.gradient_accumulation_steps),
                       ("watch.workers", w.workers), ("watch.max_attempts", w.max_attempts),
                       ("watch.max_input_bytes", w.max_input_bytes)):
        if value is not None and value < 1:
            problems.append(f"{key}: must be at least 1")
    if d.learning_rate is not None and not d.learning_rate > 0:
        problems.append("defaults.learning_rate: must be positive")
    if d.validation_fraction is not None and not 0 <= d.validation_fraction < 1:
        problems.append("defaults.validation_fraction: must be in [0, 1)")
    if t.device not in ("auto", "cpu", "cuda", "mps"):
        problems.append("training.device: must be one of auto, cpu, cuda, mps")
    for key in ("pair_timeout_s", "settle_s", "job_wait_s", "rescan_s", "stop_timeout_s"):
        value = getattr(w, key)
        if value is not None and value < 0:
            problems.append(f"watch.{key}: must not be negative")


def _env_layer(env: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """``FINE_TUNER_OLLAMA__HOST`` → {"ollama": {"host": ...}}; ``FINE_TUNER_EPOCHS`` → defaults."""
    layer: dict[str, dict[str, str]] = {}
    for name, value in env.items():
        if not name.startswith("FINE_TUNER_") or name == "FINE_TUNER_CONFIG":
            continue
        rest = name[len("FINE_TUNER_"):].lower()
        section, _, key = rest.partition("__")
        if not key:
            section, key = ("debug", "") if rest == "debug" else ("defaults", rest)
        layer.setdefault(section, {})[key] = value
    return layer


def _merge(base: dict, top: Mapping) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def read_config_file(path: str | os.PathLike) -> dict:
    """Parse the YAML file (``safe_load`` only); errors name the file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read the file: {exc.strerror}"], source=str(p)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError([f"not valid YAML{where}"], source=str(p)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(["the top level must be a mapping of sections"], source=str(p))
    return data


def load_config(
    path: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the effective configuration. ``overrides`` uses the file's shape ({"defaults": {...}}).

    ``path`` None means ``env["FINE_TUNER_CONFIG"]`` when set, else built-in defaults only.
    """
    env = os.environ if env is None else env
    if path is None and env.get("FINE_TUNER_CONFIG"):
        path = env["FINE_TUNER_CONFIG"]
    file_layer = read_config_file(path) if path is not None else {}
    source = str(path) if path is not None else None
    problems: list[str] = []
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    base_models: dict[str, str] = {}
    debug = False

    for layer, from_text in ((file_layer, False), (_env_layer(env), True), (overrides or {}, False)):
        for name, values in layer.items():
            if name == "debug":
                if from_text:
                    values = values.get("", values) if isinstance(values, dict) else values
                coerced = _coerce(values, bool, "debug", from_text, problems)
                debug = bool(coerced) if coerced is not None else debug
                continue
            if name == "base_models":
                if values is None:
                    continue
                if not isinstance(values, Mapping):
                    problems.append("base_models: expected a mapping of Ollama name to weights dir or HF id")
                    continue
                for k, v in values.items():
                    if not isinstance(k, str) or not isinstance(v, str):
                        problems.append(f"base_models.{k}: expected a string (local dir or HF repo id)")
                    else:
                        base_models[k] = v
                continue
            if name not in SECTIONS:
                known = ", ".join(sorted([*SECTIONS, "base_models", "debug"]))
                problems.append(f"{name}: unknown section (known: {known})")
                continue
            if values is None:
                continue
            if not isinstance(values, Mapping):
                problems.append(f"{name}: expected a mapping")
                continue
            sections[name] = _merge(sections[name], _build_section(SECTIONS[name], values, f"{name}.", problems, from_text))

    built: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        values = {k: v for k, v in sections[name].items() if v is not None or _optional(cls, k)}
        built[name] = cls(**values)
    cfg = Config(**built, base_models=dict(base_models), debug=debug, source=source)
    _check_values(cfg, problems)
    if problems:
        raise ConfigError(problems, source=source)
    return cfg


def _optional(cls: type, key: str) -> bool:
    hint = typing.get_type_hints(cls)[key]
    return type(None) in typing.get_args(hint)


def with_defaults(cfg: Config, **changes: Any) -> Config:
    """A copy of ``cfg`` whose ``defaults`` section has ``changes`` applied (None values ignored)."""
    changes = {k: v for k, v in changes.items() if v is not None}
    return dataclasses.replace(cfg, defaults=dataclasses.replace(cfg.defaults, **changes))


def as_dict(cfg: Config) -> dict:
    """The configuration as plain data (for metadata and ``--print-config``)."""
    out = dataclasses.asdict(cfg)
    out["base_models"] = dict(cfg.base_models)
    return out


# --- per-job settings (job files, CLI flags) ----------------------------------------------------

JOB_KEYS = ("model", "topics", "epochs", "learning_rate", "batch_size", "approach", "fallback",
            "output_model", "force")


@dataclass(frozen=True)
class JobSettings:
    """The settings of one job: the config's ``defaults`` with a job file's values on top."""

    model: str
    topics: str
    epochs: int
    learning_rate: float
    batch_size: int
    approach: str
    fallback: bool
    output_model: str | None = None
    force: bool = False


def job_settings(defaults: Defaults, values: Mapping[str, Any] | None = None, *,
                 source: str = "job file") -> JobSettings:
    """Merge ``values`` (a parsed job file, or CLI flags; None values ignored) over ``defaults``.
    Unknown keys and wrong types raise one ``ConfigError`` naming each key."""
    values = {k: v for k, v in (values or {}).items() if v is not None}
    problems: list[str] = []
    hints = typing.get_type_hints(JobSettings)
    merged: dict[str, Any] = {k: getattr(defaults, k) for k in hints if hasattr(defaults, k)}
    for key, value in values.items():
        if key not in hints:
            problems.append(f"{key}: unknown key (known: {', '.join(JOB_KEYS)})")
            continue
        if key == "topics" and isinstance(value, list) and all(isinstance(t, str) for t in value):
            value = ", ".join(value)
        merged[key] = _coerce(value, hints[key], key, False, problems)
    if merged.get("approach") not in APPROACHES:
        problems.append(f"approach: must be one of {', '.join(APPROACHES)}")
    for key in ("epochs", "batch_size"):
        if isinstance(merged.get(key), int) and merged[key] < 1:
            problems.append(f"{key}: must be at least 1")
    if isinstance(merged.get("learning_rate"), float) and not merged["learning_rate"] > 0:
        problems.append("learning_rate: must be positive")
    if not merged.get("model"):
        problems.append("model: required (set it in the job file or in the config's defaults)")
    if problems:
        raise ConfigError(problems, source=source)
    return JobSettings(**merged)


def read_job_file(path: str | os.PathLike) -> dict:
    """Parse a job file (YAML or JSON; ``safe_load`` reads both) into a mapping, or ConfigError."""
    data = read_config_file(path)
    return data
