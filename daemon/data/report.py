"""The ``fine-tuner validate`` data report, in the spirit of OpenAI's fine-tuning data-prep check.

Rows read and used, drops by reason, label balance, prompt lengths (characters and a rough token
estimate), rationale coverage, warnings and problems, and whether the data is usable (and for
which approach). Counts and statistics only, never a cell value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import DatasetError

CHARS_PER_TOKEN = 4  # a rough, model-independent estimate for English clinical text


def _lengths(values) -> dict[str, Any]:
    import numpy as np

    if len(values) == 0:
        return {}
    arr = np.asarray(values, dtype=np.int64)
    return {"min": int(arr.min()), "mean": round(float(arr.mean()), 1), "p50": int(np.percentile(arr, 50)),
            "p95": int(np.percentile(arr, 95)), "max": int(arr.max())}


def validation_report(csv_path: Path, mapping_path: Path | None, cfg: Config, template=None) -> dict[str, Any]:
    """Validate ``csv_path`` (with ``mapping_path``, or an inferred mapping) and describe it;
    ``template`` (else ``defaults.prompt_template``) builds the prompts of a file without a prompt column."""
    from .dataset import load_dataset
    from .template import parse_template

    if template is None and cfg.defaults.prompt_template is not None:
        template = parse_template(cfg.defaults.prompt_template)
    report: dict[str, Any] = {"file": csv_path.name, "usable": False, "problems": [], "warnings": []}
    try:
        ds = load_dataset(csv_path, mapping_path, template=template, code_knowledge=cfg.defaults.code_knowledge)
    except DatasetError as exc:
        report["problems"].append(exc.to_dict())
        return report
    frame = ds.frame
    prompt_chars = frame["prompt"].str.len().to_numpy()
    min_rows = cfg.defaults.min_rows
    dist = ds.label_distribution
    total = max(ds.rows_used, 1)
    report.update(
        usable=True,
        summary=ds.summary(),
        prompt_source=dict(ds.prompt_source),
        code_knowledge=dict(ds.code_knowledge),
        rows={"read": ds.rows_read, "used": ds.rows_used, "dropped": dict(ds.dropped)},
        label_balance={str(k): {"count": v, "share": round(v / total, 4),
                                "labels": ds.mapping.labels_for(k)} for k, v in dist.items()},
        prompt_chars=_lengths(prompt_chars),
        prompt_tokens_estimate=_lengths(prompt_chars // CHARS_PER_TOKEN),
        rationale_coverage=(round(float((frame["rationale"].str.len() > 0).mean()), 4)
                            if ds.has_rationale and ds.rows_used else 0.0),
        conflicting_duplicates=ds.conflicting_duplicates,
        mapping={"source": ds.mapping.source, "inferred": ds.mapping.inferred, "labels": dict(ds.mapping.labels)},
    )
    report["warnings"].extend(ds.warnings)
    if ds.rows_used < min_rows:
        report["warnings"].append(f"{ds.rows_used} usable rows: fewer than the {min_rows} recommended for "
                                  "fine-tuning; a model set will be built instead (fallback)")
    missing = [v for v in ds.mapping.values if v not in dist]
    if missing:
        report["warnings"].append(f"ratings with no examples: {', '.join(str(v) for v in missing)}")
    if dist and min(dist.values()) * 10 < max(dist.values()):
        report["warnings"].append("labels are imbalanced (largest class over 10x the smallest)")
    seq = cfg.training.sequence_len
    long_rows = int((prompt_chars // CHARS_PER_TOKEN > seq).sum())
    if long_rows:
        report["warnings"].append(f"about {long_rows} rows may exceed sequence_len={seq} tokens and would be "
                                  "dropped from fine-tuning")
    # with enough rows, what approach auto builds where the base weights are on disk (check MODEL says
    # what it builds on this machine)
    report["recommended_approach"] = "head" if ds.rows_used >= min_rows else "model_set"
    return report


def format_validation_report(report: dict[str, Any]) -> str:
    """The report as a few readable lines."""
    lines = [f"{report['file']}: {'usable' if report['usable'] else 'NOT usable'}"]
    for problem in report["problems"]:
        lines.append(f"  problem: {problem['message']}" + (f" ({problem['hint']})" if problem.get("hint") else ""))
    if report["usable"]:
        rows = report["rows"]
        dropped = ", ".join(f"{k}={v}" for k, v in rows["dropped"].items() if v) or "none"
        lines.append(f"  rows: {rows['used']} used of {rows['read']} read (dropped: {dropped})")
        lines.append("  labels: " + ", ".join(
            f"{k} [{' / '.join(v['labels'])}] {v['count']} ({v['share']:.0%})"
            for k, v in report["label_balance"].items()))
        pc = report["prompt_chars"]
        if pc:
            lines.append(f"  prompt length (chars): min {pc['min']}, median {pc['p50']}, "
                         f"p95 {pc['p95']}, max {pc['max']}")
        lines.append(f"  rationale coverage: {report['rationale_coverage']:.0%}")
        lines.append(f"  mapping: {report['mapping']['source']}")
        source = report.get("prompt_source") or {}
        if source.get("kind") == "template":
            which = "built-in syndromic-surveillance template" if source.get("builtin") else "prompt template"
            value = source["template"]["value"]
            lines.append(f"  prompts: built from the {which} "
                         f"({', '.join(value) if isinstance(value, list) else value})")
        if source.get("ratings_from") == "labels":
            lines.append("  ratings: from the Expert Rating labels through the mapping")
        approach = report["recommended_approach"]
        lines.append(f"  recommended approach: {approach}" + (
            " (enough rows for a head or a fine-tune; what this machine builds: fine-tuner check MODEL)"
            if approach == "head" else ""))
    for warning in report["warnings"]:
        lines.append(f"  warning: {warning}")
    return "\n".join(lines)
