"""Reading a published output folder: the one reader every command and room goes through.

``OutputFolder`` opens a folder once and its files relative to it with ``O_NOFOLLOW``: a symbolic
link inside it is refused, never followed, no file is read past ``MAX_FILE_BYTES``, and every key
an accessor hands out is checked for its type (``approach``, ``base_model``, ``labels``,
``registered_name``, ``served_name``, ``template``, ``topics``, ``topic_definition``,
``trained_system_prompt``, ``adapter_folder``, ``model_set``, ``evaluation``, ``calibration``).
A file or key that cannot be used is an ``OutputFolderError`` naming the file and the key, never a
value: few-shot examples and system prompts may hold patient text. ``within`` (the daemon's
``outputs/``): the folder must be a real folder directly in it, not a link to one elsewhere.

``object_file`` and ``chat_records`` are the strict reading of the files the evaluation needs
(a JSON object file; the chat records of ``validation_data.jsonl``), in a folder being built or
published. ``read_json`` and ``evaluation_file`` are the lenient reading of ``status``, ``report`` and
``promote``: a file that cannot be read comes back as the sentence saying why, so that one job's
broken file is named on its line and never breaks the listing of the others. ``registered_name``
is the one rule for the name a model is registered in Ollama under; ``OutputFolder.served_name``
extends it to the name a server presents the model under.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .. import fsutil
from ..config import model_name_problem
from ..data.template import Template
from ..errors import ConfigError, FineTunerError
from ..text import display_name
from . import names

MAX_FILE_BYTES = 64 * 1024 * 1024  # a folder's JSON files and a record line are far smaller
APPROACHES = ("fine_tune", "model_set", "head")
FOLDER_HINT = ("use a complete output folder of fine-tuner process or the daemon; a folder copied from another "
               "machine or written by an older version may need to be built again")


class OutputFolderError(FineTunerError):
    """An output folder, or a file in it, that cannot be used: a symbolic link (never followed), not
    a folder of ``outputs/``, missing, not JSON, nested too deeply, or a key of the wrong shape.
    ``file`` names the file as the folder holds it (None: the folder itself) and ``key`` the key
    (dotted, list positions in brackets; None: the file as a whole). The message never quotes a
    value."""

    default_hint = FOLDER_HINT

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None,
                 hint: str | None = None) -> None:
        self.file = file
        self.key = key
        super().__init__(message, hint=hint)

    def to_dict(self) -> dict:
        out = super().to_dict()
        if self.key is not None:
            out["key"] = self.key
        return out


def kind_of(value: Any) -> str:
    """How a message describes a JSON value it must not quote."""
    return {dict: "an object", list: "a list", str: "a text", bool: "true or false", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _rating_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


@dataclass(frozen=True)
class ModelSet:
    """A model set's ``model_set_config.json``, checked: its base model (the metadata's when the
    file names none), its system prompt and its few-shot examples ({"input", "output"} texts)."""

    base_model: str
    system_prompt: str
    few_shot_examples: list[dict]
    config: dict  # the whole file, for the few-shot turns and the Ollama settings


class OutputFolder:
    """One output folder opened once (``within``: see the module); ``error`` is the exception class
    its problems are raised as (a room may name its own subclass of ``OutputFolderError``). Use it
    as a context manager, or ``close`` it."""

    def __init__(self, folder: str | os.PathLike, within: str | os.PathLike | None = None, *,
                 error: type[OutputFolderError] = OutputFolderError) -> None:
        folder = Path(folder)
        self.path = folder
        self.name = display_name(folder)
        self.Error = error
        self._meta: dict | None = None
        try:
            if within is None:
                self.fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                return
            if os.path.abspath(folder.parent) != os.path.abspath(within) or folder.name in ("", ".", ".."):
                raise self.error(None, None, "is not a folder directly in the outputs folder",
                                 hint="name an output folder of this service (outputs/<job_id> or the job id)")
            parent = os.open(within, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                self.fd = fsutil.open_real_dir(folder.name, dir_fd=parent)
            finally:
                os.close(parent)
        except NotADirectoryError:
            if within is None:
                raise self.error(None, None, "is a file, not a folder") from None
            raise self.error(None, None, "is a symbolic link or a file, not a folder of the outputs folder; "
                                         "links are never followed",
                             hint="put the model folder itself in outputs/, or name an Ollama model") from None
        except FileNotFoundError:
            raise self.error(None, None, "does not exist") from None
        except OSError as exc:
            raise self.error(None, None, f"cannot be opened ({exc.strerror or type(exc).__name__})") from None

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> "OutputFolder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def error(self, file: str | None, key: str | None, problem: str, *,
              hint: str | None = None) -> OutputFolderError:
        where = f"{file} in the model folder {self.name}" if file else f"the model folder {self.name}"
        return self.Error(f"{where}: {key}: {problem}" if key else f"{where} {problem}", file=file, key=key,
                          hint=hint)

    # --- files ----------------------------------------------------------------------------------

    def _open(self, name: str, *, required: bool) -> IO[bytes] | None:
        try:
            return os.fdopen(fsutil.open_regular(name, dir_fd=self.fd), "rb")
        except OSError as exc:
            return self._unreadable(name, exc, required=required)

    def _unreadable(self, name: str, exc: OSError, *, required: bool) -> None:
        """None for a missing file the folder may lack; else the error saying why."""
        if isinstance(exc, FileNotFoundError):
            if required:
                raise self.error(name, None, "is missing") from None
            return None
        if isinstance(exc, fsutil.NotRegularFileError):
            raise self.error(name, None, "is a symbolic link; links in a model folder are never followed"
                             if exc.errno == errno.ELOOP else "is not a regular file") from None
        if isinstance(exc, fsutil.FileTooLargeError):
            raise self.error(name, None, f"is over the limit of {MAX_FILE_BYTES} bytes") from None
        raise self.error(name, None, f"cannot be read ({exc.strerror or type(exc).__name__})") from None

    def _read(self, name: str, *, required: bool) -> bytes | None:
        try:
            return fsutil.read_regular(name, limit=MAX_FILE_BYTES, dir_fd=self.fd)
        except OSError as exc:
            return self._unreadable(name, exc, required=required)

    def _object(self, name: str, data: bytes) -> dict:
        value = self._parse(name, data)
        if not isinstance(value, dict):
            raise self.error(name, None, f"is not a JSON object (it holds {kind_of(value)})")
        return value

    def json_object(self, name: str) -> dict:
        """The JSON object file ``name`` holds (the error naming it when it does not)."""
        data = self._read(name, required=True)
        assert data is not None
        return self._object(name, data)

    def optional_object(self, name: str) -> dict | None:
        """``json_object`` of a file the folder may lack (None then)."""
        data = self._read(name, required=False)
        return None if data is None else self._object(name, data)

    def first_line(self, name: str) -> Any:
        """The JSON value of the first line of ``name``; None when the file is missing or empty."""
        fh = self._open(name, required=False)
        if fh is None:
            return None
        with fh:
            line = fh.readline(MAX_FILE_BYTES + 1)
        if len(line) > MAX_FILE_BYTES:
            raise self.error(name, None, f"has a first line over the limit of {MAX_FILE_BYTES} bytes")
        return self._parse(name, line) if line.strip() else None

    def _parse(self, name: str, data: bytes) -> Any:
        try:
            return json.loads(data.decode("utf-8"))
        except RecursionError:
            raise self.error(name, None, "is nested too deeply to be read (lists or objects inside each other "
                                         "thousands of levels deep)") from None
        except ValueError:  # not UTF-8, not JSON, or a number over Python's digit limit
            raise self.error(name, None, "is not valid JSON in UTF-8") from None

    def real_subfolder(self, name: str) -> None:
        """Refuse a link in place of the subfolder ``name``, or a link or non-file inside it (the
        child that loads an adapter follows names it is given). A missing one is the user's to see."""
        try:
            fd = fsutil.open_real_dir(name, dir_fd=self.fd)
        except FileNotFoundError:
            return
        except NotADirectoryError:
            raise self.error(name, None, "is a symbolic link or a file, not a folder; links in a model folder "
                                         "are never followed") from None
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    if not entry.is_file(follow_symlinks=False):
                        raise self.error(f"{name}/{display_name(entry.name)}", None,
                                         "is a symbolic link or not a regular file; links in a model folder "
                                         "are never followed")
        finally:
            os.close(fd)

    # --- the metadata's keys ----------------------------------------------------------------------

    def metadata(self) -> dict:
        """``fine_tuning_metadata.json`` (read once)."""
        if self._meta is None:
            self._meta = self.json_object(names.METADATA)
        return self._meta

    def approach(self) -> str:
        """``fine_tune``, ``model_set`` or ``head``."""
        approach = self.metadata().get("approach")
        if approach not in APPROACHES:
            raise self.error(names.METADATA, "approach",
                             f"must be fine_tune, model_set or head, not {kind_of(approach)}"
                             if not isinstance(approach, str) else "must be fine_tune, model_set or head")
        return approach

    def model_name(self, file: str, key: str, value: Any) -> str:
        """``value`` (the file's ``key``) checked as an Ollama model name."""
        if not isinstance(value, str):
            raise self.error(file, key, f"must be an Ollama model name, not {kind_of(value)}")
        if why := model_name_problem(value):
            raise self.error(file, key, why)
        return value

    def base_model(self) -> str:
        """The base model the job built on (the metadata's ``model``)."""
        return self.model_name(names.METADATA, "model", self.metadata().get("model"))

    def labels(self) -> dict[str, int]:
        """The rating labels: label -> integer rating (``mapping.labels``, never empty)."""
        mapping = self.metadata().get("mapping")
        if not isinstance(mapping, dict):
            raise self.error(names.METADATA, "mapping",
                             f"must be an object holding the rating labels, not {kind_of(mapping)}")
        labels = mapping.get("labels")
        if not isinstance(labels, dict) or not labels:
            raise self.error(names.METADATA, "mapping.labels",
                             f"must be a non-empty object of label: integer rating pairs, not {kind_of(labels)}"
                             + (" (empty)" if labels == {} else ""))
        bad = [i for i, value in enumerate(labels.values(), 1) if _rating_int(value) is None]
        if bad:
            raise self.error(names.METADATA, "mapping.labels",
                             f"{len(bad)} of its {len(labels)} ratings are not integers (the first is label number "
                             f"{bad[0]})")
        return {str(k): int(_rating_int(v)) for k, v in labels.items()}  # type: ignore[arg-type]

    def _section(self, key: str) -> dict | None:
        value = self.metadata().get(key)
        if value is not None and not isinstance(value, dict):
            raise self.error(names.METADATA, key, f"must be an object, not {kind_of(value)}")
        return value

    def registered_name(self) -> str | None:
        """The name the model is registered in Ollama under (``registered_name``'s rule), checked;
        None when it is not registered there."""
        registration = self._section("registration")
        if registration is None or registration.get("registered") is not True:
            return None
        return self.model_name(names.METADATA, "registration.name", registration.get("name"))

    def served_name(self) -> str:
        """The name a server presents the model under (``served_name``'s rule), each name checked."""
        registered = self.registered_name()
        if registered is not None:
            return registered
        for section in ("fine_tune", "model_set"):
            built = (self._section(section) or {}).get("model_name")
            if built is not None:
                return self.model_name(names.METADATA, f"{section}.model_name", built)
        return self.base_model()

    def template(self) -> Template | None:
        """The prompt template the model was built with (None: the file's prompt column)."""
        meta = self.metadata()
        if not meta.get("prompt_template"):
            return None
        try:
            return Template.from_json(meta["prompt_template"])
        except ConfigError as exc:
            problems = "; ".join(p.removeprefix("prompt_template: ") for p in exc.problems)
            raise self.error(names.METADATA, "prompt_template", problems) from None

    def code_sets(self, template: Template | None) -> list | None:
        """The code sets a template's expansion was built with, as the metadata records them (None
        without an expansion, or when the record is not a list)."""
        if template is None or not template.codes:
            return None
        record = self.metadata().get("code_knowledge")
        sets = record.get("code_sets") if isinstance(record, dict) else None
        return sets if isinstance(sets, list) else None

    def topics(self) -> str | list[str] | None:
        """The job's topics (``target_topics``): a text, a list of texts, or None."""
        topics = self.metadata().get("target_topics")
        if topics is None or isinstance(topics, str) or (isinstance(topics, list)
                                                         and all(isinstance(t, str) for t in topics)):
            return topics
        raise self.error(names.METADATA, "target_topics", f"must be a text or a list of texts, not {kind_of(topics)}")

    def topic_definition(self) -> str | None:
        """The topic's definition the system prompt was built with (None when there is none)."""
        parameters = self.metadata().get("parameters")
        definition = parameters.get("topic_definition") if isinstance(parameters, dict) else None
        return definition if isinstance(definition, str) else None

    def trained_system_prompt(self) -> str | None:
        """The system turn of the fine-tune's first training record (exactly what it was trained
        with); None when neither file is there (or both are empty)."""
        for name in names.TRAINING_FILES:
            record = self.first_line(name)
            if record is None:
                continue
            messages = record.get("messages") if isinstance(record, dict) else None
            first = messages[0] if isinstance(messages, list) and messages else None
            if not (isinstance(first, dict) and first.get("role") == "system"
                    and isinstance(first.get("content"), str)):
                raise self.error(name, "messages[0]", "the first record does not start with a system turn "
                                                      '({"role": "system", "content": "<text>"})')
            return first["content"]
        return None

    def adapter_folder(self) -> Path:
        """The fine-tune's adapter folder (``fine_tune.adapter_dir``, a name inside the folder);
        a link in its place or inside it is refused."""
        fine_tune = self._section("fine_tune")
        name = (fine_tune or {}).get("adapter_dir") or names.ADAPTER_DIR
        if not isinstance(name, str) or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise self.error(names.METADATA, "fine_tune.adapter_dir",
                             "must be the name of a folder inside the model folder (no path)")
        self.real_subfolder(name)
        return self.path / name

    def answers_directly(self) -> bool:
        """A fine-tune trained on rating-only answers too (``fine_tune.answer_forms: both``)."""
        fine_tune = self.metadata().get("fine_tune")
        return isinstance(fine_tune, dict) and fine_tune.get("answer_forms") == "both"

    def model_set(self) -> ModelSet:
        """``model_set_config.json``, checked (its base model, system prompt, few-shot examples)."""
        config = self.json_object(names.MODEL_SET_CONFIG)
        if config.get("base_model") is not None:
            base = self.model_name(names.MODEL_SET_CONFIG, "base_model", config["base_model"])
        else:
            base = self.base_model()
        system = config.get("system_prompt")
        if not isinstance(system, str) or not system.strip():
            raise self.error(names.MODEL_SET_CONFIG, "system_prompt", "is missing" if "system_prompt" not in config
                             else "is empty" if isinstance(system, str)
                             else f"must be a text, not {kind_of(system)}")
        examples = config.get("few_shot_examples")
        if examples is None:
            examples = []
        if not isinstance(examples, list):
            raise self.error(names.MODEL_SET_CONFIG, "few_shot_examples",
                             f"must be a list of examples, not {kind_of(examples)}")
        for i, example in enumerate(examples):
            if not isinstance(example, dict):
                raise self.error(names.MODEL_SET_CONFIG, f"few_shot_examples[{i}]",
                                 f"must be an object with input and output texts, not {kind_of(example)}")
            for key in ("input", "output"):
                if not isinstance(example.get(key), str):
                    what = "is missing" if key not in example else f"must be a text, not {kind_of(example[key])}"
                    raise self.error(names.MODEL_SET_CONFIG, f"few_shot_examples[{i}].{key}", what)
        return ModelSet(base, system, examples, config)

    def calibration(self) -> dict | None:
        """``calibration.json`` (None when the folder has none); its temperature is checked by the
        room that applies it (``quality.confidence``)."""
        return self.optional_object(names.CALIBRATION)

    def evaluation(self) -> dict | None:
        """``evaluation.json`` with every value ``status`` and ``report`` read checked for its type
        (None when the folder has none)."""
        report = self.optional_object(names.EVALUATION)
        if report is not None and (wrong := _shape_problem(report, _EVALUATION_SHAPE, "")):
            raise self.error(names.EVALUATION, None, f"cannot be used: {wrong}")
        return report


