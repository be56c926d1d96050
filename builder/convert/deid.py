"""De-identification: pseudonymous ids, banded ages, relative dates, scrubbed metadata.

* ``case_id`` / ``subject_id`` are keyed hashes (HMAC-SHA256) of the exam's StudyInstanceUID and
  the patient id, with a secret key kept in ``WORK/private/deid.key``. The same key gives the same
  ids on every run and every release; without the key the ids cannot be recomputed from the
  original identifiers (a plain hash could be, by hashing a list of candidate patient ids).
  Keep the key with ``WORK/private/id_map.csv``; both stay with the maintainers, and back it up:
  :func:`work_key` never replaces a lost key of a WORK that holds ids made with it.
* Ages are published in bands of ``schema.AGE_BAND_YEARS`` (90 and over in one band, as in
  HIPAA Safe Harbor); dates only as days from the patient's first exam.
* Metadata copied from DICOM into ``case.json`` loses every attribute that DICOM PS3.15 Annex E's
  basic confidentiality profile lists as identifying (names, ids, dates and times, UIDs,
  institution, station, operators, device serial numbers, descriptions, free text, weight...).
* :func:`find_identifiers` is the last line of defence: before a case folder is committed, its
  names, JSON values (not the project's own keys and codes, :data:`CODED_VALUES`) and decompressed
  NIfTI headers are searched for the exam's own identifiers, each
  matched as a whole token (not inside a longer word or number) of at least
  ``MIN_IDENTIFIER_CHARS`` characters (``MIN_IDENTIFIER_DIGITS`` for all-digit values). Values
  equal to the scanner's equipment strings (Manufacturer, ManufacturerModelName), and a
  StationName that is a prefix or word of them ("BIOGRAPH" for "Biograph Vision 600"), are
  equipment, not identity, and are not searched. A hit names the attribute and the file.
* ``WORK/private`` (the key and id_map.csv) is owner-only: the folder 0700, its files 0600,
  whatever the umask, and looser modes left by an older run are tightened
  (:func:`secure_private_dir`).

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
import stat
from collections.abc import Iterable
from pathlib import Path

from lymphatlas_ds.schema import AGE_BAND_YEARS

logger = logging.getLogger(__name__)

KEY_FILE = "deid.key"
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
"""Modes of ``WORK/private`` and of its files (the key, id_map.csv): the owner only."""
MAINTAINERS_FILE_MODE = 0o640
"""Mode of WORK's files that name exams and why they failed (failures.json, the QC report's index):
the owner and the maintainers' group, nobody else. They carry no identifying value (only keyed hashes)."""
MIN_IDENTIFIER_CHARS = 4
"""Shorter identifying values (a two-letter name part) are not searched: as whole tokens they
would match ordinary words of the case folder, and they identify nobody on their own."""
MIN_IDENTIFIER_DIGITS = 6
"""All-digit values (StudyID, short accession numbers) need this many digits to be searched, so a
voxel count or a statistic that happens to equal a four-digit StudyID is no leak."""
GUARDED_KEYWORDS = (
    "PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate", "PatientAddress", "AccessionNumber",
    "InstitutionName", "InstitutionAddress", "ReferringPhysicianName", "PerformingPhysicianName",
    "OperatorsName", "StationName", "DeviceSerialNumber", "StudyID", "StudyInstanceUID",
    "SeriesInstanceUID", "FrameOfReferenceUID", "RequestingPhysician", "PatientComments",
)
"""DICOM PS3.15 attributes whose values in an exam's headers must not appear in its case folder."""
EQUIPMENT_KEYWORDS = ("Manufacturer", "ManufacturerModelName")
"""Attributes that describe the scanner; case.json publishes them (``ct.manufacturer``, ``ct.model``)."""
CASE_PREFIX = "LA"
SUBJECT_PREFIX = "LP"
ID_HEX_DIGITS = 8
AGE_TOP_BAND = 90
"""Ages at or above this are published as one band ("90+")."""

# DICOM PS3.15 Annex E (basic application level confidentiality profile) attributes, as the
# snake_case keys that builder.convert.read / builder.convert.suv use, plus the word fragments that catch
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


