"""Benchmark what the decoded cache's checksum costs when an entry is opened.

Builds one case of a release (``--size full``: 320 x 512 x 512 voxels, the CT grid of a whole-body
PET/CT exam; ``small``: 96 x 160 x 160 for a quick check) into the decoded cache, then measures in
one run, page cache warm, the fastest of ``--repeat`` runs of:

1. opening the entry without the check (``case.json`` only) and with it (xxh3-128 over every
   entry file): the ratio checked / unchecked;
2. the same files through sha256 instead (what a cryptographic checksum would cost);
3. for scale: reading the whole case (CT, PET, label) and one random patch from the entry; the
   check happens once per case per process, the reads once per item.

Prints one line per figure and the ratios.

    python benchmarks/bench_cache.py --size full
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from builder.release.build import build_release  # noqa: E402
from lymphatlas_ds.cache import DecodedCache, file_checksum  # noqa: E402
from lymphatlas_ds.reader import Release  # noqa: E402
from lymphatlas_synth.fake_work import make_fake_work  # noqa: E402

from bench_loader import timed  # noqa: E402  (benchmarks/ is this script's folder)

SIZES = {"small": ((96, 160, 160), (64, 64, 64)), "full": ((320, 512, 512), (128, 128, 128))}


def sha256_files(paths: list[Path]) -> None:
    for path in paths:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(8 * 1024 * 1024):
                digest.update(block)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    shape, patch = SIZES[args.size]
    with tempfile.TemporaryDirectory(prefix="bench_cache_") as tmp:
        root = Path(tmp)
        make_fake_work(root / "work", n_patients=1, seed=5, shape_zyx=shape)
        build_release(root / "work", root / "release", version="1.0.0")
        release = Release(root / "release", remember=False)
        case_id = sorted(release.manifest["cases"])[0]
        cache = DecodedCache(root / "cache")
        t = time.perf_counter()
        entry = cache.ensure(release, case_id)
        build_s = time.perf_counter() - t
        files = sorted(p for p in entry.path.iterdir() if p.name != "case.json")
        size_mb = sum(p.stat().st_size for p in files) / 2**20
        path = entry.path

        unchecked = timed(lambda: DecodedCache._load(path, verify=False), args.repeat * 4)
        checked = timed(lambda: DecodedCache._load(path), args.repeat)
        xxh = timed(lambda: [file_checksum(p) for p in files], args.repeat)
        sha = timed(lambda: sha256_files(files), args.repeat)

        def whole() -> None:
            e = DecodedCache._load(path, verify=False)
            for name in ("ct", "pet", "label"):
                e.read(name)

        rng = np.random.default_rng(0)

        def one_patch() -> None:
            e = DecodedCache._load(path, verify=False)
            start = [int(rng.integers(0, s - p + 1)) for s, p in zip(shape, patch)]
            box = tuple(slice(a, a + p) for a, p in zip(start, patch))
            for name in ("ct", "pet", "label"):
                e.read_patch(name, box)

        whole_s = timed(whole, args.repeat)
        patch_s = timed(one_patch, args.repeat * 2)

    print(f"case {shape[0]}x{shape[1]}x{shape[2]} voxels; entry files {size_mb:.1f} MiB; built in {build_s:.2f} s")
    print(f"open unchecked (case.json only)      {unchecked * 1e3:9.2f} ms")
    print(f"open checked (xxh3-128 of the files) {checked * 1e3:9.2f} ms  ({size_mb / max(xxh, 1e-9):.0f} MiB/s)")
    print(f"sha256 of the same files             {sha * 1e3:9.2f} ms  ({size_mb / max(sha, 1e-9):.0f} MiB/s)")
    print(f"whole-case read (ct, pet, label)     {whole_s * 1e3:9.2f} ms")
    print(f"one {patch[0]}^3 patch read (3 volumes)   {patch_s * 1e3:9.2f} ms")
    print(f"ratio checked / unchecked open: {checked / unchecked:.0f}x "
          f"(+{(checked - unchecked) * 1e3:.1f} ms once per case per process)")
    print(f"ratio check / whole-case read: {(checked - unchecked) / whole_s:.2f}; "
          f"check / one patch read: {(checked - unchecked) / patch_s:.2f}")
    print(f"ratio sha256 / xxh3-128 over the entry files: {sha / xxh:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
