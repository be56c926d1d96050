"""Publishing: the local mirror keeps every version intact and loadable; the Hub plan up to the network."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationDelete

import builder.release.publish as publish_mod
from builder.__main__ import main as builder_main
from builder.release.publish import PublishError, plan_hub_operations, publish_hub, publish_mirror, read_versions
from builder.release.build import build_release
from lymphatlas_ds.manifest import read_manifest, sha256_file, verify_release
from lymphatlas_synth.fake_work import make_fake_work
from tests.support.releases import build_fake_release, datasets_cache_in_tmp  # noqa: F401 (fixture)


# datasets' arrow cache of these small releases stays out of the user's cache folder
pytestmark = pytest.mark.usefixtures("datasets_cache_in_tmp")



@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    root = tmp_path_factory.mktemp("pub")
    first = build_fake_release(root, n_patients=8, seed=0, name="r100")
    build_fake_release(root, n_patients=4, seed=0, first_patient=50, version="1.1.0", name="r110", previous=first.path)
    return root


def test_previous_may_be_a_mirror_meaning_its_latest_version(releases, tmp_path):
    mirror = tmp_path / "mirror"
    publish_mirror(releases / "r100", mirror)
    build_release(releases / "work", tmp_path / "via_mirror", version="1.1.0", previous=mirror)
    assert (tmp_path / "via_mirror" / "splits.json").read_bytes() == (releases / "r110" / "splits.json").read_bytes()
    assert (tmp_path / "via_mirror" / "CHANGELOG.md").read_bytes() == (releases / "r110" / "CHANGELOG.md").read_bytes()


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"  # the mirror's lock file is rewritten by every publish
    }


def test_mirror_keeps_every_version_loadable_and_untouched(releases, tmp_path):
    mirror = tmp_path / "mirror"
    assert publish_mirror(releases / "r100", mirror) == mirror / "1.0.0"
    assert read_versions(mirror) == {"latest": "1.0.0", "versions": ["1.0.0"]}
    first = _snapshot(mirror / "1.0.0")
    publish_mirror(releases / "r110", mirror)
    assert read_versions(mirror) == {"latest": "1.1.0", "versions": ["1.0.0", "1.1.0"]}
    assert _snapshot(mirror / "1.0.0") == first  # bytes and modification times
    verify_release(mirror / "1.0.0")
    verify_release(mirror / "1.1.0")
    old = datasets.load_dataset(str(mirror / "1.0.0"), "all", split="train")
    new = datasets.load_dataset(str(mirror / "1.1.0"), "all", split="train")
    assert set(old["case_id"]) < set(new["case_id"])  # the update only added cases here
    # the hidden lock file stays (removing it would race a waiting publish), empty once released
    assert sorted(p.name for p in mirror.iterdir()) == [".lock", "1.0.0", "1.1.0", "README.md", "versions.json"]
    assert (mirror / ".lock").read_text() == ""


def _split_cases(release: Path, split: str, config: str) -> set[str]:
    cases = json.loads((release / "splits.json").read_text())["cases"]
    return {c for c, e in cases.items() if e["split"] == split and config in ("all", e["diagnosis"].lower())}


def test_the_mirror_root_reads_the_newest_version_and_never_merges_versions(releases, tmp_path):
    mirror = tmp_path / "mirror"
    publish_mirror(releases / "r100", mirror)
    publish_mirror(releases / "r110", mirror)
    default = datasets.load_dataset(str(mirror), split="train")  # what a user types first
    assert len(default) == len(set(default["case_id"])) == len(_split_cases(releases / "r110", "train", "all"))
    for config in ("all", "hl", "nhl"):
        for split in ("train", "test"):
            root = datasets.load_dataset(str(mirror), config, split=split)
            assert sorted(root["case_id"]) == sorted(_split_cases(releases / "r110", split, config)), (config, split)
            pinned = datasets.load_dataset(str(mirror / "1.0.0"), config, split=split)
            assert sorted(pinned["case_id"]) == sorted(_split_cases(releases / "r100", split, config)), (config, split)
    text = (mirror / "README.md").read_text()
    assert "`1.0.0/`, `1.1.0/`" in text and 'load_dataset("./mirror/1.0.0", "nhl", split="train")' in text


def test_republishing_a_version_is_a_no_op_or_refused(releases, tmp_path):
    mirror = tmp_path / "mirror"
    publish_mirror(releases / "r100", mirror)
    before = _snapshot(mirror)
    publish_mirror(releases / "r100", mirror)
    assert {k: v for k, v in _snapshot(mirror).items() if k != "versions.json"} == {
        k: v for k, v in before.items() if k != "versions.json"
    }
    # Same version, other content (rebuilt from a grown WORK): refused, mirror unchanged.
    other = tmp_path / "other"
    make_fake_work(tmp_path / "w2", n_patients=3, seed=1)
    build_release(tmp_path / "w2", other, version="1.0.0")
    with pytest.raises(PublishError, match="already published.*never changes"):
        publish_mirror(other, mirror)
    assert _snapshot(mirror / "1.0.0") == {k[len("1.0.0/") :]: v for k, v in before.items() if k.startswith("1.0.0/")}


def test_an_interrupted_publish_leaves_the_previous_state(releases, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    publish_mirror(releases / "r100", mirror)
    before = _snapshot(mirror)
    real_copy2 = shutil.copy2
    calls = {"n": 0}

    def failing_copy2(src, dst, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("power cut")
        return real_copy2(src, dst, *a, **k)

    monkeypatch.setattr(shutil, "copy2", failing_copy2)
    with pytest.raises(KeyboardInterrupt):
        publish_mirror(releases / "r110", mirror)
    monkeypatch.undo()
    assert _snapshot(mirror) == before
    assert sorted(p.name for p in mirror.iterdir()) == [".lock", "1.0.0", "README.md", "versions.json"]


def test_a_release_that_does_not_verify_is_not_published(releases, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(releases / "r100", bad)
    shard = next((bad / "data").rglob("*.parquet"))
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(PublishError, match=shard.name):
        publish_mirror(bad, tmp_path / "mirror")
    assert not (tmp_path / "mirror" / "1.0.0").exists()


def test_hub_plan_adds_every_file_with_the_manifest_hashes_and_deletes_stale_shards(releases):
    release = releases / "r110"
    manifest = read_manifest(release)
    existing = [".gitattributes", "README.md", "data/hl/train-00000-of-00002.parquet", "data/hl/train-00001-of-00002.parquet", "notes/keep.txt"]
    plan = plan_hub_operations(release, "org/lymphatlas", existing_files=existing)
    adds = {op.path_in_repo: op for op in plan.operations if isinstance(op, CommitOperationAdd)}
    deletes = [op.path_in_repo for op in plan.operations if isinstance(op, CommitOperationDelete)]
    assert set(adds) == set(manifest["files"]) | {"manifest.json"}
    # The Hub's card names the repo and the tag; the committed manifest lists that card's hash.
    hub_card = adds["README.md"].path_or_fileobj.decode()
    assert 'load_dataset("org/lymphatlas", "nhl", split="train", revision="v1.1.0")' in hub_card
    assert 'load_dataset("./' not in hub_card and (release / "README.md").read_text().count('load_dataset(os.getcwd()') >= 3
    hub_manifest = json.loads(adds["manifest.json"].path_or_fileobj)
    assert {k: v for k, v in hub_manifest.items() if k != "files"} == {k: v for k, v in manifest.items() if k != "files"}
    for rel, entry in hub_manifest["files"].items():
        # huggingface_hub hashes the bytes it uploads: they must agree with the manifest that travels with them.
        assert adds[rel].upload_info.sha256.hex() == entry["sha256"]
        assert adds[rel].upload_info.size == entry["size"]
        if rel != "README.md":
            assert entry == manifest["files"][rel]
    assert deletes == ["data/hl/train-00000-of-00002.parquet", "data/hl/train-00001-of-00002.parquet"]
    assert plan.tag == "v1.1.0"


def test_hub_plan_deletes_what_an_older_version_left_in_every_release_folder(releases):
    """Stale lesions / preview shards, gallery images and an older client wheel go too: the configs' globs
    (``lesions/train-*.parquet``) would read an old shard beside the new ones at the new tag, and the card
    names one wheel. Files outside the release's folders stay."""
    release = releases / "r110"
    files = read_manifest(release)["files"]
    stale = ["lesions/train-00001-of-00002.parquet", "preview/gallery/LA-9999999.png",
             "preview/test-00003-of-00004.parquet", "wheels/lymphatlas_ds-0.0.1-py3-none-any.whl"]
    assert not set(stale) & set(files) and {f.split("/")[0] for f in stale} <= {f.split("/")[0] for f in files}
    plan = plan_hub_operations(release, "org/lymphatlas",
                               existing_files=[".gitattributes", "notes/keep.txt", *files, *stale])
    assert sorted(op.path_in_repo for op in plan.operations if isinstance(op, CommitOperationDelete)) == stale


