"""Small releases (a pilot site, the demo) give folds that nnU-Net and the client can train on.

A release of fewer training patients than ``N_FOLDS`` gets one fold per training patient (none with
one), so every fold listed in ``splits.json`` and ``splits_final.json`` has a training and a
validation patient; ``lymphatlas materialize`` leaves out any fold nnU-Net cannot train (a config
subset of a release) and says so; releases with enough patients keep main's exact placements.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from builder.release.splits import NO_FOLD, SplitCase, assign_splits, plan_splits, splits_document
from lymphatlas_ds.schema import N_FOLDS, TEST_FRACTION, Split
from tests.support.small_data import split_cohort

SIZES = (1, 2, 3, 4, 5, 7)
BIN = Path(sys.executable).parent


# ---------------------------------------------------------------------- splits only


cohort = split_cohort


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def main_rule(cases: list[SplitCase], seed: int) -> dict[str, tuple[str, int]]:
    """The placement rule of releases built so far (always N_FOLDS folds), written from its documentation:
    per diagnosis, round(TEST_FRACTION * patients) (at least one from two patients) to test, sampled
    systematically along the burden order from a seeded offset; the others, heaviest first, into the fold
    with the fewest patients of the diagnosis, then of any diagnosis, then the least burden, then a hash."""
    exams = defaultdict(list)
    for c in sorted(cases, key=lambda c: c.case_id):
        exams[c.subject_id].append(c)
    stratum = {s: e[0].diagnosis for s, e in exams.items()}
    burden = {s: sum(max(c.burden, 0.0) for c in e) for s, e in exams.items()}
    order = sorted(exams, key=lambda s: (-burden[s], _sha(f"{seed}:{s}:-1")))
    count = defaultdict(lambda: [0] * (N_FOLDS + 1))
    load = defaultdict(lambda: [0.0] * (N_FOLDS + 1))
    where = {}
    for key in sorted(set(stratum.values())):
        fresh = [s for s in order if stratum[s] == key]
        need = 0 if len(fresh) < 2 else max(1, round(TEST_FRACTION * len(fresh)))
        test = set()
        if need:
            step = len(fresh) / need
            offset = int(_sha(f"{seed}:{key}:-1")[:8], 16) / 16**8 * step
            test = {min(int(offset + i * step), len(fresh) - 1) for i in range(need)}
        for position, s in enumerate(fresh):
            if position in test:
                b = 0
            else:
                b = min(range(1, N_FOLDS + 1), key=lambda b: (
                    count[key][b], sum(c[b] for c in count.values()), round(load[key][b], 9), _sha(f"{seed}:{s}:{b}")))
            where[s] = b
            count[key][b] += 1
            load[key][b] += burden[s]
    return {c.case_id: ("test", -1) if where[c.subject_id] == 0 else ("train", where[c.subject_id] - 1) for c in cases}


def _check_folds(cases: list[SplitCase], placed, n_folds: int) -> None:
    """Every fold 0..n_folds-1 has a training and a validation patient; no patient on both sides."""
    subject = {c.case_id: c.subject_id for c in cases}
    train = [c for c, p in placed.items() if p.split is Split.TRAIN]
    if n_folds:
        assert all(0 <= placed[c].fold < n_folds for c in train)
    else:
        assert all(placed[c].fold == NO_FOLD for c in train)
    for k in range(n_folds):
        val = {subject[c] for c in train if placed[c].fold == k}
        rest = {subject[c] for c in train if placed[c].fold != k}
        assert val and rest and not val & rest, (k, val, rest)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n_patients", [*SIZES, 40])
def test_every_fold_has_a_training_and_a_validation_patient(n_patients, seed):
    cases = cohort(n_patients, seed=seed)
    plan = plan_splits(cases, seed=seed)
    train_patients = {c.subject_id for c in cases if plan.placements[c.case_id].split is Split.TRAIN}
    assert plan.n_folds == (min(N_FOLDS, len(train_patients)) if len(train_patients) >= 2 else 0)
    _check_folds(cases, plan.placements, plan.n_folds)
    # the test split is the one main drew: the fold count does not change who is held out
    main = main_rule(cases, seed)
    assert {c for c, p in plan.placements.items() if p.split is Split.TEST} == {c for c, p in main.items() if p[0] == "test"}
    doc = splits_document(plan.placements, version="1.0.0", seed=seed)
    assert doc["n_folds"] == plan.n_folds


@pytest.mark.parametrize(("n_patients", "seed"), [(9, 0), (12, 1), (25, 2), (40, 3), (40, 4), (220, 5)])
def test_releases_with_enough_patients_keep_mains_placements(n_patients, seed):
    cases = cohort(n_patients, seed=seed)
    main = main_rule(cases, seed)
    assert len({p[1] for p in main.values() if p[0] == "train"}) == N_FOLDS  # main filled every fold here
    placed = assign_splits(cases, seed=seed)
    assert {c: (p.split.value, p.fold) for c, p in placed.items()} == main


def test_a_release_without_folds_grows_folds_in_an_update_without_moving_a_case():
    first = [SplitCase("C-A-0", "A", "NHL", 5.0), SplitCase("C-A-1", "A", "NHL", 2.0)]
    plan = plan_splits(first, seed=0)
    assert plan.n_folds == 0 and {p.fold for p in plan.placements.values()} == {NO_FOLD}
    previous = splits_document(plan.placements, version="1.0.0", seed=0)["cases"]
    grown = first + cohort(8, seed=3, prefix="N")
    update = plan_splits(grown, seed=0, previous=previous)
    assert update.n_folds == N_FOLDS
    for case_id, entry in previous.items():  # still train; its first fold now, the same for both exams
        assert update.placements[case_id].split.value == entry["split"] == "train"
    assert len({update.placements[c].fold for c in previous}) == 1
    _check_folds(grown, update.placements, update.n_folds)


def test_a_small_release_grown_to_forty_patients_fills_the_new_folds():
    small = cohort(4, seed=11)
    plan = plan_splits(small, seed=2)
    assert 2 <= plan.n_folds < N_FOLDS
    previous = splits_document(plan.placements, version="1.0.0", seed=2, n_folds=plan.n_folds)["cases"]
    grown = small + cohort(36, seed=12, prefix="N")
    update = plan_splits(grown, seed=2, previous=previous)
    for case_id, entry in previous.items():
        assert (update.placements[case_id].split.value, update.placements[case_id].fold) == (entry["split"], entry["fold"])
    assert update.n_folds == N_FOLDS
    _check_folds(grown, update.placements, update.n_folds)


# ---------------------------------------------------------------------- releases, materialize, the client


@pytest.fixture(scope="module")
def small_releases(tmp_path_factory):
    from tests.support.releases import build_fake_release

    out = {}
    for n in SIZES:
        root = tmp_path_factory.mktemp(f"small{n}")
        out[n] = build_fake_release(root, n_patients=n, seed=n, shape_zyx=(12, 16, 16), name="lymphatlas")
    return out


def _env(root: Path) -> dict[str, str]:
    env = {**os.environ, "LYMPHATLAS_CACHE": str(root / "cache"), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env.pop(var, None)
    return env


def _materialize(release: Path, cwd: Path, *options: str) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    cmd = ["lymphatlas", "materialize", str(release), "--nnunet", "raw", "--preprocessed", "pre", "--quiet", *options]
    proc = subprocess.run(cmd, cwd=cwd, env=_env(cwd), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    return proc


@pytest.mark.parametrize("n_patients", SIZES)
def test_every_small_release_verifies_as_typed(small_releases, tmp_path, n_patients):
    """`lymphatlas verify` on releases with fewer folds than 5, or none (training cases in fold -1)."""
    release = small_releases[n_patients]
    proc = subprocess.run(["lymphatlas", "verify", str(release.path)], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr


@pytest.mark.parametrize("n_patients", SIZES)
def test_materialize_lists_only_folds_nnunet_can_train(small_releases, tmp_path, n_patients):
    release = small_releases[n_patients]
    truth = release.truth
    splits = json.loads((release.path / "splits.json").read_text())
    subjects = defaultdict(set)
    for case_id, entry in splits["cases"].items():
        subjects[entry["split"]].add(truth[case_id].subject_id)
    # the test split as documented: per diagnosis with two or more patients, max(1, round(20 %)) of them
    by_diagnosis = defaultdict(set)
    for case in truth.values():
        by_diagnosis[case.diagnosis].add(case.subject_id)
    n_test = sum(max(1, round(TEST_FRACTION * len(s))) for s in by_diagnosis.values() if len(s) >= 2)
    assert len(subjects["test"]) == n_test and not subjects["test"] & subjects["train"]
    n_train = len(subjects["train"])
    k = min(N_FOLDS, n_train) if n_train >= 2 else 0
    assert splits["n_folds"] == k
    card = (release.path / "README.md").read_text()

    proc = _materialize(release.path, tmp_path)
    dataset = tmp_path / "raw" / "Dataset501_LymphAtlas"
    raw_splits, pre_splits = dataset / "splits_final.json", tmp_path / "pre" / dataset.name / "splits_final.json"
    if k == 0:
        assert "no cross-validation folds" in card
        assert not raw_splits.exists() and not pre_splits.exists()
        assert "no cross-validation folds" in proc.stdout
        assert re.search(r"nnUNetv2_train 501 3d_fullres all ", proc.stdout)
        assert " -f all " in proc.stdout and re.search(r"nnUNetv2_train 501 3d_fullres \d", proc.stdout) is None
        return
    assert f"{k} folds on" in card and (f"fold {k - 1}: " in card)
    folds = json.loads(raw_splits.read_text())
    assert json.loads(pre_splits.read_text()) == folds and len(folds) == k
    train_cases = {c for c, e in splits["cases"].items() if e["split"] == "train"}
    for fold in folds:
        assert fold["train"] and fold["val"]
        assert set(fold["train"]) | set(fold["val"]) == train_cases  # the test split stays out
        assert not {truth[c].subject_id for c in fold["train"]} & {truth[c].subject_id for c in fold["val"]}
    assert f"folds: {k} of the release's {k} in splits_final.json" in proc.stdout
    assert f"-f {' '.join(map(str, range(k)))} " in proc.stdout
    assert json.loads((dataset / "dataset.json").read_text())["lymphatlas"]["folds"] == list(range(k))


def test_a_config_subset_leaves_out_the_folds_it_cannot_train_and_says_why(small_releases, tmp_path):
    release = small_releases[7]
    splits = json.loads((release.path / "splits.json").read_text())
    hl_val = defaultdict(list)
    for case_id, entry in sorted(splits["cases"].items()):
        if entry["split"] == "train" and entry["diagnosis"] == "HL":
            hl_val[entry["fold"]].append(case_id)
    assert 0 < len(hl_val) < splits["n_folds"]  # the HL subset has folds without an HL patient
    proc = _materialize(release.path, tmp_path, "--config", "hl")
    dataset = tmp_path / "raw" / "Dataset501_LymphAtlasHL"
    folds = json.loads((dataset / "splits_final.json").read_text())
    kept = json.loads((dataset / "dataset.json").read_text())["lymphatlas"]["folds"]
    assert kept == sorted(hl_val) and len(folds) == len(kept)
    for fold, k in zip(folds, kept):
        assert fold["val"] == hl_val[k] and fold["train"]
    for k in sorted(set(range(splits["n_folds"])) - set(kept)):
        assert f"left out: release fold {k} has no validation case in config hl" in proc.stdout
    assert "materialize --config all" in proc.stdout
    assert f"-f {' '.join(map(str, range(len(kept))))} " in proc.stdout


@pytest.mark.slow
def test_nnunet_plans_and_trains_every_fold_of_a_three_patient_release(small_releases, tmp_path):
    release = small_releases[3]
    proc = _materialize(release.path, tmp_path)
    env = {**_env(tmp_path), "OMP_NUM_THREADS": "2", "nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "1",
           "nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "pre"),
           "nnUNet_results": str(tmp_path / "results")}
    folds = json.loads((tmp_path / "pre" / "Dataset501_LymphAtlas" / "splits_final.json").read_text())
    assert len(folds) == 2 and "-f 0 1 " in proc.stdout

    def run(cmd: str) -> None:
        p = subprocess.run(cmd, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
        assert p.returncode == 0, f"{cmd}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"

    run("nnUNetv2_plan_and_preprocess -d 501 --verify_dataset_integrity -c 3d_fullres -np 1")
    for k, fold in enumerate(folds):
        run(f"nnUNetv2_train 501 3d_fullres {k} -tr nnUNetTrainer_LymphAtlasTiny -device cpu")
        fold_dir = tmp_path / "results" / "Dataset501_LymphAtlas" / \
            f"nnUNetTrainer_LymphAtlasTiny__nnUNetPlans__3d_fullres/fold_{k}"
        log = "".join(p.read_text() for p in fold_dir.glob("training_log_*.txt"))
        assert "Using splits from existing split file" in log
        assert f"This split has {len(fold['train'])} training and {len(fold['val'])} validation cases" in log
        assert (fold_dir / "checkpoint_final.pth").is_file()
        summary = json.loads((fold_dir / "validation" / "summary.json").read_text())
        assert sorted(Path(c["reference_file"]).name.removesuffix(".nii.gz") for c in summary["metric_per_case"]) \
            == fold["val"]


@pytest.mark.parametrize("n_patients", SIZES)
def test_the_client_gives_every_listed_fold_and_refuses_a_missing_one(small_releases, tmp_path, n_patients):
    from lymphatlas_ds import load_lymphatlas
    from lymphatlas_ds.errors import LymphAtlasError

    release = small_releases[n_patients]
    splits = json.loads((release.path / "splits.json").read_text())
    k = splits["n_folds"]
    train = {c for c, e in splits["cases"].items() if e["split"] == "train"}
    for fold in range(k):
        val = load_lymphatlas(release.path, fold=fold, subset="val", cache_dir=tmp_path, progress=False)
        rest = load_lymphatlas(release.path, fold=fold, subset="train", cache_dir=tmp_path, progress=False)
        assert set(val.case_ids) == {c for c in train if splits["cases"][c]["fold"] == fold} != set()
        assert set(rest.case_ids) == train - set(val.case_ids) != set()
    with pytest.raises(LymphAtlasError) as caught:
        load_lymphatlas(release.path, fold=k, subset="val", cache_dir=tmp_path, progress=False)
    message = str(caught.value)
    assert f"fold {k} does not exist" in message and f"{n_patients} patients" in message
    if k:
        assert f"folds 0-{k - 1}" in message and "use fold=0" in message
    else:
        assert "no cross-validation folds" in message and "without fold and subset" in message
    # the whole train split still loads without folds
    assert set(load_lymphatlas(release.path, split="train", cache_dir=tmp_path, progress=False).case_ids) == train


def test_the_client_refuses_a_fold_without_a_case_of_the_config(small_releases, tmp_path):
    from lymphatlas_ds import load_lymphatlas
    from lymphatlas_ds.errors import LymphAtlasError

    release = small_releases[7]
    splits = json.loads((release.path / "splits.json").read_text())
    hl_folds = sorted({e["fold"] for e in splits["cases"].values() if e["split"] == "train" and e["diagnosis"] == "HL"})
    empty = min(set(range(splits["n_folds"])) - set(hl_folds))
    with pytest.raises(LymphAtlasError, match=rf"fold {empty} has no val case in config hl .* 7 patients") as caught:
        load_lymphatlas(release.path, config="hl", fold=empty, subset="val", cache_dir=tmp_path, progress=False)
    assert f"use fold={hl_folds[0]}" in str(caught.value)
    hl = load_lymphatlas(release.path, config="hl", fold=hl_folds[0], subset="val", cache_dir=tmp_path, progress=False)
    assert hl.case_ids and all(splits["cases"][c]["diagnosis"] == "HL" for c in hl.case_ids)


def test_an_update_that_withdraws_a_patient_keeps_the_fold_count_and_every_fold_index_valid():
    first = cohort(5, seed=11)
    plan = plan_splits(first, seed=2)
    train_subjects = sorted({c.subject_id for c in first if plan.placements[c.case_id].split is Split.TRAIN})
    fold_of = {c.subject_id: plan.placements[c.case_id].fold for c in first}
    assert plan.n_folds == len(train_subjects) >= 3
    # the patient of fold 0 is withdrawn: the others keep their folds, up to the last one
    gone = next(s for s in train_subjects if fold_of[s] == 0)
    previous = splits_document(plan.placements, version="1.0.0", seed=2, n_folds=plan.n_folds)["cases"]
    update = plan_splits([c for c in first if c.subject_id != gone], seed=2, previous=previous)
    assert update.n_folds == plan.n_folds
    assert all(p.fold < update.n_folds for p in update.placements.values())
    for case_id, p in update.placements.items():
        assert (p.split.value, p.fold) == (previous[case_id]["split"], previous[case_id]["fold"])


def test_the_baseline_script_refuses_a_fold_the_release_does_not_list(small_releases, tmp_path):
    release = small_releases[3]
    cmd = [sys.executable, str(Path(__file__).resolve().parents[1] / "tools" / "train_baseline.py"), "--source",
           str(release.path), "--work", str(tmp_path / "nn"), "--configs", "all", "--folds", "0", "3",
           "--trainer", "tiny", "--device", "cpu", "--np", "1", "--quiet"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "lists 2 fold(s)" in proc.stderr and "not --folds [3]" in proc.stderr and "--folds 0 1" in proc.stderr
    assert not list((tmp_path / "nn").glob("nnUNet_preprocessed/*/nnUNetPlans.json"))  # nothing planned
