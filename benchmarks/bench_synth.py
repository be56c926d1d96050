"""Time and size of the synthetic generator at full (real) scale, against baselines from the same run.

    python benchmarks/bench_synth.py [--exams 1] [--seed 0] [--images docs/images]

Prints seconds per full-size exam (CT 512 x 512 x 300+ slices, PET 200 x 200), what it writes,
and ratios to two baselines measured here: one small exam, and writing the same number of bytes
as plain files (the disk's floor). With --images it saves the axial / coronal / sagittal CT and
PET pictures and the PET coronal MIP of the first exam (docs/images/synthetic_*.png come from --seed 8).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout: `python benchmarks/...`


def _tree(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def _raw_write_seconds(n_files: int, n_bytes: int, where: Path) -> float:
    """Baseline: write n_files files of the same total size with plain writes (the I/O floor)."""
    chunk = np.random.default_rng(0).integers(0, 255, max(n_bytes // max(n_files, 1), 1), dtype=np.uint8).tobytes()
    where.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    for i in range(n_files):
        (where / f"{i:05d}.bin").write_bytes(chunk)
    return time.perf_counter() - t


def _canonical(array_zyx: np.ndarray, direction: list[float]) -> np.ndarray:
    """[z, y, x] on an axial HFS/FFS grid -> the same voxels with x, y, z ascending in LPS."""
    d = np.array(direction).reshape(3, 3)
    out = array_zyx
    if d[0, 0] < 0:
        out = out[:, :, ::-1]
    if d[1, 1] < 0:
        out = out[:, ::-1, :]
    if d[2, 2] < 0:
        out = out[::-1]
    return out


def _low_corner(grid: dict) -> np.ndarray:
    """LPS of the grid's corner voxel with the smallest x, y and z (axial grids)."""
    d = np.diag(np.array(grid["direction"]).reshape(3, 3))
    far = np.array(grid["origin"]) + d * np.array(grid["spacing"]) * (np.array(grid["size"]) - 1)
    return np.minimum(np.array(grid["origin"]), far)


def _canonical_volumes(source: Path, exam_id: str) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """The exam's truth record and its CT (HU), PET (SUV) and lesion mask with x, y, z ascending in LPS."""
    import json

    truth = json.loads((source / "truth" / f"{exam_id}.json").read_text())
    ct = _canonical(np.load(source / "truth" / exam_id / "ct_hu.npy"), truth["ct"]["direction"])
    pet = _canonical(np.load(source / "truth" / exam_id / "pet_suv.npy"), truth["pet"]["direction"])
    mask = _canonical(np.load(source / "truth" / exam_id / "mask.npy"), truth["ct"]["direction"])
    return truth, ct, pet, mask


def _plane_indices(mask: np.ndarray, ct_shape: tuple[int, ...], truth: dict) -> tuple[tuple, tuple]:
    """The (z, y, x) voxel of the planes on the CT grid and on the PET grid: axial and coronal through the
    largest lesion (mid-liver level without one), sagittal on the midline (x = 0)."""
    if mask.any():
        from scipy import ndimage

        components, n = ndimage.label(mask)
        largest = 1 + int(np.argmax(ndimage.sum_labels(mask, components, range(1, n + 1))))
        zc, yc, xc = (int(v) for v in np.argwhere(components == largest).mean(axis=0))
    else:
        zc, yc, xc = ct_shape[0] * 45 // 100, ct_shape[1] // 2, ct_shape[2] // 2
    sp = truth["ct"]["spacing"]
    psp = truth["pet"]["spacing"]
    # The PET voxel at the CT voxel's physical point (canonical arrays start at the low corner).
    xc = int(round(-_low_corner(truth["ct"])[0] / sp[0]))
    point = _low_corner(truth["ct"]) + np.array(sp) * (xc, yc, zc)
    pi = np.rint((point - _low_corner(truth["pet"])) / psp).astype(int)
    pi = np.clip(pi, 0, np.array(truth["pet"]["size"]) - 1)
    return (zc, yc, xc), (pi[2], pi[1], pi[0])


