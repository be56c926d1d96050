"""What changed per case between a release and its base: the CHANGELOG's per-case lines.

:func:`case_details` compares the base's ``metadata/cases.csv`` rows with this release's rows:
for each common case the fields whose value changed (:data:`TRACKED_FIELDS`, old -> new; a new
diagnosis also names the config the case moved to), whether its content (voxels and geometry)
changed and, from the provenance columns, why (interpolation, registration, builder, settings);
for each removed case the reason recorded by ``withdraw --reason`` (``WORK/withdrawals.json``).
:func:`emptied_configs` names the configs and splits the base had and this release has not (the
card no longer lists them, so ``load_dataset`` on them fails by design: the CHANGELOG says so).

Example:
    >>> a = {"case_id": "LA-1", "diagnosis": "HL", "content_hash": "x"}
    >>> case_details([a], [{**a, "diagnosis": "NHL"}], removed_reasons={})["LA-1"]
    'diagnosis HL -> NHL (config hl -> nhl)'
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lymphatlas_ds._io import write_atomic
from lymphatlas_ds.errors import SchemaError

TRACKED_FIELDS = ("diagnosis", "subtype", "sex", "age_band", "exam_index", "days_from_first_exam", "split", "fold")
"""Metadata columns whose change is listed per case (``split`` and ``fold`` never change: a guard)."""
PROVENANCE_FIELDS = ("registration", "registration_improved", "interpolation", "builder_version", "settings_sha256")
"""Columns that say how a case was made: listed as the reason of a content change (and on their own)."""
WITHDRAWALS_NAME = "withdrawals.json"
"""``WORK/withdrawals.json``: ``{"cases": {case_id: {"reason": ..., "subject_id": ...}}}`` written by withdraw."""
GONE_REASON = "no longer in WORK (its exam left the source: `convert --prune`, or `withdraw` without a reason)"


def _text(value: Any) -> str:
    if value is None or value == "":
        return "none"
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12]  # a hash: its head is enough to tell two apart
    return str(value)


def _config(diagnosis: Any) -> str:
    return str(diagnosis).lower() if diagnosis else "none"


def _field_changes(old: Mapping[str, Any], new: Mapping[str, Any], fields: Iterable[str]) -> list[str]:
    out = []
    for name in fields:
        if name not in old or name not in new:  # a column the older release did not have
            continue
        if _text(old[name]) != _text(new[name]):
            line = f"{name} {_text(old[name])} -> {_text(new[name])}"
            if name == "diagnosis":
                line += f" (config {_config(old[name])} -> {_config(new[name])})"
            out.append(line)
    return out


def case_details(base_rows: list[dict[str, Any]], rows: list[dict[str, Any]], *,
                 removed_reasons: Mapping[str, str]) -> dict[str, str]:
    """``{case id: "what changed"}`` for every changed, metadata-changed or removed case (added ones are not listed)."""
    before = {r["case_id"]: r for r in base_rows}
    after = {r["case_id"]: r for r in rows}
    out: dict[str, str] = {}
    for case_id in sorted(set(before) & set(after)):
        old, new = before[case_id], after[case_id]
        parts = _field_changes(old, new, TRACKED_FIELDS)
        why = _field_changes(old, new, PROVENANCE_FIELDS)
        if old.get("content_hash") != new.get("content_hash"):
            parts.insert(0, "content (voxels or geometry) changed" + (f": {'; '.join(why)}" if why else
                                                                       ": same settings (source data re-exported?)"))
        elif why:
            parts += why
        if parts:
            out[case_id] = "; ".join(parts)
    for case_id in sorted(set(before) - set(after)):
        out[case_id] = f"removed: {removed_reasons.get(case_id) or GONE_REASON}"
    return out


def metadata_changed(details: Mapping[str, str], content_changed: Iterable[str], removed: Iterable[str]) -> tuple[str, ...]:
    """The cases whose only changes are metadata (no content change, not removed)."""
    skip = set(content_changed) | set(removed)
    return tuple(sorted(c for c in details if c not in skip))


def config_splits(rows: Iterable[Mapping[str, Any]]) -> set[str]:
    """``{"all/train", "hl/test", ...}``: the configs and splits that hold at least one case."""
    out = set()
    for r in rows:
        out |= {f"all/{r['split']}", f"{_config(r['diagnosis'])}/{r['split']}"}
    return out


def emptied_configs(base_rows: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[str]:
    """The ``config/split`` pairs that held cases in the base and hold none now."""
    return sorted(config_splits(base_rows) - config_splits(rows))


WITHDRAWAL_REASONS = ("consent withdrawn", "data error", "duplicate", "quality control", "other")
"""The reasons ``withdraw --reason`` takes: codes, never free text, since the public CHANGELOG shows them
(a maintainer's sentence could name a patient, a date or a hospital)."""


def check_reason(reason: str) -> str:
    """``reason`` when it is one of :data:`WITHDRAWAL_REASONS`, else a ValueError naming them."""
    if reason not in WITHDRAWAL_REASONS:
        raise ValueError(f"withdrawal reason {reason!r} is not one of {', '.join(WITHDRAWAL_REASONS)}: the reason is "
                         "published in the CHANGELOG, so it is a code, never free text (keep details in your own records)")
    return reason


def read_withdrawals(work: str | Path) -> dict[str, str]:
    """``{case id: reason}`` recorded by ``withdraw --reason`` in WORK; {} when there is no record."""
    path = Path(work) / WITHDRAWALS_NAME
    if not path.is_file():
        return {}
    try:
        cases = json.loads(path.read_text())["cases"]
        # a reason that is no code (a record written before codes) is published as plain "withdrawn"
        return {str(c): entry.get("reason") if entry.get("reason") in WITHDRAWAL_REASONS else "withdrawn"
                for c, entry in cases.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise SchemaError(f"{path} is not a withdrawal record ({e}); fix it or remove it (reasons are then not "
                          "shown in the CHANGELOG)") from e


def record_withdrawals(work: str | Path, cases: Mapping[str, str], *, reason: str | None) -> None:
    """Add ``{case id: subject id}`` with ``reason`` to ``WORK/withdrawals.json`` (the next CHANGELOG shows it)."""
    reason = None if reason is None else check_reason(reason)  # None: published as plain "withdrawn"
    path = Path(work) / WITHDRAWALS_NAME
    doc = json.loads(path.read_text()) if path.is_file() else {"cases": {}}
    for case_id, subject_id in cases.items():
        if case_id:
            doc["cases"][case_id] = {"reason": reason, "subject_id": subject_id}
    write_atomic(path, json.dumps(doc, indent=2, sort_keys=True) + "\n")


def render_details(details: Mapping[str, str], emptied: list[str]) -> list[str]:
    """The CHANGELOG lines for :func:`case_details` and :func:`emptied_configs` (none when both are empty)."""
    lines: list[str] = []
    if details:
        lines += ["Per case:", ""] + [f"- {case_id}: {what}" for case_id, what in sorted(details.items())] + [""]
    for pair in emptied:
        config, split = pair.split("/")
        lines.append(f"- config `{config}` has no `{split}` case any more: the card no longer lists that split, "
                     f"and `load_dataset(..., \"{config}\", split=\"{split}\")` fails for this version (use an "
                     "earlier version for it)")
    if emptied:
        lines.append("")
    return lines


__all__ = ["GONE_REASON", "PROVENANCE_FIELDS", "TRACKED_FIELDS", "case_details", "emptied_configs",
           "metadata_changed", "read_withdrawals", "record_withdrawals", "render_details"]
