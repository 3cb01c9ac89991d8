"""Tests for daemon/serving/merge.py and ``ollama.merge_adapter``: a fine-tune registered merged into its
base GGUF when Ollama refuses the adapter (as 0.34.1 and later do).

One real fine-tune job of the tiny Llama, trained on the tiny base as a GGUF file (llama.cpp's
converter, F32), registers in a fake Ollama that refuses adapters (``job``, about two minutes of
CPU). The other tests reuse its adapter.gguf; the merge runs the pinned build's llama-export-lora and
llama-quantize (``make llama-cpp``) for real, and the merged tensors are compared with base +
scale * B @ A read from the files with the gguf package.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests

from daemon import llamacpp
from daemon.config import load_config
from daemon.data.prompts import output_schema, system_prompt
from daemon.errors import AdapterRefusedError, ConfigError, RegistrationError
from daemon.fine_tuner import FineTuner
from daemon.data.synthetic import HEADER, MAPPING, synthetic_rows
from daemon.serving.merge import merge_adapter
from daemon.serving.ollama import OllamaClient
from daemon.serving.register import register_fine_tune, register_with_policy
from tests.conftest import leftovers
from tests.fake_ollama import ADAPTER_REFUSED, BLOB_DIR, NOT_GGUF, FakeOllama
from tests.tiny_model import TINY_NAME

pytestmark = pytest.mark.xdist_group("merge")

SCHEMA = output_schema(sorted(set(MAPPING.values())))
SYSTEM = system_prompt("respiratory infections", MAPPING)
F32, F16, Q8_0 = 0, 1, 7  # llama.cpp's file types ALL_F32, MOSTLY_F16 and MOSTLY_Q8_0


def _tools() -> llamacpp.LlamaCpp:
    build = llamacpp.pinned()
    assert build.has_merge_tools(), "llama-export-lora / llama-quantize are not built: `make llama-cpp`"
    return build


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_gguf) -> dict:
    """A fine-tune of the tiny GGUF base registered (register: required) in a fake Ollama that
    refuses adapters: its folder, metadata and the create requests the server got."""
    _tools()
    root = tmp_path_factory.mktemp("merge-job")
    fake = FakeOllama(version="0.34.1")
    fake.refuse_adapters = True
    fake.add_model(TINY_NAME, architecture="llama", quantization="F32", parameters={"stop": ["</s>"]})
    fake.start()
    try:
        cfg = {"base_models": {TINY_NAME: str(tiny_gguf)},
               "ollama": {"host": fake.url, "register": "required", "retries": 0},
               "training": {"sequence_len": 512, "device": "cpu"},
               "evaluation": {"enabled": "off"}, "paths": {"root": str(root)}}
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("OMP_NUM_THREADS", "1")
            ok, meta = FineTuner(config=cfg).process_dataset(
                pd.DataFrame(list(synthetic_rows(60, 5)), columns=HEADER), TINY_NAME, MAPPING,
                "respiratory infections", approach="fine_tune", epochs=1, learning_rate=1e-2, batch_size=8,
                output_dir=root / "job")
        assert ok is True
        created = fake.get_model(meta["registration"]["name"])
        return {"folder": root / "job", "meta": meta, "creates": [r.body for r in fake.requests_to("/api/create")],
                "modelfile": created.modelfile() if created else None}
    finally:
        fake.stop()


def tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """Each tensor of a GGUF file: (ggml type name, values as float32 in numpy's order)."""
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize

    out = {}
    for t in GGUFReader(str(path)).tensors:
        kind = GGMLQuantizationType(t.tensor_type)
        out[t.name] = (kind.name, np.asarray(dequantize(t.data, kind), dtype=np.float32))
    return out


def file_type(path: Path) -> int:
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields["general.file_type"]
    return int(field.parts[field.data[0]][0])


def lora_deltas(adapter: Path) -> dict[str, np.ndarray]:
    """Base tensor name → alpha / r * B @ A, from llama.cpp's adapter.gguf."""
    from gguf import GGUFReader

    reader = GGUFReader(str(adapter))
    field = reader.fields["adapter.lora.alpha"]
    alpha = float(field.parts[field.data[0]][0])
    data = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    deltas = {}
    for name, a in data.items():
        if name.endswith(".lora_a"):
            base = name.removesuffix(".lora_a")
            b = data[base + ".lora_b"]
            deltas[base] = (alpha / a.shape[0]) * (b @ a)
    return deltas


# --- the job -------------------------------------------------------------------------------------

def test_a_refused_adapter_is_registered_merged(job):
    """Ollama answers the create with the adapter 400; the job then registers merged.gguf as files
    (FROM that blob, no ADAPTER, no from), writes a Modelfile FROM ./merged.gguf, records it all in
    the metadata, and leaves no temporary file."""
    folder, meta = job["folder"], job["meta"]
    digest = "sha256:" + hashlib.sha256((folder / "merged.gguf").read_bytes()).hexdigest()
    first, second = job["creates"]
    assert (first["from"], sorted(first["adapters"])) == (TINY_NAME, ["adapter_config.json",
                                                                    "adapter_model.safetensors"])
    assert second == {"model": meta["registration"]["name"], "stream": True, "files": {"merged.gguf": digest},
                      "system": first["system"], "parameters": {"stop": ["</s>"], "temperature": 0},
                      "template": "{{ .Prompt }}"}
    reg = meta["registration"]
    assert (reg["registered"], reg["registered_as"], reg["files"]) == (True, "merged", {"merged.gguf": digest})
    assert reg["adapter_refused"] == {"status": 400, "server_error": NOT_GGUF}
    assert reg["merged"] == {"file": "merged.gguf", "bytes": (folder / "merged.gguf").stat().st_size,
                             "sha256": digest.removeprefix("sha256:"), "file_type": F32, "base_gguf": "tiny.gguf",
                             "adapter": "adapter.gguf", "duration_s": reg["merged"]["duration_s"]}
    assert reg["check"]["ok"] is True
    from_lines = [line for line in job["modelfile"].splitlines() if line.startswith(("FROM ", "ADAPTER "))]
    assert from_lines == [f"FROM {BLOB_DIR}/{digest.replace(':', '-')}"]
    modelfile = (folder / "Modelfile").read_text()
    assert [line for line in modelfile.splitlines() if line.startswith(("FROM ", "ADAPTER "))] == [
        "FROM ./merged.gguf"]
    assert "PARAMETER stop </s>" in modelfile
    assert json.loads((folder / "fine_tuning_metadata.json").read_text())["registration"]["registered_as"] == "merged"
    assert leftovers(folder.parent) == []


def test_the_merged_gguf_holds_base_plus_the_lora_delta(job, tiny_gguf):
    """Every tensor the adapter targets is base + alpha/r * B @ A (F32 base: F32, to float
    rounding); every other tensor is the base's, unchanged; the file type stays F32."""
    merged, base = tensors(job["folder"] / "merged.gguf"), tensors(tiny_gguf)
    deltas = lora_deltas(job["folder"] / "adapter" / "adapter.gguf")
    assert sorted(merged) == sorted(base) and deltas and set(deltas) < set(base)
    assert file_type(job["folder"] / "merged.gguf") == F32
    for name, (kind, values) in merged.items():
        assert kind == base[name][0] == "F32", name
        expected = base[name][1] + deltas[name] if name in deltas else base[name][1]
        np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-6, err_msg=name)
    assert max(float(np.abs(d).max()) for d in deltas.values()) > 1e-4  # training moved the adapter


