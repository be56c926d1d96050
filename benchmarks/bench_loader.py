"""Benchmark the torch client against the naive baseline of reading the cases' ``.nii.gz`` files.

Builds a WORK folder of whole-body-sized cases (``--size full``: 320 x 512 x 512 voxels, the CT
grid of a real PET/CT exam; ``small`` for a quick check), a release from it, then measures in
one run:

1. whole-case load: ``load_lymphatlas(...)[i]`` (decoded cache warm) vs nibabel reading the
   case's ``ct/pet/label.nii.gz`` (target: >= 5x);
2. random 128^3 patches (CT + PET + label, a third centred on foreground) vs decoding the three
   ``.nii.gz`` files and cropping, as a naive loader over nnU-Net raw files does (target: >= 50x);
   also through a ``DataLoader`` with 0, 1, 2 (``--max-workers``) workers, as ratios to 0 workers
   (target: the most workers >= 1.0x);
3. the first-epoch cost: decoding each case into the cache, and the sizes on disk;
4. memory: peak RSS growth of a process drawing patches vs the size of one decoded case
   (target: patch mode never holds a whole decoded case).

Prints one line per figure and the ratios; exits 1 if a target is missed.

    python benchmarks/bench_loader.py --size full
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from builder.release.build import build_release  # noqa: E402
from lymphatlas_ds.loader import load_lymphatlas  # noqa: E402
from lymphatlas_synth.fake_work import make_fake_work  # noqa: E402

SIZES = {"small": ((96, 160, 160), (64, 64, 64)), "full": ((320, 512, 512), (128, 128, 128))}


def nifti_case(folder: Path) -> dict[str, np.ndarray]:
    """The baseline: nibabel reads the three .nii.gz files in their stored dtype (no float64 scaling)."""
    return {name: np.asanyarray(nib.load(folder / f"{name}.nii.gz").dataobj) for name in ("ct", "pet", "label")}


def timed(fn, repeat: int) -> float:
    """The fastest of ``repeat`` runs: on a shared machine the minimum is the least disturbed figure."""
    best = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best.append(time.perf_counter() - t)
    return float(min(best))


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


MEMORY_PROBE = r"""
import json, sys

from lymphatlas_ds._io import peak_rss_bytes as hwm  # VmHWM: ru_maxrss would include the parent's size at fork

import numpy as np, torch
from lymphatlas_ds.loader import load_lymphatlas
after_import = hwm()
ds = load_lymphatlas(sys.argv[1], cache_dir=sys.argv[2], patch_size=tuple(json.loads(sys.argv[3])), samples_per_case=40)
ds[0]
before = hwm()
for i in range(len(ds)):
    ds[i]
print(json.dumps({"import": after_import, "before": before, "after": hwm(), "patches": len(ds)}))
"""


BUILD_PROBE = r"""
import json, sys

from lymphatlas_ds._io import peak_rss_bytes as hwm  # VmHWM: ru_maxrss would include the parent's size at fork

