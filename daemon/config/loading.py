"""Building the effective configuration (``load_config(path, env, overrides)``): built-in defaults,
then the YAML file, then ``FINE_TUNER_<SECTION>__<KEY>`` environment variables (for example
``FINE_TUNER_OLLAMA__HOST``; ``FINE_TUNER_<KEY>`` alone addresses ``defaults``; ``PROCESS_VARIABLES``
such as ``FINE_TUNER_CACHE_DIR`` are not settings), then overrides: later wins. Every problem is
collected and raised once as a ``ConfigError`` naming each key; unknown keys and sections are
problems. ``value_sources`` says where each value came from (``fine-tuner config --show``).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..text import printable
from .files import ConfigFile, read_config_file
from .rules import check_values, coerce, model_name_problem
from .schema import SECTIONS, Config


# FINE_TUNER_* variables that are not settings: read as they are by the code that needs them
# (the config file's path; daemon.llamacpp's cache folder and llama-server binary)
PROCESS_VARIABLES = frozenset({"FINE_TUNER_CONFIG", "FINE_TUNER_CACHE_DIR", "FINE_TUNER_LLAMA_SERVER"})


def _env_setting(name: str) -> tuple[str, str] | None:
    """(section, key) a ``FINE_TUNER_*`` variable sets (``debug`` is ("debug", "")), or None for
    another variable or one of ``PROCESS_VARIABLES``."""
    if not name.startswith("FINE_TUNER_") or name in PROCESS_VARIABLES:
        return None
    rest = name[len("FINE_TUNER_"):].lower()
    section, _, key = rest.partition("__")
    if not key:
        section, key = ("debug", "") if rest == "debug" else ("defaults", rest)
    return section, key


def _env_layer(env: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """``FINE_TUNER_OLLAMA__HOST`` → {"ollama": {"host": ...}}; ``FINE_TUNER_EPOCHS`` → defaults.
    ``PROCESS_VARIABLES`` are left out; any other ``FINE_TUNER_*`` name is a setting (unknown: an error)."""
    layer: dict[str, dict[str, str]] = {}
    for name, value in env.items():
        if (setting := _env_setting(name)) is not None:
            layer.setdefault(setting[0], {})[setting[1]] = value
    return layer


def _build_section(cls: type, values: Mapping[str, Any], prefix: str, problems: list[str],
                   from_text: bool = False) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in hints:
            problems.append(f"{prefix}{printable(str(key))}: unknown key (known: {', '.join(sorted(hints))})")
            continue
        out[key] = coerce(value, hints[key], f"{prefix}{key}", from_text, problems)
    return out


def _merge(base: dict, top: Mapping) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def load_config(
    path: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    checks: Iterable[Callable[[Config], list[str]]] = (),
) -> Config:
    """Build the effective configuration. ``overrides`` uses the file's shape ({"defaults": {...}}).

    ``path`` None means ``env["FINE_TUNER_CONFIG"]`` when set, else built-in defaults only. ``checks``
    add the problems of rules that live in later rooms (``data.jobsettings.defaults_problems``: the
    ``prompt_template`` setting), listed in the same ``ConfigError``.
    """
    env = os.environ if env is None else env
    if path is None and env.get("FINE_TUNER_CONFIG"):
        path = env["FINE_TUNER_CONFIG"]
    file_layer = read_config_file(path) if path is not None else {}
    source = printable(str(path), limit=4096) if path is not None else None
    problems: list[str] = []
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    base_models: dict[str, str] = {}
    debug = False

    for layer, from_text in ((file_layer, False), (_env_layer(env), True), (overrides or {}, False)):
        for name, values in layer.items():
            if name == "debug":
                if from_text:
                    values = values.get("", values) if isinstance(values, dict) else values
                coerced = coerce(values, bool, "debug", from_text, problems)
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
                        problems.append(f"base_models.{printable(str(k))}: expected a string (local dir or HF repo id)")
                    elif why := model_name_problem(k):
                        problems.append(f"base_models.{printable(k)}: {why}")
                    else:
                        base_models[k] = v
                continue
            if name not in SECTIONS:
                known = ", ".join(sorted([*SECTIONS, "base_models", "debug"]))
                problems.append(f"{printable(str(name))}: unknown section (known: {known})")
                continue
            if values is None:
                continue
            if not isinstance(values, Mapping):
                problems.append(f"{name}: expected a mapping")
                continue
            section = _build_section(SECTIONS[name], values, f"{name}.", problems, from_text)
            sections[name] = _merge(sections[name], section)

    built: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        values = {k: v for k, v in sections[name].items() if v is not None or _optional(cls, k)}
        built[name] = cls(**values)
    cfg = Config(**built, base_models=dict(base_models), debug=debug, source=source)
    check_values(cfg, problems)
    for check in checks:
        problems.extend(check(cfg))
    if problems:
        raise ConfigError(problems, source=source)
    return cfg


def _optional(cls: type, key: str) -> bool:
    hint = typing.get_type_hints(cls)[key]
    return type(None) in typing.get_args(hint)


def state_directory(cfg: Config, env: Mapping[str, str] | None = None) -> Path:
    """Where the daemon keeps its state (journal, logs, measured rates): ``paths.state_dir``, else
    ``$STATE_DIRECTORY`` (systemd), else ``<root>/.fine-tuner``; relative paths under ``paths.root``."""
    env = os.environ if env is None else env
    state = cfg.paths.state_dir or env.get("STATE_DIRECTORY", "").split(":")[0] or ".fine-tuner"
    return Path(cfg.paths.root).absolute() / state


def with_defaults(cfg: Config, **changes: Any) -> Config:
    """A copy of ``cfg`` whose ``defaults`` section has ``changes`` applied (None values ignored)."""
    changes = {k: v for k, v in changes.items() if v is not None}
    return dataclasses.replace(cfg, defaults=dataclasses.replace(cfg.defaults, **changes))


def as_dict(cfg: Config) -> dict:
    """The configuration as plain data (for metadata and ``--print-config``)."""
    out = dataclasses.asdict(cfg)
    out["base_models"] = dict(cfg.base_models)
    return out


def value_sources(cfg: Config, found: ConfigFile, env: Mapping[str, str]) -> list[tuple[str, Any, str]]:
    """Every effective setting as (key, value, where it came from): the variable that set it, the
    file, or "default" (for ``fine-tuner config --show``)."""
    file_layer = read_config_file(found.path) if found.path is not None else {}
    from_env = {setting: name for name in sorted(env) if (setting := _env_setting(name)) is not None}
    rows: list[tuple[str, Any, str]] = []
    data = as_dict(cfg)
    for section in (*SECTIONS, "base_models", "debug"):
        values = data[section]
        items = values.items() if isinstance(values, dict) else [("", values)]
        in_file = file_layer.get(section)
        for key, value in sorted(items) if section == "base_models" else items:
            name = from_env.get((section, key))
            if name is not None:
                where = f"env {name}"
            elif (isinstance(in_file, Mapping) and key in in_file) or (key == "" and section in file_layer):
                where = f"file {found.path}"
            else:
                where = "default"
            rows.append((f"{section}.{key}" if key else section, value, where))
    return rows

