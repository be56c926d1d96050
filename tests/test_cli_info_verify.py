"""`lymphatlas info` and `lymphatlas verify` on releases built from fake WORK folders."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lymphatlas_ds.cli import main
from tests.support.releases import build_fake_release

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    release = build_fake_release(root, n_patients=12, seed=4, shape_zyx=(10, 14, 14))
    return release.path, release.truth


@pytest.fixture
def damaged(built, tmp_path):
    src, _ = built
    dst = tmp_path / "release"
    shutil.copytree(src, dst)
    return dst


def test_info_counts_and_statistics_match_the_work_truth(built, capsys, monkeypatch, tmp_path):
    path, truth = built
    monkeypatch.setenv("LYMPHATLAS_CACHE", str(tmp_path / "cache"))
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    table = json.loads((path / "splits.json").read_text())["cases"]
    assert info["version"] == "1.0.0" and info["n_cases"] == len(truth)
    assert info["n_subjects"] == len({c.subject_id for c in truth.values()})
    for config, diagnoses in (("all", {"HL", "NHL"}), ("hl", {"HL"}), ("nhl", {"NHL"})):
        for split in ("train", "test"):
            ids = [c for c in truth if truth[c].diagnosis in diagnoses and table[c]["split"] == split]
            got = info["configs"][config][split]
            assert got["cases"] == len(ids)
            assert got["subjects"] == len({truth[c].subject_id for c in ids})
            # sex counts patients, each at their first examination (lymphatlas_ds.statistics)
            first = {}
            for c in sorted(ids, key=lambda c: (truth[c].subject_id, truth[c].case_json["clinical"]["exam_index"], c)):
                first.setdefault(truth[c].subject_id, truth[c].case_json["clinical"]["sex"])
            assert got["sex"] == dict(sorted(Counter(first.values()).items()))
            tmtv = [truth[c].case_json["lesions"]["tmtv_ml"] for c in ids]
            if tmtv:
                # rounded to 2 decimals, as the dataset card prints them
                assert got["tmtv_ml"]["median"] == round(statistics.median(tmtv), 2)
                assert got["tmtv_ml"]["max"] == round(max(tmtv), 2)
            if split == "train":
                assert got["folds"] == dict(sorted(Counter(str(table[c]["fold"]) for c in ids).items()))
    assert main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert "LymphAtlas release 1.0.0" in text and f"{len(truth)} cases" in text


def test_info_on_a_mirror_lists_its_versions(built, tmp_path, capsys, monkeypatch):
    path, _ = built
    monkeypatch.setenv("LYMPHATLAS_CACHE", str(tmp_path / "cache"))
    mirror = tmp_path / "mirror"
    shutil.copytree(path, mirror / "1.0.0")
    (mirror / "versions.json").write_text(json.dumps({"latest": "1.0.0", "versions": ["1.0.0"]}))
    assert main(["info", str(mirror), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["source"]["kind"] == "mirror" and info["source"]["versions"] == ["1.0.0"]


def test_verify_ok(built, capsys):
    path, _ = built
    assert main(["verify", str(path)]) == 0
    assert "files OK" in capsys.readouterr().out


def test_verify_finds_a_same_size_modification_only_with_sha256(damaged, capsys):
    rel = sorted(p.relative_to(damaged).as_posix() for p in (damaged / "data").rglob("*.parquet"))[0]
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(damaged / rel).metadata
    chunk = next(meta.row_group(0).column(i) for i in range(meta.num_columns)
                 if meta.row_group(0).column(i).path_in_schema == "ct.bytes")
    data = bytearray((damaged / rel).read_bytes())
    data[chunk.data_page_offset + chunk.total_compressed_size // 2] ^= 0x01  # a byte inside the CT cell
    (damaged / rel).write_bytes(bytes(data))
    assert main(["verify", str(damaged)]) == 1
    out = capsys.readouterr().out
    assert f"{rel}: sha256" in out
    assert main(["verify", str(damaged), "--quick"]) == 0  # sizes only: documented as a quick check


def test_verify_truncated_missing_and_unlisted_files(damaged, capsys):
    shard = sorted((damaged / "data").rglob("*.parquet"))[-1]
    shard.write_bytes(shard.read_bytes()[:1000])
    (damaged / "splits.json").unlink()
    (damaged / "data" / "extra.parquet").write_bytes(b"x")
    assert main(["verify", str(damaged), "--quick"]) == 1
    out = capsys.readouterr().out
    assert f"{shard.relative_to(damaged).as_posix()}: size 1000" in out
    assert "splits.json: listed in the manifest but missing" in out
    assert "data/extra.parquet: present but not listed" in out


def test_cli_entry_point_exit_codes(damaged, tmp_path):
    def cli(*argv):
        return subprocess.run(
            [sys.executable, "-m", "lymphatlas_ds.cli", *argv], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120
        )

    assert cli("verify", str(damaged)).returncode == 0
    (damaged / "README.md").write_text("changed")
    bad = cli("verify", str(damaged))
    assert bad.returncode == 1 and "README.md" in bad.stdout
    missing = cli("verify", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def _edit_manifest(release: Path, edit) -> dict:
    manifest = json.loads((release / "manifest.json").read_text())
    edit(manifest)
    (release / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _user(*argv, cwd):
    """A console command as a user types it, from another folder."""
    env = {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(REPO_ROOT), "HOME": str(cwd)}
    return subprocess.run(list(argv), capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_a_hand_edited_manifest_fails_verify_and_is_not_published(damaged, tmp_path):
    """Version changed and a content hash zeroed: every file still matches its sha256, yet verify names what differs."""
    zeroed = sorted(json.loads((damaged / "manifest.json").read_text())["cases"])[0]

    def edit(m):
        m["version"] = "1.0.1"
        m["cases"][zeroed] = "0" * 64

    _edit_manifest(damaged, edit)
    run = _user(str(Path(sys.executable).parent / "lymphatlas"), "verify", str(damaged), cwd=tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "splits.json: is of version 1.0.0, the manifest says 1.0.1" in run.stdout
    assert "CHANGELOG.md: has no section '## 1.0.1'" in run.stdout
    shard_line = [line for line in run.stdout.splitlines() if zeroed in line and ".parquet" in line]
    assert shard_line and "the manifest says 0000000000000000" in shard_line[0]
    assert "metadata/cases.csv: case " + zeroed in run.stdout
    assert "Traceback" not in run.stderr
    publish = _user(sys.executable, "-m", "builder", "publish", str(damaged), "--mirror", str(tmp_path / "mirror"),
                    cwd=tmp_path)
    assert publish.returncode != 0 and "Traceback" not in publish.stderr
    assert "1.0.1" in publish.stderr and zeroed in publish.stderr
    assert not (tmp_path / "mirror" / "1.0.1").exists() and not (tmp_path / "mirror" / "versions.json").exists()


def test_verify_cross_checks_the_shards_case_ids(damaged, capsys):
    manifest = json.loads((damaged / "manifest.json").read_text())
    dropped = sorted(manifest["cases"])[-1]
    _edit_manifest(damaged, lambda m: m["cases"].pop(dropped))
    assert main(["verify", str(damaged)]) == 1
    out = capsys.readouterr().out
    assert f"the shards (data/): has 1 case(s) the manifest does not list: {dropped}" in out
    assert f"splits.json: has 1 case(s) the manifest does not list: {dropped}" in out
    # a case the manifest lists that no shard holds
    _edit_manifest(damaged, lambda m: m["cases"].update({dropped: manifest["cases"][dropped], "LA-ffffffff": "1" * 64}))
    assert main(["verify", str(damaged)]) == 1
    assert "the shards (data/): lacks 1 case(s) of the manifest: LA-ffffffff" in capsys.readouterr().out


def test_verify_content_decodes_every_case(built, capsys):
    path, truth = built
    assert main(["verify", str(path), "--content"]) == 0
    assert f"{len(truth)} cases decoded to their content hash" in capsys.readouterr().out


def test_verify_content_catches_voxels_changed_behind_a_consistent_manifest(damaged, capsys):
    """A shard rewritten with other voxels and its sha256 updated in the manifest: only decoding tells."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lymphatlas_ds.manifest import sha256_file

    rel = sorted(p.relative_to(damaged).as_posix() for p in (damaged / "data").rglob("*.parquet"))[0]
    table = pq.read_table(damaged / rel)
    case_id = table.column("case_id")[0].as_py()
    from lymphatlas_ds import codec

    cells = table.column("pet").to_pylist()
    pet, affine = codec.decode_volume(cells[0])
    pet[-1, -1, -1] = np.float32(1234.5)  # the last PET voxel, re-encoded as a valid cell
    cells[0] = {**cells[0], "bytes": bytes(codec.encode_volume(pet, affine, cells[0]["path"])["bytes"])}
    index = table.schema.get_field_index("pet")
    table = table.set_column(index, table.schema.field(index), pa.array(cells, type=table.schema.field(index).type))
    pq.write_table(table, damaged / rel, row_group_size=1)

    def resign(m):
        m["files"][rel] = {"sha256": sha256_file(damaged / rel), "size": (damaged / rel).stat().st_size}

    _edit_manifest(damaged, resign)
    assert main(["verify", str(damaged)]) == 0  # files and cross-checks agree
    capsys.readouterr()
    assert main(["verify", str(damaged), "--content"]) == 1
    out = capsys.readouterr().out
    assert f"case {case_id}:" in out and "does not match its content hash" in out
