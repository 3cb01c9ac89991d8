"""The documented service install, run for real as far as it goes without systemd.

The commands of systemd/INSTALL.md's code blocks (the README's short version is the same) run as
root in a temporary system root: ``/srv``, ``/etc`` and ``/opt`` become folders of it, and the
documents' user ``fine-tuner``, group ``analysts`` and analyst ``alice`` become unique temporary
accounts (useradd / groupadd here, userdel / groupdel at the end). By rule, not by hand: a line
starting with ``systemctl`` is skipped (there is no systemd here; tests/integration/
test_systemd_unit.py checks the unit), and ``git clone <repo> DIR`` is this working tree copied to
DIR with a virtual environment that reuses this checkout's installed packages, so that the rest of
that line (``cd DIR && make .venv/.installed``) runs for real and finds it up to date. Then the
unit's ExecStart runs with ``--once`` as the service user (``setpriv``), with the unit's umask,
working directory, Environment= and environment file and the state and logs directories systemd
would make, drained of an Ollama that does not answer.

The root is a folder of /tmp rather than ``tmp_path``: pytest keeps ``tmp_path`` under a 0700
folder of root's that no other user may enter.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from daemon.data.synthetic import MAPPING, write_csv
from tests.integration.conftest import REPO

INSTALL = REPO / "systemd" / "INSTALL.md"
README = REPO / "docs" / "operations.md"  # the short version of the install steps
UNIT = REPO / "systemd" / "fine-tuner.service"
SHARED_GROUP_DROP_IN = REPO / "systemd" / "shared-group.conf"
PREFIXES = ("/srv/", "/etc/", "/opt/")  # the system folders the documents write to
DOCUMENT_NAMES = ("fine-tuner", "analysts", "alice")  # the accounts the documents name
CLONE = re.compile(r"git clone <repo> (?P<dir>\S+) && ")
TIMEOUT_S = 180
PURELIB = "import sysconfig; print(sysconfig.get_paths()['purelib'])"


# --- the temporary system ---------------------------------------------------------------------

@pytest.fixture
def system_root() -> Iterator[Path]:
    """An empty system root (``srv``, ``etc/systemd/system``, ``opt``, ``var``), 0755 like ``/``."""
    root = Path(tempfile.mkdtemp(prefix="fine-tuner-system-", dir="/tmp"))
    for sub in ("srv", "etc/systemd/system", "opt", "var/lib", "var/log", "staging"):
        (root / sub).mkdir(parents=True)
    for folder in (root, *root.rglob("*")):
        folder.chmod(0o755)
    yield root
    shutil.rmtree(root)


@pytest.fixture
def accounts() -> Iterator[dict[str, str]]:
    """Unique names for the documents' accounts (and an outsider); every account made is removed."""
    tag = secrets.token_hex(3)
    names = {"fine-tuner": f"ftsvc{tag}", "analysts": f"ftgrp{tag}", "alice": f"ftana{tag}",
             "outsider": f"ftout{tag}"}
    yield names
    for user in (names["fine-tuner"], names["alice"], names["outsider"]):
        subprocess.run(["userdel", user], capture_output=True, timeout=60)
    for group in (names["analysts"], names["fine-tuner"]):
        subprocess.run(["groupdel", group], capture_output=True, timeout=60)
    assert [n for n in names.values() if _exists(n)] == []


def _exists(name: str) -> bool:
    for lookup in (pwd.getpwnam, grp.getgrnam):
        try:
            lookup(name)
            return True
        except KeyError:
            pass
    return False


def _useradd(name: str) -> None:
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True, timeout=60)


# --- the documents' commands -------------------------------------------------------------------

def _block(path: Path, after: str) -> list[str]:
    """The command lines of the first fenced code block after the text ``after`` in ``path``."""
    text = path.read_text(encoding="utf-8")
    start = text.index(after)
    match = re.compile(r"^\s*```(?:sh|bash)\n(.*?)^\s*```", re.M | re.S).search(text, start)
    assert match is not None, f"no code block after {after!r} in {path.name}"
    return [line.strip() for line in match.group(1).splitlines() if line.strip()]


def _rewrite(text: str, root: Path, names: dict[str, str]) -> str:
    """``text`` for the temporary system: the system folders under ``root``, the accounts renamed
    (a name standing alone, not part of a path or a file name such as ``fine-tuner.env``)."""
    for prefix in PREFIXES:
        text = re.sub(rf"(?<![\w./-]){re.escape(prefix)}", f"{root}{prefix}", text)
    for name in DOCUMENT_NAMES:
        text = re.sub(rf"(?<![\w./-]){re.escape(name)}(?![\w.-])", names[name], text)
    return text


