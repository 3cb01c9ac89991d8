"""Handing a job to a bigger machine: the output folder runs as is in axolotl, TRL and LLaMA-Factory,
and ``training.backend: axolotl`` trains a job through axolotl with the job contract unchanged.

One fine-tune of the tiny model runs through axolotl (``axolotl_job``, about a minute of CPU) and
one small fine-tune runs on the built-in trainer (``small_job``, below the hold-out threshold). The
hand-off tests work on a copy of a job folder in another place, as a user does after copying it to
another machine: axolotl's own config validation, ``axolotl preprocess`` started from another
working directory, TRL's SFTTrainer on both JSONL files, and LLaMA-Factory's own dataset parser and
converter on ``dataset_info.json``. Third-party code runs in child processes: each is slow to
import and starts threads of its own. The supervision of an axolotl run (stop, parent death) is
tested in ``tests/training/test_axolotl_trainer.py``. ``make test`` installs axolotl (the ``axolotl`` extra, which
brings TRL) and LLaMA-Factory's code (``LLAMAFACTORY_PATH``, see the Makefile).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import yaml

from daemon import fsutil
from daemon.fine_tuner import FineTuner
from daemon.data.synthetic import HEADER, MAPPING, synthetic_rows
from daemon.training.supervisor import BASE_MODEL_PLACEHOLDER
from tests.conftest import THIRD_PARTY_ENV, leftovers, machine_paths_in
from tests.fake_ollama import FakeOllama
from tests.tiny_model import TINY_NAME

# one xdist worker runs the whole module (make test runs the suite on several), so that its
# module-scoped fixture is built once
pytestmark = pytest.mark.xdist_group("handoff")

ROWS = 120  # 108 trained, 12 held out
EPOCHS = 2
PROGRESS_KEYS = {"step", "total_steps", "epoch", "loss", "eval_loss", "learning_rate", "tokens_per_s",
                 "elapsed_s", "eta_s", "percent"}


def frame(rows: int) -> pd.DataFrame:
    return pd.DataFrame(list(synthetic_rows(rows, 5)), columns=HEADER)


def run_python(script: str, *, cwd: Path, timeout: float = 240, env: dict | None = None) -> dict:
    """Run ``script`` in a child Python of this environment; its last stdout line is JSON."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **THIRD_PARTY_ENV, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def handed_on(job: Path, to: Path, weights: Path) -> Path:
    """The job folder copied to another place, with base_model filled in as its comment says."""
    copy = shutil.copytree(job, to)
    config = copy / "training_config.yaml"
    text = config.read_text()
    assert BASE_MODEL_PLACEHOLDER in text  # the tiny model has no Hugging Face id
    config.write_text(text.replace(BASE_MODEL_PLACEHOLDER, str(weights)))
    return copy


@pytest.fixture(scope="module")
def axolotl_job(tmp_path_factory, tiny_model_dir) -> tuple[Path, dict, Path]:
    """A fine-tune job with training.backend axolotl, registered in a fake Ollama and evaluated
    through it: (its folder, its metadata, the fine_tuner.log)."""
    root = tmp_path_factory.mktemp("axolotl-job")
    fake = FakeOllama()
    fake.add_model(TINY_NAME, architecture="llama")
    fake.start()
    try:
        cfg = {"base_models": {TINY_NAME: str(tiny_model_dir)},
               "ollama": {"host": fake.url, "register": "required", "retries": 0},
               "training": {"sequence_len": 512, "device": "cpu", "backend": "axolotl"},
               "evaluation": {"enabled": "required", "backend": "ollama"}, "paths": {"root": str(root)}}
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("OMP_NUM_THREADS", "1")
            ok, meta = FineTuner(config=cfg).process_dataset(
                frame(ROWS), TINY_NAME, MAPPING, "respiratory infections", approach="fine_tune",
                epochs=EPOCHS, learning_rate=1e-2, batch_size=8, output_dir=root / "job")
        assert ok is True
        meta["_creates"] = [r.body for r in fake.requests_to("/api/create", "POST")]
    finally:
        fake.stop()
    return root / "job", meta, root / "fine_tuner.log"


