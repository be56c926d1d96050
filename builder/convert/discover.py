"""Discovery: find an exam's DICOM files, group them into series, classify them, pick the CT/PET pair.

An exam folder (``dicom/<exam_id>/``) may nest files at any depth under any names and hold
other series (scouts, non-attenuation-corrected PET, MIPs, SEG, RTSTRUCT, reports). Discovery reads
headers only (no pixel data), groups by study and series instance UID, classifies each series
(:class:`SeriesKind`) and picks the pair: the attenuation-corrected PET and, in the same study and
frame of reference, the axial CT volume with the most slices.

Example:
    >>> exam = discover_exam(Path("source/dicom/EX0001"), "EX0001")  # doctest: +SKIP
    >>> exam.ct.kind, len(exam.ct.files), exam.pet.kind  # doctest: +SKIP
    (<SeriesKind.CT_VOLUME: 'ct_volume'>, 312, <SeriesKind.PET_AC: 'pet_ac'>)
"""

from __future__ import annotations

import enum
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from builder.convert._dicom import NotDicomError, multi, read_header, text
from builder.errors import DiscoveryError, ReadError

logger = logging.getLogger(__name__)

# Only what classification and pairing need: reading these stops long before the pixel data.
_DISCOVERY_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "Modality",
    "ImageType",
    "CorrectedImage",
    "SeriesDescription",
    "ImageOrientationPatient",
    "NumberOfFrames",
]

# Storage SOP classes of localizer-like or non-volume objects that share Modality CT / PT.
_SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
_NAC_WORDS = ("NAC", "NOAC", "NON AC", "NON-AC", "UNCORR", "NO AC", "NOATTN")


class SeriesKind(str, enum.Enum):
    """What a series is, as far as the builder cares."""

    CT_VOLUME = "ct_volume"  # axial CT image series
    CT_LOCALIZER = "ct_localizer"  # scout / topogram / surview
    PET_AC = "pet_ac"  # attenuation-corrected PET
    PET_NAC = "pet_nac"  # PET without attenuation correction
    SEG = "seg"
    RTSTRUCT = "rtstruct"
    OTHER = "other"


@dataclass
class SeriesInfo:
    """One series of an exam, from its headers. ``description`` is for logs and errors only, never published."""

    series_uid: str
    study_uid: str
    frame_of_reference_uid: str | None
    modality: str
    kind: SeriesKind
    files: list[Path]
    description: str = ""
    image_type: tuple[str, ...] = ()

    @property
    def n_files(self) -> int:
        return len(self.files)

    def summary(self) -> str:
        """One line for error messages: kind, modality, file count, description, UID."""
        desc = f" '{self.description}'" if self.description else ""
        return f"{self.kind.value} ({self.modality}, {self.n_files} files{desc}, series {self.series_uid})"


@dataclass
class ExamSeries:
    """The series chosen for one exam (``ct``, ``pet``, optional ``seg``) and every series found."""

    exam_id: str
    ct: SeriesInfo
    pet: SeriesInfo
    seg: SeriesInfo | None = None
    series: list[SeriesInfo] = field(default_factory=list)
    skipped_files: list[Path] = field(default_factory=list)

    @property
    def ignored(self) -> list[SeriesInfo]:
        """Every series that was found but not chosen."""
        chosen = {self.ct.series_uid, self.pet.series_uid} | ({self.seg.series_uid} if self.seg else set())
        return [s for s in self.series if s.series_uid not in chosen]


def _is_axial(orientation: tuple[float, ...] | None) -> bool:
    """True when the slice normal is closer to the patient's feet-head axis than to any other."""
    if orientation is None or len(orientation) != 6:
        return False
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    return int(np.argmax(np.abs(normal))) == 2


def _classify(modality: str, image_type: tuple[str, ...], corrected: tuple[str, ...], description: str,
              orientation: tuple[float, ...] | None, sop_class: str) -> SeriesKind:
    if modality == "SEG":
        return SeriesKind.SEG
    if modality == "RTSTRUCT":
        return SeriesKind.RTSTRUCT
    if sop_class.startswith(_SECONDARY_CAPTURE_PREFIX):
        return SeriesKind.OTHER
    # ImageType value 3 names what the image is (AXIAL, LOCALIZER, MIP, REPROJECTION ...).
    if modality == "CT":
        if "LOCALIZER" in image_type or "SCOUT" in image_type or "TOPOGRAM" in image_type:
            return SeriesKind.CT_LOCALIZER
        if not _is_axial(orientation):
            return SeriesKind.OTHER
        if any(word in image_type for word in ("MIP", "REPROJECTION", "PROJECTION IMAGE")):
            return SeriesKind.OTHER
        return SeriesKind.CT_VOLUME
    if modality == "PT":
        if any(word in image_type for word in ("MIP", "REPROJECTION", "PROJECTION IMAGE")):
            return SeriesKind.OTHER
        if not _is_axial(orientation):
            return SeriesKind.OTHER
        if corrected:
            return SeriesKind.PET_AC if "ATTN" in corrected else SeriesKind.PET_NAC
        # CorrectedImage is Type 2: some exports leave it empty; the description is all that is left.
        upper = description.upper()
        if any(word in upper.replace("_", " ") for word in _NAC_WORDS):
            return SeriesKind.PET_NAC
        logger.warning("PET series '%s' has no CorrectedImage; taken as attenuation-corrected", description)
        return SeriesKind.PET_AC
    return SeriesKind.OTHER


