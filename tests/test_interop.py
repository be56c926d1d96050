"""MONAI and TorchIO read LymphAtlas items with the release's geometry (lymphatlas_ds.interop).

Ground truth: the fake WORK cases (voxels, RAS affine) the release was built from. Each check
resamples with the peer library's own transform and compares physical positions in mm, so a
wrong axis order or a lost affine moves the lesion by centimetres, far past the tolerances.
"""

from __future__ import annotations

import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from lymphatlas_ds import load_lymphatlas
from lymphatlas_ds.interop import to_monai, to_torchio, to_xyz, to_zyx
from tests.support.releases import build_fake_release

SPACING_XYZ = (2.0, 2.5, 3.0)  # anisotropic, so an axis mix-up changes sizes too
SHAPE_ZYX = (20, 24, 28)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("interop")
    release = build_fake_release(root, n_patients=6, seed=3, shape_zyx=SHAPE_ZYX, spacing_xyz=SPACING_XYZ)
    items = load_lymphatlas(release.path, split="train", cache_dir=root / "cache")
    with_lesion = [i for i in range(len(items)) if int(release.truth[items.case_ids[i]].label.sum()) > 0]
    assert len(with_lesion) >= 2
    return release, items, with_lesion


def _centroid_mm(mask_xyz: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Centre of mass of a [x, y, z] (soft) mask, in RAS mm."""
    weights = np.clip(np.asarray(mask_xyz, dtype=np.float64), 0, None)
    index = np.array([(weights * g).sum() for g in np.indices(weights.shape)]) / weights.sum()
    return np.asarray(affine, dtype=np.float64)[:3, :3] @ index + np.asarray(affine, dtype=np.float64)[:3, 3]


def _truth_centroid_mm(case) -> np.ndarray:
    return _centroid_mm(case.label.transpose(2, 1, 0), case.affine)


def test_monai_spacingd_resamples_with_the_release_geometry(built):
    pytest.importorskip("monai", reason="MONAI is not installed (scripts/setup.sh installs it)")
    from monai import transforms as mt

    release, items, with_lesion = built
    item = items[with_lesion[0]]
    case = release.truth[item["case_id"]]
    out = mt.Spacingd(keys=("image", "label"), pixdim=(4.0, 4.0, 4.0), mode="bilinear")(to_monai(item))
    affine = out["label"].affine.numpy()
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), [4.0, 4.0, 4.0], atol=1e-6)
    # physical extent kept: size along each axis ~ the case's extent / 4 mm
    extent = np.array(SHAPE_ZYX[::-1]) * np.array(SPACING_XYZ)
    assert np.all(np.abs(np.array(out["label"].shape[1:]) - extent / 4.0) <= 1.0)
    # the lesion stays where the release says it is (linear resampling keeps its centre of mass)
    moved = _centroid_mm(out["label"][0].numpy().astype(np.float64), affine) - _truth_centroid_mm(case)
    print("MONAI centroid shift mm", moved)
    assert np.abs(moved).max() < 1.5, moved
    # and the CT channel samples the same anatomy: at each output voxel, the case's CT interpolated
    # (trilinear, here) at the same RAS point, away from the border where MONAI pads
    assert out["image"].shape[0] == 2
    ct_xyz = case.ct.transpose(2, 1, 0).astype(np.float64)
    grid = np.indices(out["image"].shape[1:]).reshape(3, -1).astype(np.float64)
    src = (np.linalg.inv(case.affine) @ affine @ np.vstack([grid, np.ones(grid.shape[1])]))[:3]
    inside = np.all((src >= 0) & (src <= np.asarray(ct_xyz.shape)[:, None] - 1), axis=0)
    assert inside.mean() > 0.5
    want = ndimage.map_coordinates(ct_xyz, src[:, inside], order=1)
    got = out["image"][0].numpy().reshape(-1)[inside]
    np.testing.assert_allclose(got, want, atol=1e-2 * float(np.ptp(ct_xyz)))


def test_monai_saveimage_writes_one_file_per_case_on_the_release_grid(built, tmp_path):
    pytest.importorskip("monai", reason="MONAI is not installed (scripts/setup.sh installs it)")
    from monai import transforms as mt

    release, items, with_lesion = built
    saver = mt.SaveImage(output_dir=str(tmp_path), output_postfix="label", separate_folder=False,
                         output_dtype=np.uint8, resample=False, print_log=False)
    written = {}
    for index in with_lesion[:2]:
        item = items[index]
        saver(to_monai(item)["label"][0:1])
        written[item["case_id"]] = tmp_path / f"{item['case_id']}_label.nii.gz"
    assert sorted(p.name for p in tmp_path.glob("*.nii.gz")) == sorted(p.name for p in written.values())
    for case_id, path in written.items():
        img = nib.load(path)
        case = release.truth[case_id]
        np.testing.assert_allclose(img.affine, case.affine, atol=1e-4)
        np.testing.assert_array_equal(np.asanyarray(img.dataobj), case.label.transpose(2, 1, 0))


def test_torchio_resample_keeps_the_release_geometry(built):
    tio = pytest.importorskip("torchio", reason="TorchIO is not installed (scripts/setup.sh installs it)")

    release, items, with_lesion = built
    item = items[with_lesion[1]]
    case = release.truth[item["case_id"]]
    subject = to_torchio(item)
    assert subject["ct"].spacing == pytest.approx(SPACING_XYZ)
    np.testing.assert_allclose(subject["label"].affine, case.affine, atol=1e-9)
    subject["label"] = tio.ScalarImage(tensor=subject["label"].data.float(), affine=subject["label"].affine)
    resampled = tio.Resample(4.0, image_interpolation="linear")(subject)
    label = resampled["label"]
    assert label.spacing == pytest.approx((4.0, 4.0, 4.0))
    moved = _centroid_mm(label.data[0].numpy(), label.affine) - _truth_centroid_mm(case)
    print("TorchIO centroid shift mm", moved)
    assert np.abs(moved).max() < 1.5, moved
    np.testing.assert_array_equal(subject["pet"].data[0].numpy(), case.pet.transpose(2, 1, 0))


def test_axis_round_trip_is_a_view():
    item = {"image": torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5), "label": torch.zeros(1, 3, 4, 5)}
    xyz = to_xyz(item)
    assert tuple(xyz["image"].shape) == (2, 5, 4, 3) and xyz["image"][1, 4, 3, 2] == item["image"][1, 2, 3, 4]
    assert xyz["image"].data_ptr() == item["image"].data_ptr()
    assert torch.equal(to_zyx(xyz)["image"], item["image"])


@pytest.mark.parametrize(("module", "fn"), [("monai.data", to_monai), ("torchio", to_torchio)])
def test_a_missing_package_says_how_to_install_it(monkeypatch, module, fn):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    item = {"image": torch.zeros(2, 2, 2, 2), "label": torch.zeros(1, 2, 2, 2), "affine": torch.eye(4), "case_id": "x"}
    with pytest.raises(ImportError, match=r"pip install"):
        fn(item)
