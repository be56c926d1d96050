"""Release folders: loaded with plain `datasets`, compared voxel for voxel with the WORK truth."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest
from huggingface_hub import DatasetCard

from builder.__main__ import main as builder_main
from builder.release.build import ReleaseError, build_release, read_cases_csv
from lymphatlas_ds.manifest import content_hash, read_manifest, verify_files, verify_release
from lymphatlas_ds.schema import IMAGE_COLUMNS, METADATA_COLUMNS, RELEASE_FOLDER_NAME
from lymphatlas_synth.fake_work import make_fake_work
from tests.support.releases import build_fake_release, datasets_cache_in_tmp  # noqa: F401 (fixture)


# datasets' arrow cache of these small releases stays out of the user's cache folder
pytestmark = pytest.mark.usefixtures("datasets_cache_in_tmp")



@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    release = build_fake_release(root, n_patients=14, seed=0, name=RELEASE_FOLDER_NAME)
    return root, release.truth, release.summary


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_layout_and_every_config_and_split_loads_with_datasets(released):
    root, truth, _ = released
    release = root / RELEASE_FOLDER_NAME
    splits = json.loads((release / "splits.json").read_text())
    assert set(splits["cases"]) == set(truth) and splits["n_folds"] == 5
    assert datasets.get_dataset_config_names(str(release)) == ["all", "hl", "nhl", "lesions", "preview"]
    seen = []
    for config in ("all", "hl", "nhl"):
        for split in ("train", "test"):
            ds = datasets.load_dataset(str(release), config, split=split)
            expected = sorted(
                c for c, e in splits["cases"].items() if e["split"] == split and config in ("all", e["diagnosis"].lower())
            )
            assert sorted(ds["case_id"]) == expected
            if config != "all":
                seen += ds["case_id"]
    assert sorted(seen) == sorted(truth)  # hl + nhl partition the cases
    # nothing temporary published: the encoded cells' folder, partial shards, their spills
    assert not [p.relative_to(release).as_posix() for p in release.rglob(".*")]


def test_decoded_volumes_equal_the_work_files_voxel_for_voxel(released):
    root, truth, _ = released
    ds = datasets.load_dataset(str(root / RELEASE_FOLDER_NAME), "all", split="train")
    test = datasets.load_dataset(str(root / RELEASE_FOLDER_NAME), "all", split="test")
    assert len(ds) + len(test) == len(truth)
    for row in [*ds, *test]:
        case = truth[row["case_id"]]
        for name in IMAGE_COLUMNS:
            image = row[name]  # decoded by datasets.Nifti with nibabel
            voxels = np.asanyarray(image.dataobj).transpose(2, 1, 0)
            assert voxels.dtype == getattr(case, name).dtype
            np.testing.assert_array_equal(voxels, getattr(case, name))
            np.testing.assert_allclose(image.affine, case.affine, atol=1e-4)
        assert row["subject_id"] == case.subject_id and row["diagnosis"] == case.diagnosis
        assert row["shape_xyz"] == list(case.ct.shape)[::-1]
        assert row["shape_xyz"] == list(row["ct"].shape)  # the convention nibabel reads the cells in
        np.testing.assert_allclose(row["spacing_xyz"], row["ct"].header.get_zooms(), rtol=1e-6)
        np.testing.assert_allclose(np.reshape(row["affine"], (4, 4)), case.affine)
        assert row["lesion_count"] == case.case_json["lesions"]["count"]


def test_streaming_yields_the_same_cases(released):
    root, truth, _ = released
    stream = datasets.load_dataset(str(root / RELEASE_FOLDER_NAME), "nhl", split="train", streaming=True)
    n = 0
    for row in stream:
        for name in IMAGE_COLUMNS:
            voxels = np.asanyarray(row[name].dataobj).transpose(2, 1, 0)
            np.testing.assert_array_equal(voxels, getattr(truth[row["case_id"]], name))
        n += 1
    assert n == len(datasets.load_dataset(str(root / RELEASE_FOLDER_NAME), "nhl", split="train"))


def test_manifest_verifies_and_hashes_match_the_work_truth(released):
    root, truth, _ = released
    release = root / RELEASE_FOLDER_NAME
    manifest = verify_release(release)
    assert manifest["version"] == "1.0.0"
    # fake_work hashed its own arrays independently; the release hashed what it read back.
    assert manifest["cases"] == {c: truth[c].case_json["content_hash"] for c in truth}
    assert set(manifest["files"]) == set(_files(release)) - {"manifest.json"}
    for rel, entry in manifest["files"].items():
        assert entry["size"] == (release / rel).stat().st_size


def test_verify_names_a_tampered_file(released, tmp_path):
    root, _, _ = released
    copy = tmp_path / "copy"
    shutil.copytree(root / RELEASE_FOLDER_NAME, copy)
    csv_path = copy / "metadata" / "cases.csv"
    data = bytearray(csv_path.read_bytes())
    data[-3] ^= 1  # same size, other content
    csv_path.write_bytes(bytes(data))
    (copy / "stray.txt").write_text("x")
    problems = {(p.path, p.problem) for p in verify_files(copy)}
    assert problems == {("metadata/cases.csv", "sha256"), ("stray.txt", "unlisted")}


def test_cases_csv_matches_the_truth(released):
    root, truth, _ = released
    rows = read_cases_csv(root / RELEASE_FOLDER_NAME / "metadata" / "cases.csv")
    assert [r["case_id"] for r in rows] == sorted(truth)
    for row in rows:
        case = truth[row["case_id"]]
        assert set(METADATA_COLUMNS) <= set(row)
        assert row["tmtv_ml"] == pytest.approx(case.case_json["lesions"]["tmtv_ml"])
        assert row["spacing_xyz"] == case.case_json["geometry"]["spacing_xyz"]
        assert (root / RELEASE_FOLDER_NAME / row["shard"]).is_file()


def test_card_front_matter_parses_and_statistics_come_from_the_data(released):
    root, truth, _ = released
    card = DatasetCard.load(root / RELEASE_FOLDER_NAME / "README.md")
    assert card.data.license == "other"
    assert [c["config_name"] for c in card.data.configs] == ["all", "hl", "nhl", "lesions", "preview"]
    infos = {i["config_name"]: i for i in card.data.dataset_info if i["config_name"] in ("all", "hl", "nhl")}
    for config, info in infos.items():
        # no split sizes: datasets would compare them with what it read and refuse filters= (test_hf_idioms)
        assert "splits" not in info and {f["name"] for f in info["features"]} >= {"ct", "pet", "label", "fold"}
    n_patients = len({c.subject_id for c in truth.values()})
    assert f"{len(truth)} examinations of {n_patients} patients" in card.text
    lesions = sum(c.case_json["lesions"]["count"] for c in truth.values())
    assert f"| {float(lesions)} |" in card.text
    assert "PHI" not in card.text and "/tmp" not in card.text


def test_release_is_byte_identical_when_rebuilt(released, tmp_path):
    root, _, _ = released
    build_release(root / "work", tmp_path / "again", version="1.0.0", workers=1)
    assert _files(tmp_path / "again") == _files(root / RELEASE_FOLDER_NAME)  # and independent of read-ahead


def _rehash(folder: Path) -> None:
    info = json.loads((folder / "case.json").read_text())
    arrays = [np.asanyarray(nib.load(folder / f"{n}.nii.gz").dataobj).transpose(2, 1, 0) for n in IMAGE_COLUMNS]
    info["content_hash"] = content_hash(*arrays, np.asarray(info["geometry"]["affine_ras"]))
    (folder / "case.json").write_text(json.dumps(info))


def _add_exam(work: Path, from_case: str, new_case: str) -> None:
    """A known patient's new exam: a copy of an earlier exam under a new case id, exam index 2."""
    src, dst = work / "cases" / from_case, work / "cases" / new_case
    shutil.copytree(src, dst)
    info = json.loads((dst / "case.json").read_text())
    info["case_id"] = new_case
    info["clinical"]["exam_index"] = 2
    (dst / "case.json").write_text(json.dumps(info))


