"""The inbox daemon's main loop: start-up recovery, claiming, workers, the training lane, signals,
sd_notify, status.

``run(cfg)`` owns the state: the watcher thread only posts hints and worker threads post "done"; the
loop re-stats hinted files, scans the inbox at start-up / after an event overflow / every
``rescan_s``, claims complete drops (see ``daemon.inbox``), hands them to ``watch.workers`` worker
threads, and keeps systemd informed (``READY=1`` after recovery, ``STATUS=`` with queue counts,
``WATCHDOG=1`` at half ``WATCHDOG_USEC``). One job: on a pool worker, duplicate and poison checks →
``FineTuner.plan_job`` (load, validate, decide); a model-set plan is executed on the same worker, a
fine-tune plan waits (journal: ``queued`` with approach ``fine_tune``) for the single training-lane
thread, so that a long training never blocks the pool and only one trains at a time.
``FineTuner.execute`` builds into ``outputs/.tmp-<job_id>`` (with ``job.log``, appended to by both
phases and closed by the ``job_succeeded`` / ``job_failed`` line) → publish ``outputs/<job_id>`` →
journal → the work folder is renamed into
``processed/<job_id>`` or ``failed/<job_id>`` (with ``error.json``); one ``job_finished`` line closes
each job, from whichever thread ends it. Recovery takes up claim folders whose owner died: finished
ones are moved on, the rest retried until ``max_attempts``. Signals only set events: SIGTERM/SIGINT
stop claiming, give the training job and the fine-tunes waiting for it back to the queue (attempt
not counted, inputs stay claimed in ``.work/``), let running model-set jobs finish (up to
``stop_timeout_s``), exit 0; a second one exits at once; SIGHUP reloads the configuration (paths
stay as they are).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import queue
import shutil
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from . import __version__
from .config import Config, ConfigError, job_settings, load_config, printable, read_job_file
from .errors import DatasetTooSmallWarning, FineTunerError, JournalError, TrainingInterruptedError
from .fsutil import make_private_dir, publish_dir
from .inbox import (
    RESCAN,
    REFUSAL_MESSAGES,
    Claim,
    Drop,
    InboxTracker,
    InboxWatcher,
    abandoned_claims,
    claim_drop,
    content_key,
    escape_name,
    finish_claim,
    hash_claim,
    name_claim,
    orphans,
    refuse,
    CLAIM_PREFIX,
)
from .journal import InputFile, Journal, JobRecord, utc_now
from .logconfig import get_logger, job_log
from .notify import Notifier

log = get_logger("service")

JOURNAL_NAME = "journal.sqlite3"
TRAINING_LOCK = "training.lock"
TICK_S = 0.25  # the longest the loop sleeps: bounds signal, watchdog and settle latency
ONCE_RESCAN_S = 0.5  # --once has no watcher: it lists the inbox this often (not every tick)
EXIT_OK = 0
EXIT_SECOND_SIGNAL = 1
# Signals this close to the first are the same request: make forwards a terminal's SIGINT or
# `timeout`'s SIGTERM to a process group, so the daemon often gets two at once.
SAME_REQUEST_S = 1.0


@dataclass(frozen=True)
class Paths:
    root: Path
    inbox: Path
    outputs: Path
    processed: Path
    failed: Path
    work: Path
    state_dir: Path

    @property
    def journal(self) -> Path:
        return self.state_dir / JOURNAL_NAME


def resolve_paths(cfg: Config, env: dict[str, str] | None = None) -> Paths:
    """Where everything lives; relative paths are under ``paths.root``."""
    env = dict(os.environ) if env is None else env
    p = cfg.paths
    root = Path(p.root).absolute()
    inbox = root / p.inbox
    state = p.state_dir or env.get("STATE_DIRECTORY", "").split(":")[0] or ".fine-tuner"
    return Paths(root=root, inbox=inbox, outputs=root / p.outputs, processed=inbox / "processed",
                 failed=inbox / "failed", work=inbox / ".work", state_dir=root / state)


# --- status ------------------------------------------------------------------------------------

def status(cfg: Config) -> dict:
    """Queued, running, recent successes and failures with reasons, and orphans, from the journal."""
    paths = resolve_paths(cfg)
    report: dict[str, Any] = {"inbox": str(paths.inbox), "outputs": str(paths.outputs),
                              "journal": str(paths.journal), "counts": {}, "queued": [],
                              "running": [], "recent_succeeded": [], "recent_failed": [],
                              "orphans": orphans(paths.inbox), "waiting_datasets": _waiting(paths)}
    if not paths.journal.exists():
        return report
    recent = cfg.watch.recent
    with Journal(paths.journal) as journal:
        report["counts"] = journal.counts()
        report["queued"] = [_brief(j) for j in journal.jobs(["queued"])]
        report["running"] = [_brief(j) for j in journal.jobs(["running"])]
        report["recent_succeeded"] = [_brief(j) for j in journal.jobs(["succeeded", "duplicate"], limit=recent)]
        report["recent_failed"] = [_brief(j) for j in journal.jobs(["failed"], limit=recent)]
    return report


def _waiting(paths: Paths) -> list[str]:
    from .inbox import DATASET, classify_name
    with contextlib.suppress(FileNotFoundError):
        return sorted(n for n in os.listdir(paths.inbox) if classify_name(n)[0] == DATASET)
    return []


def _brief(job: JobRecord) -> dict:
    out: dict[str, Any] = {"job_id": job.id, "state": job.state, "attempts": job.attempts,
                           "updated_at": job.updated_at,
                           "inputs": [f.name for f in job.inputs]}
    if job.output_path:
        out["output_path"] = job.output_path
        if job.state == "succeeded":
            meta = _read_json(Path(job.output_path) / "fine_tuning_metadata.json")
            out["evaluation"] = _evaluation_brief(Path(job.output_path), meta)
            out["warnings"] = list(meta.get("warnings") or [])
    if job.approach:
        out["approach"] = job.approach
    if job.state == "queued" and job.approach == "fine_tune":
        out["waiting_for"] = "training"
    if job.duplicate_of:
        out["duplicate_of"] = job.duplicate_of
    if job.error:
        out["error"] = {k: job.error.get(k) for k in ("error_type", "message", "hint")}
    return out


def _read_json(path: Path) -> dict:
    """A JSON object from an output folder, or {} when it is missing or unreadable."""
    with contextlib.suppress(OSError, ValueError):
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else {}
    return {}


def _evaluation_brief(folder: Path, meta: dict) -> dict:
    """Kappa and accuracy of each evaluated model (``evaluation.json``), or why there are none."""
    report = _read_json(folder / "evaluation.json")
    if report.get("models"):
        return {m["key"]: {"kappa": m.get("kappa"), "accuracy": m.get("accuracy"),
                           "invalid_rate": m.get("invalid_rate")} for m in report["models"]}
    evaluation = meta.get("evaluation") or {}
    return {"status": evaluation.get("status"), "reason": evaluation.get("reason")} if evaluation else {}


def _kappa_text(evaluation: dict | None) -> str:
    if not evaluation:
        return ""
    if "new" in evaluation:
        def k(key: str) -> str:
            value = (evaluation.get(key) or {}).get("kappa")
            return "n/a" if value is None else f"{value:.2f}"
        return f"  kappa {k('new')} (base {k('base')})"
    if evaluation.get("status") in ("skipped", "failed"):
        return "  not evaluated"
    return ""


def format_status(report: dict) -> str:
    """The status report as a few human-readable lines. Every name and message is escaped
    (``config.printable``): a file name with a newline, an escape sequence or a right-to-left override
    must not be able to forge a line of this report."""
    return "\n".join(printable(line, limit=10_000) for line in _status_lines(report))


def _status_lines(report: dict) -> list[str]:
    counts = report.get("counts") or {}
    lines = [f"inbox: {report['inbox']}",
             "jobs: " + (", ".join(f"{k} {v}" for k, v in counts.items()) or "none yet")]
    for title, key in (("queued", "queued"), ("running", "running"),
                       ("recent successes", "recent_succeeded"), ("recent failures", "recent_failed")):
        jobs = report.get(key) or []
        if not jobs:
            continue
        lines.append(f"{title}:")
        for job in jobs:
            line = f"  {job['job_id']}"
            if job.get("duplicate_of"):
                line += f"  duplicate of {job['duplicate_of']}"
            elif job.get("waiting_for"):
                line += f"  waiting for {job['waiting_for']}"
            elif job.get("output_path"):
                line += f"  {job.get('approach')} -> {job['output_path']}{_kappa_text(job.get('evaluation'))}"
            elif job.get("approach"):
                line += f"  {job['approach']}"
            if job.get("error"):
                err = job["error"]
                line += f"  {err.get('error_type')}: {err.get('message')}"
                if err.get("hint"):
                    line += f" ({err['hint']})"
            lines.append(line)
            lines.extend(f"    warning: {w}" for w in job.get("warnings") or [])
    if report.get("waiting_datasets"):
        lines.append("datasets in the inbox: " + ", ".join(report["waiting_datasets"]))
    if report.get("orphans"):
        lines.append("waiting for their dataset:")
        lines.extend(f"  {o['name']} ({o['kind']}, {o['waiting_s']} s)" for o in report["orphans"])
    return lines


# --- the daemon --------------------------------------------------------------------------------

def run(cfg: Config, *, once: bool = False, config_path: str | os.PathLike | None = None) -> int:
    """Run the inbox daemon until SIGTERM/SIGINT (or, with ``once``, until the inbox is drained)."""
    os.umask(0o077)
    warnings.showwarning = _log_warning
    return Service(cfg, once=once, config_path=config_path).run()


def _log_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: object = None, line: str | None = None) -> None:
    """Python warnings as JSON log lines (stdout stays parseable). Only our own package's warning
    texts are logged: a library's warning text could quote data."""
    ours = Path(filename).resolve().parent == Path(__file__).resolve().parent
    log.warning("python_warning", category=category.__name__, location=f"{Path(filename).name}:{lineno}",
                **({"message": str(message)} if ours else {}))


