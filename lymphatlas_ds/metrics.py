"""Segmentation metrics of one case, and their aggregation: the one copy that ``lymphatlas evaluate``,
the prediction helpers and ``tools/`` (Tables 2-3, lesion-level report) all use.

Voxel level, as nnU-Net's ``compute_metrics`` writes them into ``summary.json`` (the paper's
Tables 2-3 columns): TP, FP, FN voxel counts of the foreground, ``n_pred = TP + FP``,
``n_ref = TP + FN``, ``Dice = 2 TP / (2 TP + FP + FN)``, ``IoU = TP / (TP + FP + FN)``; both are NaN
when neither mask has a foreground voxel (nnU-Net's convention; aggregation skips them there).

Lesion level, as the autoPET challenge defines it on connected components
(:data:`CONNECTIVITY` = 26, the release's lesion labelling; autoPET's script uses 18):

- **false-positive volume**: total volume (ml) of predicted components that touch no reference voxel;
- **false-negative volume**: total volume (ml) of reference lesions that no predicted voxel touches;
- **detection sensitivity**: fraction of reference lesions that at least one predicted voxel touches.

The reference lesions of a case are labelled by :func:`label_lesions` (one function, so that the
ids of :func:`lesion_hits` are those of a lesion table built with the same connectivity), or
given as an instance map (``reference_instances=``) when the release carries one.

Example:
    >>> import numpy as np
    >>> ref = np.zeros((4, 4, 4), np.uint8); ref[0, 0, 0] = 1
    >>> pred = np.zeros_like(ref); pred[3, 3, 3] = 1
    >>> m = lesion_metrics(ref, pred, voxel_volume_ml=0.001)
    >>> (m.fp_volume_ml, m.fn_volume_ml, m.n_detected, m.n_ref_lesions)
    (0.001, 0.001, 0, 1)
    >>> voxel_metrics(ref, ref)["Dice"]
    1.0
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lymphatlas_ds.lesions import _RANK, LESION_CONNECTIVITY, label_instances

METRICS: tuple[str, ...] = ("Dice", "IoU", "FN", "FP", "TP", "n_pred", "n_ref")
"""Columns of the paper's Tables 2-3, named as in nnU-Net's summary.json."""

CONNECTIVITY = LESION_CONNECTIVITY
"""Voxel connectivity of a lesion: the release's (26, as its ``lesion_count`` and ``lesions`` config).
autoPET's own evaluation script uses 18; lesions touching only at an edge or corner count once here."""

CONNECTIVITY_RANK = _RANK
"""Voxel connectivity -> the ``rank`` of :func:`scipy.ndimage.generate_binary_structure` (3-D)."""


def label_lesions(mask: np.ndarray, *, connectivity: int = CONNECTIVITY) -> tuple[np.ndarray, int]:
    """Connected components of a 3-D mask (any non-zero voxel is foreground): ``(instances, n)``.

    The release's own labelling (:func:`lymphatlas_ds.lesions.label_instances`): ids run 1..n by
    decreasing size, so they are the ``lesion_id`` of the release's ``lesions`` config.

    Example:
        >>> m = np.zeros((3, 3, 3), np.uint8); m[0, 0, 0] = m[2, 2, 2] = 1
        >>> label_lesions(m)[1]
        2
    """
    return label_instances(mask, connectivity=connectivity)


def _check_pair(reference: np.ndarray, prediction: np.ndarray) -> None:
    if reference.shape != prediction.shape:
        raise ValueError(f"reference {reference.shape} and prediction {prediction.shape} differ in shape")
    if reference.ndim != 3:
        raise ValueError(f"expected 3-D masks, got {reference.ndim}-D")


def voxel_metrics(reference: np.ndarray, prediction: np.ndarray) -> dict[str, float]:
    """Dice, IoU, FN, FP, TP, n_pred, n_ref of the foreground (non-zero) voxels, as nnU-Net computes them.

    Example:
        >>> ref = np.zeros((2, 2, 2)); ref[0] = 1
        >>> pred = np.zeros((2, 2, 2)); pred[0, 0] = 1
        >>> voxel_metrics(ref, pred)["Dice"], voxel_metrics(ref, pred)["FN"]
        (0.6666666666666666, 2.0)
    """
    _check_pair(np.asarray(reference), np.asarray(prediction))
    ref = np.asarray(reference) != 0
    pred = np.asarray(prediction) != 0
    tp = int(np.count_nonzero(ref & pred))
    n_ref, n_pred = int(np.count_nonzero(ref)), int(np.count_nonzero(pred))
    fp, fn = n_pred - tp, n_ref - tp
    union = tp + fp + fn
    return {
        "Dice": 2.0 * tp / (2 * tp + fp + fn) if union else math.nan,
        "IoU": tp / union if union else math.nan,
        "FN": float(fn),
        "FP": float(fp),
        "TP": float(tp),
        "n_pred": float(n_pred),
        "n_ref": float(n_ref),
    }


