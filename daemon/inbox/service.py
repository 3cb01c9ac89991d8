"""The inbox daemon's main loop: start-up recovery, claiming, the worker pool, signals, sd_notify.

``run(cfg)`` owns the state: the watcher thread only posts hints and worker threads post "done"; the
loop re-stats hinted files, scans the inbox at start-up / after an event overflow / every
``rescan_s``, refuses what cannot be a job, claims complete drops (see ``daemon.inbox.drops``), hands them
to ``watch.workers`` pool threads, and keeps systemd informed (``READY=1`` after recovery,
``STATUS=`` with queue counts, ``WATCHDOG=1`` at half ``WATCHDOG_USEC``). What a job is and does is
the job runner's business (``daemon.inbox.jobs``): the pool calls ``JobRunner.run(claim)``, the training
lane (``daemon.inbox.lane``) ``JobRunner.run_planned(item)``; neither the loop nor the pool nor the lane
knows what kind of job it runs. Recovery takes up claim folders whose owner died: finished ones are
moved on, the rest retried until ``max_attempts``. Signals only set events: SIGTERM/SIGINT (two
within a second are one request) stop claiming, give the training job and the fine-tunes waiting
for it back to the queue (attempt not counted, inputs stay claimed in ``.work/``), let running pool
jobs finish (up to ``stop_timeout_s``), exit 0; a later second one exits at once; SIGHUP reloads the
configuration (paths stay as they are). About once a second the loop reads the journal's requests
(``fine-tuner cancel``): a claim not started yet and a fine-tune waiting for the lane fail as
cancelled at once, a running job is told to stop through its ``JobStop``. The loop and each pool
thread survive any error (the loop's one broad handler logs it; a dead thread is replaced).
"""

from __future__ import annotations

import collections
import dataclasses
import grp
import os
import queue
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

from .. import __version__
from ..config import Config, ConfigError, load_config
from ..data.jobsettings import defaults_problems, read_job_file
from ..errors import JournalError
from ..fsutil import make_private_dir, make_shared_dir
from .drops import (
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
    refuse,
    sweep_refusals,
    CLAIM_PREFIX,
)
from .jobs import JobContext, JobRunner, frames, names, os_error_fields
from .journal import InputFile, Journal, utc_now
from .lane import TrainingLane
from .metrics import Metrics, metrics_for
from ..logconfig import from_this_package, get_logger
from ..text import printable
from .notify import Notifier
from .paths import resolve_paths
from .status import format_status, status  # noqa: F401 - the `status` command's entry points

log = get_logger("service")

TICK_S = 0.25  # the longest the loop sleeps: bounds signal, watchdog and settle latency
ONCE_RESCAN_S = 0.5  # --once has no watcher: it lists the inbox this often (not every tick)
EXIT_OK = 0
EXIT_SECOND_SIGNAL = 1
# Signals this close to the first are the same request: make forwards a terminal's SIGINT or
# `timeout`'s SIGTERM to a process group, so the daemon often gets two at once.
SAME_REQUEST_S = 1.0
WARM_UP_WAIT_S = 60.0  # the longest a job waits for the warm-up imports
# A dataset name seen again this soon after its claim is reported (dataset_reappeared).
REAPPEAR_WINDOW_S = 600.0
RECENT_CLAIMS_KEPT = 1000
METRICS_EVERY_S = 1.0  # how often the metrics' job counts are read from the journal
REQUESTS_EVERY_S = 1.0  # how often the journal is asked for cancel requests


# --- the daemon --------------------------------------------------------------------------------

def run(cfg: Config, *, once: bool = False, config_path: str | os.PathLike | None = None) -> int:
    """Run the inbox daemon until SIGTERM/SIGINT (or, with ``once``, until the inbox is drained)."""
    # paths.group: what the daemon and its children write under inbox/ and outputs/ is for the group
    os.umask(0o007 if cfg.paths.group else 0o077)
    warnings.showwarning = _log_warning
    return Service(cfg, once=once, config_path=config_path).run()


