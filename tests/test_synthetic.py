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

from lymphatlas_synth.cohort import generate_cohort, load_truth, sha256_tree


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


_DETERMINISM_VARIANTS = [
    {"mask_format": "seg", "pet_transfer_syntax": "1.2.840.10008.1.2.5"},
    {"vendor": "philips", "ct_transfer_syntax": "1.2.840.10008.1.2.4.90", "after_midnight": True},
    {"vendor": "ge", "patient_position": "FFS", "ct_transfer_syntax": "1.2.840.10008.1.2.4.80",
     "extra_series": True, "nested_shuffled": True, "bad": "corrupt_file"},
]


def test_same_seed_identical_bytes(tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    generate_cohort(a, n_exams=3, seed=5, variants=_DETERMINISM_VARIANTS)
    generate_cohort(b, n_exams=3, seed=5, variants=_DETERMINISM_VARIANTS)
    assert sha256_tree(a) == sha256_tree(b)
    c = tmp_path / "c"
    generate_cohort(c, n_exams=3, seed=6, variants=_DETERMINISM_VARIANTS)
    assert sha256_tree(a) != sha256_tree(c)


def test_overwrite_replaces_a_cohort(tmp_path):
    out = tmp_path / "src"
    generate_cohort(out, n_exams=2, seed=1)
    before = sha256_tree(out)
    generate_cohort(out, n_exams=1, seed=2, overwrite=True)
    assert sorted(p.name for p in (out / "dicom").iterdir()) == ["EX0000"]
    assert not (out / "truth" / "EX0001.json").exists()
    generate_cohort(out, n_exams=2, seed=1, overwrite=True)
    assert sha256_tree(out) == before


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


# --- helpers reading what was written, independently of the generator -------------------------

def _headers(src, exam_id, series_uid, *, pixels=False):
    out = []
    for p in sorted((src / "dicom" / exam_id).rglob("*")):
        if p.is_file():
            ds = pydicom.dcmread(p, stop_before_pixels=not pixels)
            if ds.SeriesInstanceUID == series_uid:
                out.append(ds)
    # Sort along the slice normal, as a reader must (never by file name or InstanceNumber).
    iop = np.array(out[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    return sorted(out, key=lambda d: float(np.dot(normal, np.array(d.ImagePositionPatient, dtype=float))))


def _dicom_datetime(date, time):
    time = str(time)
    base = dt.datetime.strptime(str(date) + time[:6], "%Y%m%d%H%M%S")
    frac = float("0" + time[6:]) if len(time) > 6 else 0.0
    return base + dt.timedelta(seconds=frac)


def _reference_suv_factor(slices):
    """Body-weight SUV factor from the tags, the plain textbook way (QIBA), for the test only."""
    first = slices[0]
    radio = first.RadiopharmaceuticalInformationSequence[0]
    weight = float(first.PatientWeight)
    dose = float(radio.RadionuclideTotalDose)
    half_life = float(radio.RadionuclideHalfLife)
    start = dt.datetime.strptime(str(radio.RadiopharmaceuticalStartDateTime)[:14], "%Y%m%d%H%M%S")
    if first.DecayCorrection == "ADMIN":
        decay = 1.0
    else:
        series = _dicom_datetime(first.SeriesDate, first.SeriesTime)
        acquisition = min(_dicom_datetime(d.AcquisitionDate, d.AcquisitionTime) for d in slices)
        reference = min(series, acquisition)  # a series time after the scan (GE) is not the decay reference
        decay = 2.0 ** (-(reference - start).total_seconds() / half_life)
    bqml_factor = weight * 1000.0 / (dose * decay)
    if first.Units == "CNTS":
        bq_per_count = float(first[0x7053, 0x1009].value)
        assert float(first[0x7053, 0x1000].value) == pytest.approx(bq_per_count * bqml_factor, rel=1e-6)
        return bq_per_count * bqml_factor
    assert first.Units == "BQML"
    return bqml_factor


def _truth_ras_affine(g):
    d = np.array(g["direction"]).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = d * np.array(g["spacing"])[None, :]
    lps[:3, 3] = g["origin"]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


# --- acceptance ---------------------------------------------------------------------------------

def test_all_variants_cover_every_option(synthetic_cohort):
    _, truths = synthetic_cohort
    seen: dict[str, set] = {}
    for t in truths:
        for k, v in t.variant.items():
            seen.setdefault(k, set()).add(v)
    assert seen["vendor"] == {"siemens", "ge", "philips"}
    assert seen["patient_position"] == {"HFS", "FFS"}
    assert seen["decay_correction"] == {"START", "ADMIN"}
    assert seen["after_midnight"] == {True, False}
    assert seen["ct_unsigned"] == {True, False}
    assert seen["pet_fov"] == {"matched", "short"}
    assert seen["extra_series"] == {True, False} and seen["nested_shuffled"] == {True, False}
    assert seen["mask_format"] == {"nifti", "seg"}
    syntaxes = seen["ct_transfer_syntax"] | seen["pet_transfer_syntax"]
    assert {"1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.80"} <= syntaxes
    assert seen["bad"] == {None, "missing_slice", "missing_dose", "corrupt_file"}
    assert seen["lesions"] == {"auto", "always", "none"}
    assert [t.expected for t in truths].count("reject") == 3


@pytest.mark.parametrize("exam", [0, 1, 7])  # HFS; FFS unsigned CT in shuffled nested folders; FFS GE
def test_dcm2niix_geometry_matches_truth(synthetic_cohort, tmp_path, exam):
    import subprocess

    src, truths = synthetic_cohort
    t = truths[exam].truth
    out = tmp_path / "nii"
    out.mkdir()
    subprocess.run(["dcm2niix", "-z", "n", "-b", "n", "-f", "%s", "-o", str(out), str(src / "dicom" / t["exam_id"])],
                   check=True, capture_output=True)
    for modality, number in (("ct", 2), ("pet", 4)):
        img = nib.load(out / f"{number}.nii")
        truth_img = nib.Nifti1Image(np.zeros(t[modality]["size"], dtype=np.uint8), _truth_ras_affine(t[modality]))
        a = nib.as_closest_canonical(img)
        b = nib.as_closest_canonical(truth_img)
        assert a.shape == b.shape
        np.testing.assert_allclose(a.affine, b.affine, atol=1e-3)
        if modality == "ct":
            # The voxels too: dcm2niix's canonical CT equals the truth HU reoriented the same way.
            hu = np.load(src / "truth" / t["exam_id"] / "ct_hu.npy").transpose(2, 1, 0)
            expected = nib.as_closest_canonical(nib.Nifti1Image(hu, _truth_ras_affine(t["ct"]))).get_fdata()
            np.testing.assert_array_equal(a.get_fdata(), expected)


def test_suv_reference_equals_truth_for_every_vendor_and_timing(synthetic_cohort):
    src, truths = synthetic_cohort
    kinds = set()
    for et in truths:
        t = et.truth
        if t["variant"]["bad"] == "missing_dose":
            continue
        slices = _headers(src, t["exam_id"], t["pet"]["series_uid"])
        assert _reference_suv_factor(slices) == pytest.approx(t["suv_factor"], rel=1e-6)
        v = t["variant"]
        kinds.add((v["vendor"], v["decay_correction"], v["after_midnight"]))
        if v["after_midnight"]:
            radio = slices[0].RadiopharmaceuticalInformationSequence[0]
            assert str(radio.RadiopharmaceuticalStartDateTime)[:8] < str(slices[0].SeriesDate)
    vendors = {k[0] for k in kinds}
    assert vendors == {"siemens", "ge", "philips"}
    assert {k[1] for k in kinds} == {"START", "ADMIN"} and {k[2] for k in kinds} == {True, False}


@pytest.mark.parametrize("exam", [0, 2, 6])  # explicit VR; RLE; JPEG 2000 (PET)
def test_pet_pixels_times_factor_equal_truth_suv(synthetic_cohort, exam):
    src, truths = synthetic_cohort
    t = truths[exam].truth
    slices = _headers(src, t["exam_id"], t["pet"]["series_uid"], pixels=True)
    assert slices[0].file_meta.TransferSyntaxUID == t["variant"]["pet_transfer_syntax"]
    values = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in slices])
    truth = np.load(src / "truth" / t["exam_id"] / "pet_suv.npy")
    assert len({d.RescaleSlope for d in slices}) > 10  # per-slice rescale, as scanners write
    np.testing.assert_allclose(values * t["suv_factor"], truth, rtol=1e-5, atol=1e-6)


def test_seg_masks_decode_to_truth(synthetic_cohort):
    import highdicom as hd

    src, truths = synthetic_cohort
    n = 0
    for et in truths:
        t = et.truth
        if t["variant"]["mask_format"] != "seg":
            continue
        seg = hd.seg.segread(src / "masks" / f"{t['exam_id']}.seg.dcm")
        ct = _headers(src, t["exam_id"], t["ct"]["series_uid"])
        assert seg.FrameOfReferenceUID == ct[0].FrameOfReferenceUID
        uids = [d.SOPInstanceUID for d in ct]
        pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1],
                                                   assert_missing_frames_are_empty=True)
        mask = np.load(src / "truth" / t["exam_id"] / "mask.npy")
        np.testing.assert_array_equal(pixels[..., 0].astype(np.uint8), mask)
        n += bool(mask.any())
    assert n >= 3


