"""The command line as a user runs it: real processes, real files, exit codes, one-line errors."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import mounted

ROOT = Path(__file__).resolve().parent.parent
MARKER = "ZZCLIMARKER"


def run(*args: str, cwd: Path, env: dict | None = None, script: list[str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "FINE_TUNER_OLLAMA__HOST": "http://127.0.0.1:9", "FINE_TUNER_OLLAMA__RETRIES": "0",
                "PYTHONPATH": str(ROOT), **(env or {})}
    cmd = [sys.executable, *(script or ["-m", "daemon"]), *args]
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def dataset(tmp_path, synthetic_csv, mapping_dict):
    csv_path = synthetic_csv(60)
    text = csv_path.read_text().replace("Triage note:", f"Triage note: {MARKER}")
    csv_path.write_text(text)
    mapping = tmp_path / "visits.mapping.json"
    mapping.write_text(json.dumps(mapping_dict))
    return csv_path, mapping


def test_process_model_set(tmp_path, dataset):
    """process writes the model set into outputs/<stem>/ and exits 0; the log has no cell value."""
    csv_path, mapping = dataset
    res = run("process", "--input", str(csv_path), "--mapping", str(mapping), "--model", "llama3.2:1b",
              "--topics", "respiratory infections", "--approach", "model_set", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "outputs" / "visits"
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "baseline.json", "fine_tuning_metadata.json",
                                                     "model_set_config.json", "validation_data.jsonl"]
    assert "approach: model_set" in res.stdout
    log_text = (tmp_path / "fine_tuner.log").read_text()
    assert "approach_selected" in log_text and MARKER not in log_text
    assert res.stderr == ""


def test_process_bad_input_is_one_line_error(tmp_path):
    """A dataset with missing columns exits 1 with one line on stderr suggesting the column."""
    bad = tmp_path / "bad.csv"
    bad.write_text("formatted_prompt,Standardised_Rating\nhello,1\n")
    res = run("process", "--input", str(bad), "--model", "m", "--topics", "t", cwd=tmp_path)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fine-tuner: error: ")
    assert "Standardised_Rating" in lines[0]
    assert not (tmp_path / "outputs" / "bad").exists()


def test_usage_errors_exit_2(tmp_path):
    """Unknown flags, missing files and bad config values are usage errors (exit 2)."""
    assert run("process", "--bogus", cwd=tmp_path).returncode == 2
    res = run("process", "--input", "missing.csv", "--model", "m", cwd=tmp_path)
    assert res.returncode == 2 and "no such file" in res.stderr
    res = run("validate", "--input", "x.csv", cwd=tmp_path, env={"FINE_TUNER_EPOCHS": "many"})
    assert res.returncode == 2 and "defaults.epochs" in res.stderr


def test_watch_config_error_exits_78(tmp_path):
    """A configuration error for watch exits 78 (the unit does not restart on it)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("watch:\n  workers: lots\n")
    res = run("watch", "--config", str(cfg), "--root", str(tmp_path), "--once", cwd=tmp_path)
    assert res.returncode == 78
    assert "watch.workers" in res.stderr


