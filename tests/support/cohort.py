"""Synthetic cohorts for tests, generated once per test session and shared read-only.

Used by the session fixtures in ``tests/conftest.py`` (``synthetic_cohort``, ``synthetic_good_cohort``).
The truth folder is the generator's default, ``source / "truth"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

_CACHE: dict[tuple, tuple[Path, list]] = {}


def cohort(
    tmp_path_factory: pytest.TempPathFactory,
    *,
    n_exams: int,
    seed: int,
    variants: Any = None,
    size: str = "small",
) -> tuple[Path, list]:
    """(source folder, list[ExamTruth]) of a cohort written by ``lymphatlas_synth.cohort.generate_cohort``.

    The same arguments return the same folder for the whole session; tests must not modify it.
    """
    key = (n_exams, seed, repr(variants), size)
    if key not in _CACHE:
        from lymphatlas_synth.cohort import generate_cohort

        root = tmp_path_factory.mktemp(f"cohort_{n_exams}_{seed}")
        source = root / "source"
        truths = generate_cohort(source, n_exams=n_exams, seed=seed, size=size, variants=variants)
        _CACHE[key] = (source, truths)
    return _CACHE[key]
