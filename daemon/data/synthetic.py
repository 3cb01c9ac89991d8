"""Synthetic, obviously fake emergency-department records for the demo, tests and benchmarks.

No real patient data ever: complaints and notes are drawn from small fixed vocabularies with a
seeded random generator, so the same ``(rows, seed)`` always gives the same dataset. Standard
library only (the benchmark times pandas separately).
"""

from __future__ import annotations

import csv
import os
import random
from collections.abc import Iterator

MAPPING = {"Match": 1, "Does Not Match": 0, "Unknown": -1}

_RESPIRATORY = ["cough", "shortness of breath", "wheezing", "fever and cough", "sore throat",
                "productive cough", "congestion", "pneumonia symptoms", "chest tightness"]
_OTHER = ["ankle sprain", "laceration to hand", "back pain", "abdominal pain", "headache",
          "fall from ladder", "dental pain", "rash on arm", "kidney stone", "eye irritation"]
_VAGUE = ["general weakness", "malaise", "feeling unwell", "dizziness", "fatigue"]
_TRIAGE = ["pt states", "patient reports", "per EMS", "family reports", "walk-in with"]
_DURATION = ["for 2 days", "since yesterday", "for one week", "x3 days", "since this morning"]
_DX = {1: ["J06.9 acute upper respiratory infection", "J18.9 pneumonia", "J20.9 acute bronchitis"],
       0: ["S93.4 ankle sprain", "M54.5 low back pain", "R10.9 abdominal pain"],
       -1: ["R53.83 fatigue", "R42 dizziness", "R68.89 other general symptoms"]}
_WHY = {1: "Chief complaint and diagnosis indicate a respiratory infection.",
        0: "No respiratory signs; the visit is for an unrelated condition.",
        -1: "Symptoms are too nonspecific to decide."}
HEADER = ["Row_ID", "formatted_prompt", "Expert Rating", "Standardized_Rating", "Rationale of Rating"]


def _label(value: int) -> str:
    return next(k for k, v in MAPPING.items() if v == value)


def synthetic_rows(rows: int, seed: int = 7, topic: str = "respiratory infections") -> Iterator[list[str]]:
    """Rows in ``HEADER`` order; ratings cycle 1/0/-1 in roughly 45/40/15 proportions."""
    rng = random.Random(seed)
    for i in range(rows):
        draw = rng.random()
        rating = 1 if draw < 0.45 else 0 if draw < 0.85 else -1
        pool = _RESPIRATORY if rating == 1 else _OTHER if rating == 0 else _VAGUE
        complaint = rng.choice(pool)
        age = rng.randint(1, 95)
        sex = rng.choice("MF")
        note = (f"{rng.choice(_TRIAGE)} {complaint} {rng.choice(_DURATION)}. "
                f"Temp {rng.uniform(36.0, 39.9):.1f} C, HR {rng.randint(55, 130)}.")
        prompt = (f"Topic: {topic}\nVisit: {age}{sex}, chief complaint: {complaint}. "
                  f"Triage note: {note} Discharge diagnosis: {rng.choice(_DX[rating])}.\n"
                  f"Does this visit match the topic?")
        rationale = _WHY[rating] if rng.random() < 0.9 else ""
        yield [f"R{i + 1:07d}", prompt, _label(rating), str(rating), rationale]


def write_csv(path: str | os.PathLike, rows: int, seed: int = 7, *, delimiter: str = ",",
              encoding: str = "utf-8") -> str:
    """Write a formatted dataset CSV with ``rows`` rows; returns the path as a string."""
    with open(path, "w", newline="", encoding=encoding) as fh:
        writer = csv.writer(fh, delimiter=delimiter)
        writer.writerow(HEADER)
        writer.writerows(synthetic_rows(rows, seed))
    return str(path)
