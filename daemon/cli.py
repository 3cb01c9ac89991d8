"""The ``fine-tuner`` command line: argv → config → logging → one call → exit code.

Subcommands: ``process`` (one dataset, one-shot), ``validate`` (a data report), ``check`` (the
capability report), ``evaluate`` (an output folder's models against the experts), ``rate`` (new
records with a built model), ``serve`` (a model through llama-server), ``watch`` (the inbox daemon),
``status`` (the journal, or one job in full), ``report`` (every job's
evaluation side by side over time), ``config`` (the configuration in use and where each value
came from: every command reads the same file, ``config.find_config_file``), and job control:
``cancel``, ``retry``, ``promote``,
``retrain`` (the daemon acts on them while it runs). Exit codes: 0 ok,
1 the job failed (or the data is unusable / the model cannot be fine-tuned, or a file could not be
read or written), 2 usage, 78 a configuration error, a damaged, locked or read-only journal or
state folder for ``watch`` (systemd's EX_CONFIG, which the unit does not restart on), 75 a full
disk when ``watch`` starts (EX_TEMPFAIL: the unit starts it again and it runs once there is space).
Errors are one line on stderr saying what to fix; logs are JSON lines (stdout for ``watch``, the
``fine_tuner.log`` file otherwise, and stderr too with ``--debug``).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import re
import sys
import typing
import warnings
from collections.abc import Callable
from pathlib import Path

import structlog

from . import __version__
from .config import (DAY_S, EVALUATION_BACKENDS, RATING_BACKENDS, Config, ConfigError, find_config_file, load_config,
                     number_problem)
from .data.jobsettings import FLAGS, JobSettings, defaults_problems
from .errors import DatasetTooSmallWarning, FineTunerError, JournalError
from .logconfig import from_this_package

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TEMPFAIL, EXIT_CONFIG = 0, 1, 2, 75, 78

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE",
                        help="YAML configuration file (default: $FINE_TUNER_CONFIG, else <root>/config.yaml, "
                             "else /etc/fine-tuner/config.yaml; see fine-tuner config --show)")
    common.add_argument("--debug", action="store_true", help="DEBUG logging, also on stderr")

    p = argparse.ArgumentParser(
        prog="fine-tuner",
        description="Turn an expert-rated dataset of emergency-department visits into an Ollama model "
                    "(a LoRA fine-tune or a model set), measure it against the experts, and run the "
                    "inbox daemon.",
        epilog="Run 'fine-tuner COMMAND --help' for a command's options.")
    p.add_argument("--version", action="version", version=f"fine-tuner {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    proc = sub.add_parser("process", parents=[common], help="turn one dataset into a fine-tune or a model set")
    proc.add_argument("--input", required=True, metavar="CSV", help="formatted dataset (CSV)")
    proc.add_argument("--mapping", metavar="FILE", help="rating mapping (JSON or YAML); inferred when omitted")
    proc.add_argument("--output-dir", metavar="DIR", help="where the outputs go (default: outputs/<input stem>)")
    _add_job_flags(proc, *PROCESS_FLAGS)

    val = sub.add_parser("validate", parents=[common], help="report on a dataset without processing it")
    val.add_argument("--input", required=True, metavar="CSV")
    val.add_argument("--mapping", metavar="FILE")
    val.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_job_flags(val, "prompt_template")

    chk = sub.add_parser("check", parents=[common], help="can MODEL be fine-tuned here? (exit 0 yes, 1 no)")
    chk.add_argument("model", metavar="MODEL")
    chk.add_argument("--json", action="store_true")

    wat = sub.add_parser("watch", parents=[common], help="run the inbox daemon")
    wat.add_argument("--root", metavar="DIR", help="folder holding inbox/ and outputs/ (default: .)")
    wat.add_argument("--once", action="store_true", help="process what is in the inbox, then exit")

    ev = sub.add_parser("evaluate", parents=[common],
                        help="measure an output folder's models against the experts on its held-out rows")
    ev.add_argument("output_dir", metavar="OUTPUT_DIR", help="a job's output folder, e.g. outputs/<job_id>")
    ev.add_argument("--backend", choices=EVALUATION_BACKENDS,
                    help="who answers (default: evaluation.backend, auto)")
    ev.add_argument("--max-rows", type=_positive_int, metavar="N", help="held-out rows evaluated at most")
    _add_job_flags(ev, "compare")
    ev.add_argument("--json", action="store_true", help="print evaluation.json instead of the table")

    rate = sub.add_parser("rate", parents=[common], help="rate new records with a built model")
    _add_job_flags(rate, "model", "topic")
    rate.add_argument("--root", metavar="DIR",
                      help="the daemon's folder: for --topic, a job id's output folder and defaults.mapping")
    rate.add_argument("--input", required=True, metavar="CSV", help="the records to rate")
    rate.add_argument("--output", metavar="CSV",
                      help="ratings file (default: <input stem>.ratings.csv beside the input)")
    rate.add_argument("--backend", choices=RATING_BACKENDS, default="auto",
                      help="who answers: auto (Ollama, then an OpenAI-compatible server at openai.base_url, "
                           "then llama-server started for the run when evaluation.start_llama_server is on, "
                           "then the local child), ollama, openai, llama-server, local, or baseline (the "
                           "output folder's bag-of-words classifier: thousands of records a second); a head "
                           "rates through the local child (auto, local) or llama-server on its base GGUF's "
                           "layers")
    rate.add_argument("--explain", action="store_true",
                      help="a fine-tune trained with training.answer_forms: both writes its rationale too "
                           "(generation, much slower) instead of deciding each rating in one forward pass")
    rate.add_argument("--mapping", metavar="FILE", help="rating mapping (only with a bare Ollama name)")
    _add_job_flags(rate, "topics", "topic_definition", "review_below", "prompt_template")

    srv = sub.add_parser("serve", parents=[common],
                         help="serve an output folder (base GGUF + its adapter) or a GGUF with llama-server")
    srv.add_argument("target", metavar="OUTPUT_DIR|GGUF")
    srv.add_argument("--port", type=int, default=0, help="the port to listen on (default: a free one)")
    srv.add_argument("--parallel", type=_positive_int, default=4, help="requests answered at once (slots)")
    srv.add_argument("--threads", type=_positive_int, metavar="N",
                     help="CPU threads that generate (default: llama.cpp's choice); fewer leave cores to other work")
    srv.add_argument("--base-only", action="store_true", help="serve a fine-tune's base without its adapter")
    srv.add_argument("--log", metavar="FILE", help="the server's own output (default: in the state directory)")

    st = sub.add_parser("status", parents=[common],
                        help="queued and running jobs with their progress, recent jobs, current models; or one job")
    st.add_argument("job_id", nargs="?", metavar="JOB_ID", help="show this job in full: events, warnings, files")
    st.add_argument("--root", metavar="DIR")
    st.add_argument("--json", action="store_true")
    st.add_argument("--topic", metavar="T", help="finished jobs of this topic only")
    st.add_argument("--since", type=_since_arg, metavar="DATE", help="finished jobs since this ISO date or time")
    st.add_argument("--failed", action="store_true", help="failures only")
    st.add_argument("--limit", type=_positive_int, metavar="N",
                    help="finished jobs listed at most (default: watch.recent)")

    rep = sub.add_parser("report", parents=[common],
                         help="every finished job's evaluation side by side over time (text, CSV, JSON or HTML)")
    rep.add_argument("--root", metavar="DIR")
    rep.add_argument("--topic", metavar="T", help="jobs of this topic only (case aside)")
    rep.add_argument("--since", type=_since_arg, metavar="DATE", help="jobs finished since this ISO date or time")
    rep.add_argument("--format", choices=("text", "csv", "json", "html"), default="text",
                     help="text (a table, the default), csv, json (a list of rows) or html (one self-contained page)")
    rep.add_argument("--output", metavar="FILE", help="write the report to FILE (default: stdout)")
    rep.add_argument("--curve", action="store_true",
                     help="the learning curve: per topic, agreement over the expert-rated rows each model learned "
                          "from (text, csv or json)")

    can = sub.add_parser("cancel", parents=[common], help="cancel a queued or running job")
    can.add_argument("job_id", metavar="JOB_ID")
    can.add_argument("--root", metavar="DIR")
    can.add_argument("--wait", type=_number_arg(at_most=DAY_S), default=30.0, metavar="S",
                     help="seconds to wait for the daemon to act (default 30; 0: just ask)")

    ret = sub.add_parser("retry", parents=[common], help="run a failed job again through the inbox")
    ret.add_argument("job_id", metavar="JOB_ID")
    ret.add_argument("--root", metavar="DIR")
    _add_job_flags(ret, *RETRY_FLAGS)

    conf = sub.add_parser("config", parents=[common],
                          help="show the configuration every command uses and where each value came from")
    conf.add_argument("--show", action="store_true", help="print the effective configuration (the default)")
    conf.add_argument("--root", metavar="DIR", help="the root whose config.yaml is looked for (default: .)")
    conf.add_argument("--json", action="store_true")

    pro = sub.add_parser("promote", parents=[common], help="make a job's model the current one for its topic")
    pro.add_argument("job_id", metavar="JOB_ID")
    pro.add_argument("--root", metavar="DIR")
    pro.add_argument("--topic", metavar="T", help="the topic (default: the job's own)")
    pro.add_argument("--force", action="store_true", help="promote a model whose verdict is not recommended")

    rtr = sub.add_parser("retrain", parents=[common],
                         help="add a reviewed file's expert ratings to a topic's training rows and build its "
                              "model again (through the inbox)")
    rtr.add_argument("reviewed", metavar="REVIEWED_CSV", help="needs_review.csv with the Expert Rating filled in")
    rtr.add_argument("--topic", required=True, metavar="T", help="the topic whose model learns the reviewed rows")
    rtr.add_argument("--mapping", metavar="FILE", help="rating mapping (default: the topic's model's)")
    rtr.add_argument("--root", metavar="DIR")
    rtr.add_argument("--wait", type=_number_arg(at_most=DAY_S), default=0.0, metavar="S",
                     help="seconds to wait for the daemon's job to end (default 0: just drop it)")
    return p


# the job settings (data/jobsettings.py) each command takes as flags, as the settings declare them
PROCESS_FLAGS = ("model", "topics", "output_model", "epochs", "learning_rate", "batch_size", "approach", "fallback",
                 "prompt_template", "topic_definition", "group_by", "code_knowledge", "compare")
RATE_FLAGS = ("model", "topic", "topics", "topic_definition", "review_below", "prompt_template")
RETRY_FLAGS = ("epochs", "learning_rate", "batch_size", "approach", "model")  # inbox.control.RETRY_KEYS


def _add_job_flags(parser: argparse.ArgumentParser, *names: str) -> None:
    """The flags of the job settings ``names``, each spelled, typed and explained as its declaration
    says (``jobsettings.FLAGS``), its value under the setting's own name (``args.<name>``, None when
    not given): one declaration, the same flag on every command that takes it."""
    hints = typing.get_type_hints(JobSettings)
    for name in names:
        flag = FLAGS[name]
        how: dict = {"dest": name, "help": flag.help, "default": None}
        if flag.negated:
            parser.add_argument(flag.spelling(name), action="store_const", const=False, **how)
            continue
        kind = next(t for t in (*typing.get_args(hints[name]), hints[name]) if t is not type(None))
        if flag.choices:
            how["choices"] = flag.choices
        elif kind is int:
            how["type"] = _positive_int
        elif kind is float:
            how["type"] = _number_arg(flag.number_rules)
        parser.add_argument(flag.spelling(name), metavar=flag.metavar, **how)


def _job_values(args: argparse.Namespace, names: tuple[str, ...]) -> dict:
    """The job settings ``names`` as the command line gave them (None: not given), for ``job_settings``."""
    values = {name: getattr(args, name) for name in names}
    if "prompt_template" in values:
        values["prompt_template"] = _template_arg(values["prompt_template"])
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _since_arg(text: str) -> str:
    """An ISO date or time, as the journal's UTC timestamps compare (a date: from its midnight UTC)."""
    from datetime import UTC, datetime

    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an ISO date such as 2026-12-01, got {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).isoformat(timespec="milliseconds")


