"""nnU-Net's own commands on a materialized release, as the `materialize` hint prints them.

A user runs ``lymphatlas materialize``, pastes the commands it prints (plan and preprocess, train,
predict), swapping the paper's 500-epoch trainer for the project's tiny CPU trainer and picking
fold 0, then builds Tables 2-3 with ``tools/report.py``. Every step is a subprocess in a folder
outside the checkout; outputs are checked against the fake cohort's ground truth.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = "nnUNetTrainer_LymphAtlasTiny"


def _run(cmd: str, cwd: Path, env: dict[str, str], timeout: int = 900) -> str:
    proc = subprocess.run(cmd, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _as_smoke_run(line: str) -> str:
    """A hint line as a CI user runs it: the tiny trainer on CPU, fold 0, one worker process."""
    line = line.split("#")[0].strip().replace("nnUNetTrainer_500epochs", TINY)
    if line.startswith("nnUNetv2_plan_and_preprocess"):
        line += " -np 1"
    if line.startswith(("nnUNetv2_train", "nnUNetv2_predict")):
        line += " -device cpu"
    if line.startswith("nnUNetv2_predict"):
        line = line.replace("-f 0 1 2 3 4", "-f 0") + " -npp 1 -nps 1"
    return line


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    from tests.support.releases import build_fake_release

    root = tmp_path_factory.mktemp("nnunet_cli")
    release = build_fake_release(root, n_patients=8, seed=9, shape_zyx=(20, 24, 24), name="lymphatlas")
    env = {**os.environ, "LYMPHATLAS_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "2",
           "nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "1"}
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
        env.pop(var, None)
    bindir = os.path.dirname(sys.executable)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    hint = _run("lymphatlas materialize lymphatlas --nnunet nnUNet_raw --include-test --test-labels --quiet", root, env)
    steps = [line.strip() for line in hint.splitlines()[hint.splitlines().index(
        next(line for line in hint.splitlines() if line.startswith("next,"))) + 1:]]
    assert [s.split()[0] for s in steps if s.startswith("nnUNetv2")] == [
        "nnUNetv2_plan_and_preprocess", "nnUNetv2_train", "nnUNetv2_predict"]
    for step in steps:
        if step.startswith("export "):
            var, _, value = step.removeprefix("export ").partition("=")
            env[var] = shlex.split(value)[0]
            continue
        _run(_as_smoke_run(step), root, env)
    dataset = root / "nnUNet_raw" / "Dataset501_LymphAtlas"
    trainer_dir = root / "nnUNet_results" / "Dataset501_LymphAtlas" / f"{TINY}__nnUNetPlans__3d_fullres"
    _run(f"{shlex.quote(sys.executable)} {shlex.quote(str(REPO / 'tools' / 'report.py'))} results --config all "
         f"--raw {dataset} --trainer-dir {trainer_dir} --test-predictions predictions", root, env)
    splits = json.loads((release.path / "splits.json").read_text())["cases"]
    return root, trainer_dir, release.truth, splits


@pytest.mark.slow
def test_training_through_the_cli_used_the_patient_grouped_folds(cli_run):
    root, trainer_dir, truth, splits = cli_run
    log = "".join(p.read_text() for p in (trainer_dir / "fold_0").glob("training_log_*.txt"))
    assert "Using splits from existing split file" in log and "Creating new 5-fold" not in log
    val = sorted(c for c, e in splits.items() if e["split"] == "train" and e["fold"] == 0)
    summary = json.loads((trainer_dir / "fold_0" / "validation" / "summary.json").read_text())
    cases = sorted(Path(e["prediction_file"]).name.removesuffix(".nii.gz") for e in summary["metric_per_case"])
    assert cases == val
    for entry in summary["metric_per_case"]:
        case = Path(entry["prediction_file"]).name.removesuffix(".nii.gz")
        pred = np.asanyarray(nib.load(entry["prediction_file"]).dataobj).transpose(2, 1, 0) > 0
        ref = truth[case].label > 0
        tp, fp, fn = int((pred & ref).sum()), int((pred & ~ref).sum()), int((~pred & ref).sum())
        assert (entry["metrics"]["1"]["TP"], entry["metrics"]["1"]["FP"], entry["metrics"]["1"]["FN"]) == (tp, fp, fn)


@pytest.mark.slow
def test_nnunetv2_predict_writes_the_test_split_on_the_ct_grid(cli_run):
    root, _, truth, splits = cli_run
    test_ids = sorted(c for c, e in splits.items() if e["split"] == "test")
    assert test_ids
    written = sorted(p.name.removesuffix(".nii.gz") for p in (root / "predictions").glob("*.nii.gz"))
    assert written == test_ids
    for case in test_ids:
        img = nib.load(root / "predictions" / f"{case}.nii.gz")
        assert img.shape[::-1] == truth[case].label.shape
        np.testing.assert_allclose(img.affine, truth[case].affine, atol=1e-4)


@pytest.mark.slow
def test_tables_from_the_cli_outputs(cli_run):
    root, trainer_dir, truth, splits = cli_run
    summary = json.loads((trainer_dir / "fold_0" / "validation" / "summary.json").read_text())
    rows = list(csv.DictReader((root / "results" / "all_cv.csv").open()))
    assert rows[0]["fold"] == "Fold 0"
    for metric in ("Dice", "FN", "FP", "TP"):
        assert float(rows[0][metric]) == pytest.approx(summary["foreground_mean"][metric])
    # the held-out test table, recomputed from nnUNetv2_predict's files and the generator's labels
    test_ids = sorted(c for c, e in splits.items() if e["split"] == "test")
    counts = []
    for case in test_ids:
        pred = np.asanyarray(nib.load(root / "predictions" / f"{case}.nii.gz").dataobj).transpose(2, 1, 0) > 0
        ref = truth[case].label > 0
        counts.append([(~pred & ref).sum(), (pred & ~ref).sum(), (pred & ref).sum(), ref.sum()])
    fn, fp, tp, n_ref = np.mean(counts, axis=0)
    row = next(line for line in (root / "results" / "all_test.md").read_text().splitlines() if line.startswith("| Test |"))
    cells = [float(v) for v in row.strip("|").split("|")[1:]]  # Dice IoU FN FP TP n_pred n_ref
    assert cells[2:5] == pytest.approx([fn, fp, tp], abs=0.01) and cells[6] == pytest.approx(n_ref, abs=0.01)
