"""Tests of the local rater's child (``python -m daemon.quality.generate``) on the tiny local Llama.

Real child processes, real files: the spec, the input and output JSONL, the progress lines.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.data.prompts import answer_json, system_prompt
from daemon.data.synthetic import MAPPING, synthetic_rows
from daemon.training.supervisor import child_env

# one xdist worker runs the whole module (make test runs the suite on several), so that its
# module-scoped fixture is built once
pytestmark = pytest.mark.xdist_group("generate")

ROWS = 10
BATCH = 4
MAX_NEW_TOKENS = 32


def conversations(rows: int = ROWS) -> list[list[dict]]:
    """System prompt + one synthetic visit each; every third visit is repeated, so the prompts of
    one batch differ in length and the shorter ones are padded."""
    system = {"role": "system", "content": system_prompt("respiratory infections", MAPPING)}
    out = []
    for i, row in enumerate(synthetic_rows(rows, seed=19)):
        visit = row[1] if i % 3 else f"{row[1]}\n{row[1]}"
        out.append([system, {"role": "user", "content": visit}])
    return out


def run_child(tmp_path: Path, spec: dict | str, convs: list[list[dict]] | None = None) -> subprocess.CompletedProcess:
    """Write the input and the spec (a dict, or raw text) into ``tmp_path`` and run the child."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    if convs is not None:
        (tmp_path / "input.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    (tmp_path / "spec.json").write_text(spec if isinstance(spec, str) else json.dumps(spec))
    return subprocess.run([sys.executable, "-m", "daemon.quality.generate", str(tmp_path / "spec.json")],
                          capture_output=True, text=True, env=child_env(), timeout=300)


def spec_for(tmp_path: Path, base: Path, **extra) -> dict:
    return {"base_ref": str(base), "adapter_dir": None, "input": str(tmp_path / "input.jsonl"),
            "output": str(tmp_path / "output.jsonl"), "batch_size": BATCH,
            "max_new_tokens": MAX_NEW_TOKENS, "threads": 1, **extra}


def read_output(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def batched_and_single(tmp_path_factory, tiny_model_dir):
    """The same conversations answered by the child in batches of BATCH and one at a time:
    (batched run, its output records, single run, its output records)."""
    root = tmp_path_factory.mktemp("generate")
    runs = []
    for name, batch in (("batched", BATCH), ("single", 1)):
        folder = root / name
        proc = run_child(folder, spec_for(folder, tiny_model_dir, batch_size=batch), conversations())
        assert proc.returncode == 0, proc.stderr
        runs += [proc, read_output(folder / "output.jsonl")]
    return tuple(runs)


def test_batched_answers_equal_one_at_a_time(batched_and_single):
    """Greedy answers in left-padded batches are exactly the answers generated one record at a time."""
    _batched, batched_out, _single, single_out = batched_and_single
    assert [r["text"] for r in batched_out] == [r["text"] for r in single_out]


def test_output_has_one_record_per_input_in_order(batched_and_single):
    """The output holds one {index, text, latency_s} per conversation, in input order."""
    _batched, out, _single, _single_out = batched_and_single
    assert [r["index"] for r in out] == list(range(ROWS))
    assert [sorted(r) for r in out] == [["index", "latency_s", "text"]] * ROWS
    assert all(isinstance(r["text"], str) and r["latency_s"] > 0 for r in out)


def test_batch_shares_its_time_equally(batched_and_single):
    """Every record of one batch carries the same latency: the batch's time over its size."""
    _batched, out, _single, _single_out = batched_and_single
    latencies = [r["latency_s"] for r in out]
    assert [len(set(latencies[i:i + BATCH])) for i in range(0, ROWS, BATCH)] == [1, 1, 1]


def test_progress_lines_count_batches(batched_and_single):
    """stdout holds one generate_progress line before the first batch and one after each batch."""
    batched, _out, single, _single_out = batched_and_single
    events = [json.loads(line) for line in batched.stdout.splitlines()]
    assert events == [{"event": "generate_progress", "done": n, "total": ROWS} for n in (0, 4, 8, 10)]
    assert [json.loads(line)["done"] for line in single.stdout.splitlines()] == list(range(ROWS + 1))


def test_answers_stop_at_the_end_of_turn_without_special_tokens(batched_and_single):
    """Generation stops at <|eot_id|>, which the tiny model writes right after an answer's closing
    '<rating>}', and the texts hold no special token (the base model's answers need not be valid JSON)."""
    _batched, out, _single, _single_out = batched_and_single
    assert [re.search(r"\d}$", r["text"]) is not None for r in out] == [True] * ROWS
    assert [r["text"] for r in out if "<|" in r["text"]] == []


def test_prompts_use_left_padding_and_the_trainers_rendering(tiny_model_dir):
    """Batches are padded on the left, and a prompt is the exact prefix the trainer masks in training."""
    from daemon.quality.generate import load, render_prompt
    from daemon.training.trainer import encode_example

    tokenizer, _model, _device = load(str(tiny_model_dir), None, "cpu")
    convs = conversations(2)
    texts = [render_prompt(tokenizer, c) for c in convs]
    enc = tokenizer(texts, add_special_tokens=False, padding=True)
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    short, pad = lengths.index(min(lengths)), max(lengths) - min(lengths)
    assert tokenizer.padding_side == "left"
    assert enc["attention_mask"][short] == [0] * pad + [1] * min(lengths)
    assert enc["input_ids"][short][:pad] == [tokenizer.pad_token_id] * pad
    record = [*convs[0], {"role": "assistant", "content": answer_json(1, "x")}]
    ids, labels = encode_example(tokenizer, record)
    prompt_ids = tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    assert ids[:len(prompt_ids)] == prompt_ids
    assert labels.index(next(t for t in labels if t != -100)) == len(prompt_ids)


def test_generate_function_returns_one_answer_per_conversation(tiny_model_dir):
    """generate() in-process returns {text, latency_s} per conversation, the child's texts for the same input."""
    from daemon.quality.generate import generate

    convs = conversations(3)
    answers = generate(str(tiny_model_dir), None, convs, batch_size=2, max_new_tokens=MAX_NEW_TOKENS)
    alone = [generate(str(tiny_model_dir), None, [c], batch_size=1, max_new_tokens=MAX_NEW_TOKENS)[0]
             for c in convs]
    assert [sorted(a) for a in answers] == [["latency_s", "text"]] * 3
    assert [a["text"] for a in answers] == [a["text"] for a in alone]


def test_empty_input_writes_an_empty_output(tmp_path, tiny_model_dir):
    """No conversations: exit 0, an empty output file and one progress line saying 0 of 0."""
    proc = run_child(tmp_path, spec_for(tmp_path, tiny_model_dir), [])
    assert proc.returncode == 0
    assert (tmp_path / "output.jsonl").read_text() == ""
    assert [json.loads(line) for line in proc.stdout.splitlines()] == [
        {"event": "generate_progress", "done": 0, "total": 0}]


@pytest.mark.parametrize(("change", "code", "message"), [
    ({"input": None, "output": 3}, 2, "the spec lacks input, output (a string each)"),
    ({"batch_size": 0}, 2, "the spec's batch_size must be an integer of at least 1"),
    ({"max_new_tokens": "96"}, 2, "the spec's max_new_tokens must be an integer of at least 1"),
    ({"adapter_dir": "/nonexistent/adapter"}, 2, "the spec's adapter_dir holds no adapter_config.json"),
    ({"base_ref": "/nonexistent/weights"}, 2,
     "cannot load the weights from the spec's base_ref or adapter_dir (OSError)"),
], ids=["missing-keys", "zero-batch", "string-tokens", "no-adapter", "no-weights"])
def test_bad_spec_exits_with_one_line(tmp_path, tiny_model_dir, change, code, message):
    """A bad spec ends the child with its exit code, one error line on stderr and nothing on stdout
    beyond the progress start."""
    spec = {k: v for k, v in {**spec_for(tmp_path, tiny_model_dir), **change}.items() if v is not None}
    proc = run_child(tmp_path, spec, conversations(1))
    assert proc.returncode == code
    assert proc.stderr.splitlines() == [f"generate failed - {message}"]
    assert not (tmp_path / "output.jsonl").exists() or read_output(tmp_path / "output.jsonl") == []


def test_unreadable_spec_and_bad_input_line(tmp_path, tiny_model_dir):
    """A spec that is not JSON exits 2; an input line that does not end with the user turn exits 3,
    naming the line number and no record text."""
    proc = run_child(tmp_path / "a", "{not json")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"generate failed - cannot read the spec {tmp_path / 'a' / 'spec.json'} "
                                        "(JSONDecodeError)"]
    convs = conversations(2)
    convs[1] = [*convs[1], {"role": "assistant", "content": "SECRETANSWER"}]
    proc = run_child(tmp_path / "b", spec_for(tmp_path / "b", tiny_model_dir), convs)
    assert proc.returncode == 3
    assert proc.stderr.splitlines() == ['generate failed - input line 2 is not a {"messages": [...]} record '
                                        "ending with the user turn"]
    assert proc.stdout == ""


@pytest.mark.parametrize("text, expected", [
    ('{"rating": 1, "rationale": "a } in text"}{"rating": 0', '{"rating": 1, "rationale": "a } in text"}'),
    ('  {"rating": -1}\n<start_of_turn>model', '{"rating": -1}'),
    ('{"rating": 1, "rationale": "cut', None),
    ('Sure! {"rating": 1}', None),
    ('', None),
])
def test_first_object_is_the_answer_a_json_grammar_would_end(text, expected):
    """The answer ends where its first JSON object closes (braces inside strings do not count);
    text before the object or an object never closed leaves no answer to cut."""
    from daemon.quality.generate import first_object

    assert first_object(text) == expected


def test_generation_stops_once_every_row_has_closed_its_object_or_cannot(tiny_model_dir):
    """The stopping criterion on real token ids: a row is done once its JSON object closes or once it
    starts with anything but '{'; a row still inside its object goes on."""
    import torch
    from daemon.quality.generate import _ObjectClosed, load

    tokenizer, _model, _device = load(str(tiny_model_dir), None, "cpu")
    prompt = tokenizer("Rate this.", add_special_tokens=False)["input_ids"]
    rows = ['{"rating": 1, "rationale": "ok"} and more', '{"rating": 1, "rationale": "still', "No."]
    encoded = [prompt + tokenizer(r, add_special_tokens=False)["input_ids"] for r in rows]
    width = max(len(e) for e in encoded)
    ids = torch.tensor([e + [tokenizer.pad_token_id] * (width - len(e)) for e in encoded])
    done = _ObjectClosed(tokenizer, len(prompt))(ids, None)
    assert done.tolist() == [True, False, True]


def test_teacher_forced_confidences_sum_to_one_and_match_one_sequence_at_a_time(tiny_model_dir):
    """score_values (left-padded batch, logits only at the scored positions) gives each allowed
    rating the probability its tokens get after the answer's text up to the rating, normalised over
    the ratings: the same as scoring each whole sequence alone, unpadded; an answer without a
    rating gets None."""
    import math

    import torch

    from daemon.quality.generate import load, render_prompt, score_values

    tokenizer, model, device = load(str(tiny_model_dir), None, "cpu")
    convs = conversations(3)
    prompts = [render_prompt(tokenizer, c) for c in convs]
    texts = [answer_json(1, "fever and cough"), answer_json(-1, "unclear"), "It looks like a match"]
    values = sorted(MAPPING.values())
    probs = score_values(tokenizer, model, device, prompts, texts, values)
    assert probs[2] is None
    for prompt, text, got in zip(prompts[:2], texts[:2], probs[:2]):
        assert sorted(got) == sorted(str(v) for v in values)
        assert sum(got.values()) == pytest.approx(1.0, abs=1e-9)
        start = text.rindex('"rating": ') + len('"rating": ')
        end = start + len(text[start:].split("}")[0])
        seqs = {v: tokenizer(prompt + text[:start] + str(v) + text[end:end + 1], add_special_tokens=False)["input_ids"]
                for v in values}
        shared = min(len(s) for s in seqs.values())
        shared = next((k for k in range(shared) if len({s[k] for s in seqs.values()}) > 1), shared)
        alone = {}
        with torch.inference_mode():
            for v, ids in seqs.items():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits.float()[0], dim=-1)
                alone[v] = sum(float(logp[k - 1, ids[k]]) for k in range(shared, len(ids)))
        norm = sum(math.exp(x) for x in alone.values())
        assert {str(v): math.exp(x) / norm for v, x in alone.items()} == pytest.approx(got, rel=1e-4)


