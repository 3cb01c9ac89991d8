"""Tests for daemon/data/modelset.py: few-shot choice, model names, model_set_config, Modelfile text and parser."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from daemon.data.dataset import Dataset
from daemon.errors import ModelSetConfigError
from daemon.data.mapping import RatingMapping
from daemon.data.modelset import (
    model_set_config,
    modelfile_create_fields,
    modelfile_safe_text,
    modelfile_text,
    ollama_model_name,
    parse_modelfile,
    select_few_shot,
    valid_model_name,
)
from daemon.data.prompts import answer_json, output_schema

REPO = Path(__file__).resolve().parents[2]
MAPPING = {"Match": 1, "Does Not Match": 0, "Unknown": -1}
MARKER = "ZZQ-PATIENT-7731"  # a cell value that must never show up in an error message


def make_ds(rows, labels=MAPPING, row_ids=None) -> Dataset:
    """A real Dataset from (prompt, rating, rationale) tuples, built with its own constructor."""
    data = {
        "prompt": [r[0] for r in rows],
        "rating": pd.Series([int(r[1]) for r in rows], dtype="int64"),
        "rationale": [r[2] for r in rows],
        "source_row": list(range(1, len(rows) + 1)),
    }
    if row_ids is not None:
        data["row_id"] = list(row_ids)
    frame = pd.DataFrame(data)
    columns = {"prompt": "formatted_prompt", "rating": "Standardized_Rating", "rationale": "Rationale of Rating"}
    return Dataset(frame=frame, mapping=RatingMapping(labels=dict(labels), source="object"),
                   source="<dataframe>", columns=columns, rows_read=len(rows))


def synthetic_ds(rows: int = 300) -> Dataset:
    from daemon.data.synthetic import synthetic_rows

    return make_ds([(r[1], int(r[3]), r[4]) for r in synthetic_rows(rows, seed=11)])


def cost(ds: Dataset, pos: int) -> int:
    row = ds.frame.iloc[pos]
    return len(row["prompt"]) + len(answer_json(int(row["rating"]), row["rationale"]))


# --- few-shot choice ---------------------------------------------------------------------------

def test_few_shot_is_balanced_across_ratings_high_rating_first():
    """Two examples per rating, ordered by rating high to low."""
    ds = synthetic_ds(300)
    chosen = select_few_shot(ds)
    assert [int(ds.frame["rating"].iat[p]) for p in chosen] == [1, 1, 0, 0, -1, -1]
    assert len(set(chosen)) == 6


def test_few_shot_per_rating_setting_is_honoured():
    """per_rating=3 gives three per rating; per_rating=0 gives none."""
    ds = synthetic_ds(300)
    assert [int(ds.frame["rating"].iat[p]) for p in select_few_shot(ds, per_rating=3)] == [1, 1, 1, 0, 0, 0, -1, -1, -1]
    assert select_few_shot(ds, per_rating=0) == []


def test_few_shot_prefers_rows_with_a_rationale():
    """Rows with a non-empty rationale are chosen before rows without one."""
    rows = [(f"case {w} without reason", 1, "" if i != 3 else "   ") for i, w in enumerate("abcdefgh")]
    rows += [("fever and cough for two days", 1, "respiratory signs"),
             ("wheezing and shortness of breath", 1, "asthma flare")]
    ds = make_ds(rows)
    assert sorted(select_few_shot(ds, per_rating=2)) == [8, 9]


def test_few_shot_falls_back_to_rows_without_rationale():
    """When a rating has only one row with a rationale, the second example has none."""
    rows = [("dog bite on left hand", 0, ""), ("ankle sprain playing football", 0, "injury"),
            ("ankle sprain playing football", 0, "")]
    ds = make_ds(rows)
    chosen = select_few_shot(ds, per_rating=2)
    assert chosen == [1, 0]


def test_few_shot_never_uses_excluded_positions():
    """Positions in exclude (the validation hold-out) are never chosen, even when they are the best."""
    ds = synthetic_ds(120)
    first = select_few_shot(ds)
    chosen = select_few_shot(ds, exclude=first)
    assert set(chosen).isdisjoint(first)
    assert [int(ds.frame["rating"].iat[p]) for p in chosen] == [1, 1, 0, 0, -1, -1]


def test_few_shot_exclusion_can_empty_a_rating():
    """Excluding every row of a rating leaves that rating out instead of failing."""
    rows = [("cough", 1, "r"), ("wheeze", 1, "r"), ("sprain", 0, "r"), ("cut finger", 0, "r")]
    ds = make_ds(rows)
    assert sorted(select_few_shot(ds, exclude=[2, 3, 99, -5])) == [0, 1]


def test_few_shot_respects_the_character_budget_and_skips_long_rows():
    """A row too long for the budget is skipped for shorter ones; the total stays under max_chars."""
    long_prompt = "fever " * 100
    rows = [(long_prompt, 1, "long"), ("cough since monday", 1, "short"), ("sore throat and fever", 1, "short")]
    ds = make_ds(rows)
    budget = cost(ds, 1) + cost(ds, 2)
    chosen = select_few_shot(ds, per_rating=2, max_chars=budget)
    assert sorted(chosen) == [1, 2]
    assert sum(cost(ds, p) for p in chosen) == budget
    assert select_few_shot(ds, per_rating=2, max_chars=budget - 1) in ([1], [2])


def test_few_shot_tight_budget_still_covers_every_rating():
    """Ratings are filled round-robin, so a budget for three rows gives both ratings one before any gets two."""
    rows = [("cough and fever", 1, "r"), ("runny nose", 1, "r"), ("chest cold", 1, "r"),
            ("broken toe", 0, "r"), ("dog bite", 0, "r"), ("bee sting", 0, "r")]
    ds = make_ds(rows)
    budget = 3 * max(cost(ds, p) for p in range(6))
    chosen = select_few_shot(ds, per_rating=3, max_chars=budget)
    assert [int(ds.frame["rating"].iat[p]) for p in chosen] == [1, 1, 0]
    assert sum(cost(ds, p) for p in chosen) <= budget


def test_few_shot_spreads_over_distinct_cases():
    """Farthest-first picks one row from each cluster instead of near-duplicates."""
    clusters = {
        "resp": "patient reports productive cough and fever for three days",
        "gi": "vomiting diarrhea abdominal cramps after eating seafood",
        "injury": "fell from ladder with wrist pain and swelling",
    }
    rows = []
    for k in range(4):
        for name, text in clusters.items():
            rows.append((f"{text} visit {k}", 1, f"{name} reason"))
    ds = make_ds(rows)
    chosen = select_few_shot(ds, per_rating=3)
    assert sorted(ds.frame["rationale"].iat[p] for p in chosen) == ["gi reason", "injury reason", "resp reason"]


def test_few_shot_skips_exact_duplicates():
    """A rating whose rows all have the same words yields one example, not copies of it."""
    rows = [("Cough, fever.", 1, "r"), ("cough fever", 1, "r"), ("COUGH   FEVER", 1, "r"), ("sprain", 0, "r")]
    ds = make_ds(rows)
    chosen = select_few_shot(ds, per_rating=2)
    assert len(chosen) == 2
    assert [int(ds.frame["rating"].iat[p]) for p in chosen] == [1, 0]


def test_few_shot_is_deterministic_across_processes():
    """Two interpreters with different hash seeds choose the same rows as this process."""
    script = (
        "import json\n"
        "from tests.data.test_modelset import synthetic_ds\n"
        "from daemon.data.modelset import select_few_shot\n"
        "print(json.dumps(select_few_shot(synthetic_ds(400), per_rating=3)))\n"
    )
    expected = select_few_shot(synthetic_ds(400), per_rating=3)
    for seed in ("1", "987"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=120, check=True)
        assert json.loads(done.stdout) == expected


def test_few_shot_caps_candidates_on_large_datasets():
    """On 20,000 rows the choice is still balanced, under budget and limited to rows that fit."""
    ds = synthetic_ds(20000)
    chosen = select_few_shot(ds, per_rating=2, max_chars=12000)
    assert [int(ds.frame["rating"].iat[p]) for p in chosen] == [1, 1, 0, 0, -1, -1]
    assert sum(cost(ds, p) for p in chosen) <= 12000
    assert all(ds.frame["rationale"].iat[p] != "" for p in chosen)


# --- model names -------------------------------------------------------------------------------

@pytest.mark.parametrize(("base", "stem", "suffix", "expected"), [
    ("llama3.2:1b", "visits", "", "llama3.2-1b-visits:latest"),
    ("llama2", "ED Visits 2024", "-ft", "llama2-ed-visits-2024-ft:latest"),
    ("llama2:latest", "visits", "", "llama2-visits:latest"),
    ("library/llama2:7b", "x", "", "llama2-7b-x:latest"),
    ("hf.co/User/Model.GGUF:Q4_K_M", "a/b", "", "model.gguf-q4_k_m-a-b:latest"),
    ("llama3.2", "Atemwegsinfekte_März", "", "llama3.2-atemwegsinfekte_marz:latest"),
    ("llama3.2", "...", "", "llama3.2:latest"),
    ("llama3.2", "--weird--  name!!", "", "llama3.2-weird-name:latest"),
    ("llama3.2", "a..b", "", "llama3.2-a.b:latest"),
    ("", "___", "", "___:latest"),
    ("", "", "", "model:latest"),
    ("", "中文", "-ft", "model-ft:latest"),
])
def test_ollama_model_name_sanitizes(base, stem, suffix, expected):
    """Names are lowercased, invalid characters become '-', repeats collapse, the tag is :latest."""
    name = ollama_model_name(base, stem, suffix)
    assert name == expected
    assert valid_model_name(name) is True


def test_ollama_model_name_trims_to_80_and_keeps_the_suffix():
    """A long stem is cut so that the model part is at most 80 characters and still ends with the suffix."""
    name = ollama_model_name("llama3.2:1b", "x" * 200, "-ft")
    model, tag = name.split(":")
    assert tag == "latest"
    assert model == "llama3.2-1b-" + "x" * 65 + "-ft"
    assert len(model) == 80
    assert valid_model_name(name) is True


@pytest.mark.parametrize(("name", "ok"), [
    ("llama3.2", True),
    ("llama3.2:1b", True),
    ("library/llama3.2:latest", True),
    ("registry.ollama.ai/library/llama3.2:latest", True),
    ("_private-model:v1.0", True),
    ("a" * 80, True),
    ("a" * 81, False),
    ("", False),
    ("-leading-dash", False),
    (".leading-dot", False),
    ("has space", False),
    ("model:", False),
    (":tag", False),
    ("a:b:c", False),
    ("name.space/model", False),
    ("h/n/m/extra", False),
    ("modèle", False),
    ("model:tag!", False),
])
def test_valid_model_name_follows_the_reference(name, ok):
    """valid_model_name implements section 2 of the Ollama reference."""
    assert valid_model_name(name) is ok


# --- model_set_config --------------------------------------------------------------------------

def test_model_set_config_has_the_documented_content():
    """Every documented key with exact values, the few-shot examples traced to their source rows."""
    labels = {"Match": 1, "Yes": 1, "Does Not Match": 0, "Unknown": -1}
    rows = [("cough and fever", 1, "resp"), ("ankle sprain", 0, 'said "no"'), ("tired", -1, ""),
            ("wheeze", 1, "resp")]
    ds = make_ds(rows, labels=labels, row_ids=["A1", "A2", "A3", "A4"])
    config = model_set_config(ds=ds, base_model="llama3.2:1b", topics="respiratory infections, flu",
                              system="SYSTEM TEXT", few_shot=[0, 1], model_name="llama3.2-1b-visits:latest",
                              defaults={"few_shot_per_rating": 2, "few_shot_max_chars": 12000},
                              created_at="2025-01-02T03:04:05Z", input_hashes={"dataset": "ab" * 32})
    assert config == {
        "base_model": "llama3.2:1b",
        "target_topics": ["respiratory infections", "flu"],
        "rating_mapping": labels,
        "rating_labels": {"1": ["Match", "Yes"], "0": ["Does Not Match"], "-1": ["Unknown"]},
        "system_prompt": "SYSTEM TEXT",
        "few_shot_examples": [
            {"input": "cough and fever", "output": '{"rationale": "resp", "rating": 1}', "rating": 1,
             "source_row": 1, "row_id": "A1"},
            {"input": "ankle sprain", "output": '{"rationale": "said \\"no\\"", "rating": 0}', "rating": 0,
             "source_row": 2, "row_id": "A2"},
        ],
        "output_schema": output_schema([-1, 0, 1]),
        "ollama": {"model_name": "llama3.2-1b-visits:latest", "from": "llama3.2:1b",
                   "parameters": {"temperature": 0}},
        "dataset_size": 4,
        "label_distribution": {"-1": 1, "0": 1, "1": 2},
        "source_sha256": {"dataset": "ab" * 32},
        "defaults": {"few_shot_per_rating": 2, "few_shot_max_chars": 12000},
        "created_at": "2025-01-02T03:04:05Z",
    }
    json.dumps(config)  # JSON-ready: no numpy scalars


def test_model_set_config_rejects_bad_positions_without_leaking_cells():
    """A few-shot position outside the dataset is a ModelSetConfigError that names counts, not cells."""
    ds = make_ds([(f"{MARKER} cough", 1, MARKER)])
    with pytest.raises(ModelSetConfigError) as info:
        model_set_config(ds=ds, base_model="m", topics="t", system="s", few_shot=[0, 5], model_name="m:latest",
                         defaults={"few_shot_per_rating": 2}, created_at="now", input_hashes={})
    assert str(info.value) == ("1 few-shot position(s) outside the dataset's 1 rows "
                               "(choose the few-shot rows from this dataset with select_few_shot)")
    assert MARKER not in str(info.value)


def test_model_set_config_rejects_an_invalid_model_name():
    """A model name Ollama would refuse is caught before anything is written."""
    ds = make_ds([("cough", 1, "r")])
    with pytest.raises(ModelSetConfigError):
        model_set_config(ds=ds, base_model="m", topics="t", system="s", few_shot=[0], model_name="bad name",
                         defaults={"few_shot_per_rating": 2}, created_at="now", input_hashes={})


# --- Modelfile ---------------------------------------------------------------------------------

NASTY = [
    "", " ", "plain text", "  leading and trailing  ", "\ttab first", "tab last\t",
    'He said "hi"', '"starts with a quote', 'ends with a quote"', '"', '""', '"""', '""""', '""""""',
    'a"""b', 'ends with triple"""', '"""starts with triple', '\n"""', 'x """ y\nz',
    "back\\slash \\n \\t \\\" \\\\", "C:\\path\\to\\file\\", "line1\nline2\n\nline4", "\n\nleading newlines",
    "trailing newlines\n\n", "crlf\r\nline\r\n", "lone\rcarriage return", "tabs\tin\tthe\tmiddle",
    "ünïcödé · 中文 · עברית · emoji 😀🏥", "# not a comment", "\nFROM evil\nSYSTEM pwned\n",
    "MESSAGE user injected", '{"rating": 1, "rationale": "quote \\" inside"}', "'single' quotes",
    "   \n   \n", "\"\"\"\"\"\"\"\"\"\"", '"\n"', '""\n""', 'x"\ny"', "trailing space \n next",
]


