"""Convert one exam (``--size full`` by default) and compare with ``dcm2niix -z y`` in the same run.

Prints, as ratios to baselines measured in this run:

* the whole convert of one exam (read, SUV, registration, cubic resampling, labels, QC, writing)
  against dcm2niix converting the same CT and PET series (goal: at most 4x);
* peak memory of the converting process against the size of its output arrays (goal: at most 4x);
* time per stage;
* PET resampling: the bounded cubic (the default) and plain linear against SimpleITK's B-spline
  resampler (the paper's unbounded cubic), in time and in SUV difference (benchmarks/bench_resample.py
  measures them against phantoms whose activity is known).

Usage::

    python benchmarks/bench_convert.py [--size full|small] [--workdir DIR] [--figures docs/images]

With ``--figures`` it also saves ``convert_case.png`` and ``convert_registration.png`` (three
views, fusion with the label outline; PET before/after registration) of the converted case.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lymphatlas_ds._io import peak_rss_bytes  # noqa: E402


def _child_convert(source: Path, work: Path) -> None:
    """Run in a subprocess: convert every exam with one worker, print the results as JSON."""
    from builder.convert.pipeline import convert_cohort, result_dict

    summary = convert_cohort(source, work, workers=1, progress=False)
    print(json.dumps([result_dict(r) for r in summary.results]))


def _child_resample(source: Path, work: Path) -> None:
    """Run in a subprocess: time and compare the PET resampling methods on the converted exam."""
    import numpy as np
    import SimpleITK as sitk

    from builder.convert.align import Interpolation, resample_to_reference
    from builder.convert.case import load_case
    from builder.convert.discover import discover_exam
    from builder.convert.read import read_series
    from builder.convert.suv import suv_conversion

    exam_id = sorted(p.name for p in (source / "dicom").iterdir())[0]
    exam = discover_exam(source / "dicom" / exam_id, exam_id)
    ct, _ = read_series(exam.ct, exam_id=exam_id)
    pet, _ = read_series(exam.pet, exam_id=exam_id)
    pet = sitk.Cast(pet, sitk.sitkFloat32) * float(suv_conversion(exam.pet, exam_id=exam_id).factor)
    case_dir = next(p for p in (work / "cases").iterdir() if not p.name.startswith("."))
    rec = load_case(case_dir)["alignment"]["transform"]
    t = sitk.Euler3DTransform()
    t.SetCenter(rec["center_mm"])
    t.SetParameters(rec["parameters"])
    out = {}
    arrays = {}
    for interp in (Interpolation.CUBIC, Interpolation.BOUNDED_CUBIC, Interpolation.LINEAR):
        t0 = time.perf_counter()
        img = resample_to_reference(pet, ct, t, interpolation=interp)
        out[interp.value] = {"seconds": time.perf_counter() - t0}
        arrays[interp.value] = sitk.GetArrayFromImage(img)
        del img
    ref = arrays["cubic"]
    body = ref > 0.1
    for name in ("bounded-cubic", "linear"):
        diff = np.abs(arrays[name] - ref)[body]
        out[name].update(mean_abs=float(diff.mean()), p999_abs=float(np.percentile(diff, 99.9)),
                         max_abs=float(diff.max()), ref_max=float(ref.max()), max=float(arrays[name].max()))
    print(json.dumps(out))


_PEAK_MARK = "bench_convert child peak_rss_bytes="


def _run_child(mode: str, source: Path, work: Path) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB of the child, stdout)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", mode, str(source), str(work)],
                          capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"child {mode} failed:\n{proc.stderr[-3000:]}")
    # the child's own VmHWM: RUSAGE_CHILDREN's ru_maxrss is the largest of all children so far, each counting
    # this process's size at fork (Linux keeps it across exec)
    peak = float(proc.stderr.rsplit(_PEAK_MARK, 1)[1].split()[0]) / 2**20
    return wall, peak, proc.stdout.strip().splitlines()[-1]


def _dcm2niix(source: Path, out: Path) -> float:
    """Seconds dcm2niix -z y takes on the exam's CT and PET series (one call per series folder)."""
    from builder.convert.discover import discover_exam

    dcm2niix = shutil.which("dcm2niix") or str(Path(sys.executable).parent / "dcm2niix")
    exam_id = sorted(p.name for p in (source / "dicom").iterdir())[0]
    exam = discover_exam(source / "dicom" / exam_id, exam_id)
    total = 0.0
    for name, series in (("ct", exam.ct), ("pet", exam.pet)):
        # dcm2niix converts folders: give it exactly this series' files
        folder = out / f"in_{name}"
        folder.mkdir(parents=True)
        for i, f in enumerate(series.files):
            (folder / f"{i:05d}.dcm").symlink_to(f.resolve())
        dest = out / f"out_{name}"
        dest.mkdir()
        t0 = time.perf_counter()
        subprocess.run([dcm2niix, "-z", "y", "-o", str(dest), "-f", name, str(folder)], check=True,
                       capture_output=True)
        total += time.perf_counter() - t0
    return total


def _figures(work: Path, out_dir: Path) -> list[Path]:
    import numpy as np

    from builder.convert.case import load_case
    from lymphatlas_ds import figures

    case_dir = next(p for p in sorted((work / "cases").iterdir()) if not p.name.startswith("."))
    case = load_case(case_dir, arrays=True)
    a = case["arrays"]
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    fig = figures.render_case(a["ct"], a["pet"], a["label"], case["affine_ras"],
                              title=f"{case['case_id']}: CT, PET (SUV), fusion with the lesion outline")
    written.append(fig.save(out_dir / "convert_case.png"))
    fig = figures.render_registration(a["ct"], a["pet"], case["affine_ras"],
                                      np.asarray(case["alignment"]["transform"]["matrix"]), label=a["label"],
                                      title=f"{case['case_id']}: {case['alignment']['decision']}")
    written.append(fig.save(out_dir / "convert_registration.png"))
    return written


