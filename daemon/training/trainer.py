"""The trainer child: ``python -m daemon.training.trainer <run spec>`` trains one LoRA adapter and exits.

The only module that imports torch, transformers and peft (inside functions, so that the test hooks
and the spec check run before the slow imports). It reads the run spec written by
``daemon.training.supervisor``, applies the base tokenizer's chat template, masks everything but the assistant
answer (labels -100), drops rows longer than ``sequence_len`` (counted, never truncated), trains
with a plain loop (AdamW, linear warm-up and decay, gradient accumulation, seeded shuffling),
evaluates on the validation rows after each epoch, appends one JSON line per logging step to
``training_log.jsonl`` (flushed), builds the adapter in ``.tmp-adapter`` and renames it to
``adapter`` when complete, then writes ``training_result.json``. Nothing from the data ever goes to
stderr: only counts and row numbers.

Exit codes: 0 done; 2 the spec or the device is unusable; 3 the data cannot be trained on;
4 the supervising parent died (checked every step, so a killed daemon leaves no orphan training);
5 the base weights could not be downloaded from the Hugging Face Hub (only when they are not on
disk and ``training.allow_download`` is on): the last stderr line is then ``trainer: the weights of
<hf id> could not be downloaded: <cause>`` (the Hub unreachable, a gated or missing repository, an
HTTP error), which the parent puts in its error; one HEAD request without retries is made before
anything is loaded, so an unreachable Hub fails at once instead of after huggingface_hub's
backoff; 1 anything unexpected (traceback on stderr, which the parent keeps in the job folder).

Test hook: when the environment has ``FT_TRAINER_TEST_HOOK=hang`` the child sleeps for
``FT_TRAINER_TEST_HANG_S`` seconds (default 600) before training; ``hang-ignore-sigterm`` also
ignores SIGTERM, so that the parent's escalation to SIGKILL can be tested. The variables do not
start with ``FINE_TUNER_`` because the config loader reads every such variable as a setting.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ..fsutil import publish_dir, temp_dir_for, write_json
from ..outputs.names import ADAPTER_DIR as ADAPTER, ADAPTER_FILES, ADAPTER_GGUF as GGUF_ADAPTER

EXIT_SPEC = 2
EXIT_DATA = 3
EXIT_ORPHANED = 4
EXIT_DOWNLOAD = 5
DOWNLOAD_FAILED = "could not be downloaded: "  # the parent finds the cause after this in stderr
HOOK_ENV = "FT_TRAINER_TEST_HOOK"
HANG_ENV = "FT_TRAINER_TEST_HANG_S"
DEFAULT_ENDPOINT = "https://huggingface.co"

T = TypeVar("T")


class TrainerExit(Exception):
    """A known reason to stop: ``code`` is the exit status, the message goes to stderr."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _say(message: str) -> None:
    print(f"trainer: {message}", file=sys.stderr, flush=True)


def _run_test_hook() -> None:
    hook = os.environ.get(HOOK_ENV, "")
    if hook not in ("hang", "hang-ignore-sigterm"):
        return
    if hook == "hang-ignore-sigterm":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _say(f"test hook {hook}: sleeping")
    time.sleep(float(os.environ.get(HANG_ENV, "600")))


# --- data --------------------------------------------------------------------------------------

