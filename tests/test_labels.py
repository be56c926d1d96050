"""builder.labels: masks onto the CT grid and lesion statistics against masks with known truth."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import SimpleITK as sitk

from builder import labels
from builder.errors import LabelError


def _ct(shape_zyx=(30, 40, 50), spacing=(2.0, 2.5, 3.0), origin=(-50.0, -40.0, 100.0)) -> sitk.Image:
    z, y, x = np.mgrid[0 : shape_zyx[0], 0 : shape_zyx[1], 0 : shape_zyx[2]]
    body = ((x - shape_zyx[2] / 2) / (shape_zyx[2] * 0.4)) ** 2 + ((y - shape_zyx[1] / 2) / (shape_zyx[1] * 0.4)) ** 2 <= 1
    arr = np.where(body, 40, -1000).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    return img


def _save_like(arr: np.ndarray, ref: sitk.Image, path, **changes) -> None:
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(ref)
    if "origin" in changes:
        img.SetOrigin(changes["origin"])
    if "spacing" in changes:
        img.SetSpacing(changes["spacing"])
    sitk.WriteImage(img, str(path))


def test_nifti_mask_on_ct_grid_is_read_exactly(tmp_path) -> None:
    ct = _ct()
    mask = np.zeros(ct.GetSize()[::-1], np.uint8)
    mask[10:14, 15:20, 20:26] = 1
    _save_like(mask, ct, tmp_path / "m.nii.gz")
    out = labels.load_mask(tmp_path / "m.nii.gz", ct, exam_id="EX1")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, mask)


@pytest.mark.parametrize(
    "change,needle",
    [({"origin": (-45.0, -40.0, 100.0)}, "origin"), ({"spacing": (2.0, 2.5, 2.0)}, "spacing")],
)
def test_mask_on_another_grid_is_rejected(tmp_path, change, needle) -> None:
    ct = _ct()
    _save_like(np.zeros(ct.GetSize()[::-1], np.uint8), ct, tmp_path / "m.nii.gz", **change)
    with pytest.raises(LabelError, match="another grid") as e:
        labels.load_mask(tmp_path / "m.nii.gz", ct, exam_id="EX7")
    assert needle in str(e.value) and "EX7" in str(e.value) and e.value.stage == "labels"
    assert "np." not in str(e.value)  # plain numbers, not np.float64(...) reprs


def test_mask_of_another_size_is_rejected(tmp_path) -> None:
    ct = _ct()
    img = sitk.Image((10, 10, 10), sitk.sitkUInt8)
    sitk.WriteImage(img, str(tmp_path / "m.nii.gz"))
    with pytest.raises(LabelError, match="size"):
        labels.load_mask(tmp_path / "m.nii.gz", ct, exam_id="EX1")


def test_non_binary_mask_is_rejected(tmp_path) -> None:
    ct = _ct()
    mask = np.zeros(ct.GetSize()[::-1], np.uint8)
    mask[5, 5, 5] = 2
    _save_like(mask, ct, tmp_path / "m.nii.gz")
    with pytest.raises(LabelError, match="not binary: values 2"):
        labels.load_mask(tmp_path / "m.nii.gz", ct, exam_id="EX1")


def test_body_mask_fills_lungs_and_drops_the_table() -> None:
    ct = _ct()
    arr = sitk.GetArrayFromImage(ct)
    arr[:, 18:22, 20:30] = -850  # a "lung" inside the body
    arr[:, 38:40, 5:45] = 100  # a "table" under the patient, not touching
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(ct)
    body = labels.body_mask(img)
    assert body.shape == arr.shape
    assert body[:, 18:22, 20:30].all()
    assert not body[:, 38:40, :].any()
    assert not body[:, 0, 0].any()


def test_mask_outside_the_body_is_rejected() -> None:
    ct = _ct()
    body = labels.body_mask(ct)
    label = np.zeros_like(body, dtype=np.uint8)
    label[10:13, 0:3, 0:3] = 1  # corner of the image: air
    with pytest.raises(LabelError, match="outside the body"):
        labels.check_inside_body(label, body, exam_id="EX1")
    label[:] = 0
    label[10:13, 18:21, 23:26] = 1
    assert labels.check_inside_body(label, body, exam_id="EX1") == 0.0


def test_lesion_statistics_against_known_lesions() -> None:
    spacing = (2.0, 2.0, 4.0)  # x, y, z mm -> 16 ul voxels
    ref = sitk.Image((60, 50, 40), sitk.sitkUInt8)
    ref.SetSpacing(spacing)
    ref.SetOrigin((10.0, 20.0, 30.0))
    shape = ref.GetSize()[::-1]
    label = np.zeros(shape, np.uint8)
    pet = np.full(shape, 1.0, np.float32)
    # lesion A: a 5 x 6 x 7 box, SUV 4 with one hot voxel of 9
    label[5:10, 10:16, 10:17] = 1
    pet[5:10, 10:16, 10:17] = 4.0
    pet[7, 12, 13] = 9.0
    # lesion B: a single 3 x 3 x 3 cube of SUV 2, far away
    label[30:33, 40:43, 50:53] = 1
    pet[30:33, 40:43, 50:53] = 2.0
    s = labels.lesion_statistics(label, pet, ref)
    voxel_ml = 2.0 * 2.0 * 4.0 / 1000.0
    assert s["count"] == 2
    a, b = s["items"]  # sorted by volume, largest first
    assert a["voxels"] == 5 * 6 * 7 and a["volume_ml"] == pytest.approx(210 * voxel_ml)
    assert a["suv_max"] == pytest.approx(9.0)
    assert a["suv_mean"] == pytest.approx((209 * 4.0 + 9.0) / 210)
    assert b["voxels"] == 27 and b["suv_max"] == pytest.approx(2.0) and b["suv_mean"] == pytest.approx(2.0)
    # centroids in physical space: index centre -> origin + spacing * index
    np.testing.assert_allclose(a["centroid_mm"], [10 + 2 * 13, 20 + 2 * 12.5, 30 + 4 * 7], atol=1e-6)
    np.testing.assert_allclose(b["centroid_mm"], [10 + 2 * 51, 20 + 2 * 41, 30 + 4 * 31], atol=1e-6)
    assert s["tmtv_ml"] == pytest.approx(237 * voxel_ml)
    assert s["tlg"] == pytest.approx(a["volume_ml"] * a["suv_mean"] + b["volume_ml"] * b["suv_mean"])
    assert s["suv_max"] == pytest.approx(9.0)
    assert s["dmax_mm"] == pytest.approx(np.linalg.norm(np.subtract(a["centroid_mm"], b["centroid_mm"])))


def test_suv_peak_is_the_best_1ml_sphere_mean() -> None:
    spacing = (2.0, 2.0, 2.0)
    ref = sitk.Image((40, 40, 40), sitk.sitkUInt8)
    ref.SetSpacing(spacing)
    shape = ref.GetSize()[::-1]
    label = np.zeros(shape, np.uint8)
    label[10:30, 10:30, 10:30] = 1
    pet = np.where(label > 0, 5.0, 1.0).astype(np.float32)
    pet[20, 20, 20] = 50.0  # a single hot voxel: SUVmax 50, SUVpeak diluted by the sphere
    s = labels.lesion_statistics(label, pet, ref)
    item = s["items"][0]
    radius = (3 * 1000.0 / (4 * math.pi)) ** (1 / 3)  # 6.2 mm
    zz, yy, xx = np.mgrid[-4:5, -4:5, -4:5] * 2.0
    n_sphere = int((zz**2 + yy**2 + xx**2 <= radius**2).sum())
    assert item["suv_max"] == pytest.approx(50.0)
    assert item["suv_peak"] == pytest.approx(5.0 + 45.0 / n_sphere, rel=1e-6)
    assert 1.0 * 0.85 <= n_sphere * 8.0 / 1000.0 <= 1.0 * 1.15  # the sphere is ~1 ml on this grid


def test_empty_label_gives_zero_statistics() -> None:
    ref = sitk.Image((8, 8, 8), sitk.sitkUInt8)
    s = labels.lesion_statistics(np.zeros((8, 8, 8), np.uint8), np.ones((8, 8, 8), np.float32), ref)
    assert s == {"count": 0, "tmtv_ml": 0.0, "tlg": 0.0, "suv_max": 0.0, "dmax_mm": 0.0, "items": []}


def test_touching_diagonal_voxels_are_one_lesion() -> None:
    ref = sitk.Image((10, 10, 10), sitk.sitkUInt8)
    label = np.zeros((10, 10, 10), np.uint8)
    label[2, 2, 2] = label[3, 3, 3] = 1  # corner-connected: 26-connectivity joins them
    s = labels.lesion_statistics(label, np.ones_like(label, np.float32), ref)
    assert s["count"] == 1


def test_find_mask_reports_missing_and_duplicate(tmp_path) -> None:
    with pytest.raises(LabelError, match="no lesion mask"):
        labels.find_mask(tmp_path, "EX1")
    (tmp_path / "EX1.nii.gz").write_bytes(b"x")
    (tmp_path / "EX1.seg.dcm").write_bytes(b"x")
    with pytest.raises(LabelError, match="two lesion masks"):
        labels.find_mask(tmp_path, "EX1")


def _ct_series(n: int = 6, *, feet_first: bool = False):
    """A small CT series (pydicom's CT_small slice repeated at 5 mm steps) and its SimpleITK image."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series_uid, frame_uid = generate_uid(), generate_uid()
    step = -5.0 if feet_first else 5.0
    slices = []
    for k in range(n):
        ds = copy.deepcopy(base)  # Dataset.copy() shares its elements
        ds.SOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [-158.135803, -179.035797, -75.7 + step * k]
        slices.append(ds)
    ordered = sorted(slices, key=lambda d: float(d.ImagePositionPatient[2]))
    img = sitk.Image((128, 128, n), sitk.sitkInt16)
    img.SetSpacing((0.661468, 0.661468, 5.0))
    img.SetOrigin(tuple(float(v) for v in ordered[0].ImagePositionPatient))
    return slices, img


@pytest.mark.parametrize("feet_first", [False, True])
def test_dicom_seg_lands_on_the_ct_grid(tmp_path, feet_first) -> None:
    """A highdicom SEG (sparse: only frames with lesion) placed through physical space equals the mask."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    slices, ct = _ct_series(feet_first=feet_first)
    mask = np.zeros((len(slices), 128, 128), np.uint8)  # in the order of `slices`
    mask[2, 40:60, 50:80] = 1
    mask[3, 45:55, 60:70] = 1
    desc = hd.seg.SegmentDescription(
        segment_number=1, segment_label="lesion", segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=slices, pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[desc], series_instance_uid=generate_uid(), series_number=99,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="test", manufacturer_model_name="test",
        software_versions="0", device_serial_number="0",
    )
    seg.save_as(tmp_path / "EX1.seg.dcm")
    out = labels.load_mask(tmp_path / "EX1.seg.dcm", ct, exam_id="EX1")
    # expected on the CT grid: slices sorted by z (SimpleITK order)
    order = np.argsort([float(s.ImagePositionPatient[2]) for s in slices])
    np.testing.assert_array_equal(out, mask[order])


def test_unreadable_seg_is_rejected_with_reason(tmp_path) -> None:
    (tmp_path / "EX1.seg.dcm").write_bytes(b"not dicom")
    with pytest.raises(LabelError, match="cannot read the DICOM SEG"):
        labels.load_mask(tmp_path / "EX1.seg.dcm", _ct(), exam_id="EX1")
