"""`python -m builder convert SOURCE WORK`: DICOM source -> aligned cases (docs/contracts.md section 3)."""

from __future__ import annotations

import argparse
import importlib.util
import logging
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
    parser.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                        help="run the exams on this Dask distributed scheduler instead of local processes")
    parser.add_argument("--no-report", action="store_true", help="do not write the QC report at the end")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from builder.align import AlignSettings, Deformable
    from builder.pipeline import ConvertSettings, convert_cohort

    settings = ConvertSettings(
        align=AlignSettings(register=not args.no_register, deformable=Deformable(args.deformable), seed=args.seed)
    )
    summary = convert_cohort(
        args.source, args.work, settings=settings, exams=args.exams, workers=args.workers,
        scheduler=args.scheduler, progress=not args.quiet,
    )
    print(summary.line())
    for r in summary.results:
        if r.status.value == "rejected":
            print(f"  rejected {r.exam_id} at {r.stage}: {r.reason}")
    if not args.no_report and importlib.util.find_spec("builder.report") is not None:
        from builder.report import write_report

        out = write_report(args.work)
        print(f"QC report: {out}")
    return 1 if summary.n_rejected else 0
