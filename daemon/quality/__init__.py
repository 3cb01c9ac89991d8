"""Answer quality: asking a model for ratings and measuring them against the experts.

Owns the backends that turn conversations into answers (``backends``: through Ollama, an
OpenAI-compatible server, or the local child ``generate``, run as
``python -m daemon.quality.generate SPEC``; the rating and features children are followed by
``children``), evaluating an output folder's models on its held-out rows (``heldout``: who
answers, then each answer judged by ``daemon.data.prompts.parse_answer``, the one answer parser
that registration's check and rating use too), the report it writes: metrics, ``evaluation.md``,
``predictions.csv`` (``evalreport``), the statistics the reports share: kappa, bootstrap
intervals (``agreement``), each answer's confidence, its calibration and the coverage table
(``confidence``), the bag-of-words classifier measured beside every model
(``baseline``), the head on the base model's hidden states: its fitting, its stored form and the
features child it runs (``head``), the verdict on a model and the quality gate (``trust``), rating
a file of new records with a built model (``ratefile``), one rating request from either door (``fine-tuner
rate`` or an inbox rating job): its model and what follows the run (``raterequest``), and the
records it sends to the experts, ranked by what a rating is worth (``review``). May import:
the top-level base modules (``errors``, ``text``, ``config``, ``fsutil``, ``portable``, ``logconfig``),
``daemon.data``, ``daemon.outputs``, ``daemon.training``, ``daemon.serving`` and this package; never ``inbox``,
``fine_tuner`` or ``cli``.
"""
