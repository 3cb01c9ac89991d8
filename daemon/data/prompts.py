"""The text and schema shared by training data and model sets: the system prompt, the answer.

The system turn states the task, the topic(s) and the rating scale with all of its labels, and asks
for exactly one JSON object ``{"rationale": "<short reason, or empty>", "rating": <integer>}``; the
same answer shape is the assistant turn of every training record and few-shot example, and
``output_schema`` describes it as a JSON Schema usable as Ollama's ``format``. Pure functions, no I/O.

The rationale rule: the rationale is the expert's own text, never invented. A row without one (no
rationale column, or an empty cell) is answered with ``"rationale": ""``, so the system prompt says
the rationale may be empty, and ``output_schema`` takes any string, the empty one included. The
instruction and the trained answers therefore always agree.

``parse_answer`` is the one judge of a model's answer: registration's check, evaluation and rating
all call it, so one answer gets one verdict everywhere (``INVALID_RULE``). The rating is what
counts: the rating-only form ``{"rating": N}`` (``direct_answer_json``, what a fine-tune trained on
both answer forms, the baseline and the head answer) is as valid as the reasoned one, and the
rationale is returned when the answer holds one as text.

The reason comes before the rating. A model writes its answer token by token: with the rating
first it must decide on one token before any of the reasoning is written, and a fine-tune's loss is
then almost all rationale (about 35 tokens against one), so it learns the experts' style of reason
but not the decision. Written second, the rating follows from a reason the model has just stated,
the expert's rule applied to this record. ``output_schema`` lists the properties in the same order,
because the JSON-Schema grammars of Ollama and llama.cpp write them in that order.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence


def normalize_topics(topics: str | Sequence[str] | None) -> list[str]:
    """``"a, b"`` or ``["a", "b"]`` → ``["a", "b"]`` (trimmed, empty parts dropped, order kept)."""
    if topics is None:
        return []
    parts = topics.split(",") if isinstance(topics, str) else list(topics)
    seen: list[str] = []
    for part in parts:
        part = str(part).strip()
        if part and part not in seen:
            seen.append(part)
    return seen


def labels_by_value(label_to_value: Mapping[str, int]) -> dict[int, list[str]]:
    """Invert a label → rating mapping; several labels may share one rating. Sorted by rating, high first."""
    out: dict[int, list[str]] = {}
    for label, value in label_to_value.items():
        out.setdefault(int(value), []).append(str(label))
    return dict(sorted(out.items(), key=lambda kv: -kv[0]))


def rating_scale_lines(label_to_value: Mapping[str, int]) -> list[str]:
    """One line per rating: ``- 1: Match`` or ``- 0: Does Not Match / No``."""
    return [f"- {value}: {' / '.join(labels)}" for value, labels in labels_by_value(label_to_value).items()]


def system_prompt(topics: str | Sequence[str] | None, label_to_value: Mapping[str, int],
                  definition: str | None = None) -> str:
    """The system turn used for training records and for the model set. ``definition``: the
    experts' written criteria for the topic (``topic_definition``), placed under the rating scale."""
    topic_list = normalize_topics(topics)
    if not topic_list:
        topic_text = "the target topic"
    elif len(topic_list) == 1:
        topic_text = f'the topic "{topic_list[0]}"'
    else:
        topic_text = "the topics " + ", ".join(f'"{t}"' for t in topic_list)
    values = sorted({int(v) for v in label_to_value.values()})
    return "\n".join([
        "You are an expert public-health analyst reviewing emergency-department visit records.",
        f"Rate how well each record matches {topic_text}, the way the expert reviewers do.",
        "",
        "Rating scale (rating: label):",
        *rating_scale_lines(label_to_value),
        "",
        *(["How the experts decide:", definition.strip(), ""] if definition and definition.strip() else []),
        ('Answer with exactly one JSON object and nothing else: '
         '{"rationale": "<short reason, or empty>", "rating": <integer>}'),
        f"The rating must be one of: {', '.join(str(v) for v in values)}.",
    ])


def answer_json(rating: int, rationale: str | None) -> str:
    """The assistant answer: compact JSON, non-ASCII kept as is; the reason first, then the rating."""
    return json.dumps({"rationale": rationale or "", "rating": int(rating)}, ensure_ascii=False)


def direct_answer_json(rating: int) -> str:
    """The rating-only answer (``training.answer_forms: both``): the rating as a direct decision."""
    return json.dumps({"rating": int(rating)})


# the longest rationale a server held to the schema may write: a short reason, about 120 tokens. A
# small model left unbounded can repeat itself until the token cap cuts the answer into invalid JSON
RATIONALE_MAX_CHARS = 500


def output_schema(values: Sequence[int]) -> dict:
    """JSON Schema of the answer (usable as Ollama's ``format``); the rationale may be empty and is
    at most ``RATIONALE_MAX_CHARS`` long. The properties are in answer order: grammar-constrained
    servers write them in this order."""
    return {
        "type": "object",
        "properties": {
            "rationale": {"type": "string", "maxLength": RATIONALE_MAX_CHARS},
            "rating": {"type": "integer", "enum": sorted({int(v) for v in values})},
        },
        "required": ["rationale", "rating"],
        "additionalProperties": False,
    }


def direct_output_schema(values: Sequence[int]) -> dict:
    """JSON Schema of the rating-only answer (``direct_answer_json``): a server held to it (Ollama's
    ``format``, an OpenAI-compatible ``response_format``) can only write ``{"rating": <allowed>}``."""
    return {
        "type": "object",
        "properties": {"rating": {"type": "integer", "enum": sorted({int(v) for v in values})}},
        "required": ["rating"],
        "additionalProperties": False,
    }


INVALID_RULE = ("an answer is valid only when it is a JSON object whose \"rating\" is one of the "
                "mapping's values; any other answer is invalid and counts as wrong (it is never "
                "repaired or guessed)")


def parse_answer(text: str | None, values: Sequence[int] | None = None) -> dict | None:
    """``{"rating": int}``, plus ``"rationale"`` when the answer holds one as text, for a valid
    answer (``INVALID_RULE``; the rating among ``values`` when given), else None. Never repaired:
    no regex, no code fence stripped; hostile text (JSON nested thousands deep, a number of
    thousands of digits) is an invalid answer, never an exception."""
    if not isinstance(text, str):
        return None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    rating, rationale = data.get("rating"), data.get("rationale")
    # bool is an int in Python, and 1.0 == 1: neither is an integer rating in the answer's schema
    if type(rating) is not int or (values is not None and rating not in {int(v) for v in values}):
        return None
    return {"rating": rating, "rationale": rationale} if isinstance(rationale, str) else {"rating": rating}


def answer_rating(text: str | None, values: Sequence[int] | None = None) -> int | None:
    """The rating of a valid answer (``parse_answer``), None for an invalid one."""
    parsed = parse_answer(text, values)
    return None if parsed is None else parsed["rating"]