import numpy as np, torch
from lymphatlas_ds.loader import load_lymphatlas
ds = load_lymphatlas(sys.argv[1], cache_dir=sys.argv[2], patch_size=(64, 64, 64))
ds.release.case_ids("all", "train")
after_import = hwm()
ds.entry(ds.case_ids[0])
print(json.dumps({"import": after_import, "after": hwm()}))
"""


@dataclass(frozen=True)
class Setup:
    """The folders and sizes of one run."""

    work: Path
    release: Path
    cache: Path
    shape: tuple[int, int, int]
    patch: tuple[int, int, int]


def make_release(setup: Setup, patients: int) -> None:
    """A fake WORK of whole cases of ``setup.shape`` voxels and its release."""
    t = time.perf_counter()
    make_fake_work(setup.work, n_patients=patients, seed=0, shape_zyx=setup.shape, spacing_xyz=(0.98, 0.98, 3.0))
    build_release(setup.work, setup.release, version="1.0.0")
    print(f"setup: fake WORK + release of {setup.shape} cases in {time.perf_counter() - t:.0f} s")


def first_epoch(setup: Setup, case_dirs: list[Path]):
    """3. First epoch: decode every case into the cache (also checks each against its content hash); prints
    the time per case and the sizes on disk, returns the train split."""
    ds = load_lymphatlas(setup.release, split="train", cache_dir=setup.cache)
    test = load_lymphatlas(setup.release, split="test", cache_dir=setup.cache)
    t = time.perf_counter()
    ds.prepare()
    test.prepare()
    build = (time.perf_counter() - t) / len(case_dirs)
    print(f"first-epoch cache build: {build:.2f} s per case")
    nii = sum(dir_size(d) - (d / "case.json").stat().st_size for d in case_dirs) / len(case_dirs)
    shards = dir_size(setup.release / "data") / len(case_dirs)
    cached = dir_size(setup.cache / "1.0.0") / len(case_dirs)
    print(f"size per case: .nii.gz {nii / 2**20:.0f} MiB, shard {shards / 2**20:.0f} MiB, decoded cache {cached / 2**20:.0f} MiB")
    return ds


def whole_case(setup: Setup, ds) -> float:
    """1. Whole-case load: the decoded cache (and the shard) vs nibabel; prints and returns the speed-up."""
    case_id = ds.case_ids[0]
    folder = setup.work / "cases" / case_id
    base_whole = timed(lambda: nifti_case(folder), 3)
    ours_whole = timed(lambda: ds[0], 5)
    item = ds[0]
    truth = nifti_case(folder)
    assert np.array_equal(item["image"][1].numpy(), truth["pet"].transpose(2, 1, 0)), "whole-case PET differs"
    shard_whole = timed(lambda: load_lymphatlas(setup.release, split="train", cache=False, cache_dir=setup.cache)[0], 2)
    ratio = base_whole / ours_whole
    print(f"whole case: nibabel .nii.gz {base_whole:.2f} s, load_lymphatlas (cache) {ours_whole:.3f} s, "
          f"(no cache, from the shard) {shard_whole:.2f} s -> {ratio:.1f}x (target >= 5x)")
    return ratio


def random_patches(setup: Setup, ds, *, n_patches: int, n_baseline: int):
    """2. Random patches: the patch dataset vs decoding the three .nii.gz files and cropping; prints the
    rates, returns (the patch dataset, the speed-up)."""
    shape, patch = setup.shape, setup.patch
    patches = load_lymphatlas(setup.release, split="train", cache_dir=setup.cache, patch_size=patch,
                              samples_per_case=max(1, n_patches // len(ds.case_ids)), seed=0)
    rng = np.random.default_rng(0)

    def baseline_patch() -> None:
        vols = nifti_case(setup.work / "cases" / ds.case_ids[int(rng.integers(len(ds.case_ids)))])
        start = [int(rng.integers(0, s - p + 1)) for s, p in zip(shape, patch)]
        box = tuple(slice(a, a + p) for a, p in zip(start, patch))
        for name in ("ct", "pet", "label"):
            np.ascontiguousarray(vols[name].transpose(2, 1, 0)[box])

    base_rate = n_baseline / timed(lambda: [baseline_patch() for _ in range(n_baseline)], 1)
    n = len(patches)
    t = time.perf_counter()
    centred = sum(bool(patches[i]["foreground_centred"]) for i in range(n))
    ours_rate = n / (time.perf_counter() - t)
    ratio = ours_rate / base_rate
    print(f"{patch} patches: .nii.gz decode+crop {base_rate:.2f}/s, load_lymphatlas {ours_rate:.1f}/s "
          f"({centred}/{n} foreground-centred) -> {ratio:.0f}x (target >= 50x)")
    return patches, ratio


def _touch(batch) -> None:
    """Read one value per 4 KiB page of the batch's tensors, as a training step's copy to the GPU would."""
    for value in batch.values():
        if hasattr(value, "view") and value.numel():
            value.reshape(-1)[:: max(1, 4096 // value.element_size())].sum()


def worker_scaling(patches, *, workers=(0, 1, 2), repeats: int = 3, batch_size: int = 2, collate_fn=None,
                   persistent: bool = False) -> dict:
    """Patches per second through ``DataLoader(num_workers=k)`` for each k, each epoch timed whole (worker
    start and first-use file opening included), the batches read in the main process; the k are interleaved
    and repeated, and each repeat's rates are divided by that repeat's ``num_workers=0`` rate (the same
    process, the same machine load); also the CPU time (user + system, main process and workers) per patch, the
    cost that counts where a session's processes share one CPU share (Linux autogroup on a loaded machine).
    ``persistent``: one ``DataLoader(persistent_workers=True)`` per k, started (one epoch) before the timing,
    so that only steady epochs are timed. ``collate_fn``: the DataLoader's (``lymphatlas_ds.loader.collate``: the patches written into the batch).
    Prints one line; returns ``{"rates": {k: [...]}, "ratios": {k: median}, "cpu_ms_per_patch": {k: median}}``."""
    import statistics

    import torch
    from torch.utils.data import DataLoader

    import resource

    def cpu_s() -> float:  # this process and its joined children (the epoch's workers): user + system
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    rates: dict[int, list[float]] = {k: [] for k in workers}
    cpu: dict[int, list[float]] = {k: [] for k in workers}
    def make(k: int, seed: int):
        return DataLoader(patches, batch_size=batch_size, shuffle=True, num_workers=k, collate_fn=collate_fn,
                          persistent_workers=persistent and k > 0, generator=torch.Generator().manual_seed(seed))

    kept = {k: make(k, 0) for k in workers} if persistent else {}
    for loader in kept.values():
        for batch in loader:
            _touch(batch)
    for rep in range(repeats):
        patches.set_epoch(rep)
        for k in workers if rep % 2 == 0 else workers[::-1]:  # turns in both orders: a drift of the load cancels
            loader = kept[k] if persistent else make(k, rep)
            t, used = time.perf_counter(), cpu_s()
            count = 0
            for batch in loader:
                _touch(batch)
                count += len(batch["case_id"])
            rates[k].append(count / (time.perf_counter() - t))
            cpu[k].append(1000 * (cpu_s() - used) / max(count, 1))
    base = workers[0]
    ratios = {k: statistics.median(r / b for r, b in zip(rates[k], rates[base])) for k in workers}
    load = os.getloadavg()[0]
    spread = {k: (min(r / b for r, b in zip(rates[k], rates[base])), max(r / b for r, b in zip(rates[k], rates[base])))
              for k in workers}
    print(f"DataLoader(batch_size={batch_size}{', persistent_workers' if persistent else ''}) patches/s, median of "
          f"{repeats} interleaved epochs of {len(patches)} "
          f"(load {load:.1f} on {os.cpu_count()} cores): "
          + ", ".join(f"num_workers={k} {statistics.median(rates[k]):.1f}/s ({ratios[k]:.2f}x, "
                      f"{spread[k][0]:.2f}-{spread[k][1]:.2f}"
                      # CPU of joined workers only: persistent ones are still running
                      + ("" if persistent else f", CPU {statistics.median(cpu[k]):.0f} ms/patch") + ")"
                      for k in workers), flush=True)
    return {"rates": rates, "ratios": ratios, "cpu_ms_per_patch": {k: statistics.median(v) for k, v in cpu.items()}}


def probe(script: str, *argv: str) -> dict:
    """Run a memory probe in a fresh process; its JSON line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def patch_memory(setup: Setup, decoded_bytes: int) -> int:
    """4. Memory of patch sampling, in a fresh process; prints it, returns the peak above the imports."""
    mem = probe(MEMORY_PROBE, str(setup.release), str(setup.cache), json.dumps(list(setup.patch)))
    grow = mem["after"] - mem["before"]
    patch_bytes = int(np.prod(setup.patch)) * (4 * 2 + 1)
    above_import = mem["after"] - mem["import"]
    print(f"patch-mode memory: peak RSS {mem['after'] / 2**20:.0f} MiB, {above_import / 2**20:.0f} MiB above the imports, "
          f"grew {grow / 2**20:.0f} MiB over {mem['patches']} patches (one item {patch_bytes / 2**20:.0f} MiB; "
          f"one decoded case {decoded_bytes / 2**20:.0f} MiB)")
    return above_import