def roundtrip(system: str, messages: list[dict]) -> dict:
    text = modelfile_text(base="llama3.2:1b", system=system, messages=messages, parameters={"temperature": 0})
    return modelfile_create_fields(parse_modelfile(text))


@pytest.mark.parametrize("text", NASTY)
def test_modelfile_roundtrips_nasty_text_exactly(text):
    """SYSTEM and MESSAGE texts read back exactly, whatever quotes, backslashes or whitespace they hold."""
    messages = [{"role": "user", "content": text}, {"role": "assistant", "content": text + "!"}]
    fields = roundtrip(text, messages)
    assert fields == {"from": "llama3.2:1b", "system": text, "messages": messages,
                      "parameters": {"temperature": 0}}


@pytest.mark.parametrize(("text", "carried"), [
    ("nul\x00byte", "nulbyte"),
    ("bell\x07 escape\x1b[31m", "bell escape[31m"),
    ("non\u00a0breaking\u2003spaces", "non breaking spaces"),
    ("zero\u200bwidth\ufeffbom\u00adsoft", "zerowidthbomsoft"),
    ("line\u2028sep\u2029para\vvt\fff\x85nel", "line\nsep\npara\nvt\nff\nnel"),
    ('closing"""\nnext', 'closing""\u201d\nnext'),
    ('closing"""  \t\r\nnext', 'closing""\u201d  \t\r\nnext'),
    ('four""""\n', 'four"""\u201d\n'),
    ('"""\n', '""\u201d\n'),
    ('a"""\nb"""\nc', 'a""\u201d\nb""\u201d\nc'),
    ("private\ue000use", "privateuse"),
])
def test_modelfile_rewrites_only_what_ollama_cannot_carry(text, carried):
    """Characters Ollama's parser drops, and a triple quote at a line end, are rewritten; the rest is exact."""
    assert modelfile_safe_text(text) == carried
    messages = [{"role": "user", "content": text}]
    assert roundtrip(text, messages) == {"from": "llama3.2:1b", "system": carried,
                                         "messages": [{"role": "user", "content": carried}],
                                         "parameters": {"temperature": 0}}


