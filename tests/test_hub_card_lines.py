"""Every line of the Hub copy's card runs as written, against a local stand-in for the Hub.

``publish --repo-id`` pushes a release whose card names the repo id and the version's tag
(``builder.release.card.hub_readme``): an ``hf download ... --revision vX.Y.Z`` line for the client
wheel, ``load_dataset("<repo_id>", ..., revision="vX.Y.Z")``, ``load_lymphatlas("<repo_id>",
version=...)`` and ``lymphatlas materialize | verify <repo_id> --version ...``. The machine has no
network, so a small release is laid out as ``publish`` commits it (``plan_hub_operations``: the
release's files, the Hub card and the manifest listing it) and served by
``tests/support/mock_hub.py`` on 127.0.0.1 at the tag the card names; each user process gets
``HF_ENDPOINT`` pointing at it (``HF_HUB_OFFLINE`` unset, ``HF_HOME`` and the caches in tmp) and
runs from an empty folder, as a user who has only read the card on the Hub.

The python blocks run as one script (later blocks use ``ds`` and ``sample``), each bash line and
inline ``lymphatlas`` command in a shell; exit status 0 and no traceback for each. The two
``lymphatlas materialize`` lines run in a slow test (about 25 s more on the loaded shared machine;
``load_lymphatlas`` and ``lymphatlas verify`` in the default run fetch the repo the same way). Then: the wheel
``hf download`` wrote is byte-identical to the release's and listed with its sha256 in the manifest;
the rows each client read (case ids per split and fold, one CT volume) equal the release's
(the generator's WORK truth for ids, diagnosis and voxels; ``splits.json`` for split and fold);
the nnU-Net and MONAI folders hold the train split (slow test); every route a client asked for exists in the
mock (no ``RepoNotFound``), and every request named the tag or its commit, never ``main`` (the mock's
``main`` is the same commit, so an unpinned line would read the right rows here and not on the Hub). The ``pip install ./lymphatlas_client/...``
line runs as pip's dry run (``runnable`` of tests/test_card_lines.py). The direct-URL line
(``pip install "lymphatlas-ds[torch] @ https://huggingface.co/..."``) names the Hub itself: its URL
path must be the mock's resolve path of the wheel, and pip's dry run of that line with the mock's
origin in place of huggingface.co downloads and accepts the wheel. The mock itself is checked both
ways: a wrong tag, a missing file and another repo fail in the clients as on the Hub, and the routes
the card's lines do not reach (paths-info, refs, commits) parse in huggingface_hub's own types.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.support.mock_hub import MockHub
from tests.test_card_lines import BIN, blocks, runnable

REPO_ID = "lymphatlas-test/lymphatlas"
WHEEL_LINE = re.compile(r'`pip install "lymphatlas-ds\[torch\] @ (https://[^"`]+)"`')
RESULTS = """
import json as _json, numpy as _np
_json.dump({{
    "ds": sorted(ds["case_id"]), "fold1": sorted(fold1["case_id"]),
    "ct_case": case["case_id"], "lymphatlas": sorted(train[i]["case_id"] for i in range(len(train))),
    "image_shape": list(sample["image"].shape), "hf_torch_shape": list(item["image"].shape),
}}, open({out!r}, "w"))
_np.save({ct!r}, _np.asarray(case["ct"].dataobj))
"""
"""Appended to the card's python: what the test compares with the release (names the card defines)."""


def published_files(release: Path, repo_id: str) -> tuple[dict[str, bytes], str]:
    """The repo's files after ``publish_hub(release, repo_id)`` (path -> bytes) and the tag it creates."""
    from builder.release.publish import plan_hub_operations

    plan = plan_hub_operations(release, repo_id)
    files = {}
    for op in plan.operations:
        src = op.path_or_fileobj
        files[op.path_in_repo] = src if isinstance(src, bytes) else Path(src).read_bytes()
    return files, plan.tag


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """(the release, its WORK truth, the running mock Hub serving it as publish lays it out)."""
    from tests.support.releases import build_fake_release

    root = tmp_path_factory.mktemp("hub_card_lines")
    release = build_fake_release(root, n_patients=6, seed=8, shape_zyx=(12, 16, 16), name="lymphatlas")
    files, tag = published_files(release.path, REPO_ID)
    with MockHub(REPO_ID, files, tags=[tag]) as mock:
        yield release, mock


def release_wheel(release) -> str:
    """The path of the client wheel in the local release folder (the repo must hold it there too)."""
    (wheel,) = release.path.glob("wheels/*.whl")
    return wheel.relative_to(release.path).as_posix()