def build_memory(setup: Setup, probe_cache: Path, decoded_bytes: int) -> None:
    """Peak memory of building the cache of one case, in a fresh process."""
    mem = probe(BUILD_PROBE, str(setup.release), str(probe_cache))
    print(f"cache build memory (one case, one process): peak {(mem['after'] - mem['import']) / 2**20:.0f} MiB above "
          f"the imports (one decoded case {decoded_bytes / 2**20:.0f} MiB; volumes are decoded one at a time, "
          "parquet's read of the largest one dominates)")
    shutil.rmtree(probe_cache, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--patients", type=int, default=2, help="patients of the fake WORK (every third has 2 exams)")
    parser.add_argument("--patches", type=int, default=200, help="patches timed for the cached path")
    parser.add_argument("--baseline-patches", type=int, default=3, help="patches timed for the .nii.gz baseline")
    parser.add_argument("--max-workers", type=int, default=2,
                        help="time DataLoader(num_workers=k) for k = 0 .. this (use the machine's core count)")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    args = parser.parse_args(argv)
    shape, patch = SIZES[args.size]
    tmp = args.keep or Path(tempfile.mkdtemp(prefix="bench_loader_"))
    failed = []
    try:
        setup = Setup(work=tmp / "work", release=tmp / "release", cache=tmp / "cache", shape=shape, patch=patch)
        if not (setup.release / "manifest.json").exists():
            make_release(setup, args.patients)
        shutil.rmtree(setup.cache, ignore_errors=True)
        case_dirs = sorted((setup.work / "cases").iterdir())
        n_voxels = int(np.prod(shape))
        decoded_bytes = n_voxels * (2 + 4 + 1)
        print(f"cases: {len(case_dirs)} of {shape} voxels, decoded {decoded_bytes / 2**20:.0f} MiB each (ct+pet+label)")
        ds = first_epoch(setup, case_dirs)
        if whole_case(setup, ds) < 5:
            failed.append("whole-case")
        patches, ratio = random_patches(setup, ds, n_patches=args.patches, n_baseline=args.baseline_patches)
        if ratio < 50:
            failed.append("patches")
        scaling = worker_scaling(patches, workers=tuple(range(args.max_workers + 1)))
        if scaling["ratios"][max(scaling["ratios"])] < 1.0:
            failed.append("workers")
        if patch_memory(setup, decoded_bytes) >= decoded_bytes / 2:
            failed.append("memory")
        build_memory(setup, tmp / "cache_probe", decoded_bytes)
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.size != "full":
        print(f"(targets are set for --size full; at {args.size} size they would miss: {', '.join(failed) or 'none'})")
        return 0
    print("targets missed: " + ", ".join(failed) if failed else "all targets met")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
