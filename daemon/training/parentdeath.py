"""Children that end with the process that started them, however it ends.

A parent's handlers and ``finally`` blocks cannot run when it is killed with SIGKILL (the OOM
killer, ``kill -9``, a crash), and its llama-server or trainer would then keep the port, the
memory and the GPU. Linux's ``prctl(PR_SET_PDEATHSIG)`` has the kernel signal the child when its
parent ends; it has to be set in the child before it runs the program. Python's ``preexec_fn``
could do it, but it is not safe in a process with threads (the daemon has several), so a program
is started through this file instead: ``tied_to_this_process(argv)`` gives
``python -I -S parentdeath.py PARENT_PID SIGNAL -- argv...``, which sets the signal, ends at once
when PARENT_PID is already gone (it died before the signal was set), then execs the program in the
same process (same pid, the setting kept); where a sandbox refuses prctl, the program still runs
(with a line on its stderr saying so). This file imports only the standard library: it runs
without the package. The kernel sends the signal when the *thread* that started the child ends,
so start a child from the thread that waits for it. Elsewhere than Linux the argv is run as it is.
"""

from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
HERE = os.path.abspath(__file__)


def supported() -> bool:
    return sys.platform.startswith("linux")


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> str | None:
    """The kernel sends this process ``sig`` when its parent ends; if the parent (``parent_pid``)
    has already ended, the signal is raised here and now. Returns why the kernel could not be
    told (a sandbox refusing prctl), None when it was."""
    import ctypes

    problem = None
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        problem = f"prctl(PR_SET_PDEATHSIG): {os.strerror(ctypes.get_errno())}"
    if os.getppid() != parent_pid:  # the parent died before the setting: re-parented already
        os.kill(os.getpid(), sig)
    return problem


def tied_to_this_process(argv: list[str], sig: int = signal.SIGKILL) -> list[str]:
    """The command line that runs ``argv`` so that it receives ``sig`` when this process (the
    thread calling this, see above) ends."""
    if not supported():
        return list(argv)
    return [sys.executable, "-I", "-S", HERE, str(os.getpid()), str(int(sig)), "--", *argv]


def main(args: list[str]) -> int:
    if len(args) < 4 or args[2] != "--":
        print("usage: parentdeath.py PARENT_PID SIGNAL -- PROGRAM [ARGS...]", file=sys.stderr)
        return 2
    problem = die_with_parent(int(args[0]), int(args[1]))
    if problem is not None:  # the program still runs; its parent's own stop is the only one then
        print(f"parentdeath: {problem}; {args[3]} will not end with its parent", file=sys.stderr, flush=True)
    try:
        os.execv(args[3], args[3:])
    except OSError as exc:
        print(f"cannot run {args[3]}: {exc.strerror}", file=sys.stderr)
        return 127
    return 0  # not reached: execv does not return


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
