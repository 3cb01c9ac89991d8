"""The head on the base model's hidden states, on the tiny Llama: it learns, its vectors at rating are
those it was fitted on, its stored form loads back identically and a hostile one is refused, and a
job with approach head is evaluated beside the baseline and rates through the local backend."""

from __future__ import annotations

import csv
import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import cohen_kappa_score

from daemon.data.synthetic import HEADER, MAPPING, synthetic_rows
from daemon.data.visits import generate_visits
from daemon.fine_tuner import FineTuner
from daemon.quality import head
from daemon.quality.baseline import most_likely
from daemon.quality.evalreport import CONFIDENCE_SOURCES
from daemon.quality.backends import HeadRater, RaterError
from daemon.quality.ratefile import ModelFolderError, RatingError, model_from_folder, rate_file
from daemon.training.features import DTYPES, POOLINGS
from daemon.training.supervisor import resolve_base_weights
from tests.tiny_model import TINY_NAME

pytestmark = pytest.mark.xdist_group("head")

SKIP = ("C_BioSense_ID", "Expert Rating", "Standardized_Rating", "Rationale_of_Rating")
QUESTION = head.question_text("respiratory infections")


def _text(row: dict) -> str:
    return "\n".join(f"{k}: {v}" for k, v in row.items() if k not in SKIP)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One thread per child: the model is tiny, and threads waiting for each other on a busy machine
    only slow it down."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def weights(tiny_base_models):
    return resolve_base_weights(TINY_NAME, tiny_base_models)


@pytest.fixture(scope="module")
def fitted(weights):
    """A head fitted on 200 generated visits (familiar vocabulary "a")."""
    train = generate_visits(200, seed=11)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        fitted, timings = head.fit_head(weights, TINY_NAME, [_text(r) for r in train],
                                        [int(r["Standardized_Rating"]) for r in train], topics="respiratory infections")
    return fitted


def test_the_head_learns_the_experts_ratings_on_visits_it_never_saw(weights, fitted):
    """On the tiny model's states, a head fitted on 200 visits agrees with the experts on 60 others
    far beyond chance (measured: kappa 0.91 on another draw); every candidate is a member, at the C
    its cross-validation chose."""
    held = generate_visits(60, seed=12)
    vectors = head.head_vectors(weights, fitted, [_text(r) for r in held])
    assert sorted(vectors) == [(1, "last"), (1, "mean"), (2, "last"), (2, "mean")]
    predicted = [most_likely(p) for p in fitted.probabilities(vectors)]
    assert cohen_kappa_score([int(r["Standardized_Rating"]) for r in held], predicted) > 0.6
    assert fitted.classes == (-1, 0, 1) and fitted.train_rows == 200
    assert [(row["layer"], row["pooling"]) for row in fitted.cv] == [(1, "mean"), (1, "last"), (2, "mean"), (2, "last")]
    assert [(m.layer, m.pooling, m.c) for m in fitted.members] == [
        (r["layer"], r["pooling"], r["c"]) for r in fitted.cv]
    assert all(m.c in head.C_GRID for m in fitted.members) and fitted.describe() == "layers 1, 2 (mean, last)"
    assert fitted.base["layers_total"] == 2 and fitted.base["hidden_size"] == 64
    assert fitted.base["weights_sha256"] == head.weights_sha256(weights)


def test_the_vectors_computed_for_rating_equal_those_computed_for_fitting(weights):
    """The same text gives bit-identical vectors whatever comes before or beside it, and a pass that
    stops after layer 1 gives exactly layer 1's vectors of a whole pass."""
    texts = [_text(r) for r in generate_visits(12, seed=21)]
    info, fitting = head.compute_features(weights, texts, layers="candidates", poolings=POOLINGS, question=QUESTION)
    assert (info["layers"], info["poolings"], info["layers_total"]) == ([1, 2], ["mean", "last"], 2)
    order = [7, 3, 11, 0, 5]
    _, rating = head.compute_features(weights, [texts[i] for i in order], layers=[1], poolings=POOLINGS,
                                      question=QUESTION)
    assert sorted(rating) == [(1, "last"), (1, "mean")]
    for key, array in rating.items():
        assert array.dtype == np.float32 and array.shape == (5, 64)
        assert np.array_equal(array, fitting[key][order])
    assert not np.array_equal(fitting[(1, "mean")], fitting[(2, "mean")])


