"""Pure builders for the fine-tuning inputs: chat records, the validation split, the training config.

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
- ``training_config(*, base_model, dataset_path, validation_path, output_dir, training, epochs,
  learning_rate, micro_batch_size, seed) -> dict``: axolotl key names (``base_model``, ``datasets``
  with ``type: chat_template``, ``test_datasets``, ``adapter: lora``, ``lora_r``, ``lora_alpha``,
  ``lora_dropout``, ``lora_target_modules``, ``sequence_len``, ``micro_batch_size``,
  ``gradient_accumulation_steps``, ``num_epochs``, ``learning_rate``, ``warmup_ratio``, ``seed``,
  ``output_dir``); ``training`` is the ``config.TrainingConfig`` slice.

No file I/O here: callers write the chunks with ``fsutil``.
"""
