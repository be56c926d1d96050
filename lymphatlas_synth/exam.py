"""One synthetic exam: body, lesions, CT, misaligned PET, DICOM series, mask and truth arrays.

Part of :mod:`lymphatlas_synth.cohort` (the public API, sizes and variant keys are documented there).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import gzip
import io
import json
import logging
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.uid import generate_uid
from scipy import ndimage

from lymphatlas_synth import anatomy as anat
from lymphatlas_synth import dicom as sd

log = logging.getLogger(__name__)


class Size(str, enum.Enum):
    SMALL = "small"
    FULL = "full"


@dataclass(frozen=True)
class _SizeSpec:
    ct_n: int
    ct_px: float
    ct_dz: float
    pet_n: int
    pet_px: float
    pet_fwhm_mm: float
    short_pet_n: int
    short_pet_px: float
    short_pet_dz: float
    activity_step: int


SIZES: dict[Size, _SizeSpec] = {
    Size.SMALL: _SizeSpec(128, 500 / 128, 6.0, 64, 500 / 64, 9.0, 60, 9.0, 8.0, 1),
    Size.FULL: _SizeSpec(512, 500 / 512, 3.0, 200, 4.0, 6.5, 180, 4.0728, 4.0, 2),
}


GRID_KEYS = ("ct_px", "ct_dz", "pet_px", "pet_fwhm_mm")
MISALIGNMENT_KEYS = ("max_rotation_deg", "max_translation_mm")


def _exam_spec(spec: _SizeSpec, grid: dict | None) -> tuple[_SizeSpec, float | None]:
    """The size's grids with the variant's ``grid`` overrides, and the PET slice spacing (None:
    the size's own PET slices). Fields of view (CT 500 mm, PET and short PET) stay the size's."""
    if not grid:
        return spec, None
    unknown = set(grid) - set(GRID_KEYS)
    if unknown:
        raise ValueError(f"unknown grid keys {sorted(unknown)}; known keys: {list(GRID_KEYS)}")
    bad = {k: v for k, v in grid.items() if not (isinstance(v, (int, float)) and v > 0)}
    if bad:
        raise ValueError(f"grid values must be positive numbers (mm), got {bad}")
    ct_px = float(grid.get("ct_px", spec.ct_px))
    pet_px = float(grid.get("pet_px", spec.pet_px))
    out = dataclasses.replace(
        spec,
        ct_n=int(round(spec.ct_n * spec.ct_px / ct_px)),
        ct_px=ct_px,
        ct_dz=float(grid.get("ct_dz", spec.ct_dz)),
        pet_n=int(round(spec.pet_n * spec.pet_px / pet_px)),
        pet_px=pet_px,
        pet_fwhm_mm=float(grid.get("pet_fwhm_mm", spec.pet_fwhm_mm)),
        short_pet_n=int(round(spec.short_pet_n * spec.short_pet_px / pet_px)),
        short_pet_px=pet_px,
        short_pet_dz=pet_px,
        # activity built on a grid of about 2 mm in-plane (PET resolution does not need more)
        activity_step=max(1, int(round(2.0 / ct_px))),
    )
    return out, (pet_px if "pet_px" in grid else None)


class BadExam(str, enum.Enum):
    MISSING_SLICE = "missing_slice"
    MISSING_DOSE = "missing_dose"
    CORRUPT_FILE = "corrupt_file"


# Rejection truth of each bad variant: (stage, phrase the builder's error message must contain).
BAD_TRUTH: dict[BadExam, tuple[str, str]] = {
    BadExam.MISSING_SLICE: ("read", "missing slice"),
    BadExam.MISSING_DOSE: ("suv", "dose"),
    BadExam.CORRUPT_FILE: ("read", "corrupt"),
}


@dataclass(frozen=True)
class ExamTruth:
    """What :func:`generate_cohort` returns per exam; ``truth`` is the JSON of ``truth/<exam_id>.json``."""

    exam_id: str
    expected: str  # accept | reject
    truth_path: Path
    truth: dict

    @property
    def variant(self) -> dict:
        return self.truth["variant"]


@dataclass(frozen=True)
class Patient:
    patient_id: str
    name: str
    sex: str
    diagnosis: str
    subtype: str
    birth: dt.date
    age0: int
    first_date: dt.date
    markers: tuple[str, ...]


def marker(rng: np.random.Generator, what: str) -> str:
    return f"PHIMARK-{what}-{rng.integers(0, 16**6):06x}"


def misalignment_matrix(
    rotation_deg: Sequence[float], translation_mm: Sequence[float], center_mm: Sequence[float]
) -> np.ndarray:
    """The 4x4 LPS matrix of ITK's Euler3DTransform (R = Rz @ Rx @ Ry, about ``center_mm``).

    ``p_pet = M @ p_ct``: where anatomy at CT-frame point ``p_ct`` appears in the PET series.

    Example:
        >>> m = misalignment_matrix([0, 0, 0], [1, 2, 3], [0, 0, 0])
        >>> m[:3, 3].tolist()
        [1.0, 2.0, 3.0]
    """
    rx, ry, rz = np.deg2rad(np.asarray(rotation_deg, dtype=float))
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
    mx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    my = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    mz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    r = mz @ mx @ my
    c = np.asarray(center_mm, dtype=float)
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = c + np.asarray(translation_mm, dtype=float) - r @ c
    return m



def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    _write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def _write_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    _write_bytes(path, buf.getvalue())


def _axis_positions(center: float, n: int, spacing: float, sign: float) -> np.ndarray:
    return center - sign * (n - 1) / 2 * spacing + sign * spacing * np.arange(n)


def _grid(n_xy: int, px: float, zs_ascending: np.ndarray, position: str, xy_center=(0.0, 0.0)) -> sd.SeriesGeometry:
    """An axial grid in the orientation a scanner writes for ``position`` (FFS: x and z flipped)."""
    sign = -1.0 if position == "FFS" else 1.0
    xs = _axis_positions(xy_center[0], n_xy, px, sign)
    ys = _axis_positions(xy_center[1], n_xy, px, 1.0)
    z0 = zs_ascending[0] if sign > 0 else zs_ascending[-1]
    dz = float(zs_ascending[1] - zs_ascending[0])
    return sd.SeriesGeometry(
        size=(n_xy, n_xy, len(zs_ascending)),
        spacing=(px, px, dz),
        origin=(float(xs[0]), float(ys[0]), float(z0)),
        direction=(sign, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, sign),
    )


def _to_scanner(array_ascending: np.ndarray, position: str) -> np.ndarray:
    """[z, y, x] on an identity-direction grid -> the same voxels on the FFS grid (x and z reversed)."""
    return array_ascending[::-1, :, ::-1] if position == "FFS" else array_ascending


@dataclass(frozen=True)
class _Anatomy:
    """The body and its lesions painted on an identity-direction grid: the CT's slices plus a margin."""

    grid: anat.Grid1D
    tissue: np.ndarray  # Tissue labels [z, y, x]
    lesion_id: np.ndarray  # 0 outside the lesions, n inside lesions[n - 1]
    lesions: list[anat.Lesion]  # those the CT mask shows
    ct_slab: slice  # the CT's slices within the grid


@dataclass(frozen=True)
class _Ct:
    """The CT and its lesion mask as the scanner writes them, and the HU in ascending z (the localizer's source)."""

    geom: sd.SeriesGeometry
    zs: np.ndarray  # slice positions, ascending (mm)
    hu_asc: np.ndarray
    hu: np.ndarray
    mask: np.ndarray


@dataclass(frozen=True)
class _Misalignment:
    """The rigid PET-to-CT misalignment: ``p_pet = matrix @ p_ct``."""

    rotation_deg: np.ndarray
    translation_mm: np.ndarray
    center_mm: np.ndarray
    matrix: np.ndarray

    def to_truth(self) -> dict[str, Any]:
        return {
            "rotation_deg": self.rotation_deg.tolist(), "translation_mm": self.translation_mm.tolist(),
            "center_mm": self.center_mm.tolist(), "matrix": self.matrix.tolist(),
            "convention": "ITK Euler3DTransform: R = Rz @ Rx @ Ry about center_mm",
        }


@dataclass(frozen=True)
class _Acquisition:
    """The exam's date and times, dose and weight, and the scale from PET values (Bq/ml) to SUV."""

    exam_date: dt.date
    injection: dt.datetime
    scan_start: dt.datetime
    series_dt: dt.datetime
    dose_bq: float
    weight_kg: float
    uptake_s: float  # injection to scan start
    decay_time_s: float  # injection to the decay reference time
    time_reference: str
    decay_correction: str  # START | ADMIN
    bqml_to_suv: float
    units: str  # BQML | CNTS
    counts_per_bqml: float

    def to_truth(self) -> dict[str, Any]:
        return {
            "units": self.units, "dose_bq": self.dose_bq, "half_life_s": sd.F18_HALF_LIFE_S,
            "weight_kg": self.weight_kg, "decay_time_s": self.decay_time_s, "time_reference": self.time_reference,
            "uptake_time_s": self.uptake_s, "decay_correction": self.decay_correction,
            "bqml_to_suv": self.bqml_to_suv, "counts_to_bqml": self.counts_per_bqml if self.units == "CNTS" else None,
            "injection_datetime": self.injection.isoformat(), "scan_start_datetime": self.scan_start.isoformat(),
            "series_datetime": self.series_dt.isoformat(),
        }


@dataclass(frozen=True)
class _Written:
    """What went into the exam's folder and masks: series, SUV factor and truth, the bad variant's damage."""

    ct_uid: str
    ct_geom: sd.SeriesGeometry
    pet_uid: str
    pet_geom: sd.SeriesGeometry
    seg_uid: str | None
    ignored: list[str]  # localizer and NAC PET
    suv_factor: float  # SUV per unit of the written PET (Bq/ml, or counts)
    pet_truth: np.ndarray  # SUV of the written PET values
    defect: dict[str, Any]  # bad_file, missing_slice_position_mm, missing_slice_index


def generate_exam(
    out: Path,
    truth_dir: Path,
    *,
    exam_id: str,
    seed: int,
    index: int,
    size: Size,
    patient: Patient,
    exam_index: int,
    variant: dict[str, Any],
) -> ExamTruth:
    """Write one exam (DICOM, mask, truth arrays) and return its truth; the JSON is written by the caller."""
    spec, pet_dz = _exam_spec(SIZES[size], variant.get("grid"))
    ss = np.random.SeedSequence([seed, index, 0x5EED])
    r_body, r_lesion, r_noise, r_misc = (np.random.default_rng(s) for s in ss.spawn(4))
    position = variant["patient_position"]

    def uid(*parts: Any) -> str:
        return generate_uid(entropy_srcs=[str(seed), exam_id, *(str(p) for p in parts)])

    body = anat.make_body(r_body, sex=patient.sex)
    lesions = _plant_lesions(r_lesion, body, patient, exam_index, variant["lesions"])
    zs_ct = _ct_slice_positions(body, spec.ct_dz)
    ct_geom = _grid(spec.ct_n, spec.ct_px, zs_ct, position)
    pet_geom, lesions = _pet_grid(spec, pet_dz, variant["pet_fov"], body, zs_ct, position, lesions)
    anatomy = _paint_anatomy(spec, body, lesions, zs_ct)
    ct = _scan_ct(anatomy, ct_geom, zs_ct, position, r_noise)
    voxel_ml = spec.ct_px * spec.ct_px * spec.ct_dz / 1000.0
    lesion_ct = anatomy.lesion_id[anatomy.ct_slab]
    lesion_truth = _lesion_truth(anatomy.lesions, lesion_ct, anatomy.grid, anatomy.grid.zs[anatomy.ct_slab], voxel_ml)
    mis = _misalignment(r_misc, variant.get("misalignment"), body)
    pet_suv = _pet_suv(spec, anatomy, pet_geom, mis.matrix, r_noise)
    acq = _acquisition(r_misc, patient, exam_index, variant, body)
    activity = pet_suv / acq.bqml_to_suv  # Bq/ml, decay-corrected to the reference time
    study, markers, notes = _study(seed, index, patient, acq.exam_date, acq.injection, acq.weight_kg, body,
                                   variant["vendor"], position, exam_index, uid)
    namer = _Namer(variant["nested_shuffled"], np.random.default_rng(np.random.SeedSequence([seed, index, 0xF11E])))
    written = _write_exam(out, exam_id, namer, study, uid, variant, spec, ct, pet_geom, activity, acq)

    tdir = truth_dir / exam_id
    _write_npy(tdir / "ct_hu.npy", ct.hu)
    _write_npy(tdir / "pet_suv.npy", written.pet_truth)
    _write_npy(tdir / "mask.npy", ct.mask)
    truth = _truth_json(
        exam_id, patient, exam_index, variant, body=body, acq=acq, mis=mis, written=written,
        lesion_truth=lesion_truth, tmtv_ml=round(int(ct.mask.sum()) * voxel_ml, 6), study=study, markers=markers,
        notes=notes,
    )
    log.info("wrote %s (%s, %s, %d lesions, %s)", exam_id, variant["vendor"], position, len(anatomy.lesions),
             truth["expected"])
    return ExamTruth(exam_id=exam_id, expected=truth["expected"], truth_path=truth_dir / f"{exam_id}.json", truth=truth)


def _ct_slice_positions(body: anat.Body, ct_dz: float) -> np.ndarray:
    """The CT's slice positions (mm, ascending) from the bottom of the scan to past the vertex."""
    n_ct_z = int(math.ceil((body.z_top - body.z_bottom) / ct_dz)) + 1
    zs_ct = body.z_bottom + ct_dz * np.arange(n_ct_z)
    return np.round(zs_ct, 3)


def _paint_anatomy(spec: _SizeSpec, body: anat.Body, lesions: list[anat.Lesion], zs_ct: np.ndarray) -> _Anatomy:
    """Tissue and lesion labels on the CT's in-plane grid, over the CT's slices plus a margin for the PET blur."""
    margin = 6
    n_ct_z = len(zs_ct)
    zs_anat = zs_ct[0] + spec.ct_dz * np.arange(-margin, n_ct_z + margin)
    xs_anat = _axis_positions(0.0, spec.ct_n, spec.ct_px, 1.0)
    grid = anat.Grid1D(xs_anat, xs_anat.copy(), zs_anat)
    shape_anat = (len(zs_anat), spec.ct_n, spec.ct_n)
    ct_slab = slice(margin, margin + n_ct_z)
    lesion_id = np.zeros(shape_anat, dtype=np.uint8)
    anat.paint(grid, [les.shape() for les in lesions], lesion_id, values=np.arange(1, len(lesions) + 1))
    # A lesion smaller than a CT voxel that falls between voxel centres is not in the mask: drop it,
    # so the truth lists exactly the lesions a reader can find.
    counts = np.bincount(lesion_id[ct_slab].ravel(), minlength=len(lesions) + 1)
    if (counts[1:] == 0).any():
        lesions = [les for n, les in enumerate(lesions, start=1) if counts[n] > 0]
        lesion_id[:] = 0
        anat.paint(grid, [les.shape() for les in lesions], lesion_id, values=np.arange(1, len(lesions) + 1))
    tissue = np.zeros(shape_anat, dtype=np.uint8)
    anat.paint(grid, body.shapes, tissue)
    anat.paint(grid, [les.shape() for les in lesions], tissue)
    return _Anatomy(grid, tissue, lesion_id, lesions, ct_slab)


def _scan_ct(anatomy: _Anatomy, geom: sd.SeriesGeometry, zs: np.ndarray, position: str,
             r_noise: np.random.Generator) -> _Ct:
    """The CT in HU and the lesion mask, in the scanner's voxel order for ``position``."""
    hu_asc = _ct_hu(anatomy.tissue, r_noise)[anatomy.ct_slab]
    hu = np.ascontiguousarray(_to_scanner(hu_asc, position))
    mask = np.ascontiguousarray(_to_scanner((anatomy.lesion_id[anatomy.ct_slab] > 0).astype(np.uint8), position))
    return _Ct(geom, zs, hu_asc, hu, mask)


def _acquisition(r_misc: np.random.Generator, patient: Patient, exam_index: int, variant: dict[str, Any],
                 body: anat.Body) -> _Acquisition:
    """The exam date, injection and scan times, dose, weight, and the SUV scale of the written PET."""
    vendor = variant["vendor"]
    follow_up_days = 0 if exam_index == 0 else int(90 + 150 * exam_index + r_misc.integers(0, 60))
    exam_date = patient.first_date + dt.timedelta(days=follow_up_days)
    injection, scan_start = _injection_and_scan(r_misc, exam_date, variant["after_midnight"])
    series_dt = scan_start + (dt.timedelta(minutes=int(r_misc.integers(25, 50))) if vendor == "ge" else dt.timedelta(0))
    dose_bq = float(sd.ds_str(round(float(3.5e6 * body.weight_kg * r_misc.uniform(0.9, 1.1)), -4)))
    weight_kg = float(sd.ds_str(body.weight_kg))
    decay_s = (scan_start - injection).total_seconds()
    decay_factor = 2.0 ** (-decay_s / sd.F18_HALF_LIFE_S)
    if variant["decay_correction"] == "ADMIN":
        bqml_to_suv = weight_kg * 1000.0 / dose_bq
        time_reference, decay_time = "admin", 0.0
    else:
        bqml_to_suv = weight_kg * 1000.0 / (dose_bq * decay_factor)
        time_reference, decay_time = ("acquisition" if vendor == "ge" else "series"), decay_s
    units = "CNTS" if vendor == "philips" else "BQML"
    counts_per_bqml = float(sd.ds_str(r_misc.uniform(8.0, 16.0))) if units == "CNTS" else 1.0
    return _Acquisition(
        exam_date=exam_date, injection=injection, scan_start=scan_start, series_dt=series_dt, dose_bq=dose_bq,
        weight_kg=weight_kg, uptake_s=decay_s, decay_time_s=decay_time, time_reference=time_reference,
        decay_correction=variant["decay_correction"], bqml_to_suv=bqml_to_suv, units=units,
        counts_per_bqml=counts_per_bqml,
    )


def _injection_and_scan(r_misc: np.random.Generator, exam_date: dt.date,
                        after_midnight: bool) -> tuple[dt.datetime, dt.datetime]:
    """The injection time (late evening for ``after_midnight``) and the scan start 55-75 minutes later."""
    if after_midnight:
        clock = dt.time(23, int(r_misc.integers(5, 40)), int(r_misc.integers(0, 60)))
    else:
        clock = dt.time(int(r_misc.integers(8, 15)), int(r_misc.integers(0, 60)), int(r_misc.integers(0, 60)))
    injection = dt.datetime.combine(exam_date, clock)
    uptake_s = int(r_misc.integers(55 * 60, 75 * 60))
    scan_start = injection + dt.timedelta(seconds=uptake_s)
    if after_midnight and scan_start.date() == injection.date():
        scan_start = dt.datetime.combine(injection.date() + dt.timedelta(days=1), dt.time(0, 5))
    return injection, scan_start


def _write_exam(out: Path, exam_id: str, namer: _Namer, study: sd.StudyInfo, uid: Any, variant: dict[str, Any],
                spec: _SizeSpec, ct: _Ct, pet_geom: sd.SeriesGeometry, activity: np.ndarray,
                acq: _Acquisition) -> _Written:
    """The exam's series in a temporary folder renamed into place at the end, its mask, the bad variant's damage."""
    final_dir = out / "dicom" / exam_id
    work_dir = out / "dicom" / f".{exam_id}.partial"
    if work_dir.exists():
        shutil.rmtree(work_dir)
    ct_uid, ct_ds, ct_files = _write_ct(work_dir, namer, study, uid, variant, ct, acq.scan_start)
    pet_uid, timing, suv_factor, pet_truth = _write_pet(work_dir, namer, study, uid, variant, pet_geom, activity, acq)
    ignored: list[str] = []
    if variant["extra_series"]:
        ignored += _write_extra_series(study, work_dir, namer, ct.hu_asc, ct.zs, pet_geom, activity, timing, uid,
                                       acq.scan_start, spec)
    seg_uid = _write_mask(out / "masks", exam_id, variant["mask_format"], study, ct_ds, ct, acq.scan_start, uid)
    defect = _damage(variant["bad"], ct_files, ct, out, work_dir, final_dir)
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(work_dir, final_dir)
    return _Written(ct_uid, ct.geom, pet_uid, pet_geom, seg_uid, ignored, suv_factor, pet_truth, defect)


def _write_ct(work_dir: Path, namer: _Namer, study: sd.StudyInfo, uid: Any, variant: dict[str, Any], ct: _Ct,
              scan_start: dt.datetime) -> tuple[str, list, list[Path]]:
    """The CT series (acquired 4 minutes before the PET): its UID, datasets and files in slice order."""
    ct_spec = sd.SeriesSpec(uid("ct"), 2, "CT WB 3.0 Br38", scan_start - dt.timedelta(minutes=4),
                            variant["ct_transfer_syntax"])
    ct_ds = sd.ct_datasets(study, ct_spec, ct.geom, ct.hu, unsigned=variant["ct_unsigned"], acq_dt=ct_spec.series_dt)
    files = []
    for k, ds in enumerate(ct_ds):
        p = work_dir / namer.name("CT", k)
        sd.write_dataset(ds, p, transfer_syntax=ct_spec.transfer_syntax)
        files.append(p)
    return ct_spec.series_uid, ct_ds, files


def _write_pet(work_dir: Path, namer: _Namer, study: sd.StudyInfo, uid: Any, variant: dict[str, Any],
               pet_geom: sd.SeriesGeometry, activity: np.ndarray,
               acq: _Acquisition) -> tuple[str, sd.PetTiming, float, np.ndarray]:
    """The attenuation-corrected PET series: its UID and timing, the SUV per written unit, the SUV truth."""
    pet_spec = sd.SeriesSpec(uid("pet"), 4, "PET WB AC", acq.series_dt, variant["pet_transfer_syntax"])
    timing = sd.PetTiming(
        injection_dt=acq.injection, scan_start_dt=acq.scan_start, series_dt=acq.series_dt, bed_seconds=150.0,
        dose_bq=acq.dose_bq, decay_correction=acq.decay_correction,
        write_dose=variant["bad"] != BadExam.MISSING_DOSE.value,
    )
    # the activity was sampled directly on the scanner-oriented PET grid
    pet_ds, pet_values = sd.pet_datasets(
        study, pet_spec, pet_geom, activity, timing, units=acq.units, counts_per_bqml=acq.counts_per_bqml,
        suv_per_bqml=acq.bqml_to_suv,
    )
    suv_factor = acq.bqml_to_suv * acq.counts_per_bqml  # per unit of the written series (Bq/ml, or counts)
    if acq.units == "CNTS":
        suv_factor = float(pet_ds[0][0x7053, 0x1000].value)
    pet_truth = (pet_values * suv_factor).astype(np.float32)
    for k, ds in enumerate(pet_ds):
        sd.write_dataset(ds, work_dir / namer.name("PET", k), transfer_syntax=pet_spec.transfer_syntax)
    return pet_spec.series_uid, timing, suv_factor, pet_truth


def _write_mask(masks_dir: Path, exam_id: str, mask_format: str, study: sd.StudyInfo, ct_ds: list, ct: _Ct,
                scan_start: dt.datetime, uid: Any) -> str | None:
    """The lesion mask: a DICOM SEG drawn the day after (returns its series UID) or a NIfTI on the CT grid."""
    if mask_format == "seg":
        seg_uid = uid("seg")
        seg = sd.seg_dataset(study, ct_ds, ct.mask, series_uid=seg_uid, series_dt=scan_start + dt.timedelta(days=1))
        sd.write_dataset(seg, masks_dir / f"{exam_id}.seg.dcm")
        return seg_uid
    _write_bytes(masks_dir / f"{exam_id}.nii.gz", _nifti_gz(ct.mask, ct.geom))
    return None


def _damage(bad: str | None, ct_files: list[Path], ct: _Ct, out: Path, work_dir: Path,
            final_dir: Path) -> dict[str, Any]:
    """The bad variant's damage to the CT series: a slice removed or a file cut short; its truth keys."""
    bad_file = None
    missing_z = None
    missing_index = None
    n_ct_z = len(ct.zs)
    if bad == BadExam.MISSING_SLICE.value:
        missing_index = n_ct_z // 2 + 3
        missing_z = float(ct.geom.slice_origin(missing_index)[2])
        ct_files[missing_index].unlink()
    elif bad == BadExam.CORRUPT_FILE.value:
        victim = ct_files[n_ct_z // 2 - 5]
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) - (ct.hu.shape[1] * ct.hu.shape[2])])  # cut half the pixel data
        bad_file = str((final_dir / victim.relative_to(work_dir)).relative_to(out))
    return {"bad_file": bad_file, "missing_slice_position_mm": missing_z, "missing_slice_index": missing_index}


