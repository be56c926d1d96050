"""Which blosc2 codec the decoded cache uses: patch decompression time, bytes and compression time per codec.

The decoded cache (``lymphatlas_ds.cache``) stores each volume as a blosc2 array in 64^3 chunks of 16^3
blocks; a training patch decompresses only the blocks it touches, and that decompression is most of a
patch's CPU time. This benchmark takes the volumes of real release cases, writes each with every
candidate codec (same chunks, blocks and shuffle filter as the cache), then times the same random
128^3 patches (``get_slice_numpy``, one thread, the call the loader makes) on each file, in turns, in
one process. Ratios are to the first codec (``LZ4`` level 5, the cache's codec before LZ4HC).

    python benchmarks/bench_cache_codec.py --release /path/to/release          # its first 2 cases
    python benchmarks/bench_cache_codec.py --size full                         # builds 1 fake full-size case (~2 min)

Prints one markdown table per volume: MiB on disk, compression CPU seconds (one thread), median
ms to decompress one patch, each with its ratio to the baseline. Every patch read is compared with the
volume it came from (exit 1 where a codec does not give the voxels back).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lymphatlas_ds import cache as cache_mod  # noqa: E402

CANDIDATES = (("LZ4", 5), ("LZ4HC", 5), ("LZ4HC", 9), ("ZSTD", 1))
SIZES = {"small": (96, 160, 160), "full": (250, 512, 512)}


def _write(array: np.ndarray, path: Path, codec: str, clevel: int) -> float:
    """Compress ``array`` to ``path`` as the cache does (one thread); returns the CPU seconds."""
    t = time.process_time()
    cache_mod.write_volume(array, path, codec=codec, clevel=clevel, nthreads=1)
    return time.process_time() - t


def _patch_ms(paths: list[Path], source: np.ndarray, patch: int, n: int, seed: int) -> list[float]:
    """Median ms per patch for each file, the same ``n`` random boxes on each, files read in turns; every
    patch is compared with ``source`` (a codec that does not give the voxels back raises)."""
    import blosc2

    arrays = [blosc2.open(str(p), mode="r", dparams=blosc2.DParams(nthreads=1)) for p in paths]
    rng = np.random.default_rng(seed)
    size = tuple(min(patch, s) for s in source.shape)
    starts = [tuple(int(rng.integers(0, s - p + 1)) for s, p in zip(source.shape, size)) for _ in range(n)]
    out = np.empty(size, source.dtype)
    times: list[list[float]] = [[] for _ in arrays]
    for start in starts:
        stop = tuple(a + p for a, p in zip(start, size))
        box = tuple(slice(a, b) for a, b in zip(start, stop))
        for i, array in enumerate(arrays):  # in turns: a load change hits every codec alike
            t = time.perf_counter()
            array.get_slice_numpy(out, (start, stop))
            times[i].append(time.perf_counter() - t)
            if not np.array_equal(out, source[box]):
                raise AssertionError(f"{paths[i].name}: the patch at {start} differs from the volume")
    return [1000 * float(np.median(t)) for t in times]


def measure(volumes: dict[str, list[np.ndarray]], folder: Path, *, patch: int, n: int) -> dict[str, list[dict]]:
    """Per volume name, one row per candidate codec: bytes, compression CPU s and patch ms, summed over the cases."""
    rows: dict[str, list[dict]] = {}
    for name, arrays in volumes.items():
        totals = [{"codec": f"{c} {lvl}", "bytes": 0, "compress_s": 0.0, "patch_ms": 0.0} for c, lvl in CANDIDATES]
        for k, array in enumerate(arrays):
            paths = [folder / f"{name}{k}-{c}{lvl}.b2nd" for c, lvl in CANDIDATES]
            for row, path, (codec, clevel) in zip(totals, paths, CANDIDATES):
                row["compress_s"] += _write(array, path, codec, clevel)
                row["bytes"] += path.stat().st_size
            for row, ms in zip(totals, _patch_ms(paths, array, patch, n, seed=k)):
                row["patch_ms"] += ms / len(arrays)
            for path in paths:
                path.unlink()
        rows[name] = totals
    return rows


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "-"


def table(name: str, rows: list[dict]) -> str:
    base = rows[0]
    lines = [f"**{name}** (ratios to {base['codec']})", "",
             "| codec | MiB | x | compress CPU s | x | ms per patch | x |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['codec']} | {r['bytes'] / 2**20:.2f} | {_ratio(r['bytes'], base['bytes'])} | {r['compress_s']:.2f} | "
            f"{_ratio(r['compress_s'], base['compress_s'])} | {r['patch_ms']:.3f} | {_ratio(r['patch_ms'], base['patch_ms'])} |"
        )
    return "\n".join(lines)


def _release_volumes(release: Path, n_cases: int) -> dict[str, list[np.ndarray]]:
    from lymphatlas_ds.reader import Release

    rel = Release.from_source(str(release))
    ids = rel.case_ids("all", "train")[:n_cases]
    return {name: [rel.read_volume(case_id, name)[0] for case_id in ids] for name in ("ct", "pet", "label")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", type=Path, help="a built release; its first --cases train cases are used")
    parser.add_argument("--size", choices=sorted(SIZES), default="small", help="without --release: build one fake case")
    parser.add_argument("--cases", type=int, default=2)
    parser.add_argument("--patches", type=int, default=60, help="random patches timed per file")
    parser.add_argument("--patch", type=int, default=None, help="patch edge (default 128 full / 64 small)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="la-codec-") as tmp:
        folder = Path(tmp)
        release = args.release
        if release is None:
            from builder.release.build import build_release
            from lymphatlas_synth.fake_work import make_fake_work

            make_fake_work(folder / "work", n_patients=1, seed=0, shape_zyx=SIZES[args.size], spacing_xyz=(0.98, 0.98, 3.0))
            build_release(folder / "work", folder / "release", version="1.0.0")
            release = folder / "release"
        patch = args.patch or (128 if args.release is not None or args.size == "full" else 64)
        volumes = _release_volumes(release, args.cases)
        shapes = sorted({a.shape for a in volumes["ct"]})
        print(f"{len(volumes['ct'])} case(s) of {shapes}, {patch}^3 patches, {args.patches} per file, one thread; "
              f"the cache writes {cache_mod.CODEC} {cache_mod.CLEVEL}\n")
        for name, rows in measure(volumes, folder, patch=patch, n=args.patches).items():
            print(table(name, rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
