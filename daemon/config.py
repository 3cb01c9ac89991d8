"""Configuration: frozen dataclasses and ``load_config(path, env, overrides)``.

Precedence: built-in defaults, then one YAML file (``find_config_file``: ``--config FILE``,
``FINE_TUNER_CONFIG``, ``<root>/config.yaml``, ``/etc/fine-tuner/config.yaml``), then
``FINE_TUNER_<SECTION>__<KEY>`` environment variables (for example ``FINE_TUNER_OLLAMA__HOST``;
``FINE_TUNER_<KEY>`` alone addresses ``defaults``; ``PROCESS_VARIABLES`` such as
``FINE_TUNER_CACHE_DIR`` are not settings), then CLI overrides (later wins). Every problem
is collected and raised once as a ``ConfigError`` naming each key. Unknown keys, wrong types, values
out of range (nan and inf included), malformed Ollama names and hosts, and an ``openai.base_url`` that is
not a plain http(s) URL (credentials in it included) are errors.

It also owns the strict reading of small YAML/JSON files (the config, job files, and for
``mapping`` the mapping files): ``read_small_file`` never follows a link, never blocks on a FIFO and
refuses a file over ``MAX_COMPANION_BYTES``; ``parse_yaml`` is ``safe_load`` that also refuses a key
given twice, nesting deeper than ``MAX_YAML_DEPTH``, text that is not valid Unicode and, unless the
caller allows them (the config file), YAML aliases: a 50 KB job file of aliases expands to 100 MB.
A job's free-text settings are capped too (``topics``: ``MAX_TOPICS`` topics, ``MAX_TOPICS_CHARS``
characters; a column-list ``prompt_template``: ``MAX_TEMPLATE_LIST_CHARS``). Messages name
a file by its escaped base name and never quote its content. This module neither logs nor creates
folders.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import math
import os
import re
import stat
import types
import typing
import unicodedata
import urllib.parse
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

# head: a classifier on the base model's own hidden states (quality/head.py), rated by the local backend
APPROACHES = ("auto", "fine_tune", "model_set", "head")
REGISTER_MODES = ("auto", "required", "off")
# ollama.merge_adapter: register a fine-tune as base + adapter, or merged into one GGUF
MERGE_ADAPTER_MODES = ("auto", "always", "never")
# Mapping and job files are a few lines; a bigger one is refused before anything parses it (a 28 MB
# job file once took a YAML parser 326 s and 6.8 GB). The inbox refuses such drops by the same limit.
MAX_COMPANION_BYTES = 256 * 1024


@dataclass(frozen=True)
class Defaults:
    """Per-job settings used when a job file or CLI flag does not set them."""

    model: str = "llama3.2:1b"
    topics: str = ""
    # the best measured recipe for a small base on a CPU (Gemma 3 270M, 400 visits: see the README's
    # answer-quality runs; 1e-4 for 3 epochs at batch 4 reached kappa 0.25 on new kinds of records)
    epochs: int = 2
    learning_rate: float = 1e-3
    batch_size: int = 8
    approach: str = "auto"
    fallback: bool = True
    min_rows: int = 50
    few_shot_per_rating: int = 2
    few_shot_max_chars: int = 12000
    validation_fraction: float = 0.1
    seed: int = 42
    mapping: str | None = None  # a default rating mapping file used when a drop has none
    # how a record becomes its prompt when the file has no prompt column: a format string with
    # {Column} fields, or a list of columns (see daemon/data/template.py); None: the file's prompt column
    prompt_template: Any = None
    # the experts' written criteria for the topic, put into every system prompt (model sets and
    # fine-tunes alike) under the rating scale; None: none
    topic_definition: str | None = None
    # ICD-10-CM codes of a template's diagnosis columns expanded into their description, category,
    # block and CCSR category in every prompt (daemon/data/codes.py): auto (when a diagnosis column
    # holds codes) | on | off
    code_knowledge: str = "auto"


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
    parallel: int = 2  # chat requests in flight at once when evaluating or rating through Ollama
    # the largest answer (or create status line) read from the server: Ollama's answers are a few KB
    # (a chat answer, /api/show, /api/tags of a large install stay under ~1 MB); 8 MiB leaves room
    # while keeping what a hostile server can make the daemon hold to a few tens of MB per request
    max_response_bytes: int = 8 * 1024 * 1024
    # where Ollama keeps its models (manifests/, blobs/), to fine-tune the very GGUF it serves; None:
    # $OLLAMA_MODELS, ~/.ollama/models, then the Linux service's /usr/share/ollama/.ollama/models
    models_dir: str | None = None
    # a fine-tune as base + ADAPTER (which Ollama 0.34.1 and later refuse to create) or merged into
    # its base GGUF by llama.cpp's tools: auto (merged when the server refuses the adapter) | always | never
    merge_adapter: str = "auto"


@dataclass(frozen=True)
class OpenAIConfig:
    """An OpenAI-compatible chat server (llama.cpp's llama-server, vLLM, a hosted API) that answers
    the evaluation and rating requests (``POST {base_url}/chat/completions``)."""

    base_url: str | None = None  # e.g. http://127.0.0.1:8080/v1; None: the backend is not used
    model: str | None = None  # the name the server serves the model under; None: the job's base model name
    # the NAME of an environment variable that holds the API key (sent as "Authorization: Bearer
    # ..."), never the key itself: a config file is readable by more people than the service's
    # environment file; None: no key is sent
    api_key_env: str | None = None
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 120.0  # one request's answer, retries and waits included (with connect_timeout_s)
    retries: int = 3  # 429, 5xx, refused or dropped connections are asked again this many times at most
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0  # also the longest wait a 429's Retry-After gets
    parallel: int = 4  # requests in flight at once
    max_response_bytes: int = 8 * 1024 * 1024
    # ask for the answer tokens' log-probabilities (each rating's confidence); turn off for a
    # server that refuses the logprobs field
    logprobs: bool = True


@dataclass(frozen=True)
class TrainingConfig:
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    sequence_len: int = 2048
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.03
    # the built-in trainer stops when the loss on all held-out rows has not improved for this
    # many epochs, and keeps the best epoch's adapter;
    # 0: train every epoch (axolotl's own early stopping needs step-based saving: set it there)
    early_stopping_patience: int = 1
    # reason_first: each row is trained as {"rationale", "rating"}; both: also as {"rating"} alone, so
    # that every backend rates it as a direct decision (one forward pass locally, a few schema-held
    # tokens on a server; a rationale only with rate --explain, or for the records sent to review)
    answer_forms: str = "reason_first"
    logging_steps: int = 1
    timeout_s: float = 6 * 3600.0
    grace_s: float = 10.0
    allow_download: bool = False
    device: str = "auto"  # auto | cpu | cuda | mps
    backend: str = "local"  # local (the built-in trainer) | axolotl (accelerate launch -m axolotl.cli.train)
    # extra axolotl keys written into training_config.yaml as is (deepspeed, fsdp, bf16, ...); keys
    # fine-tuner writes itself are refused there (set them through their own settings)
    axolotl: Any = None


@dataclass(frozen=True)
class PathsConfig:
    root: str = "."
    inbox: str = "inbox"
    outputs: str = "outputs"
    state_dir: str | None = None  # None: $STATE_DIRECTORY, else <root>/.fine-tuner
    log_dir: str | None = None  # None: $LOGS_DIRECTORY, else the state directory
    # share inbox/ and outputs/ with this group (folders 2770, files 0660, umask 007); None: private
    group: str | None = None


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
class EvaluationConfig:
    """Measuring every job's models against the experts on its held-out rows."""

    enabled: str = "auto"  # auto: when a backend can run it (else record why not) | required | off
    backend: str = "auto"  # auto | ollama | openai | llama-server | local
    # backend auto: when neither Ollama nor openai.base_url can serve the models, start the managed
    # llama-server (the base GGUF + the fine-tune's adapter.gguf) for the evaluation, before local
    start_llama_server: bool = False
    max_rows: int = 200  # held-out rows evaluated at most (a seeded sample beyond that)
    batch_size: int = 8  # local backend: records generated together
    max_new_tokens: int = 96  # the longest answer, every backend (Ollama num_predict, OpenAI max_tokens)
    timeout_s: float = 3600.0  # local backend: one model's answers
    # the column whose values group rows for the new-kinds held-out set (data/holdout.py); None: a
    # known diagnosis column with ICD-10-style codes; "none": a random split only
    group_by: str | None = None
    # the verdict (quality/trust.py): a recommended model reaches this kappa (substantial agreement)
    # on the honest figure, at most this invalid rate, on at least this many held-out rows
    recommend_min_kappa: float = 0.6
    recommend_max_invalid_rate: float = 0.05
    verdict_min_rows: int = 30
    # the quality gate, off unless set: a model below it is not registered under its final name
    min_kappa: float | None = None
    # which comparisons are measured beside the new model and the bag-of-words baseline (always
    # measured): all (the base model zero-shot and, for a fine-tune, the model set) | base | none
    compare: str = "all"
    max_invalid_rate: float | None = None


@dataclass(frozen=True)
class RatingConfig:
    """Rating new records with a built model (``fine-tuner rate``, ``task: rate`` jobs)."""

    # records whose answer is invalid, has no confidence, or a confidence under this go to
    # needs_review.csv for the experts; None: no review file
    review_below: float | None = None


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus metrics for the people who run the daemon (``daemon/inbox/metrics.py``); off
    unless ``port`` or ``textfile`` is set."""

    port: int | None = None  # serve GET /metrics on host:port; None: no server
    host: str = "127.0.0.1"  # the address the server listens on: loopback unless you mean otherwise
    # node exporter's textfile collector: this .prom file is rewritten (atomically) after every
    # finished job and every textfile_every_s; a relative path is under paths.root; None: no file
    textfile: str | None = None
    textfile_every_s: float = 15.0


@dataclass(frozen=True)
class Config:
    defaults: Defaults = field(default_factory=Defaults)
    ollama: OllamaConfig = field(default_factory=OllamaConfig)
    openai: OpenAIConfig = field(default_factory=OpenAIConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    base_models: Mapping[str, str] = field(default_factory=dict)
    paths: PathsConfig = field(default_factory=PathsConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    rating: RatingConfig = field(default_factory=RatingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    debug: bool = False
    source: str | None = None  # the YAML file this came from, for messages


SECTIONS = {"defaults": Defaults, "ollama": OllamaConfig, "openai": OpenAIConfig, "training": TrainingConfig,
            "paths": PathsConfig, "watch": WatchConfig, "evaluation": EvaluationConfig, "rating": RatingConfig,
            "metrics": MetricsConfig}
EVALUATION_MODES = ("auto", "required", "off")
EVALUATION_BACKENDS = ("auto", "ollama", "openai", "llama-server", "local")
COMPARE_MODES = ("all", "base", "none")  # evaluation.compare / a job's compare
# rating can also use the bag-of-words baseline every job with a hold-out stores (baseline.json)
RATING_BACKENDS = (*EVALUATION_BACKENDS, "baseline")
TRAINING_BACKENDS = ("local", "axolotl")
ANSWER_FORMS = ("reason_first", "both")
# training_config.yaml keys that fine-tuner writes itself: training.axolotl may not set them
AXOLOTL_OWN_KEYS = frozenset((
    "base_model", "datasets", "test_datasets", "adapter", "lora_r", "lora_alpha", "lora_dropout",
    "lora_target_modules", "sequence_len", "micro_batch_size", "gradient_accumulation_steps",
    "num_epochs", "learning_rate", "warmup_ratio", "lr_scheduler", "optimizer", "weight_decay",
    "logging_steps", "seed", "output_dir", "eval_strategy", "dataset_prepared_path",
    "lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel"))


# --- safe text for messages --------------------------------------------------------------------

_UNSAFE_CATEGORIES = ("Cc", "Cf", "Cs", "Zl", "Zp")
LONE_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def printable(text: str, limit: int = 80) -> str:
    """``text`` safe to put in a message: control, formatting and surrogate characters become
    ``\\xNN``/``\\uNNNN`` escapes (nothing can rewrite a terminal or a log line); cut to ``limit``."""
    out = "".join((f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
                  if unicodedata.category(c) in _UNSAFE_CATEGORIES else c for c in text)
    return out if len(out) <= limit else out[:limit] + "..."


def display_name(path: str | os.PathLike) -> str:
    """A file's base name for messages: bytes that are not UTF-8 (lone surrogates from
    ``os.listdir``) become ``\\xNN``, control characters are escaped. Never the folder: a job's
    files sit in the daemon's work folder, which is nobody's business in an error."""
    name = os.fsencode(Path(path).name).decode("utf-8", errors="backslashreplace")
    return printable(name, limit=255)


# --- reading small YAML/JSON files -------------------------------------------------------------

MAX_YAML_DEPTH = 32  # a config, job or mapping file is two or three levels deep
NOT_UTF8 = "the file is not UTF-8 text (save it as UTF-8)"


class ParseProblem(Exception):
    """A YAML or JSON text that must not be used. ``problem`` says why without quoting the text (a
    key is named, escaped); ``line`` is 1-based, or None."""

    def __init__(self, problem: str, line: int | None = None) -> None:
        self.problem = problem
        self.line = line
        super().__init__(f"{problem} (line {line})" if line is not None else problem)


class FileRefused(OSError):
    """A companion file that is not read: a link, not a regular file, or over the size limit."""


def _line(mark: Any) -> int | None:
    return mark.line + 1 if mark is not None else None


class StrictLoader(yaml.SafeLoader):
    """``safe_load`` that also refuses nesting deeper than ``MAX_YAML_DEPTH`` (PyYAML's composer
    recurses per level: 5,000 ``[`` are a RecursionError), a key given twice in one mapping (PyYAML
    keeps the last one silently) and text that is not valid Unicode (a ``\\ud800`` escape)."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise ParseProblem(f"lists or mappings are nested more than {MAX_YAML_DEPTH} levels deep",
                                   _line(self.peek_event().start_mark))
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_scalar(self, node: Any) -> Any:
        value = super().construct_scalar(node)
        if isinstance(value, str) and LONE_SURROGATE_RE.search(value):
            raise ParseProblem(LONE_SURROGATE, _line(node.start_mark))
        return value

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *x' may be overridden on purpose
                    continue
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, Hashable):
                    if key in seen:
                        raise ParseProblem(duplicate_key(key), _line(key_node.start_mark))
                    seen.add(key)
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node: Any) -> Any:
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # over Python's 4,300-digit limit for int()
            raise ParseProblem(TOO_MANY_DIGITS, _line(node.start_mark)) from None

    def construct_yaml_timestamp(self, node: Any) -> Any:
        try:
            return super().construct_yaml_timestamp(node)
        except (ValueError, OverflowError):
            raise ParseProblem(NO_SUCH_DATE, _line(node.start_mark)) from None