def mean_over_cases(rows: Iterable[Mapping[str, Any]], metrics: Iterable[str] = METRICS) -> dict[str, float]:
    """Per metric, the mean over cases skipping NaN (nnU-Net's ``foreground_mean`` for one label).

    A metric that is NaN in every case (or no case at all) is NaN.

    Example:
        >>> mean_over_cases([{"Dice": 1.0}, {"Dice": float("nan")}, {"Dice": 0.5}], ["Dice"])
        {'Dice': 0.75}
    """
    rows = list(rows)
    out = {}
    for m in metrics:
        values = np.array([float(r[m]) for r in rows], dtype=float)
        finite = values[~np.isnan(values)]
        out[m] = float(finite.mean()) if finite.size else math.nan
    return out


@dataclass(frozen=True)
class LesionMetrics:
    """Lesion-level errors of one case (volumes in ml, counts of connected components)."""

    fp_volume_ml: float
    fn_volume_ml: float
    n_ref_lesions: int
    n_detected: int
    n_pred_components: int
    n_fp_components: int

    @property
    def sensitivity(self) -> float:
        """Detected reference lesions / reference lesions; NaN for a case without lesions."""
        return self.n_detected / self.n_ref_lesions if self.n_ref_lesions else math.nan

    def to_dict(self) -> dict:
        return {**asdict(self), "sensitivity": self.sensitivity}


@dataclass(frozen=True)
class LesionHits:
    """Which reference lesions a prediction touches, and the lesion-level errors of the case.

    ``lesion_ids[i]`` (ids of the reference instance map) has ``voxels[i]`` voxels and
    ``overlap[i]`` of them predicted; it is detected when ``overlap[i] > 0``. ``instances`` is the
    reference instance map inside ``box`` (the slices of the masks' foreground box), e.g. for
    per-lesion statistics of another volume on the same grid: ``ndimage.maximum(pet[box], instances, ids)``.
    """

    lesion_ids: np.ndarray
    voxels: np.ndarray
    overlap: np.ndarray
    metrics: LesionMetrics
    instances: np.ndarray
    box: tuple[slice, ...]

    @property
    def detected(self) -> np.ndarray:
        return self.overlap > 0


def lesion_hits(
    reference: np.ndarray,
    prediction: np.ndarray,
    *,
    voxel_volume_ml: float,
    connectivity: int = CONNECTIVITY,
    reference_instances: np.ndarray | None = None,
) -> LesionHits:
    """Per reference lesion: its voxels and how many of them are predicted; plus :class:`LesionMetrics`.

    ``reference_instances`` (an instance map, 0 background, one id per lesion) replaces the
    labelling of ``reference`` by :func:`label_lesions`; predicted components always use
    ``connectivity``.

    Example:
        >>> ref = np.zeros((5, 5, 5), np.uint8); ref[0, 0, 0] = ref[4, 4, 4] = 1
        >>> hits = lesion_hits(ref, ref * (np.indices(ref.shape)[0] == 0), voxel_volume_ml=1.0)
        >>> hits.lesion_ids.tolist(), hits.detected.tolist()
        ([1, 2], [True, False])
    """
    reference, prediction = np.asarray(reference), np.asarray(prediction)
    _check_pair(reference, prediction)
    # Work inside the box holding every foreground voxel of either mask: the components and their
    # raster order are those of the whole volume, at a fraction of the cost on a whole-body grid.
    box = _foreground_box(reference, prediction)
    ref = reference[box] != 0
    pred = prediction[box] != 0
    if reference_instances is not None:
        reference_instances = np.asarray(reference_instances)
        if reference_instances.shape != reference.shape:
            raise ValueError(f"instance map {reference_instances.shape} and reference {reference.shape} differ in shape")
        reference_instances = reference_instances[box]
    if reference_instances is None:
        ref_lab, n_ref_max = label_lesions(ref, connectivity=connectivity)
    else:
        ref_lab = reference_instances
        if not np.array_equal(ref_lab != 0, ref):
            raise ValueError("the instance map does not cover exactly the reference mask's voxels")
        n_ref_max = int(ref_lab.max(initial=0))
    pred_lab, n_pred = label_lesions(pred, connectivity=connectivity)
    # A component "touches" the other mask when any of its voxels overlaps it: count voxels per
    # component, and overlapping voxels per component, in one bincount each.
    # (foreground voxels only: background is label 0 and never counted)
    ref_sizes = np.bincount(ref_lab[ref], minlength=n_ref_max + 1)
    ref_hit = np.bincount(ref_lab[pred & ref], minlength=n_ref_max + 1)
    pred_sizes = np.bincount(pred_lab[pred], minlength=n_pred + 1)
    pred_hit = np.bincount(pred_lab[ref & pred], minlength=n_pred + 1)
    ids = np.nonzero(ref_sizes[1:])[0] + 1  # ids present (an instance map may skip ids)
    missed = ref_hit[ids] == 0
    false_pos = pred_hit[1:] == 0
    metrics = LesionMetrics(
        fp_volume_ml=float(pred_sizes[1:][false_pos].sum()) * voxel_volume_ml,
        fn_volume_ml=float(ref_sizes[ids][missed].sum()) * voxel_volume_ml,
        n_ref_lesions=int(ids.size),
        n_detected=int(ids.size - missed.sum()),
        n_pred_components=n_pred,
        n_fp_components=int(false_pos.sum()),
    )
    return LesionHits(ids, ref_sizes[ids], ref_hit[ids], metrics, ref_lab, box)


