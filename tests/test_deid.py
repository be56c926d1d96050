"""builder.convert.deid / builder.convert.clinical: keyed ids, banded ages, relative dates, scrubbing, leak search."""

from __future__ import annotations

import gzip
import hashlib
import json

import numpy as np
import pytest

from builder.convert import clinical, deid
from builder.convert.case import write_nifti
from builder.errors import ClinicalError


def test_ids_are_stable_keyed_and_not_plain_hashes(tmp_path) -> None:
    key = deid.load_or_create_key(tmp_path / "private")
    assert deid.load_or_create_key(tmp_path / "private") == key  # reused across runs
    assert (tmp_path / "private" / deid.KEY_FILE).stat().st_mode & 0o077 == 0  # owner only
    a = deid.make_case_id(key, "1.2.840.1.2.3")
    assert a == deid.make_case_id(key, "1.2.840.1.2.3")
    assert a != deid.make_case_id(key, "1.2.840.1.2.4")
    assert a != deid.make_case_id(b"another key of 32 bytes........", "1.2.840.1.2.3")
    assert a.startswith("LA-") and len(a) == 3 + deid.ID_HEX_DIGITS
    # not derivable without the key: differs from an unkeyed hash of the identifier
    assert a[3:] not in hashlib.sha256(b"1.2.840.1.2.3").hexdigest()
    s = deid.make_subject_id(key, "PAT-0001")
    assert s.startswith("LP-") and s == deid.make_subject_id(key, "PAT-0001")


def test_ids_are_the_documented_hmac_of_a_domain_and_the_identifier() -> None:
    # docs/contracts.md: "LA-" + hex(HMAC-SHA256(key, "case\\0" + StudyInstanceUID))[:8], "LP-" + ... "subject\\0"
    # + patient id; phi_digest's "hash " + ... "phi\\0" + the stripped value. Recomputed with the standard library
    # (equal to `printf 'case\\0UID' | openssl dgst -sha256 -mac HMAC -macopt hexkey:...`).
    import hmac

    key = bytes(range(32))

    def mac(message: bytes) -> str:
        return hmac.new(key, message, hashlib.sha256).hexdigest()[:8]

    uid, patient = "1.2.840.113619.2.55.3.604688119", "PAT-0001 Ünïcode"
    assert deid.make_case_id(key, uid) == "LA-" + mac(b"case\x00" + uid.encode())
    assert deid.make_subject_id(key, patient) == "LP-" + mac(b"subject\x00" + patient.encode("utf-8"))
    assert deid.phi_digest(key, "  PAT-0001 ") == "hash " + mac(b"phi\x00PAT-0001")
    # the domains keep a case id and a subject id of the same text apart
    assert deid.make_case_id(key, "X1")[3:] != deid.make_subject_id(key, "X1")[3:]


@pytest.mark.parametrize("age,band", [(0, "0-4"), (4, "0-4"), (45, "45-49"), (49, "45-49"), (89, "85-89"),
                                      (90, "90+"), (104, "90+")])
def test_age_bands(age, band) -> None:
    assert deid.age_band(age) == band


def test_scrub_drops_ps315_attributes_recursively() -> None:
    meta = {
        "manufacturer": "GE", "model": "Discovery", "kvp": 120.0,
        "institution_name": "X", "station_name": "Y", "series_date": "20200101", "acquisition_time": "101010",
        "study_uid": "1.2", "device_serial_number": "123", "patient_weight": 70,
        "suv": {"factor": 1e-4, "weight_kg": 70.0, "decay_time_s": 3600.0, "injection_datetime": "2020-01-01T10:00"},
    }
    out = deid.scrub(meta)
    assert out == {"manufacturer": "GE", "model": "Discovery", "kvp": 120.0,
                   "suv": {"factor": 1e-4, "decay_time_s": 3600.0}}