StrictLoader.add_constructor("tag:yaml.org,2002:int", StrictLoader.construct_yaml_int)
StrictLoader.add_constructor("tag:yaml.org,2002:timestamp", StrictLoader.construct_yaml_timestamp)


class NoAliasLoader(StrictLoader):
    """``StrictLoader`` that also refuses YAML aliases (``*name``, and so ``<<: *name`` merges): an
    alias repeats a value without repeating its bytes, so a few kilobytes can stand for gigabytes
    once the value is written out (into a system prompt, the metadata, an error). Job and mapping
    files never need one."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise ParseProblem(ALIAS_REFUSED, _line(self.peek_event().start_mark))
        return super().compose_node(parent, index)


ALIAS_REFUSED = ("the file uses a YAML alias (*name), which job and mapping files may not use: write each "
                 "value out in full")
LONE_SURROGATE = "a text value holds a lone surrogate escape (\\uD800-\\uDFFF), which is not valid Unicode"
TOO_MANY_DIGITS = "a number has too many digits"
NO_SUCH_DATE = "a date or time that does not exist (such as month 13)"


def duplicate_key(key: Any) -> str:
    shown = f"'{printable(key)}'" if isinstance(key, str) else printable(str(key))
    return f"the key {shown} appears more than once in the same mapping"


def parse_yaml(text: str, *, aliases: bool = False) -> Any:
    """``text`` parsed by ``NoAliasLoader`` (``StrictLoader`` when ``aliases``: only the operator's
    config file): ``ParseProblem`` for what it refuses, ``yaml.YAMLError`` for invalid YAML."""
    loader = StrictLoader if aliases else NoAliasLoader
    return yaml.load(text, Loader=loader)  # noqa: S506 - both loaders are SafeLoaders


def read_small_file(path: str | os.PathLike, limit: int = MAX_COMPANION_BYTES) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them. Opened with ``O_NOFOLLOW``
    and ``O_NONBLOCK`` and checked on the descriptor, so a link is never followed and a FIFO swapped
    in never blocks; the size is checked before anything is read. ``FileRefused`` says why not."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise FileRefused(errno.ELOOP, "is a symbolic link; links are not followed "
                                           "(put the file itself there)") from None
        raise
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        if not stat.S_ISREG(st.st_mode):
            raise FileRefused(errno.EINVAL, "is not a regular file (a FIFO, socket or device)")
        if st.st_size > limit:
            raise FileRefused(errno.EFBIG, f"is {st.st_size} bytes, over the limit of {limit} bytes")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:  # it grew after fstat
        raise FileRefused(errno.EFBIG, f"is over the limit of {limit} bytes")
    return data


def _decode(data: bytes) -> str:
    """UTF-8 (a BOM is allowed) or ``ParseProblem``."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ParseProblem(NOT_UTF8) from None


