"""The managed llama-server: what it is started with, for a GGUF or an output folder, and its errors;
that it ends with the process that started it, and `serve`'s signals, ports and file modes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from daemon.serving.llamaserver import LlamaServer, ServerError, ServerSpec, serve_target
from daemon.training.supervisor import group_members
from tests.conftest import wait_for
from tests.fake_llama_server import llama_server_stand_in
from tests.test_cli import ROOT, run


def _fine_tune_folder(tmp_path: Path, *, adapter: bool = True) -> Path:
    folder = tmp_path / "resp-20261203"
    (folder / "adapter").mkdir(parents=True)
    if adapter:
        (folder / "adapter" / "adapter.gguf").write_bytes(b"GGUF")
    meta = {"approach": "fine_tune", "model": "gemma3:270m",
            "registration": {"registered": True, "name": "gemma3-270m-resp-ft:latest"}}
    (folder / "fine_tuning_metadata.json").write_text(json.dumps(meta))
    return folder


def test_a_fine_tune_is_served_as_its_base_gguf_with_its_adapter_and_turn_format(tmp_path, gemma_gguf):
    """An output folder names its base (through base_models here), its adapter.gguf, the registered
    name as the served alias, and Gemma's turn format (the GGUF carries no chat template)."""
    folder = _fine_tune_folder(tmp_path)
    spec = serve_target(folder, base_models={"gemma3:270m": str(gemma_gguf)}, parallel=3, port=8123)
    assert spec == ServerSpec(model=gemma_gguf, adapters=(folder / "adapter" / "adapter.gguf",),
                              alias="gemma3-270m-resp-ft:latest", chat_template="gemma", parallel=3, port=8123)
    argv = spec.argv(Path("/opt/llama-server"), 8123)
    assert argv[:8] == ["/opt/llama-server", "--model", str(gemma_gguf), "--host", "127.0.0.1", "--port", "8123",
                        "--parallel"]
    assert argv[argv.index("--ctx-size") + 1] == str(3 * spec.ctx_per_slot)
    assert argv[argv.index("--lora") + 1] == str(folder / "adapter" / "adapter.gguf")
    assert argv[argv.index("--chat-template") + 1] == "gemma"
    base_only = serve_target(folder, base_models={"gemma3:270m": str(gemma_gguf)}, with_adapter=False)
    assert base_only.adapters == () and "--lora" not in base_only.argv(Path("x"), 1)


def test_what_cannot_be_served_is_a_clear_error(tmp_path, gemma_gguf, monkeypatch):
    """A fine-tune without adapter.gguf, a folder that is not an output folder, a base whose GGUF is
    not here, a head's folder (no chat model) and a missing llama-server: each one line saying what
    to do."""
    with pytest.raises(ServerError, match="has no adapter/adapter.gguf"):
        serve_target(_fine_tune_folder(tmp_path, adapter=False), base_models={"gemma3:270m": str(gemma_gguf)})
    with pytest.raises(ServerError, match="neither a GGUF file nor an output folder"):
        serve_target(tmp_path, base_models={})
    folder = _fine_tune_folder(tmp_path / "other")
    with pytest.raises(ServerError, match="the GGUF of gemma3:270m is not on this machine"):
        serve_target(folder, base_models={}, ollama_models_dir=str(tmp_path / "no-ollama"))
    assert serve_target(gemma_gguf, base_models={}).alias == gemma_gguf.stem
    head = _fine_tune_folder(tmp_path / "head", adapter=False)
    (head / "fine_tuning_metadata.json").write_text(json.dumps({"approach": "head", "model": "gemma3:270m"}))
    with pytest.raises(ServerError, match="holds a head on the base model's hidden states, not a chat model") as err:
        serve_target(head, base_models={"gemma3:270m": str(gemma_gguf)})
    assert "--backend llama-server" in err.value.hint
    not_a_binary = tmp_path / "llama-server"
    not_a_binary.write_text("")
    os.chmod(not_a_binary, stat.S_IRUSR)
    # the variable names a file that cannot run: no binary, whatever the cache holds
    monkeypatch.setenv("FINE_TUNER_LLAMA_SERVER", str(not_a_binary))
    with pytest.raises(ServerError, match="llama-server is not built on this machine") as err:
        LlamaServer(ServerSpec(model=gemma_gguf), log_path=tmp_path / "s.log")
    assert "make llama-cpp" in err.value.hint


def test_a_server_that_exits_while_loading_is_reported_with_its_last_line(tmp_path, gemma_gguf):
    """A binary that dies at start: the error gives its exit code and its last line of output."""
    fake = tmp_path / "llama-server"
    fake.write_text("#!/bin/sh\necho 'error: unknown argument: --no-webui' >&2\nexit 3\n")
    fake.chmod(0o755)
    server = LlamaServer(ServerSpec(model=gemma_gguf), binary=fake, log_path=tmp_path / "server.log")
    with pytest.raises(ServerError) as err:
        server.start(timeout_s=30)
    assert err.value.message == ("llama-server exited with code 3 while loading the model: "
                                 "error: unknown argument: --no-webui")
    assert server.proc is not None and server.proc.poll() == 3


