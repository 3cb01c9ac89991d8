"""The head: a classifier on the base model's own hidden states, fitted to the experts' ratings.

The base model (the same weights a fine-tune would start from, untouched) turns each record into
vectors: the hidden state after each candidate decoder layer (each token's state through the
model's final norm, as llama.cpp gives it: ``serving.headserver`` computes the same vectors with
llama-server), pooled over the record's tokens (``mean``) or taken at the last token of a question
appended to it (``last``), by the child
``python -m daemon.training.features`` (``compute_features`` runs it: one forward pass per record,
no generation, this process never imports torch). ``fit`` standardises each candidate's vectors and
fits a class-balanced logistic regression, its regularisation C chosen by stratified
cross-validation (Cohen's kappa) on the training rows only; the head averages the candidates'
probabilities (see ``fit`` for why). The fitted head is stored in ``head.json`` as plain numbers
(per member the scaler's mean and scale, the coefficients, the intercepts; the CV table, the
identity of the base weights), never a pickle:
``Head.from_json`` checks every field's type and shape, so a hostile output folder cannot make
loading it run code. Rating computes exactly the same vectors (same child, same text, one record
per pass) and gives each rating's probability as the confidence. numpy and scikit-learn are
imported inside the functions (the daemon's import stays light).
"""

from __future__ import annotations

import hashlib
import json
import math
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

from ..errors import TrainingInterruptedError
from ..outputs import names
from ..training.features import DTYPES, FEATURES_FILE, POOLINGS, STATES, array_name
from .baseline import class_probabilities, finite_numbers, stored_regression
from .children import follow_child, last_line
from .baseline import folds as cv_folds

FILE = names.HEAD
FORMAT = "fine-tuner-head/2"
FORMAT_SINGLE = "fine-tuner-head/1"  # one (layer, pooling) at the top level; still read
TITLE = "head on the base model"
KEY = "head"
# standardised vectors of tens to thousands of dimensions from a few hundred rows: mostly strong
# regularisation (the tiny test model's 64 dimensions chose 1.0, the top of a grid ending there)
C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
C_WITHOUT_CV = 0.1  # when a rating has a single training row, no cross-validation can run
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_WIDTH = 65_536  # a stored vector wider than this is refused, not loaded
MAX_MEMBERS = 64
MAX_TOKENS = 2048  # a record's tokens beyond this are not read (the same at fitting and rating)
# One thread per child unless OMP_NUM_THREADS says otherwise: a pass over one record is small, and
# on a busy 2-core machine two OpenMP threads made a 27-token pass of Gemma 3 270M take 1.1 s
# against 0.095 s on one (measured)
THREADS = 1
PROGRESS_EVENT = "features_progress"


class HeadError(ValueError):
    """A stored head that is not one fine-tuner wrote (which field, never its content)."""


class FeaturesError(RuntimeError):
    """The features child failed or timed out; the message names no data."""


def question_text(topics: str | None) -> str:
    """The question appended to every record (its last token is the ``last`` pooling's state)."""
    return f"\n\nIs this record about {topics or 'the target topic'}?"


@dataclass(frozen=True)
class Member:
    """One logistic regression of the head, on one kind of vector: the hidden state after decoder
    layer ``layer``, pooled by ``pooling``, standardised by ``mean`` and ``scale``."""

    layer: int
    pooling: str
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[tuple[float, ...], ...]
    intercept: tuple[float, ...]
    c: float

    @property
    def kind(self) -> tuple[int, str]:
        return self.layer, self.pooling

    def probabilities(self, vectors: Any, classes: Sequence[int]) -> list[dict[int, float]]:
        import numpy as np

        x = np.asarray(vectors, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.mean):
            raise HeadError(f"{FILE}: the vectors have {x.shape[-1]} dimensions, the head {len(self.mean)}")
        z = (x - np.asarray(self.mean)) / np.asarray(self.scale)
        scores = z @ np.asarray(self.coef, dtype=np.float64).T + np.asarray(self.intercept)
        return class_probabilities(scores, classes)

    def to_json(self) -> dict:
        return {"layer": self.layer, "pooling": self.pooling, "c": self.c,
                "scaler": {"mean": list(self.mean), "scale": list(self.scale)},
                "coef": [list(row) for row in self.coef], "intercept": list(self.intercept)}


