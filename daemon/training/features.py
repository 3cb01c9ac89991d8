"""The head's child: ``python -m daemon.training.features <spec>`` turns texts into the base model's vectors.

Child-side code like ``trainer`` and ``quality.generate``: torch and transformers are imported
inside the functions, and nothing happens at import time (the parent imports this module only for
its names: the poolings and the output files). ``run`` loads the base weights without the
language-model head (the decoder
alone, ``AutoModel``), and for each text runs one forward pass, no generation, on the token ids
``[bos] + text + question`` (the text cut to ``max_tokens``), reading the hidden state after chosen
decoder layers: layer ``k`` of ``L`` is the output of decoder layer ``k`` (1-based), and layer ``L``
is the model's final, normalised state. Each token's state after an earlier layer is passed through
the model's final norm too (``states`` "normed", the default: what llama.cpp's embeddings of the
GGUF cut after that layer give, so that a llama-server can compute the same vectors; "raw" keeps
the residual stream as the layer leaves it, as heads fitted before did). Each (layer, pooling) gives
one float32 vector per text:
``mean``, the average over the text's own tokens (not the bos or the question), or ``last``, the
state at the last token (the question's end). The pass stops after the deepest layer asked for
(a head whose members read every sixth of the depth needs the whole pass).

One text per forward pass, never padded beside another: a text's vectors depend on that text
alone, so the vectors computed when rating equal those the head was fitted on, bit for bit, on the
same machine (a batch of padded texts changes the matrix shapes and with them the last bits).

The pass runs in the spec's ``dtype``: ``auto`` picks ``bfloat16`` on a CPU that multiplies it in
hardware (AVX512-BF16 or AMX: about three times the records per second of ``float32``, measured
on Gemma 3 270M) and on a GPU that supports it, ``float32`` elsewhere; ``features.json`` says which
ran, and the head records it, so that rating runs the one it was fitted with.

The spec (JSON): ``base_ref`` (the weights folder), ``input`` (JSONL, one ``{"text": ...}`` per
line), ``output_dir`` (where ``features.json`` and one ``L<layer>-<pooling>.npy`` per vector kind
go), ``layers`` (a list of layer numbers, or ``"candidates"``: ``candidate_layers``), ``poolings``
(``["mean", "last"]`` or one of them), ``question`` (text appended to every text; may be empty),
``max_tokens``, and optionally ``gguf_path`` (a GGUF base, dequantized into ``base_ref`` first),
``threads``, ``device`` ("auto"), ``dtype`` (``DTYPES`` or "auto", the default), ``states``
(``STATES``) and ``parent_pid``.
``features.json``: ``{"rows", "layers_total", "hidden_size", "layers", "poolings", "states", "device", "dtype",
"files": {"<layer>-<pooling>": "<file>.npy"}}``.
Progress goes to stdout as ``{"event": "features_progress", "done": n, "total": N}`` lines. Nothing
from the texts ever reaches stdout or stderr: only counts and line numbers.

Exit codes: 0 done; 2 the spec or the weights are unusable; 3 the input cannot be read; 4 the
supervising parent (``parent_pid``) died; 1 anything unexpected (traceback on stderr).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

EXIT_SPEC = 2
EXIT_DATA = 3
EXIT_ORPHANED = 4
POOLINGS = ("mean", "last")
DTYPES = ("float32", "bfloat16")
# what a layer's vector is made of: "normed", each token's state passed through the model's own final
# norm (what llama.cpp's embeddings of a GGUF cut after that layer give, so that a server can compute
# the same vectors), or "raw", the residual stream as the layer leaves it (heads fitted before)
STATES = ("normed", "raw")
# where the candidate layers sit in the model's depth: every sixth of it (layers 3, 6, ..., 18 of
# Gemma 3 270M's 18), each a member of the head (bench/head_arms.py measured these six)
CANDIDATE_FRACTIONS = (1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0)
FEATURES_FILE = "features.json"
PROGRESS_EVERY = 8


class FeaturesExit(Exception):
    """A known reason to stop: ``code`` is the exit status, the message (no text) goes to stderr."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def candidate_layers(layers_total: int) -> list[int]:
    """The layers whose vectors the head chooses among (``CANDIDATE_FRACTIONS`` of the depth, each
    at least 1), in order, without repeats."""
    out: list[int] = []
    for fraction in CANDIDATE_FRACTIONS:
        layer = min(layers_total, max(1, round(layers_total * fraction)))
        if layer not in out:
            out.append(layer)
    return sorted(out)


