"""Who answers: the rater backends, each turning conversations into raw answer texts.

A conversation is the list of chat messages a model sees for one record (the system prompt, any
few-shot turns, the record as the user turn); every conversation of one run shares the same prefix
object, byte for byte, so a server can reuse its prompt cache. Answers come back in input order as
``Answer(text, latency_s)``; judging them is ``prompts.parse_answer``'s job, never this module's.

* ``OllamaRater``: ``POST /api/chat`` with the answer's JSON Schema as ``format``, ``temperature`` 0
  and a fixed seed, ``stream: false``, at most ``ollama.parallel`` requests at a time (one client per
  thread; the client's own timeouts, deadline and retries apply to each request).
* ``OpenAIRater``: ``POST /chat/completions`` of an OpenAI-compatible server (``openai.base_url``) with
  the schema as a strict ``json_schema`` response format, temperature 0 and a fixed seed, at most
  ``openai.parallel`` requests at a time, one client per thread, as above.
* ``LocalRater``: a child process (``python -m daemon.quality.generate``; this process never imports torch)
  that loads the base weights, and the adapter for a fine-tune, and generates greedily in batches.
  Its progress lines are relayed; a stop request terminates it.

Given the mapping's ``values``, each rater also returns every allowed rating's probability at the
answer's rating position (``Answer.probs``, see ``confidence``): Ollama and the OpenAI-compatible
servers are asked for the answer tokens' log-probabilities (``logprobs``, ``top_logprobs``), the
local child scores each value by teacher forcing. A backend that sends none leaves it None.

``direct`` (a fine-tune trained on both answer forms, ``training.answer_forms: both``): the servers
are held to the rating-only schema (``prompts.direct_output_schema``: ``{"rating": <allowed>}`` and
nothing else) with at most ``DIRECT_MAX_TOKENS`` tokens, so they write a handful of tokens instead
of a rationale, and the rating's log-probabilities are the confidence, as for a reasoned answer.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import OllamaConfig, OpenAIConfig
from ..errors import RaterError, TrainingInterruptedError
from ..logconfig import get_logger
from .children import Progress, follow_child, last_line
from .confidence import TOP_LOGPROBS, probabilities_from_tokens, token_entries

log = get_logger("rater")

DEFAULT_SEED = 42
# a rating-only answer is about 6 tokens; a JSON-Schema grammar lets a model pad it with whitespace,
# which this cuts short (the object is already closed by then)
DIRECT_MAX_TOKENS = 16


@dataclass(frozen=True)
class Answer:
    text: str | None
    latency_s: float
    # each allowed rating's probability at the answer's rating position (``confidence``), or None
    # when the backend gave none
    probs: dict[int, float] | None = None


class _PerThread:
    """One server client per worker thread (a client's connection pool is not shared between
    threads), made on first use by ``make`` and all closed by ``close``."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make
        self.local = threading.local()
        self.clients: list = []
        self.lock = threading.Lock()

    def get(self) -> Any:
        client = getattr(self.local, "client", None)
        if client is None:
            client = self.local.client = self.make()
            with self.lock:
                self.clients.append(client)
        return client

    def close(self) -> None:
        for client in self.clients:
            client.close()


def _in_parallel(one: Callable[[list[dict]], Answer], conversations: Sequence[list[dict]], parallel: int,
                 on_progress: Progress | None) -> list[Answer]:
    """``one`` for every conversation, ``parallel`` at a time; the answers in input order. The first
    failure cancels what has not started and is raised. One at a time runs in the calling thread
    (a pool of one would only add a thread switch per request)."""
    total = len(conversations)
    if parallel == 1:
        out = []
        for conversation in conversations:
            out.append(one(conversation))
            if on_progress is not None:
                on_progress(len(out), total)
        return out
    answers: list[Answer | None] = [None] * total
    done = 0
    with concurrent.futures.ThreadPoolExecutor(parallel, thread_name_prefix="rate") as pool:
        futures = {pool.submit(one, conv): i for i, conv in enumerate(conversations)}
        try:
            for future in concurrent.futures.as_completed(futures):
                answers[futures[future]] = future.result()
                done += 1
                if on_progress is not None:
                    on_progress(done, total)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return [a for a in answers if a is not None]


def _probs(tokens: Any, values: list[int] | None) -> dict[int, float] | None:
    """The allowed ratings' probabilities from a server's answer-token log-probabilities."""
    if values is None:
        return None
    return probabilities_from_tokens(token_entries(tokens), values)