def test_a_direct_rating_is_one_pass_over_the_allowed_ratings_first_tokens(tiny_model_dir):
    """direct_answers (left-padded batch, logits for one position) gives each allowed rating the
    probability of its first own token right after ``{"rating": `` (the tokens all ratings share
    included in the prompt), normalised over the ratings, as a grammar-constrained decoder would;
    the answer is the most likely rating, the same as each prompt scored alone and unpadded."""
    import math

    import torch

    from daemon.quality.generate import DIRECT_PREFIX, direct_answers, load, render_prompt

    tokenizer, model, device = load(str(tiny_model_dir), None, "cpu")
    prompts = [render_prompt(tokenizer, c) for c in conversations(5)]
    values = sorted(MAPPING.values())
    got = direct_answers(tokenizer, model, device, prompts, values)
    assert len(got) == 5
    for prompt, (text, probs) in zip(prompts, got):
        seqs = {v: tokenizer(f"{prompt}{DIRECT_PREFIX}{v}}}", add_special_tokens=False)["input_ids"] for v in values}
        shared = next(k for k in range(min(map(len, seqs.values()))) if len({s[k] for s in seqs.values()}) > 1)
        with torch.inference_mode():
            logp = torch.log_softmax(
                model(input_ids=torch.tensor([seqs[values[0]][:shared]])).logits.float()[0, -1], -1)
        alone = {v: math.exp(float(logp[s[shared]])) for v, s in seqs.items()}
        norm = sum(alone.values())
        assert probs == pytest.approx({str(v): p / norm for v, p in alone.items()}, rel=1e-4)
        assert json.loads(text) == {"rating": max(values, key=lambda v: (probs[str(v)], -v))}