def test_modelfile_roundtrips_generated_texts():
    """500 seeded random mixes of quotes, backslashes, whitespace, controls and non-ASCII read back as
    modelfile_safe_text says, and that is the identity on text without controls or line-end triple quotes."""
    pieces = ['"', '"""', "\\", "\n", "\r", "\t", " ", "a", "ü", "#", "FROM x", "MESSAGE", "\x00", "\u00a0",
              "\u2028", "😀", '\\"']
    rng = random.Random(20250101)
    for _ in range(500):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        safe = modelfile_safe_text(text)
        assert modelfile_safe_text(safe) == safe
        messages = [{"role": "user", "content": text}, {"role": "assistant", "content": safe}]
        fields = roundtrip(text, messages)
        assert fields["system"] == safe
        assert fields["messages"] == [{"role": "user", "content": safe}, {"role": "assistant", "content": safe}]
        if '"' not in text and not any(c in text for c in "\x00\u00a0\u2028"):
            assert safe == text


def test_modelfile_text_lines():
    """FROM, ADAPTER, SYSTEM, PARAMETER and MESSAGE lines in that order, values quoted only where needed."""
    text = modelfile_text(base="llama3.2:1b", system="Rate it.", adapter="./adapter",
                          messages=[{"role": "user", "content": "cough"}, ("assistant", '{"rating": 1}')],
                          parameters={"temperature": 0, "top_p": 0.9, "stop": ["<|eot_id|>", " end "],
                                      "num_ctx": 4096, "seed": None})
    assert text == (
        "# Written by fine-tuner. Create the model with: ollama create NAME -f Modelfile\n"
        "FROM llama3.2:1b\n"
        "ADAPTER ./adapter\n"
        'SYSTEM """Rate it."""\n'
        "PARAMETER temperature 0\n"
        "PARAMETER top_p 0.9\n"
        "PARAMETER stop <|eot_id|>\n"
        'PARAMETER stop """ end """\n'
        "PARAMETER num_ctx 4096\n"
        'MESSAGE user """cough"""\n'
        'MESSAGE assistant """{"rating": 1}"""\n'
    )
    assert modelfile_create_fields(parse_modelfile(text)) == {
        "from": "llama3.2:1b", "adapter": "./adapter", "system": "Rate it.",
        "parameters": {"temperature": 0, "top_p": 0.9, "stop": ["<|eot_id|>", " end "], "num_ctx": 4096},
        "messages": [{"role": "user", "content": "cough"}, {"role": "assistant", "content": '{"rating": 1}'}],
    }