def test_serve_names_what_it_needs(tmp_path):
    """`fine-tuner serve` on a path that does not exist fails at once with a usage error."""
    res = run("serve", str(tmp_path / "nothing"), cwd=tmp_path)
    assert res.returncode == 2
    assert "nothing: no such file or folder; name a job's output folder or a .gguf file" in res.stderr


# --- the server ends with its parent; serve's signals, ports and files ------------------------

def _server_pid(pid_file: Path) -> int:
    return int(wait_for(lambda: pid_file.is_file() and pid_file.read_text(), timeout=30,
                        message="the stand-in llama-server to listen"))


@contextlib.contextmanager
def _serve(tmp_path: Path, *args: str, umask: int | None = None, **env: str):
    """`fine-tuner serve` on a GGUF through the stand-in llama-server, its output in files:
    (the process, its stdout file, its stderr file, the server's pid file). Whatever is left
    running (a failed test) is killed afterwards."""
    work = tmp_path / "work"
    work.mkdir()
    gguf = work / "base.gguf"
    gguf.write_bytes(b"GGUF")
    pid_file = tmp_path / "server.pid"
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "FINE_TUNER_OLLAMA__HOST": "http://127.0.0.1:9",
                "FINE_TUNER_LLAMA_SERVER": str(llama_server_stand_in(tmp_path)),
                "FAKE_LLAMA_PID_FILE": str(pid_file), **env}
    out, err = tmp_path / "serve.out", tmp_path / "serve.err"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "daemon", "serve", "base.gguf", *args], cwd=work,
                                env=full_env, stdout=stdout, stderr=stderr,
                                preexec_fn=None if umask is None else (lambda: os.umask(umask)))
    try:
        yield proc, out, err, pid_file
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(ValueError, OSError):
            os.killpg(os.getpgid(int(pid_file.read_text())), signal.SIGKILL)


def _serving(out: Path) -> str:
    """serve's base_url, once it printed it."""
    text = wait_for(lambda: "base_url: " in out.read_text() and out.read_text(), timeout=60,
                    message="serve to print its base_url")
    return text.split("base_url: ", 1)[1].split("\n", 1)[0]


def _gone(pid: int) -> bool:
    """The server (the leader of its own process group) and anything of its group have ended."""
    return not group_members(pid)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGHUP], ids=["SIGKILL", "SIGHUP"])
def test_the_server_ends_with_serve_whatever_ends_it(tmp_path, sig):
    """SIGKILL to `serve` (no handler runs) or SIGHUP (the terminal closed) while it serves: the
    llama-server goes with it and its port no longer answers."""
    with _serve(tmp_path) as (proc, out, err, pid_file):
        base_url = _serving(out)
        pid = _server_pid(pid_file)
        assert requests.get(base_url.removesuffix("/v1") + "/health", timeout=5).status_code == 200
        proc.send_signal(sig)
        code = proc.wait(timeout=30)
        wait_for(lambda: _gone(pid), timeout=10, message="the llama-server to end with serve")
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 0)
    with pytest.raises(requests.ConnectionError):
        requests.get(base_url.removesuffix("/v1") + "/health", timeout=5)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)],
                         ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signal_while_the_model_loads_stops_serve_and_the_server(tmp_path, sig, code):
    """Ctrl-C, SIGTERM or SIGHUP while llama-server is still loading the model: serve stops the
    server and exits at once with 128 + the signal's number and one line saying so."""
    with _serve(tmp_path, FAKE_LLAMA_LOAD_S="never") as (proc, out, err, pid_file):
        pid = _server_pid(pid_file)
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == code
        assert _gone(pid)
    assert out.read_text() == ""
    assert err.read_text() == (f"fine-tuner: error: interrupted ({sig.name}) while llama-server was loading the "
                               "model; the server is stopped\n")


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_args) -> None:
        pass


def test_serve_refuses_a_port_another_program_listens_on(tmp_path):
    """--port naming a port another program listens on (and answers /health on): one line naming
    the port, exit 2, no base_url printed and no llama-server started."""
    other = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=other.serve_forever, daemon=True)
    thread.start()
    port = other.server_address[1]
    try:
        with _serve(tmp_path, "--port", str(port)) as (proc, out, err, pid_file):
            code = proc.wait(timeout=60)
    finally:
        other.shutdown()
        other.server_close()
        thread.join(timeout=10)
    assert code == 2
    assert err.read_text() == (f"fine-tuner: error: port {port} on 127.0.0.1 is taken by another program; "
                               "choose another port (serve --port), or leave it out for a free one\n")
    assert out.read_text() == ""
    assert not pid_file.exists()