def test_bad_exams_are_broken_as_the_truth_says(synthetic_cohort):
    src, truths = synthetic_cohort
    bad = {t.variant["bad"]: t.truth for t in truths if t.variant["bad"]}
    t = bad["missing_slice"]
    ct = _headers(src, t["exam_id"], t["ct"]["series_uid"])
    assert len(ct) == t["ct"]["size"][2] - 1
    zs = [float(d.ImagePositionPatient[2]) for d in ct]
    assert min(abs(z - t["missing_slice_position_mm"]) for z in zs) == pytest.approx(t["ct"]["spacing"][2], abs=1e-3)
    t = bad["missing_dose"]
    pet = _headers(src, t["exam_id"], t["pet"]["series_uid"])
    assert all("RadionuclideTotalDose" not in d.RadiopharmaceuticalInformationSequence[0] for d in pet)
    assert (t["reject_stage"], t["reject_reason"]) == ("suv", "dose")
    t = bad["corrupt_file"]
    path = src / t["bad_file"]
    header = pydicom.dcmread(path, stop_before_pixels=True)
    assert header.SeriesInstanceUID == t["ct"]["series_uid"]
    with pytest.raises(Exception):
        pydicom.dcmread(path).pixel_array
    for t in bad.values():
        assert t["expected"] == "reject" and t["reject_stage"] in {"read", "suv"}


