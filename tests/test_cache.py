"""lymphatlas_ds.cache: decoded entries against the WORK truth, concurrency, invalidation, damage."""

from __future__ import annotations

import multiprocessing
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import lymphatlas_ds.cache as cache_mod
from lymphatlas_ds import manifest as manifest_mod
from lymphatlas_ds.cache import CacheError, DecodedCache, _ContentHasher
from lymphatlas_ds.errors import IntegrityError
from lymphatlas_ds.release import Release
from tests.support.releases import build_fake_release


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    release = build_fake_release(root, n_patients=5, seed=9, shape_zyx=(18, 22, 26))
    return release.path, release.truth


def release_of(path: Path, tmp_path: Path, **kw) -> Release:
    return Release(path, state_dir=tmp_path / "state", **kw)


def test_incremental_hash_equals_the_manifest_content_hash():
    rng = np.random.default_rng(0)
    ct = rng.integers(-1024, 3000, (5, 6, 7)).astype(np.int16)
    pet = rng.gamma(2.0, 1.0, (5, 6, 7)).astype(">f4")  # byte order must not matter
    label = (rng.random((5, 6, 7)) > 0.8).astype(np.uint8)
    affine = np.diag([-2.0, -2.0, 3.0, 1.0])
    hasher = _ContentHasher()
    for name, array in (("ct", ct), ("pet", pet), ("label", label)):
        hasher.update(name, array[:, ::-1, :])  # a non-contiguous view
    want = manifest_mod.content_hash(ct[:, ::-1, :], pet[:, ::-1, :], label[:, ::-1, :], affine)
    assert hasher.hexdigest(affine) == want


def test_entry_holds_the_work_voxels_and_foreground_positions(built, tmp_path):
    path, truth = built
    release = release_of(path, tmp_path)
    cache = DecodedCache(tmp_path / "cache")
    for case_id in release.case_ids("all", "train"):
        entry = cache.ensure(release, case_id)
        want = truth[case_id]
        assert entry.shape == want.ct.shape
        np.testing.assert_array_equal(entry.read("ct"), want.ct)
        np.testing.assert_array_equal(entry.read("pet"), want.pet)
        np.testing.assert_array_equal(entry.read("label"), want.label)
        np.testing.assert_allclose(entry.affine, want.affine, atol=1e-5)
        box = (slice(2, 9), slice(5, 22), slice(0, 4))
        np.testing.assert_array_equal(entry.read_patch("pet", box), want.pet[box])
        fg = entry.foreground()
        assert entry.foreground_count == int(want.label.sum()) == len(fg)
        assert sorted(map(tuple, fg)) == sorted(map(tuple, np.argwhere(want.label > 0)))
        assert entry.path.parent.name == "1.0.0"
        assert entry.path.name.endswith(release.manifest["cases"][case_id][:16])
    leftovers = [p for p in (tmp_path / "cache").rglob("*") if p.name.endswith(".partial")]
    assert leftovers == []


def test_foreground_sample_is_capped_and_seeded(built, tmp_path, monkeypatch):
    path, truth = built
    monkeypatch.setattr(cache_mod, "MAX_FOREGROUND_SAMPLES", 5)
    release = release_of(path, tmp_path)
    case_id = max(release.case_ids("all", "train"), key=lambda c: truth[c].label.sum())
    assert truth[case_id].label.sum() > 5
    a = DecodedCache(tmp_path / "a").ensure(release, case_id).foreground()
    b = DecodedCache(tmp_path / "b").ensure(release, case_id).foreground()
    assert len(a) == 5 and np.array_equal(a, b)
    assert all(truth[case_id].label[tuple(p)] == 1 for p in a)


class CountingCache(DecodedCache):
    """Records each build in a file (one line per build, appended atomically by O_APPEND)."""

    def _build(self, release, case_id, content_hash, path):
        with open(self.root.parent / "builds.log", "a") as f:
            f.write(f"{os.getpid()} {case_id}\n")
        super()._build(release, case_id, content_hash, path)


def _ensure_in_process(args):
    release_path, state, root, case_id = args
    entry = CountingCache(root).ensure(Release(release_path, state_dir=state), case_id)
    return entry.read("ct").sum(dtype=np.int64), str(entry.path)


