"""Rating new records with a built model: an input CSV in, ``ratings.csv`` and a summary out.

``RatingModel`` says what rates (the base model, its registered Ollama name, the system prompt,
few-shot turns, the fine-tune's adapter, the prompt template and the rating labels);
``model_from_folder`` reads it from a job's output folder and ``model_from_name`` makes one for a
bare Ollama model. ``rate_file`` builds each record's prompt the way training did (the model's
template, else the file's prompt column), asks the backend the evaluator would choose (Ollama when
it can serve the model, else an OpenAI-compatible server that lists it, else the local child on the
base weights) in chunks of ``chunk_rows``
records, every request sharing one system + few-shot prefix, and parses every answer strictly with
``prompts.parse_answer``: an invalid answer is written as invalid, never guessed.

Each finished chunk is appended to ``<output>.part`` and fsynced; a sidecar ``<output>.part.json``
records the input's sha256 and the model's fingerprint. A run that was stopped or killed resumes
from the part file's complete lines (a cut-off last line is dropped and asked again), so no record
is rated twice and none is skipped; a part file of another input or another model is refused. When
every record is rated the part file is renamed to the output. Memory stays flat whatever the
input's size: the input is checked and its rows counted in one pass that keeps no rows
(``csvfile.scan_csv``), then read again one chunk at a time, only the columns that make the prompt
and the id, so one chunk's rows, conversations and answers are all a run holds. Every cell written
goes through ``csvfile.safe_cell`` (no spreadsheet formulas). The id column is ``Row_ID`` or
``C_BioSense_ID`` in any case (``id_column`` in the summary), else the data row number. A run
refuses an output that is the input or not a regular file (``output_problem``) before it reads
anything. No log line or exception message holds a cell value or an answer.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from . import confidence, evalreport
from .. import fsutil
from ..data import prompts
from ..config import Config
from ..data.csvfile import (ID_COLUMNS, PROMPT_COLUMNS, csv_text, find_column, read_chunks, safe_cell, scan_csv,
                             unguard_cell)
from ..errors import FineTunerError, MissingColumnError, TrainingInterruptedError
from .heldout import BACKENDS, EvalModel, EvaluationSkipped, choose_backend, prefix, served
from ..logconfig import get_logger
from .backends import BaselineRater, HeadRater, LocalRater, OllamaRater, OpenAIRater, RaterError
# needs_review.csv: its columns (the contract a reviewed file is read back by) and its writer
from .review import (EXPERT_COLUMNS, MODEL_COLUMNS, ORDER_COLUMNS, REVIEW_COLUMNS,  # noqa: F401
                     write_needs_review)
from ..data.template import Template, check_columns, render
from ..outputs import names
from ..outputs.folder import OutputFolder, OutputFolderError

if TYPE_CHECKING:
    import pandas as pd

log = get_logger("rating")

DEFAULT_CHUNK_ROWS = 500
PROGRESS_EVERY_S = 1.0
ROW_COLUMN = "row"  # the output's id column when the input has none: the 1-based data row number
OUTPUT_COLUMNS = ("rating", "label", "rationale", "valid", "model", "confidence")
REVIEW_FILE_SUFFIX = ".needs_review.csv"
PART_SUFFIX = ".part"
SIDECAR_SUFFIX = ".part.json"
SUMMARY_FILE = "rating_summary.json"
_NEWLINES = str.maketrans({"\r": " ", "\n": " "})


class RatingError(FineTunerError):
    """Records could not be rated: no backend can serve the model, the backend failed part-way, or a
    part file belongs to another input or model. The message names files and counts, never data."""

    default_hint = "fix the cause and run the same command again: the records already rated are kept"


@dataclass
class RatingModel:
    """What rates the records, and where it came from (``source``: an output folder or ``ollama:<name>``)."""

    base_model: str
    ollama_name: str | None  # the registered model (it already holds its few-shot turns), or None
    system: str
    labels: dict[str, int]  # label -> rating
    few_shot: list[dict] = field(default_factory=list)  # alternating user / assistant messages
    adapter_dir: Path | None = None  # a fine-tune's LoRA adapter
    template: Template | None = None  # None: the file's prompt column (formatted_prompt or Prompt)
    source: str = ""
    approach: str | None = None  # "fine_tune", "model_set", or None for a bare Ollama model
    # the temperature the evaluation fitted (``calibration.json``), applied to every confidence
    temperature: float | None = None
    # the folder's bag-of-words baseline (``baseline.json``; ``rate --backend baseline``), if it has one
    baseline: Any = None
    # the ICD-10-CM code sets the template's code expansion was built with (``code_knowledge.code_sets``)
    code_sets: list | None = None
    # a fine-tune trained on rating-only answers too (``training.answer_forms: both``): the rating is
    # a direct decision (one forward pass locally, a few tokens held to the schema on a server)
    direct: bool = False
    # a head on the base model's hidden states (``head.json``; approach head): rated by the local
    # features child, one forward pass per record, no generation
    head: Any = None

    @property
    def values(self) -> list[int]:
        return sorted({int(v) for v in self.labels.values()})

    def fingerprint(self) -> str:
        """sha256 of everything that decides an answer (a resumed run must use the same model)."""
        data = {"base": self.base_model, "ollama_name": self.ollama_name, "system": self.system,
                "few_shot": self.few_shot, "adapter": str(self.adapter_dir) if self.adapter_dir else None,
                "template": self.template.to_json() if self.template else None,
                "labels": {str(k): int(v) for k, v in sorted(self.labels.items())}}
        if self.head is not None:  # only then: the fingerprints of other models stay as they were
            data["head"] = self.head.fingerprint()
        return hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


# --- the model ---------------------------------------------------------------------------------

METADATA_FILE = names.METADATA
MODEL_SET_FILE = names.MODEL_SET_CONFIG
BASELINE = "baseline"  # rate --backend baseline: the folder's bag-of-words classifier
FOLDER_HINT = ("rate with a complete output folder of fine-tuner process or the daemon; a folder copied from "
               "another machine or written by an older version may need to be built again")


class ModelFolderError(RatingError, OutputFolderError):
    """A model folder, or a file in it, that cannot be used (``outputs.folder.OutputFolderError``:
    ``file`` and ``key`` name where, the message never quotes a value), raised as a RatingError."""

    default_hint = FOLDER_HINT


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise RatingError(f"{path.name} is missing from the output folder {path.parent.name}",
                          hint="rate with a complete output folder of fine-tuner process or the daemon") from None
    except (OSError, ValueError, RecursionError) as exc:
        raise RatingError(f"{path.name} in {path.parent.name} cannot be read ({type(exc).__name__})",
                          hint="rate with a complete output folder of fine-tuner process or the daemon") from None
    if not isinstance(data, dict):
        raise RatingError(f"{path.name} in {path.parent.name} is not a JSON object")
    return data


def model_from_folder(output_dir: str | os.PathLike, *, within: str | os.PathLike | None = None) -> RatingModel:
    """The model an output folder holds: its fine-tune (base + adapter) or its model set, with the
    registered Ollama name when registration succeeded and the prompt template it was built with.

    The folder is read by ``outputs.folder.OutputFolder``: every file opened without following a
    link, every key checked (``ModelFolderError`` names the file and the key, never a value).
    ``within`` (the daemon's ``outputs/``): the folder must be a real folder directly in it."""
    from ..serving.register import few_shot_messages

    folder = Path(output_dir)
    with OutputFolder(folder, within, error=ModelFolderError) as files:
        labels = files.labels()
        registered = files.registered_name()
        template = files.template()
        temperature = _temperature(files)
        fitted = _baseline(files)
        approach = files.approach()
        code_sets = files.code_sets(template)
        if approach == "head":
            base = files.base_model()
            # the head reads the record alone; the system prompt only names the model's task
            system = prompts.system_prompt(files.topics(), labels, files.topic_definition())
            return RatingModel(base, None, system, labels, [], None, template, str(folder), approach,
                               temperature, fitted, code_sets, head=_head(files))
        if approach == "fine_tune":
            base = files.base_model()
            system = files.trained_system_prompt()
            if system is None:  # the training files were removed: the prompt is rebuilt the same way
                system = prompts.system_prompt(files.topics(), labels, files.topic_definition())
            return RatingModel(base, registered, system, labels, [], files.adapter_folder(), template, str(folder),
                               approach, temperature, fitted, code_sets, direct=files.answers_directly())
        model_set = files.model_set()
        return RatingModel(model_set.base_model, registered, model_set.system_prompt, labels,
                           few_shot_messages(model_set.config), None, template, str(folder), "model_set",
                           temperature, fitted, code_sets)


def _head(files: OutputFolder):
    """The folder's head (``head.json``, required for approach head); every field checked, never code
    run (``head.Head.from_json``)."""
    from . import head

    data = files.json_object(head.FILE)
    try:
        return head.Head.from_json(data)
    except head.HeadError as exc:
        raise files.error(head.FILE, None, str(exc).removeprefix(head.FILE).lstrip(": ")
                          or "is not a fine-tuner head") from None


def _baseline(files: OutputFolder):
    """The folder's bag-of-words baseline (None when it has none: built before there was one, or
    without a hold-out); every field checked, never code run (``baseline.Baseline.from_json``)."""
    from . import baseline

    data = files.optional_object(baseline.FILE)
    if data is None:
        return None
    try:
        return baseline.Baseline.from_json(data)
    except baseline.BaselineError as exc:
        raise files.error(baseline.FILE, None, str(exc).removeprefix(f"{baseline.FILE}").lstrip(": ")
                          or "is not a fine-tuner baseline") from None


def _temperature(files: OutputFolder) -> float | None:
    """The calibration temperature of ``calibration.json`` (None when the folder has none)."""
    data = files.calibration()
    if data is None:
        return None
    value = data.get("temperature")
    if not confidence.valid_temperature(value):
        low, high = confidence.T_VALID
        raise files.error(names.CALIBRATION, "temperature", f"must be a number from {low:g} to {high:g}")
    return float(value)


def model_from_name(name: str, *, system: str, labels: Mapping[str, int],
                    template: Template | None = None) -> RatingModel:
    """A bare Ollama model (no few-shot turns, no adapter) asked with ``system`` as its system turn."""
    return RatingModel(name, None, system, {str(k): int(v) for k, v in labels.items()}, [], None, template,
                       f"ollama:{name}", None)


def _eval_model(model: RatingModel) -> EvalModel:
    return EvalModel("rate", "rating model", ollama_name=model.ollama_name, adapter_dir=model.adapter_dir,
                     few_shot=list(model.few_shot), direct=model.direct, head=model.head)


# --- prompts -----------------------------------------------------------------------------------

@dataclass
class _Prompts:
    """How a record's prompt is built: the model's template, or the file's prompt column."""

    template: Template | None
    column: str | None
    codes: Any = None  # a codes.CodeCounts when the template expands ICD-10-CM codes

    def __post_init__(self) -> None:
        if self.template is not None and self.template.codes:
            from ..data.codes import CodeCounts

            self.codes = CodeCounts()

    @property
    def columns(self) -> list[str]:
        return list(self.template.columns) if self.template is not None else [str(self.column)]

    def knowledge(self, built_with: list | None) -> dict | None:
        """The summary's ``code_knowledge``: the columns, the code sets installed now, this run's
        counts, and a note when the model was built with other versions; None without an expansion."""
        if self.codes is None:
            return None
        from ..data.codes import code_sets

        now = code_sets()
        out = {"columns": list(self.template.codes), "code_sets": now, **self.codes.to_json()}
        if built_with is not None and [(s.get("package"), s.get("version")) for s in built_with
                                       if isinstance(s, dict)] != [(s["package"], s["version"]) for s in now]:
            out["note"] = ("the model was built with other versions of the code sets: a code's expansion may "
                           "differ from its training text")
        return out

    def describe(self) -> dict:
        if self.template is not None:
            return self.template.to_json()
        return {"kind": "column", "value": self.column}

    def build(self, chunk: pd.DataFrame) -> list[str]:
        """The chunk's prompts, stripped like the dataset strips them for training."""
        if self.template is not None:
            texts = render(self.template, chunk, self.codes)
        else:
            texts = chunk[self.column]
        return [t.strip() if isinstance(t, str) else "" for t in texts.tolist()]


def _prompt_source(model: RatingModel, columns: list[str], file: str) -> _Prompts:
    if model.template is not None:
        check_columns(model.template, columns, file=file)
        return _Prompts(model.template, None)
    column = find_column(columns, PROMPT_COLUMNS)
    if column is None:
        raise MissingColumnError(
            f"missing the prompt column {' or '.join(repr(c) for c in PROMPT_COLUMNS)}, and the model records "
            f"no prompt template; the file has {len(columns)} column(s)", file=file, column=PROMPT_COLUMNS[0],
            hint="add the prompt column the model was built with, or rate with a prompt template "
                 "(prompt_template) that names the file's columns")
    return _Prompts(None, column)


# --- the part file -----------------------------------------------------------------------------

def _one_line(value: Any) -> str:
    """A cell as the output writes it: one physical line, so that a record is a line of the part file."""
    return str(value).translate(_NEWLINES)


def _csv_lines(rows: list[list[str]]) -> str:
    return csv_text(rows)  # no cell can run as a spreadsheet formula


@dataclass
class _Counts:
    by_rating: dict[int, int]
    invalid: int = 0
    empty_prompt: int = 0

    def add(self, rating: int | None, empty: bool = False) -> None:
        if empty:
            self.empty_prompt += 1
        elif rating is None:
            self.invalid += 1
        else:
            self.by_rating[rating] = self.by_rating.get(rating, 0) + 1


def _read_part(fh: IO[bytes], name: str, header: list[str], names: Mapping[int, str]) -> tuple[int, _Counts]:
    """(records in the part file, their counts), after cutting off a last line that was not finished
    (its writer was killed mid-write); a part without even a whole header is started afresh."""
    counts = _Counts({v: 0 for v in names})
    records = 0
    fh.seek(0)
    first = fh.readline()
    if not first.endswith(b"\n"):
        keep = 0
    else:
        if next(csv.reader([first.decode("utf-8", errors="replace")])) != [safe_cell(c) for c in header]:
            raise RatingError(f"{name} was written with other columns than this run writes",
                              hint=f"remove {name} to rate from the start")
        keep = len(first)
        for line in fh:
            if not line.endswith(b"\n"):
                break
            try:
                cells = next(csv.reader([line.decode("utf-8")]))
                # an empty prompt was asked of nobody: its model cell is empty
                counts.add(int(cells[1]) if cells[4] == "true" else None, empty=cells[5] == "")
            except (ValueError, IndexError, StopIteration):
                raise RatingError(f"{name} is damaged at line {records + 2}",
                                  hint=f"remove {name} to rate from the start") from None
            keep += len(line)
            records += 1
    if fh.seek(0, os.SEEK_END) != keep or keep == 0:
        fh.truncate(keep)
        if keep == 0:  # a new part file (or one cut off inside its header)
            fh.write(_csv_lines([header]).encode("utf-8"))
        fh.flush()
        os.fsync(fh.fileno())
    return records, counts


def _open_part(part: Path, sidecar: Path, identity: dict, header: list[str],
               names: Mapping[int, str]) -> tuple[IO[bytes], int, _Counts]:
    """The part file, open for appending and locked (two runs never write one part file), with the
    records it already holds (0 for a fresh start) and their counts. A part file of another input or
    model, or one whose sidecar is missing, is refused and left as it is."""
    if part.exists():
        if not sidecar.is_file():
            raise RatingError(f"{part.name} exists but {sidecar.name}, which says which input it belongs to, "
                              f"does not", hint=f"remove {part.name} to rate from the start")
        recorded = _read_json(sidecar)
        for key, what in (("input_sha256", "input file"), ("model_fingerprint", "model"),
                          ("explain", "kind of answer (one-pass or explained)")):
            if recorded.get(key) != identity.get(key):
                raise RatingError(f"{part.name} holds ratings of another {what} (its {key} differs)",
                                  hint=f"rate the same {what} to resume, or remove {part.name} and "
                                       f"{sidecar.name} to rate from the start")
    else:
        fsutil.write_json(sidecar, identity)
    fh = open(part, "a+b")  # noqa: SIM115 - held open, locked, for the whole run
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RatingError(f"another run is rating into {part.name}",
                              hint="wait for it to finish, or stop it and run again to resume") from None
        records, counts = _read_part(fh, part.name, header, names)
        fsutil.fsync_dir(part.parent)
    except BaseException:
        fh.close()
        raise
    return fh, records, counts


# --- progress ----------------------------------------------------------------------------------

class _Progress:
    """``rating_progress`` lines, at most one a second and always the last one."""

    def __init__(self, total: int, resumed: int, started: float) -> None:
        self.total, self.resumed, self.started = total, resumed, started
        self.last = 0.0
        self.logged = -1  # the last ``done`` logged: the backend and the chunk end both report it
        self.lock = threading.Lock()

    def __call__(self, done: int) -> None:
        with self.lock:
            now = time.monotonic()
            if done == self.logged or (done < self.total and now - self.last < PROGRESS_EVERY_S):
                return
            self.last, self.logged = now, done
        elapsed = now - self.started
        rate = (done - self.resumed) / elapsed if elapsed > 0 and done > self.resumed else None
        eta = (self.total - done) / rate if rate else None
        log.info("rating_progress", done=done, total=self.total,
                 percent=round(100.0 * done / self.total, 1) if self.total else None,
                 records_per_s=round(rate, 2) if rate else None, eta_s=round(eta, 1) if eta is not None else None)


# --- rating ------------------------------------------------------------------------------------

def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _label_names(labels: Mapping[str, int]) -> dict[int, str]:
    """Rating -> its label text (labels sharing a rating joined with " / "), high ratings first."""
    return {v: " / ".join(names) for v, names in prompts.labels_by_value(labels).items()}


def _rationale(text: str | None) -> str:
    """The rationale of an answer (``prompts.parse_answer``), "" when it holds none."""
    return (prompts.parse_answer(text) or {}).get("rationale", "")


def _rater(model: RatingModel, backend: str, weights, config: Config, schema: dict, memory, *,
           explain: bool = False):
    """(the rater's answer function, the model name written in each output row). A fine-tune trained
    on rating-only answers too (``model.direct``) decides the rating directly on every backend (one
    forward pass locally; a server held to the rating-only schema); ``explain``: it writes its
    rationale too (generation) instead."""
    values = model.values
    if backend == BASELINE:
        return BaselineRater(model.baseline).answer, "bag-of-words baseline"
    if backend in (HeadRater.backend, HeadRater.SERVED):
        rater = HeadRater(weights, model.head, timeout_s=config.evaluation.timeout_s, grace_s=config.training.grace_s,
                          via=backend)
        return rater.answer, f"{model.base_model}: {model.head.describe()} + head" + (
            " (llama-server)" if backend == HeadRater.SERVED else "")
    if backend == "ollama":
        name = model.ollama_name or model.base_model
        rater = OllamaRater(config.ollama, parallel=config.ollama.parallel, seed=config.defaults.seed,
                            schema=schema, memory=memory, values=values,
                            max_tokens=config.evaluation.max_new_tokens, direct=model.direct and not explain)
        return (lambda convs, **kw: rater.answer(name, convs, **kw)), name
    if backend == "openai":
        name, extra = weights.target(_eval_model(model))  # for this backend, choose_backend's plan
        served = OpenAIRater(config.openai, seed=config.defaults.seed, schema=schema, extra=extra, values=values,
                             max_tokens=config.evaluation.max_new_tokens, direct=model.direct and not explain)
        return (lambda convs, **kw: served.answer(name, convs, **kw)), name
    ev = config.evaluation
    local = LocalRater.for_weights(weights, model.adapter_dir, batch_size=ev.batch_size,
                       max_new_tokens=ev.max_new_tokens,
                       timeout_s=ev.timeout_s, grace_s=config.training.grace_s, values=values,
                       direct=model.direct and not explain, reasoned=model.direct and explain)
    return local.answer, model.base_model + (" + adapter" if model.adapter_dir is not None else "")


def _choose(model: RatingModel, backend: str, config: Config, memory) -> tuple[str, Any]:
    if backend == BASELINE:
        if model.baseline is None:
            raise RatingError("this model has no bag-of-words baseline (baseline.json): it is kept in the output "
                              "folder of every job built with held-out rows",
                              hint="rate with another backend, or build the model again with this version")
        return BASELINE, None
    if backend not in BACKENDS:
        raise RatingError(f"unknown backend {backend!r}; one of {', '.join((*BACKENDS, BASELINE))}")
    try:
        chosen, plan = choose_backend(backend, [_eval_model(model)], model.base_model, config, memory)
        # a head's own backends: the local features child, or llama-server's embeddings of the cut base
        # GGUF when llama-server is asked for (rating never generates for it)
        if model.head is not None:
            return (HeadRater.SERVED if chosen == HeadRater.SERVED else HeadRater.backend), plan
        return chosen, plan
    except EvaluationSkipped as exc:
        reasons = exc.reason.removeprefix("no backend can run the evaluation (").removesuffix(")")
        raise RatingError(f"no backend can rate with {model.ollama_name or model.base_model} ({reasons})",
                          hint="start Ollama with the model, or an OpenAI-compatible server that serves it "
                               "(openai.base_url), or put the base weights on disk with the training extra "
                               "installed, then run the same command again") from None


def part_files(output_csv: str | os.PathLike) -> tuple[Path, Path]:
    """(the part file, its sidecar): what a run writes beside ``output_csv`` until it is done."""
    output = Path(output_csv)
    return output.with_name(output.name + PART_SUFFIX), output.with_name(output.name + SIDECAR_SUFFIX)


def output_problem(input_csv: str | os.PathLike, output_csv: str | os.PathLike,
                   also: tuple[str | os.PathLike, ...] = ()) -> str | None:
    """Why rating ``input_csv`` into ``output_csv`` must not start, in words (None when it may): a
    file the run would write (the output, its part file and sidecar, and ``also``) is the input
    itself or exists and is not a regular file (``fsutil.write_problem``)."""
    for path in (Path(output_csv), *part_files(output_csv), *map(Path, also)):
        if (problem := fsutil.write_problem(path, inputs=(input_csv,))) is not None:
            where = "" if path == Path(output_csv) else " (written beside the output)"
            overwrite = ": rating would overwrite the records" if fsutil.same_file(path, input_csv) else ""
            return f"{path}{where} {problem}{overwrite}"
    return None


def _id_column(columns: list[str]) -> str | None:
    """The input's id column (``Row_ID`` / ``C_BioSense_ID`` in any case), None: rows are numbered."""
    return find_column(columns, ID_COLUMNS)


def _input_changed(file: str, total: int, part: Path, sidecar: Path) -> RatingError:
    return RatingError(f"{file} changed while it was rated: its rows differ from the {total} counted at the "
                       f"start; the records rated so far are kept in {part.name}",
                       hint=f"rate a file nobody writes to: remove {part.name} and {sidecar.name} and run again")


def rate_file(model: RatingModel, input_csv: str | os.PathLike, output_csv: str | os.PathLike, config: Config, *,
              backend: str = "auto", chunk_rows: int = DEFAULT_CHUNK_ROWS,
              on_progress: Callable[[int, int], None] | None = None,
              stop_event: threading.Event | None = None, memory=None,
              on_answer: Callable[[int, int], None] | None = None, explain: bool = False) -> dict:
    """Rate every record of ``input_csv`` into ``output_csv`` (see the module docstring); returns the
    summary (``write_summary``). ``status`` is "done", or "stopped" when ``stop_event`` was set: the
    part file then keeps the records rated so far and the same call resumes from them.
    ``on_progress(done, total)``: after each chunk is written; ``on_answer(done, total)``: after each
    answer (a progress bar)."""
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be at least 1")
    started = time.monotonic()
    started_at = _utc_now()
    input_csv, output = Path(input_csv), Path(output_csv)
    problem = output_problem(input_csv, output)
    if problem is not None:
        raise RatingError(problem, hint="write the ratings to a new file name")
    output.parent.mkdir(parents=True, exist_ok=True)
    # every check of read_csv and a row count, holding no rows; the rows are read again chunk by
    # chunk below, so a file of millions of records is rated with flat memory
    table = scan_csv(input_csv)
    info, columns = table.info, list(table.columns)
    source = _prompt_source(model, columns, info.file)
    id_column = _id_column(columns)
    # read only what makes the prompt and the id: the other columns can be most of a large file
    wanted = list(dict.fromkeys(source.columns + ([id_column] if id_column else [])))
    total = table.rows
    read_s = time.monotonic() - started

    chosen, plan = _choose(model, backend, config, memory)
    temperature = model.temperature or 1.0  # fitted for the model's answers, not the baseline's
    if chosen == BASELINE:
        temperature = 1.0
    with contextlib.ExitStack() as serving:
        try:  # a llama-server started for this run (evaluator.served) lives until the run ends
            speak, weights, config = serving.enter_context(
                served(chosen, plan, [_eval_model(model)], model.base_model, config))
        except RaterError as exc:
            raise RatingError(str(exc), hint="read the server's message; `fine-tuner serve` starts the same "
                                             "server in the foreground") from None
        names = _label_names(model.labels)
        header = [id_column or ROW_COLUMN, *OUTPUT_COLUMNS]
        part, sidecar = part_files(output)
        identity = {"input": info.file, "input_sha256": info.sha256, "rows": total,
                    "model_fingerprint": model.fingerprint(), "model_source": model.source, "created_at": started_at}
        if model.direct:  # a run resumes only with the same kind of answers (one-pass ratings or explained)
            identity["explain"] = bool(explain)
        answer, model_name = _rater(model, speak, weights, config, prompts.output_schema(model.values), memory,
                                    explain=explain)
        shared = prefix(_eval_model(model), model.system, speak)  # one object shared by every request
        out, resumed, counts = _open_part(part, sidecar, identity, header, names)
        if resumed > total:
            out.close()
            raise RatingError(f"{part.name} holds more records ({resumed}) than the input has rows ({total})",
                              hint=f"remove {part.name} to rate from the start")
        log.info("rating_started", backend=chosen, model=model_name, rows=total, resumed_from=resumed,
                 chunk_rows=chunk_rows, input_sha256=info.sha256, id_column=id_column)
        rating_started = time.monotonic()
        progress = _Progress(total, resumed, rating_started)
        confident = 0
        done = resumed
        status = "done"
        try:
            with out, contextlib.closing(read_chunks(table, chunk_rows, wanted, start=resumed)) as chunks:
                for first, chunk in chunks:
                    if stop_event is not None and stop_event.is_set():
                        status = "stopped"
                        break
                    end = first + len(chunk)
                    if end > total:
                        raise _input_changed(info.file, total, part, sidecar)
                    texts = source.build(chunk)
                    asked = [i for i, text in enumerate(texts) if text]
                    conversations = [[*shared, {"role": "user", "content": texts[i]}] for i in asked]
                    del texts
                    base_done = done
                    def answered(d: int, _t: int, base_done: int = base_done) -> None:
                        progress(base_done + d)
                        if on_answer is not None:  # per answer: a progress bar moves for small files too
                            on_answer(base_done + d, total)

                    answers = (answer(conversations, on_progress=answered, stop_event=stop_event)
                               if conversations else [])
                    del conversations
                    ids = (chunk[id_column].tolist() if id_column else range(done + 1, end + 1))
                    by_position = dict(zip(asked, answers))
                    rows = []
                    for i, ident in enumerate(ids):
                        reply = by_position.get(i)
                        rating = prompts.answer_rating(reply.text, model.values) if reply is not None else None
                        counts.add(rating, empty=reply is None)
                        if reply is None:  # an empty prompt: nothing to rate, no model asked
                            rows.append([_one_line(ident), "", "", "", "false", "", ""])
                        elif rating is None:
                            rows.append([_one_line(ident), "", "", "", "false", _one_line(model_name), ""])
                        else:
                            sure = confidence.confidence(confidence.with_temperature(reply.probs, temperature), rating)
                            confident += sure is not None
                            rows.append([_one_line(ident), str(rating), _one_line(names[rating]),
                                         _one_line(_rationale(reply.text)), "true", _one_line(model_name),
                                         "" if sure is None else f"{sure:.4f}"])
                    out.write(_csv_lines(rows).encode("utf-8"))
                    out.flush()
                    os.fsync(out.fileno())
                    del rows, answers, by_position, chunk
                    done = end
                    progress(done)
                    if on_progress is not None:
                        on_progress(done, total)
                if status == "done" and done != total:
                    raise _input_changed(info.file, total, part, sidecar)
                if status == "done":  # renamed while still locked: no other run can append meanwhile
                    os.replace(part, output)
                    fsutil.fsync_dir(output.parent)
                    sidecar.unlink(missing_ok=True)
        except TrainingInterruptedError:
            status = "stopped"  # the unfinished chunk is asked again when the run resumes
        except RaterError as exc:
            raise RatingError(f"{exc}; the {done} records rated so far are kept in {part.name}",
                              hint="fix the backend and run the same command again: it resumes from there") from None
        duration = time.monotonic() - started
        rating_s = time.monotonic() - rating_started
        this_run = done - resumed
        summary = {
            "status": status,
            "input": info.file, "input_sha256": info.sha256,
            "output": str(output if status == "done" else part),
            "rows": total, "rated": done, "rated_this_run": this_run, "resumed_from": resumed,
            "counts": {names[v]: counts.by_rating.get(v, 0) for v in names},
            "counts_by_rating": {str(v): counts.by_rating.get(v, 0) for v in names},
            "invalid": counts.invalid, "empty_prompt": counts.empty_prompt,
            "invalid_answer_rule": evalreport.INVALID_RULE,
            "backend": chosen, "model": model_name, "base_model": model.base_model, "approach": model.approach,
            "model_source": model.source, "few_shot_turns": len(model.few_shot) // 2,
            # a model trained on both answer forms: one-pass ratings ("direct") or explained ones
            **({"answer_form": "reasoned" if explain else "direct"} if model.direct else {}),
            "prompt": source.describe(),
            # the ICD-10-CM expansion's counts, only for a model built with it
            **({"code_knowledge": knowledge} if (knowledge := source.knowledge(model.code_sets)) else {}),
            "id_column": id_column,
            "started_at": started_at, "finished_at": _utc_now(),
            "durations_s": {"read": round(read_s, 3), "rating": round(rating_s, 3), "total": round(duration, 3)},
            "records_per_s": round(this_run / rating_s, 2) if rating_s > 0 and this_run else None,
            "confidence": {
                "rated_with_confidence_this_run": confident,
                "source": evalreport.CONFIDENCE_SOURCES.get(chosen, chosen) if confident else None,
                "temperature": model.temperature,
                **({} if confident or not this_run else {
                    "note": f"the {chosen} backend gave no probabilities: the confidence column is empty"})},
        }
        log.info("rating_finished", status=status, backend=chosen, model=model_name, rows=total, rated=done,
                 resumed_from=resumed, invalid=counts.invalid, counts=summary["counts_by_rating"], id_column=id_column,
                 duration_s=summary["durations_s"]["total"], records_per_s=summary["records_per_s"])
        return summary


def explain_for_review(model: RatingModel, summary: dict, input_csv: str | os.PathLike,
                       output_csv: str | os.PathLike, config: Config, below: float | None, *, memory=None,
                       stop_event: threading.Event | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> dict:
    """Before ``route_for_review``: after a finished run of one-pass ratings (``answer_form``
    "direct"), with ``below`` set, the records going to the experts with a rating (a confidence
    missing or under ``below``) are asked again for the reasoned answer on the run's backend, and its
    rationale is written into their rows of ``output_csv`` (rewritten atomically), so the experts see
    the model's reason. The rating stays the one-pass decision: a reasoned answer that rates
    otherwise, or is invalid, leaves the rationale empty. Returns the summary with
    ``explained_for_review`` ({"records", "rationales", "other_rating", "invalid"}); a stop or a
    backend failure leaves ``output_csv`` as it was and says so there (``status``)."""
    if below is None or summary.get("status") != "done" or summary.get("answer_form") != "direct":
        return summary
    output = Path(output_csv)
    # data row (0-based) -> its one-pass rating, for the rows that go to the experts with a rating
    chosen = {i: int(row["rating"]) for i, row in enumerate(_rated_rows(output)) if _explainable(row, below)}
    counts: dict[str, Any] = {"records": len(chosen), "rationales": 0, "other_rating": 0, "invalid": 0}
    if chosen:
        try:
            rationales = _reasoned_rationales(model, chosen, input_csv, config, str(summary["backend"]), memory,
                                              stop_event, chunk_rows, counts)
        except (RaterError, RatingError, TrainingInterruptedError) as exc:
            stopped = isinstance(exc, TrainingInterruptedError)
            log.warning("review_explain_skipped", records=len(chosen), status="stopped" if stopped else "failed",
                        error_type=type(exc).__name__)
            return {**summary, "explained_for_review": {**counts, "status": "stopped" if stopped else "failed"}}
        if rationales:
            fsutil.write_lines(output, _with_rationales(output, rationales))
        counts["rationales"] = len(rationales)
    log.info("review_explained", **counts)
    return {**summary, "explained_for_review": {**counts, "status": "done"}}


def _rated_rows(path: Path):
    """The data rows of a ratings file as dicts of its columns, unguarded (``csvfile.unguard_cell``)."""
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            yield {k: unguard_cell(v) if isinstance(v, str) else v for k, v in row.items()}


def _explainable(row: Mapping[str, str], below: float) -> bool:
    """A valid rating that goes to the experts: its confidence is missing or under ``below``."""
    if row.get("valid") != "true":
        return False
    sure = row.get("confidence") or ""
    return not sure or float(sure) < below


def _reasoned_rationales(model: RatingModel, chosen: Mapping[int, int], input_csv: str | os.PathLike,
                         config: Config, backend: str, memory, stop_event: threading.Event | None,
                         chunk_rows: int, counts: dict) -> dict[int, str]:
    """Data row -> the rationale of its reasoned answer, for the rows ``chosen`` (row -> one-pass
    rating) whose reasoned answer is valid, rates the same and gives a reason; ``counts`` gets the
    answers that rate otherwise (``other_rating``) or are invalid. One chunk of records at a time."""
    table = scan_csv(input_csv)
    source = _prompt_source(model, list(table.columns), table.info.file)
    kind, plan = _choose(model, backend, config, memory)
    out: dict[int, str] = {}
    with served(kind, plan, [_eval_model(model)], model.base_model, config) as (speak, weights, cfg):
        answer, _name = _rater(model, speak, weights, cfg, prompts.output_schema(model.values), memory, explain=True)
        shared = prefix(_eval_model(model), model.system, speak)
        with contextlib.closing(read_chunks(table, chunk_rows, list(dict.fromkeys(source.columns)))) as chunks:
            for first, chunk in chunks:
                rows = [first + j for j in range(len(chunk)) if first + j in chosen]
                if not rows:
                    continue
                texts = source.build(chunk)
                conversations = [[*shared, {"role": "user", "content": texts[r - first]}] for r in rows]
                del texts
                for r, reply in zip(rows, answer(conversations, stop_event=stop_event)):
                    rating = prompts.answer_rating(reply.text, model.values)
                    if rating is None:
                        counts["invalid"] += 1
                    elif rating != chosen[r]:
                        counts["other_rating"] += 1
                    elif reason := _rationale(reply.text):
                        out[r] = reason
    return out


def _with_rationales(path: Path, rationales: Mapping[int, str]):
    """The ratings file's text again, with ``rationales`` (data row -> text) in those rows' rationale
    cells; every other line byte for byte as it was."""
    column = 1 + OUTPUT_COLUMNS.index("rationale")
    with open(path, newline="", encoding="utf-8") as fh:
        lines = [fh.readline()]
        for i, line in enumerate(fh):  # a record is one line (``_one_line``)
            if i in rationales:
                cells = [unguard_cell(c) for c in next(csv.reader([line]))]
                cells[column] = _one_line(rationales[i])
                line = _csv_lines([cells])
            lines.append(line)
            if len(lines) >= DEFAULT_CHUNK_ROWS:
                yield "".join(lines)
                lines = []
        yield "".join(lines)


def review_path(output_csv: str | os.PathLike) -> Path:
    """Where the records to review go beside the ratings: ``ratings.csv`` -> ``needs_review.csv``,
    ``new.ratings.csv`` -> ``new.needs_review.csv``, ``x.csv`` -> ``x.needs_review.csv``."""
    output = Path(output_csv)
    if output.name.endswith("ratings.csv"):
        return output.with_name(output.name[: -len("ratings.csv")] + "needs_review.csv")
    return output.with_name(output.stem + REVIEW_FILE_SUFFIX)


def route_for_review(summary: dict, input_csv: str | os.PathLike, output_csv: str | os.PathLike,
                     below: float | None, *, group_by: str | None = None) -> dict:
    """After a finished run: with ``below`` set, write ``needs_review.csv`` (``review.write_needs_review``:
    ranked by what a rating is worth, spread over the kinds of records ``group_by`` names, else a
    diagnosis column's) and count it in the summary; the summary, updated, is returned."""
    if below is None or summary.get("status") != "done":
        return summary
    dest = review_path(output_csv)
    counts = write_needs_review(input_csv, output_csv, dest, below, group_by=group_by)
    grouped = counts["grouped_by"]
    log.info("review_routed", threshold=below, records=counts["records"], invalid=counts["invalid"],
             without_confidence=counts["without_confidence"], group_column=grouped.get("column"),
             kinds=grouped.get("kinds"))
    return {**summary, "needs_review": {**counts, "file": dest.name}}


def write_summary(summary: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write the summary as JSON atomically (``rating_summary.json`` beside the output)."""
    path = Path(path)
    fsutil.write_json(path, dict(summary))
    return path


__all__ = ["BACKENDS", "SUMMARY_FILE", "ModelFolderError", "RatingError", "RatingModel", "model_from_folder",
           "explain_for_review", "route_for_review", "write_needs_review",
           "model_from_name", "output_problem", "part_files", "rate_file", "write_summary"]