def _run_block(lines: list[str], root: Path, names: dict[str, str], cwd: Path) -> None:
    """Run a block's lines as one root shell session in the temporary system (see the module)."""
    script = ["set -euo pipefail"]
    for line in (_rewrite(line, root, names) for line in lines):
        if line.split()[0] == "systemctl":  # no systemd here
            continue
        if match := CLONE.match(line):
            _install_checkout(Path(match["dir"]))
            line = line[match.end():]
        script.append(line)
    proc = subprocess.run(["bash", "-c", "\n".join(script)], cwd=cwd, capture_output=True, text=True,
                          timeout=TIMEOUT_S, umask=0o022)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def _install_checkout(app: Path) -> None:
    """What ``git clone`` and ``make .venv/.installed`` leave in ``app``, without the network: this
    working tree's files (tracked and new), and ``.venv`` made by an interpreter any user may run,
    reaching this checkout's installed packages through a ``.pth`` file (after ``app`` itself, so
    that ``daemon`` is the copy), with pip's ``fine-tuner`` script and make's stamp."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, check=True, capture_output=True, timeout=60).stdout
    old_umask = os.umask(0o022)
    try:
        for name in filter(None, listed.split(b"\0")):
            src, dest = REPO / os.fsdecode(name), app / os.fsdecode(name)
            if src.is_file() and not src.is_symlink():
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest)
        venv = app / ".venv"
        subprocess.run([_python_for_everyone(), "-m", "venv", "--without-pip", str(venv)],
                       check=True, capture_output=True, timeout=TIMEOUT_S)
        site_dir = subprocess.run([venv / "bin" / "python", "-c", PURELIB], check=True, capture_output=True,
                                  text=True, timeout=60).stdout.strip()
        packages = sysconfig.get_paths()["purelib"]
        assert _others_may_enter(Path(packages)), f"other users cannot read {packages}: see `namei -l {packages}`"
        (Path(site_dir) / "fine_tuner_checkout.pth").write_text(
            f"{app}\nimport site; site.addsitedir({packages!r})\n")
        script = venv / "bin" / "fine-tuner"
        script.write_text(f"#!{venv}/bin/python\nimport sys\nfrom daemon.cli import main\n"
                          "if __name__ == '__main__':\n    sys.exit(main())\n")
        script.chmod(0o755)
        (venv / ".installed").touch()
    finally:
        os.umask(old_umask)


def _others_may_enter(path: Path) -> bool:
    """Whether a user who is neither owner nor in the group may reach ``path`` (what ``namei -l``
    shows): every folder on the way, and ``path`` itself, has the x bit for others."""
    real = Path(os.path.realpath(path))
    return all(p.stat().st_mode & 0o001 for p in (real, *real.parents))


def _python_for_everyone() -> str:
    """An interpreter of this Python version that other users may run: this one's base interpreter
    when they can reach it, else the system's (a checkout's interpreter may live under /root)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [Path(sys.base_prefix) / "bin" / f"python{version}", Path(f"/usr/bin/python{version}"),
                  Path(f"/usr/local/bin/python{version}")]
    for candidate in candidates:
        if candidate.exists() and _others_may_enter(candidate):
            return str(candidate)
    pytest.fail(f"no Python {version} that other users may run among {', '.join(map(str, candidates))}")


# --- systemd, as far as a test can be it -------------------------------------------------------

def _unit(*drop_ins: Path) -> dict[str, list[str]]:
    """The [Service] assignments of the shipped unit, then of each drop-in, in systemd's order."""
    settings: dict[str, list[str]] = {}
    for path in (UNIT, *drop_ins):
        section = ""
        for line in (raw.strip() for raw in path.read_text().splitlines()):
            if line.startswith("["):
                section = line
            elif section == "[Service]" and "=" in line and not line.startswith("#"):
                key, _, value = line.partition("=")
                settings.setdefault(key, []).append(value)
    return settings