def work_has_identities(work: Path) -> list[str]:
    """What in ``work`` was derived with its key: ``private/id_map.csv`` and case folders under ``cases/``.

    Empty for an empty (or new) WORK. Folders whose name starts with ``.`` are temporary, not cases.
    """
    work = Path(work)
    found = []
    id_map = work / "private" / "id_map.csv"
    if id_map.is_file():
        found.append(str(id_map))
    cases = work / "cases"
    if cases.is_dir():
        n = sum(1 for p in cases.iterdir() if p.is_dir() and not p.name.startswith("."))
        if n:
            found.append(f"{n} case folder(s) in {cases}")
    return found


def work_key(work: Path, *, new_key: bool = False) -> bytes:
    """WORK's de-identification key; a new one only for a WORK that holds no identities yet.

    * the key file exists: it is read (``new_key`` is then refused: WORK is not empty);
    * no key and WORK holds an id_map.csv or case folders (:func:`work_has_identities`): a hard
      error naming the key file and the backup to restore it from; nothing is created, since a
      new key would give every exam a new case id and every patient a new subject id;
    * no key and nothing derived from one: a new key is created (the first convert of a WORK, or
      an explicit ``new_key``).

    Raises :class:`~builder.errors.KeyFileError`.

    Example:
        >>> key = work_key(Path("work"))  # doctest: +SKIP
    """
    from builder.errors import KeyFileError

    work = Path(work)
    private_dir = work / "private"
    path = private_dir / KEY_FILE
    derived = work_has_identities(work)
    if new_key and (path.exists() or derived):
        what = ", ".join(([str(path)] if path.exists() else []) + derived)
        raise KeyFileError(f"--new-key is only for an empty WORK, and {work} already holds {what}; a new key "
                           "would change every case id and subject id. Leave out --new-key (the existing key is "
                           "used), or give an empty WORK folder", path=path)
    if not path.exists() and derived:
        raise KeyFileError(
            f"the de-identification key {path} is missing, but {work} holds {', '.join(derived)} made with it. "
            f"Restore {KEY_FILE} from the maintainers' backup into {private_dir} (0600) and run again; nothing "
            "was written. Without the original key every case id and subject id would change (a patient could "
            "move between splits). Only if the key is truly lost: convert into a new, empty WORK with --new-key "
            "and publish it as a new dataset lineage", path=path)
    return load_or_create_key(private_dir)


def load_or_create_key(private_dir: Path) -> bytes:
    """The maintainers' secret de-identification key (created once, 32 random bytes).

    Use :func:`work_key`, which refuses to create a key for a WORK whose ids came from a lost one.

    Example:
        >>> key = load_or_create_key(work / "private")  # doctest: +SKIP
    """
    from builder.errors import KeyFileError

    secure_private_dir(private_dir)
    path = private_dir / KEY_FILE
    if path.exists():
        try:
            key = bytes.fromhex(path.read_text().strip())
        except (ValueError, UnicodeDecodeError):
            key = b""
        if len(key) < 16:
            raise KeyFileError(f"{path} is not a key of at least 16 bytes written as hex digits (damaged or "
                               "truncated); restore the original key file from the maintainers' backup", path=path)
        return key
    key = secrets.token_bytes(32)
    tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE_MODE)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), PRIVATE_FILE_MODE)  # an existing tmp keeps its mode through O_CREAT
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


def secure_private_dir(private_dir: Path) -> Path:
    """Create ``private_dir`` owner-only (0700) and make every file in it owner-only (0600).

    Whatever the umask, and also when the folder or its files exist from an earlier run with
    looser modes. Returns the folder.

    Example:
        >>> secure_private_dir(work / "private")  # doctest: +SKIP
        PosixPath('work/private')
    """
    private_dir = Path(private_dir)
    private_dir.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    if private_dir.stat().st_mode & 0o777 != PRIVATE_DIR_MODE:
        os.chmod(private_dir, PRIVATE_DIR_MODE)
    for path in private_dir.iterdir():
        st = path.lstat()
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o777 != PRIVATE_FILE_MODE:
            os.chmod(path, PRIVATE_FILE_MODE)
            logger.info("made %s owner-only (it was %o)", path, st.st_mode & 0o777)
    return private_dir


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