def object_file(path: Path) -> dict:
    """A JSON object file of an output folder (``fsutil.read_json``: never through a link, never a
    FIFO or a device, never more than ``fsutil.MAX_READ_BYTES``); OutputFolderError saying why not."""
    try:
        data = fsutil.read_json(path)
    except (OSError, ValueError) as exc:
        raise OutputFolderError(f"{path.name} cannot be read: {fsutil.read_problem(exc)}", file=path.name) from None
    if not isinstance(data, dict):
        raise OutputFolderError(f"{path.name} cannot be read: it is not a JSON object", file=path.name)
    return data


def chat_records(path: Path) -> list[list[dict]]:
    """The chat records of a JSONL file of the folder (``validation_data.jsonl``; opened as
    ``fsutil.open_regular`` does, each line at most ``fsutil.MAX_READ_BYTES``); OutputFolderError
    naming the line that is not one
    (a list of at least two ``{"role", "content": text}`` turns), never quoting it."""
    try:
        fh = os.fdopen(fsutil.open_regular(path), "rb")
    except OSError as exc:
        raise OutputFolderError(f"{path.name} cannot be read: {fsutil.read_problem(exc)}", file=path.name) from None
    records = []
    with fh:
        for number in itertools.count(1):
            line = fh.readline(fsutil.MAX_READ_BYTES + 1)
            if not line:
                break
            if len(line) > fsutil.MAX_READ_BYTES:
                raise OutputFolderError(f"{path.name} line {number} is over the limit of "
                                        f"{fsutil.MAX_READ_BYTES} bytes", file=path.name)
            if not line.strip():
                continue
            try:
                messages = json.loads(line.decode("utf-8"))["messages"]
            except (ValueError, RecursionError, KeyError, TypeError):
                messages = None
            if not (isinstance(messages, list) and len(messages) >= 2
                    and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)):
                raise OutputFolderError(f"{path.name} line {number} is not a chat record (an object whose "
                                        "messages are a list of turns with text content)", file=path.name)
            records.append(messages)
    return records


