"""Benchmark `materialize --nnunet`: parallel writers + gzip level 1 against a serial level-6 writer.

The baseline (one writer, gzip level 6: Python's and ITK's usual default) and the variants run in
the same process on the same release, so the printed ratios compare like with like. Each run reads
the release (decode included), checks the voxels and writes imagesTr / labelsTr.

    python benchmarks/bench_materialize.py --size small      # 8 cases of 96x128x128, ~1 min
    python benchmarks/bench_materialize.py --size full       # 2 cases of 300x512x512 (real CT size)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = {"small": ((96, 128, 128), 6), "full": ((300, 512, 512), 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--keep", type=Path, default=None, help="folder to keep the data in (default: a temp dir)")
    args = p.parse_args()

    from builder.release.build import build_release
    from lymphatlas_ds.nnunet import materialize_nnunet
    from lymphatlas_ds.reader import Release
    from lymphatlas_synth.fake_work import make_fake_work

    shape, n_patients = SIZES[args.size]
    root = Path(args.keep or tempfile.mkdtemp(prefix="bench_materialize_"))
    t = time.perf_counter()
    make_fake_work(root / "work", n_patients=n_patients, seed=1, shape_zyx=shape)
    build_release(root / "work", root / "release", version="1.0.0", overwrite=True)
    print(f"setup: {n_patients} patients of shape {shape} in {time.perf_counter() - t:.1f} s ({root})")
    release = Release(root / "release", remember=False, verify=False)

    runs = [("serial, gzip 6 (baseline)", 1, 6), ("serial, gzip 1", 1, 1), (f"{args.workers} writers, gzip 1", args.workers, 1)]
    results = []
    for i, (label, workers, level) in enumerate(runs):
        raw = root / f"raw{i}"
        shutil.rmtree(raw, ignore_errors=True)
        r = materialize_nnunet(release, raw, dataset_id=900 + i, name="Bench", workers=workers, gzip_level=level)
        size = sum(f.stat().st_size for f in raw.rglob("*.nii.gz"))
        results.append((label, r.seconds, r.throughput_mb_s, size))
        # a rerun with nothing to write: what idempotency costs (decode + compare)
        again = materialize_nnunet(release, raw, dataset_id=900 + i, name="Bench", workers=workers, gzip_level=level)
        assert again.files_written == 0
        results[-1] += (again.seconds,)
    base_t, base_size = results[0][1], results[0][3]
    print(f"\n{'variant':28s} {'time s':>8s} {'MB/s':>8s} {'speed-up':>9s} {'disk MB':>8s} {'size ratio':>10s} {'rerun s':>8s}")
    for label, secs, mbs, size, rerun in results:
        print(f"{label:28s} {secs:8.2f} {mbs:8.1f} {base_t / secs:8.2f}x {size / 1e6:8.1f} {size / base_size:10.3f} {rerun:8.2f}")
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
