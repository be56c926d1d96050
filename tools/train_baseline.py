"""The paper's nnU-Net v2 baseline, end to end: materialize -> plan/preprocess -> train folds -> report.

    python tools/train_baseline.py --source RELEASE_OR_MIRROR_OR_REPO [--version X.Y.Z] --work nnunet_baseline

Defaults follow the paper (section 3): one dataset per diagnosis (HL -> id 501, NHL -> id 502),
3d_fullres, folds 0-4 from the release's patient-grouped splits, 500 epochs per fold
(``nnUNetTrainer_500epochs``), on CUDA. ``--configs all`` trains one model on both and still
reports HL and NHL apart. The held-out test split is predicted with the ensemble of the trained
folds. Everything lands in WORK (nnUNet_raw, nnUNet_preprocessed, nnUNet_results, predictions)
and the tables, lesion metrics and curves in WORK/results (see tools/report.py).

CPU smoke run (the CI test; a few minutes on 2 cores)::

    python tools/train_baseline.py --source REL --configs all --folds 0 --trainer tiny --device cpu --np 1

Runs through nnU-Net's Python API (tools/nnunet_run.py says why); nnU-Net's worker pools re-import
this script, hence everything below sits behind ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lymphatlas_ds.nnunet import MaterializeResult
    from lymphatlas_ds.reader import Release

if __package__ in (None, ""):  # run as a script: make the repository root importable for `tools.*`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

logger = logging.getLogger("train_baseline")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="release folder, local mirror or Hugging Face repo id")
    p.add_argument("--version", default=None, help="release version (default: latest)")
    p.add_argument("--work", type=Path, default=Path("nnunet_baseline"), help="working folder (default ./nnunet_baseline)")
    p.add_argument("--results", type=Path, default=None, help="tables and figures (default WORK/results)")
    p.add_argument("--configs", nargs="+", default=["hl", "nhl"], choices=["all", "hl", "nhl"],
                   help="one nnU-Net dataset per config (default: hl nhl, as the paper)")
    p.add_argument("--dataset-id", type=int, default=501, help="id of the first config's dataset; the next get +1, +2")
    p.add_argument("--folds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--configuration", default="3d_fullres")
    p.add_argument("--trainer", default="paper",
                   help="paper (nnUNetTrainer_500epochs), nnUNetTrainer (1000 epochs), tiny (CPU smoke test), "
                        "a class of nnunetv2's trainer modules, or module:Class")
    p.add_argument("--epochs", type=int, default=None, help="override the trainer's number of epochs")
    p.add_argument("--iterations", type=int, default=None, help="override training iterations per epoch")
    p.add_argument("--val-iterations", type=int, default=None, help="override validation iterations per epoch")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--np", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)),
                   help="processes for nnU-Net's fingerprint / preprocessing")
    p.add_argument("--da-workers", type=int, default=None,
                   help="nnU-Net data-augmentation workers (nnUNet_n_proc_DA; default: nnU-Net's choice)")
    p.add_argument("--pet-channel-name", default="PET", help="see `lymphatlas materialize --help`")
    p.add_argument("--no-test", action="store_true", help="do not predict the held-out test split")
    p.add_argument("--tta", action="store_true", help="mirroring test-time augmentation for the test split")
    p.add_argument("--skip-existing", action="store_true",
                   help="keep folds that already have validation/summary.json and existing plans")
    p.add_argument("--force", action="store_true", help="let materialize replace a different dataset with the same id")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


@dataclass(frozen=True)
class _Run:
    """One baseline run: its options, working and results folders, nnU-Net's folders, the release, step timings."""

    args: argparse.Namespace
    work: Path
    results: Path
    paths: dict[str, Path]
    release: Release
    timings: dict[str, float]


def _run_info(args: argparse.Namespace, version: str, trainer_name: str, timings: dict[str, float]) -> dict[str, Any]:
    """The run's settings and timings, as results/run.json and the results page record them."""
    run_info = {
        "release": version, "source": str(args.source), "configs": args.configs, "folds": args.folds,
        "configuration": args.configuration, "trainer": trainer_name, "epochs": args.epochs,
        "iterations": args.iterations, "device": args.device, "test_time_mirroring": args.tta, "timings_s": timings,
    }
    if args.device == "cuda":
        import torch

        if torch.cuda.is_available():
            run_info["gpu"] = torch.cuda.get_device_name(0)
    return run_info