def read_metadata(folder: str | os.PathLike, within: str | os.PathLike | None = None, *,
                  error: type[OutputFolderError] = OutputFolderError) -> dict:
    """``fine_tuning_metadata.json`` of an output folder, read as ``OutputFolder`` reads."""
    with OutputFolder(folder, within, error=error) as files:
        return files.metadata()


# --- the names a model goes by ---------------------------------------------------------------------

def registered_name(meta: dict) -> str | None:
    """The one rule for the name a folder's model is registered in Ollama under: ``registration.name``
    when ``registration.registered`` is true (a skipped, failed or withdrawn registration keeps no
    registered name); None otherwise, or when the metadata holds something else there. The lenient
    form for listings; ``OutputFolder.registered_name`` raises instead."""
    registration = meta.get("registration")
    if not isinstance(registration, dict) or registration.get("registered") is not True:
        return None
    name = registration.get("name")
    return name if isinstance(name, str) else None


# --- the lenient reading of status, report and promote ----------------------------------------------

def read_json(folder: Path, name: str) -> tuple[dict, str | None]:
    """The JSON object ``name`` of a job's output folder and why it cannot be read: ``({}, None)``
    when the folder lacks it, ``({}, "<name> cannot be read: <why>")`` when it is a link, a FIFO, a
    device, over ``fsutil.MAX_READ_BYTES``, not JSON or not an object (``fsutil.read_json``: never
    followed, never blocks, never read whole)."""
    try:
        data = fsutil.read_json(folder / name)
    except (FileNotFoundError, NotADirectoryError):
        return {}, None
    except (OSError, ValueError) as exc:
        return {}, f"{name} cannot be read: {fsutil.read_problem(exc)}"
    if not isinstance(data, dict):
        return {}, f"{name} cannot be read: it holds {kind_of(data)}, not an object"
    return data, None


