"""DICOM writing for :mod:`lymphatlas_synth.cohort`: CT / PET / localizer / non-AC PET series, SEG masks.

One file per slice, written the way scanner exports are (CT Image Storage, PET Image Storage,
per-slice rescale for PET, vendor conventions for the SUV tags), from arrays on the series'
own grid in SimpleITK order ``[z, y, x]``.
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from lymphatlas_ds._io import write_atomic

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
PET_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.128"
F18_HALF_LIFE_S = 6586.2  # 109.77 min, the value scanners write
PHILIPS_CREATOR = "Philips PET Private Group"
GE_CREATOR = "GEMS_PETD_01"

VENDORS = {
    "siemens": ("SIEMENS", "Biograph Vision 600", "VG80B"),
    "ge": ("GE MEDICAL SYSTEMS", "Discovery MI", "pet_coreload.62"),
    "philips": ("Philips Medical Systems", "Vereos PET/CT", "4.0.2"),
}


def da(d: dt.date | dt.datetime) -> str:
    return d.strftime("%Y%m%d")


def tm(t: dt.datetime) -> str:
    return t.strftime("%H%M%S.%f")[:13]


def dtm(t: dt.datetime) -> str:
    return t.strftime("%Y%m%d%H%M%S.%f")[:21]


def ds_str(value: float) -> str:
    """A DS string (at most 16 characters) for ``value``; parse it back to know what was written."""
    for digits in range(10, 3, -1):
        s = f"{value:.{digits}g}"
        if len(s) <= 16:
            return s
    raise ValueError(f"cannot write {value!r} as a DICOM DS")


@dataclass
class SeriesGeometry:
    """An axial series' grid (ITK convention): size/spacing/origin (x, y, z), row-major direction."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    def slice_origin(self, k: int) -> list[float]:
        d = np.asarray(self.direction).reshape(3, 3)
        return list(np.asarray(self.origin) + d[:, 2] * self.spacing[2] * k)

    def iop(self) -> list[float]:
        d = np.asarray(self.direction).reshape(3, 3)
        return [float(v) for v in (*d[:, 0], *d[:, 1])]

    def to_dict(self) -> dict:
        return {
            "size": [int(v) for v in self.size],
            "spacing": [float(v) for v in self.spacing],
            "origin": [float(v) for v in self.origin],
            "direction": [float(v) for v in self.direction],
        }


@dataclass
class StudyInfo:
    """Patient / study / equipment attributes shared by every series of an exam (identifying ones marked)."""

    patient_name: str
    patient_id: str
    birth_date: dt.date
    sex: str
    age: int
    weight_kg: float
    height_m: float
    study_uid: str
    frame_uid: str
    study_dt: dt.datetime
    study_id: str
    accession: str
    institution: str
    institution_address: str
    referring: str
    operator: str
    station: str
    device_serial: str
    vendor: str
    patient_position: str
    uid: Callable[..., str] = field(repr=False, default=generate_uid)


def _file_meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def base_dataset(study: StudyInfo, *, sop_class: str, sop_uid: str, modality: str) -> Dataset:
    """Patient, study, equipment and frame-of-reference modules common to every file."""
    manufacturer, model, software = VENDORS[study.vendor]
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop_uid)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = da(study.study_dt)
    ds.StudyTime = tm(study.study_dt)
    ds.AccessionNumber = study.accession
    ds.Modality = modality
    ds.Manufacturer = manufacturer
    ds.InstitutionName = study.institution
    ds.InstitutionAddress = study.institution_address
    ds.ReferringPhysicianName = study.referring
    ds.StationName = study.station
    ds.StudyDescription = "PET^1_PETCT_WB_FDG (Adult)"
    ds.OperatorsName = study.operator
    ds.ManufacturerModelName = model
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = da(study.birth_date)
    ds.PatientSex = study.sex
    ds.PatientAge = f"{study.age:03d}Y"
    ds.PatientSize = ds_str(study.height_m)
    ds.PatientWeight = ds_str(study.weight_kg)
    ds.DeviceSerialNumber = study.device_serial
    ds.SoftwareVersions = software
    ds.PatientPosition = study.patient_position
    ds.StudyInstanceUID = study.study_uid
    ds.StudyID = study.study_id
    ds.FrameOfReferenceUID = study.frame_uid
    ds.PositionReferenceIndicator = ""
    return ds


def _image_pixel(ds: Dataset, arr: np.ndarray, *, bits_stored: int) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(arr.shape[0]), int(arr.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if arr.dtype == np.int16 else 0
    ds.PixelData = np.ascontiguousarray(arr).tobytes()


def write_dataset(ds: Dataset, path: Path, *, transfer_syntax: str = ExplicitVRLittleEndian) -> None:
    """Write one file (compressed with pydicom's encoders when asked) via a temporary name."""
    if transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax, generate_instance_uid=False)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    write_atomic(path, buf.getvalue())