def _number_arg(setting: str | None = None, *, at_most: float | None = None) -> Callable[[str], float]:
    """The argparse type of every number flag: a finite number (never nan or inf) in the range of the
    config setting ``setting``, or else from 0 to ``at_most``; anything else is a usage error (exit 2)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        problem = number_problem(setting or "", value)
        if problem is None and setting is None and value < 0:
            problem = "must not be negative"
        elif problem is None and at_most is not None and value > at_most:
            problem = f"must be at most {at_most:g}"
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    return parse


def _fail(message: str, code: int) -> int:
    print(f"fine-tuner: error: {message}", file=sys.stderr)
    return code


_DROP_AGAIN = re.compile(r"\b(?:and )?drop (?:it|the files?) again(?: as a new job)?")


def _for_command_line(text: str) -> str:
    """Hints are written for the inbox ("drop the file again"); on the command line nothing was
    dropped, so they say to run the command again."""
    return _DROP_AGAIN.sub(lambda m: ("and " if m.group(0).startswith("and ") else "") + "run the command again", text)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: object = None, line: str | None = None) -> None:
    """Our own warnings as one readable line; a library's warning text (which could quote data)
    is not printed (it is in the log file with --debug)."""
    ours = from_this_package(filename)
    if ours or issubclass(category, DatasetTooSmallWarning):
        print(f"fine-tuner: warning: {message}", file=sys.stderr)


def _log_dir(cfg: Config) -> Path:
    base = cfg.paths.log_dir or os.environ.get("LOGS_DIRECTORY")
    return Path(base) if base else Path(cfg.paths.root)


def _configure_logging(cfg: Config, args: argparse.Namespace, *, stdout: bool) -> None:
    from . import logconfig

    level = "DEBUG" if (args.debug or cfg.debug) else "INFO"
    stream = sys.stdout if stdout else (sys.stderr if args.debug else None)
    log_file = _log_dir(cfg) / "fine_tuner.log" if not stdout else None
    logconfig.configure(level=level, stream=stream, log_file=log_file)


def _with_root(cfg: Config, root: str | None) -> Config:
    if not root:
        return cfg
    return dataclasses.replace(cfg, paths=dataclasses.replace(cfg.paths, root=root))


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # `fine-tuner status | head`: the reader left; say nothing more (a second error would
        # come from flushing stdout at exit, so point it at /dev/null)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command != "watch":
        warnings.showwarning = _show_warning
    try:
        # the same file for every command: --config, $FINE_TUNER_CONFIG, <root>/config.yaml, /etc
        args.config_file = find_config_file(args.config, os.environ, getattr(args, "root", None))
        cfg = load_config(args.config_file.path, os.environ, checks=(defaults_problems,))
    except ConfigError as exc:
        return _fail(str(exc), EXIT_CONFIG if args.command == "watch" else EXIT_USAGE)
    if args.command != "watch":  # watch sets its own
        # what any command writes (its fine_tuner.log, serve's state folder) is the caller's alone,
        # or also the group's where the daemon shares its folders with one (paths.group)
        os.umask(0o007 if cfg.paths.group else 0o077)
    handler = {"process": _cmd_process, "validate": _cmd_validate, "check": _cmd_check,
               "watch": _cmd_watch, "status": _cmd_status, "evaluate": _cmd_evaluate,
               "rate": _cmd_rate, "serve": _cmd_serve, "cancel": _cmd_cancel, "retry": _cmd_retry,
               "promote": _cmd_promote, "report": _cmd_report, "config": _cmd_config,
               "retrain": _cmd_retrain}[args.command]
    try:
        return handler(cfg, args)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_CONFIG if args.command == "watch" else EXIT_USAGE)
    except JournalError as exc:
        # a damaged, locked or unwritable journal needs an operator: systemd must not restart-loop
        # on it; a full disk passes by itself, so systemd may start the daemon again
        return _fail(str(exc), _watch_code(args, full=exc.disk_full))
    except (FineTunerError, DatasetTooSmallWarning) as exc:
        text = f"{exc} ({exc.hint})" if isinstance(exc, DatasetTooSmallWarning) else str(exc)
        return _fail(_for_command_line(text), EXIT_FAILED)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except BrokenPipeError:
        raise  # main() ends quietly on it
    except OSError as exc:
        # a state folder that cannot be written (a read-only mount, permissions) or a full disk:
        # one line naming the file rather than a traceback
        return _fail(_os_error_line(exc), _watch_code(args, full=exc.errno in _NO_SPACE,
                                                      operator=exc.errno in _NOT_WRITABLE))


def _watch_code(args: argparse.Namespace, *, full: bool, operator: bool = True) -> int:
    """The exit status for a journal or file-system error: for ``watch`` (systemd) 75 when it passes
    by itself (a full disk: the unit starts the daemon again), 78 when an operator must act (the
    unit does not restart-loop), else 1; other commands 1."""
    if args.command != "watch":
        return EXIT_FAILED
    if full:
        return EXIT_TEMPFAIL
    return EXIT_CONFIG if operator else EXIT_FAILED


def _os_error_line(exc: OSError) -> str:
    """An OS error as one line: the file, the system's reason and what to do (never data: an OS
    error's text is its errno's description and the path)."""
    where = f"{exc.filename}: " if exc.filename else ""
    text = f"{where}{exc.strerror or type(exc).__name__}"
    if exc.errno in _NO_SPACE:
        return f"{text} (free space on its disk; the service retries by itself)"
    if exc.errno in _NOT_WRITABLE:
        return (f"{text} (make the folders under --root and the state directory writable for the "
                "service, then start it again)")
    return text


def _private_outputs() -> None:
    """What a command writes from patient records is the caller's alone, as the daemon's outputs
    are (0600 files, 0700 folders, the log file too), whatever the caller's umask."""
    os.umask(0o077)


