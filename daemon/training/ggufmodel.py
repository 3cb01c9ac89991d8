"""GGUF base weights: the file a user's Ollama already serves, read, found and made trainable.

Users have Ollama models, which Ollama keeps as GGUF files; this module lets a fine-tune start from
exactly those weights, with no download:

* ``find_ollama_blob(name, models_dir)`` finds the GGUF of an Ollama model in Ollama's models folder
  (``manifests/<host>/<namespace>/<model>/<tag>`` names the layers; the model layer's digest is the
  blob ``blobs/sha256-<hex>``), reading files only; ``blob_from_modelfile`` takes the ``FROM`` path
  out of ``/api/show``'s generated Modelfile, for when the folder is elsewhere but readable.
* ``summary(path)`` reads what the parent needs to decide (architecture, quantization, whether the
  file carries a chat template, which turn-format tokens its vocabulary has, its sha256) with
  ``ggufheader``'s bounded reader (the daemon's memory does not grow with the vocabulary; a damaged
  file is a ``GGUFFormatError``), once per file version: the answer is cached, because hashing a
  model of gigabytes takes a while.
* ``prepared_dir(summary)`` is where the trainable form lives: the GGUF dequantized by transformers
  (``from_pretrained(folder, gguf_file=...)``) and saved once as ``model.safetensors`` with its
  ``config.json`` and a tokenizer (``tokenizer.json``) carrying the chat template to use, so that the
  trainer, the local rater and llama.cpp's adapter converter all read an ordinary Hugging Face
  folder. ``prepare(gguf, dest, chat_template)`` builds it (child processes only: it imports
  torch); it is keyed by the GGUF's sha256, so an adapter is trained against exactly the weights
  Ollama serves, dequantized.

A SentencePiece vocabulary (``tokenizer.ggml.model == "llama"``: Gemma, Llama 2, Mistral) is turned
into a ``tokenizers`` BPE whose merge order is the score of the merged piece, which is how llama.cpp
tokenizes such a vocabulary; transformers' own GGUF conversion of Gemma's vocabulary splits words
into the wrong pieces ("capital" became "c", "ap", "it", "al"), and a model shown pieces it was
never trained on answers nonsense. Other vocabularies (``gpt2``-style BPE with merges: Llama 3,
Qwen) go through transformers' conversion. Nothing happens at import time.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..fsutil import read_json_object, write_json
from ..llamacpp import cache_dir
from .ggufheader import read_header

MODEL_LAYER = "application/vnd.ollama.image.model"
DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4
SUMMARY_VERSION = 1


def is_gguf(path: str | os.PathLike) -> bool:
    """The file starts with GGUF's magic bytes."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:
        return False


# --- finding the GGUF of an Ollama model ---------------------------------------------------------

def ollama_models_dirs(configured: str | None = None, env: Mapping[str, str] = os.environ) -> list[Path]:
    """Where Ollama keeps models: the configured folder, ``$OLLAMA_MODELS``, the user's
    ``~/.ollama/models``, and the Linux service's ``/usr/share/ollama/.ollama/models``."""
    dirs = [configured, env.get("OLLAMA_MODELS"), str(Path.home() / ".ollama" / "models"),
            "/usr/share/ollama/.ollama/models"]
    seen, out = set(), []
    for d in dirs:
        if d and d not in seen:
            seen.add(d)
            out.append(Path(d).expanduser())
    return out


def manifest_path(models_dir: Path, name: str) -> Path:
    """``gemma3:270m`` → ``manifests/registry.ollama.ai/library/gemma3/270m`` (Ollama's name rules:
    host and namespace default, tag ``latest``)."""
    rest, _, tag = name.rpartition(":") if ":" in name.rsplit("/", 1)[-1] else (name, "", "latest")
    parts = rest.split("/")
    if len(parts) == 1:
        parts = [DEFAULT_HOST, DEFAULT_NAMESPACE, parts[0]]
    elif len(parts) == 2:
        parts = [DEFAULT_HOST, *parts]
    return models_dir.joinpath("manifests", *parts, tag or "latest")