def test_the_passes_run_in_the_dtype_asked_for_and_a_head_rates_in_the_one_it_was_fitted_with(weights, fitted):
    """bfloat16 and float32 passes give close but different vectors, each reported in features.json;
    a head records the dtype its vectors had ("auto" picked one of the two) and computes its rating
    vectors in that dtype, whichever this machine would pick now; a head without one is float32."""
    texts = [_text(r) for r in generate_visits(4, seed=23)]
    runs = {}
    for dtype in DTYPES:
        info, runs[dtype] = head.compute_features(weights, texts, layers=fitted.layers, poolings=fitted.poolings,
                                                  question=fitted.question, dtype=dtype)
        assert info["dtype"] == dtype and runs[dtype][(1, "mean")].dtype == np.float32
    assert not np.array_equal(runs["float32"][(1, "mean")], runs["bfloat16"][(1, "mean")])
    assert np.allclose(runs["float32"][(1, "mean")], runs["bfloat16"][(1, "mean")], rtol=0.1, atol=0.05)
    assert fitted.dtype in DTYPES and fitted.to_json()["base"]["dtype"] == fitted.dtype
    for dtype in DTYPES:
        stored = json.loads(json.dumps(fitted.to_json()))
        stored["base"]["dtype"] = dtype
        rebuilt = head.Head.from_json(stored)
        assert rebuilt.dtype == dtype
        vectors = head.head_vectors(weights, rebuilt, texts)
        assert all(np.array_equal(vectors[kind], runs[dtype][kind]) for kind in rebuilt.kinds)
    older = json.loads(json.dumps(fitted.to_json()))
    del older["base"]["dtype"]
    assert head.Head.from_json(older).dtype == "float32"


def test_each_layers_states_pass_through_the_final_norm_and_a_head_of_raw_states_rates_with_raw_ones(weights, fitted):
    """A head is fitted on normed states (each token's state after a layer through the model's final
    norm): layer 1's vectors differ from the raw residual stream's, the last layer's (normed by the
    model itself) do not. A head stored before (no base.states) reads raw states and rates with
    them; an unknown kind of states is refused by the child and by from_json."""
    texts = [_text(r) for r in generate_visits(4, seed=29)]
    runs = {}
    for states in ("normed", "raw"):
        info, runs[states] = head.compute_features(weights, texts, layers=[1, 2], poolings=POOLINGS, question=QUESTION,
                                                   dtype="float32", states=states)
        assert info["states"] == states
    for pooling in POOLINGS:
        assert not np.allclose(runs["normed"][(1, pooling)], runs["raw"][(1, pooling)], rtol=0.05)
        assert np.array_equal(runs["normed"][(2, pooling)], runs["raw"][(2, pooling)])
    assert fitted.states == "normed" and fitted.to_json()["base"]["states"] == "normed"
    older = json.loads(json.dumps(fitted.to_json()))
    del older["base"]["states"]
    older["base"]["dtype"] = "float32"
    raw = head.Head.from_json(older)
    assert raw.states == "raw"
    vectors = head.head_vectors(weights, raw, texts)
    assert all(np.array_equal(vectors[kind], runs["raw"][kind]) for kind in raw.kinds)
    with pytest.raises(head.FeaturesError, match="states must be normed or raw"):
        head.compute_features(weights, ["a visit"], layers=[1], poolings=["mean"], question="", states="scaled")
    older["base"]["states"] = "scaled"
    with pytest.raises(head.HeadError, match="base.states must be one of normed, raw"):
        head.Head.from_json(older)


