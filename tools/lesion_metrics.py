"""Lesion-level metrics that nnU-Net's voxel summary lacks and autoPET reports.

The definitions live in the client, :mod:`lymphatlas_ds.metrics` (one copy, shared with
``lymphatlas evaluate``, examples there); this module keeps the names the tools import.
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
