"""Demo: both approaches on a generated (synthetic, not real) dataset, offline.

1. A model set for ``llama3.2:1b`` (always works: no weights or Ollama needed).
2. A real LoRA fine-tune on a tiny Llama built on the spot, when the ``train`` extra is installed,
   measured against the expert ratings of its held-out rows beside the model set built from the
   same rows and the base model; the demo ends by printing that evaluation table.
Outputs go to ``demo_outputs/``. Ollama registration is skipped when no server is reachable.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pandas as pd  # noqa: E402

from daemon import FineTuner  # noqa: E402
from daemon.quality.evalreport import table_text  # noqa: E402
from daemon.data.synthetic import MAPPING, write_csv  # noqa: E402

OUT = Path("demo_outputs")


def main() -> int:
    OUT.mkdir(exist_ok=True)
    csv_path = Path(write_csv(OUT / "demo_dataset.csv", rows=400, seed=11))
    df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    print(f"generated {len(df)} synthetic rows in {csv_path}")

    tuner = FineTuner(config={"ollama": {"register": "auto", "connect_timeout_s": 1.0, "retries": 0}})
    ok, meta = tuner.process_dataset(df, "llama3.2:1b", MAPPING, "respiratory infections",
                                     approach="model_set", output_dir=OUT / "model_set", source_name="demo")
    print(f"model set: ok={ok}, {meta['model_set']['few_shot_examples']} few-shot examples, "
          f"Ollama name {meta['model_set']['model_name']}, outputs in {OUT / 'model_set'}")

    if all(importlib.util.find_spec(m) for m in ("torch", "transformers", "peft", "tokenizers")):
        from daemon.training.tinymodel import build_tiny_model

        base = build_tiny_model(OUT / "tiny-llama")
        tuner = FineTuner(config={"base_models": {"tiny-llama:latest": str(base)},
                                  "ollama": {"register": "off"}, "training": {"sequence_len": 512},
                                  "evaluation": {"backend": "local"}})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # a tiny model needs a far larger learning rate than the 1e-4 default for real models
            ok, meta = tuner.process_dataset(df, "tiny-llama", MAPPING, "respiratory infections",
                                             epochs=2, learning_rate=1e-2, batch_size=8, approach="fine_tune",
                                             output_dir=OUT / "fine_tune", source_name="demo")
        t = meta["training"]
        print(f"fine-tune: ok={ok}, loss {t['first_loss']:.3f} -> {t['final_loss']:.3f} in {t['steps']} steps "
              f"on {t['device']}; adapter in {OUT / 'fine_tune' / 'adapter'}")
        evaluation = meta.get("evaluation") or {}
        if evaluation.get("status") == "done":
            report = json.loads((OUT / "fine_tune" / "evaluation.json").read_text(encoding="utf-8"))
            print()
            print(table_text(report))
            print(f"\n(also in {OUT / 'fine_tune' / 'evaluation.md'} and confusion_matrix.png)")
        else:
            print(f"evaluation: {evaluation.get('status')} ({evaluation.get('reason')})")
    else:
        print("fine-tune: skipped (install the extra: pip install 'fine-tuner[train]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