def find_ollama_blob(name: str, models_dirs: list[Path]) -> tuple[Path | None, str]:
    """The GGUF blob of the Ollama model ``name`` and how it was found (or why it was not)."""
    tried = []
    for models_dir in models_dirs:
        manifest = manifest_path(models_dir, name)
        tried.append(str(manifest))
        data = read_json_object(manifest)
        layers = data.get("layers") if isinstance(data.get("layers"), list) else []
        for layer in layers:
            digest = layer.get("digest") if isinstance(layer, dict) else None
            if ((layer.get("mediaType") if isinstance(layer, dict) else None) != MODEL_LAYER
                    or not isinstance(digest, str)):
                continue
            blob = models_dir / "blobs" / digest.replace(":", "-")
            if is_gguf(blob):
                return blob, f"Ollama's manifest {manifest}"
    return None, "no readable Ollama manifest names a GGUF model layer (looked at " + ", ".join(tried) + ")"


def blob_from_modelfile(modelfile: str) -> Path | None:
    """The ``FROM`` file of a Modelfile generated by ``/api/show``, when it is a GGUF this machine
    can read (Ollama on the same machine)."""
    for line in modelfile.splitlines():
        m = re.match(r"\s*FROM\s+(\S.*?)\s*$", line, flags=re.IGNORECASE)
        if m and m.group(1).startswith("/"):
            path = Path(m.group(1))
            return path if is_gguf(path) else None
    return None


# --- what a GGUF file is -----------------------------------------------------------------------

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _summary_cache(path: Path, env: Mapping[str, str]) -> Path:
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}".encode()).hexdigest()
    return cache_dir(env) / "gguf-summaries" / f"{key}.json"


def _read_summary(path: Path) -> dict[str, Any]:
    import gguf

    header = read_header(path, keys={"general.architecture", "general.name", "general.file_type",
                                     "tokenizer.ggml.model"}, present={"tokenizer.chat_template"})
    values = header.values
    file_type = values.get("general.file_type")
    try:
        quantization = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (ValueError, TypeError):
        quantization = None if file_type is None else f"file type {file_type}"
    return {
        "version": SUMMARY_VERSION,
        "architecture": values.get("general.architecture"),
        "name": values.get("general.name"),
        "quantization": quantization,
        "file_type": file_type,
        "tokenizer_model": values.get("tokenizer.ggml.model"),
        "has_chat_template": bool(values.get("tokenizer.chat_template")),
        "special_tokens": header.special_tokens,
        "vocab_size": header.vocab_size,
        "tensors": header.tensors,
        "sha256": _sha256(path),
        "size": path.stat().st_size,
    }