def header_identifiers(paths: Iterable[Path]) -> tuple[list[tuple[str, str]], list[str]]:
    """``([(attribute, value), ...], equipment strings)`` of DICOM headers, for the final leak check.

    The first list holds the values of :data:`GUARDED_KEYWORDS` (each component of a person name
    too); the second the values of :data:`EQUIPMENT_KEYWORDS`. Unreadable files are skipped (the
    readers have reported them already).
    """
    import pydicom

    identifiers: list[tuple[str, str]] = []
    equipment: list[str] = []
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - the readers already reported unreadable files
            continue
        for kw in (*GUARDED_KEYWORDS, *EQUIPMENT_KEYWORDS):
            value = ds.get(kw)
            if value is None or value == "":
                continue
            values = value if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]
            for v in values:
                text = str(v).strip()
                if not text:
                    continue
                if kw in EQUIPMENT_KEYWORDS:
                    equipment.append(text)
                    continue
                identifiers.append((kw, text))
                if "^" in text:  # person names: each component too
                    identifiers.extend((kw, p.strip()) for p in text.split("^") if p.strip())
    return identifiers, equipment


def _searchable(value: str) -> bool:
    core = value.strip()
    if core.isdigit():
        return len(core) >= MIN_IDENTIFIER_DIGITS
    return len(core) >= MIN_IDENTIFIER_CHARS


def _is_equipment(attribute: str, value: str, equipment: Iterable[str]) -> bool:
    """``value`` is a scanner string: equal to one, or (StationName) a prefix or a word of one."""
    low = value.strip().lower()
    for text in equipment:
        e = text.strip().lower()
        if not e:
            continue
        if low == e:
            return True
        if attribute == "StationName" and (e.startswith(low) or low in re.split(r"[^\w]+|_", e)):
            return True
    return False


def _token_pattern(value: str) -> re.Pattern[str]:
    """``value`` as a whole token: no letter or digit right before or after it, and not the digits of a
    longer decimal number (``1234`` does not match ``0.1234`` nor ``1234.5``)."""
    return re.compile(r"(?<![^\W_])(?<!\d\.)" + re.escape(value.strip()) + r"(?![^\W_])(?!\.\d)", re.IGNORECASE)


_PROJECT_KEY = re.compile(r"[a-z][a-z0-9_]*")
"""How every key the project writes into case.json looks (``suv_peak``, ``metric``): such keys are
vocabulary, not data, and are not searched (a patient named Peak is no leak in ``"suv_peak"``)."""
CODED_VALUES = frozenset({
    # the project's own vocabulary and ids
    "schema_version", "builder_version", "case_id", "subject_id", "content_hash", "clinical.age_band",
    "alignment.method", "alignment.metric",
    "alignment.interpolation", "alignment.decision", "alignment.transform.type", "alignment.transform_file",
    "qc.checks[].name", "qc.checks[].threshold", "qc.checks[].value", "lesions.grids.*", "source.content_hash",
    "source.mask_format", "pet.suv.time_reference", "pet.suv.units", "pet.suv.decay_correction",
    # DICOM defined terms (code strings) and transfer syntax UIDs
    "*.modality", "*.patient_position", "*.units", "*.corrected_image[]", "*.decay_correction",
    "*.transfer_syntax",
})
"""case.json values that are codes, not data: the project's own vocabulary (a QC check name ``suv_max``,
the metric ``mattes_mi``) and DICOM defined terms (CorrectionApplied ``NORM``, DecayCorrection
``START``), as dotted paths (``[]`` a list item, ``*`` any one key). The leak check does not search
them, so a patient named Norm or Mattes is no leak; every other string value is searched."""


def _vocabularies() -> dict[str, frozenset[str]]:
    """case.json values that are codes only when they are a code of their vocabulary (a patient named
    Burkitt with Burkitt lymphoma is no leak; a name written into ``clinical.subtype`` is)."""
    from lymphatlas_ds.schema import Diagnosis, Sex, Subtype

    return {"clinical.subtype": frozenset(s.value for s in Subtype),
            "clinical.diagnosis": frozenset(d.value for d in Diagnosis), "clinical.sex": frozenset(x.value for x in Sex)}


def _coded(path: str, value: object = None) -> bool:
    vocabulary = _vocabularies().get(path)
    if vocabulary is not None:
        return value in vocabulary
    if path in CODED_VALUES:
        return True
    tail = path.partition(".")[2]  # "pet.units" -> "units": the same code under ct and pet
    parent = path.rsplit(".", 1)[0]  # "lesions.grids.tlg" -> "lesions.grids"
    return f"*.{tail}" in CODED_VALUES or f"{parent}.*" in CODED_VALUES


