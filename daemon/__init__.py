"""fine-tuner: turn a rated emergency-department dataset into an Ollama model.

``FineTuner`` (the seed's API) and the error family are importable from here. Importing ``daemon``
is light: ``FineTuner`` (and pandas behind it) is loaded on first use; torch never is.
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
        from .capability import CapabilityReport
        return CapabilityReport
    raise AttributeError(f"module 'daemon' has no attribute {name!r}")
