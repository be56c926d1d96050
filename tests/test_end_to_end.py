"""The whole chain through the public entry points, checked against the generator's truth.

DICOM source (synthetic, known voxels) -> `python -m builder convert` -> `release` -> `publish`
(local mirror) -> plain `datasets.load_dataset` -> `load_lymphatlas` (torch, fold subsets) ->
`lymphatlas materialize --nnunet`. Every stage's output is compared with what the generator
wrote (CT in HU, lesion masks, patients), never with an earlier output of the project.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from builder.__main__ import main as builder_main
from builder.synthetic import generate_cohort, load_truth
from lymphatlas_ds.cli import main as lymphatlas_main

N_EXAMS = 6


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("e2e")
    source, work, truth = root / "source", root / "work", root / "truth"
    generate_cohort(source, n_exams=N_EXAMS, seed=23, truth_dir=truth)
    assert builder_main(["convert", str(source), str(work), "--workers", "2", "--quiet", "--no-report"]) == 0
    release = root / "rel" / "lymphatlas"
    assert builder_main(["release", str(work), str(release), "--version", "1.0.0"]) == 0
    mirror = root / "mirror"
    assert builder_main(["publish", str(release), "--mirror", str(mirror)]) == 0
    with open(work / "private" / "id_map.csv", newline="") as f:
        id_map = {row["case_id"]: row for row in csv.DictReader(f)}
    truths = {row["exam_id"]: load_truth(truth, row["exam_id"]) for row in id_map.values()}
    return {"root": root, "work": work, "truth": truth, "release": release, "mirror": mirror,
            "id_map": id_map, "truths": truths}


def _truth_arrays(chain: dict, case_id: str) -> tuple[np.ndarray, np.ndarray]:
    exam_id = chain["id_map"][case_id]["exam_id"]
    folder = chain["truth"] / exam_id
    return np.load(folder / "ct_hu.npy"), np.load(folder / "mask.npy")


def test_every_generated_exam_becomes_a_case(chain):
    assert len(chain["id_map"]) == N_EXAMS
    assert sorted(p.name for p in (chain["work"] / "cases").iterdir()) == sorted(chain["id_map"])


def test_plain_datasets_returns_the_source_voxels(chain):
    datasets = pytest.importorskip("datasets")
    seen = set()
    splits = json.loads((chain["release"] / "splits.json").read_text())["cases"]
    for split in sorted({c["split"] for c in splits.values()}):
        ds = datasets.load_dataset(str(chain["release"]), "all", split=split)
        for row in ds:
            ct_truth, mask_truth = _truth_arrays(chain, row["case_id"])
            # datasets decodes with nibabel: arrays are (x, y, z); the truth is (z, y, x).
            np.testing.assert_array_equal(np.asarray(row["ct"].dataobj).transpose(2, 1, 0), ct_truth)
            np.testing.assert_array_equal(np.asarray(row["label"].dataobj).transpose(2, 1, 0), mask_truth)
            seen.add(row["case_id"])
    assert seen == set(chain["id_map"])


def test_torch_folds_are_patient_grouped_and_carry_the_source_voxels(chain):
    from lymphatlas_ds import load_lymphatlas

    patient = {c: row["patient_id"] for c, row in chain["id_map"].items()}
    train_all = load_lymphatlas(chain["mirror"], version="1.0.0", split="train", cache_dir=chain["root"] / "cache")
    all_ids = {train_all[i]["case_id"] for i in range(len(train_all))}
    for k in range(5):
        tr = load_lymphatlas(chain["mirror"], version="1.0.0", split="train", fold=k, subset="train",
                             cache_dir=chain["root"] / "cache")
        va = load_lymphatlas(chain["mirror"], version="1.0.0", split="train", fold=k, subset="val",
                             cache_dir=chain["root"] / "cache")
        tr_ids = {tr[i]["case_id"] for i in range(len(tr))}
        va_ids = {va[i]["case_id"] for i in range(len(va))}
        assert tr_ids | va_ids == all_ids and not tr_ids & va_ids
        assert not {patient[c] for c in tr_ids} & {patient[c] for c in va_ids}
    item = train_all[0]
    ct_truth, mask_truth = _truth_arrays(chain, item["case_id"])
    assert tuple(item["image"].shape) == (2, *ct_truth.shape)
    np.testing.assert_array_equal(item["image"][0].numpy(), ct_truth.astype(np.float32))
    np.testing.assert_array_equal(item["label"][0].numpy(), mask_truth)
    assert float(item["image"][1].min()) >= 0.0  # SUV, clamped at 0 outside the PET field of view


def test_nnunet_raw_dataset_has_source_voxels_and_grouped_splits(chain, monkeypatch):
    raw = chain["root"] / "raw"
    rc = lymphatlas_main(["materialize", str(chain["mirror"]), "--nnunet", str(raw),
                          "--version", "1.0.0", "--dataset-id", "777", "--quiet"])
    assert rc == 0
    (ds_dir,) = raw.glob("Dataset777_*")
    dataset_json = json.loads((ds_dir / "dataset.json").read_text())
    assert dataset_json["channel_names"] == {"0": "CT", "1": "PET"}
    assert dataset_json["labels"] == {"background": 0, "lesion": 1}
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (ds_dir / "imagesTr").glob("*_0000.nii.gz"))
    assert dataset_json["numTraining"] == len(cases) > 0
    for case_id in cases:
        ct_truth, mask_truth = _truth_arrays(chain, case_id)
        ct = sitk.GetArrayFromImage(sitk.ReadImage(str(ds_dir / "imagesTr" / f"{case_id}_0000.nii.gz")))
        lab = sitk.GetArrayFromImage(sitk.ReadImage(str(ds_dir / "labelsTr" / f"{case_id}.nii.gz")))
        np.testing.assert_array_equal(ct, ct_truth)
        np.testing.assert_array_equal(lab, mask_truth)
    patient = {c: row["patient_id"] for c, row in chain["id_map"].items()}
    splits = json.loads((ds_dir / "splits_final.json").read_text())
    assert len(splits) == 5
    for fold in splits:
        assert sorted(fold["train"] + fold["val"]) == cases
        assert not {patient[c] for c in fold["train"]} & {patient[c] for c in fold["val"]}