def test_update_release_moves_no_published_case_and_logs_changes(released, tmp_path):
    root, truth, _ = released
    work = tmp_path / "work"
    shutil.copytree(root / "work", work)
    old_release = root / RELEASE_FOLDER_NAME
    old_files = _files(old_release)
    old_splits = json.loads((old_release / "splits.json").read_text())["cases"]
    new_cases = make_fake_work(work, n_patients=6, seed=0, first_patient=100)
    known = sorted(truth)[0]
    _add_exam(work, known, "LA-NEWEXAM")
    removed = sorted(truth)[-1]
    shutil.rmtree(work / "cases" / removed)
    changed = sorted(truth)[1]
    image = nib.load(work / "cases" / changed / "ct.nii.gz")
    data = np.asanyarray(image.dataobj).copy()
    data[0, 0, 0] += 7
    nib.save(nib.Nifti1Image(data, image.affine, image.header), work / "cases" / changed / "ct.nii.gz")
    _rehash(work / "cases" / changed)  # as a re-convert would

    summary = build_release(work, tmp_path / "v110", version="1.1.0", previous=old_release)
    new_splits = json.loads((tmp_path / "v110" / "splits.json").read_text())["cases"]
    for case_id, entry in old_splits.items():
        if case_id != removed:
            assert (new_splits[case_id]["split"], new_splits[case_id]["fold"]) == (entry["split"], entry["fold"])
    assert (new_splits["LA-NEWEXAM"]["split"], new_splits["LA-NEWEXAM"]["fold"]) == (
        old_splits[known]["split"],
        old_splits[known]["fold"],
    )
    assert summary.changes.added == tuple(sorted([c.case_id for c in new_cases] + ["LA-NEWEXAM"]))
    assert summary.changes.removed == (removed,)
    assert summary.changes.changed == (changed,)
    changelog = (tmp_path / "v110" / "CHANGELOG.md").read_text()
    assert changelog.index("## 1.1.0") < changelog.index("## 1.0.0")
    assert f"- removed (1): {removed}" in changelog and f"- changed (1): {changed}" in changelog
    assert f"| cases | {len(truth)} | {len(truth) + len(new_cases)} |" in changelog
    readme = (tmp_path / "v110" / "README.md").read_text()
    assert "`1.1.0`, `1.0.0`" in readme and f"- removed (1): {removed}" in readme.split("Changes in 1.1.0:")[1]
    # The old version is untouched and still verifies and loads.
    assert _files(old_release) == old_files
    verify_release(old_release)
    assert read_manifest(tmp_path / "v110")["cases"]["LA-NEWEXAM"] == truth[known].case_json["content_hash"]
    ds = datasets.load_dataset(str(tmp_path / "v110"), "all", split="train")
    assert "LA-NEWEXAM" in ds["case_id"] or new_splits["LA-NEWEXAM"]["split"] == "test"
    with pytest.raises(ReleaseError, match="newer"):
        build_release(work, tmp_path / "older", version="1.0.0", previous=old_release)


