"""Realistic synthetic whole-body FDG PET/CT DICOM cohorts with exact ground truth.

Writes the source contract (``clinical.csv``, ``dicom/<exam_id>/**``, ``masks/<exam_id>.nii.gz``
or ``masks/<exam_id>.seg.dcm``) and a truth folder (docs/contracts.md section 1), deterministically
from the seed: the same seed writes byte-identical files.

Each exam is a body (:mod:`lymphatlas_synth.anatomy`: body contour, fat, muscle, lungs, airway,
skeleton, heart, aorta, liver, spleen, kidneys, bladder, head and brain) with lymphoma lesions at
nodal stations (HL contiguous above the diaphragm, NHL scattered and bulky, some extranodal).
CT is painted on the CT grid in HU with noise; PET is the per-tissue SUV activity blurred to PET
resolution, moved by a known rigid misalignment (``p_pet = M @ p_ct``), sampled on the PET grid,
given noise and written in the vendor's units.

Sizes (``size=``):

* ``small``: CT 128 x 128 at 3.906 mm, 6 mm slices (155-185 slices, vertex to mid-thigh);
  PET 64 x 64 at 7.8125 mm. About a second per exam; for tests.
* ``full``: CT 512 x 512 at 0.977 mm, 3 mm slices (310-365 slices); PET 200 x 200 at 4 mm.
  Real scale; for benchmarks and the demo.

Variant keys (``variants=`` a dict applied to every exam, a list of dicts cycled over the
exams, ``"all"`` to cycle :data:`ALL_VARIANTS` which covers every key below, or None for good
default exams only). Missing keys take :data:`DEFAULT_VARIANT`:

* ``vendor``: ``siemens`` (Units BQML, SeriesTime = scan start), ``ge`` (BQML, SeriesTime later
  than the earliest AcquisitionTime, which is the decay reference; GE private scan date-time),
  ``philips`` (Units CNTS with the private SUV (7053,1000) and Bq/ml (7053,1009) scale factors).
* ``patient_position``: ``HFS`` or ``FFS`` (feet first: image rows run right-to-left and slices
  run head-to-feet along the slice normal).
* ``decay_correction``: ``START`` (values decay-corrected to the scan start) or ``ADMIN``
  (to the injection time).
* ``after_midnight``: injection shortly before midnight, scan after it (SeriesDate is the next day).
* ``ct_unsigned``: CT stored unsigned (12 bits) with RescaleIntercept -1024.
* ``pet_fov``: ``matched`` (PET slices at the CT's z positions) or ``short`` (other slice spacing,
  shorter axial and other transaxial field of view).
* ``extra_series``: a CT localizer and a non-attenuation-corrected PET series in the folder.
* ``nested_shuffled``: random file names (no extension) in nested folders, series mixed.
* ``mask_format``: ``nifti`` (``masks/<exam_id>.nii.gz`` on the CT grid) or ``seg`` (DICOM SEG).
* ``ct_transfer_syntax`` / ``pet_transfer_syntax``: a transfer syntax UID (explicit VR little
  endian, RLE Lossless, JPEG-LS Lossless or JPEG 2000 Lossless, encoded by pydicom's encoders).
* ``lesions``: ``auto`` (1-4 lesions for HL, 1-6 for NHL; a follow-up exam is a complete response
  without lesions one time in four), ``always`` (at least one lesion) or ``none`` (a complete response).
* ``bad``: None, ``missing_slice`` (one CT file removed), ``missing_dose`` (no
  RadionuclideTotalDose), ``corrupt_file`` (a CT file truncated in its pixel data).

Optional keys (absent: the size's own grids and misalignment, so existing seeds write the same
bytes; present: recorded in the truth's ``variant``), used by the registration tests and
``benchmarks/bench_registration.py`` for a scanner's grids at a fraction of the full size's cost:

* ``grid``: a dict overriding the size's grids: ``ct_px`` (in-plane mm; the CT keeps the size's
  500 mm field of view), ``ct_dz`` (slice spacing), ``pet_px`` (PET voxel size in-plane and
  along z; PET slices then cover the CT's range at their own spacing instead of the CT's z
  positions, or the shorter range of ``pet_fov: short``), ``pet_fwhm_mm`` (PET resolution).
* ``misalignment``: a dict with ``max_rotation_deg`` (each Euler angle uniform in +-max, default
  2) and ``max_translation_mm`` (length uniform in 2..max along a random direction, default 8).

Example:
    >>> truths = generate_cohort(tmp_path / "src", n_exams=2, seed=0)  # doctest: +SKIP
    >>> truths[0].expected, load_truth(tmp_path / "src" / "truth", "EX0000")["suv_factor"]  # doctest: +SKIP
    ('accept', 0.00023...)
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless

from lymphatlas_synth.exam import (
    BAD_TRUTH,
    SIZES,
    BadExam,
    ExamTruth,
    Patient,
    Size,
    _write_bytes,
    _write_json,
    generate_exam,
    marker,
    misalignment_matrix,
)
from lymphatlas_ds.errors import LymphAtlasError

__all__ = [
    "Size",
    "CohortExistsError",
    "ExamTruth",
    "DEFAULT_VARIANT",
    "ALL_VARIANTS",
    "generate_cohort",
    "generate_exam",
    "load_truth",
    "misalignment_matrix",
    "sha256_tree",
    "BadExam",
    "BAD_TRUTH",
    "SIZES",
]

log = logging.getLogger(__name__)

GENERATOR_VERSION = "1.0.0"


class CohortExistsError(LymphAtlasError, FileExistsError):
    """The output folder already holds files and ``overwrite`` was not asked for."""


DEFAULT_VARIANT: dict[str, Any] = {
    "vendor": "siemens",
    "patient_position": "HFS",
    "decay_correction": "START",
    "after_midnight": False,
    "ct_unsigned": False,
    "pet_fov": "matched",
    "extra_series": False,
    "nested_shuffled": False,
    "mask_format": "nifti",
    "ct_transfer_syntax": str(ExplicitVRLittleEndian),
    "pet_transfer_syntax": str(ExplicitVRLittleEndian),
    "lesions": "auto",
    "bad": None,
}

_RLE, _J2K, _JLS = str(RLELossless), str(JPEG2000Lossless), str(JPEGLSLossless)

ALL_VARIANTS: list[dict[str, Any]] = [
    {},
    {"vendor": "ge", "patient_position": "FFS", "ct_unsigned": True, "extra_series": True, "nested_shuffled": True},
    {"vendor": "philips", "mask_format": "seg", "pet_transfer_syntax": _RLE, "pet_fov": "short", "lesions": "always"},
    {"patient_position": "FFS", "decay_correction": "ADMIN", "after_midnight": True, "ct_transfer_syntax": _JLS,
     "extra_series": True},
    {"vendor": "ge", "after_midnight": True, "ct_transfer_syntax": _RLE, "mask_format": "seg", "nested_shuffled": True,
     "lesions": "always"},
    {"vendor": "philips", "patient_position": "FFS", "decay_correction": "ADMIN", "after_midnight": True,
     "ct_transfer_syntax": _J2K, "pet_fov": "short", "ct_unsigned": True},
    {"pet_transfer_syntax": _J2K, "pet_fov": "short", "nested_shuffled": True, "lesions": "none"},
    {"vendor": "ge", "patient_position": "FFS", "decay_correction": "ADMIN", "extra_series": True, "mask_format": "seg",
     "lesions": "always"},
    {"vendor": "philips", "extra_series": True, "nested_shuffled": True},
    {"bad": "missing_slice"},
    {"vendor": "ge", "bad": "missing_dose"},
    {"vendor": "philips", "patient_position": "FFS", "bad": "corrupt_file"},
]
"""Cycled by ``variants="all"``: 12 exams cover every vendor, position, timing, storage and bad case."""

OPTIONAL_VARIANT_KEYS = frozenset({"grid", "misalignment"})
"""Variant keys without a default (see the module docstring): only written to the truth when given."""

HL_SUBTYPES = ["nodular sclerosis", "mixed cellularity", "lymphocyte-rich", "nodular lymphocyte-predominant"]
NHL_SUBTYPES = ["DLBCL", "follicular", "mantle cell", "marginal zone", "PTCL", "Burkitt"]
CLINICAL_COLUMNS = ["exam_id", "patient_id", "exam_date", "sex", "age", "diagnosis", "subtype", "notes"]


def _resolve_variants(variants: str | dict | Sequence[dict] | None, n: int) -> list[dict[str, Any]]:
    if variants is None:
        chosen: list[dict] = [{}]
    elif variants == "all":
        chosen = ALL_VARIANTS
    elif isinstance(variants, dict):
        chosen = [variants]
    elif isinstance(variants, str):
        raise ValueError(f"variants must be None, 'all', a dict or a list of dicts, got {variants!r}")
    else:
        chosen = list(variants)
        if not chosen:
            raise ValueError("variants is an empty list; pass None for default exams")
    out = []
    for i in range(n):
        v = {**DEFAULT_VARIANT, **chosen[i % len(chosen)]}
        unknown = set(v) - set(DEFAULT_VARIANT) - OPTIONAL_VARIANT_KEYS
        if unknown:
            raise ValueError(
                f"unknown variant keys {sorted(unknown)}; known keys: {sorted(set(DEFAULT_VARIANT) | OPTIONAL_VARIANT_KEYS)}"
            )
        if v["bad"] is not None:
            v["bad"] = BadExam(v["bad"]).value
        out.append(v)
    return out


def _patients(rng: np.random.Generator, n_exams: int) -> list[tuple[Patient, int]]:
    """Assign exams to patients (1-3 exams each): [(patient, exam_index_of_patient)] per exam."""
    out: list[tuple[Patient, int]] = []
    while len(out) < n_exams:
        sex = "F" if rng.random() < 0.45 else "M"
        diagnosis = "HL" if rng.random() < 0.45 else "NHL"
        age0 = int(rng.integers(15, 70))
        first = dt.date(2016, 1, 4) + dt.timedelta(days=int(rng.integers(0, 2400)))
        birth = first - dt.timedelta(days=int(age0 * 365.25 + rng.integers(1, 360)))
        subtype = (HL_SUBTYPES if diagnosis == "HL" else NHL_SUBTYPES)[int(rng.integers(0, 4))]
        pid = marker(rng, "PID")
        name = f"{marker(rng, 'NAME')}^{marker(rng, 'GIVEN')}"
        patient = Patient(pid, name, sex, diagnosis, subtype, birth, age0, first, (pid, *name.split("^")))
        for e in range(int(rng.choice([1, 1, 2, 2, 3]))):
            out.append((patient, e))
    return out[:n_exams]


def generate_cohort(
    out: str | os.PathLike,
    *,
    n_exams: int,
    seed: int,
    size: str | Size = "small",
    truth_dir: str | os.PathLike | None = None,
    variants: str | dict | Sequence[dict] | None = None,
    overwrite: bool = False,
    progress: Callable[[Iterable], Iterable] | None = None,
    first_exam: int = 0,
) -> list[ExamTruth]:
    """Write a synthetic cohort of ``n_exams`` exams into ``out`` and its truth into ``truth_dir``.

    Exams are numbered from ``EX<first_exam>`` (``EX0000`` by default), so cohorts written with
    other seeds and ``first_exam`` values merge into one source without renaming (the UIDs derive
    from the seed and the exam id, so merged cohorts share none).
    ``truth_dir`` defaults to ``out/truth``. ``out`` must be empty or absent unless ``overwrite``.
    See the module docstring for sizes and variant keys.

    Example:
        >>> truths = generate_cohort(tmp_path / "src", n_exams=12, seed=1, variants="all")  # doctest: +SKIP
        >>> sorted({t.expected for t in truths})  # doctest: +SKIP
        ['accept', 'reject']
    """
    if n_exams < 1:
        raise ValueError(f"n_exams must be at least 1, got {n_exams}")
    if first_exam < 0:
        raise ValueError(f"first_exam must be 0 or more, got {first_exam}")
    size = Size(size)
    out = Path(out)
    truth_dir = Path(truth_dir) if truth_dir is not None else out / "truth"
    _prepare_folders(out, truth_dir, overwrite=overwrite)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC0401]))
    assignments = _patients(rng, n_exams)
    chosen = _resolve_variants(variants, n_exams)
    truths: list[ExamTruth] = []
    indices: Iterable[int] = range(n_exams)
    if progress is not None:
        indices = progress(indices)
    for i in indices:
        patient, exam_index = assignments[i]
        exam_id = f"EX{first_exam + i:04d}"
        t = generate_exam(
            out, truth_dir, exam_id=exam_id, seed=seed, index=i, size=size, patient=patient,
            exam_index=exam_index, variant=chosen[i],
        )
        truths.append(t)
    _write_clinical(out / "clinical.csv", [t.truth["_clinical"] for t in truths])
    for t in truths:
        t.truth.pop("_clinical")
        _write_json(t.truth_path, t.truth)
    _write_json(
        truth_dir / "cohort.json",
        {"seed": seed, "size": size.value, "exams": [t.exam_id for t in truths],
         "generator_version": GENERATOR_VERSION},
    )
    return truths


def _prepare_folders(out: Path, truth_dir: Path, *, overwrite: bool) -> None:
    """Create ``out`` and ``truth_dir``; a non-empty ``out`` only with ``overwrite``, which first removes
    the previous cohort (DICOM, masks, clinical table, truth)."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise CohortExistsError(f"{out} is not empty; choose a new folder or pass overwrite=True (--overwrite)")
        for sub in ("dicom", "masks", "clinical.csv"):
            target = out / sub
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        if truth_dir.exists():
            shutil.rmtree(truth_dir)
    out.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)