@dataclass(frozen=True)
class Head:
    """A fitted head: one logistic regression per kind of vector (``members``: every candidate
    layer and pooling), whose probabilities are averaged; the question and token limit that made
    the vectors, the cross-validation table and the identity of the base weights."""

    members: tuple[Member, ...]
    question: str
    max_tokens: int
    classes: tuple[int, ...]
    train_rows: int
    cv: tuple[dict, ...]  # per candidate: layer, pooling, the best C, its mean kappa and standard error
    base: dict  # model, weights_sha256, layers_total, hidden_size, dtype (the forward passes')

    @property
    def kinds(self) -> list[tuple[int, str]]:
        """The (layer, pooling) vectors rating needs, one per member."""
        return [m.kind for m in self.members]

    @property
    def dtype(self) -> str:
        """The dtype the forward passes ran in when the head was fitted (rating runs the same; a head
        stored before the dtype was recorded was fitted in float32)."""
        return self.base.get("dtype", "float32")

    @property
    def states(self) -> str:
        """What its vectors are made of (``features.STATES``): "normed" for the heads fitted now (a
        llama-server can compute them), "raw" for those stored before it was recorded."""
        return self.base.get("states", "raw")

    @property
    def layers(self) -> list[int]:
        return sorted({m.layer for m in self.members})

    @property
    def poolings(self) -> list[str]:
        return [p for p in POOLINGS if any(m.pooling == p for m in self.members)]

    def describe(self) -> str:
        """The vectors it reads, in words: "layers 3, 6, 9 (mean, last)"."""
        return f"layers {', '.join(str(n) for n in self.layers)} ({', '.join(self.poolings)})"

    def probabilities(self, vectors: Mapping[tuple[int, str], Any]) -> list[dict[int, float]]:
        """Per record (a row of each member's vectors), each rating's probability: the members'
        probabilities averaged."""
        each = [m.probabilities(vectors[m.kind], self.classes) for m in self.members]
        rows = {len(p) for p in each}
        if len(rows) != 1:
            raise HeadError(f"{FILE}: the vectors of the head's members hold different numbers of records")
        return [{c: sum(p[i][c] for p in each) / len(each) for c in self.classes} for i in range(rows.pop())]

    def to_json(self) -> dict:
        return {"format": FORMAT, "question": self.question, "max_tokens": self.max_tokens,
                "classes": list(self.classes), "train_rows": self.train_rows, "base": dict(self.base),
                "members": [m.to_json() for m in self.members], "cv": [dict(row) for row in self.cv]}

    def fingerprint(self) -> str:
        """sha256 of the stored form (a resumed rating run must use the same head)."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_json(cls, data: Any) -> "Head":
        """The stored head, every field checked (``HeadError`` names the first bad one). A head of
        the earlier single-regression form (``fine-tuner-head/1``) is read as one member."""
        if not isinstance(data, dict) or data.get("format") not in (FORMAT, FORMAT_SINGLE):
            raise HeadError(f"{FILE} is not a fine-tuner head ({FORMAT})")
        question, max_tokens = data.get("question"), data.get("max_tokens")
        if not isinstance(question, str) or len(question) > 10_000:
            raise HeadError(f"{FILE}: question must be a text")
        if type(max_tokens) is not int or not 1 <= max_tokens <= 1_000_000:
            raise HeadError(f"{FILE}: max_tokens must be a positive integer")
        classes = data.get("classes")
        if not isinstance(classes, list) or not all(type(v) is int for v in classes) or len(classes) < 2 \
                or len(set(classes)) != len(classes):
            raise HeadError(f"{FILE}: classes must be two or more distinct integer ratings")
        train_rows = data.get("train_rows")
        if type(train_rows) is not int:
            raise HeadError(f"{FILE}: train_rows must be an integer")
        stored = [data] if data["format"] == FORMAT_SINGLE else data.get("members")
        if not isinstance(stored, list) or not 1 <= len(stored) <= MAX_MEMBERS:
            raise HeadError(f"{FILE}: members must be a list of 1 to {MAX_MEMBERS} regressions")
        members = tuple(_member(m, classes, train_rows) for m in stored)
        if len({m.kind for m in members}) != len(members):
            raise HeadError(f"{FILE}: members must each read another (layer, pooling)")
        base = data.get("base")
        if not (isinstance(base, dict) and isinstance(base.get("model"), str)
                and isinstance(base.get("weights_sha256"), str) and len(base["weights_sha256"]) == 64
                and type(base.get("layers_total")) is int
                and all(m.layer <= base["layers_total"] for m in members)
                and type(base.get("hidden_size")) is int
                and all(base["hidden_size"] == len(m.mean) for m in members)):
            raise HeadError(f"{FILE}: base must name the model, its weights' sha256, its layers (at least the "
                            "members' layers) and its width (the scalers')")
        if base.get("dtype", "float32") not in DTYPES:
            raise HeadError(f"{FILE}: base.dtype must be one of {', '.join(DTYPES)}")
        if base.get("states", "raw") not in STATES:
            raise HeadError(f"{FILE}: base.states must be one of {', '.join(STATES)}")
        cv = data.get("cv")
        if not isinstance(cv, list) or not all(
                isinstance(row, dict) and type(row.get("layer")) is int and row.get("pooling") in POOLINGS
                and type(row.get("c")) in (int, float)
                and all(row.get(k) is None or type(row[k]) in (int, float) for k in ("kappa", "kappa_se"))
                for row in cv):
            raise HeadError(f"{FILE}: cv must be a list of {{layer, pooling, c, kappa, kappa_se}} rows")
        return cls(members, question, max_tokens, tuple(classes), train_rows,
                   tuple({"layer": r["layer"], "pooling": r["pooling"], "c": r["c"], "kappa": r.get("kappa"),
                          "kappa_se": r.get("kappa_se")} for r in cv),
                   {k: base[k] for k in ("model", "weights_sha256", "layers_total", "hidden_size", "dtype", "states")
                    if k in base})


def _member(data: Any, classes: list[int], train_rows: int) -> Member:
    """One stored member, checked (``HeadError`` names the field)."""
    if not isinstance(data, dict):
        raise HeadError(f"{FILE}: members must be a list of regressions")
    layer, pooling = data.get("layer"), data.get("pooling")
    if type(layer) is not int or not 1 <= layer <= 10_000:
        raise HeadError(f"{FILE}: layer must be a layer number (1 or more)")
    if pooling not in POOLINGS:
        raise HeadError(f"{FILE}: pooling must be one of {', '.join(POOLINGS)}")
    scaler = data.get("scaler")
    if not isinstance(scaler, dict):
        raise HeadError(f"{FILE}: scaler must be an object with mean and scale")
    mean = _floats(scaler.get("mean"), "scaler.mean")
    width = len(mean)
    if not 1 <= width <= MAX_WIDTH:
        raise HeadError(f"{FILE}: scaler.mean must have 1 to {MAX_WIDTH} numbers")
    scale = _floats(scaler.get("scale"), "scaler.scale", width)
    if not all(v > 0 for v in scale):
        raise HeadError(f"{FILE}: scaler.scale must hold positive numbers")
    coef, intercept, c, _ = stored_regression({**data, "train_rows": train_rows}, classes, width, file=FILE,
                                              error=HeadError)
    return Member(layer, pooling, mean, scale, coef, intercept, c)


def _floats(value: Any, field: str, length: int | None = None) -> tuple[float, ...]:
    return finite_numbers(value, field, length, file=FILE, error=HeadError)


# --- fitting ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fitted:
    """``fit``'s result: the members and the cross-validation table, before the head is stored."""

    members: tuple[Member, ...]
    classes: tuple[int, ...]
    cv: tuple[dict, ...]