def test_inputs_are_checked_with_messages_that_say_what_to_do(released, tmp_path):
    root, truth, _ = released
    with pytest.raises(ReleaseError, match="semantic"):
        build_release(root / "work", tmp_path / "r", version="v1")
    with pytest.raises(ReleaseError, match="convert"):
        build_release(tmp_path / "nowork", tmp_path / "r", version="1.0.0")
    with pytest.raises(ReleaseError, match="not empty"):
        build_release(root / "work", root / RELEASE_FOLDER_NAME, version="1.0.0")
    work = tmp_path / "work"
    shutil.copytree(root / "work", work)
    bad = sorted(truth)[0]
    label = nib.load(work / "cases" / bad / "label.nii.gz")
    arr = np.asanyarray(label.dataobj).copy()
    arr[0, 0, 0] = 3
    nib.save(nib.Nifti1Image(arr, label.affine, label.header), work / "cases" / bad / "label.nii.gz")
    with pytest.raises(ReleaseError, match=f"{bad}.*label"):
        build_release(work, tmp_path / "r", version="1.0.0")
    # nothing half-written (the empty lock file .r.lock stays: removing it would race a waiting build)
    assert not (tmp_path / "r").exists() and [p.name for p in tmp_path.glob(".r*")] == [".r.lock"]


def test_cli_release(released, tmp_path, capsys):
    root, truth, _ = released
    rc = builder_main(["release", str(root / "work"), str(tmp_path / "cli"), "--version", "1.0.0", "--quiet"])
    assert rc == 0
    assert f"{len(truth)} cases" in capsys.readouterr().out
    assert _files(tmp_path / "cli") == _files(root / RELEASE_FOLDER_NAME)
    assert builder_main(["release", str(root / "work"), str(tmp_path / "x"), "--version", "bad"]) == 2


def test_load_dataset_by_the_folder_name_from_its_parent(released, monkeypatch):
    root, truth, _ = released
    monkeypatch.chdir(root)
    ds = datasets.load_dataset(RELEASE_FOLDER_NAME, "nhl", split="train")  # literally as in the card
    splits = json.loads((root / RELEASE_FOLDER_NAME / "splits.json").read_text())["cases"]
    assert sorted(ds["case_id"]) == sorted(c for c, e in splits.items() if e["diagnosis"] == "NHL" and e["split"] == "train")
    default = datasets.load_dataset(RELEASE_FOLDER_NAME)  # the default config is "all"
    assert sum(len(d) for d in default.values()) == len(truth)


