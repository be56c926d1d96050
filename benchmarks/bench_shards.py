"""Byte layout of a shard cell: gzip NIfTI cells vs raw NIfTI cells under parquet zstd.

Baseline, measured in the same run: nibabel reading the case's three volumes as ``.nii.gz``
(gzip level 6), the way the paper's nnU-Net folders ship them. For each layout it prints bytes on
disk, encode time and the time to decode one case (ct, pet, label) from a shard of two cases,
and the ratios to the baseline. Acceptance (issue 5): decode >= 3x faster than the baseline, no
more bytes on disk.

Volumes are synthesised with numpy to look like an aligned whole-body case: a 512 x 512 x Z CT
in HU (air with noise, body, lungs, bone, soft-tissue noise), a PET made at PET resolution
(~4 mm, noisy SUV with hot lesions) and resampled onto the CT grid with cubic interpolation, as
the builder does, and the lesion label.

    python benchmarks/bench_shards.py --size full        # 512 x 512 x 300
    python benchmarks/bench_shards.py --size small       # 128 x 128 x 80, a quick look

``--release 3 6 12 [--slices 250] [--long 600]``: the release at scale (issue 21). A fake WORK of
full-size cases (``lymphatlas_synth.fake_work.make_large_work``: 512 x 512 x SLICES, one volume set
hard-linked), then ``build_release`` in a fresh process for 3, 6 and 12 cases and for one case of
LONG slices; for each: wall time, the process's peak RSS (its own ``VmHWM``), the largest row
group (parquet ``total_byte_size``, the Hub viewer's number) and bytes on disk; then, on one case's
volumes, the cells' encode time against zstd-3 of the same raw NIfTI bytes (interleaved, best of 3).
``--builder TREE`` runs another checkout's builder (a before figure). Needs about 0.3 GB of disk
per case and one case's voxels in memory at a time.
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from builder.release.shards import arrow_schema  # noqa: E402
from lymphatlas_ds import codec  # noqa: E402
from lymphatlas_ds.schema import IMAGE_COLUMNS, METADATA_COLUMNS  # noqa: E402

SIZES = {"full": (300, 512, 512), "small": (80, 128, 128)}


def synth_case(shape_zyx: tuple[int, int, int], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    z, y, x = shape_zyx
    yy, xx = np.mgrid[0:y, 0:x].astype(np.float32)
    cy, cx = y / 2, x / 2
    fov = ((yy - cy) ** 2 + (xx - cx) ** 2) <= (0.49 * x) ** 2
    ct = np.empty(shape_zyx, np.int16)
    label = np.zeros(shape_zyx, np.uint8)
    for k in range(z):
        a = 0.36 * x * (1 + 0.08 * np.sin(k / 25)) ; b = 0.24 * y
        body = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1
        lung = (((np.abs(xx - cx) - 0.17 * x) / (0.1 * x)) ** 2 + ((yy - cy) / (0.13 * y)) ** 2 <= 1) & (z * 0.45 < k < z * 0.75)
        bone = ((xx - cx) ** 2 + (yy - (cy + 0.16 * y)) ** 2) <= (0.03 * x) ** 2
        sl = np.full((y, x), -1000.0, np.float32)
        sl[body] = 40.0
        sl[lung] = -850.0
        sl[bone] = 700.0
        sl += rng.normal(0, 12, (y, x)).astype(np.float32) * np.where(body, 1.5, 0.8)
        sl[~fov] = -1024
        ct[k] = np.round(sl).astype(np.int16)
    # PET at PET resolution (about 4 mm in-plane vs 1 mm CT at full size), then cubic onto the CT grid.
    pz, py, px = max(z // 1, 1), max(y // 3, 8), max(x // 3, 8)
    body_low = ndimage.zoom((ct > -300).astype(np.float32), (pz / z, py / y, px / x), order=1) > 0.5
    pet_low = np.where(body_low, rng.gamma(8.0, 0.15, (pz, py, px)), 0.0).astype(np.float32)
    for _ in range(12):
        c = rng.integers([pz // 8, py // 3, px // 3], [pz * 7 // 8, py * 2 // 3, px * 2 // 3])
        r = rng.uniform(1.5, 4.0)
        zz, yy2, xx2 = np.ogrid[0:pz, 0:py, 0:px]
        ball = (zz - c[0]) ** 2 + (yy2 - c[1]) ** 2 + (xx2 - c[2]) ** 2 <= r * r
        pet_low[ball] = rng.uniform(5, 25)
    pet = ndimage.zoom(pet_low, (z / pz, y / py, x / px), order=3)[:z, :y, :x]
    pet = np.clip(pet, 0, None).astype(np.float32)
    label[pet > 4.0] = 1
    return {"ct": ct, "pet": pet, "label": label}


def affine_of(shape_zyx) -> np.ndarray:
    a = np.diag([-0.98, -0.98, 3.0, 1.0])
    a[:3, 3] = [250.0, 250.0, -900.0]
    return a


def row_of(case_id: str, cells: dict) -> dict:
    row = {name: None for name in METADATA_COLUMNS}
    row.update(case_id=case_id, subject_id="LP-" + case_id, diagnosis="NHL", split="train", fold=0)
    row.update(cells)
    return row


def write_shard(path: Path, rows: list[dict], *, compression: str, level: int | None) -> float:
    schema = arrow_schema()
    t = time.perf_counter()
    with pq.ParquetWriter(
        path, schema, compression=compression, compression_level=level,
        use_dictionary=False, write_statistics=list(METADATA_COLUMNS),
    ) as writer:
        for row in rows:
            writer.write_table(pa.Table.from_pylist([row], schema=schema), row_group_size=1)
    return time.perf_counter() - t



def gzip_cells(cases: list[dict], affine: np.ndarray, folder: Path) -> tuple[list[dict], float]:
    """The baseline's cells: every volume as .nii.gz at gzip level 6, the second case also written to
    ``folder`` as three files; (cells of each case, encode seconds per case)."""
    t = time.perf_counter()
    cells_of_cases = []
    for i, case in enumerate(cases):
        cells = {}
        for name in IMAGE_COLUMNS:
            raw = codec.encode_volume(case[name], affine, f"c{i}_{name}", level=None)["bytes"]
            cells[name] = {"bytes": gzip.compress(raw, compresslevel=6), "path": f"c{i}_{name}.nii.gz"}
            if i == 1:
                (folder / f"{name}.nii.gz").write_bytes(cells[name]["bytes"])
        cells_of_cases.append(cells)
    return cells_of_cases, (time.perf_counter() - t) / 2


def read_niigz(folder: Path) -> None:
    """The baseline's decode: nibabel reads the case's three .nii.gz files."""
    for name in IMAGE_COLUMNS:
        np.asanyarray(nib.load(folder / f"{name}.nii.gz").dataobj)


def write_layout(path: Path, cells: list[dict], *, compression: str, level: int | None,
                 gzip_encode: float) -> tuple[int, float]:
    """Write the two cases' shard in one layout: (bytes of the second case's cells, encode seconds per case)."""
    enc = write_shard(path, [row_of(f"c{i}", c) for i, c in enumerate(cells)], compression=compression, level=level)
    if compression == "none":
        enc += 2 * gzip_encode  # the gzip cells were compressed before the parquet write
    meta = pq.ParquetFile(path).metadata
    size = sum(meta.row_group(1).column(c).total_compressed_size for c in range(meta.num_columns))
    return size, enc / 2


def decode_case(path: Path) -> None:
    """Decode the second case's three volumes from a shard."""
    table = pq.ParquetFile(path).read_row_group(1, columns=list(IMAGE_COLUMNS))
    for name in IMAGE_COLUMNS:
        codec.decode_volume(table.column(name)[0]["bytes"].as_buffer())


