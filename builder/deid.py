"""De-identification: pseudonymous ids, banded ages, relative dates, scrubbed metadata.

* ``case_id`` / ``subject_id`` are keyed hashes (HMAC-SHA256) of the exam's StudyInstanceUID and
  the patient id, with a secret key kept in ``WORK/private/deid.key``. The same key gives the same
  ids on every run and every release; without the key the ids cannot be recomputed from the
  original identifiers (a plain hash could be, by hashing a list of candidate patient ids).
  Keep the key with ``WORK/private/id_map.csv``; both stay with the maintainers.
* Ages are published in bands of ``schema.AGE_BAND_YEARS`` (90 and over in one band, as in
  HIPAA Safe Harbor); dates only as days from the patient's first exam.
* Metadata copied from DICOM into ``case.json`` loses every attribute that DICOM PS3.15 Annex E's
  basic confidentiality profile lists as identifying (names, ids, dates and times, UIDs,
  institution, station, operators, device serial numbers, descriptions, free text, weight...).
* :func:`find_identifiers` is the last line of defence: before a case folder is committed, its
  names, JSON and decompressed NIfTI headers are searched for the exam's own identifiers.

Example:
    >>> key = b"k" * 32
    >>> make_case_id(key, "1.2.3.4") == make_case_id(key, "1.2.3.4")
    True
    >>> make_case_id(key, "1.2.3.4").startswith("LA-")
    True
    >>> age_band(47)
    '45-49'
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import logging
import os
import re
import secrets
from pathlib import Path

from lymphatlas_ds.schema import AGE_BAND_YEARS

logger = logging.getLogger(__name__)

KEY_FILE = "deid.key"
CASE_PREFIX = "LA"
SUBJECT_PREFIX = "LP"
ID_HEX_DIGITS = 8
AGE_TOP_BAND = 90
"""Ages at or above this are published as one band ("90+")."""

# DICOM PS3.15 Annex E (basic application level confidentiality profile) attributes, as the
# snake_case keys that builder.read / builder.suv use, plus the word fragments that catch
# variants (``*_date``, ``*_time``, ``*_uid``...). Anything matching is dropped from case.json.
PS315_KEYS = frozenset(
    {
        "patient_name", "patient_id", "patient_birth_date", "patient_birth_time", "patient_sex",
        "patient_age", "patient_weight", "patient_size", "patient_address", "other_patient_ids",
        "weight_kg", "accession_number", "institution_name", "institution_address",
        "institutional_department_name", "station_name", "device_serial_number", "operators_name",
        "performing_physician_name", "referring_physician_name", "requesting_physician",
        "physicians_of_record", "study_id", "study_description", "series_description",
        "protocol_name", "request_attributes_sequence", "image_comments", "additional_patient_history",
        "patient_comments", "derivation_description", "description", "notes",
        "frame_of_reference_uid", "study_uid", "series_uid", "sop_instance_uid", "files", "path", "paths",
    }
)
_IDENTIFYING_PARTS = re.compile(r"(^|_)(date|time|datetime|uid|uids|name|names|address|serial|comments?)($|_)")
# Keys that end in a word above but carry no identity (durations, technical values).
_ALLOWED = frozenset({"decay_time_s", "time_reference", "half_life_s", "acquisition_duration_s", "frame_duration_ms"})


def load_or_create_key(private_dir: Path) -> bytes:
    """The maintainers' secret de-identification key (created once, 32 random bytes).

    Example:
        >>> key = load_or_create_key(work / "private")  # doctest: +SKIP
    """
    private_dir.mkdir(parents=True, exist_ok=True)
    path = private_dir / KEY_FILE
    if path.exists():
        key = bytes.fromhex(path.read_text().strip())
        if len(key) < 16:
            from builder.errors import ExamError

            raise ExamError(f"{path} holds a key shorter than 16 bytes; restore the original key file", stage="deid")
        return key
    key = secrets.token_bytes(32)
    tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    try:
        # link() fails if another process created the key meanwhile: keep theirs
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("created a new de-identification key in %s: keep it with id_map.csv, it fixes every case id", path)
    return bytes.fromhex(path.read_text().strip())


def _keyed(key: bytes, kind: str, value: str, prefix: str) -> str:
    digest = hmac.new(key, f"{kind}\x00{value}".encode(), hashlib.sha256).hexdigest()
    return f"{prefix}-{digest[:ID_HEX_DIGITS]}"


def make_case_id(key: bytes, study_uid: str) -> str:
    """Pseudonymous, stable case id of one exam (its StudyInstanceUID)."""
    return _keyed(key, "case", study_uid, CASE_PREFIX)


def make_subject_id(key: bytes, patient_id: str) -> str:
    """Pseudonymous, stable subject id of one patient (the hospital's patient id)."""
    return _keyed(key, "subject", patient_id, SUBJECT_PREFIX)


def age_band(age: int | float | None, *, width: int = AGE_BAND_YEARS) -> str | None:
    """The published age band, e.g. ``45-49``; ``90+`` at and above AGE_TOP_BAND.

    Example:
        >>> age_band(90), age_band(3), age_band(None)
        ('90+', '0-4', None)
    """
    if age is None:
        return None
    age = int(age)
    if age >= AGE_TOP_BAND:
        return f"{AGE_TOP_BAND}+"
    lo = (age // width) * width
    return f"{lo}-{lo + width - 1}"


def scrub(metadata: dict) -> dict:
    """A copy of ``metadata`` without the attributes DICOM PS3.15 counts as identifying (recursive).

    Example:
        >>> scrub({"manufacturer": "GE", "study_uid": "1.2", "series_date": "20200101", "decay_time_s": 3600.0})
        {'manufacturer': 'GE', 'decay_time_s': 3600.0}
    """
    out = {}
    for key, value in metadata.items():
        k = str(key).lower()
        if k not in _ALLOWED and (k in PS315_KEYS or _IDENTIFYING_PARTS.search(k)):
            continue
        out[key] = scrub(value) if isinstance(value, dict) else value
    return out


def nifti_header_text(path: Path) -> bytes:
    """The header (and extensions) of a NIfTI-1 file, ``.nii`` or ``.nii.gz``, as raw bytes."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        head = f.read(352)
        if len(head) < 352:
            return head
        vox_offset = int(float(__import__("struct").unpack("<f", head[108:112])[0]))
        if vox_offset > 352:
            head += f.read(vox_offset - 352)
    return head


def find_identifiers(folder: Path, identifiers: list[str]) -> list[str]:
    """Where any of ``identifiers`` (case-insensitive) appears in ``folder``: file and folder names,
    text files (JSON, CSV), and decompressed NIfTI headers with their extensions. Empty when clean.

    Example:
        >>> find_identifiers(case_dir, ["PAT0001", "1.2.840.99"])  # doctest: +SKIP
        []
    """
    needles = [s.lower() for s in identifiers if s and len(s) >= 3]
    hits = []
    for path in sorted([folder, *folder.rglob("*")]):
        name = path.name.lower()
        for n in needles:
            if n in name:
                hits.append(f"name {path.name!r} contains {n!r}")
        if not path.is_file():
            continue
        if path.name.endswith((".nii", ".nii.gz")):
            data = nifti_header_text(path)
        elif path.suffix in (".json", ".csv", ".txt", ".md"):
            data = path.read_bytes()
        else:
            continue
        low = data.lower()
        for n in needles:
            if n.encode() in low:
                hits.append(f"{path.name} contains {n!r}")
    return hits