def _env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of an EnvironmentFile= (comments and blank lines skipped)."""
    lines = (line.strip() for line in path.read_text().splitlines())
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith(("#", ";")))


def _start_service(root: Path, names: dict[str, str], settings: dict[str, list[str]]) -> subprocess.CompletedProcess:
    """ExecStart with ``--once``, as systemd would start it: as User=/Group= with their groups
    (setpriv --init-groups), UMask=, WorkingDirectory=, Environment=, the EnvironmentFile= read by
    root, and StateDirectory=/LogsDirectory= made for the user with their modes."""
    def last(key: str) -> str:
        return _rewrite(settings[key][-1], root, names)

    user = pwd.getpwnam(last("User"))
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": user.pw_dir,
           "USER": user.pw_name, "LOGNAME": user.pw_name, "LANG": "C.UTF-8"}
    for assignment in settings.get("Environment", []):
        env.update(pair.split("=", 1) for pair in shlex.split(assignment))
    for name in settings.get("EnvironmentFile", []):
        path = Path(_rewrite(name.removeprefix("-"), root, names))
        if path.exists() or not name.startswith("-"):  # "-": a missing file is no error
            env.update(_env_file(path))
    for key, variable, base in (("StateDirectory", "STATE_DIRECTORY", "var/lib"),
                                ("LogsDirectory", "LOGS_DIRECTORY", "var/log")):
        folder = root / base / settings[key][-1]  # a folder name, not an account
        folder.mkdir(exist_ok=True)
        os.chown(folder, user.pw_uid, grp.getgrnam(last("Group")).gr_gid)
        folder.chmod(int(last(f"{key}Mode"), 8))
        env[variable] = str(folder)
    argv = [*shlex.split(last("ExecStart")), "--once"]
    return subprocess.run(["setpriv", f"--reuid={user.pw_name}", f"--regid={last('Group')}", "--init-groups",
                           "--", *argv], cwd=last("WorkingDirectory"), env=env, umask=int(last("UMask"), 8),
                          capture_output=True, text=True, timeout=TIMEOUT_S)


# --- the operator and the analysts -------------------------------------------------------------

def _configure(root: Path) -> str:
    """The operator's edit of the installed config.yaml (as root: the file keeps its owner and mode):
    the model, topics of this test, and an Ollama address where nothing answers. Returns the topics."""
    path = root / "etc" / "fine-tuner" / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    topics = f"install check {secrets.token_hex(3)}"
    cfg["defaults"].update(model="llama3.2:1b", topics=topics)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg["ollama"]["host"] = f"http://127.0.0.1:{port}"  # closed again: connections are refused
    path.write_text(yaml.safe_dump(cfg))
    return topics


def _drop_as(user: str, root: Path, stem: str, *, umask: str) -> None:
    """``user`` drops NAME.mapping.json, then NAME.csv, the documented way (a dotfile renamed in)."""
    staging = root / "staging"
    write_csv(staging / f"{stem}.csv", 20, 7)
    (staging / f"{stem}.mapping.json").write_text(json.dumps(MAPPING))
    for name in (f"{stem}.mapping.json", f"{stem}.csv"):
        (staging / name).chmod(0o644)
    script = (f'umask {umask} && for f in {stem}.mapping.json {stem}.csv; do '
              'cp "$1/$f" "$2/.$f.part" && mv "$2/.$f.part" "$2/$f"; done')
    proc = subprocess.run(["runuser", "-u", user, "--", "sh", "-c", script, "sh", str(staging),
                           str(root / "srv" / "fine-tuner" / "inbox")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def _can_read(user: str, *paths: Path) -> list[bool]:
    """For each path, whether ``user`` can read it (a file's bytes, a folder's listing)."""
    out = []
    for path in paths:
        command = ["ls", "-A", str(path)] if path.is_dir() else ["cat", str(path)]
        proc = subprocess.run(["runuser", "-u", user, "--", *command], capture_output=True, timeout=60)
        out.append(proc.returncode == 0)
    return out


def _mode(path: Path) -> str:
    return oct(path.stat().st_mode & 0o7777)


def _events(proc: subprocess.CompletedProcess) -> list[str]:
    return [json.loads(line)["event"] for line in proc.stdout.splitlines() if line.startswith("{")]


# --- the tests ---------------------------------------------------------------------------------

def test_documented_install_runs_the_service_as_its_user(system_root, accounts):
    """The install steps (INSTALL.md's, the README's with sudo) leave a service that, started as its
    unprivileged user with the unit's umask, reads its configuration and turns a dropped dataset
    into outputs/<job_id>/ with Ollama not answering; the environment file stays root's."""
    steps = _block(INSTALL, "Install the code")
    short = [line.replace("sudo ", "") for line in _block(README, "in short:") if not line.startswith("journalctl")]
    assert short == steps
    _run_block(steps, system_root, accounts, cwd=system_root)
    service = accounts["fine-tuner"]
    etc = system_root / "etc" / "fine-tuner"
    owners = [(_mode(p), pwd.getpwuid(p.stat().st_uid).pw_name, grp.getgrgid(p.stat().st_gid).gr_name)
              for p in (etc, etc / "config.yaml", etc / "fine-tuner.env")]
    assert owners == [("0o750", "root", service), ("0o640", "root", service), ("0o600", "root", "root")]
    topics = _configure(system_root)
    _drop_as(service, system_root, "visits", umask="077")

    proc = _start_service(system_root, accounts, _unit())

    assert proc.returncode == 0, proc.stderr[-3000:]
    srv = system_root / "srv" / "fine-tuner"
    [job] = (srv / "inbox" / "processed").iterdir()
    assert sorted(os.listdir(job)) == ["visits.csv", "visits.mapping.json"]
    config = json.loads((srv / "outputs" / job.name / "model_set_config.json").read_text())
    assert (config["target_topics"], config["base_model"]) == ([topics], "llama3.2:1b")
    assert {"daemon_started", "model_not_registered", "job_succeeded", "daemon_stopped"} <= set(_events(proc))
    state = system_root / "var" / "lib" / "fine-tuner"
    assert [(p.stat().st_uid, _mode(p)) for p in (srv / "outputs" / job.name, state)] == [
        (pwd.getpwnam(service).pw_uid, "0o700"), (pwd.getpwnam(service).pw_uid, "0o700")]
    assert (state / "journal.sqlite3").is_file()
    where = subprocess.run(["setpriv", f"--reuid={service}", f"--regid={service}", "--init-groups", "--",
                            str(system_root / "opt" / "fine-tuner" / ".venv" / "bin" / "python"), "-c",
                            "import daemon; print(daemon.__file__)"], cwd=srv, capture_output=True, text=True,
                           timeout=60)
    assert where.stdout.strip() == str(system_root / "opt" / "fine-tuner" / "daemon" / "__init__.py")