class Service:
    def __init__(self, cfg: Config, *, once: bool, config_path: str | os.PathLike | None) -> None:
        self.cfg = cfg
        self.once = once
        self.config_path = config_path
        self.paths = resolve_paths(cfg)
        self.notifier = Notifier()
        self.hints: queue.Queue = queue.Queue()
        self.stop_requested = threading.Event()
        self.reload_requested = threading.Event()
        self.job_stop = threading.Event()  # tells training to give its job back
        self.training_cv = threading.Condition()  # guards the three training-lane fields below
        self.training_queue: collections.deque[_Planned] = collections.deque()
        self.training_current: _Planned | None = None
        self.training_closed = False
        self.ready: collections.deque[Claim] = collections.deque()
        self.running: dict[str, threading.Thread] = {}
        self.running_lock = threading.Lock()
        self.jobs_in: queue.Queue = queue.Queue()
        self.journal: Journal | None = None
        self.tracker: InboxTracker | None = None
        self._first_signal_at: float | None = None
        self._last_status = ""
        self._fine_tuner = None

    # --- start and stop ------------------------------------------------------------------------

    def run(self) -> int:
        p = self.paths
        for d in (p.inbox, p.outputs, p.processed, p.failed, p.work, p.state_dir):
            try:
                make_private_dir(d)
            except NotADirectoryError:
                raise ConfigError([f"paths: {d} is a symbolic link or a file, not a folder; state "
                                   "folders are never followed: replace it with a real folder"],
                                  source=str(self.config_path) if self.config_path else None) from None
        self.journal = Journal(p.journal)
        self.tracker = InboxTracker(p.inbox, settle_s=self.cfg.watch.settle_s,
                                    max_input_bytes=self.cfg.watch.max_input_bytes,
                                    job_wait_s=self.cfg.watch.job_wait_s)
        self._install_signals()
        log.info("daemon_started", version=__version__, pid=os.getpid(), inbox=str(p.inbox),
                 outputs=str(p.outputs), journal=str(p.journal), workers=self.cfg.watch.workers,
                 observer="once" if self.once else ("polling" if self.cfg.watch.polling else "inotify"),
                 systemd=self.notifier.enabled)
        watcher = None
        if not self.once:
            # watch before the first scan, so that nothing dropped in between is missed
            watcher = InboxWatcher(p.inbox, self.hints, polling=self.cfg.watch.polling)
            watcher.start()
        self.threads = {f"job-worker-{i}": self._worker for i in range(self.cfg.watch.workers)}
        self.threads["training-lane"] = self._training_lane
        self.alive = {name: self._start_thread(name) for name in self.threads}
        try:
            self.recover()
            self.tracker.scan()
            self._note_new_entries()
            self.notifier.ready(self._status_line())
            log.info("daemon_ready", queued=len(self.ready))
            threading.Thread(target=_warm_up, name="warm-up", daemon=True).start()
            self._loop()
        finally:
            if watcher is not None:
                watcher.stop()
        code = self._shutdown([t for n, t in self.alive.items() if n != "training-lane"],
                              self.alive["training-lane"])
        log.info("daemon_stopped", exit_code=code, reason="drained" if self.once else "signal")
        self.notifier.close()
        self.journal.close()
        return code

    def _start_thread(self, name: str) -> threading.Thread:
        thread = threading.Thread(target=self.threads[name], name=name, daemon=True)
        thread.start()
        return thread

    def _replace_dead_threads(self) -> None:
        """A worker or the training lane only ends at shutdown; one that died anyway (a bug in a
        failure path) is logged and replaced, so that the service never stalls with a fed watchdog."""
        for name, thread in self.alive.items():
            if not thread.is_alive():
                log.error("thread_replaced", thread=name,
                          hint="report this; the service log above has what the thread was doing")
                self.alive[name] = self._start_thread(name)

    def _install_signals(self) -> None:
        def on_stop(signum: int, _frame: object) -> None:
            now = time.monotonic()
            if self._first_signal_at is None:
                self._first_signal_at = now
            elif now - self._first_signal_at >= SAME_REQUEST_S:
                # the operator insists: leave now; claimed jobs are recovered on the next start
                log.warning("daemon_stopped", exit_code=EXIT_SECOND_SIGNAL, reason="second_signal",
                            signal=signal.Signals(signum).name)
                sys.stdout.flush()
                os._exit(EXIT_SECOND_SIGNAL)
            self.stop_requested.set()

        def on_hup(_signum: int, _frame: object) -> None:
            self.reload_requested.set()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)

    def _shutdown(self, workers: list[threading.Thread], trainer: threading.Thread) -> int:
        self.notifier.stopping()
        training, waiting = self._training_counts()
        log.info("daemon_stopping", running=self._running_count(), queued=len(self.ready),
                 training=training, waiting_for_training=waiting)
        # claimed but not started: they stay in .work/ as queued and are taken up on the next start
        while self.ready:
            self.ready.popleft().release()
        # training gives its job back at once; fine-tunes waiting for the lane go back unstarted
        self.job_stop.set()
        for item in self._close_training_lane():
            with structlog.contextvars.bound_contextvars(job_id=item.claim.job_id):
                self._give_back(item.claim, item.build)
                log.info("job_finished", status="queued", duration_s=round(time.monotonic() - item.started, 3))
        for _ in workers:
            self.jobs_in.put(None)
        # model-set jobs on the pool are finished, within stop_timeout_s
        deadline = time.monotonic() + self.cfg.watch.stop_timeout_s
        while self._running_count() and time.monotonic() < deadline:
            self._ping_watchdog()
            time.sleep(0.1)
        if self._running_count():
            log.warning("stop_timeout_reached", running=sorted(self.running))
        trainer.join(timeout=self.cfg.training.grace_s + 5.0)
        for t in workers:
            t.join(timeout=0.1)
        if self._running_count() or trainer.is_alive():
            log.warning("jobs_abandoned_at_stop", job_ids=sorted(self.running),
                        training=trainer.is_alive(), hint="they are retried when the service starts again")
        return EXIT_OK

    def _running_count(self) -> int:
        with self.running_lock:
            return len(self.running)

    # --- the loop ------------------------------------------------------------------------------

    def _loop(self) -> None:
        tracker = self.tracker
        assert tracker is not None
        self._last_scan = self._last_watchdog = time.monotonic()
        while not self.stop_requested.is_set():
            try:
                if self._tick():
                    return
            except Exception as exc:  # the service loop's one broad handler: log, keep serving
                log.error("loop_error", error_type=type(exc).__name__, frames=_frames(exc))
                self._ping_watchdog()
                time.sleep(TICK_S)

    def _tick(self) -> bool:
        """One turn of the loop; True when ``--once`` has drained the inbox."""
        tracker = self.tracker
        assert tracker is not None
        if self.reload_requested.is_set():
            self.reload_requested.clear()
            self._reload()
        rescan_s = ONCE_RESCAN_S if self.once else self.cfg.watch.rescan_s
        rescan = time.monotonic() - self._last_scan >= rescan_s
        events_lost = False
        timeout = self._sleep_s()
        try:
            while True:
                event, name = self.hints.get(timeout=timeout)
                timeout = 0
                if event == RESCAN:
                    rescan = events_lost = True
                elif event != "job_done":
                    tracker.refresh(name, event=event)
        except queue.Empty:
            pass
        if rescan:
            self._last_scan = time.monotonic()  # on schedule even when this scan fails
            if events_lost:
                log.warning("event_queue_overflow", action="rescan")
            if not self.once:
                self.recover()
            tracker.scan(events_lost=events_lost)
        self._note_new_entries()
        self._refuse_entries()
        self._claim_ready()
        self._replace_dead_threads()
        self._dispatch()
        now = time.monotonic()
        if self.notifier.watchdog_interval_s and now - self._last_watchdog >= self.notifier.watchdog_interval_s:
            self.notifier.watchdog()
            self._last_watchdog = now
        self._send_status()
        return self.once and self._drained()

    def _sleep_s(self) -> float:
        if self.once:
            return 0.05
        assert self.tracker is not None
        deadline = self.tracker.next_deadline()
        return TICK_S if deadline is None else min(TICK_S, max(deadline, 0.01))

    def _drained(self) -> bool:
        assert self.tracker is not None
        return (not self.ready and not self._running_count() and self._training_counts() == (0, 0)
                and not self.tracker.waiting_datasets() and not self.tracker.pending_refusals()
                and self.jobs_in.empty())

    def _ping_watchdog(self) -> None:
        if self.notifier.watchdog_interval_s:
            self.notifier.watchdog()

    def _status_line(self) -> str:
        waiting = self.tracker.waiting_datasets() if self.tracker else 0
        line = f"queued {len(self.ready)}, running {self._running_count()}, waiting {waiting}"
        training, lane = self._training_counts()
        if training or lane:
            line += f", training {training}, waiting for training {lane}"
        return line

    def _send_status(self) -> None:
        line = self._status_line()
        if line != self._last_status:
            self._last_status = line
            self.notifier.status(line)

    def _reload(self) -> None:
        self.notifier.reloading()
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("config_reload_failed", problems=exc.problems, source=exc.source, hint=exc.hint)
        else:
            if new.paths != dataclasses.replace(self.cfg.paths, root=new.paths.root):
                log.warning("config_paths_unchanged", hint="restart the service to change paths")
            changed = [k for k in ("workers",) if getattr(new.watch, k) != getattr(self.cfg.watch, k)]
            if changed:
                log.warning("config_restart_needed", keys=[f"watch.{k}" for k in changed])
            self.cfg = dataclasses.replace(new, paths=self.cfg.paths)
            self._fine_tuner = None
            assert self.tracker is not None
            self.tracker.settle_s = self.cfg.watch.settle_s
            self.tracker.job_wait_s = self.cfg.watch.job_wait_s
            self.tracker.max_input_bytes = self.cfg.watch.max_input_bytes
            log.info("config_reloaded", source=str(self.config_path) if self.config_path else None)
        self.notifier.ready(self._status_line())

    # --- inbox ---------------------------------------------------------------------------------

    def _note_new_entries(self) -> None:
        assert self.tracker is not None
        for entry in self.tracker.take_new():
            log.info("file_detected", file=escape_name(entry.name), kind=entry.kind, size_bytes=entry.sig[1])

    def _refuse_entries(self) -> None:
        """Move refused entries to ``failed/``, each on its own: one that cannot be moved is logged
        and tried again at the next rescan, and never holds up the others or the claims."""
        assert self.tracker is not None
        for refusal in self.tracker.refusals():
            self.tracker.forget(refusal.name)  # a rescan finds it again if it is still there
            try:
                self._refuse(refusal)
            except (OSError, JournalError) as exc:
                log.error("refuse_error", file=escape_name(refusal.name), **_os_error_fields(exc),
                          hint="it is tried again at the next rescan")

    def _refuse(self, refusal) -> None:
        assert self.journal is not None
        name = escape_name(refusal.name)
        message, hint = REFUSAL_MESSAGES[refusal.reason]
        error = {"error_type": "RefusedInputError", "reason": refusal.reason,
                 "message": f"{name}: {message}", "hint": hint, "attempts": 0, "failed_at": utc_now()}
        target = refuse(self.paths.inbox, self.paths.failed, refusal, error)
        if target is None:
            return
        self.journal.record_refused(target.name, name, {**error, "job_id": target.name},
                                    size_bytes=refusal.size_bytes)
        log.warning("input_refused", file=name, reason=refusal.reason, job_id=target.name)
        log.info("input_moved", file=name, to=str(target), job_id=target.name)

    def _claim_ready(self) -> None:
        assert self.tracker is not None
        capacity = 2 * self.cfg.watch.workers - len(self.ready) - self._running_count()
        if capacity <= 0:
            return
        for drop in self.tracker.ready_drops(self.cfg.watch.pair_timeout_s, limit=capacity):
            for name in (drop.dataset, drop.mapping, drop.job):
                if name:
                    self.tracker.forget(name)
            try:
                claim = self._claim(drop)
            except (OSError, JournalError) as exc:
                # a full disk or a permissions change: the drop stays in the inbox (or its claim
                # folder in .work/, released for recovery) and is taken at a later turn
                log.error("claim_error", file=escape_name(drop.dataset), **_os_error_fields(exc),
                          hint="it is tried again at the next rescan")
                continue
            if claim is not None:
                self.ready.append(claim)

    def _default_mapping(self) -> Path | None:
        value = self.cfg.defaults.mapping
        if not value:
            return None
        path = Path(value)
        return path if path.is_absolute() else self.paths.root / path

    def _claim(self, drop: Drop) -> Claim | None:
        assert self.journal is not None
        default = self._default_mapping() if drop.mapping is None else None
        if default is not None and not default.is_file():
            log.error("default_mapping_missing", path=str(default),
                      hint="fix defaults.mapping in the configuration; the job uses an inferred mapping")
            default = None
        claim = claim_drop(self.paths.inbox, self.paths.work, drop, default_mapping=default)
        if claim is None:
            log.info("claim_lost", file=escape_name(drop.dataset))
            return None
        try:
            return self._register(claim, drop.stem)
        except BaseException:
            claim.release()  # recovery takes the folder up at the next rescan
            raise

    def _register(self, claim: Claim, stem: str) -> Claim:
        """Hash a claim folder, give it its job id and record the job as queued. Nothing here parses
        an input: the job file's ``force`` is read by the worker."""
        assert self.journal is not None
        hashes = hash_claim(claim)
        key = content_key((role, digest) for role, (_, digest, _) in hashes.items())
        if claim.path.name.startswith(CLAIM_PREFIX):
            name_claim(claim, stem, key, taken=self._job_id_taken)
        inputs = [InputFile(role, escape_name(name), digest, size)
                  for role, (name, digest, size) in hashes.items()]
        self.journal.add_job(claim.job_id, escape_name(stem), inputs, key)
        log.info("job_claimed", job_id=claim.job_id, files=_names(claim),
                 dataset_sha256=hashes["dataset"][1] if "dataset" in hashes else None)
        return claim

    def _job_id_taken(self, job_id: str) -> bool:
        assert self.journal is not None
        p = self.paths
        return (self.journal.get(job_id) is not None or (p.outputs / job_id).exists()
                or (p.processed / job_id).exists() or (p.failed / job_id).exists())


    def _dispatch(self) -> None:
        while self.ready and self._running_count() < self.cfg.watch.workers:
            claim = self.ready.popleft()
            with self.running_lock:
                self.running[claim.job_id] = threading.current_thread()
            self.jobs_in.put(claim)

    # --- recovery ------------------------------------------------------------------------------

    def recover(self) -> None:
        """Take up claim folders nobody holds (a crash, or a daemon that died): finish or retry."""
        assert self.journal is not None
        for claim in abandoned_claims(self.paths.work):
            try:
                self._recover_one(claim)
            except (OSError, JournalError) as exc:
                claim.release()
                log.error("recovery_error", job_id=claim.job_id, **_os_error_fields(exc))

    def _recover_one(self, claim: Claim) -> None:
        assert self.journal is not None
        if "dataset" not in claim.files:
            # only a dataset starts a claim, so this is a note-only folder; hand it to failed/
            dest = finish_claim(claim, self.paths.failed, note=("error.json", {
                "error_type": "RecoveryError", "message": "a claim folder without a dataset was found",
                "hint": "drop the dataset again with its mapping", "job_id": claim.job_id,
                "attempts": 0, "failed_at": utc_now()}))
            log.warning("input_moved", job_id=claim.job_id, to=str(dest), reason="no_dataset")
            return
        stem = Path(claim.files["dataset"]).stem
        record = None if claim.path.name.startswith(CLAIM_PREFIX) else self.journal.get(claim.job_id)
        if record is None:
            claim = self._register(claim, stem)
            record = self.journal.get(claim.job_id)
            assert record is not None
        log.info("job_recovered", job_id=claim.job_id, state=record.state, attempts=record.attempts)
        if record.state in ("succeeded", "duplicate"):
            note = ("duplicate.json", self._duplicate_note(record)) if record.state == "duplicate" else None
            self._move_inputs(claim, self.paths.processed, note=note)
        elif record.state == "failed":
            self._move_inputs(claim, self.paths.failed, note=("error.json", record.error or {}))
        elif (self.paths.outputs / claim.job_id).is_dir():
            # published before the crash, recorded after: the outputs are complete
            self.journal.succeed(claim.job_id, output_path=str(self.paths.outputs / claim.job_id),
                                 approach=None)
            self._move_inputs(claim, self.paths.processed)
        else:
            self.ready.append(claim)

    def _duplicate_note(self, record: JobRecord) -> dict:
        return {"job_id": record.id, "duplicate_of": record.duplicate_of,
                "outputs": record.output_path, "recorded_at": utc_now(),
                "hint": "this content was processed before; add force: true to a job file to redo it"}

    def _move_inputs(self, claim: Claim, destination: Path, *, note: tuple[str, dict] | None = None) -> Path | None:
        """Move a finished job's inputs on. When that fails (a full disk, ``processed/`` replaced by
        a file or a link) the job's recorded outcome stands: the claim is released and recovery
        moves the inputs at a later rescan, so a success never turns into a failure."""
        job_id = claim.job_id
        try:
            target = finish_claim(claim, destination, note=note)
        except OSError as exc:
            claim.release()
            log.error("input_move_failed", job_id=job_id, to=str(destination), **_os_error_fields(exc),
                      hint="the inputs stay in inbox/.work/ and are moved at the next rescan")
            return None
        log.info("input_moved", job_id=job_id, to=str(target))
        return target

    # --- one job: plan on the pool, execute on the pool (model sets) or the training lane ----------

    def _worker(self) -> None:
        while True:
            claim = self.jobs_in.get()
            if claim is None:
                return
            try:
                self._run_job(claim)
            finally:
                with self.running_lock:
                    self.running.pop(claim.job_id, None)
                self.hints.put(("job_done", claim.job_id))

    def _fine_tuner_instance(self):
        if self._fine_tuner is None:
            from .fine_tuner import FineTuner
            self._fine_tuner = FineTuner(config=self.cfg)
        return self._fine_tuner

    def _run_job(self, claim: Claim) -> None:
        started = time.monotonic()
        with structlog.contextvars.bound_contextvars(job_id=claim.job_id):
            status = self._guarded(claim, lambda: self._plan_phase(claim, started))
            if status is not None:  # None: handed to the training lane, which closes the job
                log.info("job_finished", status=status, duration_s=round(time.monotonic() - started, 3))

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
                if _disk_full(exc):
                    return self._retry_later(claim, build, exc)
                # the exception text may quote data, so only its type and the frames are logged
                log.error("job_crashed", error_type=type(exc).__name__, frames=_frames(exc))
                self._fail(claim, {"error_type": type(exc).__name__,
                                   "message": "an internal error stopped this job",
                                   "hint": "report this with the job id; the service log has the "
                                           "traceback locations; drop the files again to retry"},
                           build=build)
                return "failed"
            except Exception as again:
                if _disk_full(again):
                    return self._retry_later(claim, build, again)
                log.error("job_not_recorded", error_type=type(again).__name__, frames=_frames(again),
                          hint="the job stays in inbox/.work/ and is taken up at the next rescan")
                claim.release()
                return "queued"

    def _retry_later(self, claim: Claim, build: Path, exc: BaseException) -> str:
        """The disk (or the journal's disk) is full: drop the partial build, give the attempt back
        and leave the claim to recovery, which retries it at every rescan until there is space."""
        assert self.journal is not None
        shutil.rmtree(build, ignore_errors=True)
        with contextlib.suppress(JournalError, OSError):
            self.journal.requeue(claim.job_id, give_back_attempt=True)
        claim.release()
        log.error("job_requeued", reason="disk_full", **_os_error_fields(exc),
                  hint="free space; the job is retried at the next rescan")
        return "queued"

    def _plan_phase(self, claim: Claim, started: float) -> str | None:
        """Duplicate and poison checks, then load, validate and decide (pool worker)."""
        from .fine_tuner import FINE_TUNE

        assert self.journal is not None
        job_id = claim.job_id
        record = self.journal.get(job_id)
        assert record is not None
        job_values, job_error = self._job_values(claim)
        if job_values.get("force") is not True:
            earlier = self.journal.success_for(record.content_key)
            if earlier is not None and earlier.id != job_id:
                self.journal.mark_duplicate(job_id, of=earlier)
                record = self.journal.get(job_id) or record
                log.info("job_duplicate", duplicate_of=earlier.id, outputs=earlier.output_path)
                # an attempt killed while building leaves a partial build; a duplicate has no outputs
                shutil.rmtree(self.paths.outputs / f".tmp-{job_id}", ignore_errors=True)
                self._move_inputs(claim, self.paths.processed,
                                  note=("duplicate.json", self._duplicate_note(record)))
                return "duplicate"
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
        if build.exists():  # a partial build from an attempt that crashed
            shutil.rmtree(build)
        make_private_dir(build)
        error: dict | None = None
        with job_log(build / "job.log", job_id):
            log.info("job_started", attempt=attempt, files=_names(claim))
            try:
                if job_error is not None:
                    raise job_error
                plan = self._plan(claim, build, job_values)
            except (FineTunerError, DatasetTooSmallWarning) as exc:
                error = _error_fields(exc)
        if error is not None:
            self._fail(claim, error, attempts=attempt, build=build)
            return "failed"
        if plan.approach == FINE_TUNE:
            self.journal.await_training(job_id)
            plan.drop_dataset()  # a queued fine-tune may wait for hours; the lane reads the files again
            return self._hand_to_training(_Planned(claim, plan, build, attempt, started))
        return self._execute_phase(claim, plan, build, attempt)

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

    def _plan(self, claim: Claim, build: Path, values: dict):
        from .fine_tuner import JobInputs

        job_file = claim.files.get("job")
        settings = job_settings(self.cfg.defaults, values,
                                source=escape_name(job_file) if job_file else "the configuration's defaults")
        mapping = claim.files.get("mapping") or claim.files.get("default_mapping")
        inputs = JobInputs(csv_path=claim.path / claim.files["dataset"],
                           mapping_path=claim.path / mapping if mapping else None,
                           settings=settings, output_dir=build,
                           stem=escape_name(Path(claim.files["dataset"]).stem),
                           job_id=claim.job_id, stop_event=self.job_stop)
        return self._fine_tuner_instance().plan_job(inputs)

    def _execute_phase(self, claim: Claim, plan: Any, build: Path, attempt: int,
                       waited_s: float | None = None) -> str:
        """Build the outputs, publish them, record the result and move the inputs."""
        assert self.journal is not None
        job_id = claim.job_id
        error: dict | None = None
        interrupted = False
        ok, metadata = False, {}
        with job_log(build / "job.log", job_id):
            if waited_s is not None:
                log.info("training_lane_started", waited_s=waited_s, attempt=attempt)
            try:
                ok, metadata = self._fine_tuner_instance().execute(plan)
            except TrainingInterruptedError:
                interrupted = True
            except (FineTunerError, DatasetTooSmallWarning) as exc:
                error = _error_fields(exc)
        if interrupted:
            return self._give_back(claim, build)
        if error is not None:
            self._fail(claim, error, attempts=attempt, build=build)
            return "failed"
        if not ok:
            self._fail(claim, {"error_type": "JobFailedError", "message": "the job did not complete",
                               "hint": "see job.log next to this file"}, attempts=attempt, build=build)
            return "failed"
        final = publish_dir(build, self.paths.outputs / job_id)
        approach = metadata.get("approach")
        self.journal.succeed(job_id, output_path=str(final), approach=approach)
        with job_log(final / "job.log", job_id):  # the job's own log ends with its outcome too
            log.info("job_succeeded", approach=approach, outputs=str(final))
        self._move_inputs(claim, self.paths.processed)
        return "succeeded"

    def _give_back(self, claim: Claim, build: Path) -> str:
        """Shutdown: the job goes back to the queue, its attempt not counted; inputs stay in .work/."""
        assert self.journal is not None
        shutil.rmtree(build, ignore_errors=True)
        self.journal.requeue(claim.job_id, give_back_attempt=True)
        claim.release()
        log.info("job_requeued", reason="shutdown")
        return "queued"

    # --- the training lane: one thread, one fine-tune at a time ----------------------------------

    def _hand_to_training(self, item: _Planned) -> str | None:
        with self.training_cv:
            accepted = not self.training_closed
            if accepted:
                self.training_queue.append(item)
                ahead = len(self.training_queue) - 1 + (self.training_current is not None)
                self.training_cv.notify()
        if not accepted:  # planned while the service was stopping
            return self._give_back(item.claim, item.build)
        log.info("job_waiting_for_training", jobs_ahead=ahead)
        return None

    def _training_lane(self) -> None:
        while True:
            with self.training_cv:
                while not self.training_queue and not self.training_closed:
                    self.training_cv.wait()
                if self.training_closed:  # the queue was handed back by _shutdown
                    return
                item = self.training_queue.popleft()
                self.training_current = item
            job_id = item.claim.job_id
            try:
                with structlog.contextvars.bound_contextvars(job_id=job_id):
                    status = self._guarded(item.claim, lambda: self._training_phase(item))
                    log.info("job_finished", status=status,
                             duration_s=round(time.monotonic() - item.started, 3))
            finally:
                with self.training_cv:
                    self.training_current = None
                self.hints.put(("job_done", job_id))

    def _training_phase(self, item: _Planned) -> str:
        assert self.journal is not None
        with self._machine_training_lock() as held:
            if not held:  # stopped while another daemon was training
                return self._give_back(item.claim, item.build)
            self.journal.resume(item.claim.job_id)
            return self._execute_phase(item.claim, item.plan, item.build, item.attempt,
                                       waited_s=round(time.monotonic() - item.started, 3))

    @contextlib.contextmanager
    def _machine_training_lock(self):
        """One fine-tune at a time across every daemon sharing this state directory (the default for
        daemons on one root): an ``flock`` on ``<state_dir>/training.lock``, waited for while
        listening for a stop request. Yields False when the service stopped first."""
        fd = os.open(self.paths.state_dir / TRAINING_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            waiting = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not waiting:
                        waiting = True
                        log.info("training_lock_wait", hint="another daemon sharing this state directory "
                                                            "is training; one fine-tune runs at a time")
                    if self.job_stop.wait(0.5):
                        yield False
                        return
            yield True
        finally:
            os.close(fd)  # closing drops the lock

    def _close_training_lane(self) -> list[_Planned]:
        """Stop the lane taking jobs; returns the fine-tunes that were waiting (to give back)."""
        with self.training_cv:
            self.training_closed = True
            waiting = list(self.training_queue)
            self.training_queue.clear()
            self.training_cv.notify_all()
        return waiting

    def _training_counts(self) -> tuple[int, int]:
        """(training now, waiting for training)."""
        with self.training_cv:
            return int(self.training_current is not None), len(self.training_queue)

    def _fail(self, claim: Claim, error: dict, *, attempts: int | None = None,
              build: Path | None = None) -> None:
        assert self.journal is not None
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
        self._move_inputs(claim, self.paths.failed, note=("error.json", error))


@dataclass
class _Planned:
    """A planned fine-tune handed from a pool worker to the training lane."""

    claim: Claim
    plan: Any  # fine_tuner.JobPlan
    build: Path
    attempt: int
    started: float  # monotonic time the job started on the pool (job_finished's duration_s)


def _warm_up() -> None:
    """Import what a job needs while the service waits, so that the first drop is not the one that
    pays for loading pandas (about half a second)."""
    started = time.monotonic()
    import pandas  # noqa: F401 - the dataset loader's library, imported lazily there

    from . import dataset, fine_tuner, modelset  # noqa: F401
    log.info("warm_up_done", duration_s=round(time.monotonic() - started, 3))


def _frames(exc: BaseException) -> list[str]:
    """Where an exception came from, without its text (which may quote data)."""
    return [f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in traceback.extract_tb(exc.__traceback__)]


def _os_error_fields(exc: BaseException) -> dict:
    """Log fields for an OS or journal error: its type and errno, never its text."""
    return {"error_type": type(exc).__name__, "errno": getattr(exc, "errno", None)}


def _disk_full(exc: BaseException) -> bool:
    """A write failed for lack of space (the outputs' disk, or the journal's)."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, JournalError) and bool(getattr(exc, "disk_full", False))


def _names(claim: Claim) -> list[str]:
    return sorted(escape_name(n) for n in claim.files.values())


def _error_fields(exc: BaseException) -> dict:
    """error.json fields for an expected job failure."""
    if isinstance(exc, FineTunerError):
        return exc.to_dict()
    return {"error_type": type(exc).__name__, "message": str(exc),
            "hint": "add rows, or enable fallback to build a model set"}
