"""Cross-validation tables in the layout of the paper's Tables 2-3, from nnU-Net's own summaries.

nnU-Net writes ``fold_k/validation/summary.json`` after training each fold. Its
``foreground_mean`` holds, per metric, the mean over foreground labels of the per-label
``np.nanmean`` over cases (a case with neither reference nor prediction has Dice = IoU = NaN
and is skipped for those two metrics only). One fold row of Tables 2-3 is exactly that
``foreground_mean`` (Dice, IoU, FN, FP, TP, n_pred, n_ref); the paper's *Mean* row is the plain
mean of the five fold rows. The ``All cases`` row pools every validation case of every fold, as
nnU-Net's ``accumulate_cv_results`` does when it evaluates the merged cross-validation folder.

Example:
    >>> table = cv_table({0: load_summary("fold_0/validation/summary.json")})  # doctest: +SKIP
    >>> print(to_markdown(table, title="HL"))  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lymphatlas_ds.metrics import METRICS, mean_over_cases  # (one copy, shared with `lymphatlas evaluate`)

RATIO_METRICS = ("Dice", "IoU")
"""Printed with 5 decimals (the paper's precision); voxel counts with 2."""


@dataclass
class CVTable:
    """Rows of a cross-validation table: ``(label, {metric: value})`` in print order."""

    rows: list[tuple[str, dict[str, float]]] = field(default_factory=list)

    def row(self, label: str) -> dict[str, float]:
        for name, values in self.rows:
            if name == label:
                return values
        raise KeyError(f"no row {label!r}; rows: {[n for n, _ in self.rows]}")


def load_summary(path: str | os.PathLike) -> dict:
    """Read a ``summary.json`` written by nnU-Net (``NaN`` literals included)."""
    path = Path(path)
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read an nnU-Net summary.json ({e}); rerun the fold's validation") from e
    for key in ("metric_per_case", "foreground_mean"):
        if key not in summary:
            raise ValueError(f"{path}: no {key!r}: not a summary.json from nnU-Net's evaluation")
    return summary


def case_identifier(per_case: dict, file_ending: str = ".nii.gz") -> str:
    """The nnU-Net case identifier of one ``metric_per_case`` entry (its prediction file's name)."""
    name = Path(per_case["prediction_file"]).name
    return name[: -len(file_ending)] if name.endswith(file_ending) else name.split(".")[0]


def _foreground_mean(per_case: list[dict]) -> dict[str, float]:
    # The same two steps as nnunetv2.evaluation.evaluate_predictions.compute_metrics_on_folder:
    # nanmean over cases per label (lymphatlas_ds.metrics.mean_over_cases), then mean over the foreground labels.
    if not per_case:
        return {m: math.nan for m in METRICS}
    labels = [k for k in per_case[0]["metrics"] if str(k) not in ("0", "(0,)")]
    per_label = [mean_over_cases([c["metrics"][k] for c in per_case]) for k in labels]
    return {m: float(np.mean([row[m] for row in per_label])) for m in METRICS}


def fold_row(summary: dict, *, cases: Collection[str] | None = None, file_ending: str = ".nii.gz") -> dict[str, float]:
    """One fold's row: nnU-Net's ``foreground_mean``, or the same statistic over a subset of cases.

    ``cases`` (nnU-Net identifiers) restricts the fold to, e.g., the HL cases of a model trained on all.
    """
    if cases is None:
        return {m: float(summary["foreground_mean"][m]) for m in METRICS}
    chosen = [c for c in summary["metric_per_case"] if case_identifier(c, file_ending) in cases]
    return _foreground_mean(chosen)


def cv_table(
    summaries: Mapping[int, dict], *, cases: Collection[str] | None = None, file_ending: str = ".nii.gz"
) -> CVTable:
    """Rows ``Fold k`` (sorted), ``Mean`` (mean of the fold rows) and ``All cases`` (pooled).

    Example:
        >>> s = {"foreground_mean": dict.fromkeys(METRICS, 1.0), "metric_per_case": []}
        >>> cv_table({0: s, 1: s}).row("Mean")["Dice"]
        1.0
    """
    if not summaries:
        raise ValueError("no fold summaries given: train and validate at least one fold first")
    table = CVTable()
    fold_rows = []
    for fold in sorted(summaries):
        row = fold_row(summaries[fold], cases=cases, file_ending=file_ending)
        fold_rows.append(row)
        table.rows.append((f"Fold {fold}", row))
    table.rows.append(("Mean", {m: float(np.mean([r[m] for r in fold_rows])) for m in METRICS}))
    pooled = [
        c
        for fold in sorted(summaries)
        for c in summaries[fold]["metric_per_case"]
        if cases is None or case_identifier(c, file_ending) in cases
    ]
    table.rows.append(("All cases", _foreground_mean(pooled)))
    return table


def _fmt(metric: str, value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "NaN"
    return f"{value:.5f}" if metric in RATIO_METRICS else f"{value:.2f}"


def to_markdown(table: CVTable, *, title: str | None = None) -> str:
    """The table as GitHub markdown with the paper's column order and precision."""
    lines = [f"### {title}", ""] if title else []
    lines.append("| Fold | " + " | ".join(METRICS) + " |")
    lines.append("|---|" + "---:|" * len(METRICS))
    for name, row in table.rows:
        cells = [_fmt(m, row[m]) for m in METRICS]
        if name in ("Mean", "All cases"):
            name, cells = f"**{name}**", [f"**{c}**" for c in cells]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: CVTable) -> str:
    """The table as CSV at full precision (``repr`` of the floats)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["fold", *METRICS])
    for name, row in table.rows:
        w.writerow([name, *(repr(float(row[m])) for m in METRICS)])
    return buf.getvalue()


def find_fold_summaries(trainer_dir: Path) -> dict[int, Path]:
    """``{fold: fold_k/validation/summary.json}`` under an nnU-Net trainer output folder."""
    found = {}
    for p in sorted(Path(trainer_dir).glob("fold_*/validation/summary.json")):
        suffix = p.parent.parent.name.removeprefix("fold_")
        if suffix.isdigit():
            found[int(suffix)] = p
    return found
