"""The managed llama-server: what it is started with, for a GGUF or an output folder, and its errors."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from daemon.serving.llamaserver import LlamaServer, ServerError, ServerSpec, serve_target
from tests.test_cli import run


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
    not here, and a missing llama-server: each one line saying what to do."""
    with pytest.raises(ServerError, match="has no adapter/adapter.gguf"):
        serve_target(_fine_tune_folder(tmp_path, adapter=False), base_models={"gemma3:270m": str(gemma_gguf)})
    with pytest.raises(ServerError, match="neither a GGUF file nor an output folder"):
        serve_target(tmp_path, base_models={})
    folder = _fine_tune_folder(tmp_path / "other")
    with pytest.raises(ServerError, match="the GGUF of gemma3:270m is not on this machine"):
        serve_target(folder, base_models={}, ollama_models_dir=str(tmp_path / "no-ollama"))
    assert serve_target(gemma_gguf, base_models={}).alias == gemma_gguf.stem
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
