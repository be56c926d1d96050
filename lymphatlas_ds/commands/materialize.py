"""`lymphatlas materialize SOURCE --nnunet RAW_DIR`: write an nnU-Net v2 raw dataset from a release.

Thin wrapper around :func:`lymphatlas_ds.nnunet.materialize_nnunet`; see that module for the
layout. ``--preprocessed`` defaults to ``$nnUNet_preprocessed`` so that the patient-grouped
``splits_final.json`` lands where nnU-Net's trainer looks for it. The closing hint prints nnU-Net's
own commands for the dataset just written, as they can be pasted.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from lymphatlas_ds.errors import SourceError

from lymphatlas_ds.schema import Config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--nnunet", metavar="RAW_DIR",
                        help="nnU-Net raw folder (nnUNet_raw); the dataset goes to RAW_DIR/Dataset<ID>_<Name>/")
    target.add_argument("--monai", metavar="DIR",
                        help="a new folder DIR: NIfTI files and datalist.json (MONAI's decathlon format, the "
                             "release's folds) for monai.data.load_decathlon_datalist")
    parser.add_argument("source", nargs="?", default=None,
                        help="release folder, local mirror (with --version), or Hugging Face repo id")
    parser.add_argument("--source", dest="source_option", metavar="SOURCE", default=None,
                        help="deprecated spelling of the positional SOURCE")
    parser.add_argument("--version", default=None, help="release version X.Y.Z (default: the latest)")
    parser.add_argument("--config", choices=[c.value for c in Config], default=Config.ALL.value,
                        help="all cases, Hodgkin (hl) or non-Hodgkin (nhl); the paper trains hl and nhl apart")
    parser.add_argument("--dataset-id", type=int, default=501, help="nnU-Net dataset id, 1-999 (default 501)")
    parser.add_argument("--name", default=None,
                        help="dataset name after the id (default LymphAtlas, LymphAtlasHL or LymphAtlasNHL)")
    parser.add_argument("--preprocessed", metavar="DIR", default=os.environ.get("nnUNet_preprocessed"),
                        help="also write splits_final.json into DIR/Dataset<ID>_<Name>/ "
                             "(default: $nnUNet_preprocessed when set)")
    parser.add_argument("--pet-channel-name", default="PET",
                        help="name of channel 1 in dataset.json; it selects nnU-Net's PET normalization: any name "
                             "but the reserved ones gives per-image z-score (default PET); 'noNorm', "
                             "'rescale_to_0_1' and 'zscore' are nnU-Net's other schemes; 'CT' would apply CT "
                             "normalization to SUV. Channel 0 is always 'CT' (CT normalization)")
    parser.add_argument("--file-ending", choices=[".nii.gz", ".nii"], default=".nii.gz")
    parser.add_argument("--include-test", action="store_true", help="also write the test split to imagesTs/")
    parser.add_argument("--test-labels", action="store_true",
                        help="also write the test labels, apart in labelsTs/ (implies --include-test)")
    parser.add_argument("--force", action="store_true",
                        help="replace a different dataset that already uses this id / folder")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="parallel writers")
    parser.add_argument("--gzip-level", type=int, default=1, choices=range(0, 10), metavar="0-9",
                        help="gzip level of .nii.gz files (default 1: fast, slightly larger)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from lymphatlas_ds.nnunet import materialize_nnunet
    from lymphatlas_ds.progress import progress_bar
    from lymphatlas_ds.reader import Release
    from lymphatlas_ds.source import resolve_release

    source = _source(args)
    release = Release(resolve_release(source, version=args.version).path)
    if args.monai is not None:
        return _run_monai(args, release)
    with progress_bar(desc="materialize", unit="case", disable=args.quiet) as bar:
        result = materialize_nnunet(
            release, args.nnunet, config=args.config, dataset_id=args.dataset_id, name=args.name,
            preprocessed_dir=args.preprocessed, pet_channel_name=args.pet_channel_name,
            file_ending=args.file_ending, include_test=args.include_test, test_labels=args.test_labels,
            force=args.force, workers=args.workers, gzip_level=args.gzip_level,
            progress=lambda n: bar.update(n - bar.n),
        )
    print(result.describe())
    print(fold_summary(result, config=args.config))
    if result.splits_files and args.preprocessed:
        print(f"patient-grouped folds: {result.splits_files[-1]} (nnU-Net's trainer reads this one)")
    elif result.splits_files:
        print(
            f"patient-grouped folds: {result.splits_files[0]}\n"
            f"  the `cp` below puts it in $nnUNet_preprocessed/{result.dataset_name}/ (or rerun with --preprocessed "
            "DIR): without it nnU-Net draws random per-case folds that put one patient's exams on both sides"
        )
    print(next_steps(result.dataset_dir, args.dataset_id, preprocessed=args.preprocessed, n_folds=len(result.folds)))
    return 0


def fold_summary(result: Any, *, config: str) -> str:
    """What splits_final.json holds: the folds nnU-Net can train, and each fold left out with the fix."""
    n, kept = len(result.folds), result.folds
    if result.release_folds == 0:
        return ("no cross-validation folds: the release has a single training patient, and a fold needs one "
                "patient to train on and another to validate on. No splits_final.json is written; train on all "
                "cases (`nnUNetv2_train ... all`, below), or build a release with more patients for folds")
    lines = [f"folds: {n} of the release's {result.release_folds} in splits_final.json"
             + ("" if kept == list(range(n)) else
                " (nnU-Net " + ", ".join(f"fold {i} = release fold {k}" for i, k in enumerate(kept)) + ")")]
    for reason in result.left_out:
        lines.append(f"  left out: {reason}; nnU-Net cannot train a fold without one")
    if result.left_out:
        fix = ("materialize --config all (every fold of the release has both)" if config != Config.ALL.value else
               "an update release with more patients (new patients fill the emptiest folds)")
        lines.append(f"  to train every fold of the release use {fix}")
    if not n:
        lines.append("  no fold left: no splits_final.json is written; train on all cases (`nnUNetv2_train ... all`)")
    return "\n".join(lines)


def _run_monai(args: argparse.Namespace, release) -> int:
    from lymphatlas_ds.monai_datalist import materialize_monai
    from lymphatlas_ds.progress import progress_bar

    with progress_bar(desc="materialize --monai", unit="case", disable=args.quiet) as bar:
        result = materialize_monai(release, args.monai, config=args.config, force=args.force, workers=args.workers,
                                   gzip_level=args.gzip_level, progress=lambda: bar.update(1))
    print(result.describe())
    print(f"load it with MONAI: monai.data.load_decathlon_datalist({str(result.datalist)!r}, True, \"training\"); "
          "validate fold k on the entries whose \"fold\" is k")
    return 0


def _source(args: argparse.Namespace) -> str:
    if args.source_option is not None:
        print("warning: --source is deprecated; give the release first: lymphatlas materialize SOURCE --nnunet RAW_DIR",
              file=sys.stderr)
        if args.source is not None and args.source != args.source_option:
            raise SourceError(f"two sources given ({args.source!r} and --source {args.source_option!r}); give one")
    source = args.source if args.source is not None else args.source_option
    if source is None:
        raise SourceError("no release given: lymphatlas materialize SOURCE --nnunet RAW_DIR "
                          "(SOURCE: a release folder, a local mirror or a Hub repo id)")
    return source


def next_steps(dataset_dir: Path, dataset_id: int, *, preprocessed: str | None, n_folds: int = 5) -> str:
    """nnU-Net's own commands for the paper's baseline on this dataset, ready to paste (one fold shown).

    ``n_folds``: the folds in splits_final.json; with none, training and prediction use nnU-Net's ``all``.
    """
    raw = Path(dataset_dir).resolve().parent
    lines = ["next, with nnU-Net's own commands (the paper: 3d_fullres, 5 folds, 500 epochs each):"]
    env = {"nnUNet_raw": str(raw)}
    env["nnUNet_preprocessed"] = str(Path(preprocessed).resolve()) if preprocessed else str(raw.parent / "nnUNet_preprocessed")
    env["nnUNet_results"] = os.environ.get("nnUNet_results") or str(raw.parent / "nnUNet_results")
    for var, value in env.items():
        if os.environ.get(var) != value:
            lines.append(f"  export {var}={shlex.quote(value)}")
    if not _trainers_visible():
        lines.append("  python -m lymphatlas_ds.nnunet_trainers   # once: lets nnUNetv2_train find the project's trainers")
    if not preprocessed and n_folds:  # the patient-grouped folds go where nnU-Net's trainer reads them
        target = shlex.quote(str(Path(env["nnUNet_preprocessed"]) / Path(dataset_dir).name))
        lines.append(f"  mkdir -p {target} && cp {shlex.quote(str(Path(dataset_dir).resolve() / 'splits_final.json'))} {target}/")
    images_ts = Path(dataset_dir).resolve() / "imagesTs"
    predict_note = ""
    if not images_ts.is_dir():
        predict_note = "   # images of your own; --include-test writes the test split's"
        images_ts = Path("IMAGES_DIR")
    images_ts = shlex.quote(str(images_ts))
    lines += [
        f"  nnUNetv2_plan_and_preprocess -d {dataset_id} --verify_dataset_integrity -c 3d_fullres",
        f"  nnUNetv2_train {dataset_id} 3d_fullres {'0' if n_folds else 'all'} -tr nnUNetTrainer_500epochs"
        + ("      # no folds: every training case" if not n_folds else "" if n_folds == 1 else
           f"      # then fold{'s' if n_folds > 2 else ''} {'1' if n_folds == 2 else f'1-{n_folds - 1}'}"),
        f"  nnUNetv2_predict -i {images_ts} -o predictions -d {dataset_id} -c 3d_fullres "
        f"-f {' '.join(map(str, range(n_folds))) or 'all'} -tr nnUNetTrainer_500epochs{predict_note}",
    ]
    return "\n".join(lines)


def _trainers_visible() -> bool:
    """Whether nnU-Net's lookup finds the project's trainers (True where nnU-Net is absent: nothing to say)."""
    try:
        from lymphatlas_ds.nnunet_trainers import is_installed
    except ImportError:
        return True
    return is_installed()
