"""load_lymphatlas(): items against the fake WORK truth, folds, patches, DataLoader determinism, datasets interop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lymphatlas_ds import load_lymphatlas
from lymphatlas_ds.errors import SchemaError
from lymphatlas_ds.loader import PAD_VALUES, CaseDataset, PatchDataset, hf_torch, hf_torch_transform
from lymphatlas_ds.transforms import Compose, CTWindow, PETClip
from tests.support.releases import shared_fake_release

SPACING = (2.0, 2.0, 3.0)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    # Built once per run, or once per mutation run ($LYMPHATLAS_TEST_SHARED_RELEASES, scripts/mutation.sh)
    release, scratch = shared_fake_release(
        tmp_path_factory, "loader", n_patients=12, seed=5, shape_zyx=(20, 24, 28), spacing_xyz=SPACING
    )
    return release.path, release.truth, scratch / "cache"


def load(built, **kw):
    path, _, cache = built
    return load_lymphatlas(path, cache_dir=cache, **kw)


@pytest.mark.parametrize("cache", [True, False])
def test_whole_cases_equal_the_work_files(built, cache):
    _, truth, _ = built
    seen = []
    for split in ("train", "test"):
        ds = load(built, split=split, cache=cache)
        assert isinstance(ds, CaseDataset)
        for i in range(len(ds)):
            item = ds[i]
            want = truth[item["case_id"]]
            seen.append(item["case_id"])
            assert item["image"].dtype == torch.float32 and item["image"].shape == (2, *want.ct.shape)
            np.testing.assert_array_equal(item["image"][0].numpy(), want.ct.astype(np.float32))
            np.testing.assert_array_equal(item["image"][1].numpy(), want.pet)
            assert item["label"].dtype == torch.uint8 and item["label"].shape == (1, *want.ct.shape)
            np.testing.assert_array_equal(item["label"][0].numpy(), want.label)
            np.testing.assert_allclose(item["affine"].numpy(), want.affine, atol=1e-5)
            np.testing.assert_allclose(item["spacing_zyx"].numpy(), SPACING[::-1])
            assert item["meta"]["subject_id"] == want.subject_id
            assert item["meta"]["diagnosis"] == want.diagnosis
            assert item["meta"]["split"] == split
    assert sorted(seen) == sorted(truth)


def test_configs_and_folds_follow_splits_json(built):
    path, truth, _ = built
    table = json.loads((path / "splits.json").read_text())["cases"]
    hl_test = load(built, config="hl", split="test")
    assert set(hl_test.case_ids) == {c for c, t in table.items() if t["split"] == "test" and t["diagnosis"] == "HL"}
    train = set(load(built, config="nhl").case_ids)
    vals = []
    for k in range(5):
        val = set(load(built, config="nhl", fold=k, subset="val").case_ids)
        tr = set(load(built, config="nhl", fold=k, subset="train").case_ids)
        assert val == {c for c in train if table[c]["fold"] == k}
        assert val.isdisjoint(tr) and val | tr == train
        assert {truth[c].subject_id for c in val}.isdisjoint({truth[c].subject_id for c in tr})
        vals.append(val)
    assert set().union(*vals) == train
    with pytest.raises(SchemaError, match="go together"):
        load(built, fold=0)
    with pytest.raises(SchemaError, match="subdivide the train split"):
        load(built, split="test", fold=0, subset="val")


def _check_patch(item, truth):
    want = truth[item["case_id"]]
    start = item["patch_start"].numpy()
    size = item["image"].shape[1:]
    box = tuple(slice(a, a + s) for a, s in zip(start, size))
    np.testing.assert_array_equal(item["image"][0].numpy(), want.ct[box].astype(np.float32))
    np.testing.assert_array_equal(item["image"][1].numpy(), want.pet[box])
    np.testing.assert_array_equal(item["label"][0].numpy(), want.label[box])
    assert (item["meta"]["subject_id"], item["meta"]["diagnosis"]) == (want.subject_id, want.diagnosis)
    # The patch affine maps the patch's voxel (0, 0, 0) where the case affine maps the start voxel.
    corner = want.affine @ np.array([*start[::-1], 1.0])
    np.testing.assert_allclose(item["affine"].numpy() @ np.array([0, 0, 0, 1.0]), corner, atol=1e-4)
    np.testing.assert_allclose(item["affine"].numpy()[:3, :3], want.affine[:3, :3], atol=1e-6)
    # the case's voxel size in array order (z, y, x): 3, 2, 2 mm here, so reversed it differs
    np.testing.assert_allclose(item["spacing_zyx"].numpy(), np.linalg.norm(want.affine[:3, :3], axis=0)[::-1])
    np.testing.assert_allclose(item["spacing_zyx"].numpy(), SPACING[::-1])


def test_patches_are_crops_of_the_case_and_foreground_centred_ones_hold_lesion(built):
    _, truth, _ = built
    ds = load(built, patch_size=(8, 10, 12), samples_per_case=6, foreground_ratio=0.5, seed=3)
    assert isinstance(ds, PatchDataset) and len(ds) == 6 * len(ds.case_ids)
    centred = 0
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (2, 8, 10, 12) and item["label"].shape == (1, 8, 10, 12)
        _check_patch(item, truth)
        if item["foreground_centred"]:
            centred += 1
            assert item["label"].sum() > 0
            # centred on a lesion voxel v: start = v - size // 2, clipped to the volume
            lesion = np.argwhere(truth[item["case_id"]].label > 0)
            room = np.asarray(truth[item["case_id"]].label.shape) - np.array([8, 10, 12])
            starts = np.clip(lesion - np.array([8, 10, 12]) // 2, 0, room)
            assert (starts == item["patch_start"].numpy()).all(axis=1).any(), item["patch_start"]
    # 50% requested; cases without lesions fall back to uniform patches
    with_fg = sum(truth[c].label.any() for c in ds.case_ids) * 6
    assert 0.25 * with_fg <= centred <= 0.75 * with_fg


def test_foreground_ratio_bounds(built):
    _, truth, _ = built
    all_fg = load(built, patch_size=(4, 4, 4), samples_per_case=3, foreground_ratio=1.0)
    for i in range(len(all_fg)):
        item = all_fg[i]
        has_lesion = truth[item["case_id"]].label.any()
        assert item["foreground_centred"] == has_lesion
        if has_lesion:
            assert item["label"].sum() > 0
    none_fg = load(built, patch_size=(4, 4, 4), samples_per_case=3, foreground_ratio=0.0)
    assert not any(none_fg[i]["foreground_centred"] for i in range(len(none_fg)))


def test_patch_larger_than_the_volume_is_padded(built):
    _, truth, _ = built
    ds = load(built, patch_size=(26, 24, 32), foreground_ratio=0.0)
    item = ds[0]
    want = truth[item["case_id"]]
    assert item["patch_start"].tolist() == [0, 0, 0]
    z, y, x = want.ct.shape
    np.testing.assert_array_equal(item["image"][0, :z, :y, :x].numpy(), want.ct)
    assert (item["image"][0, z:] == PAD_VALUES["ct"]).all() and (item["image"][0, :, :, x:] == PAD_VALUES["ct"]).all()
    assert (item["image"][1, z:] == 0).all() and (item["label"][0, z:] == 0).all()
    assert item["image"].dtype == torch.float32 and item["label"].dtype == torch.uint8  # as an unpadded item's


def test_a_patch_padded_along_one_axis_is_cropped_at_its_start_along_the_others(built):
    # the volume is 20 x 24 x 28: a 26 x 10 x 12 patch pads z only, and starts anywhere along y and x
    _, truth, _ = built
    ds = load(built, patch_size=(26, 10, 12), samples_per_case=4, foreground_ratio=0.5, seed=11)
    starts = set()
    for i in range(len(ds)):
        item = ds[i]
        want = truth[item["case_id"]]
        z0, y0, x0 = item["patch_start"].tolist()
        starts.add((y0, x0))
        assert z0 == 0 and 0 <= y0 <= 24 - 10 and 0 <= x0 <= 28 - 12
        box = (slice(0, 20), slice(y0, y0 + 10), slice(x0, x0 + 12))
        assert item["image"].shape == (2, 26, 10, 12) and item["label"].shape == (1, 26, 10, 12)
        np.testing.assert_array_equal(item["image"][0, :20].numpy(), want.ct[box].astype(np.float32))
        np.testing.assert_array_equal(item["image"][1, :20].numpy(), want.pet[box])
        np.testing.assert_array_equal(item["label"][0, :20].numpy(), want.label[box])
        assert (item["image"][0, 20:] == PAD_VALUES["ct"]).all() and (item["image"][1, 20:] == PAD_VALUES["pet"]).all()
        assert (item["label"][0, 20:] == PAD_VALUES["label"]).all()
        corner = want.affine @ np.array([x0, y0, z0, 1.0])
        np.testing.assert_allclose(item["affine"].numpy()[:, 3], corner, atol=1e-4)
    assert any(y0 > 0 and x0 > 0 for y0, x0 in starts)  # the crop offsets were exercised


def test_a_patch_is_foreground_centred_when_its_uniform_draw_is_below_the_ratio_strictly(built):
    # each patch draws u ~ U[0, 1) from default_rng([seed, epoch, index]) first; centred iff u < ratio,
    # so a ratio of 0 never centres and P(centred) is the ratio exactly. A ratio equal to u does not centre.
    _, truth, _ = built
    ds = load(built, patch_size=(4, 4, 4), samples_per_case=1, foreground_ratio=0.5, seed=2)
    index = next(i for i, c in enumerate(ds.case_ids) if truth[c].label.any())
    u = float(np.random.default_rng([2, 0, index]).random())
    for ratio, centred in ((u, False), (float(np.nextafter(u, 1.0)), True)):
        ds = load(built, patch_size=(4, 4, 4), samples_per_case=1, foreground_ratio=ratio, seed=2)
        assert ds[index]["foreground_centred"] is centred, ratio


def _epoch(ds, workers, epoch=0, loader=None):
    ds.set_epoch(epoch)
    if loader is None:
        loader = DataLoader(ds, batch_size=3, shuffle=True, num_workers=workers, generator=torch.Generator().manual_seed(7))
    return [(b["case_id"], b["patch_start"].clone(), b["image"].clone(), b["label"].clone()) for b in loader]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        x[0] == y[0] and torch.equal(x[1], y[1]) and torch.equal(x[2], y[2]) and torch.equal(x[3], y[3]) for x, y in zip(a, b)
    )


def test_dataloader_with_two_workers_is_deterministic(built, tmp_path):
    ds = load_lymphatlas(built[0], cache_dir=tmp_path / "fresh", patch_size=(8, 8, 8), samples_per_case=2, seed=11)
    seen = []
    ds.prepare(workers=2, progress=lambda ids: (seen.append(i) or i for i in ids))
    assert sorted(seen) == sorted(ds.case_ids)
    first = _epoch(ds, workers=2)
    assert sum(len(b[0]) for b in first) == len(ds)
    assert _same(first, _epoch(ds, workers=2))
    assert _same(first, _epoch(ds, workers=0))  # independent of the number of workers
    assert not _same(first, _epoch(ds, workers=2, epoch=1))  # a new epoch draws new patches
    other_seed = load(built, patch_size=(8, 8, 8), samples_per_case=2, seed=12)
    assert not _same(first, _epoch(other_seed, workers=0))


def test_persistent_workers_follow_set_epoch(built):
    ds = load(built, patch_size=(8, 8, 8), samples_per_case=2, seed=11)
    ds.prepare()
    expected = [_epoch(ds, 0, e, DataLoader(ds, batch_size=3)) for e in (0, 1)]
    assert not _same(expected[0], expected[1])
    persistent = DataLoader(ds, batch_size=3, num_workers=2, persistent_workers=True)
    for e in (0, 1, 0):
        assert _same(expected[e], _epoch(ds, 2, e, persistent)), f"epoch {e}"


def test_transforms_are_applied_and_documented_presets_hold(built):
    _, truth, _ = built
    ds = load(built, split="test", transform=Compose([CTWindow.soft_tissue(), PETClip(max_suv=10.0)]))
    item = ds[0]
    want = truth[item["case_id"]]
    np.testing.assert_allclose(item["image"][0].numpy(), (np.clip(want.ct, -160, 240) + 160) / 400.0, rtol=1e-6)
    np.testing.assert_allclose(item["image"][1].numpy(), np.clip(want.pet, 0, 10) / 10.0, rtol=1e-6)
    np.testing.assert_array_equal(item["label"][0].numpy(), want.label)
    # patch items too: the transform sees the crop
    patches = load(built, split="test", patch_size=(6, 6, 6), samples_per_case=1, transform=CTWindow.soft_tissue())
    item = patches[0]
    z, y, x = (int(v) for v in item["patch_start"])
    crop = truth[item["case_id"]].ct[z:z + 6, y:y + 6, x:x + 6]
    np.testing.assert_allclose(item["image"][0].numpy(), (np.clip(crop, -160, 240) + 160) / 400.0, rtol=1e-6)


@pytest.mark.parametrize("raw", [True, False])
def test_datasets_load_dataset_with_the_torch_transform(built, raw):
    datasets = pytest.importorskip("datasets")
    path, truth, _ = built
    ds = datasets.load_dataset(str(path), "nhl", split="train")
    ds = hf_torch(ds) if raw else ds.with_transform(hf_torch_transform)
    assert len(ds) == sum(1 for t in truth.values() if t.diagnosis == "NHL") - len(load(built, config="nhl", split="test"))
    for i in range(len(ds)):
        item = ds[i]
        want = truth[item["case_id"]]
        np.testing.assert_array_equal(item["image"][0].numpy(), want.ct.astype(np.float32))
        np.testing.assert_array_equal(item["image"][1].numpy(), want.pet)
        np.testing.assert_array_equal(item["label"][0].numpy(), want.label)
        np.testing.assert_allclose(item["affine"].numpy(), want.affine, atol=1e-5)
        np.testing.assert_allclose(item["spacing_zyx"].numpy(), SPACING[::-1])
        assert item["meta"]["subject_id"] == want.subject_id and "subject_id" not in item
    batch = DataLoader(ds, batch_size=2)
    assert next(iter(batch))["image"].shape[:2] == (2, 2)


def test_one_int_patch_size_is_a_cube(built):
    ds = load(built, patch_size=8, samples_per_case=1, seed=2)
    assert ds.patch_size == (8, 8, 8)
    assert ds[0]["image"].shape == (2, 8, 8, 8)


def test_bad_patch_arguments(built):
    for bad in ((8, 8), 0, 8.5, "128", (8, 8, 8.5), None.__class__):
        with pytest.raises(SchemaError, match=r"patch_size must be a positive voxel count .* got"):
            load(built, patch_size=bad)
    with pytest.raises(SchemaError, match="foreground_ratio"):
        load(built, patch_size=(8, 8, 8), foreground_ratio=1.5)
    with pytest.raises(SchemaError, match="cache=True"):
        load(built, patch_size=(8, 8, 8), cache=False)


def test_xyz_items_equal_what_nibabel_reads_from_the_work_files(built):
    """MONAI and TorchIO read NIfTI through nibabel as [X, Y, Z] + affine: to_xyz gives exactly that."""
    import nibabel as nib

    from lymphatlas_ds.interop import to_xyz, to_zyx

    path, truth, _ = built
    item = load(built, split="test")[0]
    work = path.parent / "work" / "cases" / item["case_id"]
    xyz = to_xyz(item)
    for channel, name in enumerate(("ct", "pet")):
        img = nib.load(work / f"{name}.nii.gz")
        np.testing.assert_array_equal(xyz["image"][channel].numpy(), np.asanyarray(img.dataobj).astype(np.float32))
        np.testing.assert_allclose(item["affine"].numpy(), img.affine, atol=1e-5)
    np.testing.assert_array_equal(xyz["label"][0].numpy(), np.asanyarray(nib.load(work / "label.nii.gz").dataobj))
    back = to_zyx(xyz)
    assert torch.equal(back["image"], item["image"]) and torch.equal(back["label"], item["label"])


def test_first_use_shows_a_bar_while_the_cache_fills(built, tmp_path, capsys):
    path, _, _ = built
    ds = load_lymphatlas(path, split="test", cache_dir=tmp_path / "c1")
    for i in range(len(ds)):
        ds[i]
    err = capsys.readouterr().err
    assert "into the cache" in err and f"{len(ds)}/{len(ds)}" in err
    again = load_lymphatlas(path, split="test", cache_dir=tmp_path / "c1")
    again[0]
    assert "into the cache" not in capsys.readouterr().err  # already decoded: no bar
    quiet = load_lymphatlas(path, split="test", cache_dir=tmp_path / "c2", progress=False)
    quiet[0]
    assert "into the cache" not in capsys.readouterr().err


def test_spacing_in_array_order_from_the_row_or_else_from_the_affine():
    from lymphatlas_ds.loader import _spacing_zyx

    # a rotated, anisotropic affine: 0.8 x 1.5 x 3 mm voxels (x, y, z), rotated 30 degrees about z
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.diag([0.8, 1.5, 3.0])
    np.testing.assert_allclose(_spacing_zyx({}, affine).numpy(), [3.0, 1.5, 0.8], atol=1e-12)
    # the row's own spacing wins where it is recorded
    np.testing.assert_allclose(_spacing_zyx({"spacing_xyz": [0.7, 0.9, 2.5]}, affine).numpy(), [2.5, 0.9, 0.7])
    assert _spacing_zyx({}, affine).dtype == torch.float64
