"""Registration accuracy (target registration error at lesion centres) and time, new recipe vs old.

Generates a cohort at a scanner's grids with :mod:`lymphatlas_synth.cohort` (its truth knows the
misalignment and every lesion centre), registers each exam's PET to its CT with the current
recipe and with the recipe before the change (``builder/align.py`` at ``OLD_COMMIT``, read with
``git show`` and run in this process on the same images), and prints per exam:

* TRE at the lesion centres: ``|T(c) - M c|`` for every lesion centre ``c``, with ``T`` the found
  CT -> PET transform and ``M`` the truth: mean and worst lesion, and the mean residual per axis;
* the time of each recipe (preparing the metric's images plus the rigid optimisation; one thread,
  as the builder runs it) and their ratio.

Cohort (``--exams`` realistic exams, ``--coarse`` coarse-PET exams; misalignment up to 3 degrees
per axis and 10 mm, PET fields of view matched to or shorter than the CT, head first and feet
first, random body sizes): CT grids 1.0 x 3.0, 1.5 x 2.0, 2.0 x 3.0 and 2.0 x 2.0 mm (in-plane x
slice) with PET at 4 mm (6.5 mm FWHM); coarse exams CT 2.0 x 3.0 mm with PET at 8 mm (8 mm FWHM).
Goals (issue 11): realistic exams at most 0.5 mm mean and 1.0 mm for the worst lesion, coarse PET
at most 0.8 mm mean, per exam.

Usage::

    python benchmarks/bench_registration.py [--exams 8] [--coarse 4] [--seed 101] [--workdir DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OLD_COMMIT = "e53a421"
"""The last commit with the previous registration recipe (32 bins, 20 k samples per level, min step 0.005)."""

MISALIGNMENT = {"max_rotation_deg": 3.0, "max_translation_mm": 10.0}
REALISTIC_GRIDS = [
    {"ct_px": 1.0, "ct_dz": 3.0, "pet_px": 4.0, "pet_fwhm_mm": 6.5},
    {"ct_px": 1.5, "ct_dz": 2.0, "pet_px": 4.0, "pet_fwhm_mm": 6.5},
    {"ct_px": 2.0, "ct_dz": 3.0, "pet_px": 4.0, "pet_fwhm_mm": 6.5},
    {"ct_px": 2.0, "ct_dz": 2.0, "pet_px": 4.0, "pet_fwhm_mm": 6.5},
]
COARSE_GRID = {"ct_px": 2.0, "ct_dz": 3.0, "pet_px": 8.0, "pet_fwhm_mm": 8.0}
LAYOUTS = [{}, {"pet_fov": "short", "patient_position": "FFS"}, {"patient_position": "FFS"}, {"pet_fov": "short"}]
GOALS = {"realistic": (0.5, 1.0), "coarse": (0.8, None)}


def cohort_variants(n: int, grids: list[dict]) -> list[dict]:
    """Variants cycling grids and field-of-view / position layouts (every layout meets every grid)."""
    out = []
    for i in range(n):
        layout = (i + (i // len(grids) if len(grids) > 1 else 0)) % len(LAYOUTS)
        out.append({"grid": grids[i % len(grids)], **LAYOUTS[layout],
                    "misalignment": MISALIGNMENT, "lesions": "always"})
    return out


def old_align_module():
    """builder/align.py as it was at OLD_COMMIT, imported under another name."""
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{OLD_COMMIT}:builder/align.py"],
                         capture_output=True, text=True, check=True).stdout
    spec = importlib.util.spec_from_loader("_align_before", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules["_align_before"] = module
    exec(compile(src, f"builder/align.py@{OLD_COMMIT}", "exec"), module.__dict__)
    return module


def register(module, ct, pet, body) -> tuple[sitk.Transform, float]:
    """The rigid registration of ``module`` (prepare + optimise), as align_pet runs it; (transform, seconds)."""
    settings = module.AlignSettings()
    t0 = time.perf_counter()
    fixed, moving, mask = module._registration_images(ct, pet, body, settings.registration_spacing_mm)
    transform = module.register_rigid(fixed, moving, mask, settings=settings)
    return transform, time.perf_counter() - t0


def main() -> None:
    from builder.convert import align
    from builder.convert.discover import discover_exam
    from builder.convert.pipeline import body_image, read_exam
    from lymphatlas_synth.cohort import generate_cohort, lesion_residuals, load_truth

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--exams", type=int, default=8, help="realistic exams (PET 4 mm)")
    parser.add_argument("--coarse", type=int, default=4, help="coarse-PET exams (PET 8 mm)")
    parser.add_argument("--seed", type=int, default=101)
    parser.add_argument("--workdir", type=Path, help="keep the generated cohorts here (reused when present)")
    parser.add_argument("--json", type=Path, help="also write the per-exam results as JSON")
    parser.add_argument("--no-old", action="store_true", help="skip the previous recipe")
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_registration_"))
    old = None if args.no_old else old_align_module()
    groups = [("realistic", args.exams, REALISTIC_GRIDS, args.seed), ("coarse", args.coarse, [COARSE_GRID], args.seed + 1)]
    rows = []
    for kind, n, grids, seed in groups:
        if n < 1:
            continue
        source = work / f"{kind}-{n}-{seed}"
        if not (source / "truth" / "cohort.json").is_file():
            t0 = time.perf_counter()
            generate_cohort(source, n_exams=n, seed=seed, size="full", variants=cohort_variants(n, grids), overwrite=True)
            print(f"generated {n} {kind} exams in {time.perf_counter() - t0:.0f} s ({source})", flush=True)
        for exam_id in sorted(p.name for p in (source / "dicom").iterdir()):
            truth = load_truth(source / "truth", exam_id)
            images = read_exam(discover_exam(source / "dicom" / exam_id, exam_id))
            ct, pet, body = images.ct, images.pet_suv, body_image(images.body, images.ct)
            row = {"kind": kind, "exam": exam_id, "grid": truth["variant"]["grid"],
                   "pet_fov": truth["variant"]["pet_fov"], "position": truth["variant"]["patient_position"],
                   "ct_size": list(ct.GetSize()), "pet_size": list(pet.GetSize()),
                   "rotation_deg": truth["misalignment"]["rotation_deg"],
                   "translation_mm": truth["misalignment"]["translation_mm"], "lesions": len(truth["lesions"])}
            for name, module in (("new", align), ("old", old)):
                if module is None:
                    continue
                transform, seconds = register(module, ct, pet, body)
                err = lesion_residuals(transform, truth)
                norm = np.linalg.norm(err, axis=1)
                row[name] = {"tre_mean_mm": float(norm.mean()), "tre_max_mm": float(norm.max()),
                             "residual_mean_xyz_mm": err.mean(0).round(3).tolist(), "seconds": seconds}
            rows.append(row)
            _print_row(row)
    _summary(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


def _print_row(row: dict) -> None:
    g = row["grid"]
    head = (f"{row['kind']:9s} {row['exam']} CT {g['ct_px']}x{g['ct_dz']} PET {g['pet_px']} {row['pet_fov']:7s} "
            f"{row['position']} |t|={np.linalg.norm(row['translation_mm']):4.1f}mm "
            f"rot={max(abs(a) for a in row['rotation_deg']):3.1f}deg n={row['lesions']}")
    parts = [head]
    for name in ("new", "old"):
        if name in row:
            r = row[name]
            parts.append(f"{name}: {r['tre_mean_mm']:.2f}/{r['tre_max_mm']:.2f} mm "
                         f"z{r['residual_mean_xyz_mm'][2]:+.2f} {r['seconds']:.1f}s")
    if "old" in row:
        parts.append(f"time new/old {row['new']['seconds'] / row['old']['seconds']:.2f}x")
    print(" | ".join(parts), flush=True)


def _summary(rows: list[dict]) -> None:
    print()
    for kind, (goal_mean, goal_max) in GOALS.items():
        sel = [r for r in rows if r["kind"] == kind]
        if not sel:
            continue
        for name in ("new", "old"):
            if name not in sel[0]:
                continue
            means = np.array([r[name]["tre_mean_mm"] for r in sel])
            maxes = np.array([r[name]["tre_max_mm"] for r in sel])
            ok = np.all(means <= goal_mean) and (goal_max is None or np.all(maxes <= goal_max))
            print(f"{kind:9s} {name}: per-exam mean TRE {means.min():.2f}-{means.max():.2f} mm, worst lesion "
                  f"{maxes.max():.2f} mm, mean z residual {np.mean([r[name]['residual_mean_xyz_mm'][2] for r in sel]):+.2f} mm; "
                  f"goal mean <= {goal_mean}" + (f", worst <= {goal_max}" if goal_max else "") +
                  f": {'met' if ok else 'NOT met'} ({int(np.sum(means <= goal_mean))}/{len(sel)} exams)")
    if rows and "old" in rows[0]:
        new_t = np.array([r["new"]["seconds"] for r in rows])
        old_t = np.array([r["old"]["seconds"] for r in rows])
        print(f"time per exam: new {new_t.mean():.2f} s, old {old_t.mean():.2f} s, ratio {new_t.sum() / old_t.sum():.2f}x "
              f"(per exam {np.min(new_t / old_t):.2f}-{np.max(new_t / old_t):.2f}x)")


if __name__ == "__main__":
    main()
