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
from lymphatlas_ds.reader import Release
from tests.support.releases import build_fake_release
from tests.support.disk import small_tmpfs


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


def test_damaged_entry_is_rebuilt_on_open_and_a_held_one_names_the_fix(built, tmp_path, caplog):
    path, truth = built
    release = release_of(path, tmp_path)
    case_id = release.case_ids("all", "train")[0]
    cache = DecodedCache(tmp_path / "cache")
    entry = cache.ensure(release, case_id)
    file = entry.path / "pet.b2nd"
    file.write_bytes(file.read_bytes()[:200])
    with pytest.raises(CacheError, match="rebuilt on next use") as e:
        entry.read("pet")  # an entry opened before the damage
    assert str(entry.path) in str(e.value)
    fresh = cache.ensure(release, case_id)  # its checksum fails on open: rebuilt
    np.testing.assert_array_equal(fresh.read("pet"), truth[case_id].pet)
    assert f"{file} does not match its checksum" in caplog.text


def test_a_flipped_bit_in_an_entry_is_caught_by_its_checksum(built, tmp_path):
    path, truth = built
    release = release_of(path, tmp_path)
    case_id = release.case_ids("all", "train")[1]
    cache = DecodedCache(tmp_path / "cache")
    entry = cache.ensure(release, case_id)
    file = entry.path / "ct.b2nd"
    original = file.read_bytes()
    # A flip in the compressed chunks, same size, that blosc2 decodes without error (one in a block's
    # header or a chunk's offsets raises in blosc2 instead, which would not show that the checksum is what
    # stands between it and the user): the first such one from the middle of the file on.
    for position in range(len(original) // 2, len(original), 997):
        data = bytearray(original)
        data[position] ^= 0x10
        file.write_bytes(bytes(data))
        try:
            served = DecodedCache._load(entry.path, verify=False).read("ct")  # unchecked
        except CacheError:
            continue
        if np.count_nonzero(served != truth[case_id].ct):
            break
    else:
        pytest.fail("no flip decoded silently")
    content_hash = release.manifest["cases"][case_id]
    assert cache.open("1.0.0", case_id, content_hash) is None
    np.testing.assert_array_equal(cache.ensure(release, case_id).read("ct"), truth[case_id].ct)
    assert cache.open("1.0.0", case_id, content_hash) is not None


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


def _leftover(cache: DecodedCache, release: Release, case_id: str) -> Path:
    """A .partial folder as a build killed half-way leaves it."""
    entry = cache.entry_path(release.version, case_id, release.manifest["cases"][case_id])
    partial = entry.parent / f".{entry.name}.k1ll3d{cache_mod._PARTIAL}"
    partial.mkdir(parents=True)
    (partial / "ct.b2nd").write_bytes(b"half a volume")
    return partial


def test_partial_folders_are_cleaned_by_the_next_build_and_by_prune(built, tmp_path):
    from filelock import FileLock

    path, truth = built
    release = release_of(path, tmp_path)
    ids = release.case_ids("all", "train")
    cache = DecodedCache(tmp_path / "cache")
    first = _leftover(cache, release, ids[0])
    entry = cache.ensure(release, ids[0])
    assert not first.exists()
    np.testing.assert_array_equal(entry.read("ct"), truth[ids[0]].ct)
    second, third = _leftover(cache, release, ids[1]), _leftover(cache, release, ids[2])
    busy = FileLock(str(third.parent / ".locks" / f"{third.name[1:].split('.')[0]}.lock"))
    with busy:  # a build of ids[2] in progress elsewhere: its .partial is not touched
        removed = cache.prune({release.version: {entry.path.name}})
    assert second in removed and not second.exists()
    assert third.exists() and third not in removed
    assert entry.path.exists()
    assert cache.prune({release.version: {entry.path.name}}) == [third]
    # the next load clears leftovers of other cases too, on its first use of the version
    other = _leftover(cache, release, ids[3])
    DecodedCache(tmp_path / "cache").ensure(release, ids[0])
    assert not other.exists()


def test_blosc2_error_during_the_build_names_the_file_and_leaves_nothing(built, tmp_path, monkeypatch):
    import blosc2

    path, _ = built
    release = release_of(path, tmp_path)
    case_id = release.case_ids("all", "train")[0]
    cache = DecodedCache(tmp_path / "cache")

    def full(*args, **kwargs):
        raise RuntimeError("Error while creating the NDArray")

    monkeypatch.setattr(blosc2, "asarray", full)
    with pytest.raises(CacheError) as e:
        cache.ensure(release, case_id)
    entry = cache.entry_path(release.version, case_id, release.manifest["cases"][case_id])
    assert f"{entry / 'ct.b2nd'}" in str(e.value) and "Error while creating the NDArray" in str(e.value)
    assert "LYMPHATLAS_CACHE" in str(e.value)
    assert not entry.exists() and not list(entry.parent.glob("*.partial"))


def test_a_full_disk_during_the_cache_build_names_the_path_and_the_cause(built, tmp_path):
    """A real full disk: a 16 KiB tmpfs (needs root and mount rights; skipped otherwise)."""
    path, truth = built
    with small_tmpfs(tmp_path / "small_disk", "16k") as mnt:
        release = release_of(path, tmp_path)
        cache = DecodedCache(mnt / "cache")
        with pytest.raises(CacheError) as e:
            for case_id in release.case_ids("all", "train"):
                cache.ensure(release, case_id)
        message = str(e.value)
        assert str(mnt / "cache") in message and ".b2nd" in message and "the disk holding it is full" in message
        assert not list((mnt / "cache").rglob("*.partial"))
        # every entry that exists is whole and right
        for entry_dir in (mnt / "cache" / release.version).glob("LA-*"):
            entry = DecodedCache._load(entry_dir)
            assert entry is not None
            np.testing.assert_array_equal(entry.read("pet"), truth[entry.case_id].pet)
            del entry  # its blosc2 handle keeps the mount busy


_BUILD_SCRIPT = """
import sys
from lymphatlas_ds.cache import DecodedCache
from lymphatlas_ds.reader import Release
release = Release(sys.argv[1], remember=False)
cache = DecodedCache(sys.argv[2])
print("ready", flush=True)
for case_id in release.case_ids("all", "train") + release.case_ids("all", "test"):
    cache.ensure(release, case_id)
print("done", flush=True)
"""


_DYING_BUILD = """
import os, sys
import lymphatlas_ds.cache as cache_mod
from lymphatlas_ds.cache import DecodedCache
from lymphatlas_ds.reader import Release
where, entry = sys.argv[3], int(sys.argv[4])
calls = {"replace": 0, "compress": 0}
replace, compress = os.replace, DecodedCache._compress
def dying_replace(src, dst):  # the process dies as the entry's complete folder is about to be renamed
    calls["replace"] += str(src).endswith(".partial")
    if where == "rename" and calls["replace"] == entry:
        os._exit(137)
    return replace(src, dst)
def dying_compress(self, array, target, path, case_id):  # or half-way through an entry's volumes
    calls["compress"] += 1
    if where == "volume" and calls["compress"] == 3 * (entry - 1) + 2:
        os._exit(137)
    return compress(self, array, target, path, case_id)
cache_mod.os.replace = dying_replace
DecodedCache._compress = dying_compress
release = Release(sys.argv[1], remember=False)
cache = DecodedCache(sys.argv[2])
for case_id in release.case_ids("all", "train") + release.case_ids("all", "test"):
    cache.ensure(release, case_id)
"""


@pytest.mark.parametrize("where", ["volume", "rename"])
def test_a_cache_build_that_dies_mid_entry_leaves_a_cache_that_serves_the_right_voxels(built, tmp_path, where):
    """The default-run version of the random-kill test below: a real process dies abruptly (no cleanup)
    half-way through the second entry's volumes, or with it complete but not yet renamed into place."""
    import subprocess
    import sys

    path, truth = built
    repo = Path(__file__).resolve().parents[1]
    root = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-c", _DYING_BUILD, str(path), str(root), where, "2"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(repo)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 137, proc.stderr
    release = Release(path, remember=False)
    ids = release.case_ids("all", "train") + release.case_ids("all", "test")
    entries = [p for p in (root / release.version).iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1  # the first case only: the second never appeared under its name
    assert len(list((root / release.version).glob("*.partial"))) == 1  # its half-built folder, hidden
    cache = DecodedCache(root)
    for case_id in ids:
        entry = cache.ensure(release, case_id)
        for name in ("ct", "pet", "label"):
            np.testing.assert_array_equal(entry.read(name), getattr(truth[case_id], name))
    cache.prune({release.version: {cache.entry_path(release.version, c, h).name
                                   for c, h in release.manifest["cases"].items()}})
    assert not list(root.rglob("*.partial"))
    assert sorted(p.name for p in (root / release.version).iterdir() if p.name != ".locks") == sorted(
        cache.entry_path(release.version, c, release.manifest["cases"][c]).name for c in ids)


@pytest.mark.slow
def test_a_cache_build_killed_at_random_points_leaves_a_cache_that_serves_the_right_voxels(built, tmp_path):
    import random
    import signal
    import subprocess
    import sys
    import time

    path, truth = built
    repo = Path(__file__).resolve().parents[1]
    rng = random.Random(12)
    duration = None
    interrupted = 0
    for attempt in range(5):
        root = tmp_path / f"cache{attempt}"
        proc = subprocess.Popen([sys.executable, "-c", _BUILD_SCRIPT, str(path), str(root)], cwd=tmp_path,
                                env={**os.environ, "PYTHONPATH": str(repo)}, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        t0 = time.perf_counter()
        if duration is None:  # the first run measures how long the whole build takes
            assert proc.stdout.readline().strip() == "done"
            duration = time.perf_counter() - t0
            proc.wait(timeout=60)
            continue
        time.sleep(rng.uniform(0.0, duration))  # somewhere in the builds of the cases
        proc.send_signal(signal.SIGKILL)
        interrupted += "done" not in proc.stdout.read()
        proc.wait(timeout=60)
        # the next load works and serves exactly the release's voxels
        release = Release(path, remember=False)
        cache = DecodedCache(root)
        for split in ("train", "test"):
            for case_id in release.case_ids("all", split):
                entry = cache.ensure(release, case_id)
                for name in ("ct", "pet", "label"):
                    np.testing.assert_array_equal(entry.read(name), getattr(truth[case_id], name))
        cache.prune({release.version: {cache.entry_path(release.version, c, h).name
                                       for c, h in release.manifest["cases"].items()}})
        assert not list(root.rglob("*.partial"))
    assert interrupted >= 2  # most kills landed before the build finished
