"""Evaluating an output folder: which models, which rows, which backend; the report.

Every model of a job is measured on the same held-out rows (``validation_data.jsonl``, rows the
model never saw: the fine-tune did not train on them and no few-shot example comes from them):

1. the new model: the fine-tune (base + adapter) or the model set (base + system prompt + few-shot);
2. the base model zero-shot (the same system prompt, no examples, no adapter);
3. for a fine-tune, also the model set built from the same training rows
   (``comparison_model_set.json``), so the user sees whether fine-tuning was worth its cost.

``evaluation.compare`` (a job's ``compare``) keeps 2 and 3 (``all``), 2 only (``base``) or neither
(``none``); the bag-of-words baseline is measured beside the new model in every case. The whole
evaluation's time is estimated from the first model's first answers (``evaluation_estimated``).

Backend ``auto`` uses Ollama when it is reachable and can serve every model (a fine-tune only once
its adapter is registered), else the OpenAI-compatible server at ``openai.base_url`` when its
``GET /models`` lists the served name (``openai.model``, else the base model's; a model set's
few-shot turns go as messages; a fine-tune's adapter is asked for by name or by its ``lora`` scale),
else, with ``evaluation.start_llama_server``, a managed llama.cpp ``llama-server`` started for the run
with the base GGUF and the fine-tune's ``adapter.gguf`` (``served``), else the local backend when the
base weights are on disk and the training packages are installed, else the evaluation is skipped
with the reason. The same code runs
inside a job (before the folder is published) and from ``fine-tuner evaluate OUTPUT_DIR``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import evalreport, trust
from .. import fsutil
from ..data import prompts
from ..config import Config
from ..logconfig import get_logger
from ..outputs import names
from ..outputs import folder as folder_files
from ..outputs.folder import registered_name
from . import head as head_module
from .backends import HeadRater, LocalRater, OllamaRater, OpenAIRater, RaterError

if TYPE_CHECKING:
    from . import baseline

log = get_logger("evaluator")

BACKENDS = ("auto", "ollama", "openai", "llama-server", "local")
LLAMA_SERVER = "llama-server"
PROGRESS_EVERY_S = 1.0


class EvaluationSkipped(Exception):
    """No backend can run the evaluation, or there is nothing to evaluate; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class EvalModel:
    key: str
    title: str
    ollama_name: str | None = None  # a registered model that already holds its few-shot turns
    adapter_dir: Path | None = None
    few_shot: list[dict] = field(default_factory=list)
    direct: bool = False  # trained on rating-only answers too: every backend asks for the direct decision
    head: Any = None  # a head (``head.Head``): rated by the local features child, no generation


@dataclass
class HeldOut:
    rows: list[int | str]
    expert: list[int]
    system: str
    users: list[str]
    source: str
    sets: list[str] | None = None  # per row "familiar" | "new_kinds" (a grouped split), else None
    ids: list[str] | None = None  # per row the record's id (the input's id column), else None
    id_column: str | None = None


def read_json(path: Path) -> dict:
    """A JSON object file of an output folder (``outputs.folder.object_file``); EvaluationSkipped
    saying why not."""
    try:
        return folder_files.object_file(path)
    except folder_files.OutputFolderError as exc:
        raise EvaluationSkipped(exc.message) from None


def _held_out_records(path: Path) -> list[list[dict]]:
    """The chat records of ``validation_data.jsonl`` (``outputs.folder.chat_records``);
    EvaluationSkipped naming the line that is not one, never quoting it."""
    try:
        return folder_files.chat_records(path)
    except folder_files.OutputFolderError as exc:
        raise EvaluationSkipped(exc.message) from None


