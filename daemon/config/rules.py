"""The rules a setting's value must follow, each broken one a problem that names the key and never
quotes the value: types (``coerce``; strings from the environment are parsed), numeric ranges
(``number_problem``), Ollama model names and hosts, the OpenAI-compatible ``base_url``, the metrics and
axolotl sections, and the free text a system prompt can carry (``topics_problem``, ``text_problem``).
``check_values`` applies them to a whole ``Config``. Values out of range, nan and inf included, are
problems.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import types
import typing
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

from ..text import has_unsafe, printable
from .schema import (
    ANSWER_FORMS,
    APPROACHES,
    CODE_KNOWLEDGE,
    COMPARE_MODES,
    EVALUATION_BACKENDS,
    EVALUATION_MODES,
    MERGE_ADAPTER_MODES,
    REGISTER_MODES,
    SECTIONS,
    TRAINING_BACKENDS,
    Config,
    MetricsConfig,
    OpenAIConfig,
)


# training_config.yaml keys that fine-tuner writes itself: training.axolotl may not set them
AXOLOTL_OWN_KEYS = frozenset((
    "base_model", "datasets", "test_datasets", "adapter", "lora_r", "lora_alpha", "lora_dropout",
    "lora_target_modules", "sequence_len", "micro_batch_size", "gradient_accumulation_steps",
    "num_epochs", "learning_rate", "warmup_ratio", "lr_scheduler", "optimizer", "weight_decay",
    "logging_steps", "seed", "output_dir", "eval_strategy", "dataset_prepared_path",
    "lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel"))


# The free text a job carries goes into every training record's system prompt, the metadata, the
# Modelfile and errors: a few lines each. A bigger value is refused naming its key and the limit
# (model names: MAX_MODEL_NAME_CHARS; a format-string prompt_template: template.MAX_TEMPLATE_CHARS).
MAX_TOPICS = 50
MAX_TOPICS_CHARS = 2000
MAX_DEFINITION_CHARS = 8000  # topic_definition: a page of criteria
MAX_COLUMN_NAME_CHARS = 200  # group_by


_ON_OFF_KEYS = frozenset({"code_knowledge"})  # text settings whose values include on and off
_TRUE_WORDS, _FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")  # booleans from the environment


def coerce(value: Any, hint: Any, key: str, from_text: bool, problems: list[str]) -> Any:
    """Check ``value`` against the annotation ``hint``; strings from the environment are parsed."""
    if hint is Any:  # checked by its own parser (prompt_template)
        return value
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (from_text and value in ("", "null", "none", "None")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], key, from_text, problems)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str) and value.lower() in (*_TRUE_WORDS, *_FALSE_WORDS):
            return value.lower() in _TRUE_WORDS
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
        if isinstance(value, bool) and key.rsplit(".", 1)[-1] in _ON_OFF_KEYS:  # YAML reads on/off as booleans
            return "on" if value else "off"
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


DAY_S = 86400.0


def _at_least(low: float) -> tuple[Callable[[float], bool], str]:
    return (lambda v: v >= low), ("must not be negative" if low == 0 else f"must be at least {low:g}")


def _at_most(high: float) -> tuple[Callable[[float], bool], str]:
    return (lambda v: v <= high), f"must be at most {high:g}"


_POSITIVE = ((lambda v: v > 0), "must be greater than 0")
_FRACTION = ((lambda v: 0 <= v < 1), "must be in [0, 1)")
_REVIEW_THRESHOLD = ((lambda v: 0 < v <= 1), "must be a confidence in (0, 1]")
# Each numeric key's rules, in the order its problems are listed; the first broken rule is named.
_RULES: dict[str, tuple[tuple[Callable[[float], bool], str], ...]] = {
    "defaults.epochs": (_at_least(1),),
    "defaults.learning_rate": (_POSITIVE,),
    "defaults.batch_size": (_at_least(1),),
    "defaults.few_shot_per_rating": (_at_least(1),),
    "defaults.validation_fraction": (_FRACTION,),
    "ollama.connect_timeout_s": (_POSITIVE,),
    "ollama.read_timeout_s": (_POSITIVE,),
    "ollama.create_timeout_s": (_POSITIVE,),
    "ollama.retries": (_at_least(0), _at_most(20)),
    "ollama.backoff_s": (_at_least(0),),
    "ollama.backoff_max_s": (_at_least(0),),
    "training.lora_r": (_at_least(1),),
    "training.lora_dropout": (_FRACTION,),
    "training.sequence_len": (_at_least(1),),
    "training.gradient_accumulation_steps": (_at_least(1),),
    "training.warmup_ratio": (_at_least(0), _at_most(1)),
    "training.early_stopping_patience": (_at_least(0), _at_most(100)),
    "training.timeout_s": (_POSITIVE,),
    "training.grace_s": (_at_least(0),),
    "watch.pair_timeout_s": (_at_least(0), _at_most(DAY_S)),
    "watch.settle_s": (_at_least(0), _at_most(DAY_S)),
    "watch.job_wait_s": (_at_least(0), _at_most(DAY_S)),
    "watch.rescan_s": (_POSITIVE, _at_most(DAY_S)),
    "watch.max_input_bytes": (_at_least(1),),
    "watch.workers": (_at_least(1), _at_most(64)),
    "watch.stop_timeout_s": (_at_least(0),),
    "watch.max_attempts": (_at_least(1),),
    "ollama.parallel": (_at_least(1), _at_most(64)),
    "ollama.max_response_bytes": (_POSITIVE,),
    "openai.connect_timeout_s": (_POSITIVE,),
    "openai.read_timeout_s": (_POSITIVE,),
    "openai.retries": (_at_least(0), _at_most(20)),
    "openai.backoff_s": (_at_least(0),),
    "openai.backoff_max_s": (_at_least(0),),
    "openai.parallel": (_at_least(1), _at_most(64)),
    "openai.max_response_bytes": (_POSITIVE,),
    "evaluation.max_rows": (_at_least(1),),
    "evaluation.batch_size": (_at_least(1), _at_most(256)),
    "evaluation.max_new_tokens": (_at_least(8), _at_most(4096)),
    "evaluation.timeout_s": (_POSITIVE,),
    "evaluation.recommend_min_kappa": (_at_least(-1), _at_most(1)),
    "evaluation.recommend_max_invalid_rate": (_at_least(0), _at_most(1)),
    "evaluation.verdict_min_rows": (_at_least(1),),
    "evaluation.min_kappa": (_at_least(-1), _at_most(1)),
    "evaluation.max_invalid_rate": (_at_least(0), _at_most(1)),
    "rating.review_below": (_REVIEW_THRESHOLD,),
    "metrics.port": (_at_least(1), _at_most(65535)),
    "metrics.textfile_every_s": (_POSITIVE, _at_most(DAY_S)),
}


def number_problem(key: str, value: float) -> str | None:
    """Why ``value`` cannot be the numeric setting ``key`` (e.g. ``defaults.learning_rate``): not a
    finite number, or the first of its range rules it breaks; None when it can (for CLI flags)."""
    if not math.isfinite(value):
        return "must be a finite number"
    return next((message for ok, message in _RULES.get(key, ()) if not ok(value)), None)


def _non_finite(cfg: Config, problems: list[str]) -> set[str]:
    """Every float setting that is nan or ±inf (YAML ``.nan``/``.inf``, environment "nan"/"inf")."""
    bad: set[str] = set()
    for name, cls in SECTIONS.items():
        section = getattr(cfg, name)
        for f in dataclasses.fields(cls):
            value = getattr(section, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                bad.add(f"{name}.{f.name}")
                problems.append(f"{name}.{f.name}: must be a finite number")
    return bad


def check_values(cfg: Config, problems: list[str]) -> None:
    """Add to ``problems`` every rule ``cfg`` breaks (``defaults.prompt_template`` is the data rules'
    to check: ``data.jobsettings.defaults_problems``)."""
    d, o, t = cfg.defaults, cfg.ollama, cfg.training
    bad = _non_finite(cfg, problems)
    for key, rules in _RULES.items():
        section, _, name = key.partition(".")
        value = getattr(getattr(cfg, section), name)
        if value is None or key in bad:
            continue
        broken = next((message for ok, message in rules if not ok(value)), None)
        if broken:
            problems.append(f"{key}: {broken}")
    if not {"ollama.backoff_s", "ollama.backoff_max_s"} & bad and o.backoff_max_s < o.backoff_s:
        problems.append(f"ollama.backoff_max_s: must be at least ollama.backoff_s ({o.backoff_s:g})")
    _check_openai(cfg.openai, bad, problems)
    if d.approach not in APPROACHES:
        problems.append(f"defaults.approach: must be one of {', '.join(APPROACHES)}")
    if d.code_knowledge not in CODE_KNOWLEDGE:
        problems.append(f"defaults.code_knowledge: must be one of {', '.join(CODE_KNOWLEDGE)}")
    if d.model is not None and (why := model_name_problem(d.model)):
        problems.append(f"defaults.model: {why}")
    if isinstance(d.topics, str) and (why := topics_problem(d.topics)):
        problems.append(f"defaults.topics: {why}")
    if isinstance(d.topic_definition, str) and (why := text_problem(d.topic_definition, MAX_DEFINITION_CHARS)):
        problems.append(f"defaults.topic_definition: {why}")
    group_by = cfg.evaluation.group_by
    if isinstance(group_by, str) and (why := text_problem(group_by, MAX_COLUMN_NAME_CHARS)):
        problems.append(f"evaluation.group_by: {why}")
    if o.register not in REGISTER_MODES:
        problems.append(f"ollama.register: must be one of {', '.join(REGISTER_MODES)}")
    if o.merge_adapter not in MERGE_ADAPTER_MODES:
        problems.append(f"ollama.merge_adapter: must be one of {', '.join(MERGE_ADAPTER_MODES)}")
    if cfg.paths.group is not None and (why := group_problem(cfg.paths.group)):
        problems.append(f"paths.group: {why}")
    if o.host is not None and (why := host_problem(o.host)):
        problems.append(f"ollama.host: {why}; use http(s)://host[:port][/path] or host[:port]")
    if cfg.evaluation.enabled not in EVALUATION_MODES:
        problems.append(f"evaluation.enabled: must be one of {', '.join(EVALUATION_MODES)}")
    if cfg.evaluation.backend not in EVALUATION_BACKENDS:
        problems.append(f"evaluation.backend: must be one of {', '.join(EVALUATION_BACKENDS)}")
    if cfg.evaluation.compare not in COMPARE_MODES:
        problems.append(f"evaluation.compare: must be one of {', '.join(COMPARE_MODES)}")
    if t.device not in ("auto", "cpu", "cuda", "mps"):
        problems.append("training.device: must be one of auto, cpu, cuda, mps")
    if t.backend not in TRAINING_BACKENDS:
        problems.append(f"training.backend: must be one of {', '.join(TRAINING_BACKENDS)}")
    if t.answer_forms not in ANSWER_FORMS:
        problems.append(f"training.answer_forms: must be one of {', '.join(ANSWER_FORMS)}")
    problems.extend(f"training.axolotl: {why}" for why in axolotl_settings_problems(t.axolotl))
    problems.extend(metrics_problems(cfg.metrics))


def metrics_problems(m: MetricsConfig) -> list[str]:
    """The ``metrics`` section's rules beyond the numeric ones (no value is quoted)."""
    problems = []
    if not m.host or has_unsafe(m.host) or _host_problem(m.host):
        problems.append("metrics.host: must be an IP address or a host name of this machine, "
                        "e.g. 127.0.0.1 (loopback: only this machine's Prometheus can scrape it)")
    if m.textfile is not None and (not m.textfile.endswith(".prom") or m.textfile != printable(m.textfile, 4096)):
        problems.append("metrics.textfile: must be a path ending in .prom (the only files node exporter's "
                        "textfile collector reads), without control characters")
    return problems