def best_times(decoders: dict, repeat: int) -> dict[str, float]:
    """Interleaved rounds, best of each: a busy shared machine slows every candidate alike."""
    best = {name: float("inf") for name in decoders}
    for _ in range(repeat):
        for name, fn in decoders.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def print_layouts(results: dict[str, tuple[int, float]], best: dict[str, float], base_size: int) -> None:
    """One row per layout: size, encode and decode time, and the ratios to the baseline."""
    base = best["baseline"]
    print(f"{'layout':38s} {'MiB/case':>9s} {'size/base':>9s} {'encode s':>9s} {'decode s':>9s} {'speed-up':>9s}")
    for label, (size, enc) in results.items():
        dec = best[label]
        print(f"{label:38s} {size / 2**20:9.1f} {size / base_size:9.3f} {enc:9.2f} {dec:9.3f} {base / dec:8.1f}x")


_BUILD = """
import json, sys, time
sys.path.insert(0, sys.argv[1])

def peak_rss_bytes():  # VmHWM: ru_maxrss would report the parent's size at fork (kept across exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))

from pathlib import Path
from builder.release.build import build_release
t = time.perf_counter()
build_release(Path(sys.argv[2]), Path(sys.argv[3]), version="1.0.0")
print(json.dumps({"wall_s": time.perf_counter() - t, "peak_rss": peak_rss_bytes()}))
"""


