"""`python -m builder synth OUT --exams N --seed S [--first-exam N] [--size small|full] [--truth DIR] [--variants all]`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="source folder to write (clinical.csv, dicom/, masks/)")
    parser.add_argument("--exams", type=int, default=12, help="number of exams (default 12)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same bytes")
    parser.add_argument("--size", choices=["small", "full"], default="small",
                        help="small: CT 128x128, seconds per exam; full: CT 512x512 x 300+ slices")
    parser.add_argument("--truth", type=Path, default=None, help="truth folder (default OUT/truth)")
    parser.add_argument("--variants", default=None,
                        help="'all' cycles every vendor/timing/storage/bad variant over the exams; a JSON object or "
                             "list of objects sets variant keys (see lymphatlas_synth/cohort.py); default: good exams only")
    parser.add_argument("--first-exam", type=int, default=0, metavar="N",
                        help="number the exams from EX<N> (default 0), so cohorts of other seeds merge without renaming")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing cohort in OUT")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from lymphatlas_ds.progress import progress_bar

    from lymphatlas_synth.cohort import generate_cohort

    variants = args.variants
    if variants is not None and variants != "all":
        try:
            variants = json.loads(variants)
        except json.JSONDecodeError as e:
            raise SystemExit(f"--variants must be 'all' or JSON (e.g. '{{\"vendor\": \"ge\"}}'): {e}") from e

    def progress(items):
        return progress_bar(items, desc="exams", unit="exam", disable=args.quiet)

    try:
        truths = generate_cohort(args.out, n_exams=args.exams, seed=args.seed, size=args.size, truth_dir=args.truth,
                                 variants=variants, overwrite=args.overwrite, progress=progress,
                                 first_exam=args.first_exam)
    except ValueError as e:  # a bad --exams or --variants value: say which, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    accepted = sum(t.expected == "accept" for t in truths)
    print(f"{len(truths)} exams ({accepted} to accept, {len(truths) - accepted} to reject) in {args.out}")
    return 0
