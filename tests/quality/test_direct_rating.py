"""The rating as a direct decision: a tiny fine-tune trained on both answer forms
(``training.answer_forms: both``) is evaluated and rates new records in one forward pass each, no
generation, and still writes a rationale on request (``rate --explain``). One real job end to end,
as ``test_learning`` runs it."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from daemon.data.synthetic import HEADER, MAPPING, synthetic_rows
from daemon.fine_tuner import FineTuner
from tests.quality.test_learning import DATA_SEED, EPOCHS, LEARNING_RATE, MIN_ACCURACY, MIN_KAPPA, ROWS
from tests.tiny_model import TINY_NAME

ROOT = Path(__file__).resolve().parent.parent.parent
pytestmark = pytest.mark.xdist_group("direct_rating")


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_base_models) -> tuple[Path, dict, dict]:
    """(output folder, metadata, evaluation.json) of a tiny fine-tune trained on both answer forms."""
    out = tmp_path_factory.mktemp("direct")
    cfg = {"base_models": tiny_base_models,
           "ollama": {"register": "off", "host": "http://127.0.0.1:9", "retries": 0, "connect_timeout_s": 0.5},
           "training": {"sequence_len": 512, "device": "cpu", "answer_forms": "both"},
           "evaluation": {"enabled": "required", "backend": "auto"}, "paths": {"root": str(out)}}
    df = pd.DataFrame(list(synthetic_rows(ROWS, DATA_SEED)), columns=HEADER)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        ok, meta = FineTuner(config=cfg).process_dataset(
            df, TINY_NAME, MAPPING, "respiratory infections", approach="fine_tune", epochs=EPOCHS,
            learning_rate=LEARNING_RATE, batch_size=8, output_dir=out / "job")
    assert ok is True and meta["evaluation"]["status"] == "done"
    return out / "job", meta, json.loads((out / "job" / "evaluation.json").read_text())


def test_both_forms_are_trained_and_the_fine_tune_decides_the_rating_in_one_pass(job):
    """Every training row is there twice (reasoned, then rating only); the fine-tune's held-out
    answers are rating-only decisions with a probability each, agreeing with the experts at least as
    well as the reasoned answers must (test_learning's bar)."""
    folder, meta, report = job
    lines = [json.loads(x) for x in (folder / "training_data.jsonl").read_text().splitlines()]
    answers = [x["messages"][-1]["content"] for x in lines]
    assert len(lines) == 2 * meta["split"]["train_rows"] and meta["fine_tune"]["answer_forms"] == "both"
    assert all(json.loads(a).keys() == {"rating"} for a in answers[1::2])
    assert all(json.loads(a).keys() == {"rationale", "rating"} for a in answers[0::2])
    new = {m["key"]: m for m in report["models"]}["new"]
    assert new["invalid"] == 0 and new["confidence"]["available"] == new["n"]
    assert new["accuracy"] >= MIN_ACCURACY and new["kappa"] >= MIN_KAPPA, new


def _rate(folder: Path, csv_path: Path, output: Path, base_models: dict, *extra: str) -> list[dict]:
    config = csv_path.parent / "config.yaml"
    config.write_text(json.dumps({"base_models": base_models}))  # JSON is YAML
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FINE_TUNER_OLLAMA__HOST": "http://127.0.0.1:9",
           "FINE_TUNER_OLLAMA__RETRIES": "0", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "daemon", "rate", "--config", str(config), "--model", str(folder),
                          "--input", str(csv_path), "--output", str(output), "--backend", "local", *extra],
                         cwd=csv_path.parent, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    with open(output, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_rate_decides_in_one_pass_and_explains_on_request(job, tmp_path, tiny_base_models):
    """`rate --backend local` gives every record a rating and a confidence with no rationale (no
    generation); `--explain` generates the reasoned answers instead."""
    folder, _, _ = job
    rows = list(synthetic_rows(24, seed=31))
    pd.DataFrame(rows, columns=HEADER).to_csv(tmp_path / "new.csv", index=False)
    direct = _rate(folder, tmp_path / "new.csv", tmp_path / "direct.csv", tiny_base_models)
    assert len(direct) == 24 and all(r["valid"] == "true" and r["rationale"] == "" for r in direct)
    assert all(0 < float(r["confidence"]) <= 1 for r in direct)
    truth = [int(r[3]) for r in rows]
    agree = sum(int(r["rating"]) == t for r, t in zip(direct, truth)) / 24
    assert agree >= MIN_ACCURACY - 0.1, agree
    explained = _rate(folder, tmp_path / "new.csv", tmp_path / "explained.csv", tiny_base_models, "--explain")
    assert len(explained) == 24 and sum(r["rationale"] != "" for r in explained) >= 20
