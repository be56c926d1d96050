"""The report tool (Tables 2-3 layout) and the lesion-level metrics, against known values.

Ground truth here: the paper's own Tables 2-3 (fold rows -> printed Mean row), nnU-Net's own
evaluation (``compute_metrics_on_folder``) run on constructed masks, and hand-counted lesions.
"""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest

from tools import lesion_metrics as lm
from tools import report_tables as rt

# The paper's Tables 2 (HL) and 3 (NHL): Fold 0-4 rows and the printed Mean row.
PAPER = {
    "HL": (
        [
            (0.92680, 0.86647, 376.0, 202.11, 2937.22, 3139.33, 3313.22),
            (0.86459, 0.77393, 484.0, 157.11, 3386.11, 3543.22, 3870.11),
            (0.88970, 0.81010, 541.5, 411.25, 4166.25, 4577.50, 4707.75),
            (0.91597, 0.85095, 209.5, 225.75, 2634.00, 2859.75, 2843.50),
            (0.95014, 0.90646, 1152.5, 192.25, 9778.38, 9970.63, 10930.88),
        ],
        (0.90944, 0.84158, 552.70, 237.69, 4580.39, 4818.09, 5133.09),
    ),
    "NHL": (
        [
            (0.90943, 0.84392, 1447.86, 648.68, 9488.23, 10136.91, 10936.09),
            (0.91741, 0.85881, 928.48, 353.19, 10512.76, 10865.95, 11441.24),
            (0.94253, 0.89363, 1001.52, 229.33, 9892.10, 10121.43, 10893.62),
            (0.89886, 0.84325, 409.62, 2953.52, 10393.52, 13347.05, 10803.14),
            (0.85919, 0.79910, 875.24, 587.86, 9513.10, 10100.95, 10388.33),
        ],
        (0.90548, 0.84774, 932.54, 954.52, 9959.94, 10914.46, 10892.48),
    ),
}


def _summary_file(tmp_path, fold, values):
    fg = dict(zip(rt.METRICS, values))
    summary = {"foreground_mean": fg, "mean": {"1": fg}, "metric_per_case": []}
    p = tmp_path / f"fold_{fold}" / "validation" / "summary.json"
    p.parent.mkdir(parents=True)
    p.write_text(json.dumps(summary))
    return p


@pytest.mark.parametrize("config", ["HL", "NHL"])
def test_mean_row_reproduces_the_papers_tables(tmp_path, config):
    folds, printed_mean = PAPER[config]
    for k, values in enumerate(folds):
        _summary_file(tmp_path, k, values)
    paths = rt.find_fold_summaries(tmp_path)
    assert sorted(paths) == [0, 1, 2, 3, 4]
    table = rt.cv_table({k: rt.load_summary(p) for k, p in paths.items()})
    mean = table.row("Mean")
    for metric, expected in zip(rt.METRICS, printed_mean):
        # fold rows are printed rounded, so the mean may differ by half a unit of the last place
        tol = 0.6e-5 if metric in rt.RATIO_METRICS else 0.006
        assert mean[metric] == pytest.approx(expected, abs=tol), metric
    md = rt.to_markdown(table, title=config)
    assert "| Fold | Dice | IoU | FN | FP | TP | n_pred | n_ref |" in md
    # the markdown prints the paper's precision: its Mean row text appears as printed (HL Dice 0.90944)
    assert f"**{printed_mean[0]:.5f}**" in md
    rows = rt.to_csv(table).splitlines()
    assert rows[0] == "fold,Dice,IoU,FN,FP,TP,n_pred,n_ref"
    assert [r.split(",")[0] for r in rows[1:]] == ["Fold 0", "Fold 1", "Fold 2", "Fold 3", "Fold 4", "Mean", "All cases"]


def _save_label(path, array, spacing=(2.0, 2.0, 3.0)):
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    img = nib.Nifti1Image(array.astype(np.uint8).transpose(2, 1, 0), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, str(path))