def _cmd_process(cfg: Config, args: argparse.Namespace) -> int:
    from .data.jobsettings import job_settings
    from .fine_tuner import FineTuner, JobInputs
    from .fsutil import not_a_file

    _private_outputs()
    _configure_logging(cfg, args, stdout=False)
    csv_path = Path(args.input)
    if (problem := not_a_file(csv_path)) is not None:
        return _fail(f"{csv_path}: {problem}; pass the formatted dataset CSV with --input", EXIT_USAGE)
    if args.mapping and not Path(args.mapping).is_file():
        return _fail(f"{args.mapping}: no such file; pass the rating mapping with --mapping", EXIT_USAGE)
    settings = job_settings(cfg.defaults, _job_values(args, PROCESS_FLAGS), source="command line")
    out_dir = Path(args.output_dir) if args.output_dir else _new_output_dir(
        Path(cfg.paths.root) / cfg.paths.outputs, csv_path.stem)
    tuner = FineTuner(debug_mode=args.debug, fallback_mode=settings.fallback, config=cfg)
    progress = _progress_printer() if sys.stderr.isatty() else None
    with structlog.contextvars.bound_contextvars(job_id=out_dir.name):
        ok, meta = tuner.run_job(JobInputs(
            csv_path=csv_path, mapping_path=Path(args.mapping) if args.mapping else None, settings=settings,
            output_dir=out_dir, stem=csv_path.stem, job_id=out_dir.name, staged=True, on_progress=progress))
    if progress is not None:
        print(file=sys.stderr)
    reg = meta.get("registration") or {}
    print(f"approach: {meta['approach']} ({meta.get('approach_reason', '')})")
    print(f"rows: {meta['rows']['used']} used of {meta['rows']['read']} read")
    for warning in meta.get("warnings") or []:
        print(f"warning: {warning}")
    print(f"outputs: {out_dir}")
    if reg:
        print("ollama: " + ("registered as " + reg.get("name", "") if reg.get("registered")
                            else "not registered: " + str(reg.get("reason", ""))))
    evaluation = meta.get("evaluation") or {}
    print(_evaluation_line(evaluation, out_dir))
    if evaluation.get("verdict"):
        print(f"verdict: {evaluation['verdict']}")
    return EXIT_OK if ok else EXIT_FAILED


