"""Training: the parent that supervises a trainer child, and the children that train an adapter.

Owns finding the base weights and spawning, watching and stopping the trainer child
(``supervisor``), and ending every long-lived child we start (a trainer, the local rater,
llama-server) when its parent ends without stopping it (``parentdeath``); the children themselves
(``trainer``, the built-in transformers + peft loop, and
``axolotl_trainer`` with its progress ``axolotl_plugin``, and ``features``, which turns records into
the base model's hidden-state vectors for a head), which are the only modules that import
torch, transformers and peft, always inside functions; the GGUF base weights a user's Ollama serves, found, read and
dequantized once into a trainable folder (``ggufmodel``; its header read with bounded memory by
``ggufheader``), and the tiny locally built model of the
demo and tests (``tinymodel``). Child entry points: ``python -m daemon.training.trainer SPEC``,
``python -m daemon.training.axolotl_trainer SPEC`` and ``python -m daemon.training.features SPEC``.
May import: the top-level base modules
(``errors``, ``text``, ``config``, ``fsutil``, ``portable``, ``logconfig``), ``daemon.data``,
``daemon.outputs`` (the output folder's file names) and this package; never ``serving``,
``quality``, ``inbox``, ``fine_tuner`` or ``cli``.
"""