def _materialize(run: _Run, config: str, dataset_id: int) -> MaterializeResult:
    """The config's nnU-Net raw dataset, with the release's folds as nnU-Net's splits."""
    from lymphatlas_ds.nnunet import materialize_nnunet
    from lymphatlas_ds.progress import progress_bar

    args = run.args
    t0 = time.perf_counter()
    with progress_bar(desc=f"materialize {config}", unit="case", disable=args.quiet, file=sys.stderr) as bar:
        m = materialize_nnunet(run.release, run.paths["nnUNet_raw"], config=config, dataset_id=dataset_id,
                               preprocessed_dir=run.paths["nnUNet_preprocessed"],
                               pet_channel_name=args.pet_channel_name, include_test=not args.no_test,
                               test_labels=not args.no_test, force=args.force,
                               progress=lambda n: bar.update(n - bar.n))
    logger.info("%s", m.describe())
    run.timings[f"{config}/materialize"] = time.perf_counter() - t0
    return m


def _plan_and_train(run: _Run, config: str, dataset_id: int, m: MaterializeResult) -> None:
    """nnU-Net's plans and preprocessing (kept with --skip-existing), then each fold trained and validated."""
    from tools import nnunet_run as nr

    args = run.args
    unlisted = [f for f in args.folds if not 0 <= f < len(m.folds)]
    if unlisted:  # nnU-Net would train them on a random per-case 80:20 split that mixes patients
        raise SystemExit(
            f"{m.dataset_name}: splits_final.json lists {len(m.folds)} fold(s) that nnU-Net can train "
            f"({m.release_folds} in the release; a small release has fewer), not --folds {unlisted}; "
            f"pass --folds {' '.join(map(str, range(len(m.folds)))) or '(none: train on all cases with nnU-Net)'}"
        )
    t0 = time.perf_counter()
    plans = run.paths["nnUNet_preprocessed"] / m.dataset_name / "nnUNetPlans.json"
    if not (args.skip_existing and plans.is_file() and m.files_written == 0):
        nr.plan_and_preprocess(dataset_id, configurations=(args.configuration,), num_processes=args.np)
    run.timings[f"{config}/plan_and_preprocess"] = time.perf_counter() - t0
    for fold in args.folds:
        t0 = time.perf_counter()
        nr.train_fold(dataset_id, fold, trainer=args.trainer, configuration=args.configuration,
                      device=args.device, epochs=args.epochs, iterations=args.iterations,
                      val_iterations=args.val_iterations, skip_existing=args.skip_existing)
        run.timings[f"{config}/fold_{fold}/train_and_validate"] = time.perf_counter() - t0


def _predict_test(run: _Run, config: str, m: MaterializeResult, trainer_dir: Path) -> Path | None:
    """The held-out test split predicted by the ensemble of the trained folds (None without one)."""
    from tools import nnunet_run as nr

    args = run.args
    if args.no_test or not m.n_test:
        return None
    t0 = time.perf_counter()
    test_pred = nr.predict_folder(trainer_dir, m.dataset_dir / "imagesTs",
                                  run.work / "predictions" / m.dataset_name / "imagesTs", folds=args.folds,
                                  trainer=args.trainer, device=args.device, use_mirroring=args.tta,
                                  num_processes=1)
    run.timings[f"{config}/predict_test"] = time.perf_counter() - t0
    return test_pred


def _baseline_of_config(run: _Run, config: str, dataset_id: int) -> None:
    """One config end to end: materialize, plan and preprocess, train the folds, predict test, report."""
    from tools import nnunet_run as nr
    from tools import report

    m = _materialize(run, config, dataset_id)
    _plan_and_train(run, config, dataset_id, m)
    trainer_dir = nr.trainer_output_dir(dataset_id, run.args.trainer, configuration=run.args.configuration)
    test_pred = _predict_test(run, config, m, trainer_dir)
    report.write_results(run.results, config, raw_dataset_dir=m.dataset_dir, trainer_dir=trainer_dir,
                         test_predictions=test_pred)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from lymphatlas_ds.reader import Release
    from lymphatlas_ds.source import resolve_release
    from tools import nnunet_run as nr
    from tools import report
    from tools.trainers import resolve_trainer

    work = args.work.resolve()
    results = (args.results or work / "results").resolve()
    paths = nr.set_nnunet_env(work, n_proc_da=args.da_workers)
    trainer_cls = resolve_trainer(args.trainer)  # fail before hours of preprocessing on a typo
    resolved = resolve_release(args.source, version=args.version)
    run = _Run(args, work, results, paths, Release(resolved.path), timings={})
    run_info = _run_info(args, resolved.version, trainer_cls.__name__, run.timings)
    for i, config in enumerate(args.configs):
        _baseline_of_config(run, config, args.dataset_id + i)
    index = report.write_index(results, args.configs, run_info=run_info)
    (results / "run.json").write_text(json.dumps(run_info, indent=2, sort_keys=True) + "\n")
    print(f"results: {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