def test_modelfile_text_quotes_odd_paths():
    """A FROM path with spaces round the edges or a leading quote is triple-quoted and reads back."""
    text = modelfile_text(base=' /models/my model"', system=None, messages=[], parameters={})
    assert parse_modelfile(text) == [("FROM", ' /models/my model"')]
    text = modelfile_text(base='"quoted', system=None, messages=[], parameters={})
    assert parse_modelfile(text) == [("FROM", '"quoted')]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"base": "llama\n3"}, "FROM must be a non-empty single line of printable characters"),
    ({"base": ""}, "FROM must be a non-empty single line of printable characters"),
    ({"adapter": "./a\x00"}, "ADAPTER must be a non-empty single line of printable characters"),
    ({"messages": [{"role": "tool", "content": MARKER}]},
     "message 1 has role 'tool'; it must be one of system, user, assistant"),
    ({"parameters": {"bad name": 1}}, "invalid parameter name 'bad name'"),
])
def test_modelfile_text_rejects_what_cannot_be_written(kwargs, message):
    """Bad FROM/ADAPTER values, roles and parameter names raise ModelSetConfigError without cell text."""
    args = {"base": "llama3.2", "system": MARKER, "messages": [], "parameters": {}} | kwargs
    with pytest.raises(ModelSetConfigError) as info:
        modelfile_text(**args)
    assert info.value.message == message
    assert MARKER not in str(info.value)