def test_the_features_child_refuses_a_dtype_it_does_not_know(weights):
    """A spec asking for float16 (or anything but auto, float32, bfloat16) fails the child with the
    reason, before any weights are loaded."""
    with pytest.raises(head.FeaturesError, match="dtype must be auto, float32 or bfloat16"):
        head.compute_features(weights, ["a visit"], layers=[1], poolings=["mean"], question="", dtype="float16")


def test_the_head_rater_gives_the_fitted_heads_probabilities_as_the_answer_and_confidence(weights, fitted):
    """HeadRater's answers are the head's most likely ratings, its probabilities those of the
    vectors the child computes, each record answered."""
    texts = [_text(r) for r in generate_visits(6, seed=22)]
    _, arrays = head.compute_features(weights, texts, layers=fitted.layers, poolings=fitted.poolings,
                                      question=fitted.question)
    expected = fitted.probabilities(arrays)
    answers = HeadRater(weights, fitted).answer([[{"role": "system", "content": "s"},
                                                  {"role": "user", "content": t}] for t in texts])
    assert [a.probs for a in answers] == expected
    assert [json.loads(a.text) for a in answers] == [{"rating": most_likely(p)} for p in expected]


def test_the_head_rater_refuses_weights_other_than_those_the_head_was_fitted_on(weights, fitted):
    """A head whose recorded weights' sha256 differs from the weights found is refused before any
    forward pass."""
    other = head.Head.from_json({**fitted.to_json(), "base": {**fitted.base, "weights_sha256": "0" * 64}})
    with pytest.raises(RaterError, match="not those the head was fitted on"):
        HeadRater(weights, other).answer([[{"role": "user", "content": "x"}]])


def test_a_stored_head_loads_back_with_the_same_probabilities(fitted):
    """to_json -> JSON text -> from_json gives exactly the same probabilities and fingerprint."""
    rng = np.random.default_rng(3)
    vectors = {kind: rng.normal(size=(20, 64)).astype(np.float32) for kind in fitted.kinds}
    loaded = head.Head.from_json(json.loads(json.dumps(fitted.to_json())))
    assert loaded == fitted and loaded.fingerprint() == fitted.fingerprint()
    after = loaded.probabilities(vectors)
    assert after == fitted.probabilities(vectors)
    assert [sorted(p) for p in after] == [[-1, 0, 1]] * 20 and all(abs(sum(p.values()) - 1) < 1e-9 for p in after)


