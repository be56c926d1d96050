"""`lymphatlas evaluate PRED --release R --out DIR [--config C] [--fold K | --split S]`: a model's predictions
against a release's labels.

PRED is a folder of ``<case_id>.nii.gz`` (``lymphatlas_ds.save_prediction`` writes them; nnU-Net's
output folder has the same names) or DICOM SEG ``<case_id>.dcm``. Writes the paper's Tables 2-3
columns per case and per fold and the lesion-level metrics (autoPET) into DIR: cases.csv,
folds.csv, lesions.csv, detection.csv, report.md, detection_by_volume.png
(:mod:`lymphatlas_ds.evaluate`). Missing, unknown, off-grid or non-binary predictions stop it with
status 2 and a message naming the cases.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("predictions", metavar="PRED", help="folder of predictions named <case_id>.nii.gz (or .nii, DICOM SEG .dcm)")
    parser.add_argument("--release", required=True, help="release folder, local mirror or Hub repo id (org/name)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the tables, report.md and the plot")
    parser.add_argument("--version", default=None, help="release version X.Y.Z (default: the newest)")
    parser.add_argument("--config", default="all", help="all, hl or nhl (default: all)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--fold", type=int, default=None, help="evaluate fold K's validation cases (all must be predicted)")
    which.add_argument("--split", choices=("train", "test"), default=None,
                       help="evaluate every case of a split (all must be predicted)")
    parser.add_argument("--no-verify", action="store_true", help="do not check the release files against the manifest")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _f(value: float, digits: int) -> str:
    return "NaN" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def run(args: argparse.Namespace) -> int:
    from lymphatlas_ds.evaluate import evaluate, write_report
    from lymphatlas_ds.progress import progress_bar
    from lymphatlas_ds.reader import Release

    release = Release.from_source(args.release, version=args.version, verify=not args.no_verify)
    with progress_bar(desc="evaluate", unit="case", disable=args.quiet) as bar:
        result = evaluate(args.predictions, release, config=args.config, fold=args.fold, split=args.split,
                          progress=lambda n: bar.update(n - bar.n))
    written = write_report(result, args.out)
    for name, row in result.folds["all"].items():
        print(f"{name}: {row['n_cases']} cases, Dice {_f(row['dice'], 5)}, IoU {_f(row['iou'], 5)}, "
              f"detection sensitivity {_f(row['detection_sensitivity'], 3)} "
              f"({row['n_detected']}/{row['n_ref_lesions']} lesions), FP volume {_f(row['fp_volume_ml'], 3)} ml/case")
    print(f"missed lesions: {len(result.missed)}")
    for path in written:
        print(path)
    return 0