def test_validate_report(tmp_path, dataset):
    """validate reports rows, balance and lengths as JSON, exit 0; an unusable file exits 1."""
    csv_path, mapping = dataset
    res = run("validate", "--input", str(csv_path), "--mapping", str(mapping), "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["usable"] is True
    assert report["rows"]["used"] == 60
    assert sum(v["count"] for v in report["label_balance"].values()) == 60
    assert report["prompt_chars"]["max"] >= report["prompt_chars"]["min"] > 0
    assert MARKER not in res.stdout
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    res = run("validate", "--input", str(empty), cwd=tmp_path)
    assert res.returncode == 1
    assert "NOT usable" in res.stdout


def test_validate_text_report_points_at_check_for_the_machine(tmp_path, dataset):
    """The text report says the file is usable, counts rows, and sends fine-tuning to `check`."""
    csv_path, mapping = dataset
    res = run("validate", "--input", str(csv_path), "--mapping", str(mapping), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == f"{csv_path.name}: usable"
    assert "  rows: 60 used of 60 read (dropped: none)" in lines
    assert "  recommended approach: head (enough rows for a head or a fine-tune; what this machine builds: " \
           "fine-tuner check MODEL)" in lines
    assert MARKER not in res.stdout


def test_check_reports_failed_checks(tmp_path):
    """check exits 1 for a model without weights and shows each check."""
    res = run("check", "no-such-model:7b", "--json", cwd=tmp_path)
    assert res.returncode == 1
    report = json.loads(res.stdout)
    assert report["supported"] is False
    assert {"trainer_packages", "base_weights"} <= {c["name"] for c in report["checks"]}


@pytest.mark.parametrize("model, why", [
    ("/etc/shadow", "a filesystem path"),
    ("bad name!!", "it holds whitespace or control characters"),
    ("x\x1b[2Jy", "it holds whitespace or control characters"),
])
def test_check_refuses_a_name_that_is_not_an_ollama_model_name(tmp_path, fake_ollama, model, why):
    """check of a path or a malformed name is a usage error (exit 2, one line, the job files' rule)
    and asks Ollama nothing."""
    res = run("check", model, cwd=tmp_path, env={"FINE_TUNER_OLLAMA__HOST": fake_ollama.url})
    assert (res.returncode, res.stdout) == (2, "")
    shown = model.replace("\x1b", "\\x1b")
    assert res.stderr.splitlines() == [
        f"fine-tuner: error: MODEL '{shown}': not a valid Ollama model name ({why}); use "
        "[host[:port]/][namespace/]name[:tag] made of letters, digits, '_', '.' and '-', e.g. llama3.2:1b"]
    assert fake_ollama.accepted == 0


def test_check_says_what_approach_auto_builds_here(tmp_path, tiny_model_dir):
    """check names what a job with approach auto builds for the model on this machine: the head when
    its base weights are on disk (here the tiny model's folder), a model set when nothing is known
    of its weights (fine-tuning NOT supported)."""
    (tmp_path / "config.yaml").write_text(json.dumps({"base_models": {"tiny-llama:latest": str(tiny_model_dir)},
                                                      "ollama": {"host": "http://127.0.0.1:9", "retries": 0}}))
    res = run("check", "tiny-llama", cwd=tmp_path)
    assert res.stdout.splitlines()[1] == ("approach auto builds here: the head (the base weights are on disk and the "
                                          "training extra is installed)")
    assert json.loads(run("check", "tiny-llama", "--json", cwd=tmp_path).stdout)["auto_builds"] == "head"
    res = run("check", "no-such-model:7b", "--json", cwd=tmp_path)
    assert (res.returncode, json.loads(res.stdout)["auto_builds"]) == (1, "model_set")


def test_check_says_whether_axolotl_can_train(tmp_path):
    """check reports axolotl's usability: required with training.backend axolotl, shown as
    optional with the built-in trainer; its version is a fact."""
    checks = {}
    for backend in ("axolotl", "local"):
        res = run("check", "no-such-model:7b", "--json", cwd=tmp_path, env={"FINE_TUNER_TRAINING__BACKEND": backend})
        report = json.loads(res.stdout)
        checks[backend] = next(c for c in report["checks"] if c["name"] == "axolotl_backend")
        assert report["facts"]["axolotl_version"] == importlib.metadata.version("axolotl")
    assert (checks["axolotl"]["ok"], checks["axolotl"]["required"]) == (True, True)
    assert (checks["local"]["ok"], checks["local"]["required"]) == (True, False)
    assert "accelerate launch -m axolotl.cli.train" in checks["axolotl"]["detail"]
    res = run("check", "no-such-model:7b", cwd=tmp_path, env={"FINE_TUNER_TRAINING__BACKEND": "axolotl"})
    assert any(line.startswith("  [ok ] axolotl_backend: axolotl ") for line in res.stdout.splitlines())


def test_seed_script_command_line(tmp_path, dataset):
    """The original scripts/fine_tuner.py command line works and writes into outputs/<stem>/, not
    loose files into outputs/."""
    csv_path, _ = dataset
    res = run("--input", str(csv_path), "--model", "llama2", "--topics", "respiratory infections",
              "--epochs", "5", "--learning-rate", "0.001", cwd=tmp_path,
              script=[str(ROOT / "scripts" / "fine_tuner.py")])
    assert res.returncode == 0, res.stderr
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == ["visits"]
    meta = json.loads((tmp_path / "outputs" / "visits" / "fine_tuning_metadata.json").read_text())
    assert meta["parameters"]["epochs"] == 5 and meta["parameters"]["learning_rate"] == 0.001
    assert meta["mapping"]["inferred"] is True
    assert meta["approach"] == "model_set"


def test_daemon_import_is_light():
    """Importing the package, the CLI, the facade and the service pulls in no ML library."""
    code = ("import sys, daemon, daemon.cli, daemon.fine_tuner, daemon.serving.capability, "
            "daemon.training.supervisor, daemon.inbox.service;"
            "bad=[m for m in ('torch','transformers','peft','accelerate') if m in sys.modules];"
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.timeout(660)
def test_demo_runs_offline(tmp_path):
    """demo_fine_tuner.py builds a model set and a real fine-tune on a generated dataset and prints
    the fine-tune's evaluation table."""
    # a real fine-tune: about two minutes on two busy cores, so the safety net is wider than run()'s
    res = run(cwd=tmp_path, script=[str(ROOT / "demo_fine_tuner.py")], env={"FINE_TUNER_OLLAMA__HOST": "http://127.0.0.1:9"},
              timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "model set: ok=True" in res.stdout
    assert "fine-tune: ok=True" in res.stdout
    assert (tmp_path / "demo_outputs" / "fine_tune" / "adapter" / "adapter_model.safetensors").is_file()
    # the evaluation
    assert "| | fine-tune | bag-of-words baseline | model set | base model (zero-shot) |" in res.stdout
    assert (tmp_path / "demo_outputs" / "fine_tune" / "evaluation.json").is_file()
    # the answer-quality page shows the table the demo prints: the same columns, rows and backends (figures vary)
    readme = (ROOT / "docs" / "quality.md").read_text(encoding="utf-8")
    shown = readme.split("`.venv/bin/python demo_fine_tuner.py` prints it", 1)[1].split("```text\n", 1)[1]
    assert _table_shape(shown.split("```", 1)[0]) == _table_shape(res.stdout)


def _table_shape(text: str) -> list[list[str]]:
    """The first side-by-side table in ``text``: its header, its row names and its backend row."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    table = lines[:lines.index(next(line for line in lines if line.startswith("| backend"))) + 1]
    return [table[0].split(" | ")] + [[line.split(" | ")[0]] for line in table[1:-1]] + [table[-1].split(" | ")]


def _on_a_terminal(args: list[str], *, cwd: Path, env: dict) -> tuple[int, str, str]:
    """Run a command with stderr on a pseudo-terminal: (exit code, stdout, what the terminal showed)."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    stdout, _ = proc.communicate(timeout=120)
    return proc.returncode, stdout, b"".join(chunks).decode(errors="replace")


def test_process_fine_tune_shows_progress_bar_on_a_terminal(tmp_path, dataset, tiny_model_dir):
    """With stderr on a terminal, process draws a training progress bar that reaches 100 %."""
    csv_path, mapping = dataset
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"base_models": {"tiny-llama:latest": str(tiny_model_dir)},
                               "ollama": {"register": "off"}, "evaluation": {"enabled": "off"},
                               "training": {"sequence_len": 512, "device": "cpu"}}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FINE_TUNER_OLLAMA__HOST": "http://127.0.0.1:9",
           "FINE_TUNER_OLLAMA__RETRIES": "0"}
    code, stdout, screen = _on_a_terminal(
        [sys.executable, "-m", "daemon", "process", "--config", str(cfg), "--input", str(csv_path),
         "--mapping", str(mapping), "--model", "tiny-llama", "--topics", "respiratory infections",
         "--approach", "fine_tune", "--epochs", "1"], cwd=tmp_path, env=env)
    assert code == 0, screen[-2000:]
    assert "approach: fine_tune" in stdout
    assert "training [" in screen and "100.0%" in screen
    assert MARKER not in screen


DAMAGED = ("move the damaged journal file aside, with its -wal and -shm files if any; the service then "
           "starts with a new, empty journal")
WRITABLE = "make the state directory and the journal writable for the service, then start it again"


def _journal_with_jobs(path: Path, jobs: int = 300) -> None:
    from daemon.inbox.journal import InputFile, Journal

    with Journal(path) as j:
        for i in range(jobs):
            j.add_job(f"j{i}", "s", [InputFile("dataset", "v.csv", "a" * 64, 1)], f"k{i}")


def _run_on(tmp_path: Path, command: str) -> subprocess.CompletedProcess:
    return run(command, "--root", str(tmp_path), *(["--once"] if command == "watch" else []), cwd=tmp_path)


@pytest.mark.parametrize("command, code, kind", [
    *[(command, code, kind) for command, code in (("watch", 78), ("status", 1))
      for kind in ("garbage", "empty", "truncated", "read-only", "newer schema")],
    ("watch", 78, "dangling link")])
def test_damaged_journal_is_one_line_and_no_restart_loop(tmp_path, command, code, kind):
    """A journal that is not a database, empty, cut in half, read-only, a dangling link or of a newer
    schema stops `watch` with exit 78 (systemd does not restart on it) and `status` with exit 1,
    each with one line naming the file and what to do."""
    state = tmp_path / ".fine-tuner"
    state.mkdir()
    path = state / "journal.sqlite3"
    expected = {"garbage": (f"the journal {path} could not be opened: file is not a database", DAMAGED),
                "empty": (f"the journal {path} is an empty file (its history is lost)", DAMAGED),
                "truncated": (f"the journal {path} could not be opened: database disk image is malformed", DAMAGED),
                "read-only": (f"the journal {path} is not writable: Read-only file system", WRITABLE),
                "dangling link": (f"the journal {path} is a symbolic link to a missing file",
                                  "point the link at the journal, or remove it to start with a new, empty journal"),
                "newer schema": (f"the journal {path} has schema version 7; this fine-tuner knows version 5",
                                 "run the fine-tuner version that wrote it, or move it aside to start a new journal"),
                }[kind]
    if kind == "garbage":
        path.write_bytes(b"not a database, just some bytes" * 100)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "dangling link":
        path.symlink_to(tmp_path / "elsewhere" / "journal.sqlite3")
    else:
        _journal_with_jobs(path)
    if kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "newer schema":
        with contextlib.closing(sqlite3.connect(path)) as db:
            db.execute("PRAGMA user_version = 7")
    with mounted(path, "--bind", str(path)) if kind == "read-only" else contextlib.nullcontext():
        if kind == "read-only":
            subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)
        res = _run_on(tmp_path, command)
    assert res.returncode == code
    assert res.stderr.strip().splitlines() == [f"fine-tuner: error: {expected[0]} ({expected[1]})"]


@pytest.mark.parametrize("command, code", [("watch", 78), ("status", 1)])
def test_read_only_state_directory_is_one_line_and_no_restart_loop(tmp_path, command, code):
    """A state directory on a file system remounted read-only stops `watch` with exit 78 and
    `status` with exit 1, each with one line and no traceback."""
    state = tmp_path / ".fine-tuner"
    state.mkdir()
    with mounted(state, "-t", "tmpfs", "-o", "size=4m", "tmpfs"):
        _journal_with_jobs(state / "journal.sqlite3")
        subprocess.run(["mount", "-o", "remount,ro", str(state)], check=True)
        res = _run_on(tmp_path, command)
    assert res.returncode == code
    [line] = res.stderr.strip().splitlines()
    assert line.startswith("fine-tuner: error: ")
    assert "Read-only file system" in line and "writable" in line


@pytest.mark.parametrize("command, code", [("watch", 75), ("status", 1)])
def test_journal_on_a_full_disk_at_start_is_one_line_and_retried(tmp_path, command, code):
    """A journal whose disk is full when `watch` starts exits 75 (EX_TEMPFAIL: systemd starts it
    again, and it runs once space is free) with one line; `status` says the same with exit 1."""
    state = tmp_path / ".fine-tuner"
    state.mkdir()
    path = state / "journal.sqlite3"
    with mounted(state, "-t", "tmpfs", "-o", "size=2m", "tmpfs"):
        _journal_with_jobs(path, jobs=20)
        with contextlib.suppress(OSError), open(state / "filler", "wb", buffering=0) as fh:
            while True:
                fh.write(b"\0" * 4096)
        res = _run_on(tmp_path, command)
    assert res.returncode == code
    assert res.stderr.strip().splitlines() == [
        f"fine-tuner: error: the journal {path} could not be opened: disk I/O error (its disk is full) "
        "(free space on its disk; the service retries by itself)"]


def test_evaluate_an_output_folder_again(tmp_path, fake_ollama, synthetic_csv, mapping_dict):
    """`evaluate OUTPUT_DIR --backend ollama --max-rows 4` re-measures a model set through Ollama,
    prints the table and rewrites the report files; a folder that is not an output is exit 2."""
    csv_path = synthetic_csv(80)
    mapping = tmp_path / "visits.mapping.json"
    mapping.write_text(json.dumps(mapping_dict))
    env = {"FINE_TUNER_OLLAMA__HOST": fake_ollama.url, "FINE_TUNER_EVALUATION__ENABLED": "off"}
    res = run("process", "--input", str(csv_path), "--mapping", str(mapping), "--model", "llama3.2:1b",
              "--approach", "model_set", cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "outputs" / "visits"
    assert not (out / "evaluation.json").exists()
    fake_ollama.chat_content = json.dumps({"rating": 1, "rationale": "x"})
    res = run("evaluate", str(out), "--backend", "ollama", "--max-rows", "4", cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    assert "| accuracy (95% CI) |" in res.stdout
    assert "| model set | bag-of-words baseline | base model (zero-shot) |" in res.stdout
    report = json.loads((out / "evaluation.json").read_text())
    assert [m["n"] for m in report["models"]] == [4, 4, 4]
    assert json.loads((out / "fine_tuning_metadata.json").read_text())["evaluation"]["status"] == "done"
    res = run("evaluate", str(tmp_path), cwd=tmp_path, env=env)
    assert res.returncode == 2
    assert res.stderr.strip().endswith(
        "not an output folder (it has no fine_tuning_metadata.json); pass outputs/<job_id>")


@pytest.mark.parametrize("content", [b"defaults:\n  topics: Erk\xe4ltung\n",
                                     b"defaults: " + b"[" * 5000 + b"]" * 5000 + b"\n"])
def test_unreadable_config_is_one_line_and_exit_78(tmp_path, content):
    """A config file that is not UTF-8 or is nested 5,000 deep stops `watch` with exit 78 and one
    line naming the file, not a traceback (systemd would restart-loop on exit 1)."""
    config = tmp_path / "config.yaml"
    config.write_bytes(content)
    res = run("watch", "--once", "--root", str(tmp_path), "--config", str(config), cwd=tmp_path)
    assert res.returncode == 78
    [line] = res.stderr.strip().splitlines()
    assert line.startswith(f"fine-tuner: error: invalid configuration in {config}: ")


def test_process_twice_keeps_the_first_result_and_logs_the_job_id(tmp_path, dataset):
    """A second `process` of the same file writes a new folder beside the first one; every
    fine_tuner.log line of a run carries its job_id (the output folder's name)."""
    csv_path, mapping = dataset
    args = ("process", "--input", str(csv_path), "--mapping", str(mapping), "--model", "llama3.2:1b",
            "--approach", "model_set")
    first, second = run(*args, cwd=tmp_path), run(*args, cwd=tmp_path)
    assert (first.returncode, second.returncode) == (0, 0), second.stderr
    folders = sorted(p.name for p in (tmp_path / "outputs").iterdir())
    assert folders[0] == "visits" and len(folders) == 2 and re.fullmatch(r"visits-\d{8}T\d{6}", folders[1])
    assert f"outputs: {Path('outputs') / folders[1]}" in second.stdout
    lines = [json.loads(x) for x in (tmp_path / "fine_tuner.log").read_text().splitlines()]
    assert {x.get("job_id") for x in lines if x["event"] == "approach_selected"} == set(folders)


def test_small_dataset_warning_is_one_line_and_hints_speak_of_the_command(tmp_path, synthetic_csv, mapping_dict):
    """process on 20 rows prints the too-small warning as one readable line (no Python warning
    location); a bad file's hint says to run the command again, not to drop a file."""
    mapping = tmp_path / "m.json"
    mapping.write_text(json.dumps(mapping_dict))
    res = run("process", "--input", str(synthetic_csv(20)), "--mapping", str(mapping), "--model", "llama3.2:1b",
              cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stderr.splitlines() == ["fine-tuner: warning: dataset has 20 usable rows; at least 50 are "
                                       "recommended for fine-tuning"]
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    res = run("process", "--input", str(bad), "--model", "llama3.2:1b", cwd=tmp_path)
    assert res.returncode == 1
    assert "drop" not in res.stderr and "run the command again" in res.stderr


def test_validate_leaves_no_empty_log_and_help_speaks_to_users(tmp_path, dataset):
    """validate on a good file creates no empty fine_tuner.log; the top-level help describes the
    product, not the module."""
    csv_path, mapping = dataset
    res = run("validate", "--input", str(csv_path), "--mapping", str(mapping), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert not (tmp_path / "fine_tuner.log").exists() or (tmp_path / "fine_tuner.log").stat().st_size > 0
    res = run("--help", cwd=tmp_path)
    assert "Turn an expert-rated dataset" in res.stdout and "``" not in res.stdout


def test_output_into_a_closed_pipe_is_quiet(tmp_path):
    """`fine-tuner check MODEL --json | head -1` ends without a BrokenPipeError traceback."""
    env = {**os.environ, "FINE_TUNER_OLLAMA__HOST": "http://127.0.0.1:9", "FINE_TUNER_OLLAMA__RETRIES": "0",
           "PYTHONPATH": str(ROOT)}
    res = subprocess.run(f"'{sys.executable}' -m daemon check llama3.2:1b --json | head -1", shell=True,
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert res.stdout == "{\n"
    assert "Traceback" not in res.stderr and "BrokenPipeError" not in res.stderr


def test_failed_training_names_the_log_where_it_is(tmp_path, dataset, tiny_model_dir):
    """A trainer that fails names its stderr log in the failed-<name> folder the run was moved to,
    and that file exists."""
    import shutil

    csv_path, mapping = dataset
    broken = tmp_path / "broken-llama"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"base_models": {"tiny-llama:latest": str(broken)}, "ollama": {"register": "off"},
                               "training": {"sequence_len": 512, "device": "cpu"}}))
    res = run("process", "--input", str(csv_path), "--mapping", str(mapping), "--model", "tiny-llama",
              "--approach", "fine_tune", "--config", str(cfg), cwd=tmp_path)
    assert res.returncode == 1
    [line] = res.stderr.strip().splitlines()
    named = Path(re.search(r"see (\S+trainer_stderr\.log)", line).group(1))
    assert named.is_file() and named.parent.name.startswith("failed-visits-")


def test_custom_template_trains_and_rate_reuses_it(tmp_path, fake_ollama):
    """process with --prompt-template builds a model set from a raw export; `rate --model
    OUTPUT_DIR` formats new records with the same template (the fake sees the same prompt shape)
    and says which id column it took;
    a template naming a missing column is one line naming it and the closest column."""
    import csv as _csv

    header = ["C_BioSense_ID", "ChiefComplaintOrig", "DischargeDiagnosis", "Expert Rating"]
    rows = [[f"id{i}", f"complaint {i}", f"dx {i % 3 - 1}", ["Unknown", "Does Not Match", "Match"][i % 3]]
            for i in range(60)]
    raw = tmp_path / "raw.csv"
    with raw.open("w", newline="") as fh:
        _csv.writer(fh).writerows([header, *rows])
    mapping = tmp_path / "m.json"
    mapping.write_text(json.dumps({"Match": 1, "Does Not Match": 0, "Unknown": -1}))
    env = {"FINE_TUNER_OLLAMA__HOST": fake_ollama.url}
    template = "Complaint: {ChiefComplaintOrig} / Diagnosis: {DischargeDiagnosis}"
    res = run("process", "--input", str(raw), "--mapping", str(mapping), "--model", "llama3.2:1b",
              "--approach", "model_set", "--prompt-template", template, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "outputs" / "raw"
    meta = json.loads((out / "fine_tuning_metadata.json").read_text())
    assert meta["prompt_template"] == {"kind": "format", "value": template}
    seen = []
    fake_ollama.chat_responder = lambda model, messages: (seen.append(messages[-1]["content"])
                                                          or json.dumps({"rating": 1, "rationale": "x"}))
    new = tmp_path / "new.csv"
    new.write_text("C_BioSense_ID,ChiefComplaintOrig,DischargeDiagnosis\nn1,cough,J06\nn2,sprain,S93\n")
    res = run("rate", "--model", str(out), "--input", str(new), cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    assert sorted(seen[-2:]) == ["Complaint: cough / Diagnosis: J06", "Complaint: sprain / Diagnosis: S93"]
    rated = list(_csv.DictReader((tmp_path / "new.ratings.csv").open()))
    assert [(r["C_BioSense_ID"], r["rating"], r["label"], r["valid"]) for r in rated] == [
        ("n1", "1", "Match", "true"), ("n2", "1", "Match", "true")]
    assert "ids: the input column 'C_BioSense_ID'\n" in res.stdout
    res = run("process", "--input", str(raw), "--mapping", str(mapping), "--model", "llama3.2:1b",
              "--approach", "model_set", "--prompt-template", "{ChiefComplaint} {DischargeDiagnosis}",
              cwd=tmp_path, env=env)
    assert res.returncode == 1
    [line] = res.stderr.strip().splitlines()
    assert "'ChiefComplaint'" in line and "'ChiefComplaintOrig'" in line


def test_status_without_a_journal_says_where_it_looked(tmp_path):
    """status where no journal exists exits 1 with one line naming the path it looked at and how to
    point at the daemon's, and creates nothing; a journal without jobs says "jobs: none yet"."""
    state = tmp_path / ".fine-tuner"
    for flags in ([], ["--json"]):
        res = run("status", "--root", str(tmp_path), *flags, cwd=tmp_path)
        assert (res.returncode, res.stdout) == (1, "")
        assert res.stderr.splitlines() == [
            f"fine-tuner: error: there is no job journal at {state / 'journal.sqlite3'}: no daemon has run with "
            "this state directory (point at the daemon's folders: --root DIR (the folder holding its inbox/), "
            "--config FILE (its configuration), or paths.state_dir in the config / FINE_TUNER_PATHS__STATE_DIR "
            "(its state directory, /var/lib/fine-tuner under systemd))"]
    assert not state.exists()
    state.mkdir()
    _journal_with_jobs(state / "journal.sqlite3", jobs=0)
    res = run("status", "--root", str(tmp_path), cwd=tmp_path)
    assert (res.returncode, res.stdout.splitlines()[1]) == (0, "jobs: none yet")


def test_status_on_a_dangling_journal_link_is_an_error_not_no_jobs(tmp_path):
    """A journal that is a link to a missing file makes `status` exit 1 with one line, instead of
    reporting "no jobs yet"."""
    state = tmp_path / ".fine-tuner"
    state.mkdir()
    os.symlink(tmp_path / "gone.sqlite3", state / "journal.sqlite3")
    res = run("status", "--root", str(tmp_path), cwd=tmp_path)
    assert res.returncode == 1
    [line] = res.stderr.strip().splitlines()
    assert line.startswith(f"fine-tuner: error: the journal {state / 'journal.sqlite3'}")


def _stand_in_server(path: Path, says: str) -> Path:
    """A llama-server stand-in that prints ``says`` and exits 3, as a server that cannot load does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho '{says}' >&2\nexit 3\n")
    path.chmod(0o755)
    return path


def test_cache_dir_and_llama_server_variables_are_used_not_refused_as_settings(tmp_path):
    """With FINE_TUNER_CACHE_DIR and FINE_TUNER_LLAMA_SERVER set, watch --once and status start and
    exit 0; serve runs the llama-server built in $FINE_TUNER_CACHE_DIR, or the one
    $FINE_TUNER_LLAMA_SERVER names."""
    from daemon.llamacpp import pinned

    cache = tmp_path / "cache"
    _stand_in_server(pinned({"FINE_TUNER_CACHE_DIR": str(cache)}).server, "stand-in built in the cache")
    named = _stand_in_server(tmp_path / "bin" / "llama-server", "stand-in named by the variable")
    gguf, log = tmp_path / "m.gguf", tmp_path / "server.log"
    gguf.write_bytes(b"GGUF")
    for env, says in (({"FINE_TUNER_CACHE_DIR": str(cache), "FINE_TUNER_LLAMA_SERVER": ""},
                       "stand-in built in the cache"),
                      ({"FINE_TUNER_CACHE_DIR": str(cache), "FINE_TUNER_LLAMA_SERVER": str(named)},
                       "stand-in named by the variable")):
        res = run("serve", str(gguf), "--log", str(log), cwd=tmp_path, env=env)
        assert (res.returncode, res.stdout, res.stderr) == (
            2, "", f"fine-tuner: error: llama-server exited with code 3 while loading the model: {says}; read {log}\n")
    res = run("watch", "--root", str(tmp_path), "--once", cwd=tmp_path, env=env)
    assert (res.returncode, res.stderr) == (0, "")
    res = run("status", "--root", str(tmp_path), cwd=tmp_path, env=env)
    assert (res.returncode, res.stdout.splitlines()[1], res.stderr) == (0, "jobs: none yet", "")


def test_cancel_wait_nan_or_inf_is_refused_before_anything_is_asked(tmp_path):
    """cancel --wait nan (or ±inf) is a usage error (exit 2, one line naming the flag) instead of
    waiting forever, and no cancel is requested."""
    from daemon.inbox.journal import Journal

    state = tmp_path / ".fine-tuner"
    state.mkdir()
    _journal_with_jobs(state / "journal.sqlite3", jobs=1)
    for value in ("nan", "inf", "-inf"):
        res = run("cancel", "j0", "--root", str(tmp_path), f"--wait={value}", cwd=tmp_path, timeout=60)
        assert (res.returncode, res.stdout, res.stderr.splitlines()[-1]) == (
            2, "", "fine-tuner cancel: error: argument --wait: must be a finite number")
    with Journal(state / "journal.sqlite3") as journal:
        assert (journal.get("j0").state, journal.requests()) == ("queued", {})


def test_retry_learning_rate_nan_is_refused_and_nothing_is_dropped(tmp_path):
    """retry --learning-rate nan is a usage error and the inbox stays empty (it used to drop a job
    file that the daemon then failed); a finite rate is dropped in the job file."""
    from daemon.inbox.journal import Journal

    state = tmp_path / ".fine-tuner"
    state.mkdir()
    _journal_with_jobs(state / "journal.sqlite3", jobs=1)
    with Journal(state / "journal.sqlite3") as journal:
        journal.fail("j0", {"error_type": "TrainingFailedError"})
    failed = tmp_path / "inbox" / "failed" / "j0"
    failed.mkdir(parents=True)
    (failed / "v.csv").write_text("formatted_prompt,Standardised_Rating\n")
    res = run("retry", "j0", "--root", str(tmp_path), "--learning-rate", "nan", cwd=tmp_path)
    assert (res.returncode, res.stdout, res.stderr.splitlines()[-1]) == (
        2, "", "fine-tuner retry: error: argument --learning-rate: must be a finite number")
    assert sorted(os.listdir(tmp_path / "inbox")) == ["failed"]
    res = run("retry", "j0", "--root", str(tmp_path), "--learning-rate", "0.002", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(tmp_path / "inbox")) == ["failed", "v.csv", "v.job.yaml"]
    assert "learning_rate: 0.002\n" in (tmp_path / "inbox" / "v.job.yaml").read_text()


@pytest.mark.parametrize("args, error", [
    (("cancel", "j0", "--wait", "-1"), "fine-tuner cancel: error: argument --wait: must not be negative"),
    (("cancel", "j0", "--wait", "86401"), "fine-tuner cancel: error: argument --wait: must be at most 86400"),
    (("retry", "j0", "--learning-rate", "0"),
     "fine-tuner retry: error: argument --learning-rate: must be greater than 0"),
    (("retry", "j0", "--learning-rate", "fast"),
     "fine-tuner retry: error: argument --learning-rate: expected a number, got 'fast'"),
    (("process", "--input", "v.csv", "--learning-rate", "inf"),
     "fine-tuner process: error: argument --learning-rate: must be a finite number"),
    (("rate", "--input", "v.csv", "--review-below", "nan"),
     "fine-tuner rate: error: argument --review-below: must be a finite number"),
])
def test_number_flags_are_finite_and_in_range(tmp_path, args, error):
    """Every number flag refuses nan, inf and values out of its range at once: exit 2, one line."""
    res = run(*args, cwd=tmp_path)
    assert (res.returncode, res.stdout, res.stderr.splitlines()[-1]) == (2, "", error)
    assert os.listdir(tmp_path) == []


def test_rate_shows_a_progress_bar_on_a_terminal(tmp_path, fake_ollama, dataset):
    """With stderr on a terminal, rate draws tqdm's progress bar, advanced per answer (12 records,
    one chunk: it moves before the chunk ends), with records/s, reaching 12/12; without a terminal
    it draws none."""
    csv_path, mapping = dataset
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FINE_TUNER_OLLAMA__HOST": fake_ollama.url}
    fake_ollama.chat_content = json.dumps({"rating": 0, "rationale": "x"})
    args = [sys.executable, "-m", "daemon", "rate", "--model", "llama3.2:1b", "--mapping", str(mapping),
            "--input", str(csv_path), "--output", str(tmp_path / "r.csv")]
    code, stdout, screen = _on_a_terminal(args, cwd=tmp_path, env=env)
    assert code == 0, screen[-2000:]
    assert "rating: 100%" in screen and "60/60" in screen and "record/s" in screen
    assert "rated: 60 of 60 records with llama3.2:1b (ollama)" in stdout
    plain = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0 and plain.stderr == ""


def _run_with_umask_022(*args: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "FINE_TUNER_OLLAMA__RETRIES": "0", "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-m", "daemon", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=120, preexec_fn=lambda: os.umask(0o022))


def test_process_evaluate_and_rate_write_private_files_whatever_the_umask(tmp_path, fake_ollama, dataset):
    """Run with umask 022, process, evaluate and rate still write every file 0600 and every folder
    0700 (outputs of patient records, the log file too), as the daemon does."""
    csv_path, mapping = dataset
    work = tmp_path / "work"
    work.mkdir()
    env = {"FINE_TUNER_OLLAMA__HOST": fake_ollama.url, "FINE_TUNER_EVALUATION__ENABLED": "off"}
    fake_ollama.chat_content = json.dumps({"rating": 1, "rationale": "x"})
    for args in [("process", "--input", str(csv_path), "--mapping", str(mapping), "--model", "llama3.2:1b",
                  "--approach", "model_set"),
                 ("evaluate", "outputs/visits", "--backend", "ollama", "--max-rows", "4"),
                 ("rate", "--model", "outputs/visits", "--input", str(csv_path), "--output", "rated/deep/r.csv")]:
        res = _run_with_umask_022(*args, cwd=work, env=env)
        assert res.returncode == 0, res.stderr
    modes = {str(p.relative_to(work)): oct(p.lstat().st_mode & 0o777) for p in work.rglob("*")}
    folders = ["outputs", "outputs/visits", "rated", "rated/deep"]
    files = ["fine_tuner.log", "rated/deep/r.csv", "rated/deep/r.summary.json"] + [
        f"outputs/visits/{name}" for name in ("Modelfile", "baseline.json", "confusion_matrix.png", "evaluation.json",
                                              "evaluation.md",
                                              "fine_tuning_metadata.json", "model_set_config.json",
                                              "predictions.csv", "validation_data.jsonl")]
    assert modes == {**{f: "0o700" for f in folders}, **{f: "0o600" for f in files}}


def test_process_compare_none_measures_the_new_model_and_the_baseline_only(tmp_path, fake_ollama, dataset):
    """`process --compare none`, as a job file's `compare: none`: the evaluation asks nothing of the
    base model and measures the new model beside the bag-of-words baseline."""
    csv_path, mapping = dataset
    fake_ollama.chat_content = json.dumps({"rating": 1, "rationale": "x"})
    res = run("process", "--input", str(csv_path), "--mapping", str(mapping), "--model", "llama3.2:1b",
              "--approach", "model_set", "--compare", "none", cwd=tmp_path,
              env={"FINE_TUNER_OLLAMA__HOST": fake_ollama.url, "FINE_TUNER_EVALUATION__BACKEND": "ollama"})
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "outputs" / "visits" / "evaluation.json").read_text())
    assert (report["compare"], [m["key"] for m in report["models"]]) == ("none", ["new", "baseline"])
    asked = {r.body["model"] for r in fake_ollama.requests_to("/api/chat")}
    assert "llama3.2:1b" not in asked and asked


def _rate(csv_path: Path, mapping: Path, output: str, cwd: Path, fake_ollama) -> subprocess.CompletedProcess:
    return run("rate", "--model", "llama3.2:1b", "--mapping", str(mapping), "--input", str(csv_path),
               "--output", output, cwd=cwd, env={"FINE_TUNER_OLLAMA__HOST": fake_ollama.url})


@pytest.mark.parametrize("how", ["same path", "through ..", "symbolic link", "hard link"])
def test_rate_refuses_to_write_over_its_input(tmp_path, fake_ollama, dataset, how):
    """--output naming the input itself (the same path, a path through .., a symbolic or a hard
    link) is a one-line usage error before anything is rated; the dataset is unchanged."""
    csv_path, mapping = dataset
    kept = csv_path.read_bytes()
    (tmp_path / "sub").mkdir()
    output = {"same path": csv_path, "through ..": tmp_path / "sub" / ".." / csv_path.name,
              "symbolic link": tmp_path / "link.csv", "hard link": tmp_path / "hard.csv"}[how]
    if how == "symbolic link":
        output.symlink_to(csv_path)
    elif how == "hard link":
        os.link(csv_path, output)
    fake_ollama.chat_content = json.dumps({"rating": 1, "rationale": "x"})
    res = _rate(csv_path, mapping, str(output), tmp_path, fake_ollama)
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        f"fine-tuner: error: {output} is the input file {csv_path} itself: rating would overwrite the records; "
        "pass another --output"]
    assert csv_path.read_bytes() == kept
    assert fake_ollama.requests_to("/api/chat") == []
    assert [p.name for p in tmp_path.rglob("*.part*")] == []


@pytest.mark.parametrize("kind", ["folder", "FIFO", "link to /dev/null", "link to /dev/full"])
def test_rate_refuses_an_output_that_is_not_a_regular_file(tmp_path, fake_ollama, dataset, kind):
    """--output naming a folder, a FIFO or a character device is a one-line usage error before
    anything is rated, and leaves no part file."""
    csv_path, mapping = dataset
    output = tmp_path / "out"
    if kind == "folder":
        output.mkdir()
    elif kind == "FIFO":
        os.mkfifo(output)
    else:
        output.symlink_to(kind.removeprefix("link to "))
    what = {"folder": "a folder", "FIFO": "a FIFO (named pipe)"}.get(kind, "a character device")
    fake_ollama.chat_content = json.dumps({"rating": 1, "rationale": "x"})
    res = _rate(csv_path, mapping, str(output), tmp_path, fake_ollama)
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        f"fine-tuner: error: {output} is {what}, not a regular file; pass another --output"]
    assert fake_ollama.requests_to("/api/chat") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "visits.csv", "visits.mapping.json"]


@pytest.mark.parametrize("kind", ["character device", "folder", "FIFO"])
def test_rate_says_what_an_input_that_is_not_a_file_is(tmp_path, fake_ollama, dataset, kind):
    """--input /dev/zero, a folder or a FIFO is a one-line usage error saying what it is, not
    "no such file"."""
    _, mapping = dataset
    source = {"character device": Path("/dev/zero"), "folder": tmp_path / "in", "FIFO": tmp_path / "fifo"}[kind]
    if kind == "folder":
        source.mkdir()
    elif kind == "FIFO":
        os.mkfifo(source)
    what = {"character device": "a character device", "folder": "a folder", "FIFO": "a FIFO (named pipe)"}[kind]
    res = _rate(source, mapping, str(tmp_path / "r.csv"), tmp_path, fake_ollama)
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        f"fine-tuner: error: {source}: {what}, not a file; pass the records to rate (a CSV file) with --input"]


def _model_set_output(tmp_path: Path) -> Path:
    """A model set built from 60 synthetic rows, in outputs/visits (no evaluation, no Ollama)."""
    import pandas as pd

    from daemon.data.synthetic import HEADER, MAPPING, synthetic_rows
    from daemon.fine_tuner import FineTuner

    out = tmp_path / "outputs" / "visits"
    ok, _ = FineTuner(config={"ollama": {"host": "http://127.0.0.1:9", "retries": 0, "connect_timeout_s": 0.5,
                                         "register": "off"}, "evaluation": {"enabled": "off"},
                              "paths": {"root": str(tmp_path)}}).process_dataset(
        pd.DataFrame(list(synthetic_rows(60, 7)), columns=HEADER), "llama3.2:1b", MAPPING, "respiratory infections",
        approach="model_set", output_dir=out)
    assert ok
    return out


def test_evaluate_refuses_links_and_says_in_one_line_what_is_wrong_with_a_file(tmp_path):
    """`evaluate` refuses a link to an output folder, and a metadata file of the wrong shape, a FIFO
    or a link in its place, or a held-out line that is not a chat record: one line each, at once,
    nothing asked of a model."""
    out = _model_set_output(tmp_path)
    (tmp_path / "link").symlink_to(out)
    res = run("evaluate", str(tmp_path / "link"), cwd=tmp_path, timeout=60)
    assert (res.returncode, res.stderr) == (2, f"fine-tuner: error: {tmp_path / 'link'} is a symbolic link; links are "
                                               "never followed: pass the output folder itself\n")
    meta_path, held_out = out / "fine_tuning_metadata.json", out / "validation_data.jsonl"
    meta, records = meta_path.read_text(), held_out.read_text()
    where = f"cannot evaluate {out}: fine_tuning_metadata.json in the model folder visits"
    cases = {"labels": f"{where}: mapping.labels: must be a non-empty object of label: integer rating pairs, "
                       "not a text",
             "fifo": f"{where} is not a regular file",
             "link": f"{where} is a symbolic link; links in a model folder are never followed",
             "line": f"cannot evaluate {out}: validation_data.jsonl line 2 is not a chat record (an object whose "
                     "messages are a list of turns with text content)",
             "held-out fifo": f"cannot evaluate {out}: validation_data.jsonl cannot be read: a FIFO (named pipe), "
                              "not a regular file"}
    for case, message in cases.items():
        meta_path.unlink()
        meta_path.write_text(meta)
        held_out.unlink()
        held_out.write_text(records)
        if case == "labels":
            meta_path.write_text(json.dumps({**json.loads(meta), "mapping": {"labels": "Match"}}))
        elif case == "fifo":
            meta_path.unlink()
            os.mkfifo(meta_path)
        elif case == "link":
            (tmp_path / "meta.json").write_text(meta)
            meta_path.unlink()
            meta_path.symlink_to(tmp_path / "meta.json")
        elif case == "line":
            held_out.write_text(records.splitlines()[0] + '\n{"messages": "not turns"}\n')
        else:
            held_out.unlink()
            os.mkfifo(held_out)
        res = run("evaluate", str(out), cwd=tmp_path, timeout=60)
        assert (case, res.returncode, res.stdout, res.stderr) == (case, 1, "", f"fine-tuner: error: {message}\n")


def _shown(tmp_path: Path, *args: str, cwd: Path, env: dict | None = None) -> dict:
    """`fine-tuner config --show --json` run in ``cwd``: the file used and each setting's source."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("FINE_TUNER_")}
    res = subprocess.run([sys.executable, "-m", "daemon", "config", "--show", "--json", *args], cwd=cwd,
                         env={**full, "PYTHONPATH": str(ROOT), **(env or {})}, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    return {"file": out["file"], "found_by": out["found_by"],
            **{s["key"]: [s["value"], s["source"]] for s in out["settings"]}}


def test_every_command_finds_the_config_flag_env_root_in_that_order(tmp_path):
    """Without --config the commands read $FINE_TUNER_CONFIG, else <root>/config.yaml (--root, else
    the current directory); --config beats the variable, which beats the root's file; config
    --show says which file and where each value came from (file, env variable, default, flag)."""
    files = {}
    for name in ("flag", "env", "root"):
        folder = tmp_path / name
        folder.mkdir()
        files[name] = folder / "config.yaml"
        files[name].write_text(f"defaults:\n  topics: from {name}\n")
    root = tmp_path / "root"
    env = {"FINE_TUNER_CONFIG": str(files["env"])}
    flagged = _shown(tmp_path, "--config", str(files["flag"]), cwd=root, env=env)
    assert (flagged["file"], flagged["found_by"], flagged["defaults.topics"]) == (
        str(files["flag"]), "--config", ["from flag", f"file {files['flag']}"])
    by_env = _shown(tmp_path, cwd=root, env={**env, "FINE_TUNER_EPOCHS": "5"})
    assert (by_env["found_by"], by_env["defaults.topics"], by_env["defaults.epochs"], by_env["defaults.seed"]) == (
        "FINE_TUNER_CONFIG", ["from env", f"file {files['env']}"], [5, "env FINE_TUNER_EPOCHS"], [42, "default"])
    here = _shown(tmp_path, cwd=root)
    assert (here["file"], here["found_by"], here["defaults.topics"]) == (
        str(files["root"]), "root", ["from root", f"file {files['root']}"])
    named_root = _shown(tmp_path, "--root", str(root), cwd=tmp_path)
    assert (named_root["file"], named_root["defaults.topics"], named_root["paths.root"]) == (
        str(files["root"]), ["from root", f"file {files['root']}"], [str(root), "flag --root"])
    nothing = _shown(tmp_path, cwd=tmp_path)
    assert (nothing["file"], nothing["found_by"], nothing["defaults.topics"]) == (None, "none", ["", "default"])


def test_a_found_config_that_others_may_write_is_refused_not_read(tmp_path):
    """A config.yaml found in the root (not named) that its group may write stops the command with
    one line naming the file; named with --config, the same file is read."""
    config = tmp_path / "config.yaml"
    config.write_text("ollama:\n  host: http://198.51.100.7:11434\n")
    config.chmod(0o664)
    res = run("status", "--root", str(tmp_path), cwd=tmp_path, env={"FINE_TUNER_CONFIG": ""})
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        f"fine-tuner: error: invalid configuration in {config}: writable by its group or by others: only a file "
        "nobody else can change is read without --config (fix the file's owner or mode, or name the file to use "
        "with --config or FINE_TUNER_CONFIG)"]
    shown = _shown(tmp_path, "--config", str(config), cwd=tmp_path)
    assert shown["ollama.host"] == ["http://198.51.100.7:11434", f"file {config}"]


def test_a_file_without_a_prompt_column_lists_its_columns_and_names_prompt_template(tmp_path):
    """`process` on a file whose columns hold no prompt says, in one line, which columns the file has
    (names only, never a cell) and that prompt_template builds the prompt from them."""
    bad = tmp_path / "notes.csv"
    bad.write_text(f"Visit,Complaint,Standardized_Rating\nV1,{MARKER} cough,1\n")
    res = run("process", "--input", str(bad), "--model", "m", "--topics", "t", cwd=tmp_path)
    assert res.returncode == 1
    assert res.stderr.splitlines() == [
        "fine-tuner: error: notes.csv, column 'formatted_prompt': missing required column 'formatted_prompt' or "
        "'Prompt'; the file has 3 column(s): 'Visit', 'Complaint', 'Standardized_Rating' (a dataset needs a "
        "prompt column (formatted_prompt or Prompt) and Standardized_Rating; rename the column or set "
        "prompt_template to build the prompt from the file's columns (a list such as [ChiefComplaintOrig, "
        "DischargeDiagnosis], or a format string with {Column} fields: in the job file, the config's defaults "
        "or --prompt-template) and run the command again)"]


def test_job_setting_flags_are_generated_from_the_job_settings_declaration():
    """Every per-job setting (each JobSettings field but the job-file keys task and force) is declared
    as a flag, has one spelling on every command that takes it, and its help is the declaration's."""
    import argparse
    import dataclasses

    from daemon.cli import _parser
    from daemon.data.jobsettings import FLAGS, JobSettings

    commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    spellings: dict[str, set] = {}
    helps: dict[str, set] = {}
    for command in ("process", "validate", "evaluate", "rate", "retry"):
        for action in commands[command]._actions:
            if action.dest in FLAGS:
                spellings.setdefault(action.dest, set()).add(tuple(action.option_strings))
                helps.setdefault(action.dest, set()).add(action.help)
    assert sorted({f.name for f in dataclasses.fields(JobSettings)} - set(FLAGS)) == ["force", "task"]
    assert spellings == {name: {(flag.spelling(name),)} for name, flag in FLAGS.items()}
    assert helps == {name: {flag.help} for name, flag in FLAGS.items()}
    assert sorted(flag.spelling(name) for name, flag in FLAGS.items()) == [
        "--approach", "--batch-size", "--code-knowledge", "--compare", "--epochs", "--group-by", "--learning-rate",
        "--model", "--no-fallback", "--output-model", "--prompt-template", "--review-below", "--topic",
        "--topic-definition", "--topics"]
