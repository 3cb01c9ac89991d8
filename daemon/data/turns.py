"""Turn formats: how a conversation is laid out for a base model whose tokenizer has no chat template.

A base model (Gemma 3 270M's GGUF, say) carries no chat template, yet the model set, the fine-tune,
the evaluation and the rating must all show it the same text. Each architecture's makers publish
their turn format; this module holds them, each twice: as a Jinja chat template (what
``transformers`` applies at training, in the local rater and what llama.cpp's server applies) and as
the Go ``TEMPLATE`` of an Ollama Modelfile, written to render the same text for the same messages.
The system prompt is folded into the first user turn for formats without a system role (Gemma), in
both forms. ``turn_format(architecture, vocabulary)`` picks one by the architecture name of a ``config.json``
(``model_type``) or a GGUF file (``general.architecture``); an architecture with no known format
gives None, and the caller refuses it (a guessed format would train the model on the wrong text).
Pure data: nothing here reads a file.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass


@dataclass(frozen=True)
class TurnFormat:
    name: str
    jinja: str  # a transformers chat template
    ollama: str  # the same layout as an Ollama Modelfile TEMPLATE (Go text/template)
    stop: tuple[str, ...]  # where an answer ends (Modelfile PARAMETER stop)
    source: str  # where the layout is documented
    tokens: tuple[str, ...]  # special tokens the vocabulary must have for this format to be the model's


# Gemma: no system role; the system text opens the first user turn, separated by a blank line.
_GEMMA_JINJA = (
    "{{ bos_token }}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{%- set ns.system = m['content'] -%}"
    "{%- else -%}"
    "{%- if m['role'] == 'assistant' -%}{{ '<start_of_turn>model\n' }}"
    "{%- else -%}{{ '<start_of_turn>user\n' }}"
    "{%- if ns.system -%}{{ ns.system + '\n\n' }}{%- set ns.system = '' -%}{%- endif -%}"
    "{%- endif -%}"
    "{{ m['content'] + '<end_of_turn>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
_GEMMA_OLLAMA = (
    '{{- $system := "" }}{{- range .Messages }}{{- if eq .Role "system" }}{{- $system = .Content }}{{- end }}{{- end }}'
    '{{- range $i, $m := .Messages }}'
    '{{- $last := eq (len (slice $.Messages $i)) 1 }}'
    '{{- if eq $m.Role "user" }}<start_of_turn>user\n'
    '{{ if $system }}{{ $system }}\n\n{{ $system = "" }}{{ end }}{{ $m.Content }}<end_of_turn>\n'
    '{{ if $last }}<start_of_turn>model\n{{ end }}'
    '{{- else if eq $m.Role "assistant" }}<start_of_turn>model\n{{ $m.Content }}<end_of_turn>\n'
    '{{- end }}{{- end }}'
)

_LLAMA3_JINJA = (
    "{{ bos_token }}"
    "{%- for m in messages -%}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}"
)
_LLAMA3_OLLAMA = (
    '{{- range $i, $m := .Messages }}'
    '{{- $last := eq (len (slice $.Messages $i)) 1 }}'
    '<|start_header_id|>{{ $m.Role }}<|end_header_id|>\n\n{{ $m.Content }}<|eot_id|>'
    '{{- if and $last (ne $m.Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}'
    '{{- end }}'
)

_CHATML_JINJA = (
    "{%- for m in messages -%}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)
_CHATML_OLLAMA = (
    '{{- range $i, $m := .Messages }}'
    '{{- $last := eq (len (slice $.Messages $i)) 1 }}'
    '<|im_start|>{{ $m.Role }}\n{{ $m.Content }}<|im_end|>\n'
    '{{- if and $last (ne $m.Role "assistant") }}<|im_start|>assistant\n{{ end }}'
    '{{- end }}'
)

_PHI3_JINJA = (
    "{%- for m in messages -%}"
    "{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)
_PHI3_OLLAMA = (
    '{{- range $i, $m := .Messages }}'
    '{{- $last := eq (len (slice $.Messages $i)) 1 }}'
    '<|{{ $m.Role }}|>\n{{ $m.Content }}<|end|>\n'
    '{{- if and $last (ne $m.Role "assistant") }}<|assistant|>\n{{ end }}'
    '{{- end }}'
)

GEMMA = TurnFormat("gemma", _GEMMA_JINJA, _GEMMA_OLLAMA, ("<end_of_turn>",),
                   "Gemma's prompt formatting (<start_of_turn>user / model, <end_of_turn>; no system role)",
                   ("<start_of_turn>", "<end_of_turn>"))
LLAMA3 = TurnFormat("llama3", _LLAMA3_JINJA, _LLAMA3_OLLAMA, ("<|eot_id|>",),
                    "Llama 3's prompt format (<|start_header_id|>role<|end_header_id|>, <|eot_id|>)",
                    ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
CHATML = TurnFormat("chatml", _CHATML_JINJA, _CHATML_OLLAMA, ("<|im_end|>",),
                    "ChatML, Qwen's format (<|im_start|>role, <|im_end|>)", ("<|im_start|>", "<|im_end|>"))
PHI3 = TurnFormat("phi3", _PHI3_JINJA, _PHI3_OLLAMA, ("<|end|>",),
                  "Phi-3's chat format (<|user|>, <|assistant|>, <|end|>)", ("<|user|>", "<|assistant|>", "<|end|>"))

# architecture (config.json model_type or GGUF general.architecture) -> its makers' turn format
_BY_ARCHITECTURE = {
    "gemma": GEMMA, "gemma2": GEMMA, "gemma3": GEMMA, "gemma3_text": GEMMA,
    "llama": LLAMA3,
    "qwen2": CHATML, "qwen3": CHATML, "qwen2_moe": CHATML, "qwen3_moe": CHATML,
    "phi3": PHI3,
}


def turn_format(architecture: str | None, vocabulary: Container[str] | None = None) -> TurnFormat | None:
    """The makers' turn format of ``architecture``; None when none is known here, or when the
    ``vocabulary`` (the tokenizer's tokens, when known) lacks the format's special tokens: a
    ``llama`` GGUF may be Llama 2 or Mistral, whose vocabularies have no Llama 3 header tokens."""
    found = _BY_ARCHITECTURE.get((architecture or "").lower())
    if found is None or vocabulary is None:
        return found
    return found if all(token in vocabulary for token in found.tokens) else None


def known_architectures() -> list[str]:
    return sorted(_BY_ARCHITECTURE)
