"""Per-job settings: a job file's or the command line's values over the config's ``defaults``
(``job_settings`` → ``JobSettings``), the job file's strict reading (``read_job_file``), and the
config settings that need the data rules (``defaults_problems``: ``defaults.prompt_template`` parsed by
``template``, given to ``load_config`` as a check). Every problem is one ``ConfigError`` naming each
key; a job's free text is capped (``topics``: ``MAX_TOPICS`` topics, ``MAX_TOPICS_CHARS`` characters;
a column-list ``prompt_template``: ``MAX_TEMPLATE_LIST_CHARS``), and messages never quote a value.
"""

from __future__ import annotations

import math
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from ..config import APPROACHES, CODE_KNOWLEDGE, COMPARE_MODES, Config, Defaults
from ..config.files import FileRefused, parse_settings, read_small_file
from ..config.rules import (
    MAX_COLUMN_NAME_CHARS,
    MAX_DEFINITION_CHARS,
    MAX_TOPICS,
    MAX_TOPICS_CHARS,
    coerce,
    model_name_problem,
    text_problem,
    topics_problem,
)
from ..errors import ConfigError
from ..text import display_name, printable
from .template import parse_template


JOB_KEYS = ("task", "model", "topics", "epochs", "learning_rate", "batch_size", "approach", "fallback",
            "output_model", "force", "prompt_template", "topic_definition", "group_by", "review_below", "topic",
            "code_knowledge", "compare")
TASKS = ("build", "rate", "retrain")  # build a model (the default) | rate the dataset with a built one |
# retrain: add reviewed records to a topic's training rows and build its model again
MAX_TEMPLATE_LIST_CHARS = 16 * 1024  # the column names of a list prompt_template, together
MAX_KEYS_NAMED = 10  # unknown keys named in one error, then "and N more"


@dataclass(frozen=True)
class Flag:
    """A per-job setting's command-line flag, declared with the setting: the command line builds
    every command's flags from these (``cli._add_job_flags``), so a setting has one spelling, one
    help and one parsing wherever it is a flag. The type comes from the setting's annotation (a whole
    number is a count, at least 1; a number follows the range rules of the config setting
    ``number_rules``); ``negated``: a bool spelled ``--no-<name>`` that turns the setting off."""

    help: str
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    number_rules: str | None = None
    negated: bool = False

    def spelling(self, name: str) -> str:
        return ("--no-" if self.negated else "--") + name.replace("_", "-")


def _flag(help: str, **how: Any) -> dict:
    return {"flag": Flag(help, **how)}


@dataclass(frozen=True)
class JobSettings:
    """The settings of one job: the config's ``defaults`` with a job file's values on top. Each
    setting a command can take says how, in its ``flag`` metadata (``FLAGS``); ``task`` (the command
    is the task) and ``force`` (an inbox job's duplicate check) are job-file keys only."""

    model: str = field(metadata=_flag(
        "the Ollama model: the base to build from (default: defaults.model); for rate, a bare Ollama model "
        "name, or a job's output folder (outputs/<job_id>, or the job id)", metavar="NAME"))
    topics: str = field(metadata=_flag(
        'target topic(s) of the system prompt, comma-separated, e.g. "respiratory infections" (default: '
        "defaults.topics; rate: only with a bare Ollama name)"))
    epochs: int = field(metadata=_flag("training epochs (default: defaults.epochs)", metavar="N"))
    learning_rate: float = field(metadata=_flag(
        "the fine-tune's learning rate (default: defaults.learning_rate)", metavar="F",
        number_rules="defaults.learning_rate"))
    batch_size: int = field(metadata=_flag("records per training step (default: defaults.batch_size)", metavar="N"))
    approach: str = field(metadata=_flag(
        "auto (the head when the base weights are here, else decided from the data and the machine), "
        "fine_tune (an Ollama model), model_set or head (default: defaults.approach)",
        choices=APPROACHES))
    fallback: bool = field(metadata=_flag("fail instead of falling back to a model set", negated=True))
    output_model: str | None = field(default=None, metadata=_flag(
        "Ollama name to register (default derived)", metavar="NAME"))
    force: bool = False
    task: str = "build"
    # a template.Template, or None: the file's prompt column
    prompt_template: Any = field(default=None, metadata=_flag(
        "how a record becomes its prompt when the file has no formatted_prompt/Prompt column: a format string "
        "with {Column} fields, or a JSON list of columns (default: defaults.prompt_template; rate: only with a "
        "bare Ollama name)", metavar="TEMPLATE"))
    topic_definition: str | None = field(default=None, metadata=_flag(  # the experts' criteria, in the system prompt
        "the experts' written criteria for the topic, added to the system prompt (default: "
        "defaults.topic_definition; rate: only with a bare Ollama name)", metavar="TEXT"))
    group_by: str | None = field(default=None, metadata=_flag(  # None: the config's evaluation.group_by
        "the column whose values are held out whole to measure agreement on new kinds of records (default: a "
        "diagnosis column with ICD-10 codes; none: random split only)", metavar="COLUMN"))
    # a rate job's needs_review.csv; None: the config's rating.review_below
    review_below: float | None = field(default=None, metadata=_flag(
        "write the records whose answer is invalid or whose confidence is under P to needs_review.csv for the "
        "experts (default: rating.review_below)", metavar="P", number_rules="rating.review_below"))
    topic: str | None = field(default=None, metadata=_flag(  # a rate job: this topic's current model
        "rate with this topic's current model (fine-tuner promote); instead of --model", metavar="T"))
    # expand a diagnosis column's ICD-10-CM codes: auto | on | off
    code_knowledge: str = field(default="auto", metadata=_flag(
        "expand a diagnosis column's ICD-10-CM codes into their description, category, block and CCSR category "
        "in every prompt (default from config: auto, when the column holds codes)", choices=CODE_KNOWLEDGE))
    # the evaluation's comparisons: all | base | none; None: evaluation.compare
    compare: str | None = field(default=None, metadata=_flag(
        "comparisons beside the new model and the bag-of-words baseline: all (the base model zero-shot and a "
        "fine-tune's model set), base or none (default: evaluation.compare)", choices=COMPARE_MODES))


# the per-job settings a command can take, by name, with their flags
FLAGS: dict[str, Flag] = {f.name: f.metadata["flag"] for f in fields(JobSettings) if "flag" in f.metadata}


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
        if key in _TEXT_LIMITS and isinstance(value, str) and (why := text_problem(value, _TEXT_LIMITS[key])):
            problems.append(f"{key}: {why}")
            continue
        merged[key] = coerce(value, hints[key], key, False, problems)
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
    parsed = parse_settings(data, source)
    if not isinstance(parsed, dict):
        kind = "a list" if isinstance(parsed, list) else "a single value"
        raise ConfigError([f"the top level must be a mapping of job settings (key: value lines), not {kind}"],
                          source=source)
    return parsed


def defaults_problems(cfg: Config) -> list[str]:
    """The config settings the data rules check, as ``load_config`` problems (give it as
    ``checks=(defaults_problems,)``): ``defaults.prompt_template`` parsed as a job's template is."""
    if cfg.defaults.prompt_template is None:
        return []
    try:
        parse_template(cfg.defaults.prompt_template)
    except ConfigError as exc:
        return [f"defaults.{p}" for p in exc.problems]
    return []
