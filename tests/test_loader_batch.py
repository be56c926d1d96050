"""Issue 21: the batch path (``PatchDataset.__getitems__`` + ``collate``) gives torch's default batch bit for bit,
from 0 or 2 DataLoader workers, as a user types it; a worker's reused shared-memory buffers never overwrite a
batch the main process still holds."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from lymphatlas_ds import _batch, load_lymphatlas
from lymphatlas_ds.loader import PAD_VALUES, collate
from tests.support.releases import shared_fake_release

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (20, 24, 28)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    release, scratch = shared_fake_release(tmp_path_factory, "batch", n_patients=4, seed=7, shape_zyx=SHAPE,
                                           spacing_xyz=(2.0, 2.0, 3.0))
    return release, scratch / "cache"


def _assert_same(got, want, where=""):
    """Equal structure, key order, types, dtypes and values (NaN equal to NaN), bit for bit."""
    assert type(got) is type(want), f"{where}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, dict):
        assert list(got) == list(want), f"{where}: keys {list(got)} != {list(want)}"
        for k in want:
            _assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, f"{where}: {got.dtype} {got.shape}"
        assert torch.equal(got.view(torch.uint8) if got.is_floating_point() else got,
                           want.view(torch.uint8) if want.is_floating_point() else want), f"{where}: values differ"
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            _assert_same(a, b, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def _check_truth(batch, truth, patch):
    """Every patch of a batch against the generator's voxels at its patch_start (padded as PAD_VALUES)."""
    for j, case_id in enumerate(batch["case_id"]):
        case = truth[case_id]
        start = batch["patch_start"][j].numpy()
        ct = np.full(patch, PAD_VALUES["ct"], np.float32)
        pet = np.full(patch, PAD_VALUES["pet"], np.float32)
        label = np.full(patch, PAD_VALUES["label"], np.uint8)
        box = tuple(slice(int(a), int(a) + p) for a, p in zip(start, patch))
        inner = tuple(slice(0, min(p, s - int(a))) for a, p, s in zip(start, patch, SHAPE))
        ct[inner], pet[inner], label[inner] = case.ct[box], case.pet[box], case.label[box]
        np.testing.assert_array_equal(batch["image"][j, 0].numpy(), ct, err_msg=f"CT of {case_id} at {start}")
        np.testing.assert_array_equal(batch["image"][j, 1].numpy(), pet, err_msg=f"PET of {case_id} at {start}")
        np.testing.assert_array_equal(batch["label"][j, 0].numpy(), label, err_msg=f"label of {case_id} at {start}")


@pytest.mark.parametrize("patch", [(8, 8, 8), (24, 8, 30)])  # the second reaches past the volume: padded
def test_batch_path_equals_torch_stack_of_the_items_and_the_voxels(built, patch):
    release, cache = built
    ds = load_lymphatlas(release.path, cache_dir=cache, patch_size=patch, samples_per_case=3, seed=4,
                         progress=False)
    for epoch in (0, 5):
        ds.set_epoch(epoch)
        for indices in ([0, 1], [len(ds) - 1, 2, 7], [4]):
            fast = collate(ds.__getitems__(indices))
            slow = default_collate([ds[i] for i in indices])
            _assert_same(fast, slow, f"epoch {epoch} {indices}")
            assert fast["image"].is_contiguous() and fast["label"].is_contiguous()
            _check_truth(fast, release.truth, patch)
    # the items __getitems__ returns are the per-item items too (a user's own collate gets them)
    items = ds.__getitems__([3, 0])
    for item, index in zip(items, (3, 0)):
        _assert_same(dict(item), ds[index], f"item {index}")
    _assert_same(default_collate(items), default_collate([ds[3], ds[0]]), "default_collate of __getitems__")


def test_collate_passes_anything_else_to_default_collate(built):
    release, cache = built
    whole = load_lymphatlas(release.path, cache_dir=cache, progress=False)
    _assert_same(collate([whole[0], whole[1]]), default_collate([whole[0], whole[1]]))
    with_transform = load_lymphatlas(release.path, cache_dir=cache, patch_size=8, seed=1, progress=False,
                                     transform=lambda item: {**item, "image": item["image"] * 2})
    _assert_same(collate(with_transform.__getitems__([0, 1])), default_collate([with_transform[0], with_transform[1]]))


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_batches_equal_the_default_ones_and_survive_being_kept(built, workers):
    """Batches kept across epochs (persistent workers reuse their shared-memory buffers) still hold their voxels."""
    release, cache = built
    ds = load_lymphatlas(release.path, cache_dir=cache, patch_size=8, samples_per_case=4, seed=9, progress=False)

    def batches(collate_fn):
        loader = DataLoader(ds, batch_size=2, shuffle=True, num_workers=workers, collate_fn=collate_fn,
                            persistent_workers=workers > 0, generator=torch.Generator().manual_seed(1))
        kept = []
        for epoch in range(3):  # more batches than a worker's pool holds buffers
            ds.set_epoch(epoch)
            kept += list(loader)
        return kept

    fast, slow = batches(collate), batches(None)
    assert len(fast) == len(slow) == 3 * len(ds) // 2 > 2 * _batch.POOL_SLOTS
    for i, (a, b) in enumerate(zip(fast, slow)):
        _assert_same(a, b, f"batch {i}")
        _check_truth(a, release.truth, (8, 8, 8))
    if workers:
        assert all(b["image"].is_shared() for b in fast)


