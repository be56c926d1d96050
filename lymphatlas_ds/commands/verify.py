"""`lymphatlas verify SOURCE [--version X.Y.Z]`: check every file of a release against its manifest.

Compares each file's size and sha256 with ``manifest.json`` and reports missing and unlisted
files. Exit status 0 when everything matches, 1 when something does not (each problem is printed),
2 when the source cannot be read at all.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE", help="release folder, local mirror, or Hugging Face repo id (org/name)")
    parser.add_argument("--version", default=None, help="release version X.Y.Z (default: the newest)")
    parser.add_argument("--quick", action="store_true", help="compare sizes only (no sha256)")
    parser.add_argument("--all-versions", action="store_true", help="verify every version of a local mirror")


def run(args: argparse.Namespace) -> int:
    from lymphatlas_ds.release import Release
    from lymphatlas_ds.source import list_versions, resolve_release

    versions = list_versions(args.source) if args.all_versions else [args.version]
    status = 0
    for version in versions:
        resolved = resolve_release(args.source, version=version)
        release = Release(resolved.path, verify=False, remember=False)
        problems = release.verify_all(check_sha256=not args.quick)
        n_files = len(release.manifest["files"])
        if problems:
            status = 1
            print(f"release {release.version} at {resolved.path}: {len(problems)} problem(s) in {n_files} files")
            for problem in problems:
                print(f"  {problem}")
            print(
                "  re-download or re-copy the release (a published version never changes), then verify again",
                file=sys.stderr,
            )
        else:
            what = "sizes" if args.quick else "sizes and sha256"
            print(f"release {release.version} at {resolved.path}: {n_files} files OK ({what} match the manifest)")
    return status
