"""Nothing misattributed: WORK's key, one study per exam, the DICOM patient against clinical.csv, the leak
check on values, and clinical.csv as spreadsheets re-export it (issue: lost key, one study under two exam
ids, names that are words of the case format, DD/MM/YYYY dates, Latin-1, a missing subtype column, ``../x``).

Every scenario starts from a WORK converted from the generator's exams and checks the end state against
the generator's truth (its study UIDs and patient ids give the case and subject ids through the key):
cases (bytes), id_map rows, the key file, failures.json; the message only besides.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from builder.convert import deid, pipeline
from builder.convert.align import AlignSettings
from builder.errors import ClinicalError, KeyFileError
from lymphatlas_synth.cohort import load_truth

ROOT = Path(__file__).resolve().parents[1]
FAST = pipeline.ConvertSettings(align=AlignSettings(register=False))  # registration is not what these test


# --- helpers -----------------------------------------------------------------------------------


def _convert(source: Path, work: Path, **kwargs) -> pipeline.RunSummary:
    return pipeline.convert_cohort(source, work, settings=FAST, workers=1, progress=False, **kwargs)


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file of a folder (the lock excepted) with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def _rows(source: Path) -> list[dict[str, str]]:
    with open(source / "clinical.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _csv_text(rows: list[dict[str, str]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _source(base: Path, dst: Path, *, rows: list[dict[str, str]] | None = None, clinical: bytes | None = None,
            alias: dict[str, str] | None = None, headers: dict[str, dict] | None = None) -> Path:
    """A source made from ``base``: DICOM and masks shared by symlinks, except ``headers`` ({exam: {attribute:
    value}}: that exam's files copied with those header values), ``alias`` ({new exam id: existing exam}: the
    same DICOM folder under another id) and clinical.csv (``rows`` or raw bytes)."""
    (dst / "dicom").mkdir(parents=True)
    (dst / "masks").mkdir()
    for exam in sorted((base / "dicom").iterdir()):
        if exam.name in (headers or {}):
            for path in sorted(p for p in exam.rglob("*") if p.is_file()):
                ds = pydicom.dcmread(path)
                for attribute, value in headers[exam.name].items():
                    setattr(ds, attribute, value)
                out = dst / "dicom" / exam.name / path.relative_to(exam)
                out.parent.mkdir(parents=True, exist_ok=True)
                ds.save_as(out)
        else:
            (dst / "dicom" / exam.name).symlink_to(exam, target_is_directory=True)
    for new, old in (alias or {}).items():
        (dst / "dicom" / new).symlink_to(base / "dicom" / old, target_is_directory=True)
        (dst / "masks" / f"{new}.nii.gz").symlink_to(base / "masks" / f"{old}.nii.gz")
    for mask in (base / "masks").iterdir():
        (dst / "masks" / mask.name).symlink_to(mask)
    if clinical is None:
        clinical = _csv_text(rows if rows is not None else _rows(base)).encode()
    (dst / "clinical.csv").write_bytes(clinical)
    return dst


@pytest.fixture(scope="module")
def base(synthetic_good_cohort, tmp_path_factory) -> dict:
    """The generator's 3 exams converted once; tests copy the WORK and never change this one."""
    source = synthetic_good_cohort[0]
    work = tmp_path_factory.mktemp("identity") / "work"
    summary = _convert(source, work)
    assert summary.n_converted == 3, summary.line()
    key = (work / "private" / deid.KEY_FILE).read_text()
    truths = {e: load_truth(source / "truth", e) for e in sorted(p.name for p in (source / "dicom").iterdir())}
    return {"source": source, "work": work, "key": key, "truths": truths, "id_map": pipeline.read_id_map(work)}


@pytest.fixture
def work(base, tmp_path) -> Path:
    return Path(shutil.copytree(base["work"], tmp_path / "work"))


def _expected_ids(base: dict, exam_id: str) -> tuple[str, str]:
    """(case id, subject id) of an exam from the generator's truth and WORK's key."""
    key = bytes.fromhex(base["key"].strip())
    truth = base["truths"][exam_id]
    return deid.make_case_id(key, truth["phi_values"]["study_uid"]), deid.make_subject_id(key, truth["patient_id"])


def _failures(work: Path) -> dict[str, dict]:
    return {f["exam_id"]: f for f in json.loads((work / "failures.json").read_text())}


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "builder", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=600)


# --- the key ----------------------------------------------------------------------------------


