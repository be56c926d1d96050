"""Write ``results/``: Tables 2-3, lesion-level metrics and training curves of a cross-validation run.

For one trained dataset (one config) :func:`write_results` writes::

    results/<config>_cv.md, .csv            Fold 0-4, Mean, All cases (tools/report_tables.py)
    results/<config>_<HL|NHL>_cv.md, .csv   the same per diagnosis, for a model trained on config "all"
    results/<config>_lesions.csv            per validation case: FP / FN volume (ml), lesions, detected
    results/<config>_lesions.md             per fold and pooled: mean FP / FN volume, detection sensitivity
    results/<config>_test.md                the held-out test split, when predicted (nnU-Net's metrics + lesions)
    results/<config>_fold<k>_curves.png     loss and pseudo Dice, epoch time, learning rate (paper Figure 4)
    results/README.md                       every table above, one page

Also a command, for a model trained with nnU-Net's own commands::

    python tools/report.py results --config hl --raw nnUNet_raw/Dataset501_LymphAtlasHL \
        --trainer-dir nnUNet_results/Dataset501_LymphAtlasHL/nnUNetTrainer__nnUNetPlans__3d_fullres

Example:
    >>> write_results("results", "hl", raw_dataset_dir="nnUNet_raw/Dataset501_LymphAtlasHL",
    ...               trainer_dir="nnUNet_results/Dataset501_LymphAtlasHL/nnUNetTrainer__nnUNetPlans__3d_fullres")  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import sys

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable for `tools.*`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lymphatlas_ds._io import write_atomic  # noqa: E402
from tools import lesion_metrics as lm  # noqa: E402
from tools import report_tables as rt  # noqa: E402

logger = logging.getLogger(__name__)

LESION_COLUMNS = ("fold", "case", "diagnosis", "fp_volume_ml", "fn_volume_ml", "n_ref_lesions", "n_detected",
                  "n_fp_components", "sensitivity")


def plot_training_curves(log: dict, out_png: Path, *, title: str = "") -> Path:
    """Figure 4 of the paper from nnU-Net's per-epoch log: (a) losses + pseudo Dice, (b) epoch time, (c) lr."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # nnU-Net's logger calls seaborn.set(font_scale=2.5), which changes matplotlib's global style
    with plt.style.context("default"):
        return _plot_curves(plt, log, out_png, title)


def _plot_curves(plt, log: dict, out_png: Path, title: str) -> Path:
    n = min(len(log.get(k, [])) for k in ("train_losses", "val_losses", "lrs", "epoch_start_timestamps",
                                           "epoch_end_timestamps"))
    epochs = np.arange(n)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    ax = axes[0]
    ax.plot(epochs, log["train_losses"][:n], color="tab:blue", label="train loss")
    ax.plot(epochs, log["val_losses"][:n], color="tab:red", label="validation loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(epochs, np.asarray(log.get("mean_fg_dice", [])[:n], dtype=float), ":", color="tab:green",
             label="pseudo Dice")
    ax2.plot(epochs, np.asarray(log.get("ema_fg_dice", [])[:n], dtype=float), color="tab:green",
             label="pseudo Dice (moving avg.)")
    ax2.set_ylabel("pseudo Dice")
    ax2.set_ylim(0, 1)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [h.get_label() for h in lines], loc="center right", fontsize=8)
    ax.set_title("(a) loss and pseudo Dice")
    durations = np.subtract(log["epoch_end_timestamps"][:n], log["epoch_start_timestamps"][:n])
    axes[1].plot(epochs, durations, color="tab:blue")
    axes[1].set_ylim(0, max(1.0, float(durations.max(initial=0)) * 1.1))
    axes[1].set(xlabel="epoch", ylabel="time per epoch [s]", title="(b) epoch duration")
    axes[2].plot(epochs, log["lrs"][:n], color="tab:blue")
    axes[2].set(xlabel="epoch", ylabel="learning rate", title="(c) learning rate")
    if title:
        fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return write_atomic(out_png, buf.getvalue())


