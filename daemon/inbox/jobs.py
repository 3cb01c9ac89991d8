"""Running one claimed job, whatever its kind: the job runner the pool and the training lane call.

``JobRunner.run(claim)`` (a pool worker) reads the job file once, picks the job's kind and runs it:

* a **build** job (the default) checks for a duplicate and a poison job, then plans (load,
  validate, decide the approach); a model set is built on the same worker, a fine-tune is handed
  to the training lane (``run_planned``), which executes it under the machine-wide training lock;
* a **rating** job (``task: rate`` in the job file) rates the dataset with an existing model;
* a **retrain** job (``task: retrain``) adds a reviewed file's expert ratings to its topic's training
  rows (``topicrows``) and builds the topic's model again on the union, as a build job does.

Every job that builds a model records the rows it trained on for its topic (journal + rows file).

Every kind ends the same way: outputs built in ``outputs/.tmp-<job_id>`` and published, the
journal updated, the inputs moved to ``processed/`` or ``failed/`` (with ``error.json``) and one
``job_finished`` line. While it runs, its progress events go to the journal for ``status``
(``progress``). Each job has its own ``JobStop``: the service stopping gives the job back to the
queue, ``fine-tuner cancel`` (``cancel``) fails it as cancelled: its partial outputs are removed,
its inputs kept in ``failed/``. ``_guarded`` is the one broad handler per job: a full disk gives the job back
for the next rescan, anything else unexpected fails it as a crash, and if even that cannot be
recorded the claim is left to recovery. The pool, the lane and the service loop know nothing of
kinds; this module knows nothing of the inbox beyond its claim folders.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from ..config import Config, ConfigError
from ..data.jobsettings import JOB_FILE_HINT, job_settings, read_job_file
from ..errors import DatasetTooSmallWarning, FineTunerError, JournalError, TrainingInterruptedError
from ..fsutil import make_dir_like_parent, publish_dir
from .drops import Claim, escape_name, finish_claim
from . import progress
from .journal import Journal, JobRecord, utc_now
from .lane import TrainingLane, machine_lock
from ..logconfig import get_logger, job_log
from .paths import TRAINING_LOCK, Paths

log = get_logger("jobs")


@dataclass
class JobContext:
    """What a job needs from the service: where things are, the journal, the current
    configuration (it changes on SIGHUP), the stop event and the training lane."""

    paths: Paths
    journal: Journal
    config: Callable[[], Config]
    job_stop: threading.Event  # set at shutdown: a long job gives its claim back
    job_done: Callable[[str], None]  # tells the loop a job left the lane
    lane: TrainingLane | None = None


@dataclass
class Planned:
    """A planned fine-tune handed from a pool worker to the training lane."""

    claim: Claim
    plan: Any  # fine_tuner.JobPlan
    build: Path
    attempt: int
    started: float  # monotonic time the job started on the pool (job_finished's duration_s)


class JobStop:
    """What stops one job: the service stopping (``shutdown``: the job goes back to the queue) or a
    cancel (``cancelled``: the job fails as cancelled). It answers ``is_set`` and ``wait`` like the
    ``threading.Event`` that training, evaluation and rating listen to."""

    POLL_S = 0.1

    def __init__(self, shutdown: threading.Event) -> None:
        self.shutdown = shutdown
        self.cancelled = threading.Event()

    def is_set(self) -> bool:
        return self.shutdown.is_set() or self.cancelled.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_set():
            left = self.POLL_S if deadline is None else min(self.POLL_S, deadline - time.monotonic())
            if left <= 0:
                break
            self.cancelled.wait(left)
        return self.is_set()


CANCELLED_HINT = "its inputs are kept here; run 'fine-tuner retry JOB_ID' to run it again"


class JobRunner:
    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self._fine_tuner = None
        self._fine_tuner_cfg: Config | None = None
        self._stops: dict[str, JobStop] = {}  # the jobs this runner holds, from start to end
        self._retrains: dict[str, Any] = {}  # job id -> its topicrows.Retrain, from planning to the end
        self._stops_lock = threading.Lock()

    @property
    def cfg(self) -> Config:
        return self.ctx.config()

    @property
    def journal(self) -> Journal:
        return self.ctx.journal

    @property
    def paths(self) -> Paths:
        return self.ctx.paths

    def _fine_tuner_instance(self):
        cfg = self.cfg
        if self._fine_tuner is None or self._fine_tuner_cfg is not cfg:  # a reload makes a new one
            from ..fine_tuner import FineTuner
            self._fine_tuner, self._fine_tuner_cfg = FineTuner(config=cfg), cfg
        return self._fine_tuner

    # --- entry points ----------------------------------------------------------------------------

    def run(self, claim: Claim) -> None:
        """A pool worker's job: run it to its end, or hand it to the training lane."""
        started = time.monotonic()
        self._hold(claim.job_id)
        status = None
        try:
            with structlog.contextvars.bound_contextvars(job_id=claim.job_id):
                status = self._guarded(claim, lambda: self._start(claim, started))
                if status is not None:  # None: handed to the training lane, which closes the job
                    log.info("job_finished", status=status, duration_s=round(time.monotonic() - started, 3))
        finally:
            if status is not None:
                self._release(claim.job_id)

    def run_planned(self, item: Planned) -> None:
        """The training lane's job: execute a planned fine-tune under the machine-wide lock."""
        job_id = item.claim.job_id
        try:
            with structlog.contextvars.bound_contextvars(job_id=job_id):
                status = self._guarded(item.claim, lambda: self._training_phase(item))
                log.info("job_finished", status=status, duration_s=round(time.monotonic() - item.started, 3))
        finally:
            self._release(job_id)
            self.ctx.job_done(job_id)

    def give_back_planned(self, item: Planned) -> None:
        """Shutdown: a fine-tune still waiting for the lane goes back unstarted."""
        with structlog.contextvars.bound_contextvars(job_id=item.claim.job_id):
            self.give_back(item.claim, item.build)
            log.info("job_finished", status="queued", duration_s=round(time.monotonic() - item.started, 3))
        self._release(item.claim.job_id)

    # --- cancelling ------------------------------------------------------------------------------

    def _hold(self, job_id: str) -> JobStop:
        with self._stops_lock:
            return self._stops.setdefault(job_id, JobStop(self.ctx.job_stop))

    def _release(self, job_id: str) -> None:
        with self._stops_lock:
            self._stops.pop(job_id, None)
            retrain = self._retrains.pop(job_id, None)
        if retrain is not None:  # the union's scratch files: its rows are kept in the topic's rows file
            shutil.rmtree(retrain.csv_path.parent, ignore_errors=True)

    def stop_of(self, job_id: str) -> JobStop:
        with self._stops_lock:
            return self._stops.get(job_id) or JobStop(self.ctx.job_stop)

    def cancel(self, job_id: str) -> bool:
        """Tell a job this runner holds to stop as cancelled (it ends itself: training stops its
        child, rating and evaluation stop asking). False when this runner does not hold it."""
        with self._stops_lock:
            stop = self._stops.get(job_id)
        if stop is None:
            return False
        stop.cancelled.set()
        return True

    def cancel_claim(self, claim: Claim) -> None:
        """A claimed job that has not started is dropped to ``failed/`` as cancelled."""
        with structlog.contextvars.bound_contextvars(job_id=claim.job_id):
            self._cancelled(claim, None)
            log.info("job_finished", status="failed", duration_s=0.0)

    def cancel_planned(self, item: Planned) -> None:
        """A fine-tune waiting for the training lane is dropped to ``failed/`` as cancelled."""
        with structlog.contextvars.bound_contextvars(job_id=item.claim.job_id):
            self._cancelled(item.claim, item.build)
            log.info("job_finished", status="failed", duration_s=round(time.monotonic() - item.started, 3))
        self._release(item.claim.job_id)
        self.ctx.job_done(item.claim.job_id)

    def _cancelled(self, claim: Claim, build: Path | None) -> str:
        """Fail the job as cancelled: partial outputs removed (its log kept with the inputs)."""
        log.info("job_cancelled")
        record = self.journal.get(claim.job_id)
        self._fail(claim, {"error_type": "JobCancelled", "reason": "cancelled",
                           "message": "the job was cancelled with fine-tuner cancel",
                           "hint": CANCELLED_HINT.replace("JOB_ID", claim.job_id)},
                   attempts=record.attempts if record else 0, build=build)
        self.journal.add_event(claim.job_id, "cancelled")
        return "failed"

    def give_back(self, claim: Claim, build: Path, *, keep_build: bool = False) -> str:
        """Shutdown: the job goes back to the queue, its attempt not counted; inputs stay in .work/.
        ``keep_build``: a rating's part file stays, so that the next start resumes from it."""
        if not keep_build:
            shutil.rmtree(build, ignore_errors=True)
        self.journal.requeue(claim.job_id, give_back_attempt=True)
        claim.release()
        log.info("job_requeued", reason="shutdown")
        return "queued"

    def move_inputs(self, claim: Claim, destination: Path, *, note: tuple[str, dict] | None = None) -> Path | None:
        """Move a finished job's inputs on. When that fails (a full disk, ``processed/`` replaced by
        a file or a link) the job's recorded outcome stands: the claim is released and recovery
        moves the inputs at a later rescan, so a success never turns into a failure."""
        job_id = claim.job_id
        try:
            target = finish_claim(claim, destination, note=note)
        except OSError as exc:
            claim.release()
            log.error("input_move_failed", job_id=job_id, to=str(destination), **os_error_fields(exc),
                      hint="the inputs stay in inbox/.work/ and are moved at the next rescan")
            return None
        log.info("input_moved", job_id=job_id, to=str(target))
        return target

    def duplicate_note(self, record: JobRecord) -> dict:
        outputs = self.paths.output_folder(record.output_path)
        return {"job_id": record.id, "duplicate_of": record.duplicate_of,
                "outputs": str(outputs) if outputs else None, "recorded_at": utc_now(),
                "hint": "this content was processed before; add force: true to a job file to redo it"}

    # --- the one broad handler per job -----------------------------------------------------------

    def _guarded(self, claim: Claim, phase: Callable[[], str | None]) -> str | None:
        """Run one phase of a job under the one broad handler per job. A full disk gives the job
        back (recovery retries it at the next rescan, so it resumes by itself once space returns);
        anything else is a bug, recorded as a failure. If even that cannot be recorded, the claim
        is left to recovery."""
        try:
            return phase()
        except Exception as exc:
            build = self.paths.outputs / f".tmp-{claim.job_id}"
            try:
                if disk_full(exc):
                    return self._retry_later(claim, build, exc)
                # the exception text may quote data, so only its type and the frames are logged
                log.error("job_crashed", error_type=type(exc).__name__, frames=frames(exc))
                self._fail(claim, {"error_type": type(exc).__name__,
                                   "message": "an internal error stopped this job",
                                   "hint": "report this with the job id; the service log has the "
                                           "traceback locations; drop the files again to retry"},
                           build=build)
                return "failed"
            except Exception as again:
                if disk_full(again):
                    return self._retry_later(claim, build, again)
                log.error("job_not_recorded", error_type=type(again).__name__, frames=frames(again),
                          hint="the job stays in inbox/.work/ and is taken up at the next rescan")
                claim.release()
                return "queued"

    def _retry_later(self, claim: Claim, build: Path, exc: BaseException) -> str:
        """The disk (or the journal's disk) is full: drop the partial build, give the attempt back
        and leave the claim to recovery, which retries it at every rescan until there is space."""
        shutil.rmtree(build, ignore_errors=True)
        with contextlib.suppress(JournalError, OSError):
            self.journal.requeue(claim.job_id, give_back_attempt=True)
        claim.release()
        log.error("job_requeued", reason="disk_full", **os_error_fields(exc),
                  hint="free space; the job is retried at the next rescan")
        return "queued"

    # --- every kind: duplicate and poison checks, a build folder, the kind's work ----------------

    def _start(self, claim: Claim, started: float) -> str | None:
        """Duplicate and poison checks, then the job's kind runs (pool worker)."""
        job_id = claim.job_id
        record = self.journal.get(job_id)
        assert record is not None
        job_values, job_error = self._job_values(claim)
        if job_values.get("force") is not True:
            earlier = self.journal.success_for(record.content_key)
            if earlier is not None and earlier.id != job_id:
                self.journal.mark_duplicate(job_id, of=earlier)
                record = self.journal.get(job_id) or record
                log.info("job_duplicate", duplicate_of=earlier.id,
                         outputs=str(self.paths.output_folder(earlier.output_path)))
                # an attempt killed while building leaves a partial build; a duplicate has no outputs
                shutil.rmtree(self.paths.outputs / f".tmp-{job_id}", ignore_errors=True)
                self.move_inputs(claim, self.paths.processed, note=("duplicate.json", self.duplicate_note(record)))
                return "duplicate"
        if self.journal.requests().get(job_id) == "cancel":  # asked while it waited, or before a restart
            return self._cancelled(claim, self.paths.outputs / f".tmp-{job_id}")
        if record.attempts >= self.cfg.watch.max_attempts:
            self._fail(claim, {
                "error_type": "PoisonJobError",
                "message": f"the service stopped while processing this job {record.attempts} times",
                "hint": "look in the service log for what killed it (memory, a crash) around these "
                        "times; drop the files again to retry"}, attempts=record.attempts,
                build=self.paths.outputs / f".tmp-{job_id}")  # the last killed attempt's partial build
            return "failed"
        attempt = self.journal.start(job_id)
        build = self.paths.outputs / f".tmp-{job_id}"
        rate = job_error is None and job_values.get("task") == "rate"
        if build.exists() and not rate:  # a partial build from an attempt that crashed
            shutil.rmtree(build)  # (a rating keeps its part file: it resumes from it)
        make_dir_like_parent(build)  # private, or shared like outputs/ (paths.group)
        if rate:
            return self._rate(claim, build, attempt, job_values)
        return self._build(claim, build, attempt, started, job_values, job_error)

    @staticmethod
    def _job_values(claim: Claim) -> tuple[dict, ConfigError | None]:
        """The job file's values (read once, on the worker), or the error that fails the job."""
        job_file = claim.files.get("job")
        if not job_file:
            return {}, None
        try:
            return dict(read_job_file(claim.path / job_file)), None
        except ConfigError as exc:
            return {}, exc

    # --- build jobs: a model set or a fine-tune ----------------------------------------------------

    def _build(self, claim: Claim, build: Path, attempt: int, started: float, job_values: dict,
               job_error: ConfigError | None) -> str | None:
        """Load, validate and decide; a model set is built here, a fine-tune goes to the lane."""
        from ..fine_tuner import FINE_TUNE

        from .topicrows import NothingNew

        error: dict | None = None
        nothing_new: NothingNew | None = None
        with self._observed(build, claim.job_id):
            log.info("job_started", attempt=attempt, files=names(claim),
                     **({"task": "retrain"} if job_values.get("task") == "retrain" else {}))
            try:
                if job_error is not None:
                    raise job_error
                plan = self._plan(claim, build, job_values)
            except (FineTunerError, DatasetTooSmallWarning) as exc:
                error = error_fields(exc)
            except NothingNew as exc:
                nothing_new = exc
        if error is not None:
            self._fail(claim, error, attempts=attempt, build=build)
            return "failed"
        if nothing_new is not None:
            return self._nothing_new(claim, build, nothing_new)
        if plan.approach == FINE_TUNE:
            self.journal.await_training(claim.job_id)
            plan.drop_dataset()  # a queued fine-tune may wait for hours; the lane reads the files again
            return self._hand_to_training(Planned(claim, plan, build, attempt, started))
        return self._execute(claim, plan, build, attempt)

    def _plan(self, claim: Claim, build: Path, values: dict):
        from ..fine_tuner import JobInputs

        settings = self._settings(claim, values)
        mapping = claim.files.get("mapping") or claim.files.get("default_mapping")
        csv_path = claim.path / claim.files["dataset"]
        mapping_path = claim.path / mapping if mapping else None
        retrain = None
        from . import topicrows

        lone_review = not claim.files.get("job") and topicrows.is_reviewed_file(csv_path)
        if settings.task == "retrain" or lone_review:  # a needs_review.csv sent back on its own: a retrain
            topic = values.get("topic") or settings.topics
            retrain = topicrows.prepare_retrain(
                self.journal, self.paths, self.cfg, job_id=claim.job_id,
                topic=topicrows.lone_topic(self.journal, topic) if lone_review else topic, reviewed=csv_path,
                # the default mapping is the configuration's; the topic's model brings its own
                mapping_path=claim.path / claim.files["mapping"] if claim.files.get("mapping") else None,
                values=values)
            with self._stops_lock:
                self._retrains[claim.job_id] = retrain
            csv_path, mapping_path, settings = retrain.csv_path, retrain.mapping_path, retrain.settings
            log.info("retrain_prepared", topic=retrain.topic, **retrain.counts)
        inputs = JobInputs(csv_path=csv_path, mapping_path=mapping_path,
                           settings=settings, output_dir=build,
                           stem=escape_name(Path(claim.files["dataset"]).stem),
                           job_id=claim.job_id, stop_event=self.stop_of(claim.job_id))
        plan = self._fine_tuner_instance().plan_job(inputs)
        if retrain is not None:
            plan.meta["retrain"] = {"topic": retrain.topic, **retrain.counts}
        return plan

    def _nothing_new(self, claim: Claim, build: Path, nothing: Any) -> str:
        """A reviewed file that adds nothing to its topic's rows builds no model: the job is a
        duplicate of the job whose rows it would have started from."""
        earlier = self.journal.get(nothing.base_job)
        assert earlier is not None
        shutil.rmtree(build, ignore_errors=True)
        self.journal.mark_duplicate(claim.job_id, of=earlier)
        record = self.journal.get(claim.job_id)
        assert record is not None
        log.info("job_duplicate", duplicate_of=earlier.id, reason="no_new_reviewed_rows", **nothing.counts)
        note = {**self.duplicate_note(record), "counts": nothing.counts,
                "hint": "every reviewed row is already among the topic's training rows with the same rating"}
        self.move_inputs(claim, self.paths.processed, note=("duplicate.json", note))
        return "duplicate"

    def _settings(self, claim: Claim, values: dict):
        """The job's settings: its job file's values over the configuration's defaults. An error
        in them is the job file's to fix (the hint says so), not the configuration's."""
        job_file = claim.files.get("job")
        try:
            return job_settings(self.cfg.defaults, values,
                                source=escape_name(job_file) if job_file else "the configuration's defaults")
        except ConfigError as exc:
            if job_file:
                exc.hint = JOB_FILE_HINT
            raise

    def _hand_to_training(self, item: Planned) -> str | None:
        assert self.ctx.lane is not None
        ahead = self.ctx.lane.submit(item)
        if ahead is None:  # planned while the service was stopping
            return self.give_back(item.claim, item.build)
        log.info("job_waiting_for_training", jobs_ahead=ahead)
        with contextlib.suppress(JournalError):
            self.journal.set_progress(item.claim.job_id, f"waiting for training ({ahead} ahead)")
        return None

    def _training_phase(self, item: Planned) -> str:
        stop = self.stop_of(item.claim.job_id)
        with machine_lock(self.paths.state_dir / TRAINING_LOCK, stop) as held:
            if stop.cancelled.is_set():
                return self._cancelled(item.claim, item.build)
            if not held:  # stopped while another daemon was training
                return self.give_back(item.claim, item.build)
            self.journal.resume(item.claim.job_id)
            return self._execute(item.claim, item.plan, item.build, item.attempt,
                                 waited_s=round(time.monotonic() - item.started, 3))

    def _execute(self, claim: Claim, plan: Any, build: Path, attempt: int, waited_s: float | None = None) -> str:
        """Build the outputs, publish them, record the result and move the inputs."""
        job_id = claim.job_id
        error: dict | None = None
        interrupted = False
        ok, metadata = False, {}
        with self._observed(build, job_id):
            if waited_s is not None:
                log.info("training_lane_started", waited_s=waited_s, attempt=attempt)
            try:
                ok, metadata = self._fine_tuner_instance().execute(plan)
            except TrainingInterruptedError:
                interrupted = True
            except (FineTunerError, DatasetTooSmallWarning) as exc:
                error = error_fields(exc)
        if interrupted:
            if self.stop_of(job_id).cancelled.is_set():
                return self._cancelled(claim, build)
            return self.give_back(claim, build)
        if error is not None:
            self._fail(claim, error, attempts=attempt, build=build)
            return "failed"
        if not ok:
            self._fail(claim, {"error_type": "JobFailedError", "message": "the job did not complete",
                               "hint": "see job.log next to this file"}, attempts=attempt, build=build)
            return "failed"
        return self._succeed(claim, build, approach=metadata.get("approach"),
                             training=self._training_rows(claim, plan, metadata))

    def _training_rows(self, claim: Claim, plan: Any, metadata: dict):
        """The rows the job's model was trained on, for its topic: their content added to the
        topic's rows file now, their keys recorded in the journal with the job's success. None for
        a job without a topic."""
        from . import topicrows

        with self._stops_lock:
            retrain = self._retrains.get(claim.job_id)
        topic = retrain.topic if retrain is not None else topicrows.job_topic(metadata)
        if not topic or plan.ds is None or plan.job is None:
            return None
        rows = topicrows.with_origins(topicrows.rows_of(plan.ds, plan.job.csv_path), retrain)
        training = topicrows.training_set(topic, rows, retrain.counts if retrain is not None else None)
        topicrows.keep_rows(self.paths, topic, rows)
        log.info("training_rows_recorded", topic=topic, rows=len(training.rows),
                 **{k: v for k, v in training.counts.items() if k not in ("base_job", "rows")})
        return training

    # --- rating jobs: rate the dataset with a built model -----------------------------------------

    def _rate(self, claim: Claim, build: Path, attempt: int, values: dict) -> str:
        """Rate the dropped records into ``ratings.csv`` + ``rating_summary.json``. A stopped or
        killed run resumes from its part file in the build folder."""
        from ..quality import ratefile, raterequest

        summary: dict = {}
        error: dict | None = None
        with self._observed(build, claim.job_id):
            log.info("job_started", attempt=attempt, files=names(claim), task="rate")
            try:
                settings = self._settings(claim, values)
                model = self._rating_model(claim, settings)
                summary = ratefile.rate_file(model, claim.path / claim.files["dataset"], build / "ratings.csv",
                                           self.cfg, backend=self.cfg.evaluation.backend,
                                           stop_event=self.stop_of(claim.job_id))
                summary = raterequest.finish(model, summary, claim.path / claim.files["dataset"],
                                             build / "ratings.csv", settings, self.cfg, build / ratefile.SUMMARY_FILE,
                                             stop_event=self.stop_of(claim.job_id))
            except (FineTunerError, DatasetTooSmallWarning) as exc:
                error = error_fields(exc)
        if error is not None:
            self._fail(claim, error, attempts=attempt, build=build)
            return "failed"
        if summary.get("status") != "done":
            if self.stop_of(claim.job_id).cancelled.is_set():
                return self._cancelled(claim, build)
            return self.give_back(claim, build, keep_build=True)  # the service is stopping: resume later
        return self._succeed(claim, build, approach="rate")

    def _rating_model(self, claim: Claim, settings):
        """The job's model (``raterequest.rating_model``, as for ``fine-tuner rate``): the topic's
        current model, an output folder of this service (``outputs/<job_id>`` or the bare job id:
        its prompt, few-shot turns, template, mapping and Ollama name come from it), else an Ollama
        model name with the drop's (or the configuration's) mapping and the job's settings."""
        from ..quality import raterequest

        job_file = claim.files.get("job")
        mapping = claim.files.get("mapping") or claim.files.get("default_mapping")

        def current_folder(topic: str) -> Path:
            from .control import current_model_folder

            # the service's own journal: a second one on the same file in this process could cost
            # the service its locks on it (see Journal._check_file)
            return current_model_folder(self.cfg, topic, journal=self.journal)

        return raterequest.rating_model(
            settings, self.cfg, outputs=self.paths.outputs, mapping=claim.path / mapping if mapping else None,
            current_folder=current_folder, ask_mapping="drop NAME.mapping.json with the job or set defaults.mapping",
            source=escape_name(job_file) if job_file else None, hint=JOB_FILE_HINT)

    # --- every kind's end ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _observed(self, build: Path, job_id: str):
        """The job's lines copied into its ``job.log``, its progress into the journal."""
        with (job_log(build / "job.log", job_id, self._log_roots(build, job_id)),
              progress.recording(self.journal, job_id)):
            yield

    def _log_roots(self, build: Path, job_id: str) -> dict[str, str]:
        """What job.log, which is published with the outputs, says instead of this machine's
        folders: ``.`` for the job's folder, ``<root>`` for the daemon's root (the inbox, the
        outputs and the state folder are under it in a default setup)."""
        from ..portable import machine_roots

        return machine_roots([build, self.paths.outputs / job_id], {"<root>": self.paths.root})

    def _succeed(self, claim: Claim, build: Path, *, approach: str | None, training: Any = None) -> str:
        job_id = claim.job_id
        final = publish_dir(build, self.paths.outputs / job_id)
        self.journal.succeed(job_id, output_path=self.paths.recorded_output(final), approach=approach,
                             training=training)
        # the job's own log ends with its outcome too
        with job_log(final / "job.log", job_id, self._log_roots(build, job_id)):
            log.info("job_succeeded", approach=approach, outputs=str(final))
        self.move_inputs(claim, self.paths.processed)
        return "succeeded"

    def _fail(self, claim: Claim, error: dict, *, attempts: int | None = None, build: Path | None = None) -> None:
        job_id = claim.job_id
        record = self.journal.get(job_id)
        error = {**error, "job_id": job_id,
                 "attempts": attempts if attempts is not None else (record.attempts if record else 0),
                 "failed_at": utc_now()}
        if build is not None and build.exists():
            # keep the job's log and the trainer's stderr with its inputs (error.json points at the
            # latter); the rest of a failed build is not an output
            for name in ("job.log", "trainer_stderr.log"):
                with contextlib.suppress(FileNotFoundError):
                    os.rename(build / name, claim.path / name)
                    if name == "trainer_stderr.log":
                        error["stderr_path"] = name  # beside error.json in failed/<job_id>/
                        # the message names the file where the user will find it, not the build
                        error["message"] = str(error.get("message", "")).replace(
                            str(build / name), str(self.paths.failed / job_id / name))
            shutil.rmtree(build, ignore_errors=True)
        self.journal.fail(job_id, error)
        kept_log = claim.path / "job.log"
        with job_log(kept_log, job_id) if kept_log.exists() else contextlib.nullcontext():
            log.warning("job_failed", error_type=error.get("error_type"), message=error.get("message"),
                        hint=error.get("hint"), attempts=error["attempts"])
        self.move_inputs(claim, self.paths.failed, note=("error.json", error))


# --- log and error fields (never an exception's text: it may quote data) -----------------------

def frames(exc: BaseException) -> list[str]:
    """Where an exception came from, without its text (which may quote data)."""
    return [f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in traceback.extract_tb(exc.__traceback__)]


def os_error_fields(exc: BaseException) -> dict:
    """Log fields for an OS or journal error: its type and errno (a journal error's short reason,
    which describes the file, never a row), never an OS error's text."""
    if isinstance(exc, JournalError):
        return {"error_type": type(exc).__name__, "reason": exc.reason, "disk_full": exc.disk_full}
    return {"error_type": type(exc).__name__, "errno": getattr(exc, "errno", None)}


def disk_full(exc: BaseException) -> bool:
    """A write failed for lack of space (the outputs' disk, or the journal's)."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, JournalError) and bool(getattr(exc, "disk_full", False))


def names(claim: Claim) -> list[str]:
    return sorted(escape_name(n) for n in claim.files.values())


def error_fields(exc: BaseException) -> dict:
    """error.json fields for an expected job failure."""
    if isinstance(exc, FineTunerError):
        return exc.to_dict()
    return {"error_type": type(exc).__name__, "message": str(exc),
            "hint": "add rows, or enable fallback to build a model set"}
