"""builder.convert.labels: masks onto the CT grid and lesion statistics against masks with known truth."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import SimpleITK as sitk

from builder.convert import labels
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


def test_find_mask_reports_missing_and_duplicate(tmp_path) -> None:
    with pytest.raises(LabelError, match="no lesion mask"):
        labels.find_mask(tmp_path, "EX1")
    (tmp_path / "EX1.nii.gz").write_bytes(b"x")
    (tmp_path / "EX1.seg.dcm").write_bytes(b"x")
    with pytest.raises(LabelError, match="two lesion masks"):
        labels.find_mask(tmp_path, "EX1")


def test_find_mask_takes_the_one_mask_or_the_exams_seg_and_refuses_nii_beside_nii_gz(tmp_path) -> None:
    seg = tmp_path / "dicom" / "EX1" / "seg.dcm"
    with pytest.raises(LabelError, match="no lesion mask"):
        labels.find_mask(tmp_path / "masks", "EX1")
    assert labels.find_mask(tmp_path / "masks", "EX1", seg=seg) == (seg, labels.MaskFormat.SEG)
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "EX1.nii").write_bytes(b"x")
    (tmp_path / "masks" / "EX10.nii.gz").write_bytes(b"x")  # another exam's mask
    assert labels.find_mask(tmp_path / "masks", "EX1", seg=seg) == (tmp_path / "masks" / "EX1.nii", labels.MaskFormat.NIFTI)
    (tmp_path / "masks" / "EX1.nii.gz").write_bytes(b"x")
    with pytest.raises(LabelError, match=r"two lesion masks for one exam \(EX1\.nii\.gz, EX1\.nii\)"):
        labels.find_mask(tmp_path / "masks", "EX1", seg=seg)
    assert [p.name for p, _ in labels.mask_files(tmp_path / "masks", "EX1")] == ["EX1.nii.gz", "EX1.nii"]


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