# --- quantized bases -----------------------------------------------------------------------------

def quantized(tiny_gguf: Path, kind: str) -> Path:
    """The tiny base quantized to ``kind`` by the pinned llama-quantize (made once per module)."""
    out = tiny_gguf.parent / f"tiny-{kind.lower()}.gguf"
    if not out.exists():
        subprocess.run([str(_tools().quantize), str(tiny_gguf), str(out), kind], check=True,
                       capture_output=True, timeout=300)
    return out


# (llama.cpp's file type, the relative error one value of that type may carry)
BASES = {"Q8_0": (Q8_0, 1 / 127), "F16": (F16, 2 ** -10)}


@pytest.mark.parametrize("kind", sorted(BASES))
def test_a_quantized_base_is_merged_back_to_its_own_tensor_types(job, tiny_gguf, tmp_path, kind):
    """Merged into a Q8_0 (or F16) base, the result is Q8_0 (F16) again with each tensor of the
    base's type; the tensors the adapter does not touch are the base's very values (never quantized
    twice), the others base + delta within one step of the type."""
    base_file, (expected_type, step) = quantized(tiny_gguf, kind), BASES[kind]
    out = tmp_path / "merged.gguf"
    record = merge_adapter(base_file, job["folder"] / "adapter" / "adapter.gguf", out)
    assert (record["file"], record["file_type"], record["base_gguf"]) == ("merged.gguf", expected_type,
                                                                          base_file.name)
    assert file_type(out) == expected_type
    merged, base = tensors(out), tensors(base_file)
    deltas = lora_deltas(job["folder"] / "adapter" / "adapter.gguf")
    assert {n: k for n, (k, _) in merged.items()} == {n: k for n, (k, _) in base.items()}
    assert {k for k, _ in base.values()} == {kind, "F32"}
    for name, (_kind, values) in merged.items():
        if name not in deltas:
            assert np.array_equal(values, base[name][1]), name
            continue
        expected = base[name][1] + deltas[name]
        assert float(np.abs(values - expected).max()) <= float(np.abs(expected).max()) * step + 1e-6, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.gguf"]


