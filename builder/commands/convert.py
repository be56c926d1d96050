"""`python -m builder convert SOURCE WORK`: DICOM source -> aligned cases (docs/contracts.md section 3).

Exit status: 0 every exam converted or unchanged; 1 some exam rejected (its data fail a check, see
failures.json, kind "exam"); 2 a usage error (bad SOURCE, WORK in use by another run, WORK's
de-identification key missing, a --scheduler that cannot be reached, a clinical.csv that cannot be read
as a table, a run that would retire too many cases without --allow-mass-withdrawal: nothing was written); 3 some exam failed with an error
of this run (disk full, out of memory, a killed worker; kind "run"): nothing was lost, rerun;
130 interrupted (Ctrl-C or SIGTERM): the workers are stopped, finished exams are kept, rerun resumes.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, help="source folder: clinical.csv, dicom/<exam_id>/, masks/")
    parser.add_argument("work", type=Path, help="WORK folder: cases/, private/, failures.json, build.json")
    parser.add_argument("--workers", type=int, default=None, help="parallel exams (default: all cores)")
    parser.add_argument("--exams", nargs="+", metavar="EXAM_ID", help="convert only these exams")
    parser.add_argument("--deformable", choices=["auto", "on", "off"], default="auto",
                        help="B-spline refinement after the rigid registration (auto: only when the rigid metric stays poor)")
    parser.add_argument("--no-register", action="store_true", help="keep the scanner alignment (no registration)")
    parser.add_argument("--seed", type=int, default=0, help="registration sampling seed")
    parser.add_argument("--interpolation", choices=["bounded-cubic", "cubic", "linear"], default="bounded-cubic",
                        help="PET onto the CT grid: cubic B-spline bounded by the PET voxels around each point "
                             "(default), the paper's unbounded cubic (reproduction studies), or trilinear")
    parser.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                        help="run the exams on this Dask distributed scheduler instead of local processes")
    parser.add_argument("--no-report", action="store_true", help="do not write the QC report at the end")
    parser.add_argument("--prune", action="store_true",
                        help="remove the cases of exams that are gone from the source (as `python -m builder withdraw`)")
    parser.add_argument("--allow-mass-withdrawal", action="store_true",
                        help="let this run retire (prune, or replace by a rejection) more than 10%% of WORK's cases "
                             "(and at least 2); without it such a run retires none and says which and why")
    parser.add_argument("--wait", action="store_true",
                        help="if another run holds WORK, wait for it instead of stopping with an error")
    parser.add_argument("--new-key", action="store_true",
                        help="create a new de-identification key: only for an empty WORK (a missing key of a WORK "
                             "with cases is restored from the backup, never replaced)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from builder.convert.align import AlignSettings, Deformable, Interpolation
    from builder.convert.pipeline import ConvertSettings, convert_cohort

    settings = ConvertSettings(
        align=AlignSettings(register=not args.no_register, deformable=Deformable(args.deformable), seed=args.seed,
                            interpolation=Interpolation(args.interpolation))
    )
    try:
        summary = convert_cohort(
            args.source, args.work, settings=settings, exams=args.exams, workers=args.workers,
            scheduler=args.scheduler, progress=not args.quiet, prune=args.prune, wait_for_lock=args.wait,
            allow_mass_retirement=args.allow_mass_withdrawal,
            new_key=args.new_key,
        )
    except KeyboardInterrupt:
        print(f"interrupted: finished exams are kept in {args.work}, the others are listed in "
              f"{args.work / 'failures.json'}; run the same command again to resume", file=sys.stderr)
        return 130
    except OSError as e:  # the parent's own bookkeeping (id_map, failures.json) could not be written
        print(f"error: cannot write {e.filename or args.work}: {e.strerror or e}; no case was removed: free disk "
              "space (or fix the permissions) and run the same command again", file=sys.stderr)
        return 3
    print(summary.line())
    for r in summary.results:
        if r.status.value in ("rejected", "failed"):
            print(f"  {r.status.value} {r.exam_id} at {r.stage}: {r.reason}")
        if r.retired_case:
            print(f"  retired case {r.retired_case} of {r.exam_id}: its source changed and is now rejected")
    for exam_id, case_id in summary.pruned.items():
        print(f"  pruned {exam_id} (case {case_id or 'none'}): gone from the source")
    if summary.gone:
        print(f"  {len(summary.gone)} exams of {args.work} are gone from the source: {', '.join(summary.gone)}; "
              f"their cases stay (and release refuses them) until `python -m builder withdraw {args.work} "
              f"{' '.join(summary.gone)}` or `convert --prune`")
    if not args.no_report and importlib.util.find_spec("builder.report") is not None:
        from lymphatlas_ds._lock import work_lock

        from builder.report import write_report

        with work_lock(args.work, wait=True):  # another run may take WORK between the convert and its report
            out = write_report(args.work)
        print(f"QC report: {out}")
    if summary.n_failed:
        return 3
    return 1 if summary.n_rejected else 0
