"""`python -m builder report WORK [--out WORK/qc]`: the static HTML QC report of a WORK folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("work", type=Path, help="WORK folder written by `python -m builder convert`")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: WORK/qc)")
    parser.add_argument("--force", action="store_true", help="redraw every picture, even the up-to-date ones")
    parser.add_argument("--workers", type=int, default=1, help="processes drawing pictures in parallel")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--wait", action="store_true", help="if another run holds WORK, wait for it")


def run(args: argparse.Namespace) -> int:
    from lymphatlas_ds.progress import progress_bar

    from lymphatlas_ds._lock import work_lock
    from lymphatlas_ds.errors import LymphAtlasError

    from builder.report import write_report

    def progress(cases):
        return progress_bar(cases, desc="QC pictures", unit="case", disable=args.quiet)

    if not args.work.is_dir():
        raise LymphAtlasError(f"WORK folder {args.work} does not exist; run `python -m builder convert SOURCE "
                              f"{args.work}` first")
    with work_lock(args.work, wait=args.wait):  # a convert rewriting cases meanwhile would mix two states
        index = write_report(args.work, args.out, force=args.force, workers=args.workers, progress=progress)
    print(index)
    return 0