def summary(path: str | os.PathLike, env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """What the GGUF at ``path`` is (cached per file version; the file itself is never written)."""
    path = Path(path)
    cached = _summary_cache(path, env)
    data = read_json_object(cached)
    if data.get("version") == SUMMARY_VERSION:
        return data
    data = _read_summary(path)
    with contextlib.suppress(OSError):
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_json(cached, data)
    return data


def prepared_dir(sha256: str, env: Mapping[str, str] = os.environ) -> Path:
    """Where the dequantized, trainable form of the GGUF with this sha256 lives."""
    return cache_dir(env) / "dequantized" / sha256[:24]


# --- the trainable form (child processes only: torch, transformers) ------------------------------

def spm_tokenizer(fields: Any) -> Any:
    """A ``tokenizers.Tokenizer`` for a SentencePiece GGUF vocabulary (the reader's ``fields``),
    merging as llama.cpp does: the pair whose merged piece has the higher score first; control and
    user-defined tokens are matched whole, before the text is normalised."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    tok_f, score_f, type_f = (fields[k] for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                                                  "tokenizer.ggml.token_type"))
    tokens = [bytes(tok_f.parts[i]).decode("utf-8", "replace") for i in tok_f.data]
    scores = [float(score_f.parts[i][0]) for i in score_f.data]
    types = [int(type_f.parts[i][0]) for i in type_f.data]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score, kind in zip(tokens, scores, types):
        if kind != 1 or len(token) < 2:
            continue
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in vocab and right in vocab:
                merges.append((-score, vocab[token], left, right))
    merges.sort()
    unk = fields.get("tokenizer.ggml.unknown_token_id")
    unk_token = tokens[int(unk.parts[unk.data[0]][0])] if unk is not None else None
    tk = Tokenizer(BPE(vocab=vocab, merges=[(a, b) for _, _, a, b in merges], byte_fallback=True,
                       unk_token=unk_token, fuse_unk=True))
    tk.normalizer = normalizers.Replace(" ", "▁")
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, kind in zip(tokens, types) if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED)])
    return tk


def _special_token(fields: Any, key: str, tokens_field: Any) -> str | None:
    f = fields.get(key)
    if f is None:
        return None
    return bytes(tokens_field.parts[tokens_field.data[int(f.parts[f.data[0]][0])]]).decode("utf-8", "replace")


def build_tokenizer(path: Path, chat_template: str | None) -> Any:
    """The GGUF's tokenizer as a transformers fast tokenizer, with ``chat_template`` set."""
    import gguf
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    fields = gguf.GGUFReader(str(path)).fields
    model_f = fields.get("tokenizer.ggml.model")
    model = bytes(model_f.parts[model_f.data[0]]).decode() if model_f is not None else None
    if model == "llama":
        toks = fields["tokenizer.ggml.tokens"]
        named = {role: _special_token(fields, f"tokenizer.ggml.{key}_token_id", toks)
                 for role, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                                   ("pad_token", "padding"))}
        # the reader's fields are parsed once (a 262,144-token vocabulary takes most of a minute)
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=spm_tokenizer(fields),
                                            **{k: v for k, v in named.items() if v is not None})
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def prepare(gguf_path: str | os.PathLike, dest: str | os.PathLike, chat_template: str | None) -> Path:
    """Make ``dest`` the GGUF's dequantized Hugging Face folder (config.json, model.safetensors,
    tokenizer files); built once under a lock, in a temporary sibling renamed into place."""
    gguf_path, dest = Path(gguf_path), Path(dest)
    if (dest / "config.json").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (dest / "config.json").is_file():
            return dest
        import torch
        from safetensors.torch import save_model
        from transformers import AutoModelForCausalLM

        work = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
        try:
            tokenizer = build_tokenizer(gguf_path, chat_template)
            model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                         dtype=torch.float32)
            # save_pretrained refuses a GGUF-loaded model ("not serializable"); its weights are
            # ordinary tensors once dequantized, and save_model keeps tied ones once
            save_model(model, str(work / "model.safetensors"))
            # a GGUF-loaded config names no architecture class; loaders and llama.cpp's adapter
            # converter read it from there
            model.config.architectures = [type(model).__name__]
            model.config.save_pretrained(str(work))
            tokenizer.save_pretrained(str(work))
            write_json(work / "source.json", {"gguf_sha256": _sha256(gguf_path), "gguf_name": gguf_path.name})
            os.replace(work, dest)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return dest


def main(argv: list[str] | None = None) -> int:
    """``python -m daemon.training.ggufmodel prepare GGUF DEST [TEMPLATE_FILE]`` (for tools and tests)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) < 3 or args[0] != "prepare":
        print("usage: python -m daemon.training.ggufmodel prepare GGUF DEST [CHAT_TEMPLATE_FILE]", file=sys.stderr)
        return 2
    template = Path(args[3]).read_text(encoding="utf-8") if len(args) > 3 else None
    print(prepare(args[1], args[2], template))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

