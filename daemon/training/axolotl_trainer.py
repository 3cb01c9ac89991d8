"""The axolotl trainer child: ``python -m daemon.training.axolotl_trainer <run spec>`` (``training.backend:
axolotl``) trains the job's adapter with axolotl and exits, with the same contract as
``daemon.training.trainer``: the same run spec, exit codes and outputs.

It runs ``accelerate launch -m axolotl.cli.train training_config.yaml`` in the job folder, on the
job's own training_config.yaml: accelerate starts one process per GPU of the machine (its default
config, or the one ``accelerate config`` wrote), and the DeepSpeed / FSDP keys of the file
(``training.axolotl``) reach axolotl as written. Only what this run needs differently from a run
by hand is given on axolotl's command line: the base weights found on this machine, an output
and a prepared-data folder in ``.trainer-work`` (never ``adapter/`` or ``trainer-output/``; removed
after the run, checkpoints included), and ``daemon.training.axolotl_plugin.ProgressPlugin``, which
writes ``training_log.jsonl`` and
the summary behind ``training_result.json`` from the Trainer's logs. When axolotl is done, the
adapter's two files become ``adapter/`` whole (``trainer.publish_adapter``).

Supervision as with the built-in trainer: the parent's timeout and stop signal the whole process
group (accelerate and its workers are in it); on SIGTERM this process waits for axolotl to end
instead of leaving first; when the supervising parent dies, it stops the group and exits 4.
axolotl's telemetry is switched off: the run's settings never leave the machine.

Exit codes: 0 done; 2 the spec or device is unusable, or axolotl is not installed; 4 the parent
died; 1, or axolotl's own code, for anything else (axolotl's output is in trainer_stderr.log).
This module imports neither torch nor axolotl (axolotl runs in the processes it starts).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ..fsutil import read_json_object, temp_dir_for
from .trainer import ADAPTER, ADAPTER_FILES, EXIT_ORPHANED, EXIT_SPEC, TrainerExit, publish_adapter, run_child

POLL_S = 0.2
PLUGIN = "daemon.training.axolotl_plugin.ProgressPlugin"
PROGRESS_ENV = "FT_AXOLOTL_PROGRESS"  # where the plugin appends training_log.jsonl records
SUMMARY_ENV = "FT_AXOLOTL_SUMMARY"  # where it writes the end-of-run figures
# axolotl sends usage telemetry unless told not to (AXOLOTL_DO_NOT_TRACK); the Hub's too
NO_TELEMETRY = {"AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def _say(message: str) -> None:
    print(f"trainer: {message}", file=sys.stderr, flush=True)


def axolotl_missing() -> str | None:
    """Why axolotl cannot be run from this Python, or None (found, not imported)."""
    missing = [name for name in ("axolotl", "accelerate") if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed in {sys.prefix}: "
            "install the extra with pip install 'fine-tuner[axolotl]'")


def _plugins(config_path: Path) -> list[str]:
    """The plugins training_config.yaml names, with the progress plugin added."""
    try:
        cfg = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise TrainerExit(EXIT_SPEC, f"cannot read {config_path.name}: {type(exc).__name__}") from None
    plugins = cfg.get("plugins") if isinstance(cfg, dict) else None
    plugins = [str(p) for p in plugins] if isinstance(plugins, list) else []
    return plugins if PLUGIN in plugins else [*plugins, PLUGIN]


def command(spec: dict, work: Path) -> list[str]:
    """accelerate launch on the job's training_config.yaml, with this run's own settings."""
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    if spec.get("device") == "cpu":
        launch.append("--cpu")
    config = Path(spec["config_path"])
    return [*launch, "-m", "axolotl.cli.train", config.name,
            f"--base_model={spec['base_ref']}",
            f"--output_dir={work / 'output'}",
            f"--dataset_prepared_path={work / 'prepared'}",
            f"--plugins={json.dumps(_plugins(config))}"]


def axolotl_env(spec: dict, job_dir: Path, work: Path) -> dict[str, str]:
    env = {**os.environ, **NO_TELEMETRY,
           PROGRESS_ENV: str(job_dir / "training_log.jsonl"), SUMMARY_ENV: str(work / "summary.json")}
    if spec.get("device") == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def check_device(requested: str) -> None:
    """training.device cuda/mps must exist (torch is imported only to ask)."""
    if requested in ("cuda", "mps"):
        from .trainer import pick_device

        pick_device(requested)


class _Supervisor:
    """Waits for axolotl; stops it when the parent is gone; on SIGTERM lets it end first."""

    def __init__(self, proc: subprocess.Popen, parent_pid: int | None, grace_s: float) -> None:
        self.proc, self.parent_pid, self.grace_s = proc, parent_pid, grace_s
        self.terminated = False
        signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, signum, frame) -> None:
        # the parent signalled the whole group: axolotl got it too and is shutting down
        self.terminated = True

    def wait(self) -> int:
        deadline = None
        while True:
            code = self.proc.poll()
            if code is not None:
                return 128 + signal.SIGTERM if self.terminated else code
            if self.parent_pid and os.getppid() != self.parent_pid:
                _say("the supervising process is gone; stopping axolotl")
                self._stop_group()
                return EXIT_ORPHANED
            if self.terminated and deadline is None:
                deadline = time.monotonic() + self.grace_s
            if deadline is not None and time.monotonic() > deadline:
                return 128 + signal.SIGTERM  # the parent escalates to SIGKILL for the group
            time.sleep(POLL_S)

    def _stop_group(self) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.killpg(os.getpgrp(), signal.SIGTERM)
        try:
            self.proc.wait(timeout=self.grace_s)
        except subprocess.TimeoutExpired:
            pass
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.killpg(os.getpgrp(), signal.SIGKILL)  # takes this process too: nobody waits for it


def _count_rows(path: str | None) -> int:
    if not path or not os.path.exists(path):
        return 0
    with open(path, "rb") as fh:
        return sum(1 for line in fh if line.strip())


def collect(spec: dict, job_dir: Path, work: Path, started: float) -> dict:
    """Publish the adapter axolotl saved and return training_result.json's figures."""
    saved = work / "output"
    missing = [name for name in ADAPTER_FILES if not (saved / name).is_file()]
    if missing:
        raise TrainerExit(1, f"axolotl finished but saved no {', '.join(missing)}")
    tmp = temp_dir_for(job_dir / ADAPTER)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in ADAPTER_FILES:
        os.replace(saved / name, tmp / name)
    publish_adapter(tmp, job_dir, spec["base_name"], spec)
    summary = read_json_object(work / "summary.json")
    if not summary:
        raise TrainerExit(1, "axolotl finished but the progress plugin wrote no summary")
    trained, validation = summary.get("rows_trained") or 0, summary.get("rows_validation") or 0
    summary.update(
        backend="axolotl",
        duration_s=round(time.monotonic() - started, 3),
        rows_dropped_too_long=max(0, _count_rows(spec["train_path"]) - trained),
        validation_rows_dropped_too_long=max(0, _count_rows(spec.get("validation_path")) - validation),
    )
    return summary


def train(spec: dict, started: float) -> dict:
    """Run axolotl on the job under supervision; the figures of training_result.json."""
    why = axolotl_missing()
    if why:
        raise TrainerExit(EXIT_SPEC, why)
    check_device(spec.get("device", "auto"))
    job_dir = Path(spec["output_dir"])
    work = Path(spec.get("work_dir") or job_dir / ".trainer-work")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    proc = subprocess.Popen(command(spec, work), cwd=job_dir, stdin=subprocess.DEVNULL,
                            env=axolotl_env(spec, job_dir, work))
    code = _Supervisor(proc, spec.get("parent_pid"), float(spec.get("grace_s", 10.0))).wait()
    if code != 0:
        raise TrainerExit(code if 0 < code < 256 else 1, f"axolotl ended with exit code {code}")
    return collect(spec, job_dir, work, started)


def main(argv: list[str] | None = None) -> int:
    return run_child(argv, "daemon.training.axolotl_trainer", train,
                     lambda m: f"done with axolotl: {m['steps']} steps, train loss {m.get('train_loss')}")


if __name__ == "__main__":
    sys.exit(main())