def fit(candidates: Mapping[tuple[int, str], Any], ratings: Sequence[int], *, seed: int = 42) -> Fitted:
    """One member per candidate (layer, pooling): standardisation and a class-balanced logistic
    regression fitted on every training row, its C chosen by stratified cross-validation (Cohen's
    kappa, the mean over the folds; standardisation fitted within each fold). The head averages
    the members' probabilities.

    Why every candidate rather than the one cross-validation prefers: cross-validation sees only
    familiar records, where Gemma 3 270M's candidates all agreed (kappa 0.95-1.00), while on new
    kinds of records the same candidates ranged from 0.00 to 0.97 from one draw of visits to the
    next, and no choice made on the training rows (the preferred mean near the middle layer,
    or folds holding out whole diagnosis categories) found the good one reliably. Averaging them
    was measured best over three draws (``bench/head_arms.py``, codes explained: kappa on new kinds
    0.85 against 0.57 for the one chosen; another site's visits 0.54 against 0.60 and 0.80 for the
    bag-of-words baseline). With a rating of a single row no cross-validation can run: C = 0.1."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import cohen_kappa_score, make_scorer
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    y = np.asarray(ratings)
    if len(set(ratings)) < 2:
        raise ValueError("a head needs training rows of at least two different ratings")
    keys = sorted(candidates, key=lambda k: (k[0], POOLINGS.index(k[1])))
    folds = cv_folds(ratings)
    table: list[dict] = []
    members: list[Member] = []
    classes: tuple[int, ...] = ()

    def pipeline(c: float):
        return make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", C=c, max_iter=5000))

    # one BLAS thread: each fit is a fraction of a second (see baseline.fit)
    with threadpool_limits(1):
        for key in keys:
            x = np.asarray(candidates[key], dtype=np.float64)
            c, score, se = C_WITHOUT_CV, None, None
            if folds >= 2:
                search = GridSearchCV(pipeline(1.0), {"logisticregression__C": list(C_GRID)},
                                      scoring=make_scorer(cohen_kappa_score),
                                      cv=StratifiedKFold(folds, shuffle=True, random_state=seed), refit=False)
                search.fit(x, y)
                at = search.best_index_
                mean_kappa = float(search.cv_results_["mean_test_score"][at])
                error = float(search.cv_results_["std_test_score"][at]) / math.sqrt(folds)
                c = float(search.best_params_["logisticregression__C"])
                if math.isfinite(mean_kappa) and math.isfinite(error):
                    score, se = round(mean_kappa, 4), round(error, 4)
            table.append({"layer": key[0], "pooling": key[1], "c": c, "kappa": score, "kappa_se": se})
            model = pipeline(c).fit(x, y)
            scaler, regression = model.named_steps["standardscaler"], model.named_steps["logisticregression"]
            classes = tuple(int(v) for v in regression.classes_)
            members.append(Member(key[0], key[1], tuple(float(v) for v in scaler.mean_),
                                  tuple(float(v) for v in scaler.scale_),
                                  tuple(tuple(float(w) for w in row) for row in regression.coef_),
                                  tuple(float(b) for b in regression.intercept_), c))
    return Fitted(tuple(members), classes, tuple(table))


# --- the base weights and the child -------------------------------------------------------------

_HASHES: dict[tuple, str] = {}
_HASHES_LOCK = threading.Lock()
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


def weights_sha256(weights: Any) -> str:
    """The identity of the base weights a head reads: a GGUF base's sha256, else the sha256 of the
    weights folder's config.json and weight files (name and content, in name order). Remembered per
    process while the files' sizes and times are unchanged."""
    if getattr(weights, "gguf_sha256", None):
        return str(weights.gguf_sha256)
    folder = Path(weights.local_dir)
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and (p.name == "config.json" or p.name.endswith(WEIGHT_SUFFIXES)))
    stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    key = (str(folder.resolve()), stamp)
    with _HASHES_LOCK:
        if key in _HASHES:
            return _HASHES[key]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    with _HASHES_LOCK:
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def compute_features(weights: Any, texts: Sequence[str], *, layers: list[int] | str, poolings: Sequence[str],
                     question: str, max_tokens: int = MAX_TOKENS, dtype: str = "auto",
                     states: str = "normed", timeout_s: float | None = None,
                     grace_s: float = 10.0, stop_event: threading.Event | None = None,
                     on_progress: Callable[[int, int], None] | None = None, python: str = sys.executable,
                     ) -> tuple[dict, dict[tuple[int, str], Any]]:
    """(the child's ``features.json``, per (layer, pooling) a float32 array of one row per text) for
    ``weights`` (``training.supervisor.BaseWeights``). ``layers``: numbers, or ``"candidates"``;
    ``dtype``: the passes' (``DTYPES``), or "auto" (the child picks; ``features.json`` says which);
    ``states``: ``features.STATES``.
    Raises ``FeaturesError`` (the child failed or timed out) or ``TrainingInterruptedError``
    (``stop_event`` was set)."""
    import numpy as np

    from ..fsutil import write_json, write_lines
    from ..training.parentdeath import tied_to_this_process
    from ..training.supervisor import child_env, describe_exit

    # the texts are records: a private folder, removed whatever happens
    work = Path(tempfile.mkdtemp(prefix="fine-tuner-features-"))
    try:
        write_lines(work / "input.jsonl", (json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts),
                    durable=False)
        spec = {"base_ref": weights.local_dir, "gguf_path": weights.gguf_path,
                "chat_template": weights.chat_template, "input": str(work / "input.jsonl"),
                "output_dir": str(work / "out"), "layers": layers, "poolings": list(poolings),
                "question": question, "max_tokens": max_tokens, "threads": THREADS, "dtype": dtype, "states": states,
                "parent_pid": os.getpid()}  # the child stops when this process is gone
        write_json(work / "spec.json", spec, durable=False)
        with open(work / "stderr.log", "wb") as err:
            proc = subprocess.Popen(tied_to_this_process([python, "-m", "daemon.training.features",
                                                          str(work / "spec.json")], signal.SIGTERM),
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                    env=child_env(), start_new_session=True)
        outcome = follow_child(proc, on_progress, stop_event, timeout_s, grace_s, event=PROGRESS_EVENT,
                               name="features-progress")
        if outcome == "interrupted":
            raise TrainingInterruptedError("the head's forward passes were stopped because the service is "
                                           "shutting down")
        if outcome == "timed_out":
            raise FeaturesError(f"the base model's forward passes did not finish within {timeout_s:g} s")
        if proc.returncode != 0:
            raise FeaturesError(f"the base model's forward passes failed ({describe_exit(proc.returncode)}): "
                                f"{last_line(work / 'stderr.log')}")
        info = json.loads((work / "out" / FEATURES_FILE).read_text(encoding="utf-8"))
        arrays = {}
        for layer in info["layers"]:
            for pooling in info["poolings"]:
                array = np.load(work / "out" / array_name(layer, pooling), allow_pickle=False)
                if array.dtype != np.float32 or array.ndim != 2 or array.shape[0] != len(texts):
                    raise FeaturesError("the forward passes wrote vectors of the wrong shape")
                arrays[(int(layer), str(pooling))] = array
        return info, arrays
    finally:
        shutil.rmtree(work, ignore_errors=True)