def _source_exam(root: Path, *, size: str, seed: int) -> Path:
    """The exam to convert (generated unless ``root`` holds one already), with earlier outputs cleared."""
    from lymphatlas_synth.cohort import generate_cohort

    source = root / "source"
    if not (source / "dicom").is_dir():
        t0 = time.perf_counter()
        generate_cohort(source, n_exams=1, seed=seed, size=size, truth_dir=root / "truth")
        print(f"generated one {size} exam in {time.perf_counter() - t0:.1f} s")
    for d in ("work", "dcm2niix"):
        shutil.rmtree(root / d, ignore_errors=True)
    (root / "dcm2niix").mkdir()
    return source


def _print_convert(case: dict, result: dict, *, base: float, wall: float, peak_mb: float) -> None:
    """The convert against dcm2niix in time, its peak memory against its output, and the time per stage."""
    import numpy as np

    shape = case["geometry"]["shape_zyx"]
    n = int(np.prod(shape))
    out_mb = n * (2 + 4 + 1) / 2**20  # int16 CT + float32 PET + uint8 label
    print(f"\nexam: CT {shape[::-1]} voxels (x, y, z), PET {case['pet']['size']}; output arrays {out_mb:.0f} MB")
    print(f"dcm2niix -z y (CT + PET)        {base:7.1f} s   (baseline)")
    print(f"convert, whole exam             {wall:7.1f} s   ratio {wall / base:5.2f}x   (goal <= 4x)")
    in_exam = sum(v for k, v in result["timings_s"].items() if "." not in k)  # "align.x" are parts of "align"
    print(f"  of which in convert_exam      {in_exam:7.1f} s (rest: interpreter start, imports, files)")
    print(f"peak memory of the convert      {peak_mb:7.0f} MB  ratio {peak_mb / out_mb:5.2f}x output arrays (goal <= 4x)")
    print("time per stage:")
    for k, v in result["timings_s"].items():
        print(f"  {'  ' if '.' in k else ''}{k:26s} {v:7.2f} s")


def _print_registration(alignment: dict, truth_dir: Path) -> None:
    """The registration's decision and its error at the lesion centres against the generator's truth."""
    import numpy as np

    a = alignment
    print(f"registration: {a['decision']}; mean shift {a['shift_mm']} mm")
    truth = json.loads(next(truth_dir.glob("EX*.json")).read_text())
    m_truth = np.asarray(truth["misalignment"]["matrix"])
    m_found = np.asarray(a["transform"]["matrix"])
    errs = [np.linalg.norm((m_found @ np.r_[les["center_mm"], 1])[:3] - (m_truth @ np.r_[les["center_mm"], 1])[:3])
            for les in truth["lesions"]]
    print(f"lesion-centre alignment error vs truth: mean {np.mean(errs):.2f} mm, max {np.max(errs):.2f} mm "
          f"(truth misalignment {np.round(truth['misalignment']['translation_mm'], 2).tolist()} mm, "
          f"{np.round(truth['misalignment']['rotation_deg'], 2).tolist()} deg)")


def _print_resampling(res: dict) -> None:
    """Each PET resampling method in time and SUV difference against SimpleITK's B-spline."""
    ref_s = res["cubic"]["seconds"]
    print("PET resampling onto the CT grid (same transform), reference = SimpleITK B-spline (the paper's cubic):")
    print(f"  cubic (reference)             {ref_s:7.2f} s")
    for name in ("bounded-cubic", "linear"):
        r = res[name]
        print(f"  {name:28s}  {r['seconds']:7.2f} s  ratio {r['seconds'] / ref_s:4.2f}x   SUV error vs reference: "
              f"mean {r['mean_abs']:.4f}, p99.9 {r['p999_abs']:.4f}, max {r['max_abs']:.3f} "
              f"(image max {r['max']:.2f} vs {r['ref_max']:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="full", choices=["full", "small"])
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--workdir", type=Path, help="keep the generated exam here (reused if present)")
    parser.add_argument("--figures", type=Path, help="save convert_*.png of the case into this folder")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "SOURCE", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, source, work = args.child
        {"convert": _child_convert, "resample": _child_resample}[mode](Path(source), Path(work))
        print(f"{_PEAK_MARK}{peak_rss_bytes()}", file=sys.stderr)
        return

    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench_convert_"))
    source = _source_exam(root, size=args.size, seed=args.seed)
    base = _dcm2niix(source, root / "dcm2niix")
    wall, peak_mb, out = _run_child("convert", source, root / "work")
    result = json.loads(out)[0]
    if result["status"] != "converted":
        raise SystemExit(f"exam not converted: {result}")
    case = json.loads(next((root / "work" / "cases").glob("*/case.json")).read_text())
    _print_convert(case, result, base=base, wall=wall, peak_mb=peak_mb)
    _print_registration(case["alignment"], root / "truth")

    _, _, res_out = _run_child("resample", source, root / "work")
    _print_resampling(json.loads(res_out))
    if args.figures:
        for p in _figures(root / "work", args.figures):
            print(f"figure: {p}")


if __name__ == "__main__":
    main()
