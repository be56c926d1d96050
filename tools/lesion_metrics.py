"""Lesion-level metrics that nnU-Net's voxel summary lacks and autoPET reports.

The definitions live in the client, :mod:`lymphatlas_ds.metrics` (one copy, shared with
``lymphatlas evaluate``); this module keeps the names the tools import.

Example:
    >>> import numpy as np
    >>> ref = np.zeros((4, 4, 4), np.uint8); ref[0, 0, 0] = 1
    >>> pred = np.zeros_like(ref); pred[3, 3, 3] = 1
    >>> m = lesion_metrics(ref, pred, voxel_volume_ml=0.001)
    >>> (m.fp_volume_ml, m.fn_volume_ml, m.n_detected, m.n_ref_lesions)
    (0.001, 0.001, 0, 1)
"""

from __future__ import annotations

from lymphatlas_ds.metrics import (
    CONNECTIVITY,
    CONNECTIVITY_RANK,
    LesionMetrics,
    lesion_metrics,
    lesion_metrics_files,
    summarize,
)

__all__ = ["CONNECTIVITY", "CONNECTIVITY_RANK", "LesionMetrics", "lesion_metrics", "lesion_metrics_files", "summarize"]