def _foreground_box(*masks: np.ndarray) -> tuple[slice, ...]:
    """The smallest box (slices) holding every non-zero voxel of ``masks`` (one voxel when all are empty)."""
    shape = masks[0].shape
    box = []
    for axis in range(len(shape)):
        others = tuple(a for a in range(len(shape)) if a != axis)
        profile = np.zeros(shape[axis], bool)
        for m in masks:
            profile |= np.any(m, axis=others)
        hits = np.nonzero(profile)[0]
        box.append(slice(int(hits[0]), int(hits[-1]) + 1) if hits.size else slice(0, min(1, shape[axis])))
    return tuple(box)


def lesion_metrics(
    reference: np.ndarray, prediction: np.ndarray, *, voxel_volume_ml: float, connectivity: int = CONNECTIVITY
) -> LesionMetrics:
    """Lesion-level errors of ``prediction`` against ``reference`` (binary 3-D arrays, same shape).

    Any non-zero voxel is foreground. ``voxel_volume_ml`` is the product of the spacing in mm / 1000.

    Example:
        >>> ref = np.zeros((3, 3, 3)); ref[1, 1, 1] = 1
        >>> lesion_metrics(ref, ref, voxel_volume_ml=0.008).sensitivity
        1.0
    """
    return lesion_hits(reference, prediction, voxel_volume_ml=voxel_volume_ml, connectivity=connectivity).metrics


def lesion_metrics_files(reference: Path, prediction: Path, *, connectivity: int = CONNECTIVITY) -> LesionMetrics:
    """:func:`lesion_metrics` of two NIfTI label files on the same grid (voxel volume from the header).

    Example:
        >>> m = lesion_metrics_files(Path("labelsTr/LA-1.nii.gz"), Path("fold_0/validation/LA-1.nii.gz"))  # doctest: +SKIP
    """
    import nibabel as nib

    ref_img, pred_img = nib.load(str(reference)), nib.load(str(prediction))
    if ref_img.shape != pred_img.shape:
        raise ValueError(
            f"{prediction}: shape {pred_img.shape} differs from the reference {reference} {ref_img.shape}; "
            "predictions must be exported on the reference grid"
        )
    if not np.allclose(ref_img.affine, pred_img.affine, atol=1e-3):
        raise ValueError(f"{prediction}: affine differs from the reference {reference}: not the same grid")
    voxel_ml = float(np.prod(ref_img.header.get_zooms()[:3])) / 1000.0
    return lesion_metrics(
        np.asanyarray(ref_img.dataobj), np.asanyarray(pred_img.dataobj),
        voxel_volume_ml=voxel_ml, connectivity=connectivity,
    )


def summarize(metrics: Iterable[LesionMetrics]) -> dict[str, float]:
    """Aggregate cases: mean FP / FN volume per case, and detection sensitivity pooled over all lesions.

    Pooling (detected lesions / all lesions) keeps cases without lesions from counting as NaN or
    as perfect; ``mean_case_sensitivity`` is the per-case mean over the cases that have lesions.

    Example:
        >>> summarize([LesionMetrics(1.0, 0.0, 2, 2, 3, 1), LesionMetrics(0.0, 2.0, 2, 1, 1, 0)])["sensitivity"]
        0.75
    """
    items = list(metrics)
    n_ref = sum(m.n_ref_lesions for m in items)
    per_case = [m.sensitivity for m in items if m.n_ref_lesions]
    return {
        "n_cases": len(items),
        "fp_volume_ml": float(np.mean([m.fp_volume_ml for m in items])) if items else math.nan,
        "fn_volume_ml": float(np.mean([m.fn_volume_ml for m in items])) if items else math.nan,
        "n_ref_lesions": n_ref,
        "n_detected": sum(m.n_detected for m in items),
        "n_fp_components": sum(m.n_fp_components for m in items),
        "sensitivity": sum(m.n_detected for m in items) / n_ref if n_ref else math.nan,
        "mean_case_sensitivity": float(np.mean(per_case)) if per_case else math.nan,
    }


__all__ = [
    "CONNECTIVITY",
    "METRICS",
    "LesionHits",
    "LesionMetrics",
    "label_lesions",
    "lesion_hits",
    "lesion_metrics",
    "lesion_metrics_files",
    "mean_over_cases",
    "summarize",
    "voxel_metrics",
]
