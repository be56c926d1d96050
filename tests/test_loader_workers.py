"""DataLoader workers: own file handles per worker, one thread each, cache checksums read once per dataset,
items independent of the number of workers; (slow) workers at least as fast as one process."""

from __future__ import annotations

import multiprocessing
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lymphatlas_ds import cache as cache_mod
from lymphatlas_ds import load_lymphatlas
from tests.support.releases import build_fake_release

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("workers")
    return build_fake_release(root, n_patients=4, seed=3, shape_zyx=(20, 24, 28), spacing_xyz=(2.0, 2.0, 3.0))


class _Probe(Dataset):
    """The patch dataset's items, with what the process that made each one had open."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> dict:
        import blosc2

        item = self.inner[index]
        entry = self.inner._entries[item["case_id"]]
        return {
            "index": index,
            "image": item["image"],
            "label": item["label"],
            "pid": os.getpid(),
            # the process that opened the blosc2 handles this item was read through
            "handle_pid": entry._pid,
            "handles": len(entry._arrays),
            "blosc2_threads": blosc2.nthreads,
            "torch_threads": torch.get_num_threads(),
        }


def _items(ds, workers: int) -> dict[int, dict]:
    loader = DataLoader(_Probe(ds), batch_size=2, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(3))
    out = {}
    for batch in loader:
        for j, index in enumerate(batch["index"].tolist()):
            out[index] = {k: v[j] for k, v in batch.items()}
    return out


def test_each_worker_opens_its_own_handles_with_one_thread_and_items_do_not_depend_on_workers(release, tmp_path):
    ds = load_lymphatlas(release.path, cache_dir=tmp_path / "cache", patch_size=(8, 8, 8), samples_per_case=3,
                         seed=2, progress=False)
    ds.prepare()
    ds[0]  # the main process opens handles too: the workers must not use them
    main = os.getpid()
    alone = _items(ds, workers=0)
    pooled = _items(ds, workers=2)
    assert sorted(alone) == sorted(pooled) == list(range(len(ds)))
    pids = {int(item["pid"]) for item in pooled.values()}
    assert len(pids) == 2 and main not in pids
    for index, item in pooled.items():
        assert int(item["handle_pid"]) == int(item["pid"]), f"item {index} read through handles of another process"
        assert int(item["handles"]) >= 2  # ct, pet (and label) opened in the worker
        assert int(item["blosc2_threads"]) == 1 and int(item["torch_threads"]) == 1
        assert torch.equal(item["image"], alone[index]["image"]) and torch.equal(item["label"], alone[index]["label"])
    # against the cache's ground truth: the release's own voxels
    truth = release.truth
    for index in (0, len(ds) - 1):
        item, case_id = pooled[index], ds.case_ids[index // ds.samples_per_case]
        start = ds[index]["patch_start"].numpy()
        box = tuple(slice(int(a), int(a) + 8) for a in start)
        np.testing.assert_array_equal(item["image"][0].numpy(), truth[case_id].ct[box].astype(np.float32))
        np.testing.assert_array_equal(item["label"][0].numpy(), truth[case_id].label[box])


def test_workers_read_an_entrys_checksums_once_per_dataset(release, tmp_path, monkeypatch):
    """Each worker of each epoch used to re-read every cache file it opened to check its checksum (one full read of
    the cache per worker per epoch); now the first check is recorded in shared memory."""
    reads = multiprocessing.Value("i", 0)
    checksum = cache_mod.file_checksum

    def counted(path):
        with reads.get_lock():
            reads.value += 1
        return checksum(path)

    monkeypatch.setattr(cache_mod, "file_checksum", counted)  # fork carries the patch into the workers
    ds = load_lymphatlas(release.path, cache_dir=tmp_path / "cache", patch_size=(8, 8, 8), samples_per_case=2,
                         seed=2, progress=False)
    files_per_entry = 4  # ct, pet, label, foreground
    # the first epoch builds the entries in the workers (checked after writing; a worker that waited on a
    # sibling's build lock checks again)
    ds.set_epoch(0)
    assert sum(len(b["case_id"]) for b in DataLoader(ds, batch_size=2, num_workers=2)) == len(ds)
    first = reads.value
    assert 0 < first <= 2 * 2 * files_per_entry * len(ds.case_ids)  # each file written and checked, at most twice
    for epoch in (1, 2):  # new workers each epoch: nothing read again
        before = reads.value
        ds.set_epoch(epoch)
        assert sum(len(b["case_id"]) for b in DataLoader(ds, batch_size=2, num_workers=2)) == len(ds)
        assert reads.value == before, f"epoch {epoch}: workers re-read {reads.value - before} cache files"
    # a new dataset (a new run) checks the entries again, once
    again = load_lymphatlas(release.path, cache_dir=tmp_path / "cache", patch_size=(8, 8, 8), progress=False)
    before = reads.value
    again.prepare()
    assert reads.value - before == files_per_entry * len(again.case_ids)


_FRESH_PROCESS = r"""
import json, sys
from lymphatlas_ds import load_lymphatlas
ds = load_lymphatlas(sys.argv[1], cache_dir=sys.argv[2], patch_size=(8, 8, 8), progress=False)
made = "blosc2" in sys.modules
ds[0]
print(json.dumps({"blosc2_when_made": made, "nibabel_after_first_patch": "nibabel" in sys.modules}))
"""


def test_a_fresh_process_imports_blosc2_with_the_dataset_and_no_nibabel_for_a_cached_patch(release, tmp_path):
    """Issue 21: a DataLoader's workers are forked from the process that made the dataset; when blosc2 (and the
    httpx it imports) was first imported in each worker, every worker of every epoch paid ~0.4 s for it (20 % of
    the workers' time in a py-spy profile). And a patch from a warm cache needs neither nibabel nor the pydicom
    it imports (~1 s of the first patch of a fresh process). Checked in a fresh interpreter: this one has
    imported everything."""
    import json
    import subprocess

    cache = tmp_path / "cache"
    load_lymphatlas(release.path, cache_dir=cache, patch_size=(8, 8, 8), progress=False).prepare()  # warm
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, str(release.path), str(cache)], env=env,
                         capture_output=True, text=True, check=True, timeout=300)
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found == {"blosc2_when_made": True, "nibabel_after_first_patch": False}, found


def _spin(seconds: float, out) -> None:
    import time

    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    out.put(time.process_time())


def spare_cores(seconds: float = 1.0) -> float:
    """Cores this process's session can use now: two processes spin for ``seconds`` and their CPU time is summed
    (2.0 on an idle 2-core machine; about 1.0 when another process, e.g. the other pytest-xdist worker, holds a
    core)."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_spin, args=(seconds, out)) for _ in range(2)]
    for p in procs:
        p.start()
    cpu = sum(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join()
    return cpu / seconds


@pytest.mark.slow
def test_two_workers_are_not_slower_than_one_process(tmp_path):
    """benchmarks/bench_loader.py's worker comparison at 128^3 patches on cases of 128x256x256, 32 patches an
    epoch: 2 workers >= 1.0x ``num_workers=0`` on the same dataset, the median of 3 interleaved repeats (timing
    noise on a loaded machine); tried twice. Where the machine had no spare core when measured (a spin probe
    finds less than 1.6 of its 2 cores free), a slower result is an expected failure, not a pass. The dataset is made and prepared as a user does (``prepare()`` on a
    new cache), then the recommended ``DataLoader(ds, batch_size=2, num_workers=k, persistent_workers=True,
    collate_fn=collate)`` (patches decompressed into the batch, shared-memory buffers reused)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_loader import worker_scaling

    from lymphatlas_ds.loader import collate

    release = build_fake_release(tmp_path, n_patients=2, seed=1, shape_zyx=(128, 256, 256),
                                 spacing_xyz=(0.98, 0.98, 3.0))
    ds = load_lymphatlas(release.path, cache_dir=tmp_path / "cache", patch_size=(128, 128, 128), samples_per_case=16,
                         progress=False)
    ds.prepare()
    ratios, spare = [], []
    for _ in range(2):
        spare.append(spare_cores())
        ratios.append(worker_scaling(ds, workers=(0, 2), repeats=3, collate_fn=collate, persistent=True)["ratios"][2])
        if ratios[-1] >= 1.0:
            break
    if max(ratios) < 1.0 and min(spare) < 1.6:
        # Workers cannot add cores the machine does not give: measured on the 2-core VM, 2 workers 1.54x one
        # process with nothing else running (bench_peers.py --scaling 5, benchmarks/results/peers.md), 0.76x while
        # another session's jobs held about one core. Under pytest -n 2 the other xdist worker holds one.
        pytest.xfail(f"no spare core ({[round(c, 2) for c in spare]} of 2 free): 2 workers / one process {ratios}")
    assert max(ratios) >= 1.0, f"2 workers / one process: {ratios} with {[round(c, 2) for c in spare]} cores free"