def held_out(folder: Path, meta: dict, *, max_rows: int | None, seed: int) -> HeldOut:
    """The held-out rows of an output folder (at most ``max_rows``, a seeded sample in row order)."""
    path = folder / names.VALIDATION_DATA
    if not os.path.lexists(path):  # a link or a FIFO in its place: _held_out_records says so
        raise EvaluationSkipped("there are no held-out rows (a dataset below defaults.min_rows usable "
                                "rows keeps every row for building the model)")
    values = sorted(int(v) for v in (meta.get("mapping") or {}).get("labels", {}).values())
    records = _held_out_records(path)
    if not records:
        raise EvaluationSkipped("there are no held-out rows (validation_data.jsonl is empty)")
    split = meta.get("split") if isinstance(meta.get("split"), dict) else {}
    rows = split.get("validation_source_rows")
    if not (isinstance(rows, list) and all(isinstance(r, int) and not isinstance(r, bool) for r in rows)) \
            or len(rows) != len(records):
        rows = list(range(1, len(records) + 1))
    familiar = split.get("familiar_rows")
    sets = None
    if split.get("kind") == "grouped" and isinstance(familiar, int) and 0 < familiar < len(records) \
            and split.get("validation_rows") == len(records):
        sets = ["familiar" if i < familiar else "new_kinds" for i in range(len(records))]
    keep = list(range(len(records)))
    if max_rows is not None and len(keep) > max_rows:
        keep = sorted(random.Random(seed).sample(keep, max_rows))
    expert, users = [], []
    for i in keep:
        messages = records[i]
        rating = prompts.answer_rating(messages[-1]["content"], values)
        if rating is None:
            raise EvaluationSkipped("validation_data.jsonl holds an expert answer that is not a valid rating")
        expert.append(rating)
        users.append(messages[-2]["content"])
    ids, id_column = split.get("validation_ids"), split.get("id_column")
    if not (isinstance(ids, list) and len(ids) == len(records) and all(isinstance(v, str) for v in ids)
            and isinstance(id_column, str)):
        ids, id_column = None, None  # a folder built before ids were kept, or without an id column
    return HeldOut([rows[i] for i in keep], expert, records[0][0]["content"], users, path.name,
                   [sets[i] for i in keep] if sets is not None else None,
                   [ids[i] for i in keep] if ids is not None else None, id_column)


def models_of(folder: Path, meta: dict) -> list[EvalModel]:
    """The models to compare for this output folder, the new one first."""
    from ..serving.register import few_shot_messages

    registered = registered_name(meta)
    base = EvalModel("base", "base model (zero-shot)")
    if meta.get("approach") == "head":  # measured beside the baseline; no chat model to compare
        return [EvalModel("new", head_module.TITLE, head=load_head(folder))]
    if meta.get("approach") == "fine_tune":
        direct = (meta.get("fine_tune") or {}).get("answer_forms") == "both"
        out = [EvalModel("new", "fine-tune", ollama_name=registered, adapter_dir=folder / names.ADAPTER_DIR,
                         direct=direct)]
        comparison = folder / names.COMPARISON_MODEL_SET
        if comparison.is_file():
            out.append(EvalModel("model_set", "model set", few_shot=few_shot_messages(read_json(comparison))))
        return out + [base]
    config = read_json(folder / names.MODEL_SET_CONFIG)
    return [EvalModel("new", "model set", ollama_name=registered, few_shot=few_shot_messages(config)), base]


def prefix(model: EvalModel, system: str, backend: str) -> list[dict]:
    """The messages before the record, identical for every record of a run. A registered model set
    already holds its few-shot turns, so Ollama gets only the system prompt for it."""
    system_msg = {"role": "system", "content": system}
    if backend == "ollama" and model.ollama_name is not None:
        return [system_msg]
    return [system_msg, *model.few_shot]


def _ollama_problem(models: list[EvalModel], base: str, config: Config, memory=None) -> str | None:
    """Why Ollama cannot serve these models (None when it can): one quick probe, then the names."""
    from ..serving.ollama import OllamaClient, OllamaError

    if any(m.adapter_dir is not None and m.ollama_name is None for m in models):
        return "the fine-tune is not registered in Ollama"
    try:
        with OllamaClient(config.ollama, memory=memory) as client:
            client.version()
            for name in {m.ollama_name or base for m in models}:
                client.show(name)
    except OllamaError as exc:
        return f"Ollama cannot serve the models: {exc.message}"
    return None


@dataclass(frozen=True)
class OpenAIPlan:
    """What to ask the OpenAI-compatible server for: the served name, and for a fine-tune how its
    adapter is served (``serving.openai.ServedAdapter``)."""

    name: str
    adapter: object | None = None

    def target(self, model: EvalModel) -> tuple[str, dict | None]:
        """(the model name, extra request keys) for one model of the job."""
        if self.adapter is None:
            return self.name, None
        if model.adapter_dir is not None:
            return self.adapter.model, self.adapter.extra
        return self.adapter.base_model, self.adapter.base_extra


