"""The system prompt, the answer JSON and its schema."""

from __future__ import annotations

import json

from daemon.data import prompts


def test_topics_are_normalized():
    """Comma-separated text and lists give the same trimmed, de-duplicated topics."""
    assert prompts.normalize_topics(" flu , covid,,flu ") == ["flu", "covid"]
    assert prompts.normalize_topics(["a", " b "]) == ["a", "b"]
    assert prompts.normalize_topics(None) == []


def test_system_prompt_names_topic_and_every_label():
    """Every label is shown, grouped by its rating, and the JSON answer is requested."""
    text = prompts.system_prompt("respiratory infections", {"Match": 1, "Yes": 1, "No": 0, "Unknown": -1})
    assert 'the topic "respiratory infections"' in text
    assert "- 1: Match / Yes" in text
    assert "- 0: No" in text
    assert "- -1: Unknown" in text
    assert "The rating must be one of: -1, 0, 1." in text


def test_system_prompt_text_allows_the_empty_rationale_rows_train():
    """The whole system prompt, which says the rationale may be empty, as rows without one are trained."""
    text = prompts.system_prompt("flu", {"Match": 1, "No": 0})
    assert text == (
        "You are an expert public-health analyst reviewing emergency-department visit records.\n"
        'Rate how well each record matches the topic "flu", the way the expert reviewers do.\n'
        "\n"
        "Rating scale (rating: label):\n"
        "- 1: Match\n"
        "- 0: No\n"
        "\n"
        'Answer with exactly one JSON object and nothing else: {"rationale": "<short reason, or empty>", "rating": <integer>}\n'
        "The rating must be one of: 0, 1.")
    assert prompts.answer_json(0, None) == '{"rationale": "", "rating": 0}'
    assert prompts.parse_answer(prompts.answer_json(0, None), [0, 1]) == {"rating": 0, "rationale": ""}
    assert prompts.output_schema([0, 1])["properties"]["rationale"] == {"type": "string"}


def test_answer_json_and_schema_agree():
    """The assistant answer parses back and its rating is in the schema's enum."""
    answer = prompts.answer_json(1, 'cough "and" fever')
    schema = prompts.output_schema([1, 0, -1, 1])
    assert json.loads(answer) == {"rating": 1, "rationale": 'cough "and" fever'}
    assert schema["properties"]["rating"]["enum"] == [-1, 0, 1]
    assert schema["required"] == ["rationale", "rating"]
    # the reason is written before the rating, in the answer and in the grammar's property order
    assert list(json.loads(answer)) == list(schema["properties"]) == ["rationale", "rating"]
    assert prompts.parse_answer(answer, [-1, 0, 1]) == {"rating": 1, "rationale": 'cough "and" fever'}


def test_parse_answer_rejects_wrong_shapes():
    """Non-JSON, wrong types, booleans and out-of-scale ratings are refused."""
    assert prompts.parse_answer("not json") is None
    assert prompts.parse_answer('{"rating": "1", "rationale": ""}') is None
    assert prompts.parse_answer('{"rating": true, "rationale": ""}') is None
    assert prompts.parse_answer('{"rating": 5, "rationale": ""}', [0, 1]) is None
    assert prompts.parse_answer("[1]") is None