def fit_head(weights: Any, model: str, texts: Sequence[str], ratings: Sequence[int], *, topics: str | None,
             seed: int = 42, dtype: str = "auto", timeout_s: float | None = None, grace_s: float = 10.0,
             stop_event: threading.Event | None = None,
             on_progress: Callable[[int, int], None] | None = None) -> tuple[Head, dict]:
    """Fit a head on the training rows: every candidate's vectors from one forward pass per row (in
    ``dtype``; "auto": the child's choice, recorded in the head), then ``fit``. Returns (the head,
    timings: ``features_s``, ``fit_s``, ``forward_s``, ``device``, ``dtype``)."""
    started = time.monotonic()
    question = question_text(topics)
    info, arrays = compute_features(weights, texts, layers="candidates", poolings=POOLINGS, question=question,
                                    dtype=dtype, timeout_s=timeout_s, grace_s=grace_s, stop_event=stop_event,
                                    on_progress=on_progress)
    features_s = time.monotonic() - started
    began = time.monotonic()
    fitted = fit(arrays, ratings, seed=seed)
    fit_s = time.monotonic() - began
    head = Head(fitted.members, question, MAX_TOKENS, fitted.classes, len(texts), fitted.cv,
                {"model": model, "weights_sha256": weights_sha256(weights), "layers_total": int(info["layers_total"]),
                 "hidden_size": len(fitted.members[0].mean), "dtype": str(info["dtype"]),
                 "states": str(info["states"])})
    return head, {"features_s": round(features_s, 3), "fit_s": round(fit_s, 3),
                  "forward_s": info.get("forward_s"), "device": info.get("device"), "dtype": info["dtype"]}


def head_vectors(weights: Any, head: Head, texts: Sequence[str], **kwargs: Any) -> dict[tuple[int, str], Any]:
    """The head's vectors of ``texts``, per member's (layer, pooling): exactly those it was fitted
    on for the same text (one pass per text, up to the deepest member's layer, in the dtype it was
    fitted with)."""
    _, arrays = compute_features(weights, texts, layers=head.layers, poolings=head.poolings,
                                 question=head.question, max_tokens=head.max_tokens, dtype=head.dtype,
                                 states=head.states, **kwargs)
    return {kind: arrays[kind] for kind in head.kinds}


def load(path: str | os.PathLike) -> Head:
    """``head.json`` of a folder, read as ``fsutil.read_json`` reads (no link, bounded size), checked."""
    from .. import fsutil

    return Head.from_json(fsutil.read_json(Path(path), limit=MAX_FILE_BYTES))


__all__ = ["FILE", "Head", "HeadError", "FeaturesError", "KEY", "Member", "TITLE", "compute_features", "fit",
           "fit_head", "head_vectors", "load", "question_text", "weights_sha256"]