def _openai_problem(models: list[EvalModel], base: str, config: Config) -> tuple[OpenAIPlan | None, str | None]:
    """(the plan, why the OpenAI-compatible server cannot serve these models): it is not
    configured, ``GET /models`` does not list the served name, or a fine-tune's adapter is neither
    loaded nor loadable there."""
    from ..errors import OpenAIError
    from ..serving.openai import OpenAIClient

    if not (config.openai.base_url or "").strip():
        return None, "openai.base_url is not set"
    try:
        with OpenAIClient(config.openai) as client:
            name, problem = client.served_name(config.openai.model, base)
            if name is None:
                return None, problem
            adapter_dir = next((m.adapter_dir for m in models if m.adapter_dir is not None), None)
            if adapter_dir is None:
                return OpenAIPlan(name), None
            found = client.served_adapter(Path(adapter_dir), name, _adapter_name(Path(adapter_dir)))
    except OpenAIError as exc:
        return None, str(exc)
    if isinstance(found, str):
        return None, found
    log.info("openai_adapter_found", how=found.how)
    return OpenAIPlan(name, found), None


def _adapter_name(adapter_dir: Path) -> str:
    """The name a server loads the fine-tune's adapter under: its output folder's name."""
    return "ft-" + adapter_dir.resolve().parent.name


def _local_problem(models: list[EvalModel], base: str, config: Config,
                   show_modelfile: str | None = None) -> tuple[str | None, str | None]:
    """(the resolved base weights, why the local backend cannot run); ``show_modelfile``: Ollama's
    /api/show Modelfile, whose FROM names its GGUF when the manifest cannot be read."""
    from ..training.supervisor import resolve_base_weights, trainer_packages_available

    if not trainer_packages_available():
        return None, "torch, transformers and peft are not installed (pip install 'fine-tuner[train]')"
    weights = resolve_base_weights(base, config.base_models, allow_download=False,
                                   ollama_models_dir=config.ollama.models_dir, show_modelfile=show_modelfile)
    if weights.local_dir is None or weights.problem is not None:
        return None, weights.problem or f"the weights of {base} are not on disk"
    for m in models:
        if m.adapter_dir is not None and not (m.adapter_dir / "adapter_config.json").is_file():
            return None, "the adapter folder is incomplete"
    return weights, None


def _head_weights(requested: str, base: str, config: Config, show_modelfile: str | None = None):
    """(how a head's vectors are computed: "local", the features child, or ``HeadRater.SERVED``,
    llama-server on GGUFs cut from the base GGUF, when llama-server is asked for; the base weights);
    EvaluationSkipped saying why not: another backend was asked for, the packages or llama-server are
    missing, or the weights are not on this machine. A chat template is not needed: a head never chats."""
    import importlib.util

    from ..llamacpp import server_binary
    from ..training.supervisor import resolve_base_weights, trainer_packages_available

    if requested not in ("auto", "local", LLAMA_SERVER):
        raise EvaluationSkipped(f"a head rates through the local backend or llama-server (the base model's hidden "
                                f"states), not {requested}")
    weights = resolve_base_weights(base, config.base_models, allow_download=False,
                                   ollama_models_dir=config.ollama.models_dir, show_modelfile=show_modelfile)
    if requested == LLAMA_SERVER:
        if importlib.util.find_spec("gguf") is None:
            raise EvaluationSkipped("llama-server: the gguf package is not installed (pip install 'fine-tuner[train]')")
        if server_binary() is None:
            raise EvaluationSkipped("llama-server: it is not built on this machine (make llama-cpp)")
        if not getattr(weights, "gguf_path", None):
            raise EvaluationSkipped(f"llama-server: the base of {base} is not a GGUF on this machine (a head is "
                                    "served from its base GGUF)")
        return HeadRater.SERVED, weights
    if not trainer_packages_available():
        raise EvaluationSkipped("local: torch and transformers are not installed (pip install 'fine-tuner[train]')")
    if weights.local_dir is None or weights.model_type is None:
        raise EvaluationSkipped(f"local: {weights.problem or f'the weights of {base} are not on disk'}")
    return "local", weights