def evaluation_file(folder: Path) -> tuple[dict, str | None]:
    """``read_json`` of ``evaluation.json`` with every value status and report read checked for
    its type: one of the wrong type (a kappa that is a text, a model that is not an object) makes
    the file unreadable, the key named, so that it never breaks the listing of other jobs."""
    report, problem = read_json(folder, names.EVALUATION)
    if problem is None and (wrong := _shape_problem(report, _EVALUATION_SHAPE, "")):
        return {}, f"{names.EVALUATION} cannot be read: {wrong}"
    return report, problem


_NUMBER, _COUNT, _TEXT, _FLAG = "a number", "a whole number", "a text", "true or false"
_MODEL_SHAPE = {"key": _TEXT, "model": _TEXT, "kappa": _NUMBER, "kappa_ci95": [_NUMBER], "accuracy": _NUMBER,
                "macro_f1": _NUMBER, "invalid_rate": _NUMBER}
_EVALUATION_SHAPE = {
    "n": _COUNT, "models": [_MODEL_SHAPE],
    "figures": {"familiar": {"models": [_MODEL_SHAPE]}, "new_kinds": {"models": [_MODEL_SHAPE]}},
    "split": {"kind": _TEXT, "duplicate_rows": _COUNT, "duplicates_set_aside": _COUNT},
    "generalisation": [{"key": _TEXT, "learned_examples_more_than_rule": _FLAG}],
    "adapter_effect": {"ignored": _FLAG}, "verdict": {"headline": _TEXT, "recommended": _FLAG},
    "quality_gate": {"status": _TEXT, "reason": _TEXT}}


