"""read_series: values, geometry and metadata against series the tests write themselves (and dcm2niix)."""

from __future__ import annotations

import json
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import ImplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless

from builder.convert.discover import SeriesInfo, SeriesKind, discover_exam
from builder.errors import GeometryError, ReadError
from builder.convert.read import read_series
from tests.support.dicom_series import SeriesTruth, rotation, write_series


def info(t: SeriesTruth, modality: str = "CT") -> SeriesInfo:
    kind = SeriesKind.CT_VOLUME if modality == "CT" else SeriesKind.PET_AC
    return SeriesInfo(series_uid=t.series_uid, study_uid=t.study_uid, frame_of_reference_uid=t.for_uid,
                      modality=modality, kind=kind, files=list(t.files))


def assert_geometry(image: sitk.Image, t: SeriesTruth) -> None:
    assert np.allclose(image.GetOrigin(), t.origin, atol=1e-3)
    assert np.allclose(image.GetSpacing(), t.spacing, atol=1e-3)
    assert np.allclose(np.asarray(image.GetDirection()).reshape(3, 3), t.direction, atol=1e-6)
    # Every sorted slice's first voxel sits where its file's IPP says.
    for k in (0, len(t.positions) - 1):
        assert np.allclose(image.TransformIndexToPhysicalPoint((0, 0, k)), t.positions[k], atol=1e-3)


@pytest.mark.parametrize("unsigned", [False, True])
def test_shuffled_ct_reads_exact_hu_and_geometry(tmp_path, unsigned):
    t = write_series(tmp_path, n=7, unsigned=unsigned, seed=3)
    image, meta = read_series(info(t), exam_id="EX1")
    assert image.GetPixelID() == sitk.sitkInt16
    assert np.array_equal(sitk.GetArrayFromImage(image), t.volume)
    assert_geometry(image, t)
    assert meta.size == (10, 8, 7) and meta.n_slices == 7
    assert meta.fov_mm == pytest.approx((10 * 0.7, 8 * 0.8, 7 * 2.5), abs=1e-3)
    assert meta.units == "HU" and meta.kvp == 120.0 and meta.convolution_kernel == "B30f"


def test_pet_per_slice_slopes_applied(tmp_path):
    t = write_series(tmp_path, modality="PT", n=6, seed=5)
    image, meta = read_series(info(t, "PT"), exam_id="EX1")
    assert image.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), t.volume, rtol=1e-6)
    lo, hi = meta.rescale_slope_range
    assert hi > lo  # the slopes really differed, so per-slice application was exercised
    assert meta.units == "BQML" and meta.decay_correction == "START"


@pytest.mark.parametrize(
    "angles,position",
    [((0, 0, 0), "HFS"), ((0, 0, 180), "HFP"), ((0, 180, 0), "FFS"), ((12, -7, 25), "HFS"), ((90, 0, 0), "HFS")],
)
def test_orientations_geometry(tmp_path, angles, position):
    t = write_series(tmp_path, n=5, rot=rotation(*angles), extra={"PatientPosition": position}, seed=1)
    image, meta = read_series(info(t), exam_id="EX1")
    assert_geometry(image, t)
    assert np.array_equal(sitk.GetArrayFromImage(image), t.volume)
    assert meta.patient_position == position


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless, ImplicitVRLittleEndian])
@pytest.mark.parametrize("modality", ["CT", "PT"])
def test_compressed_transfer_syntaxes_decode_exactly(tmp_path, syntax, modality):
    t = write_series(tmp_path, modality=modality, n=3, rows=32, cols=32, transfer_syntax=syntax, seed=2)
    image, meta = read_series(info(t, modality), exam_id="EX1")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), t.volume)
    assert meta.transfer_syntax == syntax


def test_bits_stored_12_masks_high_bits_and_sign_extends(tmp_path):
    t = write_series(tmp_path, n=3, seed=4)
    rng = np.random.default_rng(0)
    truth = []
    for path in t.files:
        ds = pydicom.dcmread(path)
        hu = rng.integers(-2048, 2047, size=(ds.Rows, ds.Columns)).astype(np.int16)
        # 12-bit two's complement in the low bits, garbage (an old overlay) in the 4 high bits.
        stored = (hu.astype(np.int32) & 0x0FFF) | (rng.integers(0, 16, size=hu.shape) << 12)
        ds.BitsStored, ds.HighBit = 12, 11
        ds.PixelData = stored.astype(np.uint16).tobytes()
        ds.save_as(path)
        truth.append((float(ds.ImagePositionPatient[2]), hu))
    truth.sort(key=lambda x: x[0])
    image, _ = read_series(info(t), exam_id="EX1")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), np.stack([h for _, h in truth]))


def test_missing_slice_named_by_position(tmp_path):
    t = write_series(tmp_path, n=6, seed=6)
    # Remove the file holding sorted slice 3.
    victim = next(f for f in t.files if np.allclose(
        [float(v) for v in pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient], t.positions[3]))
    victim.unlink()
    t.files.remove(victim)
    with pytest.raises(GeometryError, match="missing slice") as err:
        read_series(info(t), exam_id="EX7")
    assert f"{t.positions[3][2]:.2f} mm" in str(err.value)
    assert "EX7" in str(err.value) and t.series_uid in str(err.value)