def _answer_form(schema: Mapping | None, max_tokens: int | None, values: Sequence[int] | None,
                 direct: bool) -> tuple[dict | None, int | None]:
    """(the schema a server is held to, the most tokens it may write): the rating-only schema and
    ``DIRECT_MAX_TOKENS`` for a direct decision (it needs the allowed ``values``), else as given."""
    if direct:
        if values is None:
            raise ValueError("a direct decision needs the allowed ratings (values)")
        from ..data.prompts import direct_output_schema

        return direct_output_schema(values), DIRECT_MAX_TOKENS
    return (dict(schema) if schema is not None else None), max_tokens


def _stopped(stop_event: threading.Event | None) -> None:
    if stop_event is not None and stop_event.is_set():
        raise TrainingInterruptedError("rating was stopped because the service is shutting down")


class BaselineRater:
    """The bag-of-words baseline (``baseline.Baseline``) as a rater: each record's rating is its most
    likely one, its probabilities the confidence; no server, no generation."""

    CHUNK = 512

    def __init__(self, fitted) -> None:
        self.fitted = fitted

    def answer(self, conversations: Sequence[list[dict]], on_progress: Progress | None = None,
               stop_event: threading.Event | None = None) -> list[Answer]:
        from .baseline import most_likely

        out: list[Answer] = []
        for start in range(0, len(conversations), self.CHUNK):
            _stopped(stop_event)
            began = time.monotonic()
            chunk = conversations[start:start + self.CHUNK]
            probs = self.fitted.probabilities([c[-1]["content"] for c in chunk])
            each = (time.monotonic() - began) / len(chunk)
            out += [Answer(json.dumps({"rating": most_likely(p)}), each, p) for p in probs]
            if on_progress is not None:
                on_progress(len(out), len(conversations))
        return out


class HeadRater:
    """A head (``head.Head``) as a rater: each record's vectors are computed on the base weights exactly
    as at fitting (one forward pass per record, no generation), by the features child (``via``
    "local") or by llama-server on GGUFs cut after the head's layers (``via`` ``SERVED``: the same
    vectors to within float rounding, see ``serving.headserver``; the servers live for one call);
    the head gives each rating's probability; the most likely rating is the answer, its
    probabilities the confidence. Weights other than those the head was fitted on are refused
    (their sha256)."""

    backend = "head"
    SERVED = "head-llama-server"  # choose_backend's name for a head rated through llama-server

    def __init__(self, weights, fitted, *, timeout_s: float | None = None, grace_s: float = 10.0,
                 via: str = "local") -> None:
        self.weights, self.fitted = weights, fitted
        self.timeout_s, self.grace_s = timeout_s, grace_s
        self.via = via
        self.checked = False

    def answer(self, conversations: Sequence[list[dict]], on_progress: Progress | None = None,
               stop_event: threading.Event | None = None) -> list[Answer]:
        from .baseline import most_likely
        from .head import FeaturesError, head_vectors, weights_sha256

        if not self.checked:
            if weights_sha256(self.weights) != self.fitted.base["weights_sha256"]:
                raise RaterError(f"the base weights of {self.fitted.base['model']} found here are not those the "
                                 "head was fitted on (their sha256 differs): build the head again on these weights")
            self.checked = True
        if not conversations:
            return []
        _stopped(stop_event)
        began = time.monotonic()
        texts = [c[-1]["content"] for c in conversations]
        if self.via == self.SERVED:
            vectors = self._served_vectors(texts, on_progress, stop_event)
        else:
            try:
                vectors = head_vectors(self.weights, self.fitted, texts, timeout_s=self.timeout_s,
                                       grace_s=self.grace_s, stop_event=stop_event, on_progress=on_progress)
            except FeaturesError as exc:
                raise RaterError(str(exc)) from None
        probs = self.fitted.probabilities(vectors)
        each = (time.monotonic() - began) / len(conversations)
        return [Answer(json.dumps({"rating": most_likely(p)}), each, p) for p in probs]

    def _served_vectors(self, texts: list[str], on_progress: Progress | None,
                        stop_event: threading.Event | None) -> dict:
        from ..serving.headserver import HeadServerError, HeadServers
        from ..serving.llamaserver import ServerError, ServerInterrupted

        # the servers' own output may echo records: a folder only we can read, removed afterwards
        with tempfile.TemporaryDirectory(prefix="fine-tuner-head-servers-") as tmp:
            try:
                servers = HeadServers(self.weights.gguf_path, self.weights.gguf_sha256, self.fitted, log_dir=tmp)
                servers.start(stop_event=stop_event)
            except ServerInterrupted:
                raise TrainingInterruptedError("the head's servers were stopped because the service is shutting "
                                               "down") from None
            except (HeadServerError, ServerError) as exc:
                raise RaterError(f"the head's llama-servers did not come up: {exc}") from None
            with contextlib.closing(servers):
                try:
                    return servers.vectors(texts, on_progress=on_progress, stop_event=stop_event)
                except HeadServerError as exc:
                    _stopped(stop_event)
                    raise RaterError(str(exc)) from None


