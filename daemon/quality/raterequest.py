"""One rating request, whichever door it came in by (``fine-tuner rate`` or an inbox ``task: rate``
job): the model that rates it (``rating_model``) and what follows a finished run (``finish``: the
rationales of the records going to the experts, ``needs_review.csv`` and the summary file). Both
doors call these two, so the same request rates with the same prompts and sends the same records to
review. The request is the job's settings (a job file's values, or the command's flags, over the
configuration's defaults) plus the files the door brings: a mapping, an output folder it named.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import Config, ConfigError
from ..data import prompts
from ..data.mapping import load_mapping
from ..outputs import names
from . import ratefile

if TYPE_CHECKING:
    from ..data.jobsettings import JobSettings


def model_folder(model: str, config: Config, outputs: Path) -> Path | None:
    """The output folder of the service that a request's ``model`` names (``outputs/<job_id>`` or the
    bare job id), else None: an Ollama model name, which needs a rating mapping. A link in place of
    the folder or its metadata counts as a folder: ``model_from_folder`` refuses it, never follows
    it (a model folder elsewhere would bring its own system prompt and files)."""
    name = model.removeprefix(f"{config.paths.outputs.rstrip('/')}/")
    folder = outputs / name
    if "/" not in name and (os.path.islink(folder) or os.path.lexists(folder / names.METADATA)):
        return folder
    return None


def rating_model(settings: JobSettings, config: Config, *, outputs: Path, mapping: Path | None,
                 folder: Path | None = None, current_folder: Callable[[str], Path] | None = None,
                 ask_mapping: str, source: str | None = None, hint: str | None = None) -> ratefile.RatingModel:
    """The model that rates the request, in this order: ``folder`` (an output folder the user named
    by its path: everything from it); the topic's current model (``settings.topic``, its folder from
    ``current_folder``); an output folder of the service that ``settings.model`` names (both
    strictly in ``outputs``, never through a link); else the bare Ollama model ``settings.model``
    asked with ``mapping``'s labels, the system prompt of ``settings.topics`` and
    ``settings.topic_definition``, and ``settings.prompt_template``. Without a mapping for a bare
    model: one ConfigError (``source``, ``hint``) ending with ``ask_mapping``, how to give one."""
    if folder is not None:
        return ratefile.model_from_folder(folder)
    if settings.topic is not None:
        if current_folder is None:
            raise ValueError("a request with a topic needs current_folder")
        return ratefile.model_from_folder(current_folder(settings.topic), within=outputs)
    named = model_folder(settings.model, config, outputs)
    if named is not None:
        return ratefile.model_from_folder(named, within=outputs)
    if mapping is None:
        raise ConfigError([f"model: {settings.model} is not an output folder of this service, and a bare Ollama "
                           f"model needs a rating mapping: {ask_mapping}"], source=source, hint=hint)
    labels = dict(load_mapping(mapping).labels)
    system = prompts.system_prompt(settings.topics, labels, settings.topic_definition)
    return ratefile.model_from_name(settings.model, system=system, labels=labels, template=settings.prompt_template)


def review_threshold(settings: JobSettings, config: Config) -> float | None:
    """The confidence under which a rated record goes to the experts: the request's, else
    ``rating.review_below`` (None: no ``needs_review.csv``)."""
    return settings.review_below if settings.review_below is not None else config.rating.review_below


def finish(model: ratefile.RatingModel, summary: dict, input_csv: Path, output_csv: Path, settings: JobSettings,
           config: Config, summary_path: Path, *, stop_event: threading.Event | None = None) -> dict:
    """After ``ratefile.rate_file``: the rationales of the records going to review
    (``ratefile.explain_for_review``), ``needs_review.csv`` (``ratefile.route_for_review``, spread over
    the kinds of records ``settings.group_by``, else ``evaluation.group_by``, names) and, for a
    finished run, the summary written to ``summary_path`` with the ratings file's name. Returns the
    summary; a stopped run's is returned unwritten (it resumes later)."""
    below = review_threshold(settings, config)
    summary = ratefile.explain_for_review(model, summary, input_csv, output_csv, config, below, stop_event=stop_event)
    group_by = settings.group_by if settings.group_by is not None else config.evaluation.group_by
    summary = ratefile.route_for_review(summary, input_csv, output_csv, below, group_by=group_by)
    if summary.get("status") == "done":
        summary = {**summary, "output": Path(output_csv).name}
        ratefile.write_summary(summary, summary_path)
    return summary