def axolotl_settings_problems(value: Any) -> list[str]:
    """Why ``training.axolotl`` cannot go into training_config.yaml: it must be a mapping of
    axolotl keys (text) to YAML values, and leave fine-tuner's own keys alone."""
    if value is None:
        return []
    if not isinstance(value, Mapping):
        return [f"expected a mapping of axolotl settings (e.g. deepspeed: ...), got {type(value).__name__}"]
    problems = []
    for key in value:
        if not isinstance(key, str) or not key:
            problems.append(f"keys must be axolotl setting names, got {printable(str(key))!r}")
        elif key in AXOLOTL_OWN_KEYS:
            problems.append(f"{printable(key)} is written by fine-tuner itself: set it through its own "
                            "setting (training.*, defaults.*) or in a job file")
        elif _holds_non_finite(value[key]):
            problems.append(f"{printable(key)}: must be a finite number (not nan or inf)")
    return problems


def _holds_non_finite(value: Any) -> bool:
    """Whether ``value`` is, or holds at any depth, a float that is nan or ±inf."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, Mapping):
        return any(_holds_non_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_non_finite(v) for v in value)
    return False


MAX_MODEL_NAME_CHARS = 200
_NAME_PART = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
# [host[:port]/][namespace/]name[:tag], the shape of an Ollama model reference
_MODEL_NAME = re.compile(rf"(?:{_NAME_PART}(?::[0-9]{{1,5}})?/)?(?:{_NAME_PART}/)?{_NAME_PART}(?::{_NAME_PART})?")
MODEL_NAME_RULE = ("use [host[:port]/][namespace/]name[:tag] made of letters, digits, '_', '.' and '-', "
                   "e.g. llama3.2:1b")


def model_name_problem(name: str) -> str | None:
    """Why ``name`` is not an Ollama model name (a problem text without the name), or None. A
    model name must never be a filesystem path: it ends up in Modelfiles, URLs and folder names."""
    if not name:
        reason = "it is empty"
    elif has_unsafe(name):
        reason = "it holds whitespace or control characters"
    elif len(name) > MAX_MODEL_NAME_CHARS:
        reason = f"it is longer than {MAX_MODEL_NAME_CHARS} characters"
    elif name.startswith(("/", ".", "~")) or "\\" in name or ".." in name:
        reason = "a filesystem path"
    elif not _MODEL_NAME.fullmatch(name):
        reason = "not of the form [host[:port]/][namespace/]name[:tag]"
    else:
        return None
    return f"not a valid Ollama model name ({reason}); {MODEL_NAME_RULE}"


def group_problem(name: str) -> str | None:
    """Why ``name`` is not a group of this machine that ``paths.group`` can share folders with, or None."""
    import grp

    try:
        grp.getgrnam(name)
    except (KeyError, ValueError):  # ValueError: a NUL in the name
        return (f"there is no group {printable(name)!r} on this machine: create it (groupadd) and add "
                "the service user and the analysts to it, or remove the setting")
    return None


_HOST_NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*\.?")


def host_problem(value: str) -> str | None:
    """Why ``value`` is not an Ollama host ``ollama.parse_host`` can use, or None: a http(s) URL or
    host[:port] (an empty host before ':port' means 127.0.0.1, as in OLLAMA_HOST), a port from 1 to
    65535, no credentials, query or fragment. The text of the value is never quoted."""
    text = value.strip()
    if not text:
        return None  # unset: OLLAMA_HOST, else the default server
    if has_unsafe(text):
        return "it holds whitespace or control characters"
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "http", text
    elif scheme not in ("http", "https"):
        return "the scheme must be http or https"
    try:
        split = urllib.parse.urlsplit(f"{scheme}://{rest}")
    except ValueError:
        return "not a well-formed URL"
    try:
        port = split.port
    except ValueError:
        port = 0
    if port == 0:
        return "the port must be a number from 1 to 65535"
    if split.username is not None or split.password is not None or split.query or split.fragment:
        return "it must not hold a user name, password, query or fragment"
    host = split.hostname
    if not host:
        return "it names no host" if sep else None
    return _host_problem(host)


def _host_problem(host: str) -> str | None:
    """Why ``host`` (of a URL) is neither an IP address nor a plain host name, or None."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOST_NAME.fullmatch(host):
            return "the host name has characters other than letters, digits, '.', '-' and '_'"
    return None


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def base_url_problem(value: str) -> str | None:
    """Why ``value`` is not an ``openai.base_url``, or None: an http:// or https:// URL naming a
    host, with a port from 1 to 65535 and a path (usually ``/v1``), and no user name, password,
    query or fragment (a key goes into the environment variable ``openai.api_key_env`` names). An
    empty value means unset. The text of the value is never quoted."""
    text = value.strip()
    if not text:
        return None
    if has_unsafe(text):
        return "it holds whitespace or control characters"
    scheme, sep, _ = text.partition("://")
    if not sep or scheme not in ("http", "https"):
        return "it must start with http:// or https://"
    try:
        split = urllib.parse.urlsplit(text)
        port = split.port
    except ValueError:
        return "not a well-formed URL with a port from 1 to 65535"
    if port == 0:
        return "the port must be a number from 1 to 65535"
    if split.username is not None or split.password is not None:
        return ("it must not hold a user name or password: put the API key in an environment variable and "
                "name that variable in openai.api_key_env")
    if split.query or split.fragment:
        return "it must not hold a query or fragment"
    host = split.hostname
    if not host:
        return "it names no host"
    return _host_problem(host)


