"""A head's vectors through llama.cpp: the base GGUF cut after each of the head's layers, served for embeddings.

A head (``quality.head``) reads the base model's hidden state after a few decoder layers, each token's
state passed through the model's final norm, pooled over the record's own tokens (``mean``) or taken at
the last token of the question (``last``). llama.cpp's server gives exactly that for a GGUF holding
only the first ``k`` decoder layers: with ``--embeddings --pooling none`` its ``/embeddings`` answers
the final-normed state of every token. ``cut_gguf`` writes that GGUF: the base's metadata with the
block count set to ``k`` (per-layer arrays cut to ``k``), the embedding, output and norm tensors as
stored, and the first ``k`` blocks' weights in the head's dtype (dequantized exactly, as the head's
own passes read them: float32, or bfloat16), so that llama.cpp computes with the same numbers the
head was fitted on. Cuts are made once per base GGUF, layer and dtype in the machine's cache
(``cut_path``), under a lock, written under a temporary name and renamed into place.

``HeadServers`` starts one llama-server per layer the head reads (loopback, its output to a private
log), lays each record's pass out as the features child does (``features.pass_ids``: ``[bos] + text
+ question``, the text cut to the head's token limit; the text tokenized by the server), asks every
server for the tokens' states and pools them by the child's rule (``features.pool``). The daemon's
import stays light: ``gguf`` and numpy are imported inside the functions (the training extra).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import requests

from ..errors import FineTunerError, GGUFFormatError
from ..llamacpp import cache_dir
from ..logconfig import get_logger
from ..training.features import pass_ids, pool
from .http import (
    AnswerTimedOut,
    AnswerTooLarge,
    Deadline,
    DeadlineAdapter,
    NotJSON,
    parse_json,
    read_body,
    refuse_redirects,
    under,
)
from .llamaserver import LlamaServer, ServerSpec

log = get_logger("headserver")

CUT_TYPES = ("float32", "bfloat16")
CONNECT_TIMEOUT_S = 5.0  # our own servers, on the loopback interface
REQUEST_TIMEOUT_S = 120.0
ANSWER_MARGIN_BYTES = 64 * 1024  # beyond what the ids or states asked for can take as JSON
FREE_MARGIN_BYTES = 256 * 1024 * 1024  # a cut is not started unless it leaves this much free
BLOCK_RE = re.compile(r"^blk\.(\d+)\.")


class HeadServerError(FineTunerError):
    """The head's vectors could not be had from llama-server; the message names no record."""


def cut_path(gguf_sha256: str, layer: int, dtype: str, env: Mapping[str, str] = os.environ) -> Path:
    """Where the cut of the GGUF with this sha256 after ``layer`` in ``dtype`` lives."""
    return cache_dir(env) / "cuts" / gguf_sha256[:24] / f"L{layer}-{dtype}.gguf"


def cut_gguf(source: str | os.PathLike, dest: str | os.PathLike, layer: int, dtype: str) -> Path:
    """Make ``dest`` the GGUF ``source`` with only its first ``layer`` decoder blocks, their matrices in
    ``dtype`` (``CUT_TYPES``); built once under a lock, renamed into place when whole."""
    source, dest = Path(source), Path(dest)
    if dtype not in CUT_TYPES:
        raise ValueError(f"a cut's dtype is one of {', '.join(CUT_TYPES)}")
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if dest.is_file():
            return dest
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{dest.stem}-", suffix=".gguf", dir=dest.parent)
        os.close(fd)
        try:
            _write_cut(source, Path(tmp), layer, dtype)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return dest


