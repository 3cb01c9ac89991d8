"""A tiny Llama built locally in about ten seconds (no downloads), for the demo, tests and benchmarks.

``build_tiny_model(dest)`` trains a byte-level BPE tokenizer on synthetic clinical text, wraps it as
a fast tokenizer with a Llama-3-like chat template, creates a ``LlamaConfig`` model of a few hundred
thousand parameters, pre-trains it and saves it with safetensors. The pre-training sees whole chat
conversations (system prompt, visit, JSON answer) whose answers are shuffled across the visits: the
model learns the template, the visit text and the answer format, but nothing about which rating a
visit deserves. A LoRA fine-tune on synthetic rows then has something to adapt (a model pre-trained
on a few dozen steps of plain text could not: its frozen output head never learned the answer
format, and the fine-tune answered no held-out row with valid JSON), while the base model rates no
better than the majority class (``tests/quality/test_learning.py`` holds both). Like ``trainer``, this is
child-side code: the ML libraries are imported inside the functions, and nothing in the daemon
imports this module.
"""

from __future__ import annotations

from pathlib import Path

TINY_NAME = "tiny-llama:latest"
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<|pad|>"]
# Llama-3-like: header tokens around the role, the turn closed by <|eot_id|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
VOCAB_SIZE = 768
HIDDEN = 64
# 120 steps of 8 conversations (~10 s on one core): at 90 steps the answer format was not learned
# well enough for LoRA (fine-tune accuracy 0.10), at 120 and 150 it was (1.0 on 60 held-out rows).
PRETRAIN_STEPS = 120
PRETRAIN_BATCH = 8
PRETRAIN_LR = 3e-3
PRETRAIN_ROWS = 600
PRETRAIN_SEED = 1009  # no test or demo dataset uses this seed


def corpus(rows: int = 400) -> list[str]:
    """Plain synthetic text: visit prompts, rationales, answers and the system prompt."""
    from daemon.data.prompts import answer_json, system_prompt
    from daemon.data.synthetic import MAPPING, synthetic_rows

    system = system_prompt("respiratory infections", MAPPING)
    texts = [system]
    for _row_id, prompt, _label, rating, rationale in synthetic_rows(rows, seed=11):
        texts.append(prompt)
        texts.append(answer_json(int(rating), rationale))
    return texts


def build_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        pad_token="<|pad|>", chat_template=CHAT_TEMPLATE, model_max_length=1024)


def pretraining_conversations(rows: int = PRETRAIN_ROWS, seed: int = PRETRAIN_SEED) -> list[list[dict]]:
    """Full chat conversations (system prompt, visit, JSON answer) whose answers are shuffled
    across the visits: the model learns the template and the answer format, but no answer says
    anything about its visit, so the base model cannot already rate."""
    import random

    from daemon.data.prompts import answer_json, system_prompt
    from daemon.data.synthetic import MAPPING, synthetic_rows

    system = system_prompt("respiratory infections", MAPPING)
    visits = list(synthetic_rows(rows, seed=seed))
    answers = [answer_json(int(r[3]), r[4]) for r in visits]
    random.Random(seed).shuffle(answers)
    return [[{"role": "system", "content": system}, {"role": "user", "content": visit[1]},
             {"role": "assistant", "content": answer}] for visit, answer in zip(visits, answers)]


def build_tiny_model(dest: str | Path, *, seed: int = 0) -> Path:
    """Build, pre-train and save the tiny model into ``dest``; returns ``dest``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(corpus())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=HIDDEN * 3, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in pretraining_conversations()]
    threads = torch.get_num_threads()
    # one thread: the model is too small to gain from more, and on a busy machine OpenMP threads
    # that wait for each other made a step 30x slower
    torch.set_num_threads(1)
    try:
        _pretrain(model, tokenizer, texts)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def _pretrain(model, tokenizer, texts: list[str]) -> None:
    """Next-token steps on whole rendered conversations, loss on every token, the learning rate
    decaying linearly to zero."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / PRETRAIN_STEPS)
    model.train()
    batch = PRETRAIN_BATCH
    for step in range(PRETRAIN_STEPS):
        start = (step * batch) % (len(texts) - batch)
        enc = tokenizer(texts[start:start + batch], add_special_tokens=False, padding=True,
                        return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
