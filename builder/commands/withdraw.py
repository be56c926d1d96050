"""`python -m builder withdraw WORK EXAM_ID...`: remove exams (consent withdrawn, deleted) from WORK.

Their case folders, QC pictures, id_map rows and failure entries go; the next release built from
WORK lacks their cases and its CHANGELOG lists them as removed. Versions already published keep
them: see the README, "Withdrawing a patient".
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("work", type=Path, help="WORK folder written by `python -m builder convert`")
    parser.add_argument("exams", nargs="+", metavar="EXAM_ID", help="exam ids as in the source (or case ids)")
    parser.add_argument("--wait", action="store_true", help="if another run holds WORK, wait for it")


def run(args: argparse.Namespace) -> int:
    from builder.convert.pipeline import withdraw_exams

    removed = withdraw_exams(args.work, args.exams, wait_for_lock=args.wait)
    for exam_id, case_id in removed.items():
        print(f"withdrew {exam_id}" + (f": removed case {case_id}" if case_id else " (it had no case)"))
    print(f"next: build a new release from {args.work} (its CHANGELOG lists the removed cases) and publish it; "
          "published versions still hold the cases (README: Withdrawing a patient)")
    return 0
