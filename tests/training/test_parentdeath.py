"""Children that end with the process that started them: the exec wrapper, and a trainer child
whose parent was killed with SIGKILL."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from daemon.training import parentdeath
from daemon.training.supervisor import group_members
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]


def test_a_child_whose_parent_is_already_gone_ends_at_once():
    """The wrapper started for a parent that is not (any more) its parent raises the signal on
    itself instead of running the program: the parent died before the kernel was told."""
    res = subprocess.run([sys.executable, "-I", "-S", parentdeath.HERE, "1", str(int(signal.SIGTERM)), "--",
                          "/bin/sleep", "30"], timeout=30)
    assert res.returncode == -signal.SIGTERM


def test_a_program_that_cannot_run_is_one_line_and_exit_127(tmp_path):
    """A program the wrapper cannot exec: exit 127 and a line naming it, as a shell says it."""
    res = subprocess.run(parentdeath.tied_to_this_process([str(tmp_path / "nothing")]), capture_output=True,
                         text=True, timeout=30)
    assert (res.returncode, res.stdout, res.stderr) == (127, "", f"cannot run {tmp_path / 'nothing'}: "
                                                                 "No such file or directory\n")


def test_the_wrapped_program_keeps_the_pid_and_its_arguments(tmp_path):
    """The program runs in the wrapper's own process (exec), with its arguments as given."""
    proc = subprocess.Popen(parentdeath.tied_to_this_process(["/bin/sh", "-c", "echo $$ \"$0\"", "a b"]),
                            stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=30)
    assert out == f"{proc.pid} a b\n"


_TRAINING_PARENT = """
import sys
from daemon.config import TrainingConfig
from daemon.training.supervisor import BaseWeights, run_training
base = BaseWeights(ollama_name="tiny", ref=None, hf_id="tiny/tiny", local_dir=sys.argv[2], model_type="llama",
                   has_chat_template=True, problem=None)
run_training(sys.argv[1], base=base, training=TrainingConfig(), timeout_s=600)
"""


def test_a_trainer_ends_when_the_daemon_is_killed(tmp_path):
    """The process running a training killed with SIGKILL (its finally blocks never run): the
    kernel ends the trainer child too, instead of letting it train on for nobody."""
    job = tmp_path / "job"
    job.mkdir()
    (job / "training_config.yaml").write_text("datasets:\n  - path: training_data.jsonl\n")
    (job / "training_data.jsonl").write_text("")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FT_TRAINER_TEST_HOOK": "hang", "FT_TRAINER_TEST_HANG_S": "600"}
    parent = subprocess.Popen([sys.executable, "-c", _TRAINING_PARENT, str(job), str(tmp_path)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children = Path(f"/proc/{parent.pid}/task/{parent.pid}/children")
    trainer = None
    try:
        wait_for(lambda: "test hook hang: sleeping" in _text(job / "trainer_stderr.log"), timeout=60,
                 message="the trainer to start")
        [trainer] = [int(pid) for pid in children.read_text().split()]
        parent.kill()
        parent.wait(timeout=30)
        wait_for(lambda: not group_members(trainer), timeout=10, message="the trainer to end with its parent")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if trainer is not None:
            with contextlib.suppress(OSError):
                os.killpg(trainer, signal.SIGKILL)


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""