# --- type coercion -----------------------------------------------------------------------------

_ON_OFF_KEYS = frozenset({"code_knowledge"})  # text settings whose values include on and off


def _coerce(value: Any, hint: Any, key: str, from_text: bool, problems: list[str]) -> Any:
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


def _build_section(cls: type, values: Mapping[str, Any], prefix: str, problems: list[str],
                   from_text: bool = False) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in hints:
            problems.append(f"{prefix}{printable(str(key))}: unknown key (known: {', '.join(sorted(hints))})")
            continue
        out[key] = _coerce(value, hints[key], f"{prefix}{key}", from_text, problems)
    return out


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


def _check_values(cfg: Config, problems: list[str]) -> None:
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
    if isinstance(d.topic_definition, str) and (why := _text_problem(d.topic_definition, MAX_DEFINITION_CHARS)):
        problems.append(f"defaults.topic_definition: {why}")
    group_by = cfg.evaluation.group_by
    if isinstance(group_by, str) and (why := _text_problem(group_by, MAX_COLUMN_NAME_CHARS)):
        problems.append(f"evaluation.group_by: {why}")
    if o.register not in REGISTER_MODES:
        problems.append(f"ollama.register: must be one of {', '.join(REGISTER_MODES)}")
    if o.merge_adapter not in MERGE_ADAPTER_MODES:
        problems.append(f"ollama.merge_adapter: must be one of {', '.join(MERGE_ADAPTER_MODES)}")
    if cfg.paths.group is not None and (why := group_problem(cfg.paths.group)):
        problems.append(f"paths.group: {why}")
    if o.host is not None and (why := host_problem(o.host)):
        problems.append(f"ollama.host: {why}; use http(s)://host[:port][/path] or host[:port]")
    if d.prompt_template is not None:
        from .data.template import parse_template

        try:
            parse_template(d.prompt_template)
        except ConfigError as exc:
            problems.extend(f"defaults.{p}" for p in exc.problems)
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
    if not m.host or _has_unsafe(m.host) or _host_problem(m.host):
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