def _new_output_dir(outputs: Path, stem: str) -> Path:
    """``outputs/<stem>`` on the first run; later runs get ``<stem>-<UTC time>`` (and ``-N``), so an
    earlier result is never replaced."""
    from datetime import UTC, datetime

    first = outputs / stem
    if not first.exists():
        return first
    from .fsutil import unique_path

    return unique_path(outputs / f"{stem}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}")


def _evaluation_line(evaluation: dict, out_dir: Path) -> str:
    """One line on how the new model rates against the experts (or why it was not measured)."""
    if evaluation.get("status") != "done":
        return f"evaluation: {evaluation.get('status', 'not run')}" + (
            f" ({evaluation['reason']})" if evaluation.get("reason") else "")
    models = {m["model"]: m for m in evaluation.get("models") or []}

    def k(key: str) -> str:
        value = (models.get(key) or {}).get("kappa")
        return "n/a" if value is None else f"{value:.2f}"
    new = models.get("new") or {}
    acc = new.get("accuracy")
    return (f"evaluation: kappa {k('new')} (base model {k('base')}), accuracy "
            f"{'n/a' if acc is None else f'{acc:.2f}'} on {evaluation.get('rows')} held-out rows; "
            f"see {out_dir / 'evaluation.md'}")


def _bar(title: str):
    """A one-line progress bar on stderr: ``show(percent, detail)`` redraws it."""
    def show(pct: float, detail: str = "") -> None:
        filled = int(max(0.0, min(pct, 100.0)) / 100 * 30)
        print(f"\r{title} [{'#' * filled}{'.' * (30 - filled)}] {pct:5.1f}% {detail}", end="",
              file=sys.stderr, flush=True)
    return show


