"""`python -m builder release WORK RELEASE --version X.Y.Z [--previous PREVIOUS_RELEASE]`."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("work", type=Path, help="WORK folder written by `python -m builder convert`")
    parser.add_argument("release", type=Path, help="release folder to write (e.g. lymphatlas)")
    parser.add_argument("--version", required=True, help="semantic version X.Y.Z of this release")
    parser.add_argument(
        "--previous", type=Path, default=None, help="the last published release folder: its cases keep split and fold"
    )
    parser.add_argument("--seed", type=int, default=0, help="split seed of a first release (updates reuse the previous one)")
    parser.add_argument("--overwrite", action="store_true", help="replace RELEASE if it exists")
    parser.add_argument("--keep-gone", action="store_true",
                        help="release cases whose exam is gone from the source (default: refuse; withdraw them)")
    parser.add_argument("--wait", action="store_true", help="if another run holds WORK or RELEASE, wait for it")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from lymphatlas_ds.progress import progress_bar

    from builder.release.build import build_release, list_work_cases

    total = len(list_work_cases(args.work))
    with progress_bar(total=total, unit="case", desc=f"release {args.version}", disable=args.quiet) as bar:
        summary = build_release(
            args.work,
            args.release,
            version=args.version,
            previous=args.previous,
            seed=args.seed,
            overwrite=args.overwrite,
            on_case=lambda _case_id: bar.update(1),
            keep_gone=args.keep_gone,
            wait_for_lock=args.wait,
        )
    changes = summary.changes
    print(
        f"release {summary.version}: {summary.n_cases} cases in {len(summary.shards)} shards at {summary.path} "
        f"(added {len(changes.added)}, removed {len(changes.removed)}, changed {len(changes.changed)})"
    )
    return 0