class OllamaRater:
    backend = "ollama"

    def __init__(self, cfg: OllamaConfig, *, parallel: int = 2, seed: int = DEFAULT_SEED,
                 schema: Mapping | None = None, env: Mapping[str, str] = os.environ, memory=None,
                 values: Sequence[int] | None = None, max_tokens: int | None = None, direct: bool = False) -> None:
        self.cfg = cfg
        self.values = list(values) if values is not None else None
        self.memory = memory
        self.parallel = max(1, int(parallel))
        self.seed = seed
        self.schema, self.max_tokens = _answer_form(schema, max_tokens, values, direct)
        self.env = env

    def answer(self, model: str, conversations: Sequence[list[dict]], *, on_progress: Progress | None = None,
               stop_event: threading.Event | None = None) -> list[Answer]:
        from ..serving.ollama import OllamaClient, OllamaError

        clients = _PerThread(lambda: OllamaClient(self.cfg, env=self.env, memory=self.memory))
        options = {"temperature": 0, "seed": self.seed}
        if self.max_tokens is not None:  # a model that never closes its answer stops here (invalid)
            options["num_predict"] = int(self.max_tokens)

        def one(conversation: list[dict]) -> Answer:
            _stopped(stop_event)
            started = time.monotonic()
            reply = clients.get().chat(model, conversation, format=self.schema, options=options,
                                       logprobs=TOP_LOGPROBS if self.values is not None else None)
            content = (reply.get("message") or {}).get("content")
            return Answer(content if isinstance(content, str) else None, time.monotonic() - started,
                          _probs(reply.get("logprobs"), self.values))

        return _served(clients, one, conversations, self.parallel, on_progress, OllamaError,
                       lambda exc: f"Ollama could not answer for {model}: {exc.message}")


def _served(clients: _PerThread, one: Callable[[list[dict]], Answer], conversations: Sequence[list[dict]],
            parallel: int, on_progress: Progress | None, failure: type[Exception],
            message: Callable[[Any], str]) -> list[Answer]:
    """A server's answers, ``parallel`` requests in flight; its ``failure`` is a RaterError saying
    ``message(exc)``; the per-thread clients are closed in any case."""
    try:
        return _in_parallel(one, conversations, parallel, on_progress)
    except failure as exc:
        raise RaterError(message(exc)) from None
    finally:
        clients.close()


class OpenAIRater:
    """``POST {openai.base_url}/chat/completions`` with the answer's JSON Schema as a strict
    ``response_format``, temperature 0 and a fixed seed, ``parallel`` requests in flight (one client,
    so one connection, per thread). ``extra``: more keys for every request body (llama.cpp's
    per-request ``"lora"`` list, for instance)."""

    backend = "openai"

    def __init__(self, cfg: OpenAIConfig, *, parallel: int | None = None, seed: int = DEFAULT_SEED,
                 schema: Mapping | None = None, env: Mapping[str, str] = os.environ,
                 extra: Mapping[str, Any] | None = None, values: Sequence[int] | None = None,
                 max_tokens: int | None = None, direct: bool = False) -> None:
        self.cfg = cfg
        self.values = list(values) if values is not None and cfg.logprobs else None
        self.parallel = max(1, int(parallel if parallel is not None else cfg.parallel))
        self.seed = seed
        self.schema, self.max_tokens = _answer_form(schema, max_tokens, values, direct)
        self.env = env
        self.extra = dict(extra) if extra else None

    def answer(self, model: str, conversations: Sequence[list[dict]], *, on_progress: Progress | None = None,
               stop_event: threading.Event | None = None) -> list[Answer]:
        from ..errors import OpenAIError
        from ..serving.openai import OpenAIClient

        clients = _PerThread(lambda: OpenAIClient(self.cfg, env=self.env))

        def one(conversation: list[dict]) -> Answer:
            _stopped(stop_event)
            started = time.monotonic()
            text, scores = clients.get().chat_scored(
                model, conversation, schema=self.schema, seed=self.seed, extra=self.extra,
                logprobs=TOP_LOGPROBS if self.values is not None else None, max_tokens=self.max_tokens)
            return Answer(text, time.monotonic() - started, _probs(scores, self.values))

        return _served(clients, one, conversations, self.parallel, on_progress, OpenAIError,
                       lambda exc: f"the OpenAI-compatible server could not answer for {model}: {exc}")