def _iter_files(exam_dir: Path) -> list[Path]:
    found: list[Path] = []
    for root, dirs, files in os.walk(exam_dir):
        dirs.sort()  # deterministic walk order
        for name in sorted(files):
            found.append(Path(root) / name)
    return found


def _discovery_header(path: Path, exam_id: str) -> Dataset | None:
    """The header fields discovery needs, or None when the file is not DICOM (logged, skipped)."""
    try:
        return read_header(path, _DISCOVERY_TAGS)
    except NotDicomError:
        logger.info("exam %s: %s is not a DICOM file; ignored", exam_id, path)
        return None
    except Exception as e:  # pydicom raises many types for damaged files
        raise ReadError(
            f"the file is corrupt or truncated and its DICOM header cannot be read ({type(e).__name__}: {e}); "
            "re-export it from the PACS or remove it from the exam folder",
            exam_id=exam_id,
            path=path,
        ) from e


def _series_uid(ds: Dataset, path: Path, exam_id: str) -> str | None:
    """The file's SeriesInstanceUID, or None for a DICOM object without a series (DICOMDIR ...; logged, skipped)."""
    series_uid = text(ds, "SeriesInstanceUID")
    if series_uid is None:
        media_class = str(getattr(ds.get("file_meta"), "MediaStorageSOPClassUID", "") or "")
        if media_class == _DICOMDIR_CLASS or text(ds, "SOPClassUID") is not None:
            logger.info("exam %s: %s is a DICOM object without a series (e.g. DICOMDIR); ignored", exam_id, path)
            return None
        # No SOP class and no series: pydicom stopped early because the file ends inside its header.
        raise ReadError(
            "the file is corrupt or truncated: its DICOM header ends before the SOP class and series UIDs; "
            "re-export it from the PACS or remove it from the exam folder",
            exam_id=exam_id,
            path=path,
        )
    return series_uid


def _series_fields(ds: Dataset) -> dict:
    """The series-level fields that classification and :class:`SeriesInfo` need, from one of its files."""
    iop = ds.get("ImageOrientationPatient")
    return {
        "study_uid": text(ds, "StudyInstanceUID") or "",
        "for_uid": text(ds, "FrameOfReferenceUID"),
        "modality": (text(ds, "Modality") or "").upper(),
        "image_type": multi(ds, "ImageType"),
        "corrected": multi(ds, "CorrectedImage"),
        "description": text(ds, "SeriesDescription") or "",
        "orientation": tuple(float(v) for v in iop) if iop is not None and len(iop) == 6 else None,
        "sop_class": text(ds, "SOPClassUID") or "",
        "frames": int(ds.get("NumberOfFrames") or 1),
    }


def _series_info(uid: str, g: dict, files: list[Path]) -> SeriesInfo:
    """One classified series from its fields and files."""
    kind = _classify(g["modality"], g["image_type"], g["corrected"], g["description"], g["orientation"],
                     g["sop_class"])
    return SeriesInfo(
        series_uid=uid,
        study_uid=g["study_uid"],
        frame_of_reference_uid=g["for_uid"],
        modality=g["modality"],
        kind=kind,
        files=files,
        description=g["description"],
        image_type=g["image_type"],
    )


def scan_series(exam_dir: Path, exam_id: str) -> tuple[list[SeriesInfo], list[Path]]:
    """Group every DICOM file under ``exam_dir`` into classified series (no choice made).

    Returns:
        (series sorted by study, kind and UID; files skipped because they are not DICOM).

    Raises:
        DiscoveryError: the folder does not exist or holds no DICOM file.
        ReadError: a file looks like DICOM but its header cannot be parsed (corrupt or truncated).
    """
    exam_dir = Path(exam_dir)
    if not exam_dir.is_dir():
        raise DiscoveryError(
            f"exam folder {exam_dir} not found; the source needs dicom/<exam_id>/ with the exam's DICOM files",
            exam_id=exam_id,
        )
    groups: dict[str, dict] = {}
    files_by_series: dict[str, list[Path]] = defaultdict(list)
    seen_sop: dict[str, Path] = {}
    skipped: list[Path] = []
    for path in _iter_files(exam_dir):
        ds = _discovery_header(path, exam_id)
        series_uid = _series_uid(ds, path, exam_id) if ds is not None else None
        if series_uid is None:
            skipped.append(path)
            continue
        sop = text(ds, "SOPInstanceUID")
        if sop is not None:
            if sop in seen_sop:
                # The same instance exported twice (two folders of one PACS export): one copy is enough.
                logger.warning("exam %s: %s is a second copy of instance in %s; ignored", exam_id, path, seen_sop[sop])
                skipped.append(path)
                continue
            seen_sop[sop] = path
        files_by_series[series_uid].append(path)
        if series_uid not in groups:
            groups[series_uid] = _series_fields(ds)
    if not groups:
        raise DiscoveryError(
            f"no DICOM file found under {exam_dir} ({len(skipped)} other files); check the export",
            exam_id=exam_id,
        )
    series = [_series_info(uid, g, files_by_series[uid]) for uid, g in groups.items()]
    series.sort(key=lambda s: (s.study_uid, s.kind.value, s.series_uid))
    return series, skipped