def test_duplicate_slice_names_both_files(tmp_path):
    t = write_series(tmp_path, n=4, seed=7)
    ds = pydicom.dcmread(t.files[0])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    copy = tmp_path / "copy.dcm"
    ds.save_as(copy)
    t.files.append(copy)
    with pytest.raises(GeometryError, match="two slices at one position") as err:
        read_series(info(t), exam_id="EX1")
    assert str(copy) in str(err.value) and str(t.files[0]) in str(err.value)


def test_gantry_tilt_tag_rejected(tmp_path):
    t = write_series(tmp_path, n=4, extra={"GantryDetectorTilt": "15"})
    with pytest.raises(GeometryError, match="gantry tilt"):
        read_series(info(t), exam_id="EX1")


def test_mixed_matrix_sizes_rejected(tmp_path):
    t = write_series(tmp_path / "a", n=4, seed=1)
    other = write_series(tmp_path / "b", n=1, rows=9, origin=(-4.0, -3.0, -80.0), seed=2)
    t.files += other.files
    with pytest.raises(GeometryError, match="mixed matrix sizes"):
        read_series(info(t), exam_id="EX1")


@pytest.mark.parametrize("cut", ["pixels", "header"])
def test_truncated_file_named_by_path(tmp_path, cut):
    t = write_series(tmp_path, n=4, rows=32, cols=32)
    victim = t.files[2]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 100] if cut == "pixels" else data[:300])
    with pytest.raises(ReadError, match="corrupt|truncated") as err:
        read_series(info(t), exam_id="EX1")
    assert str(victim) in str(err.value)


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_truncated_compressed_file_named_by_path(tmp_path):
    t = write_series(tmp_path, n=3, rows=32, cols=32, transfer_syntax=RLELossless)
    victim = t.files[1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 400])
    with pytest.raises(ReadError) as err:
        read_series(info(t), exam_id="EX1")
    assert str(victim) in str(err.value)


def test_metadata_is_json_and_free_of_identifiers(tmp_path):
    t = write_series(tmp_path, n=3, extra={"InstitutionName": "PHIMARK-HOSPITAL", "PatientBirthDate": "19600101"})
    _, meta = read_series(info(t), exam_id="EX1")
    text = json.dumps(meta.to_dict())
    for marker in ("Test^Patient", "TEST-ID", "PHIMARK", "19600101", t.series_uid, t.study_uid, t.for_uid):
        assert marker not in text


@pytest.mark.skipif(shutil.which("dcm2niix") is None, reason="dcm2niix not installed")
@pytest.mark.parametrize("angles", [(0, 0, 0), (0, 180, 0), (8, -5, 20)])
def test_geometry_matches_dcm2niix(tmp_path, angles):
    t = write_series(tmp_path / "dcm", n=6, rows=16, cols=20, rot=rotation(*angles), seed=9,
                     random_instance_numbers=False)
    image, _ = read_series(info(t), exam_id="EX1")
    out = tmp_path / "nii"
    out.mkdir()
    subprocess.run(["dcm2niix", "-z", "n", "-f", "peer", "-o", str(out), str(tmp_path / "dcm")],
                   check=True, capture_output=True)
    peer = nib.as_closest_canonical(nib.load(out / "peer.nii"))
    ours = nib.as_closest_canonical(to_nifti(image))
    np.testing.assert_allclose(ours.affine, peer.affine, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(peer.dataobj))


