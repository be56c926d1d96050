"""PET onto the CT grid: the bounded cubic against SimpleITK's linear and B-spline resamplers.

Prints, measured in this run:

* **time at full size** (CT 512 x 512 x 330 at 0.98 x 0.98 x 3 mm, PET 200 x 200 x 263 at 4 mm,
  a 1-degree rigid transform): ``resample_to_reference`` (bounded cubic, the default) as a ratio
  to SimpleITK's linear resampling (goal: at most 1.5x) and to its B-spline resampling (the
  paper's cubic), wall time with the default thread count and CPU time on one thread (the
  machine-independent cost);
* **lesion SUVmax on the CT grid** for phantoms whose continuous activity is known
  (lymphatlas_synth/phantoms.py: a uniform sphere, sharp or blurred by a 6.5 mm PSF, radius 5, 8 or
  12 mm, PET voxels 2, 4, 6 and 8 mm, random sub-voxel positions and a small random rotation):
  per phantom and voxel size the distribution of SUVmax / native maximum - 1 for the bounded cubic,
  trilinear and the unbounded cubic, and how often the bounded cubic leaves
  [trilinear, native maximum + 1 %].

Usage::

    python benchmarks/bench_resample.py [--repeats 3] [--positions 12] [--skip-full]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _full_size_images():
    import SimpleITK as sitk
    from scipy import ndimage

    ct = sitk.Image((512, 512, 330), sitk.sitkInt16)
    ct.SetSpacing((0.977, 0.977, 3.0))
    ct.SetOrigin((-250.0, -250.0, 0.0))
    rng = np.random.default_rng(0)
    # a smooth body-like activity with hot spots: values matter little for the time
    act = ndimage.gaussian_filter(rng.random((263, 200, 200)).astype(np.float32), 2.0) * 4.0
    act[rng.random(act.shape) > 0.9995] = 20.0
    pet = sitk.GetImageFromArray(ndimage.gaussian_filter(act, 0.8).astype(np.float32))
    pet.SetSpacing((4.0, 4.0, 4.0))
    pet.SetOrigin((-398.0, -398.0, -28.0))
    t = sitk.Euler3DTransform()
    t.SetCenter((0.0, 0.0, 495.0))
    t.SetRotation(*np.deg2rad((0.6, -0.5, 1.0)))
    t.SetTranslation((3.0, -2.0, 4.0))
    return ct, pet, t


def time_full_size(repeats: int) -> dict[str, dict[str, float]]:
    """Best-of-``repeats`` wall (default threads) and CPU (one thread) seconds per method."""
    import SimpleITK as sitk

    from builder.convert.align import Interpolation, resample_to_reference

    ct, pet, t = _full_size_images()
    methods = {
        "sitk linear": lambda: sitk.Resample(pet, ct, t, sitk.sitkLinear, 0.0, sitk.sitkFloat32),
        "bounded cubic": lambda: resample_to_reference(pet, ct, t),
        "sitk B-spline": lambda: sitk.Resample(pet, ct, t, sitk.sitkBSpline, 0.0, sitk.sitkFloat32),
        "cubic option": lambda: resample_to_reference(pet, ct, t, interpolation=Interpolation.CUBIC),
    }
    out: dict[str, dict[str, float]] = {name: {"wall": np.inf, "cpu1": np.inf} for name in methods}
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    for mode in ("wall", "cpu1"):
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads if mode == "wall" else 1)
        clock = time.perf_counter if mode == "wall" else time.process_time
        for rep in range(repeats):  # interleaved, so a burst of load hits every method alike
            for name, run in methods.items():
                if "B-spline" in name or "cubic option" in name:
                    if rep > 0:
                        continue  # 10-30x slower: once is enough
                t0 = clock()
                run()
                out[name][mode] = min(out[name][mode], clock() - t0)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    out["_threads"] = {"wall": threads, "cpu1": 1}
    return out


CT_GRIDS = {"1x1x2": (1.0, 1.0, 2.0), "0.98x0.98x3": (0.977, 0.977, 3.0)}


def suvmax_errors(positions: int, ct_spacing: tuple[float, float, float]) -> list[dict]:
    """SUVmax on the CT grid / native maximum - 1, per phantom, voxel size and position. A lesion
    that no PET voxel centre sees (native maximum 0: a 5 mm sphere between 8 mm voxels) is left out."""
    import SimpleITK as sitk

    from builder.convert.align import Interpolation, resample_to_reference
    from lymphatlas_synth.phantoms import Sphere, make_grid, sample

    rows = []
    for fwhm in (0.0, 6.5):
        for radius in (5.0, 8.0, 12.0):
            for pet_mm in (2.0, 4.0, 6.0, 8.0):
                rng = np.random.default_rng(int(1000 * fwhm + 10 * radius + pet_mm))
                for _ in range(positions):
                    t = sitk.Euler3DTransform()
                    t.SetRotation(*np.deg2rad(rng.uniform(-2.0, 2.0, 3)))
                    t.SetTranslation(tuple(rng.uniform(-2.0, 2.0, 3)))
                    lesion = Sphere(tuple(rng.uniform(-3.0, 3.0, 3)), radius, 10.0, fwhm)
                    extent = 2 * radius + 4 * max(fwhm, 1.0) + 4 * pet_mm
                    pet = sample(lesion, make_grid((0, 0, 0), extent + 16, pet_mm, offset=tuple(rng.uniform(-1, 1, 3))), t)
                    ct = make_grid((0, 0, 0), extent, ct_spacing, offset=tuple(rng.uniform(-0.5, 0.5, 3)))
                    native = float(sitk.GetArrayViewFromImage(pet).max())
                    if native <= 0:
                        continue

                    def peak(interp: Interpolation) -> float:
                        image = resample_to_reference(pet, ct, t, interpolation=interp)  # alive while viewed
                        return float(sitk.GetArrayViewFromImage(image).max())

                    rows.append({
                        "psf": "PSF 6.5 mm" if fwhm else "sharp", "radius": radius, "pet_mm": pet_mm,
                        "bounded": peak(Interpolation.BOUNDED_CUBIC) / native - 1,
                        "linear": peak(Interpolation.LINEAR) / native - 1,
                        "cubic": peak(Interpolation.CUBIC) / native - 1,
                    })
    return rows


def _dist(values: list[float]) -> str:
    v = 100 * np.asarray(values)
    return f"{v.min():+6.1f} {np.median(v):+6.1f} {v.max():+6.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--positions", type=int, default=12, help="random lesion positions per phantom and voxel size")
    parser.add_argument("--skip-full", action="store_true", help="only the phantom SUVmax part")
    args = parser.parse_args()

    if not args.skip_full:
        times = time_full_size(args.repeats)
        threads = times.pop("_threads")
        print("full size (CT 512x512x330 at 0.98x0.98x3 mm, PET 200x200x263 at 4 mm), best of runs:")
        print(f"  {'method':16s} {'wall s (' + str(threads['wall']) + ' threads)':>20s} {'x linear':>9s} "
              f"{'CPU s (1 thread)':>17s} {'x linear':>9s}")
        base = times["sitk linear"]
        for name, t in times.items():
            print(f"  {name:16s} {t['wall']:20.2f} {t['wall'] / base['wall']:9.2f} {t['cpu1']:17.2f} "
                  f"{t['cpu1'] / base['cpu1']:9.2f}")
    for grid_name, spacing in CT_GRIDS.items():
        rows = suvmax_errors(args.positions, spacing)
        print(f"\nlesion SUVmax on the CT grid ({grid_name} mm) / native PET maximum - 1, in %: min median max over "
              f"up to {args.positions} positions; 'out' = bounded cubic outside [trilinear, native max + 1 %]")
        print(f"  {'phantom':11s} {'r mm':>5s} {'PET mm':>6s}   {'bounded cubic':>20s}   {'trilinear':>20s}   "
              f"{'unbounded cubic':>20s}  out")
        for psf in ("sharp", "PSF 6.5 mm"):
            for radius in (5.0, 8.0, 12.0):
                for pet_mm in (2.0, 4.0, 6.0, 8.0):
                    sel = [r for r in rows if r["psf"] == psf and r["radius"] == radius and r["pet_mm"] == pet_mm]
                    if not sel:
                        continue
                    out = sum(1 for r in sel if r["bounded"] > 0.01 + 1e-9 or r["bounded"] < r["linear"] - 1e-6)
                    print(f"  {psf:11s} {radius:5.0f} {pet_mm:6.0f}   {_dist([r['bounded'] for r in sel]):>20s}   "
                          f"{_dist([r['linear'] for r in sel]):>20s}   {_dist([r['cubic'] for r in sel]):>20s}  {out}")
        gain = [r["bounded"] - r["linear"] for r in rows]
        print(f"bounded cubic - trilinear SUVmax (% of native max): min {100 * min(gain):+.2f}, median "
              f"{100 * np.median(gain):+.2f}, max {100 * max(gain):+.2f}; bounded above native max: "
              f"{sum(r['bounded'] > 1e-6 for r in rows)} of {len(rows)}; below trilinear: "
              f"{sum(r['bounded'] < r['linear'] - 1e-6 for r in rows)}; unbounded cubic above native max + 1 %: "
              f"{sum(r['cubic'] > 0.01 for r in rows)} of {len(rows)}")


if __name__ == "__main__":
    main()