def test_parse_modelfile_reads_a_handwritten_file():
    """Comments, case-insensitive instructions, bare/quoted/triple-quoted values and repeated stops."""
    text = (
        "\ufeff# a comment line\n"
        "from llama3.2:1b\n"
        "\n"
        "   # indented comment\n"
        'SYSTEM "You are terse."\n'
        "Parameter temperature 0.2\n"
        "PARAMETER stop <|eot_id|>\r\n"
        "PARAMETER stop USER:\n"
        'TEMPLATE """{{ .System }}\n{{ .Prompt }}"""\n'
        'LICENSE """MIT"""\n'
        "LICENSE Apache-2.0\n"
        "MESSAGE user Is it flu?   \n"
        'MESSAGE assistant """{"rating": 1,\n"rationale": "fever"}"""'
    )
    pairs = parse_modelfile(text)
    assert pairs == [
        ("FROM", "llama3.2:1b"),
        ("SYSTEM", "You are terse."),
        ("PARAMETER", "temperature 0.2"),
        ("PARAMETER", "stop <|eot_id|>"),
        ("PARAMETER", "stop USER:"),
        ("TEMPLATE", "{{ .System }}\n{{ .Prompt }}"),
        ("LICENSE", "MIT"),
        ("LICENSE", "Apache-2.0"),
        ("MESSAGE", "user: Is it flu?"),
        ("MESSAGE", 'assistant: {"rating": 1,\n"rationale": "fever"}'),
    ]
    assert modelfile_create_fields(pairs) == {
        "from": "llama3.2:1b", "system": "You are terse.", "template": "{{ .System }}\n{{ .Prompt }}",
        "license": ["MIT", "Apache-2.0"],
        "messages": [{"role": "user", "content": "Is it flu?"},
                     {"role": "assistant", "content": '{"rating": 1,\n"rationale": "fever"}'}],
        "parameters": {"temperature": 0.2, "stop": ["<|eot_id|>", "USER:"]},
    }


