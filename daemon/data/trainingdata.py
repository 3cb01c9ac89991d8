"""Pure builders for the fine-tuning inputs: chat records, the validation split, the training config.

This module owns the shape of ``training_data.jsonl`` / ``validation_data.jsonl`` (one
``{"messages": [system, user, assistant]}`` record per row, the format OpenAI fine-tuning, TRL,
axolotl and LLaMA-Factory read), the seeded stratified hold-out, and ``training_config.yaml``
under axolotl's key names.

CONTRACT (signatures fixed; the implementation fills them in):

- ``chat_record(system, prompt, rating, rationale) -> dict``: ``{"messages": [system, user, assistant]}``
  where the assistant content is ``prompts.answer_json(rating, rationale)``.
- ``chat_records(ds, system) -> list[dict]``: one record per usable row of ``ds.frame``, in order.
- ``split_holdout(ds, *, fraction=0.1, seed=42, min_rows=50) -> tuple[np.ndarray, np.ndarray]``:
  (train positions, validation positions) into ``ds.frame``; stratified by rating, seeded,
  deterministic; at least one validation row per rating where that rating has >= 2 rows;
  empty validation when ``ds.rows_used < min_rows``.
- ``jsonl_chunks(ds, positions, system) -> Iterator[str]``: the JSONL text of those rows in chunks
  (each chunk many complete lines), fast: this is the hot path of ``bench/prep_throughput.py``.
  Each line is exactly ``json.dumps(chat_record(...), ensure_ascii=False)``.
- ``training_config(*, base_model, dataset_path, validation_path, output_dir, training, epochs,
  learning_rate, micro_batch_size, seed) -> dict``: axolotl key names (``base_model``, ``datasets``
  with ``type: chat_template``, ``test_datasets``, ``adapter: lora``, ``lora_r``, ``lora_alpha``,
  ``lora_dropout``, ``lora_target_modules``, ``sequence_len``, ``micro_batch_size``,
  ``gradient_accumulation_steps``, ``num_epochs``, ``learning_rate``, ``warmup_ratio``, ``seed``,
  ``output_dir``); ``training`` is the ``config.TrainingConfig`` slice.

No file I/O here: callers write the chunks with ``fsutil``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .prompts import answer_json, direct_answer_json

if TYPE_CHECKING:
    import numpy as np

    from ..config import TrainingConfig
    from .dataset import Dataset

CHUNK_ROWS = 1024  # lines per chunk: large enough to amortise writes, small enough to bound memory

# The C string encoder json.dumps(..., ensure_ascii=False) itself uses for a str; called directly it
# skips json.dumps' per-call encoder set-up, which is most of the cost for short strings.
_encode = json.encoder.encode_basestring
# Answers are pre-encoded once per distinct (rating, rationale) when rows share few of them
# (templated or empty rationales); below this share of distinct pairs the table pays for itself.
_ANSWER_TABLE_SHARE = 0.25


def chat_record(system: str, prompt: str, rating: int, rationale: str | None) -> dict:
    """One training example: the system turn, the record as the user turn, the JSON answer."""
    return {"messages": [
        {"role": "system", "content": system},
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": answer_json(rating, rationale)},
    ]}


def chat_records(ds: Dataset, system: str) -> list[dict]:
    """One chat record per usable row of ``ds.frame``, in order."""
    frame = ds.frame
    return [chat_record(system, p, r, x) for p, r, x in zip(
        frame["prompt"].tolist(), frame["rating"].tolist(), frame["rationale"].tolist())]


def split_holdout(ds: Dataset, *, fraction: float = 0.1, seed: int = 42,
                  min_rows: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """(train positions, validation positions) into ``ds.frame``, both sorted ascending.

    Per rating, ``round(fraction * n)`` rows go to validation, at least one when the rating has 2 or
    more rows and never all of them; the choice is a seeded permutation per rating, so the same
    dataset and seed always give the same split."""
    import numpy as np

    n = ds.rows_used
    everything = np.arange(n, dtype=np.int64)
    if n < min_rows or fraction <= 0:
        return everything, np.empty(0, dtype=np.int64)
    from .holdout import stratified

    validation = np.sort(stratified(everything, ds.frame["rating"].to_numpy(), fraction,
                                    np.random.default_rng(seed)))
    mask = np.ones(n, dtype=bool)
    mask[validation] = False
    return everything[mask], validation.astype(np.int64)


def jsonl_chunks(ds: Dataset, positions: Sequence[int] | np.ndarray, system: str, *,
                 direct: bool = False) -> Iterator[str]:
    """The JSONL text of the rows at ``positions``, ``CHUNK_ROWS`` lines per chunk. ``direct``: each
    row is followed by a second line with the same prompt and the rating-only answer
    (``prompts.direct_answer_json``), the two answer forms of multi-task training.

    Builds each line from pre-encoded pieces instead of ``json.dumps`` of a dict per row: the
    system turn is encoded once, and the prompt, rationale and answer strings go through the C
    string encoder directly. The result is byte-for-byte ``json.dumps(chat_record(...),
    ensure_ascii=False)`` (a test holds it to that)."""
    import numpy as np

    positions = np.asarray(positions, dtype=np.int64)
    frame = ds.frame
    prompt_col = frame["prompt"].to_numpy(dtype=object)
    rating_col = frame["rating"].to_numpy()
    rationale_col = frame["rationale"].to_numpy(dtype=object)
    head = '{"messages": [{"role": "system", "content": ' + _encode(system) + '}, {"role": "user", "content": '
    middle = '}, {"role": "assistant", "content": '
    tail = "}]}\n"
    encode = _encode
    table = _answer_table(rating_col[positions], rationale_col[positions])
    for start in range(0, len(positions), CHUNK_ROWS):
        block = positions[start:start + CHUNK_ROWS]
        prompts = map(encode, prompt_col[block].tolist())
        if table is not None:
            answers = map(table.__getitem__, zip(rating_col[block].tolist(), rationale_col[block].tolist()))
        else:
            answers = map(_encoded_answer, rating_col[block].tolist(), rationale_col[block].tolist())
        if direct:
            directs = [_encode(direct_answer_json(r)) for r in rating_col[block].tolist()]
            yield "".join([f"{head}{p}{middle}{a}{tail}{head}{p}{middle}{d}{tail}"
                           for p, a, d in zip(prompts, answers, directs)])
        else:
            yield "".join([f"{head}{p}{middle}{a}{tail}" for p, a in zip(prompts, answers)])


def _encoded_answer(rating: int, rationale: str) -> str:
    """``prompts.answer_json(rating, rationale)`` as a JSON string literal."""
    return _encode(f'{{"rationale": {_encode(rationale)}, "rating": {rating}}}')


def _answer_table(ratings: np.ndarray, rationales: np.ndarray) -> dict[tuple[int, str], str] | None:
    """Encoded answers by (rating, rationale) when few distinct pairs exist, else None."""
    pairs = set(zip(ratings.tolist(), rationales.tolist()))
    if len(pairs) > _ANSWER_TABLE_SHARE * len(ratings):
        return None
    return {pair: _encoded_answer(*pair) for pair in pairs}


def training_config(*, base_model: str, dataset_path: str, validation_path: str | None, output_dir: str,
                    training: TrainingConfig, epochs: int, learning_rate: float, micro_batch_size: int,
                    seed: int) -> dict[str, Any]:
    """The run's settings under axolotl's key names, so the same file can be handed to axolotl on a
    bigger machine. ``validation_path`` None (no hold-out) leaves ``test_datasets`` out; the extra
    axolotl keys of ``training.axolotl`` (DeepSpeed, FSDP, precision, ...) come last, as given."""

    def dataset_entry(path: str, split: str | None = None) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "path": path,
            "ds_type": "json",
            "type": "chat_template",
            "field_messages": "messages",
            "message_property_mappings": {"role": "role", "content": "content"},
        }
        if split:
            entry["split"] = split
        return entry

    config: dict[str, Any] = {
        "base_model": base_model,
        "datasets": [dataset_entry(dataset_path)],
    }
    if validation_path:
        config["test_datasets"] = [dataset_entry(validation_path, "train")]
    config.update({
        "adapter": "lora",
        "lora_r": int(training.lora_r),
        "lora_alpha": int(training.lora_alpha),
        "lora_dropout": float(training.lora_dropout),
        "lora_target_modules": list(training.lora_target_modules),
        "sequence_len": int(training.sequence_len),
        "micro_batch_size": int(micro_batch_size),
        "gradient_accumulation_steps": int(training.gradient_accumulation_steps),
        "num_epochs": int(epochs),
        "learning_rate": float(learning_rate),
        "warmup_ratio": float(training.warmup_ratio),
        # the project's own recipe, spelled out so that another trainer does not use its defaults
        # (axolotl's are a cosine schedule and fused AdamW): linear warm-up then decay, AdamW,
        # no weight decay
        "lr_scheduler": "linear",
        "optimizer": "adamw_torch",
        "weight_decay": 0.0,
        "logging_steps": int(training.logging_steps),
        "seed": int(seed),
        # the project's precision: bf16 where the GPU has it, else float32 (axolotl would pick fp16
        # by itself, even on a CPU), and no TF32 matmuls
        "bf16": "auto",
        "fp16": False,
        "tf32": False,
        # axolotl would switch these kernels on by itself for some models: they are not the recipe
        "lora_mlp_kernel": False,
        "lora_qkv_kernel": False,
        "lora_o_kernel": False,
        "output_dir": output_dir,
    })
    if validation_path:
        config["eval_strategy"] = "epoch"  # like the project's trainer: the hold-out after each epoch
    config.update(dict(training.axolotl or {}))  # config.rules refuses keys this function writes
    return config


def dataset_info(train_file: str, validation_file: str | None) -> dict[str, Any]:
    """LLaMA-Factory's ``dataset_info.json`` for the JSONL files: OpenAI-style chat records
    (``formatting: sharegpt`` with role/content tags), so both load with the loss on the answer."""
    def entry(file: str) -> dict[str, Any]:
        return {"file_name": file, "formatting": "sharegpt", "columns": {"messages": "messages"},
                "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                         "assistant_tag": "assistant", "system_tag": "system"}}
    out = {"fine_tuner_train": entry(train_file)}
    if validation_file:
        out["fine_tuner_validation"] = entry(validation_file)
    return out
