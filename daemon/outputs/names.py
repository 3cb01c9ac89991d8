"""The names of an output folder's files (``outputs/<job_id>/``), each defined once.

Every module that writes or reads one of them takes its name from here, so a newcomer finds in one
place what a folder may hold and which approach writes what.
"""

from __future__ import annotations

METADATA = "fine_tuning_metadata.json"  # every folder: what the job was, how it went, where things are
MODEL_SET_CONFIG = "model_set_config.json"  # a model set: system prompt, few-shot examples, Ollama settings
MODELFILE = "Modelfile"  # the Ollama Modelfile of the model set or the fine-tune
TRAINING_DATA = "training_data.jsonl"  # a fine-tune's chat records
VALIDATION_DATA = "validation_data.jsonl"  # the held-out chat records every model is measured on
TRAINING_FILES = (VALIDATION_DATA, TRAINING_DATA)  # where a fine-tune's system prompt is read back from
TRAINING_CONFIG = "training_config.yaml"
TRAINING_RESULT = "training_result.json"  # the trainer child's figures
TRAINER_STDERR = "trainer_stderr.log"  # the trainer child's messages (a failed build that holds it is kept)
COMPARISON_MODEL_SET = "comparison_model_set.json"  # a fine-tune's model set built from its training rows
ADAPTER_DIR = "adapter"  # a fine-tune's LoRA adapter folder
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what Ollama and PEFT need
ADAPTER_GGUF = "adapter.gguf"  # the same adapter converted by llama.cpp (Ollama's ADAPTER for other architectures)
BASELINE = "baseline.json"  # the bag-of-words classifier measured beside every model
HEAD = "head.json"  # approach head: the classifier on the base model's hidden states
CALIBRATION = "calibration.json"  # the new model's temperature, applied when it rates
EVALUATION = "evaluation.json"
EVALUATION_MD = "evaluation.md"
CONFUSION_MATRIX = "confusion_matrix.png"
PREDICTIONS = "predictions.csv"
REPORT_FILES = (EVALUATION, EVALUATION_MD, CONFUSION_MATRIX, PREDICTIONS)  # what an evaluation writes

__all__ = ["ADAPTER_DIR", "ADAPTER_FILES", "ADAPTER_GGUF", "BASELINE", "CALIBRATION", "COMPARISON_MODEL_SET",
           "CONFUSION_MATRIX", "EVALUATION", "EVALUATION_MD", "HEAD", "METADATA",
           "MODELFILE", "MODEL_SET_CONFIG", "PREDICTIONS", "REPORT_FILES", "TRAINING_CONFIG",
           "TRAINER_STDERR", "TRAINING_DATA", "TRAINING_FILES", "TRAINING_RESULT", "VALIDATION_DATA"]
