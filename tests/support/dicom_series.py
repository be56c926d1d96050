"""Small DICOM series written by the ingest tests themselves, with the truth they were made from.

Independent of the synthetic cohort generator: every geometry, rescale and SUV header a test needs
is set here explicitly, so unit tests can probe one rule at a time (orientation, slice order,
per-slice slopes, transfer syntaxes, timing headers).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
PET_STORAGE = "1.2.840.10008.5.1.4.1.1.128"


@dataclass
class SeriesTruth:
    """What a written series must read back as."""

    files: list[Path]  # in the order the slices were written (file i = slice order[i])
    volume: np.ndarray  # [z, y, x] values after rescale, slices sorted along the normal
    origin: np.ndarray  # LPS of the first slice along the normal
    direction: np.ndarray  # 3x3, columns = row dir, col dir, normal
    spacing: tuple[float, float, float]  # (x, y, z)
    series_uid: str
    study_uid: str
    for_uid: str
    positions: list[np.ndarray] = field(default_factory=list)  # IPP of sorted slice k


def rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    """A rotation matrix from angles in degrees (x, then y, then z)."""
    ax, ay, az = np.radians([rx, ry, rz])
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    mx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    my = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    mz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return mz @ my @ mx


def base_dataset(modality: str, *, study_uid: str, series_uid: str, for_uid: str, description: str = "") -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT_STORAGE if modality == "CT" else PET_STORAGE
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = for_uid
    ds.Modality = modality
    ds.PatientName = "Test^Patient"
    ds.PatientID = "TEST-ID"
    ds.SeriesDescription = description
    ds.Manufacturer = "SIEMENS"
    ds.ManufacturerModelName = "Biograph"
    ds.PatientPosition = "HFS"
    return ds


def write_dataset(ds: Dataset, path: Path, *, transfer_syntax: str = ExplicitVRLittleEndian) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_series(
    folder: Path,
    *,
    modality: str = "CT",
    n: int = 6,
    rows: int = 8,
    cols: int = 10,
    pixel_spacing: tuple[float, float] = (0.8, 0.7),  # (row spacing = y, column spacing = x)
    slice_spacing: float = 2.5,
    origin: tuple[float, float, float] = (-4.0, -3.0, -100.0),
    rot: np.ndarray | None = None,
    order: list[int] | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    seed: int = 0,
    study_uid: str | None = None,
    for_uid: str | None = None,
    description: str = "",
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    extra: dict | None = None,
    per_slice: list[dict] | None = None,
    unsigned: bool = False,
    names: list[str] | None = None,
    random_instance_numbers: bool = True,
) -> SeriesTruth:
    """Write one series of ``n`` single-frame slices; returns the truth it must read back as.

    CT: stored int16 (or uint16 with intercept -1024 when ``unsigned``) -> HU exact integers.
    PET: stored uint16 with a different RescaleSlope per slice -> float values.
    ``order[i]`` is the sorted slice index written to file ``i`` (default: a seeded shuffle).
    """
    rng = np.random.default_rng(seed)
    rot = np.eye(3) if rot is None else np.asarray(rot, float)
    row_dir, col_dir = rot[:, 0], rot[:, 1]
    normal = np.cross(row_dir, col_dir)
    study_uid, for_uid, series_uid = study_uid or generate_uid(), for_uid or generate_uid(), generate_uid()
    order = list(rng.permutation(n)) if order is None else list(order)
    origin_a = np.asarray(origin, float)
    volume = np.empty((n, rows, cols), dtype=np.int16 if modality == "CT" else np.float32)
    files, positions = [], [origin_a + k * slice_spacing * normal for k in range(n)]
    for i, k in enumerate(order):
        ds = base_dataset(modality, study_uid=study_uid, series_uid=series_uid, for_uid=for_uid,
                          description=description)
        ds.SOPInstanceUID = generate_uid()
        ds.ImageType = list(image_type)
        # Random by default: deliberately useless for sorting. Peers like dcm2niix rely on it, so they get k + 1.
        ds.InstanceNumber = int(rng.integers(1, 1000)) if random_instance_numbers else k + 1
        _set_image_plane(ds, positions[k], row_dir, col_dir, pixel_spacing, slice_spacing, rows, cols)
        stored, volume[k] = (_ct_pixels(ds, rng, rows, cols, unsigned=unsigned) if modality == "CT"
                             else _pet_pixels(ds, rng, rows, cols))
        for key, value in [*(extra or {}).items(), *(per_slice[k] if per_slice else {}).items()]:
            setattr(ds, key, value)
        path = folder / (names[i] if names else f"IM{i:04d}.dcm")
        _write_pixels(ds, stored, path, transfer_syntax)
        files.append(path)
    return SeriesTruth(
        files=files, volume=volume, origin=positions[0], direction=np.column_stack([row_dir, col_dir, normal]),
        spacing=(pixel_spacing[1], pixel_spacing[0], slice_spacing), series_uid=series_uid,
        study_uid=study_uid, for_uid=for_uid, positions=positions,
    )


def _set_image_plane(ds: Dataset, position: np.ndarray, row_dir: np.ndarray, col_dir: np.ndarray,
                     pixel_spacing: tuple[float, float], slice_spacing: float, rows: int, cols: int) -> None:
    """Image Plane and the 16-bit monochrome Image Pixel attributes of one slice."""
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row_dir, *col_dir)]
    ds.PixelSpacing = [f"{v}" for v in pixel_spacing]
    ds.SliceThickness = f"{slice_spacing:.6g}"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15


def _ct_pixels(ds: Dataset, rng: np.random.Generator, rows: int, cols: int, *,
               unsigned: bool) -> tuple[np.ndarray, np.ndarray]:
    """Random HU stored as int16, or as uint16 with intercept -1024 when ``unsigned``; returns (stored, HU)."""
    ds.KVP = "120"
    ds.ConvolutionKernel = "B30f"
    hu = rng.integers(-1024, 3000, size=(rows, cols)).astype(np.int16)
    if unsigned:
        ds.PixelRepresentation = 0
        ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
        return (hu.astype(np.int32) + 1024).astype(np.uint16), hu
    ds.PixelRepresentation = 1
    ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
    return hu, hu


def _pet_pixels(ds: Dataset, rng: np.random.Generator, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Random uint16 values with a random RescaleSlope, in Bq/ml; returns (stored, values)."""
    ds.PixelRepresentation = 0
    slope = float(f"{0.5 + 2.0 * rng.random():.6f}")
    stored = rng.integers(0, 30000, size=(rows, cols)).astype(np.uint16)
    ds.RescaleSlope, ds.RescaleIntercept = f"{slope}", "0"
    ds.Units = "BQML"
    ds.CorrectedImage = ["ATTN", "DECY"]
    ds.DecayCorrection = "START"
    return stored, (stored.astype(np.float64) * slope).astype(np.float32)