@dataclass
class SeriesSpec:
    """What distinguishes one written series from another of the same exam."""

    series_uid: str
    series_number: int
    description: str
    series_dt: dt.datetime
    transfer_syntax: str = ExplicitVRLittleEndian


def ct_datasets(
    study: StudyInfo,
    spec: SeriesSpec,
    geom: SeriesGeometry,
    hu: np.ndarray,
    *,
    unsigned: bool,
    acq_dt: dt.datetime,
) -> list[Dataset]:
    """One CT Image Storage dataset per slice of ``hu`` (int16 [z, y, x] on ``geom``), instance 1 first-scanned."""
    n = hu.shape[0]
    out = []
    iop = geom.iop()
    for k in range(n):
        instance = n - k  # the scanner numbers slices in table-travel order, opposite to the sorted grid
        ds = base_dataset(study, sop_class=CT_IMAGE_STORAGE, sop_uid=study.uid(spec.series_uid, k), modality="CT")
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SeriesDate, ds.SeriesTime = da(spec.series_dt), tm(spec.series_dt)
        t = acq_dt + dt.timedelta(seconds=0.05 * instance)
        ds.AcquisitionDate, ds.AcquisitionTime = da(t), tm(t)
        ds.ContentDate, ds.ContentTime = da(t), tm(t)
        ds.SeriesDescription = spec.description
        ds.BodyPartExamined = "WHOLEBODY"
        ds.SliceThickness = ds_str(geom.spacing[2])
        ds.KVP = "120"
        ds.DataCollectionDiameter = "500"
        ds.ReconstructionDiameter = ds_str(geom.spacing[0] * geom.size[0])
        ds.GantryDetectorTilt = "0"
        ds.TableHeight = "145"
        ds.RotationDirection = "CW"
        ds.XRayTubeCurrent = 120
        ds.ConvolutionKernel = "Br38f" if study.vendor == "siemens" else ("STANDARD" if study.vendor == "ge" else "B")
        ds.SeriesInstanceUID = spec.series_uid
        ds.SeriesNumber = spec.series_number
        ds.InstanceNumber = instance
        ds.ImagePositionPatient = [ds_str(v) for v in geom.slice_origin(k)]
        ds.ImageOrientationPatient = [ds_str(v) for v in iop]
        ds.SliceLocation = ds_str(geom.slice_origin(k)[2])
        ds.PixelSpacing = [ds_str(geom.spacing[1]), ds_str(geom.spacing[0])]
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.RescaleType = "HU"
        ds.RescaleSlope = "1"
        if unsigned:
            ds.RescaleIntercept = "-1024"
            _image_pixel(ds, (hu[k].astype(np.int32) + 1024).astype(np.uint16), bits_stored=12)
        else:
            ds.RescaleIntercept = "0"
            _image_pixel(ds, hu[k].astype(np.int16), bits_stored=16)
        out.append(ds)
    return out


@dataclass
class PetTiming:
    """Everything the SUV tags are written from."""

    injection_dt: dt.datetime
    scan_start_dt: dt.datetime  # first bed starts; START decay correction refers here
    series_dt: dt.datetime  # SeriesDate/Time as the vendor writes it (GE: later than the scan)
    bed_seconds: float
    dose_bq: float
    decay_correction: str  # START | ADMIN
    write_dose: bool = True