def test_misalignment_moves_pet_lesions_to_m_times_center(synthetic_cohort):
    """A large hot lesion's PET centroid sits at M @ centre (the truth), not at the CT centre."""
    src, truths = synthetic_cohort
    checked = 0
    for et in truths:
        t = et.truth
        if t["expected"] != "accept":
            continue
        pet = np.load(src / "truth" / t["exam_id"] / "pet_suv.npy")
        g = t["pet"]
        d = np.array(g["direction"]).reshape(3, 3)
        m = np.array(t["misalignment"]["matrix"])
        size = np.array(g["size"])
        ii, jj, kk = np.meshgrid(*(np.arange(n) for n in size), indexing="ij")
        points = np.array(g["origin"])[:, None] + (d * np.array(g["spacing"])[None, :]) @ np.stack(
            [ii.ravel(), jj.ravel(), kk.ravel()]).astype(float)
        values = pet.transpose(2, 1, 0).ravel()
        shift = np.linalg.norm(np.array(t["misalignment"]["translation_mm"]))
        for les in t["lesions"]:
            # Big, hot nodes away from the bladder, kidneys and brain.
            if min(les["radius_mm"]) < 10 or les["suv_max"] < 6 or les["station"] not in {
                    "cervical", "supraclavicular", "axillary", "mediastinal", "hilar"}:
                continue
            target = (m @ [*les["center_mm"], 1.0])[:3]
            near = np.linalg.norm(points - target[:, None], axis=0) < max(les["radius_mm"]) + 12
            w = np.clip(values[near] - 0.5 * values[near].max(), 0, None)
            centroid = (points[:, near] * w).sum(axis=1) / w.sum()
            assert np.linalg.norm(centroid - target) < 2.5, (t["exam_id"], les)
            if shift > 5:
                assert np.linalg.norm(centroid - target) < np.linalg.norm(centroid - les["center_mm"])
            checked += 1
    assert checked >= 3