def _planes(vol: np.ndarray, spacing, z_index, y_index, x_index) -> list[tuple]:
    """Axial, coronal and sagittal slices: (title, image, aspect, origin) for imshow."""
    sx, sy, sz = spacing
    return [
        ("axial", vol[z_index], sy / sx, "upper"),
        ("coronal", vol[:, y_index, :], sz / sx, "lower"),
        ("sagittal", vol[:, :, x_index], sz / sy, "lower"),  # y ascends to posterior: anterior on the left
    ]


def _save_views(path: Path, views: list[tuple], *, name: str, title: str, display: dict) -> Path:
    """One picture of the views side by side on black, written to a temporary name and renamed into place."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(views), figsize=(4.2 * len(views), 6.5), facecolor="black")
    for ax, (view, img, aspect, origin) in zip(axes, views, strict=True):
        ax.imshow(img, aspect=aspect, origin=origin, interpolation="nearest", **display)
        ax.set_title(f"{name.upper()} {view}", color="white")
        ax.axis("off")
    fig.suptitle(title, color="white")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".partial.png")
    fig.savefig(tmp, dpi=80, facecolor="black")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def save_images(source: Path, exam_id: str, images: Path) -> list[Path]:
    """CT and PET in three planes and the PET coronal MIP, displayed as radiologists do
    (patient's right on the image's left, head up, anterior up on axial views)."""
    truth, ct, pet, mask = _canonical_volumes(source, exam_id)
    images.mkdir(parents=True, exist_ok=True)
    ct_index, pet_index = _plane_indices(mask, ct.shape, truth)
    title = (f"synthetic {exam_id}: {truth['variant']['vendor']}-like, {truth['variant']['patient_position']}, "
             f"{len(truth['lesions'])} lesions ({truth['diagnosis']})")
    written = []
    for name, vol, spacing, idx, display in (
        ("ct", ct, truth["ct"]["spacing"], ct_index, {"cmap": "gray", "vmin": -400, "vmax": 500}),
        ("pet", pet, truth["pet"]["spacing"], pet_index, {"cmap": "gray_r", "vmin": 0, "vmax": 7}),
    ):
        views = _planes(vol, spacing, *idx)
        if name == "pet":
            views.append(("coronal MIP", vol.max(axis=1), spacing[2] / spacing[0], "lower"))
        written.append(_save_views(images / f"synthetic_{name}.png", views, name=name, title=title, display=display))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exams", type=int, default=1, help="full-size exams to time (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=Path, default=None, help="save synthetic_*.png pictures here")
    args = parser.parse_args()

    from lymphatlas_synth.cohort import generate_cohort

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        generate_cohort(tmp / "small", n_exams=1, seed=args.seed, size="small")
        small_s = time.perf_counter() - t
        t = time.perf_counter()
        truths = generate_cohort(tmp / "full", n_exams=args.exams, seed=args.seed, size="full")
        full_s = (time.perf_counter() - t) / args.exams
        n_files, n_bytes = _tree(tmp / "full" / "dicom")
        _, truth_bytes = _tree(tmp / "full" / "truth")
        _, mask_bytes = _tree(tmp / "full" / "masks")
        raw_s = _raw_write_seconds(n_files, n_bytes, tmp / "raw") / args.exams
        ct = truths[0].truth["ct"]
        pet = truths[0].truth["pet"]
        print(f"full exam: CT {ct['size']} at {[round(v, 3) for v in ct['spacing']]} mm, "
              f"PET {pet['size']} at {[round(v, 3) for v in pet['spacing']]} mm")
        print(f"full exam: {full_s:.1f} s per exam; DICOM {n_files / args.exams:.0f} files, "
              f"{n_bytes / args.exams / 2**20:.0f} MiB per exam; mask {mask_bytes / args.exams / 2**20:.1f} MiB; "
              f"truth arrays {truth_bytes / args.exams / 2**20:.0f} MiB")
        print(f"baseline small exam: {small_s:.2f} s -> full / small = {full_s / small_s:.1f}x")
        print(f"baseline plain writes of the same bytes: {raw_s:.2f} s -> full / plain = {full_s / raw_s:.1f}x")
        if args.images:
            for p in save_images(tmp / "full", truths[0].exam_id, args.images):
                print(f"wrote {p}")


if __name__ == "__main__":
    main()
