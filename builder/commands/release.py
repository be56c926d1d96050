"""`python -m builder release WORK RELEASE --version X.Y.Z [--mirror MIRROR | --previous PREVIOUS_RELEASE]`.

An update is built on the latest version of the mirror it is for (``--mirror``); ``--previous``
names that version by hand and is checked against the mirror (builder/release/lineage.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("work", type=Path, help="WORK folder written by `python -m builder convert`")
    parser.add_argument("release", type=Path, help="release folder to write (e.g. lymphatlas)")
    parser.add_argument("--version", required=True, help="semantic version X.Y.Z of this release")
    parser.add_argument(
        "--previous", type=Path, default=None, help="the last published release folder: its cases keep split and fold"
    )
    parser.add_argument("--mirror", type=Path, default=None,
                        help="the local mirror this release is for: an update is built on its latest version")
    parser.add_argument("--repo-id", default=None,
                        help="the Hugging Face dataset repo this release is for: an update is built on its newest tag")
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
            mirror=args.mirror,
            repo_id=args.repo_id,
        )
    changes = summary.changes
    print(
        f"release {summary.version}: {summary.n_cases} cases in {len(summary.shards)} shards at {summary.path} "
        f"(added {len(changes.added)}, removed {len(changes.removed)}, changed {len(changes.changed)}, "
        f"metadata changed {len(changes.metadata)}" + (f"; built on {summary.base_version})" if summary.base_version
                                                       else "; a first release)")
    )
    if summary.base_version is not None and summary.unchanged:
        print(f"warning: release {summary.version} has no change from {summary.base_version} (no case added, removed "
              "or changed, no metadata changed): publishing it adds an identical version", file=sys.stderr)
    return 0
