"""Seed compatibility: ``from scripts.fine_tuner import FineTuner`` and the seed's command line.

A thin wrapper over ``daemon``: ``python scripts/fine_tuner.py --input X.csv --model llama2
--topics "respiratory infections" --epochs 5 --learning-rate 0.001`` runs ``fine-tuner process``:
the outputs go to their own folder, ``outputs/<input stem>/`` (a new one per run), never loose
into ``outputs/`` beside the daemon's job folders.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon import (  # noqa: E402  (re-exported for the seed's imports)
    DatasetError,
    DatasetTooSmallWarning,
    FineTuner,
    FineTuningNotSupportedError,
    ModelSetConfigError,
    TrainingFailedError,
)

__all__ = ["DatasetError", "DatasetTooSmallWarning", "FineTuner", "FineTuningNotSupportedError",
           "ModelSetConfigError", "TrainingFailedError", "main"]


def main(argv: list[str] | None = None) -> int:
    from daemon.cli import main as cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    return cli_main(["process", *argv])


if __name__ == "__main__":
    sys.exit(main())