def _write_clinical(path: Path, rows: list[dict]) -> None:
    """The clinical table, in exam order; notes hold identifying-looking free text."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CLINICAL_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _write_bytes(path, buf.getvalue().encode("utf-8"))


def load_truth(truth_dir: str | os.PathLike, exam_id: str) -> dict:
    """The truth JSON of one exam (docs/contracts.md section 1).

    Example:
        >>> load_truth(tmp_path / "src" / "truth", "EX0000")["expected"]  # doctest: +SKIP
        'accept'
    """
    path = Path(truth_dir) / f"{exam_id}.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"no truth for exam {exam_id} at {path}; was the cohort generated with this truth dir?"
        ) from e



def lesion_residuals(transform: Any, truth: dict) -> np.ndarray:
    """Found minus true PET position of every lesion centre of ``truth`` (N x 3, LPS mm).

    ``transform`` maps CT points to PET points (a SimpleITK transform, as registration finds it);
    the truth's misalignment ``M`` is the true map, so row ``i`` is ``T(c_i) - M c_i`` for lesion
    centre ``c_i``: its norm is the target registration error at that lesion.

    Example:
        >>> np.linalg.norm(lesion_residuals(aligned.transform, truth), axis=1).mean()  # doctest: +SKIP
        0.21
    """
    m = np.asarray(truth["misalignment"]["matrix"], float)
    out = []
    for les in truth["lesions"]:
        c = np.asarray(les["center_mm"], float)
        out.append(np.asarray(transform.TransformPoint(tuple(map(float, c)))) - (m[:3, :3] @ c + m[:3, 3]))
    return np.asarray(out, float).reshape(-1, 3)

def sha256_tree(root: Path) -> str:
    """A digest of every file's relative path and bytes under ``root`` (determinism checks)."""
    h = hashlib.sha256()
    for p in sorted(x for x in Path(root).rglob("*") if x.is_file()):
        h.update(str(p.relative_to(root)).encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()