def load_head(folder: Path):
    """The folder's ``head.json``, every field checked; EvaluationSkipped saying why it cannot be used."""
    try:
        return head_module.load(folder / head_module.FILE)
    except (OSError, ValueError) as exc:
        raise EvaluationSkipped(f"{head_module.FILE} cannot be used: {fsutil.read_problem(exc)}") from None


def _llama_server_problem(models: list[EvalModel], base: str, config: Config,
                          show_modelfile: str | None = None):
    """(the managed server's ``ServerSpec``, why it cannot run): llama-server is not built, the base
    GGUF is not on this machine, or a fine-tune has no ``adapter.gguf``."""
    from ..llamacpp import server_binary
    from ..serving.llamaserver import ServerError, model_spec

    if server_binary() is None:
        return None, "llama-server is not built on this machine (make llama-cpp)"
    adapters = tuple(Path(m.adapter_dir) for m in models if m.adapter_dir is not None)
    try:
        spec = model_spec(base, adapters, alias=base, base_models=config.base_models,
                          ollama_models_dir=config.ollama.models_dir, show_modelfile=show_modelfile,
                          parallel=config.openai.parallel)
    except ServerError as exc:
        return None, str(exc)  # with its hint
    return spec, None


@contextlib.contextmanager
def served(chosen: str, plan, models: list[EvalModel], base: str, config: Config):
    """``with served(*choose_backend(...), models, base, config) as (backend, plan, config)``: what
    the raters speak to. For ``llama-server``, the server is started here (on the loopback
    interface, its own output in a temporary folder only we can read) and asked through the
    openai backend, then stopped (``llama_server_started`` / ``llama_server_stopped``); every
    other backend is handed through as it is."""
    if chosen != LLAMA_SERVER:
        yield chosen, plan, config
        return
    from ..serving.llamaserver import LlamaServer, ServerError

    # the server's own output may echo prompts: a folder only we can read, removed afterwards
    with tempfile.TemporaryDirectory(prefix="fine-tuner-llama-server-") as tmp:
        server = LlamaServer(plan, log_path=Path(tmp) / "llama-server.log")
        started = time.monotonic()
        try:
            server.start()
        except ServerError as exc:
            raise RaterError(f"the llama-server started for {base} did not come up: {exc}") from None
        try:
            log.info("llama_server_started", model=base, gguf=plan.model.name, adapters=len(plan.adapters),
                     slots=plan.parallel, port=server.port, load_s=round(time.monotonic() - started, 1))
            local = dataclasses.replace(config, openai=dataclasses.replace(
                config.openai, base_url=server.base_url, model=plan.alias, api_key_env=None))
            openai_plan, problem = _openai_problem(models, base, local)
            if problem is not None:
                raise RaterError(f"the llama-server started for {base} cannot serve the models: {problem}")
            yield "openai", openai_plan, local
        finally:
            code = server.stop()
            log.info("llama_server_stopped", model=base, exit_code=code)


def choose_backend(requested: str, models: list[EvalModel], base: str, config: Config,
                   memory=None, *, show_modelfile: str | None = None) -> tuple[str, Any]:
    """(backend, what it needs: the plan of the openai one, the server of llama-server, the base
    weights of the local one); ``served`` turns it into what the raters use. EvaluationSkipped names
    every reason.
    ``memory``: the job's memory of unreachable Ollama servers (one wait per job);
    ``show_modelfile``: see ``_local_problem``."""
    reasons = []
    if any(m.head is not None for m in models):
        return _head_weights(requested, base, config, show_modelfile)
    if requested in ("auto", "ollama"):
        problem = _ollama_problem(models, base, config, memory)
        if problem is None:
            return "ollama", None
        reasons.append(f"ollama: {problem}")
    if requested in ("auto", "openai"):
        plan, problem = _openai_problem(models, base, config)
        if problem is None:
            return "openai", plan
        reasons.append(f"openai: {problem}")
    if requested == LLAMA_SERVER or (requested == "auto" and config.evaluation.start_llama_server):
        spec, problem = _llama_server_problem(models, base, config, show_modelfile)
        if problem is None:
            return LLAMA_SERVER, spec
        reasons.append(f"llama-server: {problem}")
    if requested in ("auto", "local"):
        weights, problem = _local_problem(models, base, config, show_modelfile)
        if problem is None:
            return "local", weights
        reasons.append(f"local: {problem}")
    raise EvaluationSkipped("no backend can run the evaluation (" + "; ".join(reasons) + ")")


