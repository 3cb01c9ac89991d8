"""A managed llama.cpp ``llama-server``: one GGUF base, the fine-tune's GGUF adapter, parallel slots.

``LlamaServer`` runs the pinned build (``daemon.llamacpp.server_binary``) as a child process on the
loopback interface, waits until ``GET /health`` says it has loaded the model, and stops it with
SIGTERM (then SIGKILL after a grace period). The server speaks the OpenAI chat API under
``/v1``; ``base_url`` is what ``openai.base_url`` should be. A base without a chat template (a base
model's GGUF) is served with llama.cpp's built-in template of the same turn format that training
used (``data.turns``: gemma, llama3, chatml, phi3 are llama.cpp's names too). The server's own
output goes to a log file the caller names, never to our logs: it may echo prompts.

``serve_target`` turns what a user names (an output folder or a GGUF file) into a ``ServerSpec``;
``model_spec`` does it for an Ollama model name and adapter folders (the evaluation's managed server).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from ..errors import FineTunerError

HEALTH_TIMEOUT_S = 300.0  # loading a large GGUF from a slow disk takes minutes
POLL_S = 0.2
STOP_GRACE_S = 10.0
ALIAS = "base"  # the served model's name when none is given
LOG_TAIL_BYTES = 1500


class ServerError(FineTunerError):
    """The server could not be started or did not become ready; the message says what to do."""


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
            args += ["--chat-template", self.chat_template]
        if self.threads:
            args += ["--threads", str(self.threads)]
        return args + list(self.extra_args)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


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

    def start(self, timeout_s: float = HEALTH_TIMEOUT_S) -> "LlamaServer":
        for path in (self.spec.model, *self.spec.adapters):
            if not Path(path).is_file():
                raise ServerError(f"{Path(path).name}: no such file", hint="name an existing GGUF file")
        self.port = self.spec.port or free_port(self.spec.host)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.spec.argv(self.binary, self.port), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            code = self.proc.poll()
            if code is not None:
                raise ServerError(f"llama-server exited with code {code} while loading the model: "
                                  f"{_tail(self.log_path)}", hint=f"read {self.log_path}")
            try:
                resp = requests.get(self.url + "/health", timeout=2.0)
                if resp.status_code == 200:
                    return self
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"llama-server did not load the model within {timeout_s:.0f} s",
                                  hint=f"read {self.log_path}")
            time.sleep(POLL_S)

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
    fine-tune) or a GGUF file (served alone). The served name is the folder's registered model
    name, or the file's stem."""
    target = Path(target)
    if target.is_file():
        return ServerSpec(model=target, alias=target.stem, parallel=parallel, port=port)
    meta_path = target / "fine_tuning_metadata.json"
    if not meta_path.is_file():
        raise ServerError(f"{target.name}: neither a GGUF file nor an output folder (no fine_tuning_metadata.json)",
                          hint="name a job's output folder or a .gguf file")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    base_name = str(meta.get("model"))
    adapters: tuple[Path, ...] = ()
    if with_adapter and meta.get("approach") == "fine_tune":
        adapters = (target / "adapter",)
    alias = ((meta.get("registration") or {}).get("name") or (meta.get("fine_tune") or {}).get("model_name")
             or base_name)
    return model_spec(base_name, adapters, alias=str(alias), base_models=base_models,
                      ollama_models_dir=ollama_models_dir, parallel=parallel, port=port)


def model_spec(base_name: str, adapter_dirs: tuple[Path, ...] = (), *, alias: str, base_models,
               ollama_models_dir: str | None = None, show_modelfile: str | None = None, parallel: int = 4,
               port: int = 0) -> ServerSpec:
    """The server for the Ollama model ``base_name``: its GGUF (found as training finds it) with the
    ``adapter.gguf`` of each fine-tune adapter folder, in the turn format training used."""
    from ..data import turns
    from ..training.supervisor import resolve_base_weights

    adapters = tuple(Path(d) / "adapter.gguf" for d in adapter_dirs)
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


__all__ = ["LlamaServer", "ServerError", "ServerSpec", "free_port", "model_spec", "serve_target"]
