"""Registering a built model in Ollama: a model set (base + system prompt + few-shot messages) or a
LoRA adapter (blobs + ``adapters``), each followed by a check, and the ``ollama.register`` policy.

Registration is ``create`` → ``show`` → one chat with the answer schema as ``format``; the check
records whether the answer parses as ``{"rationale": str, "rating": int}``. ``register_with_policy``
turns failures into a result (``auto``) or a ``RegistrationError`` (``required``). Neither the
few-shot texts nor a chat answer ever reach a log line or an error message: they are patient text.
The server's own error text is kept (truncated by the client).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError, OllamaError, OllamaUnavailableError, RegistrationError
from ..logconfig import get_logger
from ..data.prompts import parse_answer

_log = get_logger("register")

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
GGUF_ADAPTER = "adapter.gguf"
NEUTRAL_PROBE = ("Emergency department visit. Chief complaint: routine follow-up, no acute complaint. "
                 "Rate this record.")
CHECK_OPTIONS = {"temperature": 0, "seed": 42, "num_predict": 256}
REGISTER_MODES = ("auto", "required", "off")


# --- helpers -----------------------------------------------------------------------------------

def _same_name(a: str, b: str) -> bool:
    """Ollama's name equality: tag defaults to latest, case does not matter."""
    def norm(name: str) -> str:
        last = name.rsplit("/", 1)[-1]
        return (name if ":" in last else name + ":latest").lower()
    return norm(a) == norm(b)


def _digest_of(client, name: str) -> str | None:
    for entry in client.list_models():
        if _same_name(str(entry.get("name") or entry.get("model") or ""), name):
            return entry.get("digest")
    return None


def _rating_values(schema: Mapping[str, Any] | None) -> list[int] | None:
    try:
        values = schema["properties"]["rating"]["enum"]  # type: ignore[index]
    except (KeyError, TypeError):
        return None
    return [int(v) for v in values] if isinstance(values, list) else None