class _ProgressLog:
    """``evaluation_progress`` lines, at most one a second per model and always the last one: done /
    total, percent, records/s, this model's time left (``eta_s``) and the whole evaluation's
    (``evaluation_eta_s``: the rows left of this model and of the models after it, at this model's
    measured rate). The first answers of the first model also make the ``_Estimate``."""

    def __init__(self, key: str, started: float, *, after: int = 0, estimate: "_Estimate | None" = None) -> None:
        self.key = key
        self.started = started
        self.after = after  # models still to be asked after this one
        self.estimate = estimate
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        elapsed = now - self.started
        if done > 0 and self.estimate is not None:
            self.estimate.measured(done, elapsed)
        if done < total and now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        rate = done / elapsed if done and elapsed > 0 else None
        eta = (total - done) / rate if rate else None
        whole = ((total - done) + total * self.after) / rate if rate else None
        log.info("evaluation_progress", model=self.key, done=done, total=total,
                 percent=round(100.0 * done / total, 1) if total else None,
                 records_per_s=round(rate, 2) if rate else None,
                 eta_s=round(eta, 1) if eta is not None else None,
                 evaluation_eta_s=round(whole, 1) if whole is not None else None)


RATES_FILE = "evaluation_rates.json"  # in the state directory: the last measured records/s per backend and base
MAX_RATES_BYTES = 64 * 1024
EARLIER, MEASURED = "earlier evaluations", "this evaluation's first answers"


class _Estimate:
    """How long the whole evaluation will take: before the first answer, at the rate the last
    evaluation with the same backend and base model measured on this machine (when one did), then
    measured rather than guessed: the seconds the first model took for its first answers (a
    backend's first batch: the local child's ``batch_size`` records, its loading included;
    Ollama's or a server's first ``parallel`` answers), per record, times every held-out row of
    every model. Each is logged as ``evaluation_estimated`` with its ``basis``."""

    def __init__(self, rows: int, models: int, backend: str, batch: int, prior: float | None = None) -> None:
        self.rows, self.models, self.backend = rows, models, backend
        self.batch = max(1, min(batch, rows))  # answers in flight together: one of them alone says too little
        self.logged = False
        if prior:
            self._log(1 / prior, 0, EARLIER)

    def _log(self, per_record: float, done: int, basis: str) -> None:
        log.info("evaluation_estimated", backend=self.backend, rows=self.rows, models=self.models,
                 seconds=round(per_record * self.rows * self.models, 1), measured_records=done,
                 records_per_s=round(1 / per_record, 2) if per_record > 0 else None, basis=basis)

    def measured(self, done: int, elapsed: float) -> None:
        if self.logged or done < self.batch:
            return
        self.logged = True
        self._log(elapsed / done, done, MEASURED)


def _rates_path(config: Config) -> Path:
    from ..config import state_directory

    return state_directory(config) / RATES_FILE


def _prior_rate(config: Config, key: str) -> float | None:
    """The records/s the last evaluation with ``key`` (backend and base model) measured; None when
    none did here or the file is unreadable (never a reason to stop)."""
    try:
        rate = fsutil.read_json(_rates_path(config), limit=MAX_RATES_BYTES).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return float(rate) if isinstance(rate, (int, float)) and 0 < rate < 1e6 else None


def _record_rate(config: Config, key: str, rate: float) -> None:
    """Keep ``rate`` for ``key`` in the state directory's rates file, when that directory exists."""
    path = _rates_path(config)
    if not path.parent.is_dir() or not rate > 0:
        return
    try:
        rates = fsutil.read_json(path, limit=MAX_RATES_BYTES)
    except (OSError, ValueError):
        rates = {}
    rates = {k: v for k, v in (rates if isinstance(rates, dict) else {}).items() if isinstance(k, str)}
    rates[key] = round(rate, 4)
    try:
        fsutil.write_json(path, dict(list(rates.items())[-100:]))
    except OSError as exc:
        log.warning("evaluation_rate_not_kept", error=type(exc).__name__)