def test_find_identifiers_searches_names_json_and_nifti_headers(tmp_path) -> None:
    folder = tmp_path / "LA-1"
    folder.mkdir()
    (folder / "case.json").write_text(json.dumps({"note": "nothing here"}))
    write_nifti(folder / "ct.nii.gz", np.zeros((2, 2, 2), np.int16), np.eye(4))
    assert deid.find_identifiers(folder, [("PatientID", "PAT-SECRET-1")]) == []
    (folder / "case.json").write_text(json.dumps({"note": "pat-secret-1"}))
    assert deid.find_identifiers(folder, [("PatientID", "PAT-SECRET-1")]) == [
        "case.json contains the PatientID value 'pat-secret-1'"]
    # a NIfTI whose descrip carries a name (what some converters write) is caught after decompression
    import nibabel as nib

    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4))
    img.header["descrip"] = b"Doe^Jane PAT-SECRET-2"
    nib.save(img, folder / "pet.nii.gz")
    assert deid.find_identifiers(folder, [("OtherPatientIDs", "PAT-SECRET-2")]) == [
        "pet.nii.gz contains the OtherPatientIDs value 'pat-secret-2'"]
    (folder / "PAT-SECRET-3.txt").write_text("x")
    assert deid.find_identifiers(folder, ["PAT-SECRET-3"]) == [
        "the name 'PAT-SECRET-3.txt' contains the identifier value 'pat-secret-3'"]


def test_a_text_file_that_is_not_utf8_is_still_searched(tmp_path) -> None:
    # a stray Latin-1 byte (a hand-edited note) must not stop the leak check or hide the value beside it
    folder = tmp_path / "LA-2"
    folder.mkdir()
    (folder / "notes.txt").write_bytes(b"reviewed by Fran\xe7ois for PAT-SECRET-4\n")
    assert deid.find_identifiers(folder, [("PatientID", "PAT-SECRET-4")]) == [
        "notes.txt contains the PatientID value 'pat-secret-4'"]


def _case_folder(tmp_path, payload: dict):
    folder = tmp_path / "case"
    folder.mkdir(exist_ok=True)
    (folder / "case.json").write_text(json.dumps(payload))
    return folder


def test_identifiers_match_whole_tokens_of_a_minimum_length(tmp_path) -> None:
    folder = _case_folder(tmp_path, {"ct": {"model": "Doesburg 64", "voxels": 123456, "mean": 0.1234567},
                                     "qc": "Doe^Jane reviewed", "study": 1234})
    # "Doe" is a token of "Doe^Jane" but not of "Doesburg"; too short to search alone
    assert deid.find_identifiers(folder, [("PatientName", "Doe")]) == []
    assert deid.find_identifiers(folder, [("PatientName", "Jane")]) == [
        "case.json contains the PatientName value 'jane'"]
    assert deid.find_identifiers(folder, [("PatientName", "Doesb")]) == []  # inside a longer word
    # digits: a 4-digit StudyID is too short to tell from any number; 6 digits are searched, not inside decimals
    assert deid.find_identifiers(folder, [("StudyID", "1234")]) == []
    assert deid.find_identifiers(folder, [("AccessionNumber", "123456")]) == [
        "case.json contains the AccessionNumber value '123456'"]
    assert deid.find_identifiers(folder, [("AccessionNumber", "234567")]) == []  # digits of 0.1234567


def test_equipment_strings_are_not_identifiers_but_a_name_still_is(tmp_path) -> None:
    folder = _case_folder(tmp_path, {"ct": {"manufacturer": "SIEMENS", "model": "Biograph Vision 600"},
                                     "subtype": "Doe^Jane"})
    equipment = ["SIEMENS", "Biograph Vision 600"]
    ids = [("StationName", "BIOGRAPH"), ("StationName", "Vision"), ("InstitutionName", "SIEMENS"),
           ("PatientName", "Doe^Jane")]
    assert deid.find_identifiers(folder, ids, equipment=equipment) == [
        "case.json contains the PatientName value 'doe^jane'"]
    # without the scanner strings, the station name would be a hit; other attributes get no prefix rule
    assert "case.json contains the StationName value 'biograph'" in deid.find_identifiers(folder, ids)
    assert deid.find_identifiers(folder, [("InstitutionName", "Biograph")], equipment=equipment) == [
        "case.json contains the InstitutionName value 'biograph'"]


