"""lymphatlas_ds.source: release folders, local mirrors and Hub repo ids (offline, from a Hub cache)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lymphatlas_ds.errors import SourceError
from lymphatlas_ds.manifest import sha256_file
from lymphatlas_ds.source import SourceKind, list_versions, resolve_release, version_key
from tests.support.releases import build_fake_release

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """Two versions of a release: 1.0.0, then 1.1.0 with new patients."""
    root = tmp_path_factory.mktemp("source")
    first = build_fake_release(root, n_patients=4, seed=1, shape_zyx=(8, 14, 14), name="r100")
    second = build_fake_release(root, n_patients=2, seed=1, shape_zyx=(8, 14, 14), first_patient=4, version="1.1.0",
                                name="r110", previous=first.path)
    return _Releases({"1.0.0": first.path, "1.1.0": second.path}, truth=first.truth)


class _Releases(dict):
    """version -> release folder, with the WORK truth of the first version's cases."""

    def __init__(self, folders, *, truth):
        super().__init__(folders)
        self.truth = truth


@pytest.fixture
def mirror(releases, tmp_path):
    """A local mirror laid out as docs/contracts.md section 4 says: DIR/<version>/ + versions.json."""
    out = tmp_path / "mirror"
    for version, folder in releases.items():
        shutil.copytree(folder, out / version)
    (out / "versions.json").write_text(json.dumps({"latest": "1.1.0", "versions": ["1.1.0", "1.0.0"]}))
    return out


def hub_cache(releases, root: Path, repo_id: str, versions=("1.0.0", "1.1.0")) -> Path:
    """A Hub cache laid out as huggingface_hub writes it: refs/<tag> -> commit, snapshots/<commit>/ symlinks to blobs/."""
    repo = root / ("datasets--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for i, version in enumerate(versions):
        commit = f"{i + 1:040x}"
        (repo / "refs" / f"v{version}").write_text(commit)
        for file in sorted(p for p in releases[version].rglob("*") if p.is_file()):
            blob = repo / "blobs" / sha256_file(file)
            if not blob.exists():
                shutil.copyfile(file, blob)
            link = repo / "snapshots" / commit / file.relative_to(releases[version])
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    return root


def test_release_folder(releases):
    resolved = resolve_release(releases["1.0.0"])
    assert resolved.path == releases["1.0.0"] and resolved.version == "1.0.0"
    assert resolved.kind is SourceKind.FOLDER
    assert resolve_release(str(releases["1.1.0"]), version="v1.1.0").version == "1.1.0"
    with pytest.raises(SourceError, match="version 1.0.0, not 1.1.0"):
        resolve_release(releases["1.0.0"], version="1.1.0")


def test_mirror_defaults_to_newest_and_picks_a_version(mirror):
    newest = resolve_release(mirror)
    assert newest.kind is SourceKind.MIRROR and newest.version == "1.1.0"
    assert newest.path == mirror / "1.1.0"
    assert newest.versions == ("1.0.0", "1.1.0")
    old = resolve_release(mirror, version="1.0.0")
    assert old.path == mirror / "1.0.0" and old.version == "1.0.0"
    assert list_versions(mirror) == ["1.0.0", "1.1.0"]
    with pytest.raises(SourceError, match="no version 2.0.0; it has 1.0.0, 1.1.0"):
        resolve_release(mirror, version="2.0.0")


def test_mirror_listing_a_missing_folder(mirror):
    shutil.rmtree(mirror / "1.0.0")
    with pytest.raises(SourceError, match="incomplete"):
        resolve_release(mirror, version="1.0.0")


def test_bad_sources(tmp_path):
    with pytest.raises(SourceError, match="neither a release"):
        resolve_release(tmp_path)
    with pytest.raises(SourceError, match="does not exist"):
        resolve_release(tmp_path / "nothing" / "here")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(SourceError, match="is a file"):
        resolve_release(tmp_path / "f.txt")
    with pytest.raises(SourceError, match="semantic"):
        resolve_release(tmp_path, version="latest")


def test_version_order():
    assert sorted(["1.10.0", "1.2.0", "1.9.9", "0.9.0"], key=version_key) == ["0.9.0", "1.2.0", "1.9.9", "1.10.0"]


def test_hub_call_arguments(monkeypatch, releases, tmp_path):
    """Up to the network: snapshot_download gets the dataset repo type and the v<version> tag."""
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kw):
        calls.append((repo_id, kw))
        return str(releases["1.0.0"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    resolved = resolve_release("org/lymphatlas", version="1.0.0", cache_dir=tmp_path / "hub")
    assert calls == [("org/lymphatlas", {"repo_type": "dataset", "revision": "v1.0.0", "cache_dir": tmp_path / "hub"})]
    assert resolved.kind is SourceKind.HUB and resolved.version == "1.0.0"
    # A tag whose content is another version is refused.
    with pytest.raises(SourceError, match="manifest says version 1.0.0"):
        resolve_release("org/lymphatlas", version="1.1.0", cache_dir=tmp_path / "hub")


def _offline(code: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_hub_offline_from_the_local_cache(releases, tmp_path):
    """HF_HUB_OFFLINE=1 (no network at all): the cached tags resolve through huggingface_hub itself."""
    cache = hub_cache(releases, tmp_path / "hub", "org/lymphatlas")
    code = (
        "from lymphatlas_ds.source import resolve_release as r, list_versions as l\n"
        "a = r('org/lymphatlas', version='1.0.0'); b = r('org/lymphatlas')\n"
        "print(a.version, a.kind.value, a.path.parent.name, b.version, ','.join(l('org/lymphatlas')))\n"
        "r('org/lymphatlas', version='3.0.0')\n"
    )
    result = _offline(code, cache)
    lines = result.stdout.split()
    assert lines == ["1.0.0", "hub", "snapshots", "1.1.0", "1.0.0,1.1.0"], result.stderr
    assert result.returncode == 1
    assert "SourceError" in result.stderr and "v3.0.0" in result.stderr and "HF_HUB_OFFLINE" in result.stderr


def test_load_lymphatlas_from_the_hub_cache_offline(releases, tmp_path):
    """The whole path offline: Hub cache (symlinked snapshot) -> verified release -> torch items equal to the WORK."""
    cache = hub_cache(releases, tmp_path / "hub", "org/lymphatlas")
    code = (
        "import json, sys\n"
        "from lymphatlas_ds import load_lymphatlas\n"
        f"ds = load_lymphatlas('org/lymphatlas', version='1.0.0', split='test', cache_dir={str(tmp_path / 'cache')!r})\n"
        "print(json.dumps({ds[i]['case_id']: float(ds[i]['image'][1].sum()) for i in range(len(ds))}))\n"
    )
    result = _offline(code, cache)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout.strip().splitlines()[-1])
    table = json.loads((releases["1.0.0"] / "splits.json").read_text())["cases"]
    assert set(got) == {c for c, t in table.items() if t["split"] == "test"} and got
    truth = releases.truth
    for case_id, pet_sum in got.items():
        assert pet_sum == pytest.approx(float(truth[case_id].pet.sum(dtype=np.float64)), rel=1e-5)


def test_hub_offline_unknown_repo(tmp_path):
    result = _offline("from lymphatlas_ds.source import resolve_release as r\nr('org/absent')\n", tmp_path / "empty")
    assert result.returncode == 1 and "no version of the Hub dataset org/absent is known" in result.stderr
