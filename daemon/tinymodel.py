"""A tiny Llama built locally in a few seconds (no downloads), for the demo, tests and benchmarks.

``build_tiny_model(dest)`` trains a byte-level BPE tokenizer on synthetic clinical text, wraps it as
a fast tokenizer with a Llama-3-like chat template, creates a ``LlamaConfig`` model of a few hundred
thousand parameters, pre-trains it briefly on plain text (so LoRA has something to adapt) and saves
it with safetensors. Like ``trainer``, this is child-side code: the ML libraries are imported inside
the functions, and nothing in the daemon imports this module.
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
PRETRAIN_STEPS = 24


def corpus(rows: int = 400) -> list[str]:
    """Plain synthetic text: visit prompts, rationales, answers and the system prompt."""
    from daemon.prompts import answer_json, system_prompt
    from daemon.synthetic import MAPPING, synthetic_rows

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


def build_tiny_model(dest: str | Path, *, seed: int = 0) -> Path:
    """Build, briefly pre-train and save the tiny model into ``dest``; returns ``dest``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    texts = corpus()
    tokenizer = build_tokenizer(texts)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    _pretrain(model, tokenizer, texts)
    model.eval()
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def _pretrain(model, tokenizer, texts: list[str]) -> None:
    """A few dozen next-token steps on plain text, so the model is not random when LoRA starts."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    batch = 8
    for step in range(PRETRAIN_STEPS):
        start = (step * batch) % (len(texts) - batch)
        enc = tokenizer(texts[start:start + batch], padding=True, truncation=True, max_length=64,
                        return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
