"""The parent side of LoRA fine-tuning: find the base weights, spawn the trainer child, supervise it.

``resolve_base_weights`` maps an Ollama model name to Hugging Face weights on disk (the config's
``base_models`` first, then ``BUILTIN_BASE_MODELS``; HF ids are looked up in the local HF cache
layout by reading files, never by importing ``huggingface_hub``). ``run_training`` writes a run
spec into the job folder, starts the child of ``training.backend`` (``python -m daemon.training.trainer
<spec>``, or ``daemon.training.axolotl_trainer``) in its own process group, relays each
``training_log.jsonl`` line to ``on_progress``, and ends the child on timeout or when
``stop_event`` is set (SIGTERM, then SIGKILL after ``grace_s``). The spec holds this machine's
paths, so it is removed when the child has ended, and the stderr log of a good run is scrubbed of
them (``portable``): the job folder is meant to be handed on. This module never imports torch,
transformers or peft, not even lazily: the daemon must stay light, and a crash in the ML stack must
only ever take the child down. The child's stderr stays in the job folder, never in the daemon log,
because it could quote training text; the one exception is the line the child writes itself when
the base weights could not be downloaded (exit code ``trainer.EXIT_DOWNLOAD``), whose cause the
error repeats, with what to do.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import TrainingConfig
from ..errors import GGUFFormatError, TrainingFailedError, TrainingInterruptedError
from ..fsutil import read_json_object, temp_dir_for, write_json
from .. import llamacpp
from ..logconfig import get_logger
from ..portable import machine_roots, scrub_file
from ..data import turns
from ..outputs import names
from . import ggufmodel
from .parentdeath import tied_to_this_process
from .trainer import ADAPTER as ADAPTER_DIR, ADAPTER_FILES, DEFAULT_ENDPOINT, DOWNLOAD_FAILED, EXIT_DOWNLOAD

log = get_logger("training")

# Ollama library name → the Hugging Face repo of the same weights (instruct variants: the Ollama
# library tags are the chat models). A name without a tag means ":latest", as in Ollama.
BUILTIN_BASE_MODELS: dict[str, str] = {
    "llama3.2:1b": "meta-llama/Llama-3.2-1B-Instruct",
    "llama3.2:3b": "meta-llama/Llama-3.2-3B-Instruct",
    "llama3.2:latest": "meta-llama/Llama-3.2-3B-Instruct",
    "llama3.1:8b": "meta-llama/Llama-3.1-8B-Instruct",
    "llama3.1:latest": "meta-llama/Llama-3.1-8B-Instruct",
    "llama3:8b": "meta-llama/Meta-Llama-3-8B-Instruct",
    "llama3:latest": "meta-llama/Meta-Llama-3-8B-Instruct",
    "llama2:7b": "meta-llama/Llama-2-7b-chat-hf",
    "llama2:13b": "meta-llama/Llama-2-13b-chat-hf",
    "llama2:latest": "meta-llama/Llama-2-7b-chat-hf",
    # Ollama's mistral:latest / mistral:7b is v0.3 (library page: "v0.3 latest").
    "mistral:7b": "mistralai/Mistral-7B-Instruct-v0.3",
    "mistral:latest": "mistralai/Mistral-7B-Instruct-v0.3",
    "gemma2:2b": "google/gemma-2-2b-it",
    "gemma2:9b": "google/gemma-2-9b-it",
    "gemma2:27b": "google/gemma-2-27b-it",
    "gemma2:latest": "google/gemma-2-9b-it",
}

# config.json model_type → the GGUF architecture Ollama converts safetensors adapters for (reference
# §5); every other architecture is registered with the GGUF adapter llama.cpp's converter writes
ADAPTER_MODEL_TYPES: dict[str, str] = {"llama": "llama", "mistral": "llama", "gemma2": "gemma2"}

TRAINER_MODULES = ("torch", "transformers", "peft", "accelerate", "safetensors")
# the child each training.backend runs (python -m ...): same spec, same exit codes, same outputs
BACKEND_MODULES = {"local": "daemon.training.trainer", "axolotl": "daemon.training.axolotl_trainer"}

SPEC_FILE = "run_spec.json"  # exists only while the child runs: it holds this machine's paths
WORK_DIR = ".trainer-work"  # the axolotl backend's own files (its output, prepared data), removed after
LOG_FILE = "training_log.jsonl"
RESULT_FILE = names.TRAINING_RESULT
STDERR_FILE = names.TRAINER_STDERR
POLL_S = 0.1
GROUP_EXIT_S = 10.0  # how long a stopped group's processes may take to tear down


@dataclass(frozen=True)
class BaseWeights:
    ollama_name: str
    ref: str | None  # configured local dir, GGUF file or HF repo id, None if unknown
    hf_id: str | None  # what adapter_config.json records as base_model_name_or_path
    local_dir: str | None  # resolved directory with config.json (for a GGUF: its dequantized form)
    model_type: str | None  # config.json model_type, or a GGUF's general.architecture
    has_chat_template: bool  # the weights' own template, or a known turn format applies
    problem: str | None  # why it cannot be used, None when usable
    source: str = "huggingface folder"  # or "huggingface id", "gguf file", "ollama blob"
    gguf_path: str | None = None  # the GGUF trained on (dequantized into local_dir once)
    gguf_sha256: str | None = None
    quantization: str | None = None  # of the GGUF, e.g. Q4_K_M
    chat_template: str | None = None  # the turn format's Jinja template, when the weights carry none
    template: str | None = None  # which template is used and why, in words
    found_by: str | None = None  # how an Ollama blob was found


@dataclass
class TrainingResult:
    adapter_dir: str
    log_path: str
    stderr_path: str
    metrics: dict = field(default_factory=dict)


# --- base weights ------------------------------------------------------------------------------

# What adapter_config.json and training_config.yaml name as the base model when no Hugging Face id
# is known for local weights: clearly not loadable, so a trainer elsewhere fails with this name in
# its message instead of loading something else (training_config.yaml says what to put there).
BASE_MODEL_PLACEHOLDER = "REPLACE-ME/base-model-hf-id-or-weights-folder"


def with_tag(name: str) -> str:
    """``llama3.2`` → ``llama3.2:latest``; a name that has a tag is returned as is."""
    tail = name.rsplit("/", 1)[-1]
    return name if ":" in tail else f"{name}:latest"


def _lookup(name: str, table: Mapping[str, str]) -> str | None:
    for key in (name, with_tag(name), name.removesuffix(":latest")):
        if key in table:
            return table[key]
    return None


def _is_hf_id(ref: str) -> bool:
    """``org/name`` and not an existing folder; anything else configured is a local path."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", ref)) and not os.path.isdir(ref)