# --- Ollama names and hosts --------------------------------------------------------------------

MAX_MODEL_NAME_CHARS = 200
_NAME_PART = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
# [host[:port]/][namespace/]name[:tag], the shape of an Ollama model reference
_MODEL_NAME = re.compile(rf"(?:{_NAME_PART}(?::[0-9]{{1,5}})?/)?(?:{_NAME_PART}/)?{_NAME_PART}(?::{_NAME_PART})?")
MODEL_NAME_RULE = ("use [host[:port]/][namespace/]name[:tag] made of letters, digits, '_', '.' and '-', "
                   "e.g. llama3.2:1b")


def _has_unsafe(text: str) -> bool:
    return any(c.isspace() or unicodedata.category(c) in _UNSAFE_CATEGORIES for c in text)


def model_name_problem(name: str) -> str | None:
    """Why ``name`` is not an Ollama model name (a problem text without the name), or None. A
    model name must never be a filesystem path: it ends up in Modelfiles, URLs and folder names."""
    if not name:
        reason = "it is empty"
    elif _has_unsafe(name):
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
    if _has_unsafe(text):
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
    if _has_unsafe(text):
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
    if o.model is not None and (not o.model or _has_unsafe(o.model) or len(o.model) > MAX_MODEL_NAME_CHARS):
        problems.append(f"openai.model: must be the served model's name: 1 to {MAX_MODEL_NAME_CHARS} characters "
                        "without whitespace or control characters")
    if o.api_key_env is not None and not _ENV_NAME.fullmatch(o.api_key_env):
        problems.append("openai.api_key_env: must be the name of an environment variable (letters, digits and '_', "
                        "not starting with a digit, at most 128 characters) that holds the key, never the key itself")


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