def user_env(tmp_path: Path, mock: MockHub) -> dict[str, str]:
    """A user's environment pointed at the mock Hub: its own HOME, HF_HOME and caches, online."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                                           "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_HUB_CACHE")}
    env.update(HOME=str(tmp_path), HF_ENDPOINT=mock.endpoint, HF_HOME=str(tmp_path / "hf_home"),
               HF_DATASETS_CACHE=str(tmp_path / "hf_datasets"), LYMPHATLAS_CACHE=str(tmp_path / "cache"),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_UPDATE_CHECK="1",  # hf would ask pypi.org once a day
               NO_PROXY="127.0.0.1,localhost", PATH=str(BIN) + os.pathsep + os.environ["PATH"])
    return env


def run(command: list[str] | str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``command`` (a list: as is; a string: in bash) as the user runs it, output captured."""
    args = ["bash", "-c", command] if isinstance(command, str) else command
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def expected_ids(release, *, diagnosis: str, split: str, fold=None, exclude_fold=None) -> list[str]:
    """Case ids of the release by the generator's diagnosis and the release's split and fold."""
    splits = json.loads((release.path / "splits.json").read_text())["cases"]
    return sorted(c for c, truth in release.truth.items() if truth.diagnosis == diagnosis
                  and splits[c]["split"] == split and (fold is None or splits[c]["fold"] == fold)
                  and (exclude_fold is None or splits[c]["fold"] != exclude_fold))


def check_requests(mock: MockHub, since: int, *must: str) -> None:
    """The mock's answers from ``mock.requests[since:]``: no route it lacks (``RepoNotFound`` on the served
    repo), nothing at ``main`` (the lines pin the tag), and each of the URL paths ``must`` asked for."""
    answered = mock.requests[since:]
    missing = [r for r in answered if r.error_code == "RepoNotFound" or r.status >= 500]
    assert not missing, missing
    asked = {r.path.split("?")[0] for r in answered}
    assert not set(must) - asked, set(must) - asked
    unpinned = sorted(p for p in asked if re.search(r"/(resolve|tree|revision|paths-info)/main(/|$)", p))
    assert not unpinned, f"read the newest commit, not the tag {mock.tags[0]}: {unpinned}"


SLOW_LINES = "lymphatlas materialize "
"""Card lines the slow test runs (the default run has load_lymphatlas and `lymphatlas verify` from the repo
id, the same download; the local copies' materialize lines run in tests/test_card_lines.py)."""


def test_every_hub_card_line_runs_against_the_hub(hub, tmp_path):
    import numpy as np

    release, mock = hub
    since = len(mock.requests)
    readme = mock.files["README.md"].decode("utf-8")
    python, shell = blocks(readme)
    wheel = release_wheel(release)
    tag = mock.tags[0]
    # the lines are there (what they name, tag and wheel, is checked by running them against the repo)
    assert f'load_dataset("{REPO_ID}", "nhl", split="train"' in python and f'load_lymphatlas("{REPO_ID}"' in python
    assert [line for line in shell if line.startswith(f"hf download {REPO_ID} ")]
    assert [line for line in shell if line.startswith(SLOW_LINES)]
    user = tmp_path / "user"  # where the user stands: nothing of the release is there
    user.mkdir()
    env = user_env(tmp_path, mock)

    script = tmp_path / "card.py"
    script.write_text(python + RESULTS.format(out=str(tmp_path / "results.json"), ct=str(tmp_path / "ct.npy")))
    proc = run([sys.executable, str(script)], user, env)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, python + proc.stderr[-3000:]
    streamed = proc.stdout.split()[0]
    for line in shell:
        if line.startswith(SLOW_LINES):
            continue
        proc = run(runnable(line), user, env)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, f"{line}\n{proc.stdout}\n{proc.stderr}"

    # hf download: the release's wheel, byte for byte, listed in the manifest the repo serves
    got = (user / "lymphatlas_client" / wheel).read_bytes()
    assert got == (release.path / wheel).read_bytes()
    manifest = json.loads(mock.files["manifest.json"])
    assert manifest["files"][wheel]["sha256"] == hashlib.sha256(got).hexdigest()

    # what the python blocks read is the release's rows
    results = json.loads((tmp_path / "results.json").read_text())
    nhl_train = expected_ids(release, diagnosis="NHL", split="train")
    assert nhl_train and results["ds"] == nhl_train
    assert results["fold1"] == expected_ids(release, diagnosis="NHL", split="train", fold=1)
    assert results["lymphatlas"] == expected_ids(release, diagnosis="NHL", split="train", exclude_fold=0)
    assert streamed in nhl_train
    truth = release.truth[results["ct_case"]]
    assert np.array_equal(np.load(tmp_path / "ct.npy"), truth.ct.transpose(2, 1, 0))
    assert results["image_shape"] == results["hf_torch_shape"] == [2, *truth.ct.shape]  # fake cases share a shape

    # every client went through the mock, at the card's tag, and used only routes the mock has
    check_requests(mock, since, f"/api/datasets/{REPO_ID}/revision/{tag}", mock.resolve_path(tag, wheel))