def test_the_base_work_holds_the_truths_ids(base) -> None:
    for exam_id in base["truths"]:
        case_id, subject_id = _expected_ids(base, exam_id)
        assert base["id_map"][exam_id]["case_id"] == case_id and base["id_map"][exam_id]["subject_id"] == subject_id
        assert (base["work"] / "cases" / case_id / "case.json").is_file()


@pytest.mark.parametrize("what_is_left", ["id_map and cases", "cases only", "id_map only"])
def test_a_lost_key_stops_convert_and_the_restored_key_gives_the_same_ids(base, work, what_is_left) -> None:
    key_file = work / "private" / deid.KEY_FILE
    key_file.unlink()
    if what_is_left == "cases only":
        (work / "private" / pipeline.ID_MAP).unlink()
    elif what_is_left == "id_map only":
        shutil.rmtree(work / "cases")
        (work / "cases").mkdir()
    before = _tree(work)
    with pytest.raises(KeyFileError) as e:
        _convert(base["source"], work)
    assert str(key_file) in str(e.value) and "backup" in str(e.value)
    assert not key_file.exists()  # no new key
    assert _tree(work) == before  # nothing written: cases, id_map, failures.json, build.json
    if what_is_left != "id_map and cases":
        return
    key_file.write_text(base["key"])  # restored from the backup
    summary = _convert(base["source"], work)
    assert summary.n_skipped == 3, summary.line()  # the same sources: unchanged, same cases
    for exam_id in base["truths"]:
        assert pipeline.read_id_map(work)[exam_id]["case_id"] == _expected_ids(base, exam_id)[0]
    assert pipeline.read_id_map(work) == base["id_map"]


def test_a_lost_key_through_the_console(base, work, tmp_path) -> None:
    (work / "private" / deid.KEY_FILE).unlink()
    id_map = (work / "private" / pipeline.ID_MAP).read_bytes()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = _cli("convert", str(base["source"]), str(work), "--workers", "1", "--no-register", "--quiet", "--no-report",
               cwd=elsewhere)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    assert "deid.key is missing" in run.stderr and "backup" in run.stderr and "nothing was written" in run.stderr
    assert not (work / "private" / deid.KEY_FILE).exists()
    assert (work / "private" / pipeline.ID_MAP).read_bytes() == id_map
    # --new-key does not get around it: WORK is not empty
    run = _cli("convert", str(base["source"]), str(work), "--new-key", "--quiet", "--no-report", cwd=elsewhere)
    assert run.returncode == 2 and "Traceback" not in run.stderr and "--new-key is only for an empty WORK" in run.stderr
    assert not (work / "private" / deid.KEY_FILE).exists()
    assert (work / "private" / pipeline.ID_MAP).read_bytes() == id_map


def test_new_key_only_for_an_empty_work(base, work, tmp_path) -> None:
    before = _tree(work)
    with pytest.raises(KeyFileError, match="--new-key is only for an empty WORK"):
        _convert(base["source"], work, new_key=True)
    assert _tree(work) == before
    # an empty WORK: a new key, so other ids than the base WORK's
    fresh = tmp_path / "fresh"
    summary = _convert(base["source"], fresh, new_key=True, exams=["EX0000"])
    assert summary.n_converted == 1
    new_key = (fresh / "private" / deid.KEY_FILE).read_text()
    assert new_key != base["key"]
    assert pipeline.read_id_map(fresh)["EX0000"]["case_id"] != base["id_map"]["EX0000"]["case_id"]


def test_a_damaged_key_file_is_refused_without_a_traceback(base, work) -> None:
    (work / "private" / deid.KEY_FILE).write_text("not a key\n")
    before = _tree(work)
    with pytest.raises(KeyFileError, match="restore the original key file"):
        _convert(base["source"], work)
    assert _tree(work) == before


# --- one study, one exam; the DICOM patient is clinical.csv's -----------------------------------


def test_the_same_study_under_a_second_exam_id_leaves_the_first_case_alone(base, work, tmp_path) -> None:
    rows = _rows(base["source"])
    rows.append({**rows[0], "exam_id": "EX0099", "patient_id": "ANOTHER-PATIENT-4711", "sex": "F"})
    source = _source(base["source"], tmp_path / "source", rows=rows, alias={"EX0099": "EX0000"})
    case_id, _ = _expected_ids(base, "EX0000")
    before = _tree(work / "cases")
    results = {r.exam_id: r for r in _convert(source, work).results}
    assert results["EX0000"].status is pipeline.Status.SKIPPED  # the owner of the study: untouched
    result = results["EX0099"]
    assert result.status is pipeline.Status.REJECTED and result.stage == "identity"
    assert "EX0000" in result.reason and "EX0099" in result.reason
    assert _tree(work / "cases") == before  # the first case byte for byte, no other case
    assert pipeline.read_id_map(work) == base["id_map"]  # its row unchanged, none for EX0099
    assert set(_failures(work)) == {"EX0099"}
    failure = _failures(work)["EX0099"]
    assert failure["kind"] == "exam" and "EX0000" in failure["reason"]
    assert base["truths"]["EX0000"]["phi_values"]["study_uid"] not in (work / "failures.json").read_text()


