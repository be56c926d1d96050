"""Benchmark the per-case metrics of ``lymphatlas evaluate`` against nnU-Net's own per-case evaluation.

Writes one reference and one prediction label file (``--size full``: 320 x 512 x 512 voxels, a
whole-body CT grid; ``small``: 96 x 160 x 160) with 40 ball lesions, the prediction missing 5 and
adding 5; then, in one run, page cache warm, the fastest of ``--repeat`` runs of:

1. nnU-Net's ``compute_metrics`` on the two files (SimpleITK read + TP/FP/FN): the baseline;
2. the same files read with nibabel + ``lymphatlas_ds.metrics.voxel_metrics`` (the same figures);
3. (2) + ``lesion_hits`` (connected components of both masks: autoPET FP/FN volume, detection).

Prints one line per figure and the ratios against (1); checks that (1) and (2) agree.

    python benchmarks/bench_evaluate.py --size small
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

SIZES = {"full": (320, 512, 512), "small": (96, 160, 160)}


def _balls(shape: tuple[int, int, int], n: int, rng: np.random.Generator) -> list[np.ndarray]:
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    out = []
    for _ in range(n):
        c = rng.integers([8, 8, 8], np.array(shape) - 8)
        r = float(rng.uniform(2, 6))
        out.append((grid[0] - c[0]) ** 2 + (grid[1] - c[1]) ** 2 + (grid[2] - c[2]) ** 2 <= r * r)
    return out


def _write(path: Path, zyx: np.ndarray) -> Path:
    import nibabel as nib

    affine = np.diag([-0.98, -0.98, 3.0, 1.0])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(zyx.transpose(2, 1, 0)), affine), str(path))
    return path


def _best(fn, repeat: int) -> tuple[float, object]:
    best, value = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    import nibabel as nib
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from lymphatlas_ds import metrics

    shape = SIZES[args.size]
    rng = np.random.default_rng(0)
    balls = _balls(shape, 45, rng)
    ref, pred = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    for i, b in enumerate(balls):
        if i < 40:
            ref[b] = 1
        if 5 <= i:
            pred[b] = 1
    with tempfile.TemporaryDirectory() as tmp:
        ref_file, pred_file = _write(Path(tmp) / "ref.nii.gz", ref), _write(Path(tmp) / "pred.nii.gz", pred)

        def read() -> tuple[np.ndarray, np.ndarray]:
            return (np.asanyarray(nib.load(str(ref_file)).dataobj).transpose(2, 1, 0),
                    np.asanyarray(nib.load(str(pred_file)).dataobj).transpose(2, 1, 0))

        def voxels():
            r, p = read()
            return metrics.voxel_metrics(r, p)

        def lesions():
            r, p = read()
            return metrics.voxel_metrics(r, p), metrics.lesion_hits(r, p, voxel_volume_ml=0.00288).metrics

        t_nn, peer = _best(lambda: compute_metrics(str(ref_file), str(pred_file), SimpleITKIO(), [1]), args.repeat)
        t_vox, mine = _best(voxels, args.repeat)
        t_les, (_, lm) = _best(lesions, args.repeat)
    for name in metrics.METRICS:
        assert abs(peer["metrics"][1][name] - mine[name]) < 1e-9, (name, peer["metrics"][1][name], mine[name])
    print(f"shape {shape}: nnU-Net compute_metrics {t_nn:.3f} s (baseline)")
    print(f"nibabel + voxel_metrics {t_vox:.3f} s ({t_vox / t_nn:.2f}x), same Dice {mine['Dice']:.5f}")
    print(f"+ lesion_hits {t_les:.3f} s ({t_les / t_nn:.2f}x): {lm.n_detected}/{lm.n_ref_lesions} lesions detected, "
          f"{lm.n_fp_components} FP components")
    return 0


if __name__ == "__main__":
    sys.exit(main())
