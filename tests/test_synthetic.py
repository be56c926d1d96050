"""The synthetic cohort generator against its own truth, checked with peer tools (SimpleITK,
dcm2niix, nibabel, highdicom, pydicom) and a straightforward SUV reference."""

from __future__ import annotations

import csv
import datetime as dt

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from builder.synthetic import generate_cohort, load_truth, sha256_tree


def _series_files(src, exam_id, series_uid):
    files = []
    for p in sorted((src / "dicom" / exam_id).rglob("*")):
        if p.is_file():
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            if ds.SeriesInstanceUID == series_uid:
                files.append(p)
    return files


def _sitk_series(src, exam_id, series_uid):
    # GDCM finds the series' files in the nested folders and sorts them along the slice normal.
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(src / "dicom" / exam_id), series_uid, False, True)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    return reader.Execute()


def test_same_seed_identical_bytes(tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    generate_cohort(a, n_exams=2, seed=5, variants=[{"mask_format": "seg"}, {"vendor": "philips"}])
    generate_cohort(b, n_exams=2, seed=5, variants=[{"mask_format": "seg"}, {"vendor": "philips"}])
    assert sha256_tree(a) == sha256_tree(b)
    c = tmp_path / "c"
    generate_cohort(c, n_exams=2, seed=6, variants=[{"mask_format": "seg"}, {"vendor": "philips"}])
    assert sha256_tree(a) != sha256_tree(c)


def test_default_exams_are_good_siemens_hfs(synthetic_good_cohort):
    src, truths = synthetic_good_cohort
    assert [t.expected for t in truths] == ["accept"] * 3
    for t in truths:
        assert t.variant["vendor"] == "siemens" and t.variant["patient_position"] == "HFS"
        assert (src / "masks" / f"{t.exam_id}.nii.gz").is_file()


@pytest.mark.parametrize("exam", range(9))
def test_sitk_series_reader_geometry_and_values(synthetic_cohort, exam):
    src, truths = synthetic_cohort
    t = truths[exam].truth
    assert t["expected"] == "accept"
    for modality in ("ct", "pet"):
        g = t[modality]
        img = _sitk_series(src, t["exam_id"], g["series_uid"])
        assert list(img.GetSize()) == g["size"]
        np.testing.assert_allclose(img.GetSpacing(), g["spacing"], atol=1e-4)
        np.testing.assert_allclose(img.GetOrigin(), g["origin"], atol=1e-3)
        np.testing.assert_allclose(img.GetDirection(), g["direction"], atol=1e-6)
    ct = sitk.GetArrayFromImage(_sitk_series(src, t["exam_id"], t["ct"]["series_uid"]))
    np.testing.assert_array_equal(ct, np.load(src / "truth" / t["exam_id"] / "ct_hu.npy"))


def test_nifti_masks_equal_truth(synthetic_cohort):
    src, truths = synthetic_cohort
    n = 0
    for et in truths:
        t = et.truth
        path = src / "masks" / f"{t['exam_id']}.nii.gz"
        if t["variant"]["mask_format"] != "nifti":
            continue
        mask = np.load(src / "truth" / t["exam_id"] / "mask.npy")
        img = sitk.ReadImage(str(path))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img), mask)
        np.testing.assert_allclose(img.GetOrigin(), t["ct"]["origin"], atol=1e-4)
        np.testing.assert_allclose(img.GetDirection(), t["ct"]["direction"], atol=1e-6)
        assert mask.sum() * np.prod(t["ct"]["spacing"]) / 1000 == pytest.approx(t["tmtv_ml"])
        assert sum(les["n_voxels"] for les in t["lesions"]) == mask.sum()
        n += 1
    assert n >= 4