def read_records(path: str | None) -> list[list[dict]]:
    """The ``messages`` lists of a JSONL file (an absent or empty file gives no rows)."""
    if not path or not os.path.exists(path):
        return []
    out: list[list[dict]] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                messages = json.loads(line)["messages"]
            except (ValueError, KeyError, TypeError):
                raise TrainerExit(EXIT_DATA, f"{Path(path).name} line {lineno} is not a "
                                             f'{{"messages": [...]}} record') from None
            if (not isinstance(messages, list) or len(messages) < 2
                    or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant"):
                raise TrainerExit(EXIT_DATA, f"{Path(path).name} line {lineno}: the last message "
                                             "must be the assistant's answer")
            out.append(messages)
    return out


def merge_system(messages: list[dict]) -> list[dict]:
    """The system turn folded into the first user turn, for templates without a system role (Gemma)."""
    if not messages or messages[0].get("role") != "system":
        return messages
    system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
    for m in rest:
        if m.get("role") == "user":
            m["content"] = f"{system}\n\n{m['content']}"
            break
    return rest


def render(tokenizer: Any, messages: list[dict], *, prompt_only: bool) -> str:
    """The chat template applied; a template that rejects the system role gets it merged instead."""
    convo = messages[:-1] if prompt_only else messages
    try:
        return tokenizer.apply_chat_template(convo, add_generation_prompt=prompt_only, tokenize=False)
    except Exception as exc:  # jinja raise_exception(): the template's own refusal
        if messages[0].get("role") != "system" or "system" not in str(exc).lower():
            raise
    convo = merge_system(convo)
    return tokenizer.apply_chat_template(convo, add_generation_prompt=prompt_only, tokenize=False)


def encode_example(tokenizer: Any, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation and labels that are -100 except on the assistant answer
    (and whatever the template puts after it, e.g. the end-of-turn token)."""
    prompt_text = render(tokenizer, messages, prompt_only=True)
    full_text = render(tokenizer, messages, prompt_only=False)
    if not full_text.startswith(prompt_text):
        raise TrainerExit(EXIT_DATA, "the chat template does not render the prompt as a prefix of the "
                                     "conversation; the answer cannot be masked with this tokenizer")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    if full_ids[:len(prompt_ids)] != prompt_ids:
        # BPE merged across the boundary. At inference the model sees the prompt tokenized on its
        # own and generates from there, so train on exactly that split.
        full_ids = prompt_ids + tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    labels = [-100] * len(prompt_ids) + full_ids[len(prompt_ids):]
    return full_ids, labels


def encode_rows(tokenizer: Any, rows: list[list[dict]], sequence_len: int
                ) -> tuple[list[tuple[list[int], list[int]]], list[int]]:
    """Encoded examples, and the 1-based row numbers dropped for being longer than ``sequence_len``."""
    kept, dropped = [], []
    for number, messages in enumerate(rows, 1):
        ids, labels = encode_example(tokenizer, messages)
        if len(ids) > sequence_len:
            dropped.append(number)
            continue
        kept.append((ids, labels))
    return kept, dropped


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded tensors: input_ids, attention_mask, labels (-100 on padding)."""
    import torch

    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
        mask[i, :len(ids)] = 1
    return input_ids, mask, labels


# --- downloading the base weights --------------------------------------------------------------

def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _download_cause(exc: BaseException, endpoint: str) -> tuple[int, str] | None:
    """(rank, cause) when ``exc`` alone says why the Hub could not deliver the files; a lower rank
    is more specific. Checked by class name as well, so that no HTTP library must be importable."""
    from huggingface_hub import errors as hub

    names = {cls.__name__ for cls in type(exc).__mro__}
    if isinstance(exc, hub.GatedRepoError):
        return 0, ("the repository is gated: accept its conditions on its Hub page and give a token of "
                   "that account in HF_TOKEN")
    if isinstance(exc, hub.RepositoryNotFoundError):
        return 1, "the repository does not exist, or it is private and HF_TOKEN holds no token with access"
    if isinstance(exc, hub.RevisionNotFoundError):
        return 1, "the repository has no such revision"
    if isinstance(exc, hub.DisabledRepoError):
        return 1, "the repository is disabled on the Hub"
    if isinstance(exc, hub.RemoteEntryNotFoundError):
        return 1, "the repository lacks a file transformers needs (config.json or the weights)"
    if isinstance(exc, hub.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        return 2, f"the Hugging Face Hub at {endpoint} answered HTTP {status or 'with an error'}"
    if isinstance(exc, hub.OfflineModeIsEnabled):
        return 3, "HF_HUB_OFFLINE is set in the trainer's environment"
    if names & {"TransportError", "NetworkError", "TimeoutException", "ConnectionError", "Timeout",
                "ConnectionRefusedError", "TimeoutError", "gaierror"}:
        return 4, (f"the Hugging Face Hub at {endpoint} could not be reached "
                   f"({type(exc).__name__}: {_one_line(exc)})")
    if isinstance(exc, hub.LocalEntryNotFoundError):
        return 5, f"the Hugging Face Hub at {endpoint} could not be reached and the files are not in the cache"
    if isinstance(exc, OSError) and "couldn't connect" in str(exc):
        return 6, f"the Hugging Face Hub at {endpoint} could not be reached"
    return None


def download_failure(exc: BaseException, endpoint: str | None = None) -> str | None:
    """Why ``exc`` (or an exception it was raised from) means the weights could not be downloaded,
    else None. transformers wraps the Hub's errors (an ``OSError`` "We couldn't connect ..." from a
    ``LocalEntryNotFoundError`` from a connection error), so the whole chain is read and the most
    specific cause wins."""
    endpoint = endpoint or hub_endpoint()
    best: tuple[int, str] | None = None
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        found = _download_cause(current, endpoint)
        if found is not None and (best is None or found[0] < best[0]):
            best = found
        current = current.__cause__ or current.__context__
    return None if best is None else best[1]


def check_hub(repo_id: str) -> None:
    """One HEAD request for ``config.json``, without retries: an unreachable Hub, a gated or missing
    repository fails here at once (from_pretrained would retry with backoff for about a minute)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    get_hf_file_metadata(hf_hub_url(repo_id, "config.json"))


def from_hub(spec: dict, load: Callable[[], T]) -> T:
    """``load()``, turning a failed download of weights that are not on disk into ``EXIT_DOWNLOAD``."""
    if spec.get("base_dir") is not None:  # on disk: nothing is downloaded
        return load()
    try:
        return load()
    except Exception as exc:
        cause = download_failure(exc)
        if cause is None:
            raise
        raise TrainerExit(EXIT_DOWNLOAD, f"the weights of {spec['base_ref']} {DOWNLOAD_FAILED}{cause}") from None


# --- device and model --------------------------------------------------------------------------

def prepare_gguf(spec: dict) -> None:
    """A GGUF base is trained on its dequantized form, made once per GGUF (about a minute)."""
    from .ggufmodel import prepare

    try:
        prepare(spec["gguf_path"], spec["base_ref"], spec.get("chat_template"))
    except (OSError, ValueError, KeyError) as exc:
        raise TrainerExit(EXIT_SPEC, f"the GGUF base {Path(spec['gguf_path']).name} could not be read "
                                     f"as a model: {type(exc).__name__}") from None


def load_tokenizer(spec: dict) -> Any:
    """The base tokenizer, with the turn format the parent chose when the weights carry no template."""
    from transformers import AutoTokenizer

    tokenizer = from_hub(spec, lambda: AutoTokenizer.from_pretrained(spec["base_ref"]))
    if not getattr(tokenizer, "chat_template", None) and spec.get("chat_template"):
        tokenizer.chat_template = spec["chat_template"]
    if not getattr(tokenizer, "chat_template", None):
        raise TrainerExit(EXIT_SPEC, "the base tokenizer has no chat template and no known turn format "
                                     "applies; use instruct/chat weights")
    return tokenizer


def pick_device(requested: str) -> str:
    import torch

    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if requested == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if (requested == "cuda" and not cuda) or (requested == "mps" and not mps):
        raise TrainerExit(EXIT_SPEC, f"training.device is {requested!r} but no such device is available")
    return requested


def pick_dtype(device: str):
    import torch

    if device == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    # bf16 on CPU is emulated on most machines (slower than fp32); MPS bf16 depends on the OS.
    return torch.float32


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX): there a forward pass
    in bf16 is about three times as fast as in fp32; elsewhere bf16 is emulated, slower than fp32."""
    import torch

    cpu = getattr(torch, "cpu", None)
    for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        probe = getattr(cpu, check, None)
        try:
            if probe is not None and probe():
                return True
        except (RuntimeError, OSError):
            continue
    return False


def set_threads() -> int:
    import torch

    wanted = os.environ.get("OMP_NUM_THREADS")
    threads = int(wanted) if wanted and wanted.isdigit() else len(os.sched_getaffinity(0))
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()


def load_model(spec: dict, device: str, dtype: Any):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec["base_ref"], dtype=dtype)
    model.config.use_cache = False
    model.to(device)
    lora = LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=spec["lora_dropout"],
                      target_modules=list(spec["lora_target_modules"]), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


# --- training ----------------------------------------------------------------------------------

class ProgressLog:
    """Appends one JSON object per line to training_log.jsonl, flushed so the parent sees it now."""

    def __init__(self, path: Path) -> None:
        self.fh = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def linear_schedule(total_steps: int, warmup_steps: int):
    """The LR multiplier: linear warm-up, then linear decay to zero (transformers' default)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


# A batch's rows begin with the same system turn (the task and the whole rating scale: most of a
# short record's tokens). Its keys and values are computed once and shared by every row instead of
# once per row; below this many shared tokens the extra forward call is not worth it.
MIN_SHARED_PREFIX = 16


def shared_prefix(input_ids: Any, mask: Any, labels: Any) -> int:
    """How many leading tokens every row of the batch has in common, stopping before the first
    position whose hidden state predicts an answer token (0 for a single row)."""
    import torch

    rows, width = input_ids.shape
    if rows < 2:
        return 0
    same = ((input_ids == input_ids[:1]) & (mask == 1)).all(dim=0)
    differ = (~same).nonzero()
    common = int(differ[0]) if len(differ) else width
    answer = labels != -100
    if not bool(answer.any(dim=1).all()):
        return 0
    first_answer = int(torch.argmax(answer.to(torch.int8), dim=1).min())
    return max(0, min(common, first_answer - 1))


def _hidden_after_prefix(body: Any, input_ids: Any, mask: Any, prefix: int) -> Any:
    """The body's last hidden states at positions ``prefix`` onwards, with the shared prefix run
    once (batch 1) and its key/value cache repeated across the batch. Gradients flow through the
    cache into the prefix's computation, so the loss and its gradients equal the full forward's."""
    import torch

    rows, width = input_ids.shape
    first = body(input_ids=input_ids[:1, :prefix], attention_mask=mask[:1, :prefix], use_cache=True)
    cache = first.past_key_values
    cache.batch_repeat_interleave(rows)
    positions = torch.arange(prefix, width, device=input_ids.device).unsqueeze(0).expand(rows, -1)
    return body(input_ids=input_ids[:, prefix:], attention_mask=mask, past_key_values=cache,
                position_ids=positions, use_cache=True).last_hidden_state


def answer_loss(model: Any, input_ids: Any, mask: Any, labels: Any, n_items: int) -> Any:
    """The summed next-token loss on the answer tokens, divided by ``n_items`` (the answer tokens of
    the accumulation group, as Trainer normalises). The output head is applied only to the hidden
    states that predict an answer token: with a large vocabulary (Gemma 3: 262,144 entries) the head
    over every position costs most of a step, and the prompt's logits are never used. Models without
    the usual ``model`` body (decoder) + output embeddings split get the head at the union of the
    batch's answer positions (``logits_to_keep``)."""
    import torch
    import torch.nn.functional as F

    targets = labels[:, 1:]
    where = targets != -100
    if not bool(where.any()):
        return None
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    body, head = getattr(causal, "model", None), causal.get_output_embeddings()
    if body is not None and head is not None:
        prefix = shared_prefix(input_ids, mask, labels)
        if prefix >= MIN_SHARED_PREFIX:
            hidden = _hidden_after_prefix(body, input_ids, mask, prefix)[:, :-1][where[:, prefix:]]
        else:
            hidden = body(input_ids=input_ids, attention_mask=mask).last_hidden_state[:, :-1][where]
        logits = head(hidden)
        cap = getattr(causal.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        picked = targets[where]
    else:
        positions = where.any(dim=0).nonzero().squeeze(-1)
        logits = model(input_ids=input_ids, attention_mask=mask, logits_to_keep=positions).logits
        picked = targets[:, positions]
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), picked.reshape(-1),
                           ignore_index=-100, reduction="sum") / max(1, n_items)


def evaluate(model: Any, examples: list, batch_size: int, pad_id: int, device: str) -> float | None:
    """Mean per-token loss over the answer tokens of the validation rows."""
    import torch

    if not examples:
        return None
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            input_ids, mask, labels = (t.to(device) for t in collate(examples[start:start + batch_size], pad_id))
            n = int((labels[:, 1:] != -100).sum())
            if n == 0:
                continue
            total += answer_loss(model, input_ids, mask, labels, n).item() * n
            count += n
    model.train()
    return total / count if count else None


class EarlyStopping:
    """Keeps the adapter of the epoch with the lowest loss on all held-out rows and stops after
    ``patience`` epochs without improvement; the best weights are a copy of the trainable (LoRA)
    parameters only, a few MB. (Watching the new kinds of records alone was measured on Gemma 3
    270M and kept a worse epoch: their loss is mostly rationale tokens naming unseen diagnoses.)"""

    def __init__(self, model: Any, patience: int) -> None:
        self.model, self.patience = model, patience
        self.losses: list[float] = []
        self.best_epoch: int | None = None
        self.best_state: dict | None = None
        self.stopped = False

    def epoch_ended(self, loss: float | None) -> None:
        if self.patience <= 0 or loss is None:
            return
        self.losses.append(loss)
        if self.best_epoch is None or loss < self.losses[self.best_epoch - 1]:
            self.best_epoch = len(self.losses)
            self.best_state = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        elif len(self.losses) - self.best_epoch >= self.patience:
            self.stopped = True

    def restore_best(self) -> None:
        """Put the best epoch's weights back when a later epoch was worse."""
        import torch

        if self.best_state is None or self.best_epoch == len(self.losses):
            return
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if name in self.best_state:
                    param.copy_(self.best_state[name])

    def summary(self) -> dict:
        return {"patience": self.patience, "watched": "all held-out rows",
                "loss_by_epoch": [round(v, 6) for v in self.losses], "best_epoch": self.best_epoch,
                "epochs_run": len(self.losses), "stopped_early": self.stopped}


def train(spec: dict, started: float) -> dict:
    # Malformed data fails in a fraction of a second, before the slow imports.
    train_rows = read_records(spec["train_path"])
    val_rows = read_records(spec.get("validation_path"))
    import torch

    threads = set_threads()
    seed = int(spec["seed"])
    random.seed(seed)
    torch.manual_seed(seed)
    device = pick_device(spec.get("device", "auto"))
    dtype = pick_dtype(device)
    out_dir = Path(spec["output_dir"])

    if spec.get("gguf_path"):
        prepare_gguf(spec)
    elif spec.get("base_dir") is None:
        from_hub(spec, lambda: check_hub(spec["base_ref"]))
    tokenizer = load_tokenizer(spec)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    seq_len = int(spec["sequence_len"])
    train_ex, dropped = encode_rows(tokenizer, train_rows, seq_len)
    val_ex, val_dropped = encode_rows(tokenizer, val_rows, seq_len)
    if dropped or val_dropped:
        _say(f"warning: {len(dropped)} training and {len(val_dropped)} validation rows are longer than "
             f"sequence_len={seq_len} tokens and were dropped (training rows {dropped[:20]})")
    if not train_ex:
        raise TrainerExit(EXIT_DATA, f"no training row fits in sequence_len={seq_len} tokens "
                                     f"({len(dropped)} dropped): raise training.sequence_len")

    model = from_hub(spec, lambda: load_model(spec, device, dtype))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=float(spec["learning_rate"]), weight_decay=0.0)
    micro, accum, epochs = (int(spec["micro_batch_size"]), int(spec["gradient_accumulation_steps"]),
                            int(spec["num_epochs"]))
    batches_per_epoch = math.ceil(len(train_ex) / micro)
    steps_per_epoch = math.ceil(batches_per_epoch / accum)
    total_steps = steps_per_epoch * epochs
    warmup_steps = math.ceil(total_steps * float(spec["warmup_ratio"]))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(total_steps, warmup_steps))
    logging_steps = max(1, int(spec.get("logging_steps", 1)))
    parent_pid = spec.get("parent_pid")

    progress = ProgressLog(out_dir / "training_log.jsonl")
    step, tokens, first_loss, eval_loss = 0, 0, None, None
    stopping = EarlyStopping(model, int(spec.get("early_stopping_patience") or 0))
    window: list[float] = []
    # per-step losses of the epoch running (the last one at the end): one step's loss is noisy, so
    # final_loss is this epoch's mean; train_loss is the mean over every step, as Trainer reports it
    epoch_losses: list[float] = []
    loss_sum = 0.0
    train_start = time.monotonic()
    first_step_s = None
    try:
        for epoch in range(epochs):
            if stopping.stopped:
                break
            order = list(range(len(train_ex)))
            random.Random(seed + epoch).shuffle(order)
            epoch_losses = []
            batches = [[train_ex[i] for i in order[b:b + micro]] for b in range(0, len(order), micro)]
            for group_start in range(0, len(batches), accum):
                group = batches[group_start:group_start + accum]
                tensors = [collate(b, pad_id) for b in group]
                # Normalise by the answer tokens of the whole accumulation group, as Trainer does.
                n_items = sum(int((lab[:, 1:] != -100).sum()) for _, _, lab in tensors)
                step_loss = 0.0
                for input_ids, mask, labels in tensors:
                    input_ids, mask, labels = input_ids.to(device), mask.to(device), labels.to(device)
                    loss = answer_loss(model, input_ids, mask, labels, n_items)
                    tokens += int(mask.sum())
                    if loss is None:
                        continue
                    loss.backward()
                    step_loss += loss.detach().item()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if parent_pid and os.getppid() != parent_pid:
                    raise TrainerExit(EXIT_ORPHANED, "the supervising process is gone; stopping")
                if first_step_s is None:
                    first_step_s = time.monotonic() - started
                first_loss = step_loss if first_loss is None else first_loss
                epoch_losses.append(step_loss)
                loss_sum += step_loss
                window.append(step_loss)
                end_of_epoch = step % steps_per_epoch == 0
                if end_of_epoch and val_ex:
                    eval_loss = evaluate(model, val_ex, micro, pad_id, device)
                    stopping.epoch_ended(eval_loss)
                if step % logging_steps == 0 or end_of_epoch:
                    elapsed = time.monotonic() - train_start
                    progress.write({
                        "step": step, "total_steps": total_steps,
                        "epoch": round(step / steps_per_epoch, 4),
                        "loss": round(sum(window) / len(window), 6),
                        "eval_loss": None if eval_loss is None else round(eval_loss, 6),
                        "learning_rate": lr,
                        "tokens_per_s": round(tokens / elapsed, 1) if elapsed > 0 else None,
                        "elapsed_s": round(elapsed, 3),
                        "eta_s": round(elapsed / step * (total_steps - step), 3),
                        "percent": round(100.0 * step / total_steps, 1),
                    })
                    window = []
    finally:
        progress.close()
    train_s = time.monotonic() - train_start

    stopping.restore_best()
    gguf_adapter = save_adapter(model, out_dir, spec["base_name"], spec)
    return {
        "gguf_adapter": gguf_adapter,
        "first_loss": first_loss,
        "final_loss": sum(epoch_losses) / len(epoch_losses) if epoch_losses else None,
        "train_loss": loss_sum / step if step else None, "eval_loss": eval_loss,
        "steps": step, "total_steps": total_steps, "epochs": epochs, "tokens": tokens,
        "early_stopping": stopping.summary(),
        "tokens_per_s": round(tokens / train_s, 1) if train_s > 0 else None,
        "train_s": round(train_s, 3), "startup_s": round(first_step_s or 0.0, 3),
        "duration_s": round(time.monotonic() - started, 3),
        "device": device, "dtype": str(dtype).removeprefix("torch."), "threads": threads,
        "rows_trained": len(train_ex), "rows_dropped_too_long": len(dropped),
        "rows_validation": len(val_ex), "validation_rows_dropped_too_long": len(val_dropped),
        "trainable_params": sum(p.numel() for p in params),
    }