def test_the_same_study_twice_in_a_new_work_converts_neither(base, tmp_path) -> None:
    rows = _rows(base["source"])
    rows.append({**rows[1], "exam_id": "EX0098", "patient_id": "ANOTHER-PATIENT-4712"})
    source = _source(base["source"], tmp_path / "source", rows=rows, alias={"EX0098": "EX0001"})
    work = tmp_path / "work"
    (work / "private").mkdir(parents=True)
    (work / "private" / deid.KEY_FILE).write_text(base["key"])
    results = {r.exam_id: r for r in _convert(source, work).results}
    assert {e for e, r in results.items() if r.status is pipeline.Status.REJECTED} == {"EX0001", "EX0098"}
    assert "EX0098" in results["EX0001"].reason and "EX0001" in results["EX0098"].reason
    assert sorted(pipeline.read_id_map(work)) == ["EX0000", "EX0002"]
    assert sorted(p.name for p in (work / "cases").iterdir()) == sorted(
        _expected_ids(base, e)[0] for e in ("EX0000", "EX0002"))


def test_a_study_the_pre_scan_misses_is_still_not_written_over(base, work, tmp_path, monkeypatch) -> None:
    """The worker's own guard: the case folder of the study exists and is another exam's."""
    from builder.convert import identity

    monkeypatch.setattr(identity, "first_study_uid", lambda exam_dir: None)  # the pre-scan sees nothing
    rows = _rows(base["source"])
    rows.append({**rows[2], "exam_id": "EX0097", "patient_id": "ANOTHER-PATIENT-4713"})
    source = _source(base["source"], tmp_path / "source", rows=rows, alias={"EX0097": "EX0002"})
    before = _tree(work / "cases")
    (result,) = _convert(source, work, exams=["EX0097"]).results
    assert result.status is pipeline.Status.REJECTED and result.stage == "identity" and "EX0002" in result.reason
    assert _tree(work / "cases") == before
    assert pipeline.read_id_map(work) == base["id_map"]


def test_a_patient_id_that_is_not_clinical_csvs_rejects_the_exam_hashed_in_failures(base, tmp_path, caplog) -> None:
    dicom_id = "MRN-0099-OTHER"
    source = _source(base["source"], tmp_path / "source", headers={"EX0001": {"PatientID": dicom_id}})
    clinical_id = base["truths"]["EX0001"]["patient_id"]
    work = tmp_path / "work"
    with caplog.at_level(logging.WARNING):
        results = {r.exam_id: r for r in _convert(source, work).results}
    result = results["EX0001"]
    assert result.status is pipeline.Status.REJECTED and result.stage == "identity"
    assert results["EX0000"].status is results["EX0002"].status is pipeline.Status.CONVERTED
    assert "EX0001" not in pipeline.read_id_map(work)
    assert len(list((work / "cases").iterdir())) == 2
    key = (work / "private" / deid.KEY_FILE).read_bytes().decode().strip()
    saved = (work / "failures.json").read_text()
    assert dicom_id not in saved and clinical_id not in saved  # only hashed in the shared file
    reason = _failures(work)["EX0001"]["reason"]
    assert deid.phi_digest(bytes.fromhex(key), dicom_id) in reason
    assert deid.phi_digest(bytes.fromhex(key), clinical_id) in reason
    assert dicom_id in caplog.text and clinical_id in caplog.text  # both values in the maintainer's log
    assert (work / "failures.json").stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize("edit,expected", [({"sex": "F"}, "PatientSex"), ({"age": "52"}, "PatientBirthDate"),
                                           ({"age": "38"}, "PatientBirthDate"), ({"age": "37"}, None)])
def test_sex_and_birth_date_must_agree_with_the_row(base, tmp_path, edit, expected) -> None:
    """The truth: EX0000's headers say M, born so that the patient is 35 at the exam (37 is within two years)."""
    rows = _rows(base["source"])
    rows[0].update(edit)
    source = _source(base["source"], tmp_path / "source", rows=rows)
    (result,) = _convert(source, tmp_path / "work", exams=["EX0000"]).results
    if expected is None:
        assert result.status is pipeline.Status.CONVERTED, result.reason
        return
    assert result.status is pipeline.Status.REJECTED and result.stage == "identity" and expected in result.reason
    assert not any((tmp_path / "work" / "cases").iterdir())


