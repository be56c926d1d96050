"""Codec and parquet shards: round trips against the arrays written, nibabel and datasets as peers."""

from __future__ import annotations

import gzip
import json

import datasets
import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from builder.release.shards import arrow_schema, features, shard_name, write_shards
from lymphatlas_ds import codec
from lymphatlas_ds.errors import IntegrityError, SchemaError
from lymphatlas_ds.schema import IMAGE_COLUMNS, METADATA_COLUMNS
from tests.support.releases import datasets_cache_in_tmp  # noqa: F401 (fixture)

OBLIQUE = np.array(
    [
        [-0.97, 0.05, 0.0, 251.3],
        [-0.05, -0.97, 0.1, 180.25],
        [0.0, 0.1, 2.99, -612.7],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


# datasets' arrow cache of these small releases stays out of the user's cache folder
pytestmark = pytest.mark.usefixtures("datasets_cache_in_tmp")



def _volumes(rng: np.random.Generator, shape=(7, 9, 11)):
    return {
        "ct": rng.integers(-1024, 3000, shape).astype(np.int16),
        "pet": rng.gamma(2.0, 1.5, shape).astype(np.float32),
        "label": (rng.random(shape) > 0.9).astype(np.uint8),
    }


@pytest.mark.parametrize("name", IMAGE_COLUMNS)
def test_codec_round_trip_and_nibabel_reads_the_same_voxels(name):
    array = _volumes(np.random.default_rng(1))[name]
    cell = codec.encode_volume(array, OBLIQUE, codec.cell_path("LA-1", name))
    assert cell["path"] == f"LA-1_{name}.nii.gz"
    assert cell["bytes"][:2] == b"\x1f\x8b"  # a gzip cell: the row group's size is its compressed size
    raw = gzip.decompress(cell["bytes"])  # the peer: Python's own gzip
    assert raw == codec.encode_volume(array, OBLIQUE, "x", level=None)["bytes"]  # the same NIfTI file, compressed
    decoded, affine = codec.decode_volume(cell)
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)
    np.testing.assert_array_equal(affine, OBLIQUE)  # exact, from the float64 comment extension
    # The peer: nibabel reading the cell as a NIfTI file ([x, y, z] order) sees the same voxels.
    image = nib.Nifti1Image.from_bytes(raw)
    np.testing.assert_array_equal(np.asanyarray(image.dataobj), array.transpose(2, 1, 0))
    np.testing.assert_allclose(image.affine, OBLIQUE, atol=1e-4)  # other readers: the float32 sform
    assert image.header["sform_code"] == 1 and image.header["qform_code"] == 1


def test_codec_view_is_read_only_and_copy_is_writable():
    array = _volumes(np.random.default_rng(2))["pet"]
    cell = codec.encode_volume(array, np.eye(4), "x", level=None)  # a raw cell (releases before gzip cells)
    view, _ = codec.decode_volume(cell, copy=False)
    assert not view.flags.writeable and view.flags.c_contiguous
    copied, _ = codec.decode_volume(cell)
    copied[0, 0, 0] = -1.0  # must not raise
    # A gzip cell is inflated into a buffer the array owns: writable either way, and not shared.
    cell = codec.encode_volume(array, np.eye(4), "x")
    inflated, _ = codec.decode_volume(cell, copy=False)
    assert inflated.flags.writeable and inflated.flags.c_contiguous
    inflated[0, 0, 0] = -1.0
    np.testing.assert_array_equal(codec.decode_volume(cell)[0], array)


def test_codec_accepts_gzipped_cells_and_scaled_files():
    array = _volumes(np.random.default_rng(3))["ct"]
    cell = codec.encode_volume(array, np.eye(4), "x", level=None)
    # Any gzip writer's output (Python's gzip at level 9, with a file name and a time stamp) and raw NIfTI.
    np.testing.assert_array_equal(codec.decode_volume({"bytes": gzip.compress(cell["bytes"], 9), "path": "x.nii.gz"})[0], array)
    np.testing.assert_array_equal(codec.decode_volume(cell)[0], array)
    # A file written by another tool with slope/intercept (as dcm2niix does): values as nibabel scales them.
    image = nib.Nifti1Image(array.transpose(2, 1, 0), np.eye(4))
    image.header.set_slope_inter(2.0, -1024.0)
    decoded, _ = codec.decode_volume(image.to_bytes())
    peer = nib.Nifti1Image.from_bytes(image.to_bytes())
    np.testing.assert_allclose(decoded, np.asanyarray(peer.dataobj).transpose(2, 1, 0))
    np.testing.assert_allclose(decoded, array * 2.0 - 1024.0)


def test_codec_errors_name_the_cell():
    cell = codec.encode_volume(np.zeros((4, 4, 4), np.int16), np.eye(4), "LA-9_ct", level=None)
    with pytest.raises(SchemaError, match="LA-9_ct.nii.*truncated"):
        codec.decode_volume({"bytes": cell["bytes"][:-10], "path": cell["path"]})
    cell = codec.encode_volume(np.random.default_rng(0).normal(0, 99, (9, 9, 9)).astype(np.int16), np.eye(4), "LA-9_ct")
    with pytest.raises(IntegrityError, match="LA-9_ct.nii.gz.*gzip.*re-download"):
        codec.decode_volume({"bytes": cell["bytes"][:-10], "path": cell["path"]})
    with pytest.raises(SchemaError, match="not a NIfTI-1"):
        codec.decode_volume({"bytes": b"x" * 400, "path": "bad.nii"})
    with pytest.raises(SchemaError, match="no bytes"):
        codec.decode_volume({"bytes": None, "path": "LA-9_ct.nii"})
    with pytest.raises(SchemaError, match="3-D"):
        codec.encode_volume(np.zeros((4, 4)), np.eye(4), "flat")


@settings(max_examples=25, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 6)),
    dtype=st.sampled_from(["int16", "float32", "uint8"]),
    seed=st.integers(0, 2**16),
)
def test_codec_round_trip_property(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    array = (rng.normal(0, 100, shape)).astype(dtype)
    affine = np.diag([*rng.uniform(0.5, 5, 3), 1.0])
    affine[:3, 3] = rng.uniform(-500, 500, 3)
    decoded, back = codec.decode_volume(codec.encode_volume(array, affine, "p"))
    np.testing.assert_array_equal(decoded, array)
    np.testing.assert_array_equal(back, affine)


def test_encoding_is_deterministic():
    vols = _volumes(np.random.default_rng(4))
    assert codec.encode_volume(vols["pet"], OBLIQUE, "a")["bytes"] == codec.encode_volume(vols["pet"], OBLIQUE, "a")["bytes"]


def _row(case_id: str, rng: np.random.Generator, shape=(5, 6, 7)) -> dict:
    row = {name: None for name in METADATA_COLUMNS}
    row.update(case_id=case_id, subject_id="LP-" + case_id, diagnosis="HL", split="train", fold=0, exam_index=0)
    row.update(spacing=[2.0, 2.0, 3.0], shape=list(shape), affine=list(np.eye(4).ravel()), lesion_count=1, tmtv_ml=1.5)
    vols = _volumes(rng, shape)
    row.update({n: codec.encode_volume(vols[n], np.eye(4), codec.cell_path(case_id, n)) for n in IMAGE_COLUMNS})
    return row, vols


def test_shards_hold_one_case_each_and_load_with_datasets(tmp_path):
    rng = np.random.default_rng(5)
    made = [_row(f"LA-{i}", rng) for i in range(5)]
    infos = write_shards((r for r, _ in made), tmp_path / "data" / "hl", split="train", release_root=tmp_path)
    assert [i.path for i in infos] == [f"data/hl/{shard_name('train', k, 5)}" for k in range(5)]
    assert [i.case_ids for i in infos] == [(f"LA-{k}",) for k in range(5)]
    assert not list((tmp_path / "data" / "hl").glob(".*"))  # no temporary file left
    for info in infos:
        path = tmp_path / info.path
        (row,) = [r for r, _ in made if r["case_id"] in info.case_ids]
        cells = sum(len(row[n]["bytes"]) for n in IMAGE_COLUMNS)
        # on disk a shard is its cells plus its footer (schema, features: a few KiB)
        assert cells < info.size == path.stat().st_size < cells + 32 * 1024
        meta = pq.ParquetFile(path).metadata
        assert meta.num_row_groups == meta.num_rows == len(info.case_ids) == 1
        codecs = {meta.row_group(0).column(c).path_in_schema: meta.row_group(0).column(c).compression
                  for c in range(meta.num_columns)}
        # gzip cells stored as they are (the viewer's row-group size is then their size), metadata zstd
        assert {codecs[f"{n}.bytes"] for n in IMAGE_COLUMNS} == {"UNCOMPRESSED"}
        assert {c for p, c in codecs.items() if p.split(".")[0] in METADATA_COLUMNS} == {"ZSTD"}
        hf = json.loads(pq.read_schema(path).metadata[b"huggingface"])
        assert hf["info"]["features"]["ct"]["_type"] == "Nifti"
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "data/hl/*.parquet"), split="train")
    assert ds.features == features()
    assert ds["case_id"] == [f"LA-{i}" for i in range(5)]
    for k, (_, vols) in enumerate(made):
        for name in IMAGE_COLUMNS:
            image = ds[k][name]
            np.testing.assert_array_equal(np.asanyarray(image.dataobj).transpose(2, 1, 0), vols[name])