def test_written_nifti_headers_carry_no_text(tmp_path) -> None:
    write_nifti(tmp_path / "x.nii.gz", np.ones((3, 4, 5), np.float32), np.diag([-2.0, -2.0, 3.0, 1.0]))
    raw = gzip.decompress((tmp_path / "x.nii.gz").read_bytes())
    import nibabel as nib

    hdr = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(raw))
    for field in ("descrip", "aux_file", "intent_name", "db_name"):
        assert bytes(hdr[field]).strip(b"\0") == b""
    assert raw[4:] and (tmp_path / "x.nii.gz").read_bytes()[4:8] == b"\0\0\0\0"  # gzip mtime 0


CSV = """exam_id,patient_id,exam_date,sex,age,diagnosis,subtype,notes
E2,P1,2021-03-10,F,47,HL,nodular sclerosis,"Dr Who, MRN P1"
E1,P1,2020-12-31,F,46,HL,nodular sclerosis,
E3,P2,2019-05-05,M,91,NHL,DLBCL,
"""


def test_clinical_table_relative_days_and_exam_index(tmp_path) -> None:
    (tmp_path / "clinical.csv").write_text(CSV)
    t = clinical.read_clinical(tmp_path / "clinical.csv")
    assert t["E1"].published() == {"diagnosis": "HL", "subtype": "nodular sclerosis", "sex": "F", "age_band": "45-49",
                                   "exam_index": 0, "days_from_first_exam": 0}
    assert t["E2"].exam_index == 1 and t["E2"].days_from_first_exam == 69
    assert t["E3"].published()["age_band"] == "90+"
    assert "notes" not in json.dumps(t["E2"].published()) and "Who" not in json.dumps(t["E2"].published())


def test_clinical_table_duplicate_exam_names_the_line(tmp_path) -> None:
    # row-level rejections (bad date, sex, age, diagnosis, subtype) are tested in tests/test_clinical.py
    (tmp_path / "clinical.csv").write_text(CSV + "E2,P9,2020-01-01,F,40,HL,ns,\n")
    with pytest.raises(ClinicalError, match="twice") as e:
        clinical.read_clinical(tmp_path / "clinical.csv")
    assert "line 5" in str(e.value)


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def _modes(private) -> dict[str, int]:
    return {p.name: p.stat().st_mode & 0o777 for p in [private, *private.iterdir()]}