def _fmt(value: float, digits: int = 3) -> str:
    return "NaN" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def lesion_table_markdown(rows: list[tuple[str, dict]], *, title: str) -> str:
    """Per-fold lesion-level summary (tools/lesion_metrics.summarize) as markdown."""
    lines = [f"### {title}", "",
             "| Fold | cases | FP volume (ml/case) | FN volume (ml/case) | lesions | detected | sensitivity | FP components |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in rows:
        lines.append(f"| {name} | {s['n_cases']} | {_fmt(s['fp_volume_ml'])} | {_fmt(s['fn_volume_ml'])} | "
                     f"{s['n_ref_lesions']} | {s['n_detected']} | {_fmt(s['sensitivity'])} | {s['n_fp_components']} |")
    return "\n".join(lines) + "\n"


def _lesions_of_folder(pred_dir: Path, labels_dir: Path, file_ending: str) -> dict[str, lm.LesionMetrics]:
    out = {}
    for pred in sorted(pred_dir.glob(f"*{file_ending}")):
        case = pred.name[: -len(file_ending)]
        ref = labels_dir / pred.name
        if not ref.is_file():
            raise FileNotFoundError(f"{pred}: no reference {ref}; was the dataset re-materialized after training?")
        out[case] = lm.lesion_metrics_files(ref, pred)
    return out


@dataclass(frozen=True)
class _TrainedDataset:
    """What the tables of one trained dataset come from: its raw folder, file ending, diagnoses and folds."""

    config: str
    raw: Path
    ending: str
    diagnosis: dict[str, str]
    summary_paths: dict[int, Path]


@dataclass
class _Results:
    """The files written so far and the sections of the config's page, in order."""

    out_dir: Path
    written: list[Path] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)

    def put(self, name: str, text: str) -> None:
        """Write one file of ``results/``."""
        write_atomic(self.out_dir / name, text)
        self.written.append(self.out_dir / name)


def _trained_dataset(config: str, raw: Path, trainer_dir: Path) -> _TrainedDataset:
    """Read the raw dataset's ``dataset.json`` and find the trained folds' validation summaries."""
    dataset_json = json.loads((raw / "dataset.json").read_text())
    ending = dataset_json["file_ending"]
    diagnosis = dataset_json.get("lymphatlas", {}).get("diagnosis", {})
    summary_paths = rt.find_fold_summaries(trainer_dir)
    if not summary_paths:
        raise FileNotFoundError(f"{trainer_dir}: no fold_k/validation/summary.json; train and validate a fold first")
    return _TrainedDataset(config, raw, ending, diagnosis, summary_paths)


def _write_cv_tables(results: _Results, ds: _TrainedDataset) -> None:
    """Tables 2-3: the cross-validation table, and one per diagnosis for a model trained on both."""
    config = ds.config
    summaries = {k: rt.load_summary(p) for k, p in ds.summary_paths.items()}
    table = rt.cv_table(summaries, file_ending=ds.ending)
    md = rt.to_markdown(table, title=f"{config}: {len(summaries)}-fold cross-validation, foreground (nnU-Net summary.json)")
    results.put(f"{config}_cv.md", md)
    results.put(f"{config}_cv.csv", rt.to_csv(table))
    results.sections.append(md)
    groups = sorted({d for d in ds.diagnosis.values() if d})
    if len(groups) > 1:  # a model trained on both: report each diagnosis apart, as Tables 2 (HL) and 3 (NHL)
        for dx in groups:
            cases = {c for c, d in ds.diagnosis.items() if d == dx}
            sub = rt.cv_table(summaries, cases=cases, file_ending=ds.ending)
            md = rt.to_markdown(sub, title=f"{config} model, {dx} cases only")
            results.put(f"{config}_{dx}_cv.md", md)
            results.put(f"{config}_{dx}_cv.csv", rt.to_csv(sub))
            results.sections.append(md)


def _write_lesion_tables(results: _Results, ds: _TrainedDataset) -> None:
    """Lesion-level metrics of the validation folds: per case (csv), per fold and pooled (markdown)."""
    per_case: list[dict] = []
    fold_rows = []
    all_metrics = []
    for k in sorted(ds.summary_paths):
        metrics = _lesions_of_folder(ds.summary_paths[k].parent, ds.raw / "labelsTr", ds.ending)
        for case, m in metrics.items():
            per_case.append({"fold": k, "case": case, "diagnosis": ds.diagnosis.get(case, ""), **m.to_dict()})
        fold_rows.append((f"Fold {k}", lm.summarize(metrics.values())))
        all_metrics.extend(metrics.values())
    fold_rows.append(("All cases", lm.summarize(all_metrics)))
    md = lesion_table_markdown(fold_rows, title=f"{ds.config}: lesion-level metrics of the validation folds "
                                                 "(18-connected components, autoPET definitions)")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LESION_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(per_case)
    results.put(f"{ds.config}_lesions.csv", buf.getvalue())
    results.put(f"{ds.config}_lesions.md", md)
    results.sections.append(md)