def _write_cut(source: Path, dest: Path, layer: int, dtype: str) -> None:
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(source)
    arch_field = reader.fields.get(gguf.Keys.General.ARCHITECTURE)
    if arch_field is None:
        raise ValueError(f"{source.name} names no architecture")
    arch = str(arch_field.contents())
    count_key = f"{arch}.block_count"
    if count_key not in reader.fields:
        raise ValueError(f"{source.name} has no {count_key}")
    total = int(reader.fields[count_key].contents())
    if not 1 <= layer <= total:
        raise ValueError(f"{source.name} has {total} layers; a cut after layer {layer} cannot be made")
    writer = gguf.GGUFWriter(dest, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if field.name == count_key:
            value = layer
        elif sub is not None and field.name.startswith(arch + ".") and len(value) == total:
            value = value[:layer]  # a value per layer
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    target = gguf.GGMLQuantizationType.F32 if dtype == "float32" else gguf.GGMLQuantizationType.BF16
    stored = np.dtype(np.float32 if dtype == "float32" else np.uint16)  # bfloat16's bits, as gguf writes them
    kept = []
    for tensor in reader.tensors:
        block = BLOCK_RE.match(tensor.name)
        if block and int(block.group(1)) >= layer:
            continue
        convert = bool(block) and len(tensor.shape) > 1 and tensor.tensor_type != target
        kept.append((tensor, convert))
        if convert:
            shape = gguf.quant_shape_from_byte_shape(tensor.data.shape, tensor.tensor_type) \
                if tensor.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) \
                else tensor.data.shape
            writer.add_tensor_info(tensor.name, shape, stored, int(np.prod(shape)) * stored.itemsize, raw_dtype=target)
        else:
            writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                                   tensor.tensor_type)
    planned = sum(info.nbytes for part in writer.tensors for info in part.values())
    free = shutil.disk_usage(dest.parent).free
    if free < planned + FREE_MARGIN_BYTES:
        raise OSError(errno.ENOSPC, f"the cut needs {planned / 1e9:.1f} GB and {dest.parent} has "
                                    f"{free / 1e9:.1f} GB free")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor, convert in kept:
        data = tensor.data
        if convert:
            data = gguf.quants.dequantize(data, tensor.tensor_type).astype(np.float32)
            if dtype == "bfloat16":
                data = gguf.quants.quantize(data, target)
        writer.write_tensor_data(data, tensor_endianess=reader.endianess)
    writer.close()


