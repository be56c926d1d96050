"""Statistics of a release from its metadata rows: the one aggregation that the dataset card, the
changelog, the release metadata and ``lymphatlas info`` all print.

Rows are the metadata columns of :data:`lymphatlas_ds.schema.METADATA_COLUMNS` (a shard row, a line
of ``metadata/cases.csv``). Conventions, stated once:

* ``cases`` counts examinations; ``patients`` counts distinct ``subject_id``.
* ``sex`` and ``age_band`` count **patients**, each at their first examination in the rows
  (lowest ``exam_index``): a patient scanned three times is one woman, not three.
* ``lesion_count`` and ``tmtv_ml`` summarise every case (a case without lesion counts 0 and 0 ml);
  ``suv_max`` summarises the cases with at least one lesion only (a lesion-free case has no SUVmax,
  and its 0 would drag the minimum and median down).
* Each summary is ``{min, median, mean, max, total}`` rounded to 2 decimals (``None`` values
  are skipped; an empty summary is all 0.0).

Example:
    >>> rows = [{"case_id": "a", "subject_id": "s1", "diagnosis": "HL", "split": "train", "fold": 0,
    ...          "sex": "F", "exam_index": 0, "lesion_count": 2, "tmtv_ml": 10.0, "suv_max": 8.0}]
    >>> aggregate(rows)["suv_max"]["median"], aggregate(rows)["sex"]
    (8.0, {'F': 1})
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

SUMMARY_KEYS = ("min", "median", "mean", "max", "total")
NUMERIC = ("lesion_count", "tmtv_ml", "tlg", "suv_max")
"""The summarised columns."""


def summary(values: Iterable[float | None]) -> dict[str, float]:
    """``{min, median, mean, max, total}`` of the non-missing ``values``, rounded to 2 decimals."""
    clean = [float(v) for v in values if v is not None and v == v]  # v == v drops NaN
    if not clean:
        return dict.fromkeys(SUMMARY_KEYS, 0.0)
    return {
        "min": round(min(clean), 2),
        "median": round(statistics.median(clean), 2),
        "mean": round(statistics.fmean(clean), 2),
        "max": round(max(clean), 2),
        "total": round(sum(clean), 2),
    }


def _has_lesion(row: Mapping[str, Any]) -> bool:
    return (row.get("lesion_count") or 0) > 0


def first_exams(rows: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """Each patient's first examination among ``rows`` (lowest exam_index, then case_id)."""
    out: dict[str, Mapping[str, Any]] = {}
    for r in sorted(rows, key=lambda r: (r["subject_id"], r.get("exam_index") or 0, r.get("case_id") or "")):
        out.setdefault(r["subject_id"], r)
    return out


def aggregate(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Counts and lesion statistics of ``rows`` (any subset: a release, a config, a split).

    Returns ``cases``, ``patients``, ``cases_by_split`` / ``patients_by_split`` ({split: {diagnosis:
    n}}), ``cases_by_fold`` (train cases), ``sex`` and ``age_band`` (patients), ``lesion_count``,
    ``tmtv_ml``, ``tlg``, ``suv_max`` (summaries, see the module docstring),
    ``cases_without_lesion``, ``scanners`` (PET manufacturer and model) and ``registration``.
    """
    rows = list(rows)
    per_split: dict[str, Counter] = {}
    patients: dict[str, dict[str, set[str]]] = {}
    for r in rows:
        per_split.setdefault(r["split"], Counter())[r["diagnosis"]] += 1
        patients.setdefault(r["split"], {}).setdefault(r["diagnosis"], set()).add(r["subject_id"])
    firsts = first_exams(rows).values()
    scanners = Counter(f"{r.get('pet_manufacturer') or '?'} {r.get('pet_model') or ''}".strip() for r in rows)
    folds = Counter(r.get("fold") for r in rows if r["split"] == "train")
    return {
        "cases": len(rows),
        "patients": len({r["subject_id"] for r in rows}),
        "cases_by_split": {s: dict(sorted(c.items())) for s, c in sorted(per_split.items())},
        "patients_by_split": {s: {d: len(v) for d, v in sorted(p.items())} for s, p in sorted(patients.items())},
        "cases_by_fold": {str(k): v for k, v in sorted(folds.items())},
        "sex": dict(sorted(Counter(r.get("sex") or "unknown" for r in firsts).items())),
        "age_band": dict(sorted(Counter(r.get("age_band") or "unknown" for r in firsts).items())),
        "lesion_count": summary(r.get("lesion_count") if r.get("lesion_count") is not None else 0 for r in rows),
        "tmtv_ml": summary((r.get("tmtv_ml") or 0.0) for r in rows),
        "tlg": summary((r.get("tlg") or 0.0) for r in rows),
        "suv_max": summary(r.get("suv_max") for r in rows if _has_lesion(r)),
        "cases_without_lesion": sum(1 for r in rows if not _has_lesion(r)),
        "scanners": dict(sorted(scanners.items())),
        "registration": dict(sorted(Counter(r.get("registration") or "unknown" for r in rows).items())),
    }


def lesion_table(case_rows: Iterable[Mapping[str, Any]], lesion_rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The card's lesion table, per diagnosis and for all cases, from the rows of the ``lesions`` config
    (one per lesion) and the case rows (so a case without lesion counts 0 lesions).

    Returns ``{group: {"cases", "lesions", "per_case", "volume_ml", "suv_max", "body_region"}}`` for
    ``group`` in ``all`` and each diagnosis: ``per_case``, ``volume_ml`` and ``suv_max`` are
    :func:`summary` dicts (lesions per case; each lesion's volume and SUVmax), ``body_region``
    counts lesions per region.

    Example:
        >>> t = lesion_table([{"case_id": "a", "diagnosis": "HL"}, {"case_id": "b", "diagnosis": "HL"}],
        ...                  [{"case_id": "a", "diagnosis": "HL", "volume_ml": 2.0, "suv_max": 9.0, "body_region": "thorax"}])
        >>> t["HL"]["per_case"]["mean"], t["HL"]["volume_ml"]["max"], t["all"]["body_region"]
        (0.5, 2.0, {'thorax': 1})
    """
    cases = list(case_rows)
    lesions = list(lesion_rows)
    out: dict[str, Any] = {}
    for group in ["all", *sorted({r["diagnosis"] for r in cases})]:
        mine = [r for r in cases if group == "all" or r["diagnosis"] == group]
        ids = {r["case_id"] for r in mine}
        les = [r for r in lesions if r["case_id"] in ids]
        per_case = Counter(r["case_id"] for r in les)
        out[group] = {
            "cases": len(mine),
            "lesions": len(les),
            "per_case": summary(per_case.get(c, 0) for c in sorted(ids)),
            "volume_ml": summary(r.get("volume_ml") for r in les),
            "suv_max": summary(r.get("suv_max") for r in les),
            "body_region": dict(sorted(Counter(r.get("body_region") or "unknown" for r in les).items())),
        }
    return out


__all__ = ["NUMERIC", "SUMMARY_KEYS", "aggregate", "first_exams", "lesion_table", "summary"]
