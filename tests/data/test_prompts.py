"""The system prompt, the answer JSON and its schema."""

from __future__ import annotations

import json

import pytest

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
        'Answer with exactly one JSON object and nothing else: '
        '{"rationale": "<short reason, or empty>", "rating": <integer>}\n'
        "The rating must be one of: 0, 1.")
    assert prompts.answer_json(0, None) == '{"rationale": "", "rating": 0}'
    assert prompts.parse_answer(prompts.answer_json(0, None), [0, 1]) == {"rating": 0, "rationale": ""}
    # a string, empty allowed, bounded so that a server held to the schema always closes the answer
    assert prompts.output_schema([0, 1])["properties"]["rationale"] == {"type": "string", "maxLength": 500}


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


BOMB = '{"rating": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}"  # JSON nested 100,000 deep


@pytest.mark.parametrize("text, expected", [
    ('{"rationale": "cough", "rating": 1}', {"rating": 1, "rationale": "cough"}),
    ('  {"rating": -1}\n', {"rating": -1}),  # the rating-only form: valid, no rationale
    ('{"rationale": 5, "rating": 0}', {"rating": 0}),  # the rating counts; a rationale only as text
    ('{"rating": 2, "rationale": ""}', None),  # not a mapping value
    ('{"rating": "1", "rationale": ""}', None),  # a string, not an integer
    ('{"rating": true, "rationale": ""}', None),  # a bool is not a rating
    ('{"rating": 1.0}', None),
    ("[1]", None),
    ("Rating: 1", None),  # never dug out with a regex
    ('```json\n{"rating": 1}\n```', None),
    ('{"rationale": "no rating"}', None),
    ("", None),
    (None, None),
    (BOMB, None),  # hostile: a RecursionError inside json, caught
    ("[" * 100_000, None),
    ('{"rating": ' + "1" * 5000 + "}", None),  # hostile: more digits than Python converts (ValueError)
])
def test_parse_answer_is_the_one_strict_rule(text, expected):
    """A JSON object whose rating is one of the mapping's values is valid, with or without a
    rationale; anything else, hostile text included, is invalid (None) and never an exception."""
    assert prompts.parse_answer(text, [-1, 0, 1]) == expected
    assert prompts.answer_rating(text, [-1, 0, 1]) == (None if expected is None else expected["rating"])


def test_parse_answer_without_values_takes_any_integer_rating():
    """Without the mapping's values any integer rating is valid; a bool or text still is not."""
    assert prompts.parse_answer('{"rating": 5, "rationale": ""}') == {"rating": 5, "rationale": ""}
    assert prompts.parse_answer('{"rating": 5, "rationale": ""}', [0, 1]) is None
    assert prompts.parse_answer('{"rating": true}') is None
    assert prompts.parse_answer("not json") is None
