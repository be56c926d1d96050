"""The source's ``clinical.csv``: one row per exam, read once, validated, de-identified per exam.

Columns (DESIGN.md source contract): ``exam_id, patient_id, exam_date (YYYY-MM-DD), sex, age,
diagnosis (HL|NHL), subtype, notes``. ``notes`` is free text and never leaves this module; the
exam date only leaves as days since the patient's first exam in the table, the age only as a
band.

Example:
    >>> table = read_clinical(Path("source/clinical.csv"))  # doctest: +SKIP
    >>> table["EX0001"].published()  # doctest: +SKIP
    {'diagnosis': 'HL', 'subtype': 'nodular sclerosis', 'sex': 'F', 'age_band': '45-49', 'exam_index': 0, 'days_from_first_exam': 0}
"""

from __future__ import annotations

import csv
import datetime as dt
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from builder.deid import age_band
from builder.errors import ClinicalError
from lymphatlas_ds.schema import Diagnosis, Sex

REQUIRED_COLUMNS = ("exam_id", "patient_id", "exam_date", "sex", "age", "diagnosis")
_SEX_ALIASES = {"F": Sex.F, "FEMALE": Sex.F, "M": Sex.M, "MALE": Sex.M, "O": Sex.O, "": Sex.O, "U": Sex.O}


@dataclass(frozen=True)
class ClinicalRecord:
    """One exam's clinical row, parsed; ``patient_id`` stays private (id_map.csv only)."""

    exam_id: str
    patient_id: str
    exam_date: dt.date
    sex: Sex
    age: int | None
    diagnosis: Diagnosis
    subtype: str
    exam_index: int
    days_from_first_exam: int

    def published(self) -> dict:
        """The ``case.json`` "clinical" block: no identifiers, age banded, dates relative."""
        return {
            "diagnosis": self.diagnosis.value,
            "subtype": self.subtype,
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
                      self.diagnosis.value, self.subtype, self.exam_index, self.days_from_first_exam)
        )


def _fail(message: str, *, path: Path, exam_id: str | None = None) -> ClinicalError:
    return ClinicalError(message, exam_id=exam_id, path=path)


def read_clinical(path: Path) -> dict[str, ClinicalRecord]:
    """Parse and validate ``clinical.csv``; exam index and relative days per patient.

    Raises ClinicalError naming the row for a missing column, a duplicate exam, a bad date, sex,
    age or diagnosis.
    """
    if not path.is_file():
        raise _fail("clinical.csv not found in the source folder; it is part of the source contract", path=path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise _fail(f"clinical.csv lacks the column(s) {', '.join(missing)} (found {', '.join(columns)})", path=path)
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    parsed: dict[str, dict] = {}
    for line, row in enumerate(rows, start=2):
        exam_id = row["exam_id"]
        where = f"clinical.csv line {line}"
        if not exam_id:
            raise _fail(f"{where}: empty exam_id", path=path)
        if exam_id in parsed:
            raise _fail(f"{where}: exam {exam_id} appears twice; keep one row per exam", path=path, exam_id=exam_id)
        if not row["patient_id"]:
            raise _fail(f"{where}: empty patient_id", path=path, exam_id=exam_id)
        try:
            date = dt.date.fromisoformat(row["exam_date"])
        except ValueError as e:
            raise _fail(f"{where}: exam_date {row['exam_date']!r} is not YYYY-MM-DD", path=path, exam_id=exam_id) from e
        sex = _SEX_ALIASES.get(row["sex"].upper())
        if sex is None:
            raise _fail(f"{where}: sex {row['sex']!r} is not F, M or O", path=path, exam_id=exam_id)
        age: int | None = None
        if row["age"]:
            try:
                age = int(float(row["age"]))
            except ValueError as e:
                raise _fail(f"{where}: age {row['age']!r} is not a number", path=path, exam_id=exam_id) from e
            if not 0 <= age <= 120:
                raise _fail(f"{where}: age {age} outside 0-120", path=path, exam_id=exam_id)
        try:
            diagnosis = Diagnosis(row["diagnosis"].upper())
        except ValueError as e:
            raise _fail(f"{where}: diagnosis {row['diagnosis']!r} is not HL or NHL", path=path, exam_id=exam_id) from e
        parsed[exam_id] = dict(exam_id=exam_id, patient_id=row["patient_id"], exam_date=date, sex=sex, age=age,
                               diagnosis=diagnosis, subtype=row.get("subtype", ""))
    by_patient: dict[str, list[dict]] = defaultdict(list)
    for rec in parsed.values():
        by_patient[rec["patient_id"]].append(rec)
    out: dict[str, ClinicalRecord] = {}
    for recs in by_patient.values():
        recs.sort(key=lambda r: (r["exam_date"], r["exam_id"]))
        first = recs[0]["exam_date"]
        for index, rec in enumerate(recs):
            out[rec["exam_id"]] = ClinicalRecord(**rec, exam_index=index, days_from_first_exam=(rec["exam_date"] - first).days)
    return out


def record_for(table: dict[str, ClinicalRecord], exam_id: str, *, path: Path) -> ClinicalRecord:
    """The exam's record, or ClinicalError saying the table lacks it."""
    try:
        return table[exam_id]
    except KeyError as e:
        raise ClinicalError(
            f"clinical.csv has no row for exam {exam_id}; add it (diagnosis, sex, age, date) or leave the exam out",
            exam_id=exam_id,
            path=path,
        ) from e