def test_the_stored_probabilities_are_the_average_of_scikit_learns_own():
    """Each member rates exactly as the scikit-learn pipeline fitted on its vectors at its C would,
    and the head's probabilities are the members' average."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(5)
    y = np.array([-1, 0, 1] * 20)
    vectors = {(1, "mean"): rng.normal(size=(60, 8)), (1, "last"): rng.normal(size=(60, 8))}
    vectors[(1, "mean")][:, 0] += 3 * y
    got = head.fit(vectors, list(y))
    stored = head.Head(got.members, "", 10, got.classes, 60, got.cv,
                       {"model": "m", "weights_sha256": "0" * 64, "layers_total": 1, "hidden_size": 8})
    assert stored.kinds == [(1, "mean"), (1, "last")] and [r["kappa"] for r in got.cv][0] > 0.5
    expected = np.zeros((10, 3))
    for member in got.members:
        model = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", C=member.c,
                                                                   max_iter=5000))
        expected += model.fit(vectors[member.kind], y).predict_proba(vectors[member.kind][:10]) / 2
    got_probs = stored.probabilities({k: v[:10] for k, v in vectors.items()})
    assert all(abs(p[c] - expected[i][j]) < 1e-9 for i, p in enumerate(got_probs) for j, c in enumerate((-1, 0, 1)))


def test_a_head_of_the_earlier_single_regression_form_is_read_as_one_member(fitted):
    """A head.json written before heads averaged their candidates (one layer and pooling at the top
    level, fine-tuner-head/1) still loads, as a head of that one member, and rates as it did."""
    member = fitted.members[0]
    old = {"format": "fine-tuner-head/1", "question": fitted.question, "max_tokens": fitted.max_tokens,
           "classes": list(fitted.classes), "train_rows": fitted.train_rows, "base": dict(fitted.base),
           "cv": list(fitted.cv), **member.to_json()}
    loaded = head.Head.from_json(json.loads(json.dumps(old)))
    assert loaded.members == (member,) and loaded.kinds == [member.kind]
    vectors = np.random.default_rng(3).normal(size=(5, 64))
    assert loaded.probabilities({member.kind: vectors}) == [
        {c: p[c] for c in fitted.classes} for p in member.probabilities(vectors, fitted.classes)]


@pytest.mark.parametrize("change, field", [
    (lambda d: d.update(format="pickle"), "is not a fine-tuner head"),
    (lambda d: d["members"][0].update(pooling="max"), "pooling must be one of mean, last"),
    (lambda d: d["members"][0].update(layer=3), "base must name"),
    (lambda d: d["members"][0].update(layer=True), "layer must be a layer number"),
    (lambda d: d.update(members=[]), "members must be a list of 1 to 64"),
    (lambda d: d.update(members=d["members"] * 2), "members must each read another"),
    (lambda d: d.update(classes=[1, 1]), "classes must be two or more distinct"),
    (lambda d: d["members"][0]["scaler"]["scale"].__setitem__(0, 0.0), "scaler.scale must hold positive numbers"),
    (lambda d: d["members"][0]["scaler"]["mean"].__setitem__(0, float("nan")), "scaler.mean must be a list"),
    (lambda d: d["members"][1]["coef"][0].append(1.0), "coef must be a list of 64 finite numbers"),
    (lambda d: d["members"][0]["coef"].pop(), "coef must have 3 rows"),
    (lambda d: d["members"][0].update(intercept=["1", "2", "3"]), "intercept must be a list of 3 finite numbers"),
    (lambda d: d["members"][0].update(c=-1), "c must be a positive number"),
    (lambda d: d["base"].update(weights_sha256="abc"), "base must name"),
    (lambda d: d["base"].update(hidden_size=32), "base must name"),
    (lambda d: d["base"].update(dtype="float16"), "base.dtype must be one of float32, bfloat16"),
    (lambda d: d.update(cv={"layer": 1}), "cv must be a list"),
])
def test_a_hostile_stored_head_is_refused_naming_the_field(fitted, change, field):
    """Each wrong type, shape or value is refused with the field's name."""
    data = json.loads(json.dumps(fitted.to_json()))
    change(data)
    with pytest.raises(head.HeadError, match=field):
        head.Head.from_json(data)


# --- a job with approach head -------------------------------------------------------------------

ROWS = 320  # 287 training rows, 33 held out (defaults.validation_fraction 0.1)


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_base_models):
    """A FineTuner job with approach head on synthetic rows; Ollama is down (a closed port)."""
    out = tmp_path_factory.mktemp("head-job")
    cfg = {"base_models": tiny_base_models,
           "ollama": {"register": "auto", "host": "http://127.0.0.1:9", "retries": 0, "connect_timeout_s": 0.5},
           "evaluation": {"enabled": "required", "backend": "auto"}, "paths": {"root": str(out)}}
    df = pd.DataFrame(list(synthetic_rows(ROWS, 5)), columns=HEADER)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        ok, meta = FineTuner(config=cfg).process_dataset(df, TINY_NAME, MAPPING, "respiratory infections",
                                                         approach="head", output_dir=out / "job")
    assert ok is True
    return {"folder": out / "job", "meta": meta, "cfg": cfg, "df": df}