def test_a_server_whose_port_another_process_answers_on_is_not_ready(tmp_path, monkeypatch):
    """/health answered by a process other than the server started (a program that took the port
    between the check and the server's start): not ready but an error naming the port, and the
    server is stopped."""
    monkeypatch.setenv("FAKE_LLAMA_LISTENER", "other")
    monkeypatch.setenv("FAKE_LLAMA_PID_FILE", str(tmp_path / "listener.pid"))
    (tmp_path / "base.gguf").write_bytes(b"GGUF")
    server = LlamaServer(ServerSpec(model=tmp_path / "base.gguf"), binary=llama_server_stand_in(tmp_path),
                         log_path=tmp_path / "server.log")
    try:
        with pytest.raises(ServerError) as err:
            server.start(timeout_s=60)
    finally:
        with contextlib.suppress(ValueError, OSError):
            os.killpg(os.getpgid(int((tmp_path / "listener.pid").read_text())), signal.SIGKILL)
    assert err.value.message == f"port {server.port} on 127.0.0.1 is taken by another program"
    assert server.proc is None


def test_serve_writes_its_state_folder_and_log_for_its_user_only(tmp_path):
    """Run with umask 022, serve creates its state folder 0700 and the server's log 0600 (the log
    may echo prompts); SIGTERM ends it with status 0."""
    with _serve(tmp_path, umask=0o022) as (proc, out, err, pid_file):
        _serving(out)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    state = tmp_path / "work" / ".fine-tuner"
    modes = {str(p.relative_to(state.parent)): oct(p.stat().st_mode & 0o777) for p in [state, *state.rglob("*")]}
    assert modes == {".fine-tuner": "0o700", ".fine-tuner/llama-server.log": "0o600"}
    assert err.read_text() == ""


_HOLDER = """
import sys, time
from pathlib import Path
from daemon.serving.llamaserver import LlamaServer, ServerSpec
server = LlamaServer(ServerSpec(model=Path(sys.argv[1])), log_path=Path(sys.argv[2])).start(timeout_s=60)
print(server.proc.pid, flush=True)
time.sleep(600)
"""


def test_a_process_killed_while_its_server_runs_takes_the_server_with_it(tmp_path):
    """The daemon killed with SIGKILL during an evaluation on its own server: the process that
    started LlamaServer ends without stopping it, and the kernel ends the server too."""
    (tmp_path / "base.gguf").write_bytes(b"GGUF")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FINE_TUNER_LLAMA_SERVER": str(llama_server_stand_in(tmp_path)),
           "FAKE_LLAMA_PID_FILE": str(tmp_path / "server.pid")}
    with open(tmp_path / "holder.out", "wb") as stdout:
        holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path / "base.gguf"),
                                   str(tmp_path / "server.log")], env=env, stdout=stdout)
    try:
        pid = int(wait_for(lambda: (tmp_path / "holder.out").read_text().strip(), timeout=60,
                           message="the server to be ready"))
        assert not _gone(pid)
        holder.kill()
        holder.wait(timeout=30)
        wait_for(lambda: _gone(pid), timeout=10, message="the llama-server to end with its parent")
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        with contextlib.suppress(ValueError, OSError):
            os.killpg(int((tmp_path / "server.pid").read_text()), signal.SIGKILL)


def test_serve_says_in_one_line_what_is_wrong_with_a_folders_metadata(tmp_path):
    """`serve` on an output folder whose metadata is not JSON, a FIFO, or holds a key of the wrong
    type fails at once with one line naming the file and the key (no traceback, no server)."""
    folder = _fine_tune_folder(tmp_path)
    meta_path = folder / "fine_tuning_metadata.json"
    where = "fine_tuning_metadata.json in the model folder resp-20261203"
    cases = {"not json": f"{where} is not valid JSON in UTF-8",
             "fifo": f"{where} is not a regular file",
             "list": f"{where} is not a JSON object (it holds a list)",
             "model": f"{where}: model: must be an Ollama model name, not a list",
             "registration": f"{where}: registration: must be an object, not a text",
             "name": f"{where}: registration.name: must be an Ollama model name, not a number"}
    tune = '"approach": "fine_tune", "model": "gemma3:270m"'
    for case, message in cases.items():
        meta_path.unlink()
        if case == "fifo":
            os.mkfifo(meta_path)
        else:
            meta_path.write_text({"not json": "{model: gemma", "list": "[1]",
                                  "model": '{"approach": "fine_tune", "model": ["gemma3:270m"]}',
                                  "registration": '{%s, "registration": "yes"}' % tune,
                                  "name": '{%s, "registration": {"registered": true, "name": 3}}' % tune}[case])
        res = run("serve", str(folder), cwd=tmp_path, timeout=60)
        assert (case, res.returncode, res.stdout, res.stderr) == (
            case, 2, "", f"fine-tuner: error: {message}; name an output folder that fine-tuner built, or a .gguf "
                         "file\n")