# --- which file: --config, $FINE_TUNER_CONFIG, the root's config.yaml, the system's -------------

ROOT_CONFIG = "config.yaml"  # <root>/config.yaml: --root, else the current directory
SYSTEM_CONFIG = "/etc/fine-tuner/config.yaml"  # where systemd/INSTALL.md puts the service's


@dataclass(frozen=True)
class ConfigFile:
    """The configuration file every command reads, and why that one (``find_config_file``)."""

    path: str | None  # None: no file, built-in defaults and FINE_TUNER_* variables only
    found_by: str  # "--config", "FINE_TUNER_CONFIG", "root", "system" or "none"
    looked_at: tuple[str, ...] = ()


def find_config_file(flag: str | None, env: Mapping[str, str], root: str | os.PathLike | None = None, *,
                     system: str | os.PathLike = SYSTEM_CONFIG) -> ConfigFile:
    """The first of: ``--config FILE``, ``$FINE_TUNER_CONFIG``, ``<root>/config.yaml`` (root: ``--root``,
    else the current directory) and ``/etc/fine-tuner/config.yaml``. A file found rather than named
    must be a regular file owned by the caller or root that nobody else may write: a config.yaml
    dropped into a shared folder could send records to another server, so such a file is a
    ConfigError naming it, never silently read or skipped."""
    if flag:
        return ConfigFile(str(flag), "--config")
    if env.get("FINE_TUNER_CONFIG"):
        return ConfigFile(env["FINE_TUNER_CONFIG"], "FINE_TUNER_CONFIG")
    candidates = ((Path(os.path.abspath(Path(root or ".") / ROOT_CONFIG)), "root"), (Path(system), "system"))
    for path, found_by in candidates:
        if os.path.lexists(path):
            if problem := _found_file_problem(path):
                raise ConfigError([problem], source=printable(str(path), limit=4096),
                                  hint="fix the file's owner or mode, or name the file to use with --config "
                                       "or FINE_TUNER_CONFIG")
            return ConfigFile(str(path), found_by)
    return ConfigFile(None, "none", tuple(str(p) for p, _ in candidates))


