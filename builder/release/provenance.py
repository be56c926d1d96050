"""How each case of a release was made, from its case.json: what ``metadata/cases.csv``, the shards and the card say.

Per case (:func:`case_provenance`): the registration method (the ``registration`` metadata
column) and its result (``registration_improved``: kept because it improved the metric), the PET
``interpolation``, the ``builder_version`` that converted it and ``settings_sha256``, the sha256
of convert's settings (``case.json`` ``source.settings_sha256``; empty for a case converted
before convert recorded it). These go into ``metadata/cases.csv`` (:data:`PROVENANCE_COLUMNS`),
into each shard's parquet key-value metadata (:data:`SHARD_METADATA_KEY`: a JSON object case id
-> provenance) and, summarised (:func:`summarise`), into the card.

Example:
    >>> case_provenance({"builder_version": "0.1.0", "alignment": {"method": "rigid", "improved": True,
    ...                  "interpolation": "linear"}, "source": {}})["interpolation"]
    'linear'
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

PROVENANCE_COLUMNS = ("registration_improved", "interpolation", "builder_version", "settings_sha256")
"""Columns of metadata/cases.csv beyond the shards' metadata columns (``registration`` is one of those)."""
SHARD_METADATA_KEY = "lymphatlas.provenance"
"""Key of a shard's parquet key-value metadata: ``{case id: {registration, registration_improved, ...}}``."""
INTERPOLATION_TEXT = {
    "bounded-cubic": "cubic B-spline interpolation bounded by the native PET voxels around each point",
    "cubic": "cubic B-spline interpolation (unbounded, as in the paper)",
    "linear": "linear interpolation",
    "unknown": "not recorded (cases converted before convert recorded it)",
}


def case_provenance(info: Mapping[str, Any]) -> dict[str, Any]:
    """The provenance columns of one case from its parsed case.json."""
    alignment = info.get("alignment") or {}
    improved = alignment.get("improved")
    return {
        "registration_improved": None if improved is None else bool(improved),
        "interpolation": alignment.get("interpolation"),
        "builder_version": info.get("builder_version"),
        "settings_sha256": (info.get("source") or {}).get("settings_sha256"),
    }


def shard_entry(row: Mapping[str, Any]) -> dict[str, Any]:
    """What a shard's key-value metadata holds for the case of ``row``."""
    return {"registration": row.get("registration"), **{c: row.get(c) for c in PROVENANCE_COLUMNS}}


def _label(value: Any) -> str:
    if value in (None, ""):
        return "unknown"
    if isinstance(value, bool) or value in ("True", "False"):
        return "yes" if value in (True, "True") else "no"
    return str(value)


def _counts(rows: Iterable[Mapping[str, Any]], column: str) -> dict[str, int]:
    return dict(sorted(Counter(_label(r.get(column)) for r in rows).items()))


def summarise(rows: list[Mapping[str, Any]]) -> dict[str, Any]:
    """What the card says about provenance: counts per value of each column, and whether cases differ.

    ``interpolation_text`` describes the interpolation when every case used the same one, else
    names each with its count; ``mixed`` lists the columns whose value differs between cases.
    """
    counts = {c: _counts(rows, c) for c in ("registration", *PROVENANCE_COLUMNS)}
    interp = counts["interpolation"]
    if len(interp) == 1:
        (only,) = interp
        text = INTERPOLATION_TEXT.get(only, f"{only} interpolation")
    else:
        text = "; ".join(f"{INTERPOLATION_TEXT.get(k, k)} for {n} cases" for k, n in interp.items())
    mixed = [c for c in ("interpolation", "builder_version", "settings_sha256") if len(counts[c]) > 1]
    settings = {(k[:12] if len(k) == 64 else k): n for k, n in counts["settings_sha256"].items()}
    return {**counts, "settings_sha256": settings, "interpolation_text": text, "mixed": mixed}


__all__ = ["PROVENANCE_COLUMNS", "SHARD_METADATA_KEY", "case_provenance", "shard_entry", "summarise"]
