"""The pinned llama.cpp: its build for this CPU, and its Hugging Face to GGUF converter run on the tiny model."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from daemon import llamacpp
from daemon.llamacpp import convert_hf_to_gguf


def _compiler_macros(*flags: str) -> set[str]:
    out = subprocess.run([shutil.which("cc") or "gcc", *flags, "-dM", "-E", "-x", "c", "/dev/null"],
                         capture_output=True, text=True, check=True).stdout
    return {line.split()[1] for line in out.splitlines() if line.startswith("#define ")}


def test_the_build_flags_leave_amx_out_of_the_code_made_for_an_amx_cpu():
    """On a CPU with AMX (what -march=native means on Sapphire Rapids), the build's flags leave the
    AMX kernels' guard macro undefined and keep AVX-512 VNNI."""
    amx_cpu = _compiler_macros("-march=sapphirerapids")
    assert {"__AMX_INT8__", "__AMX_TILE__", "__AVX512VNNI__"} <= amx_cpu
    ours = _compiler_macros(*llamacpp.compile_flags("x86_64"), "-march=sapphirerapids")
    assert {m for m in ours if m.startswith("__AMX")} == set()
    assert "__AVX512VNNI__" in ours and "__AVX512F__" in ours


def test_the_pinned_build_was_configured_native_without_amx():
    """The cached build of this machine is native (-march=native) with the AMX-off flags."""
    build = llamacpp.pinned()
    cache = (build.build_dir / "CMakeCache.txt").read_text()
    flags = " ".join(llamacpp.compile_flags())
    assert "GGML_NATIVE:BOOL=ON" in cache
    assert f"CMAKE_C_FLAGS:STRING={flags}" in cache
    assert f"CMAKE_CXX_FLAGS:STRING={flags}" in cache
    assert build.has_server() and build.has_merge_tools()
    # and the binaries hold no AMX instruction (tile loads, tile dot products)
    code = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(build.server)], capture_output=True,
                          text=True, check=True).stdout
    assert "vpdpbusd" in code or "vpmaddubsw" in code  # the native SIMD kernels are there
    assert re.findall(r"\s(tdpb\w*|ldtilecfg|tileloadd\w*|tilezero)\s", code) == []


def test_builds_for_different_cpus_live_in_different_folders(tmp_path):
    """A cache shared by two kinds of CPU keeps one build per kind; the same CPU finds its own."""
    zen = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n"
    spr = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f amx_tile amx_int8\n"
    assert llamacpp.cpu_key(zen, "x86_64") == llamacpp.cpu_key(zen, "x86_64")
    assert llamacpp.cpu_key(zen, "x86_64") != llamacpp.cpu_key(spr, "x86_64")
    assert llamacpp.cpu_key(zen, "x86_64").startswith("x86_64-")
    first = llamacpp.LlamaCpp(tmp_path, llamacpp.cpu_key(zen, "x86_64"))
    second = llamacpp.LlamaCpp(tmp_path, llamacpp.cpu_key(spr, "x86_64"))
    assert first.server.parent.parent != second.server.parent.parent
    assert first.source == second.source


def test_the_tiny_model_converts_to_a_gguf_llama_cpp_reads(tiny_model_dir, tmp_path):
    """llama.cpp refuses the tiny model's own byte-level BPE (its pre-tokenizer hash is not one it
    lists); declared GPT-2's pre-tokenizer, it converts: a llama GGUF with the same vocabulary, the
    tokenizer's merges, and every weight at its shape."""
    import gguf
    from safetensors import safe_open
    from transformers import AutoTokenizer

    with pytest.raises(RuntimeError, match="BPE pre-tokenizer was not recognized"):
        convert_hf_to_gguf(tiny_model_dir, tmp_path / "refused.gguf")
    out = convert_hf_to_gguf(tiny_model_dir, tmp_path / "tiny.gguf", gpt2_pre=True)
    reader = gguf.GGUFReader(out)

    def field(name: str):
        f = reader.fields[name]
        return f.contents()

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert (field("general.architecture"), field("tokenizer.ggml.model"), field("tokenizer.ggml.pre")) == (
        "llama", "gpt2", "gpt-2")
    assert field("tokenizer.ggml.tokens") == [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda x: x[1])]
    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as weights:
        shapes = sorted(tuple(weights.get_slice(k).get_shape()) for k in weights.keys())
    assert sorted(tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors) == shapes


def test_the_adapter_converts_with_llama_cpps_gguf_py_when_the_registrys_gguf_is_imported(tiny_model_dir, tmp_path):
    """A GGUF base is read with the registry's ``gguf`` in the trainer child before the adapter is
    converted; llama.cpp's converter still gets its own gguf-py (the registry's lacks names it uses),
    and the process gets the registry's back afterwards."""
    import sys

    import gguf
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from daemon.llamacpp import pinned
    from daemon.training.trainer import convert_to_gguf

    registry_gguf = sys.modules["gguf"]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter, safe_serialization=True)

    spec = {"gguf_converter": str(pinned().converter), "base_ref": str(tiny_model_dir)}
    source = pinned().converter.resolve().parent

    for attempt in range(2):  # a second conversion in the same process starts as afresh as the first
        (adapter / "adapter.gguf").unlink(missing_ok=True)
        result = convert_to_gguf(adapter, spec)
        assert result["written"] is True, (attempt, result)
        reader = gguf.GGUFReader(str(adapter / "adapter.gguf"))
        assert bytes(reader.fields["general.type"].parts[-1]).decode() == "adapter"
        assert len(reader.tensors) == 2 * 2 * model.config.num_hidden_layers  # q and v, A and B
        assert sys.modules["gguf"] is registry_gguf
        assert not [name for name, module in list(sys.modules.items())
                    if getattr(module, "__file__", None) and Path(module.__file__).resolve().is_relative_to(source)]