def _truth_json(
    exam_id: str, patient: Patient, exam_index: int, variant: dict[str, Any], *, body: anat.Body,
    acq: _Acquisition, mis: _Misalignment, written: _Written, lesion_truth: list[dict[str, Any]], tmtv_ml: float,
    study: sd.StudyInfo, markers: list[str], notes: str,
) -> dict[str, Any]:
    """The exam's truth JSON (docs/contracts.md section 1), with the clinical row under ``_clinical``."""
    bad = variant["bad"]
    stage, reason = BAD_TRUTH[BadExam(bad)] if bad else (None, None)
    w = written
    return {
        "exam_id": exam_id,
        "patient_id": patient.patient_id,
        "diagnosis": patient.diagnosis,
        "subtype": patient.subtype,
        "exam_index": exam_index,
        "exam_date": acq.exam_date.isoformat(),
        "expected": "reject" if bad else "accept",
        "reject_stage": stage,
        "reject_reason": reason,
        **w.defect,
        "variant": variant,
        "ct": {"series_uid": w.ct_uid, **w.ct_geom.to_dict()},
        "pet": {"series_uid": w.pet_uid, **w.pet_geom.to_dict()},
        "seg_series_uid": w.seg_uid,
        "ignored_series_uids": w.ignored,
        "misalignment": mis.to_truth(),
        "suv_factor": w.suv_factor,
        "suv": acq.to_truth(),
        "lesions": lesion_truth,
        "tmtv_ml": tmtv_ml,
        "body": {"weight_kg": acq.weight_kg, "scale": round(body.scale, 4), "width": round(body.width, 4),
                 "sex": patient.sex},
        "phi_markers": sorted(set(markers)),
        "phi_values": {
            "birth_date": patient.birth.strftime("%Y%m%d"),
            "study_uid": study.study_uid,
            "frame_of_reference_uid": study.frame_uid,
            "series_uids": [w.ct_uid, w.pet_uid, *w.ignored, *([w.seg_uid] if w.seg_uid else [])],
            "uid_root": "1.2.826.0.1.3680043.8.498.",
        },
        "_clinical": {
            "exam_id": exam_id, "patient_id": patient.patient_id, "exam_date": study.study_dt.date().isoformat(),
            "sex": patient.sex, "age": study.age, "diagnosis": patient.diagnosis, "subtype": patient.subtype,
            "notes": notes,
        },
    }


