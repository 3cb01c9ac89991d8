"""A GGUF's summary from the bounded header reader: the same figures the ``gguf`` package's own
reader gives on files its writer made, on the tiny model llama.cpp's converter made and on the real
Gemma GGUF; a vocabulary of a million empty tokens in bounded memory; a cut-off or hostile file as
a ``GGUFFormatError`` naming the file and where reading stopped."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from daemon.errors import GGUFFormatError
from daemon.training.ggufheader import read_header
from daemon.training.ggufmodel import summary

ROOT = Path(__file__).resolve().parents[2]
# (token, type): 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte
VOCAB = [("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 2), ("<start_of_turn>", 3), ("<end_of_turn>", 3),
         ("<mask>", 4), ("[CLS]", 3), ("<b>", 1), ("<0x0A>", 6), ("▁the", 1), ("▁visit", 1), ("é", 1)]
CRAFTED = {"version": 1, "architecture": "gemma3", "name": "crafted", "quantization": "Q4_K_M", "file_type": 15,
           "tokenizer_model": "llama", "has_chat_template": True,
           "special_tokens": ["<bos>", "<end_of_turn>", "<eos>", "<mask>", "<pad>", "<start_of_turn>"],
           "vocab_size": 13, "tensors": 2}


def write_gguf(path: Path, vocab=VOCAB, *, big_endian: bool = False, template: str | None = "{{ messages }}") -> Path:
    """A GGUF made by the ``gguf`` package's writer: a Gemma-like vocabulary, a chat template, a
    nested array, and two f32 tensors of 32 bytes each (the data ends exactly at the file's end)."""
    import gguf

    writer = gguf.GGUFWriter(path, "gemma3", endianess=gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE)
    writer.add_name("crafted")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_scores([float(-i) for i in range(len(vocab))])
    writer.add_token_types([k for _, k in vocab])
    writer.add_array("crafted.nested", [[1, 2], [3]])
    writer.add_token_merges(["▁ t", "t h"])
    if template is not None:
        writer.add_chat_template(template)
    writer.add_tensor("a.weight", np.arange(8, dtype=np.float32))
    writer.add_tensor("b.weight", np.ones((2, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def reference_summary(path: Path) -> dict:
    """What the gguf package's own reader says of the same figures (the summary's former source)."""
    import gguf

    reader = gguf.GGUFReader(str(path))

    def value(key: str):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    tokens = value("tokenizer.ggml.tokens") or []
    types = value("tokenizer.ggml.token_type") or []
    file_type = value("general.file_type")
    return {"version": 1, "architecture": value("general.architecture"), "name": value("general.name"),
            "quantization": gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_"),
            "file_type": file_type, "tokenizer_model": value("tokenizer.ggml.model"),
            "has_chat_template": bool(value("tokenizer.chat_template")),
            "special_tokens": sorted({t for t, k in zip(tokens, types)
                                      if k in (3, 4) and t.startswith("<") and t.endswith(">")}),
            "vocab_size": len(tokens), "tensors": len(reader.tensors)}


def _figures(data: dict) -> dict:
    return {k: v for k, v in data.items() if k not in ("sha256", "size")}


@pytest.mark.parametrize("big_endian", [False, True], ids=["little-endian", "big-endian"])
def test_a_written_gguf_is_summarised_as_ggufs_own_reader_reads_it(tmp_path, monkeypatch, big_endian):
    """The summary of a file made by gguf's writer, in either byte order, holds exactly the figures
    gguf's own reader gives: the control and user-defined tokens written <...> only."""
    monkeypatch.setenv("FINE_TUNER_CACHE_DIR", str(tmp_path / "cache"))
    path = write_gguf(tmp_path / "crafted.gguf", big_endian=big_endian)
    assert _figures(summary(path)) == CRAFTED
    if not big_endian:  # gguf's reader reads the machine's byte order
        assert reference_summary(path) == CRAFTED


def test_the_tiny_models_gguf_is_summarised_as_ggufs_own_reader_reads_it(tmp_path, monkeypatch, tiny_model_dir):
    """The tiny model converted by llama.cpp's converter: the same figures as gguf's own reader."""
    from daemon.llamacpp import convert_hf_to_gguf

    path = convert_hf_to_gguf(tiny_model_dir, tmp_path / "tiny.gguf", gpt2_pre=True)
    monkeypatch.setenv("FINE_TUNER_CACHE_DIR", str(tmp_path / "cache"))  # after: the converter lives there
    expected = reference_summary(path)
    assert (expected["architecture"], expected["tokenizer_model"]) == ("llama", "gpt2")
    assert _figures(summary(path)) == expected


@pytest.mark.xdist_group("real-model")
def test_the_real_gemma_gguf_is_summarised_as_ggufs_own_reader_reads_it(tmp_path, monkeypatch, gemma_gguf):
    """Gemma 3 270M (262,144 tokens, 6,321 of them control tokens written <...>): the same figures
    as gguf's own reader."""
    monkeypatch.setenv("FINE_TUNER_CACHE_DIR", str(tmp_path / "cache"))
    got = _figures(summary(gemma_gguf))
    assert (got["architecture"], got["quantization"], got["vocab_size"], len(got["special_tokens"])) == (
        "gemma3", "Q4_K_M", 262144, 6321)
    assert got == reference_summary(gemma_gguf)


# the peak resident memory of this process image: getrusage's ru_maxrss would carry the forking
# pytest process's own peak across exec, so the kernel's VmHWM (reset at exec) is read instead
MEASURE = """
import json, re, sys
from pathlib import Path
from daemon.training.ggufmodel import summary
s = summary(sys.argv[1])
peak_kb = int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
print(json.dumps({"vocab_size": s["vocab_size"], "special_tokens": s["special_tokens"], "max_rss_mb": peak_kb // 1024}))
"""


def test_a_million_empty_tokens_are_summarised_in_bounded_memory(tmp_path):
    """A 12 MB GGUF of 1,000,000 empty control tokens (gguf's reader took 1.7 GB for 8 MB of them)
    is summarised by a fresh process whose peak memory stays under 200 MB."""
    import gguf

    path = tmp_path / "bomb.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_token_list([""] * 1_000_000)
    writer.add_token_types([3] * 1_000_000)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert 12_000_000 < path.stat().st_size < 12_001_000
    env = {**os.environ, "FINE_TUNER_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    measured = json.loads(proc.stdout)
    assert (measured["vocab_size"], measured["special_tokens"]) == (1_000_000, [])
    assert measured["max_rss_mb"] < 200, measured


def _tensor_table_end(path: Path) -> int:
    """Where gguf's own reader says the tensor table ends (before the data's padding)."""
    import gguf

    last = gguf.GGUFReader(str(path)).tensors[-1].field
    return last.offset + sum(int(p.nbytes) for p in last.parts)


def test_a_gguf_cut_short_is_a_format_error_naming_where_it_stops(tmp_path):
    """A file cut inside its vocabulary or inside its tensor data is a GGUFFormatError with the file,
    the byte where reading stopped, and what to do; never another exception."""
    full = write_gguf(tmp_path / "full.gguf")
    data = full.read_bytes()
    inside_token = data.index(b"<start_of_turn>") + 3
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:inside_token])
    with pytest.raises(GGUFFormatError) as info:
        read_header(cut)
    assert (info.value.file, info.value.offset, info.value.message) == (
        str(cut), inside_token - 3,
        f"the GGUF cut.gguf has a text longer than the rest of the file: the file is cut short or damaged "
        f"(at byte {inside_token - 3})")
    assert info.value.hint == ("the GGUF file is damaged or incomplete: pull the model again (ollama pull), or "
                               "name another .gguf file under base_models:")
    cut.write_bytes(data[:-16])
    table_end = _tensor_table_end(full)
    with pytest.raises(GGUFFormatError) as info:
        summary(cut)
    assert (info.value.offset, info.value.message) == (table_end, (
        f"the GGUF cut.gguf holds {len(data) - 16:,} bytes but its tensors need {len(data):,}: the file is cut "
        f"short (at byte {table_end})"))


def _head(*, version: int = 3, tensors: int = 0, keys: int = 1) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, tensors, keys)


def _key(name: str) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode()


HOSTILE = [  # (name, bytes, message without the offset, offset)
    ("not a gguf", b"PK\x03\x04" + bytes(40), "does not start with GGUF's magic bytes: it is not a GGUF file", 4),
    ("version 1", _head(version=1), "is GGUF version 1; versions 2 and 3 are read", 8),
    ("too many keys", _head(keys=1 << 40), "claims 1,099,511,627,776 keys and 0 tensors (at most 65,536 and "
                                           "1,048,576 are read)", 24),
    ("a text of 2**62 bytes", _head() + _key("general.name") + struct.pack("<IQ", 8, 1 << 62) + b"x",
     "has a text longer than the rest of the file: the file is cut short or damaged", 56),
    ("an array past the cap", _head() + _key("a") + struct.pack("<IIQ", 9, 0, 1 << 23),
     "has an array of 8,388,608 items (at most 4,194,304 are read)", 49),
    ("arrays nested too deep", _head() + _key("a") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 5
     + struct.pack("<IQ", 0, 0), "nests arrays more than 4 deep", 97),
    ("an unknown value type", _head() + _key("a") + struct.pack("<I", 13), "has a value of unknown type 13", 37),
    ("a repeated key", _head(keys=2) + (_key("a") + struct.pack("<IB", 0, 1)) * 2, "repeats a key", 47),
    ("tokens that are numbers", _head() + _key("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 4, 1) + bytes(4),
     "has a tokenizer.ggml.tokens that is not a list of texts", 73),
]


@pytest.mark.parametrize(("name", "raw", "message", "offset"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_a_hostile_header_is_a_format_error(tmp_path, name, raw, message, offset):
    """A header that is not GGUF, of an unread version, or whose counts, lengths, nesting or types
    are impossible or past the caps is a GGUFFormatError before anything large is read."""
    path = tmp_path / "hostile.gguf"
    path.write_bytes(raw)
    with pytest.raises(GGUFFormatError) as info:
        read_header(path)
    assert (info.value.message, info.value.offset) == (f"the GGUF hostile.gguf {message} (at byte {offset})", offset)