# --- ollama.merge_adapter ------------------------------------------------------------------------

def _fine_tune_kwargs(job, tmp_path, calls: list) -> dict:
    def merged() -> dict:
        calls.append(1)
        out = tmp_path / "merged.gguf"
        return {**merge_adapter(job["tiny_gguf"], job["folder"] / "adapter" / "adapter.gguf", out), "path": str(out)}
    return dict(merged=merged, name="tiny-ft:latest", base=TINY_NAME, adapter_dir=job["folder"] / "adapter",
                system=SYSTEM, parameters={"temperature": 0}, output_schema=SCHEMA)


@pytest.fixture
def refusing():
    fake = FakeOllama(version="0.34.1")
    fake.refuse_adapters = True
    fake.add_model(TINY_NAME, architecture="llama")
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def job_with_base(job, tiny_gguf) -> dict:
    return {**job, "tiny_gguf": tiny_gguf}


def test_always_merges_without_trying_the_adapter(job_with_base, refusing, tmp_path):
    """merge_adapter: always sends no create with adapters: one create from the merged file."""
    calls: list = []
    with OllamaClient(refusing.config(create_timeout_s=30.0), env={}) as client:
        result = register_fine_tune(client, merge="always", **_fine_tune_kwargs(job_with_base, tmp_path, calls))
    assert (result["registered_as"], calls, "adapter_refused" in result) == ("merged", [1], False)
    (create,) = [r.body for r in refusing.requests_to("/api/create")]
    assert (sorted(create), create["files"]) == (
        ["files", "model", "parameters", "stream", "system", "template"],
        {"merged.gguf": "sha256:" + hashlib.sha256((tmp_path / "merged.gguf").read_bytes()).hexdigest()})


def test_never_records_the_refusal_and_merges_nothing(job_with_base, refusing, tmp_path):
    """merge_adapter: never leaves the refusal as the registration's error (auto) or raises it
    (required); nothing is merged."""
    calls: list = []
    kwargs = _fine_tune_kwargs(job_with_base, tmp_path, calls)
    with OllamaClient(refusing.config(), env={}) as client:
        action = lambda: register_fine_tune(client, merge="never", **kwargs)  # noqa: E731
        result = register_with_policy("auto", action)
        with pytest.raises(AdapterRefusedError) as info:
            register_with_policy("required", action)
    assert (result["registered"], result["error"]["error_type"], result["error"]["status"],
            result["error"]["server_error"]) == (False, "AdapterRefusedError", 400, NOT_GGUF)
    assert info.value.message == (f"Ollama refused to create 'tiny-ft:latest' from {TINY_NAME!r} with the adapter: "
                                  f"{NOT_GGUF}")
    assert (calls, refusing.get_model("tiny-ft:latest"), list(tmp_path.iterdir())) == ([], None, [])


def test_auto_keeps_the_adapter_where_ollama_takes_it(job_with_base, tmp_path):
    """On a server that takes adapters, auto registers base + adapter and merges nothing."""
    fake = FakeOllama()
    fake.add_model(TINY_NAME, architecture="llama")
    fake.start()
    calls: list = []
    try:
        with OllamaClient(fake.config(), env={}) as client:
            result = register_fine_tune(client, merge="auto", **_fine_tune_kwargs(job_with_base, tmp_path, calls))
        assert (result["registered_as"], sorted(result["adapters"]), calls) == (
            "adapter", ["adapter_config.json", "adapter_model.safetensors"], [])
        assert "\nADAPTER " in fake.get_model("tiny-ft:latest").modelfile()
    finally:
        fake.stop()


