"""lymphatlas_ds.reader.Release against releases built from fake WORK folders with known arrays."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lymphatlas_ds import manifest as manifest_mod
from lymphatlas_ds.errors import IntegrityError, SchemaError
from lymphatlas_ds.reader import Release
from tests.support.releases import build_fake_release


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("release_reader")
    release = build_fake_release(root, n_patients=14, seed=3)
    return release.path, release.truth


@pytest.fixture
def release_copy(built, tmp_path):
    """A private copy of the release that a test may damage."""
    src, truth = built
    dst = tmp_path / "release"
    shutil.copytree(src, dst)
    return dst, truth


def open_release(path: Path, tmp_path: Path, **kw) -> Release:
    return Release(path, state_dir=tmp_path / "state", **kw)


def test_every_case_decodes_to_the_work_arrays(built, tmp_path):
    path, truth = built
    release = open_release(path, tmp_path)
    seen = []
    for split in ("train", "test"):
        for case in release.iter_cases("all", split, check_content=True):
            want = truth[case.case_id]
            seen.append(case.case_id)
            assert case.ct.dtype == np.int16 and case.pet.dtype == np.float32 and case.label.dtype == np.uint8
            np.testing.assert_array_equal(case.ct, want.ct)
            np.testing.assert_array_equal(case.pet, want.pet)
            np.testing.assert_array_equal(case.label, want.label)
            np.testing.assert_allclose(case.affine, want.affine, atol=1e-5)
            assert case.meta["subject_id"] == want.subject_id
            assert case.meta["diagnosis"] == want.diagnosis
            assert case.meta["split"] == split
    assert sorted(seen) == sorted(truth)


def test_configs_select_by_diagnosis_and_splits_follow_splits_json(built, tmp_path):
    path, truth = built
    release = open_release(path, tmp_path)
    table = json.loads((path / "splits.json").read_text())["cases"]
    for config, diagnoses in (("hl", {"HL"}), ("nhl", {"NHL"}), ("all", {"HL", "NHL"})):
        for split in ("train", "test"):
            ids = release.case_ids(config, split)
            expected = {c for c, t in truth.items() if t.diagnosis in diagnoses and table[c]["split"] == split}
            assert set(ids) == expected
            meta = release.cases_table(config, split).to_pylist()
            assert {row["case_id"] for row in meta} == expected
            assert all(row["diagnosis"] in diagnoses for row in meta)
    assert release.cases_table("all").num_rows == len(truth)


def test_folds_are_disjoint_cover_train_and_match_splits_json(built, tmp_path):
    path, truth = built
    release = open_release(path, tmp_path)
    table = json.loads((path / "splits.json").read_text())["cases"]
    train = set(release.case_ids("all", "train"))
    vals = []
    for k in range(5):
        val = set(release.fold_case_ids(k, "val"))
        tr = set(release.fold_case_ids(k, "train"))
        assert val == {c for c in train if table[c]["fold"] == k}
        assert val.isdisjoint(tr) and val | tr == train
        # patient-grouped: no subject on both sides of a fold
        assert {truth[c].subject_id for c in val}.isdisjoint({truth[c].subject_id for c in tr})
        vals.append(val)
    assert set().union(*vals) == train and sum(len(v) for v in vals) == len(train)
    with pytest.raises(SchemaError, match="fold"):
        release.fold_case_ids(5, "val")
    with pytest.raises(SchemaError, match="subset"):
        release.fold_case_ids(0, "holdout")


def test_read_one_volume_and_meta(built, tmp_path):
    path, truth = built
    release = open_release(path, tmp_path)
    case_id = sorted(truth)[0]
    label, affine = release.read_volume(case_id, "label")
    np.testing.assert_array_equal(label, truth[case_id].label)
    meta = release.read_meta(case_id)
    assert meta["shape_xyz"] == list(truth[case_id].ct.shape)[::-1]
    assert meta["content_hash"] == release.manifest["cases"][case_id]
    with pytest.raises(SchemaError, match="LA-nope"):
        release.read_case("LA-nope")


def test_modified_shard_is_detected_naming_the_file(release_copy, tmp_path):
    path, _ = release_copy
    release = open_release(path, tmp_path)
    shard = path / release.shards("nhl", "train")[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as e:
        list(release.iter_cases("nhl", "train"))
    assert shard.name in str(e.value) and "lymphatlas verify" in str(e.value)


def test_truncated_shard_is_detected_with_and_without_verification(release_copy, tmp_path):
    path, _ = release_copy
    rel = open_release(path, tmp_path).shards("hl", "train")[0]
    shard = path / rel
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(IntegrityError, match="truncated"):
        open_release(path, tmp_path).case_ids("hl", "train")
    with pytest.raises(IntegrityError, match="not a readable parquet") as e:
        open_release(path, tmp_path, verify=False).case_ids("hl", "train")
    assert rel.split("/")[-1] in str(e.value)


def test_corrupt_voxels_without_file_verification_fail_the_content_hash(release_copy, tmp_path):
    """verify=False skips the sha256, but a decoded case still never comes back silently wrong."""
    path, truth = release_copy
    release = open_release(path, tmp_path, verify=False)
    rel = release.shards("all", "train")[0]
    shard = path / rel
    data = bytearray(shard.read_bytes())
    # Damage the middle of the file (inside a volume's compressed pages).
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0x5A
    shard.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        for case in Release(path, verify=False, remember=False).iter_cases("all", "train", check_content=True):
            pass


def test_missing_file_is_an_integrity_error(release_copy, tmp_path):
    path, _ = release_copy
    (path / "splits.json").unlink()
    with pytest.raises(IntegrityError, match="splits.json is missing"):
        open_release(path, tmp_path).splits


def test_verification_is_remembered_until_the_file_changes(release_copy, tmp_path, monkeypatch):
    path, _ = release_copy
    calls = []
    real = manifest_mod.sha256_file
    monkeypatch.setattr(manifest_mod, "sha256_file", lambda p: calls.append(Path(p).name) or real(p))
    first = open_release(path, tmp_path)
    ids = first.case_ids("all", "train")
    first.read_case(ids[0])
    n_first = len(calls)
    assert n_first >= 2  # the train shards
    second = open_release(path, tmp_path)  # a new process would see the same record
    second.read_case(second.case_ids("all", "train")[0])
    assert len(calls) == n_first
    # A same-size modification changes the mtime: checked again and caught.
    shard = path / first.shards("all", "train")[0]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=shard.name):
        open_release(path, tmp_path).case_ids("all", "train")


def test_not_a_release_folder(tmp_path):
    with pytest.raises(SchemaError, match="not a LymphAtlas release"):
        Release(tmp_path, remember=False)


def test_only_the_shards_used_are_hashed(built, tmp_path, monkeypatch):
    path, _ = built
    hashed = []
    real = manifest_mod.sha256_file
    monkeypatch.setattr(manifest_mod, "sha256_file", lambda p: hashed.append(Path(p).as_posix()) or real(p))
    release = open_release(path, tmp_path)
    release.case_ids("hl", "test")
    shards = [h for h in hashed if h.endswith(".parquet")]
    assert len(shards) == 1 and "/data/hl/test-" in shards[0]


def test_unwritable_state_folder_only_costs_a_recheck(built, tmp_path):
    path, truth = built
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")  # a file where the state folder should be: nothing can be written under it
    release = Release(path, state_dir=blocker)
    case = next(release.iter_cases("all", "test"))
    np.testing.assert_array_equal(case.pet, truth[case.case_id].pet)


def _modify_in_place_keeping_size_and_mtime(shard: Path) -> None:
    import os

    st = shard.stat()
    with open(shard, "r+b") as f:  # the same file (inode), rewritten in place
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([byte[0] ^ 0x01]))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = shard.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)


def test_no_cache_loader_checks_bytes_not_path_size_and_mtime(release_copy, tmp_path):
    from lymphatlas_ds import load_lymphatlas

    path, truth = release_copy
    cache_dir = tmp_path / "cache"
    for cache in (True, False):  # both record or remember what they checked, as a user's earlier runs would
        first = load_lymphatlas(path, split="train", cache=cache, cache_dir=cache_dir)
        np.testing.assert_array_equal(first[0]["label"][0].numpy(), truth[first.case_ids[0]].label)
    probe = Release(path, state_dir=cache_dir)
    shard = path / probe.shards("all", "train")[0]
    _modify_in_place_keeping_size_and_mtime(shard)
    # Silent corruption (a bad disk, a flipped bit) leaves even the change time alone: make the record
    # of the earlier passed check match the file's metadata as it is now.
    import os

    real = os.path.realpath(shard)
    st = os.stat(real)
    record = probe._record_path(real, probe.manifest["files"][shard.relative_to(path).as_posix()]["sha256"])
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(f"{st.st_size} {st.st_ino} {st.st_mtime_ns} {st.st_ctime_ns}")
    with pytest.raises(IntegrityError, match=shard.name):
        dataset = load_lymphatlas(path, split="train", cache=False, cache_dir=cache_dir)
        for i in range(len(dataset)):
            dataset[i]


def test_a_recorded_check_is_not_trusted_after_an_in_place_change_with_mtime_restored(release_copy, tmp_path):
    path, _ = release_copy
    release = open_release(path, tmp_path)  # records the passed check under the state folder
    release.case_ids("all", "train")
    shard = path / release.shards("all", "train")[0]
    _modify_in_place_keeping_size_and_mtime(shard)
    with pytest.raises(IntegrityError, match=shard.name):
        open_release(path, tmp_path).case_ids("all", "train")


def test_one_release_read_from_many_threads_at_once(built):
    """Materialize, the cache build and prepare() read one Release from threads: every read must
    return the case's own values (a shared pyarrow ParquetFile mixed up ranges, "ReadRangeCache did not
    find matching cache entry", in 1-3 of 20 rounds on a 12-case release)."""
    from concurrent.futures import ThreadPoolExecutor

    path, truth = built
    release = Release(path, remember=False)
    ids = sorted(truth)
    jobs = [(cid, name) for cid in ids for name in ("meta", "ct", "pet", "label")]

    def read(job):
        cid, name = job
        if name == "meta":
            return release.read_meta(cid)["case_id"] == cid
        array, _ = release.read_volume(cid, name)
        return np.array_equal(array, getattr(truth[cid], name))

    for _ in range(40):
        with ThreadPoolExecutor(8) as pool:
            assert all(pool.map(read, jobs))