def _cube(shape, lo, hi):
    a = np.zeros(shape, np.uint8)
    a[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1
    return a


@pytest.fixture(scope="module")
def evaluated_folds(tmp_path_factory):
    """Two folds of constructed cases evaluated by nnU-Net's own compute_metrics_on_folder."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    root = tmp_path_factory.mktemp("eval")
    shape = (8, 10, 10)
    cases = {
        # case: (fold, reference, prediction); hand-computed TP / FP / FN in the comments
        "HL-a": (0, _cube(shape, (1, 1, 1), (3, 3, 3)), _cube(shape, (1, 1, 1), (3, 3, 2))),  # TP 4, FN 4, FP 0
        "NHL-b": (0, _cube(shape, (2, 2, 2), (5, 5, 5)), _cube(shape, (2, 2, 2), (5, 5, 6))),  # TP 27, FP 9, FN 0
        "HL-c": (0, np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)),  # nothing at all: Dice NaN
        "HL-d": (1, _cube(shape, (0, 0, 0), (2, 2, 2)), np.zeros(shape, np.uint8)),  # TP 0, FN 8
        "NHL-e": (1, np.zeros(shape, np.uint8), _cube(shape, (4, 4, 4), (5, 5, 6))),  # FP 2
    }
    dirs = {}
    for name, (fold, ref, pred) in cases.items():
        for kind, arr in (("ref", ref), ("pred", pred)):
            for scope in (f"fold{fold}", "merged", f"merged_{name.split('-')[0]}"):
                d = root / scope / kind
                d.mkdir(parents=True, exist_ok=True)
                dirs[scope] = d.parent
                _save_label(d / f"{name}.nii.gz", arr)
    summaries = {}
    for scope, d in dirs.items():
        out = d / "summary.json"
        compute_metrics_on_folder(str(d / "ref"), str(d / "pred"), str(out), SimpleITKIO(), ".nii.gz", [1], num_processes=1)
        summaries[scope] = rt.load_summary(out)
    return summaries


def test_fold_rows_against_nnunet_and_hand_counts(evaluated_folds):
    s = evaluated_folds
    table = rt.cv_table({0: s["fold0"], 1: s["fold1"]})
    f0, f1 = table.row("Fold 0"), table.row("Fold 1")
    # hand-computed: fold 0 Dice = nanmean(2*4/12, 2*27/63, NaN); FP = mean(0, 9, 0)
    assert f0["Dice"] == pytest.approx((8 / 12 + 54 / 63) / 2)
    assert f0["IoU"] == pytest.approx((4 / 8 + 27 / 36) / 2)
    assert f0["FP"] == pytest.approx(3.0) and f0["FN"] == pytest.approx(4 / 3) and f0["TP"] == pytest.approx(31 / 3)
    assert f1["Dice"] == 0.0 and f1["FN"] == 4.0 and f1["FP"] == 1.0
    assert table.row("Mean")["Dice"] == pytest.approx((f0["Dice"] + f1["Dice"]) / 2)
    # the pooled row is what nnU-Net's evaluation gives on the merged cross-validation folder
    for m in rt.METRICS:
        assert table.row("All cases")[m] == pytest.approx(float(s["merged"]["foreground_mean"][m]), nan_ok=True), m


def test_per_diagnosis_subset_matches_nnunet_on_that_subset(evaluated_folds):
    s = evaluated_folds
    hl = {"HL-a", "HL-c", "HL-d"}
    table = rt.cv_table({0: s["fold0"], 1: s["fold1"]}, cases=hl)
    for m in rt.METRICS:
        assert table.row("All cases")[m] == pytest.approx(float(s["merged_HL"]["foreground_mean"][m])), m
    # fold 0 restricted to HL: HL-a (Dice 2/3) and HL-c (NaN) -> 2/3
    assert table.row("Fold 0")["Dice"] == pytest.approx(2 / 3)


def test_load_summary_names_the_file_when_broken(tmp_path):
    p = tmp_path / "summary.json"
    p.write_text('{"mean": {}}')
    with pytest.raises(ValueError, match="summary.json"):
        rt.load_summary(p)


# ---------------------------------------------------------------- lesion-level metrics

VOXEL_ML = 2.0 * 2.0 * 3.0 / 1000.0


def _constructed():
    shape = (10, 12, 12)
    ref = np.zeros(shape, np.uint8)
    ref[1:3, 1:3, 1:3] = 1  # lesion A: 8 voxels
    ref[5:8, 5:8, 5:8] = 1  # lesion B: 27 voxels
    ref[0, 11, 0] = 1  # lesion C: 1 voxel
    pred = np.zeros(shape, np.uint8)
    pred[2, 2, 2:4] = 1  # touches A (1 voxel inside, 1 outside): A detected, not a false positive
    pred[8:9, 0:2, 9:11] = 1  # 4-voxel blob far from any lesion: false positive
    pred[9, 2, 11] = 1  # meets the blob only at a corner: separate under 18-connectivity
    return ref, pred


def test_lesion_metrics_hand_counted():
    ref, pred = _constructed()
    m = lm.lesion_metrics(ref, pred, voxel_volume_ml=VOXEL_ML, connectivity=18)  # autoPET's own choice
    assert m.n_ref_lesions == 3 and m.n_detected == 1
    assert m.sensitivity == pytest.approx(1 / 3)
    assert m.fn_volume_ml == pytest.approx((27 + 1) * VOXEL_ML)  # B and C missed
    assert m.fp_volume_ml == pytest.approx((4 + 1) * VOXEL_ML)
    assert m.n_pred_components == 3 and m.n_fp_components == 2
    m26 = lm.lesion_metrics(ref, pred, voxel_volume_ml=VOXEL_ML, connectivity=26)
    assert m26.n_pred_components == 2 and m26.n_fp_components == 1
    assert m26.fp_volume_ml == pytest.approx(5 * VOXEL_ML)
    assert lm.lesion_metrics(ref, pred, voxel_volume_ml=VOXEL_ML) == m26  # the release's labelling: 26-connected


def test_connectivity_decides_what_one_lesion_is():
    ref = np.zeros((4, 4, 4), np.uint8)
    ref[1, 1, 1] = ref[1, 2, 2] = 1  # share an edge only: one lesion for 18, two for 6
    pred = np.zeros_like(ref)
    pred[1, 1, 1] = 1
    assert lm.lesion_metrics(ref, pred, voxel_volume_ml=1.0, connectivity=18).sensitivity == 1.0
    six = lm.lesion_metrics(ref, pred, voxel_volume_ml=1.0, connectivity=6)
    assert (six.n_ref_lesions, six.n_detected, six.fn_volume_ml) == (2, 1, 1.0)
    with pytest.raises(ValueError, match="connectivity"):
        lm.lesion_metrics(ref, pred, voxel_volume_ml=1.0, connectivity=8)


def test_one_prediction_touching_two_lesions_detects_both():
    ref = np.zeros((3, 3, 9), np.uint8)
    ref[1, 1, 0:2] = ref[1, 1, 6:8] = 1
    pred = np.zeros_like(ref)
    pred[1, 1, 1:7] = 1
    m = lm.lesion_metrics(ref, pred, voxel_volume_ml=1.0)
    assert (m.n_detected, m.fp_volume_ml, m.fn_volume_ml) == (2, 0.0, 0.0)


def test_empty_cases_and_summary():
    empty = np.zeros((3, 3, 3), np.uint8)
    m = lm.lesion_metrics(empty, empty, voxel_volume_ml=1.0)
    assert math.isnan(m.sensitivity) and m.fp_volume_ml == 0.0
    ref, pred = _constructed()
    s = lm.summarize([lm.lesion_metrics(ref, pred, voxel_volume_ml=VOXEL_ML), m])
    assert s["sensitivity"] == pytest.approx(1 / 3)  # pooled over lesions; the empty case adds none
    assert s["fp_volume_ml"] == pytest.approx(5 * VOXEL_ML / 2)
    assert s["n_cases"] == 2 and s["n_ref_lesions"] == 3


def test_lesion_metrics_from_files_reads_voxel_volume(tmp_path):
    ref, pred = _constructed()
    _save_label(tmp_path / "ref.nii.gz", ref, spacing=(2.0, 2.0, 3.0))
    _save_label(tmp_path / "pred.nii.gz", pred, spacing=(2.0, 2.0, 3.0))
    m = lm.lesion_metrics_files(tmp_path / "ref.nii.gz", tmp_path / "pred.nii.gz")
    assert m.fn_volume_ml == pytest.approx(28 * VOXEL_ML)
    _save_label(tmp_path / "other.nii.gz", pred, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="other.nii.gz"):
        lm.lesion_metrics_files(tmp_path / "ref.nii.gz", tmp_path / "other.nii.gz")
