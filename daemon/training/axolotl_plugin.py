"""The axolotl plugin of the ``axolotl`` training backend: the job's progress from axolotl's own run.

``daemon.training.axolotl_trainer`` adds ``daemon.training.axolotl_plugin.ProgressPlugin`` to the plugins of the run
it starts. Inside axolotl's processes the plugin puts a ``transformers`` callback on the Trainer
that appends the same records as the built-in trainer to ``training_log.jsonl`` (step, loss,
eval_loss, learning rate, speed, ETA), from the numbers the Trainer logs, and at the end writes
the figures ``training_result.json`` is made of. Only the main process of a multi-GPU run writes.
The files are named by the environment (``PROGRESS_ENV``, ``SUMMARY_ENV``); without them the plugin
does nothing, so a training_config.yaml that names it still runs anywhere.

This module is imported by axolotl, never by the daemon: it may import transformers and axolotl.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from axolotl.integrations.base import BasePlugin
from transformers import TrainerCallback

from .axolotl_trainer import PROGRESS_ENV, SUMMARY_ENV
from ..fsutil import write_json


def _number(value: Any) -> float | None:
    """A logged figure as a float: axolotl logs some as formatted text ('1.298')."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _rounded(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(value, digits)


class ProgressCallback(TrainerCallback):
    """training_log.jsonl records and the end-of-run summary, written by the main process."""

    def __init__(self, trainer: Any, progress_path: str, summary_path: str | None) -> None:
        self.trainer = trainer
        self.progress_path = progress_path
        self.summary_path = summary_path
        self.started = time.monotonic()
        self.first_loss: float | None = None
        self.eval_loss: float | None = None
        self.train_loss: float | None = None
        self.tokens: float | None = None
        self.epoch_losses: dict[int, list[float]] = {}
        self.last_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.monotonic()

    def _write(self, state, loss: float | None, learning_rate: float | None) -> None:
        step, total = int(state.global_step), int(state.max_steps or 0)
        elapsed = time.monotonic() - self.started
        record = {
            "step": step, "total_steps": total,
            "epoch": _rounded(_number(state.epoch), 4),
            "loss": _rounded(loss),
            "eval_loss": _rounded(self.eval_loss),
            "learning_rate": learning_rate,
            "tokens_per_s": round(self.tokens / elapsed, 1) if self.tokens and elapsed > 0 else None,
            "elapsed_s": round(elapsed, 3),
            "eta_s": round(elapsed / step * (total - step), 3) if step and total else None,
            "percent": round(100.0 * step / total, 1) if total else None,
        }
        with open(self.progress_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        tokens = _number(logs.get("tokens/total"))
        if tokens is not None:
            self.tokens = tokens
        if "train_loss" in logs:  # the Trainer's closing summary, not a step
            self.train_loss = _number(logs["train_loss"])
            return
        if "eval_loss" in logs:
            self.eval_loss = _number(logs["eval_loss"])
            self._write(state, None, None)
            return
        loss = _number(logs.get("loss"))
        if loss is None:
            return
        if self.first_loss is None:
            self.first_loss = loss
        epoch = max(0, math.ceil(_number(state.epoch) or 0.0) - 1)
        self.epoch_losses.setdefault(epoch, []).append(loss)
        self.last_step = int(state.global_step)
        self._write(state, loss, _number(logs.get("learning_rate")))

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not self.summary_path:
            return
        import torch

        model = self.trainer.model
        last_epoch = self.epoch_losses[max(self.epoch_losses)] if self.epoch_losses else []
        train_s = time.monotonic() - self.started
        eval_dataset = getattr(self.trainer, "eval_dataset", None)
        write_json(self.summary_path, {
            "first_loss": self.first_loss,
            "final_loss": sum(last_epoch) / len(last_epoch) if last_epoch else None,
            "train_loss": self.train_loss, "eval_loss": self.eval_loss,
            "steps": int(state.global_step), "total_steps": int(state.max_steps or 0),
            "epochs": _number(args.num_train_epochs), "tokens": int(self.tokens) if self.tokens else None,
            "tokens_per_s": round(self.tokens / train_s, 1) if self.tokens and train_s > 0 else None,
            "train_s": round(train_s, 3),
            "device": args.device.type, "processes": int(args.world_size),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),
            "rows_trained": len(self.trainer.train_dataset),
            "rows_validation": len(eval_dataset) if eval_dataset is not None else 0,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        })


class ProgressPlugin(BasePlugin):
    """Adds ``ProgressCallback`` to axolotl's Trainer when the job named its files."""

    def add_callbacks_post_trainer(self, cfg, trainer):
        progress = os.environ.get(PROGRESS_ENV)
        if not progress:
            return []
        return [ProgressCallback(trainer, progress, os.environ.get(SUMMARY_ENV))]