def test_lesions_sit_in_the_body_at_their_stations(synthetic_cohort):
    src, truths = synthetic_cohort
    for et in truths:
        t = et.truth
        ct = np.load(src / "truth" / t["exam_id"] / "ct_hu.npy")
        mask = np.load(src / "truth" / t["exam_id"] / "mask.npy")
        g = t["ct"]
        d = np.array(g["direction"]).reshape(3, 3)
        for les in t["lesions"]:
            idx = np.linalg.solve(d * np.array(g["spacing"])[None, :], np.array(les["center_mm"]) - g["origin"])
            i, j, k = np.rint(idx).astype(int)
            assert mask[k, j, i] == 1
            assert -150 < ct[k, j, i] < 200  # soft-tissue density, inside the body
            assert 3.0 <= les["suv_max"] <= 25.0
            if t["diagnosis"] == "HL":
                assert les["station"] in {"cervical", "supraclavicular", "mediastinal", "hilar", "axillary"}
        # Lesions are apart: one connected component (26-connectivity) per truth lesion, same voxel counts.
        from scipy import ndimage

        components, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
        assert n == len(t["lesions"])
        assert sorted(np.bincount(components.ravel())[1:].tolist()) == sorted(les["n_voxels"] for les in t["lesions"])
        if t["variant"]["lesions"] == "none":
            assert t["lesions"] == [] and not mask.any() and t["tmtv_ml"] == 0
    volumes = [les["volume_ml"] for et in truths for les in et.truth["lesions"]]
    assert min(volumes) < 1.0 and max(volumes) > 5.0


def test_lungs_lie_inside_the_chest_wall(tmp_path_factory, synthetic_cohort):
    """No axial slice shows lung open to the outside air (as in a real chest): a reader's body outline
    (threshold, largest region, slices filled) then holds every lesion voxel. Seed 7's default exam 9
    once had lungs touching the skin, and its hilar lesion fell outside the body outline."""
    import SimpleITK as sitk

    from builder.convert.labels import body_mask
    from tests.support.cohort import cohort

    default_src, default_truths = cohort(tmp_path_factory, n_exams=10, seed=7, variants=None)
    for src, truths in ((default_src, default_truths), synthetic_cohort):
        for et in truths:
            t = et.truth
            mask = np.load(src / "truth" / t["exam_id"] / "mask.npy").astype(bool)
            if not mask.any():
                continue
            img = sitk.GetImageFromArray(np.load(src / "truth" / t["exam_id"] / "ct_hu.npy"))
            img.SetSpacing(t["ct"]["spacing"])
            outside = mask & ~body_mask(img)
            assert not outside.any(), f"{t['exam_id']}: {int(outside.sum())} lesion voxels outside the body outline"


