"""The source's ``clinical.csv``: one row per exam, read once, validated, de-identified per exam.

Columns (docs/contracts.md, source contract): ``exam_id, patient_id, exam_date (YYYY-MM-DD), sex, age,
diagnosis (HL|NHL), subtype, notes``. ``notes`` is free text and never leaves this module; the
exam date only leaves as days since the patient's first exam in the table, the age only as a
band, and the subtype only as a code of the controlled vocabulary ``schema.Subtype`` (common
spellings are mapped through the explicit table :data:`SUBTYPE_SYNONYMS`; anything else, such as
a subtype cell that carries a hospital name or a date, rejects the row).

A row with an invalid value does not stop the table: it becomes a :class:`RejectedRow` whose
exam is rejected at stage ``clinical`` with the row's line number and column (the other exams go
on); the cell's value itself goes to the convert log only (``error.detail``), never to
failures.json or the QC report. A table that cannot be read as a whole raises
:class:`~builder.errors.ClinicalError` before anything is converted, so that a re-exported
spreadsheet never rejects (and retires) exams one by one: no file, a missing column (``subtype``
included: write an empty cell for an unknown subtype), an exam twice, an empty exam id or one that
is not a plain name (``../x``, a path separator), an exam date in any other form than YYYY-MM-DD
(``03/03/2019``, ``2019-03-03 00:00:00``: the whole column is in another format), a file in another
encoding than UTF-8 (with or without BOM) or Windows-1252/Latin-1 (read as such, logged), or
separated by semicolons.

Example:
    >>> table = read_clinical(Path("source/clinical.csv"))  # doctest: +SKIP
    >>> table["EX0001"].published()  # doctest: +SKIP
    {'diagnosis': 'HL', 'subtype': 'nodular sclerosis', 'sex': 'F', 'age_band': '45-49', 'exam_index': 0, 'days_from_first_exam': 0}
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import logging
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from builder.convert.deid import age_band
from builder.errors import ClinicalError
from lymphatlas_ds.schema import Diagnosis, Sex, Subtype

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("exam_id", "patient_id", "exam_date", "sex", "age", "diagnosis", "subtype")
"""``notes`` is optional (never read); ``subtype`` is required, an empty cell meaning ``unknown``: a
table without the column is refused rather than have every exam published as ``unknown``."""
ENCODINGS = ("utf-8-sig", "cp1252")
"""Tried in this order: UTF-8 (with or without BOM), then Windows-1252, which spreadsheet programs
write as "CSV" on Windows and which reads Latin-1 text the same (the one exception, bytes
0x80-0x9F, are control characters in Latin-1 that no table holds)."""
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_EXAM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
"""An exam id is a plain folder name: letters, digits, ``.``, ``_``, ``-``, starting with a letter or digit."""
_SEX_ALIASES = {"F": Sex.F, "FEMALE": Sex.F, "M": Sex.M, "MALE": Sex.M, "O": Sex.O, "": Sex.O, "U": Sex.O}
MAX_AGE = 120

# Spellings seen in hospital exports, after :func:`normalize_subtype` (lower case; apostrophe-s,
# hyphens, underscores, commas and full stops dropped; single spaces). Exact keys only: no fuzzy
# matching, so a cell that says more than a subtype is rejected, never trimmed into one.
_SYNONYMS_BY_CODE: dict[Subtype, tuple[str, ...]] = {
    Subtype.NODULAR_SCLEROSIS: (
        "ns", "nodular sclerosis", "nodular sclerosing", "nodular sclerosis hodgkin lymphoma",
        "nodular sclerosis hodgkin disease", "nodular sclerosis classic hodgkin lymphoma",
        "nodular sclerosis classical hodgkin lymphoma", "chl ns", "nshl", "nschl",
    ),
    Subtype.MIXED_CELLULARITY: (
        "mc", "mixed cellularity", "mixed cellularity hodgkin lymphoma", "mixed cellularity hodgkin disease",
        "mixed cellularity classic hodgkin lymphoma", "mixed cellularity classical hodgkin lymphoma", "chl mc",
    ),
    Subtype.LYMPHOCYTE_RICH: (
        "lr", "lymphocyte rich", "lymphocyte rich hodgkin lymphoma", "lymphocyte rich classic hodgkin lymphoma",
        "lymphocyte rich classical hodgkin lymphoma", "chl lr",
    ),
    Subtype.LYMPHOCYTE_DEPLETED: (
        "ld", "lymphocyte depleted", "lymphocyte depleted hodgkin lymphoma",
        "lymphocyte depleted classic hodgkin lymphoma", "lymphocyte depleted classical hodgkin lymphoma", "chl ld",
    ),
    Subtype.CLASSIC_HL: (
        "chl", "chl nos", "classic hl", "classical hl", "classic hodgkin lymphoma", "classical hodgkin lymphoma",
        "classic hodgkin disease", "classical hodgkin disease",
    ),
    Subtype.NODULAR_LYMPHOCYTE_PREDOMINANT: (
        "nlphl", "lphl", "nodular lymphocyte predominant", "nodular lymphocyte predominant hodgkin lymphoma",
        "nodular lymphocyte predominant hl",
    ),
    Subtype.DLBCL: (
        "dlbcl", "dlbcl nos", "diffuse large b cell", "diffuse large b cell lymphoma",
        "diffuse large b cell lymphoma nos",
    ),
    Subtype.FOLLICULAR: ("fl", "follicular", "follicular lymphoma"),
    Subtype.MANTLE_CELL: ("mcl", "mantle cell", "mantle cell lymphoma"),
    Subtype.MARGINAL_ZONE: (
        "mzl", "marginal zone", "marginal zone lymphoma", "malt", "malt lymphoma",
        "extranodal marginal zone lymphoma", "nodal marginal zone lymphoma", "splenic marginal zone lymphoma",
    ),
    Subtype.BURKITT: ("bl", "burkitt", "burkitt lymphoma"),
    Subtype.SMALL_LYMPHOCYTIC: (
        "sll", "cll", "cll/sll", "small lymphocytic", "small lymphocytic lymphoma", "chronic lymphocytic leukemia",
        "chronic lymphocytic leukaemia",
    ),
    Subtype.LYMPHOPLASMACYTIC: ("lpl", "lymphoplasmacytic", "lymphoplasmacytic lymphoma"),
    Subtype.PRIMARY_MEDIASTINAL: (
        "pmbl", "pmbcl", "primary mediastinal large b cell", "primary mediastinal large b cell lymphoma",
        "primary mediastinal b cell lymphoma",
    ),
    Subtype.HIGH_GRADE_B_CELL: ("hgbl", "high grade b cell", "high grade b cell lymphoma"),
    Subtype.LYMPHOBLASTIC: (
        "lbl", "t lbl", "b lbl", "lymphoblastic", "lymphoblastic lymphoma", "t lymphoblastic lymphoma",
        "b lymphoblastic lymphoma",
    ),
    Subtype.PTCL: ("ptcl", "ptcl nos", "peripheral t cell", "peripheral t cell lymphoma", "peripheral t cell lymphoma nos"),
    Subtype.ANGIOIMMUNOBLASTIC: ("aitl", "angioimmunoblastic t cell", "angioimmunoblastic t cell lymphoma"),
    Subtype.ANAPLASTIC_LARGE_CELL: ("alcl", "anaplastic large cell", "anaplastic large cell lymphoma"),
    Subtype.EXTRANODAL_NK_T: (
        "enktl", "nktcl", "extranodal nk/t cell", "extranodal nk/t cell lymphoma", "nk/t cell lymphoma",
    ),
    Subtype.OTHER: ("other",),
    Subtype.UNKNOWN: ("", "unknown", "unk", "not known", "na", "n/a"),
}


def normalize_subtype(text: str) -> str:
    """The lookup key of a subtype cell: lower case, ``'s`` / hyphens / underscores / commas / full stops
    dropped or made spaces, single spaces.

    Example:
        >>> normalize_subtype("  Nodular-Sclerosis  Hodgkin's disease ")
        'nodular sclerosis hodgkin disease'
    """
    text = text.replace("\u2019", "'").lower()
    text = re.sub(r"'s\b", "", text)
    text = re.sub(r"[-_,.;]+", " ", text)
    return " ".join(text.split())


SUBTYPE_SYNONYMS: dict[str, Subtype] = {
    normalize_subtype(name): code
    for code in Subtype
    for name in (code.value, *_SYNONYMS_BY_CODE.get(code, ()))
}
"""Accepted spellings (normalized) -> code. Add a hospital's own spelling here, never free text."""