def _answer_all(models: list[EvalModel], data, base: str, chosen: str, weights, config: Config, schema: dict,
                values: list[int], memory, stop_event, label: str) -> tuple[list, dict[str, list]]:
    """Every model's answers on the held-out rows through one backend (``served``'s): (results,
    answer texts); ``label``: the backend the report names (llama-server is spoken to as openai)."""
    ev = config.evaluation
    seed = config.defaults.seed
    results, texts = [], {}
    batch = {"ollama": config.ollama.parallel, "openai": config.openai.parallel}.get(chosen, ev.batch_size)
    rate_key = f"{label}:{base}"
    estimate = _Estimate(len(data.users), len(models), label, batch, prior=_prior_rate(config, rate_key))
    began = time.monotonic()
    for number, model in enumerate(models):
        shared = prefix(model, data.system, chosen)  # one object: every request starts byte-identical
        conversations = [[*shared, {"role": "user", "content": u}] for u in data.users]
        started = time.monotonic()
        progress = _ProgressLog(model.key, started, after=len(models) - number - 1,
                                estimate=estimate if number == 0 else None)
        if chosen == "ollama":
            name = model.ollama_name or base
            answers = OllamaRater(config.ollama, parallel=config.ollama.parallel, seed=seed,
                                  schema=schema, memory=memory, values=values,
                                  max_tokens=ev.max_new_tokens, direct=model.direct).answer(
                name, conversations, on_progress=progress, stop_event=stop_event)
        elif chosen == "openai":
            name, extra = weights.target(model)  # for this backend, choose_backend's plan
            answers = OpenAIRater(config.openai, seed=seed, schema=schema, extra=extra, values=values,
                                  max_tokens=ev.max_new_tokens, direct=model.direct).answer(
                name, conversations, on_progress=progress, stop_event=stop_event)
        elif model.head is not None:
            name = f"{base}: {model.head.describe()} + head"
            answers = HeadRater(weights, model.head, timeout_s=ev.timeout_s, grace_s=config.training.grace_s,
                                via=chosen).answer(conversations, on_progress=progress, stop_event=stop_event)
        else:
            name = base + (" + adapter" if model.adapter_dir is not None else "")
            answers = LocalRater.for_weights(weights, model.adapter_dir, batch_size=ev.batch_size,
                                 max_new_tokens=ev.max_new_tokens, timeout_s=ev.timeout_s,
                                 grace_s=config.training.grace_s, values=values, direct=model.direct).answer(
                conversations, on_progress=progress, stop_event=stop_event)
        duration = time.monotonic() - started
        texts[model.key] = [a.text for a in answers]
        results.append(evalreport.ModelResult(
            model.key, model.title, name, [prompts.answer_rating(a.text, values) for a in answers],
            [a.latency_s for a in answers], duration, label if model.head is None else HeadRater.backend,
            probs=[a.probs for a in answers],
            extra={"few_shot_turns": len(model.few_shot) // 2}))
    elapsed = time.monotonic() - began
    if elapsed > 0:  # the next evaluation's first estimate
        _record_rate(config, rate_key, len(data.users) * len(models) / elapsed)
    return results, texts


def compared(models: list[EvalModel], compare: str) -> list[EvalModel]:
    """The models ``compare`` keeps: ``all``, ``base`` (the base model zero-shot, not a fine-tune's
    model set) or ``none`` (the new model alone; the baseline is measured beside it in any case)."""
    keep = {"all": ("new", "model_set", "base"), "base": ("new", "base"), "none": ("new",)}[compare]
    return [m for m in models if m.key in keep]


def evaluate_folder(folder: str | Path, meta: dict, config: Config, *, backend: str = "auto",
                    max_rows: int | None = None, stop_event: threading.Event | None = None,
                    memory=None, show_modelfile: str | None = None, compare: str | None = None) -> dict:
    """Evaluate every model of an output folder on its held-out rows; returns the report
    (``evalreport.evaluation_report``). EvaluationSkipped when it cannot run, RaterError when a
    backend fails part-way. ``show_modelfile``: the job's /api/show Modelfile (``choose_backend``);
    ``compare``: which comparisons (``compared``; None: ``evaluation.compare``)."""
    folder = Path(folder)
    ev = config.evaluation
    seed = config.defaults.seed
    compare = compare or ev.compare
    data = held_out(folder, meta, max_rows=ev.max_rows if max_rows is None else max_rows, seed=seed)
    models = compared(models_of(folder, meta), compare)
    base = str(meta.get("model"))
    chosen, plan = choose_backend(backend, models, base, config, memory, show_modelfile=show_modelfile)
    log.info("evaluation_started", backend=chosen, rows=len(data.expert), models=[m.key for m in models],
             compare=compare)
    values = sorted(int(v) for v in meta["mapping"]["labels"].values())
    schema = prompts.output_schema(values)
    with served(chosen, plan, models, base, config) as (speak, weights, cfg):
        results, texts = _answer_all(models, data, base, speak, weights, cfg, schema, values, memory, stop_event,
                                     label=chosen)
    measured = baseline_result(folder, data.users)
    if measured is not None:  # beside the new model, before the comparisons
        results.insert(1, measured)
    adapter_check = None
    if any(m.adapter_dir is not None for m in models) and "new" in texts and "base" in texts:
        adapter_check = evalreport.adapter_effect(texts["new"], texts["base"])
        if adapter_check["ignored"]:
            log.warning("adapter_without_effect", rows=adapter_check["compared_rows"])
    report = evalreport.evaluation_report(
        results, data.expert, data.rows, meta["mapping"]["labels"], seed=seed, source=data.source,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        adapter_check=adapter_check, sets=data.sets, split=_split_summary(meta), ids=data.ids,
        id_column=data.id_column)
    report["compare"] = compare
    report["verdict"] = trust.verdict(report, trust.Thresholds(
        min_kappa=ev.recommend_min_kappa, max_invalid_rate=ev.recommend_max_invalid_rate,
        min_rows=ev.verdict_min_rows))
    report["quality_gate"] = trust.quality_gate(report, ev.min_kappa, ev.max_invalid_rate)
    log.info("evaluation_finished", backend=chosen, rows=len(data.expert), topic=_topic(meta),
             models=evalreport.summary_line(report), recommended=report["verdict"]["recommended"],
             quality_gate=report["quality_gate"]["status"])
    return report


def load_baseline(folder: Path) -> baseline.Baseline | None:
    """The folder's stored bag-of-words baseline; None for a folder built before there was one, and
    for an unreadable one (logged, never a reason to skip the evaluation)."""
    from . import baseline

    path = folder / baseline.FILE
    if not os.path.lexists(path):
        return None
    try:
        return baseline.Baseline.from_json(fsutil.read_json(path, limit=baseline.MAX_FILE_BYTES))
    except (OSError, ValueError) as exc:
        log.warning("baseline_unreadable", file=baseline.FILE, reason=fsutil.read_problem(exc))
        return None


def baseline_result(folder: Path, users: list[str]) -> evalreport.ModelResult | None:
    """The bag-of-words baseline's ratings of the held-out records, timed, with its probabilities."""
    from . import baseline

    fitted = load_baseline(folder)
    if fitted is None:
        return None
    started = time.monotonic()
    probs = fitted.probabilities(users)
    duration = time.monotonic() - started
    ratings = [baseline.most_likely(p) for p in probs]
    per_row = duration / len(users) if users else 0.0
    return evalreport.ModelResult(baseline.KEY, baseline.TITLE, baseline.FILE, ratings, [per_row] * len(users),
                                  round(duration, 4), baseline.KEY, probs=probs)


def _topic(meta: dict) -> str:
    """The folder's topics as one text (the metrics label them by it); "" when it has none."""
    topics = meta.get("target_topics")
    return ", ".join(prompts.normalize_topics(topics)) if isinstance(topics, (str, list)) else ""


def _split_summary(meta: dict) -> dict | None:
    """What the report says about how the held-out rows were chosen (counts and names only)."""
    split = meta.get("split")
    if not isinstance(split, dict) or "kind" not in split:
        return None
    keys = ("kind", "train_rows", "familiar_rows", "new_kinds_rows", "grouping", "groups", "held_out_groups",
            "duplicate_rows", "duplicates_set_aside", "reason")
    return {k: split[k] for k in keys if k in split}


__all__ = ["BACKENDS", "EvaluationSkipped", "RaterError", "evaluate_folder", "held_out", "models_of"]