def test_the_hub_copy_verifies_as_committed(releases, tmp_path):
    """The files of the planned commit, laid out as a Hub snapshot: the manifest verifies them all."""
    plan = plan_hub_operations(releases / "r110", "org/lymphatlas")
    snapshot = tmp_path / "snapshot"
    for op in plan.operations:
        target = snapshot / op.path_in_repo
        target.parent.mkdir(parents=True, exist_ok=True)
        data = op.path_or_fileobj
        target.write_bytes(data if isinstance(data, bytes) else Path(data).read_bytes())
    verify_release(snapshot)
    (snapshot / "README.md").write_text((releases / "r110" / "README.md").read_text())  # the local card instead
    with pytest.raises(Exception, match="README.md"):
        verify_release(snapshot)


class RecordingApi:
    """Stands in for HfApi at the network boundary: records the calls publish_hub makes."""

    def __init__(self, files=(), tags=(), manifests=None):
        self.calls: list[tuple[str, dict]] = []
        self.files, self.tags = list(files), list(tags)
        self.manifests = dict(manifests or {})  # tag -> the manifest.json committed under it

    def hf_hub_download(self, repo_id, filename, **kw):
        self.calls.append(("hf_hub_download", {"repo_id": repo_id, "filename": filename, **kw}))
        return str(self.manifests[kw["revision"]])

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kw}))

    def list_repo_files(self, repo_id, **kw):
        self.calls.append(("list_repo_files", {"repo_id": repo_id, **kw}))
        return self.files

    def list_repo_refs(self, repo_id, **kw):
        self.calls.append(("list_repo_refs", {"repo_id": repo_id, **kw}))
        return SimpleNamespace(tags=[SimpleNamespace(name=t) for t in self.tags])

    def create_commit(self, repo_id, **kw):
        self.calls.append(("create_commit", {"repo_id": repo_id, **kw}))
        return SimpleNamespace(oid="c0ffee")

    def create_tag(self, repo_id, **kw):
        self.calls.append(("create_tag", {"repo_id": repo_id, **kw}))