def parse_subtype(text: str) -> Subtype | None:
    """The controlled-vocabulary code of a subtype cell, or ``None`` when it is not an accepted spelling.

    Example:
        >>> parse_subtype("Diffuse large B-cell lymphoma"), parse_subtype("")
        (<Subtype.DLBCL: 'DLBCL'>, <Subtype.UNKNOWN: 'unknown'>)
        >>> parse_subtype("DLBCL, biopsy St Elsewhere 2018-04-02") is None
        True
    """
    return SUBTYPE_SYNONYMS.get(normalize_subtype(text))


def allowed_subtypes() -> str:
    """The codes, grouped by diagnosis, as an error message lists them."""
    groups = {d: [s.value for s in Subtype if s.diagnosis is d] for d in Diagnosis}
    listing = "; ".join(f"{d.value}: {', '.join(codes)}" for d, codes in groups.items())
    return f"{listing}; or other, unknown"


@dataclass(frozen=True)
class ClinicalRecord:
    """One exam's clinical row, parsed; ``patient_id`` stays private (id_map.csv only)."""

    exam_id: str
    patient_id: str
    exam_date: dt.date
    sex: Sex
    age: int | None
    diagnosis: Diagnosis
    subtype: Subtype
    exam_index: int
    days_from_first_exam: int

    def check(self) -> None:
        """Nothing to report: the row is valid (see :meth:`RejectedRow.check`)."""

    def published(self) -> dict:
        """The ``case.json`` "clinical" block: no identifiers, age banded, dates relative, subtype coded."""
        return {
            "diagnosis": self.diagnosis.value,
            "subtype": self.subtype.value,
            "sex": self.sex.value,
            "age_band": age_band(self.age),
            "exam_index": self.exam_index,
            "days_from_first_exam": self.days_from_first_exam,
        }

    def hash_text(self) -> str:
        """The fields that shape the published case (for the resumability hash)."""
        return "|".join(
            str(v)
            for v in (self.exam_id, self.patient_id, self.exam_date, self.sex.value, self.age,
                      self.diagnosis.value, self.subtype.value, self.exam_index, self.days_from_first_exam)
        )