def _listing(series: list[SeriesInfo]) -> str:
    return "; ".join(s.summary() for s in series) or "nothing"


def _choose_pet(series: list[SeriesInfo], found: str, exam_id: str) -> SeriesInfo:
    """The one attenuation-corrected PET series; rejects none or several."""
    pets = [s for s in series if s.kind is SeriesKind.PET_AC]
    if not pets:
        raise DiscoveryError(
            f"no attenuation-corrected PET series found (found: {found}); the exam needs one; "
            "re-export it with the corrected PET",
            exam_id=exam_id,
        )
    if len(pets) > 1:
        raise DiscoveryError(
            f"{len(pets)} attenuation-corrected PET series found ({_listing(pets)}); keep only the one to use "
            "in the exam folder",
            exam_id=exam_id,
        )
    return pets[0]


def _choose_ct(series: list[SeriesInfo], pet: SeriesInfo, found: str, exam_id: str) -> SeriesInfo:
    """The axial CT volume with the most slices in the PET's study and frame of reference; rejects a tie."""
    cts = [s for s in series if s.kind is SeriesKind.CT_VOLUME]
    if not cts:
        raise DiscoveryError(
            f"no axial CT volume found (found: {found}); the exam needs the CT of the PET/CT",
            exam_id=exam_id,
        )
    same_study = [s for s in cts if s.study_uid == pet.study_uid]
    if not same_study:
        raise DiscoveryError(
            f"no CT volume in the PET's study (PET: {pet.summary()}; CTs: {_listing(cts)}); "
            "the CT and the PET must come from one PET/CT study",
            exam_id=exam_id,
        )
    same_frame = [s for s in same_study if s.frame_of_reference_uid == pet.frame_of_reference_uid]
    if not same_frame:
        raise DiscoveryError(
            f"the CT and the PET are in different frames of reference (PET {pet.frame_of_reference_uid}; "
            f"CTs: {', '.join(f'{s.series_uid} in {s.frame_of_reference_uid}' for s in same_study)}); "
            "their positions cannot be compared; export the PET/CT pair of one acquisition",
            exam_id=exam_id,
        )
    same_frame.sort(key=lambda s: -s.n_files)
    if len(same_frame) > 1 and same_frame[0].n_files == same_frame[1].n_files:
        raise DiscoveryError(
            f"two candidate CT volumes with {same_frame[0].n_files} slices each ({_listing(same_frame[:2])}); "
            "remove the one not to use from the exam folder",
            exam_id=exam_id,
        )
    return same_frame[0]


def _choose_seg(series: list[SeriesInfo], pet: SeriesInfo, exam_id: str) -> SeriesInfo | None:
    """The SEG series of the PET's study when there is exactly one (several: none chosen, logged)."""
    segs = [s for s in series if s.kind is SeriesKind.SEG and s.study_uid == pet.study_uid]
    seg = segs[0] if len(segs) == 1 else None
    if len(segs) > 1:
        logger.warning("exam %s: %d SEG series found; none chosen (%s)", exam_id, len(segs), _listing(segs))
    return seg


def discover_exam(exam_dir: Path, exam_id: str) -> ExamSeries:
    """Find and classify an exam's series and choose the CT/PET pair.

    The PET is the one attenuation-corrected PET series; the CT is the axial CT volume with the
    most slices in the PET's study and frame of reference. Localizers, non-corrected PET,
    projections and other objects are kept in ``series`` but not chosen.

    Example:
        >>> exam = discover_exam(Path("source/dicom/EX0001"), "EX0001")  # doctest: +SKIP
        >>> [s.kind.value for s in exam.ignored]  # doctest: +SKIP
        ['ct_localizer', 'pet_nac']

    Raises:
        DiscoveryError: no or several corrected PET series, no CT, two equally good CTs, or
            CT and PET in different studies / frames of reference; the message lists what was found.
        ReadError: a DICOM file's header is unreadable (named by path).
    """
    series, skipped = scan_series(exam_dir, exam_id)
    found = _listing(series)
    pet = _choose_pet(series, found, exam_id)
    ct = _choose_ct(series, pet, found, exam_id)
    seg = _choose_seg(series, pet, exam_id)
    for s in series:
        if s is not ct and s is not pet and s is not seg:
            logger.debug("exam %s: ignored %s", exam_id, s.summary())
    return ExamSeries(exam_id=exam_id, ct=ct, pet=pet, seg=seg, series=series, skipped_files=skipped)
