"""Tests for daemon/data/trainingdata.py: chat records, JSONL text, the hold-out split, the training config."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from daemon import fsutil
from daemon.data import prompts
from daemon.config import TrainingConfig, load_config
from daemon.errors import ConfigError
from daemon.data.dataset import load_dataset, validate_frame
from daemon.data.trainingdata import (
    CHUNK_ROWS,
    chat_record,
    chat_records,
    jsonl_chunks,
    split_holdout,
    training_config,
)
from daemon.data.synthetic import MAPPING
from tests.conftest import leftovers

SYSTEM = prompts.system_prompt("respiratory infections", MAPPING)
TRICKY = ['quote " and \\ backslash', "new\nline\ttab\r", "unicode é 中文 😀", "line sep \u2028 \u2029",
          "control \x01\x1f", '"""triple"""', "{\"rating\": 9}"]


def frame_dataset(n: int, ratings=None, prompt=lambda i: f"visit {i}", rationale=lambda i: f"why {i}"):
    ratings = ratings if ratings is not None else [(1, 0, -1)[i % 3] for i in range(n)]
    df = pd.DataFrame({"formatted_prompt": [prompt(i) for i in range(n)],
                       "Standardized_Rating": ratings,
                       "Rationale of Rating": [rationale(i) for i in range(n)]})
    return validate_frame(df, MAPPING)


def test_chat_record_shape():
    """A chat record is system, user, assistant with the JSON answer as the assistant turn."""
    assert chat_record("SYS", "a visit", 1, "cough") == {"messages": [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "a visit"},
        {"role": "assistant", "content": '{"rationale": "cough", "rating": 1}'},
    ]}
    assert chat_record("SYS", "v", -1, None)["messages"][2]["content"] == '{"rationale": "", "rating": -1}'


def test_chat_records_one_per_row_in_order():
    """chat_records gives one record per usable row, in frame order."""
    ds = frame_dataset(4)
    records = chat_records(ds, SYSTEM)
    assert records == [chat_record(SYSTEM, f"visit {i}", (1, 0, -1)[i % 3], f"why {i}") for i in range(4)]


@pytest.mark.parametrize("shared_rationales", [True, False])
def test_jsonl_lines_equal_json_dumps_of_records_even_for_tricky_text(shared_rationales):
    """Every JSONL line equals json.dumps(chat_record(...), ensure_ascii=False), shared rationales or not."""
    n = CHUNK_ROWS + 7
    ds = frame_dataset(n, prompt=lambda i: f"{TRICKY[i % len(TRICKY)]} #{i}",
                       rationale=(lambda i: TRICKY[(i + 3) % len(TRICKY)]) if shared_rationales
                       else (lambda i: f"{TRICKY[(i + 3) % len(TRICKY)]} {i}"))
    positions = np.arange(n)
    chunks = list(jsonl_chunks(ds, positions, SYSTEM))
    assert len(chunks) == 2
    assert all(chunk.endswith("}]}\n") for chunk in chunks)
    lines = "".join(chunks).split("\n")
    assert lines[-1] == ""
    expected = [json.dumps(r, ensure_ascii=False) for r in chat_records(ds, SYSTEM)]
    assert lines[:-1] == expected
    assert [json.loads(line) for line in lines[:3]] == chat_records(ds, SYSTEM)[:3]


def test_jsonl_chunks_follow_positions():
    """Only the rows at the given positions are written, in the given order; none gives nothing."""
    ds = frame_dataset(10)
    text = "".join(jsonl_chunks(ds, [7, 2], SYSTEM))
    users = [json.loads(line)["messages"][1]["content"] for line in text.splitlines()]
    assert users == ["visit 7", "visit 2"]
    assert list(jsonl_chunks(ds, np.empty(0, dtype=np.int64), SYSTEM)) == []


def test_jsonl_written_with_fsutil_from_a_csv(synthetic_csv, tmp_path):
    """A CSV becomes training_data.jsonl lines whose answers parse back to each row's rating."""
    ds = load_dataset(synthetic_csv(rows=60), mapping=MAPPING)
    train, validation = split_holdout(ds)
    out = tmp_path / "out"
    out.mkdir()
    fsutil.write_lines(out / "training_data.jsonl", jsonl_chunks(ds, train, SYSTEM))
    lines = (out / "training_data.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(train)
    answers = [prompts.parse_answer(json.loads(line)["messages"][2]["content"], [-1, 0, 1]) for line in lines]
    assert [a["rating"] for a in answers] == ds.frame["rating"].to_numpy()[train].tolist()
    assert leftovers(tmp_path) == []


def test_split_is_stratified_and_seeded():
    """10% per rating goes to validation, disjoint from training, identical for the same seed."""
    ratings = [1] * 50 + [0] * 30 + [-1] * 20
    ds = frame_dataset(100, ratings=ratings)
    train, validation = split_holdout(ds, fraction=0.1, seed=42)
    per_rating = pd.Series(ds.frame["rating"].to_numpy()[validation]).value_counts().to_dict()
    assert per_rating == {1: 5, 0: 3, -1: 2}
    assert sorted(np.concatenate([train, validation]).tolist()) == list(range(100))
    assert train.tolist() == sorted(train.tolist())
    assert validation.tolist() == sorted(validation.tolist())
    again_train, again_validation = split_holdout(ds, fraction=0.1, seed=42)
    assert again_validation.tolist() == validation.tolist()
    assert again_train.tolist() == train.tolist()
    other = split_holdout(ds, fraction=0.1, seed=7)[1]
    assert other.tolist() != validation.tolist()


def test_split_keeps_one_row_per_small_rating_and_never_a_lone_row():
    """A rating with 2-9 rows still gets one validation row; a rating with a single row gets none."""
    ratings = [1] * 55 + [0] * 3 + [-1]
    ds = frame_dataset(59, ratings=ratings)
    _, validation = split_holdout(ds, fraction=0.1, seed=1)
    per_rating = pd.Series(ds.frame["rating"].to_numpy()[validation]).value_counts().to_dict()
    assert per_rating == {1: 6, 0: 1}


def test_split_is_empty_below_min_rows():
    """Below min_rows every row trains and validation is empty."""
    ds = frame_dataset(49)
    train, validation = split_holdout(ds, min_rows=50)
    assert train.tolist() == list(range(49))
    assert validation.tolist() == []
    assert validation.dtype == np.int64


def test_training_config_uses_axolotl_keys():
    """training_config returns axolotl key names and values, and survives YAML round trip."""
    cfg = training_config(base_model="Qwen/Qwen2.5-0.5B", dataset_path="training_data.jsonl",
                          validation_path="validation_data.jsonl", output_dir="adapter",
                          training=TrainingConfig(), epochs=5, learning_rate=0.001, micro_batch_size=4, seed=42)
    entry = {"path": "training_data.jsonl", "ds_type": "json", "type": "chat_template",
             "field_messages": "messages", "message_property_mappings": {"role": "role", "content": "content"}}
    assert cfg == {
        "base_model": "Qwen/Qwen2.5-0.5B",
        "datasets": [entry],
        "test_datasets": [dict(entry, path="validation_data.jsonl", split="train")],
        "adapter": "lora", "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
        "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "sequence_len": 2048,
        "micro_batch_size": 4, "gradient_accumulation_steps": 1, "num_epochs": 5, "learning_rate": 0.001,
        "warmup_ratio": 0.03, "lr_scheduler": "linear", "optimizer": "adamw_torch", "weight_decay": 0.0,
        "logging_steps": 1, "seed": 42, "bf16": "auto", "fp16": False, "tf32": False,
        "lora_mlp_kernel": False, "lora_qkv_kernel": False,
        "lora_o_kernel": False, "output_dir": "adapter", "eval_strategy": "epoch",
    }
    assert yaml.safe_load(yaml.safe_dump(cfg, sort_keys=False)) == cfg


def test_extra_axolotl_keys_come_last_and_own_keys_are_refused():
    """training.axolotl's keys (DeepSpeed, FSDP, ...) are written as given, after the recipe; a key
    fine-tuner writes itself is a configuration error naming it."""
    extra = {"deepspeed": "zero2.json", "gradient_checkpointing": True, "fsdp_config": {"fsdp_version": 2}}
    cfg = training_config(base_model="m", dataset_path="t.jsonl", validation_path=None, output_dir="o",
                          training=TrainingConfig(axolotl=extra), epochs=1, learning_rate=1e-4,
                          micro_batch_size=2, seed=3)
    assert list(cfg)[-3:] == list(extra) and {k: cfg[k] for k in extra} == extra
    with pytest.raises(ConfigError) as info:
        load_config(overrides={"training": {"axolotl": {"learning_rate": 1.0, "deepspeed": "z.json"}}}, env={})
    assert info.value.problems == ["training.axolotl: learning_rate is written by fine-tuner itself: set it "
                                   "through its own setting (training.*, defaults.*) or in a job file"]
    with pytest.raises(ConfigError, match="training.axolotl: expected a mapping"):
        load_config(overrides={"training": {"axolotl": ["deepspeed"]}}, env={})
    with pytest.raises(ConfigError, match="training.backend: must be one of local, axolotl"):
        load_config(overrides={"training": {"backend": "torchtune"}}, env={})


def test_training_config_without_validation_has_no_test_datasets():
    """With no validation file, test_datasets is left out."""
    cfg = training_config(base_model="m", dataset_path="t.jsonl", validation_path=None, output_dir="o",
                          training=TrainingConfig(lora_r=8), epochs=1, learning_rate=1e-4, micro_batch_size=2,
                          seed=3)
    assert "test_datasets" not in cfg and "eval_strategy" not in cfg  # nothing to evaluate on
    assert (cfg["lora_r"], cfg["num_epochs"], cfg["micro_batch_size"], cfg["seed"]) == (8, 1, 2, 3)


def test_dataset_info_describes_both_files_for_llama_factory():
    """dataset_info.json gives LLaMA-Factory an OpenAI-style (sharegpt) entry per file, with its
    documented role/content tags; without a hold-out only the training file is listed."""
    from daemon.data.trainingdata import dataset_info

    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
            "system_tag": "system"}
    info = dataset_info("training_data.jsonl", "validation_data.jsonl")
    assert info == {
        "fine_tuner_train": {"file_name": "training_data.jsonl", "formatting": "sharegpt",
                             "columns": {"messages": "messages"}, "tags": tags},
        "fine_tuner_validation": {"file_name": "validation_data.jsonl", "formatting": "sharegpt",
                                  "columns": {"messages": "messages"}, "tags": tags}}
    assert list(dataset_info("training_data.jsonl", None)) == ["fine_tuner_train"]


def test_both_answer_forms_give_each_row_a_rating_only_line_after_its_reasoned_one():
    """``direct=True``: each row's line is followed by the same prompt with ``{"rating": N}`` as the
    answer, byte for byte ``json.dumps`` of the chat record, so the model learns the rating as a
    decision of its own as well as after its reason."""
    from daemon.data.prompts import direct_answer_json

    ds = frame_dataset(9)
    positions = [0, 2, 3, 5, 6, 7, 8]
    lines = "".join(jsonl_chunks(ds, positions, "SYS", direct=True)).splitlines()
    plain = "".join(jsonl_chunks(ds, positions, "SYS")).splitlines()
    assert lines[0::2] == plain
    frame = ds.frame
    assert lines[1::2] == [json.dumps({"messages": [
        {"role": "system", "content": "SYS"}, {"role": "user", "content": frame["prompt"].iloc[i]},
        {"role": "assistant", "content": direct_answer_json(int(frame["rating"].iloc[i]))}]}, ensure_ascii=False)
        for i in positions]
    assert direct_answer_json(-1) == '{"rating": -1}'