@dataclass(frozen=True)
class RejectedRow:
    """A row of ``clinical.csv`` with an invalid value: its exam is rejected at stage ``clinical``."""

    exam_id: str
    patient_id: str
    line: int
    reason: str
    path: str
    detail: str = ""
    """The rejected cell's value (for the log only: ``ClinicalError.detail``)."""

    def check(self) -> None:
        """Raise the row's :class:`ClinicalError` (its line number, the column and what is allowed)."""
        raise ClinicalError(self.reason, exam_id=self.exam_id, path=self.path, detail=self.detail or None)

    def published(self) -> dict:
        raise ClinicalError(self.reason, exam_id=self.exam_id, path=self.path, detail=self.detail or None)


class _CellError(ValueError):
    """An invalid cell: ``str()`` names line and column (saved in failures.json), ``detail`` the value (log only)."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


def _fail(message: str, *, path: Path, exam_id: str | None = None) -> ClinicalError:
    return ClinicalError(message, exam_id=exam_id, path=path)


def _parse_age(text: str, where: str) -> int | None:
    """Whole years, or None for an empty cell; _CellError otherwise."""
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not 0 <= value <= MAX_AGE:
        raise _CellError(f"{where}: age is not a number of years in 0-{MAX_AGE}; "
                         "write the age at the exam in years, or leave the cell empty", f"age {text!r}")
    return int(value)


def _parse_row(row: dict[str, str], where: str) -> dict:
    """The parsed values of one row; _CellError naming the first invalid column (its value in ``detail``)."""
    try:
        date = dt.date.fromisoformat(row["exam_date"])
    except ValueError:
        raise _CellError(f"{where}: exam_date is not a date of the calendar in the form YYYY-MM-DD; correct the cell",
                         f"exam_date {row['exam_date']!r}") from None
    sex = _SEX_ALIASES.get(row["sex"].upper())
    if sex is None:
        raise _CellError(f"{where}: sex is not F, M or O (or empty)", f"sex {row['sex']!r}")
    age = _parse_age(row["age"], where)
    try:
        diagnosis = Diagnosis(row["diagnosis"].upper())
    except ValueError:
        raise _CellError(f"{where}: diagnosis is not HL or NHL", f"diagnosis {row['diagnosis']!r}") from None
    raw_subtype = row.get("subtype", "")
    subtype = parse_subtype(raw_subtype)
    if subtype is None:
        raise _CellError(
            f"{where}: subtype is not a code of the subtype vocabulary (free text is never published nor saved; "
            f"its value is in the convert log); write one of {allowed_subtypes()} (common spellings are "
            "accepted: builder.convert.clinical.SUBTYPE_SYNONYMS)", f"subtype {raw_subtype!r}"
        )
    if subtype.diagnosis is not None and subtype.diagnosis is not diagnosis:
        raise _CellError(
            f"{where}: subtype {subtype.value} is a {subtype.diagnosis.value} subtype but the "
            f"diagnosis is {diagnosis.value}; correct one of the two", f"subtype {raw_subtype!r}"
        )
    return dict(exam_date=date, sex=sex, age=age, diagnosis=diagnosis, subtype=subtype)


def _decode(path: Path) -> str:
    """The text of ``path`` in the first of :data:`ENCODINGS` that decodes it; ClinicalError otherwise."""
    data = path.read_bytes()
    if b"\x00" in data[:4096]:
        raise _fail("clinical.csv holds NUL bytes (saved as UTF-16 \"Unicode text\"?); save it again as "
                    "\"CSV UTF-8 (comma delimited)\"", path=path)
    for encoding in ENCODINGS:
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            continue
        if encoding != ENCODINGS[0]:
            logger.info("%s is not UTF-8: read as %s (Windows-1252 / Latin-1); save it as CSV UTF-8 to silence "
                        "this", path, encoding)
        return text
    raise _fail(f"clinical.csv is neither UTF-8 nor Windows-1252/Latin-1 text; save it again as \"CSV UTF-8 "
                "(comma delimited)\"", path=path)


def _read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of clinical.csv as {column: stripped cell}; ClinicalError for a table that cannot be read."""
    text = _decode(path)
    first = text.lstrip("\ufeff").split("\n", 1)[0]
    if ";" in first and "," not in first:
        raise _fail("clinical.csv is separated by semicolons (a spreadsheet's regional setting); save it again "
                    "as comma-separated CSV", path=path)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        hint = (" (subtype: add the column; an empty cell means unknown)" if "subtype" in missing else "")
        raise _fail(f"clinical.csv lacks the column(s) {', '.join(missing)} (found {', '.join(columns)}){hint}",
                    path=path)
    return [{(k or "").strip(): (v or "").strip() for k, v in row.items() if isinstance(v, str) or v is None}
            for row in reader]


