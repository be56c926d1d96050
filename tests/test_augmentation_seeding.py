"""Random transforms given as ``transform=`` draw from (seed, epoch, index), as the patches do.

Through a real torch DataLoader: the same batches for 0 and 2 workers, new ones in the next epoch,
different decisions for different items, the same again for the same seed. MONAI's ``RandFlipd`` and
``RandAffined`` (in a MONAI ``Compose``), TorchIO's ``RandomAffine`` (the label stays uint8) and a
plain callable taking ``rng``. A fixed probe volume carried through the MONAI transforms shows the
augmentation decisions alone, apart from what the patch sampler drew.
"""

from __future__ import annotations

import functools
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lymphatlas_ds import load_lymphatlas
from lymphatlas_ds.interop import to_monai, to_zyx
from tests.support.releases import build_fake_release

mt = pytest.importorskip("monai.transforms")
tio = pytest.importorskip("torchio")

KEYS = ("image", "label", "probe")
PATCH = (12, 16, 16)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("augment")
    return build_fake_release(root, n_patients=3, seed=2, shape_zyx=(16, 20, 24), spacing_xyz=(2.0, 2.5, 3.0)).path


def add_probe(item):
    """The same volume for every item: what the transforms do to it are their random decisions alone."""
    probe = torch.arange(np.prod(PATCH), dtype=torch.float32).reshape(1, *PATCH)
    return {**item, "probe": probe}


def monai_pipeline():
    return mt.Compose([
        add_probe,
        functools.partial(to_monai, keys=KEYS),
        mt.RandFlipd(keys=KEYS, prob=0.5, spatial_axis=0),
        mt.RandFlipd(keys=KEYS, prob=0.5, spatial_axis=2),
        mt.RandAffined(keys=KEYS, prob=1.0, rotate_range=(0.3, 0.3, 0.3), translate_range=(2, 2, 2),
                       mode=("bilinear", "nearest", "bilinear"), padding_mode="zeros"),
        functools.partial(to_zyx, keys=KEYS),
    ])


def draw(item, *, rng):
    return {**item, "draw": torch.tensor(rng.random())}


def batches(dataset, *, workers: int, epoch: int):
    dataset.set_epoch(epoch)
    loader = DataLoader(dataset, batch_size=4, shuffle=False, num_workers=workers)
    return list(loader)


def assert_same(a, b, keys):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in keys:
            assert torch.equal(x[key], y[key]), key


def patches(release, tmp_path, transform, seed=0):
    return load_lymphatlas(release, patch_size=PATCH, samples_per_case=4, seed=seed, transform=transform,
                           cache_dir=tmp_path / "cache", progress=False)


def test_monai_random_transforms_give_the_same_batches_for_any_worker_count(release, tmp_path):
    ds = patches(release, tmp_path, monai_pipeline())
    zero = batches(ds, workers=0, epoch=0)
    assert_same(zero, batches(ds, workers=2, epoch=0), KEYS)
    # the same seed in a new dataset (a rerun) draws the same again
    assert_same(zero, batches(patches(release, tmp_path, monai_pipeline()), workers=0, epoch=0), KEYS)
    probes = torch.cat([b["probe"] for b in zero])
    assert len({p.numpy().tobytes() for p in probes}) == len(probes)  # each item its own decisions
    # items 2k and 2k+1 (workers 0 and 1 with batch size 1) flip differently at least once
    assert any(not torch.equal(probes[2 * k], probes[2 * k + 1]) for k in range(len(probes) // 2))
    next_epoch = torch.cat([b["probe"] for b in batches(ds, workers=2, epoch=1)])
    assert all(not torch.equal(p, q) for p, q in zip(probes, next_epoch))
    other_seed = torch.cat([b["probe"] for b in batches(patches(release, tmp_path, monai_pipeline(), seed=1),
                                                         workers=0, epoch=0)])
    assert not torch.equal(probes, other_seed)
    labels = torch.cat([b["label"] for b in zero])
    assert labels.dtype == torch.uint8 and set(labels.unique().tolist()) <= {0, 1}


def test_torchio_random_affine_gives_the_same_batches_and_keeps_the_label_uint8(release, tmp_path):
    transform = tio.RandomAffine(scales=0.1, degrees=15, translation=2)
    ds = patches(release, tmp_path, transform)
    zero = batches(ds, workers=0, epoch=0)
    two = batches(ds, workers=2, epoch=0)
    assert_same(zero, two, ("image", "label", "affine"))
    for batch in two:
        assert batch["label"].dtype == torch.uint8 and batch["image"].dtype == torch.float32
        assert batch["image"].shape[1:] == (2, *PATCH) and batch["label"].shape[1:] == (1, *PATCH)
    plain = batches(patches(release, tmp_path, None), workers=0, epoch=0)
    assert not torch.equal(zero[0]["image"], plain[0]["image"])  # the transform did something
    assert not torch.equal(torch.cat([b["image"] for b in batches(ds, workers=0, epoch=1)]),
                           torch.cat([b["image"] for b in zero]))


def test_a_callable_taking_rng_draws_per_item_and_epoch_for_whole_cases_too(release, tmp_path):
    ds = load_lymphatlas(release, transform=draw, seed=3, cache_dir=tmp_path / "cache", progress=False)
    first = torch.cat([b["draw"] for b in batches(ds, workers=0, epoch=0)])
    assert torch.equal(first, torch.cat([b["draw"] for b in batches(ds, workers=2, epoch=0)]))
    assert len(set(first.tolist())) == len(first) == len(ds)
    second = torch.cat([b["draw"] for b in batches(ds, workers=2, epoch=1)])
    assert not set(first.tolist()) & set(second.tolist())


def test_a_transform_on_the_global_random_state_is_seeded_and_the_callers_state_kept(release, tmp_path):
    def noisy(item):
        return {**item, "draw": torch.tensor([np.random.rand(), random.random(), float(torch.rand(()))])}

    ds = patches(release, tmp_path, noisy)
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    a = ds[5]["draw"]
    assert np.random.rand() == expected  # the caller's global state moved on as if nothing had drawn
    assert torch.equal(a, ds[5]["draw"]) and not torch.equal(a, ds[6]["draw"])
    assert_same(batches(ds, workers=0, epoch=0), batches(ds, workers=2, epoch=0), ("draw",))
