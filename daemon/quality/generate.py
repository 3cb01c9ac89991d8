"""The local rater's child: ``python -m daemon.quality.generate <spec>`` answers conversations and exits.

Child-side code like ``trainer``: torch, transformers and peft are imported inside the functions,
so the spec and the input are checked before the slow imports and nothing happens at import time.
``generate`` loads the base weights (and the LoRA adapter of a fine-tune), renders each
conversation with the tokenizer's chat template exactly as the trainer renders a training prompt
(``trainer.render``: the same template call, the same system-merge fallback, no extra special
tokens), and decodes greedily in batches with left padding until the template's end-of-turn token or the
close of the answer's JSON object (as a server's JSON-Schema grammar ends it).

The spec (JSON): ``base_ref`` (weights folder or hub id), ``adapter_dir`` (or null), ``input`` (JSONL,
one ``{"messages": [...]}`` per line, each ending with the user turn), ``output`` (JSONL, one
``{"index", "text", "latency_s"}`` per line, appended and flushed per batch), and optionally
``batch_size`` (8), ``max_new_tokens`` (96), ``threads``, ``device`` ("auto"), ``parent_pid`` and
``values`` (the allowed ratings: each answer then also gets ``probs``, each value's probability at
its rating position by teacher forcing, ``score_values``) and ``direct`` (true: no generation, the
rating as a direct decision after ``{"rating": ``, one forward pass per record, ``direct_answers``)
or ``reasoned`` (true: every answer starts ``{"rationale": "``, the reasoned form of a model trained
on both).
Progress goes to stdout as ``{"event": "generate_progress", "done": n, "total": N}`` lines.
Nothing from the records ever reaches stdout or stderr: only counts and line numbers.

Exit codes: 0 done; 2 the spec or the weights are unusable; 3 the input cannot be read;
4 the supervising parent (``parent_pid``) died; 1 anything unexpected (traceback on stderr).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..training.trainer import TrainerExit, pick_device, pick_dtype, render

EXIT_SPEC = 2
EXIT_DATA = 3
EXIT_ORPHANED = 4
# End-of-turn tokens of common chat templates, used as stop tokens when the vocabulary has them
# (a model's generation_config does not always list the turn end, e.g. a base tokenizer's eos).
TURN_END_TOKENS = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")
# trainer.render drops the last message of a prompt-only render (the answer it masks); a
# conversation to answer has no answer yet, so this stands in for it.
_ANSWER_SLOT = {"role": "assistant", "content": ""}


class GenerateExit(Exception):
    """A known reason to stop: ``code`` is the exit status, the message (no record text) goes to stderr."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# --- prompts ------------------------------------------------------------------------------------

def render_prompt(tokenizer: Any, conversation: list[dict]) -> str:
    """The prompt text the model answers: the chat template with the generation prompt, rendered
    by the trainer's own function so that it is byte for byte the prompt it trained on."""
    return render(tokenizer, [*conversation, _ANSWER_SLOT], prompt_only=True)


def stop_token_ids(tokenizer: Any, model: Any) -> list[int]:
    """eos of the tokenizer and of the generation config, plus any known end-of-turn token."""
    ids: list[int] = []
    configured = getattr(model.generation_config, "eos_token_id", None)
    candidates = [tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])]
    unk = tokenizer.unk_token_id
    for token in TURN_END_TOKENS:
        if token in tokenizer.get_vocab():
            candidates.append(tokenizer.convert_tokens_to_ids(token))
    for token_id in candidates:
        if isinstance(token_id, int) and token_id != unk and token_id not in ids:
            ids.append(token_id)
    return ids


# --- loading and generating ---------------------------------------------------------------------

