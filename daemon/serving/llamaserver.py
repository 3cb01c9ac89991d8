"""A managed llama.cpp ``llama-server``: one GGUF base, the fine-tune's GGUF adapter, parallel slots.

``LlamaServer`` runs the pinned build (``daemon.llamacpp.server_binary``) as a child process on the
loopback interface, waits until ``GET /health`` says it has loaded the model, and stops it with
SIGTERM (then SIGKILL after a grace period); when this process ends without stopping it (SIGKILL, a
crash), the kernel kills it (``training.parentdeath``). It is started only on a port no other
program holds, and is ready only when the process answering there is the server itself. It speaks
the OpenAI chat API under ``/v1``; ``base_url`` is what ``openai.base_url`` should be. A base
without a chat template (a base model's GGUF) is served with llama.cpp's built-in template of the
same turn format that training used (``data.turns``: gemma, llama3, chatml, phi3 are llama.cpp's
names too). The server's own output goes to a log file the caller names (0600), never to our logs:
it may echo prompts.

``serve_target`` turns what a user names (an output folder or a GGUF file) into a ``ServerSpec``;
``model_spec`` does it for an Ollama model name and adapter folders (the evaluation's managed server).
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import stat
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from ..errors import FineTunerError
from ..outputs import names
from ..outputs.folder import OutputFolder, OutputFolderError

HEALTH_TIMEOUT_S = 300.0  # loading a large GGUF from a slow disk takes minutes
POLL_S = 0.2
STOP_GRACE_S = 10.0
ALIAS = "base"  # the served model's name when none is given
LOG_TAIL_BYTES = 1500


class ServerError(FineTunerError):
    """The server could not be started or did not become ready; the message says what to do."""


class ServerInterrupted(ServerError):
    """The caller's stop event was set while the model loaded; the server has been stopped."""


@dataclass(frozen=True)
class ServerSpec:
    model: Path  # the base GGUF
    adapters: tuple[Path, ...] = ()  # GGUF LoRA adapters, applied at scale 1 to every request
    alias: str = ALIAS
    chat_template: str | None = None  # llama.cpp's built-in template name; None: the GGUF's own
    parallel: int = 4
    ctx_per_slot: int = 2048
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port
    threads: int | None = None
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    def argv(self, binary: Path, port: int) -> list[str]:
        args = [str(binary), "--model", str(self.model), "--host", self.host, "--port", str(port),
                "--parallel", str(self.parallel), "--ctx-size", str(self.ctx_per_slot * self.parallel),
                "--alias", self.alias, "--no-webui"]
        for adapter in self.adapters:
            args += ["--lora", str(adapter)]
        if self.chat_template:
            # a built-in template's name: the server takes --chat-template as Jinja text while
            # Jinja is on (its default), and would render every conversation as that word
            args += ["--no-jinja", "--chat-template", self.chat_template]
        if self.threads:
            args += ["--threads", str(self.threads)]
        return args + list(self.extra_args)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_taken(host: str, port: int) -> bool:
    """Whether another program holds ``port`` on ``host`` (listening there, or on every address);
    a port an earlier server left in TIME_WAIT is free, as it is for llama-server."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise ServerError(f"cannot listen on {host}:{port}: {exc.strerror}",
                              hint="choose another port (serve --port), or leave it out for a free one") from None
    return False


def _listening_sockets(port: int) -> set[str] | None:
    """The inodes of the TCP sockets listening on ``port`` (any address), from Linux's
    /proc/net; None where there is no such table (another system: cannot tell)."""
    inodes, readable = set(), False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as fh:
                rows = fh.read().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for row in rows:
            fields = row.split()
            # local address "ADDR:PORT" in hex, state 0A = LISTEN, inode in the tenth column
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes if readable else None


def listens_on(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` holds a socket listening on ``port``; None where this system
    cannot tell."""
    inodes = _listening_sockets(port)
    if inodes is None:
        return None
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if link.startswith("socket:[") and link[len("socket:["):-1] in inodes:
            return True
    return False


