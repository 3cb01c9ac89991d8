"""The seed's ``FineTuner`` facade: one dataset end to end.

validate → decide the approach → build the outputs (training data → trainer child → adapter, or the
model set) → register in Ollama → metadata. The approach decision lives here and nowhere else:
``auto`` fine-tunes when the dataset is large enough and every required capability check passes,
and otherwise (or when training fails) falls back to a model set if fallback is on. ``fine_tune``
and ``model_set`` force one path, with no fallback; ``head`` (only when asked for) fits a classifier
on the base model's hidden states (``quality.head``). This module knows nothing about the inbox: the
daemon hands it a ``JobInputs`` and publishes the folder it filled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from . import fsutil, portable
from .data import prompts, turns
from .outputs import build as outputs, names
from .serving.capability import CapabilityReport, build_report
from .config import Config, load_config
from .data.jobsettings import JobSettings, defaults_problems, job_settings
from .errors import (
    DatasetEncodingError,
    DatasetError,
    DatasetTooSmallWarning,
    EvaluationError,
    FineTuningNotSupportedError,
    ModelSetConfigError,
    OllamaError,
    TrainingFailedError,
)
from .logconfig import get_logger

log = get_logger("fine_tuner")

FINE_TUNE, MODEL_SET, HEAD = "fine_tune", "model_set", "head"
# where training_config.yaml sends another trainer's output: never the adapter/ folder published here
OTHER_TRAINER_OUTPUT = "trainer-output"
# runs axolotl on training_config.yaml from the folder it lies in, whatever the working directory
AXOLOTL_LAUNCHER = "run_axolotl.sh"
AXOLOTL_LAUNCHER_TEXT = """#!/bin/sh
# Runs axolotl on this folder's training_config.yaml from any working directory: axolotl reads the
# dataset paths in it relative to the working directory, so this changes to the folder first.
#   sh run_axolotl.sh train        train the adapter (into trainer-output/), on every GPU here
#   sh run_axolotl.sh preprocess   check and tokenize the data only
# Further arguments go to axolotl (e.g. --num-processes 2).
set -e
cd "$(dirname "$0")"
command="${1:-train}"
[ $# -gt 0 ] && shift
exec axolotl "$command" training_config.yaml "$@"
"""
CAPABILITY_TTL_S = 30.0
_CAPABILITY_CACHE: dict[tuple[int, str], tuple[Config, float, CapabilityReport]] = {}
_CAPABILITY_LOCK = threading.Lock()
_PACKAGES = ("fine-tuner", "pandas", "pyyaml", "structlog", "requests", "watchdog",
             "torch", "transformers", "peft", "accelerate", "safetensors")


@dataclass
class JobInputs:
    """One job as the daemon or the CLI hands it over.

    ``output_dir``: with ``staged`` False (the daemon) the files are written straight into it (the
    daemon built it as ``outputs/.tmp-<job_id>`` and publishes it); with ``staged`` True (the CLI)
    they are built in a temporary sibling and moved in when complete.
    """

    csv_path: Path
    mapping_path: Path | None
    settings: JobSettings
    output_dir: Path
    stem: str
    job_id: str | None = None
    stop_event: threading.Event | None = None
    training_lock: threading.Lock | None = None
    staged: bool = False
    on_progress: Callable[[dict], None] | None = None


@dataclass
class JobPlan:
    """A validated job with its approach decided (``FineTuner.plan_job``), ready for ``execute``."""

    ds: Any
    settings: JobSettings
    output_dir: Path
    stem: str
    staged: bool
    input_hashes: dict
    job: JobInputs | None
    stages: Any
    meta: dict
    validation_positions: frozenset[int] = frozenset()  # set once the fine-tune split is made
    ollama_memory: Any = None  # the job's UnreachableMemory: its capability check and registration share it
    # /api/show's Modelfile from the capability check: its FROM finds the GGUF to train on when
    # Ollama's manifest cannot be read (the same lookup ``check`` made)
    ollama_modelfile: str | None = None

    @property
    def approach(self) -> str:
        return self.meta["approach"]

    def drop_dataset(self) -> None:
        """Free the validated rows while the plan waits (the daemon's queued fine-tunes, which may
        wait for hours); ``execute`` reads the files again and checks they are unchanged."""
        if self.job is None:
            raise ValueError("only a plan made from files (plan_job) can drop its dataset")
        self.ds = None


def _file_hashes(ds) -> dict:
    """sha256 of the dataset and mapping files a Dataset was read from (None for what was not a file)."""
    return {"dataset": ds.read_info.sha256 if ds.read_info else None, "mapping": ds.mapping.sha256}


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@functools.lru_cache(maxsize=1)
def _package_versions() -> tuple[tuple[str, str | None], ...]:
    out = []
    for name in _PACKAGES:
        try:
            out.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            out.append((name, None))
    return tuple(out)


def package_versions() -> dict[str, str | None]:
    """Installed versions, read once per process from package metadata (nothing is imported)."""
    return dict(_package_versions())


class _Stages:
    """Stage durations for the metadata (``stage_durations_s``)."""

    def __init__(self) -> None:
        self.durations: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        log.info("stage_started", stage=name)  # what status shows while the job runs
        start = time.perf_counter()
        try:
            yield
        finally:
            self.durations[name] = round(self.durations.get(name, 0.0) + time.perf_counter() - start, 4)


def _resolve_config(config: Config | Mapping | str | os.PathLike | None) -> Config:
    if isinstance(config, Config):
        return config
    if config is None:
        return load_config(None, os.environ, checks=(defaults_problems,))
    if isinstance(config, Mapping):
        return load_config(None, os.environ, overrides=config, checks=(defaults_problems,))
    return load_config(config, os.environ, checks=(defaults_problems,))


class FineTuner:
    """Turn a rated dataset into an Ollama model: a LoRA fine-tune or a model set.

    ``FineTuner(debug_mode=False, fallback_mode=True, config=None)``; ``config`` may be a
    ``Config``, a path to a YAML file, or a mapping in the file's shape.
    """

    def __init__(self, debug_mode: bool = False, fallback_mode: bool = True,
                 config: Config | Mapping | str | os.PathLike | None = None) -> None:
        self.config = _resolve_config(config)
        self.debug_mode = bool(debug_mode or self.config.debug)
        self.fallback_mode = bool(fallback_mode)
        self._ensure_logging()

    # --- logging -------------------------------------------------------------------------------

    def _ensure_logging(self) -> None:
        """Library use: log to ``fine_tuner.log`` in the log directory unless the CLI or daemon
        already configured logging."""
        from . import logconfig

        if logconfig.configured_by() == "app":
            return
        log_dir = self.config.paths.log_dir or os.environ.get("LOGS_DIRECTORY") or self.config.paths.root
        logconfig.configure(level="DEBUG" if self.debug_mode else "INFO", stream=None,
                            log_file=Path(log_dir) / "fine_tuner.log", owner="library")

    # --- capability ----------------------------------------------------------------------------

    def _ollama_client(self, *, probe: bool = False, memory=None):
        """The configured client; ``probe`` makes a single attempt per call (a capability check
        must not spend the retry budget waiting on a server that is simply not running).
        ``memory``: the job's ``UnreachableMemory``, so that a server that did not answer one
        step of the job is not waited for again by the next (``ollama.UNREACHABLE_TTL_S``)."""
        from .serving.ollama import OllamaClient

        cfg = dataclasses.replace(self.config.ollama, retries=0) if probe else self.config.ollama
        return OllamaClient(cfg, memory=memory)

    @staticmethod
    def _job_memory():
        """A fresh memory of unreachable Ollama servers for one job (a later job asks again)."""
        from .serving.ollama import UnreachableMemory

        return UnreachableMemory()

    def capability_report(self, model_name: str, *, memory=None) -> CapabilityReport:
        """Every check, each with ok/detail; ``report.supported`` is the answer."""
        with self._ollama_client(probe=True, memory=memory) as client:
            report = build_report(model_name, self.config, client)
        log.info("capability_checked", model=model_name, supported=report.supported,
                 failed=[c.name for c in report.failed])
        return report

    def _cached_capability_report(self, model_name: str, memory=None) -> CapabilityReport:
        """The daemon runs many jobs for the same model: reuse a report for ``CAPABILITY_TTL_S``
        as long as the configuration object is the same (a SIGHUP reload makes a new one)."""
        key = (id(self.config), model_name)
        with _CAPABILITY_LOCK:
            hit = _CAPABILITY_CACHE.get(key)
            if hit is not None and hit[0] is self.config and time.monotonic() - hit[1] < CAPABILITY_TTL_S:
                return hit[2]
        report = self.capability_report(model_name, memory=memory)
        with _CAPABILITY_LOCK:
            if len(_CAPABILITY_CACHE) >= 64:  # configs are held by the cache: keep it small
                _CAPABILITY_CACHE.clear()
            _CAPABILITY_CACHE[key] = (self.config, time.monotonic(), report)
        return report

    def check_fine_tuning_capability(self, model_name: str) -> bool:
        """True when ``model_name`` can be fine-tuned here (see ``capability_report`` for why not)."""
        return self.capability_report(model_name).supported

    # --- the seed's builders -------------------------------------------------------------------

    def _dataset(self, df, rating_mapping, source: str = "<dataframe>"):
        from .data.dataset import validate_frame

        return validate_frame(df, rating_mapping, source=source)

    def prepare_training_data(self, df, rating_mapping, target_topics: str | None = None) -> list[dict]:
        """One ``{"messages": [system, user, assistant]}`` chat record per usable row."""
        from .data.trainingdata import chat_records

        ds = self._dataset(df, rating_mapping)
        topics = target_topics if target_topics is not None else self.config.defaults.topics
        return chat_records(ds, prompts.system_prompt(topics, ds.mapping.labels))

    def create_model_set_config(self, model_name: str, df, rating_mapping, target_topics) -> dict:
        """The ``model_set_config.json`` content for meta-prompting (nothing is written)."""
        ds = self._dataset(df, rating_mapping)
        settings = job_settings(self.config.defaults, {"model": model_name, "topics": _topics_text(target_topics)},
                                source="arguments")
        return self._model_set(ds, settings, stem="dataset", exclude=(), input_hashes={})

    def process_dataset(self, df, model_name: str, rating_mapping, target_topics, *, epochs: int | None = None,
                        learning_rate: float | None = None, batch_size: int | None = None,
                        output_dir: str | os.PathLike = "outputs",
                        approach: str = "auto", output_model: str | None = None,
                        source_name: str = "dataset") -> tuple[bool, dict]:
        """Process an in-memory dataset; outputs go into ``output_dir`` (moved in when complete).
        ``epochs``, ``learning_rate`` and ``batch_size`` left out: the config's ``defaults``."""
        given = {"epochs": epochs, "learning_rate": None if learning_rate is None else float(learning_rate),
                 "batch_size": batch_size}
        settings = job_settings(self.config.defaults, {
            "model": model_name, "topics": _topics_text(target_topics),
            **{key: value for key, value in given.items() if value is not None}, "approach": approach,
            "fallback": self.fallback_mode, "output_model": output_model}, source="arguments")
        ds = self._dataset(df, rating_mapping)
        return self._process(ds, settings, Path(output_dir), stem=source_name, staged=True,
                             input_hashes={})

    # --- jobs from files (CLI and daemon) ------------------------------------------------------

    def run_job(self, job: JobInputs) -> tuple[bool, dict]:
        """Process a dataset file (and its mapping file, or an inferred mapping)."""
        return self.execute(self.plan_job(job))

    def plan_job(self, job: JobInputs) -> JobPlan:
        """Load and validate the files and decide the approach; nothing is written yet. The daemon
        uses the plan to run fine-tunes in their own lane, one at a time."""
        from .data.dataset import load_dataset

        stages = _Stages()
        with stages("load"):
            ds = load_dataset(job.csv_path, job.mapping_path, template=job.settings.prompt_template,
                              group_by=self._group_by(job.settings), code_knowledge=job.settings.code_knowledge)
        hashes = _file_hashes(ds)
        log.info("dataset_loaded", file=job.csv_path.name, rows_read=ds.rows_read, rows_used=ds.rows_used,
                 dropped=ds.dropped, mapping_source=ds.mapping.source, columns=list(ds.columns.values()),
                 codes_expanded=ds.code_knowledge.get("codes_expanded"),
                 unknown_codes=ds.code_knowledge.get("unknown_codes"), duration_s=stages.durations["load"])
        return self._plan(ds, job.settings, job.output_dir, stem=job.stem, staged=job.staged,
                          input_hashes=hashes, job=job, stages=stages)

    def _group_by(self, settings: JobSettings) -> str | None:
        """The held-out split's group column: the job's, else ``evaluation.group_by``."""
        return settings.group_by if settings.group_by is not None else self.config.evaluation.group_by

    def _reload(self, plan: JobPlan):
        """The dataset of a plan that dropped it, read again; the files must be the ones planned."""
        from .data.dataset import load_dataset

        job = plan.job
        assert job is not None  # drop_dataset allows files only
        with plan.stages("reload"):
            ds = load_dataset(job.csv_path, job.mapping_path, template=job.settings.prompt_template,
                              group_by=self._group_by(job.settings), code_knowledge=job.settings.code_knowledge)
        now = _file_hashes(ds)
        if now != plan.input_hashes:
            changed = [name for name in ("dataset", "mapping") if now[name] != plan.input_hashes.get(name)]
            raise DatasetError(f"the {' and '.join(changed)} file changed after the job was planned",
                               file=job.csv_path.name,
                               hint="drop the files again as a new job; a claimed job's files must not be edited")
        log.info("dataset_reloaded", rows_used=ds.rows_used, duration_s=plan.stages.durations["reload"])
        return ds

    # --- the pipeline --------------------------------------------------------------------------

    def _plan(self, ds, settings: JobSettings, output_dir: Path, *, stem: str, staged: bool,
              input_hashes: dict, job: JobInputs | None = None, stages: _Stages | None = None) -> JobPlan:
        stages = stages or _Stages()
        meta: dict[str, Any] = {
            "created_at": _utc_now(), "job_id": job.job_id if job else None, "source": ds.source,
            "model": settings.model, "target_topics": prompts.normalize_topics(settings.topics),
            "parameters": dataclasses.asdict(settings),
            "rows": {"read": ds.rows_read, "used": ds.rows_used, "dropped": dict(ds.dropped)},
            "label_distribution": {str(k): v for k, v in ds.label_distribution.items()},
            "mapping": {"source": ds.mapping.source, "inferred": ds.mapping.inferred,
                        "labels": dict(ds.mapping.labels)},
            "warnings": list(ds.warnings), "input_sha256": input_hashes,
            # how a record became its prompt: rating re-uses it, so a model is never fed records
            # formatted differently from its training data
            "prompt_source": dict(ds.prompt_source) or {"kind": "column"},
            "package_versions": package_versions(),
        }
        memory = self._job_memory()
        if not meta["target_topics"]:
            meta["warnings"].append("no topic was given (topics: in the job file, --topics, or defaults.topics): "
                                    "the system prompt asks about \"the target topic\" without naming it")
        for warning in meta["warnings"]:
            # our own texts: counts, column names and row numbers, never a cell value
            log.warning("dataset_warning", warning=warning)
        if (ds.prompt_source or {}).get("template"):
            meta["prompt_template"] = ds.prompt_source["template"]
        # the ICD-10-CM expansion the template carries: the code sets' versions and the counts
        meta["code_knowledge"] = dict(ds.code_knowledge) or {
            "setting": settings.code_knowledge, "expanded": False,
            "reason": "the prompts are the table's prompt column, used as written"}
        approach, reason, report = self._decide(ds, settings, meta, stages, memory)
        meta.update(approach=approach, approach_reason=reason)
        if report is not None:
            meta["capability"] = report.to_dict()
        log.info("approach_selected", approach=approach, reason=reason, model=settings.model,
                 rows_used=ds.rows_used)
        return JobPlan(ds=ds, settings=settings, output_dir=Path(output_dir), stem=stem, staged=staged,
                       input_hashes=input_hashes, job=job, stages=stages, meta=meta, ollama_memory=memory,
                       ollama_modelfile=report.ollama_modelfile if report is not None else None)

    def _process(self, ds, settings: JobSettings, output_dir: Path, *, stem: str, staged: bool,
                 input_hashes: dict) -> tuple[bool, dict]:
        return self.execute(self._plan(ds, settings, output_dir, stem=stem, staged=staged,
                                       input_hashes=input_hashes))

    def execute(self, plan: JobPlan) -> tuple[bool, dict]:
        """Build the outputs of a planned job (training, when planned, holds the job's training lock)."""
        if plan.ds is None:
            plan.ds = self._reload(plan)
        ds, settings, meta, stages = plan.ds, plan.settings, plan.meta, plan.stages
        build_dir, final_dir = outputs.staging(plan.output_dir, plan.staged)
        try:
            approach = plan.approach
            if approach in (FINE_TUNE, HEAD):
                # under auto with fallback on, a failed fine-tune or head becomes a model set
                build, key, reason, what = ((self._fine_tune, "fine_tune_failure", "training_failed",
                                             "fine-tuning failed") if approach == FINE_TUNE else
                                            (self._head, "head_failure", "head_failed", "the head failed"))
                try:
                    build(plan, build_dir)
                except TrainingFailedError as exc:
                    if settings.approach != "auto" or not settings.fallback:
                        raise
                    meta[key] = exc.to_dict()
                    meta.update(approach=MODEL_SET, approach_reason=f"{what}, fell back: {exc.message}")
                    log.warning("fallback_to_model_set", reason=reason, exit_code=exc.exit_code)
                    warnings.warn(f"{what}; fell back to a model set: {exc.message}", UserWarning, stacklevel=3)
                    approach = MODEL_SET
            if approach == MODEL_SET:
                self._write_model_set(plan, build_dir)
            with stages("evaluation"):
                meta["evaluation"] = self._evaluate(plan, build_dir)
                self._quality_gate(plan)
            meta["stage_durations_s"] = stages.durations
            meta["duration_s"] = round(sum(stages.durations.values()), 4)  # work time, not queueing
            meta["artifacts"] = sorted(p.name for p in build_dir.iterdir() if not p.name.startswith("."))
            if names.METADATA not in meta["artifacts"]:
                meta["artifacts"].append(names.METADATA)
            # the library caller gets the paths of this machine; the folder, which is handed on, does not
            outputs.write_metadata(build_dir, portable.scrub_value(meta, _machine_roots(meta, build_dir, final_dir)))
        except UnicodeEncodeError:
            # only an in-memory DataFrame can hold text that is not valid Unicode (lone surrogates)
            if plan.staged:
                outputs.discard(build_dir)
            raise DatasetEncodingError(
                "the text holds characters that cannot be written as UTF-8 (lone surrogates)",
                file=ds.source, hint="clean the text columns (e.g. decode the source with errors='replace')") from None
        except BaseException as exc:
            if plan.staged:
                kept = outputs.discard(build_dir)
                if kept is not None and isinstance(exc, TrainingFailedError):
                    # the log moved with its folder: name it where the user will find it
                    exc.message = exc.message.replace(str(build_dir), str(kept))
                    exc.stderr_path = str(kept / names.TRAINER_STDERR)
            raise
        if plan.staged:
            outputs.publish(build_dir, final_dir)
        log.info("dataset_processed", approach=meta["approach"], rows_used=ds.rows_used,
                 duration_s=meta["duration_s"], output_dir=str(final_dir))
        return True, meta

    def _decide(self, ds, settings: JobSettings, meta: dict, stages: _Stages, memory=None):
        """Returns (approach, reason, capability report or None)."""
        min_rows = self.config.defaults.min_rows
        small = ds.rows_used < min_rows
        if small:
            msg = (f"dataset has {ds.rows_used} usable rows; at least {min_rows} are recommended for "
                   f"fine-tuning")
            meta["warnings"].append(msg)
            if settings.approach == "auto" and not settings.fallback:
                raise DatasetTooSmallWarning(msg + "; add rows, or enable fallback to build a model set")
            warnings.warn(msg, DatasetTooSmallWarning, stacklevel=4)
            log.warning("dataset_too_small", rows_used=ds.rows_used, min_rows=min_rows)
        if settings.approach == MODEL_SET:
            return MODEL_SET, "model_set requested", None
        if settings.approach == HEAD:  # the base weights on disk are all it needs: no Ollama, no training
            return HEAD, "head requested", None
        if small and settings.approach == "auto":
            return MODEL_SET, f"fewer than {min_rows} usable rows", None
        with stages("capability"):
            report = self._cached_capability_report(settings.model, memory)
        if settings.approach == "auto" and auto_choice(report) == HEAD:
            return HEAD, ("auto: the head, the rater that agreed best with the experts on new kinds of records "
                          "in the measurements (approach fine_tune for an Ollama model)"), report
        if report.supported:
            return FINE_TUNE, ("fine_tune requested" if settings.approach == FINE_TUNE
                               else "every capability check passed"), report
        failed = ", ".join(f"{c.name} ({c.detail})" for c in report.failed)
        if settings.approach == FINE_TUNE or not settings.fallback:
            raise FineTuningNotSupportedError(
                f"{settings.model} cannot be fine-tuned here: failed checks: "
                f"{', '.join(c.name for c in report.failed)}",
                report=report, hint=f"see 'fine-tuner check {settings.model}': {failed}")
        return MODEL_SET, f"fine-tuning not possible: {failed}", report

    # --- model set -----------------------------------------------------------------------------

    def _model_set(self, ds, settings: JobSettings, *, stem: str, exclude, input_hashes: dict) -> dict:
        from .data import modelset

        d = self.config.defaults
        try:
            system = prompts.system_prompt(settings.topics, ds.mapping.labels, settings.topic_definition)
            few_shot = modelset.select_few_shot(ds, per_rating=d.few_shot_per_rating,
                                                max_chars=d.few_shot_max_chars, exclude=exclude)
            name = settings.output_model or modelset.ollama_model_name(settings.model, stem)
            return modelset.model_set_config(
                ds=ds, base_model=settings.model, topics=prompts.normalize_topics(settings.topics),
                system=system, few_shot=few_shot, model_name=name,
                defaults={"few_shot_per_rating": d.few_shot_per_rating, "few_shot_max_chars": d.few_shot_max_chars},
                created_at=_utc_now(), input_hashes=input_hashes)
        except UnicodeEncodeError:
            raise  # bad text, not a bug: execute() turns it into DatasetEncodingError
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelSetConfigError(f"could not build the model set: {type(exc).__name__}",
                                      hint="report this with fine_tuning_metadata.json attached") from exc

    def _hold_out(self, plan: JobPlan, build_dir: Path, system: str):
        """Split the rows once per job, the same way for both approaches (``data.holdout``: a set of
        familiar records and, where the rows have groups, a set of new kinds of records; duplicates
        never straddle; no hold-out below ``min_rows``), and write the held-out rows to
        ``validation_data.jsonl`` (familiar first), which only exists when there are some. Returns
        (train positions, validation positions)."""
        from .data import holdout, trainingdata

        ds, d = plan.ds, self.config.defaults
        frame = ds.frame
        groups = frame["group"].to_numpy(dtype=object) if "group" in frame.columns else None
        chosen = holdout.split(frame["prompt"].to_numpy(dtype=object), frame["rating"].to_numpy(), groups,
                               fraction=d.validation_fraction, seed=d.seed, min_rows=d.min_rows)
        train_pos, val_pos = chosen.train, chosen.held_out
        if len(val_pos):
            fsutil.write_lines(build_dir / names.VALIDATION_DATA, trainingdata.jsonl_chunks(ds, val_pos, system))
        plan.validation_positions = frozenset(int(p) for p in val_pos) | frozenset(int(p) for p in chosen.set_aside)
        source_rows = frame["source_row"].to_numpy()
        plan.meta["split"] = {
            "kind": chosen.kind, "train_rows": int(len(train_pos)), "validation_rows": int(len(val_pos)),
            "familiar_rows": int(len(chosen.familiar)), "new_kinds_rows": int(len(chosen.new_kinds)),
            "grouping": dict(ds.grouping), **chosen.info,
            # 1-based data row numbers of the held-out rows, in validation_data.jsonl order
            "validation_source_rows": [int(r) for r in source_rows[val_pos]],
        }
        if "row_id" in frame.columns:  # the records' own ids (Row_ID / C_BioSense_ID), for predictions.csv
            plan.meta["split"]["id_column"] = ds.columns.get("id")
            plan.meta["split"]["validation_ids"] = [str(v) for v in frame["row_id"].to_numpy(dtype=object)[val_pos]]
        if chosen.kind == "none":
            plan.meta["split"]["note"] = (f"no hold-out: fewer than {d.min_rows} usable rows (defaults.min_rows), "
                                          "so every row is used and the model cannot be evaluated on unseen rows")
        else:
            self._fit_baseline(plan, build_dir, train_pos)
        log.info("split_made", kind=chosen.kind, train_rows=int(len(train_pos)),
                 familiar_rows=int(len(chosen.familiar)), new_kinds_rows=int(len(chosen.new_kinds)),
                 group_column=ds.grouping.get("column"), groups=chosen.info.get("groups"),
                 duplicate_rows=chosen.info.get("duplicate_rows"),
                 duplicates_set_aside=chosen.info.get("duplicates_set_aside"))
        return train_pos, val_pos

    def _fit_baseline(self, plan: JobPlan, build_dir: Path, train_pos) -> None:
        """The bag-of-words baseline on exactly the training rows (their prompt text, what the models
        see), saved as ``baseline.json`` for the evaluation to measure beside the models and for
        ``rate --backend baseline``; seconds of work, never skipped when there is a hold-out."""
        import time

        from .quality import baseline

        frame = plan.ds.frame
        texts = [str(t) for t in frame["prompt"].to_numpy(dtype=object)[train_pos]]
        ratings = [int(r) for r in frame["rating"].to_numpy()[train_pos]]
        if len(set(ratings)) < 2:
            plan.meta["baseline"] = {"fitted": False, "reason": "the training rows hold a single rating"}
            return
        started = time.monotonic()
        fitted = baseline.fit(texts, ratings, seed=self.config.defaults.seed)
        fsutil.write_json(build_dir / baseline.FILE, fitted.to_json())
        fit_s = round(time.monotonic() - started, 3)
        plan.meta["baseline"] = {"fitted": True, "file": baseline.FILE, "train_rows": len(texts), "c": fitted.c,
                                 "fit_s": fit_s}
        log.info("baseline_fitted", train_rows=len(texts), c=fitted.c, duration_s=fit_s)

    def _head(self, plan: JobPlan, build_dir: Path) -> None:
        """The head on the base model's hidden states (``quality.head``): the same hold-out as the
        other approaches (and the baseline beside it), then the features child's forward passes over
        the training rows and the choice of layer, pooling and C by cross-validation; stored as
        ``head.json``. Not an Ollama model: it rates through the local backend only."""
        from .quality import head
        from .training import supervisor

        ds, settings, meta, stages, job = plan.ds, plan.settings, plan.meta, plan.stages, plan.job
        t = self.config.training
        with stages("head"):
            system = prompts.system_prompt(settings.topics, ds.mapping.labels, settings.topic_definition)
            train_pos, _ = self._hold_out(plan, build_dir, system)
            base = supervisor.resolve_base_weights(settings.model, self.config.base_models, allow_download=False,
                                                 ollama_models_dir=self.config.ollama.models_dir,
                                                 show_modelfile=plan.ollama_modelfile)
            # a head reads hidden states, never a chat: weights without a chat template will do
            if base.local_dir is None or base.model_type is None:
                raise TrainingFailedError(
                    f"the head needs the base weights of {settings.model} on this machine: "
                    f"{base.problem or 'they are not on disk'}",
                    hint="name a .gguf file or a Hugging Face weights folder under base_models:, or pull the "
                         "model with Ollama on this machine")
            frame = ds.frame
            texts = [str(x) for x in frame["prompt"].to_numpy(dtype=object)[train_pos]]
            ratings = [int(r) for r in frame["rating"].to_numpy()[train_pos]]
            if len(set(ratings)) < 2:
                raise TrainingFailedError("the training rows hold a single rating: a head needs two or more",
                                          hint="add rated rows of the other ratings and resubmit")

            last = [0.0]

            def relay(done: int, total: int) -> None:
                if done < total and time.monotonic() - last[0] < 1.0:  # at most a line a second, and the last
                    return
                last[0] = time.monotonic()
                log.info("head_progress", done=done, total=total)
                if job is not None and job.on_progress is not None:
                    job.on_progress({"step": done, "total_steps": total, "stage": "head",
                                     "percent": round(100.0 * done / total, 1) if total else 100.0})

            lock = job.training_lock if job and job.training_lock is not None else contextlib.nullcontext()
            try:
                with lock:
                    fitted, timings = head.fit_head(
                        base, settings.model, texts, ratings,
                        topics=", ".join(prompts.normalize_topics(settings.topics)),
                        seed=self.config.defaults.seed, timeout_s=t.timeout_s, grace_s=t.grace_s,
                        stop_event=job.stop_event if job else None, on_progress=relay)
            except head.FeaturesError as exc:
                raise TrainingFailedError(f"the head could not be fitted: {exc}",
                                          hint="check that the base weights load (fine-tuner check MODEL), "
                                               "then resubmit") from None
            fsutil.write_json(build_dir / head.FILE, fitted.to_json())
        kappas = [r["kappa"] for r in fitted.cv if r.get("kappa") is not None]
        cv_kappa = round(sum(kappas) / len(kappas), 4) if kappas else None
        meta["head"] = {"file": head.FILE, "layers": fitted.layers, "layers_total": fitted.base["layers_total"],
                        "poolings": fitted.poolings, "members": len(fitted.members), "cv_kappa": cv_kappa,
                        "combined": "the members' probabilities averaged", "train_rows": fitted.train_rows,
                        **timings,
                        "base_weights": _base_weights_record(base),
                        "rates_with": "the local backend: the base model's forward passes, no generation"}
        meta["registration"] = {"registered": False,
                                "reason": "a head is not an Ollama model: it rates through the local backend"}
        log.info("head_fitted", layers=fitted.layers, poolings=fitted.poolings, members=len(fitted.members),
                 cv_kappa=cv_kappa, train_rows=fitted.train_rows, features_s=timings["features_s"],
                 fit_s=timings["fit_s"], dtype=fitted.dtype)

    def _write_model_set(self, plan: JobPlan, build_dir: Path) -> None:
        from .data import modelset
        from .serving import register

        ds, settings, stem, meta, stages = plan.ds, plan.settings, plan.stem, plan.meta, plan.stages
        with stages("model_set"):
            if "split" not in meta:  # a fallback from a fine-tune keeps that job's split
                self._hold_out(plan, build_dir, prompts.system_prompt(settings.topics, ds.mapping.labels,
                                                                     settings.topic_definition))
            exclude = plan.validation_positions  # few-shot examples never come from the hold-out
            config = self._model_set(ds, settings, stem=stem, exclude=exclude, input_hashes=plan.input_hashes)
            config["prompt_source"] = meta["prompt_source"]
            if meta.get("prompt_template"):
                config["prompt_template"] = meta["prompt_template"]
            fsutil.write_json(build_dir / names.MODEL_SET_CONFIG, config)
            fsutil.write_text(build_dir / names.MODELFILE, modelset.modelfile_text(
                base=settings.model, system=config["system_prompt"],
                messages=register.few_shot_messages(config), parameters=config["ollama"]["parameters"]))
        meta["model_set"] = {"model_name": config["ollama"]["model_name"],
                             "few_shot_examples": len(config["few_shot_examples"]),
                             "few_shot_source_rows": [e.get("source_row") for e in config["few_shot_examples"]]}
        log.info("model_set_built", few_shot_examples=len(config["few_shot_examples"]),
                 model_name=config["ollama"]["model_name"])
        with stages("registration"):
            meta["registration"] = self._register(lambda client: register.register_model_set(client, config),
                                                  plan.ollama_memory)

    def _quality_gate(self, plan: JobPlan) -> None:
        """``evaluation.min_kappa`` / ``max_invalid_rate``: a model below the floor does not stay
        registered under its final Ollama name (it is deleted there again), and the job succeeds
        with ``quality_gate: failed``; with ``evaluation.enabled: required`` the job fails."""
        meta = plan.meta
        gate = (meta.get("evaluation") or {}).get("quality_gate")
        if not gate or gate.get("status") == "off":
            if self.config.evaluation.min_kappa is not None or self.config.evaluation.max_invalid_rate is not None:
                meta["quality_gate"] = {"status": "not_checked",
                                        "reason": "the models were not evaluated, so the floor could not be checked"}
                log.warning("quality_gate_not_checked", reason=meta["quality_gate"]["reason"])
            return
        meta["quality_gate"] = dict(gate)
        if gate["status"] == "passed":
            log.info("quality_gate_passed", reason=gate["reason"])
            return
        log.warning("quality_gate_failed", reason=gate["reason"])
        registration = meta.get("registration") or {}
        if registration.get("registered") and registration.get("name"):
            name = registration["name"]
            try:
                with self._ollama_client(memory=plan.ollama_memory) as client:
                    client.delete(name)
            except OllamaError as exc:
                # the model stays under its name: say so everywhere the analyst looks
                meta["quality_gate"]["withdrawn"] = False
                meta["warnings"].append(f"the model did not pass the quality gate but could not be removed from "
                                        f"Ollama ({exc.message}): delete {name} by hand")
                log.warning("model_not_withdrawn", name=name, reason=exc.message)
            else:
                meta["registration"] = {**registration, "registered": False, "withdrawn": True,
                                        "reason": f"quality gate failed: {gate['reason']}"}
                meta["quality_gate"]["withdrawn"] = True
                log.warning("model_withdrawn", name=name, reason="quality_gate_failed")
        if self.config.evaluation.enabled == "required":
            raise EvaluationError(f"the model did not pass the quality gate: {gate['reason']}",
                                  hint="see evaluation.md; add training rows or change the recipe, or lower "
                                       "evaluation.min_kappa / raise evaluation.max_invalid_rate")

    def _evaluate(self, plan: JobPlan, build_dir: Path) -> dict:
        """Measure the job's models on its held-out rows (``evaluation.enabled``): ``auto`` records
        a skip and its reason when no backend can run it, ``required`` fails the job then, ``off``
        does nothing. The report files are written into the job's folder."""
        from .quality import evalreport
        from .quality.heldout import EvaluationSkipped, evaluate_folder
        from .quality.backends import RaterError

        mode = self.config.evaluation.enabled
        if mode == "off":
            return {"status": "off"}
        job = plan.job
        try:
            report = evaluate_folder(build_dir, plan.meta, self.config, backend=self.config.evaluation.backend,
                                     stop_event=job.stop_event if job else None, memory=plan.ollama_memory,
                                     show_modelfile=plan.ollama_modelfile, compare=plan.settings.compare)
        except (EvaluationSkipped, RaterError) as exc:
            status = "skipped" if isinstance(exc, EvaluationSkipped) else "failed"
            reason = exc.reason if isinstance(exc, EvaluationSkipped) else str(exc)
            if mode == "required":
                raise EvaluationError(f"the models could not be evaluated: {reason}",
                                      hint="make a backend available (Ollama with the models, or the base "
                                           "weights on disk with the training extra installed), or set "
                                           "evaluation.enabled to auto") from None
            log.warning("evaluation_skipped", status=status, reason=reason)
            return {"status": status, "reason": reason}
        return evalreport.metadata_summary(report, evalreport.write_report(report, build_dir))

    def _register(self, action: Callable[[Any], dict], memory=None) -> dict:
        """Register under ``ollama.register``; ``memory`` is the job's (see ``_ollama_client``): a
        server the capability check found silent within its TTL fails here at once."""
        from .serving.register import register_with_policy

        mode = self.config.ollama.register
        if mode == "off":
            return register_with_policy(mode, lambda: {})
        memory = memory if memory is not None else self._job_memory()

        def probe_then_register() -> dict:
            if mode == "auto":
                # one attempt first: a server that is simply not running is recorded at once
                # instead of spending the retry budget on every job
                with self._ollama_client(probe=True, memory=memory) as probe:
                    probe.version()
            with self._ollama_client(memory=memory) as client:
                return action(client)

        result = register_with_policy(mode, probe_then_register)
        if result.get("registered"):
            log.info("model_registered", name=result.get("name"), digest=result.get("digest"),
                     check_ok=(result.get("check") or {}).get("ok"))
        else:
            log.warning("model_not_registered", reason=result.get("reason"))
        return result

    # --- fine-tune -----------------------------------------------------------------------------

    def _fine_tune(self, plan: JobPlan, build_dir: Path) -> None:
        from .data import modelset, trainingdata
        from .serving import merge, register
        from .training import supervisor

        ds, settings, stem, meta, stages, job = plan.ds, plan.settings, plan.stem, plan.meta, plan.stages, plan.job
        d, t = self.config.defaults, self.config.training
        system = prompts.system_prompt(settings.topics, ds.mapping.labels, settings.topic_definition)
        with stages("training_data"):
            train_pos, val_pos = self._hold_out(plan, build_dir, system)
            fsutil.write_lines(build_dir / names.TRAINING_DATA, trainingdata.jsonl_chunks(
                ds, train_pos, system, direct=t.answer_forms == "both"))
            base = supervisor.resolve_base_weights(settings.model, self.config.base_models,
                                                 allow_download=t.allow_download,
                                                 ollama_models_dir=self.config.ollama.models_dir,
                                                 show_modelfile=plan.ollama_modelfile)
            validation = names.VALIDATION_DATA if len(val_pos) else None
            cfg = trainingdata.training_config(
                base_model=base.hf_id or supervisor.BASE_MODEL_PLACEHOLDER, dataset_path=names.TRAINING_DATA,
                validation_path=validation, output_dir=OTHER_TRAINER_OUTPUT, training=t,
                epochs=settings.epochs, learning_rate=settings.learning_rate,
                micro_batch_size=settings.batch_size, seed=d.seed)
            fsutil.write_text(build_dir / names.TRAINING_CONFIG,
                              _config_header(settings.model, base.hf_id, base.gguf_path is not None)
                              + yaml.safe_dump(cfg, sort_keys=False))
            fsutil.write_text(build_dir / AXOLOTL_LAUNCHER, AXOLOTL_LAUNCHER_TEXT)
            fsutil.make_executable(build_dir / AXOLOTL_LAUNCHER)
            fsutil.write_json(build_dir / "dataset_info.json",
                              trainingdata.dataset_info(names.TRAINING_DATA, validation))
            # the model set built from the same training rows, measured beside the fine-tune
            comparison = self._model_set(ds, settings, stem=stem, exclude=plan.validation_positions,
                                         input_hashes=plan.input_hashes)
            fsutil.write_json(build_dir / names.COMPARISON_MODEL_SET, comparison)
        log.info("training_data_written", train_rows=len(train_pos), validation_rows=len(val_pos))

        def relay(event: dict) -> None:
            log.info("training_progress", **{k: event.get(k) for k in (
                "step", "total_steps", "epoch", "loss", "eval_loss", "learning_rate", "tokens_per_s",
                "elapsed_s", "eta_s", "percent")})
            if job is not None and job.on_progress is not None:
                job.on_progress(event)

        lock = job.training_lock if job and job.training_lock is not None else contextlib.nullcontext()
        # Early stopping watches the loss on all held-out rows (run_training's default). Watching the
        # new kinds of records alone was measured on Gemma 3 270M: their loss (mostly rationale
        # tokens naming diagnoses never seen) rose in epoch 2 while agreement rose with it, on
        # familiar records from kappa 0.45 to 0.80 and on new kinds from -0.22 to 0.57; it kept the
        # worse epoch.
        with stages("training"), lock:
            result = supervisor.run_training(build_dir, base=base, training=t, timeout_s=t.timeout_s,
                                             on_progress=relay, stop_event=job.stop_event if job else None)
        meta["training"] = dict(result.metrics)
        name = settings.output_model or modelset.ollama_model_name(settings.model, stem, suffix="-ft")
        fmt = turns.turn_format(base.model_type) if base.chat_template else None
        adapter_format = supervisor.adapter_format(base.model_type)
        parameters: dict[str, Any] = {"temperature": 0, **({"stop": list(fmt.stop)} if fmt else {})}
        fsutil.write_text(build_dir / names.MODELFILE, modelset.modelfile_text(
            base=settings.model, system=system, messages=[], parameters=parameters,
            adapter="./adapter/adapter.gguf" if adapter_format == "gguf" else "./adapter",
            template=fmt.ollama if fmt else None))
        meta["fine_tune"] = {"model_name": name, "adapter_dir": names.ADAPTER_DIR, "adapter_format": adapter_format,
                             "answer_forms": t.answer_forms,
                             "base_weights": _base_weights_record(base),
                             "template": base.template}
        schema = prompts.output_schema(ds.mapping.values)
        merged_gguf, merges = build_dir / merge.MERGED_GGUF, []

        def merged() -> dict:
            record = merge.merge_adapter(base.gguf_path, Path(result.adapter_dir) / merge.ADAPTER_GGUF, merged_gguf)
            merges.append(record)
            return {**record, "path": str(merged_gguf)}

        with stages("registration"):
            meta["registration"] = self._register(lambda client: register.register_fine_tune(
                client, merge=self.config.ollama.merge_adapter, merged=merged, name=name, base=settings.model,
                adapter_dir=Path(result.adapter_dir), system=system, parameters=parameters, output_schema=schema,
                adapter_format=adapter_format, template=fmt.ollama if fmt else None), plan.ollama_memory)
        if merges:
            # the Modelfile says what Ollama holds (or would, made from it): FROM the merged file, no ADAPTER
            used = meta["registration"].get("modelfile") or {}
            fsutil.write_text(build_dir / names.MODELFILE, modelset.modelfile_text(
                base=f"./{merge.MERGED_GGUF}", system=system, messages=[],
                parameters=used.get("parameters") or parameters,
                template=used["template"] if "template" in used else fmt.ollama if fmt else None))


def _machine_roots(meta: dict, build_dir: Path, final_dir: Path) -> dict[str, str]:
    """The folders of this machine a job's metadata can name, and what the published copy says
    instead: the job folder is ``.``, its siblings (a kept ``failed-*`` folder) are under ``..``."""
    from .training.supervisor import hf_cache_dir

    facts = (meta.get("capability") or {}).get("facts") or {}
    return portable.machine_roots([build_dir, final_dir], {
        "..": final_dir.parent, "<base weights>": facts.get("weights_dir"), "<hf cache>": hf_cache_dir()})


def auto_choice(report: CapabilityReport) -> str:
    """What ``approach: auto`` builds for a dataset of at least ``min_rows`` rows, given the model's
    capability report: the head when it can be fitted here (the training extra installed and the
    base weights on disk: a GGUF Ollama serves or a weights folder; no Ollama, download or GPU
    needed), else a fine-tune when every required check passes, else a model set (with fallback on)."""
    packages = next((c for c in report.checks if c.name == "trainer_packages"), None)
    if packages and packages.ok and report.facts.get("weights_dir") and report.facts.get("model_type"):
        return HEAD
    return FINE_TUNE if report.supported else MODEL_SET


def _base_weights_record(base: Any) -> Any:
    """What the metadata says of the base weights: for a GGUF, which file (by name and sha256), its
    quantization and architecture, and that the adapter was trained on exactly those weights."""
    if base.gguf_path is None:
        return base.hf_id or "a local weights folder (base_models)"
    return {"source": base.source, "gguf_file": Path(base.gguf_path).name, "gguf_sha256": base.gguf_sha256,
            "quantization": base.quantization, "architecture": base.model_type, "found_by": base.found_by,
            "trained_against": "the dequantized weights of this GGUF file: exactly the weights Ollama "
                               "serves, so the adapter matches the base it is attached to"}


def _config_header(model: str, hf_id: str | None, gguf: bool = False) -> str:
    """The comment on top of training_config.yaml: how to run it elsewhere, what to put in
    base_model when no Hugging Face id is known for the weights, and how to get one merged GGUF."""
    header = (
        "# This fine-tune's recipe under axolotl's key names, to run the same training on a bigger machine:\n"
        "# copy this whole folder there and, from inside it, run  axolotl train training_config.yaml\n"
        "# (axolotl finds the dataset files relative to the working directory; from anywhere else run\n"
        f"# sh <this folder>/{AXOLOTL_LAUNCHER} train). The adapter goes to {OTHER_TRAINER_OUTPUT}/.\n")
    if hf_id is None:
        header += (
            f"# base_model: no Hugging Face id is known for the weights of {model}. Before running this\n"
            "# file elsewhere, put their Hugging Face id (e.g. meta-llama/Llama-3.2-1B-Instruct) or the\n"
            "# path of a copy of the weights folder there.\n")
    header += (
        "# One merged GGUF instead of base + adapter: llama.cpp's export-lora applies adapter/adapter.gguf\n"
        "# to the base GGUF,  llama-export-lora -m <base>.gguf --lora adapter/adapter.gguf -o merged.gguf\n"
        + ("#   (the base GGUF is the file Ollama serves: fine_tuning_metadata.json names it and its sha256)\n"
           if gguf else "#   (convert the base weights first: python convert_hf_to_gguf.py <weights folder>)\n"))
    return header


def _topics_text(topics) -> str:
    return ", ".join(prompts.normalize_topics(topics))
