"""builder.convert.clinical: the controlled subtype vocabulary, row rejections naming line and value, ages."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from builder.convert import clinical
from builder.convert.clinical import ClinicalRecord, RejectedRow
from builder.errors import ClinicalError
from lymphatlas_ds.schema import Diagnosis, Subtype

REPO = Path(__file__).resolve().parents[1]
FREE_TEXT = "DLBCL, biopsy St Elsewhere 2018-04-02, born 1993-10-11"
HEADER = "exam_id,patient_id,exam_date,sex,age,diagnosis,subtype,notes\n"


def _table(tmp_path: Path, rows: str) -> dict:
    (tmp_path / "clinical.csv").write_text(HEADER + rows)
    return clinical.read_clinical(tmp_path / "clinical.csv")


def test_every_code_and_the_papers_spelling_parse_and_no_spelling_names_two_codes() -> None:
    for code in Subtype:
        assert clinical.parse_subtype(code.value) is code
        assert clinical.parse_subtype(code.value.upper()) is code
    # the paper's Table 1 writes its diagnosis this way
    assert clinical.parse_subtype("Nodular sclerosis Hodgkin's disease") is Subtype.NODULAR_SCLEROSIS
    assert clinical.parse_subtype("Diffuse large B-cell lymphoma") is Subtype.DLBCL
    assert clinical.parse_subtype("") is Subtype.UNKNOWN
    seen: dict[str, Subtype] = {}
    for code, names in clinical._SYNONYMS_BY_CODE.items():
        for name in (code.value, *names):
            key = clinical.normalize_subtype(name)
            assert seen.setdefault(key, code) is code, f"{name!r} maps to {seen[key]} and {code}"
    # codes of one diagnosis only
    assert {s.diagnosis for s in Subtype} == {Diagnosis.HL, Diagnosis.NHL, None}


@pytest.mark.parametrize("text", [FREE_TEXT, "DLBCL biopsy", "follicular grade 3a (St Elsewhere)", "Dr Who"])
def test_free_text_subtype_rejects_the_row_naming_line_value_and_codes(tmp_path, text) -> None:
    cell = '"' + text.replace('"', '""') + '"'
    table = _table(tmp_path, f"E1,P1,2020-01-01,F,40,NHL,DLBCL,\nE2,P2,2020-02-02,M,50,NHL,{cell},\n")
    assert isinstance(table["E1"], ClinicalRecord) and table["E1"].published()["subtype"] == "DLBCL"
    row = table["E2"]
    assert isinstance(row, RejectedRow) and row.line == 3
    with pytest.raises(ClinicalError) as e:
        row.check()
    message = str(e.value)
    # the free text goes to the log only (error.detail), never into the message failures.json saves
    assert "line 3" in message and "subtype" in message and "E2" in message and text not in message
    assert repr(text) in e.value.detail
    for code in ("DLBCL", "nodular sclerosis", "unknown", "other"):
        assert code in message
    with pytest.raises(ClinicalError):
        row.published()  # a rejected row never yields a published block


def test_subtype_of_the_other_diagnosis_is_rejected(tmp_path) -> None:
    table = _table(tmp_path, "E1,P1,2020-01-01,F,40,HL,DLBCL,\n")
    with pytest.raises(ClinicalError, match=r"line 2.*NHL subtype but the diagnosis is HL"):
        table["E1"].check()


def test_common_spellings_publish_the_code(tmp_path) -> None:
    table = _table(tmp_path, "E1,P1,2020-01-01,F,40,HL,Nodular-Sclerosis,\nE2,P2,2020-01-01,F,40,NHL,dlbcl,\n"
                             "E3,P3,2020-01-01,F,40,NHL,,\n")
    assert [table[e].published()["subtype"] for e in ("E1", "E2", "E3")] == ["nodular sclerosis", "DLBCL", "unknown"]


@pytest.mark.parametrize("age", ["inf", "-inf", "nan", "NaN", "-1", "121", "1e400", "forty", "40y"])
def test_bad_age_rejects_the_row_naming_line_and_value(tmp_path, age) -> None:
    table = _table(tmp_path, f"E1,P1,2020-01-01,F,40,HL,nodular sclerosis,\nE2,P2,2020-01-01,F,{age},HL,ns,\n")
    assert isinstance(table["E1"], ClinicalRecord)
    with pytest.raises(ClinicalError) as e:
        table["E2"].check()
    assert "line 3" in str(e.value) and "age" in str(e.value) and "0-120" in str(e.value)
    assert e.value.detail == f"age {age!r}"  # the value: log only


@pytest.mark.parametrize("age,band", [("47.9", "45-49"), ("0", "0-4"), ("120", "90+"), ("", None)])
def test_valid_ages(tmp_path, age, band) -> None:
    table = _table(tmp_path, f"E1,P1,2020-01-01,F,{age},HL,ns,\n")
    assert table["E1"].published()["age_band"] == band


@pytest.mark.parametrize(
    "row,needle",
    [("E9,P9,2020-13-01,F,40,HL,ns,", "exam_date '2020-13-01'"), ("E9,P9,2020-01-01,Q,40,HL,ns,", "sex 'Q'"),
     ("E9,P9,2020-01-01,F,40,CLL,other,", "diagnosis 'CLL'"), ("E9,,2020-01-01,F,40,HL,ns,", "empty patient_id")],
)
def test_other_invalid_values_reject_only_their_row(tmp_path, row, needle) -> None:
    table = _table(tmp_path, "E1,P1,2020-01-01,F,40,HL,ns,\n" + row + "\n")
    assert isinstance(table["E1"], ClinicalRecord)
    with pytest.raises(ClinicalError, match="line 3") as e:
        table["E9"].check()
    assert needle in f"{e.value} {e.value.detail}"
    assert needle.split()[0] in str(e.value)  # the column in the message, its value only in the detail
    if "'" in needle:
        assert needle.split("'")[1] not in str(e.value).split("] ", 1)[1]


def test_table_level_errors_still_stop_the_run(tmp_path) -> None:
    """(Re-exported tables, wrong encodings, bad exam ids: tests/test_identity.py.)"""
    with pytest.raises(ClinicalError, match="line 3: exam E1 appears twice"):
        _table(tmp_path, "E1,P1,2020-01-01,F,40,HL,ns,\nE1,P1,2020-01-02,F,40,HL,ns,\n")
    (tmp_path / "clinical.csv").write_text("exam_id,patient_id,exam_date,sex\nE1,P1,2020-01-01,F\n")
    with pytest.raises(ClinicalError, match="lacks the column"):
        clinical.read_clinical(tmp_path / "clinical.csv")


def test_a_rejected_row_does_not_renumber_the_patients_other_exams(tmp_path) -> None:
    rows = "E1,P1,2020-01-01,F,40,HL,ns,\nE2,P1,2020-03-01,F,40,HL,ns,\nE3,P1,2020-05-01,F,40,HL,ns,\n"
    good = _table(tmp_path, rows)
    bad = _table(tmp_path, rows.replace("E1,P1,2020-01-01,F,40,HL,ns,", f'E1,P1,2020-01-01,F,40,HL,"{FREE_TEXT}",'))
    assert isinstance(bad["E1"], RejectedRow)
    for e in ("E2", "E3"):
        assert bad[e].hash_text() == good[e].hash_text()  # fixing E1 later does not reconvert E2, E3
    assert (bad["E3"].exam_index, bad["E3"].days_from_first_exam) == (2, 121)  # 2020 is a leap year


def _edit_subtype(source: Path, exam_id: str, value: str) -> None:
    import csv
    import io

    with open(source / "clinical.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        if row["exam_id"] == exam_id:
            row["subtype"] = value
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    (source / "clinical.csv").write_text(buf.getvalue())


def _strings_of_release(release: Path) -> str:
    """Every text file of a release and every string cell of its parquet shards, as one text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = []
    for path in sorted(release.rglob("*")):
        if path.suffix in (".json", ".csv", ".md"):
            out.append(path.read_text())
        elif path.suffix == ".parquet":
            table = pq.read_table(path)
            for name in table.column_names:
                if pa.types.is_string(table.schema.field(name).type):
                    out.extend(str(v) for v in table.column(name).to_pylist())
    return "\n".join(out)