class _RateBar:
    """``rate``'s progress on a terminal: tqdm's bar, advanced per answer, with records/s and the
    ETA (a resumed run starts at the records already rated)."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            # the terminal's size, 80 x 24 where it reports none (a fresh pseudo-terminal reports
            # 0 x 0, and tqdm hides a bar below the last of 0 rows)
            try:
                size = os.get_terminal_size(sys.stderr.fileno())
                cols, rows = size.columns or 80, size.lines or 24
            except OSError:
                cols, rows = 80, 24
            self.bar = tqdm(total=total, initial=done, unit="record", desc="rating", file=sys.stderr,
                            ncols=cols, nrows=rows, smoothing=0.1)
        self.bar.update(max(0, done - self.bar.n))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _progress_printer():
    """A one-line progress bar on stderr for training (only when stderr is a terminal)."""
    bar = _bar("training")

    def show(event: dict) -> None:
        loss = event.get("loss")
        eta = event.get("eta_s")
        bar(float(event.get("percent") or 0.0), f"step {event.get('step')}/{event.get('total_steps')}"
            + (f" loss {loss:.4f}" if isinstance(loss, (int, float)) else "")
            + (f" eta {eta:.0f}s" if isinstance(eta, (int, float)) else ""))
    return show


def _cmd_validate(cfg: Config, args: argparse.Namespace) -> int:
    from .data.report import validation_report, format_validation_report

    _configure_logging(cfg, args, stdout=False)
    from .data.template import parse_template

    template = _template_arg(args.prompt_template)
    report = validation_report(Path(args.input), Path(args.mapping) if args.mapping else None, cfg,
                               template=parse_template(template) if template is not None else None)
    print(json.dumps(report, indent=2, default=str) if args.json
          else _for_command_line(format_validation_report(report)))
    return EXIT_OK if report["usable"] else EXIT_FAILED


AUTO_BUILDS = {"head": "the head (the base weights are on disk and the training extra is installed)",
               "fine_tune": "a fine-tune (no head: the base weights are not on disk or the training extra is missing)",
               "model_set": "a model set (no head and no fine-tune here; with fallback off, the job fails)"}


def _cmd_check(cfg: Config, args: argparse.Namespace) -> int:
    from .config import model_name_problem
    from .text import printable
    from .fine_tuner import FineTuner, auto_choice

    # the job files' rule, before anything is asked of Ollama or suggested for the config
    if (why := model_name_problem(args.model)) is not None:
        return _fail(f"MODEL '{printable(args.model)}': {why}", EXIT_USAGE)
    _configure_logging(cfg, args, stdout=False)
    report = FineTuner(debug_mode=args.debug, config=cfg).capability_report(args.model)
    builds = auto_choice(report)
    if args.json:
        print(json.dumps({**report.to_dict(), "auto_builds": builds}, indent=2, default=str))
    else:
        print(f"{report.model}: fine-tuning {'supported' if report.supported else 'NOT supported'}")
        print(f"approach auto builds here: {AUTO_BUILDS[builds]}")
        for c in report.checks:
            mark = "ok " if c.ok else ("-- " if not c.required else "NO ")
            print(f"  [{mark}] {c.name}: {c.detail}")
    return EXIT_OK if report.supported else EXIT_FAILED


def _cmd_watch(cfg: Config, args: argparse.Namespace) -> int:
    from .inbox import service

    cfg = _with_root(cfg, args.root)
    _configure_logging(cfg, args, stdout=True)
    return service.run(cfg, once=args.once, config_path=args.config_file.path)


def _cmd_serve(cfg: Config, args: argparse.Namespace) -> int:
    """Start llama-server for an output folder or a GGUF, print the base_url, and keep it running
    until SIGTERM, SIGHUP or Ctrl-C, then stop it cleanly. A signal while the model loads stops the
    server and exits 128 + the signal's number, as a command killed by it would."""
    import signal
    import threading

    from .inbox.paths import resolve_paths
    from .serving.llamaserver import LlamaServer, ServerError, ServerInterrupted, serve_target

    target = Path(args.target)
    if not target.exists():
        return _fail(f"{target}: no such file or folder; name a job's output folder or a .gguf file", EXIT_USAGE)
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)
        stop.set()

    try:
        spec = serve_target(target, base_models=cfg.base_models, ollama_models_dir=cfg.ollama.models_dir,
                            parallel=args.parallel, port=args.port, with_adapter=not args.base_only)
        spec = dataclasses.replace(spec, threads=args.threads)
        log_path = Path(args.log) if args.log else resolve_paths(cfg).state_dir / "llama-server.log"
        server = LlamaServer(spec, log_path=log_path)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, on_signal)
        server.start(stop_event=stop)
    except ServerInterrupted:
        return _fail(f"interrupted ({signal.Signals(received[0]).name}) while llama-server was loading the model; "
                     "the server is stopped", 128 + received[0])
    except ServerError as exc:
        return _fail(f"{exc.message}; {exc.hint}" if exc.hint else exc.message, EXIT_USAGE)
    try:
        print(f"serving {spec.alias} ({len(spec.adapters)} adapter(s), {spec.parallel} slots)", flush=True)
        print(f"base_url: {server.base_url}", flush=True)
        print(f"use it with: --backend openai, openai.base_url: {server.base_url}, openai.model: {spec.alias}",
              flush=True)
        if (columns := _expanded_code_columns(target)):
            print(f"prompts: the model was trained with the ICD-10-CM codes of {', '.join(columns)} explained; "
                  "`fine-tuner rate --model OUTPUT_DIR --backend openai` builds its prompts the same way", flush=True)
        while not stop.wait(0.5):
            if server.proc is None or server.proc.poll() is not None:
                return _fail(f"llama-server stopped by itself; read {log_path}", 1)
    finally:
        server.stop()
    return 0


