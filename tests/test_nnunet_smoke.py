"""CPU smoke run of the baseline: materialize -> plan/preprocess -> train (tiny) -> predict -> report.

The slow test runs ``tools/train_baseline.py`` as a user would (minutes on 2 cores) and
checks its outputs against the fake cohort's truth and against nnU-Net's own logs and metrics.
The fast tests cover the trainer lookup that makes prediction with a project trainer possible.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from tools.trainers import nnUNetTrainer_LymphAtlasTiny, resolve_trainer

REPO = Path(__file__).resolve().parents[1]


def test_resolve_trainer_names():
    assert resolve_trainer("tiny") is nnUNetTrainer_LymphAtlasTiny
    assert resolve_trainer("paper").__name__ == "nnUNetTrainer_500epochs"
    assert resolve_trainer("tools.trainers:nnUNetTrainer_LymphAtlasTiny") is nnUNetTrainer_LymphAtlasTiny
    with pytest.raises(ValueError, match="module:Class"):
        resolve_trainer("nnUNetTrainer_NoSuchThing")


def test_nnunets_own_lookup_finds_the_project_trainers(monkeypatch):
    """nnUNetv2_train / nnUNetv2_predict look trainers up with this function; without the module that
    `python -m lymphatlas_ds.nnunet_trainers` writes, the walk ends in "No module named 'timm'" here."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from lymphatlas_ds import nnunet_trainers

    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    nnunet_trainers.install()  # idempotent; scripts/setup.sh has done it
    assert nnunet_trainers.is_installed()
    assert recursive_find_trainer_class_by_name("nnUNetTrainer_LymphAtlasTiny") is nnUNetTrainer_LymphAtlasTiny
    assert recursive_find_trainer_class_by_name("nnUNetTrainer_500epochs") is resolve_trainer("paper")