def pet_datasets(
    study: StudyInfo,
    spec: SeriesSpec,
    geom: SeriesGeometry,
    activity: np.ndarray,
    timing: PetTiming,
    *,
    units: str,
    counts_per_bqml: float = 1.0,
    suv_per_bqml: float = 0.0,
    corrected: tuple[str, ...] = ("DECY", "ATTN", "SCAT", "DTIM", "RAN", "NORM"),
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY"),
    bed_length_mm: float = 220.0,
) -> tuple[list[Dataset], np.ndarray]:
    """PET Image Storage datasets of ``activity`` (float Bq/ml [z, y, x] decay-corrected as timing says).

    Each slice is stored as int16 with its own RescaleSlope; returns the datasets and the values a
    reader gets back (stored x slope, in the series' Units: Bq/ml, or counts for CNTS).
    """
    n = activity.shape[0]
    values = activity.astype(np.float64) / counts_per_bqml
    written = np.zeros(activity.shape, dtype=np.float32)
    iop = geom.iop()
    zs = [geom.slice_origin(k)[2] for k in range(n)]
    ztop = max(zs)
    out = []
    for k in range(n):
        instance = n - k
        ds = base_dataset(study, sop_class=PET_IMAGE_STORAGE, sop_uid=study.uid(spec.series_uid, k), modality="PT")
        ds.ImageType = list(image_type)
        # Beds advance from the head end; a slice's acquisition time is its bed's start time.
        bed = int((ztop - zs[k]) // bed_length_mm)
        t = timing.scan_start_dt + dt.timedelta(seconds=bed * timing.bed_seconds)
        _set_pet_times(ds, timing, t, manufacturer=study.vendor)
        _set_pet_slice(ds, spec, geom, k, instance=instance, iop=iop)
        _set_pet_image(ds, timing, t, units=units, corrected=corrected, n_slices=n, instance=instance)
        ds.RadiopharmaceuticalInformationSequence = Sequence([_radiopharmaceutical(timing)])
        stored, slope = _rescale_pet_slice(ds, values[k])
        written[k] = stored.astype(np.float64) * slope
        _set_pet_private(ds, timing, manufacturer=study.vendor, units=units, suv_per_bqml=suv_per_bqml,
                         counts_per_bqml=counts_per_bqml)
        _image_pixel(ds, stored, bits_stored=16)
        out.append(ds)
    return out, written


def _set_pet_times(ds: Dataset, timing: PetTiming, t: dt.datetime, *, manufacturer: str) -> None:
    """Series and content date/time, and the acquisition time ``t`` of the slice's bed."""
    ds.SeriesDate, ds.SeriesTime = da(timing.series_dt), tm(timing.series_dt)
    ds.AcquisitionDate, ds.AcquisitionTime = da(t), tm(t)
    ds.ContentDate, ds.ContentTime = da(timing.series_dt), tm(timing.series_dt)
    if manufacturer == "siemens":
        ds.AcquisitionDateTime = dtm(t)


def _set_pet_slice(ds: Dataset, spec: SeriesSpec, geom: SeriesGeometry, k: int, *, instance: int,
                   iop: list[float]) -> None:
    """The series and the position of slice ``k`` on ``geom``."""
    origin = geom.slice_origin(k)
    ds.SeriesDescription = spec.description
    ds.BodyPartExamined = "WHOLEBODY"
    ds.SliceThickness = ds_str(geom.spacing[2])
    ds.SeriesInstanceUID = spec.series_uid
    ds.SeriesNumber = spec.series_number
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [ds_str(v) for v in origin]
    ds.ImageOrientationPatient = [ds_str(v) for v in iop]
    ds.SliceLocation = ds_str(origin[2])
    ds.PixelSpacing = [ds_str(geom.spacing[1]), ds_str(geom.spacing[0])]


def _set_pet_image(ds: Dataset, timing: PetTiming, t: dt.datetime, *, units: str, corrected: tuple[str, ...],
                   n_slices: int, instance: int) -> None:
    """The PET Series and PET Image modules: units, corrections, frame timing and decay factor."""
    ds.SeriesType = ["WHOLE BODY", "IMAGE"]
    ds.Units = units
    ds.CountsSource = "EMISSION"
    ds.NumberOfSlices = n_slices
    ds.ImageIndex = instance
    ds.CorrectedImage = list(corrected)
    ds.DecayCorrection = timing.decay_correction
    ds.RandomsCorrectionMethod = "DLYD"
    ds.AttenuationCorrectionMethod = "CT" if "ATTN" in corrected else "NONE"
    ds.ReconstructionMethod = "OSEM3D 4i5s"
    ds.ActualFrameDuration = int(timing.bed_seconds * 1000)
    ref = timing.scan_start_dt if timing.decay_correction == "START" else timing.injection_dt
    ds.FrameReferenceTime = ds_str((t - timing.scan_start_dt).total_seconds() * 1000)
    ds.DecayFactor = ds_str(2 ** ((t - ref).total_seconds() / F18_HALF_LIFE_S))
    ds.DoseCalibrationFactor = "1"
    ds.SliceSensitivityFactor = "1"


def _radiopharmaceutical(timing: PetTiming) -> Dataset:
    """The PET Isotope module's item: FDG, injection time, dose (unless withheld) and F-18 half-life."""
    radio = Dataset()
    radio.Radiopharmaceutical = "Fluorodeoxyglucose"
    radio.RadiopharmaceuticalStartTime = tm(timing.injection_dt)
    radio.RadiopharmaceuticalStartDateTime = dtm(timing.injection_dt)
    if timing.write_dose:
        radio.RadionuclideTotalDose = ds_str(timing.dose_bq)
    radio.RadionuclideHalfLife = ds_str(F18_HALF_LIFE_S)
    radio.RadionuclidePositronFraction = "0.9673"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "C-111A1", "SRT", "^18^Fluorine"
    radio.RadionuclideCodeSequence = Sequence([code])
    drug = Dataset()
    drug.CodeValue, drug.CodingSchemeDesignator, drug.CodeMeaning = "C-B1031", "SRT", "Fluorodeoxyglucose F^18^"
    radio.RadiopharmaceuticalCodeSequence = Sequence([drug])
    return radio


def _rescale_pet_slice(ds: Dataset, values: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-slice rescale: the slice maximum maps to 32767; returns the stored int16 values and the slope."""
    peak = float(values.max())
    slope_s = ds_str(peak / 32767.0 if peak > 0 else 1.0)
    slope = float(slope_s)
    stored = np.clip(np.rint(values / slope), -32768, 32767).astype(np.int16)
    ds.RescaleSlope = slope_s
    ds.RescaleIntercept = "0"
    ds.LargestImagePixelValue = int(stored.max())
    ds["LargestImagePixelValue"].VR = "SS"
    return stored, slope


def _set_pet_private(ds: Dataset, timing: PetTiming, *, manufacturer: str, units: str, suv_per_bqml: float,
                     counts_per_bqml: float) -> None:
    """Vendor private tags: Philips' SUV and Bq/ml scale factors (CNTS), GE's scan date-time."""
    if manufacturer == "philips" and units == "CNTS":
        block = ds.private_block(0x7053, PHILIPS_CREATOR, create=True)
        block.add_new(0x00, "DS", ds_str(suv_per_bqml * counts_per_bqml))
        block.add_new(0x09, "DS", ds_str(counts_per_bqml))
    if manufacturer == "ge":
        block = ds.private_block(0x0009, GE_CREATOR, create=True)
        block.add_new(0x0D, "DT", dtm(timing.scan_start_dt))  # GE's scan date-time (the decay reference)


def localizer_dataset(
    study: StudyInfo, spec: SeriesSpec, image: np.ndarray, *, origin: list[float], spacing_rc: tuple[float, float]
) -> Dataset:
    """A coronal scout (CT Image Storage, ImageType LOCALIZER): rows run head to feet, columns right to left."""
    ds = base_dataset(study, sop_class=CT_IMAGE_STORAGE, sop_uid=study.uid(spec.series_uid, 0), modality="CT")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.SeriesDate, ds.SeriesTime = da(spec.series_dt), tm(spec.series_dt)
    ds.AcquisitionDate, ds.AcquisitionTime = da(spec.series_dt), tm(spec.series_dt)
    ds.SeriesDescription = spec.description
    ds.SeriesInstanceUID = spec.series_uid
    ds.SeriesNumber = spec.series_number
    ds.InstanceNumber = 1
    ds.KVP = "120"
    ds.ImagePositionPatient = [ds_str(v) for v in origin]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
    ds.PixelSpacing = [ds_str(spacing_rc[0]), ds_str(spacing_rc[1])]
    ds.SliceThickness = "1"
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
    _image_pixel(ds, image.astype(np.int16), bits_stored=16)
    return ds


def seg_dataset(
    study: StudyInfo, ct: list[Dataset], mask: np.ndarray, *, series_uid: str, series_dt: dt.datetime
) -> Dataset:
    """A binary DICOM SEG (highdicom) of ``mask`` (uint8 [z, y, x]) referencing the CT slices ``ct`` (same order)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    manufacturer, model, software = VENDORS[study.vendor]
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="lymphoma lesion",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=ct,
        pixel_array=mask.astype(bool),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=series_uid,
        series_number=90,
        sop_instance_uid=study.uid(series_uid, 0),
        instance_number=1,
        manufacturer="LymphAtlas synthetic annotation",
        manufacturer_model_name="manual contouring",
        software_versions="1",
        device_serial_number=study.device_serial,
        series_description="Lesion segmentation",
        content_label="LESIONS",
    )
    # highdicom stamps the wall clock and random UIDs: pin them so the same seed gives the same bytes.
    for kw in ("ContentDate", "SeriesDate", "InstanceCreationDate"):
        if kw in seg:
            setattr(seg, kw, da(series_dt))
    for kw in ("ContentTime", "SeriesTime", "InstanceCreationTime"):
        if kw in seg:
            setattr(seg, kw, tm(series_dt))
    for item in seg.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = dtm(series_dt)
    dim_uid = study.uid(series_uid, "dimension-organization")
    for item in seg.get("DimensionOrganizationSequence", []):
        item.DimensionOrganizationUID = dim_uid
    for item in seg.get("DimensionIndexSequence", []):
        item.DimensionOrganizationUID = dim_uid
    return seg