def test_publish_hub_commits_then_tags_that_commit(releases):
    api = RecordingApi(files=[".gitattributes", "data/nhl/test-00000-of-00009.parquet"], tags=["v1.0.0"],
                       manifests={"v1.0.0": releases / "r100" / "manifest.json"})
    plan = publish_hub(releases / "r110", "org/lymphatlas", api=api)
    names = [name for name, _ in api.calls]
    assert names == ["create_repo", "list_repo_files", "list_repo_refs", "hf_hub_download", "create_commit", "create_tag"]
    commit = api.calls[4][1]
    assert commit["repo_type"] == "dataset" and commit["operations"] is plan.operations
    assert "data/nhl/test-00000-of-00009.parquet" in [
        op.path_in_repo for op in commit["operations"] if isinstance(op, CommitOperationDelete)
    ]
    assert api.calls[5][1] == {
        "repo_id": "org/lymphatlas",
        "tag": "v1.1.0",
        "revision": "c0ffee",
        "tag_message": plan.commit_message,
        "repo_type": "dataset",
    }


def test_publish_hub_refuses_an_existing_tag_and_dry_run_sends_nothing(releases, monkeypatch):
    api = RecordingApi(tags=["v1.0.0"])
    with pytest.raises(PublishError, match="v1.0.0"):
        publish_hub(releases / "r100", "org/lymphatlas", api=api)
    assert "create_commit" not in [name for name, _ in api.calls]

    def no_network(*a, **k):
        raise AssertionError("dry run must not build an HfApi")

    monkeypatch.setattr(publish_mod, "HfApi", no_network)
    plan = publish_hub(releases / "r100", "org/lymphatlas", dry_run=True)
    assert {op.path_in_repo for op in plan.operations} == set(read_manifest(releases / "r100")["files"]) | {"manifest.json"}


