"""Data rules: from a user's CSV and rating mapping to validated rows, and the pure builders on them.

Owns reading the CSV (``csvfile``), the rating mapping (``mapping``), prompt templates (``template``), a job's
settings over the config's defaults and its job file (``jobsettings``), the ICD-10-CM code knowledge a
template's diagnosis columns are expanded with (``codes``), the validated ``Dataset`` (``dataset``), the
``fine-tuner validate`` data report (``report``), the shared system prompt and answer schema (``prompts``),
the turn formats of base models without a chat template (``turns``), the training records (``trainingdata``),
the held-out rows: familiar records and new kinds of records, duplicates kept together (``holdout``), the
model set's few-shot choice and Modelfile text (``modelset``), the synthetic records of the demo and tests
(``synthetic``), and the rated respiratory-infection visits of the answer-quality benchmark (``visits``).
Nothing here logs, talks to a server or starts a process. May import: ``daemon.errors``, ``daemon.text``,
``daemon.config``, ``daemon.fsutil`` and this package; never ``outputs``, ``training``, ``serving``,
``quality``, ``inbox``, ``fine_tuner`` or ``cli``.
"""
