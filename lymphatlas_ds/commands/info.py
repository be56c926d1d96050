"""`lymphatlas info SOURCE`: versions, configs, splits, case counts and statistics of a release.

Reads only ``manifest.json``, ``splits.json`` and the metadata columns of the shards (see
:func:`lymphatlas_ds.reader.summarize`); ``--json`` prints the same as JSON. The release-wide
figures are the dataset card's, computed by the same function
(:func:`lymphatlas_ds.statistics.aggregate`): sex and age count patients at their first
examination, SUVmax summarises the cases that have a lesion.
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
    """``median [min-max]`` of a summary, 2 decimals like the dataset card."""
    if not stats or (stats["max"] == 0 and stats["min"] == 0 and stats["total"] == 0):
        return "-"
    return f"{stats['median']:.2f} [{stats['min']:.2f}-{stats['max']:.2f}]"


def _counts(counts: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counts.items()) or "-"


def run(args: argparse.Namespace) -> int:
    from lymphatlas_ds.reader import Release, summarize
    from lymphatlas_ds.source import resolve_release

    resolved = resolve_release(args.source, version=args.version)
    summary = summarize(Release(resolved.path, verify=not args.no_verify))
    summary["source"] = {"kind": resolved.kind.value, "path": str(resolved.path), "versions": list(resolved.versions)}
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
        return 0
    whole = summary["release"]
    print(f"LymphAtlas release {summary['version']} (schema {summary['schema_version']}, builder {summary['builder_version']})")
    print(f"source: {resolved.kind.value} {resolved.source} -> {resolved.path}")
    print(f"versions available: {', '.join(resolved.versions)}")
    print(f"{summary['n_cases']} cases of {summary['n_subjects']} subjects; {summary['n_folds']} folds in train")
    # the dataset card's figures, from the same function (lymphatlas_ds.statistics.aggregate)
    print(f"sex (patients, at their first examination): {_counts(whole['sex'])}")
    print(f"age band (patients): {_counts(whole['age_band'])}")
    print(f"{'statistic':<18}{'min':>10}{'median':>10}{'mean':>10}{'max':>10}{'total':>12}")
    for key, name in (("lesion_count", "lesions"), ("tmtv_ml", "TMTV (ml)"), ("tlg", "TLG (ml SUV)"),
                      ("suv_max", "SUVmax in lesions")):
        s = whole[key]
        total = f"{s['total']:>12.2f}" if key != "suv_max" else f"{'':>12}"
        print(f"{name:<18}{s['min']:>10.2f}{s['median']:>10.2f}{s['mean']:>10.2f}{s['max']:>10.2f}{total}")
    print(f"examinations without any lesion: {whole['cases_without_lesion']}")
    print(f"{'config':<7}{'split':<7}{'cases':>6}{'subj':>6}  {'sex (patients)':<16}{'folds':<22}{'lesions':<22}"
          f"{'TMTV ml':<26}SUVmax")
    for config, splits in summary["configs"].items():
        for split, s in splits.items():
            sex = " ".join(f"{k}:{v}" for k, v in s["sex"].items()) or "-"
            folds = " ".join(f"{k}:{v}" for k, v in s["folds"].items()) or "-"
            print(
                f"{config:<7}{split:<7}{s['cases']:>6}{s['subjects']:>6}  {sex:<16}{folds:<22}"
                f"{_fmt(s['lesion_count']):<22}{_fmt(s['tmtv_ml']):<26}{_fmt(s['suv_max'])}"
            )
    return 0