def test_file_cells_are_copied_into_the_shard_and_removed(tmp_path):
    """The builder's cells: gzip streamed into files (codec.encode_volume_to), copied over the writer's
    placeholders once the shard is closed; datasets (nibabel) reads the generator's arrays back."""
    rng = np.random.default_rng(9)
    made, files = [], []
    for i in range(3):
        row, vols = _row(f"LA-{i}", rng, shape=(6 + i, 5, 4))
        for name in IMAGE_COLUMNS:
            target = tmp_path / "cells" / codec.cell_path(row["case_id"], name)
            target.parent.mkdir(exist_ok=True)
            with open(target, "wb") as out:
                path = codec.encode_volume_to(out, vols[name], np.eye(4), target.name)
            row[name] = {"file": target, "path": path}
            files.append(target)
        made.append((row, vols))
    infos = write_shards([r for r, _ in made], tmp_path / "data" / "hl", split="train", release_root=tmp_path)
    assert [info.case_ids for info in infos] == [("LA-0",), ("LA-1",), ("LA-2",)]
    assert not any(f.exists() for f in files)
    assert not list((tmp_path / "data" / "hl").glob(".*"))
    ds = datasets.load_dataset("parquet", data_files=[str(tmp_path / info.path) for info in infos], split="train")
    for k, (_, vols) in enumerate(made):
        for name in IMAGE_COLUMNS:
            np.testing.assert_array_equal(np.asanyarray(ds[k][name].dataobj).transpose(2, 1, 0), vols[name])


