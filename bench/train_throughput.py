"""Benchmark: this project's trainer child vs a plain transformers ``Trainer`` loop, same run.

Builds the tiny Llama of the test suite, writes one job folder of synthetic rows, then measures
(1) tokens/s of a plain ``Trainer`` LoRA loop written here (same tokenizer, same encoded rows, same
LoRA, batch, epochs, learning rate and warm-up), and (2) ``daemon.training.supervisor.run_training`` on the
same job: tokens/s as the child reports it (runs alternate, best of ``--repeat`` each), and start-up (spawn to first
progress line, as the
parent sees it). Prints the ratio against the targets: >= 0.9x the plain loop's tokens/s, start-up
<= 10 s on CPU. Usage: ``python bench/train_throughput.py [--rows 200] [--epochs 2] [--repeat 2]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon.config import TrainingConfig  # noqa: E402
from daemon.data.prompts import answer_json, system_prompt  # noqa: E402
from daemon.data.synthetic import MAPPING, synthetic_rows  # noqa: E402
from daemon.training.supervisor import resolve_base_weights, run_training  # noqa: E402

TARGET_RATIO, TARGET_STARTUP_S = 0.9, 10.0
LORA = {"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def write_job(job: Path, rows: int, epochs: int, micro_batch: int) -> None:
    import yaml

    job.mkdir(parents=True)
    system = system_prompt("respiratory infections", MAPPING)
    lines = []
    for r in synthetic_rows(rows, seed=5):
        lines.append(json.dumps({"messages": [
            {"role": "system", "content": system}, {"role": "user", "content": r[1]},
            {"role": "assistant", "content": answer_json(int(r[3]), r[4])}]}) + "\n")
    (job / "training_data.jsonl").write_text("".join(lines))
    (job / "validation_data.jsonl").write_text("")
    (job / "training_config.yaml").write_text(yaml.safe_dump({
        "base_model": "tiny-llama:latest", "adapter": "lora",
        "datasets": [{"path": "training_data.jsonl", "type": "chat_template"}],
        "test_datasets": [{"path": "validation_data.jsonl", "type": "chat_template"}],
        **LORA, "sequence_len": 1024, "micro_batch_size": micro_batch, "gradient_accumulation_steps": 1,
        "num_epochs": epochs, "learning_rate": 2e-3, "warmup_ratio": 0.05, "seed": 42, "output_dir": ".",
    }))


def plain_trainer(model_dir: Path, job: Path, epochs: int, micro_batch: int, out: Path) -> dict:
    """A plain transformers Trainer LoRA run on the same encoded rows; tokens/s over train_runtime."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from daemon.training.trainer import collate, encode_rows, read_records, set_threads

    set_threads()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples, _ = encode_rows(tokenizer, read_records(str(job / "training_data.jsonl")), 1024)
    pad_id = tokenizer.pad_token_id

    def collator(batch):
        input_ids, mask, labels = collate([(b["input_ids"], b["labels"]) for b in batch], pad_id)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    dataset = [{"input_ids": ids, "labels": labels} for ids, labels in examples]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=LORA["lora_r"], lora_alpha=LORA["lora_alpha"],
                                             lora_dropout=LORA["lora_dropout"], bias="none",
                                             target_modules=LORA["lora_target_modules"], task_type="CAUSAL_LM"))
    total_steps = math.ceil(len(dataset) / micro_batch) * epochs
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=micro_batch, gradient_accumulation_steps=1,
        num_train_epochs=epochs, learning_rate=2e-3, warmup_steps=math.ceil(total_steps * 0.05),
        lr_scheduler_type="linear", logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=not torch.cuda.is_available(), seed=42, disable_tqdm=True,
        remove_unused_columns=False, dataloader_pin_memory=False)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    trainer.remove_callback(PrinterCallback)  # it prints every logging step's dict
    runtime = trainer.train().metrics["train_runtime"]
    tokens = sum(len(ids) for ids, _ in examples) * epochs
    return {"tokens": tokens, "train_s": runtime, "tokens_per_s": tokens / runtime, "steps": total_steps}


def ours(model_dir: Path, job: Path) -> dict:
    base = resolve_base_weights("tiny-llama:latest", {"tiny-llama:latest": str(model_dir)})
    first: list[float] = []
    started = time.monotonic()
    result = run_training(job, base=base, training=TrainingConfig(),
                          on_progress=lambda _r: first or first.append(time.monotonic() - started))
    m = result.metrics
    return {"tokens": m["tokens"], "train_s": m["train_s"], "tokens_per_s": m["tokens_per_s"],
            "steps": m["steps"], "startup_s": first[0], "child_startup_s": m["startup_s"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=2,
                        help="alternate the two runs this many times and keep each one's best")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from daemon.training.tinymodel import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        tmp_path = Path(tmp)
        model_dir = build_tiny_model(tmp_path / "tiny")
        write_job(tmp_path / "job", args.rows, args.epochs, args.micro_batch)
        baselines, mines = [], []
        for _ in range(args.repeat):
            # Alternating keeps a burst of load on a shared machine from landing on one side only.
            baselines.append(plain_trainer(model_dir, tmp_path / "job", args.epochs, args.micro_batch,
                                           tmp_path / "hf-out"))
            mines.append(ours(model_dir, tmp_path / "job"))
    baseline = max(baselines, key=lambda r: r["tokens_per_s"])
    mine = max(mines, key=lambda r: r["tokens_per_s"])
    mine["startup_s"] = min(r["startup_s"] for r in mines)
    mine["child_startup_s"] = min(r["child_startup_s"] for r in mines)
    ratio = mine["tokens_per_s"] / baseline["tokens_per_s"]
    print(f"rows={args.rows} epochs={args.epochs} micro_batch={args.micro_batch} steps={mine['steps']} "
          f"repeat={args.repeat} (best of each) load_avg_1m={os.getloadavg()[0]:.2f} cpus={os.cpu_count()}")
    print(f"plain Trainer : {baseline['tokens_per_s']:10.1f} tokens/s "
          f"({baseline['tokens']} tokens in {baseline['train_s']:.2f} s)")
    print(f"fine-tuner    : {mine['tokens_per_s']:10.1f} tokens/s ({mine['tokens']} tokens in {mine['train_s']:.2f} s)")
    print(f"ratio         : {ratio:.2f}x (target >= {TARGET_RATIO}x) {'PASS' if ratio >= TARGET_RATIO else 'FAIL'}")
    print(f"start-up      : {mine['startup_s']:.2f} s spawn to first step seen by the parent "
          f"({mine['child_startup_s']:.2f} s inside the child; target <= {TARGET_STARTUP_S} s) "
          f"{'PASS' if mine['startup_s'] <= TARGET_STARTUP_S else 'FAIL'}")
    return 0 if ratio >= TARGET_RATIO and mine["startup_s"] <= TARGET_STARTUP_S else 1


if __name__ == "__main__":
    sys.exit(main())