def test_concurrent_threads_and_processes_build_once(built, tmp_path):
    path, truth = built
    ids = Release(path, remember=False).case_ids("all", "train")[:2]
    for kind in ("processes", "threads"):
        root = tmp_path / kind / "cache"
        jobs = [(path, tmp_path / "state", root, case_id) for case_id in ids for _ in range(3)]
        if kind == "processes":
            with multiprocessing.get_context("fork").Pool(3) as pool:
                results = pool.map(_ensure_in_process, jobs)
        else:
            with ThreadPoolExecutor(4) as ex:
                results = list(ex.map(_ensure_in_process, jobs))
        for (_, _, _, case_id), (total, _) in zip(jobs, results):
            assert total == truth[case_id].ct.sum(dtype=np.int64)
        builds = (tmp_path / kind / "builds.log").read_text().split("\n")[:-1]
        assert sorted(b.split()[1] for b in builds) == sorted(ids), kind  # each case built exactly once
        names = [p.name for p in (root / "1.0.0").iterdir()]
        assert len([n for n in names if not n.startswith(".")]) == 2
        assert not [n for n in names if n.endswith(".partial")]


def test_same_version_other_content_gets_its_own_entry(built, tmp_path):
    """Keyed by the manifest's content hash: a changed case never reads a stale entry."""
    path, truth = built
    other = build_fake_release(tmp_path / "other", n_patients=5, seed=10, shape_zyx=(18, 22, 26))
    cache = DecodedCache(tmp_path / "cache")
    a = release_of(path, tmp_path)
    b = release_of(other.path, tmp_path)
    id_a = a.case_ids("all", "train")[0]
    id_b = b.case_ids("all", "train")[0]
    ea, eb = cache.ensure(a, id_a), cache.ensure(b, id_b)
    assert ea.path != eb.path
    np.testing.assert_array_equal(ea.read("pet"), truth[id_a].pet)
    np.testing.assert_array_equal(eb.read("pet"), other.truth[id_b].pet)
    removed = cache.prune({"1.0.0": {ea.path.name}})
    assert removed == [eb.path] and ea.path.is_dir() and not eb.path.exists()


def test_half_written_entry_is_rebuilt(built, tmp_path):
    path, truth = built
    release = release_of(path, tmp_path)
    case_id = release.case_ids("all", "train")[0]
    cache = DecodedCache(tmp_path / "cache")
    target = cache.entry_path("1.0.0", case_id, release.manifest["cases"][case_id])
    target.mkdir(parents=True)
    (target / "ct.b2nd").write_bytes(b"half")  # no case.json: an interrupted foreign writer
    entry = cache.ensure(release, case_id)
    np.testing.assert_array_equal(entry.read("ct"), truth[case_id].ct)


def test_damaged_entry_file_names_the_fix(built, tmp_path):
    path, _ = built
    release = release_of(path, tmp_path)
    case_id = release.case_ids("all", "train")[0]
    entry = DecodedCache(tmp_path / "cache").ensure(release, case_id)
    file = entry.path / "pet.b2nd"
    file.write_bytes(file.read_bytes()[:200])
    fresh = DecodedCache(tmp_path / "cache").ensure(release, case_id)
    with pytest.raises(CacheError, match="rebuilt on next use") as e:
        fresh.read("pet")
    assert str(entry.path) in str(e.value)


def test_corrupt_shard_never_reaches_the_cache(built, tmp_path):
    path, truth = built
    copy = tmp_path / "release"
    shutil.copytree(path, copy)
    rel = Release(copy, remember=False).shards("all", "train")[0]
    data = bytearray((copy / rel).read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0x3C
    (copy / rel).write_bytes(bytes(data))
    release = Release(copy, verify=False, remember=False)  # skip the sha256: the content hash still guards
    cache = DecodedCache(tmp_path / "cache")
    failed = []
    for case_id in release.case_ids("all", "train"):
        try:
            entry = cache.ensure(release, case_id)
        except IntegrityError as e:
            assert case_id in str(e) and "lymphatlas verify" in str(e)
            failed.append(case_id)
            assert not cache.entry_path("1.0.0", case_id, release.manifest["cases"][case_id]).exists()
        else:
            np.testing.assert_array_equal(entry.read("pet"), truth[case_id].pet)
    assert failed
    assert not list((tmp_path / "cache").rglob("*.partial"))


def test_read_into_fills_the_given_buffer(built, tmp_path):
    path, truth = built
    release = release_of(path, tmp_path)
    case_id = release.case_ids("all", "train")[0]
    entry = DecodedCache(tmp_path / "cache").ensure(release, case_id)
    image = np.zeros((2, 7, 9, 11), np.float32)
    box = (slice(3, 10), slice(1, 10), slice(12, 23))
    entry.read_into("pet", box, image[1])
    np.testing.assert_array_equal(image[1], truth[case_id].pet[box])
    assert not image[0].any()
    whole = np.empty(entry.shape, np.float32)
    np.testing.assert_array_equal(entry.read_into("pet", (slice(None),) * 3, whole), truth[case_id].pet)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        entry.read_into("pet", box, np.zeros((7, 9, 11), np.float64))
