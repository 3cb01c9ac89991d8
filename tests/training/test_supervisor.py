"""Tests of LoRA fine-tuning: base-weight resolution, the trainer child and its supervision.

Real training on the tiny local Llama (``tests/tiny_model.py``), real child processes, real files.
One training run is shared by the tests that only inspect its outputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import structlog
import yaml

from daemon.serving.capability import CapabilityReport, weights_checks
from daemon.config import TrainingConfig, load_config
from daemon.errors import TrainingFailedError, TrainingInterruptedError
from daemon.data.prompts import answer_json, system_prompt
from daemon.data.synthetic import MAPPING, synthetic_rows
from daemon.data import turns
from daemon.training.supervisor import (
    BASE_MODEL_PLACEHOLDER,
    BUILTIN_BASE_MODELS,
    BaseWeights,
    group_members,
    resolve_base_weights,
    run_training,
    terminate_group,
    trainer_packages_available,
)
from tests.conftest import leftovers, wait_for
from tests.tiny_model import TINY_NAME

# one xdist worker runs the whole module (make test runs the suite on several), so that its
# module-scoped fixture is built once
pytestmark = pytest.mark.xdist_group("training")

MARKER = "ZQXPATIENTMARKER42"
SEQUENCE_LEN = 320
TRAIN_ROWS, OVERLONG_ROWS, VALIDATION_ROWS = 54, 2, 6
EPOCHS, MICRO_BATCH = 3, 4
STEPS = math.ceil(TRAIN_ROWS / MICRO_BATCH) * EPOCHS  # 14 per epoch
HOOK_ENV, HANG_ENV = "FT_TRAINER_TEST_HOOK", "FT_TRAINER_TEST_HANG_S"


def _record(system: str, prompt: str, rating: int, rationale: str) -> dict:
    return {"messages": [{"role": "system", "content": system},
                         {"role": "user", "content": prompt},
                         {"role": "assistant", "content": answer_json(rating, rationale)}]}


def write_job(job_dir: Path) -> Path:
    """A job folder as the core writes it: training_config.yaml, training and validation JSONL.
    Every row carries MARKER in its prompt; two training rows are too long for SEQUENCE_LEN."""
    job_dir.mkdir(parents=True, exist_ok=True)
    system = system_prompt("respiratory infections", MAPPING)
    rows = list(synthetic_rows(TRAIN_ROWS + VALIDATION_ROWS + OVERLONG_ROWS, seed=3))
    records = [_record(system, f"{MARKER} {r[1]}", int(r[3]), r[4]) for r in rows]
    for rec in records[:OVERLONG_ROWS]:
        rec["messages"][1]["content"] = " ".join([rec["messages"][1]["content"]] * 3)
    train = records[:TRAIN_ROWS + OVERLONG_ROWS]
    validation = records[TRAIN_ROWS + OVERLONG_ROWS:]
    (job_dir / "training_data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (job_dir / "validation_data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in validation))
    config = {
        "base_model": TINY_NAME, "adapter": "lora",
        "datasets": [{"path": "training_data.jsonl", "type": "chat_template"}],
        "test_datasets": [{"path": "validation_data.jsonl", "type": "chat_template"}],
        "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "sequence_len": SEQUENCE_LEN, "micro_batch_size": MICRO_BATCH, "gradient_accumulation_steps": 1,
        "num_epochs": EPOCHS, "learning_rate": 5e-3, "warmup_ratio": 0.1, "seed": 42, "output_dir": ".",
    }
    (job_dir / "training_config.yaml").write_text(yaml.safe_dump(config))
    return job_dir


def tiny_base(tiny_base_models) -> BaseWeights:
    return resolve_base_weights(TINY_NAME, tiny_base_models, env={})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_base_models):
    """One real training run: (job dir, result, relayed progress records, captured log lines)."""
    job = write_job(tmp_path_factory.mktemp("job") / "job-1")
    progress: list[dict] = []
    with structlog.testing.capture_logs() as logs:
        result = run_training(job, base=tiny_base(tiny_base_models), training=TrainingConfig(),
                              on_progress=progress.append)
    return job, result, progress, logs


def _run_in_thread(**kwargs) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["result"] = run_training(**kwargs)
        except BaseException as exc:  # handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="run-training")
    thread.start()
    return thread, outcome


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _started_pid(logs: list[dict]) -> int:
    return next(e["pid"] for e in logs if e["event"] == "training_started")


# --- a real run --------------------------------------------------------------------------------

class TestRealRun:
    def test_loss_goes_down_and_every_step_runs(self, trained):
        """A LoRA run over the tiny model takes every planned step and ends with a lower loss."""
        _job, result, _progress, _logs = trained
        m = result.metrics
        assert m["steps"] == STEPS
        assert m["total_steps"] == STEPS
        assert m["final_loss"] < m["first_loss"]
        assert m["eval_loss"] is not None and m["eval_loss"] > 0
        assert m["device"] == "cpu"
        assert m["rows_trained"] == TRAIN_ROWS
        assert m["rows_validation"] == VALIDATION_ROWS

    def test_overlong_rows_are_dropped_and_counted(self, trained):
        """Rows longer than sequence_len are dropped, counted in the metrics and warned about by count."""
        _job, result, _progress, _logs = trained
        assert result.metrics["rows_dropped_too_long"] == OVERLONG_ROWS
        stderr = Path(result.stderr_path).read_text()
        assert f"warning: {OVERLONG_ROWS} training and 0 validation rows are longer than " \
               f"sequence_len={SEQUENCE_LEN} tokens and were dropped (training rows [1, 2])" in stderr

    def test_adapter_folder_holds_the_two_files_ollama_reads(self, trained):
        """The adapter folder is complete, names the marked placeholder as base (local weights have no
        Hugging Face id; an Ollama name would not load elsewhere), and no temp folder is left."""
        job, result, _progress, _logs = trained
        adapter = Path(result.adapter_dir)
        assert adapter == job / "adapter"
        assert sorted(p.name for p in adapter.iterdir()) == ["adapter.gguf", "adapter_config.json",
                                                             "adapter_model.safetensors"]
        assert (adapter / "adapter.gguf").read_bytes()[:4] == b"GGUF"  # llama.cpp's converter wrote it
        assert result.metrics["gguf_adapter"]["written"] is True
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == BASE_MODEL_PLACEHOLDER
        assert config["r"] == 8
        assert config["lora_alpha"] == 16
        assert str(job.parent) not in (adapter / "adapter_config.json").read_text()
        assert leftovers(job) == []

    def test_progress_lines_are_relayed_in_order(self, trained):
        """Each training_log.jsonl line reaches on_progress once, in order, with the documented keys."""
        job, result, progress, _logs = trained
        lines = [json.loads(line) for line in Path(result.log_path).read_text().splitlines()]
        assert progress == lines
        assert [p["step"] for p in progress] == list(range(1, STEPS + 1))
        assert set(progress[0]) == {"step", "total_steps", "epoch", "loss", "eval_loss", "learning_rate",
                                    "tokens_per_s", "elapsed_s", "eta_s", "percent"}
        assert progress[-1]["percent"] == 100.0
        assert progress[-1]["eta_s"] == 0.0
        assert progress[0]["eval_loss"] is None
        per_epoch = STEPS // EPOCHS
        assert [p["epoch"] for p in progress if p["step"] % per_epoch == 0] == [1.0, 2.0, 3.0]
        assert progress[per_epoch - 1]["eval_loss"] is not None
        assert progress[-1]["eval_loss"] == round(result.metrics["eval_loss"], 6)

    def test_loss_metrics_summarise_the_logged_steps(self, trained):
        """first_loss is step 1's loss, final_loss the last epoch's mean, train_loss the mean of all steps."""
        _job, result, progress, _logs = trained
        m = result.metrics
        per_epoch = STEPS // EPOCHS
        losses = [p["loss"] for p in progress]  # logging_steps=1: one step's loss per line
        assert m["first_loss"] == pytest.approx(losses[0], abs=1e-6)
        assert m["final_loss"] == pytest.approx(sum(losses[-per_epoch:]) / per_epoch, abs=1e-6)
        assert m["train_loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-6)

    def test_metrics_are_written_next_to_the_adapter(self, trained):
        """training_result.json holds the metrics run_training returns."""
        job, result, _progress, _logs = trained
        assert json.loads((job / "training_result.json").read_text()) == result.metrics

    def test_no_cell_text_in_logs_or_trainer_output(self, trained):
        """The planted marker from the training rows appears in no log line, stderr or progress file."""
        job, result, _progress, logs = trained
        assert [e["event"] for e in logs] == ["training_started", "training_finished"]
        assert MARKER not in json.dumps(logs, default=str)
        for name in ("trainer_stderr.log", "training_log.jsonl", "training_result.json"):
            assert MARKER not in (job / name).read_text(), name

    def test_the_run_spec_is_gone_and_the_stderr_log_names_no_machine_path(self, trained, tiny_model_dir):
        """The spec (this machine's paths) lived only as long as the child; the stderr log of the
        good run is scrubbed of the job folder, the weights folder and the Python environment."""
        job, _result, _progress, _logs = trained
        assert not (job / "run_spec.json").exists()
        stderr = (job / "trainer_stderr.log").read_text()
        assert "trainer: done" in stderr
        for folder in (job, tiny_model_dir, sys.prefix):
            assert str(folder) not in stderr

    def test_adapter_reloads_with_peft_and_generates(self, trained, tiny_model_dir):
        """The saved adapter loads onto the base with peft, has trained weights and generates tokens."""
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _job, result, _progress, _logs = trained
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        model = PeftModel.from_pretrained(base, result.adapter_dir)
        lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
        assert len(lora_b) == 2 * 4  # 2 layers x q, k, v, o
        assert all(float(p.abs().sum()) > 0 for p in lora_b)  # lora_B starts at zero
        messages = [{"role": "system", "content": "Rate the visit."},
                    {"role": "user", "content": "Visit: 40M, chief complaint: cough."}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert out.shape == (1, inputs["input_ids"].shape[1] + 6)


# --- the answer mask ---------------------------------------------------------------------------

def test_labels_cover_only_the_answer_and_end_token(tiny_model_dir):
    """Decoded label tokens are exactly the assistant answer plus <|eot_id|>; the prompt is masked."""
    from transformers import AutoTokenizer

    from daemon.training.trainer import encode_example

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    answer = answer_json(1, "Chief complaint and diagnosis indicate a respiratory infection.")
    messages = [{"role": "system", "content": "Rate the visit."},
                {"role": "user", "content": "Visit: 40M, chief complaint: cough for 2 days."},
                {"role": "assistant", "content": answer}]
    ids, labels = encode_example(tokenizer, messages)
    prompt = tokenizer.apply_chat_template(messages[:2], add_generation_prompt=True, tokenize=False)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert len(labels) == len(ids)
    assert labels[:n_prompt] == [-100] * n_prompt
    assert tokenizer.decode([t for t in labels if t != -100]) == answer + "<|eot_id|>"
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False)


# --- failures and supervision ------------------------------------------------------------------

def test_crashing_child_raises_with_exit_code_and_stderr(tmp_path, tiny_model_dir):
    """Corrupt base weights make the child exit 1; the error names the kept stderr log."""
    weights = tmp_path / "corrupt"
    shutil.copytree(tiny_model_dir, weights)
    (weights / "model.safetensors").write_bytes(b"\x00not a safetensors file" * 64)
    base = resolve_base_weights(TINY_NAME, {TINY_NAME: str(weights)}, env={})
    assert base.problem is None  # the files look right; only loading them fails
    job = write_job(tmp_path / "job")
    with structlog.testing.capture_logs() as logs, pytest.raises(TrainingFailedError) as info:
        run_training(job, base=base, training=TrainingConfig())
    err = info.value
    assert err.exit_code == 1
    assert err.timed_out is False
    assert err.stderr_path == str(job / "trainer_stderr.log")
    assert "Traceback" in Path(err.stderr_path).read_text()
    assert str(err).startswith(f"the trainer failed (exit code 1); see {job / 'trainer_stderr.log'}")
    assert MARKER not in str(err) + json.dumps(err.to_dict()) + json.dumps(logs, default=str)
    assert [e["event"] for e in logs] == ["training_started", "training_failed"]
    assert not (job / "adapter").exists()
    assert leftovers(job) == []


def test_hanging_child_is_stopped_at_the_timeout(tmp_path, tiny_base_models, monkeypatch):
    """A child that hangs past timeout_s is terminated and reported as timed out."""
    monkeypatch.setenv(HOOK_ENV, "hang")
    job = write_job(tmp_path / "job")
    with structlog.testing.capture_logs() as logs, pytest.raises(TrainingFailedError) as info:
        run_training(job, base=tiny_base(tiny_base_models), training=TrainingConfig(), timeout_s=1.0)
    assert info.value.timed_out is True
    assert info.value.exit_code == -signal.SIGTERM
    assert info.value.stderr_path == str(job / "trainer_stderr.log")
    assert _pid_gone(_started_pid(logs))
    assert [e["event"] for e in logs] == ["training_started", "training_timed_out"]


def test_child_ignoring_sigterm_is_killed_after_grace(tmp_path, tiny_base_models, monkeypatch):
    """A child that ignores SIGTERM gets SIGKILL once grace_s has passed."""
    monkeypatch.setenv(HOOK_ENV, "hang-ignore-sigterm")
    job = write_job(tmp_path / "job")
    training = dataclasses.replace(TrainingConfig(), grace_s=0.5)
    with structlog.testing.capture_logs() as logs, pytest.raises(TrainingFailedError) as info:
        run_training(job, base=tiny_base(tiny_base_models), training=training, timeout_s=3.0)
    assert "test hook hang-ignore-sigterm: sleeping" in (job / "trainer_stderr.log").read_text()
    assert info.value.timed_out is True
    assert info.value.exit_code == -signal.SIGKILL
    assert _pid_gone(_started_pid(logs))


def test_stop_event_interrupts_training_and_ends_the_child(tmp_path, tiny_base_models, monkeypatch):
    """Setting stop_event ends the child and raises TrainingInterruptedError."""
    monkeypatch.setenv(HOOK_ENV, "hang")
    job = write_job(tmp_path / "job")
    stop = threading.Event()
    with structlog.testing.capture_logs() as logs:
        thread, outcome = _run_in_thread(job_dir=job, base=tiny_base(tiny_base_models),
                                         training=TrainingConfig(), stop_event=stop)
        stderr = job / "trainer_stderr.log"
        wait_for(lambda: stderr.exists() and "sleeping" in stderr.read_text(), timeout=30,
                 message="the child to reach the hang hook")
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert isinstance(outcome.get("error"), TrainingInterruptedError)
    assert _pid_gone(_started_pid(logs))
    assert [e["event"] for e in logs] == ["training_started", "training_interrupted"]


def test_unusable_base_fails_before_spawning(tmp_path):
    """A base with a problem raises TrainingFailedError at once, without writing a run spec."""
    job = write_job(tmp_path / "job")
    base = resolve_base_weights("no-such-model:7b", {}, env={})
    with pytest.raises(TrainingFailedError) as info:
        run_training(job, base=base, training=TrainingConfig())
    assert info.value.exit_code is None
    assert "no weights are known for 'no-such-model:7b'" in str(info.value)
    assert not (job / "run_spec.json").exists()


def test_unreachable_hub_fails_at_once_naming_the_weights_and_what_to_do(tmp_path, monkeypatch):
    """With downloads allowed and the Hub unreachable, the child exits 5 with one line and the error says why."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    base = resolve_base_weights("x:1b", {"x:1b": "org/not-cached"}, allow_download=True)
    assert (base.hf_id, base.local_dir, base.problem) == ("org/not-cached", None, None)
    job = write_job(tmp_path / "job")
    with structlog.testing.capture_logs() as logs, pytest.raises(TrainingFailedError) as info:
        run_training(job, base=base, training=TrainingConfig())
    err, stderr_path = info.value, job / "trainer_stderr.log"
    cause = ("the Hugging Face Hub at http://127.0.0.1:9 could not be reached "
             "(ConnectError: [Errno 111] Connection refused)")
    assert err.exit_code == 5
    assert stderr_path.read_text() == f"trainer: the weights of org/not-cached could not be downloaded: {cause}\n"
    assert err.message == f"the weights of org/not-cached could not be downloaded: {cause}; see {stderr_path}"
    assert err.hint == ("check the network, HF_ENDPOINT and the Hugging Face token (HF_TOKEN), or download the "
                        "weights first with `hf download org/not-cached --local-dir <folder>` and set "
                        "base_models: x:1b: <folder> in the config")
    assert [(e["event"], e.get("reason")) for e in logs] == [("training_started", None),
                                                             ("training_failed", "weights_not_downloaded")]
    assert not (job / "adapter").exists()


def test_parent_module_imports_no_ml_library():
    """Importing the parent side (training, capability) loads neither torch, transformers nor peft."""
    code = ("import sys, daemon.training.supervisor, daemon.serving.capability\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"


def test_trainer_packages_are_found():
    """With the train extra installed, the package check finds every trainer package."""
    assert trainer_packages_available() is True


# --- base weights ------------------------------------------------------------------------------

def _fake_weights(folder: Path, model_type: str = "llama", template: bool = True) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    tok = {"chat_template": "{{ messages }}"} if template else {}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    return folder


def _hf_cache(root: Path, hf_id: str, revision: str = "0123abcd") -> Path:
    repo = root / ("models--" + hf_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return _fake_weights(repo / "snapshots" / revision)


class TestResolveBaseWeights:
    def test_configured_directory(self, tiny_model_dir):
        """A configured local folder is used as is; with no built-in Hugging Face id for it, hf_id is
        None (the files handed on name the placeholder, never the path or the Ollama name)."""
        base = resolve_base_weights("tiny-llama", {TINY_NAME: str(tiny_model_dir)}, env={})
        assert base == BaseWeights("tiny-llama", str(tiny_model_dir), None, str(tiny_model_dir.resolve()),
                                   "llama", True, None, template="the weights' own chat template (tokenizer files)")

    def test_builtin_name_found_in_hf_cache(self, tmp_path):
        """A built-in name resolves to its HF id and the snapshot refs/main points at."""
        snapshot = _hf_cache(tmp_path / "hub", "meta-llama/Llama-3.2-1B-Instruct")
        base = resolve_base_weights("llama3.2:1b", {}, env={"HF_HUB_CACHE": str(tmp_path / "hub")})
        assert base == BaseWeights("llama3.2:1b", "meta-llama/Llama-3.2-1B-Instruct",
                                   "meta-llama/Llama-3.2-1B-Instruct", str(snapshot), "llama", True, None,
                                   source="huggingface id", template="the weights' own chat template (tokenizer files)")

    def test_hf_home_and_untagged_name(self, tmp_path):
        """HF_HOME/hub is searched, and a name without a tag means :latest."""
        snapshot = _hf_cache(tmp_path / "home" / "hub", "mistralai/Mistral-7B-Instruct-v0.3")
        base = resolve_base_weights("mistral", {}, env={"HF_HOME": str(tmp_path / "home")})
        assert base.hf_id == "mistralai/Mistral-7B-Instruct-v0.3"
        assert base.local_dir == str(snapshot)
        assert base.problem is None

    def test_configured_hf_id_overrides_builtin(self, tmp_path):
        """A base_models entry with an HF id wins over the built-in table."""
        snapshot = _hf_cache(tmp_path / "hub", "org/my-llama")
        base = resolve_base_weights("llama3.2:1b", {"llama3.2:1b": "org/my-llama"},
                                    env={"HF_HUB_CACHE": str(tmp_path / "hub")})
        assert (base.ref, base.hf_id, base.local_dir) == ("org/my-llama", "org/my-llama", str(snapshot))

    def test_not_cached_and_downloads_off(self, tmp_path):
        """Weights missing from the cache are a problem that says how to get them."""
        base = resolve_base_weights("llama3.2:1b", {}, env={"HF_HUB_CACHE": str(tmp_path)})
        assert base.local_dir is None
        assert base.problem == (
            f"weights for meta-llama/Llama-3.2-1B-Instruct are not in the local Hugging Face cache "
            f"({tmp_path}) and training.allow_download is off: run `hf download "
            f"meta-llama/Llama-3.2-1B-Instruct`, or set base_models: llama3.2:1b: <local weights dir or .gguf file>")

    def test_download_allowed_unless_offline(self, tmp_path):
        """allow_download leaves the download to the child, except when HF_HUB_OFFLINE is set."""
        env = {"HF_HUB_CACHE": str(tmp_path)}
        online = resolve_base_weights("gemma2:2b", {}, allow_download=True, env=env)
        offline = resolve_base_weights("gemma2:2b", {}, allow_download=True, env={**env, "HF_HUB_OFFLINE": "1"})
        assert (online.hf_id, online.local_dir, online.problem) == ("google/gemma-2-2b-it", None, None)
        assert offline.problem == (
            f"weights for google/gemma-2-2b-it are not in the local Hugging Face cache ({tmp_path}) and "
            "HF_HUB_OFFLINE is set: run `hf download google/gemma-2-2b-it`, or set base_models: "
            "gemma2:2b: <local weights dir or .gguf file>")

    def test_unknown_name(self, tmp_path):
        """A name neither configured, nor in Ollama's models folder, nor built in says what to set."""
        base = resolve_base_weights("phi3", {}, env={}, ollama_models_dir=str(tmp_path))
        assert base.problem == (
            "no weights are known for 'phi3': Ollama's GGUF was not found in its models folder (set "
            "ollama.models_dir or OLLAMA_MODELS where it is readable), and no base_models: entry names it "
            "(phi3:latest: <.gguf file, weights dir or HF repo id>)")

    def test_missing_directory_and_unknown_turn_format(self, tmp_path):
        """A configured folder that is absent is a problem; a qwen2 folder is usable (its adapter is
        registered as GGUF); a llama base without a template whose vocabulary has no Llama 3 header
        tokens (Llama 2, Mistral) is refused rather than trained on a guessed format."""
        absent = resolve_base_weights("x:1b", {"x:1b": str(tmp_path / "nope")}, env={})
        qwen = resolve_base_weights("x:1b", {"x:1b": str(_fake_weights(tmp_path / "qwen", "qwen2"))}, env={})
        plain = resolve_base_weights("x:1b", {"x:1b": str(_fake_weights(tmp_path / "base", template=False))},
                                     env={})
        assert absent.problem == f"the weights directory configured for 'x:1b' does not exist: {tmp_path / 'nope'}"
        assert (qwen.problem, qwen.model_type) == (None, "qwen2")
        known = ", ".join(turns.known_architectures())
        assert plain.problem == (f"{tmp_path / 'base'} has no chat template in its tokenizer files and no "
                                 f"known turn format for 'llama' models ({known}): use the instruct/chat "
                                 "variant of the weights")

    def test_llama3_base_without_a_template_gets_llama3s_turn_format(self, tmp_path):
        """A Llama 3 base folder (header tokens in its vocabulary, no template) is trained with Llama 3's
        own turn format, and says so."""
        folder = _fake_weights(tmp_path / "l3", template=False)
        (folder / "tokenizer.json").write_text(json.dumps({"added_tokens": [
            {"content": t} for t in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")]}))
        base = resolve_base_weights("x:1b", {"x:1b": str(folder)}, env={})
        assert (base.problem, base.chat_template, base.template) == (
            None, turns.LLAMA3.jinja, f"{turns.LLAMA3.source}: the tokenizer has no chat template")

    def test_builtin_table_names(self):
        """The built-in table maps the common Ollama library names to instruct HF repos."""
        assert BUILTIN_BASE_MODELS["llama3.2:1b"] == "meta-llama/Llama-3.2-1B-Instruct"
        assert BUILTIN_BASE_MODELS["mistral:latest"] == "mistralai/Mistral-7B-Instruct-v0.3"
        assert BUILTIN_BASE_MODELS["gemma2:2b"] == "google/gemma-2-2b-it"
        assert all(":" in name for name in BUILTIN_BASE_MODELS)


# --- capability checks -------------------------------------------------------------------------


class TestWeightsChecks:
    def test_tiny_model_passes(self, tiny_base_models, tiny_model_dir, tmp_path, monkeypatch):
        """Local llama weights with a chat template pass all three checks and fill the facts (with
        the llama-server that `serve` would run)."""
        server = tmp_path / "llama-server"
        server.write_text("#!/bin/sh\n")
        server.chmod(0o755)
        monkeypatch.setenv("FINE_TUNER_LLAMA_SERVER", str(server))
        cfg = load_config(env={}, overrides={"base_models": tiny_base_models})
        report = CapabilityReport(model=TINY_NAME)
        weights_checks(report, cfg, "llama")
        assert [(c.name, c.ok) for c in report.checks] == [
            ("base_weights", True), ("weights_architecture", True), ("chat_template", True)]
        assert report.facts == {"weights_dir": str(tiny_model_dir.resolve()), "model_type": "llama",
                                "hf_id": None, "weights_source": "huggingface folder",
                                "weights_quantization": None, "weights_architecture": "llama",
                                "template": "the weights' own chat template (tokenizer files)",
                                "gguf_file": None, "gguf_sha256": None, "weights_found_by": None,
                                "adapter_format": "safetensors", "llama_server": str(server)}
        assert report.supported is True

    def test_architecture_must_match_ollama(self, tiny_base_models):
        """Weights whose architecture differs from the Ollama model's fail weights_architecture."""
        cfg = load_config(env={}, overrides={"base_models": tiny_base_models})
        report = CapabilityReport(model=TINY_NAME)
        weights_checks(report, cfg, "gemma2")
        check = next(c for c in report.checks if c.name == "weights_architecture")
        assert check.ok is False
        assert check.detail == ("the weights are 'llama' (llama in Ollama) but the Ollama model "
                                f"{TINY_NAME} is 'gemma2': configure the weights of the same base model")

    def test_weights_to_download_are_said_to_be_missing(self, tmp_path, monkeypatch):
        """With allow_download on and nothing on disk, base_weights passes but says the weights must be downloaded."""
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
        cfg = load_config(env={}, overrides={"training": {"allow_download": True}})
        report = CapabilityReport(model="llama3.2:1b")
        weights_checks(report, cfg, None)
        assert [(c.name, c.ok, c.required) for c in report.checks] == [
            ("base_weights", True, True), ("weights_architecture", False, False), ("chat_template", False, False)]
        assert report.checks[0].detail == (
            f"the weights of meta-llama/Llama-3.2-1B-Instruct are not on disk (not in the Hugging Face cache "
            f"{tmp_path}) and will have to be downloaded from http://127.0.0.1:9 when training starts "
            "(training.allow_download is on; a gated model needs a token in HF_TOKEN): to have them on "
            "disk beforehand, run `hf download meta-llama/Llama-3.2-1B-Instruct`")
        assert report.supported is True

    def test_unknown_model_says_what_to_configure(self):
        """A model without known weights fails base_weights with the base_models entry to add."""
        cfg = load_config(env={})
        report = CapabilityReport(model="phi3:mini")
        weights_checks(report, cfg, None)
        assert [(c.name, c.ok, c.required) for c in report.checks] == [
            ("base_weights", False, True), ("weights_architecture", False, True), ("chat_template", False, True)]
        assert report.checks[0].detail == ("no Hugging Face weights are known for phi3:mini: add "
                                           "`phi3:mini: <weights dir or HF repo id>` under base_models: in the config")


def test_malformed_training_data_exits_3_without_cell_text(tmp_path, tiny_base_models):
    """A JSONL line that is not a chat record makes the child exit 3, naming the line, not its text."""
    job = write_job(tmp_path / "job")
    with open(job / "training_data.jsonl", "a") as fh:
        fh.write(json.dumps({"text": f"{MARKER} free text"}) + "\n")
    with pytest.raises(TrainingFailedError) as info:
        run_training(job, base=tiny_base(tiny_base_models), training=TrainingConfig())
    assert info.value.exit_code == 3
    stderr = (job / "trainer_stderr.log").read_text()
    assert stderr == (f'trainer: training_data.jsonl line {TRAIN_ROWS + OVERLONG_ROWS + 1} is not a '
                      '{"messages": [...]} record\n')
    assert MARKER not in stderr + str(info.value)


def test_template_without_system_role_gets_it_merged(tiny_model_dir):
    """A chat template that refuses the system role (as Gemma's does) trains with it merged into the
    user turn; the labels are still exactly the answer and the end token."""
    from transformers import AutoTokenizer

    from daemon.training.trainer import encode_example

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
    answer = answer_json(0, "No respiratory signs.")
    ids, labels = encode_example(tokenizer, [{"role": "system", "content": "Rate it."},
                                             {"role": "user", "content": "Visit: ankle sprain."},
                                             {"role": "assistant", "content": answer}])
    assert tokenizer.decode(ids) == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
                                     "Rate it.\n\nVisit: ankle sprain.<|eot_id|>"
                                     "<|start_header_id|>assistant<|end_header_id|>\n\n"
                                     f"{answer}<|eot_id|>")
    assert tokenizer.decode([t for t in labels if t != -100]) == answer + "<|eot_id|>"


def test_child_env_puts_the_folder_holding_the_package_first():
    """The trainer child imports ``daemon`` from this checkout even when the package is not installed."""
    from daemon.training.supervisor import child_env

    first = child_env()["PYTHONPATH"].split(os.pathsep)[0]
    assert (Path(first) / "daemon" / "__init__.py").is_file()


def test_a_stopped_group_is_gone_when_terminate_group_returns(tmp_path):
    """A worker left behind by the trainer child (accelerate's, a data loader's) with a gigabyte of
    memory takes a moment to tear down after SIGKILL; terminate_group returns only once it has, so
    the next job gets the memory and no process of the group outlives the job."""
    ready = tmp_path / "ready"
    worker = "import sys, time; b = b'x' * (1 << 30); open(sys.argv[1], 'w').close(); time.sleep(300)"
    leader = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]]); "
              "time.sleep(300)")
    proc = subprocess.Popen([sys.executable, "-c", leader, worker, str(ready)], start_new_session=True)
    try:
        wait_for(ready.exists, timeout=60, message="the worker to hold its memory")
        assert len(group_members(proc.pid)) == 2  # the leader and its worker, seen running
        terminate_group(proc, grace_s=5)
        assert group_members(proc.pid) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