class HeadServers:
    """``with HeadServers(gguf_path, sha256, head, log_dir=...) as servers: servers.vectors(texts)``:
    per (layer, pooling) of the head, one float32 row per text, from llama-server."""

    def __init__(self, gguf_path: str | os.PathLike, gguf_sha256: str, head: Any, *, log_dir: str | os.PathLike,
                 threads: int | None = None, env: Mapping[str, str] = os.environ) -> None:
        if head.states != "normed":
            raise HeadServerError("this head reads the raw hidden states, which llama-server does not give",
                                  hint="build the head again (it then reads final-normed states, as llama-server "
                                       "gives), or rate it with the local backend")
        if head.dtype not in CUT_TYPES:
            raise HeadServerError(f"a head fitted in {head.dtype} cannot be served")
        self.gguf_path, self.sha256, self.head = Path(gguf_path), gguf_sha256, head
        self.log_dir, self.threads, self.env = Path(log_dir), threads, env
        self.servers: dict[int, LlamaServer] = {}
        self.bos: int | None = None
        self.session = refuse_redirects(requests.Session())
        self.session.mount("http://", DeadlineAdapter())

    def start(self, stop_event: threading.Event | None = None) -> "HeadServers":
        from ..training.ggufheader import read_header

        # the features child puts the tokenizer's bos first whenever it has one, as the GGUF names it
        bos_key = "tokenizer.ggml.bos_token_id"
        try:
            self.bos = read_header(self.gguf_path, keys={bos_key}).values.get(bos_key)
        except GGUFFormatError as exc:  # it names the file and the offset, never a value
            raise HeadServerError(str(exc)) from None
        except OSError as exc:
            raise HeadServerError(f"cannot read {self.gguf_path.name} ({type(exc).__name__})") from None
        # room for the token limit, the bos and the question, in one batch (embeddings need it whole)
        context = self.head.max_tokens + 512
        began, made, cut_s = time.monotonic(), 0, 0.0
        try:
            for layer in self.head.layers:
                path = cut_path(self.sha256, layer, self.head.dtype, self.env)
                if not path.is_file():  # the first time: a minute or so for a small base
                    started = time.monotonic()
                    try:
                        cut_gguf(self.gguf_path, path, layer, self.head.dtype)
                    except (OSError, ValueError) as exc:
                        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                        raise HeadServerError(f"cannot cut {self.gguf_path.name} after layer {layer}: {reason}",
                                              hint="free disk space in fine-tuner's cache (FINE_TUNER_CACHE_DIR "
                                                   "moves it), or rate with the local backend") from None
                    made, cut_s = made + 1, cut_s + time.monotonic() - started
                spec = ServerSpec(path, alias=f"L{layer}", parallel=1, ctx_per_slot=context, threads=self.threads,
                                  extra_args=("--embeddings", "--pooling", "none", "--batch-size", str(context),
                                              "--ubatch-size", str(context), "--poll", "0"))
                server = LlamaServer(spec, log_path=self.log_dir / f"llama-server-head-L{layer}.log")
                self.servers[layer] = server
                server.start(stop_event=stop_event)
        except BaseException:
            self.close()
            raise
        log.info("head_servers_started", gguf=self.gguf_path.name, layers=self.head.layers, dtype=self.head.dtype,
                 cuts_made=made, cut_s=round(cut_s, 1), load_s=round(time.monotonic() - began - cut_s, 1))
        return self

    def close(self) -> None:
        for server in self.servers.values():
            server.stop()
        self.servers = {}
        self.session.close()

    def __enter__(self) -> "HeadServers":
        return self.start() if not self.servers else self

    def __exit__(self, *exc) -> None:
        self.close()

    def _post(self, server: LlamaServer, path: str, body: dict, limit: int) -> Any:
        """``POST path`` to one of our servers, as every client here asks a server (``serving.http``): a
        total deadline, no redirect followed, the answer read in pieces up to ``limit`` bytes, JSON
        checked before use; each problem a HeadServerError naming the endpoint, never a value."""
        deadline = Deadline(CONNECT_TIMEOUT_S, REQUEST_TIMEOUT_S)
        with under(deadline):
            try:
                resp = self.session.post(server.url + path, json=body, timeout=deadline.timeouts(), stream=True,
                                         allow_redirects=False)
            except requests.RequestException as exc:
                raise HeadServerError(f"llama-server did not answer {path} ({type(exc).__name__})") from None
            try:
                if resp.status_code != 200:
                    raise HeadServerError(f"llama-server answered {path} with HTTP {resp.status_code}",
                                          hint=f"read {server.log_path}")
                raw = read_body(resp, limit=limit, deadline=deadline)
            except AnswerTooLarge:
                raise HeadServerError(f"llama-server's answer to {path} is larger than {limit:,} bytes") from None
            except (AnswerTimedOut, requests.RequestException) as exc:
                raise HeadServerError(f"llama-server did not answer {path} ({type(exc).__name__})") from None
            finally:
                resp.close()
        try:
            return parse_json(raw)
        except NotJSON as exc:
            raise HeadServerError(f"llama-server's answer to {path} {exc.reason}") from None

    def _tokens(self, server: LlamaServer, text: str) -> list[int]:
        # a token is at least one byte of the text; an id and its comma, a few dozen characters at most
        data = self._post(server, "/tokenize", {"content": text, "add_special": False},
                          ANSWER_MARGIN_BYTES + 32 * len(text.encode()))
        tokens = data.get("tokens") if isinstance(data, dict) else None
        if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
            raise HeadServerError("llama-server's /tokenize answer holds no list of token ids")
        return tokens

    def vectors(self, texts: Sequence[str], on_progress=None,
                stop_event: threading.Event | None = None) -> dict[tuple[int, str], Any]:
        import numpy as np

        if not self.servers:
            raise HeadServerError("the head's servers are not started")
        question = self._tokens(self.servers[self.head.layers[0]], self.head.question) if self.head.question else []
        width = int(self.head.base["hidden_size"])
        out = {kind: np.zeros((len(texts), width), dtype=np.float32) for kind in self.head.kinds}
        for i, text in enumerate(texts):
            if stop_event is not None and stop_event.is_set():
                raise HeadServerError("stopped")
            ids, start, end = pass_ids(self.bos, self._tokens(self.servers[self.head.layers[0]], text), question,
                                       self.head.max_tokens)
            for layer, server in self.servers.items():
                states = self._states(server, ids, width)
                for kind in self.head.kinds:
                    if kind[0] == layer:
                        out[kind][i] = pool(states, start, end, kind[1])
            if on_progress is not None:
                on_progress(i + 1, len(texts))
        return out

    def _states(self, server: LlamaServer, ids: list[int], width: int) -> Any:
        import numpy as np

        # a float as JSON text takes at most a few dozen characters
        data = self._post(server, "/embeddings", {"content": ids}, ANSWER_MARGIN_BYTES + 32 * len(ids) * width)
        try:
            states = np.asarray(data[0]["embedding"], dtype=np.float32)
        except (KeyError, IndexError, TypeError, ValueError):
            raise HeadServerError("llama-server's /embeddings answer is not one list of token states") from None
        if states.shape != (len(ids), width):
            raise HeadServerError(f"llama-server gave {states.shape[0] if states.ndim else 0} token states of "
                                  f"width {states.shape[-1] if states.ndim else 0}; {len(ids)} of width {width} "
                                  "were asked for (is it serving a GGUF cut of this base, with --pooling none?)")
        return states


__all__ = ["CUT_TYPES", "HeadServerError", "HeadServers", "cut_gguf", "cut_path"]
