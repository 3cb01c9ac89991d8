"""Regression test: a LoRA fine-tune of the tiny Llama learns the synthetic rating task, measured
the way every job measures it.

One real job end to end through ``FineTuner``: a 600-row synthetic dataset is split (540 trained,
60 held out), the trainer child trains the adapter with the product's LoRA defaults, and the job's
own evaluation rates the held-out rows through the local backend (the ``daemon.quality.generate`` child):
the fine-tune, the model set built from the same training rows, and the base model zero-shot. The
numbers come from the job's ``evaluation.json``: answers parsed strictly by
``prompts.parse_answer``, invalid answers counted as wrong.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from daemon.config import load_config
from daemon.fine_tuner import FineTuner
from daemon.data.synthetic import HEADER, MAPPING, synthetic_rows
from tests.conftest import llama_server_children
from tests.tiny_model import TINY_NAME

ROOT = Path(__file__).resolve().parent.parent.parent

# one xdist worker runs the whole module (make test runs the suite on several), so that its
# module-scoped fixture is built once
pytestmark = pytest.mark.xdist_group("learning")

ROWS, DATA_SEED = 600, 5  # 540 training rows, 60 held out (defaults.validation_fraction 0.1)
EPOCHS = 2
# The product's default (1e-3) is sized for a small real base (Gemma 3 270M); a 2-layer, 64-wide
# model needs ten times more to move within 136 steps (measured: 1e-4 leaves the held-out accuracy
# at the majority class, 2e-3 at 0.67, 5e-3 at 0.95, 1e-2 at 1.0).
LEARNING_RATE = 1e-2


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory, tiny_base_models) -> dict:
    """The evaluation.json of a fine-tune job of the tiny model on the synthetic task."""
    out = tmp_path_factory.mktemp("learning")
    # Ollama is down (a closed port): backend auto falls back to the local child
    cfg = {"base_models": tiny_base_models,
           "ollama": {"register": "off", "host": "http://127.0.0.1:9", "retries": 0, "connect_timeout_s": 0.5},
           "training": {"sequence_len": 512, "device": "cpu"},
           "evaluation": {"enabled": "required", "backend": "auto"}, "paths": {"root": str(out)}}
    df = pd.DataFrame(list(synthetic_rows(ROWS, DATA_SEED)), columns=HEADER)
    with pytest.MonkeyPatch.context() as mp:
        # one thread per child: the model is too small to gain from more, and on a busy machine
        # OpenMP threads waiting for each other made single steps up to 30x slower
        mp.setenv("OMP_NUM_THREADS", "1")
        ok, meta = FineTuner(config=cfg).process_dataset(
            df, TINY_NAME, MAPPING, "respiratory infections", approach="fine_tune", epochs=EPOCHS,
            learning_rate=LEARNING_RATE, batch_size=8, output_dir=out / "job")
    assert ok is True and meta["evaluation"]["status"] == "done"
    report = json.loads((out / "job" / "evaluation.json").read_text())
    report["by_key"] = {m["key"]: m for m in report["models"]}
    report["folder"] = out / "job"
    report["summary"] = json.dumps({m["key"]: [m["accuracy"], m["invalid_rate"], m["kappa"]]
                                    for m in report["models"]} | {"majority": report["majority_class"]})
    return report


def test_every_model_is_measured_on_the_60_held_out_rows_locally(evaluation):
    """With Ollama down, the fine-tune, the model set from the same rows and the base model are
    each rated on the same 60 held-out rows by the local backend, the bag-of-words baseline beside them."""
    assert [(m["key"], m["n"], m["backend"]) for m in evaluation["models"]] == [
        ("new", 60, "local"), ("baseline", 60, "baseline"), ("model_set", 60, "local"), ("base", 60, "local")]


# Answers are written reason first. The 2-layer model then decides at the rationale's first token,
# and it never learns the Unknown rows' rationale: measured at lr 5e-3 and 1e-2, batch 4 and 8, 2
# and 3 epochs, it answers 6-8 of the 8 held-out Unknown rows with Match's rationale and rating and
# every other row right (accuracy 0.867, kappa 0.76; with the rating first it reached >= 0.9). The
# order is chosen for real models (on Gemma 3 270M it took the familiar-records kappa from 0.00 to
# 0.45 and more); this test holds the tiny model to what it measurably learns.
MIN_ACCURACY, MIN_KAPPA = 0.85, 0.7


def test_fine_tune_rates_like_the_experts(evaluation):
    """The fine-tune agrees with the experts on at least 85% of the held-out rows, kappa >= 0.7."""
    new = evaluation["by_key"]["new"]
    assert new["accuracy"] >= MIN_ACCURACY and new["kappa"] >= MIN_KAPPA, evaluation["summary"]


def test_fine_tune_answers_are_valid(evaluation):
    """At least 95% of the fine-tune's answers are a JSON object with a rating of the mapping."""
    assert evaluation["by_key"]["new"]["invalid_rate"] <= 0.05, evaluation["summary"]


