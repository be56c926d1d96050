"""builder.deid / builder.clinical: keyed ids, banded ages, relative dates, scrubbing, leak search."""

from __future__ import annotations

import gzip
import hashlib
import json

import numpy as np
import pytest

from builder import clinical, deid
from builder.case import write_nifti
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
    assert deid.find_identifiers(folder, ["PAT-SECRET-1"]) == []
    (folder / "case.json").write_text(json.dumps({"note": "pat-secret-1"}))
    assert deid.find_identifiers(folder, ["PAT-SECRET-1"]) == ["case.json contains 'pat-secret-1'"]
    # a NIfTI whose descrip carries a name (what some converters write) is caught after decompression
    import nibabel as nib

    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4))
    img.header["descrip"] = b"Doe^Jane PAT-SECRET-2"
    nib.save(img, folder / "pet.nii.gz")
    assert any("pet.nii.gz" in h for h in deid.find_identifiers(folder, ["PAT-SECRET-2"]))
    (folder / "PAT-SECRET-3.txt").write_text("x")
    assert any("name" in h for h in deid.find_identifiers(folder, ["PAT-SECRET-3"]))


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
