"""Pure builders for the model set: few-shot choice, the model set config, the Modelfile text.

CONTRACT (signatures fixed; the implementation fills them in):

- ``select_few_shot(ds, *, per_rating=2, max_chars=12000, exclude=()) -> list[int]``: positions into
  ``ds.frame``: balanced across ratings, prefers rows with a rationale, spreads over different cases
  (farthest-first on token sets), total prompt+answer text under ``max_chars``, deterministic for
  the same input; never a position in ``exclude`` (the validation hold-out).
- ``ollama_model_name(base, stem, suffix="") -> str``: ``<base>-<stem><suffix>`` sanitized to Ollama's
  name rules (section 2 of the reference), always with a tag (``:latest`` when none).
- ``model_set_config(*, ds, base_model, topics, system, few_shot, model_name, defaults,
  created_at, input_hashes) -> dict``: the ``model_set_config.json`` content (keys: ``base_model``,
  ``target_topics``, ``rating_mapping``, ``rating_labels``, ``system_prompt``, ``few_shot_examples``
  (each ``input``, ``output``, ``rating``), ``output_schema``, ``ollama`` (``model_name``,
  ``parameters`` = {"temperature": 0}), ``dataset_size``, ``label_distribution``, ``source_sha256``,
  ``created_at``).
- ``modelfile_text(*, base, system, messages, parameters, adapter=None) -> str``: FROM, ADAPTER (when
  given), SYSTEM, PARAMETER lines, MESSAGE user/assistant pairs; any text (triple quotes, quotes,
  backslashes, newlines, control characters) still parses.
- ``parse_modelfile(text) -> list[tuple[str, str]]``: (INSTRUCTION, argument) pairs, per reference §6;
  used by tests and by registration to turn a Modelfile into create fields.
"""