@pytest.mark.parametrize("volume", ["pet", "label"])
def test_a_voxel_changed_after_convert_is_refused(released, tmp_path, volume):
    """A voxel changed in a WORK file after convert stops the release naming the case and the content hash.
    The label is read first (its lesions are checked before the CT and PET are read): a voxel added to it
    also breaks the lesion items, but the error still says what happened, the content hash."""
    root, truth, _ = released
    work = tmp_path / "work"
    shutil.copytree(root / "work", work)
    victim = sorted(truth)[2]
    path = work / "cases" / victim / f"{volume}.nii.gz"
    image = nib.load(path)
    data = np.asanyarray(image.dataobj).copy()
    if volume == "pet":
        data[1, 1, 1] += 1.0
    else:
        data[0, 0, 0] = 1  # a new one-voxel lesion in a corner
    nib.save(nib.Nifti1Image(data, image.affine, image.header), path)
    with pytest.raises(ReleaseError, match=f"{victim}.*content_hash"):
        build_release(work, tmp_path / "r", version="1.0.0")


def test_cases_written_by_convert_keep_their_float64_affine_and_hash(tmp_path):
    """A case written by builder.convert.case.write_case (convert's writer) with an oblique, non-float32 affine."""
    from builder.convert.case import write_case
    from lymphatlas_synth.fake_work import _lesions

    work = tmp_path / "work"
    make_fake_work(work, n_patients=3)
    base = json.loads(next((work / "cases").glob("*/case.json")).read_text())
    rng = np.random.default_rng(9)
    shape = (6, 7, 8)
    theta = 0.1
    affine = np.array(
        [
            [-0.9765625 * np.cos(theta), 0.9765625 * np.sin(theta), 0.0, 249.51171875 + 1e-7],
            [-0.9765625 * np.sin(theta), -0.9765625 * np.cos(theta), 0.0, 180.3330078],
            [0.0, 0.0, 3.27, -612.123456789],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    ct = rng.integers(-1024, 2000, shape).astype(np.int16)
    pet = rng.gamma(2.0, 1.0, shape).astype(np.float32)
    label = (pet > 3).astype(np.uint8)
    info = dict(base, case_id="LA-OBLIQUE", subject_id="LP-OBLIQUE")
    info["geometry"] = dict(base["geometry"], shape_zyx=list(shape), affine_ras=affine.tolist())
    # the lesion items of this label (the release checks them against it), as fake work computes them
    info["lesions"] = _lesions(ct, pet, label, affine, tuple(np.linalg.norm(affine[:3, :3], axis=0)))
    write_case(work / "cases", info, ct=ct, pet=pet, label=label, affine_ras=affine)
    build_release(work, tmp_path / "r", version="1.0.0")
    ds = datasets.load_dataset(str(tmp_path / "r"), "all")
    row = next(r for split in ds.values() for r in split if r["case_id"] == "LA-OBLIQUE")
    np.testing.assert_array_equal(np.reshape(row["affine"], (4, 4)), affine)  # float64 kept exactly
    np.testing.assert_allclose(row["ct"].affine, affine, atol=1e-4)  # the header's float32 sform
    voxels = [np.asanyarray(row[n].dataobj).transpose(2, 1, 0) for n in IMAGE_COLUMNS]
    for got, want in zip(voxels, (ct, pet, label)):
        np.testing.assert_array_equal(got, want)
    # The client's check, with convert's own hash as the truth.
    written = json.loads((work / "cases" / "LA-OBLIQUE" / "case.json").read_text())["content_hash"]
    assert content_hash(*voxels, np.reshape(row["affine"], (4, 4))) == written
    assert read_manifest(tmp_path / "r")["cases"]["LA-OBLIQUE"] == written


def test_one_case_per_shard_and_the_shards_load_as_one_split(released, tmp_path):
    root, truth, _ = released
    summary = build_release(root / "work", tmp_path / "r", version="1.0.0")
    assert all(len(s.case_ids) == 1 for s in summary.shards)
    assert all(pq.read_metadata(tmp_path / "r" / s.path).num_row_groups == 1 for s in summary.shards)
    hl_train = [s.path for s in summary.shards if s.path.startswith("data/hl/train-")]
    n = len(hl_train)
    assert hl_train == [f"data/hl/train-{i:05d}-of-{n:05d}.parquet" for i in range(n)]
    ds = datasets.load_dataset(str(tmp_path / "r"), "hl", split="train")
    assert sorted(ds["case_id"]) == sorted(c for s in summary.shards if s.path in hl_train for c in s.case_ids)
    rows = read_cases_csv(tmp_path / "r" / "metadata" / "cases.csv")
    assert {r["case_id"]: r["shard"] for r in rows} == {c: s.path for s in summary.shards for c in s.case_ids}


def test_a_case_gone_from_the_source_is_refused_unless_kept_and_a_withdrawal_is_listed_as_removed(released, tmp_path):
    from builder.convert.pipeline import read_id_map, withdraw_exams

    root, truth, _ = released
    work = tmp_path / "work"
    shutil.copytree(root / "work", work)
    old_release = root / RELEASE_FOLDER_NAME
    old_files = _files(old_release)
    exam_of = {row["case_id"]: exam for exam, row in read_id_map(work).items()}
    gone = sorted(truth)[2]
    # what convert records when an exam's DICOM folder has left the source
    (work / "build.json").write_text(json.dumps({"gone_from_source": {exam_of[gone]: gone}}))
    with pytest.raises(ReleaseError, match=f"{gone}.*withdraw {work} {exam_of[gone]}.*--keep-gone"):
        build_release(work, tmp_path / "refused", version="1.1.0", previous=old_release)
    assert not (tmp_path / "refused").exists()
    rc = builder_main(["release", str(work), str(tmp_path / "kept"), "--version", "1.1.0", "--previous",
                       str(old_release), "--keep-gone", "--quiet"])
    assert rc == 0 and gone in read_manifest(tmp_path / "kept")["cases"]
    assert withdraw_exams(work, [exam_of[gone]]) == {exam_of[gone]: gone}
    summary = build_release(work, tmp_path / "v110", version="1.1.0", previous=old_release)
    assert summary.changes.removed == (gone,) and summary.changes.added == () and summary.changes.changed == ()
    assert gone not in read_manifest(tmp_path / "v110")["cases"]
    changelog = (tmp_path / "v110" / "CHANGELOG.md").read_text()
    assert f"- removed (1): {gone}" in changelog.split("## 1.0.0")[0]
    assert _files(old_release) == old_files  # the published version keeps the case (README: withdrawing)


def test_a_full_disk_names_the_path_and_leaves_the_previous_release(released, tmp_path, monkeypatch):
    import errno

    import builder.release.build as release_mod

    root, truth, _ = released
    target = tmp_path / "rel"
    shutil.copytree(root / RELEASE_FOLDER_NAME, target)
    before = _files(target)

    def full_disk(path, data, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(release_mod, "write_atomic", full_disk)
    with pytest.raises(ReleaseError) as info:
        build_release(root / "work", target, version="1.0.0", overwrite=True)
    message = str(info.value)
    assert "No space left on device" in message and str(tmp_path / ".rel.partial") in message
    assert "free space" in message and f"{target} is as it was" in message
    assert _files(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".rel.lock", "rel"]  # no partial folder left


def test_a_release_killed_with_sigkill_while_it_writes_leaves_the_previous_release(released, tmp_path):
    """`python -m builder release --overwrite` killed with SIGKILL once its hidden .partial folder holds
    files: the release folder is the previous one byte for byte and verifies; the rerun completes and clears
    what the killed run left. The default suite's version of tests/test_faults.py's random kills."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root, _, _ = released
    target = tmp_path / "rel"
    shutil.copytree(root / RELEASE_FOLDER_NAME, target)
    before = _files(target)
    repo = Path(__file__).resolve().parents[1]
    args = [sys.executable, "-m", "builder", "release", str(root / "work"), str(target), "--version", "1.0.0",
            "--overwrite", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    partial = tmp_path / ".rel.partial"
    deadline = time.monotonic() + 180
    while not (partial.is_dir() and any(p.is_file() for p in partial.rglob("*"))):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert target.is_dir() and _files(target) == before  # not half: the previous release, as it was
    verify_release(target)
    rerun = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert _files(target) == before  # the same WORK and version: the same bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == [".rel.lock", "rel"]  # the killed run's .partial cleared


def test_a_second_build_of_the_same_release_is_refused_naming_the_holder(released, tmp_path):
    import os
    import subprocess
    import sys

    root, _, _ = released
    code = ("import sys, time; from lymphatlas_ds._lock import target_lock\n"
            "with target_lock(sys.argv[1], what='release folder'):\n    print('held', flush=True); time.sleep(30)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "rel")], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        assert holder.stdout.readline().strip() == "held"
        from lymphatlas_ds._lock import LockedError

        with pytest.raises(LockedError, match=f"release folder {tmp_path / 'rel'} is in use: PID {holder.pid}"):
            build_release(root / "work", tmp_path / "rel", version="1.0.0")
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "rel").exists()