def test_nnunet_train_finds_its_stock_variants_in_this_environment(tmp_path):
    """`nnUNetv2_train ... -tr nnUNetTrainer_5epochs` as typed: the trainer lookup walks nnU-Net's trainer folder,
    whose `primus` module needs timm (not importable beside the CPU torch build). The lookup must get past it
    and fail only later, on the dataset id that does not exist; before, it ended in "No module named 'timm'"."""
    from lymphatlas_ds import nnunet_trainers

    nnunet_trainers.install()  # idempotent; scripts/setup.sh has done it
    env = {**os.environ, "nnUNet_raw": str(tmp_path), "nnUNet_preprocessed": str(tmp_path),
           "nnUNet_results": str(tmp_path)}
    env.pop("nnUNet_extTrainer", None)
    train = Path(sys.executable).parent / "nnUNetv2_train"
    proc = subprocess.run([str(train), "999", "3d_fullres", "0", "-tr", "nnUNetTrainer_5epochs", "-device", "cpu"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "timm" not in proc.stderr, proc.stderr[-3000:]
    assert "Could not find a dataset with the ID 999" in proc.stderr, proc.stderr[-3000:]
    # the class nnU-Net found is nnU-Net's own, from its variants folder (a dry lookup, as nnUNetv2_predict does)
    code = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
            "for name in ('nnUNetTrainer_5epochs', 'nnUNetTrainerDiceCELoss_noSmooth', 'nnUNetTrainer_LymphAtlasTiny'):\n"
            "    print(name, find(name).__module__)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = dict(line.split() for line in proc.stdout.splitlines())
    assert found == {"nnUNetTrainer_5epochs": "nnunetv2.training.nnUNetTrainer.variants.training_length.nnUNetTrainer_Xepochs",
                     "nnUNetTrainerDiceCELoss_noSmooth": "nnunetv2.training.nnUNetTrainer.variants.loss.nnUNetTrainerDiceLoss",
                     "nnUNetTrainer_LymphAtlasTiny": "lymphatlas_ds.nnunet_trainers"}


def test_the_stock_lookup_raises_what_is_not_a_missing_dependency(monkeypatch):
    from lymphatlas_ds import nnunet_trainers

    with pytest.raises(AttributeError, match="no nnU-Net trainer 'nnUNetTrainer_NoSuchThing'.*primus.*timm"):
        nnunet_trainers.stock_trainer("nnUNetTrainer_NoSuchThing")
    with pytest.raises(AttributeError):
        nnunet_trainers.stock_trainer("__path__")


def test_the_installed_module_stays_out_of_the_way_without_the_package():
    from lymphatlas_ds.nnunet_trainers import SHIM_TEXT

    code = f"import sys; sys.modules['lymphatlas_ds'] = None\nexec({SHIM_TEXT!r})\nprint('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def _demo_plans() -> dict:
    """The 3d_fullres plans nnU-Net 2.8 made for the demo cohort (scripts/demo.sh: 7 training cases of
    ~171x128x128 voxels at 6 x 3.9 x 3.9 mm): patch 160x128x112, batch 2, a 6-stage PlainConvUNet."""
    conv = "torch.nn.modules.conv.Conv3d"
    arch = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320], "conv_op": conv,
                            "kernel_sizes": [[3, 3, 3]] * 6,
                            "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 1]],
                            "n_conv_per_stage": [2] * 6, "n_conv_per_stage_decoder": [2] * 5, "conv_bias": True,
                            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    config = {"data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
              "batch_size": 2, "patch_size": [160, 128, 112], "median_image_size_in_voxels": [171.0, 128.0, 128.0],
              "spacing": [6.0, 3.90625, 3.90625], "normalization_schemes": ["CTNormalization", "ZScoreNormalization"],
              "use_mask_for_norm": [False, False], "architecture": arch, "batch_dice": False}
    return {"dataset_name": "Dataset501_LymphAtlas", "plans_name": "nnUNetPlans",
            "original_median_spacing_after_transp": [6.0, 3.90625, 3.90625],
            "original_median_shape_after_transp": [171, 128, 128], "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "configurations": {"3d_fullres": config}, "experiment_planner_used": "ExperimentPlanner",
            "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": {}}


def test_the_tiny_trainer_is_small_where_nnunet_reads_its_model(tmp_path, monkeypatch):
    """Batch 1, a 64^3 patch and 4 of the 6 planned stages, in the trainer and in the plans it saves for
    nnUNetv2_predict; nnU-Net's own network builder makes a net that takes the patch."""
    import torch

    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, str(tmp_path / var))
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = _demo_plans()
    dataset_json = {"channel_names": {"0": "CT", "1": "PET"}, "labels": {"background": 0, "lesion": 1},
                    "numTraining": 7, "file_ending": ".nii.gz"}
    trainer = nnUNetTrainer_LymphAtlasTiny({**plans, "continue_training": False}, "3d_fullres", 0, dataset_json,
                                           device=torch.device("cpu"))
    assert plans["configurations"]["3d_fullres"]["patch_size"] == [160, 128, 112]  # the caller's plans untouched
    saved = PlansManager(trainer.plans_manager.plans).get_configuration("3d_fullres")  # what plans.json gets
    for config in (trainer.configuration_manager, saved):
        assert config.patch_size == [64, 64, 64] and config.batch_size == 1
        assert config.network_arch_init_kwargs["n_stages"] == 4
        assert config.network_arch_init_kwargs["features_per_stage"] == [32, 64, 128, 256]
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch) == (2, 3, 1)
    net = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 2, 2,
                                             enable_deep_supervision=True)
    full = trainer.build_network_architecture(PlansManager(plans), PlansManager(plans).get_configuration("3d_fullres"),
                                              2, 2, enable_deep_supervision=True)
    with torch.no_grad():
        outputs = net(torch.zeros(1, 2, 64, 64, 64))
    assert [tuple(o.shape) for o in outputs] == [(1, 2, 64, 64, 64), (1, 2, 32, 32, 32), (1, 2, 16, 16, 16)]
    n_tiny, n_full = (sum(p.numel() for p in m.parameters()) for m in (net, full))
    assert n_tiny < 0.2 * n_full