def to_nifti(image: sitk.Image) -> nib.Nifti1Image:
    """Our image as a RAS NIfTI (docs/contracts.md: affine_ras = diag(-1,-1,1,1) @ affine_lps)."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    array_xyz = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))
    return nib.Nifti1Image(array_xyz, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps)


# --- acceptance over the generated all-variants cohort (tests/conftest.py: synthetic_cohort) -------------

ACCEPTED = range(9)  # lymphatlas_synth.cohort.ALL_VARIANTS: the first 9 are good exams, the last 3 bad


def assert_truth_geometry(image: sitk.Image, g: dict) -> None:
    assert list(image.GetSize()) == g["size"]
    np.testing.assert_allclose(image.GetSpacing(), g["spacing"], atol=1e-3)
    np.testing.assert_allclose(image.GetOrigin(), g["origin"], atol=1e-3)
    np.testing.assert_allclose(image.GetDirection(), g["direction"], atol=1e-6)
    # The far corner too: spacing errors add up over the field of view.
    far = np.asarray(g["direction"]).reshape(3, 3) @ ((np.asarray(g["size"]) - 1) * g["spacing"]) + g["origin"]
    np.testing.assert_allclose(image.TransformIndexToPhysicalPoint([s - 1 for s in g["size"]]), far, atol=1e-3)


@pytest.mark.parametrize("index", ACCEPTED)
def test_cohort_ct_exact_and_geometry(synthetic_cohort, index):
    src, truths = synthetic_cohort
    t = truths[index].truth
    exam = discover_exam(src / "dicom" / t["exam_id"], t["exam_id"])
    ct, meta = read_series(exam.ct, exam_id=t["exam_id"])
    assert_truth_geometry(ct, t["ct"])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ct), np.load(src / "truth" / t["exam_id"] / "ct_hu.npy"))
    assert meta.transfer_syntax == t["variant"]["ct_transfer_syntax"]
    assert meta.patient_position == t["variant"]["patient_position"]
    assert meta.manufacturer and meta.manufacturer.lower().startswith(t["variant"]["vendor"][:2])


@pytest.mark.parametrize("index", ACCEPTED)
def test_cohort_pet_values_and_geometry(synthetic_cohort, index):
    src, truths = synthetic_cohort
    t = truths[index].truth
    exam = discover_exam(src / "dicom" / t["exam_id"], t["exam_id"])
    pet, meta = read_series(exam.pet, exam_id=t["exam_id"])
    assert_truth_geometry(pet, t["pet"])
    assert meta.units == t["suv"]["units"]
    # Values in the series' units times the truth factor are the truth SUV (SUV factor tested in test_suv).
    suv = sitk.GetArrayFromImage(pet).astype(np.float64) * t["suv_factor"]
    truth = np.load(src / "truth" / t["exam_id"] / "pet_suv.npy")
    np.testing.assert_allclose(suv, truth, rtol=1e-5, atol=1e-6 * truth.max())


def dcm2niix_image(files: list, tmp_path) -> nib.Nifti1Image:
    folder = tmp_path / "series"
    folder.mkdir()
    for i, f in enumerate(files):
        (folder / f"{i:05d}.dcm").symlink_to(f)
    subprocess.run(["dcm2niix", "-z", "n", "-f", "peer", "-o", str(tmp_path), str(folder)], check=True,
                   capture_output=True)
    return nib.load(tmp_path / "peer.nii")


@pytest.mark.skipif(shutil.which("dcm2niix") is None, reason="dcm2niix not installed")
@pytest.mark.parametrize("index", ACCEPTED)
@pytest.mark.parametrize("modality", ["ct", "pet"])
def test_cohort_geometry_and_values_match_dcm2niix(synthetic_cohort, index, modality, tmp_path):
    src, truths = synthetic_cohort
    t = truths[index].truth
    exam = discover_exam(src / "dicom" / t["exam_id"], t["exam_id"])
    series = exam.ct if modality == "ct" else exam.pet
    image, _ = read_series(series, exam_id=t["exam_id"])
    peer = nib.as_closest_canonical(dcm2niix_image(series.files, tmp_path))
    ours = nib.as_closest_canonical(to_nifti(image))
    assert ours.shape == peer.shape
    np.testing.assert_allclose(ours.affine, peer.affine, atol=1e-3)
    peer_values = np.asarray(peer.dataobj, dtype=np.float64)  # dcm2niix: stored values + scl_slope/inter
    if modality == "ct":
        np.testing.assert_array_equal(np.asarray(ours.dataobj), peer_values)
    else:
        np.testing.assert_allclose(np.asarray(ours.dataobj), peer_values, rtol=1e-5,
                                   atol=1e-5 * np.abs(peer_values).max())


def ingest(src, exam_id):
    """discover -> read CT -> read PET -> SUV, as convert runs them."""
    from builder.convert.suv import suv_conversion

    exam = discover_exam(src / "dicom" / exam_id, exam_id)
    read_series(exam.ct, exam_id=exam_id)
    read_series(exam.pet, exam_id=exam_id)
    return suv_conversion(exam.pet, exam_id=exam_id)


@pytest.mark.parametrize("index", [9, 10, 11])
def test_cohort_bad_exams_rejected_with_cause(synthetic_cohort, index):
    from builder.errors import ExamError

    src, truths = synthetic_cohort
    t = truths[index].truth
    assert t["expected"] == "reject"
    with pytest.raises(ExamError) as err:
        ingest(src, t["exam_id"])
    message = str(err.value)
    assert err.value.stage == t["reject_stage"]
    assert t["reject_reason"] in message.lower()
    assert t["exam_id"] in message
    if t["bad_file"]:
        assert t["bad_file"] in message  # the corrupt file, by path
    if t["missing_slice_position_mm"] is not None:
        assert f"{t['missing_slice_position_mm']:.2f}" in message  # the missing slice, by position


def test_undecodable_transfer_syntax_named(tmp_path):
    t = write_series(tmp_path, n=3, rows=32, cols=32, transfer_syntax=RLELossless)
    victim = t.files[0]
    ds = pydicom.dcmread(victim)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video: no installed image decoder
    ds.save_as(victim)
    with pytest.raises(ReadError, match="1.2.840.10008.1.2.4.100") as err:
        read_series(info(t), exam_id="EX1")
    assert str(victim) in str(err.value) and "decoder" in str(err.value)