def save_adapter(model: Any, out_dir: Path, base_name: str, spec: dict | None = None) -> dict:
    """Write the adapter under ``.tmp-adapter`` (with its GGUF form when the spec names llama.cpp's
    converter) and rename it to ``adapter`` when complete. Returns what became of the GGUF form."""
    tmp = temp_dir_for(out_dir / ADAPTER)
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    return publish_adapter(tmp, out_dir, base_name, spec)


def _is_gguf(module_name: str) -> bool:
    return module_name == "gguf" or module_name.startswith("gguf.")


def convert_to_gguf(adapter_dir: Path, spec: dict) -> dict:
    """``adapter.gguf`` beside the PEFT files, written by llama.cpp's own ``convert_lora_to_gguf.py``
    (the pinned source; run in this process, whose torch and transformers it needs anyway). Its
    ``--base`` is the folder whose config.json describes the base (for a GGUF base, its dequantized
    form). A failure is reported, never fatal: the safetensors adapter stands on its own."""
    import contextlib
    import io
    import runpy

    converter, base_dir = spec.get("gguf_converter"), spec.get("base_ref")
    if not converter or not Path(converter).is_file():
        return {"written": False, "reason": "llama.cpp's converter is not on this machine (make llama-cpp)"}
    if not base_dir or not (Path(base_dir) / "config.json").is_file():
        return {"written": False, "reason": "the base weights have no local config.json to convert against"}
    out = adapter_dir / GGUF_ADAPTER
    argv, path = list(sys.argv), list(sys.path)
    sys.argv = [converter, "--base", str(base_dir), "--outfile", str(out), "--outtype", "f32", str(adapter_dir)]
    sys.path.insert(0, str(Path(converter).parent))
    # the converter puts its own gguf-py on sys.path, but an imported ``gguf`` (the registry's, which
    # reads a GGUF base in this process) would win, and it lacks names the converter uses
    shadowed = {name: sys.modules.pop(name) for name in list(sys.modules) if _is_gguf(name)}
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            runpy.run_path(converter, run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except Exception as exc:  # the converter's own failure on an architecture it does not know
        code, reason = 1, f"{type(exc).__name__}"
        _say(f"warning: llama.cpp's converter failed ({reason}); adapter.gguf not written")
    finally:
        sys.argv, sys.path = argv, path
        # forget what the converter imported from llama.cpp's source (its gguf-py, its conversion
        # modules), so that the process is as before and a later conversion starts afresh
        source = os.path.abspath(Path(converter).parent) + os.sep  # where its own modules came from
        for name, module in list(sys.modules.items()):
            file = getattr(module, "__file__", None)
            if _is_gguf(name) or (file and os.path.abspath(file).startswith(source)):
                del sys.modules[name]
        sys.modules.update(shadowed)
    if code or not out.is_file():
        out.unlink(missing_ok=True)
        return {"written": False, "reason": f"llama.cpp's convert_lora_to_gguf.py failed (exit {code or 1}); "
                                            "its messages are in trainer_stderr.log"}
    return {"written": True, "file": f"{ADAPTER}/{GGUF_ADAPTER}", "bytes": out.stat().st_size,
            "converter": "llama.cpp convert_lora_to_gguf.py"}


def publish_adapter(tmp: Path, out_dir: Path, base_name: str, spec: dict | None = None) -> dict:
    """Make the adapter saved in ``tmp`` the job's ``adapter/``: only the two files Ollama and PEFT
    need (peft's model card repeats the folder the base was loaded from, a path of this machine)
    plus ``adapter.gguf``, ``base_model_name_or_path`` set to ``base_name``, then renamed into
    place whole. Returns what became of the GGUF form."""
    for item in tmp.iterdir():
        if item.name not in ADAPTER_FILES:
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    gguf = convert_to_gguf(tmp, spec) if spec is not None else {"written": False, "reason": "not asked"}
    config_path = tmp / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base_name
    write_json(config_path, config)
    publish_dir(tmp, out_dir / ADAPTER)
    return gguf


def load_spec(path: str) -> dict:
    try:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TrainerExit(EXIT_SPEC, f"cannot read the run spec {path}: {type(exc).__name__}") from None
    required = ("base_ref", "base_name", "train_path", "output_dir", "lora_r", "lora_alpha",
                "lora_dropout", "lora_target_modules", "sequence_len", "micro_batch_size",
                "gradient_accumulation_steps", "num_epochs", "learning_rate", "warmup_ratio", "seed")
    missing = [key for key in required if key not in spec]
    if missing:
        raise TrainerExit(EXIT_SPEC, f"the run spec lacks {', '.join(missing)}")
    return spec


def run_child(argv: list[str] | None, module: str, train_fn: Callable[[dict, float], dict],
              done: Callable[[dict], str]) -> int:
    """The main of a trainer child (this one, ``daemon.training.axolotl_trainer``): read the spec, train,
    write training_result.json; a ``TrainerExit`` is its one stderr line and exit code."""
    started = time.monotonic()
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        _say(f"usage: python -m {module} <run spec json>")
        return EXIT_SPEC
    try:
        spec = load_spec(args[0])
        metrics = train_fn(spec, started)
        write_json(Path(spec["output_dir"]) / "training_result.json", metrics)
    except TrainerExit as exc:
        _say(str(exc))
        return exc.code
    _say(done(metrics))
    return 0


def _hooked_train(spec: dict, started: float) -> dict:
    _run_test_hook()
    return train(spec, started)


def main(argv: list[str] | None = None) -> int:
    return run_child(argv, "daemon.training.trainer", _hooked_train, lambda m: (
        f"done: {m['steps']} steps, loss {m['first_loss']:.4f} -> {m['final_loss']:.4f}"))


if __name__ == "__main__":
    sys.exit(main())