def test_tiny_patch_edges_are_multiples_of_the_kept_strides():
    from lymphatlas_ds.nnunet_trainers import tiny_configuration

    config = _demo_plans()["configurations"]["3d_fullres"]
    config["patch_size"] = [40, 128, 20]  # below the cap on two axes: rounded down to a multiple of 2^3 = 8
    config["architecture"]["arch_kwargs"]["strides"][1] = [2, 1, 2]  # the first axis is halved only twice
    tiny = tiny_configuration(config)
    assert tiny["patch_size"] == [40, 64, 16]
    three = tiny_configuration(_demo_plans()["configurations"]["3d_fullres"], stages=3)
    assert three["architecture"]["arch_kwargs"]["n_conv_per_stage_decoder"] == [2, 2]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from tests.support.releases import build_fake_release

    root = tmp_path_factory.mktemp("smoke")
    release = build_fake_release(root, n_patients=12, seed=5, shape_zyx=(24, 32, 32), name="lymphatlas")
    env = {**os.environ, "LYMPHATLAS_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "2"}
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env.pop(var, None)  # the script points them into --work itself
    cmd = [sys.executable, str(REPO / "tools" / "train_baseline.py"), "--source", str(root / "lymphatlas"),
           "--work", str(root / "nn"), "--configs", "all", "--folds", "0", "--trainer", "tiny", "--device", "cpu",
           "--np", "1", "--da-workers", "1", "--quiet"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200, cwd=root)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    splits = json.loads((root / "lymphatlas" / "splits.json").read_text())["cases"]
    return root, release.truth, splits


@pytest.mark.slow
def test_training_used_the_patient_grouped_split(smoke_run):
    root, truth, splits = smoke_run
    fold_dir = root / "nn" / "nnUNet_results" / "Dataset501_LymphAtlas" / \
        "nnUNetTrainer_LymphAtlasTiny__nnUNetPlans__3d_fullres" / "fold_0"
    log = "".join(p.read_text() for p in fold_dir.glob("training_log_*.txt"))
    pre_splits = root / "nn" / "nnUNet_preprocessed" / "Dataset501_LymphAtlas" / "splits_final.json"
    assert f"Using splits from existing split file: {pre_splits}" in log
    assert "Creating new 5-fold cross-validation split" not in log
    val = sorted(c for c, e in splits.items() if e["split"] == "train" and e["fold"] == 0)
    train = sorted(c for c, e in splits.items() if e["split"] == "train" and e["fold"] != 0)
    assert f"This split has {len(train)} training and {len(val)} validation cases" in log
    predicted = sorted(p.name.removesuffix(".nii.gz") for p in (fold_dir / "validation").glob("*.nii.gz"))
    assert predicted == val
    assert not {truth[c].subject_id for c in val} & {truth[c].subject_id for c in train}


@pytest.mark.slow
def test_summary_and_tables_agree_with_the_voxels(smoke_run):
    root, truth, _ = smoke_run
    fold_dir = next((root / "nn" / "nnUNet_results").glob("*/*/fold_0"))
    summary = json.loads((fold_dir / "validation" / "summary.json").read_text())
    for entry in summary["metric_per_case"]:
        case = Path(entry["prediction_file"]).name.removesuffix(".nii.gz")
        pred = np.asanyarray(nib.load(entry["prediction_file"]).dataobj).transpose(2, 1, 0) > 0
        ref = truth[case].label > 0  # the generator's label, not the materialized copy
        assert pred.shape == ref.shape  # exported back on the CT grid
        tp, fp, fn = int((pred & ref).sum()), int((pred & ~ref).sum()), int((~pred & ref).sum())
        assert (entry["metrics"]["1"]["TP"], entry["metrics"]["1"]["FP"], entry["metrics"]["1"]["FN"]) == (tp, fp, fn)
    results = root / "nn" / "results"
    rows = list(csv.DictReader((results / "all_cv.csv").open()))
    assert [r["fold"] for r in rows] == ["Fold 0", "Mean", "All cases"]
    for m in ("Dice", "IoU", "FN", "FP", "TP", "n_pred", "n_ref"):
        assert float(rows[0][m]) == pytest.approx(summary["foreground_mean"][m])
    assert (results / "all_HL_cv.md").is_file() and (results / "all_NHL_cv.md").is_file()
    # lesion counts per case against the generator's masks (18-connected components)
    structure = ndimage.generate_binary_structure(3, 2)
    for row in csv.DictReader((results / "all_lesions.csv").open()):
        n_true = ndimage.label(truth[row["case"]].label, structure=structure)[1]
        assert int(row["n_ref_lesions"]) == n_true
        assert 0 <= int(row["n_detected"]) <= n_true
        assert row["diagnosis"] == truth[row["case"]].diagnosis
    png = results / "all_fold0_curves.png"
    assert png.stat().st_size > 10_000
    run = json.loads((results / "run.json").read_text())
    assert run["trainer"] == "nnUNetTrainer_LymphAtlasTiny" and run["device"] == "cpu"


@pytest.mark.slow
def test_test_split_predicted_on_the_ct_grid(smoke_run):
    root, truth, splits = smoke_run
    test_ids = sorted(c for c, e in splits.items() if e["split"] == "test")
    pred_dir = root / "nn" / "predictions" / "Dataset501_LymphAtlas" / "imagesTs"
    assert sorted(p.name.removesuffix(".nii.gz") for p in pred_dir.glob("*.nii.gz")) == test_ids
    for case in test_ids:
        img = nib.load(str(pred_dir / f"{case}.nii.gz"))
        assert img.shape[::-1] == truth[case].label.shape
        np.testing.assert_allclose(img.affine, truth[case].affine, atol=1e-4)
    assert "held-out test split" in (root / "nn" / "results" / "all_test.md").read_text()
