"""Lesion-level metrics that nnU-Net's voxel summary lacks and autoPET reports.

nnU-Net's ``summary.json`` counts voxels (Dice, IoU, TP, FP, FN). For lymphoma the clinically
relevant errors are whole lesions: a missed node, a false-positive blob in the bladder. This
module follows the autoPET challenge definitions on connected components (18-connectivity):

- **false-positive volume**: total volume (ml) of predicted components that touch no reference voxel;
- **false-negative volume**: total volume (ml) of reference lesions that no predicted voxel touches;
- **detection sensitivity**: fraction of reference lesions that at least one predicted voxel touches.

Example:
    >>> import numpy as np
    >>> ref = np.zeros((4, 4, 4), np.uint8); ref[0, 0, 0] = 1
    >>> pred = np.zeros_like(ref); pred[3, 3, 3] = 1
    >>> m = lesion_metrics(ref, pred, voxel_volume_ml=0.001)
    >>> (m.fp_volume_ml, m.fn_volume_ml, m.n_detected, m.n_ref_lesions)
    (0.001, 0.001, 0, 1)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

CONNECTIVITY_RANK = {6: 1, 18: 2, 26: 3}
"""Voxel connectivity -> the ``rank`` of :func:`scipy.ndimage.generate_binary_structure` (3-D)."""


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


def _components(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    try:
        structure = ndimage.generate_binary_structure(3, CONNECTIVITY_RANK[connectivity])
    except KeyError as e:
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity}") from e
    labelled, n = ndimage.label(mask, structure=structure)
    return labelled, int(n)


def lesion_metrics(
    reference: np.ndarray, prediction: np.ndarray, *, voxel_volume_ml: float, connectivity: int = 18
) -> LesionMetrics:
    """Lesion-level errors of ``prediction`` against ``reference`` (binary 3-D arrays, same shape).

    Any non-zero voxel is foreground. ``voxel_volume_ml`` is the product of the spacing in mm / 1000.

    Example:
        >>> import numpy as np
        >>> ref = np.zeros((3, 3, 3)); ref[1, 1, 1] = 1
        >>> lesion_metrics(ref, ref, voxel_volume_ml=0.008).sensitivity
        1.0
    """
    if reference.shape != prediction.shape:
        raise ValueError(f"reference {reference.shape} and prediction {prediction.shape} differ in shape")
    if reference.ndim != 3:
        raise ValueError(f"expected 3-D masks, got {reference.ndim}-D")
    ref = reference != 0
    pred = prediction != 0
    ref_lab, n_ref = _components(ref, connectivity)
    pred_lab, n_pred = _components(pred, connectivity)
    # A component "touches" the other mask when any of its voxels overlaps it: count voxels per
    # component label, and overlapping voxels per label, in one bincount each.
    ref_sizes = np.bincount(ref_lab.ravel(), minlength=n_ref + 1)
    ref_hit = np.bincount(ref_lab[pred].ravel(), minlength=n_ref + 1)
    pred_sizes = np.bincount(pred_lab.ravel(), minlength=n_pred + 1)
    pred_hit = np.bincount(pred_lab[ref].ravel(), minlength=n_pred + 1)
    missed = (ref_hit[1:] == 0)
    false_pos = (pred_hit[1:] == 0)
    return LesionMetrics(
        fp_volume_ml=float(pred_sizes[1:][false_pos].sum()) * voxel_volume_ml,
        fn_volume_ml=float(ref_sizes[1:][missed].sum()) * voxel_volume_ml,
        n_ref_lesions=n_ref,
        n_detected=int(n_ref - missed.sum()),
        n_pred_components=n_pred,
        n_fp_components=int(false_pos.sum()),
    )


def lesion_metrics_files(reference: Path, prediction: Path, *, connectivity: int = 18) -> LesionMetrics:
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
