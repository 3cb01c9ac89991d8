"""A fine-tune's LoRA adapter merged into its base GGUF by llama.cpp's own tools, for an Ollama that
will not create a model from base + adapter (0.34.1 and later refuse ``ADAPTER``).

``merge_adapter`` runs the pinned build's ``llama-export-lora`` (base + ``adapter.gguf`` → one GGUF
whose adapted tensors are F16, or F32 for an F32 base) and then ``llama-quantize`` back to the
base's own file type, each tensor to exactly the ggml type it has in the base (a
``--tensor-type-file`` read from the base in a child process), so the tensors the adapter does not
touch are copied as they are, never quantized twice; an F16 base needs no second step. Both tools
run as child processes (never imported, killed with this process), their files go to a temporary
folder inside the output folder, and the result is renamed into place whole. A failure is a
``RegistrationError`` that names the tool and its last line of output; the temporary folder is
removed. Nothing happens at import time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .. import fsutil, llamacpp
from ..errors import RegistrationError
from ..logconfig import get_logger
from ..outputs import names

_log = get_logger("merge")

MERGED_GGUF = "merged.gguf"
ADAPTER_GGUF = names.ADAPTER_GGUF  # llama.cpp's converter's form of the adapter, beside the PEFT files
F16_FILE_TYPE = 1  # llama.cpp's LLAMA_FTYPE_MOSTLY_F16: what llama-export-lora writes
MERGE_TIMEOUT_S = 3600.0  # each tool; a 7B model takes minutes on a few cores
OUTPUT_TAIL_CHARS = 300
BUILD_HINT = "run `make llama-cpp` (it builds llama-server, llama-export-lora and llama-quantize)"

# Runs in a child (the gguf package's reader holds a large vocabulary in memory): the base's file
# type on stdout, and "^<tensor name>$=<ggml type>" for every tensor into the file named, the form of
# llama-quantize's --tensor-type-file (a regular expression, then the type).
_TENSOR_TYPES = """
import re, sys
import gguf
reader = gguf.GGUFReader(sys.argv[1])
field = reader.fields.get("general.file_type")
with open(sys.argv[2], "w", encoding="utf-8") as out:
    for t in reader.tensors:
        out.write("^" + re.escape(t.name) + "$=" + gguf.GGMLQuantizationType(t.tensor_type).name + "\\n")
print(int(field.parts[field.data[0]][0]) if field is not None else "")
"""


def _tail(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1][:OUTPUT_TAIL_CHARS] if lines else "no output"


def _run(argv: list[str], what: str, timeout_s: float) -> subprocess.CompletedProcess:
    """Run one tool in a child tied to this process; a failure or timeout is a RegistrationError."""
    from ..training.parentdeath import tied_to_this_process

    try:
        proc = subprocess.run(tied_to_this_process(argv), capture_output=True, text=True, errors="replace",
                              timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RegistrationError(f"merging the adapter into its base: {what} did not finish in {timeout_s:g} s",
                                hint="free CPU or memory on this machine and train again, or set "
                                     "ollama.merge_adapter to never") from None
    if proc.returncode != 0:
        raise RegistrationError(
            f"merging the adapter into its base: {what} failed (exit {proc.returncode}): "
            f"{_tail(proc.stderr) if proc.stderr.strip() else _tail(proc.stdout)}",
            hint="check that the adapter was trained on this base GGUF; run `make llama-cpp` if the tools are "
                 "out of date")
    return proc


def _base_types(base: Path, types_file: Path, timeout_s: float) -> int:
    """The base's ``general.file_type``; its tensors' types written to ``types_file``."""
    proc = _run([sys.executable, "-c", _TENSOR_TYPES, str(base), str(types_file)],
                "reading the base's tensor types", timeout_s)
    text = proc.stdout.strip().splitlines()[-1:] or [""]
    if not text[0].isdigit():
        raise RegistrationError(f"merging the adapter into its base: {base.name} does not say its file type "
                                "(general.file_type), so it cannot be quantized back to it",
                                hint="use a GGUF written by llama.cpp's converter or quantizer as the base")
    return int(text[0])


def merge_adapter(base_gguf: str | os.PathLike | None, adapter_gguf: str | os.PathLike,
                  out: str | os.PathLike, *, build: llamacpp.LlamaCpp | None = None,
                  timeout_s: float = MERGE_TIMEOUT_S) -> dict:
    """Write ``out``: ``adapter_gguf`` merged into ``base_gguf`` at the base's file type. Returns
    {"file", "bytes", "sha256", "file_type", "base_gguf", "adapter", "duration_s"}; a
    RegistrationError when a file or a tool is missing or a tool fails (``out`` is then untouched)."""
    build = build or llamacpp.pinned()
    if base_gguf is None:
        raise RegistrationError("merging the adapter into its base needs the base as a GGUF file; this "
                                "fine-tune was trained on Hugging Face weights",
                                hint="name the base model's .gguf under base_models (or let fine-tuner find "
                                     "the GGUF Ollama serves), or set ollama.merge_adapter to never")
    base, adapter, out = Path(base_gguf), Path(adapter_gguf), Path(out)
    missing = [p.name for p in (base, adapter) if not p.is_file()]
    if missing:
        raise RegistrationError(f"merging the adapter into its base: {', '.join(missing)} is missing",
                                hint="llama.cpp's converter writes adapter/adapter.gguf during training: "
                                     f"{BUILD_HINT} and train again")
    tools = [p for p in (build.export_lora, build.quantize) if not (p.is_file() and os.access(p, os.X_OK))]
    if tools:
        raise RegistrationError(f"merging the adapter into its base needs llama.cpp's "
                                f"{' and '.join(p.name for p in tools)}, which is not built", hint=BUILD_HINT)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=".tmp-merge-", dir=out.parent) as tmp:
        work = Path(tmp)
        file_type = _base_types(base, work / "tensor-types.txt", timeout_s)
        merged = work / "merged-f16.gguf"
        _run([str(build.export_lora), "-m", str(base), "--lora", str(adapter), "-o", str(merged)],
             llamacpp.EXPORT_LORA, timeout_s)
        if file_type != F16_FILE_TYPE:
            final = work / "merged.gguf"
            _run([str(build.quantize), "--tensor-type-file", str(work / "tensor-types.txt"), str(merged),
                  str(final), str(file_type)], llamacpp.QUANTIZE, timeout_s)
            merged.unlink()
            merged = final
        with open(merged, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(merged, out)
    fsutil.fsync_dir(out.parent)
    digest, size = fsutil.hash_regular_file(out)
    result = {"file": out.name, "bytes": size, "sha256": digest, "file_type": file_type,
              "base_gguf": base.name, "adapter": adapter.name, "duration_s": round(time.monotonic() - started, 3)}
    _log.info("adapter_merged", **{k: v for k, v in result.items() if k != "sha256"})
    return result