def _expanded_code_columns(target: Path) -> list[str]:
    """The columns whose codes an output folder's prompts explain (none for a GGUF or an older folder)."""
    from .quality.ratefile import RatingError, model_from_folder

    if not target.is_dir():
        return []
    try:
        template = model_from_folder(target).template
    except RatingError:  # serve_target already accepted the folder; the note is only a hint
        return []
    return list(template.codes) if template is not None else []


def _cmd_evaluate(cfg: Config, args: argparse.Namespace) -> int:
    from .outputs import build, names
    from .outputs.folder import read_metadata
    from .quality import evalreport
    from .quality.heldout import EvaluationSkipped, evaluate_folder
    from .quality.backends import RaterError
    from .quality.ratefile import ModelFolderError, model_from_folder

    _private_outputs()
    _configure_logging(cfg, args, stdout=False)
    folder = Path(args.output_dir)
    if folder.is_symlink():
        return _fail(f"{folder} is a symbolic link; links are never followed: pass the output folder itself",
                     EXIT_USAGE)
    if not os.path.lexists(folder / names.METADATA):
        return _fail(f"{folder}: not an output folder (it has no {names.METADATA}); pass outputs/<job_id>",
                     EXIT_USAGE)
    try:
        model_from_folder(folder)  # every file opened without following a link, every key it reads checked
        meta = read_metadata(folder, error=ModelFolderError)
        report = evaluate_folder(folder, meta, cfg, backend=args.backend or cfg.evaluation.backend,
                                 max_rows=args.max_rows, compare=args.compare)
    except ModelFolderError as exc:
        return _fail(f"cannot evaluate {folder}: {exc.message}", EXIT_FAILED)
    except (EvaluationSkipped, RaterError) as exc:
        return _fail(f"cannot evaluate {folder}: {getattr(exc, 'reason', exc)}", EXIT_FAILED)
    files = evalreport.write_report(report, folder)
    build.record_evaluation(folder, meta, evalreport.metadata_summary(report, files))
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if not k.startswith("_")}, indent=2))
    else:
        print(evalreport.table_text(report))
        print(f"written: {', '.join(str(folder / f) for f in files)}")
        print(f"verdict: {report['verdict']['headline']}")
    return EXIT_OK


def _cmd_rate(cfg: Config, args: argparse.Namespace) -> int:
    from .fsutil import not_a_file
    from .quality import ratefile, raterequest

    _private_outputs()
    _configure_logging(cfg, args, stdout=False)
    csv_path = Path(args.input)
    if (problem := not_a_file(csv_path)) is not None:
        return _fail(f"{csv_path}: {problem}; pass the records to rate (a CSV file) with --input", EXIT_USAGE)
    output = Path(args.output) if args.output else csv_path.with_name(f"{csv_path.stem}.ratings.csv")
    summary_path = output.with_name(f"{output.stem}.summary.json")
    if (problem := ratefile.output_problem(csv_path, output, also=(summary_path,))) is not None:
        return _fail(f"{problem}; pass another --output", EXIT_USAGE)
    if bool(args.model) == bool(args.topic):
        return _fail("name the model with --model NAME|OUTPUT_DIR, or --topic T for the topic's current model "
                     "(one of them)", EXIT_USAGE)
    settings, model = _rating_model(cfg, args)
    bar = _RateBar() if sys.stderr.isatty() else None
    try:
        with structlog.contextvars.bound_contextvars(job_id=output.stem):
            summary = ratefile.rate_file(model, csv_path, output, cfg, backend=args.backend, on_progress=bar,
                                       explain=args.explain,
                                       on_answer=bar)
    finally:
        if bar is not None:
            bar.close()
    with structlog.contextvars.bound_contextvars(job_id=output.stem):
        summary = raterequest.finish(model, summary, csv_path, output, settings, cfg, summary_path)
    counts = ", ".join(f"{label} {n}" for label, n in summary["counts"].items())
    ids = summary.get("id_column")
    print(f"rated: {summary['rated']} of {summary['rows']} records with {summary['model']} ({summary['backend']})")
    print(f"ratings: {counts}; invalid answers {summary['invalid']}")
    print("ids: " + (f"the input column {ids!r}" if ids else
                     "data row numbers (the input has no Row_ID or C_BioSense_ID column)"))
    review = summary.get("needs_review")
    if review:
        print(f"to review: {review['records']} records (invalid, or confidence under {review['threshold']:g}) in "
              f"{output.with_name(review['file'])}")
        if (explained := summary.get("explained_for_review")) is not None:
            print(f"rationales: {explained['rationales']} of the {explained['records']} rated records to review "
                  f"explained in {output.name} ({explained['status']})")
    elif not (summary.get("confidence") or {}).get("source"):
        print(f"confidence: {(summary.get('confidence') or {}).get('note') or 'none'}")
    print(f"outputs: {output}, {summary_path}")
    return EXIT_OK