def test_the_child_rates_directly_when_the_spec_asks(tmp_path, tiny_model_dir):
    """With ``direct: true`` the child writes one ``{"rating": v}`` answer per record with its
    probabilities, in order, and a spec asking for it without the allowed ratings is refused."""
    convs = conversations(6)
    proc = run_child(tmp_path, spec_for(tmp_path, tiny_model_dir, direct=True, values=[-1, 0, 1]), convs)
    assert proc.returncode == 0, proc.stderr
    out = read_output(tmp_path / "output.jsonl")
    assert [o["index"] for o in out] == list(range(6))
    for o in out:
        assert sorted(o["probs"]) == ["-1", "0", "1"] and sum(o["probs"].values()) == pytest.approx(1.0)
        assert json.loads(o["text"])["rating"] == int(max(o["probs"], key=o["probs"].get))
    refused = run_child(tmp_path / "no-values", spec_for(tmp_path / "no-values", tiny_model_dir, direct=True), convs)
    assert (refused.returncode, refused.stderr.strip()) == (
        2, "generate failed - the spec's direct must be true or false, and true needs values")


def test_ratings_that_share_their_first_token_are_told_apart_one_token_further(tiny_model_dir):
    """-2 and -1 share their first token after ``{"rating": `` (" -"): each gets that token's
    probability times its next token's, normalised over the two (a one-token step on the first
    pass's cache), as a constrained decoder decides; checked against plain unpadded passes."""
    import math

    import torch

    from daemon.quality.generate import DIRECT_PREFIX, direct_answers, load, render_prompt

    tokenizer, model, device = load(str(tiny_model_dir), None, "cpu")
    prompts = [render_prompt(tokenizer, c) for c in conversations(3)]
    values = [-2, -1, 0, 1]
    got = direct_answers(tokenizer, model, device, prompts, values)
    for prompt, (text, probs) in zip(prompts, got):
        seqs = {v: tokenizer(f"{prompt}{DIRECT_PREFIX}{v}}}", add_special_tokens=False)["input_ids"] for v in values}
        k = next(k for k in range(min(map(len, seqs.values()))) if len({s[k] for s in seqs.values()}) > 1)
        assert seqs[-2][k] == seqs[-1][k] and len({seqs[v][k] for v in values}) == 3  # the shared " -"
        with torch.inference_mode():
            logp1 = torch.log_softmax(model(input_ids=torch.tensor([seqs[0][:k]])).logits.float()[0, -1], -1)
            logp2 = torch.log_softmax(model(input_ids=torch.tensor([seqs[-1][:k + 1]])).logits.float()[0, -1], -1)
        inner = {v: math.exp(float(logp2[seqs[v][k + 1]])) for v in (-2, -1)}
        weight = {v: math.exp(float(logp1[seqs[v][k]])) for v in (0, 1)}
        weight.update({v: math.exp(float(logp1[seqs[v][k]])) * inner[v] / sum(inner.values()) for v in (-2, -1)})
        norm = sum(weight.values())
        assert probs == pytest.approx({str(v): w / norm for v, w in weight.items()}, rel=1e-4)
        assert json.loads(text) == {"rating": max(values, key=lambda v: (probs[str(v)], -v))}


def test_the_local_raters_progress_reaches_the_caller_in_its_own_context(tiny_model_dir):
    """The local rater relays the child's progress from a thread of its own: each call sees the
    caller's bound job_id, so progress lines reach the job's status and job.log."""
    import structlog

    from daemon.quality.backends import LocalRater

    seen = []
    with structlog.contextvars.bound_contextvars(job_id="visits-20261207T000000-0a1b2c3d"):
        LocalRater(tiny_model_dir, batch_size=2, max_new_tokens=8).answer(
            conversations(4), on_progress=lambda done, total: seen.append(
                (done, total, structlog.contextvars.get_contextvars().get("job_id"))))
    assert seen[-1][:2] == (4, 4)
    assert {job for _, _, job in seen} == {"visits-20261207T000000-0a1b2c3d"}