def array_name(layer: int, pooling: str) -> str:
    return f"L{layer}-{pooling}.npy"


# --- the model ----------------------------------------------------------------------------------

def passes_dtype(device: str, requested: str = "auto") -> str:
    """The dtype of the passes: ``requested`` unless "auto"; then bf16 where the hardware multiplies it
    (a CUDA GPU that supports it, a CPU with AVX512-BF16 or AMX), else float32."""
    import torch

    from . import trainer

    if requested != "auto":
        return requested
    if device == "cpu":
        return "bfloat16" if trainer.cpu_has_native_bf16() else "float32"
    return "bfloat16" if trainer.pick_dtype(device) == torch.bfloat16 else "float32"


def load(base_ref: str, device: str = "auto", dtype: str = "auto") -> tuple[Any, Any, str, str]:
    """(tokenizer, the decoder without its language-model head in eval mode, device, dtype). Loaded as the
    causal LM it was saved as, so that tied embeddings are restored from whichever name the file
    holds them under (a GGUF's dequantized form keeps them as ``lm_head.weight``), then only its
    decoder is run: the head, a vocabulary-wide matrix product per token, is never computed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .trainer import pick_device

    device = pick_device(device)
    dtype = passes_dtype(device, dtype)
    tokenizer = AutoTokenizer.from_pretrained(base_ref)
    model = AutoModelForCausalLM.from_pretrained(base_ref, dtype=getattr(torch, dtype))
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    decoder.to(device)
    decoder.eval()
    return tokenizer, decoder, device, dtype


def _decoder_part(model: Any, name: str, what: str) -> Any:
    """``model.<name>`` of the decoders transformers builds (or of their language model)."""
    part = getattr(model, name, None)
    if part is None and hasattr(model, "language_model"):
        part = getattr(model.language_model, name, None)
    if part is None:
        raise FeaturesExit(EXIT_SPEC, f"the base model ({type(model).__name__}) has no {what}")
    return part


def decoder_layers(model: Any) -> Any:
    """The model's list of decoder layers (``model.layers``)."""
    return _decoder_part(model, "layers", "list of decoder layers")


def final_norm(model: Any) -> Any:
    """The decoder's final norm (``model.norm``)."""
    return _decoder_part(model, "norm", "final norm")


class _Enough(Exception):
    """Raised by the hook of the deepest layer asked for: the rest of the pass is not needed."""


def token_ids(tokenizer: Any, text: str, question_ids: list[int], max_tokens: int) -> tuple[list[int], int, int]:
    """(the ids of one pass, where the text's tokens start, where they end)."""
    return pass_ids(tokenizer.bos_token_id, tokenizer(text, add_special_tokens=False)["input_ids"], question_ids,
                    max_tokens)


def pass_ids(bos: int | None, text_ids: list[int], question_ids: list[int],
             max_tokens: int) -> tuple[list[int], int, int]:
    """``[bos] + text + question``, the text cut to ``max_tokens`` (no bos when the tokenizer has none):
    (the ids, where the text's tokens start, where they end). A llama-server computing a head's
    vectors (``serving.headserver``) lays a pass out by this rule too."""
    first = [bos] if bos is not None else []
    text_ids = text_ids[:max_tokens]
    return first + text_ids + question_ids, len(first), len(first) + len(text_ids)


def pool(tokens: Any, start: int, end: int, pooling: str) -> Any:
    """One vector of a pass's token states (a torch tensor or a numpy array, one row per token):
    ``mean`` over the text's own tokens (all of them when the text has none), ``last`` the last
    token's."""
    if pooling == "mean":
        return (tokens[start:end] if end > start else tokens).mean(0)
    return tokens[-1]


