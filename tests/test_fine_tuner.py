"""The seed's FineTuner API end to end: builders, approach decision, outputs, real fine-tuning."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pandas as pd
import pytest
import yaml

from daemon import fsutil
from daemon.data import modelset, prompts
from daemon.data.synthetic import MAPPING, synthetic_rows, HEADER
from scripts.fine_tuner import (
    DatasetTooSmallWarning,
    FineTuner,
    FineTuningNotSupportedError,
)

MARKER = "ZZPATIENTMARKER"


def frame(rows: int, seed: int = 7, marker: bool = False) -> pd.DataFrame:
    df = pd.DataFrame(list(synthetic_rows(rows, seed)), columns=HEADER)
    if marker:
        df["formatted_prompt"] = df["formatted_prompt"] + f" {MARKER}"
    return df


def offline_config(tmp_path: Path, **sections) -> dict:
    """No Ollama reachable (a closed port, no retries), logs under tmp_path."""
    cfg = {"ollama": {"host": "http://127.0.0.1:9", "retries": 0, "connect_timeout_s": 0.5, "register": "auto"},
           "paths": {"root": str(tmp_path)}}
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    return cfg


class TestFineTuner:
    def test_defaults(self, tmp_path):
        """The seed's constructor defaults hold."""
        tuner = FineTuner(config=offline_config(tmp_path))
        assert (tuner.debug_mode, tuner.fallback_mode) == (False, True)

    def test_prepare_training_data(self, tmp_path):
        """One chat record per usable row: system, user prompt, assistant JSON answer."""
        df = frame(12)
        records = FineTuner(config=offline_config(tmp_path)).prepare_training_data(df, MAPPING)
        assert len(records) == 12
        first = records[0]["messages"]
        assert [m["role"] for m in first] == ["system", "user", "assistant"]
        assert first[1]["content"] == df.loc[0, "formatted_prompt"]
        answer = json.loads(first[2]["content"])
        assert answer == {"rating": int(df.loc[0, "Standardized_Rating"]),
                          "rationale": df.loc[0, "Rationale of Rating"]}
        assert "- 0: Does Not Match" in first[0]["content"]

    def test_prepare_training_data_drops_empty_rows(self, tmp_path):
        """Rows with an empty prompt or rating are dropped, never trained on as -1."""
        df = frame(10)
        df.loc[2, "formatted_prompt"] = "   "
        df.loc[5, "Standardized_Rating"] = ""
        records = FineTuner(config=offline_config(tmp_path)).prepare_training_data(df, MAPPING)
        assert len(records) == 8
        prompts_used = [r["messages"][1]["content"] for r in records]
        assert df.loc[5, "formatted_prompt"] not in prompts_used

    def test_create_model_set_config(self, tmp_path):
        """The model set has the scale, balanced few-shot examples and an answer schema."""
        config = FineTuner(config=offline_config(tmp_path)).create_model_set_config(
            "llama2", frame(90), MAPPING, "cardiac conditions")
        assert config["base_model"] == "llama2"
        assert config["target_topics"] == ["cardiac conditions"]
        assert config["rating_mapping"] == MAPPING
        ratings = sorted(e["rating"] for e in config["few_shot_examples"])
        assert ratings == [-1, -1, 0, 0, 1, 1]
        assert config["output_schema"] == prompts.output_schema([1, 0, -1])
        assert config["ollama"]["parameters"] == {"temperature": 0}
        assert config["dataset_size"] == 90

    def test_process_dataset_model_set_approach(self, tmp_path):
        """A forced model set writes exactly its three files, and the Modelfile parses back."""
        out = tmp_path / "out"
        ok, meta = FineTuner(config=offline_config(tmp_path)).process_dataset(
            frame(60), "llama3.2:1b", MAPPING, "respiratory infections", approach="model_set", output_dir=out)
        assert ok is True
        assert meta["approach"] == "model_set"
        assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "baseline.json", "fine_tuning_metadata.json",
                                                        "model_set_config.json", "validation_data.jsonl"]
        held_out = set(meta["split"]["validation_source_rows"])
        assert (len(held_out), meta["split"]["train_rows"]) == (6, 54)
        assert not held_out & set(meta["model_set"]["few_shot_source_rows"])  # examples never from the hold-out
        assert meta["evaluation"]["status"] == "skipped"
        on_disk = json.loads((out / "fine_tuning_metadata.json").read_text())
        assert on_disk["rows"] == {"read": 60, "used": 60, "dropped": meta["rows"]["dropped"]}
        assert on_disk["registration"]["registered"] is False
        parsed = modelset.parse_modelfile((out / "Modelfile").read_text())
        assert parsed[0] == ("FROM", "llama3.2:1b")
        assert ("PARAMETER", "temperature 0") in parsed

    def test_small_dataset_warns_and_falls_back(self, tmp_path):
        """Below 50 rows: DatasetTooSmallWarning, and a model set (fallback on)."""
        with pytest.warns(DatasetTooSmallWarning):
            ok, meta = FineTuner(config=offline_config(tmp_path)).process_dataset(
                frame(20), "llama3.2:1b", MAPPING, "flu", output_dir=tmp_path / "o")
        assert (ok, meta["approach"]) == (True, "model_set")
        assert meta["approach_reason"] == "fewer than 50 usable rows"

    def test_small_dataset_without_fallback_raises(self, tmp_path):
        """Below 50 rows with fallback off and approach auto, the warning is raised; nothing is written."""
        with pytest.raises(DatasetTooSmallWarning):
            FineTuner(fallback_mode=False, config=offline_config(tmp_path)).process_dataset(
                frame(20), "llama3.2:1b", MAPPING, "flu", output_dir=tmp_path / "o")
        assert not (tmp_path / "o").exists()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []

    def test_unsupported_model_falls_back_with_failed_checks(self, tmp_path):
        """No local weights: the capability report fails and the metadata lists the failed checks."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ok, meta = FineTuner(config=offline_config(tmp_path)).process_dataset(
                frame(60), "no-such-model:7b", MAPPING, "flu", output_dir=tmp_path / "o")
        assert meta["approach"] == "model_set"
        failed = [c["name"] for c in meta["capability"]["checks"] if c["required"] and not c["ok"]]
        assert "base_weights" in failed
        assert meta["approach_reason"].startswith("fine-tuning not possible: ")

    def test_unsupported_model_without_fallback_raises(self, tmp_path):
        """Fallback off: FineTuningNotSupportedError carrying the report."""
        tuner = FineTuner(fallback_mode=False, config=offline_config(tmp_path))
        with pytest.raises(FineTuningNotSupportedError) as info:
            tuner.process_dataset(frame(60), "no-such-model:7b", MAPPING, "flu", output_dir=tmp_path / "o")
        assert info.value.report.supported is False
        assert tuner.check_fine_tuning_capability("no-such-model:7b") is False

    def test_a_cut_off_gguf_base_falls_back_to_a_model_set(self, tmp_path, monkeypatch):
        """A base_models .gguf cut short fails the base_weights check with what is wrong with it, and
        the job builds a model set instead of stopping on an internal error."""
        from tests.training.test_ggufheader import _tensor_table_end, write_gguf

        monkeypatch.setenv("FINE_TUNER_CACHE_DIR", str(tmp_path / "cache"))
        whole = write_gguf(tmp_path / "whole.gguf").read_bytes()
        (tmp_path / "base.gguf").write_bytes(whole[:-16])
        cfg = offline_config(tmp_path, ollama={"register": "off"}, evaluation={"enabled": "off"})
        cfg["base_models"] = {"llama3.2:1b": str(tmp_path / "base.gguf")}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ok, meta = FineTuner(config=cfg).process_dataset(frame(60), "llama3.2:1b", MAPPING, "flu",
                                                             output_dir=tmp_path / "o")
        assert (ok, meta["approach"]) == (True, "model_set")
        check = next(c for c in meta["capability"]["checks"] if c["name"] == "base_weights")
        assert (check["ok"], check["detail"]) == (
            False, f"the GGUF base.gguf holds {len(whole) - 16:,} bytes but its tensors need {len(whole):,}: "
                   f"the file is cut short (at byte {_tensor_table_end(tmp_path / 'whole.gguf')}): the GGUF "
                   "file is damaged or incomplete: pull the model again (ollama pull), or name another .gguf "
                   "file under base_models:")
        assert (tmp_path / "o" / "model_set_config.json").is_file()

    def test_logs_carry_no_cell_values(self, tmp_path):
        """fine_tuner.log has the job's events and never a cell value."""
        FineTuner(config=offline_config(tmp_path)).process_dataset(
            frame(60, marker=True), "llama3.2:1b", MAPPING, "flu", approach="model_set", output_dir=tmp_path / "o")
        text = (tmp_path / "fine_tuner.log").read_text()
        events = [json.loads(line)["event"] for line in text.splitlines()]
        assert "approach_selected" in events and "dataset_processed" in events
        assert MARKER not in text

    def test_process_dataset_fine_tuning_approach(self, tmp_path, tiny_model_dir, fake_ollama):
        """A real LoRA fine-tune of the tiny model through process_dataset (approach fine_tune: with no
        approach, a job whose base weights are here builds the head), registered in the fake Ollama;
        epochs, learning rate and batch size left out come from the config's defaults."""
        fake_ollama.add_model("tiny-llama:latest", architecture="llama")
        cfg = {"ollama": {"host": fake_ollama.url, "register": "required", "retries": 0},
               "defaults": {"epochs": 2, "learning_rate": 1e-2, "batch_size": 4},
               "base_models": {"tiny-llama:latest": str(tiny_model_dir)},
               "training": {"sequence_len": 512, "device": "cpu"},
               "paths": {"root": str(tmp_path)}}
        tuner = FineTuner(config=cfg)
        assert tuner.check_fine_tuning_capability("tiny-llama") is True
        out = tmp_path / "ft"
        ok, meta = tuner.process_dataset(frame(60), "tiny-llama", MAPPING, "respiratory infections",
                                         approach="fine_tune", output_dir=out, source_name="visits")
        assert (ok, meta["approach"]) == (True, "fine_tune")
        recipe = yaml.safe_load((out / "training_config.yaml").read_text())
        assert (recipe["num_epochs"], recipe["learning_rate"], recipe["micro_batch_size"]) == (2, 1e-2, 4)
        for name in ("training_data.jsonl", "validation_data.jsonl", "training_config.yaml", "Modelfile",
                     "training_log.jsonl", "fine_tuning_metadata.json", "adapter/adapter_model.safetensors",
                     "adapter/adapter_config.json"):
            assert (out / name).is_file(), name
        # it learns: the second epoch's mean loss is below the first's (one step's loss is too noisy
        # to compare; tests/quality/test_learning.py measures what the model learned on held-out rows)
        steps = [json.loads(x) for x in (out / "training_log.jsonl").read_text().splitlines()]
        by_epoch = {}
        for step in steps:
            if step.get("loss") is not None:
                by_epoch.setdefault(int(math.ceil(step["epoch"])), []).append(step["loss"])
        means = [sum(v) / len(v) for _, v in sorted(by_epoch.items())]
        assert len(means) == 2 and means[1] < means[0], means
        # early stopping watched the held-out loss after each epoch (no groups here: all held-out rows)
        stopping = meta["training"]["early_stopping"]
        assert (stopping["patience"], stopping["watched"], stopping["epochs_run"]) == (1, "all held-out rows", 2)
        losses = stopping["loss_by_epoch"]
        assert stopping["best_epoch"] == losses.index(min(losses)) + 1
        assert meta["split"]["kind"] == "random" and meta["split"]["grouping"]["column"] is None
        adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert not Path(adapter_cfg["base_model_name_or_path"]).is_absolute()
        # handed to another trainer: a marked placeholder, what to put there, never adapter/ as output
        config_text = (out / "training_config.yaml").read_text()
        assert config_text.startswith("# This fine-tune's recipe under axolotl's key names")
        assert "# base_model: no Hugging Face id is known for the weights of tiny-llama." in config_text
        config = yaml.safe_load(config_text)
        assert (config["base_model"], config["output_dir"]) == (
            "REPLACE-ME/base-model-hf-id-or-weights-folder", "trainer-output")
        assert json.loads((out / "dataset_info.json").read_text())["fine_tuner_train"]["file_name"] == \
            "training_data.jsonl"
        parsed = modelset.parse_modelfile((out / "Modelfile").read_text())
        assert ("FROM", "tiny-llama") in parsed and ("ADAPTER", "./adapter") in parsed
        reg = meta["registration"]
        assert reg["registered"] is True and reg["name"] == meta["fine_tune"]["model_name"]
        creates = fake_ollama.requests_to("/api/create", "POST")
        assert creates[-1].body["from"] == "tiny-llama"
        expected = {name: "sha256:" + fsutil.sha256_file(out / "adapter" / name)
                    for name in ("adapter_config.json", "adapter_model.safetensors")}
        assert creates[-1].body["adapters"] == expected
        uploaded = {r.path.rsplit("/", 1)[1] for r in fake_ollama.requests if r.path.startswith("/api/blobs/")
                    and r.method == "POST"}
        assert set(expected.values()) <= uploaded

    def test_unencodable_text_in_a_dataframe_is_a_dataset_error(self, tmp_path):
        """A lone surrogate in an in-memory DataFrame gives DatasetEncodingError and no output folder."""
        from daemon import DatasetEncodingError

        df = frame(60)
        df.loc[3, "formatted_prompt"] = "cough \ud800 fever"
        with pytest.raises(DatasetEncodingError) as info:
            FineTuner(config=offline_config(tmp_path)).process_dataset(
                df, "llama3.2:1b", MAPPING, "flu", approach="model_set", output_dir=tmp_path / "o")
        assert "\ud800" not in str(info.value) and "cough" not in str(info.value)
        assert not (tmp_path / "o").exists()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []

    def test_auto_registration_does_not_retry_a_server_that_is_down(self, tmp_path):
        """register: auto with Ollama down records why at once: no retries, the job succeeds."""
        cfg = offline_config(tmp_path, ollama={"retries": 3, "backoff_s": 30.0, "backoff_max_s": 30.0})
        ok, meta = FineTuner(config=cfg).process_dataset(
            frame(60), "llama3.2:1b", MAPPING, "flu", approach="model_set", output_dir=tmp_path / "o")
        assert ok is True
        assert meta["registration"]["registered"] is False
        assert meta["registration"]["error"]["error_type"] == "OllamaUnavailableError"
        events = [json.loads(line)["event"] for line in (tmp_path / "fine_tuner.log").read_text().splitlines()]
        assert "ollama_retry" not in events
        assert "model_not_registered" in events

    def test_a_job_with_no_approach_builds_the_head_when_the_base_weights_are_here(self, tmp_path, tiny_model_dir):
        """approach auto (the default), the base weights on disk and the training extra installed: the
        job fits a head (no Ollama needed, nothing registered), evaluated beside the baseline."""
        cfg = offline_config(tmp_path, evaluation={"enabled": "required"})
        cfg["base_models"] = {"tiny-llama:latest": str(tiny_model_dir)}
        out = tmp_path / "out"
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("OMP_NUM_THREADS", "1")
            ok, meta = FineTuner(config=cfg).process_dataset(frame(80), "tiny-llama", MAPPING, "flu",
                                                             output_dir=out)
        assert (ok, meta["approach"]) == (True, "head")
        assert meta["approach_reason"].startswith("auto: the head")
        assert meta["parameters"]["approach"] == "auto" and meta["registration"]["registered"] is False
        assert (out / "head.json").is_file() and (out / "baseline.json").is_file()
        assert not (out / "adapter").exists() and not (out / "Modelfile").exists()
        assert {"new", "baseline"} <= {m["model"] for m in meta["evaluation"]["models"]}

    def test_a_failed_head_falls_back_to_a_model_set_outside_the_holdout(self, tmp_path, tiny_model_dir):
        """approach auto with fallback on: a head whose forward passes crash (unreadable weights) gives
        a model set, records the failure, and takes no few-shot example from the validation hold-out."""
        import shutil

        broken = tmp_path / "broken"
        shutil.copytree(tiny_model_dir, broken)
        (broken / "model.safetensors").write_bytes(b"not safetensors")
        cfg = offline_config(tmp_path, ollama={"register": "off"}, evaluation={"enabled": "off"})
        cfg["base_models"] = {"tiny-llama:latest": str(broken)}
        out = tmp_path / "out"
        with pytest.warns(UserWarning, match="the head failed; fell back to a model set"):
            ok, meta = FineTuner(config=cfg).process_dataset(frame(80), "tiny-llama", MAPPING, "flu",
                                                             output_dir=out)
        assert (ok, meta["approach"]) == (True, "model_set")
        assert meta["head_failure"]["error_type"] == "TrainingFailedError"
        assert "forward passes failed" in meta["head_failure"]["message"]
        events = [json.loads(line) for line in (tmp_path / "fine_tuner.log").read_text().splitlines()]
        assert [e["reason"] for e in events if e["event"] == "fallback_to_model_set"] == ["head_failed"]
        held_out = {json.loads(line)["messages"][1]["content"]
                    for line in (out / "validation_data.jsonl").read_text().splitlines()}
        config = json.loads((out / "model_set_config.json").read_text())
        assert len(held_out) == 8
        assert {e["input"] for e in config["few_shot_examples"]}.isdisjoint(held_out)
        assert not (out / "head.json").exists()

    def test_training_failure_falls_back_to_a_model_set(self, tmp_path, monkeypatch):
        """approach auto with weights still to be downloaded (no head without them): the fine-tune is
        chosen, and when the trainer fails (the Hub unreachable) fallback gives a model set with the
        failure recorded."""
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
        cfg = offline_config(tmp_path, training={"allow_download": True, "device": "cpu"},
                             ollama={"register": "off"}, evaluation={"enabled": "off"})
        cfg["base_models"] = {"tiny-llama:latest": "org/not-cached"}
        out = tmp_path / "out"
        with pytest.warns(UserWarning, match="fine-tuning failed"):
            ok, meta = FineTuner(config=cfg).process_dataset(frame(80), "tiny-llama", MAPPING, "flu",
                                                             output_dir=out)
        assert (ok, meta["approach"]) == (True, "model_set")
        assert meta["fine_tune_failure"]["exit_code"] == 5
        assert "could not be downloaded" in meta["fine_tune_failure"]["message"]
        assert (out / "model_set_config.json").is_file() and not (out / "adapter").exists()


