"""`lymphatlas evaluate` and lymphatlas_ds.metrics against ground truth and peer tools.

Ground truth: the fake WORK cases a release is built from (tests/support/releases.py): their label
and PET arrays and RAS affines, written here as predictions with nibabel (not with the client).
Peers: MONAI's DiceMetric / MeanIoU and nnU-Net's compute_metrics on random masks; scipy's
connected components for which lesion a prediction misses.
"""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from lymphatlas_ds import metrics
from lymphatlas_ds.errors import EvaluationError
from lymphatlas_ds.evaluate import evaluate, write_report
from lymphatlas_ds.reader import Release
from tests.support.releases import build_fake_release

REPO_ROOT = Path(__file__).resolve().parents[1]
SPACING_XYZ = (2.0, 2.5, 3.0)
VOXEL_ML = float(np.prod(SPACING_XYZ)) / 1000.0
STRUCTURE_26 = ndimage.generate_binary_structure(3, 3)  # the release's lesion connectivity


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    release = build_fake_release(root, n_patients=6, seed=5, shape_zyx=(20, 24, 28), spacing_xyz=SPACING_XYZ)
    return release, Release(release.path, remember=False)


def _lesions_by_size(label: np.ndarray) -> tuple[np.ndarray, int]:
    """The release's lesion ids, recomputed here: 26-connected components numbered by decreasing voxel count,
    ties in scipy's raster order (the order of each component's first voxel)."""
    comps, n = ndimage.label(label, structure=STRUCTURE_26)
    sizes = np.bincount(comps.ravel(), minlength=n + 1)[1:]
    order = sorted(range(n), key=lambda k: -sizes[k])  # sorted() is stable
    remap = np.zeros(n + 1, np.int64)
    for new, old in enumerate(order, start=1):
        remap[old + 1] = new
    return remap[comps], n


