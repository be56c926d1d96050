"""Registration accuracy (target registration error at lesion centres) and time on both generators.

Two generators written apart: the project's own (:mod:`lymphatlas_synth.cohort`) and the independent
one beside the project (``../shared/phantoms/foreign_cohort.py``, or ``$LYMPHATLAS_FOREIGN_PHANTOMS``;
its own body, PET fields of view and 6.5 mm PSF). Each exam's truth knows the misalignment and every
lesion centre. Every exam's PET is registered to its CT with the current recipe and with the recipe
before issue 20 (``builder/convert/align.py`` at ``OLD_COMMIT``, read with ``git show`` and run in
this process on the same images), and per exam the benchmark prints:

* TRE at the lesion centres, ``|T(c) - M c|`` for every lesion centre ``c`` with ``T`` the found
  CT -> PET transform and ``M`` the truth: mean and worst lesion, and the mean residual per axis;
* the time of each recipe (preparing the metric's images plus the rigid optimisation, as align_pet
  runs them): CPU seconds of this process (the metric runs on one thread; on a shared machine wall
  time mostly measures the neighbours) and wall seconds, and the new / old ratio.

Grids, per generator: ``coarse`` (PET ~8 mm), ``realistic`` (CT 1-2 mm, PET ~4 mm) and ``scanner``
(CT 512 x 512 at ~1 mm, PET 4 mm). Project: realistic exams cycle CT 1.0 x 3.0, 1.5 x 2.0, 2.0 x 3.0
and 2.0 x 2.0 mm (in-plane x slice) with PET 4 mm, fields of view matched or short, head or feet
first, misaligned by up to 3 degrees and 10 mm; coarse CT 2.0 x 3.0 mm with PET 8 mm; scanner its
``full`` size. Independent: ``--size small`` (CT 3.9 mm, PET 7.8 mm), ``medium`` and ``full``,
every accepted variant (``--limit`` at scanner sizes). Goals (issue 20), per exam: realistic and
scanner mean at most 0.5 mm, worst lesion at most 1.0 mm, the cohort's mean z residual within
+-0.2 mm; coarse mean at most 0.6 mm; time at most 1.5x the old recipe's. A markdown table of every
exam closes the output.

Usage::

    python benchmarks/bench_registration.py [--seed 2026] [--exams 8] [--coarse 8] [--scanner 4] [--jobs 2]
        [--groups independent:realistic,project:realistic,...] [--workdir DIR] [--json OUT] [--no-old]
        [--old-commit 64e807d] [--repeats 2]   # compare with another commit's recipe, in turns, median times
    python benchmarks/bench_registration.py --from-json OUT   # the tables of a saved run
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OLD_COMMIT = "369697f"
"""The last commit with the recipe before issue 20 (the metric sampled over the whole CT body)."""
OLD_PATH = "builder/convert/align.py"

MISALIGNMENT = {"max_rotation_deg": 3.0, "max_translation_mm": 10.0}
REALISTIC_GRIDS = [
    {"ct_px": 1.0, "ct_dz": 3.0, "pet_px": 4.0, "pet_fwhm_mm": 6.5},
    {"ct_px": 1.5, "ct_dz": 2.0, "pet_px": 4.0, "pet_fwhm_mm": 6.5},
    {"ct_px": 2.0, "ct_dz": 3.0, "pet_px": 4.0, "pet_fwhm_mm": 6.5},
    {"ct_px": 2.0, "ct_dz": 2.0, "pet_px": 4.0, "pet_fwhm_mm": 6.5},
]
COARSE_GRID = {"ct_px": 2.0, "ct_dz": 3.0, "pet_px": 8.0, "pet_fwhm_mm": 8.0}
LAYOUTS = [{}, {"pet_fov": "short", "patient_position": "FFS"}, {"patient_position": "FFS"}, {"pet_fov": "short"}]
GOALS = {"coarse": (0.6, None), "realistic": (0.5, 1.0), "scanner": (0.5, 1.0)}
Z_BIAS_GOAL_MM = 0.2
TIME_RATIO_GOAL = 1.5
GENERATORS = ("project", "independent")
FOREIGN_SIZES = {"coarse": "small", "realistic": "medium", "scanner": "full"}


def cohort_variants(n: int, grids: list[dict | None]) -> list[dict]:
    """Project variants cycling grids and field-of-view / position layouts (every layout meets every grid)."""
    out = []
    for i in range(n):
        layout = (i + (i // len(grids) if len(grids) > 1 else 0)) % len(LAYOUTS)
        grid = grids[i % len(grids)]
        out.append({**({"grid": grid} if grid else {}), **LAYOUTS[layout],
                    "misalignment": MISALIGNMENT, "lesions": "always"})
    return out


def old_align_module(commit: str = OLD_COMMIT):
    """The alignment module as it was at ``commit``, imported under another name."""
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:{OLD_PATH}"],
                         capture_output=True, text=True, check=True).stdout
    spec = importlib.util.spec_from_loader("_align_before", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules["_align_before"] = module
    exec(compile(src, f"{OLD_PATH}@{commit}", "exec"), module.__dict__)
    return module


def register(module, ct, pet, body):
    """The rigid registration of ``module`` (prepare + optimise), as align_pet runs it:
    (transform, CPU seconds, wall seconds)."""
    settings = module.AlignSettings()
    w0, c0 = time.perf_counter(), time.process_time()
    fixed, moving, mask = module._registration_images(ct, pet, body, settings.registration_spacing_mm)
    transform = module.register_rigid(fixed, moving, mask, settings=settings)
    return transform, time.process_time() - c0, time.perf_counter() - w0


def project_exams(work: Path, grid: str, n: int, seed: int):
    """(exam id, exam folder, truth, residual function, description) of a project cohort."""
    from lymphatlas_synth.cohort import generate_cohort, load_truth

    grids = {"realistic": REALISTIC_GRIDS, "coarse": [COARSE_GRID], "scanner": [None]}[grid]
    source = work / f"project-{grid}-{n}-{seed}"
    if not (source / "truth" / "cohort.json").is_file():
        t0 = time.perf_counter()
        generate_cohort(source, n_exams=n, seed=seed, size="full", variants=cohort_variants(n, grids), overwrite=True)
        print(f"generated {n} project {grid} exams (seed {seed}) in {time.perf_counter() - t0:.0f} s", flush=True)
    for exam_id in sorted(p.name for p in (source / "dicom").iterdir()):
        truth = load_truth(source / "truth", exam_id)
        v = truth["variant"]
        desc = f"{v.get('pet_fov', 'matched')} {v.get('patient_position', 'HFS')}"
        yield exam_id, source / "dicom" / exam_id, truth, desc


def foreign_exams(work: Path, grid: str, n: int, seed: int):
    """The same for a cohort of the independent generator (its accepted exams; ``n`` limits scanner sizes)."""
    from lymphatlas_synth import foreign as foreign_phantoms

    size = FOREIGN_SIZES[grid]
    root = work / f"independent-{size}-{seed}"
    t0 = time.perf_counter()
    truths = foreign_phantoms.generate(root / "source", root / "truth", seed=seed, size=size,
                                       limit=n if grid == "scanner" else None)
    print(f"independent {size} cohort (seed {seed}) ready in {time.perf_counter() - t0:.0f} s", flush=True)
    for truth in truths:
        yield truth["exam_id"], root / "source" / "dicom" / truth["exam_id"], truth, truth["variant"]


def residuals(generator: str, transform, truth: dict) -> np.ndarray:
    """Found minus true PET position of every lesion centre (N x 3, LPS mm) under ``transform``."""
    if generator == "project":
        from lymphatlas_synth.cohort import lesion_residuals

        return lesion_residuals(transform, truth)
    from builder.convert.align import transform_matrix
    from lymphatlas_synth import foreign as foreign_phantoms

    return foreign_phantoms.lesion_residuals(transform_matrix(transform), truth)


_OLD = {}


def measure(task: tuple) -> dict:
    """One exam registered with the current recipe and (unless ``with_old`` is false) the old one, in
    this process: the row of the table. Runs in a worker process with ``--jobs``."""
    from builder.convert import align
    from builder.convert.discover import discover_exam
    from builder.convert.pipeline import body_image, read_exam

    gen, grid, seed, exam_id, folder, truth, desc, with_old, old_commit, repeats = task
    if with_old and _OLD.get("commit") != old_commit:
        _OLD.update(module=old_align_module(old_commit), commit=old_commit)
    images = read_exam(discover_exam(folder, exam_id))
    ct, pet, body = images.ct, images.pet_suv, body_image(images.body, images.ct)
    row = {"generator": gen, "grid": grid, "seed": seed, "exam": exam_id, "layout": desc,
           "ct_spacing": [round(s, 3) for s in ct.GetSpacing()],
           "pet_spacing": [round(s, 3) for s in pet.GetSpacing()],
           "ct_size": list(ct.GetSize()), "lesions": len(truth["lesions"])}
    if with_old:
        row["old_commit"] = old_commit
    # old, new, old, new, ...: each recipe's time is the median of its runs, taken in turns on the
    # same images, so a change of load in between weighs on both (the transform is the same each time)
    times: dict[str, list[tuple[float, float]]] = {}
    for _ in range(max(1, repeats)):
        for name, module in (("old", _OLD.get("module") if with_old else None), ("new", align)):
            if module is None:
                continue
            transform, cpu, wall = register(module, ct, pet, body)
            times.setdefault(name, []).append((cpu, wall))
            if name in row:
                continue
            err = residuals(gen, transform, truth)
            norm = np.linalg.norm(err, axis=1)
            row[name] = {"tre_mean_mm": float(norm.mean()), "tre_max_mm": float(norm.max()),
                         "residual_mean_xyz_mm": err.mean(0).round(3).tolist()}
    row["load"] = round(os.getloadavg()[0], 2)  # the machine's 1-minute load when this exam's runs ended
    for name, runs in times.items():
        row[name].update(cpu_s=float(np.median([c for c, _ in runs])), wall_s=float(np.median([w for _, w in runs])),
                         runs=len(runs))
    return {k: row[k] for k in [k for k in row if k != "old"] + (["old"] if "old" in row else [])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=2026,
                        help="cohort seed: a group's is seed + 10 x grid index (coarse, realistic, scanner) + generator index")
    parser.add_argument("--exams", type=int, default=8, help="project realistic exams")
    parser.add_argument("--coarse", type=int, default=8, help="project coarse-PET exams")
    parser.add_argument("--scanner", type=int, default=4, help="exams at scanner sizes, per generator")
    parser.add_argument("--groups", default=",".join(f"{g}:{k}" for k in GOALS for g in GENERATORS),
                        help="generator:grid[:seed] groups in the order to run them (default: every pair)")
    parser.add_argument("--workdir", type=Path, help="keep the generated cohorts here (reused when present)")
    parser.add_argument("--json", type=Path, help="also write the per-exam results as JSON")
    parser.add_argument("--jobs", type=int, default=1,
                        help="exams registered at once, in worker processes (each exam's times are its worker's)")
    parser.add_argument("--no-old", action="store_true", help="skip the previous recipe")
    parser.add_argument("--old-commit", default=OLD_COMMIT,
                        help=f"the commit whose {OLD_PATH} is the previous recipe (default {OLD_COMMIT}, before issue 20)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="register each exam this many times with each recipe, in turns (old, new, old, new); "
                             "times are the medians")
    parser.add_argument("--from-json", type=Path, help="print the summary and tables of a run's --json file, register nothing")
    args = parser.parse_args()
    if args.from_json:
        rows = json.loads(args.from_json.read_text())
        _summary(rows)
        _table(rows)
        return

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_registration_"))
    work.mkdir(parents=True, exist_ok=True)
    counts = {"coarse": args.coarse, "realistic": args.exams, "scanner": args.scanner}
    rows = []
    pool = None
    if args.jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(args.jobs)
    for group in args.groups.split(","):  # one group at a time: its cohort is generated, then measured
        gen, grid, *own_seed = group.split(":")
        seed = int(own_seed[0]) if own_seed else args.seed + 10 * list(GOALS).index(grid) + GENERATORS.index(gen)
        tasks = [(gen, grid, seed, exam_id, folder, truth, desc, not args.no_old, args.old_commit, args.repeats)
                 for exam_id, folder, truth, desc in (project_exams if gen == "project" else foreign_exams)(
                     work, grid, counts[grid], seed)]
        for row in (pool.map(measure, tasks) if pool else map(measure, tasks)):
            rows.append(row)
            _print_row(row)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if pool:
        pool.shutdown()
    _summary(rows)
    _table(rows)


def _print_row(row: dict) -> None:
    parts = [f"{row['generator']:11s} {row['grid']:9s} seed {row['seed']} {row['exam']} CT {row['ct_spacing']} "
             f"PET {row['pet_spacing']} {row['layout']}"]
    for name in ("new", "old"):
        if name in row:
            r = row[name]
            parts.append(f"{name}: {r['tre_mean_mm']:.2f}/{r['tre_max_mm']:.2f} mm "
                         f"z{r['residual_mean_xyz_mm'][2]:+.2f} {r['cpu_s']:.1f} s cpu")
    if "old" in row:
        parts.append(f"cpu new/old {row['new']['cpu_s'] / row['old']['cpu_s']:.2f}x")
    if "load" in row:
        parts.append(f"load {row['load']:.1f}")
    print(" | ".join(parts), flush=True)


def _summary(rows: list[dict]) -> None:
    print()
    for gen in dict.fromkeys(r["generator"] for r in rows):
        for grid, (goal_mean, goal_max) in GOALS.items():
            sel = [r for r in rows if r["generator"] == gen and r["grid"] == grid]
            for name in ("new", "old"):
                if not sel or name not in sel[0]:
                    continue
                means = np.array([r[name]["tre_mean_mm"] for r in sel])
                maxes = np.array([r[name]["tre_max_mm"] for r in sel])
                z = float(np.mean([r[name]["residual_mean_xyz_mm"][2] for r in sel]))
                ok = np.all(means <= goal_mean) and (goal_max is None or np.all(maxes <= goal_max))
                if grid != "coarse":
                    ok = ok and abs(z) <= Z_BIAS_GOAL_MM
                print(f"{gen:11s} {grid:9s} {name}: {len(sel)} exams, mean TRE {means.min():.2f}-{means.max():.2f} mm, "
                      f"worst lesion {maxes.max():.2f} mm, cohort mean z residual {z:+.2f} mm: "
                      f"{'met' if ok else 'NOT met'}")
    if rows and "old" in rows[0]:
        runs = rows[0]["old"].get("runs", 1)
        print(f"old = {OLD_PATH} at {rows[0].get('old_commit', OLD_COMMIT)}; times: median of {runs} run(s) per recipe, in turns")
        for key in ("cpu_s", "wall_s"):
            new_t = np.array([r["new"][key] for r in rows])
            old_t = np.array([r["old"][key] for r in rows])
            ratio = new_t / old_t
            loads = [r["load"] for r in rows if "load" in r]
            load = f", load {min(loads):.1f}-{max(loads):.1f}" if loads else ""
            print(f"time ({key}) per exam{load}: new {new_t.mean():.2f} s, old {old_t.mean():.2f} s, ratio of totals "
                  f"{new_t.sum() / old_t.sum():.2f}x, per exam {ratio.min():.2f}-{ratio.max():.2f}x "
                  f"(goal <= {TIME_RATIO_GOAL}x; over it: {int(np.sum(ratio > TIME_RATIO_GOAL))} of {len(ratio)})")


def _cell(r: dict | None) -> str:
    """One exam's columns: exam, grids, TRE mean / worst, residual x, y, z, CPU s, ratio to the old recipe."""
    if r is None:
        return "| | | | | | |"
    n, o = r["new"], r.get("old")
    ct = "x".join(f"{s:g}" for s in r["ct_spacing"][1:])
    pet = "x".join(f"{s:g}" for s in r["pet_spacing"][1:])
    res = ", ".join(f"{v:+.2f}" for v in n["residual_mean_xyz_mm"])
    old = f"{o['tre_mean_mm']:.2f} / {o['tre_max_mm']:.2f}" if o else "-"
    ratio = f"{n['cpu_s'] / o['cpu_s']:.2f}" if o else "-"
    return (f"| {r['exam']} ({ct}, PET {pet}) | {n['tre_mean_mm']:.2f} / {n['tre_max_mm']:.2f} | {res} | "
            f"{n['cpu_s']:.1f} | {ratio} | {old} |")


def _table(rows: list[dict]) -> None:
    """Per grid one markdown table, the two generators side by side (exam k of each on row k)."""
    head = "exam (CT in-plane x slice, PET mm) | TRE mean / worst | residual x, y, z (LPS) | CPU s | new/old | old TRE"
    for grid in GOALS:
        sel = {g: [r for r in rows if r["grid"] == grid and r["generator"] == g] for g in GENERATORS}
        if not any(sel.values()):
            continue
        seeds = ", ".join(f"{g} " + "/".join(str(x) for x in dict.fromkeys(r["seed"] for r in sel[g]))
                          for g in GENERATORS if sel[g])
        print(f"\n{grid} (seeds {seeds}; mm, CPU seconds of the registration)\n")
        print("| # | " + " | ".join(f"{g}: {h}" if i == 0 else h for g in GENERATORS
                                    for i, h in enumerate(head.split(" | "))) + " |")
        print("|---" * (1 + 2 * len(head.split(" | "))) + "|")
        for k in range(max(len(v) for v in sel.values())):
            cells = "".join(_cell(sel[g][k] if k < len(sel[g]) else None)[:-1] for g in GENERATORS)
            print(f"| {k + 1} {cells}|")


if __name__ == "__main__":
    main()