class LocalRater:
    backend = "local"

    @classmethod
    def for_weights(cls, weights, adapter_dir: str | os.PathLike | None = None, **kwargs) -> "LocalRater":
        """A local rater on resolved base weights (``training.supervisor.BaseWeights``)."""
        return cls(weights.local_dir, adapter_dir, gguf_path=weights.gguf_path,
                   chat_template=weights.chat_template, **kwargs)

    def __init__(self, base_dir: str | os.PathLike, adapter_dir: str | os.PathLike | None = None, *,
                 batch_size: int = 8, max_new_tokens: int = 96, timeout_s: float | None = None,
                 grace_s: float = 10.0, python: str = sys.executable, gguf_path: str | None = None,
                 chat_template: str | None = None, values: Sequence[int] | None = None,
                 direct: bool = False, reasoned: bool = False) -> None:
        self.values = list(values) if values is not None else None
        # direct: the rating as a direct decision (one forward pass, no generation, no rationale);
        # reasoned: generated answers start with the rationale (a model trained on both forms)
        self.direct = bool(direct) and self.values is not None
        self.reasoned = bool(reasoned) and not self.direct
        # gguf_path: a GGUF base, dequantized into base_dir by the child when not done yet;
        # chat_template: the turn format of a base whose tokenizer has none
        self.gguf_path, self.chat_template = gguf_path, chat_template
        self.base_dir = str(base_dir)
        self.adapter_dir = str(adapter_dir) if adapter_dir is not None else None
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.timeout_s = timeout_s
        self.grace_s = grace_s
        self.python = python

    def answer(self, conversations: Sequence[list[dict]], *, on_progress: Progress | None = None,
               stop_event: threading.Event | None = None) -> list[Answer]:
        from ..fsutil import write_json, write_lines
        from ..training.parentdeath import tied_to_this_process
        from ..training.supervisor import child_env, describe_exit

        # the conversations hold record text: a private folder, removed whatever happens
        work = Path(tempfile.mkdtemp(prefix="fine-tuner-rate-"))
        try:
            write_lines(work / "input.jsonl", (json.dumps({"messages": c}, ensure_ascii=False) + "\n"
                                               for c in conversations), durable=False)
            spec = {"base_ref": self.base_dir, "adapter_dir": self.adapter_dir,
                    "gguf_path": self.gguf_path, "chat_template": self.chat_template,
                    "input": str(work / "input.jsonl"), "output": str(work / "output.jsonl"),
                    "batch_size": self.batch_size, "max_new_tokens": self.max_new_tokens,
                    "threads": max(1, (os.cpu_count() or 1)), "values": self.values, "direct": self.direct,
                    "reasoned": self.reasoned,
                    "parent_pid": os.getpid()}  # the child stops when this process is gone
            write_json(work / "spec.json", spec, durable=False)
            with open(work / "stderr.log", "wb") as err:
                # ended by the kernel (SIGTERM) when this process ends without stopping it
                proc = subprocess.Popen(tied_to_this_process([self.python, "-m", "daemon.quality.generate",
                                                              str(work / "spec.json")], signal.SIGTERM),
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                        env=child_env(), start_new_session=True)
            outcome = follow_child(proc, on_progress, stop_event, self.timeout_s, self.grace_s,
                                   event="generate_progress", name="rate-progress")
            if outcome == "interrupted":
                raise TrainingInterruptedError("rating was stopped because the service is shutting down")
            if outcome == "timed_out":
                raise RaterError(f"the local rater did not finish within {self.timeout_s:g} s")
            if proc.returncode != 0:
                raise RaterError(f"the local rater failed ({describe_exit(proc.returncode)}): "
                                 f"{last_line(work / 'stderr.log')}")
            return _read_answers(work / "output.jsonl", len(conversations))
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _read_answers(path: Path, total: int) -> list[Answer]:
    answers: list[Answer | None] = [None] * total
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            record = json.loads(line)
            probs = record.get("probs")
            answers[int(record["index"])] = Answer(
                record.get("text"), float(record.get("latency_s") or 0.0),
                {int(k): float(v) for k, v in probs.items()} if isinstance(probs, dict) else None)
    missing = sum(a is None for a in answers)
    if missing:
        raise RaterError(f"the local rater returned no answer for {missing} of {total} records")
    return [a for a in answers if a is not None]
