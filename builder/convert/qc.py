"""Per-case quality checks (paper 2.3.6): every threshold is a named constant below.

A case is accepted only if every check passes; otherwise :func:`require_passed` raises
:class:`builder.errors.QCError` naming the failed checks, their values and thresholds, and the
pipeline records the exam in ``failures.json`` (stage ``qc``) without writing a case folder.

Example:
    >>> checks = run_checks(ct=ct_arr, pet=pet_arr, label=label_arr, body=body,
    ...                     lesion_fov_fraction=1.0, grids_identical=True, alignment=record)  # doctest: +SKIP
    >>> require_passed(checks, exam_id="EX0001")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np

from builder.errors import QCError
from builder.convert.labels import MAX_OUTSIDE_BODY_FRACTION

logger = logging.getLogger(__name__)

# CT: stored HU of a real scanner lie in [-1024, 3071] (12-bit) plus metal up to ~ +31000 on
# extended-range reconstructions; below -1100 means a wrong rescale or signed/unsigned mix-up.
CT_MIN_HU = -1100.0
CT_MAX_HU = 32767.0
# Median CT value inside the body: soft tissue and fat are ~ -100..+60 HU; a whole-body CT whose
# body median is outside this range has a broken rescale.
CT_BODY_MEDIAN_HU = (-400.0, 200.0)
# SUVbw: the body's median (mostly muscle, fat, blood pool) lies ~0.3-2; a factor error (Bq vs
# kBq, wrong weight unit, missing decay) moves it by 10x-1000x.
SUV_BODY_MEDIAN = (0.05, 5.0)
# The hottest voxel (brain, bladder or lesion) of an FDG scan: rarely above 100 SUV.
SUV_MAX_RANGE = (1.0, 150.0)
# Lesion voxels that fall outside the PET field of view have no SUV to learn from.
MIN_LESION_FOV_FRACTION = 0.99
# At most this fraction of lesion voxels outside the body (the same bound as builder.convert.labels).
MAX_LABEL_OUTSIDE_BODY = MAX_OUTSIDE_BODY_FRACTION
# A registration that moves the body (mean over its voxels) by more than this, or turns it by
# more than this angle, is more likely wrong than a patient moving between CT and PET on one
# table (typical motion 0-15 mm, a few degrees).
MAX_REGISTRATION_SHIFT_MM = 20.0
MAX_REGISTRATION_ROTATION_DEG = 5.0
# Registration must never make the metric worse (Mattes MI: lower is better).
MAX_METRIC_WORSENING = 0.0


@dataclass(frozen=True)
class Check:
    """One QC result as stored in ``case.json`` "qc".checks."""

    name: str
    passed: bool
    value: float | str | None
    threshold: str

    def to_dict(self) -> dict:
        return asdict(self)


def _range_check(name: str, value: float, lo: float, hi: float) -> Check:
    return Check(name, bool(lo <= value <= hi), round(float(value), 4), f"[{lo:g}, {hi:g}]")


def run_checks(
    *,
    ct: np.ndarray,
    pet: np.ndarray,
    label: np.ndarray,
    body: np.ndarray,
    lesion_fov_fraction: float | None,
    grids_identical: bool,
    alignment: dict,
) -> list[Check]:
    """Run every check on one case's arrays ([z, y, x] on the CT grid) and alignment record.

    ``lesion_fov_fraction`` is the fraction of lesion voxels inside the PET field of view
    (None: not computed, check skipped).
    """
    checks = [Check("grids_identical", bool(grids_identical), str(bool(grids_identical)), "ct, pet, label on one grid")]
    checks.append(_range_check("ct_min_hu", float(ct.min()), CT_MIN_HU, CT_MAX_HU))
    checks.append(_range_check("ct_max_hu", float(ct.max()), CT_MIN_HU, CT_MAX_HU))
    # medians on a regular subsample: whole-body arrays are ~100 M voxels
    step = (slice(None, None, 2), slice(None, None, 4), slice(None, None, 4))
    body_s = body[step]
    if body_s.any():
        checks.append(_range_check("ct_body_median_hu", float(np.median(ct[step][body_s])), *CT_BODY_MEDIAN_HU))
        checks.append(_range_check("suv_body_median", float(np.median(pet[step][body_s])), *SUV_BODY_MEDIAN))
    else:
        checks.append(Check("body_found", False, 0.0, "CT voxels above -500 HU"))
    checks.append(_range_check("suv_max", float(pet.max()), *SUV_MAX_RANGE))
    checks.append(Check("suv_non_negative", bool(pet.min() >= 0.0), round(float(pet.min()), 6), ">= 0"))
    # bincount: np.unique would sort the whole-body array (~100 M voxels)
    values = np.flatnonzero(np.bincount(label.ravel())) if label.dtype.kind == "u" else np.unique(label)
    checks.append(Check("label_binary", bool(set(values.tolist()) <= {0, 1}), str(values.tolist()[:5]), "{0, 1}"))
    n_label = int(np.count_nonzero(label))
    if n_label:
        lab = label.astype(bool)
        outside = float(np.count_nonzero(lab & ~body)) / n_label
        checks.append(Check("label_inside_body", outside <= MAX_LABEL_OUTSIDE_BODY, round(outside, 4),
                            f"outside fraction <= {MAX_LABEL_OUTSIDE_BODY}"))
        if lesion_fov_fraction is not None:
            inside = float(lesion_fov_fraction)
            checks.append(Check("pet_fov_covers_lesions", inside >= MIN_LESION_FOV_FRACTION, round(inside, 4),
                                f">= {MIN_LESION_FOV_FRACTION}"))
    shift = float(alignment.get("shift_mm") or 0.0)
    checks.append(Check("registration_shift_mm", shift <= MAX_REGISTRATION_SHIFT_MM, round(shift, 3),
                        f"<= {MAX_REGISTRATION_SHIFT_MM:g}"))
    rotation = float(alignment.get("rotation_deg") or 0.0)
    checks.append(Check("registration_rotation_deg", rotation <= MAX_REGISTRATION_ROTATION_DEG, round(rotation, 3),
                        f"<= {MAX_REGISTRATION_ROTATION_DEG:g}"))
    before, after = alignment.get("metric_before"), alignment.get("metric_after")
    if before is not None and after is not None:
        worse = float(after) - float(before)
        checks.append(Check("registration_not_worse", worse <= MAX_METRIC_WORSENING, round(worse, 6),
                            "metric_after - metric_before <= 0"))
    return checks


def summary(checks: list[Check]) -> dict:
    """The ``case.json`` "qc" block."""
    return {"passed": all(c.passed for c in checks), "checks": [c.to_dict() for c in checks]}


def require_passed(checks: list[Check], *, exam_id: str) -> None:
    """QCError listing every failed check (name, value, threshold) when any failed."""
    failed = [c for c in checks if not c.passed]
    if failed:
        detail = "; ".join(f"{c.name} = {c.value} (expected {c.threshold})" for c in failed)
        raise QCError(f"quality check failed: {detail}; inspect the exam (figures in the QC report)", exam_id=exam_id)