def test_clinical_table_and_phi_markers(synthetic_cohort):
    src, truths = synthetic_cohort
    with open(src / "clinical.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["exam_id", "patient_id", "exam_date", "sex", "age", "diagnosis", "subtype", "notes"]
    assert [r["exam_id"] for r in rows] == [t.exam_id for t in truths]
    by_patient: dict[str, list] = {}
    for r, et in zip(rows, truths, strict=True):
        t = et.truth
        assert r["patient_id"] == t["patient_id"] and r["diagnosis"] == t["diagnosis"] in {"HL", "NHL"}
        assert 15 <= int(r["age"]) <= 76 and r["sex"] in {"F", "M"}
        by_patient.setdefault(r["patient_id"], []).append(r["exam_date"])
        ct = _headers(src, t["exam_id"], t["ct"]["series_uid"])[0]
        assert dt.date.fromisoformat(r["exam_date"]).strftime("%Y%m%d") == ct.StudyDate
        # Every planted marker is really in the source: a header value or the notes.
        text_vrs = {"PN", "LO", "SH", "ST", "LT", "CS"}
        text = r["notes"] + "\n" + "\n".join(str(e.value) for e in ct.iterall() if e.VR in text_vrs)
        for marker in t["phi_markers"]:
            assert marker in text, (t["exam_id"], marker)
        assert "PHIMARK" in r["notes"]
        assert str(ct.PatientName).startswith("PHIMARK") and ct.PatientID == t["patient_id"]
        assert ct.PatientBirthDate == t["phi_values"]["birth_date"]
        assert ct.StudyInstanceUID == t["phi_values"]["study_uid"]
    assert any(len(dates) > 1 for dates in by_patient.values())  # baseline + follow-up
    assert all(dates == sorted(dates) for dates in by_patient.values())


def test_cli_writes_a_cohort(tmp_path):
    from builder.__main__ import main

    assert main(["synth", str(tmp_path / "src"), "--exams", "1", "--seed", "3", "--quiet",
                 "--variants", '{"vendor": "ge", "mask_format": "seg"}']) == 0
    t = load_truth(tmp_path / "src" / "truth", "EX0000")
    assert t["variant"]["vendor"] == "ge" and (tmp_path / "src" / "masks" / "EX0000.seg.dcm").is_file()
    assert main(["synth", str(tmp_path / "src"), "--exams", "1", "--seed", "3", "--quiet"]) == 2  # not empty
    assert main(["synth", str(tmp_path / "new"), "--exams", "1", "--quiet", "--variants", '{"vendr": "ge"}']) == 2


def test_unknown_variant_key_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown variant keys"):
        generate_cohort(tmp_path / "x", n_exams=1, seed=0, variants={"vendr": "ge"})


@pytest.mark.slow
def test_full_size_exam_is_real_scale(tmp_path):
    """One full-size feet-first exam: CT 512 x 512 x 300-600 at ~0.98 x 0.98 x 3 mm, PET 200 x 200
    at 4 mm, read back by SimpleITK with the truth's geometry and voxels."""
    src = tmp_path / "full"
    (et,) = generate_cohort(src, n_exams=1, seed=2, size="full", variants={"patient_position": "FFS"})
    t = et.truth
    assert t["ct"]["size"][:2] == [512, 512] and 300 <= t["ct"]["size"][2] <= 600
    np.testing.assert_allclose(t["ct"]["spacing"], [500 / 512, 500 / 512, 3.0])
    assert t["pet"]["size"][:2] == [200, 200] and t["pet"]["spacing"][:2] == [4.0, 4.0]
    img = _sitk_series(src, "EX0000", t["ct"]["series_uid"])
    np.testing.assert_allclose(img.GetOrigin(), t["ct"]["origin"], atol=1e-3)
    np.testing.assert_allclose(img.GetDirection(), t["ct"]["direction"], atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), np.load(src / "truth" / "EX0000" / "ct_hu.npy"))
    # Lesions at real scale include ones under 1 ml when there are several.
    if len(t["lesions"]) >= 2:
        assert min(les["volume_ml"] for les in t["lesions"]) < 1.0


def test_extra_series_are_a_localizer_and_a_non_ac_pet(synthetic_cohort):
    src, truths = synthetic_cohort
    n = 0
    for et in truths:
        t = et.truth
        if not t["variant"]["extra_series"]:
            assert t["ignored_series_uids"] == []
            continue
        kinds = {}
        for p in (src / "dicom" / t["exam_id"]).rglob("*"):
            if not p.is_file():
                continue
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            kinds.setdefault(ds.SeriesInstanceUID, ds)
        scout, nac = (kinds[uid] for uid in t["ignored_series_uids"])
        assert "LOCALIZER" in scout.ImageType
        assert scout.FrameOfReferenceUID == kinds[t["ct"]["series_uid"]].FrameOfReferenceUID
        assert nac.Modality == "PT" and "ATTN" not in nac.CorrectedImage
        assert "ATTN" in kinds[t["pet"]["series_uid"]].CorrectedImage
        assert set(kinds) == {t["ct"]["series_uid"], t["pet"]["series_uid"], *t["ignored_series_uids"]}
        n += 1
    assert n >= 3