def test_a_column_chunk_not_laid_out_as_expected_is_refused(tmp_path, monkeypatch):
    """The cells are copied over placeholders where the footer says the value ends: a writer that compresses
    the image columns (a layout the copy cannot patch) is refused before a byte is written, and no file stays."""
    from builder.release import shards

    plain = shards._writer

    def compressing(path, schema):
        writer = plain(path, schema)
        writer.close()
        return shards.pq.ParquetWriter(path, schema, compression="snappy")

    monkeypatch.setattr(shards, "_writer", compressing)
    row, _ = _row("LA-1", np.random.default_rng(10))
    with pytest.raises(SchemaError, match="column chunk"):
        write_shards([row], tmp_path / "d", split="train", release_root=tmp_path)
    assert not list((tmp_path / "d").iterdir())


def test_empty_split_writes_nothing(tmp_path):
    # datasets refuses a split made only of empty files ("corresponds to no data"): write none.
    assert write_shards([], tmp_path / "data" / "nhl", split="test", release_root=tmp_path) == []
    assert not list((tmp_path / "data" / "nhl").iterdir())


def test_written_schema_is_the_features_schema(tmp_path):
    row, _ = _row("LA-1", np.random.default_rng(8))
    (info,) = write_shards([row], tmp_path / "d", split="train", release_root=tmp_path)
    written = pq.read_schema(tmp_path / info.path)
    assert written.metadata == arrow_schema().metadata
    assert datasets.Features.from_arrow_schema(written) == features()


def test_a_bad_row_names_the_case_and_leaves_no_file(tmp_path):
    row, _ = _row("LA-bad", np.random.default_rng(7))
    row["fold"] = "zero"
    with pytest.raises(SchemaError, match="LA-bad"):
        write_shards([row], tmp_path / "d", split="train", release_root=tmp_path)
    assert not list((tmp_path / "d").iterdir())


def test_a_stale_affine_extension_loses_to_an_edited_sform():
    cell = codec.encode_volume(np.zeros((2, 3, 4), np.int16), OBLIQUE, "x")
    image = nib.Nifti1Image.from_bytes(gzip.decompress(cell["bytes"]))
    moved = OBLIQUE.copy()
    moved[:3, 3] += 10.0
    image.set_sform(moved, code=1)
    _, affine = codec.decode_volume(image.to_bytes())
    np.testing.assert_allclose(affine, moved, atol=1e-4)


def test_side_config_tables_are_written_one_row_group_per_file(tmp_path):
    """write_table_files (the lesions and preview configs): 5 rows at 2 per file are 3 files of one row
    group each, named as the Hub's shards, that plain ``datasets`` reads back in order; an empty table is
    one empty file (datasets resolves a split only from a file); no temporary file stays."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from builder.release.shards import write_table_files

    table = pa.table({"case_id": [f"LA-{i}" for i in range(5)], "v": [float(i) for i in range(5)]})
    paths = write_table_files(table, tmp_path / "lesions", "train", 2)
    assert [p.name for p in paths] == [f"train-0000{i}-of-00003.parquet" for i in range(3)]
    assert [pq.ParquetFile(p).metadata.num_row_groups for p in paths] == [1, 1, 1]
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "lesions" / "train-*.parquet"), split="train")
    assert ds["case_id"] == table.column("case_id").to_pylist()
    (empty,) = write_table_files(table.slice(0, 0), tmp_path / "empty", "test", 2)
    assert empty.name == "test-00000-of-00001.parquet" and pq.read_table(empty).num_rows == 0
    assert not list(tmp_path.rglob(".*"))
