"""``python -m builder publish RELEASE --repo-id ORG/NAME`` as the README types it, against a local mock of
the Hub's HTTP API (tests/support/mock_hub.py: create, preupload, LFS batch and upload, NDJSON commit, tag,
and the read routes), then read back with plain ``datasets`` at each tag.

Peers: the generator's truth (the case ids each build added), the mirror's copy of the same release
(``publish --mirror``: the bytes a user of the mirror gets), and ``datasets.load_dataset`` in a fresh
interpreter that never imports the project. The upload takes huggingface_hub's LFS path
(``HF_HUB_DISABLE_XET=1``): with ``hf_xet`` installed the client uploads through Xet storage, whose
CAS service the mock does not offer.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support.mock_hub import MockHub, files_of
from tests.support.releases import build_fake_release

REPO_ID = "lymphatlas-org/lymphatlas"
TOKEN = "hf_mockwritetoken"
HUB_ONLY = {"README.md", "manifest.json"}
"""Files the Hub copy rewrites (the card names the repo and tag; the manifest lists that card's hash)."""

_READ = """
import json, sys
import datasets
ids = {}
for tag in sys.argv[2:]:
    ids[tag] = []
    for split in ("train", "test"):
        try:
            ds = datasets.load_dataset(sys.argv[1], "all", split=split, revision=tag)
        except ValueError:  # a split this version lacks
            continue
        ids[tag] += ds["case_id"]
print(json.dumps(ids))
"""


def _env(cwd: Path, hub: MockHub, token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_HUB_OFFLINE")}
    return {**env, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": token, "HF_HUB_DISABLE_XET": "1",
            "HF_HOME": str(cwd / ".hf"), "HF_DATASETS_CACHE": str(cwd / ".hf" / "datasets")}


def _publish(release: Path, mirror: Path, cwd: Path, hub: MockHub, token: str = TOKEN) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, "-m", "builder", "publish", str(release), "--mirror", str(mirror),
                           "--repo-id", REPO_ID], cwd=cwd, env=_env(cwd, hub, token), capture_output=True, text=True,
                          timeout=600)


def test_publish_to_the_hub_as_typed_then_datasets_reads_each_tag_back(tmp_path):
    """Two versions published to an empty repo: each tag serves exactly the mirror's files of its version
    (stale files of 1.0.0 deleted in 1.1.0's commit) and plain ``datasets`` reads the generator's cases there."""
    first = build_fake_release(tmp_path, n_patients=4, seed=3, name="r100")
    second = build_fake_release(tmp_path, n_patients=2, seed=3, first_patient=50, version="1.1.0", name="r110",
                                previous=first.path)
    truth = {"v1.0.0": set(first.truth), "v1.1.0": set(first.truth) | set(second.truth)}
    mirror = tmp_path / "mirror"
    with MockHub(REPO_ID, None, token=TOKEN) as hub:
        refused = _publish(first.path, tmp_path / "refused-mirror", tmp_path / "user0", hub, token="hf_wrong")
        assert refused.returncode != 0 and not hub.exists, refused.stderr[-2000:]
        assert "401" in refused.stderr
        hub.requests.clear()  # create_repo(exist_ok=True) asked for the repo's info after the 401: a true 404 then
        for n, release in enumerate((first.path, second.path), start=1):
            proc = _publish(release, mirror, tmp_path / f"user{n}", hub)
            assert proc.returncode == 0, proc.stderr[-3000:]
        assert sorted(hub.tag_commits) == ["v1.0.0", "v1.1.0"]
        assert len(hub.history) == 3  # the repo's creation, then one commit per version
        for tag, version in (("v1.0.0", "1.0.0"), ("v1.1.0", "1.1.0")):
            served = hub.commits[hub.tag_commits[tag]]
            local = files_of(mirror / version)
            assert set(served) == set(local) | {".gitattributes"}, tag
            assert {p for p in local if served[p] != local[p]} == HUB_ONLY, tag
            manifest, local_manifest = json.loads(served["manifest.json"]), json.loads(local["manifest.json"])
            card = manifest["files"].pop("README.md")
            assert card == {"sha256": hashlib.sha256(served["README.md"]).hexdigest(), "size": len(served["README.md"])}
            local_manifest["files"].pop("README.md")
            assert manifest == local_manifest, tag
            assert f"{REPO_ID}" in served["README.md"].decode() and tag in served["README.md"].decode()
        old_shards = {p for p in hub.commits[hub.tag_commits["v1.0.0"]] if p.endswith(".parquet")}
        assert old_shards - set(hub.files), "1.1.0 deleted none of 1.0.0's shard files (the fixture no longer tests deletion)"
        cwd = tmp_path / "reader"
        cwd.mkdir()
        read = subprocess.run([sys.executable, "-c", _READ, REPO_ID, "v1.0.0", "v1.1.0"], cwd=cwd,
                              env=_env(cwd, hub, TOKEN), capture_output=True, text=True, timeout=600)
        assert read.returncode == 0, read.stderr[-3000:]
        got = json.loads(read.stdout.strip().splitlines()[-1])
        for tag, ids in truth.items():
            assert len(got[tag]) == len(set(got[tag])) and set(got[tag]) == ids, tag
        assert not [r for r in hub.requests if r.error_code == "RepoNotFound"], "a client asked for a route the mock lacks"
