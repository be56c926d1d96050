"""A small WORK folder that follows the aligned-case contract (docs/contracts.md section 3).

For tests of the release, the client, the nnU-Net materializer and the report that should not
need the DICOM pipeline. Volumes are tiny, seeded, and carry a known truth: the arrays written
are returned, so a test compares what it reads back with what was written here.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from lymphatlas_ds.schema import SCHEMA_VERSION


FAKE_SETTINGS_SHA256 = hashlib.sha256(b"fake-work default settings").hexdigest()
"""The ``source.settings_sha256`` of every fake case (convert records the sha256 of its settings there)."""


@dataclass
class FakeCase:
    case_id: str
    subject_id: str
    diagnosis: str
    ct: np.ndarray  # int16 [z, y, x]
    pet: np.ndarray  # float32 [z, y, x]
    label: np.ndarray  # uint8 [z, y, x]
    affine: np.ndarray  # RAS 4x4
    case_json: dict = field(default_factory=dict)


def _affine_ras(spacing_xyz, origin_lps) -> np.ndarray:
    # Axial LPS grid with identity direction: index (i, j, k) -> LPS = origin + spacing * index.
    lps = np.eye(4)
    lps[:3, :3] = np.diag(spacing_xyz)
    lps[:3, 3] = origin_lps
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _save(array_zyx: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(np.ascontiguousarray(array_zyx.transpose(2, 1, 0)), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, path)


def make_fake_work(
    work: Path,
    *,
    n_patients: int = 12,
    seed: int = 0,
    shape_zyx: tuple[int, int, int] = (20, 24, 28),
    spacing_xyz: tuple[float, float, float] = (2.0, 2.0, 3.0),
    case_prefix: str = "LA",
    first_patient: int = 0,
    exam_prefix: str = "EXAM",
    volume_seed: int | None = None,
) -> list[FakeCase]:
    """Write ``n_patients`` patients (some with two exams) as aligned cases under ``work``.

    Patient ``p`` is subject ``LP-<p><seed>``: a second call with the same seed, an earlier
    ``first_patient`` and another ``case_prefix`` and ``exam_prefix`` adds new exams of known patients
    (give another ``volume_seed``, default ``seed``, or their volumes repeat the first call's).

    Example:
        >>> cases = make_fake_work(tmp_path / "work", n_patients=4)  # doctest: +SKIP
    """
    rng = np.random.default_rng(seed if volume_seed is None else volume_seed)
    work = Path(work)
    (work / "cases").mkdir(parents=True, exist_ok=True)
    (work / "private").mkdir(parents=True, exist_ok=True)
    cases: list[FakeCase] = []
    id_rows = []
    z, y, x = shape_zyx
    grid = np.mgrid[0:z, 0:y, 0:x]
    body = ((grid[1] - y / 2) / (y * 0.45)) ** 2 + ((grid[2] - x / 2) / (x * 0.45)) ** 2 <= 1.0
    for p in range(first_patient, first_patient + n_patients):
        subject_id = f"LP-{p:04d}{seed:02d}"
        for e in range(2 if p % 3 == 0 else 1):
            case_id = f"{case_prefix}-{p:04d}{e}{seed:02d}"
            ct, pet, label, n_lesions = _volumes(rng, grid, body, first_exam=e == 0)
            affine = _affine_ras(spacing_xyz, (-x * spacing_xyz[0] / 2, -y * spacing_xyz[1] / 2, -400.0 - 50 * e))
            case_json = _case_json(case_id, subject_id, p, e, ct, pet, label, affine, n_lesions, spacing_xyz)
            _write_case(work / "cases" / case_id, ct, pet, label, affine, case_json)
            diagnosis = case_json["clinical"]["diagnosis"]
            cases.append(FakeCase(case_id, subject_id, diagnosis, ct, pet, label, affine, case_json))
            id_rows.append((f"{exam_prefix}{p:04d}{e}", f"PAT{p:04d}", case_id, subject_id))
    _append_id_map(work / "private" / "id_map.csv", id_rows)
    failures = work / "failures.json"
    if not failures.exists():
        failures.write_text("[]\n")
    return cases


def _volumes(rng: np.random.Generator, grid: np.ndarray, body: np.ndarray, *,
             first_exam: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """CT, PET and label of one exam: noisy soft tissue in ``body``, 0-3 ball lesions (at least one
    on a first exam) that are hot on PET; returns the arrays and the lesion count."""
    zz, yy, xx = grid
    z, y, x = body.shape
    ct = np.where(body, rng.normal(40, 15, body.shape), -1000).astype(np.int16)
    pet = np.where(body, rng.gamma(4.0, 0.2, body.shape), 0).astype(np.float32)
    label = np.zeros(body.shape, np.uint8)
    n_lesions = int(rng.integers(1 if first_exam else 0, 4))
    for _ in range(n_lesions):
        c = rng.integers([3, 6, 6], [z - 3, y - 6, x - 6])
        r = float(rng.uniform(1.5, 3.0))
        ball = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r * r
        label[ball] = 1
        pet[ball] = float(rng.uniform(4, 20))
    return ct, pet, label, n_lesions


def _case_json(case_id: str, subject_id: str, p: int, e: int, ct: np.ndarray, pet: np.ndarray, label: np.ndarray,
               affine: np.ndarray, n_lesions: int, spacing_xyz: tuple[float, float, float]) -> dict:
    """The case.json of exam ``e`` of patient number ``p``: clinical values derived from ``p``, the
    geometry, fixed scanner and alignment records, lesion statistics and the content hash."""
    content = hashlib.sha256()
    for arr in (ct, pet, label, affine):
        content.update(np.ascontiguousarray(arr).tobytes())
    return {
        "schema_version": SCHEMA_VERSION,
        "builder_version": "0.1.0",
        "case_id": case_id,
        "subject_id": subject_id,
        "clinical": _clinical(p, e),
        "geometry": {
            "shape_zyx": list(ct.shape),
            "spacing_xyz": list(spacing_xyz),
            "origin_lps": [float(v) for v in (np.diag([-1, -1, 1]) @ affine[:3, 3])],
            "direction": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0],
            "affine_ras": affine.tolist(),
        },
        "ct": {"manufacturer": "SIEMENS", "model": "Biograph mCT", "kvp": 120.0},
        "pet": {
            "manufacturer": "SIEMENS",
            "model": "Biograph mCT",
            "suv": {"factor": 1.1e-4, "time_reference": "series", "units": "BQML"},
        },
        "alignment": _alignment(),
        "lesions": _lesions(ct, pet, label, affine, spacing_xyz),
        "qc": {"passed": True, "checks": []},
        "source": {"content_hash": hashlib.sha256(case_id.encode()).hexdigest(), "mask_format": "nifti",
                   "settings_sha256": FAKE_SETTINGS_SHA256},
        "content_hash": content.hexdigest(),
    }


def _lesions(ct: np.ndarray, pet: np.ndarray, label: np.ndarray, affine: np.ndarray,
             spacing_xyz: tuple[float, float, float]) -> dict:
    """The case.json "lesions" block as convert computes it (``builder.convert.lesions``), the PET
    being on the CT grid already (identity transform): what the release's lesions config reads."""
    import SimpleITK as sitk

    from builder.convert.lesions import lesion_statistics

    ct_img = sitk.GetImageFromArray(ct)
    ct_img.SetSpacing(tuple(float(s) for s in spacing_xyz))
    ct_img.SetOrigin(tuple(float(v) for v in np.diag([-1, -1, 1]) @ affine[:3, 3]))
    pet_img = sitk.GetImageFromArray(pet)
    pet_img.CopyInformation(ct_img)
    return lesion_statistics(label, pet, ct_img, pet=pet_img)


def _clinical(p: int, e: int) -> dict:
    """Diagnosis, sex and age band alternate with the patient number ``p``; exams are 120 days apart."""
    diagnosis = "HL" if p % 2 == 0 else "NHL"
    return {
        "diagnosis": diagnosis,
        "subtype": "nodular sclerosis" if diagnosis == "HL" else "DLBCL",
        "sex": "F" if p % 2 else "M",
        "age_band": f"{20 + 5 * (p % 10)}-{24 + 5 * (p % 10)}",
        "exam_index": e,
        "days_from_first_exam": 120 * e,
    }


def _alignment() -> dict:
    """A rigid registration record that improved the metric (the same for every fake case)."""
    return {
        "method": "rigid",
        "metric": "mattes_mi",
        "metric_before": -0.40,
        "metric_after": -0.50,
        "improved": True,
        "decision": "rigid registration applied",
        "transform": {
            "type": "Euler3DTransform",
            "parameters": [0, 0, 0, 1.0, 0.5, 0.0],
            "center_mm": [0, 0, 0],
            "matrix": np.eye(4).tolist(),
        },
        "shift_mm": 1.1,
        "seed": 0,
        "interpolation": "bounded-cubic",
    }


def _write_case(folder: Path, ct: np.ndarray, pet: np.ndarray, label: np.ndarray, affine: np.ndarray,
                case_json: dict) -> None:
    """The case folder: ct, pet and label NIfTI files and case.json."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in (("ct", ct), ("pet", pet), ("label", label)):
        _save(arr, affine, folder / f"{name}.nii.gz")
    (folder / "case.json").write_text(json.dumps(case_json, indent=2, sort_keys=True))


def _append_id_map(path: Path, id_rows: list[tuple[str, str, str, str]]) -> None:
    """Append the exams' (exam_id, patient_id, case_id, subject_id) rows to the private ID map."""
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if f.tell() == 0:
            w.writerow(["exam_id", "patient_id", "case_id", "subject_id"])
        w.writerows(id_rows)


def large_volumes(shape_zyx: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CT, PET and label of a whole-body-sized case, made quickly (seconds, not minutes) for memory
    and size measurements: CT in HU (air, a body ellipse breathing with z, lungs, spine, noise of
    12-18 HU), PET made at PET resolution (~3 voxels in-plane, noisy SUV, hot balls) and linearly
    interpolated onto the CT grid, so its float32 voxels compress like a resampled PET does; the
    label is PET > 4. The same seed gives the same volumes.

    Example:
        >>> ct, pet, label = large_volumes((250, 512, 512))  # doctest: +SKIP
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    z, y, x = shape_zyx
    yy, xx = np.ogrid[0:y, 0:x]
    cy, cx = y / 2, x / 2
    fov = (yy - cy) ** 2 + (xx - cx) ** 2 <= (0.49 * x) ** 2
    bone = (xx - cx) ** 2 + (yy - (cy + 0.16 * y)) ** 2 <= (0.03 * x) ** 2
    lung = ((np.abs(xx - cx) - 0.17 * x) / (0.1 * x)) ** 2 + ((yy - cy) / (0.13 * y)) ** 2 <= 1
    ct = np.empty(shape_zyx, np.int16)
    templates: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for k in range(z):
        level = int(round(8 * np.sin(k / 25)))  # 17 body sizes, built once each
        if level not in templates:
            body = ((xx - cx) / (0.36 * x * (1 + 0.01 * level))) ** 2 + ((yy - cy) / (0.24 * y)) ** 2 <= 1
            base = np.full((y, x), -1000.0, np.float32)
            base[body] = 40.0
            base[bone & body] = 700.0
            templates[level] = (base, np.where(body, 18.0, 10.0).astype(np.float32))
        base, sigma = templates[level]
        sl = base.copy()
        if z * 0.45 < k < z * 0.75:
            sl[lung & (base > -999)] = -850.0
        sl += rng.standard_normal((y, x), dtype=np.float32) * sigma
        sl[~fov] = -1024
        ct[k] = np.round(sl)
    py, px = max(y // 3, 8), max(x // 3, 8)
    pet = np.empty(shape_zyx, np.float32)
    body_low = (ct[:, ::3, ::3] > -300)[:, :py, :px]
    # SUV ~1.2 in the body; the air is not 0 on a reconstructed PET (noise of ~0.02 SUV over the field of view)
    pet_low = np.where(body_low, rng.gamma(8.0, 0.15, body_low.shape), rng.gamma(2.0, 0.01, body_low.shape))
    pet_low = pet_low.astype(np.float32)
    zz, yl, xl = np.ogrid[0:z, 0:py, 0:px]
    for _ in range(12):  # hot lesions
        c = rng.integers([z // 8, py // 3, px // 3], [z * 7 // 8, py * 2 // 3, px * 2 // 3])
        r = rng.uniform(1.5, 4.0)
        pet_low[(zz - c[0]) ** 2 + (yl - c[1]) ** 2 + (xl - c[2]) ** 2 <= r * r] = rng.uniform(5, 25)
    for k0 in range(0, z, 32):  # in-plane linear interpolation, a slab at a time
        slab = ndimage.zoom(pet_low[k0:k0 + 32], (1, y / py, x / px), order=1)
        pet[k0:k0 + 32] = np.clip(slab[:, :y, :x], 0, None)
    label = (pet > 4.0).astype(np.uint8)
    return ct, pet, label


def make_large_work(work: Path, *, n_cases: int, shape_zyx: tuple[int, int, int] = (250, 512, 512),
                    spacing_xyz: tuple[float, float, float] = (0.98, 0.98, 3.0), seed: int = 0) -> list[str]:
    """A WORK folder of ``n_cases`` full-size cases (one per patient) that share one set of
    :func:`large_volumes` (hard links to one copy of the files: cheap on disk and in time); each
    case.json is complete and its content hash true. Returns the case ids.

    For measurements of the release at scale (memory, row-group sizes), not for statistics.

    Example:
        >>> make_large_work(tmp_path / "work", n_cases=12)  # doctest: +SKIP
    """
    import copy
    import os

    try:
        from isal import igzip as gz
    except ImportError:  # pragma: no cover
        import gzip as gz  # type: ignore[no-redef]

    work = Path(work)
    (work / "cases").mkdir(parents=True, exist_ok=True)
    (work / "private").mkdir(parents=True, exist_ok=True)
    ct, pet, label = large_volumes(shape_zyx, seed)
    z, y, x = shape_zyx
    affine = _affine_ras(spacing_xyz, (-x * spacing_xyz[0] / 2, -y * spacing_xyz[1] / 2, -400.0))
    n_lesions = 12
    template = work / "private" / "large-volumes"
    template.mkdir(exist_ok=True)
    for name, arr in (("ct", ct), ("pet", pet), ("label", label)):
        img = nib.Nifti1Image(np.ascontiguousarray(arr.transpose(2, 1, 0)), affine)
        img.set_sform(affine, code=1)
        img.set_qform(affine, code=1)
        (template / f"{name}.nii.gz").write_bytes(gz.compress(img.to_bytes(), 1, mtime=0))
    base = _case_json("T", "T", 0, 0, ct, pet, label, affine, n_lesions, spacing_xyz)
    del ct, pet, label
    ids, id_rows = [], []
    for p in range(n_cases):
        case_id, subject_id = f"LA-L{p:05d}{seed:02d}", f"LP-L{p:05d}{seed:02d}"
        info = copy.deepcopy(base)
        info.update(case_id=case_id, subject_id=subject_id, clinical=_clinical(p, 0))
        info["source"]["content_hash"] = hashlib.sha256(case_id.encode()).hexdigest()
        folder = work / "cases" / case_id
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("ct", "pet", "label"):
            target = folder / f"{name}.nii.gz"
            if not target.exists():
                os.link(template / f"{name}.nii.gz", target)
        (folder / "case.json").write_text(json.dumps(info, indent=2, sort_keys=True))
        ids.append(case_id)
        id_rows.append((f"EXAML{p:05d}", f"PATL{p:05d}", case_id, subject_id))
    _append_id_map(work / "private" / "id_map.csv", id_rows)
    if not (work / "failures.json").exists():
        (work / "failures.json").write_text("[]\n")
    return ids