def test_a_failed_merge_is_a_clear_registration_error_and_leaves_nothing(job, tiny_gguf, tmp_path):
    """An adapter that is not the base's, missing tools or a base that is no GGUF file fail with a
    RegistrationError naming the cause; no merged file or temporary folder is left."""
    broken = tmp_path / "adapter.gguf"
    shutil.copy(tiny_gguf, broken)  # a GGUF, but a model, not an adapter
    with pytest.raises(RegistrationError) as info:
        merge_adapter(tiny_gguf, broken, tmp_path / "merged.gguf")
    assert info.value.message == ("merging the adapter into its base: llama-export-lora failed (exit 1): "
                                  "expect general.type to be 'adapter', but got: model")
    adapter = job["folder"] / "adapter" / "adapter.gguf"
    with pytest.raises(RegistrationError) as tools:
        merge_adapter(tiny_gguf, adapter, tmp_path / "merged.gguf", build=llamacpp.LlamaCpp(tmp_path / "none"))
    assert tools.value.message == ("merging the adapter into its base needs llama.cpp's llama-export-lora and "
                                   "llama-quantize, which is not built")
    with pytest.raises(RegistrationError) as no_gguf:
        merge_adapter(None, adapter, tmp_path / "merged.gguf")
    assert no_gguf.value.hint.startswith("name the base model's .gguf under base_models")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.gguf"]


# --- the fake server and the setting -------------------------------------------------------------

def test_a_refusing_server_answers_400_before_any_status_line(refusing):
    """A create with safetensors adapters gets 400 {"error": "supplied file was not in GGUF format"},
    one with a GGUF adapter 400 ADAPTER_REFUSED, as JSON, not a stream; a create without adapters works."""
    blobs = {}
    for name, data in (("adapter_config.json", b'{"lora_alpha": 32}'), ("adapter_model.safetensors", b"x"),
                       ("adapter.gguf", b"GGUF" + bytes(28))):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        assert requests.post(f"{refusing.url}/api/blobs/{digest}", data=data, timeout=5).status_code == 201
        blobs[name] = digest
    answers = []
    for adapters in ({k: blobs[k] for k in ("adapter_config.json", "adapter_model.safetensors")},
                     {"adapter.gguf": blobs["adapter.gguf"]}, None):
        resp = requests.post(f"{refusing.url}/api/create", timeout=5,
                             json={"model": "x", "from": TINY_NAME, **({"adapters": adapters} if adapters else {})})
        answers.append((resp.status_code, resp.headers["Content-Type"], resp.text.splitlines()[-1]))
    assert answers == [(400, "application/json", json.dumps({"error": NOT_GGUF})),
                       (400, "application/json", json.dumps({"error": ADAPTER_REFUSED})),
                       (200, "application/x-ndjson", '{"status": "success"}')]


def test_merge_adapter_setting_is_checked():
    """ollama.merge_adapter defaults to auto and takes only auto, always or never."""
    assert load_config(env={}).ollama.merge_adapter == "auto"
    assert load_config(env={"FINE_TUNER_OLLAMA__MERGE_ADAPTER": "always"}).ollama.merge_adapter == "always"
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides={"ollama": {"merge_adapter": "sometimes"}})
    assert info.value.problems == ["ollama.merge_adapter: must be one of auto, always, never"]


def test_auto_says_why_it_merged_when_the_merge_fails(job, refusing, tmp_path):
    """When Ollama refuses the adapter and the merge cannot run (a base that is no GGUF file),
    auto records one error that names both, with the server's status and text."""
    def merged() -> dict:
        return merge_adapter(None, job["folder"] / "adapter" / "adapter.gguf", tmp_path / "merged.gguf")

    with OllamaClient(refusing.config(), env={}) as client:
        result = register_with_policy("auto", lambda: register_fine_tune(
            client, merge="auto", merged=merged, name="tiny-ft:latest", base=TINY_NAME,
            adapter_dir=job["folder"] / "adapter", system=SYSTEM, parameters={"temperature": 0},
            output_schema=SCHEMA))
    assert (result["registered"], result["error"]["status"], result["error"]["server_error"]) == (False, 400, NOT_GGUF)
    assert result["error"]["message"] == (f"Ollama refused the adapter ({NOT_GGUF}), and merging the adapter into "
                                          "its base needs the base as a GGUF file; this fine-tune was trained on "
                                          "Hugging Face weights")
    assert list(tmp_path.iterdir()) == []
