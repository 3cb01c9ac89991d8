"""Configuration: frozen dataclasses and ``load_config(path, env, overrides)``, by section.

Precedence: built-in defaults, then one YAML file (``find_config_file``: ``--config FILE``,
``FINE_TUNER_CONFIG``, ``<root>/config.yaml``, ``/etc/fine-tuner/config.yaml``), then
``FINE_TUNER_*`` environment variables, then CLI overrides (later wins); every problem is collected and
raised once as a ``ConfigError`` naming each key. ``schema``: the dataclasses, one per section, and
each setting's choices; ``files``: the strict reading of small YAML/JSON files (the config, job and
mapping files: no link, FIFO, oversized file, duplicate key, deep nesting or, but in the config, YAML
alias) and which config file is read; ``rules``: the rules each value must follow; ``loading``:
``load_config``, the environment layer and ``value_sources`` (``fine-tuner config --show``). A job's
own settings (``JobSettings``, ``job_settings``, ``read_job_file``) need the data rules and live in
``daemon.data.jobsettings``. Nothing here logs or creates folders. May import: ``daemon.errors``,
``daemon.text`` and this package; never a room (``data`` and after).
"""

from __future__ import annotations

from ..errors import ConfigError
from ..text import LONE_SURROGATE_RE, display_name, printable  # their home is daemon.text
from .files import (
    ALIAS_REFUSED,
    LONE_SURROGATE,
    MAX_COMPANION_BYTES,
    MAX_YAML_DEPTH,
    NO_SUCH_DATE,
    NOT_UTF8,
    ROOT_CONFIG,
    SYSTEM_CONFIG,
    TOO_MANY_DIGITS,
    ConfigFile,
    FileRefused,
    NoAliasLoader,
    ParseProblem,
    StrictLoader,
    duplicate_key,
    find_config_file,
    parse_yaml,
    read_config_file,
    read_small_file,
)
from .loading import PROCESS_VARIABLES, as_dict, load_config, state_directory, value_sources, with_defaults
from .rules import (
    AXOLOTL_OWN_KEYS,
    DAY_S,
    MAX_COLUMN_NAME_CHARS,
    MAX_DEFINITION_CHARS,
    MAX_MODEL_NAME_CHARS,
    MAX_TOPICS,
    MAX_TOPICS_CHARS,
    MODEL_NAME_RULE,
    axolotl_settings_problems,
    base_url_problem,
    group_problem,
    host_problem,
    metrics_problems,
    model_name_problem,
    number_problem,
    topics_problem,
)
from .schema import (
    ANSWER_FORMS,
    APPROACHES,
    CODE_KNOWLEDGE,
    COMPARE_MODES,
    EVALUATION_BACKENDS,
    EVALUATION_MODES,
    MERGE_ADAPTER_MODES,
    RATING_BACKENDS,
    REGISTER_MODES,
    SECTIONS,
    TRAINING_BACKENDS,
    Config,
    Defaults,
    EvaluationConfig,
    MetricsConfig,
    OllamaConfig,
    OpenAIConfig,
    PathsConfig,
    RatingConfig,
    TrainingConfig,
    WatchConfig,
)

__all__ = [
    "ALIAS_REFUSED", "ANSWER_FORMS", "APPROACHES", "AXOLOTL_OWN_KEYS", "CODE_KNOWLEDGE", "COMPARE_MODES", "DAY_S",
    "EVALUATION_BACKENDS", "EVALUATION_MODES", "LONE_SURROGATE", "LONE_SURROGATE_RE", "MAX_COLUMN_NAME_CHARS",
    "MAX_COMPANION_BYTES", "MAX_DEFINITION_CHARS", "MAX_MODEL_NAME_CHARS", "MAX_TOPICS", "MAX_TOPICS_CHARS",
    "MAX_YAML_DEPTH", "MERGE_ADAPTER_MODES", "MODEL_NAME_RULE", "NOT_UTF8", "NO_SUCH_DATE", "PROCESS_VARIABLES",
    "RATING_BACKENDS", "REGISTER_MODES", "ROOT_CONFIG", "SECTIONS", "SYSTEM_CONFIG", "TOO_MANY_DIGITS",
    "TRAINING_BACKENDS", "Config", "ConfigError", "ConfigFile", "Defaults", "EvaluationConfig", "FileRefused",
    "MetricsConfig", "NoAliasLoader", "OllamaConfig", "OpenAIConfig", "ParseProblem", "PathsConfig", "RatingConfig",
    "StrictLoader", "TrainingConfig", "WatchConfig", "as_dict", "axolotl_settings_problems", "base_url_problem",
    "display_name", "duplicate_key", "find_config_file", "group_problem", "host_problem", "load_config",
    "state_directory",
    "metrics_problems", "model_name_problem", "number_problem", "parse_yaml", "printable", "read_config_file",
    "read_small_file", "topics_problem", "value_sources", "with_defaults",
]