def _log_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: object = None, line: str | None = None) -> None:
    """Python warnings as JSON log lines (stdout stays parseable). Only our own package's warning
    texts are logged: a library's warning text could quote data."""
    ours = from_this_package(filename)
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
        # set once the warm-up thread imported pandas & co.: jobs wait for it, because importing a C
        # extension package from several threads at once can fail ("partially initialized module")
        self.warmed_up = threading.Event()
        self.lane: TrainingLane | None = None
        self.runner: JobRunner | None = None
        self.ready: collections.deque[Claim] = collections.deque()
        self.running: dict[str, threading.Thread] = {}
        self.running_lock = threading.Lock()
        self.jobs_in: queue.Queue = queue.Queue()
        self.journal: Journal | None = None
        self.metrics: Metrics | None = None  # metrics.port / metrics.textfile
        self._metrics_at = 0.0  # when the metrics last had the journal's counts
        self.tracker: InboxTracker | None = None
        self._first_signal_at: float | None = None
        self._last_status = ""
        self.recent_claims: dict[str, tuple[str, float]] = {}  # dataset name -> (job id, claimed at)
        self._requests_read_at = 0.0
        self._cancelling: set[str] = set()  # running jobs told to stop as cancelled

    # --- start and stop ------------------------------------------------------------------------

    def run(self) -> int:
        p = self.paths
        group = self.cfg.paths.group
        for d in (p.inbox, p.outputs, p.processed, p.failed, p.work, p.state_dir):
            try:
                if group is not None and d != p.state_dir:  # the journal stays private
                    make_shared_dir(d, grp.getgrnam(group).gr_gid)
                else:
                    make_private_dir(d)
            except NotADirectoryError:
                raise ConfigError([f"paths: {d} is a symbolic link or a file, not a folder; state "
                                   "folders are never followed: replace it with a real folder"],
                                  source=str(self.config_path) if self.config_path else None) from None
            except PermissionError as exc:
                if group is None:
                    raise
                raise ConfigError([f"paths.group: cannot share {d} with the group {group!r} "
                                   f"({exc.strerror}): the service user must own the folder and be a "
                                   f"member of the group (usermod -aG {group} <service user>)"],
                                  source=str(self.config_path) if self.config_path else None) from None
        self.journal = Journal(p.journal)
        try:
            self._check_journal_root()
            self._start_metrics()
        except BaseException:
            self.journal.close()
            raise
        self.runner = JobRunner(JobContext(paths=p, journal=self.journal, config=lambda: self.cfg,
                                           job_stop=self.job_stop,
                                           job_done=lambda job_id: self.hints.put(("job_done", job_id))))
        self.lane = self.runner.ctx.lane = TrainingLane(self.runner.run_planned)
        self.tracker = InboxTracker(p.inbox, settle_s=self.cfg.watch.settle_s,
                                    max_input_bytes=self.cfg.watch.max_input_bytes,
                                    job_wait_s=self.cfg.watch.job_wait_s,
                                    mapping_needed=self._mapping_needed)
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
        self.threads["training-lane"] = self.lane.loop
        self.alive = {name: self._start_thread(name) for name in self.threads}
        try:
            self.recover()
            self.tracker.scan()
            self._note_new_entries()
            self.notifier.ready(self._status_line())
            log.info("daemon_ready", queued=len(self.ready))
            threading.Thread(target=_warm_up, args=(self.warmed_up,), name="warm-up", daemon=True).start()
            self._loop()
        except BaseException:
            self._stop_metrics()  # the server and the log handler never outlive the service
            raise
        finally:
            if watcher is not None:
                watcher.stop()
        code = self._shutdown([t for n, t in self.alive.items() if n != "training-lane"],
                              self.alive["training-lane"])
        log.info("daemon_stopped", exit_code=code, reason="drained" if self.once else "signal")
        self.notifier.close()
        self._stop_metrics()
        self.journal.close()
        return code

    def _check_journal_root(self) -> None:
        """The journal must be this root's: its duplicates point at the outputs of the root that
        recorded them, so a daemon on another root sharing the state directory would answer new
        drops with another root's models. A journal without a root (new, or older than roots)
        gets this one; a recorded root that no longer exists was moved here (logged)."""
        assert self.journal is not None
        root = os.path.realpath(self.paths.root)
        recorded = self.journal.root()
        if recorded is None:
            recorded = self.journal.record_root(root)
        elif recorded != root and not os.path.lexists(recorded):
            previous, recorded = recorded, self.journal.record_root(root, replacing=recorded)
            if recorded == root:
                log.warning("journal_root_moved", journal=str(self.paths.journal), previous_root=previous,
                            root=root)
        if recorded != root:
            raise JournalError(
                f"the journal {printable(str(self.paths.journal), 4096)} holds the jobs of the root "
                f"{printable(recorded, 4096)}, not of {printable(root, 4096)}", path=str(self.paths.journal),
                reason="journal of another root",
                hint="give each root its own state directory (paths.state_dir, or STATE_DIRECTORY under "
                     "systemd), or start this daemon with that --root")

    # --- metrics (daemon.inbox.metrics) -------------------------------------------------------

    def _start_metrics(self) -> None:
        """Serve / write the metrics when ``metrics.port`` or ``metrics.textfile`` is set
        (ConfigError when the port is taken or the file cannot be written: exit 78)."""
        metrics = metrics_for(self.cfg.metrics, self.paths.root)
        if metrics is not None:
            metrics.update_queue(self.journal.counts(), 0)
            metrics.start()
        self.metrics = metrics

    def _update_metrics(self) -> None:
        """The journal's counts and the queue, at most once a second (or when a job finished), and
        the textfile when it is due."""
        metrics = self.metrics
        if metrics is None:
            return
        due = metrics.textfile_due()
        now = time.monotonic()
        if due or now - self._metrics_at >= METRICS_EVERY_S:
            self._metrics_at = now
            metrics.update_queue(self.journal.counts(), self._queued())
        if due:
            metrics.write_textfile()

    def _queued(self) -> int:
        """Claimed jobs waiting to run: for a worker, or for the training lane."""
        return len(self.ready) + (self.lane.counts()[1] if self.lane is not None else 0)

    def _stop_metrics(self) -> None:
        """The last counts, then the server and the log handler stop and the last textfile is
        written. Runs once, on the way out of ``run`` whichever way it leaves."""
        metrics, self.metrics = self.metrics, None
        if metrics is None:
            return
        try:
            metrics.update_queue(self.journal.counts(), self._queued())
        except JournalError:
            pass  # the service is leaving on this journal's error: the last counts stay as they were
        finally:
            metrics.stop()

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
        training, waiting = self.lane.counts()
        log.info("daemon_stopping", running=self._running_count(), queued=len(self.ready),
                 training=training, waiting_for_training=waiting)
        # claimed but not started: they stay in .work/ as queued and are taken up on the next start
        while self.ready:
            self.ready.popleft().release()
        # training gives its job back at once; fine-tunes waiting for the lane go back unstarted
        self.job_stop.set()
        for item in self.lane.close():
            self.runner.give_back_planned(item)
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
                log.error("loop_error", error_type=type(exc).__name__, frames=frames(exc))
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
        self._act_on_requests()
        self._send_status()
        self._update_metrics()
        return self.once and self._drained()

    def _act_on_requests(self) -> None:
        """``fine-tuner cancel``: a claimed job not started yet and a fine-tune waiting for the lane
        are dropped to ``failed/`` at once; a running one is told to stop (it ends itself). A
        request for a job this daemon does not hold waits for the daemon that does (or for the
        job's next start). Looked at about once a second."""
        now = time.monotonic()
        if now - self._requests_read_at < REQUESTS_EVERY_S:
            return
        self._requests_read_at = now
        assert self.journal is not None and self.runner is not None and self.lane is not None
        requests = self.journal.requests()
        self._cancelling &= set(requests)
        for job_id, action in requests.items():
            if action != "cancel" or job_id in self._cancelling:
                continue
            claim = next((c for c in self.ready if c.job_id == job_id), None)
            if claim is not None:
                self.ready.remove(claim)
                self.runner.cancel_claim(claim)
                continue
            waiting = self.lane.remove(lambda item, job_id=job_id: item.claim.job_id == job_id)
            for item in waiting:
                self.runner.cancel_planned(item)
            if not waiting and self.runner.cancel(job_id):
                self._cancelling.add(job_id)

    def _sleep_s(self) -> float:
        if self.once:
            return 0.05
        assert self.tracker is not None
        deadline = self.tracker.next_deadline()
        return TICK_S if deadline is None else min(TICK_S, max(deadline, 0.01))

    def _drained(self) -> bool:
        assert self.tracker is not None
        return (not self.ready and not self._running_count() and self.lane.counts() == (0, 0)
                and not self.tracker.waiting_datasets() and not self.tracker.pending_refusals()
                and self.jobs_in.empty())

    def _ping_watchdog(self) -> None:
        if self.notifier.watchdog_interval_s:
            self.notifier.watchdog()

    def _status_line(self) -> str:
        waiting = self.tracker.waiting_datasets() if self.tracker else 0
        line = f"queued {len(self.ready)}, running {self._running_count()}, waiting {waiting}"
        training, lane = self.lane.counts()
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
            new = load_config(self.config_path, checks=(defaults_problems,))
        except ConfigError as exc:
            log.error("config_reload_failed", problems=exc.problems, source=exc.source, hint=exc.hint)
        else:
            if new.paths != dataclasses.replace(self.cfg.paths, root=new.paths.root):
                log.warning("config_paths_unchanged", hint="restart the service to change paths")
            changed = [k for k in ("workers",) if getattr(new.watch, k) != getattr(self.cfg.watch, k)]
            if changed:
                log.warning("config_restart_needed", keys=[f"watch.{k}" for k in changed])
            if new.metrics != self.cfg.metrics:  # the server and the textfile keep their start-up settings
                log.warning("config_restart_needed", keys=["metrics"])
            self.cfg = dataclasses.replace(new, paths=self.cfg.paths)  # jobs see it from their next step
            assert self.tracker is not None
            self.tracker.settle_s = self.cfg.watch.settle_s
            self.tracker.job_wait_s = self.cfg.watch.job_wait_s
            self.tracker.max_input_bytes = self.cfg.watch.max_input_bytes
            log.info("config_reloaded", source=str(self.config_path) if self.config_path else None)
        self.notifier.ready(self._status_line())

    # --- inbox ---------------------------------------------------------------------------------

    def _note_new_entries(self) -> None:
        assert self.tracker is not None
        now = time.monotonic()
        for entry in self.tracker.take_new():
            log.info("file_detected", file=escape_name(entry.name), kind=entry.kind, size_bytes=entry.sig[1])
            earlier = self.recent_claims.get(entry.name)
            if earlier is not None and now - earlier[1] < REAPPEAR_WINDOW_S:
                # most likely its writer closed the file, we took it, and it reopened it to go on
                # writing: the earlier job may hold a truncated dataset
                log.warning("dataset_reappeared", file=escape_name(entry.name), earlier_job_id=earlier[0],
                            seconds_after_claim=round(now - earlier[1], 1),
                            hint="if the earlier job's dataset was still being written, it is truncated: "
                                 "write under a temporary name (NAME.csv.part) and rename it in when complete")

    def _refuse_entries(self) -> None:
        """Move refused entries to ``failed/``, each on its own: one that cannot be moved is logged
        and tried again at the next rescan, and never holds up the others or the claims."""
        assert self.tracker is not None
        for refusal in self.tracker.refusals():
            self.tracker.forget(refusal.name)  # a rescan finds it again if it is still there
            try:
                self._refuse(refusal)
            except (OSError, JournalError) as exc:
                log.error("refuse_error", file=escape_name(refusal.name), **os_error_fields(exc),
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
                log.error("claim_error", file=escape_name(drop.dataset), **os_error_fields(exc),
                          hint="it is tried again at the next rescan")
                continue
            if claim is not None:
                self.ready.append(claim)
                self.recent_claims[drop.dataset] = (claim.job_id, time.monotonic())
                if len(self.recent_claims) > RECENT_CLAIMS_KEPT:  # the oldest first
                    del self.recent_claims[next(iter(self.recent_claims))]

    def _mapping_needed(self, job_file: Path) -> bool:
        """Whether a dataset dropped with this job file waits ``pair_timeout_s`` for its mapping:
        not when the job rates with an output folder of this service, which brings its own. The
        job file is read as the worker reads it (small, never a link or a FIFO); one that cannot be
        read waits as before, and its job fails on it with any mapping that came."""
        from ..quality.raterequest import model_folder

        try:
            values = read_job_file(job_file)
        except ConfigError:
            return True
        if values.get("task") == "rate" and values.get("topic") is not None:
            return False  # the topic's current model is an output folder of this service
        if values.get("task") == "retrain":
            return False  # the topic's model brings its mapping
        model = self.cfg.defaults.model if values.get("model") is None else values["model"]
        return not (values.get("task") == "rate" and isinstance(model, str)
                    and model_folder(model, self.cfg, self.paths.outputs) is not None)

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
        log.info("job_claimed", job_id=claim.job_id, files=names(claim),
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

    def _worker(self) -> None:
        """A pool thread: runs the claims the loop hands it until the ``None`` that ends it."""
        while True:
            claim = self.jobs_in.get()
            if claim is None:
                return
            self.warmed_up.wait(WARM_UP_WAIT_S)
            try:
                self.runner.run(claim)
            finally:
                with self.running_lock:
                    self.running.pop(claim.job_id, None)
                self.hints.put(("job_done", claim.job_id))

    # --- recovery ------------------------------------------------------------------------------

    def recover(self) -> None:
        """Take up claim folders nobody holds (a crash, or a daemon that died): finish or retry."""
        assert self.journal is not None
        from . import topicrows

        topicrows.sweep(self.paths)
        for placed in sweep_refusals(self.paths.failed):
            log.warning("input_moved", job_id=placed.name, to=str(placed), reason="refusal_interrupted")
        for claim in abandoned_claims(self.paths.work):
            try:
                self._recover_one(claim)
            except (OSError, JournalError) as exc:
                claim.release()
                log.error("recovery_error", job_id=claim.job_id, **os_error_fields(exc))

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
            note = ("duplicate.json", self.runner.duplicate_note(record)) if record.state == "duplicate" else None
            self.runner.move_inputs(claim, self.paths.processed, note=note)
        elif record.state == "failed":
            self.runner.move_inputs(claim, self.paths.failed, note=("error.json", record.error or {}))
        elif (self.paths.outputs / claim.job_id).is_dir():
            # published before the crash, recorded after: the outputs are complete
            self.journal.succeed(claim.job_id, approach=None,
                                 output_path=self.paths.recorded_output(self.paths.outputs / claim.job_id))
            self.runner.move_inputs(claim, self.paths.processed)
        else:
            self.ready.append(claim)

def _warm_up(done: threading.Event) -> None:
    """Import what a job needs while the service waits, so that the first drop is not the one that
    pays for loading pandas (about half a second); ``done`` is set however it ends."""
    started = time.monotonic()
    try:
        import pandas  # noqa: F401 - the dataset loader's library, imported lazily there

        from .. import fine_tuner  # noqa: F401
        from ..data import dataset, modelset  # noqa: F401
        log.info("warm_up_done", duration_s=round(time.monotonic() - started, 3))
    finally:
        done.set()