def _shape_problem(value: Any, shape: Any, where: str) -> str | None:
    """Where ``value`` departs from ``shape`` (an object's keys, ``[item shape]``, or a kind), in
    words naming the key, never the value; None (a missing key or null) always fits."""
    if value is None:
        return None
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return f"{where or 'the file'} must be an object, not {kind_of(value)}"
        return next((p for key, inner in shape.items()
                     if (p := _shape_problem(value.get(key), inner, f"{where}.{key}" if where else key))), None)
    if isinstance(shape, list):
        if not isinstance(value, list):
            return f"{where} must be a list, not {kind_of(value)}"
        return next((p for i, item in enumerate(value) if (p := _shape_problem(item, shape[0], f"{where}[{i}]"))),
                    None)
    fits = (isinstance(value, bool) if shape == _FLAG else isinstance(value, str) if shape == _TEXT
            else not isinstance(value, bool) and isinstance(value, int if shape == _COUNT else (int, float)))
    return None if fits else f"{where} must be {shape}, not {kind_of(value)}"


__all__ = ["FOLDER_HINT", "MAX_FILE_BYTES", "ModelSet", "OutputFolder", "OutputFolderError", "chat_records",
           "evaluation_file", "kind_of", "object_file", "read_json", "read_metadata", "registered_name"]