def check_answer(client, name: str, output_schema: Mapping[str, Any], probe: str,
                 system: str | None = None) -> dict:
    """One chat with ``output_schema`` as ``format``; {"ok", "detail", "duration_s"}. The answer
    itself is never returned or logged."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": probe}]
    started = time.monotonic()
    try:
        resp = client.chat(name, messages, format=dict(output_schema), options=CHECK_OPTIONS)
    except OllamaError as exc:
        return {"ok": False, "detail": f"the check chat failed: {exc.message}",
                "status": exc.status, "duration_s": round(time.monotonic() - started, 3)}
    duration = round(time.monotonic() - started, 3)
    content = (resp.get("message") or {}).get("content")
    parsed = parse_answer(content, _rating_values(output_schema)) if isinstance(content, str) else None
    if parsed is None:
        size = len(content) if isinstance(content, str) else 0
        return {"ok": False, "duration_s": duration,
                "detail": f"the answer ({size} characters) is not a JSON object "
                          f'{{"rationale": <text>, "rating": <one of the scale>}}'}
    return {"ok": True, "duration_s": duration,
            "detail": 'the answer parses as {"rationale": str, "rating": int} with a rating on the scale'}


def _log_status(name: str) -> Callable[[dict], None]:
    def on_status(status: dict) -> None:
        _log.debug("ollama_create_status", model_name=name, status=status.get("status"))
    return on_status


# --- model set ---------------------------------------------------------------------------------

def few_shot_messages(config: Mapping[str, Any]) -> list[dict]:
    """The few-shot examples as alternating user/assistant messages."""
    out: list[dict] = []
    for example in config.get("few_shot_examples") or []:
        out.append({"role": "user", "content": str(example["input"])})
        out.append({"role": "assistant", "content": str(example["output"])})
    return out


def register_model_set(client, config: Mapping[str, Any], *, name: str | None = None) -> dict:
    """Create the model set's Ollama model from ``model_set_config.json`` content, show it, check one
    answer. Returns {"registered": True, "name", "digest", "check"}; OllamaError on failure."""
    ollama = config.get("ollama") or {}
    name = name or ollama["model_name"]
    base = config["base_model"]
    parameters = dict(ollama.get("parameters") or {"temperature": 0})
    messages = few_shot_messages(config)
    started = time.monotonic()
    client.create(name, from_=base, system=config["system_prompt"], messages=messages,
                  parameters=parameters, on_status=_log_status(name))
    client.show(name)
    digest = _digest_of(client, name)
    examples = config.get("few_shot_examples") or []
    probe = str(examples[0]["input"]) if examples else NEUTRAL_PROBE
    check = check_answer(client, name, config["output_schema"], probe)
    _log.info("model_set_registered", model_name=name, base_model=base, digest=digest,
             messages=len(messages), check_ok=check["ok"], duration_s=round(time.monotonic() - started, 3))
    return {"registered": True, "name": name, "digest": digest, "check": check}


# --- adapter -----------------------------------------------------------------------------------

def _has_adapter_line(modelfile: str) -> bool:
    return any(line.strip().upper().startswith("ADAPTER ") for line in (modelfile or "").splitlines())


def register_adapter(client, *, name: str, base: str, adapter_dir: str | os.PathLike, system: str,
                     parameters: Mapping[str, Any], output_schema: Mapping[str, Any],
                     probe: str | None = None, adapter_format: str = "safetensors",
                     template: str | None = None) -> dict:
    """Upload the adapter as blobs, create ``name`` from ``base`` with it as ``adapters``, check
    with ``show`` that an ADAPTER is attached, then check one answer. ``adapter_format``:
    ``safetensors`` (the PEFT files, which Ollama converts for llama and gemma2) or ``gguf`` (the
    ``adapter.gguf`` llama.cpp's converter wrote, for every other architecture); ``template``: the
    turn format of a base that has none of its own.
    Returns {"registered": True, "name", "digest", "adapters", "check"}; a missing adapter file or
    a model without ADAPTER line raises RegistrationError, server failures OllamaError."""
    adapter_dir = Path(adapter_dir)
    files = (GGUF_ADAPTER,) if adapter_format == "gguf" else ADAPTER_FILES
    missing = [f for f in files if not (adapter_dir / f).is_file()]
    if missing:
        hint = ("llama.cpp's converter did not write it (see fine_tuning_metadata.json, training.gguf_adapter); "
                "run `make llama-cpp` and train again" if adapter_format == "gguf" else
                "the training run did not finish; train again")
        raise RegistrationError(f"the adapter folder {adapter_dir} lacks {', '.join(missing)}", hint=hint)
    started = time.monotonic()
    adapters = {f: client.upload_blob(adapter_dir / f) for f in files}
    client.create(name, from_=base, adapters=adapters, system=system, parameters=dict(parameters),
                  template=template, on_status=_log_status(name))
    info = client.show(name)
    if not _has_adapter_line(str(info.get("modelfile") or "")):
        raise RegistrationError(f"Ollama created {name!r} but shows no ADAPTER in its Modelfile",
                                hint=f"check that {base!r} is the base the adapter was trained on and "
                                     f"that the Ollama server supports safetensors adapters")
    digest = _digest_of(client, name)
    check = check_answer(client, name, output_schema, probe or NEUTRAL_PROBE)
    _log.info("adapter_registered", model_name=name, base_model=base, digest=digest,
             adapter_digests=sorted(adapters.values()), check_ok=check["ok"],
             duration_s=round(time.monotonic() - started, 3))
    return {"registered": True, "name": name, "digest": digest, "adapters": adapters, "check": check}


# --- policy ------------------------------------------------------------------------------------

def _reason(exc: OllamaError) -> str:
    return f"{exc.message} ({exc.hint})" if exc.hint else exc.message


def register_with_policy(mode: str, action: Callable[[], dict], *, log=None) -> dict:
    """Apply ``ollama.register``: ``off`` registers nothing; ``auto`` runs ``action`` and records
    any OllamaError as {"registered": False, "reason", "error"} (the job still succeeds; a failed
    answer check is recorded in "check", not raised); ``required`` raises RegistrationError (status
    and server_error kept) for any OllamaError or a failed answer check."""
    logger = log if log is not None else _log
    if mode not in REGISTER_MODES:
        raise ConfigError([f"ollama.register: must be one of {', '.join(REGISTER_MODES)} (got {mode!r})"])
    if mode == "off":
        return {"registered": False, "reason": "ollama.register is off"}
    try:
        result = action()
    except RegistrationError as exc:
        if mode == "required":
            raise
        logger.warning("registration_skipped", error_type=exc.error_type, status=exc.status)
        return {"registered": False, "reason": _reason(exc), "error": exc.to_dict()}
    except OllamaError as exc:
        if mode == "required":
            raise RegistrationError(f"registration in Ollama failed: {exc.message}", status=exc.status,
                                    server_error=exc.server_error,
                                    hint=exc.hint or "fix Ollama and resubmit, or set ollama.register to auto") from exc
        logger.warning("registration_skipped", error_type=exc.error_type, status=exc.status,
                       unavailable=isinstance(exc, OllamaUnavailableError))
        return {"registered": False, "reason": _reason(exc), "error": exc.to_dict()}
    check = result.get("check") or {}
    if mode == "required" and result.get("registered") and check.get("ok") is False:
        raise RegistrationError(f"{result.get('name')!r} was registered but failed its check: {check.get('detail')}",
                                status=check.get("status"),
                                hint="inspect the model with ollama run; set ollama.register to auto to keep such results")
    return result