def _check_table(rows: list[dict[str, str]], path: Path) -> None:
    """Table-level checks: exam ids that are plain names, exam dates all in the contract's YYYY-MM-DD form."""
    for line, row in enumerate(rows, start=2):
        exam_id = row.get("exam_id", "")
        if exam_id and (not _EXAM_ID.fullmatch(exam_id) or exam_id in (".", "..")):
            raise _fail(f"clinical.csv line {line}: exam_id {exam_id!r} is not a plain name (letters, digits, '.', "
                        "'_', '-', starting with a letter or digit; no path separator, no '..'); it names the "
                        "exam's folder dicom/<exam_id>: rename the exam", path=path)
    others = [(line, row["exam_date"]) for line, row in enumerate(rows, start=2)
              if row.get("exam_date") and not _ISO_DATE.fullmatch(row["exam_date"])]
    if others:
        line, value = others[0]
        raise _fail(
            f"clinical.csv column exam_date: {len(others)} of {len(rows)} rows are not in the form YYYY-MM-DD (e.g. "
            f"line {line}: {value!r}); the table was probably re-exported by a spreadsheet program. Nothing was "
            "converted or removed. Save the column as YYYY-MM-DD (e.g. 2019-03-21; in a spreadsheet, format the "
            "cells as yyyy-mm-dd) and run again", path=path)