def json_texts(data: object) -> list[str]:
    """The texts of a parsed case.json that can carry data: every string and integer value except the
    codes of :data:`CODED_VALUES`, and every key that is not a project key (:data:`_PROJECT_KEY`).

    Example:
        >>> json_texts({"suv_peak": 1.5, "ct": {"model": "Biograph", "modality": "CT"}, "items": [{"Doe^Jane": 3}]})
        ['Biograph', 'Doe^Jane', '3']
    """
    out: list[str] = []
    stack: list[tuple[str, object]] = [("", data)]
    while stack:
        path, item = stack.pop(0)
        if isinstance(item, dict):
            for k, v in item.items():
                if not _PROJECT_KEY.fullmatch(str(k)):
                    out.append(str(k))
                stack.append((f"{path}.{k}" if path else str(k), v))
        elif isinstance(item, list):
            stack.extend((f"{path}[]", v) for v in item)
        elif _coded(path, item):
            continue
        elif isinstance(item, str):
            out.append(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            out.append(str(item))
    return out


def _searched_text(path: Path) -> str | None:
    """What of a case folder's file is searched: the values of a JSON file (not its keys), a NIfTI
    header with its extensions, the whole of any other text file; None for other files."""
    if path.name.endswith((".nii", ".nii.gz")):
        return nifti_header_text(path).decode("utf-8", errors="replace")
    if path.suffix not in (".json", ".csv", ".txt", ".md"):
        return None
    text = path.read_bytes().decode("utf-8", errors="replace")
    if path.suffix == ".json":
        import json

        try:
            return "\n".join(json_texts(json.loads(text)))
        except json.JSONDecodeError:
            return text  # not JSON after all: every character is searched
    return text


def find_identifiers(
    folder: Path,
    identifiers: Iterable[tuple[str, str] | str],
    *,
    equipment: Iterable[str] = (),
    show_values: bool = True,
) -> list[str]:
    """Where any identifying value appears in ``folder``: file and folder names (other than the
    project's own: ``case.json``, ``ct.nii.gz``...), the values of JSON files (strings, integers, keys
    that are not project keys), other text files (CSV...), and decompressed NIfTI headers with their
    extensions. Empty when clean.

    ``identifiers`` are ``(attribute, value)`` pairs (a bare string is attribute "identifier");
    each value is matched case-insensitively as a whole token (see the module doc), and values
    that are ``equipment`` strings are skipped. Each hit names the file, the attribute and the value
    (``show_values=False``: not the value, for a message saved in failures.json).

    Example:
        >>> find_identifiers(case_dir, [("PatientID", "PAT0001")], equipment=["Biograph Vision 600"])  # doctest: +SKIP
        ["case.json contains the PatientID value 'PAT0001'"]
    """
    from lymphatlas_ds.schema import CASE_FILES, CASE_JSON

    own_names = {CASE_JSON, *CASE_FILES.values(), "transform.tfm"}
    equipment = [e for e in equipment if e]
    needles: dict[str, tuple[str, re.Pattern[str]]] = {}
    for item in identifiers:
        attribute, value = ("identifier", item) if isinstance(item, str) else item
        if not value or not _searchable(value):
            continue
        if _is_equipment(attribute, value, equipment):
            logger.debug("%s value %r is an equipment string: not searched", attribute, value)
            continue
        needles.setdefault(value.strip().lower(), (attribute, _token_pattern(value)))
    hits = []
    for path in sorted([folder, *folder.rglob("*")]):
        rel = path.relative_to(folder).as_posix() if path != folder else path.name
        if path == folder or path.name not in own_names:
            for value, (attribute, pattern) in needles.items():
                if pattern.search(path.name):
                    hits.append(f"the name {rel!r} contains the {attribute} value {value!r}" if show_values
                                else f"a file name contains the exam's {attribute}")
        if not path.is_file():
            continue
        text = _searched_text(path)
        if text is None:
            continue
        for value, (attribute, pattern) in needles.items():
            if pattern.search(text):
                hits.append(f"{rel} contains the {attribute} value {value!r}" if show_values
                            else f"{rel} contains the exam's {attribute}")
    return hits


def phi_digest(key: bytes, value: object) -> str:
    """A short keyed hash of an identifying value, for messages kept in shared files (failures.json,
    the QC report): two values can be told equal or different, neither can be read back.

    Example:
        >>> phi_digest(b"k" * 32, "PAT-1") == phi_digest(b"k" * 32, " PAT-1 "), phi_digest(b"k" * 32, "PAT-1")[:5]
        (True, 'hash ')
    """
    digest = hmac.new(key, b"phi\x00" + str(value).strip().encode(), hashlib.sha256).hexdigest()
    return f"hash {digest[:ID_HEX_DIGITS]}"