@pytest.fixture(scope="module")
def small_job(tmp_path_factory, tiny_model_dir) -> Path:
    """A fine-tune of 30 rows (below defaults.min_rows: nothing is held out) on the built-in trainer."""
    root = tmp_path_factory.mktemp("small-job")
    cfg = {"base_models": {TINY_NAME: str(tiny_model_dir)},
           "ollama": {"host": "http://127.0.0.1:9", "register": "off", "retries": 0},
           "training": {"sequence_len": 512, "device": "cpu"},
           "evaluation": {"enabled": "off"}, "paths": {"root": str(root)}}
    with pytest.warns(UserWarning):
        ok, _meta = FineTuner(config=cfg).process_dataset(
            frame(30), TINY_NAME, MAPPING, "respiratory infections", approach="fine_tune", epochs=1,
            learning_rate=1e-2, batch_size=8, output_dir=root / "job")
    assert ok is True
    return root / "job"


# --- training.backend: axolotl -----------------------------------------------------------------

def test_axolotl_backend_trains_and_reports_like_the_built_in_trainer(axolotl_job):
    """The metrics, training_log.jsonl (same records as the built-in trainer) and the
    training_progress events come from axolotl's run; the loss goes down."""
    job, meta, log_file = axolotl_job
    training = meta["training"]
    assert (meta["approach"], training["backend"], training["device"]) == ("fine_tune", "axolotl", "cpu")
    assert training["rows_trained"] == 108 and training["rows_validation"] == 12
    # axolotl counts the batches of the whole run (27), the built-in trainer those of each epoch (2 x 14)
    assert training["steps"] == training["total_steps"] == math.ceil(EPOCHS * 108 / 8)
    assert training["final_loss"] < training["first_loss"], training
    assert math.isfinite(training["eval_loss"]) and training["trainable_params"] > 0
    records = [json.loads(line) for line in (job / "training_log.jsonl").read_text().splitlines()]
    assert all(set(r) == PROGRESS_KEYS for r in records)
    steps = [r["step"] for r in records if r["loss"] is not None]
    assert steps == list(range(1, training["steps"] + 1))
    assert records[-1]["percent"] == 100.0
    assert any(r["eval_loss"] is not None for r in records)
    events = [json.loads(line) for line in log_file.read_text().splitlines()]
    relayed = [e for e in events if e["event"] == "training_progress"]
    assert len(relayed) == len(records)
    started = next(e for e in events if e["event"] == "training_started")
    assert started["backend"] == "axolotl"


