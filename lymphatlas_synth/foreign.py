"""The independent phantom generator (``shared/phantoms/foreign_cohort.py``), found by path, never copied.

It lives beside the project, at ``../shared/phantoms`` from the repository root (CI has it there too);
the environment variable ``LYMPHATLAS_FOREIGN_PHANTOMS`` names its folder instead. Tests that need it
skip with that reason when it is absent; benchmarks stop with it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ENV = "LYMPHATLAS_FOREIGN_PHANTOMS"
REPO = Path(__file__).resolve().parents[1]
SCRIPT = "foreign_cohort.py"


def foreign_script() -> Path | None:
    """``foreign_cohort.py`` from ``$LYMPHATLAS_FOREIGN_PHANTOMS`` or ``../shared/phantoms``; None if absent."""
    folder = os.environ.get(ENV)
    candidate = Path(folder) if folder else REPO.parent / "shared" / "phantoms"
    script = candidate / SCRIPT
    return script if script.is_file() else None


def missing_reason() -> str:
    return (f"the independent phantom generator is absent: no {SCRIPT} in {ENV} or in ../shared/phantoms "
            f"from the repository root ({REPO.parent / 'shared' / 'phantoms'}); set {ENV} to its folder")


def generate(source: Path, truth: Path, *, seed: int, size: str, limit: int | None = None) -> list[dict]:
    """Write a cohort with the independent generator (a subprocess, as its README runs it) and return
    the truth of every exam it expects to be accepted, in exam order."""
    script = foreign_script()
    if script is None:
        raise FileNotFoundError(missing_reason())
    if not (truth.is_dir() and any(truth.glob("*.json"))):
        # written beside, renamed once complete: an interrupted run leaves no truth folder behind
        # that a later call would take for a whole cohort
        part_source, part_truth = source.with_name(source.name + ".partial"), truth.with_name(truth.name + ".partial")
        for folder in (part_source, part_truth, source):
            shutil.rmtree(folder, ignore_errors=True)
        cmd = [sys.executable, str(script), "--out", str(part_source), "--truth", str(part_truth), "--seed", str(seed),
               "--size", size]
        if limit is not None:
            cmd += ["--limit", str(limit)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{script.name} --seed {seed} --size {size} failed ({done.returncode}): {done.stderr[-2000:]}")
        part_source.rename(source)
        part_truth.rename(truth)
    truths = [json.loads(p.read_text()) for p in sorted(truth.glob("*.json"))]
    return [t for t in truths if t["expected_outcome"] == "ok"]


def lesion_residuals(matrix: np.ndarray, truth: dict) -> np.ndarray:
    """Found minus true PET position of each lesion centre (N x 3, LPS mm): ``A c - M c`` with ``A``
    the found CT -> PET matrix (4 x 4) and ``M`` the truth's ``misalignment.ct_to_pet_lps``."""
    m = np.asarray(truth["misalignment"]["ct_to_pet_lps"], float)
    a = np.asarray(matrix, float)
    centres = np.array([les["center_lps"] for les in truth["lesions"]], float).reshape(-1, 3)
    return centres @ (a[:3, :3] - m[:3, :3]).T + (a[:3, 3] - m[:3, 3])