def _write(path: Path, label_zyx: np.ndarray, affine: np.ndarray, dtype=np.uint8) -> Path:
    img = nib.Nifti1Image(np.ascontiguousarray(label_zyx.transpose(2, 1, 0)).astype(dtype), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def _truth_predictions(release, folder: Path, case_ids) -> Path:
    for case_id in case_ids:
        case = release.truth[case_id]
        _write(folder / f"{case_id}.nii.gz", case.label, case.affine)
    return folder


def _case_with_lesions(release, reader, n: int = 2) -> str:
    for case_id in reader.case_ids("all", "train"):
        if ndimage.label(release.truth[case_id].label, structure=STRUCTURE_26)[1] >= n:
            return case_id
    raise AssertionError(f"the fake release has no train case with {n} lesions")


def test_truth_masks_score_dice_one_and_find_every_lesion(built, tmp_path):
    release, reader = built
    train = reader.case_ids("all", "train")
    pred = _truth_predictions(release, tmp_path / "pred", train)
    result = evaluate(pred, reader, split="train")
    assert sorted(r["case_id"] for r in result.cases) == sorted(train)
    for row in result.cases:
        truth = release.truth[row["case_id"]].label
        n_lesions = ndimage.label(truth, structure=STRUCTURE_26)[1]
        assert (row["dice"], row["iou"], row["fn"], row["fp"]) == (1.0, 1.0, 0.0, 0.0)
        assert row["tp"] == row["n_ref"] == row["n_pred"] == float(truth.sum())
        assert (row["n_ref_lesions"], row["n_detected"], row["detection_sensitivity"]) == (n_lesions, n_lesions, 1.0)
        assert row["fp_volume_ml"] == row["fn_volume_ml"] == 0.0
    whole = result.folds["all"]["All cases"]
    assert whole["dice"] == 1.0 and whole["detection_sensitivity"] == 1.0 and result.missed == []
    # every fold of the release has a row, with its own cases
    folds = {e["fold"] for c, e in reader.splits["cases"].items() if e["split"] == "train"}
    assert {f"Fold {k}" for k in folds} <= set(result.folds["all"])
    for k in folds:
        n = sum(1 for c, e in reader.splits["cases"].items() if e["split"] == "train" and e["fold"] == k)
        assert result.folds["all"][f"Fold {k}"]["n_cases"] == n
    # the reference lesions' volumes and SUVmax come from the truth arrays
    for row in result.lesions:
        case = release.truth[row["case_id"]]
        comps, _ = _lesions_by_size(case.label)
        inside = comps == row["lesion_id"]
        assert row["voxels"] == int(inside.sum())
        assert row["volume_ml"] == pytest.approx(inside.sum() * VOXEL_ML)
        assert row["suv_max"] == pytest.approx(float(case.pet[inside].max()))


def test_one_lesion_removed_is_named_with_its_volume(built, tmp_path):
    release, reader = built
    case_id = _case_with_lesions(release, reader)
    fold = int(reader.splits["cases"][case_id]["fold"])
    val = reader.fold_case_ids(fold, "val")
    pred = _truth_predictions(release, tmp_path / "pred", val)
    case = release.truth[case_id]
    comps, n = _lesions_by_size(case.label)
    removed = 2  # the second largest lesion
    cut = case.label.copy()
    cut[comps == removed] = 0
    _write(pred / f"{case_id}.nii.gz", cut, case.affine)
    result = evaluate(pred, reader, fold=fold)
    n_removed = int((comps == removed).sum())
    assert [(r["case_id"], r["lesion_id"], r["voxels"]) for r in result.missed] == [(case_id, removed, n_removed)]
    assert result.missed[0]["volume_ml"] == pytest.approx(n_removed * VOXEL_ML)
    assert result.missed[0]["suv_max"] == pytest.approx(float(case.pet[comps == removed].max()))
    row = result.case(case_id)
    n_ref = int(case.label.sum())
    assert (row["fn"], row["fp"], row["tp"]) == (n_removed, 0, n_ref - n_removed)
    assert row["dice"] == pytest.approx(2 * (n_ref - n_removed) / (2 * (n_ref - n_removed) + n_removed))
    assert (row["n_ref_lesions"], row["n_detected"]) == (n, n - 1)
    assert row["detection_sensitivity"] == pytest.approx((n - 1) / n)
    assert row["fn_volume_ml"] == pytest.approx(n_removed * VOXEL_ML) and row["fp_volume_ml"] == 0.0
    # the report files carry the same: cases.csv columns, the missed lesion in lesions.csv and report.md
    out = tmp_path / "report"
    write_report(result, out)
    cases = {r["case_id"]: r for r in csv.DictReader((out / "cases.csv").open())}
    for column in ("dice", "iou", "fn", "fp", "tp", "n_pred", "n_ref", "detection_sensitivity"):
        assert column in cases[case_id]
    assert float(cases[case_id]["fn"]) == n_removed
    lesions = [r for r in csv.DictReader((out / "lesions.csv").open()) if r["detected"] == "false"]
    assert [(r["case_id"], int(r["lesion_id"])) for r in lesions] == [(case_id, removed)]
    assert f"| {case_id} | {removed} |" in (out / "report.md").read_text()
    assert (out / "detection_by_volume.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = tmp_path / "again"
    write_report(evaluate(pred, reader, fold=fold), again)
    assert all((again / p.name).read_bytes() == p.read_bytes() for p in out.iterdir())  # deterministic output
    # pooled detection: every lesion of the fold but one
    total = sum(ndimage.label(release.truth[c].label, structure=STRUCTURE_26)[1] for c in val)
    fold_row = result.folds["all"][f"Fold {fold}"]
    assert (fold_row["n_ref_lesions"], fold_row["n_detected"]) == (total, total - 1)
    by_volume = [r for r in result.detection if r["by"] == "volume_ml"]
    assert sum(r["n_lesions"] for r in by_volume) == total
    assert sum(r["n_lesions"] - r["n_detected"] for r in by_volume) == 1


def test_a_false_positive_blob_counts_its_volume(built, tmp_path):
    release, reader = built
    case_id = _case_with_lesions(release, reader, n=1)
    case = release.truth[case_id]
    pred = case.label.copy()
    far = np.zeros_like(pred)
    far[0:2, 0:2, 0:2] = 1  # a corner of the volume, away from every lesion
    assert not np.any(far & case.label)
    _write(tmp_path / "pred" / f"{case_id}.nii.gz", pred | far, case.affine)
    row = evaluate(tmp_path / "pred", reader).case(case_id)
    assert row["fp"] == 8 and row["fp_volume_ml"] == pytest.approx(8 * VOXEL_ML) and row["n_fp_components"] == 1


# ------------------------------------------------------------------------------------------- bad input


def test_a_prediction_in_another_orientation_is_refused_with_both_grids(built, tmp_path):
    release, reader = built
    case_id = reader.case_ids("all", "train")[0]
    case = release.truth[case_id]
    # the same voxels in LAS (x flipped, as dcm2niix stores rows): same shape, another affine
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = case.label.shape[2] - 1
    _write(tmp_path / "pred" / f"{case_id}.nii.gz", case.label[:, :, ::-1], case.affine @ flip)
    with pytest.raises(EvaluationError) as info:
        evaluate(tmp_path / "pred", reader)
    message = str(info.value)
    assert case_id in message and "orientation" in message
    assert message.count(str(case.label.shape[::-1])) == 2  # both shapes, in NIfTI's (x, y, z) order
    assert f"{case.affine[0, 0]:.4g}" in message and f"{-case.affine[0, 0]:.4g}" in message
    # another shape
    _write(tmp_path / "pred2" / f"{case_id}.nii.gz", case.label[:, :, :-1], case.affine)
    with pytest.raises(EvaluationError, match=rf"{case_id}.*\(27, 24, 20\).*\(28, 24, 20\)"):
        evaluate(tmp_path / "pred2", reader)


def test_missing_unknown_and_non_binary_predictions_are_refused(built, tmp_path):
    release, reader = built
    first = _case_with_lesions(release, reader)
    fold = int(reader.splits["cases"][first]["fold"])
    val = [first] + [c for c in reader.fold_case_ids(fold, "val") if c != first]
    assert len(val) >= 2
    pred = _truth_predictions(release, tmp_path / "pred", val[:1])
    with pytest.raises(EvaluationError) as info:
        evaluate(pred, reader, fold=fold)
    listed = str(info.value).split(f"no prediction in {pred}: ")[1].split(". ")[0]
    assert listed.split(", ") == val[1:]
    other = "hl" if reader.splits["cases"][val[0]]["diagnosis"] == "NHL" else "nhl"
    if not reader.fold_case_ids(fold, "val", config=other):  # a config whose fold is empty: nothing to evaluate
        with pytest.raises(EvaluationError, match="holds no case"):
            evaluate(pred, reader, fold=fold, config=other)
    with pytest.raises(EvaluationError, match=rf"name no case of release .* config {other}.*{val[0]}"):
        evaluate(pred, reader, config=other)
    _write(tmp_path / "unknown" / "LA-9999999.nii.gz", release.truth[val[0]].label, release.truth[val[0]].affine)
    with pytest.raises(EvaluationError, match="LA-9999999"):
        evaluate(tmp_path / "unknown", reader)
    case = release.truth[val[0]]
    _write(tmp_path / "multi" / f"{val[0]}.nii.gz", case.label * 2, case.affine)
    with pytest.raises(EvaluationError, match=rf"{val[0]}.*values \{{0, 2\}}"):
        evaluate(tmp_path / "multi", reader)
    _write(tmp_path / "prob" / f"{val[0]}.nii.gz", case.label * 0.7, case.affine, dtype=np.float32)
    with pytest.raises(EvaluationError, match=r"values \{0, 0.7"):
        evaluate(tmp_path / "prob", reader)
    # a float32 label of 0.0 / 1.0 (as MONAI saves by default) is a label
    _write(tmp_path / "float" / f"{val[0]}.nii.gz", case.label, case.affine, dtype=np.float32)
    assert evaluate(tmp_path / "float", reader).case(val[0])["dice"] == 1.0


def _user(*argv, cwd):
    """A console command as a user types it, from another folder."""
    env = {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(REPO_ROOT), "HOME": str(cwd)}
    return subprocess.run(list(argv), capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_the_command_writes_the_report_and_fails_on_bad_input(built, tmp_path):
    release, reader = built
    fold = int(reader.splits["cases"][_case_with_lesions(release, reader)]["fold"])
    val = reader.fold_case_ids(fold, "val")
    pred = _truth_predictions(release, tmp_path / "pred", val)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    lymphatlas = str(Path(sys.executable).parent / "lymphatlas")
    run = _user(lymphatlas, "evaluate", str(pred), "--release", str(release.path), "--out", "report",
                "--fold", str(fold), cwd=cwd)
    assert run.returncode == 0, run.stderr
    assert f"Fold {fold}: {len(val)} cases, Dice 1.00000" in run.stdout and "missed lesions: 0" in run.stdout
    rows = list(csv.DictReader((cwd / "report" / "cases.csv").open()))
    assert sorted(r["case_id"] for r in rows) == sorted(val)
    assert all(float(r["dice"]) == 1.0 and float(r["detection_sensitivity"]) == 1.0 for r in rows)
    folds = list(csv.DictReader((cwd / "report" / "folds.csv").open()))
    assert any(r["row"] == f"Fold {fold}" and r["group"] == "all" for r in folds)
    for name in ("lesions.csv", "detection.csv", "report.md", "detection_by_volume.png"):
        assert (cwd / "report" / name).is_file()
    (pred / f"{val[0]}.nii.gz").unlink()
    bad = _user(lymphatlas, "evaluate", str(pred), "--release", str(release.path), "--out", "report2",
                "--fold", str(fold), cwd=cwd)
    assert bad.returncode == 2 and val[0] in bad.stderr and "no prediction" in bad.stderr
    assert not (cwd / "report2").exists()


# ------------------------------------------------------------------------------------------- peers


def _random_pairs(seed: int = 0):
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(6):
        shape = tuple(int(s) for s in rng.integers(5, 14, 3))
        ref = (rng.random(shape) < rng.uniform(0.05, 0.5)).astype(np.uint8)
        pred = (rng.random(shape) < rng.uniform(0.05, 0.5)).astype(np.uint8)
        if i == 4:
            pred[:] = 0  # nothing predicted
        pairs.append((ref, pred))
    pairs.append((np.zeros((4, 5, 6), np.uint8), np.zeros((4, 5, 6), np.uint8)))  # nothing anywhere: NaN
    return pairs


def test_dice_and_iou_equal_monai(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("monai", reason="MONAI is not installed")
    from monai.metrics import DiceMetric, MeanIoU

    for ref, pred in _random_pairs()[:-1]:
        mine = metrics.voxel_metrics(ref, pred)
        y = torch.as_tensor(ref)[None, None].float()
        y_pred = torch.as_tensor(pred)[None, None].float()
        dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(y_pred, y)
        iou = MeanIoU(include_background=True, reduction="none", ignore_empty=False)(y_pred, y)
        assert mine["Dice"] == pytest.approx(float(dice[0, 0]), rel=1e-6)
        assert mine["IoU"] == pytest.approx(float(iou[0, 0]), rel=1e-6)


def test_case_metrics_equal_nnunet_compute_metrics(tmp_path):
    pytest.importorskip("nnunetv2", reason="nnU-Net is not installed")
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    for i, (ref, pred) in enumerate(_random_pairs(1)):
        affine = np.diag([-2.0, -2.5, 3.0, 1.0])
        ref_file = _write(tmp_path / f"ref{i}.nii.gz", ref, affine)
        pred_file = _write(tmp_path / f"pred{i}.nii.gz", pred, affine)
        peer = compute_metrics(str(ref_file), str(pred_file), SimpleITKIO(), [1])["metrics"][1]
        mine = metrics.voxel_metrics(ref, pred)
        for name in metrics.METRICS:
            if math.isnan(peer[name]):
                assert math.isnan(mine[name]), name
            else:
                assert mine[name] == pytest.approx(peer[name]), name


def test_lesion_hits_follow_an_instance_map(tmp_path):
    ref = np.zeros((6, 6, 6), np.uint8)
    ref[0:2, 0:2, 0:2] = 1
    ref[4:6, 4:6, 4:6] = 1
    instances = np.zeros_like(ref, dtype=np.uint16)
    instances[0:2, 0:2, 0:2] = 7  # a table's ids need not be 1..n
    instances[4:6, 4:6, 4:6] = 3
    pred = np.zeros_like(ref)
    pred[5, 5, 5] = 1
    hits = metrics.lesion_hits(ref, pred, voxel_volume_ml=1.0, reference_instances=instances)
    assert dict(zip(hits.lesion_ids.tolist(), hits.detected.tolist())) == {3: True, 7: False}
    assert hits.metrics.fn_volume_ml == 8.0 and hits.metrics.n_ref_lesions == 2
    with pytest.raises(ValueError, match="instance map"):
        metrics.lesion_hits(ref, pred, voxel_volume_ml=1.0, reference_instances=instances * 0)


# ------------------------------------------------------------------------------------------- DICOM SEG


def _seg_of(case, folder: Path, *, reverse: bool, shift_mm: float = 0.0):
    """A DICOM SEG (highdicom) of ``case.label`` over CT slices written on the case's grid (moved ``shift_mm`` along z)."""
    hd = pytest.importorskip("highdicom", reason="highdicom is not installed")
    import pydicom
    from pydicom.sr.codedict import codes

    from tests.support.dicom_series import write_series

    z, y, x = case.label.shape
    spacing = np.linalg.norm(case.affine[:3, :3], axis=0)
    origin_lps = np.diag([-1.0, -1.0, 1.0]) @ case.affine[:3, 3] + [0.0, 0.0, shift_mm]
    extra = {"PatientBirthDate": "", "PatientSex": "", "StudyDate": "20200101", "StudyTime": "120000", "StudyID": "1",
             "AccessionNumber": "", "ReferringPhysicianName": "", "SeriesNumber": 1}
    truth = write_series(folder / "ct", n=z, rows=y, cols=x, pixel_spacing=(spacing[1], spacing[0]),
                         slice_spacing=spacing[2], origin=tuple(origin_lps), extra=extra)
    ct = sorted((pydicom.dcmread(f) for f in truth.files), key=lambda d: float(d.ImagePositionPatient[2]))
    step = -1 if reverse else 1
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="lesion", segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(name="model", version="1",
                                                                    family=codes.DCM.ArtificialIntelligence))
    return hd.seg.Segmentation(
        source_images=ct[::step], pixel_array=case.label.astype(bool)[::step],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[description],
        series_instance_uid=hd.UID(), series_number=1, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="test", manufacturer_model_name="test", software_versions="1", device_serial_number="1")


def test_dicom_seg_predictions_are_placed_on_the_case_grid(built, tmp_path):
    release, reader = built
    case_id = _case_with_lesions(release, reader)
    case = release.truth[case_id]
    for reverse in (False, True):  # frames in either slice order
        out = tmp_path / f"seg{reverse}"
        out.mkdir()
        _seg_of(case, tmp_path / f"ct{reverse}", reverse=reverse).save_as(out / f"{case_id}.seg.dcm")
        row = evaluate(out, reader).case(case_id)
        assert (row["dice"], row["tp"]) == (1.0, float(case.label.sum()))
    moved = tmp_path / "moved"
    moved.mkdir()
    _seg_of(case, tmp_path / "ct_moved", reverse=False, shift_mm=7.0).save_as(moved / f"{case_id}.seg.dcm")
    with pytest.raises(EvaluationError, match=rf"case {case_id}: prediction .* not on the release's grid") as info:
        evaluate(moved, reader)
    assert "DICOM SEG frames" in str(info.value) and "(28, 24, 20)" in str(info.value)


# ------------------------------------------------------------------------------------------- lesion table join


def test_missed_lesions_are_joined_with_the_release_lesion_table(built, tmp_path):
    """The release's lesions config: a missed lesion is named by its lesion_id there and carries its columns."""
    import pyarrow.parquet as pq

    release, _ = built
    reader = Release(release.path, remember=False)
    case_id = _case_with_lesions(release, reader)
    case = release.truth[case_id]
    table = [r for f in sorted((release.path / "lesions").glob("*.parquet"))
             for r in pq.read_table(f).to_pylist() if r["case_id"] == case_id]
    comps, n = ndimage.label(case.label, structure=STRUCTURE_26)
    sizes = [int((comps == k).sum()) for k in range(1, n + 1)]
    assert sorted(r["voxels"] for r in table) == sorted(sizes)  # the table is the truth's lesions
    unique = [r for r in table if sizes.count(r["voxels"]) == 1]
    target = unique[-1]  # the smallest lesion told apart by its size
    cut = case.label.copy()
    cut[comps == sizes.index(target["voxels"]) + 1] = 0
    pred = _write(tmp_path / "pred" / f"{case_id}.nii.gz", cut, case.affine).parent
    result = evaluate(pred, reader)
    missed = result.missed
    assert [(r["case_id"], r["lesion_id"]) for r in missed] == [(case_id, target["lesion_id"])]
    assert missed[0]["lesion_source"] == "release"
    assert missed[0]["body_region"] == target["body_region"] and missed[0]["suv_peak"] == target["suv_peak"]
    assert all(r["lesion_source"] == "release" for r in result.lesions if r["case_id"] == case_id)
    out = tmp_path / "report"
    write_report(result, out)
    header = (out / "lesions.csv").read_text().splitlines()[0].split(",")
    assert {"body_region", "suv_peak", "lesion_source", "volume_ml", "detected"} <= set(header)
