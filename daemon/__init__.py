"""fine-tuner: turn a rated emergency-department dataset into an Ollama model.

``FineTuner`` (the seed's API) and the error family are importable from here. Importing ``daemon``
is light: ``FineTuner`` (and pandas behind it) is loaded on first use; torch never is.

The package is grouped into rooms, in the order a job passes through them; a room imports only the
rooms before it (each room's ``__init__`` states its rule, ``tests/test_layout.py`` checks it):

* top-level base modules, imported by every room: ``errors`` (imports nothing of ours), ``text``
  (safe text for messages), ``fsutil``, ``portable``, ``logconfig``, ``llamacpp`` (where the pinned
  llama.cpp and fine-tuner's machine-wide cache live) and the ``config`` package (by section:
  ``schema``, ``files``, ``rules``, ``loading``);
* ``data``: CSV and mapping to validated rows, prompts, training records, model-set text, a job's
  settings (``jobsettings``, which also checks the config's ``prompt_template``);
* ``training``: the trainer children and the parent that supervises them;
* ``serving``: the Ollama client, registration and the capability report;
* ``quality``: raters, evaluation against the experts, rating new records;
* ``fine_tuner``: the ``FineTuner`` facade, one dataset end to end;
* ``inbox``: the daemon around it; ``cli`` (and ``__main__``) on top.
"""

from __future__ import annotations

from typing import Any

from .errors import (
    ConfigError,
    DatasetEncodingError,
    DatasetError,
    DatasetFormatError,
    DatasetTooSmallWarning,
    EmptyDatasetError,
    FineTunerError,
    FineTuningNotSupportedError,
    InvalidRatingError,
    MappingError,
    MissingColumnError,
    ModelSetConfigError,
    OllamaError,
    OllamaUnavailableError,
    RegistrationError,
    TrainingFailedError,
    TrainingInterruptedError,
    UnmappedRatingError,
)

__version__ = "0.1.0"

__all__ = [
    "CapabilityReport", "ConfigError", "DatasetEncodingError", "DatasetError", "DatasetFormatError",
    "DatasetTooSmallWarning", "EmptyDatasetError", "FineTuner", "FineTunerError",
    "FineTuningNotSupportedError", "InvalidRatingError", "MappingError", "MissingColumnError",
    "ModelSetConfigError", "OllamaError", "OllamaUnavailableError", "RegistrationError",
    "TrainingFailedError", "TrainingInterruptedError", "UnmappedRatingError", "__version__",
]


def __getattr__(name: str) -> Any:
    if name == "FineTuner":
        from .fine_tuner import FineTuner
        return FineTuner
    if name == "CapabilityReport":
        from .serving.capability import CapabilityReport
        return CapabilityReport
    raise AttributeError(f"module 'daemon' has no attribute {name!r}")
