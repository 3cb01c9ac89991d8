"""Token log-probabilities as the loopback fakes return them (Ollama's /api/chat ``logprobs``, an
OpenAI-compatible server's ``choices[0].logprobs.content``): the answer split into word, number,
space and punctuation tokens, each with its ``bytes``; every token certain (log-probability 0)
except the rating's value, which gets the scripted probabilities of the allowed ratings as its
alternatives. ``cut`` holds an answer to the most tokens a request allows, in the same tokens.
Written from the two APIs' documented shapes, not from the product's parser."""

from __future__ import annotations

import math
import re

TOKENS = re.compile(r"-?\d+|\w+|\s+|[^\w\s]")
RATING_VALUE = re.compile(r'"rating"\s*:\s*(-?\d+)')


def _entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def token_logprobs(content: str, probs: dict[int, float] | None, top: int) -> list[dict]:
    """``[{token, logprob, bytes, top_logprobs: [...]}]`` for ``content``; ``probs``: each rating's
    probability at the rating's value (None: the value is certain too); ``top``: alternatives kept."""
    match = RATING_VALUE.search(content)
    at = match.start(1) if match else -1
    out, offset = [], 0
    for token in TOKENS.findall(content):
        if offset == at and probs:
            ranked = sorted(probs.items(), key=lambda kv: -kv[1])[:top]
            chosen = probs.get(int(token), 0.0)
            entry = _entry(token, math.log(chosen) if chosen > 0 else -9999.0)
            entry["top_logprobs"] = [_entry(str(v), math.log(p)) for v, p in ranked if p > 0]
        else:
            entry = _entry(token, 0.0)
            entry["top_logprobs"] = [_entry(token, 0.0)][:top]
        out.append(entry)
        offset += len(token)
    return out


def cut(content: str, limit: int | None) -> tuple[str, bool]:
    """(``content`` cut after its first ``limit`` tokens, whether it was cut): what a server holding
    an answer to ``num_predict`` / ``max_tokens`` sends (then with ``done_reason`` / ``finish_reason``
    ``length``). None or a limit below 1 (Ollama's -1: no limit) cuts nothing."""
    tokens = TOKENS.findall(content)
    if limit is None or limit < 1 or len(tokens) <= limit:
        return content, False
    return "".join(tokens[:limit]), True


def with_rating_logprob(tokens: list[dict], logprob: float) -> list[dict]:
    """``tokens`` with the rating value's token, and its own alternative, at ``logprob``: what a
    misbehaving server might send (above 0, huge, NaN)."""
    text = "".join(t["token"] for t in tokens)
    match = RATING_VALUE.search(text)
    offset = 0
    for entry in tokens:
        if match and offset == match.start(1):
            entry["logprob"] = logprob
            for alt in entry["top_logprobs"]:
                if alt["token"] == entry["token"]:
                    alt["logprob"] = logprob
        offset += len(entry["token"])
    return tokens