def test_the_fine_tunes_confidences_come_from_teacher_forcing_and_calibration_keeps_them_honest(evaluation):
    """Every valid answer of the fine-tune has a teacher-forced confidence, and a temperature is
    fitted on the held-out rows. Measured: the tiny fine-tune's raw confidences are already close
    to its accuracy (ECE about 0.03), so the temperature may not lower the error, and must not raise
    it by more than 0.02 (a deliberately over-confident model's is lowered: test_confidence)."""
    info = evaluation["by_key"]["new"]["confidence"]
    new = evaluation["by_key"]["new"]
    assert info["available"] == new["n"] - new["invalid"]
    assert info["source"] == "teacher forcing of each allowed rating at the rating position"
    cal = info["calibration"]
    assert cal["temperature"] is not None and cal["ece_after"] <= cal["ece_before"] + 0.02, cal


def test_base_model_cannot_already_rate(evaluation):
    """The base model, same system prompt and no adapter, does no better than the majority class
    plus 0.1: what the fine-tune knows it learned from the training rows."""
    base = evaluation["by_key"]["base"]["accuracy"]
    assert base <= evaluation["majority_class"]["accuracy"] + 0.1, evaluation["summary"]


# The same fine-tune served by llama.cpp: its converter's GGUF of the tiny base, the job's own
# adapter.gguf loaded at start, asked through the openai backend. Greedy decoding of f32 weights on
# both sides; the server also holds the answer to the JSON Schema, the local child does not.
MIN_SAME_AS_LOCAL = 0.95


def _local_ratings(evaluation) -> list[int | None]:
    """The fine-tune's ratings of the held-out rows by the job's own (local) evaluation."""
    with open(evaluation["folder"] / "predictions.csv", newline="", encoding="utf-8") as fh:
        return [int(r["new_rating"]) if r["new_valid"] == "true" else None for r in csv.DictReader(fh)]


def test_auto_starts_llama_server_for_the_evaluation_and_rate_when_asked(evaluation, tmp_path, tiny_gguf):
    """With Ollama down, no openai.base_url and evaluation.start_llama_server on, auto starts
    llama-server itself (the tiny base as GGUF, which base_models names, the job's adapter.gguf, and
    openai.parallel slots), measures all three models through it, and stops it. The server is asked
    through the openai backend, which finds the adapter among its /lora-adapters and sets its scale
    per request, as with a server the user started (`fine-tuner serve`). Every model is reported
    under backend llama-server, the fine-tune gives the local backend's rating on at least 95% of
    the held-out rows, and neither a server nor its temporary folder is left behind.
    `rate --backend llama-server` (the command line) rates new records through its own server."""
    from structlog.testing import capture_logs

    from daemon.data.synthetic import write_csv
    from daemon.llamacpp import server_binary
    from daemon.quality import heldout

    assert server_binary() is not None, "llama-server is not built: `make llama-cpp` (make test builds it)"

    folder = tmp_path / "job"
    shutil.copytree(evaluation["folder"], folder)
    meta = json.loads((folder / "fine_tuning_metadata.json").read_text())
    settings = {"base_models": {TINY_NAME: str(tiny_gguf)},
                "ollama": {"host": "http://127.0.0.1:9", "retries": 0, "connect_timeout_s": 0.5},
                "openai": {"parallel": 2}, "evaluation": {"start_llama_server": True},
                "paths": {"root": str(tmp_path / "root")}}
    cfg = load_config(env={}, overrides=settings)
    (tmp_path / "tmp").mkdir()
    with capture_logs() as logs, pytest.MonkeyPatch.context() as mp:
        mp.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the server's output goes
        report = heldout.evaluate_folder(folder, meta, cfg, backend="auto")
    assert [m["backend"] for m in report["models"]] == ["llama-server", "baseline", "llama-server", "llama-server"]
    [started] = [e for e in logs if e["event"] == "llama_server_started"]
    assert (started["gguf"], started["adapters"], started["slots"]) == ("tiny.gguf", 1, 2)
    assert [e["exit_code"] for e in logs if e["event"] == "llama_server_stopped"] == [0]
    local, remote = _local_ratings(evaluation), report["_predictions"]["models"]["new"]
    same = sum(a == b for a, b in zip(local, remote)) / len(local)
    assert same >= MIN_SAME_AS_LOCAL, (same, local, remote)
    assert llama_server_children() == []
    assert list((tmp_path / "tmp").iterdir()) == []

    write_csv(tmp_path / "new.csv", 12, seed=21)
    (tmp_path / "config.json").write_text(json.dumps(settings))
    res = subprocess.run([sys.executable, "-m", "daemon", "rate", "--config", str(tmp_path / "config.json"),
                          "--model", str(folder), "--input", str(tmp_path / "new.csv"),
                          "--backend", "llama-server", "--output", str(tmp_path / "ratings.csv")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "ratings.summary.json").read_text())
    assert (summary["backend"], summary["rated"]) == ("llama-server", 12)
    assert summary["invalid"] <= 1, summary