def test_a_head_job_is_evaluated_beside_the_baseline_and_stores_plain_numbers(job):
    """approach head: the hold-out, the baseline and head.json (no pickle, no Ollama model); the
    evaluation rates the 33 held-out rows with the head and the baseline, the head's
    probabilities as its confidence."""
    meta, folder = job["meta"], job["folder"]
    assert (meta["approach"], meta["approach_reason"]) == ("head", "head requested")
    assert sorted(p.name for p in folder.iterdir()) == [
        "baseline.json", "calibration.json", "confusion_matrix.png", "evaluation.json", "evaluation.md",
        "fine_tuning_metadata.json", "head.json", "predictions.csv", "validation_data.jsonl"]
    assert meta["registration"] == {"registered": False,
                                    "reason": "a head is not an Ollama model: it rates through the local backend"}
    stored = head.load(folder / "head.json")
    assert (meta["head"]["layers"], meta["head"]["poolings"], meta["head"]["members"], meta["head"]["train_rows"]) == (
        stored.layers, stored.poolings, len(stored.members), meta["split"]["train_rows"])
    assert (meta["split"]["train_rows"], meta["split"]["validation_rows"], stored.train_rows) == (287, 33, 287)
    report = json.loads((folder / "evaluation.json").read_text())
    assert [(m["key"], m["title"], m["n"], m["backend"]) for m in report["models"]] == [
        ("new", "head on the base model", 33, "head"), ("baseline", "bag-of-words baseline", 33, "baseline")]
    new = report["models"][0]
    assert new["confidence"]["source"] == CONFIDENCE_SOURCES["head"] and new["confidence"]["available"] == 33
    assert new["kappa"] > 0.8 and meta["evaluation"]["backend"] == "head"


def test_a_head_rates_new_records_through_the_local_backend_as_the_evaluation_did(job, tmp_path):
    """rate with the head's folder (backend auto: the head's own) gives each held-out record the
    rating the evaluation gave it, with a confidence; another backend is refused, and so is
    llama-server for a head on a weights folder (a head is served from its base GGUF)."""
    from daemon.config import load_config

    folder, df = job["folder"], job["df"]
    rows = job["meta"]["split"]["validation_source_rows"]
    held = df.iloc[[r - 1 for r in rows]]
    src = tmp_path / "new.csv"
    held.drop(columns=["Expert Rating", "Standardized_Rating"]).to_csv(src, index=False)
    model = model_from_folder(folder)
    assert (model.approach, model.head) == ("head", head.load(folder / "head.json"))
    cfg = load_config(None, {}, overrides=job["cfg"])
    summary = rate_file(model, src, tmp_path / "ratings.csv", cfg)
    assert (summary["backend"], summary["rated"], summary["invalid"]) == ("head", 33, 0)
    assert summary["confidence"]["source"] == CONFIDENCE_SOURCES["head"]
    with open(tmp_path / "ratings.csv", newline="") as fh:
        rated = list(csv.DictReader(fh))
    with open(folder / "predictions.csv", newline="") as fh:
        evaluated = {int(r["row"]): r["new_rating"] for r in csv.DictReader(fh)}
    assert [r["rating"] for r in rated] == [evaluated[r] for r in rows]
    assert all(r["confidence"] for r in rated)
    with pytest.raises(RatingError, match="a head rates through the local backend or llama-server"):
        rate_file(model, src, tmp_path / "other.csv", cfg, backend="ollama")
    with pytest.raises(RatingError, match="the base of .* is not a GGUF on this machine"):
        rate_file(model, src, tmp_path / "other.csv", cfg, backend="llama-server")


def test_a_hostile_head_json_in_a_model_folder_is_refused_naming_it(job, tmp_path):
    """A head.json with a wrong field makes the folder unusable, the error naming file and field."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(job["folder"], copy)
    data = json.loads((copy / "head.json").read_text())
    data["members"][0]["coef"] = "import os"
    (copy / "head.json").write_text(json.dumps(data))
    with pytest.raises(ModelFolderError, match=r"head\.json in the model folder copy coef must have 3 rows") as info:
        model_from_folder(copy)
    assert info.value.file == "head.json"