# --- the leak check: values, not the format's own words -----------------------------------------


def test_a_patient_named_like_the_case_formats_words_converts(base, work, tmp_path) -> None:
    name = "PEAK^EULER^MATTES^NORM"
    source = _source(base["source"], tmp_path / "source", headers={"EX0000": {"PatientName": name}})
    (result,) = _convert(source, work, exams=["EX0000"]).results
    assert result.status is pipeline.Status.CONVERTED, result.reason  # its headers changed: converted again
    assert result.case_id == _expected_ids(base, "EX0000")[0]
    assert pipeline.read_id_map(work) == base["id_map"]
    text = (work / "cases" / result.case_id / "case.json").read_text()
    # the words are there as the format's own keys and codes: what the old check took for the name
    assert '"suv_peak"' in text and '"mattes_mi"' in text and '"NORM"' in text


@pytest.mark.parametrize("attribute,value,planted", [
    ("PatientName", "PEAK^JOHN", "OSEM3D peak"),
    ("AccessionNumber", "A20190417", "OSEM3D 4i5s A20190417"),
    ("AccessionNumber", "20190417553", "OSEM 20190417553"),
])
def test_an_identifier_inside_a_value_is_still_caught(base, tmp_path, attribute, value, planted) -> None:
    """The identifier as a whole token of a header value that convert copies (PET ReconstructionMethod)."""
    source = _source(base["source"], tmp_path / "source",
                     headers={"EX0000": {attribute: value, "ReconstructionMethod": planted}})
    work = tmp_path / "work"
    (result,) = _convert(source, work, exams=["EX0000"]).results
    assert result.status is pipeline.Status.REJECTED and result.stage == "deid"
    assert f"case.json contains the exam's {attribute}" in result.reason
    assert not any((work / "cases").iterdir())
    assert planted.split()[-1].lower() not in (work / "failures.json").read_text().lower()  # named, not shown


def test_the_leak_check_reads_values_in_lists_and_foreign_keys_but_not_the_formats_codes(tmp_path) -> None:
    """find_identifiers on a hand-made case folder: where a value can hide, and where a word is the format's."""
    ids = [("PatientName", "Peak"), ("PatientName", "Burkitt"), ("PatientName", "Norm"), ("AccessionNumber", "A2019")]

    def hits(payload: dict) -> list[str]:
        folder = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        (folder / "case.json").write_text(json.dumps(payload))
        return deid.find_identifiers(folder, ids, show_values=False)

    clean = {"lesions": {"suv_peak": 3.0, "grids": {"suv_peak": "pet"}}, "pet": {"corrected_image": ["NORM", "ATTN"]},
             "clinical": {"subtype": "Burkitt", "diagnosis": "NHL"}, "qc": {"checks": [{"name": "suv_peak"}]}}
    assert hits(clean) == []
    assert hits({"lesions": {"items": [{"volume_ml": 1.0}, {"note": "seen by peak"}]}}) == [
        "case.json contains the exam's PatientName"]  # a string inside a list
    assert hits({"ct": {"Peak": 1}}) == ["case.json contains the exam's PatientName"]  # a key that is not the project's
    assert hits({"clinical": {"subtype": "Burkitt (Dr Norm)"}}) == ["case.json contains the exam's PatientName"] * 2
    assert hits({"ct": {"reconstruction_method": ["OSEM", "A2019"]}}) == ["case.json contains the exam's AccessionNumber"]


# --- clinical.csv as re-exported ---------------------------------------------------------------