def vectors(model: Any, device: str, ids: list[int], start: int, end: int, layers: list[int],
            poolings: list[str], states: str = "normed") -> dict[tuple[int, str], Any]:
    """One forward pass of ``ids``: per (layer, pooling) the float32 vector (a numpy array) of the
    ``states`` (``STATES``) after each layer."""
    import torch

    stack = decoder_layers(model)
    norm = final_norm(model) if states == "normed" else None
    total = len(stack)
    captured: dict[int, Any] = {}
    deepest = max(layers)
    handles = []

    def hook_for(layer: int):
        def hook(_module, _args, output):
            # a copy: a later layer may update its input in place
            captured[layer] = (output[0] if isinstance(output, tuple) else output).detach().clone()
            if layer == deepest:
                raise _Enough

        return hook

    for layer in layers:
        if layer < total:  # layer ``total`` is the final normalised state, the model's own output
            handles.append(stack[layer - 1].register_forward_hook(hook_for(layer)))
    try:
        with torch.inference_mode():
            try:
                out = model(input_ids=torch.tensor([ids], device=device), use_cache=False)
                captured[total] = out.last_hidden_state
            except _Enough:
                pass
    finally:
        for handle in handles:
            handle.remove()
    result = {}
    for layer in layers:
        tokens = captured[layer][0]
        if norm is not None and layer < total:  # the final state is normalised already
            with torch.inference_mode():
                tokens = norm(tokens)
        tokens = tokens.float()
        for pooling in poolings:
            result[(layer, pooling)] = pool(tokens, start, end, pooling).cpu().numpy()
    return result


# --- the child process --------------------------------------------------------------------------

def load_spec(path: str) -> dict:
    """The spec, checked: required keys present and of the right kind."""
    try:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FeaturesExit(EXIT_SPEC, f"cannot read the spec {path} ({type(exc).__name__})") from None
    if not isinstance(spec, dict):
        raise FeaturesExit(EXIT_SPEC, "the spec is not a JSON object")
    missing = [key for key in ("base_ref", "input", "output_dir", "question") if not isinstance(spec.get(key), str)]
    if missing:
        raise FeaturesExit(EXIT_SPEC, f"the spec lacks {', '.join(missing)} (a string each)")
    layers = spec.get("layers")
    if layers != "candidates" and not (isinstance(layers, list) and layers
                                       and all(type(x) is int and x >= 1 for x in layers)):
        raise FeaturesExit(EXIT_SPEC, "the spec's layers must be \"candidates\" or a list of layer numbers (1 or more)")
    poolings = spec.get("poolings")
    if not (isinstance(poolings, list) and poolings and all(p in POOLINGS for p in poolings)):
        raise FeaturesExit(EXIT_SPEC, f"the spec's poolings must be a list of {', '.join(POOLINGS)}")
    if spec.get("states", "normed") not in STATES:
        raise FeaturesExit(EXIT_SPEC, f"the spec's states must be {' or '.join(STATES)}")
    if spec.get("dtype", "auto") not in (*DTYPES, "auto"):
        raise FeaturesExit(EXIT_SPEC, f"the spec's dtype must be auto, {' or '.join(DTYPES)}")
    for key in ("max_tokens", "threads"):
        value = spec.get(key)
        if value is not None and (type(value) is not int or value < 1):
            raise FeaturesExit(EXIT_SPEC, f"the spec's {key} must be an integer of at least 1")
    return spec