def _check_openai(o: OpenAIConfig, bad: set[str], problems: list[str]) -> None:
    """The ``openai`` section's rules beyond the numeric ones (no value is quoted)."""
    if not {"openai.backoff_s", "openai.backoff_max_s"} & bad and o.backoff_max_s < o.backoff_s:
        problems.append(f"openai.backoff_max_s: must be at least openai.backoff_s ({o.backoff_s:g})")
    if o.base_url is not None and (why := base_url_problem(o.base_url)):
        problems.append(f"openai.base_url: {why}; use http(s)://host[:port][/path], e.g. http://127.0.0.1:8080/v1")
    if o.model is not None and (not o.model or has_unsafe(o.model) or len(o.model) > MAX_MODEL_NAME_CHARS):
        problems.append(f"openai.model: must be the served model's name: 1 to {MAX_MODEL_NAME_CHARS} characters "
                        "without whitespace or control characters")
    if o.api_key_env is not None and not _ENV_NAME.fullmatch(o.api_key_env):
        problems.append("openai.api_key_env: must be the name of an environment variable (letters, digits and '_', "
                        "not starting with a digit, at most 128 characters) that holds the key, never the key itself")


def text_problem(text: str, limit: int) -> str | None:
    """Why a free-text setting cannot be used: over ``limit`` characters, or blank."""
    if len(text) > limit:
        return f"{len(text)} characters, over the limit of {limit}"
    if not text.strip():
        return "must not be blank (leave the key out instead)"
    return None


def topics_problem(text: str) -> str | None:
    """Why ``text`` (topics, comma-separated) is too big for a system prompt, or None."""
    count = sum(1 for part in text.split(",") if part.strip())
    if count > MAX_TOPICS:
        return f"{count} topics, over the limit of {MAX_TOPICS}"
    if len(text) > MAX_TOPICS_CHARS:
        return f"{len(text)} characters, over the limit of {MAX_TOPICS_CHARS}"
    return None
