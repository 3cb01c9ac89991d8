"""Pure builders for the model set: few-shot choice, the model set config, the Ollama model name, and
the Modelfile text together with a parser that reads it back the way Ollama does.

Public functions (signatures are the contract other modules code against):

- ``select_few_shot(ds, *, per_rating=2, max_chars=12000, exclude=()) -> list[int]``: positions into
  ``ds.frame``: balanced across ratings (picked round-robin, so a tight budget still covers every
  rating), rows with a rationale first, spread over different cases (farthest-first on lowercase
  word sets, Jaccard distance, seeded by a stable hash of the prompt), total prompt+answer text at
  most ``max_chars``, deterministic for the same input; never a position in ``exclude``.
- ``ollama_model_name(base, stem, suffix="") -> str`` and ``valid_model_name(name) -> bool``.
- ``model_set_config(*, ds, base_model, topics, system, few_shot, model_name, defaults, created_at,
  input_hashes) -> dict``: the ``model_set_config.json`` content.
- ``modelfile_text(*, base, system, messages, parameters, adapter=None) -> str``.
- ``parse_modelfile(text) -> list[tuple[str, str]]`` and ``modelfile_create_fields(pairs) -> dict``.

Modelfile quoting. Ollama's parser (``parser/parser.go``) has **no escape sequences**: a value is
bare, ``"..."`` or ``\"\"\"...\"\"\"``, and a newline ends the value as soon as the text read so far
(trimmed) is a complete quoted string, i.e. for triple quotes when it ends with ``\"\"\"``. It also
silently drops every non-printable character except space, tab, CR and LF. So we always write
``SYSTEM`` and ``MESSAGE`` texts triple-quoted, which keeps quotes, backslashes, leading/trailing
whitespace, tabs, newlines and non-ASCII exactly; two things cannot be carried by any encoding the
real parser accepts, and ``modelfile_safe_text`` rewrites them before writing: non-printable
characters (other spaces become a space, vertical tab/form feed/line and paragraph separators a
newline, other controls and format characters are removed: Ollama would drop them anyway), and a
``\"\"\"`` that is followed only by whitespace up to a line break (its last quote becomes U+201D).
The exact texts are kept in ``model_set_config.json`` and sent through the JSON create API; the
Modelfile is for people and for ``ollama create -f``. Read a Modelfile with ``newline=""`` so that
carriage returns inside values survive.

Pure: no I/O, no logging; error messages never quote dataset text (line numbers only).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ..errors import ModelSetConfigError
from .prompts import answer_json, labels_by_value, normalize_topics, output_schema

if TYPE_CHECKING:
    from .dataset import Dataset

# Few-shot choice ---------------------------------------------------------------------------------

CANDIDATES_PER_RATING = 128  # a deterministic sample per rating: plenty to spread 2-5 examples, and cheap
_WORD = re.compile(r"\w+")
# json.dumps({"rationale": "", "rating": r}) without the digits of r: a lower bound of an answer
_ANSWER_OVERHEAD = len('{"rationale": "", "rating": }')


def _word_set(text: str) -> frozenset[str]:
    return frozenset(_WORD.findall(text.lower()))


def _jaccard_distance(a: frozenset[str], b: frozenset[str]) -> float:
    union = len(a | b)
    if union == 0:
        return 0.0
    return 1.0 - len(a & b) / union


def _stable_hashes(prompts) -> Any:
    """uint64 per prompt that does not change between processes (pandas' SipHash has a fixed key,
    unlike Python's salted ``hash()``)."""
    import pandas as pd

    return pd.util.hash_pandas_object(prompts, index=False, categorize=False).to_numpy()


class _RatingPool:
    """The capped candidates of one rating and the farthest-first state over them."""

    def __init__(self, rating: int, rows: list[tuple[int, int, bool, str, str]]) -> None:
        # rows: (position, hash, has_rationale, prompt, rationale), already capped and ordered
        self.rating = rating
        self.positions = [r[0] for r in rows]
        self.hashes = [r[1] for r in rows]
        self.tier = [0 if r[2] else 1 for r in rows]
        self.words = [_word_set(r[3]) for r in rows]
        self.costs = [len(r[3]) + len(answer_json(rating, r[4])) for r in rows]
        self.min_dist = [math.inf] * len(rows)
        self.taken = [False] * len(rows)
        self.chosen: list[int] = []

    def pick(self, budget_left: int) -> int | None:
        """The index of the next candidate (rationale first, then farthest from those chosen, then
        stable hash); None when nothing that fits the budget adds a new case."""
        best, best_key = None, None
        for i in range(len(self.positions)):
            if self.taken[i] or self.costs[i] > budget_left or self.min_dist[i] <= 0.0:
                continue
            key = (self.tier[i], -self.min_dist[i], self.hashes[i], self.positions[i])
            if best_key is None or key < best_key:
                best, best_key = i, key
        return best

    def take(self, i: int) -> int:
        self.taken[i] = True
        self.chosen.append(self.positions[i])
        chosen_words = self.words[i]
        for j in range(len(self.positions)):
            if not self.taken[j]:
                self.min_dist[j] = min(self.min_dist[j], _jaccard_distance(self.words[j], chosen_words))
        return self.costs[i]


def _candidate_pools(ds: Dataset, *, max_chars: int, exclude: Iterable[int]) -> list[_RatingPool]:
    import numpy as np

    frame = ds.frame
    n = len(frame)
    if n == 0:
        return []
    prompts = frame["prompt"].astype(str)
    rationale = (frame["rationale"].fillna("").astype(str) if "rationale" in frame.columns
                 else prompts.str.slice(0, 0))
    ratings = frame["rating"].to_numpy(dtype=np.int64)
    has_rationale = (rationale.str.strip().str.len() > 0).to_numpy(dtype=bool)
    # a necessary condition for fitting the budget; the exact cost is checked on the capped rows
    lower_bound = (prompts.str.len().to_numpy(dtype=np.int64) + rationale.str.len().to_numpy(dtype=np.int64)
                   + _ANSWER_OVERHEAD)
    usable = lower_bound <= max_chars
    excluded = np.fromiter((int(p) for p in exclude), dtype=np.int64)
    excluded = excluded[(excluded >= 0) & (excluded < n)]
    usable[excluded] = False
    hashes = _stable_hashes(prompts)
    prompt_values = prompts.to_numpy(dtype=object)  # positional access without pandas indexing
    rationale_values = rationale.to_numpy(dtype=object)

    pools = []
    for rating in sorted({int(r) for r in ratings}, reverse=True):
        rows: list[tuple[int, int, bool, str, str]] = []
        for tier_mask in (has_rationale, ~has_rationale):
            room = CANDIDATES_PER_RATING - len(rows)
            if room <= 0:
                break
            idx = np.flatnonzero(usable & tier_mask & (ratings == rating))
            idx = idx[np.lexsort((idx, hashes[idx]))][:room]
            rows.extend((int(p), int(hashes[p]), bool(has_rationale[p]), prompt_values[p], rationale_values[p])
                        for p in idx)
        if rows:
            pools.append(_RatingPool(rating, rows))
    return pools


def select_few_shot(ds: Dataset, *, per_rating: int = 2, max_chars: int = 12000,
                    exclude: Iterable[int] = ()) -> list[int]:
    """Positions into ``ds.frame`` of the few-shot examples, by rating (high first) then choice order."""
    if per_rating <= 0 or max_chars <= 0:
        return []
    pools = _candidate_pools(ds, max_chars=max_chars, exclude=exclude)
    budget_left = max_chars
    # round-robin over ratings so that a tight budget still gives every rating its first example
    for _ in range(per_rating):
        progressed = False
        for pool in pools:
            i = pool.pick(budget_left)
            if i is not None:
                budget_left -= pool.take(i)
                progressed = True
        if not progressed:
            break
    return [pos for pool in pools for pos in pool.chosen]


# Model names -------------------------------------------------------------------------------------

MAX_NAME_PART = 80
MAX_HOST_PART = 350
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def valid_model_name(name: str) -> bool:
    """``[host/][namespace/]model[:tag]`` per section 2 of the Ollama reference: each part starts
    with a letter, digit or ``_``, then letters, digits, ``_``, ``-``, ``.``; no ``.`` in a namespace;
    parts at most 80 characters (host 350)."""
    if not isinstance(name, str) or not name:
        return False
    path, _, tag = name.rpartition(":") if ":" in name.rsplit("/", 1)[-1] else (name, "", None)
    if tag is not None and not _valid_part(tag, MAX_NAME_PART):
        return False
    parts = path.split("/")
    if len(parts) > 3:
        return False
    model = parts[-1]
    if not _valid_part(model, MAX_NAME_PART):
        return False
    if len(parts) >= 2:
        namespace = parts[-2]
        if "." in namespace or not _valid_part(namespace, MAX_NAME_PART):
            return False
    if len(parts) == 3 and not _valid_part(parts[0], MAX_HOST_PART):
        return False
    return True


def _valid_part(part: str, limit: int) -> bool:
    return 0 < len(part) <= limit and part.isascii() and _PART.fullmatch(part) is not None


def _ascii_fold(text: str) -> str:
    """``Atemwegsinfekt-ä`` → ``Atemwegsinfekt-a``: accents dropped, other non-ASCII left for the
    sanitizer to replace."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def _sanitize_part(text: str) -> str:
    text = _ascii_fold(text).lower()
    text = re.sub(r"[^a-z0-9_.-]", "-", text)
    text = re.sub(r"\.{2,}", ".", text)  # current Ollama also rejects consecutive dots
    return re.sub(r"-{2,}", "-", text)


def ollama_model_name(base: str, stem: str, suffix: str = "") -> str:
    """``<base model part>-<base tag>-<stem><suffix>:latest`` (``llama3.2:1b`` + ``visits`` →
    ``llama3.2-1b-visits:latest``), lowercase, invalid characters as ``-``, at most 80 characters
    with the suffix kept."""
    base_model = str(base or "").strip().rsplit("/", 1)[-1]
    model, _, tag = base_model.partition(":")
    pieces = [model] + ([tag] if tag and tag.lower() != "latest" else []) + [str(stem or "")]
    head = _sanitize_part("-".join(p for p in pieces if p.strip())).strip("-.")
    # the suffix tells a fine-tune from a model set: keep it, but never let it crowd out the name
    tail = _sanitize_part(str(suffix or "")).rstrip("-.")[: MAX_NAME_PART // 2]
    head = head[: MAX_NAME_PART - len(tail)].rstrip("-.") or "model"
    name = head + tail
    return f"{name}:latest"


# model_set_config.json ---------------------------------------------------------------------------

def _label_distribution(ds: Dataset) -> dict[str, int]:
    counts = ds.frame["rating"].value_counts()
    return {str(int(r)): int(counts[r]) for r in sorted(counts.index, key=int)}


def model_set_config(*, ds: Dataset, base_model: str, topics, system: str, few_shot: Sequence[int],
                     model_name: str, defaults: Mapping[str, Any], created_at,
                     input_hashes: Mapping[str, Any]) -> dict:
    """The ``model_set_config.json`` content: what the model set is, how it was chosen, and the
    exact texts (system prompt, few-shot pairs) to register."""
    frame = ds.frame
    n = len(frame)
    positions = [int(p) for p in few_shot]
    bad = [p for p in positions if not 0 <= p < n]
    if bad:
        raise ModelSetConfigError(f"{len(bad)} few-shot position(s) outside the dataset's {n} rows",
                                  hint="choose the few-shot rows from this dataset with select_few_shot")
    if not valid_model_name(model_name):
        raise ModelSetConfigError(f"invalid Ollama model name {model_name!r}",
                                  hint="use letters, digits, '_', '-' and '.' (see ollama_model_name)")
    has_rationale_col = "rationale" in frame.columns
    has_id = "row_id" in frame.columns
    examples = []
    for p in positions:
        rating = int(frame["rating"].iat[p])
        rationale = frame["rationale"].iat[p] if has_rationale_col else ""
        example = {"input": str(frame["prompt"].iat[p]),
                   "output": answer_json(rating, rationale if isinstance(rationale, str) else ""),
                   "rating": rating,
                   "source_row": int(frame["source_row"].iat[p])}
        if has_id:
            example["row_id"] = str(frame["row_id"].iat[p])
        examples.append(example)
    mapping = ds.mapping
    return {
        "base_model": base_model,
        "target_topics": normalize_topics(topics),
        "rating_mapping": {str(k): int(v) for k, v in mapping.labels.items()},
        "rating_labels": {str(v): labels for v, labels in labels_by_value(mapping.labels).items()},
        "system_prompt": system,
        "few_shot_examples": examples,
        "output_schema": output_schema(mapping.values),
        "ollama": {"model_name": model_name, "from": base_model, "parameters": {"temperature": 0}},
        "dataset_size": int(n),
        "label_distribution": _label_distribution(ds),
        "source_sha256": dict(input_hashes),
        "defaults": dict(defaults),
        "created_at": created_at.isoformat() if isinstance(created_at, datetime) else str(created_at),
    }


# Modelfile text ----------------------------------------------------------------------------------

MESSAGE_ROLES = ("system", "user", "assistant")
COMMANDS = ("from", "license", "template", "system", "adapter", "draft", "renderer", "parser",
            "parameter", "message", "requires")
_AS_NEWLINE = frozenset("\v\f\x1c\x1d\x1e\x85\u2028\u2029")
# a """ that only whitespace separates from a line break would end a triple-quoted value there
_CLOSING_TRIPLE = re.compile(r'"""(?=[ \t\r\n]*[\r\n])')
_PARAM_NAME = re.compile(r"[A-Za-z0-9_]+")


def modelfile_safe_text(text: str) -> str:
    """``text`` as Ollama's parser can carry it (see the module docstring); the identity for text
    made of printable characters, tabs and line breaks without a ``\"\"\"`` at the end of a line."""
    text = str(text)
    if not _printable_with_breaks(text):
        out = []
        for ch in text:
            if ch in "\t\n\r" or ch.isprintable():
                out.append(ch)
            elif ch in _AS_NEWLINE:
                out.append("\n")
            elif unicodedata.category(ch) == "Zs":
                out.append(" ")
        text = "".join(out)
    return _CLOSING_TRIPLE.sub('""\u201d', text)


def _printable_with_breaks(text: str) -> bool:
    return text.isprintable() or text.replace("\t", "").replace("\n", "").replace("\r", "").isprintable()


def _quoted(text: str) -> str:
    return '"""' + modelfile_safe_text(text) + '"""'


def _word_value(value: str, what: str) -> str:
    """A single-line argument (model, path, parameter): bare when that reads back unchanged."""
    value = str(value)
    if not value or "\n" in value or "\r" in value or not value.isprintable():
        raise ModelSetConfigError(f"{what} must be a non-empty single line of printable characters",
                                  hint="fix the configured model name, path or parameter")
    if value == value.strip(" ") and not value.startswith('"'):
        return value
    return '"""' + value + '"""'


def _parameter_text(text: str) -> str:
    """Bare when that reads back unchanged, else triple-quoted (a stop sequence may hold a newline)."""
    if text and text.isprintable() and text == text.strip(" ") and not text.startswith('"'):
        return text
    return _quoted(text)


def _parameter_values(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [v for item in value for v in _parameter_values(item)]
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, int):
        return [str(value)]
    if isinstance(value, float):
        return [str(int(value))] if value.is_integer() and abs(value) < 1e15 else [repr(value)]
    return [str(value)]


def _message_pair(message: Any) -> tuple[str, str]:
    if isinstance(message, Mapping):
        return str(message.get("role", "")), str(message.get("content", ""))
    role, content = message
    return str(role), str(content)


def modelfile_text(*, base: str, system: str | None, messages: Sequence[Any],
                   parameters: Mapping[str, Any] | None, adapter: str | None = None,
                   template: str | None = None) -> str:
    """The Modelfile: FROM, ADAPTER (when given), TEMPLATE (the turn format of a base without its
    own), SYSTEM, PARAMETER lines, then MESSAGE lines (``messages`` as ``{"role", "content"}`` dicts
    or ``(role, content)`` pairs)."""
    lines = ["# Written by fine-tuner. Create the model with: ollama create NAME -f Modelfile",
             f"FROM {_word_value(base, 'FROM')}"]
    if adapter:
        lines.append(f"ADAPTER {_word_value(adapter, 'ADAPTER')}")
    if template is not None:
        lines.append(f"TEMPLATE {_quoted(template)}")
    if system is not None:
        lines.append(f"SYSTEM {_quoted(system)}")
    for name, value in (parameters or {}).items():
        if not _PARAM_NAME.fullmatch(str(name)):
            raise ModelSetConfigError(f"invalid parameter name {str(name)!r}",
                                      hint="use Ollama parameter names such as temperature or num_ctx")
        for text in _parameter_values(value):
            lines.append(f"PARAMETER {name} {_parameter_text(text)}")
    for number, message in enumerate(messages, start=1):
        role, content = _message_pair(message)
        if role not in MESSAGE_ROLES:
            raise ModelSetConfigError(f"message {number} has role {role!r}; it must be one of "
                                      f"{', '.join(MESSAGE_ROLES)}",
                                      hint="pass few-shot messages as user/assistant pairs")
        lines.append(f"MESSAGE {role} {_quoted(content)}")
    return "\n".join(lines) + "\n"


# Modelfile parser --------------------------------------------------------------------------------

def _parse_error(line: int, what: str) -> ModelSetConfigError:
    return ModelSetConfigError(f"Modelfile line {line}: {what}",
                               hint="regenerate the Modelfile, or fix that line by hand")


class _Scanner:
    """Reads a Modelfile the way Ollama's parser does: instructions, then a bare, ``"..."`` or
    ``\"\"\"...\"\"\"`` value that ends at the first line break where the quote is complete."""

    def __init__(self, text: str) -> None:
        self.text = text[1:] if text.startswith("\ufeff") else text
        self.i = 0
        self.line = 1

    def at_end(self) -> bool:
        return self.i >= len(self.text)

    def peek(self) -> str:
        return self.text[self.i]

    def advance(self) -> str:
        ch = self.text[self.i]
        self.i += 1
        if ch == "\n" or ch == "\r":
            self.line += 1
        return ch

    def skip_blank_and_comments(self) -> None:
        while not self.at_end():
            ch = self.peek()
            if ch in " \t\r\n":
                self.advance()
            elif ch == "#":
                while not self.at_end() and self.peek() not in "\r\n":
                    self.advance()
            else:
                return

    def word(self, allowed) -> str:
        """A run of ``allowed`` characters that must be followed by a space or tab (consumed)."""
        start = self.i
        while not self.at_end() and allowed(self.peek()):
            self.advance()
        word = self.text[start:self.i]
        if self.at_end():
            raise _parse_error(self.line, "unexpected end of file after an instruction")
        if self.peek() not in " \t":
            raise _parse_error(self.line, "an instruction must be followed by a space and its argument")
        self.advance()
        return word

    def value(self) -> str:
        buf: list[str] = []
        first = last = -1  # first and last non-blank index in buf: the trimmed value
        while not self.at_end():
            ch = self.advance()
            if ch in "\r\n":
                done = _unquote(buf, first, last)
                if done is not None:
                    return done
                buf.append(ch)
                continue
            if ch in " \t":
                buf.append(ch)
            elif ch.isprintable():  # Ollama drops other non-printable characters
                buf.append(ch)
                last = len(buf) - 1
                if first < 0:
                    first = last
        done = _unquote(buf, first, last)
        if done is None:
            raise _parse_error(self.line, "unterminated quoted value at end of file")
        return done


def _unquote(buf: list[str], first: int, last: int) -> str | None:
    """The value when the trimmed buffer is complete: bare text, or a closed ``"`` / ``\"\"\"`` quote."""
    if first < 0:
        return ""
    size = last - first + 1
    if size >= 3 and buf[first] == buf[first + 1] == buf[first + 2] == '"':
        if size >= 6 and buf[last] == buf[last - 1] == buf[last - 2] == '"':
            return "".join(buf[first + 3:last - 2])
        return None
    if buf[first] == '"':
        if size >= 2 and buf[last] == '"':
            return "".join(buf[first + 1:last])
        return None
    return "".join(buf[first:last + 1])


def _is_ascii_letter(ch: str) -> bool:
    return ch.isascii() and ch.isalpha()


def _is_param_char(ch: str) -> bool:
    return ch.isascii() and (ch.isalnum() or ch == "_")


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, argument) pairs in file order, instruction upper-case. Like Ollama, PARAMETER's
    argument is ``"<name> <value>"`` and MESSAGE's is ``"<role>: <content>"``. Raises
    ``ModelSetConfigError`` (with the line number) for what Ollama rejects, including no FROM line."""
    scan = _Scanner(text)
    pairs: list[tuple[str, str]] = []
    while True:
        scan.skip_blank_and_comments()
        if scan.at_end():
            break
        line = scan.line
        if not scan.peek().isprintable():
            scan.advance()  # Ollama starts the instruction here but keeps only printable characters
        name = scan.word(_is_ascii_letter)
        if name.lower() not in COMMANDS:
            raise _parse_error(line, f"unknown instruction; use one of {', '.join(c.upper() for c in COMMANDS)}")
        instruction = name.upper()
        prefix = ""
        if instruction == "PARAMETER":
            prefix = scan.word(_is_param_char) + " "
        elif instruction == "MESSAGE":
            role = scan.word(_is_ascii_letter)
            if role not in MESSAGE_ROLES:
                raise _parse_error(line, f"message role must be one of {', '.join(MESSAGE_ROLES)}")
            prefix = role + ": "
        pairs.append((instruction, prefix + scan.value()))
    if not any(instruction == "FROM" for instruction, _ in pairs):
        raise _parse_error(scan.line, "no FROM line")
    return pairs


_INT_PARAMETERS = frozenset({"num_ctx", "repeat_last_n", "seed", "num_predict", "draft_num_predict",
                             "top_k", "num_keep", "num_batch", "num_gpu", "main_gpu", "num_thread"})
_FLOAT_PARAMETERS = frozenset({"repeat_penalty", "temperature", "top_p", "min_p", "typical_p",
                               "presence_penalty", "frequency_penalty"})


def _parameter_value(name: str, value: str) -> Any:
    try:
        if name in _INT_PARAMETERS:
            return int(value)
        if name in _FLOAT_PARAMETERS:
            number = float(value)
            return int(number) if number.is_integer() else number
    except ValueError:
        raise ModelSetConfigError(f"PARAMETER {name} has a value that is not a number",
                                  hint="fix the Modelfile's PARAMETER line") from None
    return value


def modelfile_create_fields(pairs: Iterable[tuple[str, str]]) -> dict:
    """Parsed pairs → the fields of Ollama's JSON create request (reference §3.4/§6): ``from``,
    ``adapter`` (the path, for the caller to upload), ``system``, ``template``, ``license``,
    ``messages`` and ``parameters`` (``stop`` always a list; known numeric parameters as numbers)."""
    fields: dict[str, Any] = {}
    messages: list[dict] = []
    parameters: dict[str, Any] = {}
    for instruction, argument in pairs:
        if instruction == "FROM":
            fields["from"] = argument
        elif instruction == "ADAPTER":
            fields["adapter"] = argument
        elif instruction in ("SYSTEM", "TEMPLATE"):
            fields[instruction.lower()] = argument
        elif instruction == "LICENSE":
            fields.setdefault("license", []).append(argument)
        elif instruction == "MESSAGE":
            role, _, content = argument.partition(": ")
            messages.append({"role": role, "content": content})
        elif instruction == "PARAMETER":
            name, _, value = argument.partition(" ")
            if name == "stop":
                parameters.setdefault("stop", []).append(value)
            else:
                parameters[name] = _parameter_value(name, value)
    if messages:
        fields["messages"] = messages
    if parameters:
        fields["parameters"] = parameters
    return fields
