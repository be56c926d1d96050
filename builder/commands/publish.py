"""`python -m builder publish RELEASE (--mirror DIR | --repo-id ORG/NAME) [--dry-run]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("release", type=Path, help="release folder written by `python -m builder release`")
    parser.add_argument("--mirror", type=Path, default=None, help="local mirror folder: adds MIRROR/<version>/")
    parser.add_argument("--repo-id", default=None, help="Hugging Face dataset repo ORG/NAME: one commit + tag v<version>")
    parser.add_argument("--public", action="store_true", help="create the Hub repo public (default: private)")
    parser.add_argument("--dry-run", action="store_true", help="print the planned operations, change nothing")
    parser.add_argument("--wait", action="store_true", help="if another publish holds the mirror, wait for it")


def run(args: argparse.Namespace) -> int:
    from lymphatlas_ds.manifest import verify_release

    from builder.release.publish import already_published, publish_hub, publish_mirror

    if args.mirror is None and args.repo_id is None:
        print("error: give --mirror DIR and/or --repo-id ORG/NAME", file=sys.stderr)
        return 2
    if args.mirror is not None:
        if args.dry_run:
            from builder.release.publish import guard_mirror

            guard_mirror(args.release, args.mirror)
            version = verify_release(args.release)["version"]
            print(f"would copy {args.release} to {args.mirror / version} and list {version} in {args.mirror / 'versions.json'}")
        elif (same := already_published(args.release, args.mirror)) is not None:
            publish_mirror(args.release, args.mirror, wait_for_lock=args.wait)  # checks the copy; changes nothing
            print(f"warning: version {same} is already published in {args.mirror} with the same manifest: nothing "
                  "changed (a no-op publish)", file=sys.stderr)
        else:
            print(f"published {publish_mirror(args.release, args.mirror, wait_for_lock=args.wait)}")
    if args.repo_id is not None:
        plan = publish_hub(args.release, args.repo_id, dry_run=args.dry_run, private=not args.public)
        print(plan.describe())
        if args.dry_run:
            print("dry run: nothing sent (stale release files of the repo are listed for deletion at publish time)")
        else:
            print(f"published {plan.version} to {args.repo_id}: commit {plan.commit_oid}, tag {plan.tag}")
    return 0
