"""The pinned llama.cpp: its Hugging Face to GGUF converter run on the tiny model."""

from __future__ import annotations

import pytest

from daemon.llamacpp import convert_hf_to_gguf


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
