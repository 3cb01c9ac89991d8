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
- ``jsonl_blocks(ds, positions, system) -> Iterator[memoryview]``: the same as UTF-8 bytes, for
  binary writers (``jsonl_chunks`` decodes these).
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

from .dataset import take_rows
from .prompts import answer_json

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from .config import TrainingConfig
    from .dataset import Dataset

CHUNK_ROWS = 4096  # lines per block (~3.5 MB of JSONL): amortises per-call costs, bounds memory

# The C string encoder json.dumps(..., ensure_ascii=False) itself uses for a str; called directly it
# skips json.dumps' per-call encoder set-up, which is most of the cost for short strings.
_encode = json.encoder.encode_basestring


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
    ratings = ds.frame["rating"].to_numpy()
    rng = np.random.default_rng(seed)
    chosen = []
    for value in np.unique(ratings):
        members = np.flatnonzero(ratings == value)
        if len(members) < 2:
            continue
        take = min(max(1, int(round(fraction * len(members)))), len(members) - 1)
        chosen.append(rng.permutation(members)[:take])
    validation = np.sort(np.concatenate(chosen)) if chosen else np.empty(0, dtype=np.int64)
    mask = np.ones(n, dtype=bool)
    mask[validation] = False
    return everything[mask], validation.astype(np.int64)


def jsonl_chunks(ds: Dataset, positions: Sequence[int] | np.ndarray, system: str) -> Iterator[str]:
    """The JSONL text of the rows at ``positions``, ``CHUNK_ROWS`` lines per chunk: ``jsonl_blocks``
    decoded, for callers that write text."""
    for block in jsonl_blocks(ds, positions, system):
        yield str(block, "utf-8")


def jsonl_blocks(ds: Dataset, positions: Sequence[int] | np.ndarray, system: str) -> Iterator[memoryview]:
    """The UTF-8 JSONL of the rows at ``positions``, ``CHUNK_ROWS`` complete lines per block, as
    views of Arrow buffers (write them to a binary file; a block is only valid until the next).

    Lines are assembled in Arrow's C++ kernels, never one Python object per row: the prompt and
    rationale are JSON-escaped with vectorised replacements (``_json_escaped``) and joined with the
    constant pieces (the encoded system turn, the keys) by ``binary_join_element_wise``. Each line
    is byte for byte ``json.dumps(chat_record(...), ensure_ascii=False)`` (a test holds it to that);
    memory stays at one block whatever the dataset's size. (Building the next block on a thread
    while this one is written was tried: on the shared 2-core box it gained nothing and cost 30 MiB.)"""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    positions = np.asarray(positions, dtype=np.int64)
    if not len(positions):
        return
    frame = ds.frame
    prompts = _arrow_strings(frame["prompt"])
    rationales = _arrow_strings(frame["rationale"])
    ratings = frame["rating"].to_numpy()
    contiguous = bool(positions[-1] - positions[0] == len(positions) - 1 and np.all(np.diff(positions) == 1))

    def piece(text: str) -> pa.Scalar:
        return pa.scalar(text, type=pa.large_string())

    # json.dumps(chat_record(...)) around the two escaped texts; the answer is itself a JSON
    # string holding JSON, so its keys' quotes and the rationale are escaped twice.
    head = piece('{"messages": [{"role": "system", "content": ' + _encode(system)
                 + '}, {"role": "user", "content": "')
    before_rating = piece('"}, {"role": "assistant", "content": "{\\"rating\\": ')
    before_rationale = piece(', \\"rationale\\": \\"')
    tail = piece('\\"}"}]}\n')
    nothing = piece("")

    def build(start: int) -> pa.ChunkedArray:
        block = positions[start:start + CHUNK_ROWS]
        if contiguous:
            block_prompts = prompts.slice(int(block[0]), len(block))
            block_rationales = rationales.slice(int(block[0]), len(block))
        else:
            block_prompts = take_rows(prompts, block)
            block_rationales = take_rows(rationales, block)
        return pc.binary_join_element_wise(
            head, _json_escaped(block_prompts), before_rating,
            pa.array(ratings[block]).cast(pa.large_string()), before_rationale,
            _json_escaped(_json_escaped(block_rationales)), tail, nothing)

    for start in range(0, len(positions), CHUNK_ROWS):
        yield from _data_views(build(start))


def _arrow_strings(series) -> pa.ChunkedArray:
    """A text column of ``ds.frame`` as Arrow ``large_string`` (no copy when it is Arrow-backed)."""
    import pyarrow as pa

    try:
        values = pa.chunked_array(series.array.__arrow_array__())
    except (AttributeError, TypeError):
        values = pa.chunked_array([pa.array(series.to_numpy(dtype=object), type=pa.large_string())])
    if values.type != pa.large_string():
        values = values.cast(pa.large_string())
    return values


def _data_views(lines) -> Iterator[memoryview]:
    """The bytes of a string array's values, concatenated, as views of its data buffer."""
    import numpy as np

    chunks = lines.chunks if hasattr(lines, "chunks") else [lines]
    for chunk in chunks:
        if not len(chunk):
            continue
        offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int64, count=len(chunk) + 1, offset=chunk.offset * 8)
        if offsets[-1] > offsets[0]:
            yield memoryview(chunk.buffers()[2])[int(offsets[0]):int(offsets[-1])]


# JSON string escapes of json.dumps(..., ensure_ascii=False): the backslash first (the others add
# backslashes), then the short forms, then \u00XX (lowercase hex) for the other control characters.
_ESCAPES = {ord("\\"): "\\\\", ord('"'): '\\"', ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t",
            ord("\b"): "\\b", ord("\f"): "\\f",
            **{c: f"\\u{c:04x}" for c in range(0x20) if chr(c) not in "\n\r\t\b\f"}}


def _json_escaped(values):
    """Each string JSON-escaped as ``json.encoder.encode_basestring`` does, without the quotes.

    A replacement pass costs a copy of the block, so only the characters that occur are replaced:
    which ones is read from the block's bytes with numpy (no copy), and a block with none of
    them is returned as it is."""
    import numpy as np
    import pyarrow.compute as pc

    present: set[int] = set()
    for view in _data_views(values):
        data = np.frombuffer(view, dtype=np.uint8)
        present.update(np.unique(data[data < 0x20]).tolist())
        present.update(c for c in (ord("\\"), ord('"')) if (data == c).any())
    if ord("\\") in present:  # first: every other replacement adds backslashes
        values = pc.replace_substring(values, "\\", _ESCAPES[ord("\\")])
    for code in sorted(present - {ord("\\")}):
        values = pc.replace_substring(values, chr(code), _ESCAPES[code])
    return values


def training_config(*, base_model: str, dataset_path: str, validation_path: str | None, output_dir: str,
                    training: TrainingConfig, epochs: int, learning_rate: float, micro_batch_size: int,
                    seed: int) -> dict[str, Any]:
    """The run's settings under axolotl's key names, so the same file can be handed to axolotl on a
    bigger machine. ``validation_path`` None (no hold-out) leaves ``test_datasets`` out."""

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
        "logging_steps": int(training.logging_steps),
        "seed": int(seed),
        "output_dir": output_dir,
    })
    return config