@pytest.mark.slow
def test_the_hub_cards_materialize_lines_write_the_train_split(hub, tmp_path):
    """The card's `lymphatlas materialize <repo_id> --version ...` lines (nnU-Net and MONAI), from an empty
    folder: the folders they write hold the release's train split, read with MONAI's own loader."""
    release, mock = hub
    since = len(mock.requests)
    lines = [line for line in blocks(mock.files["README.md"].decode("utf-8"))[1] if line.startswith(SLOW_LINES)]
    user = tmp_path / "user"
    user.mkdir()
    env = user_env(tmp_path, mock)
    for line in lines:
        proc = run(line, user, env)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, f"{line}\n{proc.stdout}\n{proc.stderr}"
    n_train = sum(e["split"] == "train" for e in json.loads((release.path / "splits.json").read_text())["cases"].values())
    dataset = json.loads((user / "nnUNet_raw" / "Dataset501_LymphAtlas" / "dataset.json").read_text())
    assert dataset["numTraining"] == n_train
    from monai.data import load_decathlon_datalist

    datalist = load_decathlon_datalist(str(user / "lymphatlas_monai" / "datalist.json"), True, "training")
    assert len(datalist) == n_train
    check_requests(mock, since, f"/api/datasets/{REPO_ID}/revision/{mock.tags[0]}")


def test_the_cards_url_install_line_is_the_wheels_resolve_url(hub, tmp_path):
    """The direct-URL line: its path is the repo's resolve path of the wheel at the tag, and pip takes it
    from there (the mock's origin in place of huggingface.co, which this machine cannot reach)."""
    release, mock = hub
    readme = mock.files["README.md"].decode("utf-8")
    (url,) = WHEEL_LINE.findall(readme)
    wheel = release_wheel(release)
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc) == ("https", "huggingface.co")
    assert parts.path == mock.resolve_path(mock.tags[0], wheel)
    local = mock.endpoint + parts.path
    proc = run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index",
                f"lymphatlas-ds[torch] @ {local}"], tmp_path, user_env(tmp_path, mock))
    version = json.loads(mock.files["manifest.json"])["builder_version"]
    assert proc.returncode == 0 and f"Would install lymphatlas-ds-{version}" in proc.stdout, proc.stdout + proc.stderr


def test_the_mock_refuses_what_the_repo_lacks(hub, tmp_path):
    """A wrong tag, a wheel the repo lacks, another repo: the clients fail as the Hub makes them fail
    (else the lines above could pass against a mock that serves anything)."""
    release, mock = hub
    wheel = release_wheel(release)
    env = user_env(tmp_path, mock)
    cases = {
        f"hf download {REPO_ID} {wheel} --repo-type dataset --revision v9.9.9 --local-dir c":
            f"Revision not found in dataset '{REPO_ID}'",
        f"hf download {REPO_ID} wheels/none.whl --repo-type dataset --revision {mock.tags[0]} --local-dir c":
            f"File not found in dataset '{REPO_ID}'",
        f"hf download other/repo {wheel} --repo-type dataset --revision {mock.tags[0]} --local-dir c":
            "Dataset 'other/repo' not found",
        f"lymphatlas verify {REPO_ID} --version 9.9.9": "tag v9.9.9",
    }
    for command, message in cases.items():
        proc = run(command, tmp_path, env)
        assert proc.returncode != 0 and message in proc.stdout + proc.stderr, f"{command}\n{proc.stdout}{proc.stderr}"
    assert not (tmp_path / "c" / wheel).exists()


def test_the_mocks_listings_parse_as_huggingface_hub_reads_them(hub, monkeypatch):
    """The routes the card's lines do not reach (paths-info, refs, commits, a sub-folder's tree) answer in the
    shape huggingface_hub's own parsers read, with the release's sizes and sha256 (in this process: HfApi
    takes the endpoint as an argument)."""
    from huggingface_hub import HfApi, RepoFile, RepoFolder, constants

    release, mock = hub
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    api, tag = HfApi(endpoint=mock.endpoint), mock.tags[0]
    wheel = release_wheel(release)
    info = api.get_paths_info(REPO_ID, [wheel, "wheels", "splits.json", "no/such"], repo_type="dataset", revision=tag)
    by_path = {entry.path: entry for entry in info}
    assert set(by_path) == {wheel, "wheels", "splits.json"} and isinstance(by_path["wheels"], RepoFolder)
    data = (release.path / wheel).read_bytes()
    assert by_path[wheel].lfs.sha256 == hashlib.sha256(data).hexdigest() and by_path[wheel].size == len(data)
    assert by_path["splits.json"].lfs is None and by_path["splits.json"].size == (release.path / "splits.json").stat().st_size
    tree = list(api.list_repo_tree(REPO_ID, "data", repo_type="dataset", revision=tag, recursive=True))
    on_disk = {p.relative_to(release.path).as_posix(): p.stat().st_size for p in (release.path / "data").rglob("*.parquet")}
    assert {e.path: e.size for e in tree if isinstance(e, RepoFile)} == on_disk
    assert [t.name for t in api.list_repo_refs(REPO_ID, repo_type="dataset").tags] == [tag]
    assert [c.commit_id for c in api.list_repo_commits(REPO_ID, repo_type="dataset", revision=tag)] == [mock.commit]
