"""Registering a built model in Ollama: a model set (base + system prompt + few-shot messages), a
LoRA adapter (blobs + ``adapters``) or, where Ollama will not take the adapter, the adapter merged
into its base GGUF (one blob as ``files``), each followed by a check, and the ``ollama.register``
and ``ollama.merge_adapter`` policies.

Registration is ``create`` → ``show`` → one chat with the answer schema as ``format``; the check
records whether the answer is valid by the rule evaluation and rating judge answers with
(``prompts.parse_answer``: a JSON object whose ``rating`` is on the scale). ``register_with_policy``
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

from ..errors import (AdapterRefusedError, ConfigError, ModelSetConfigError, OllamaError, OllamaUnavailableError,
                      RegistrationError)
from ..logconfig import get_logger
from ..data.modelset import modelfile_create_fields, parse_modelfile
from ..data.prompts import parse_answer
from ..outputs.names import ADAPTER_FILES, ADAPTER_GGUF as GGUF_ADAPTER

_log = get_logger("register")

NEUTRAL_PROBE = ("Emergency department visit. Chief complaint: routine follow-up, no acute complaint. "
                 "Rate this record.")
CHECK_OPTIONS = {"temperature": 0, "seed": 42, "num_predict": 256}
REGISTER_MODES = ("auto", "required", "off")
MERGE_MODES = ("auto", "always", "never")
# what an Ollama that will not attach the adapter answers the create with (besides a 400)
REFUSED_ERRORS = ("unsupported architecture",)


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
                "detail": f"the answer ({size} characters) is not a JSON object whose "
                          '"rating" is one of the scale'}
    return {"ok": True, "duration_s": duration,
            "detail": 'the answer is a JSON object whose "rating" is one of the scale'}


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
    Returns {"registered": True, "name", "digest", "adapters", "check"}; a missing adapter file
    raises RegistrationError, a create the server refuses (400, or ``unsupported architecture``) or
    a model without ADAPTER line AdapterRefusedError, other server failures OllamaError."""
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
    try:
        client.create(name, from_=base, adapters=adapters, system=system, parameters=dict(parameters),
                      template=template, on_status=_log_status(name))
    except OllamaError as exc:
        if isinstance(exc, OllamaUnavailableError) or not (exc.status == 400 or exc.server_error in REFUSED_ERRORS):
            raise
        raise AdapterRefusedError(f"Ollama refused to create {name!r} from {base!r} with the adapter: "
                                  f"{exc.server_error or exc.message}", status=exc.status,
                                  server_error=exc.server_error, hint=REFUSED_HINT) from exc
    info = client.show(name)
    if not _has_adapter_line(str(info.get("modelfile") or "")):
        raise AdapterRefusedError(f"Ollama created {name!r} but shows no ADAPTER in its Modelfile",
                                  hint=f"check that {base!r} is the base the adapter was trained on; "
                                       f"{REFUSED_HINT}")
    digest = _digest_of(client, name)
    check = check_answer(client, name, output_schema, probe or NEUTRAL_PROBE)
    _log.info("adapter_registered", model_name=name, base_model=base, digest=digest,
             adapter_digests=sorted(adapters.values()), check_ok=check["ok"],
             duration_s=round(time.monotonic() - started, 3))
    return {"registered": True, "name": name, "digest": digest, "adapters": adapters, "check": check}


# --- merged into the base ----------------------------------------------------------------------

REFUSED_HINT = ("Ollama 0.34.1 and later create no model from base + adapter: set ollama.merge_adapter to "
                "auto or always to register the adapter merged into its base GGUF")


def _base_fields(client, base: str) -> dict:
    """The template and parameters ``base`` has in Ollama (what a create ``from`` it inherits), read
    from its generated Modelfile; {} when Ollama does not have it or its Modelfile cannot be read."""
    try:
        modelfile = str(client.show(base).get("modelfile") or "")
    except OllamaError as exc:
        if exc.status != 404:
            raise
        return {}
    try:
        fields = modelfile_create_fields(parse_modelfile(modelfile))
    except ModelSetConfigError:
        _log.warning("base_modelfile_unreadable", base_model=base)
        return {}
    return {k: fields[k] for k in ("template", "parameters") if k in fields}


