"""One item schema: ``load_lymphatlas`` and ``hf_torch`` (whole cases, patches, streamed) give the same items.

Ground truth: the fake WORK cases the release was built from (voxels, affine, subject ids) and
``datasets``' own reading of the release (map-style and ``streaming=True``). The round trips through
MONAI and TorchIO must give the item back, its uint8 label included, and a DataLoader with 2 workers
must collate items whose labels went through TorchIO's ``RandomAffine``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lymphatlas_ds import hf_torch, load_lymphatlas
from lymphatlas_ds.loader import HFCaseDataset, HFStreamDataset
from lymphatlas_ds.schema import ITEM_KEYS, METADATA_COLUMNS
from tests.support.releases import build_fake_release, datasets_cache_in_tmp  # noqa: F401 (fixture)

datasets = pytest.importorskip("datasets")
pytestmark = pytest.mark.usefixtures("datasets_cache_in_tmp")

SPACING_XYZ = (2.0, 2.5, 3.0)
SHAPE_ZYX = (14, 18, 20)
PATCH = (8, 8, 12)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("items")
    release = build_fake_release(root, n_patients=6, seed=4, shape_zyx=SHAPE_ZYX, spacing_xyz=SPACING_XYZ)
    return release.path, release.truth, root / "cache"


def _load(built, **kw):
    path, _, cache = built
    return load_lymphatlas(path, cache_dir=cache, progress=False, **kw)


def _assert_same_item(a, b):
    assert list(a) == list(b) == list(ITEM_KEYS)
    for key in ("image", "label", "affine", "spacing_zyx", "patch_start"):
        assert a[key].dtype == b[key].dtype, key
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert a["case_id"] == b["case_id"] and a["foreground_centred"] == b["foreground_centred"]
    assert a["meta"] == pytest.approx(b["meta"], nan_ok=True) and list(a["meta"]) == list(b["meta"])


def _assert_is_the_truth_crop(item, truth):
    case = truth[item["case_id"]]
    start = item["patch_start"].numpy()
    box = tuple(slice(int(a), int(a) + p) for a, p in zip(start, item["label"].shape[1:]))
    np.testing.assert_array_equal(item["label"][0].numpy(), case.label[box])
    np.testing.assert_array_equal(item["image"][1].numpy(), case.pet[box])
    origin = case.affine[:3, :3] @ start[::-1] + case.affine[:3, 3]
    np.testing.assert_allclose(item["affine"].numpy()[:3, 3], origin, atol=1e-5)


def test_hf_torch_and_load_lymphatlas_whole_cases_are_the_same_items(built):
    path, truth, _ = built
    hf = hf_torch(datasets.load_dataset(str(path), "all", split="train"))
    ours = {item["case_id"]: item for item in _load(built, split="train")}
    assert len(hf) == len(ours) > 0
    for i in range(len(hf)):
        item = hf[i]
        _assert_same_item(item, ours[item["case_id"]])
        assert item["meta"]["subject_id"] == truth[item["case_id"]].subject_id
        assert set(item["meta"]) == set(METADATA_COLUMNS) - {"spacing_xyz", "shape_xyz", "affine"}
        np.testing.assert_array_equal(item["label"][0].numpy(), truth[item["case_id"]].label)
    batch = next(iter(DataLoader(hf, batch_size=2)))
    assert batch["meta"]["diagnosis"] == [hf[0]["meta"]["diagnosis"], hf[1]["meta"]["diagnosis"]]


def test_hf_torch_patches_are_load_lymphatlas_patches(built):
    path, truth, _ = built
    ds = datasets.load_dataset(str(path), "all", split="train")
    hf = hf_torch(ds, patch_size=PATCH, samples_per_case=3, seed=5)
    ours = _load(built, split="train", patch_size=PATCH, samples_per_case=3, seed=5)
    assert isinstance(hf, HFCaseDataset)
    # the same case order, so index i is the same case's same draw in both
    assert list(ds["case_id"]) == ours.case_ids and len(hf) == len(ours)
    for epoch in (0, 1):
        hf.set_epoch(epoch)
        ours.set_epoch(epoch)
        for i in range(len(hf)):
            a = hf[i]
            _assert_same_item(a, ours[i])
            _assert_is_the_truth_crop(a, truth)
    assert any(hf[i]["foreground_centred"] for i in range(len(hf)))
    batch = next(iter(DataLoader(hf, batch_size=3, num_workers=0)))
    assert batch["image"].shape == (3, 2, *PATCH) and batch["label"].dtype == torch.uint8


def test_a_patch_larger_than_the_case_is_padded_alike(built):
    path, _, _ = built
    big = (SHAPE_ZYX[0] + 4, 8, 8)
    hf = hf_torch(datasets.load_dataset(str(path), "all", split="train"), patch_size=big, seed=1)
    ours = _load(built, split="train", patch_size=big, seed=1)
    for i in range(3):
        _assert_same_item(hf[i], ours[i])
    assert float(hf[0]["image"][0, -1].max()) == -1024.0  # air past the last slice


def test_hf_torch_on_a_streamed_dataset(built):
    path, truth, _ = built
    stream = datasets.load_dataset(str(path), "all", split="train", streaming=True)
    cases = hf_torch(stream)
    assert isinstance(cases, HFStreamDataset)
    ours = {item["case_id"]: item for item in _load(built, split="train")}
    seen = [item for item in cases]
    assert sorted(i["case_id"] for i in seen) == sorted(ours)
    for item in seen:
        _assert_same_item(item, ours[item["case_id"]])

    patches = hf_torch(stream, patch_size=PATCH, samples_per_case=2, seed=3)
    def draws(loader):
        return [(c, tuple(s.tolist())) for b in loader for c, s in zip(b["case_id"], b["patch_start"])]
    first = draws(DataLoader(patches, batch_size=2, num_workers=0))
    assert len(first) == 2 * len(ours)
    for item in patches:
        _assert_is_the_truth_crop(item, truth)
        assert list(item) == list(ITEM_KEYS) and item["image"].shape == (2, *PATCH)
    # in a worker process the same draws (they depend on seed, epoch and case, not on the process)
    assert draws(DataLoader(patches, batch_size=2, num_workers=1)) == first
    patches.set_epoch(1)
    assert draws(DataLoader(patches, batch_size=2, num_workers=0)) != first


def test_samples_per_case_without_patches_is_refused(built):
    from lymphatlas_ds.errors import SchemaError

    path, _, _ = built
    with pytest.raises(SchemaError, match="samples_per_case needs patch_size"):
        hf_torch(datasets.load_dataset(str(path), "all", split="train"), samples_per_case=2)


# ---------------------------------------------------------------- MONAI / TorchIO round trips


@pytest.mark.parametrize("patch", [None, PATCH])
def test_monai_round_trip_gives_the_item_back(built, patch):
    pytest.importorskip("monai")
    from lymphatlas_ds.interop import from_monai, to_monai

    item = _load(built, split="train", patch_size=patch, seed=2)[1]
    back = from_monai(to_monai(item))
    _assert_same_item(back, item)
    assert all(type(back[k]) is torch.Tensor for k in ("image", "label"))


@pytest.mark.parametrize("patch", [None, PATCH])
def test_torchio_round_trip_gives_the_item_back(built, patch):
    pytest.importorskip("torchio")
    from lymphatlas_ds.interop import from_torchio, to_torchio

    item = _load(built, split="train", patch_size=patch, seed=2)[1]
    _assert_same_item(from_torchio(to_torchio(item)), item)


def test_a_monai_spatial_transform_comes_back_on_its_grid_with_a_uint8_label(built):
    mt = pytest.importorskip("monai.transforms")
    from lymphatlas_ds.interop import from_monai, to_monai

    item = _load(built, split="train")[0]
    out = mt.Spacingd(keys=("image", "label"), pixdim=(4.0, 4.0, 4.0), mode=("bilinear", "nearest"))(to_monai(item))
    assert out["label"].dtype == torch.float32  # what MONAI hands back
    back = from_monai(out)
    assert back["label"].dtype == torch.uint8 and set(np.unique(back["label"].numpy())) <= {0, 1}
    np.testing.assert_allclose(back["spacing_zyx"].numpy(), [4.0, 4.0, 4.0])
    np.testing.assert_allclose(back["affine"].numpy(), out["image"].affine.numpy())
    assert back["image"].shape[1:] == tuple(out["image"].shape[1:][::-1])


class _TorchioAugmented(Dataset):
    """A user's own dataset: each item through TorchIO's RandomAffine (half of them) and back."""

    def __init__(self, base):
        import torchio as tio

        self.base, self.affine = base, tio.RandomAffine(p=0.5, degrees=10)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        from lymphatlas_ds.interop import from_torchio, to_torchio

        torch.manual_seed(i)
        return from_torchio(self.affine(to_torchio(self.base[i])))


def test_items_through_torchio_random_affine_collate_in_two_workers(built):
    tio = pytest.importorskip("torchio")
    from lymphatlas_ds.interop import to_torchio

    base = _load(built, split="train", patch_size=PATCH, samples_per_case=4, seed=0)
    assert tio.RandomAffine(p=1.0)(to_torchio(base[0]))["label"].data.dtype == torch.float32  # TorchIO's own
    own = _TorchioAugmented(base)
    seeded = _load(built, split="train", patch_size=PATCH, samples_per_case=4, seed=0,
                   transform=tio.RandomAffine(p=0.5, degrees=10))
    for ds in (own, seeded):
        batches = list(DataLoader(ds, batch_size=4, num_workers=2))
        assert sum(len(b["case_id"]) for b in batches) == len(ds)
        assert all(b["label"].dtype == torch.uint8 for b in batches)
        assert set(np.unique(torch.cat([b["label"] for b in batches]).numpy())) <= {0, 1}