@pytest.mark.parametrize("umask,existing", [(0o022, False), (0o000, True)])
def test_private_folder_and_files_are_owner_only_whatever_the_umask(tmp_path, umask, existing) -> None:
    """`python -m builder convert` as a user runs it, with a permissive umask, on a new or an older WORK."""
    import os
    import subprocess
    import sys

    source, work = tmp_path / "source", tmp_path / "work"
    (source / "dicom" / "E1").mkdir(parents=True)  # rejected at its clinical row: no DICOM needed
    (source / "clinical.csv").write_text(CSV.replace("E1,P1,2020-12-31,F,46,HL,nodular sclerosis,",
                                                     "E1,P1,2020-12-31,F,46,HL,nodular sclerosis (see notes),"))
    private = work / "private"
    if existing:  # left by an older builder with world-readable modes
        private.mkdir(parents=True)
        os.chmod(private, 0o777)
        (private / deid.KEY_FILE).write_text("ab" * 32 + "\n")
        (private / "id_map.csv").write_text("exam_id,patient_id,case_id,subject_id\nE0,P0,LA-00000000,LP-00000000\n")
        for p in private.iterdir():
            os.chmod(p, 0o666)
    run = subprocess.run(
        [sys.executable, "-m", "builder", "convert", str(source), str(work), "--workers", "1", "--quiet",
         "--no-report", "--exams", "E1"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300,
        preexec_fn=lambda: os.umask(umask),
    )
    assert run.returncode == 1, run.stderr  # E1 rejected (its subtype is free text)
    modes = _modes(private)
    assert {deid.KEY_FILE, "id_map.csv"} <= set(modes), modes
    assert modes.pop("private") == 0o700
    assert all(mode == 0o600 for mode in modes.values()), {k: oct(v) for k, v in modes.items()}
    if existing:
        assert (private / deid.KEY_FILE).read_text().strip() == "ab" * 32  # the key is kept, only its mode changes


def _one_exam_source(cohort_source, dest, exam_id: str = "EX0000", **header):
    """A copy of one exam of a synthetic source with ``header`` keywords rewritten in every DICOM file."""
    import shutil

    import pydicom

    shutil.copytree(cohort_source / "dicom" / exam_id, dest / "dicom" / exam_id)
    shutil.copytree(cohort_source / "masks", dest / "masks")
    shutil.copy(cohort_source / "clinical.csv", dest / "clinical.csv")
    names = set()
    for path in sorted((dest / "dicom" / exam_id).rglob("*")):
        if not path.is_file():
            continue
        ds = pydicom.dcmread(path)
        names.add(str(ds.PatientName))
        for kw, value in header.items():
            setattr(ds, kw, value)
        ds.save_as(path)
    return names.pop()


@pytest.mark.slow
def test_a_site_whose_station_name_is_its_scanner_model_converts_and_a_real_leak_is_caught(
    synthetic_good_cohort, tmp_path, monkeypatch
) -> None:
    from builder.convert import pipeline

    source = tmp_path / "source"
    name = _one_exam_source(synthetic_good_cohort[0], source, StationName="BIOGRAPH",
                            ManufacturerModelName="Biograph Vision 600")
    summary = pipeline.convert_cohort(source, tmp_path / "work", exams=["EX0000"], workers=1, progress=False)
    [result] = summary.results
    assert result.status is pipeline.Status.CONVERTED, result.reason
    info = json.loads((tmp_path / "work" / "cases" / result.case_id / "case.json").read_text())
    assert info["ct"]["model"] == "Biograph Vision 600"  # published, and the station name with it is no leak

    # a real leak: the patient's name in a published column is caught, naming the attribute and the file
    published = clinical.ClinicalRecord.published
    monkeypatch.setattr(clinical.ClinicalRecord, "published", lambda self: {**published(self), "subtype": name})
    summary = pipeline.convert_cohort(source, tmp_path / "work2", exams=["EX0000"], workers=1, progress=False)
    [result] = summary.results
    assert result.status is pipeline.Status.REJECTED and result.stage == "deid"
    assert "case.json contains the exam's PatientName" in result.reason and name not in result.reason  # named, not shown
    assert not list((tmp_path / "work2" / "cases").iterdir())


def test_header_identifiers_reads_every_guarded_value_and_each_name_part(tmp_path) -> None:
    """What the pipeline's leak check looks for, read back from a written DICOM header."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = pydicom_dataset(PatientName="DOE^JANE^Q", PatientID="PAT0042", AccessionNumber="A20240305123",
                         OtherPatientIDs=["OPI-1", "OPI-2"], StationName="PETCT01", Manufacturer="SIEMENS",
                         ManufacturerModelName="Biograph Vision 600", InstitutionName="", StudyID="7")
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.128", "1.2.3.4.5"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    path = tmp_path / "one.dcm"
    ds.save_as(path, enforce_file_format=True)
    (tmp_path / "broken.dcm").write_bytes(b"not dicom")
    identifiers, equipment = deid.header_identifiers([tmp_path / "broken.dcm", path])
    assert sorted(identifiers) == sorted([
        ("PatientName", "DOE^JANE^Q"), ("PatientName", "DOE"), ("PatientName", "JANE"), ("PatientName", "Q"),
        ("PatientID", "PAT0042"), ("OtherPatientIDs", "OPI-1"), ("OtherPatientIDs", "OPI-2"),
        ("AccessionNumber", "A20240305123"), ("StationName", "PETCT01"), ("StudyID", "7"),
    ])
    assert sorted(equipment) == ["Biograph Vision 600", "SIEMENS"]


def pydicom_dataset(**attributes):
    from pydicom.dataset import Dataset

    ds = Dataset()
    for key, value in attributes.items():
        setattr(ds, key, value)
    return ds


@pytest.mark.parametrize("name", ["id_map.csv", "notes.txt", "README.md", "ct.nii"])
def test_find_identifiers_reads_csv_text_markdown_and_plain_nifti(tmp_path, name) -> None:
    folder = tmp_path / "LA-2"
    folder.mkdir()
    if name.endswith(".nii"):
        import nibabel as nib

        img = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4))
        img.header["descrip"] = b"A20240305123"
        nib.save(img, folder / name)
    else:
        (folder / name).write_text("case,accession\nLA-2,A20240305123\n")
    (folder / "other.bin").write_bytes(b"A20240305123")  # not a format the release publishes: not read
    assert deid.find_identifiers(folder, [("AccessionNumber", "A20240305123")]) == [
        f"{name} contains the AccessionNumber value 'a20240305123'"]


def test_json_texts_searches_every_value_but_the_documented_codes() -> None:
    # the rule of CODED_VALUES and the vocabularies, case by case: what is searched and what is a code
    doc = {
        "case_id": "LA-1", "Doe^Jane": 1.5, "count": 123456, "flag": True, "ratio": 0.5,
        "clinical": {"subtype": "DLBCL", "diagnosis": "NHL", "sex": "F", "age_band": "45-49", "note": "Jane"},
        "pet": {"units": "BQML", "corrected_image": ["NORM", "ATTN"], "suv": {"units": "SUVbw"}},
        "ct": {"modality": "CT", "model": "Biograph", "extra": {"units": "Janeunit"}},
        "lesions": {"grids": {"tlg": "ct"}, "tag": "lesionname"},
        "qc": {"checks": [{"name": "suv_max", "value": 3, "threshold": 2, "detail": "Dr Who"}]},
        "units": "topunits",
    }
    want = ["Doe^Jane", "123456", "Jane", "Biograph", "Janeunit", "lesionname", "Dr Who", "topunits"]
    assert sorted(deid.json_texts(doc)) == sorted(want)
    # a value of a vocabulary is a code only when it is one of the vocabulary's codes
    assert deid.json_texts({"clinical": {"subtype": "Jane Doe", "sex": "Jane", "diagnosis": "Doe"}}) == [
        "Jane Doe", "Jane", "Doe"]


def test_the_leak_check_reads_past_skipped_values_and_files_and_nifti_extensions(tmp_path) -> None:
    import json as json_mod

    import nibabel as nib

    folder = tmp_path / "LA-3"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"PAT0042")  # sorted first, not a published format: skipped, not a stop
    (folder / "case.json").write_text(json_mod.dumps({"pet": {"corrected_image": ["NORM"]}, "ct": {"model": "Biograph Vision 600"}}))
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4))
    img.header["descrip"] = b"A20240305123"  # in the header proper
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"patient DOE^JANE PAT0042"))  # after it
    nib.save(img, folder / "pet.nii.gz")
    ids = [("OtherPatientIDs", ""), ("StationName", "Biograph"), ("PatientName", "Norm"), ("PatientID", "PAT0042"),
           ("AccessionNumber", "A20240305123")]
    hits = deid.find_identifiers(folder, ids, equipment=["Biograph Vision 600"])
    # an empty value and an equipment string are skipped, the next identifiers still searched; NORM is a code
    assert hits == ["pet.nii.gz contains the PatientID value 'pat0042'",
                    "pet.nii.gz contains the AccessionNumber value 'a20240305123'"]
    assert deid.find_identifiers(folder, ids, equipment=["Biograph Vision 600"], show_values=False) == [
        "pet.nii.gz contains the exam's PatientID", "pet.nii.gz contains the exam's AccessionNumber"]


def test_a_key_file_needs_16_bytes_and_a_new_key_has_32(tmp_path) -> None:
    key = deid.load_or_create_key(tmp_path / "new")
    assert len(key) == 32 and (tmp_path / "new" / deid.KEY_FILE).read_text().strip() == key.hex()
    for n, ok in ((16, True), (15, False)):
        private = tmp_path / f"k{n}"
        private.mkdir()
        (private / deid.KEY_FILE).write_text("ab" * n + "\n")
        if ok:
            assert deid.load_or_create_key(private) == b"\xab" * n
        else:
            from builder.errors import KeyFileError

            with pytest.raises(KeyFileError, match="at least 16 bytes"):
                deid.load_or_create_key(private)
    # a key file that is not hex digits at all (32 characters) is refused the same way
    (tmp_path / "nothex").mkdir()
    (tmp_path / "nothex" / deid.KEY_FILE).write_text("not a key, not hex digits: zz" + "\n")
    from builder.errors import KeyFileError

    with pytest.raises(KeyFileError, match="at least 16 bytes written as hex digits"):
        deid.load_or_create_key(tmp_path / "nothex")


def test_header_identifiers_read_past_a_blank_value_and_keep_every_scanner_value(tmp_path) -> None:
    # A blank component of a multi-valued attribute is skipped, not a stop; a multi-valued scanner
    # attribute gives every value (truth: the values written below).
    ds = pydicom_dataset(OtherPatientIDs=["  ", "OPI-9"], PatientID="PAT0042",
                         Manufacturer=["SIEMENS", "Healthineers"], ManufacturerModelName="Biograph Vision 600")
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.128", "1.2.3.4.6"
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.save_as(tmp_path / "one.dcm", enforce_file_format=True)
    identifiers, equipment = deid.header_identifiers([tmp_path / "one.dcm"])
    assert sorted(identifiers) == [("OtherPatientIDs", "OPI-9"), ("PatientID", "PAT0042")]
    assert sorted(equipment) == ["Biograph Vision 600", "Healthineers", "SIEMENS"]


@pytest.mark.parametrize(("station", "equipment", "is_equipment"), [
    ("Vision", ["  ", "Biograph Vision 600"], True),  # a blank scanner string is skipped, the next one read
    ("VISION", ["Biograph_Vision"], True),  # "_" separates words
    ("600", ["Biograph Vision-600"], True),  # so does any other non-word character
    ("BIOGRAPH", ["Biograph Vision 600"], True),  # a prefix
    ("PETCT01", ["SIEMENS", "Biograph Vision 600"], False),  # neither a prefix nor a word
    ("Visio", ["Biograph Vision 600"], False),  # part of a word only
    ("Vision 600", ["Biograph Vision 600"], False),  # two words, not a prefix
])
def test_a_station_name_is_equipment_only_as_a_prefix_or_a_word_of_a_scanner_string(
    tmp_path, station, equipment, is_equipment
) -> None:
    folder = _case_folder(tmp_path, {"qc": f"seen on {station} today"})
    hits = deid.find_identifiers(folder, [("StationName", station)], equipment=equipment)
    assert hits == ([] if is_equipment else [f"case.json contains the StationName value {station.lower()!r}"])


def test_the_leak_check_names_the_case_folder_itself_but_not_the_project_file_names(tmp_path) -> None:
    folder = tmp_path / "PAT0042-exam"  # a folder named after the patient
    folder.mkdir()
    (folder / "case.json").write_text(json.dumps({"note": "clean"}))
    write_nifti(folder / "label.nii.gz", np.zeros((2, 2, 2), np.uint8), np.eye(4))
    assert deid.find_identifiers(folder, [("PatientID", "PAT0042")]) == [
        "the name 'PAT0042-exam' contains the PatientID value 'pat0042'"]
    assert deid.find_identifiers(folder, [("PatientID", "PAT0042")], show_values=False) == [
        "a file name contains the exam's PatientID"]
    # the project's own file names are vocabulary: a patient named Label, Case or Transform is no leak there
    (folder / "transform.tfm").write_text("#Insight Transform File V1.0\n")
    names = [("PatientName", "Label"), ("PatientName", "Case"), ("PatientName", "Transform")]
    assert deid.find_identifiers(folder, names) == []
    # a hit in a sub-folder names its path in the case folder
    (folder / "lesions").mkdir()
    (folder / "lesions" / "notes.txt").write_text("reviewed for PAT0042")
    assert deid.find_identifiers(folder, [("PatientID", "PAT0042")])[1:] == [
        "lesions/notes.txt contains the PatientID value 'pat0042'"]
    (folder / "lesions" / "notes.txt").unlink()
    (folder / "Label-notes.txt").write_text("x")
    assert deid.find_identifiers(folder, [("PatientName", "Label")]) == [
        "the name 'Label-notes.txt' contains the PatientName value 'label'"]


def test_work_key_creates_a_key_only_for_a_work_without_identities(tmp_path) -> None:
    from builder.errors import KeyFileError

    fresh = tmp_path / "fresh"
    key = deid.work_key(fresh)  # a new WORK: a new key, owner-only
    assert len(key) == 32 and deid.work_key(fresh) == key
    assert _modes(fresh / "private") == {"private": 0o700, deid.KEY_FILE: 0o600}
    with pytest.raises(KeyFileError, match=f"only for an empty WORK, and {fresh} already holds .*{deid.KEY_FILE}"):
        deid.work_key(fresh, new_key=True)
    # case folders (not the temporary ".x" ones) or an id map without the key: refused, nothing created
    cases = tmp_path / "cases_only"
    for name in ("LA-1", "LA-2", ".staging-LA-3"):
        (cases / "cases" / name).mkdir(parents=True)
    (cases / "cases" / "notes.txt").write_text("x")
    assert deid.work_has_identities(cases) == [f"2 case folder(s) in {cases / 'cases'}"]
    with pytest.raises(KeyFileError, match=r"key .* is missing, but .* holds 2 case folder\(s\)"):
        deid.work_key(cases)
    with pytest.raises(KeyFileError, match=r"already holds 2 case folder\(s\)"):
        deid.work_key(cases, new_key=True)
    assert not (cases / "private" / deid.KEY_FILE).exists()
    mapped = tmp_path / "mapped"
    (mapped / "private").mkdir(parents=True)
    (mapped / "private" / "id_map.csv").write_text("exam_id,patient_id,case_id,subject_id\n")
    with pytest.raises(KeyFileError, match="id_map.csv made with it"):
        deid.work_key(mapped)
    staging = tmp_path / "staging_only"  # only a temporary folder: nothing derived yet
    (staging / "cases" / ".staging-LA-1").mkdir(parents=True)
    assert deid.work_has_identities(staging) == [] and len(deid.work_key(staging, new_key=True)) == 32


def test_secure_private_dir_tightens_the_folder_and_its_files_in_process(tmp_path) -> None:
    import os

    old = os.umask(0)
    try:
        nested = deid.secure_private_dir(tmp_path / "a" / "b" / "private")  # parents created, 0700
        assert _modes(nested) == {"private": 0o700}
        loose = tmp_path / "loose"
        loose.mkdir(mode=0o777)
        (loose / "id_map.csv").write_text("x")
        os.chmod(loose / "id_map.csv", 0o644)
        (loose / "sub").mkdir(mode=0o755)  # not a file: left as it is
        deid.secure_private_dir(loose)
        assert (loose.stat().st_mode & 0o777, (loose / "id_map.csv").stat().st_mode & 0o777) == (0o700, 0o600)
        assert (loose / "sub").stat().st_mode & 0o777 == 0o755
    finally:
        os.umask(old)
