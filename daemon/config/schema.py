"""The configuration's shape: one frozen dataclass per section of the YAML file (``defaults``,
``ollama``, ``openai``, ``training``, ``paths``, ``watch``, ``evaluation``, ``rating``, ``metrics``),
``Config`` holding them, ``SECTIONS`` naming them, and the choices of each setting that has a fixed
set of values. Declarations only: the rules a value must follow are in ``rules``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


# head: a classifier on the base model's own hidden states (quality/head.py), rated by the local backend
APPROACHES = ("auto", "fine_tune", "model_set", "head")
REGISTER_MODES = ("auto", "required", "off")
# ollama.merge_adapter: register a fine-tune as base + adapter, or merged into one GGUF
MERGE_ADAPTER_MODES = ("auto", "always", "never")
# Mapping and job files are a few lines; a bigger one is refused before anything parses it (a 28 MB


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
CODE_KNOWLEDGE = ("auto", "on", "off")  # data/codes.py: auto expands codes when a diagnosis column holds them