@pytest.mark.parametrize(("text", "message"), [
    ("SYSTEM hello\n", "Modelfile line 2: no FROM line"),
    ("FROM x\nMESSAGE tool hi\n", "Modelfile line 2: message role must be one of system, user, assistant"),
    ("FROM x\nBOGUS thing\n", "Modelfile line 2: unknown instruction; use one of FROM, LICENSE, TEMPLATE, "
                              "SYSTEM, ADAPTER, DRAFT, RENDERER, PARSER, PARAMETER, MESSAGE, REQUIRES"),
    (f'FROM x\nSYSTEM """{MARKER}\nno end\n', "Modelfile line 4: unterminated quoted value at end of file"),
    (f'FROM x\nSYSTEM "{MARKER}', "Modelfile line 2: unterminated quoted value at end of file"),
    ("FROM x\nSYSTEM\n", "Modelfile line 2: an instruction must be followed by a space and its argument"),
    ("FROM", "Modelfile line 1: unexpected end of file after an instruction"),
    ("FROM x\nPARAMETER temp-erature 1\n",
     "Modelfile line 2: an instruction must be followed by a space and its argument"),
])
def test_parse_modelfile_errors_name_the_line_not_the_text(text, message):
    """What Ollama rejects raises ModelSetConfigError naming the line, never the value's text."""
    with pytest.raises(ModelSetConfigError) as info:
        parse_modelfile(text)
    assert info.value.message == message
    assert MARKER not in str(info.value)


def test_parse_modelfile_drops_non_printable_characters_like_ollama():
    """Control characters inside a hand-written value are dropped, as Ollama's parser does."""
    assert parse_modelfile('FROM x\nSYSTEM """a\x00b\x1bc\u200bd"""\n\x00PARAMETER seed 1') == [
        ("FROM", "x"), ("SYSTEM", "abcd"), ("PARAMETER", "seed 1")]


def test_parse_modelfile_of_a_parameter_with_a_non_number_fails():
    """A numeric parameter whose value is not a number is an error when turned into create fields."""
    with pytest.raises(ModelSetConfigError) as info:
        modelfile_create_fields(parse_modelfile("FROM x\nPARAMETER temperature warm\n"))
    assert info.value.message == "PARAMETER temperature has a value that is not a number"