@pytest.mark.slow
def test_free_text_subtype_reaches_no_output(synthetic_good_cohort, tmp_path) -> None:
    """The user's commands: two exams convert, then one's subtype cell is overwritten with a hospital and dates."""
    source = tmp_path / "source"
    shutil.copytree(synthetic_good_cohort[0], source, ignore=shutil.ignore_patterns("truth"))
    env = {"PYTHONPATH": str(REPO), "PATH": str(Path(sys.executable).parent)}

    def builder(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "builder", *argv], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)

    convert = ["convert", str(source), str(tmp_path / "work"), "--workers", "1", "--exams", "EX0000", "EX0001",
               "--quiet", "--no-report"]
    first = builder(*convert)
    assert first.returncode == 0, first.stdout + first.stderr
    earlier = {json.loads(p.read_text())["case_id"] for p in (tmp_path / "work" / "cases").glob("*/case.json")}
    assert len(earlier) == 2
    _edit_subtype(source, "EX0000", FREE_TEXT)
    second = builder(*convert)
    assert second.returncode == 1, second.stdout + second.stderr  # EX0000 rejected, EX0001 unchanged
    failures = {f["exam_id"]: f for f in json.loads((tmp_path / "work" / "failures.json").read_text())}
    assert set(failures) == {"EX0000"} and failures["EX0000"]["stage"] == "clinical"
    assert "line 2" in failures["EX0000"]["reason"] and FREE_TEXT not in failures["EX0000"]["reason"]
    assert FREE_TEXT in second.stderr  # the maintainer's log names the value
    assert "retired case" in second.stdout  # the earlier case of EX0000 (its row changed) is gone
    remaining = {json.loads(p.read_text())["case_id"] for p in (tmp_path / "work" / "cases").glob("*/case.json")}
    assert len(remaining) == 1 and remaining < earlier
    release = builder("release", str(tmp_path / "work"), str(tmp_path / "release"), "--version", "1.0.0")
    assert release.returncode == 0, release.stderr
    published = _strings_of_release(tmp_path / "release")
    published += "\n".join(p.read_text() for p in (tmp_path / "work" / "cases").rglob("case.json"))
    for fragment in ("Elsewhere", "2018-04-02", "1993-10-11", "biopsy"):
        assert fragment not in published
    subtypes = {json.loads(p.read_text())["clinical"]["subtype"] for p in (tmp_path / "work" / "cases").rglob("case.json")}
    assert subtypes and subtypes <= {s.value for s in Subtype}


def test_release_refuses_a_case_whose_subtype_is_not_a_code(tmp_path) -> None:
    """A case converted before the vocabulary (or case.json edited by hand) never reaches a release."""
    from builder.release.build import ReleaseError, build_release
    from lymphatlas_synth.fake_work import make_fake_work

    cases = make_fake_work(tmp_path / "work", n_patients=2, seed=2, shape_zyx=(16, 20, 20))
    path = tmp_path / "work" / "cases" / cases[0].case_id / "case.json"
    info = json.loads(path.read_text())
    info["clinical"]["subtype"] = FREE_TEXT
    path.write_text(json.dumps(info))
    with pytest.raises(ReleaseError, match=cases[0].case_id) as e:
        build_release(tmp_path / "work", tmp_path / "release", version="1.0.0")
    assert "Elsewhere" not in str(e.value) and "python -m builder convert" in str(e.value)
    assert not (tmp_path / "release").exists()