def _write_test_table(results: _Results, ds: _TrainedDataset, test_predictions: Path) -> None:
    """The held-out test split: nnU-Net's metrics of the predictions, then their lesion-level metrics."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    summary_file = test_predictions / "summary.json"
    # nnU-Net's own evaluation, so the test row means exactly what the fold rows mean
    compute_metrics_on_folder(str(ds.raw / "labelsTs"), str(test_predictions), str(summary_file), SimpleITKIO(),
                              ds.ending, [1], num_processes=1)
    test_row = rt.fold_row(rt.load_summary(summary_file))
    test_table = rt.CVTable([("Test", test_row)])
    lesions = lm.summarize(_lesions_of_folder(test_predictions, ds.raw / "labelsTs", ds.ending).values())
    md = (rt.to_markdown(test_table, title=f"{ds.config}: held-out test split (ensemble of the trained folds)")
          + "\n" + lesion_table_markdown([("Test", lesions)], title=f"{ds.config}: test split, lesion level"))
    results.put(f"{ds.config}_test.md", md)
    results.sections.append(md)


def _plot_fold_curves(results: _Results, ds: _TrainedDataset) -> None:
    """The training curves of every fold whose final checkpoint is there."""
    from tools.nnunet_run import training_log

    for k in sorted(ds.summary_paths):
        ckpt = ds.summary_paths[k].parent.parent / "checkpoint_final.pth"
        if ckpt.is_file():
            png = plot_training_curves(training_log(ckpt), results.out_dir / f"{ds.config}_fold{k}_curves.png",
                                       title=f"{ds.config}, fold {k}")
            results.written.append(png)
            results.sections.append(f"![{ds.config} fold {k} training curves]({png.name})\n")


def write_results(
    out_dir: str | os.PathLike, config: str, *, raw_dataset_dir: str | os.PathLike, trainer_dir: str | os.PathLike,
    test_predictions: str | os.PathLike | None = None,
) -> list[Path]:
    """Write the tables, lesion metrics and curves of one trained dataset; returns the files written."""
    ds = _trained_dataset(config, Path(raw_dataset_dir), Path(trainer_dir))
    results = _Results(Path(out_dir))
    _write_cv_tables(results, ds)
    _write_lesion_tables(results, ds)
    if test_predictions is not None and (ds.raw / "labelsTs").is_dir():
        _write_test_table(results, ds, Path(test_predictions))
    _plot_fold_curves(results, ds)
    results.put(f"{config}_README.md", "\n".join(results.sections))
    return results.written


def write_index(out_dir: str | os.PathLike, configs: list[str], *, run_info: dict | None = None) -> Path:
    """``results/README.md``: the per-config pages one after the other, plus the run's settings."""
    out_dir = Path(out_dir)
    parts = ["# LymphAtlas nnU-Net baseline results", ""]
    if run_info:
        parts += ["```json", json.dumps(run_info, indent=2, sort_keys=True), "```", ""]
    for config in configs:
        page = out_dir / f"{config}_README.md"
        if page.is_file():
            parts += [f"## {config}", "", page.read_text()]
    path = out_dir / "README.md"
    write_atomic(path, "\n".join(parts))
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Tables 2-3, lesion metrics and curves of a trained nnU-Net dataset")
    p.add_argument("out", type=Path, help="results folder")
    p.add_argument("--config", required=True, help="label of this dataset in file names (all, hl, nhl)")
    p.add_argument("--raw", type=Path, required=True, help="the materialized nnU-Net raw dataset folder")
    p.add_argument("--trainer-dir", type=Path, required=True, help="nnUNet_results/<dataset>/<trainer>__<plans>__<cfg>")
    p.add_argument("--test-predictions", type=Path, default=None, help="predictions of imagesTs (with labelsTs)")
    args = p.parse_args(argv)
    for path in write_results(args.out, args.config, raw_dataset_dir=args.raw, trainer_dir=args.trainer_dir,
                              test_predictions=args.test_predictions):
        print(path)
    print(write_index(args.out, [args.config]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