def register_merged(client, *, name: str, base: str, gguf: str | os.PathLike, system: str,
                    parameters: Mapping[str, Any], output_schema: Mapping[str, Any],
                    probe: str | None = None, template: str | None = None) -> dict:
    """Upload the merged GGUF as a blob and create ``name`` from it as ``files`` (``FROM`` the
    file, no ADAPTER), with the template and parameters ``base`` has in Ollama under ``template``
    and ``parameters``; check with ``show`` that no ADAPTER is attached, then check one answer.
    Returns {"registered": True, "name", "digest", "files", "modelfile" (the template and parameters
    the model was created with), "check"}."""
    gguf = Path(gguf)
    started = time.monotonic()
    inherited = _base_fields(client, base)
    files = {gguf.name: client.upload_blob(gguf)}
    client.create(name, files=files, system=system,
                  parameters={**(inherited.get("parameters") or {}), **dict(parameters)},
                  template=template if template is not None else inherited.get("template"),
                  on_status=_log_status(name))
    info = client.show(name)
    if _has_adapter_line(str(info.get("modelfile") or "")):
        raise RegistrationError(f"Ollama created {name!r} from the merged GGUF but shows an ADAPTER in its "
                                "Modelfile", hint="delete the model (ollama rm) and register it again")
    digest = _digest_of(client, name)
    check = check_answer(client, name, output_schema, probe or NEUTRAL_PROBE)
    _log.info("merged_model_registered", model_name=name, base_model=base, digest=digest,
              gguf_digest=files[gguf.name], check_ok=check["ok"], duration_s=round(time.monotonic() - started, 3))
    used = {"template": template if template is not None else inherited.get("template"),
            "parameters": {**(inherited.get("parameters") or {}), **dict(parameters)}}
    return {"registered": True, "name": name, "digest": digest, "files": files, "modelfile": used, "check": check}


def register_fine_tune(client, *, merge: str, merged: Callable[[], dict], name: str, base: str,
                       adapter_dir: str | os.PathLike, system: str, parameters: Mapping[str, Any],
                       output_schema: Mapping[str, Any], probe: str | None = None,
                       adapter_format: str = "safetensors", template: str | None = None) -> dict:
    """Register a fine-tune under ``ollama.merge_adapter`` (``merge``): ``never`` as base + adapter
    (``register_adapter``); ``auto`` so, and merged when Ollama refuses the adapter
    (``AdapterRefusedError``); ``always`` merged at once. ``merged()`` writes the merged GGUF (see
    ``merge.merge_adapter``) and returns its record, whose ``path`` is the file. The result says
    ``registered_as`` ("adapter" or "merged"); a merged one also has ``merged`` (the file's record)
    and, on ``auto``, ``adapter_refused`` (the status and the server's error text)."""
    if merge not in MERGE_MODES:
        raise ConfigError([f"ollama.merge_adapter: must be one of {', '.join(MERGE_MODES)} (got {merge!r})"])
    refused: dict | None = None
    if merge != "always":
        try:
            return {**register_adapter(client, name=name, base=base, adapter_dir=adapter_dir, system=system,
                                       parameters=parameters, output_schema=output_schema, probe=probe,
                                       adapter_format=adapter_format, template=template),
                    "registered_as": "adapter"}
        except AdapterRefusedError as exc:
            if merge == "never":
                raise
            refused = {"status": exc.status, "server_error": exc.server_error}
            _log.warning("adapter_refused", model_name=name, status=exc.status, merge_adapter=merge)
    try:
        record = dict(merged())
    except RegistrationError as exc:
        if refused is None:
            raise
        raise RegistrationError(f"Ollama refused the adapter ({refused['server_error'] or refused['status']}), "
                                f"and {exc.message}", status=refused["status"],
                                server_error=refused["server_error"], hint=exc.hint) from exc
    path = Path(record.pop("path"))
    result = register_merged(client, name=name, base=base, gguf=path, system=system, parameters=parameters,
                             output_schema=output_schema, probe=probe, template=template)
    return {**result, "registered_as": "merged", "merged": record,
            **({"adapter_refused": refused} if refused is not None else {})}


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
                                hint="inspect the model with ollama run; "
                                     "set ollama.register to auto to keep such results")
    return result