def hf_cache_dir(env: Mapping[str, str] = os.environ) -> Path:
    """The HF hub cache folder, with the precedence huggingface_hub uses."""
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    xdg = env.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path(env.get("HOME") or Path.home()) / ".cache"
    return base / "huggingface" / "hub"


def hf_endpoint(env: Mapping[str, str] = os.environ) -> str:
    """The Hub the weights are downloaded from (``HF_ENDPOINT``, else huggingface.co)."""
    return (env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def find_in_hf_cache(hf_id: str, env: Mapping[str, str] = os.environ) -> Path | None:
    """The snapshot folder of ``hf_id`` holding a config.json (``refs/main`` first, else the newest)."""
    repo = hf_cache_dir(env) / ("models--" + hf_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file():
        candidate = snapshots / ref.read_text(encoding="utf-8").strip()
        if (candidate / "config.json").is_file():
            return candidate
    found = [p for p in snapshots.iterdir() if (p / "config.json").is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def has_chat_template(weights_dir: str | Path) -> bool:
    """The tokenizer carries a chat template (in tokenizer_config.json or chat_template.jinja)."""
    d = Path(weights_dir)
    if (d / "chat_template.jinja").is_file() or (d / "chat_template.json").is_file():
        return True
    return bool(read_json_object(d / "tokenizer_config.json").get("chat_template"))


def _weights_problem(model_type: str | None, chat_template: bool, where: str) -> str | None:
    if model_type is None:
        return f"{where} has no readable config.json: put complete Hugging Face weights there"
    if not chat_template:
        return (f"{where} has no chat template in its tokenizer files and no known turn format for "
                f"{model_type!r} models ({', '.join(turns.known_architectures())}): use the instruct/chat "
                "variant of the weights")
    return None


def resolve_base_weights(model_name: str, base_models: Mapping[str, str], *,
                         allow_download: bool = False,
                         env: Mapping[str, str] = os.environ,
                         ollama_models_dir: str | None = None,
                         show_modelfile: str | None = None) -> BaseWeights:
    """Find the weights to fine-tune for the Ollama model ``model_name`` (never downloads here):
    the config's ``base_models`` entry (a Hugging Face folder, a ``.gguf`` file or an HF id), else
    the GGUF Ollama itself serves (its models folder, or the ``FROM`` of ``show_modelfile``), else the
    built-in Hugging Face id."""
    configured = _lookup(model_name, base_models)
    if configured is not None and os.path.isfile(os.path.expanduser(configured)):
        path = Path(os.path.expanduser(configured)).resolve()
        if not ggufmodel.is_gguf(path):
            return BaseWeights(model_name, configured, None, None, None, False,
                               f"the file configured for {model_name!r} is not a GGUF file: name a .gguf "
                               "file or a Hugging Face weights folder under base_models:")
        return _from_gguf(model_name, configured, path, "gguf file", f"base_models: {path.name}",
                          _lookup(model_name, BUILTIN_BASE_MODELS))
    if configured is None:
        blob, found_by = ggufmodel.find_ollama_blob(
            model_name, ggufmodel.ollama_models_dirs(ollama_models_dir, env))
        if blob is None and show_modelfile:
            blob = ggufmodel.blob_from_modelfile(show_modelfile)
            found_by = "the FROM line of Ollama's /api/show Modelfile"
        if blob is not None:
            return _from_gguf(model_name, None, blob, "ollama blob", found_by,
                              _lookup(model_name, BUILTIN_BASE_MODELS))
    builtin = _lookup(model_name, BUILTIN_BASE_MODELS)
    ref = configured or builtin
    if ref is None:
        return BaseWeights(model_name, None, None, None, None, False,
                           f"no weights are known for {model_name!r}: Ollama's GGUF was not found in its "
                           f"models folder (set ollama.models_dir or OLLAMA_MODELS where it is readable), "
                           f"and no base_models: entry names it ({with_tag(model_name)}: <.gguf file, "
                           "weights dir or HF repo id>)")
    expanded = os.path.expanduser(ref)
    if configured is not None and not _is_hf_id(ref):
        # A local folder has no HF id: the builtin id when there is one, else None (files handed to
        # another trainer then name BASE_MODEL_PLACEHOLDER, never a path of this machine or an
        # Ollama name that no Hugging Face loader accepts)
        hf_id = builtin
        if not os.path.isdir(expanded):
            return BaseWeights(model_name, ref, hf_id, None, None, False,
                               f"the weights directory configured for {model_name!r} does not exist: "
                               f"{ref}")
        local = Path(expanded).resolve()
        return _from_dir(model_name, ref, hf_id, local)
    hf_id = ref
    snapshot = find_in_hf_cache(hf_id, env)
    if snapshot is not None:
        return _from_dir(model_name, ref, hf_id, snapshot, source="huggingface id")
    offline = str(env.get("HF_HUB_OFFLINE", "")).lower() in ("1", "true", "yes", "on")
    if allow_download and not offline:
        # The child downloads it with from_pretrained; nothing to inspect before that.
        return BaseWeights(model_name, ref, hf_id, None, None, False, None, source="huggingface id")
    why = "HF_HUB_OFFLINE is set" if allow_download else "training.allow_download is off"
    return BaseWeights(model_name, ref, hf_id, None, None, False,
                       f"weights for {hf_id} are not in the local Hugging Face cache ({hf_cache_dir(env)}) "
                       f"and {why}: run `hf download {hf_id}`, or set base_models: "
                       f"{with_tag(model_name)}: <local weights dir or .gguf file>", source="huggingface id")


def _tokenizer_vocabulary(local: Path) -> set[str]:
    """The added/special tokens a tokenizer.json declares (enough to tell a turn format apart)."""
    data = read_json_object(local / "tokenizer.json")
    added = data.get("added_tokens") if isinstance(data.get("added_tokens"), list) else []
    return {t.get("content") for t in added if isinstance(t, dict) and isinstance(t.get("content"), str)}


def _from_dir(model_name: str, ref: str, hf_id: str | None, local: Path,
              source: str = "huggingface folder") -> BaseWeights:
    config = read_json_object(local / "config.json")
    model_type = config.get("model_type") if isinstance(config.get("model_type"), str) else None
    if has_chat_template(local):
        return BaseWeights(model_name, ref, hf_id, str(local), model_type, True,
                           _weights_problem(model_type, True, str(local)), source=source,
                           template="the weights' own chat template (tokenizer files)")
    fmt = turns.turn_format(model_type, _tokenizer_vocabulary(local))
    return BaseWeights(model_name, ref, hf_id, str(local), model_type, fmt is not None,
                       _weights_problem(model_type, fmt is not None, str(local)), source=source,
                       chat_template=fmt.jinja if fmt else None,
                       template=f"{fmt.source}: the tokenizer has no chat template" if fmt else None)


def _from_gguf(model_name: str, ref: str | None, path: Path, source: str, found_by: str,
               hf_id: str | None) -> BaseWeights:
    """A GGUF base: trained on its dequantized weights, with its own chat template or the
    architecture's turn format; one that cannot be read is a problem (the job builds a model set)."""
    where = f"the GGUF {path.name}"
    try:
        info = ggufmodel.summary(path)
    except GGUFFormatError as exc:
        return BaseWeights(model_name, ref, hf_id, None, None, False, f"{exc.message}: {exc.hint}",
                           source=source, gguf_path=str(path), found_by=found_by)
    except OSError as exc:
        return BaseWeights(model_name, ref, hf_id, None, None, False,
                           f"{where} cannot be read ({exc.strerror or type(exc).__name__}): make it readable "
                           "by the service's user", source=source, gguf_path=str(path), found_by=found_by)
    arch = info.get("architecture")
    common = dict(source=source, gguf_path=str(path), gguf_sha256=info.get("sha256"),
                  quantization=info.get("quantization"), found_by=found_by)
    local = str(ggufmodel.prepared_dir(str(info.get("sha256"))))
    if info.get("has_chat_template"):
        return BaseWeights(model_name, ref, hf_id, local, arch, True, None,
                           template="the GGUF's own chat template (tokenizer.chat_template)", **common)
    fmt = turns.turn_format(arch, set(info.get("special_tokens") or []))
    if fmt is None:
        return BaseWeights(model_name, ref, hf_id, local, arch, False,
                           f"{where} carries no chat template and no known turn format fits its "
                           f"{arch!r} architecture (known: {', '.join(turns.known_architectures())}): "
                           "use an instruct model whose GGUF has a template", **common)
    return BaseWeights(model_name, ref, hf_id, local, arch, True, None, chat_template=fmt.jinja,
                       template=f"{fmt.source}: {where} is a base model with no chat template", **common)


def gguf_converter() -> str | None:
    """llama.cpp's ``convert_lora_to_gguf.py`` of the pinned source, when it is on this machine."""
    build = llamacpp.pinned()
    return str(build.converter) if build.has_source() else None


def adapter_format(model_type: str | None) -> str:
    """How Ollama takes an adapter for this architecture: ``safetensors`` (Ollama converts it:
    llama and gemma2 only), else ``gguf`` (llama.cpp's converter made adapter.gguf)."""
    return "safetensors" if ADAPTER_MODEL_TYPES.get(model_type or "") else "gguf"


def trainer_packages_available() -> bool:
    """torch, transformers, peft, accelerate and safetensors are importable (found, not imported)."""
    return all(importlib.util.find_spec(name) is not None for name in TRAINER_MODULES)


# --- the run spec ------------------------------------------------------------------------------

def build_run_spec(job_dir: Path, base: BaseWeights, training: TrainingConfig) -> dict[str, Any]:
    """The JSON the child reads: the job's training_config.yaml resolved to absolute paths, plus
    what the parent knows (base weights, device, logging)."""
    cfg_path = job_dir / names.TRAINING_CONFIG
    try:
        cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise TrainingFailedError(f"cannot read {cfg_path}: {type(exc).__name__}",
                                  hint="the job folder is incomplete; resubmit the dataset") from None

    def path_of(key: str) -> str | None:
        entries = cfg.get(key) or []
        if not entries:
            return None
        return str((job_dir / entries[0]["path"]).resolve())

    def get(key: str, default: Any) -> Any:
        value = cfg.get(key)
        return default if value is None else value

    return {
        "base_dir": base.local_dir,
        "base_ref": base.hf_id if base.local_dir is None else base.local_dir,
        "gguf_path": base.gguf_path,
        "chat_template": base.chat_template,
        "gguf_converter": gguf_converter(),
        "base_name": base.hf_id or BASE_MODEL_PLACEHOLDER,
        "train_path": path_of("datasets") or str(job_dir / names.TRAINING_DATA),
        "validation_path": path_of("test_datasets"),
        "output_dir": str(job_dir),
        "lora_r": int(get("lora_r", training.lora_r)),
        "lora_alpha": int(get("lora_alpha", training.lora_alpha)),
        "lora_dropout": float(get("lora_dropout", training.lora_dropout)),
        "lora_target_modules": list(get("lora_target_modules", training.lora_target_modules)),
        "sequence_len": int(get("sequence_len", training.sequence_len)),
        "micro_batch_size": int(get("micro_batch_size", 1)),
        "gradient_accumulation_steps": int(get("gradient_accumulation_steps",
                                               training.gradient_accumulation_steps)),
        "num_epochs": int(get("num_epochs", 1)),
        "learning_rate": float(get("learning_rate", 1e-4)),
        "warmup_ratio": float(get("warmup_ratio", training.warmup_ratio)),
        "early_stopping_patience": int(training.early_stopping_patience),
        "seed": int(get("seed", 42)),
        "logging_steps": int(training.logging_steps),
        "device": training.device,
        "parent_pid": os.getpid(),
        "backend": training.backend,
        "config_path": str(cfg_path),
        "work_dir": str(job_dir / WORK_DIR),
        "grace_s": float(training.grace_s),
    }


# --- supervision -------------------------------------------------------------------------------

class _LogTail:
    """Reads complete new lines of training_log.jsonl as the child appends them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.buffer = b""

    def new_records(self) -> list[dict]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        records = []
        for line in lines:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    records.append(record)
        return records


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    # The child must import this package even when it is not installed (a source checkout).
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def terminate_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to the child's process group, then SIGKILL after ``grace_s``; reaps the child."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    # The group may hold grandchildren (data loader workers, accelerate's worker) after the leader
    # exits; SIGKILL is delivered at once but a process takes a moment to tear down its memory, so
    # wait (bounded) until none is left running: the next job gets the memory back.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + GROUP_EXIT_S
    while group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.02)


def group_members(pgid: int) -> list[int]:
    """The processes of group ``pgid`` still running (zombies, already ended, excluded), from
    Linux's /proc; empty where there is none."""
    members = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as fh:
                    fields = fh.read().rsplit(b")", 1)[1].split()
            except OSError:  # it ended meanwhile
                continue
            if fields[0] not in (b"Z", b"X") and int(fields[2]) == pgid:
                members.append(int(entry.name))
    return members


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by signal {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"


def _prepare_job_dir(job_dir: Path) -> None:
    """Remove what an earlier, interrupted attempt left, so progress and outputs are this run's."""
    for name in (LOG_FILE, RESULT_FILE):
        with contextlib.suppress(FileNotFoundError):
            (job_dir / name).unlink()
    for d in (job_dir / ADAPTER_DIR, temp_dir_for(job_dir / ADAPTER_DIR), job_dir / WORK_DIR):
        shutil.rmtree(d, ignore_errors=True)


def _clean_up_run(job_dir: Path) -> None:
    """What only the running child needed: the spec (this machine's paths) and the backend's work
    folder. Whatever the outcome, the job folder then holds only what is meant to be handed on."""
    with contextlib.suppress(FileNotFoundError):
        (job_dir / SPEC_FILE).unlink()
    shutil.rmtree(job_dir / WORK_DIR, ignore_errors=True)


def run_training(job_dir: str | os.PathLike, *, base: BaseWeights, training: TrainingConfig,
                 timeout_s: float | None = None,
                 on_progress: Callable[[dict], None] | None = None,
                 stop_event: threading.Event | None = None,
                 python: str = sys.executable) -> TrainingResult:
    """Train a LoRA adapter for ``base`` on the job folder's data in a child process.

    Returns when ``job_dir/adapter`` is complete. Raises ``TrainingFailedError`` (non-zero exit,
    signal, timeout, missing outputs) or ``TrainingInterruptedError`` (``stop_event`` was set).
    """
    job_dir = Path(job_dir).resolve()
    if base.problem is not None:
        raise TrainingFailedError(f"base weights for {base.ollama_name!r} cannot be used: {base.problem}",
                                  hint="fix the base_models configuration or the weights, then resubmit")
    timeout_s = training.timeout_s if timeout_s is None else timeout_s
    _prepare_job_dir(job_dir)
    spec_path = job_dir / SPEC_FILE
    write_json(spec_path, build_run_spec(job_dir, base, training))
    log_path, stderr_path = job_dir / LOG_FILE, job_dir / STDERR_FILE
    tail = _LogTail(log_path)

    started = time.monotonic()
    with open(stderr_path, "wb") as err:
        # SIGTERM when this process ends without stopping it: the child ends as on a stop (an
        # axolotl child then stops its own group)
        proc = subprocess.Popen(tied_to_this_process([python, "-m", BACKEND_MODULES[training.backend], str(spec_path)],
                                                     signal.SIGTERM),
                                cwd=job_dir, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT,
                                env=child_env(), start_new_session=True)
    log.info("training_started", pid=proc.pid, model=base.ollama_name, device=training.device,
             backend=training.backend, timeout_s=timeout_s)
    outcome = "running"
    try:
        while True:
            code = proc.poll()
            for record in tail.new_records():
                if on_progress is not None:
                    on_progress(record)
            if code is not None:
                break
            if stop_event is not None and stop_event.is_set():
                outcome = "interrupted"
                break
            if timeout_s is not None and time.monotonic() - started > timeout_s:
                outcome = "timed_out"
                break
            if stop_event is not None:
                stop_event.wait(POLL_S)
            else:
                time.sleep(POLL_S)
    finally:
        if proc.poll() is None:
            terminate_group(proc, training.grace_s)
        else:
            terminate_group(proc, 0)  # only sweeps the group
        _clean_up_run(job_dir)
    duration_s = round(time.monotonic() - started, 3)
    code = proc.returncode
    if outcome != "running":
        shutil.rmtree(temp_dir_for(job_dir / ADAPTER_DIR), ignore_errors=True)
    if outcome == "interrupted":
        log.info("training_interrupted", pid=proc.pid, duration_s=duration_s, exit_code=code)
        raise TrainingInterruptedError("training was stopped because the service is shutting down")
    if outcome == "timed_out":
        log.error("training_timed_out", pid=proc.pid, duration_s=duration_s, timeout_s=timeout_s,
                  exit_code=code)
        raise TrainingFailedError(
            f"training did not finish within {timeout_s:g} s and was stopped ({describe_exit(code)})",
            exit_code=code, stderr_path=str(stderr_path), timed_out=True,
            hint="raise training.timeout_s, use a smaller base model or fewer epochs, or train on a GPU")
    if code != 0:
        shutil.rmtree(temp_dir_for(job_dir / ADAPTER_DIR), ignore_errors=True)
        if code == EXIT_DOWNLOAD:
            log.error("training_failed", pid=proc.pid, duration_s=duration_s, exit_code=code,
                      stderr_path=str(stderr_path), reason="weights_not_downloaded")
            raise _download_failed(base, code, stderr_path)
        log.error("training_failed", pid=proc.pid, duration_s=duration_s, exit_code=code,
                  stderr_path=str(stderr_path))
        raise TrainingFailedError(f"the trainer failed ({describe_exit(code)}); see {stderr_path}",
                                  exit_code=code, stderr_path=str(stderr_path))
    result = _collect(job_dir, log_path, stderr_path, code, duration_s)
    # the log of a good run stays in the folder that is handed on: without this machine's paths
    scrub_file(stderr_path, machine_roots([job_dir], {"<base weights>": base.local_dir,
                                                      "<hf cache>": hf_cache_dir()}))
    return result


def _download_cause(stderr_path: Path) -> str:
    """The cause the child wrote on its own last line (``trainer: the weights of X could not be
    downloaded: <cause>``); only that line is read, never the rest of the log."""
    try:
        with open(stderr_path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 4096))
            tail = fh.read().decode("utf-8", "replace")
    except OSError:
        return "the trainer gave no cause"
    lines = [line for line in tail.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if not last.startswith("trainer: the weights of ") or DOWNLOAD_FAILED not in last:
        return "the trainer gave no cause"
    cause = last.split(DOWNLOAD_FAILED, 1)[1]
    return "".join(ch if ch.isprintable() else "?" for ch in cause)[:300]


def _download_failed(base: BaseWeights, code: int, stderr_path: Path) -> TrainingFailedError:
    hf_id = base.hf_id or base.ref or base.ollama_name
    return TrainingFailedError(
        f"the weights of {hf_id} could not be downloaded: {_download_cause(stderr_path)}; see {stderr_path}",
        exit_code=code, stderr_path=str(stderr_path),
        hint=f"check the network, HF_ENDPOINT and the Hugging Face token (HF_TOKEN), or download the weights "
             f"first with `hf download {hf_id} --local-dir <folder>` and set base_models: "
             f"{with_tag(base.ollama_name)}: <folder> in the config")


def _collect(job_dir: Path, log_path: Path, stderr_path: Path, code: int,
             duration_s: float) -> TrainingResult:
    adapter = job_dir / ADAPTER_DIR
    missing = [name for name in ADAPTER_FILES if not (adapter / name).is_file()]
    metrics = read_json_object(job_dir / RESULT_FILE)
    if missing or not metrics:
        absent = [*missing, *([RESULT_FILE] if not metrics else [])]
        log.error("training_outputs_missing", missing=absent, stderr_path=str(stderr_path))
        raise TrainingFailedError(f"the trainer exited cleanly but did not write {', '.join(absent)}",
                                  exit_code=code, stderr_path=str(stderr_path))
    log.info("training_finished", duration_s=duration_s, steps=metrics.get("steps"),
             first_loss=metrics.get("first_loss"), final_loss=metrics.get("final_loss"),
             train_loss=metrics.get("train_loss"), eval_loss=metrics.get("eval_loss"),
             tokens=metrics.get("tokens"), device=metrics.get("device"),
             rows_trained=metrics.get("rows_trained"),
             rows_dropped_too_long=metrics.get("rows_dropped_too_long"))
    return TrainingResult(adapter_dir=str(adapter), log_path=str(log_path),
                          stderr_path=str(stderr_path), metrics=metrics)
