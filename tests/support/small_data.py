"""Small in-memory test data shared by unit tests: SimpleITK grids, split cohorts, PET dose facts."""

from __future__ import annotations

import datetime as dt
import random

import numpy as np
import SimpleITK as sitk

from builder.convert.discover import SeriesInfo, SeriesKind
from builder.release.splits import SplitCase

HALF_LIFE = 6586.2  # F-18, s
DOSE = 350e6  # Bq
WEIGHT = 72.0  # kg
INJECTION = dt.datetime(2024, 3, 5, 9, 12, 30)
SERIES = SeriesInfo(series_uid="1.2.3", study_uid="1.2", frame_of_reference_uid="1.2.4", modality="PT",
                    kind=SeriesKind.PET_AC, files=[])


def grid(size, spacing, origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    """An empty float32 image with this size, spacing and origin (identity direction)."""
    img = sitk.Image(size, sitk.sitkFloat32)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    return img


def image_like(arr: np.ndarray, like: sitk.Image) -> sitk.Image:
    """``arr`` ([z, y, x]) as a float32 image on ``like``'s grid."""
    out = sitk.GetImageFromArray(arr.astype(np.float32))
    out.CopyInformation(like)
    return out


def split_cohort(n_patients: int, *, seed: int = 0, prefix: str = "P", start: int = 0) -> list[SplitCase]:
    """A cohort like the paper's: about 30 % HL, 1-4 exams per patient, skewed lesion burden."""
    rng = random.Random(seed)
    cases = []
    for p in range(start, start + n_patients):
        subject = f"{prefix}{p:04d}"
        diagnosis = "HL" if rng.random() < 0.3 else "NHL"
        for e in range(rng.choice([1, 1, 2, 3, 4])):
            cases.append(SplitCase(f"C-{subject}-{e}", subject, diagnosis, rng.lognormvariate(3.0, 1.2)))
    return cases