def test_dates_re_exported_as_dd_mm_yyyy_refuse_the_table_and_change_nothing(base, work, tmp_path) -> None:
    rows = _rows(base["source"])
    for row in rows:
        y, m, d = row["exam_date"].split("-")
        row["exam_date"] = f"{d}/{m}/{y}"
    source = _source(base["source"], tmp_path / "source", rows=rows)
    before = _tree(work)
    with pytest.raises(ClinicalError) as e:
        _convert(source, work)
    message = str(e.value)
    assert "clinical.csv" in message and "exam_date" in message and "line 2" in message and "YYYY-MM-DD" in message
    assert _tree(work) == before  # every case, the id_map, failures.json as they were
    # through the console: one message, no traceback
    run = _cli("convert", str(source), str(work), "--quiet", "--no-report", cwd=tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr and "exam_date" in run.stderr, run.stderr
    assert _tree(work) == before


def test_a_latin1_clinical_csv_is_read_as_the_same_table(base, work, tmp_path, caplog) -> None:
    """Patient ids with accents: the cp1252 file gives the ids the UTF-8 file gives, and case ids are unchanged."""
    caplog.set_level(logging.INFO, logger="builder.convert.clinical")
    rows = _rows(base["source"])
    text = _csv_text(rows)
    utf8 = _source(base["source"], tmp_path / "utf8", clinical=text.encode("utf-8"))
    latin = _source(base["source"], tmp_path / "latin", clinical=text.encode("cp1252"))
    from builder.convert.clinical import read_clinical

    assert read_clinical(latin / "clinical.csv") == read_clinical(utf8 / "clinical.csv")
    accented = [dict(r, patient_id=r["patient_id"] + "-Müller-Jérôme") for r in rows]
    a = _source(base["source"], tmp_path / "a", clinical=_csv_text(accented).encode("utf-8-sig"))
    b = _source(base["source"], tmp_path / "b", clinical=_csv_text(accented).encode("latin-1"))
    table_a, table_b = read_clinical(a / "clinical.csv"), read_clinical(b / "clinical.csv")
    assert table_a == table_b and table_b["EX0000"].patient_id.endswith("-Müller-Jérôme")
    assert "is not UTF-8: read as cp1252" in caplog.text  # said once per read, for the maintainer to re-save
    summary = _convert(latin, work)
    assert summary.n_skipped == 3, summary.line()  # the same table: nothing reconverted
    assert pipeline.read_id_map(work) == base["id_map"]


def test_a_table_in_no_known_encoding_or_with_semicolons_is_refused_clearly(base, tmp_path) -> None:
    from builder.convert.clinical import read_clinical

    text = _csv_text(_rows(base["source"]))
    (tmp_path / "utf16.csv").write_bytes(text.encode("utf-16"))
    with pytest.raises(ClinicalError, match="UTF-16"):
        read_clinical(tmp_path / "utf16.csv")
    (tmp_path / "semi.csv").write_text(text.replace(",", ";"))
    with pytest.raises(ClinicalError, match="semicolons"):
        read_clinical(tmp_path / "semi.csv")


def test_a_missing_subtype_column_is_refused_not_published_as_unknown(base, work, tmp_path) -> None:
    rows = [{k: v for k, v in r.items() if k != "subtype"} for r in _rows(base["source"])]
    source = _source(base["source"], tmp_path / "source", rows=rows)
    before = _tree(work)
    with pytest.raises(ClinicalError, match="lacks the column.*subtype.*empty cell means unknown"):
        _convert(source, work)
    assert _tree(work) == before


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", ".hidden", "x\\y"])
def test_an_exam_id_that_is_a_path_is_refused_naming_the_row(base, tmp_path, bad) -> None:
    rows = _rows(base["source"])
    rows.append({**rows[0], "exam_id": bad})
    source = _source(base["source"], tmp_path / "source", rows=rows)
    work = tmp_path / "sub" / "work"
    with pytest.raises(ClinicalError) as e:
        _convert(source, work)
    assert "line 5" in str(e.value) and repr(bad) in str(e.value)
    assert not work.exists()  # refused before WORK was made
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]  # nothing written beside either


def test_failures_json_carries_no_clinical_value_and_is_not_world_readable(base, work, tmp_path) -> None:
    free_text = "DLBCL, seen at St Elsewhere 2018-04-02"
    rows = _rows(base["source"])
    rows[1]["subtype"] = free_text
    rows[2]["age"] = "forty-one"
    source = _source(base["source"], tmp_path / "source", rows=rows)
    old = os.umask(0)  # the mode is set whatever the umask
    try:  # 2 of the 3 cases go: past the mass-retirement guard on purpose
        summary = _convert(source, work, allow_mass_retirement=True)
    finally:
        os.umask(old)
    assert summary.n_rejected == 2
    saved = (work / "failures.json").read_text()
    for value in (free_text, "Elsewhere", "forty-one", *(r["notes"] for r in rows), rows[0]["patient_id"]):
        assert value not in saved
    failures = _failures(work)
    assert "subtype" in failures["EX0001"]["reason"] and "age" in failures["EX0002"]["reason"]
    assert (work / "failures.json").stat().st_mode & 0o777 == 0o640
    from builder.report import write_report

    index = write_report(work)
    assert index.stat().st_mode & 0o777 == 0o640 and "Elsewhere" not in index.read_text()
