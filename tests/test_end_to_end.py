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
from lymphatlas_synth.cohort import generate_cohort, load_truth
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
    # a small release: one fold per training patient (at most 5), each with a training and a validation patient
    n_folds = json.loads((chain["mirror"] / "1.0.0" / "splits.json").read_text())["n_folds"]
    assert n_folds == min(5, len({patient[c] for c in all_ids}))
    for k in range(n_folds):
        tr = load_lymphatlas(chain["mirror"], version="1.0.0", split="train", fold=k, subset="train",
                             cache_dir=chain["root"] / "cache")
        va = load_lymphatlas(chain["mirror"], version="1.0.0", split="train", fold=k, subset="val",
                             cache_dir=chain["root"] / "cache")
        tr_ids = {tr[i]["case_id"] for i in range(len(tr))}
        va_ids = {va[i]["case_id"] for i in range(len(va))}
        assert tr_ids | va_ids == all_ids and not tr_ids & va_ids and tr_ids and va_ids
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
    assert len(splits) == min(5, len({patient[c] for c in cases}))  # one fold per training patient, at most 5
    for fold in splits:
        assert fold["train"] and fold["val"]
        assert sorted(fold["train"] + fold["val"]) == cases
        assert not {patient[c] for c in fold["train"]} & {patient[c] for c in fold["val"]}


def _truth_pet(chain: dict, exam_id: str) -> sitk.Image:
    """The generator's PET in SUV on its native grid (truth/<exam>/pet_suv.npy + the PET geometry)."""
    pet = sitk.GetImageFromArray(np.load(chain["truth"] / exam_id / "pet_suv.npy").astype(np.float32))
    g = chain["truths"][exam_id]["pet"]
    pet.SetSpacing(g["spacing"])
    pet.SetOrigin(g["origin"])
    pet.SetDirection(g["direction"])
    return pet


def _lesion_pet_bounds(chain: dict, case_id: str) -> list[tuple[float, float, float]]:
    """Per lesion of the case: (trilinear SUVmax, SUVmax on the CT grid, native maximum around it).

    Trilinear and the native voxels come from the generator's PET (truth), read by scipy at the
    lesion's CT voxel centres carried through the case's saved transform; the middle value is
    the published pet.nii.gz."""
    from scipy import ndimage

    from builder.convert.align import affine_lps

    exam_id = chain["id_map"][case_id]["exam_id"]
    folder = chain["work"] / "cases" / case_id
    case = json.loads((folder / "case.json").read_text())
    transform = sitk.ReadTransform(str(folder / case["alignment"]["transform_file"]))
    truth_pet = _truth_pet(chain, exam_id)
    arr = sitk.GetArrayFromImage(truth_pet).astype(np.float64)
    size = np.asarray(truth_pet.GetSize())
    pet_ct = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "pet.nii.gz")))
    label = sitk.ReadImage(str(folder / "label.nii.gz"))
    comps, n = ndimage.label(sitk.GetArrayFromImage(label), structure=np.ones((3, 3, 3)))
    a_ct, inv_pet = affine_lps(label), np.linalg.inv(affine_lps(truth_pet))
    out = []
    for k in range(1, n + 1):
        idx = np.argwhere(comps == k)
        pts = idx[:, ::-1] @ a_ct[:3, :3].T + a_ct[:3, 3]
        moved = np.array([transform.TransformPoint(tuple(map(float, p))) for p in pts])
        c = moved @ inv_pet[:3, :3].T + inv_pet[:3, 3]  # continuous (x, y, z) index in the PET
        inside = np.all((c >= 0) & (c <= size - 1), axis=1)
        if not inside.all():
            continue  # at the field of view's edge: bounds not defined there
        tri = ndimage.map_coordinates(arr, [c[:, 2], c[:, 1], c[:, 0]], order=1)
        base = np.floor(c).astype(int)
        corners = [arr[np.minimum(base[:, 2] + dz, size[2] - 1), np.minimum(base[:, 1] + dy, size[1] - 1),
                       np.minimum(base[:, 0] + dx, size[0] - 1)]
                   for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)]
        values = pet_ct[idx[:, 0], idx[:, 1], idx[:, 2]]
        out.append((float(tri.max()), float(values.max()), float(np.max(corners))))
    return out


def test_lesion_suvmax_on_the_ct_grid_lies_between_trilinear_and_the_native_maximum(chain):
    # the generator's PET (truth SUV, no DICOM reading or SUV conversion of ours) bounds every lesion
    checked = 0
    for case_id in chain["id_map"]:
        for tri, on_ct, native in _lesion_pet_bounds(chain, case_id):
            assert tri * (1 - 1e-4) <= on_ct <= native * (1 + 1e-4), (case_id, tri, on_ct, native)
            checked += 1
    assert checked >= N_EXAMS  # every exam has lesions inside its PET field of view


def test_case_json_statistics_match_the_generator_pet(chain):
    for case_id, row in chain["id_map"].items():
        folder = chain["work"] / "cases" / case_id
        case = json.loads((folder / "case.json").read_text())
        truth = chain["truths"][row["exam_id"]]
        # the SUV factor is the generator's, to float precision
        assert case["pet"]["suv"]["factor"] == pytest.approx(truth["suv_factor"], rel=1e-9)
        arr = np.load(chain["truth"] / row["exam_id"] / "pet_suv.npy")
        for item in case["lesions"]["items"]:
            if item["pet_voxels"]:  # SUVmax on the native grid is one of the generator's PET voxels
                assert np.isclose(arr, item["suv_max"], rtol=1e-6, atol=0).any(), (case_id, item)
                assert item["suv_peak"] <= item["suv_max"] + 1e-6


