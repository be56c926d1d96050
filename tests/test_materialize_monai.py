"""`lymphatlas materialize SOURCE --monai DIR`, checked with MONAI's own loader and transforms.

The command runs as typed in a subprocess from the folder that holds the release; the datalist is
read with ``monai.data.load_decathlon_datalist`` and the files with ``LoadImaged``, and both are
compared with the fake WORK truth the release was built from (voxels, shape, affine) and with the
release's own ``splits.json`` (every case once, its fold, no subject across folds or into test).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

monai = pytest.importorskip("monai")

BIN = Path(sys.executable).parent


def _lymphatlas(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "LYMPHATLAS_CACHE": str(cwd / "cache")}
    return subprocess.run([str(BIN / "lymphatlas"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def monai_run(tmp_path_factory):
    from tests.support.releases import build_fake_release

    root = tmp_path_factory.mktemp("monai")
    release = build_fake_release(root, n_patients=6, seed=5, shape_zyx=(12, 16, 20), name="lymphatlas")
    proc = _lymphatlas("materialize", "lymphatlas", "--monai", "monai_data", cwd=root)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    splits = json.loads((release.path / "splits.json").read_text())["cases"]
    return root, root / "monai_data", release, splits, proc


def test_the_datalist_loads_with_monai_and_holds_the_releases_folds(monai_run):
    from monai.data import load_decathlon_datalist

    _root, out, _release, splits, proc = monai_run
    training = load_decathlon_datalist(str(out / "datalist.json"), True, "training")
    test = load_decathlon_datalist(str(out / "datalist.json"), True, "test")
    want_train = sorted(c for c, e in splits.items() if e["split"] == "train")
    want_test = sorted(c for c, e in splits.items() if e["split"] == "test")
    assert sorted(d["case_id"] for d in training) == want_train and want_train
    assert sorted(d["case_id"] for d in test) == want_test and want_test
    for d in training:
        assert d["fold"] == splits[d["case_id"]]["fold"]
        assert d["subject_id"] == splits[d["case_id"]]["subject_id"]
    for d in training + test:  # paths made absolute by MONAI's loader, and there
        assert all(Path(p).is_absolute() and Path(p).is_file() for p in [*d["image"], d["label"], d["ct"], d["pet"]])
    folds_of_subject: dict[str, set[int]] = {}
    for d in training:
        folds_of_subject.setdefault(d["subject_id"], set()).add(d["fold"])
    assert all(len(f) == 1 for f in folds_of_subject.values()), folds_of_subject
    assert not set(folds_of_subject) & {d["subject_id"] for d in test}
    assert "monai.data.load_decathlon_datalist" in proc.stdout


def test_monai_transforms_read_the_releases_voxels_shape_and_affine(monai_run):
    from monai.data import load_decathlon_datalist
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    _root, out, release, _splits, _proc = monai_run
    load = Compose([LoadImaged(keys=["image", "label"]), EnsureChannelFirstd(keys=["image", "label"])])
    entries = [*load_decathlon_datalist(str(out / "datalist.json"), True, "training"),
               *load_decathlon_datalist(str(out / "datalist.json"), True, "test")]
    for entry in entries:
        truth = release.truth[entry["case_id"]]
        item = load(entry)
        image, label = item["image"], item["label"]
        xyz = truth.ct.shape[::-1]
        assert tuple(image.shape) == (2, *xyz) and tuple(label.shape) == (1, *xyz)
        np.testing.assert_array_equal(np.asarray(image[0]).transpose(2, 1, 0), truth.ct)
        np.testing.assert_allclose(np.asarray(image[1]).transpose(2, 1, 0), truth.pet, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(label[0]).transpose(2, 1, 0), truth.label)
        for meta in (image, label):
            np.testing.assert_allclose(np.asarray(meta.affine), truth.affine, atol=1e-5)


def test_a_second_run_refuses_the_folder_and_force_gives_the_same_bytes(monai_run, tmp_path):
    root, out, _release, _splits, _proc = monai_run
    before = _digests(out)
    again = _lymphatlas("materialize", "lymphatlas", "--monai", "monai_data", cwd=root)
    assert again.returncode == 2 and "--force" in again.stderr and "monai_data" in again.stderr, again.stderr
    assert "Traceback" not in again.stderr and _digests(out) == before
    forced = _lymphatlas("materialize", "lymphatlas", "--monai", "monai_data", "--force", cwd=root)
    assert forced.returncode == 0, forced.stderr
    assert _digests(out) == before  # deterministic: the same release gives the same bytes
    assert not [p.name for p in root.iterdir() if p.name.startswith(".monai_data")]  # no temp or old folder left


def test_monai_and_nnunet_together_is_the_commands_usage_error(monai_run):
    root = monai_run[0]
    proc = _lymphatlas("materialize", "lymphatlas", "--monai", "a", "--nnunet", "b", cwd=root)
    assert proc.returncode == 2 and "usage: lymphatlas materialize" in proc.stderr and "Traceback" not in proc.stderr
    assert not (root / "a").exists() and not (root / "b").exists()


@pytest.mark.parametrize("force", [False, True])
def test_an_io_error_midway_leaves_the_target_as_it_was(monai_run, tmp_path, monkeypatch, force):
    from lymphatlas_ds import monai_datalist
    from lymphatlas_ds.reader import Release

    _root, out, release, _splits, _proc = monai_run
    target = tmp_path / "monai_data"
    if force:
        monai_datalist.materialize_monai(Release(release.path), target)
    before = _digests(target) if force else None
    real, calls = monai_datalist._nifti_bytes, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(errno.EIO, "Input/output error")
        return real(*args, **kwargs)

    monkeypatch.setattr(monai_datalist, "_nifti_bytes", failing)
    with pytest.raises(monai_datalist.MonaiMaterializeError, match="Input/output error.*Nothing was written"):
        monai_datalist.materialize_monai(Release(release.path), target, force=force)
    assert len(calls) >= 5
    assert (_digests(target) == before) if force else not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["monai_data"] if force else [])


def test_a_subject_in_train_and_test_is_refused_before_the_folder_appears(monai_run, tmp_path):
    from lymphatlas_ds import monai_datalist
    from lymphatlas_ds.errors import SchemaError
    from lymphatlas_ds.reader import Release

    _root, _out, release, splits, _proc = monai_run
    leaky = Release(release.path)
    test_case = next(c for c, e in splits.items() if e["split"] == "test")
    train_case = next(c for c, e in splits.items() if e["split"] == "train")
    leaky.splits["cases"][test_case]["subject_id"] = splits[train_case]["subject_id"]  # as a broken release would
    with pytest.raises(SchemaError, match="share a subject"):
        monai_datalist.materialize_monai(leaky, tmp_path / "monai_data")
    assert list(tmp_path.iterdir()) == []