def test_cli_publish(releases, tmp_path, capsys):
    assert builder_main(["publish", str(releases / "r100"), "--mirror", str(tmp_path / "m"), "--repo-id", "org/x", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "tag v1.0.0" in out and "add    metadata/cases.csv" in out
    assert not (tmp_path / "m").exists()
    assert builder_main(["publish", str(releases / "r100"), "--mirror", str(tmp_path / "m")]) == 0
    assert json.loads((tmp_path / "m" / "versions.json").read_text())["latest"] == "1.0.0"


def test_an_unreachable_hub_is_a_clear_error_before_any_commit(releases):
    from huggingface_hub import HfApi

    api = HfApi(endpoint="http://127.0.0.1:9", token="hf_test")  # the real client, nothing listens there
    with pytest.raises(PublishError, match="org/lymphatlas.*dry-run"):
        publish_hub(releases / "r100", "org/lymphatlas", api=api)


def test_a_full_disk_names_the_path_and_leaves_the_mirror(releases, tmp_path, monkeypatch):
    import errno

    mirror = tmp_path / "mirror"
    publish_mirror(releases / "r100", mirror)
    before = _snapshot(mirror)
    real_copy2 = shutil.copy2
    calls = {"n": 0}

    def full_disk(src, dst, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_copy2(src, dst, *a, **k)

    monkeypatch.setattr(shutil, "copy2", full_disk)
    with pytest.raises(PublishError) as info:
        publish_mirror(releases / "r110", mirror)
    monkeypatch.undo()
    message = str(info.value)
    assert "No space left on device" in message and str(mirror / ".1.1.0.partial") in message
    assert "free space" in message and "as they were" in message
    assert _snapshot(mirror) == before
    assert sorted(p.name for p in mirror.iterdir()) == [".lock", "1.0.0", "README.md", "versions.json"]
    assert publish_mirror(releases / "r110", mirror) == mirror / "1.1.0"  # space back: the rerun completes


def test_a_second_publish_to_the_mirror_is_refused_naming_the_holder(releases, tmp_path, capsys):
    import os
    import subprocess
    import sys

    mirror = tmp_path / "mirror"
    code = ("import sys, time; from lymphatlas_ds._lock import folder_lock\n"
            "with folder_lock(sys.argv[1] + '/.lock', what='mirror'):\n    print('held', flush=True); time.sleep(30)")
    mirror.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", code, str(mirror)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        assert holder.stdout.readline().strip() == "held"
        assert builder_main(["publish", str(releases / "r100"), "--mirror", str(mirror)]) == 2
        err = capsys.readouterr().err
        assert f"mirror {mirror} is in use: PID {holder.pid}" in err and "--wait" in err
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in mirror.iterdir()) == [".lock"]
    assert builder_main(["publish", str(releases / "r100"), "--mirror", str(mirror), "--wait"]) == 0