def read_texts(path: str) -> list[str]:
    """The ``text`` of each line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise FeaturesExit(EXIT_DATA, f"cannot read the input {path} ({type(exc).__name__})") from None
    texts = []
    for lineno, line in enumerate(lines, 1):
        try:
            text = json.loads(line)["text"]
        except (ValueError, KeyError, TypeError):
            text = None
        if not isinstance(text, str):
            raise FeaturesExit(EXIT_DATA, f"input line {lineno} is not a {{\"text\": \"...\"}} record")
        texts.append(text)
    return texts


def run(spec: dict) -> dict:
    """Write the spec's vectors into its output folder; returns what ``features.json`` says."""
    import numpy as np
    import torch

    texts = read_texts(spec["input"])
    threads = os.environ.get("OMP_NUM_THREADS", "")
    # as in the trainer, an operator's OMP_NUM_THREADS wins: the spec's count is the parent's guess
    if threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))
    elif spec.get("threads") is not None:
        torch.set_num_threads(spec["threads"])
    _progress(0, len(texts))
    try:
        if spec.get("gguf_path"):
            from .ggufmodel import prepare

            prepare(spec["gguf_path"], spec["base_ref"], spec.get("chat_template"))
        tokenizer, model, device, dtype = load(spec["base_ref"], spec.get("device", "auto"), spec.get("dtype", "auto"))
    except (OSError, ValueError) as exc:
        raise FeaturesExit(EXIT_SPEC, "cannot load the weights from the spec's base_ref "
                                      f"({type(exc).__name__})") from None
    total_layers = len(decoder_layers(model))
    layers = candidate_layers(total_layers) if spec["layers"] == "candidates" else sorted(set(spec["layers"]))
    if max(layers) > total_layers:
        raise FeaturesExit(EXIT_SPEC, f"the base model has {total_layers} layers; the spec asks for layer "
                                      f"{max(layers)}")
    poolings = [p for p in POOLINGS if p in spec["poolings"]]
    question = tokenizer(spec["question"], add_special_tokens=False)["input_ids"] if spec["question"] else []
    max_tokens = spec.get("max_tokens") or 4096
    states = spec.get("states", "normed")
    hidden = int(getattr(model.config, "hidden_size", 0) or 0)
    arrays: dict[tuple[int, str], Any] = {}
    parent_pid = spec.get("parent_pid")
    started = time.monotonic()
    for i, text in enumerate(texts):
        ids, start, end = token_ids(tokenizer, text, question, max_tokens)
        for key, vector in vectors(model, device, ids, start, end, layers, poolings, states).items():
            if key not in arrays:  # the width the model really gives
                hidden = vector.shape[0]
                arrays[key] = np.zeros((len(texts), hidden), dtype=np.float32)
            arrays[key][i] = vector
        done = i + 1
        if done % PROGRESS_EVERY == 0 or done == len(texts):
            _progress(done, len(texts))
            if parent_pid and os.getppid() != parent_pid:
                raise FeaturesExit(EXIT_ORPHANED, "the supervising process is gone; stopping")
    out = Path(spec["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for layer in layers:
        for pooling in poolings:
            name = array_name(layer, pooling)
            array = arrays.get((layer, pooling), np.zeros((0, hidden), dtype=np.float32))
            np.save(out / name, array, allow_pickle=False)
            files[f"{layer}-{pooling}"] = name
    info = {"rows": len(texts), "layers_total": total_layers, "hidden_size": hidden, "layers": layers,
            "poolings": poolings, "states": states, "device": device, "dtype": dtype, "files": files,
            "forward_s": round(time.monotonic() - started, 3)}
    (out / FEATURES_FILE).write_text(json.dumps(info), encoding="utf-8")
    return info


def _progress(done: int, total: int) -> None:
    print(json.dumps({"event": "features_progress", "done": done, "total": total}), flush=True)


def main(argv: list[str] | None = None) -> int:
    from .trainer import TrainerExit

    args = sys.argv[1:] if argv is None else argv
    try:
        if len(args) != 1:
            raise FeaturesExit(EXIT_SPEC, "usage is python -m daemon.training.features SPEC.json")
        run(load_spec(args[0]))
    except (FeaturesExit, TrainerExit) as exc:  # TrainerExit: the device the spec asks for is absent
        # one line, no colon before the reason: the parent keeps only the text before the first colon
        print(f"features failed - {exc}", file=sys.stderr, flush=True)
        return exc.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