def _template_arg(text: str | None):
    """``--prompt-template``: a JSON list of columns, or a format string."""
    if text is None:
        return None
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            return json.loads(stripped)
        except ValueError:
            raise ConfigError(["--prompt-template: a list of columns must be a JSON list, e.g. "
                               '["ChiefComplaintOrig", "Age"]'], source="command line") from None
    return text


def _rating_model(cfg: Config, args: argparse.Namespace):
    """``rate``'s request as an inbox rating job's settings (the flags over the configuration's
    defaults), and the model that rates it (``raterequest.rating_model``, as for the inbox): an
    output folder named by its path, the topic's current model, a job's folder in the outputs, or a
    bare Ollama model name with the flags' (or the configuration's) mapping, topic and template."""
    from .data.jobsettings import job_settings
    from .inbox.paths import resolve_paths
    from .outputs import names
    from .quality import raterequest

    cfg = _with_root(cfg, args.root)
    paths = resolve_paths(cfg)
    folder = Path(args.model) if args.model and (Path(args.model) / names.METADATA).is_file() else None
    settings = job_settings(cfg.defaults, {**_job_values(args, RATE_FLAGS), "task": "rate",
                                           "model": None if folder is not None else args.model},
                            source="command line")
    # --mapping as the shell names it; defaults.mapping under the root, as the daemon reads it
    mapping = (Path(args.mapping) if args.mapping
               else paths.root / cfg.defaults.mapping if cfg.defaults.mapping else None)

    def current_folder(topic: str) -> Path:
        from .inbox import control

        return control.current_model_folder(cfg, topic)

    model = raterequest.rating_model(
        settings, cfg, outputs=paths.outputs, mapping=mapping, folder=folder,
        current_folder=current_folder, ask_mapping="pass --mapping FILE or set defaults.mapping",
        source="command line")
    if model.approach is not None and any((args.mapping, args.topics, args.prompt_template, args.topic_definition)):
        raise ConfigError(["--mapping, --topics, --topic-definition and --prompt-template: an output folder "
                           "already says how its model rates; leave them out"], source="command line")
    return settings, model


def _cmd_status(cfg: Config, args: argparse.Namespace) -> int:
    from .inbox import status

    cfg = _with_root(cfg, args.root)
    if args.job_id:
        detail = status.job_detail(cfg, args.job_id)
        print(json.dumps(detail, indent=2, default=str) if args.json else status.format_job(detail))
        return EXIT_OK
    report = status.status(cfg, topic=args.topic, since=args.since, failed_only=args.failed, limit=args.limit)
    print(json.dumps(report, indent=2, default=str) if args.json else status.format_status(report))
    return EXIT_OK


def _cmd_report(cfg: Config, args: argparse.Namespace) -> int:
    from .fsutil import write_problem, write_text
    from .inbox import history
    from .inbox.paths import resolve_paths

    cfg = _with_root(cfg, args.root)
    journal = resolve_paths(cfg).journal
    if args.output and (problem := write_problem(args.output, inputs=(
            journal, f"{journal}-wal", f"{journal}-shm"))) is not None:  # as rate --output
        return _fail(f"{args.output} {problem}; pass another --output", EXIT_USAGE)
    if args.curve and args.format == "html":
        return _fail("--curve is a table: use --format text, csv or json", EXIT_USAGE)
    if args.curve:
        text = history.render_curve(history.curve_rows(cfg, topic=args.topic), args.format)
    else:
        text = history.render(history.report_rows(cfg, topic=args.topic, since=args.since), args.format)
    if args.output:
        write_text(args.output, text)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def _cmd_cancel(cfg: Config, args: argparse.Namespace) -> int:
    from .text import printable
    from .inbox import control

    cfg = _with_root(cfg, args.root)
    _configure_logging(cfg, args, stdout=False)
    state = control.request_cancel(cfg, args.job_id)
    job = printable(args.job_id)
    print(f"cancel requested for {job} ({state})")
    if args.wait <= 0:
        return EXIT_OK
    after = control.wait_for_cancel(cfg, args.job_id, args.wait)
    if after is None:
        print(f"the daemon has not acted on it within {args.wait:g} s (is it running?); it will when it next runs")
        return EXIT_FAILED
    if after == "failed":
        print(f"cancelled: {job}'s inputs are in failed/{job}/; 'fine-tuner retry {job}' runs it again")
        return EXIT_OK
    print(f"{job} finished ({after}) before it could be cancelled")
    return EXIT_FAILED


