"""Answer quality: asking a model for ratings and measuring them against the experts.

Owns the raters that turn conversations into answers (``rater``: through Ollama, an
OpenAI-compatible server, or the local child ``generate``, run as
``python -m daemon.quality.generate SPEC``), the one strict answer parser and
the agreement metrics and report files (``evaluation``), evaluating an output folder's models on
held-out rows (``evaluator``), each answer's confidence, its calibration and the coverage table
(``confidence``), the bag-of-words classifier measured beside every model
(``baseline``), the head on the base model's hidden states: its fitting, its stored form and the
features child it runs (``head``), the verdict on a model and the quality gate (``trust``), rating
new records with a built model (``rating``), and the records it sends to the experts, ranked by what
a rating is worth (``review``). May import:
the top-level base modules (``errors``, ``config``, ``fsutil``, ``portable``, ``logconfig``),
``daemon.data``, ``daemon.training``, ``daemon.serving`` and this package; never ``inbox``,
``fine_tuner`` or ``cli``.
"""