def test_axolotl_adapter_is_published_registered_and_evaluated(axolotl_job):
    """adapter/ holds the two PEFT files, named after the placeholder base, and llama.cpp's GGUF form;
    Ollama got both PEFT files; the evaluation measured the fine-tune on the held-out rows; nothing of
    axolotl's own is left."""
    job, meta, _log = axolotl_job
    assert sorted(p.name for p in (job / "adapter").iterdir()) == [
        "adapter.gguf", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((job / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == BASE_MODEL_PLACEHOLDER
    assert meta["registration"]["registered"] is True
    expected = {name: "sha256:" + fsutil.sha256_file(job / "adapter" / name)
                for name in ("adapter_config.json", "adapter_model.safetensors")}
    assert meta["_creates"][-1]["adapters"] == expected
    models = {m["model"]: m for m in meta["evaluation"]["models"]}
    assert meta["evaluation"]["status"] == "done" and set(models) == {"new", "baseline", "model_set", "base"}
    for name in (".trainer-work", "trainer-output", "run_spec.json", "last_run_prepared"):
        assert not (job / name).exists(), name
    assert leftovers(job.parent) == []


def test_axolotl_adapter_loads_with_peft_and_is_trained(axolotl_job, tiny_model_dir):
    """PEFT loads the adapter onto the base weights; every LoRA B matrix moved from its zero start."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    job, _meta, _log = axolotl_job
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), job / "adapter")
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 2 * 4  # 2 layers x q, k, v, o
    assert all(float(p.abs().sum()) > 0 for p in lora_b)


def test_published_folders_name_no_path_of_this_machine(axolotl_job, small_job, tiny_model_dir):
    """Every file of both folders (the stderr log of axolotl's run included) is free of this
    machine's paths: the spec and axolotl's work folder are gone, the rest is relative."""
    job, _meta, _log = axolotl_job
    assert (job / "trainer_stderr.log").stat().st_size > 0
    for folder in (job, small_job):
        assert machine_paths_in(folder, folder.parent, tiny_model_dir) == []


# --- the folder handed to other trainers -------------------------------------------------------

def test_small_job_references_no_empty_file(small_job):
    """Below the hold-out threshold: no validation file, and nothing names one; the metadata says why."""
    assert not (small_job / "validation_data.jsonl").exists()
    config = yaml.safe_load((small_job / "training_config.yaml").read_text())
    assert "test_datasets" not in config and "eval_strategy" not in config
    assert list(json.loads((small_job / "dataset_info.json").read_text())) == ["fine_tuner_train"]
    meta = json.loads((small_job / "fine_tuning_metadata.json").read_text())
    assert meta["split"]["validation_rows"] == 0 and "no hold-out" in meta["split"]["note"]


def test_axolotl_validates_both_configs_and_keeps_the_recipe(axolotl_job, small_job, tiny_model_dir, tmp_path):
    """axolotl's own validate_config accepts training_config.yaml as written (base_model filled in)
    with and without a hold-out, and keeps the project's recipe instead of its own defaults."""
    job, meta, _log = axolotl_job
    copies = [handed_on(job, tmp_path / "big", tiny_model_dir),
              handed_on(small_job, tmp_path / "small", tiny_model_dir)]
    result = run_python(f"""
        import json, yaml
        from axolotl.utils.config import validate_config
        from axolotl.utils.dict import DictDefault
        out = []
        for path in {[str(c / "training_config.yaml") for c in copies]!r}:
            cfg = validate_config(DictDefault(yaml.safe_load(open(path))))
            out.append({{k: cfg[k] for k in ("lr_scheduler", "optimizer", "weight_decay", "eval_strategy",
                        "warmup_ratio", "learning_rate", "num_epochs", "seed", "output_dir", "fp16")}})
        print(json.dumps(out, default=str))
        """, cwd=tmp_path)
    big, small = result
    assert big["lr_scheduler"] == "linear" and "adamw_torch" in big["optimizer"]
    assert (big["weight_decay"], big["eval_strategy"], big["fp16"]) == (0.0, "epoch", False)
    assert (big["learning_rate"], big["num_epochs"], big["seed"]) == (1e-2, EPOCHS, 42)
    assert big["output_dir"] == small["output_dir"] == "trainer-output"
    assert small["eval_strategy"] in (None, "no")


def test_axolotl_preprocess_runs_from_another_working_directory(axolotl_job, tiny_model_dir, tmp_path):
    """The copied folder's launcher runs axolotl preprocess from anywhere: the data is found, the
    output goes to trainer-output/, and the published adapter is untouched."""
    job, _meta, _log = axolotl_job
    copy = handed_on(job, tmp_path / "gpu-box" / "job", tiny_model_dir)
    before = {p.name: fsutil.sha256_file(p) for p in (copy / "adapter").iterdir()}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # axolotl on the PATH, as in an activated environment
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    proc = subprocess.run(["sh", str(copy / "run_axolotl.sh"), "preprocess"], cwd=elsewhere, capture_output=True,
                          text=True, timeout=240, env={**os.environ, **THIRD_PARTY_ENV, "PATH": path})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "Success! Preprocessed data path" in proc.stdout + proc.stderr
    assert (copy / "trainer-output").is_dir() and (copy / "last_run_prepared").is_dir()
    assert {p.name: fsutil.sha256_file(p) for p in (copy / "adapter").iterdir()} == before
    assert list(elsewhere.iterdir()) == []


def test_trl_trains_and_evaluates_on_both_files(axolotl_job, tiny_model_dir, tmp_path):
    """TRL's SFTTrainer loads training_data.jsonl and validation_data.jsonl as conversations,
    takes a step and evaluates."""
    job, _meta, _log = axolotl_job
    result = run_python(f"""
        import json, math
        from datasets import load_dataset
        from trl import SFTConfig, SFTTrainer
        from trl.data_utils import is_conversational
        folder = {str(job)!r}
        data = load_dataset("json", data_files={{"train": folder + "/training_data.jsonl",
                                                 "validation": folder + "/validation_data.jsonl"}})
        args = SFTConfig(output_dir="out", max_steps=1, per_device_train_batch_size=4, max_length=512,
                         report_to=[], save_strategy="no", use_cpu=True, logging_steps=1)
        trainer = SFTTrainer(model={str(tiny_model_dir)!r}, args=args, train_dataset=data["train"],
                             eval_dataset=data["validation"])
        trainer.train()
        metrics = trainer.evaluate()
        print(json.dumps({{"conversational": is_conversational(data["train"][0]),
                           "train": len(trainer.train_dataset), "eval": len(trainer.eval_dataset),
                           "eval_loss": metrics["eval_loss"]}}))
        """, cwd=tmp_path)
    assert (result["conversational"], result["train"], result["eval"]) == (True, 108, 12)
    assert math.isfinite(result["eval_loss"])


def test_llamafactory_parses_dataset_info_and_converts_both_files(axolotl_job, tmp_path):
    """LLaMA-Factory's own parser reads dataset_info.json (only fields it documents), and its
    sharegpt converter turns every record into system, user prompt and the answer as response."""
    job, _meta, _log = axolotl_job
    lf_path = str(Path(os.environ.get("LLAMAFACTORY_PATH") or Path(sys.prefix) / "llamafactory").resolve())
    assert Path(lf_path, "llamafactory").is_dir(), "run the suite with make test (it installs LLaMA-Factory's code)"
    result = run_python(f"""
        import dataclasses, json, sys, types, pathlib
        import llamafactory
        # llamafactory.data's __init__ imports its multimodal plugin, which needs torchaudio (not
        # installable beside this torch); the parser and converter modules need none of it
        data_pkg = types.ModuleType("llamafactory.data")
        data_pkg.__path__ = [str(pathlib.Path(llamafactory.__file__).parent / "data")]
        sys.modules["llamafactory.data"] = data_pkg
        from llamafactory.data.converter import get_dataset_converter
        from llamafactory.data.parser import DatasetAttr, get_dataset_list
        folder = {str(job)!r}
        info = json.load(open(folder + "/dataset_info.json"))
        known = {{f.name for f in dataclasses.fields(DatasetAttr)}}
        unknown = [k for entry in info.values() for part in ("columns", "tags")
                   for k in entry.get(part, {{}}) if k not in known]
        out = {{"unknown": unknown}}
        for attr in get_dataset_list(list(info), folder):
            converter = get_dataset_converter(attr.formatting, attr, types.SimpleNamespace(media_dir=folder))
            rows = [json.loads(line) for line in open(folder + "/" + attr.dataset_name)]
            converted = [converter(row) for row in rows]
            out[attr.dataset_name] = [
                c["_system"] == r["messages"][0]["content"]
                and c["_prompt"] == [{{"role": "user", "content": r["messages"][1]["content"]}}]
                and c["_response"] == [{{"role": "assistant", "content": r["messages"][2]["content"]}}]
                for c, r in zip(converted, rows)]
        print(json.dumps(out))
        """, cwd=tmp_path, env={"PYTHONPATH": os.pathsep.join([lf_path, str(Path.cwd())])})
    assert result["unknown"] == []
    assert len(result["training_data.jsonl"]) == 108 and all(result["training_data.jsonl"])
    assert len(result["validation_data.jsonl"]) == 12 and all(result["validation_data.jsonl"])