def test_shared_group_lets_analysts_drop_and_read_and_nobody_else(system_root, accounts):
    """After the documented sharing steps an analyst of the group drops a dataset and reads every
    file the service user's daemon wrote for it (outputs/<job_id>/, processed/<job_id>/); every
    folder there is 2770 and every file group-readable, of the group; a user outside the group can
    read nothing, and the journal stays the service user's."""
    analyst, outsider = accounts["alice"], accounts["outsider"]
    for user in (analyst, outsider):
        _useradd(user)
    _run_block(_block(INSTALL, "Install the code"), system_root, accounts, cwd=system_root)
    app = system_root / "opt" / "fine-tuner"
    _run_block(_block(INSTALL, "## Share the inbox and outputs with a group"), system_root, accounts, cwd=app)
    _configure(system_root)
    _drop_as(analyst, system_root, "visits", umask="007")

    proc = _start_service(system_root, accounts, _unit(SHARED_GROUP_DROP_IN))

    assert proc.returncode == 0, proc.stderr[-3000:]
    srv = system_root / "srv" / "fine-tuner"
    [job] = (srv / "inbox" / "processed").iterdir()
    outputs = srv / "outputs" / job.name
    written = sorted(p for folder in (outputs, job) for p in (folder, *folder.rglob("*")))
    assert sorted(os.listdir(outputs)) == ["Modelfile", "fine_tuning_metadata.json", "job.log",
                                           "model_set_config.json"]
    assert _can_read(analyst, *written) == [True] * len(written)
    state = system_root / "var" / "lib" / "fine-tuner"
    private = [srv, srv / "inbox", srv / "outputs", *written, state, state / "journal.sqlite3"]
    assert _can_read(outsider, *private) == [False] * len(private)
    assert _can_read(analyst, state, state / "journal.sqlite3") == [False, False]
    gid = grp.getgrnam(accounts["analysts"]).gr_gid
    shared = [p for top in (srv / "inbox", srv / "outputs") for p in (top, *top.rglob("*"))]
    assert {(_mode(p), p.stat().st_gid) for p in shared if p.is_dir()} == {("0o2770", gid)}
    assert {(p.stat().st_mode & 0o047, p.stat().st_gid) for p in shared if p.is_file()} == {(0o040, gid)}
    assert _mode(state) == "0o700"


def test_shared_group_without_the_service_user_in_it_stops_with_exit_78(system_root, accounts):
    """paths.group naming a group the service user is not a member of (taken out of it after the
    documented steps, which already gave the folders to the group) stops watch at start with exit 78
    and one line saying what to do; nothing is made in the inbox."""
    _useradd(accounts["alice"])
    _run_block(_block(INSTALL, "Install the code"), system_root, accounts, cwd=system_root)
    app = system_root / "opt" / "fine-tuner"
    _run_block(_block(INSTALL, "## Share the inbox and outputs with a group"), system_root, accounts, cwd=app)
    group = accounts["analysts"]
    subprocess.run(["gpasswd", "--delete", accounts["fine-tuner"], group], check=True, capture_output=True,
                   timeout=60)
    _configure(system_root)

    proc = _start_service(system_root, accounts, _unit(SHARED_GROUP_DROP_IN))

    inbox = system_root / "srv" / "fine-tuner" / "inbox"
    assert (proc.returncode, proc.stderr.count("\n"), os.listdir(inbox)) == (78, 1, [])
    assert proc.stderr == (
        f"fine-tuner: error: invalid configuration in {system_root}/etc/fine-tuner/config.yaml: paths.group: "
        f"cannot share {inbox} with the group {group!r} (this process is not a member of the group): the "
        f"service user must own the folder and be a member of the group (usermod -aG {group} <service user>) "
        "(fix the configuration file or the FINE_TUNER_* variables and start again)\n")
