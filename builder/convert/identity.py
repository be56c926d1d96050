"""One study, one exam, one patient: an exam's DICOM identity checked against clinical.csv and WORK.

* **One StudyInstanceUID, one exam.** A case id is the keyed hash of the study's UID, so the same
  study listed under a second exam id (another row of clinical.csv, another patient id) would
  overwrite the first exam's case with another subject id and diagnosis. Before a run,
  :func:`duplicate_studies` reads one header per exam and rejects every exam whose study another
  exam already holds (the exam that owns the case in id_map.csv keeps it; when none does, every
  exam of the study is rejected: which one is right is the maintainer's call). In the worker,
  :func:`check_exam` also refuses to write over a case folder that another exam made.
* **The DICOM patient is clinical.csv's patient.** The CT's and PET's PatientID must equal the row's
  ``patient_id``; PatientSex must agree with ``sex`` where both say F or M; PatientBirthDate must
  give the row's ``age`` at ``exam_date`` within :data:`AGE_TOLERANCE_YEARS`. Attributes that are
  absent or empty (an anonymised export) are not compared.

A mismatch rejects the exam at stage ``identity`` (:class:`~builder.errors.IdentityError`). The
message saved in failures.json and shown in the QC report names the exams and the attributes with
keyed hashes of the values (:func:`builder.convert.deid.phi_digest`); the values themselves are in
``error.detail``, which convert writes to its log only.

Example:
    >>> check_exam(job, exam)  # doctest: +SKIP
    Traceback (most recent call last):
    IdentityError: [exam EX0002] DICOM PatientID (hash 1a2b3c4d, CT) is not clinical.csv's patient_id ...
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from builder.convert import deid
from builder.errors import IdentityError

logger = logging.getLogger(__name__)

AGE_TOLERANCE_YEARS = 2
"""clinical.csv's age may be counted on another day than the exam's (the referral, a birthday since) or as
days / 365 (a spreadsheet formula): a year either way is common; another patient is rarely within two."""
_TAGS = ("StudyInstanceUID", "PatientID", "PatientSex", "PatientBirthDate")


def header_identity(path: Path) -> dict[str, str]:
    """``{StudyInstanceUID, PatientID, PatientSex, PatientBirthDate}`` of one DICOM file (empty strings where absent).

    Raises whatever pydicom raises for a file that is not DICOM.
    """
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_TAGS))
    return {tag: str(ds.get(tag, "") or "").strip() for tag in _TAGS}


def first_study_uid(exam_dir: Path) -> str | None:
    """The StudyInstanceUID of the first readable DICOM file of an exam folder (sorted paths), or None."""
    for path in sorted(p for p in exam_dir.rglob("*") if p.is_file()):
        try:
            uid = header_identity(path)["StudyInstanceUID"]
        except Exception:  # noqa: BLE001 - not DICOM (a README, a mask): the next file
            continue
        if uid:
            return uid
    return None


def duplicate_studies(source: Path, exams: Iterable[str], key: bytes,
                      case_of: Mapping[str, str]) -> dict[str, tuple[IdentityError, bool]]:
    """The exams to reject before the run because another exam holds the same DICOM study.

    ``case_of``: each exam's case id in id_map.csv. Returns ``{exam_id: (error, source_changed)}``;
    ``source_changed`` is true when the exam had its own case of another study before (its folder
    now holds a copy of another exam's study: the earlier case no longer follows the source).
    """
    by_study: dict[str, list[str]] = {}
    for exam_id in sorted(exams):
        exam_dir = source / "dicom" / exam_id
        uid = first_study_uid(exam_dir) if exam_dir.is_dir() else None
        if uid:
            by_study.setdefault(uid, []).append(exam_id)
    out: dict[str, tuple[IdentityError, bool]] = {}
    for uid, group in by_study.items():
        if len(group) < 2:
            continue
        case_id = deid.make_case_id(key, uid)
        owners = [e for e in group if case_of.get(e) == case_id]
        for exam_id in group:
            if exam_id in owners:
                continue
            others = [e for e in group if e != exam_id]
            held = (f"exam {owners[0]} (its case {case_id}, which stays as it is)" if owners
                    else f"exam{'s' if len(others) > 1 else ''} {', '.join(others)}")
            error = IdentityError(
                f"exam {exam_id} holds the same DICOM study (StudyInstanceUID {deid.phi_digest(key, uid)}) as {held}: "
                "one study is one exam, and converting it twice would put one patient's images under two "
                "patients' ids. Keep the study under its right exam id: remove the other folder from dicom/ and "
                "its row from clinical.csv (or export the right study for it), then run again",
                exam_id=exam_id, detail=f"StudyInstanceUID {uid!r} of exams {', '.join(group)}")
            changed = bool(case_of.get(exam_id)) and case_of.get(exam_id) != case_id
            out[exam_id] = (error, changed)
    return out


def check_exam(job: Any, exam: Any, case_owners: Callable[[], Mapping[str, str]]) -> None:
    """Reject ``exam`` (IdentityError) if its study is another exam's case in WORK, or its DICOM patient is
    not clinical.csv's (PatientID, sex, birth date against age); see the module doc.

    ``job``: the pipeline's ExamJob (``key``, ``work``, ``clinical``, ``previous_case_id``); ``case_owners``:
    returns {case id: exam id} of id_map.csv (called only when the exam's case id is a new one).
    """
    key, exam_id = job.key, job.exam_id
    case_id = deid.make_case_id(key, exam.ct.study_uid)
    # A case folder without an id_map row is no other exam's (an interrupted run's, adopted or removed at start).
    owner = case_owners().get(case_id) if case_id != job.previous_case_id else exam_id
    if owner not in (None, exam_id):
        raise IdentityError(
            f"the exam's DICOM study is already case {case_id} of exam {owner}: one study is one "
            "exam; that case stays as it is. Keep the study under its right exam id (remove the other copy from "
            "dicom/ and clinical.csv) and run again", exam_id=exam_id)
    mismatches, details = [], []
    for label, series in (("CT", exam.ct), ("PET", exam.pet)):
        for message, detail in _mismatches(job.clinical, header_identity(series.files[0]), key):
            if message not in mismatches:
                mismatches.append(message)
                details.append(f"{label} {detail}")
    if mismatches:
        raise IdentityError(
            f"the DICOM patient is not clinical.csv's patient of this exam: {'; '.join(mismatches)}. The images may be "
            "another patient's, or the row another exam's: check the exam's row in clinical.csv and its DICOM "
            "export, correct the wrong one and run again (the values are in the convert log)",
            exam_id=exam_id, detail="; ".join(details))


def _mismatches(record: Any, header: Mapping[str, str], key: bytes) -> list[tuple[str, str]]:
    """(message with hashed values, detail with the values) of each attribute that disagrees."""
    out = []
    pid = header.get("PatientID", "")
    if pid and pid != record.patient_id.strip():
        out.append((f"DICOM PatientID ({deid.phi_digest(key, pid)}) is not the row's patient_id "
                    f"({deid.phi_digest(key, record.patient_id)})",
                    f"PatientID {pid!r} vs clinical.csv patient_id {record.patient_id!r}"))
    sex = header.get("PatientSex", "").upper()
    if sex in ("F", "M") and record.sex.value in ("F", "M") and sex != record.sex.value:
        out.append(("DICOM PatientSex is not the row's sex",
                    f"PatientSex {sex!r} vs clinical.csv sex {record.sex.value!r}"))
    birth = _dicom_date(header.get("PatientBirthDate", ""))
    if birth is not None and record.age is not None:
        age = _years_between(birth, record.exam_date)
        if abs(age - record.age) > AGE_TOLERANCE_YEARS:
            out.append((f"DICOM PatientBirthDate gives another age at the exam date than the row's age (by "
                        f"{abs(age - record.age)} years)",
                        f"PatientBirthDate {header['PatientBirthDate']!r} (age {age} on "
                        f"{record.exam_date.isoformat()}) vs clinical.csv age {record.age}"))
    return out


def _dicom_date(text: str) -> dt.date | None:
    try:
        return dt.datetime.strptime(text.strip(), "%Y%m%d").date() if text.strip() else None
    except ValueError:
        logger.debug("PatientBirthDate %r is not a DICOM date: not compared", text)
        return None


def _years_between(birth: dt.date, day: dt.date) -> int:
    return day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))