def read_clinical(path: Path) -> dict[str, ClinicalRecord | RejectedRow]:
    """Parse and validate ``clinical.csv``; exam index and relative days per patient.

    Raises ClinicalError for a table that cannot be read (see the module doc). A row with an
    invalid patient id, date, sex, age, diagnosis or subtype is returned as a :class:`RejectedRow`
    naming its line and column (its value in ``detail``, for the log).
    """
    if not path.is_file():
        raise _fail("clinical.csv not found in the source folder; it is part of the source contract", path=path)
    rows = _read_rows(path)
    _check_table(rows, path)
    parsed: dict[str, dict] = {}
    rejected: dict[str, RejectedRow] = {}
    dates: dict[str, tuple[str, dt.date]] = {}  # every valid (patient, date), rejected rows too
    for line, row in enumerate(rows, start=2):
        exam_id = row.get("exam_id", "")
        where = f"clinical.csv line {line}"
        if not exam_id:
            raise _fail(f"{where}: empty exam_id", path=path)
        if exam_id in parsed or exam_id in rejected:
            raise _fail(f"{where}: exam {exam_id} appears twice; keep one row per exam", path=path, exam_id=exam_id)
        patient_id = row.get("patient_id", "")
        try:
            if not patient_id:
                raise ValueError(f"{where}: empty patient_id")
            with_date = dt.date.fromisoformat(row["exam_date"])
            dates[exam_id] = (patient_id, with_date)
        except ValueError:
            pass
        try:
            if not patient_id:
                raise _CellError(f"{where}: empty patient_id")
            values = _parse_row(row, where)
        except _CellError as e:
            rejected[exam_id] = RejectedRow(exam_id, patient_id, line, str(e), str(path), e.detail)
            continue
        parsed[exam_id] = dict(exam_id=exam_id, patient_id=patient_id, **values)
    # Exam order per patient over every dated row, so fixing a rejected row does not renumber the others.
    by_patient: dict[str, list[tuple[dt.date, str]]] = defaultdict(list)
    for exam_id, (patient_id, date) in dates.items():
        by_patient[patient_id].append((date, exam_id))
    order: dict[str, tuple[int, int]] = {}
    for exams in by_patient.values():
        exams.sort()
        first = exams[0][0]
        for index, (date, exam_id) in enumerate(exams):
            order[exam_id] = (index, (date - first).days)
    out: dict[str, ClinicalRecord | RejectedRow] = dict(rejected)
    for exam_id, rec in parsed.items():
        index, days = order[exam_id]
        out[exam_id] = ClinicalRecord(**rec, exam_index=index, days_from_first_exam=days)
    return dict(sorted(out.items()))