class TestPlannedJobs:
    """plan_job / execute on files, as the daemon runs them; a queued plan may drop its rows."""

    def _plan(self, tmp_path: Path, name: str):
        from daemon.data.jobsettings import job_settings
        from daemon.fine_tuner import JobInputs
        from daemon.data.synthetic import write_csv

        csv_path = tmp_path / "visits.csv"
        if not csv_path.exists():
            write_csv(csv_path, 120)
            (tmp_path / "visits.mapping.json").write_text(json.dumps(MAPPING))
        tuner = FineTuner(config=offline_config(tmp_path, ollama={"register": "off"}))
        settings = job_settings(tuner.config.defaults, {"model": "llama2", "topics": "respiratory infections",
                                                        "approach": "model_set"}, source="test")
        return tuner, tuner.plan_job(JobInputs(
            csv_path=csv_path, mapping_path=tmp_path / "visits.mapping.json", settings=settings,
            output_dir=tmp_path / name, stem="visits", staged=True))

    def test_a_dropped_dataset_is_read_again_with_the_same_result(self, tmp_path):
        """A plan that dropped its dataset executes from the files and builds the same model set."""
        tuner, kept = self._plan(tmp_path, "kept")
        tuner, dropped = self._plan(tmp_path, "dropped")
        dropped.drop_dataset()
        assert dropped.ds is None
        _, meta_kept = tuner.execute(kept)
        ok, meta_dropped = tuner.execute(dropped)
        assert ok
        assert meta_dropped["rows"] == meta_kept["rows"] == {"read": 120, "used": 120,
                                                             "dropped": {"empty_prompt": 0, "empty_rating": 0}}
        assert "reload" in meta_dropped["stage_durations_s"] and "reload" not in meta_kept["stage_durations_s"]
        config_kept = json.loads((tmp_path / "kept" / "model_set_config.json").read_text())
        config_dropped = json.loads((tmp_path / "dropped" / "model_set_config.json").read_text())
        assert config_dropped["few_shot_examples"] == config_kept["few_shot_examples"]

    def test_a_file_changed_after_planning_fails_and_writes_nothing(self, tmp_path):
        """The files are checked against the planned hashes: an edited dataset is an error, no output."""
        from daemon.errors import DatasetError

        tuner, plan = self._plan(tmp_path, "out")
        plan.drop_dataset()
        with open(tmp_path / "visits.csv", "a", encoding="utf-8") as fh:
            fh.write("R9999999,another visit,Match,1,\n")
        with pytest.raises(DatasetError) as info:
            tuner.execute(plan)
        assert str(info.value).startswith("visits.csv: the dataset file changed after the job was planned")
        assert not (tmp_path / "out").exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["fine_tuner.log", "visits.csv", "visits.mapping.json"]


@pytest.mark.parametrize("setting, expanded", [("auto", True), ("on", True), ("off", False)])
def test_code_knowledge_explains_a_raw_exports_codes_unless_off(tmp_path, setting, expanded):
    """With ``code_knowledge: auto`` (or ``on``) a raw export's ICD-10-CM codes are explained in the
    prompts, for every approach alike; ``off`` leaves them as written."""
    from daemon.data.dataset import load_dataset
    from daemon.data.visits import MAPPING as VISIT_MAPPING, generate_visits, write_csv

    path = tmp_path / "visits.csv"
    write_csv(path, generate_visits(60, seed=5))
    ds = load_dataset(path, mapping=VISIT_MAPPING, code_knowledge=setting)
    assert (ds.code_knowledge["setting"], ds.code_knowledge["expanded"]) == (setting, expanded)
    assert any("Acute upper respiratory infections" in p for p in ds.frame["prompt"]) == expanded
