"""`lymphatlas materialize --nnunet`: the nnU-Net v2 raw dataset written from a real release.

Ground truth: the arrays that lymphatlas_synth/fake_work.py wrote (read back with nibabel and with
nnU-Net's own SimpleITK reader), the subjects that it assigned, and nnU-Net itself (its
normalization lookup, its integrity check and planning in the slow test).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from lymphatlas_ds import cli
from lymphatlas_ds.errors import SchemaError
from lymphatlas_ds.nnunet import MaterializeError, materialize_nnunet, nnunet_splits
from lymphatlas_ds.reader import Release
from tests.support.disk import small_tmpfs
from tests.support.releases import build_fake_release

SHAPE = (24, 32, 32)


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    release = build_fake_release(root, n_patients=12, seed=3, shape_zyx=SHAPE, name="lymphatlas")
    return release.path, release.truth


@pytest.fixture
def release(release_dir):
    return Release(release_dir[0], remember=False)


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asanyarray(img.dataobj).transpose(2, 1, 0), img.affine


def test_layout_voxels_and_dataset_json(tmp_path, release, release_dir):
    _, truth = release_dir
    result = materialize_nnunet(release, tmp_path / "raw", dataset_id=501, include_test=True, test_labels=True,
                                preprocessed_dir=tmp_path / "pre", workers=2)
    ds = tmp_path / "raw" / "Dataset501_LymphAtlas"
    assert result.dataset_dir == ds
    split_of = {c: e["split"] for c, e in release.splits["cases"].items()}
    train = sorted(c for c, s in split_of.items() if s == "train")
    test = sorted(c for c, s in split_of.items() if s == "test")
    assert train and test and len(train) + len(test) == len(truth)
    assert sorted(p.name for p in (ds / "labelsTr").iterdir()) == [f"{c}.nii.gz" for c in train]
    assert sorted(p.name for p in (ds / "imagesTr").iterdir()) == sorted(
        f"{c}_{k:04d}.nii.gz" for c in train for k in (0, 1))
    assert sorted(p.name for p in (ds / "imagesTs").iterdir()) == sorted(
        f"{c}_{k:04d}.nii.gz" for c in test for k in (0, 1))
    assert sorted(p.name for p in (ds / "labelsTs").iterdir()) == [f"{c}.nii.gz" for c in test]
    for case_id in (train[0], test[-1]):
        fake = truth[case_id]
        images, labels = ("imagesTr", "labelsTr") if case_id in train else ("imagesTs", "labelsTs")
        ct, affine = _read(ds / images / f"{case_id}_0000.nii.gz")
        pet, _ = _read(ds / images / f"{case_id}_0001.nii.gz")
        label, _ = _read(ds / labels / f"{case_id}.nii.gz")
        assert ct.dtype == np.int16 and pet.dtype == np.float32 and label.dtype == np.uint8
        np.testing.assert_array_equal(ct, fake.ct)  # _0000 is CT
        np.testing.assert_array_equal(pet, fake.pet)  # _0001 is PET
        np.testing.assert_array_equal(label, fake.label)
        np.testing.assert_allclose(affine, fake.affine)
    # nnU-Net's own reader sees the same voxels, channel order and spacing (z, y, x)
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    data, props = SimpleITKIO().read_images([str(ds / "imagesTr" / f"{train[0]}_{k:04d}.nii.gz") for k in (0, 1)])
    np.testing.assert_array_equal(data[0], truth[train[0]].ct)
    np.testing.assert_allclose(data[1], truth[train[0]].pet)
    assert list(props["spacing"]) == [3.0, 2.0, 2.0]
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT", "1": "PET"}
    assert meta["labels"] == {"background": 0, "lesion": 1}
    assert meta["numTraining"] == len(train) and meta["file_ending"] == ".nii.gz" and meta["name"] == "LymphAtlas"
    assert meta["release"] == "1.0.0" and "LymphAtlas" in meta["citation"]
    assert {c: d for c, d in meta["lymphatlas"]["diagnosis"].items()} == {c: truth[c].diagnosis for c in truth}
    assert result.n_training == len(train) and result.n_test == len(test)
    assert result.files_written == 3 * len(truth) and result.throughput_mb_s > 0


def test_splits_are_patient_grouped_and_follow_the_release(tmp_path, release, release_dir):
    _, truth = release_dir
    materialize_nnunet(release, tmp_path / "raw", dataset_id=502, config="nhl", preprocessed_dir=tmp_path / "pre")
    name = "Dataset502_LymphAtlasNHL"
    folds = json.loads((tmp_path / "raw" / name / "splits_final.json").read_text())
    assert json.loads((tmp_path / "pre" / name / "splits_final.json").read_text()) == folds
    nhl_train = {c for c, e in release.splits["cases"].items() if e["split"] == "train" and e["diagnosis"] == "NHL"}
    assert len(folds) == 5
    all_val = [c for f in folds for c in f["val"]]
    assert sorted(all_val) == sorted(nhl_train)  # every training case validated exactly once
    for k, fold in enumerate(folds):
        assert set(fold["train"]) | set(fold["val"]) == nhl_train
        # the subjects come from the generator's truth, not from the release under test
        train_subjects = {truth[c].subject_id for c in fold["train"]}
        assert not any(truth[c].subject_id in train_subjects for c in fold["val"]), f"fold {k} leaks a patient"
        assert all(release.splits["cases"][c]["fold"] == k for c in fold["val"])
    # the fake cohort has patients with two exams, so the grouping is actually exercised
    assert any(sum(truth[c].subject_id == truth[d].subject_id for d in nhl_train) == 2 for c in nhl_train)


def test_leaking_splits_are_refused():
    doc = {"n_folds": 2, "cases": {
        "a1": {"subject_id": "s1", "split": "train", "fold": 0},
        "a2": {"subject_id": "s1", "split": "train", "fold": 1},  # same patient, other fold
        "b": {"subject_id": "s2", "split": "train", "fold": 1},
    }}
    with pytest.raises(SchemaError, match="share a subject"):
        nnunet_splits(doc, ["a1", "a2", "b"])
    with pytest.raises(SchemaError, match="c9"):
        nnunet_splits(doc, ["a1", "c9"])


def test_rerun_is_idempotent_and_a_different_dataset_is_refused(tmp_path, release):
    raw = tmp_path / "raw"
    first = materialize_nnunet(release, raw, dataset_id=503)
    files = sorted(p for p in raw.rglob("*") if p.is_file())
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    again = materialize_nnunet(release, raw, dataset_id=503)
    assert again.files_written == 0 and again.files_skipped == first.files_written
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == before
    # same id, other name: nnU-Net would not know which one -503 means
    with pytest.raises(MaterializeError, match="Dataset503_LymphAtlas"):
        materialize_nnunet(release, raw, dataset_id=503, config="hl")
    # same folder, other content (the HL subset under the same name)
    with pytest.raises(MaterializeError, match="config"):
        materialize_nnunet(release, raw, dataset_id=503, config="hl", name="LymphAtlas")
    replaced = materialize_nnunet(release, raw, dataset_id=503, config="hl", name="LymphAtlas", force=True)
    hl_train = {c for c, e in release.splits["cases"].items() if e["split"] == "train" and e["diagnosis"] == "HL"}
    labels = {p.name.removesuffix(".nii.gz") for p in (raw / "Dataset503_LymphAtlas" / "labelsTr").iterdir()}
    assert labels == hl_train and replaced.n_training == len(hl_train)
    # nnU-Net also resolves ids in nnUNet_preprocessed: a stale folder there would be used for training
    (tmp_path / "pre" / "Dataset503_Old").mkdir(parents=True)
    with pytest.raises(MaterializeError, match="Dataset503_Old"):
        materialize_nnunet(release, raw, dataset_id=503, config="hl", name="LymphAtlas", preprocessed_dir=tmp_path / "pre")
    # a folder nnU-Net users made by hand is not ours to overwrite
    (raw / "Dataset504_Other").mkdir()
    (raw / "Dataset504_Other" / "dataset.json").write_text("{}")
    with pytest.raises(MaterializeError, match="Dataset504_Other"):
        materialize_nnunet(release, raw, dataset_id=504, name="Other")


class _Counting:
    """The real release, counting the cases it decodes."""

    def __init__(self, release):
        self.manifest, self.splits, self._release, self.decoded = release.manifest, release.splits, release, []

    def case_ids(self, config, split):
        return self._release.case_ids(config, split)

    def iter_cases(self, config, split, *, case_ids=None):
        for record in self._release.iter_cases(config, split, case_ids=case_ids):
            self.decoded.append(record.case_id)
            yield record


def test_rerun_skips_unchanged_cases_undecoded_and_repairs_damaged_files(tmp_path, release, release_dir):
    _, truth = release_dir
    raw = tmp_path / "raw"
    first = _Counting(release)
    materialize_nnunet(first, raw, dataset_id=510, include_test=True)
    assert sorted(first.decoded) == sorted(truth)
    again = _Counting(release)
    result = materialize_nnunet(again, raw, dataset_id=510, include_test=True)
    assert again.decoded == [] and result.files_written == 0 and result.files_skipped == 2 * len(truth) + result.n_training
    # a damaged file (an interrupted copy, a disk error) is noticed and only its case is redone
    victim = sorted((raw / "Dataset510_LymphAtlas" / "imagesTr").glob("*_0001.nii.gz"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    repair = _Counting(release)
    result = materialize_nnunet(repair, raw, dataset_id=510, include_test=True)
    case = victim.name.removesuffix("_0001.nii.gz")
    assert repair.decoded == [case] and result.files_written == 1
    pet, _ = _read(victim)
    np.testing.assert_array_equal(pet, truth[case].pet)


def test_pet_channel_name_selects_nnunets_normalization(tmp_path, release):
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import (
        CTNormalization,
        ZScoreNormalization,
    )
    from nnunetv2.preprocessing.normalization.map_channel_name_to_normalization import get_normalization_scheme

    for dataset_id, pet_name, expected in ((505, "PET", ZScoreNormalization), (506, "CT", CTNormalization)):
        materialize_nnunet(release, tmp_path / "raw", dataset_id=dataset_id, name=f"N{dataset_id}",
                           pet_channel_name=pet_name)
        meta = json.loads((tmp_path / "raw" / f"Dataset{dataset_id}_N{dataset_id}" / "dataset.json").read_text())
        assert get_normalization_scheme(meta["channel_names"]["0"]) is CTNormalization
        assert get_normalization_scheme(meta["channel_names"]["1"]) is expected


class _Tampered:
    """A real release whose one case has a NaN PET voxel (a corrupt export the builder did not catch)."""

    def __init__(self, release, bad_case):
        self.manifest, self.splits, self._release, self._bad = release.manifest, release.splits, release, bad_case

    def iter_cases(self, config, split):
        for record in self._release.iter_cases(config, split):
            if record.case_id == self._bad:
                pet = record.pet.copy()
                pet[1, 2, 3] = np.nan
                record = SimpleNamespace(**{**vars(record), "pet": pet})
            yield record


def test_non_finite_pet_is_refused_naming_the_case(tmp_path, release):
    bad = release.case_ids("all", "train")[1]
    with pytest.raises(SchemaError, match=f"case {bad}: PET has 1 non-finite"):
        materialize_nnunet(_Tampered(release, bad), tmp_path / "raw", dataset_id=507)


def test_cli(tmp_path, release_dir, monkeypatch, capsys):
    monkeypatch.setenv("LYMPHATLAS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    rc = cli.main(["materialize", str(release_dir[0]), "--nnunet", str(tmp_path / "raw"),
                   "--config", "hl", "--dataset-id", "508", "--pet-channel-name", "PET", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Dataset508_LymphAtlasHL" in out and "MB/s" in out
    assert "splits_final.json" in out and "nnUNetv2_plan_and_preprocess -d 508" in out
    rc = cli.main(["materialize", "--nnunet", str(tmp_path / "raw"), "--source", str(release_dir[0]),
                   "--config", "nhl", "--dataset-id", "508", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "--force" in err
    assert "--source is deprecated" in err  # the old spelling still works, with a warning
    rc = cli.main(["materialize", "--nnunet", str(tmp_path / "raw"), "--quiet"])
    assert rc == 2 and "lymphatlas materialize SOURCE --nnunet RAW_DIR" in capsys.readouterr().err


@pytest.mark.slow
def test_nnunet_plan_and_preprocess_accepts_the_dataset(tmp_path, release):
    """nnU-Net's own command, with its integrity check, on the materialized folder (about 1-2 min on 2 cores)."""
    env = {**os.environ, "nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "pre"),
           "nnUNet_results": str(tmp_path / "results")}
    materialize_nnunet(release, tmp_path / "raw", dataset_id=509, config="hl", preprocessed_dir=tmp_path / "pre")
    exe = Path(sys.executable).with_name("nnUNetv2_plan_and_preprocess")
    proc = subprocess.run([str(exe), "-d", "509", "--verify_dataset_integrity", "-c", "3d_fullres", "-np", "1",
                           "--no_pbar"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    pre = tmp_path / "pre" / "Dataset509_LymphAtlasHL"
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["normalization_schemes"] == ["CTNormalization", "ZScoreNormalization"]
    # planning keeps the patient-grouped folds that nnU-Net's trainer will read
    assert json.loads((pre / "splits_final.json").read_text()) == json.loads(
        (tmp_path / "raw" / "Dataset509_LymphAtlasHL" / "splits_final.json").read_text())


def test_uncompressed_file_ending(tmp_path, release, release_dir):
    _, truth = release_dir
    result = materialize_nnunet(release, tmp_path / "raw", dataset_id=511, config="hl", file_ending=".nii")
    labels = sorted((result.dataset_dir / "labelsTr").iterdir())
    assert labels and all(p.name.endswith(".nii") and not p.name.endswith(".nii.gz") for p in labels)
    assert labels[0].read_bytes()[344:348] == b"n+1\x00"  # a plain single-file NIfTI-1, not gzip
    label, _ = _read(labels[0])
    np.testing.assert_array_equal(label, truth[labels[0].name.removesuffix(".nii")].label)
    assert json.loads((result.dataset_dir / "dataset.json").read_text())["file_ending"] == ".nii"
    with pytest.raises(MaterializeError, match="file ending"):
        materialize_nnunet(release, tmp_path / "raw", dataset_id=512, file_ending=".mha")


def test_a_full_disk_names_the_file_and_the_fix_without_a_traceback(release_dir, tmp_path):
    """`lymphatlas materialize` onto a 64 KiB tmpfs (needs root and mount rights; skipped otherwise)."""
    with small_tmpfs(tmp_path / "small_disk", "64k") as mnt:
        run = subprocess.run(
            [str(Path(sys.executable).parent / "lymphatlas"), "materialize", "--nnunet", str(mnt / "raw"),
             str(release_dir[0]), "--quiet", "--workers", "1"],
            cwd=tmp_path, capture_output=True, text=True, timeout=300,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        )
        assert run.returncode == 2, run.stderr
        assert "Traceback" not in run.stderr
        assert f"cannot write {mnt / 'raw'}" in run.stderr and "No space left on device (the disk is full)" in run.stderr
        assert not list(mnt.rglob("*.tmp"))  # nothing half-written


def test_hint_names_the_trainer_step_only_when_it_is_missing(tmp_path, monkeypatch):
    from lymphatlas_ds.commands import materialize

    dataset = tmp_path / "nnUNet_raw" / "Dataset501_LymphAtlas"
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "nnUNet_raw"))
    for visible, expected in ((False, True), (True, False)):
        monkeypatch.setattr(materialize, "_trainers_visible", lambda: visible)
        hint = materialize.next_steps(dataset, 501, preprocessed=None)
        assert ("python -m lymphatlas_ds.nnunet_trainers" in hint) is expected
        assert "export nnUNet_raw" not in hint  # already set to this folder
        assert "nnUNetv2_train 501 3d_fullres 0 -tr nnUNetTrainer_500epochs" in hint
        assert f"cp {dataset / 'splits_final.json'} {tmp_path / 'nnUNet_preprocessed' / dataset.name}/" in hint
        assert "nnUNetv2_predict -i IMAGES_DIR" in hint and "--include-test" in hint  # no imagesTs was written