def _release_row(tree: Path, work: Path, out: Path) -> dict:
    """Build a release of ``work`` in a fresh interpreter with ``tree``'s builder; its time, peak RSS and shards."""
    import json
    import shutil
    import subprocess

    load = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, "-c", _BUILD, str(tree), str(work), str(out)],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"release of {work} failed:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    files = sorted(out.glob("data/*/*.parquet"))
    groups = [pq.read_metadata(f).row_group(i).total_byte_size for f in files for i in range(pq.read_metadata(f).num_row_groups)]
    row.update(max_row_group=max(groups), n_groups=len(groups), disk=sum(f.stat().st_size for f in files),
               load=(load + os.getloadavg()[0]) / 2)
    shutil.rmtree(out)
    return row


def _subset_work(work: Path, ids: list[str], target: Path) -> Path:
    """A WORK folder holding the first cases of ``work`` (hard links, no copy)."""
    import shutil

    (target / "cases").mkdir(parents=True)
    shutil.copytree(work / "private", target / "private", copy_function=os.link)
    shutil.copy(work / "failures.json", target)
    for case_id in ids:
        shutil.copytree(work / "cases" / case_id, target / "cases" / case_id, copy_function=os.link)
    return target


def encode_vs_zstd(shape: tuple[int, int, int], repeat: int = 3) -> tuple[float, float, int, int]:
    """Best-of-``repeat`` seconds to encode one case's cells (gzip, codec.encode_volume) and to zstd-3
    the same raw NIfTI bytes (what the parquet writer did before), interleaved; and both sizes."""
    from lymphatlas_synth.fake_work import large_volumes

    volumes = dict(zip(IMAGE_COLUMNS, large_volumes(shape)))
    affine = affine_of(shape)
    raws = {n: codec.encode_volume(v, affine, n, level=None)["bytes"] for n, v in volumes.items()}
    zstd = pa.Codec("zstd", compression_level=3)
    best = [float("inf"), float("inf")]
    sizes = [0, 0]
    for _ in range(repeat):
        t = time.perf_counter()
        sizes[0] = sum(len(codec.encode_volume(v, affine, n)["bytes"]) for n, v in volumes.items())
        best[0] = min(best[0], time.perf_counter() - t)
        t = time.perf_counter()
        sizes[1] = sum(zstd.compress(r, asbytes=False).size for r in raws.values())
        best[1] = min(best[1], time.perf_counter() - t)
    return best[0], best[1], sizes[0], sizes[1]


def release_main(args: argparse.Namespace) -> None:
    from lymphatlas_synth.fake_work import make_large_work

    tree = Path(args.builder or Path(__file__).resolve().parent.parent)
    shape = (args.slices, 512, 512)
    raw_case = int(np.prod(shape)) * 7
    print(f"builder: {tree}; cases {shape} (z, y, x): {raw_case / 2**20:.1f} MiB of voxels each")
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        ids = make_large_work(tmp / "work", n_cases=max(args.release), shape_zyx=shape)
        print(f"fake WORK of {len(ids)} cases in {time.perf_counter() - t:.0f} s")
        rows = []
        for n in args.release:
            work = _subset_work(tmp / "work", ids[:n], tmp / f"work{n}")
            rows.append((f"{n} x {args.slices} slices", _release_row(tree, work, tmp / f"release{n}")))
        shutil_rmtree(tmp / "work")
        if args.long:
            long_shape = (args.long, 512, 512)
            make_large_work(tmp / "long", n_cases=1, shape_zyx=long_shape)
            rows.append((f"1 x {args.long} slices", _release_row(tree, tmp / "long", tmp / "release-long")))
        print(f"\n{'release':18s} {'wall s':>8s} {'s/case':>7s} {'peak RSS GB':>11s} {'max row group MiB':>17s} {'disk MiB':>9s} {'load':>5s}")
        for label, r in rows:
            n = int(label.split()[0])
            print(f"{label:18s} {r['wall_s']:8.1f} {r['wall_s'] / n:7.1f} {r['peak_rss'] / 1e9:11.2f} "
                  f"{r['max_row_group'] / 2**20:17.1f} {r['disk'] / 2**20:9.1f} {r['load']:5.1f}")
    cells_s, zstd_s, cells_b, zstd_b = encode_vs_zstd(shape)
    print(f"\nencode one case's cells (gzip, ISA-L level {codec.GZIP_LEVEL}): {cells_s:.2f} s, {cells_b / 2**20:.1f} MiB; "
          f"zstd-3 of the same raw NIfTI bytes: {zstd_s:.2f} s, {zstd_b / 2**20:.1f} MiB; "
          f"ratio {cells_s / zstd_s:.2f}x time, {cells_b / zstd_b:.3f}x bytes (best of 3, interleaved)")


def shutil_rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="full")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--release", type=int, nargs="+", help="measure releases of these numbers of full-size cases")
    parser.add_argument("--slices", type=int, default=250, help="slices of the full-size cases (--release)")
    parser.add_argument("--long", type=int, default=600, help="slices of the long case (--release; 0: none)")
    parser.add_argument("--builder", help="a checkout whose builder runs the releases (default: this one)")
    parser.add_argument("--tmp", help="folder for the fake WORK and releases (default: the system's)")
    args = parser.parse_args()
    if args.release:
        release_main(args)
        return
    shape = SIZES[args.size]
    t = time.perf_counter()
    cases = [synth_case(shape, seed) for seed in (0, 1)]
    affine = affine_of(shape)
    print(f"synthesised 2 cases {shape} (z, y, x) in {time.perf_counter() - t:.1f} s")
    raw_bytes = sum(a.nbytes for a in cases[1].values())
    print(f"raw voxels of one case: {raw_bytes / 2**20:.1f} MiB (ct int16 + pet float32 + label uint8)")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Baseline: three .nii.gz files, gzip level 6, read back with nibabel.
        gz_cells, gzip_encode = gzip_cells(cases, affine, tmp)
        base_size = sum((tmp / f"{n}.nii.gz").stat().st_size for n in IMAGE_COLUMNS)
        raw_cells = [
            {name: codec.encode_volume(case[name], affine, f"c{i}_{name}", level=None) for name in IMAGE_COLUMNS}
            for i, case in enumerate(cases)
        ]
        t = time.perf_counter()
        isal_cells = [
            {name: codec.encode_volume(case[name], affine, f"c{i}_{name}") for name in IMAGE_COLUMNS}
            for i, case in enumerate(cases)
        ]
        isal_encode = (time.perf_counter() - t) / 2
        layouts = [("gzip-6 cells, parquet uncompressed", gz_cells, "none", None, gzip_encode)]
        layouts += [(f"ISA-L {codec.GZIP_LEVEL} cells (the release's), uncompressed", isal_cells, "none", None, isal_encode)]
        layouts += [(f"raw cells, parquet zstd-{lv}", raw_cells, "zstd", lv, 0.0) for lv in (1, 3, 9)]
        results = {}
        decoders = {"baseline": partial(read_niigz, tmp)}
        for k, (label, cells, compression, level, cell_encode) in enumerate(layouts):
            path = tmp / f"shard{k}.parquet"
            results[label] = write_layout(path, cells, compression=compression, level=level, gzip_encode=cell_encode)
            decoders[label] = partial(decode_case, path)
        del raw_cells, gz_cells, isal_cells, cases

        best = best_times(decoders, args.repeat)
        print(f"\nbaseline  3 x .nii.gz (gzip 6) via nibabel: {base_size / 2**20:8.1f} MiB, "
              f"encode {gzip_encode:6.2f} s, decode {best['baseline']:6.3f} s (best of {args.repeat}, interleaved)")
        print_layouts(results, best, base_size)


if __name__ == "__main__":
    main()