def load(base_ref: str, adapter_dir: str | None, device: str = "auto",
         chat_template: str | None = None) -> tuple[Any, Any, str]:
    """(tokenizer, model in eval mode, device). The adapter is merged into the weights: the same
    function, one matrix product per layer fewer at each generated token. ``chat_template``: the
    turn format the trainer used for a base whose tokenizer has none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = pick_device(device)
    tokenizer = AutoTokenizer.from_pretrained(base_ref)
    if not getattr(tokenizer, "chat_template", None) and chat_template:
        tokenizer.chat_template = chat_template
    if not getattr(tokenizer, "chat_template", None):
        raise GenerateExit(EXIT_SPEC, "the base tokenizer has no chat template; use instruct/chat weights")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(base_ref, dtype=pick_dtype(device))
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    model.to(device)
    model.eval()
    model.config.use_cache = True
    return tokenizer, model, device


def _greedy_config(model: Any, tokenizer: Any, max_new_tokens: int):
    """A generation config for plain greedy decoding: the model's own sampling settings (Llama's
    temperature 0.6, top_p 0.9) are cleared, so the answer does not depend on them."""
    from transformers import GenerationConfig

    stops = stop_token_ids(tokenizer, model)
    return GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                            eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id), set(stops)


_DECODER = json.JSONDecoder()


def first_object(text: str) -> str | None:
    """The answer's first complete JSON object, or None while there is none. Ollama and the
    OpenAI-compatible servers are asked for the answer's JSON Schema, and their grammar ends the
    answer where the object closes; the local backend ends it at the same place, so a model that
    writes its object and then goes on (a short fine-tune that has not learned the end-of-turn
    token yet) is judged on the same answer by every backend."""
    stripped = text.lstrip()
    if not stripped.startswith("{"):
        return None
    try:
        _, end = _DECODER.raw_decode(stripped)
    except (ValueError, RecursionError):
        return None
    return stripped[:end]


class _ObjectClosed:
    """A transformers stopping criterion: a row is done once its answer holds a complete JSON
    object, or once it starts with something that is not one (it can only be invalid)."""

    def __init__(self, tokenizer: Any, prompt_width: int, prefix: str = ""):
        self.tokenizer, self.width, self.prefix = tokenizer, prompt_width, prefix

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        done = []
        for row in input_ids[:, self.width:].tolist():
            text = (self.prefix + self.tokenizer.decode(row, skip_special_tokens=True)).lstrip()
            done.append(bool(text) and (not text.startswith("{") or first_object(text) is not None))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def answer_batch(tokenizer: Any, model: Any, device: str, prompts: list[str], config: Any,
                 stops: set[int], prefix: str = "") -> list[str]:
    """The decoded answers of one batch of rendered prompts (left-padded, greedy), each ending at
    the end-of-turn token or where its JSON object closes (``first_object``). ``prefix``: the
    answer's start, given after each prompt and part of each answer (``REASON_PREFIX`` asks a model
    trained on both answer forms for its reasoned one)."""
    import torch
    from transformers import StoppingCriteriaList

    enc = tokenizer([p + prefix for p in prompts], add_special_tokens=False, padding=True,
                    return_tensors="pt").to(device)
    width = enc["input_ids"].shape[1]
    with torch.inference_mode():
        out = model.generate(**enc, generation_config=config,
                             stopping_criteria=StoppingCriteriaList([_ObjectClosed(tokenizer, width, prefix)]))
    texts = []
    for row in out[:, width:].tolist():
        end = next((i for i, t in enumerate(row) if t in stops), len(row))
        text = (prefix + tokenizer.decode(row[:end], skip_special_tokens=True)).strip()
        texts.append(first_object(text) or text)
    return texts


def score_values(tokenizer: Any, model: Any, device: str, prompts: list[str], texts: list[str],
                 values: list[int]) -> list[dict[str, float] | None]:
    """Each allowed rating's probability at each answer's rating position, by teacher forcing: the
    answer up to its rating, then each value (and the character that followed it) is scored as a
    continuation of the prompt; the values' likelihoods, normalised, sum to 1. None for an answer
    without a rating in it. One forward pass per batch of (answer, value) sequences, left-padded,
    with logits only for the positions scored."""
    import torch

    from .confidence import rating_span

    jobs: list[tuple[int, int, list[int]]] = []  # (answer, value, token ids)
    for i, (prompt, text) in enumerate(zip(prompts, texts)):
        span = rating_span(text)
        if span is None:
            continue
        start, end = span
        for v in values:
            ids = tokenizer(prompt + text[:start] + str(v) + text[end:end + 1], add_special_tokens=False)["input_ids"]
            jobs.append((i, v, ids))
    out: list[dict[str, float] | None] = [None] * len(prompts)
    if not jobs:
        return out
    sequences: dict[int, list[list[int]]] = {}
    for i, _, ids in jobs:
        sequences.setdefault(i, []).append(ids)
    common: dict[int, int] = {}  # per answer: the leading tokens all its value sequences share
    for i, seqs in sequences.items():
        shortest, k = min(len(x) for x in seqs), 0
        while k < shortest and all(x[k] == seqs[0][k] for x in seqs):
            k += 1
        common[i] = k
    width = max(len(ids) for _, _, ids in jobs)
    keep = max(len(ids) - common[i] + 1 for i, _, ids in jobs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for _, _, ids in jobs], device=device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for _, _, ids in jobs], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                       logits_to_keep=keep).logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    scores: dict[int, dict[int, float]] = {}
    for row, (i, v, ids) in enumerate(jobs):
        total = 0.0
        for k in range(max(common[i], 1), len(ids)):  # token k, predicted at position k - 1
            q = (width - len(ids) + k - 1) - (width - keep)
            total += float(logp[row, q, ids[k]])
        scores.setdefault(i, {})[v] = total
    for i, by_value in scores.items():
        top = max(by_value.values())
        weights = {v: math.exp(x - top) for v, x in by_value.items()}
        norm = sum(weights.values())
        out[i] = {str(v): w / norm for v, w in weights.items()}
    return out


DIRECT_PREFIX = '{"rating": '  # how a rating-only answer starts (prompts.direct_answer_json)
REASON_PREFIX = '{"rationale": "'  # how a reasoned answer starts (prompts.answer_json)


def _direct_plan(tokenizer: Any, prompt: str, values: list[int]) -> tuple[list[int], dict[int, int],
                                                                           dict[int, int], int | None] | None:
    """How to score ``values`` after ``prompt`` + ``{"rating": `` as a constrained decoder would:
    (the tokens all values share, each value's first own token, each value's second own token
    where two values share their first, that shared token). Tokenizers often split the values
    unevenly (Gemma: ``▁-`` ``1`` against ``▁`` ``0`` and ``▁`` ``1``), so values may share their first
    own token; one such group is resolved one token further. None when that does not separate
    them (they are then scored whole)."""
    seqs = {v: tokenizer(f"{prompt}{DIRECT_PREFIX}{v}}}", add_special_tokens=False)["input_ids"] for v in values}
    shortest, k = min(len(s) for s in seqs.values()), 0
    while k < shortest and len({s[k] for s in seqs.values()}) == 1:
        k += 1
    if k == 0 or k >= shortest:
        return None
    first = {v: s[k] for v, s in seqs.items()}
    groups: dict[int, list[int]] = {}
    for v, token in first.items():
        groups.setdefault(token, []).append(v)
    shared = [token for token, members in groups.items() if len(members) > 1]
    if not shared:
        return seqs[values[0]][:k], first, {}, None
    if len(shared) > 1 or any(len(seqs[v]) <= k + 1 for v in groups[shared[0]]):
        return None
    second = {v: seqs[v][k + 1] for v in groups[shared[0]]}
    if len(set(second.values())) != len(second):
        return None
    return seqs[values[0]][:k], first, second, shared[0]


def direct_answers(tokenizer: Any, model: Any, device: str, prompts: list[str],
                   values: list[int]) -> list[tuple[str, dict[str, float]]]:
    """The rating as a direct decision, no generation: each prompt followed by ``{"rating": ``, and
    each allowed value's probability as the next tokens, as a grammar-constrained decoder decides
    (``_direct_plan``): the first own token's probability normalised over the allowed first tokens,
    and where values share that token, the next token's normalised over theirs. One forward pass
    per batch of prompts (logits for one position), and a one-token step on its cache when values
    share a first token; a prompt whose values no such plan separates is scored whole
    (``score_values``). Returns per prompt the answer text (``{"rating": v}``) and the probabilities."""
    import torch

    plans = [_direct_plan(tokenizer, prompt, values) for prompt in prompts]
    out: list[tuple[str, dict[str, float]] | None] = [None] * len(prompts)
    planned = [i for i, p in enumerate(plans) if p is not None]
    if planned:
        width = max(len(plans[i][0]) for i in planned)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(plans[i][0])) + plans[i][0] for i in planned], device=device)
        mask = torch.tensor([[0] * (width - len(plans[i][0])) + [1] * len(plans[i][0]) for i in planned],
                            device=device)
        deeper = any(plans[i][3] is not None for i in planned)
        with torch.inference_mode():
            first = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                          logits_to_keep=1, use_cache=deeper)
            logp1 = torch.log_softmax(first.logits[:, -1, :].float(), dim=-1)
            logp2 = None
            if deeper:  # one more token, the shared one, on the cache of the first pass
                step = torch.tensor([[plans[i][3] if plans[i][3] is not None else pad] for i in planned],
                                    device=device)
                second = model(input_ids=step, attention_mask=torch.cat([mask, torch.ones_like(mask[:, :1])], 1),
                               position_ids=mask.sum(-1, keepdim=True), past_key_values=first.past_key_values,
                               logits_to_keep=1)
                logp2 = torch.log_softmax(second.logits[:, -1, :].float(), dim=-1)
        for row, i in enumerate(planned):
            _, firsts, seconds, _ = plans[i]
            scores = {v: float(logp1[row, token]) for v, token in firsts.items()}
            if seconds:
                inner = torch.stack([logp2[row, token] for token in seconds.values()])
                for v, x in zip(seconds, (inner - torch.logsumexp(inner, 0)).tolist()):
                    scores[v] += x
            out[i] = _direct(scores)
    for i, plan in enumerate(plans):
        if plan is None:  # values no plan separates: scored whole
            [probs] = score_values(tokenizer, model, device, [prompts[i]], [f"{DIRECT_PREFIX}{values[0]}}}"], values)
            out[i] = _direct({int(v): math.log(max(p, 1e-300)) for v, p in (probs or {}).items()})
    return [o for o in out if o is not None]


def _direct(scores: dict[int, float]) -> tuple[str, dict[str, float]]:
    top = max(scores.values())
    weights = {v: math.exp(x - top) for v, x in scores.items()}
    norm = sum(weights.values())
    probs = {v: w / norm for v, w in weights.items()}
    best = max(probs, key=lambda v: (probs[v], -v))
    return json.dumps({"rating": best}), {str(v): p for v, p in probs.items()}


def iter_direct(tokenizer: Any, model: Any, device: str, conversations: list[list[dict]], *, batch_size: int,
                values: list[int]):
    """``iter_answers`` for the rating as a direct decision (``direct_answers``): the same
    ``(start, answers)`` per batch, each answer with its ``probs``."""
    for start in range(0, len(conversations), batch_size):
        batch = conversations[start:start + batch_size]
        began = time.monotonic()
        answers = direct_answers(tokenizer, model, device, [render_prompt(tokenizer, c) for c in batch], values)
        latency = (time.monotonic() - began) / len(batch)
        yield start, [{"text": text, "latency_s": latency, "probs": probs} for text, probs in answers]


def iter_answers(tokenizer: Any, model: Any, device: str, conversations: list[list[dict]], *,
                 batch_size: int, max_new_tokens: int, values: list[int] | None = None, prefix: str = ""):
    """Yield ``(start, answers)`` per batch, in input order; each answer is
    ``{"text", "latency_s"}`` with the batch's wall time shared equally among its records, and
    with ``values`` its ``probs`` (``score_values``)."""
    config, stops = _greedy_config(model, tokenizer, max_new_tokens)
    for start in range(0, len(conversations), batch_size):
        batch = conversations[start:start + batch_size]
        began = time.monotonic()
        prompts = [render_prompt(tokenizer, c) for c in batch]
        texts = answer_batch(tokenizer, model, device, prompts, config, stops, prefix)
        probs = score_values(tokenizer, model, device, prompts, texts, values) if values else [None] * len(texts)
        latency = (time.monotonic() - began) / len(batch)
        yield start, [{"text": text, "latency_s": latency, **({"probs": p} if p is not None else {})}
                      for text, p in zip(texts, probs)]


def generate(base_ref: str, adapter_dir: str | None, conversations: list[list[dict]], *,
             batch_size: int = 8, max_new_tokens: int = 96) -> list[dict]:
    """One ``{"text", "latency_s"}`` per conversation, in order: the greedy answer after the chat
    template's generation prompt, without special tokens or surrounding whitespace."""
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be at least 1")
    tokenizer, model, device = load(base_ref, adapter_dir)
    out: list[dict] = []
    for _start, answers in iter_answers(tokenizer, model, device, conversations, batch_size=batch_size,
                                        max_new_tokens=max_new_tokens):
        out.extend(answers)
    return out


# --- the child process --------------------------------------------------------------------------

def _positive_int(spec: dict, key: str, default: int | None) -> int | None:
    value = spec.get(key, default)
    if value is None:
        return None
    if type(value) is not int or value < 1:
        raise GenerateExit(EXIT_SPEC, f"the spec's {key} must be an integer of at least 1")
    return value


def load_spec(path: str) -> dict:
    """The spec, checked: required keys present, numbers positive, the input and adapter folders there."""
    try:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GenerateExit(EXIT_SPEC, f"cannot read the spec {path} ({type(exc).__name__})") from None
    if not isinstance(spec, dict):
        raise GenerateExit(EXIT_SPEC, "the spec is not a JSON object")
    missing = [key for key in ("base_ref", "input", "output") if not isinstance(spec.get(key), str)]
    if missing:
        raise GenerateExit(EXIT_SPEC, f"the spec lacks {', '.join(missing)} (a string each)")
    adapter = spec.get("adapter_dir")
    if adapter is not None and not (isinstance(adapter, str) and (Path(adapter) / "adapter_config.json").is_file()):
        raise GenerateExit(EXIT_SPEC, "the spec's adapter_dir holds no adapter_config.json")
    spec["batch_size"] = _positive_int(spec, "batch_size", 8)
    spec["max_new_tokens"] = _positive_int(spec, "max_new_tokens", 96)
    spec["threads"] = _positive_int(spec, "threads", None)
    values = spec.get("values")
    if values is not None and not (isinstance(values, list) and values
                                   and all(type(v) is int for v in values)):
        raise GenerateExit(EXIT_SPEC, "the spec's values must be a list of integers (the allowed ratings)")
    if spec.get("direct") not in (None, False, True) or (spec.get("direct") and values is None):
        raise GenerateExit(EXIT_SPEC, "the spec's direct must be true or false, and true needs values")
    if spec.get("reasoned") not in (None, False, True):
        raise GenerateExit(EXIT_SPEC, "the spec's reasoned must be true or false")
    return spec


def read_conversations(path: str) -> list[list[dict]]:
    """The ``messages`` of each line: role/content string pairs, the last one the user's turn."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise GenerateExit(EXIT_DATA, f"cannot read the input {path} ({type(exc).__name__})") from None
    out: list[list[dict]] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            messages = json.loads(line)["messages"]
        except (ValueError, KeyError, TypeError):
            messages = None
        if (not isinstance(messages, list) or not messages
                or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                           and isinstance(m.get("content"), str) for m in messages)
                or messages[-1]["role"] != "user"):
            raise GenerateExit(EXIT_DATA, f"input line {lineno} is not a {{\"messages\": [...]}} record "
                                          "ending with the user turn")
        out.append(messages)
    return out


def run(spec: dict) -> int:
    """Answer the spec's input into its output file; returns the number of answers written."""
    conversations = read_conversations(spec["input"])
    import torch

    threads = os.environ.get("OMP_NUM_THREADS", "")
    # as in the trainer, an operator's OMP_NUM_THREADS wins: the spec's count is the parent's guess
    if threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))
    elif spec["threads"] is not None:
        torch.set_num_threads(spec["threads"])
    total = len(conversations)
    parent_pid = spec.get("parent_pid")
    done = 0
    with open(spec["output"], "w", encoding="utf-8") as out:
        _progress(0, total)
        if not total:
            return 0
        try:
            if spec.get("gguf_path"):
                from ..training.ggufmodel import prepare

                prepare(spec["gguf_path"], spec["base_ref"], spec.get("chat_template"))
            tokenizer, model, device = load(spec["base_ref"], spec.get("adapter_dir"), spec.get("device", "auto"),
                                            spec.get("chat_template"))
        except (OSError, ValueError) as exc:
            # from_pretrained's ways of saying a folder holds no usable weights (ValueError: a path
            # that is not a folder read as an invalid hub id)
            raise GenerateExit(EXIT_SPEC, "cannot load the weights from the spec's base_ref or adapter_dir "
                                          f"({type(exc).__name__})") from None
        if spec.get("direct"):
            batches = iter_direct(tokenizer, model, device, conversations, batch_size=spec["batch_size"],
                                  values=spec["values"])
        else:
            batches = iter_answers(tokenizer, model, device, conversations, batch_size=spec["batch_size"],
                                   max_new_tokens=spec["max_new_tokens"], values=spec.get("values"),
                                   prefix=REASON_PREFIX if spec.get("reasoned") else "")
        for start, answers in batches:
            for offset, answer in enumerate(answers):
                out.write(json.dumps({"index": start + offset, **answer}, ensure_ascii=False) + "\n")
            out.flush()
            done += len(answers)
            _progress(done, total)
            if parent_pid and os.getppid() != parent_pid:
                raise GenerateExit(EXIT_ORPHANED, "the supervising process is gone; stopping")
    return done


def _progress(done: int, total: int) -> None:
    print(json.dumps({"event": "generate_progress", "done": done, "total": total}), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        if len(args) != 1:
            raise GenerateExit(EXIT_SPEC, "usage is python -m daemon.quality.generate SPEC.json")
        run(load_spec(args[0]))
    except (GenerateExit, TrainerExit) as exc:  # TrainerExit: the device the spec asks for is absent
        # one line, no colon before the reason: the parent keeps only the text before the first colon
        print(f"generate failed - {exc}", file=sys.stderr, flush=True)
        return exc.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
