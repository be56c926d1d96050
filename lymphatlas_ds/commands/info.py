"""`lymphatlas info SOURCE`: versions, configs, splits, case counts and statistics of a release.

Reads only ``manifest.json``, ``splits.json`` and the metadata columns of the shards (see
:func:`lymphatlas_ds.release.summarize`); ``--json`` prints the same as JSON.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE", help="release folder, local mirror, or Hugging Face repo id (org/name)")
    parser.add_argument("--version", default=None, help="release version X.Y.Z (default: the newest)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--no-verify", action="store_true", help="do not check the files read against the manifest")


def _fmt(stats: dict) -> str:
    if stats["median"] is None:
        return "-"
    return f"{stats['median']:.1f} [{stats['min']:.1f}-{stats['max']:.1f}]"


def run(args: argparse.Namespace) -> int:
    from lymphatlas_ds.release import Release, summarize
    from lymphatlas_ds.source import resolve_release

    resolved = resolve_release(args.source, version=args.version)
    summary = summarize(Release(resolved.path, verify=not args.no_verify))
    summary["source"] = {"kind": resolved.kind.value, "path": str(resolved.path), "versions": list(resolved.versions)}
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
        return 0
    print(f"LymphAtlas release {summary['version']} (schema {summary['schema_version']}, builder {summary['builder_version']})")
    print(f"source: {resolved.kind.value} {resolved.source} -> {resolved.path}")
    print(f"versions available: {', '.join(resolved.versions)}")
    print(f"{summary['n_cases']} cases of {summary['n_subjects']} subjects; {summary['n_folds']} folds in train")
    print(f"{'config':<7}{'split':<7}{'cases':>6}{'subj':>6}  {'sex':<14}{'folds':<22}{'lesions':<22}{'TMTV ml':<24}SUVmax")
    for config, splits in summary["configs"].items():
        for split, s in splits.items():
            sex = " ".join(f"{k}:{v}" for k, v in s["sex"].items()) or "-"
            folds = " ".join(f"{k}:{v}" for k, v in s["folds"].items()) or "-"
            print(
                f"{config:<7}{split:<7}{s['cases']:>6}{s['subjects']:>6}  {sex:<14}{folds:<22}"
                f"{_fmt(s['lesion_count']):<22}{_fmt(s['tmtv_ml']):<24}{_fmt(s['suv_max'])}"
            )
    return 0