@pytest.mark.parametrize("shared", [True, False])  # a worker's pool, the main process's
def test_a_pool_reuses_a_buffer_only_when_nothing_holds_it(shared):
    pool = _batch._Pool(shared=shared, slots=3)
    first, slot = pool.take((16, 64), torch.float32)
    assert first.is_shared() == shared and first.shape == (16, 64)
    ptr = first.data_ptr()
    view = first[3]
    del first
    second, other = pool.take((16, 64), torch.float32)  # the first still viewed here
    assert other != slot and second.data_ptr() != ptr
    del view, second
    again, same = pool.take((16, 64), torch.float32)
    assert (same, again.data_ptr()) == (slot, ptr)
    del again
    pool.lent[slot] = 1  # lent to the main process
    lent_out, other = pool.take((16, 64), torch.float32)
    assert other != slot and lent_out.data_ptr() != ptr
    del lent_out
    pool.lent[slot] = 0
    assert pool.take((16, 64), torch.float32)[1] == slot
    assert pool.take((16, 128), torch.uint8)[0].untyped_storage().nbytes() == 2048  # another size, another buffer
    held = [pool.take((16, 64), torch.float32) for _ in range(3)]  # more than the pool holds
    assert [s for _, s in held].count(None) >= 1 and len(pool.storages) == 3
    assert len({t.data_ptr() for t, _ in held}) == 3


def test_the_main_process_gives_a_buffer_back_when_its_last_view_is_freed():
    lent = torch.ones(2, dtype=torch.uint8)
    batch = _batch._arrived({"image": torch.zeros(2, 3), "label": torch.zeros(2, 1, dtype=torch.uint8)},
                            {"case_id": ["a", "b"], "affine": _batch._Value(np.eye(2))},
                            ["image", "case_id", "label", "affine"], (("image", lent, 0), ("label", lent, 1)))
    assert type(batch) is dict and list(batch) == ["image", "case_id", "label", "affine"]
    assert isinstance(batch["affine"], torch.Tensor) and batch["affine"].dtype == torch.float64
    view = batch["image"][1]
    shares = batch["image"].detach()  # the same memory without a reference to the batch's tensor
    del batch
    gc.collect()
    assert lent.tolist() == [1, 0]  # the label is freed, the image still viewed
    del view
    gc.collect()
    assert lent.tolist() == [1, 0]  # still shared
    del shares
    gc.collect()
    assert lent.tolist() == [0, 0]


def _probe_collate(batch):
    """collate, and what the worker that ran it saw: whether the voxels were in shared memory before sending, where."""
    out = collate(batch)
    return {"batch": out, "shared": out["image"].is_shared(), "where": (os.getpid(), out["image"].data_ptr())}


def test_workers_write_batches_into_shared_memory_they_reuse(built):
    release, cache = built
    ds = load_lymphatlas(release.path, cache_dir=cache, patch_size=8, samples_per_case=6, seed=2, progress=False)
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=_probe_collate, persistent_workers=True)
    seen = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        for got in loader:  # each batch dropped when the next arrives, as a training loop does
            assert got["shared"], "the worker wrote the batch outside shared memory: sending it copies it"
            seen.append(got["where"])
    assert len(set(seen)) <= 2 * _batch.POOL_SLOTS < len(seen), f"{len(set(seen))} buffers for {len(seen)} batches"


_USER_SCRIPT = r"""
import sys
import torch
from torch.utils.data import DataLoader
from lymphatlas_ds import load_lymphatlas
from lymphatlas_ds.loader import collate

train = load_lymphatlas(sys.argv[1], cache_dir=sys.argv[2], patch_size=(8, 8, 8), samples_per_case=4, seed=3)
workers = int(sys.argv[3])
loader = DataLoader(train, batch_size=2, shuffle=True, num_workers=workers, collate_fn=collate,
                    generator=torch.Generator().manual_seed(0))
plain = DataLoader(train, batch_size=2, shuffle=True, num_workers=workers, generator=torch.Generator().manual_seed(0))
n = 0
for epoch in range(2):
    train.set_epoch(epoch)
    # each loader's epoch whole (zipping two shuffled DataLoaders desynchronises their samplers' generators)
    for fast, slow in zip(list(loader), list(plain)):
        assert list(fast) == list(slow), (list(fast), list(slow))
        assert fast["image"].shape == (2, 2, 8, 8, 8) and fast["image"].dtype == torch.float32
        assert torch.equal(fast["image"], slow["image"]) and torch.equal(fast["label"], slow["label"])
        assert torch.equal(fast["patch_start"], slow["patch_start"]) and fast["case_id"] == slow["case_id"]
        n += 1
print("batches", n)
"""


@pytest.mark.parametrize("workers", [0, 2])
def test_a_user_script_with_the_recommended_collate_runs_from_another_folder(built, tmp_path, workers):
    release, cache = built
    script = tmp_path / "train.py"
    script.write_text(_USER_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script), str(release.path), str(tmp_path / "cache"), str(workers)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"batches {2 * (4 * len(load_lymphatlas(release.path, cache_dir=cache).case_ids) // 2)}" in proc.stdout
