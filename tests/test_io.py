"""lymphatlas_ds._io: the one atomic writer and the one JSON reader the project uses."""

from __future__ import annotations

import json
import os

import pytest

from lymphatlas_ds._io import read_json, write_atomic
from lymphatlas_ds.errors import SchemaError


def test_write_atomic_creates_the_parent_and_writes_text_as_utf8(tmp_path):
    target = tmp_path / "a" / "b" / "note.txt"
    assert write_atomic(target, "SUV\u2009max\n") == target
    assert target.read_bytes() == "SUV\u2009max\n".encode("utf-8")
    assert os.listdir(target.parent) == ["note.txt"]  # no temporary file left beside it


def test_write_atomic_replaces_an_existing_file(tmp_path):
    target = tmp_path / "data.bin"
    target.write_bytes(b"old contents that are longer")
    write_atomic(target, b"new", fsync=True)
    assert target.read_bytes() == b"new"


def test_write_atomic_default_mode_follows_the_umask_and_an_explicit_mode_wins(tmp_path):
    old = os.umask(0o027)
    try:
        plain = write_atomic(tmp_path / "plain.txt", "x")
        secret = write_atomic(tmp_path / "secret.txt", "x", mode=0o600)
        wide = write_atomic(tmp_path / "wide.txt", "x", mode=0o644)  # wider than the umask allows
    finally:
        os.umask(old)
    assert plain.stat().st_mode & 0o777 == 0o640  # what open() would give, unlike mkstemp's 0600
    assert secret.stat().st_mode & 0o777 == 0o600
    assert wide.stat().st_mode & 0o777 == 0o644


def test_write_atomic_leaves_the_target_and_no_temporary_file_on_error(tmp_path):
    target = tmp_path / "kept.txt"
    target.write_text("original")
    with pytest.raises(TypeError):
        write_atomic(target, 12345)  # type: ignore[arg-type]  # neither bytes nor str: write fails
    assert target.read_text() == "original"
    assert os.listdir(tmp_path) == ["kept.txt"]


def test_read_json_returns_the_document(tmp_path):
    path = tmp_path / "doc.json"
    path.write_text(json.dumps({"version": "1.0.0"}))
    assert read_json(path, what="a test document", fix="write it") == {"version": "1.0.0"}


def test_read_json_missing_file_names_path_what_and_fix(tmp_path):
    path = tmp_path / "manifest.json"
    with pytest.raises(SchemaError) as info:
        read_json(path, what="the manifest of a release", fix="re-download the release")
    message = str(info.value)
    assert str(path) in message and "not found" in message
    assert "the manifest of a release" in message and "re-download the release" in message
    assert isinstance(info.value.__cause__, FileNotFoundError)


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00garbage"])
def test_read_json_invalid_file_names_path_what_and_fix(tmp_path, content):
    path = tmp_path / "splits.json"
    path.write_bytes(content)
    with pytest.raises(SchemaError, match="is not valid JSON") as info:
        read_json(path, what="the splits of a release", fix="rebuild it")
    message = str(info.value)
    assert str(path) in message and "the splits of a release" in message and "rebuild it" in message


def _load_case(folder):
    from builder.convert.case import load_case

    return load_case(folder)


def _read_splits(folder):
    from builder.release.splits import read_splits

    return read_splits(folder)


def _read_manifest(folder):
    from lymphatlas_ds.manifest import read_manifest

    return read_manifest(folder)


@pytest.mark.parametrize(("reader", "name", "fix"), [
    (_load_case, "case.json", "python -m builder convert"),
    (_read_splits, "splits.json", "previous release"),
    (_read_manifest, "manifest.json", "re-download the release"),
])
def test_callers_report_missing_and_broken_json_with_path_and_fix(tmp_path, reader, name, fix):
    with pytest.raises(SchemaError, match="not found") as missing:
        reader(tmp_path)
    assert str(tmp_path / name) in str(missing.value) and fix in str(missing.value)
    (tmp_path / name).write_text("{")
    with pytest.raises(SchemaError, match="not valid JSON") as broken:
        reader(tmp_path)
    assert str(tmp_path / name) in str(broken.value) and fix in str(broken.value)