STATION_REGION = {"cervical": "head-neck", "axillary": "thorax", "mediastinal": "thorax", "hilar": "thorax",
                  "para-aortic": "abdomen", "inguinal": "pelvis"}
"""The generator's stations whose body region is unambiguous (supraclavicular, iliac, spleen and bone
lie within a few centimetres of a region boundary)."""


def test_lesions_config_matches_the_generator_truth_lesion_by_lesion(chain):
    """The release's lesions config, read with plain `datasets`, against the generator's mask and PET:
    one row per 26-connected component of the truth mask (scipy on the truth, not the builder's
    labelling), each truth lesion's voxel count and volume exactly, its SUVmax within the bounds the
    generator's own PET gives (tests/test_convert.py), and the body region of its station."""
    import datasets
    from scipy import ndimage

    from tests.test_convert import _lps, _pet_truth_suvmax

    rows = []
    for split in ("train", "test"):
        if any(p.name.startswith(split) for p in (chain["release"] / "lesions").iterdir()):
            rows += datasets.load_dataset(str(chain["release"]), "lesions", split=split).to_list()
    checked = regions = 0
    for case_id, ids in chain["id_map"].items():
        truth = chain["truths"][ids["exam_id"]]
        mine = [r for r in rows if r["case_id"] == case_id]
        mask = np.load(chain["truth"] / ids["exam_id"] / "mask.npy")
        components, n = ndimage.label(mask > 0, structure=np.ones((3, 3, 3), bool))
        assert len(mine) == n, case_id
        voxel_ml = float(np.prod(truth["ct"]["spacing"])) / 1000.0
        for les in truth["lesions"]:
            centre = np.linalg.solve(_lps(truth["ct"]), [*les["center_mm"], 1.0])[:3]
            k = components[tuple(np.clip(np.rint(centre[::-1]).astype(int), 0, np.asarray(mask.shape) - 1))]
            if k == 0 or np.count_nonzero(components == k) != les["n_voxels"]:
                continue  # centre off the mask (a thin lesion) or two truth lesions touching: one component
            row = min(mine, key=lambda r: np.linalg.norm(np.subtract(r["centroid_lps"], les["center_mm"])))
            where = (case_id, les["station"])
            assert row["voxels"] == les["n_voxels"], where
            assert row["volume_ml"] == pytest.approx(les["n_voxels"] * voxel_ml, rel=1e-12), where
            lower, upper = _pet_truth_suvmax({"truth_dir": chain["truth"]}, ids["exam_id"], truth, les)
            assert lower * 0.99 <= row["suv_max"] <= upper * 1.01, (where, lower, upper)
            if les["station"] in STATION_REGION:
                assert row["body_region"] == STATION_REGION[les["station"]], where
                regions += 1
            checked += 1
    assert checked >= 5 and regions >= 3


def test_saved_transform_is_the_true_misalignment_and_maps_the_generator_pet_onto_the_published_one(chain):
    """The transform saved beside case.json against the generator's truth: it maps every lesion centre
    where the true misalignment does (sub-millimetre), and it carries the generator's own PET (not
    the DICOM re-read by the builder) onto the published pet.nii.gz, up to the DICOM's int16 rounding."""
    from builder.convert.align import Interpolation, resample_to_reference
    from lymphatlas_synth.cohort import lesion_residuals

    # two cases with lesions (case ids come from a key made per run: the first ids may be lesion-free exams)
    with_lesions = [(c, r) for c, r in sorted(chain["id_map"].items()) if chain["truths"][r["exam_id"]]["lesions"]]
    assert len(with_lesions) >= 2
    for case_id, row in with_lesions[:2]:
        folder = chain["work"] / "cases" / case_id
        case = json.loads((folder / "case.json").read_text())
        truth = chain["truths"][row["exam_id"]]
        transform = sitk.ReadTransform(str(folder / case["alignment"]["transform_file"]))
        errors = np.linalg.norm(lesion_residuals(transform, truth), axis=1)
        assert len(errors) and errors.max() < 1.0, (case_id, errors)
        published = sitk.ReadImage(str(folder / "pet.nii.gz"))
        again = resample_to_reference(_truth_pet(chain, row["exam_id"]), published, transform,
                                      interpolation=Interpolation(case["alignment"]["interpolation"]))
        want, got = sitk.GetArrayFromImage(again), sitk.GetArrayFromImage(published)
        assert want.shape == got.shape
        # the DICOM stores the PET as int16 x a per-slice slope: about 1 / 32767 of each slice's maximum
        np.testing.assert_allclose(got, want, rtol=0, atol=float(want.max()) * 2e-4)
        assert float(np.abs(got - want).mean()) < float(want.max()) * 1e-5


def test_convert_with_the_papers_unbounded_cubic_records_it(synthetic_good_cohort, tmp_path):
    """`python -m builder convert ... --interpolation cubic`, typed from another folder."""
    import subprocess
    import sys

    source, truths = synthetic_good_cohort
    exam_id = truths[0].exam_id
    proc = subprocess.run(
        [sys.executable, "-m", "builder", "convert", str(source), str(tmp_path / "work"), "--exams", exam_id,
         "--interpolation", "cubic", "--workers", "1", "--quiet", "--no-report"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    (folder,) = [p for p in (tmp_path / "work" / "cases").iterdir() if not p.name.startswith(".")]
    alignment = json.loads((folder / "case.json").read_text())["alignment"]
    assert alignment["interpolation"] == "cubic"
    assert (folder / alignment["transform_file"]).is_file()
    bad = subprocess.run([sys.executable, "-m", "builder", "convert", str(source), str(tmp_path / "w2"),
                          "--interpolation", "spline"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and "bounded-cubic" in bad.stderr and "Traceback" not in bad.stderr