def _pet_grid(spec: _SizeSpec, pet_dz: float | None, pet_fov: str, body: anat.Body, zs_ct: np.ndarray, position: str,
              lesions: list[anat.Lesion]) -> tuple[sd.SeriesGeometry, list[anat.Lesion]]:
    """The PET grid (whole body, own slice spacing, or a short FOV) and the lesions a short FOV fully shows."""
    if pet_fov == "short":
        dz = spec.short_pet_dz
        z_lo, z_hi = body.z_bottom + 60.0, body.z_top - 45.0
        zs_pet = np.round(z_lo + dz * np.arange(int((z_hi - z_lo) // dz) + 1), 3)
        pet_geom = _grid(spec.short_pet_n, spec.short_pet_px, zs_pet, position)
        # Expert masks are drawn on the PET: a lesion the PET does not fully show (with a margin
        # for the misalignment) would not be in the mask of a real exam, so it is not planted.
        half_xy = spec.short_pet_n * spec.short_pet_px / 2.0 - 12.0
        lesions = [
            les for les in lesions
            if zs_pet[0] + 12.0 <= les.center[2] - les.radii[2] and les.center[2] + les.radii[2] <= zs_pet[-1] - 12.0
            and all(abs(les.center[k]) + les.radii[k] <= half_xy for k in (0, 1))
        ]
    elif pet_dz is not None:  # the PET's own slices over the CT's range, centred on it
        n_pet_z = int((zs_ct[-1] - zs_ct[0]) // pet_dz) + 1
        z0 = zs_ct[0] + (zs_ct[-1] - zs_ct[0] - (n_pet_z - 1) * pet_dz) / 2.0
        zs_pet = np.round(z0 + pet_dz * np.arange(n_pet_z), 3)
        pet_geom = _grid(spec.pet_n, spec.pet_px, zs_pet, position)
    else:
        pet_geom = _grid(spec.pet_n, spec.pet_px, zs_ct, position)
    return pet_geom, lesions


def _plant_lesions(r_lesion: np.random.Generator, body: anat.Body, patient: Patient, exam_index: int,
                   mode: str) -> list[anat.Lesion]:
    """The exam's lesions: none for ``mode`` "none" or a follow-up in complete response ("auto")."""
    # Follow-up exams are sometimes a complete response (no lesion left), as in real cohorts.
    complete_response = exam_index > 0 and r_lesion.random() < 0.25
    if mode not in ("auto", "always", "none"):
        raise ValueError(f"variant lesions must be auto, always or none, got {mode!r}")
    if mode == "none" or (mode == "auto" and complete_response):
        return []
    n_les = int(r_lesion.integers(1, 7 if patient.diagnosis == "NHL" else 5))
    return anat.place_lesions(r_lesion, body, diagnosis=patient.diagnosis, n=n_les)


def _ct_hu(tissue: np.ndarray, r_noise: np.random.Generator) -> np.ndarray:
    """CT in HU from the tissue classes, noise correlated over ~1 voxel like a soft kernel (int16)."""
    hu_anat = np.empty(tissue.shape, dtype=np.int16)
    for z0 in range(0, tissue.shape[0], 32):
        t = tissue[z0 : z0 + 32]
        noise = r_noise.standard_normal(t.shape, dtype=np.float32)
        noise = ndimage.gaussian_filter(noise, sigma=(0, 0.6, 0.6)) * 1.8
        hu = anat.TISSUE_HU[t] + anat.TISSUE_HU_SD[t] * noise
        hu_anat[z0 : z0 + 32] = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    return hu_anat


def _lesion_truth(lesions: list[anat.Lesion], lesion_ct: np.ndarray, grid: anat.Grid1D, zs_ct: np.ndarray,
                  voxel_ml: float) -> list[dict[str, Any]]:
    """Per lesion: geometry, voxel and analytic volume, SUVmax and mean uptake over its CT voxels."""
    zz, yy, xx = np.nonzero(lesion_ct)
    labels_at = lesion_ct[zz, yy, xx]
    lesion_truth = []
    for n, les in enumerate(lesions, start=1):
        sel = labels_at == n
        uptake = les.uptake(grid.xs[xx[sel]], grid.ys[yy[sel]], zs_ct[zz[sel]])
        nvox = int(sel.sum())
        lesion_truth.append({
            "center_mm": [round(v, 4) for v in les.center],
            "radius_mm": [round(v, 4) for v in les.radii],
            "volume_ml": round(nvox * voxel_ml, 6),
            "volume_ml_analytic": round(les.volume_ml_analytic, 6),
            "n_voxels": nvox,
            "suv_max": les.suv_max,
            "suv_mean": round(float(uptake.mean()), 4) if nvox else None,
            "station": les.station,
            "extranodal": les.extranodal,
        })
    return lesion_truth


def _misalignment(r_misc: np.random.Generator, limits: dict[str, Any] | None,
                  body: anat.Body) -> _Misalignment:
    """A random rigid PET-to-CT misalignment within ``limits``: rotation (deg), translation (mm), center, matrix."""
    limits = dict(limits or {})
    unknown = set(limits) - set(MISALIGNMENT_KEYS)
    if unknown:
        raise ValueError(f"unknown misalignment keys {sorted(unknown)}; known keys: {list(MISALIGNMENT_KEYS)}")
    max_rot = float(limits.get("max_rotation_deg", 2.0))
    max_trans = float(limits.get("max_translation_mm", 8.0))
    if max_rot < 0 or max_trans < 2.0:
        raise ValueError(f"misalignment needs max_rotation_deg >= 0 and max_translation_mm >= 2, got {limits}")
    rot = r_misc.uniform(-max_rot, max_rot, 3)
    direction = r_misc.normal(size=3)
    trans = direction / np.linalg.norm(direction) * r_misc.uniform(2.0, max_trans)
    rot, trans = np.round(rot, 4), np.round(trans, 4)
    center = np.round(np.asarray(body.center_mm), 4)
    return _Misalignment(rot, trans, center, misalignment_matrix(rot, trans, center))


def _pet_suv(spec: _SizeSpec, anatomy: _Anatomy, pet_geom: sd.SeriesGeometry, M: np.ndarray,
             r_noise: np.random.Generator) -> np.ndarray:
    """PET in SUV on the PET grid: tissue SUV + lesion uptake, blurred to the PET resolution, sampled at
    ``M^-1 q`` (the misalignment), with PET-like noise."""
    # At full size the activity is built on every other CT column and row (2 mm): PET resolution
    # (~6.5 mm FWHM) does not need more, and the blur costs a quarter.
    step = spec.activity_step
    grid = anatomy.grid
    pet_grid = anat.Grid1D(grid.xs[::step], grid.ys[::step], grid.zs)
    sub = (slice(None), slice(None, None, step), slice(None, None, step))
    suv_anat = anat.TISSUE_SUV[anatomy.tissue[sub]]
    lesion_sub = anatomy.lesion_id[sub]
    for n, les in enumerate(anatomy.lesions, start=1):
        zi, yi, xi = np.nonzero(lesion_sub == n)
        suv_anat[zi, yi, xi] = les.uptake(pet_grid.xs[xi], pet_grid.ys[yi], pet_grid.zs[zi])
    sigma_mm = spec.pet_fwhm_mm / 2.3548
    px = spec.ct_px * step
    suv_anat = ndimage.gaussian_filter(suv_anat, sigma=(sigma_mm / spec.ct_dz, sigma_mm / px, sigma_mm / px))
    pet_suv = _sample_pet(suv_anat, pet_grid, pet_geom, np.linalg.inv(M))
    # PET-like noise: multiplicative, correlated over about a voxel, plus a little background.
    n1 = ndimage.gaussian_filter(r_noise.standard_normal(pet_suv.shape, dtype=np.float32), 0.7) * 2.2
    n2 = ndimage.gaussian_filter(r_noise.standard_normal(pet_suv.shape, dtype=np.float32), 0.7) * 2.2
    return np.clip(pet_suv * (1.0 + 0.12 * n1) + 0.04 * n2 * (pet_suv > 0.05), 0.0, None).astype(np.float32)


def _study(seed: int, index: int, patient: Patient, exam_date: dt.date, injection: dt.datetime, weight_kg: float,
           body: anat.Body, vendor: str, position: str, exam_index: int,
           uid: Any) -> tuple[sd.StudyInfo, list[str], str]:
    """The study's header values with planted identifying markers, the markers, and the clinical notes text."""
    rp = np.random.default_rng(np.random.SeedSequence([seed, index, 0xF1D]))
    study = sd.StudyInfo(
        patient_name=patient.name, patient_id=patient.patient_id, birth_date=patient.birth, sex=patient.sex,
        age=patient.age0 + (exam_date - patient.first_date).days // 365, weight_kg=weight_kg,
        height_m=round(1.75 * body.scale * (0.93 if patient.sex == "F" else 1.0), 2),
        study_uid=uid("study"), frame_uid=uid("frame"), study_dt=injection - dt.timedelta(minutes=5),
        study_id=marker(rp, "SID")[:16], accession=marker(rp, "ACC")[:16],
        institution=marker(rp, "INST"), institution_address=f"{marker(rp, 'ADDR')} Hospital Road 1",
        referring=f"{marker(rp, 'REF')}^Doctor", operator=f"{marker(rp, 'OP')}^Tech",
        station=marker(rp, "STN")[:16], device_serial=marker(rp, "SN")[:16], vendor=vendor,
        patient_position=position, uid=uid,
    )
    markers = [*patient.markers, study.study_id, study.accession, study.institution,
               study.institution_address.split()[0],
               study.referring.split("^")[0], study.operator.split("^")[0], study.station, study.device_serial]
    note_marker = marker(rp, "NOTE")
    markers.append(note_marker)
    notes = (f"Referred by Dr {study.referring.split('^')[0]} ({study.institution}); "
             f"patient {patient.name.replace('^', ' ')}, MRN {patient.patient_id}, contact {note_marker}. "
             f"{'Baseline staging' if exam_index == 0 else 'Response assessment'} FDG PET/CT.")
    return study, markers, notes


def _sample_pet(suv_anat: np.ndarray, grid: anat.Grid1D, pet: sd.SeriesGeometry, m_inv: np.ndarray) -> np.ndarray:
    """SUV on the PET grid [z, y, x]: the value at PET point q is the (blurred) CT-frame SUV at M^-1 q."""
    nx, ny, nz = pet.size
    d = np.asarray(pet.direction).reshape(3, 3)
    i = np.arange(nx, dtype=float)
    j = np.arange(ny, dtype=float)
    out = np.zeros((nz, ny, nx), dtype=np.float32)
    o_anat = np.array([grid.xs[0], grid.ys[0], grid.zs[0]])
    s_anat = np.array([grid.xs[1] - grid.xs[0], grid.ys[1] - grid.ys[0], grid.zs[1] - grid.zs[0]])
    jj, ii = np.meshgrid(j, i, indexing="ij")
    for k in range(nz):
        pts = (
            np.asarray(pet.origin)[:, None]
            + d[:, 0:1] * pet.spacing[0] * ii.ravel()
            + d[:, 1:2] * pet.spacing[1] * jj.ravel()
            + d[:, 2:3] * pet.spacing[2] * k
        )
        p_ct = m_inv[:3, :3] @ pts + m_inv[:3, 3:4]
        idx = (p_ct - o_anat[:, None]) / s_anat[:, None]  # (x, y, z) continuous indices
        vals = ndimage.map_coordinates(suv_anat, [idx[2], idx[1], idx[0]], order=1, mode="constant", cval=0.0)
        out[k] = vals.reshape(ny, nx)
    return out


class _Namer:
    """File names inside an exam folder: tidy per-series folders, or shuffled names in nested folders."""

    def __init__(self, shuffled: bool, rng: np.random.Generator) -> None:
        self.shuffled = shuffled
        self.rng = rng
        self.used: set[str] = set()

    def name(self, series: str, k: int) -> str:
        if not self.shuffled:
            return f"{series}/{series}_{k + 1:04d}.dcm"
        while True:
            h = f"{self.rng.integers(0, 16**10):010x}"
            rel = f"{h[0:2].upper()}/{h[2:4].upper()}/{h[4:].upper()}"
            if rel not in self.used:
                self.used.add(rel)
                return rel


def _write_extra_series(
    study, work_dir, namer, hu_asc, zs_ct, pet_geom, activity, timing, uid, scan_start, spec
) -> list[str]:
    """A coronal localizer and a non-attenuation-corrected PET: present in real exports, never the pair."""
    loc_spec = sd.SeriesSpec(uid("localizer"), 1, "Topogram 0.6 T20f", scan_start - dt.timedelta(minutes=6))
    # Scout: mean attenuation along y, rows from the top of the scan (high z) down, columns right to left.
    proj = (hu_asc.astype(np.float32) + 1000.0).mean(axis=1)[::-1] - 1000.0
    proj = np.clip(proj * 2.0, -1024, 3071).astype(np.int16)
    origin = [float(-(spec.ct_n - 1) / 2 * spec.ct_px), 0.0, float(zs_ct[-1])]
    spacing_rc = (float(zs_ct[1] - zs_ct[0]), spec.ct_px)
    loc = sd.localizer_dataset(study, loc_spec, proj, origin=origin, spacing_rc=spacing_rc)
    sd.write_dataset(loc, work_dir / namer.name("SCOUT", 0))
    nac_spec = sd.SeriesSpec(uid("pet-nac"), 5, "PET WB NAC", timing.series_dt)
    # Without attenuation correction the body centre is dim and the skin and lungs look hot.
    nx, ny, _ = pet_geom.size
    yy, xx = np.mgrid[0:ny, 0:nx]
    r = np.hypot((xx - nx / 2) * pet_geom.spacing[0], (yy - ny / 2) * pet_geom.spacing[1]) / 180.0
    field = np.clip(0.25 + 0.75 * r**2, 0.25, 1.0).astype(np.float32)
    nac, _ = sd.pet_datasets(
        study, nac_spec, pet_geom, activity * field[None], timing, units="BQML",
        corrected=("DECY", "RAN", "NORM", "DTIM"),
    )
    for k, ds in enumerate(nac):
        sd.write_dataset(ds, work_dir / namer.name("NAC", k))
    return [loc_spec.series_uid, nac_spec.series_uid]


def _nifti_gz(mask: np.ndarray, geom: sd.SeriesGeometry) -> bytes:
    """The mask as a gzipped NIfTI-1 on the CT grid (RAS affine, sform = qform = scanner), mtime 0."""
    import nibabel as nib

    d = np.asarray(geom.direction).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = d * np.asarray(geom.spacing)[None, :]
    lps[:3, 3] = geom.origin
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    img = nib.Nifti1Image(np.ascontiguousarray(mask.transpose(2, 1, 0)), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_data_dtype(np.uint8)
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