def _found_file_problem(path: Path) -> str | None:
    """Why a config file found by its place may not be read: not a regular file, owned by someone
    other than the caller or root, or writable by its group or others."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"cannot read the file: {exc.strerror or type(exc).__name__}"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if hasattr(os, "getuid") and st.st_uid not in (0, os.getuid()):
        return f"owned by another user (uid {st.st_uid}): only your own file or root's is read without --config"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return "writable by its group or by others: only a file nobody else can change is read without --config"
    return None


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


def _merge(base: dict, top: Mapping) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def read_config_file(path: str | os.PathLike) -> dict:
    """Parse the YAML config file (``StrictLoader``: ``safe_load`` without duplicate keys, deep
    nesting or invalid Unicode; the operator's own file may use aliases); errors name the file."""
    p = Path(path)
    source = printable(str(p), limit=4096)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError([f"cannot read the file: {exc.strerror or type(exc).__name__}"], source=source) from None
    parsed = _parse_settings(data, source, aliases=True)
    if not isinstance(parsed, dict):
        raise ConfigError(["the top level must be a mapping of sections"], source=source)
    return parsed


def _parse_settings(data: bytes, source: str, *, aliases: bool = False) -> Any:
    """``data`` as parsed YAML ({} when empty), or one ConfigError that quotes nothing from it.
    ``aliases``: YAML aliases are allowed (the config file; never a job file)."""
    try:
        parsed = parse_yaml(_decode(data), aliases=aliases)
    except ParseProblem as exc:
        raise ConfigError([str(exc)], source=source) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError([f"not valid YAML{where}"], source=source) from None
    return {} if parsed is None else parsed


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

JOB_KEYS = ("task", "model", "topics", "epochs", "learning_rate", "batch_size", "approach", "fallback",
            "output_model", "force", "prompt_template", "topic_definition", "group_by", "review_below", "topic",
            "code_knowledge", "compare")
CODE_KNOWLEDGE = ("auto", "on", "off")  # data/codes.py: auto expands codes when a diagnosis column holds them
TASKS = ("build", "rate", "retrain")  # build a model (the default) | rate the dataset with a built one |
# retrain: add reviewed records to a topic's training rows and build its model again
# The free text a job carries goes into every training record's system prompt, the metadata, the
# Modelfile and errors: a few lines each. A bigger value is refused naming its key and the limit
# (model names: MAX_MODEL_NAME_CHARS; a format-string prompt_template: template.MAX_TEMPLATE_CHARS).
MAX_TOPICS = 50
MAX_TOPICS_CHARS = 2000
MAX_DEFINITION_CHARS = 8000  # topic_definition: a page of criteria
MAX_COLUMN_NAME_CHARS = 200  # group_by
MAX_TEMPLATE_LIST_CHARS = 16 * 1024  # the column names of a list prompt_template, together
MAX_KEYS_NAMED = 10  # unknown keys named in one error, then "and N more"


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
    task: str = "build"
    prompt_template: Any = None  # a template.Template, or None: the file's prompt column
    topic_definition: str | None = None  # the experts' criteria, in the system prompt
    group_by: str | None = None  # None: the config's evaluation.group_by
    review_below: float | None = None  # a rate job's needs_review.csv; None: the config's rating.review_below
    topic: str | None = None  # a rate job: rate with this topic's current model (fine-tuner promote)
    code_knowledge: str = "auto"  # expand a diagnosis column's ICD-10-CM codes: auto | on | off
    compare: str | None = None  # the evaluation's comparisons: all | base | none; None: evaluation.compare


def job_settings(defaults: Defaults, values: Mapping[str, Any] | None = None, *,
                 source: str = "job file") -> JobSettings:
    """Merge ``values`` (a parsed job file, or CLI flags; None values ignored) over ``defaults``.
    Unknown keys and wrong types raise one ``ConfigError`` naming each key."""
    values = {k: v for k, v in (values or {}).items() if v is not None}
    problems: list[str] = []
    hints = typing.get_type_hints(JobSettings)
    merged: dict[str, Any] = {k: getattr(defaults, k) for k in hints if hasattr(defaults, k)}
    template = values.pop("prompt_template", None)
    if template is None:
        template = defaults.prompt_template
    merged["prompt_template"] = None
    if isinstance(template, (list, tuple)) and _text_chars(template) > MAX_TEMPLATE_LIST_CHARS:
        problems.append(f"prompt_template: the list of columns holds {_text_chars(template)} characters, "
                        f"over the limit of {MAX_TEMPLATE_LIST_CHARS}")
    elif template is not None:
        from .data.template import parse_template

        try:
            merged["prompt_template"] = parse_template(template)
        except ConfigError as exc:
            problems.extend(exc.problems)
    unknown = [key for key in values if key not in hints]
    problems.extend(f"{printable(str(key))}: unknown key (known: {', '.join(JOB_KEYS)})"
                    for key in unknown[:MAX_KEYS_NAMED])
    if len(unknown) > MAX_KEYS_NAMED:
        problems.append(f"and {len(unknown) - MAX_KEYS_NAMED} more unknown keys")
    for key, value in values.items():
        if key not in hints:
            continue
        if key == "topics" and isinstance(value, list) and all(isinstance(t, str) for t in value):
            if len(value) > MAX_TOPICS:
                problems.append(f"topics: {len(value)} topics, over the limit of {MAX_TOPICS}")
                continue
            value = ", ".join(value)
        if key == "topics" and isinstance(value, str) and (why := topics_problem(value)):
            problems.append(f"topics: {why}")
            continue
        if key in _TEXT_LIMITS and isinstance(value, str) and (why := _text_problem(value, _TEXT_LIMITS[key])):
            problems.append(f"{key}: {why}")
            continue
        merged[key] = _coerce(value, hints[key], key, False, problems)
    if merged.get("approach") not in APPROACHES:
        problems.append(f"approach: must be one of {', '.join(APPROACHES)}")
    if merged.get("code_knowledge", "auto") not in CODE_KNOWLEDGE:
        problems.append(f"code_knowledge: must be one of {', '.join(CODE_KNOWLEDGE)}")
    if merged.get("compare") is not None and merged["compare"] not in COMPARE_MODES:
        problems.append(f"compare: must be one of {', '.join(COMPARE_MODES)}")
    if merged.get("task", "build") not in TASKS:
        problems.append(f"task: must be one of {', '.join(TASKS)}")
    for key in ("epochs", "batch_size"):
        if isinstance(merged.get(key), int) and merged[key] < 1:
            problems.append(f"{key}: must be at least 1")
    if values.get("topic") is not None:
        if merged.get("task", "build") == "retrain":
            pass  # the topic whose training rows the reviewed records join
        elif merged.get("task", "build") != "rate":
            problems.append("topic: only for task: rate (it picks the topic's current model); a build job "
                            "names its topics with topics")
        elif "model" in values:
            problems.append("topic: give model or topic, not both (topic rates with the topic's current model)")
        elif not isinstance(values["topic"], str) or not values["topic"].strip():
            problems.append("topic: must be the name of a topic, as promoted")
    review = merged.get("review_below")
    if isinstance(review, float) and not (math.isfinite(review) and 0 < review <= 1):
        problems.append("review_below: must be a confidence in (0, 1]")
    learning_rate = merged.get("learning_rate")
    if isinstance(learning_rate, float) and not math.isfinite(learning_rate):
        problems.append("learning_rate: must be a finite number")
    elif isinstance(learning_rate, float) and not learning_rate > 0:
        problems.append("learning_rate: must be positive")
    model, output_model = merged.get("model"), merged.get("output_model")
    if not model:
        problems.append("model: required (set it in the job file or in the config's defaults)")
    elif isinstance(model, str) and (why := model_name_problem(model)):
        problems.append(f"model: {why}")
    if isinstance(output_model, str) and (why := model_name_problem(output_model)):
        problems.append(f"output_model: {why}")
    if problems:
        raise ConfigError(problems, source=source)
    return JobSettings(**merged)


_TEXT_LIMITS = {"topic_definition": MAX_DEFINITION_CHARS, "group_by": MAX_COLUMN_NAME_CHARS,
                "topic": MAX_TOPICS_CHARS}


def _text_problem(text: str, limit: int) -> str | None:
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


def _text_chars(items: Any) -> int:
    """The characters of the strings in ``items`` together (other items count as none)."""
    return sum(len(item) for item in items if isinstance(item, str))


JOB_FILE_HINT = "fix the job file and drop it again"


def read_job_file(path: str | os.PathLike) -> dict:
    """Parse a job file (YAML or JSON; ``StrictLoader`` reads both) into a mapping, or ConfigError
    naming the file by its base name. The file is read with ``read_small_file``: a link, a FIFO or a
    file over ``MAX_COMPANION_BYTES`` is refused before anything parses it."""
    try:
        return _job_file_values(path, display_name(path))
    except ConfigError as exc:
        exc.hint = JOB_FILE_HINT  # ConfigError's own hint speaks of the daemon's configuration
        raise


def _job_file_values(path: str | os.PathLike, source: str) -> dict:
    try:
        data = read_small_file(path)
    except FileRefused as exc:
        raise ConfigError([f"the file {exc.strerror}"], source=source) from None
    except OSError as exc:
        raise ConfigError([f"cannot read the file: {exc.strerror or type(exc).__name__}"], source=source) from None
    parsed = _parse_settings(data, source)
    if not isinstance(parsed, dict):
        kind = "a list" if isinstance(parsed, list) else "a single value"
        raise ConfigError([f"the top level must be a mapping of job settings (key: value lines), not {kind}"],
                          source=source)
    return parsed