def _write_pixels(ds: Dataset, stored: np.ndarray, path: Path, transfer_syntax: str) -> None:
    """Set the pixel data (compressed with pydicom's encoders unless little endian) and write the file."""
    ds.PixelData = stored.tobytes()
    if transfer_syntax not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.compress(transfer_syntax, stored, generate_instance_uid=False)
    write_dataset(ds, path, transfer_syntax=transfer_syntax)


def pet_timing(ds_extra: dict | None = None, *, series_dt: dt.datetime, injection_dt: dt.datetime | None,
               acquisition_dt: dt.datetime | None = None, dose_bq: float | None = 350e6,
               half_life_s: float | None = 6586.2, weight_kg: float | None = 72.0,
               start_time_only: bool = False) -> dict:
    """Header attributes for the SUV rules (series / acquisition / injection times, dose, weight)."""
    out = dict(ds_extra or {})
    out["SeriesDate"] = series_dt.strftime("%Y%m%d")
    out["SeriesTime"] = series_dt.strftime("%H%M%S.%f")
    acq = acquisition_dt or series_dt
    out["AcquisitionDate"] = acq.strftime("%Y%m%d")
    out["AcquisitionTime"] = acq.strftime("%H%M%S.%f")
    if weight_kg is not None:
        out["PatientWeight"] = f"{weight_kg}"
    rp = Dataset()
    if dose_bq is not None:
        rp.RadionuclideTotalDose = f"{dose_bq}"
    if half_life_s is not None:
        rp.RadionuclideHalfLife = f"{half_life_s}"
    if injection_dt is not None:
        if start_time_only:
            rp.RadiopharmaceuticalStartTime = injection_dt.strftime("%H%M%S.%f")
        else:
            rp.RadiopharmaceuticalStartDateTime = injection_dt.strftime("%Y%m%d%H%M%S.%f")
            rp.RadiopharmaceuticalStartTime = injection_dt.strftime("%H%M%S.%f")
    out["RadiopharmaceuticalInformationSequence"] = pydicom.Sequence([rp])
    return out