def _cmd_retry(cfg: Config, args: argparse.Namespace) -> int:
    from .text import printable
    from .inbox import control

    cfg = _with_root(cfg, args.root)
    _configure_logging(cfg, args, stdout=False)
    overrides = {k: v for k, v in _job_values(args, RETRY_FLAGS).items() if v is not None}
    dropped = control.retry(cfg, args.job_id, overrides)
    print(f"{printable(args.job_id)} dropped into the inbox again: {', '.join(map(printable, dropped))}")
    print("'fine-tuner status' shows the new job")
    return EXIT_OK


def _cmd_retrain(cfg: Config, args: argparse.Namespace) -> int:
    from .text import printable
    from .fsutil import not_a_file
    from .inbox import control

    cfg = _with_root(cfg, args.root)
    _configure_logging(cfg, args, stdout=False)
    reviewed = Path(args.reviewed)
    if (problem := not_a_file(reviewed)) is not None:
        return _fail(f"{reviewed}: {problem}; pass the reviewed CSV (needs_review.csv with Expert Rating filled in)",
                     EXIT_USAGE)
    if args.mapping and (problem := not_a_file(Path(args.mapping))) is not None:
        return _fail(f"{args.mapping}: {problem}; pass the rating mapping with --mapping", EXIT_USAGE)
    done = control.retrain(cfg, args.topic, reviewed, mapping=Path(args.mapping) if args.mapping else None)
    print(f"dropped into the inbox as a retrain of {printable(done['topic'])!r} (starting from job "
          f"{printable(done['base_job'])}): {', '.join(map(printable, done['dropped']))}")
    if args.wait <= 0:
        print("'fine-tuner status' shows the new job; 'fine-tuner report --curve' its place on the learning curve")
        return EXIT_OK
    ended = control.wait_for_retrain(cfg, done["sha256"], done["since"], args.wait)
    if ended is None:
        print(f"the daemon has not finished it within {args.wait:g} s (is it running?); "
              "'fine-tuner status' shows it")
        return EXIT_FAILED
    record, training = ended["record"], ended["training"]
    job = printable(record.id)
    if record.state == "duplicate":
        print(f"{job}: nothing new (every reviewed row is already among the topic's training rows); no model built")
        return EXIT_OK
    if record.state == "failed":
        error = record.error or {}
        print(f"{job} failed: {printable(str(error.get('message', '')), limit=500)}"
              + (f" ({printable(str(error['hint']), limit=500)})" if error.get("hint") else ""))
        return EXIT_FAILED
    if training is not None:
        print(f"{job}: {training['rows']} training rows ({training['rows_before']} before, {training['rows_added']} "
              f"added, {training['duplicates']} duplicates, {training['conflicts']} conflicts, "
              f"{training['unreviewed_skipped']} not reviewed and skipped)")
    print(f"outputs: {printable(str(_output_of(cfg, record)), limit=4096)}")
    return EXIT_OK


def _output_of(cfg: Config, record) -> Path | None:
    from .inbox.paths import resolve_paths

    return resolve_paths(cfg).output_folder(record.output_path)


def _cmd_promote(cfg: Config, args: argparse.Namespace) -> int:
    from .text import printable
    from .inbox import control

    cfg = _with_root(cfg, args.root)
    _configure_logging(cfg, args, stdout=False)
    done = control.promote(cfg, args.job_id, topic=args.topic, force=args.force)
    print(f"current model for {printable(done['topic'])!r}: job {printable(args.job_id)}"
          + (f", {done['model']}" if done["model"] else ""))
    if done["alias"]:
        print(f"ollama: {done['alias']} now points at it")
    elif done["alias_note"]:
        print(f"ollama: no alias ({done['alias_note']})")
    print(f"rate with it: fine-tuner rate --topic {json.dumps(done['topic'])} --input CSV")
    return EXIT_OK


_FOUND_BY = {"--config": "named by --config", "FINE_TUNER_CONFIG": "named by $FINE_TUNER_CONFIG",
             "root": "the root's config.yaml", "system": "the system's config file"}


def _cmd_config(cfg: Config, args: argparse.Namespace) -> int:
    """The effective configuration, one setting a line with where it came from."""
    from .config import value_sources

    found = args.config_file
    rows = value_sources(_with_root(cfg, args.root), found, os.environ)
    rows = [(k, v, "flag --root" if k == "paths.root" and args.root else w) for k, v, w in rows]
    if args.json:
        print(json.dumps({"file": found.path, "found_by": found.found_by, "looked_at": list(found.looked_at),
                          "settings": [{"key": k, "value": v, "source": w} for k, v, w in rows]},
                         indent=2, default=str))
        return EXIT_OK
    if found.path is None:
        print(f"config file: none (looked at {', '.join(found.looked_at)}); built-in defaults")
    else:
        print(f"config file: {found.path} ({_FOUND_BY[found.found_by]})")
    for key, value, where in rows:
        print(f"{key}: {json.dumps(value, default=str)}  ({where})")
    return EXIT_OK