def _open_private_log(path: Path) -> int:
    """The server's log, appended to: 0600 in a 0700 folder when created here (it may echo
    prompts); an existing log readable by others is made private too."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
        try:
            os.fchmod(fd, stat.S_IMODE(st.st_mode) & 0o700)
        except OSError:  # another user's file: leave it as it is
            pass
    return fd


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - LOG_TAIL_BYTES))
            return fh.read().decode("utf-8", "replace").strip().splitlines()[-1:][0]
    except (OSError, IndexError):
        return ""


class LlamaServer:
    """``with LlamaServer(spec, log_path=...) as server: server.base_url``."""

    def __init__(self, spec: ServerSpec, *, binary: Path | None = None, log_path: Path,
                 env: dict[str, str] | None = None) -> None:
        from ..llamacpp import server_binary

        self.spec = spec
        self.binary = binary or server_binary()
        if self.binary is None:
            raise ServerError("llama-server is not built on this machine",
                              hint="run `make llama-cpp` (builds the pinned llama.cpp server once, about 15 "
                                   "minutes on two cores) or set FINE_TUNER_LLAMA_SERVER to a llama-server binary")
        self.log_path = Path(log_path)
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.port = spec.port

    @property
    def url(self) -> str:
        return f"http://{self.spec.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What ``openai.base_url`` should be."""
        return self.url + "/v1"

    def start(self, timeout_s: float = HEALTH_TIMEOUT_S,
              stop_event: threading.Event | None = None) -> "LlamaServer":
        """Start the server and wait until it has loaded the model. Raises ``ServerError`` (the
        port is another program's, the server exited or did not load in ``timeout_s``) or
        ``ServerInterrupted`` (``stop_event`` was set meanwhile); the server is stopped then."""
        from ..training.parentdeath import tied_to_this_process

        for path in (self.spec.model, *self.spec.adapters):
            if not Path(path).is_file():
                raise ServerError(f"{Path(path).name}: no such file", hint="name an existing GGUF file")
        if self.spec.port and port_taken(self.spec.host, self.spec.port):
            raise self._port_error()
        self.port = self.spec.port or free_port(self.spec.host)
        log = _open_private_log(self.log_path)
        try:
            # the kernel kills the server when this process ends without stopping it
            self.proc = subprocess.Popen(tied_to_this_process(self.spec.argv(self.binary, self.port)),
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, start_new_session=True)
        finally:
            os.close(log)
        deadline = time.monotonic() + timeout_s
        while True:
            code = self.proc.poll()
            if code is not None:
                raise ServerError(f"llama-server exited with code {code} while loading the model: "
                                  f"{_tail(self.log_path)}", hint=f"read {self.log_path}")
            if stop_event is not None and stop_event.is_set():
                self.stop()
                raise ServerInterrupted("stopped while llama-server was loading the model")
            if self._healthy():
                # a program that took the port meanwhile answers too: the server is ready only
                # when the process listening there is ours (where this system can tell)
                if listens_on(self.proc.pid, self.port) is False:
                    self.stop()
                    raise self._port_error()
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"llama-server did not load the model within {timeout_s:.0f} s",
                                  hint=f"read {self.log_path}")
            if stop_event is not None:
                stop_event.wait(POLL_S)
            else:
                time.sleep(POLL_S)

    def _healthy(self) -> bool:
        try:
            return requests.get(self.url + "/health", timeout=2.0).status_code == 200
        except requests.RequestException:
            return False

    def _port_error(self) -> ServerError:
        port = self.spec.port or self.port
        return ServerError(f"port {port} on {self.spec.host} is taken by another program",
                           hint="choose another port (serve --port), or leave it out for a free one")

    def stop(self, grace_s: float = STOP_GRACE_S) -> int | None:
        """SIGTERM, then SIGKILL after ``grace_s``; returns the exit code."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def lora_adapters(self) -> list[dict]:
        """``GET /lora-adapters``: the adapters loaded, with their ids and scales."""
        resp = requests.get(self.url + "/lora-adapters", timeout=5.0)
        resp.raise_for_status()
        return resp.json()

    def __enter__(self) -> "LlamaServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_target(target: Path, *, base_models, ollama_models_dir: str | None = None, parallel: int = 4,
                 port: int = 0, with_adapter: bool = True) -> ServerSpec:
    """The server for an output folder (its base GGUF, and its ``adapter/adapter.gguf`` for a
    fine-tune; a head's folder is refused: it is no chat model) or a GGUF file (served alone). The
    served name is the folder's (``OutputFolder.served_name``), or the file's stem. The folder is
    read as every command reads it (``outputs.folder``): a link is never followed, every key used is
    checked, and a problem is a ServerError naming the file and the key (never a value)."""
    target = Path(target)
    if target.is_file():
        return ServerSpec(model=target, alias=target.stem, parallel=parallel, port=port)
    if not os.path.lexists(target / names.METADATA):
        raise ServerError(f"{target.name}: neither a GGUF file nor an output folder (no {names.METADATA})",
                          hint="name a job's output folder or a .gguf file")
    try:
        with OutputFolder(target) as folder:
            approach = folder.approach()
            if approach == "head":
                raise ServerError(f"{target.name} holds a head on the base model's hidden states, not a chat "
                                  "model: a server of its base alone would answer without it",
                                  hint=f"rate with it: fine-tuner rate --model {target.name} --backend llama-server "
                                       "(which starts the servers a head needs) or --backend local")
            base_name = folder.base_model()
            adapters = (folder.adapter_folder(),) if with_adapter and approach == "fine_tune" else ()
            alias = folder.served_name()
    except OutputFolderError as exc:
        raise ServerError(exc.message, hint="name an output folder that fine-tuner built, or a .gguf file") from None
    return model_spec(base_name, adapters, alias=alias, base_models=base_models,
                      ollama_models_dir=ollama_models_dir, parallel=parallel, port=port)


def model_spec(base_name: str, adapter_dirs: tuple[Path, ...] = (), *, alias: str, base_models,
               ollama_models_dir: str | None = None, show_modelfile: str | None = None, parallel: int = 4,
               port: int = 0) -> ServerSpec:
    """The server for the Ollama model ``base_name``: its GGUF (found as training finds it) with the
    ``adapter.gguf`` of each fine-tune adapter folder, in the turn format training used."""
    from ..data import turns
    from ..training.supervisor import resolve_base_weights

    adapters = tuple(Path(d) / names.ADAPTER_GGUF for d in adapter_dirs)
    for adapter in adapters:
        if not adapter.is_file():
            raise ServerError(f"{adapter.parent.parent.name} has no adapter/adapter.gguf",
                              hint="the fine-tune's GGUF adapter was not written; see training_result.json")
    weights = resolve_base_weights(base_name, base_models, allow_download=False, ollama_models_dir=ollama_models_dir,
                                   show_modelfile=show_modelfile)
    if weights.gguf_path is None:
        raise ServerError(f"the GGUF of {base_name} is not on this machine",
                          hint="name it in base_models (a .gguf file) or keep Ollama's models folder readable "
                               "(ollama.models_dir)")
    fmt = turns.turn_format(weights.model_type) if weights.chat_template else None
    return ServerSpec(model=Path(weights.gguf_path), adapters=adapters, alias=alias,
                      chat_template=fmt.name if fmt else None, parallel=parallel, port=port)


__all__ = ["LlamaServer", "ServerError", "ServerInterrupted", "ServerSpec", "free_port", "listens_on", "model_spec",
           "port_taken", "serve_target"]
