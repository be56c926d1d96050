"""Nothing destroyed, nothing misattributed (issue 19, items 2, 8 and 9).

* Destructive targets: ``python -m builder release``, ``python -m builder publish --mirror`` and
  ``lymphatlas materialize`` refuse a target that is, contains or lies inside WORK, the DICOM source
  WORK was converted from, the previous release, a mirror or the release read (symlinks resolved),
  and an ``--overwrite`` / ``--force`` folder holding a key, DICOM or unrelated files. Each refusal
  is run as typed, from another folder, and the end state is compared byte for byte: every file of
  WORK (key, id map, cases), the source, the previous release and the mirror is as it was, and no
  file was added anywhere.
* verify cross-checks: a release tampered in one file, its manifest entry re-sealed (so every file
  matches its sha256), fails ``lymphatlas verify`` naming the case and the files that disagree, and
  ``publish`` refuses it; consistent releases (a first one and an update) still verify.
* The decoded cache's case.json is covered by a checksum: a doubled affine is rebuilt, not served.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from builder.release.build import build_release
from builder.release.publish import PublishError, publish_mirror
from lymphatlas_ds import manifest as manifest_mod
from lymphatlas_ds._target import TargetError
from lymphatlas_ds.cache import DecodedCache
from lymphatlas_ds.reader import Release
from tests.support.releases import build_fake_release

REPO_ROOT = Path(__file__).resolve().parent.parent


def _id(target: str) -> str:
    """A test id without '/' or a bare '.', so that -k can select it."""
    return "parent" if target == "." else target.replace("/", "_")
KEY = b"\x01" * 32


# --- the world: a DICOM source, the WORK converted from it, release 1.0.0, a mirror, update 1.1.0 --------------


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    source = root / "source"
    (source / "dicom" / "EX0001").mkdir(parents=True)
    (source / "dicom" / "EX0001" / "0001.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    (source / "clinical.csv").write_text("exam_id,patient_id,diagnosis\nEX0001,P1,NHL\n")
    first = build_fake_release(root, n_patients=4, seed=1, name="r100")
    (root / "work" / "private" / "deid.key").write_bytes(KEY)
    (root / "work" / "build.json").write_text(json.dumps({"source": str(source), "gone_from_source": {}}))
    build_fake_release(root, n_patients=2, seed=1, first_patient=4, version="1.1.0", name="r110", previous=first.path)
    publish_mirror(first.path, root / "mirror")
    return root


@pytest.fixture
def world(template, tmp_path) -> Path:
    """A private copy of the template (symlinks kept), so that a refusal that fails cannot spoil another test."""
    copy = tmp_path / "world"
    shutil.copytree(template, copy, symlinks=True)
    (copy / "work" / "build.json").write_text(json.dumps({"source": str(copy / "source"), "gone_from_source": {}}))
    return copy


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (hidden ones too): a file's sha256, a link's target, a folder's mark."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                out[rel] = "link -> " + os.readlink(path)
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def user(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """A console command as a user types it, from another folder."""
    env = {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(REPO_ROOT), "HOME": str(cwd),
           "LYMPHATLAS_CACHE": str(cwd / "cache")}
    return subprocess.run(list(argv), capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def refused(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)
    assert "Nothing was written or deleted" in result.stderr


def _foreign(world: Path, kind: str) -> Path:
    """A folder that is no release, mirror or nnU-Net dataset: a key, DICOM, or unrelated notes."""
    folder = world / f"other-{kind}"
    folder.mkdir()
    if kind == "key":  # a key backed up away from its WORK (WORK/private/deid.key is WORK itself)
        (folder / "backup").mkdir()
        (folder / "backup" / "deid.key").write_bytes(KEY)
    elif kind == "dicom":
        (folder / "scan").mkdir()
        (folder / "scan" / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    else:
        (folder / "notes.txt").write_text("not a release\n")
    return folder


# --- release ---------------------------------------------------------------------------------------------

RELEASE_TARGETS = [
    ("work", "it is WORK"),
    ("work/cases/new", "it lies inside WORK"),
    ("link-to-work", "it is WORK"),
    (".", "it contains WORK"),
    ("source", "it is the DICOM source of WORK"),
    ("source/release", "it lies inside the DICOM source of WORK"),
    ("r100", "it is the previous release (--previous)"),
    ("mirror", "it is a mirror"),
    ("mirror/1.1.0", "it lies inside a mirror"),
]


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize(("target", "message"), RELEASE_TARGETS, ids=[_id(t) for t, _ in RELEASE_TARGETS])
def test_release_into_a_protected_folder_is_refused_and_changes_nothing(world, tmp_path, target, message, overwrite):
    (world / "link-to-work").symlink_to(world / "work", target_is_directory=True)
    before = snapshot(world)
    result = user(sys.executable, "-m", "builder", "release", str(world / "work"), str(world / target),
                  "--version", "1.2.0", "--previous", str(world / "r100"), "--quiet",
                  *(["--overwrite"] if overwrite else []), cwd=tmp_path)
    refused(result, message, str(world / target))
    if target == "link-to-work":
        assert f"that is {world / 'work'}" in result.stderr
    assert snapshot(world) == before  # WORK's key, id_map and cases, the source, r100 and the mirror, byte for byte
    assert (world / "work" / "private" / "deid.key").read_bytes() == KEY


@pytest.mark.parametrize("kind", ["key", "dicom", "notes"])
def test_release_overwrite_of_a_folder_that_is_no_release_is_refused(world, tmp_path, kind):
    folder = _foreign(world, kind)
    before = snapshot(world)
    result = user(sys.executable, "-m", "builder", "release", str(world / "work"), str(folder), "--version", "1.0.0",
                  "--overwrite", "--quiet", cwd=tmp_path)
    expected = {"key": "it holds a de-identification key or id map: backup/deid.key",
                "dicom": "it holds DICOM files: scan/IM0001", "notes": "it holds unrelated files: notes.txt"}[kind]
    refused(result, expected, "release writes a release folder")
    assert snapshot(world) == before


def test_release_still_writes_a_new_folder_and_overwrites_a_release(world, tmp_path):
    """The guard lets the ordinary runs through: a new sibling of WORK, then --overwrite of that release."""
    for extra in ([], ["--overwrite"]):
        result = user(sys.executable, "-m", "builder", "release", str(world / "work"), str(world / "r120"),
                      "--version", "1.2.0", "--previous", str(world / "r110"), "--quiet", *extra, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert manifest_mod.verify_all(world / "r120") == []
    assert (world / "work" / "private" / "deid.key").read_bytes() == KEY


# --- publish ---------------------------------------------------------------------------------------------

PUBLISH_TARGETS = [
    ("work", "it is a WORK folder"),
    ("work/mirror", "it lies inside a WORK folder"),
    ("link-to-work", "it is a WORK folder"),
    ("source", "it is a DICOM source"),
    ("r100", "it is the release being published"),
    ("r100/mirror", "it lies inside the release being published"),
    ("r110", "it is a release"),
    ("mirror/next", "it lies inside a mirror"),
    (".", "it contains the release being published"),
]


@pytest.mark.parametrize(("target", "message"), PUBLISH_TARGETS, ids=[_id(t) for t, _ in PUBLISH_TARGETS])
def test_publish_into_a_protected_folder_is_refused_and_changes_nothing(world, tmp_path, target, message):
    (world / "link-to-work").symlink_to(world / "work", target_is_directory=True)
    before = snapshot(world)
    result = user(sys.executable, "-m", "builder", "publish", str(world / "r100"), "--mirror", str(world / target),
                  cwd=tmp_path)
    refused(result, message)
    assert snapshot(world) == before


def test_publish_into_a_folder_that_is_no_mirror_is_refused(world, tmp_path):
    folder = _foreign(world, "notes")
    before = snapshot(world)
    for dry in ([], ["--dry-run"]):
        result = user(sys.executable, "-m", "builder", "publish", str(world / "r100"), "--mirror", str(folder), *dry,
                      cwd=tmp_path)
        refused(result, "it holds unrelated files: notes.txt", "publish writes a mirror")
    assert snapshot(world) == before
    assert publish_mirror(world / "r110", world / "mirror") == world / "mirror" / "1.1.0"  # a real mirror is fine


# --- materialize -----------------------------------------------------------------------------------------

MATERIALIZE_TARGETS = [
    ("work", "it is a WORK folder"),
    ("work/raw", "it lies inside a WORK folder"),
    ("link-to-work", "it is a WORK folder"),
    ("source", "it is a DICOM source"),
    ("r100", "it is the release read"),
    ("r100/raw", "it lies inside the release read"),
    ("mirror", "it is a mirror"),
    (".", "it contains a WORK folder"),
]


@pytest.mark.parametrize(("target", "message", "force"), [
    *((t, m, False) for t, m in MATERIALIZE_TARGETS), *((t, m, True) for t, m in MATERIALIZE_TARGETS[::2])
], ids=[*(_id(t) for t, _ in MATERIALIZE_TARGETS), *(f"{_id(t)}-force" for t, _ in MATERIALIZE_TARGETS[::2])])
def test_materialize_into_a_protected_folder_is_refused_and_changes_nothing(world, tmp_path, target, message, force):
    (world / "link-to-work").symlink_to(world / "work", target_is_directory=True)
    before = snapshot(world)
    result = user("lymphatlas", "materialize", str(world / "r100"), "--nnunet", str(world / target), "--quiet",
                  *(["--force"] if force else []), cwd=tmp_path)
    refused(result, message)
    assert snapshot(world) == before


def test_materialize_with_preprocessed_in_work_is_refused(world, tmp_path):
    before = snapshot(world)
    result = user("lymphatlas", "materialize", str(world / "r100"), "--nnunet", str(tmp_path / "raw"), "--preprocessed",
                  str(world / "work"), "--quiet", cwd=tmp_path)
    refused(result, "it is a WORK folder")
    assert snapshot(world) == before and not (tmp_path / "raw").exists()


@pytest.mark.parametrize("kind", ["key", "dicom", "notes"])
def test_materialize_force_on_a_dataset_folder_holding_foreign_files_is_refused(world, tmp_path, kind):
    raw = world / "raw"
    raw.mkdir()
    os.replace(_foreign(world, kind), raw / "Dataset501_LymphAtlas")
    before = snapshot(world)
    result = user("lymphatlas", "materialize", str(world / "r100"), "--nnunet", str(raw), "--force", "--quiet",
                  cwd=tmp_path)
    expected = {"key": "a de-identification key or id map", "dicom": "DICOM files", "notes": "unrelated files"}[kind]
    refused(result, f"it holds {expected}", "materialize --force writes an nnU-Net raw dataset")
    assert snapshot(world) == before


# --- verify: a release tampered in one file, its manifest re-sealed --------------------------------------------


def reseal(release: Path, *rels: str) -> None:
    """Record the tampered files' new sha256 and size in the manifest: only a cross-check can catch them."""
    manifest = json.loads((release / "manifest.json").read_text())
    for rel in rels:
        data = (release / rel).read_bytes()
        manifest["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (release / "manifest.json").write_text(manifest_mod.dumps(manifest))
    assert manifest_mod.verify_files(release) == []


def _splits(release: Path) -> dict:
    return json.loads((release / "splits.json").read_text())


def _train_pair(release: Path) -> tuple[str, dict, dict]:
    """A train case and the placement of a train case of another subject in another fold."""
    cases = _splits(release)["cases"]
    train = sorted((c, e) for c, e in cases.items() if e["split"] == "train")
    case_id, entry = train[0]
    other = next(e for _c, e in train if e["subject_id"] != entry["subject_id"] and e["fold"] != entry["fold"])
    return case_id, entry, other


def _move_in_splits(release: Path) -> tuple[str, list[str]]:
    case_id, _entry, other = _train_pair(release)
    doc = _splits(release)
    doc["cases"][case_id].update(subject_id=other["subject_id"], fold=other["fold"])
    (release / "splits.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    reseal(release, "splits.json")
    return case_id, ["splits.json", "subject_id", "fold"]


def _edit_csv(release: Path, column: str) -> tuple[str, list[str]]:
    case_id, entry, other = _train_pair(release)
    lines = (release / "metadata" / "cases.csv").read_text().splitlines(keepends=True)
    header = lines[0].rstrip("\n").split(",")
    at = header.index(column)
    for i, line in enumerate(lines):
        if line.startswith(case_id + ","):
            cells = line.split(",")
            cells[at] = {"fold": str(other["fold"]), "diagnosis": "NHL" if entry["diagnosis"] == "HL" else "HL"}[column]
            lines[i] = ",".join(cells)
    (release / "metadata" / "cases.csv").write_text("".join(lines))
    reseal(release, "metadata/cases.csv")
    return case_id, ["metadata/cases.csv", column]


def _edit_shard_fold(release: Path) -> tuple[str, list[str]]:
    case_id, entry, other = _train_pair(release)
    rel = next(r for r in manifest_mod.read_manifest(release)["files"]
               if r.startswith(f"data/{entry['diagnosis'].lower()}/train-"))
    table = pq.read_table(release / rel)
    folds = [other["fold"] if c == case_id else f for c, f in zip(table["case_id"].to_pylist(),
                                                                   table["fold"].to_pylist())]
    table = table.set_column(table.schema.get_field_index("fold"), table.schema.field("fold"),
                             pa.array(folds, type=table.schema.field("fold").type))
    pq.write_table(table, release / rel, row_group_size=1, compression="zstd")
    reseal(release, rel)
    return case_id, [rel, "splits.json", "metadata/cases.csv", "fold"]


def _edit_card_counts(release: Path) -> tuple[str, list[str]]:
    stats = json.loads((release / "splits.json").read_text())["cases"]
    n = len(stats)
    text = (release / "README.md").read_text()
    assert f": {n} examinations of" in text
    (release / "README.md").write_text(text.replace(f": {n} examinations of", f": {n + 3} examinations of"))
    reseal(release, "README.md")
    return "", ["README.md", f"examinations (cases) {n + 3}, the release has {n}"]


def _edit_changelog_counts(release: Path) -> tuple[str, list[str]]:
    n = len(_splits(release)["cases"])
    text = (release / "CHANGELOG.md").read_text()
    edited = text.replace(f"| cases | {n} |", f"| cases | {n - 1} |", 1)
    assert edited != text
    (release / "CHANGELOG.md").write_text(edited)
    reseal(release, "CHANGELOG.md")
    return "", ["CHANGELOG.md", f"'cases' {n - 1}, the release has {n}", "README.md"]


def _edit_card_configs(release: Path) -> tuple[str, list[str]]:
    text = (release / "README.md").read_text()
    edited = text.replace("    path: data/hl/test-*.parquet\n", "    path: data/nhl/test-*.parquet\n", 1)
    edited = edited.replace("- config_name: hl\n  data_files:\n  - split: train\n", "- config_name: hl\n  data_files:\n"
                            "  - split: validation\n    path: data/hl/train-*.parquet\n  - split: train\n", 1)
    assert edited != text
    (release / "README.md").write_text(edited)
    reseal(release, "README.md")
    return "", ["README.md", "its configs are", "hl: test/train/validation"]


TAMPERS = {
    "splits-moves-fold-and-subject": _move_in_splits,
    "cases-csv-fold": lambda r: _edit_csv(r, "fold"),
    "cases-csv-diagnosis": lambda r: _edit_csv(r, "diagnosis"),
    "shard-fold-column": _edit_shard_fold,
    "card-counts": _edit_card_counts,
    "card-configs": _edit_card_configs,
    "changelog-counts": _edit_changelog_counts,
}


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_a_tampered_and_resealed_release_fails_verify_and_publish(template, tmp_path, tamper):
    release = tmp_path / "release"
    shutil.copytree(template / "r100", release)
    case_id, names = TAMPERS[tamper](release)
    result = user("lymphatlas", "verify", str(release), "--quiet", cwd=tmp_path)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    for fragment in [case_id, *names]:
        assert fragment in result.stdout, (fragment, result.stdout)
    with pytest.raises(PublishError) as e:
        publish_mirror(release, tmp_path / "mirror")
    assert case_id in str(e.value) and names[0] in str(e.value)
    assert not (tmp_path / "mirror" / "1.0.0").exists()


def test_consistent_releases_verify(template, tmp_path):
    """A first release and an update (its changelog with before/after columns) pass every cross-check."""
    for name in ("r100", "r110", "mirror/1.0.0"):
        assert manifest_mod.verify_all(template / name) == [], name
    result = user("lymphatlas", "verify", str(template / "r110"), "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stdout


def test_a_subject_split_across_folds_everywhere_alike_fails_verify(template, tmp_path):
    """splits.json, cases.csv and the shard all moved alike: the patient grouping itself is checked."""
    release = tmp_path / "release"
    shutil.copytree(template / "r100", release)
    cases = _splits(release)["cases"]
    subject = next(s for s in {e["subject_id"] for e in cases.values()}
                   if sum(e["subject_id"] == s and e["split"] == "train" for e in cases.values()) > 1)
    case_id = sorted(c for c, e in cases.items() if e["subject_id"] == subject)[0]
    fold = (cases[case_id]["fold"] + 1) % 5
    doc = _splits(release)
    doc["cases"][case_id]["fold"] = fold
    (release / "splits.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    _set_csv_and_shard_fold(release, case_id, fold)
    reseal(release, "splits.json", "metadata/cases.csv", *[r for r in manifest_mod.read_manifest(release)["files"]
                                                          if r.startswith("data/")])
    problems = [str(p) for p in manifest_mod.verify_all(release)]
    assert any(f"subject {subject} is in more than one split or fold" in p and case_id in p for p in problems), problems


def _set_csv_and_shard_fold(release: Path, case_id: str, fold: int) -> None:
    lines = (release / "metadata" / "cases.csv").read_text().splitlines(keepends=True)
    at = lines[0].split(",").index("fold")
    lines = [",".join([*ln.split(",")[:at], str(fold), *ln.split(",")[at + 1:]]) if ln.startswith(case_id + ",")
             else ln for ln in lines]
    (release / "metadata" / "cases.csv").write_text("".join(lines))
    for rel in [r for r in manifest_mod.read_manifest(release)["files"] if r.startswith("data/")]:
        table = pq.read_table(release / rel)
        if case_id in table["case_id"].to_pylist():
            folds = [fold if c == case_id else f
                     for c, f in zip(table["case_id"].to_pylist(), table["fold"].to_pylist())]
            field = table.schema.field("fold")
            table = table.set_column(table.schema.get_field_index("fold"), field, pa.array(folds, type=field.type))
            pq.write_table(table, release / rel, row_group_size=1, compression="zstd")


# --- the decoded cache's case.json ---------------------------------------------------------------------------


def test_a_doubled_affine_in_a_cached_case_json_is_rebuilt_not_served(template, tmp_path, caplog):
    release = Release(template / "r100", state_dir=tmp_path / "state")
    case_id = sorted(release.manifest["cases"])[0]
    truth = np.reshape(release.read_meta(case_id)["affine"], (4, 4))
    cache = DecodedCache(tmp_path / "cache")
    entry = cache.ensure(release, case_id)
    np.testing.assert_array_equal(entry.affine, truth)
    info_path = entry.path / "case.json"
    info = json.loads(info_path.read_text())
    info["affine_ras"] = (np.asarray(info["affine_ras"]) * 2).tolist()
    info_path.write_text(json.dumps(info, sort_keys=True))
    content_hash = release.manifest["cases"][case_id]
    assert cache.open("1.0.0", case_id, content_hash) is None
    assert f"{info_path} does not match its checksum" in caplog.text
    rebuilt = cache.ensure(release, case_id)
    np.testing.assert_array_equal(rebuilt.affine, truth)
    assert cache.open("1.0.0", case_id, content_hash) is not None


# --- convert records its source ---------------------------------------------------------------------------


def test_release_refuses_the_source_a_real_convert_recorded(synthetic_good_cohort, tmp_path):
    """build.json of a real convert names its source: a release into it is refused, the source untouched."""
    from builder.convert.pipeline import convert_cohort

    source, truths = synthetic_good_cohort
    work = tmp_path / "work"
    convert_cohort(source, work, exams=[truths[0].exam_id], workers=1, progress=False)
    assert Path(json.loads((work / "build.json").read_text())["source"]) == Path(source).resolve()
    before = snapshot(Path(source))
    with pytest.raises(TargetError, match="it is the DICOM source of WORK"):
        build_release(work, source, version="1.0.0", overwrite=True)
    assert snapshot(Path(source)) == before
