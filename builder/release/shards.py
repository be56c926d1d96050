"""Parquet shards laid out as a Hugging Face dataset repo: ``data/<hl|nhl>/<split>-0000i-of-0000N.parquet``.

One row per case: the metadata columns of ``schema.METADATA_COLUMNS`` and the ``datasets.Nifti``
columns ``ct``, ``pet``, ``label`` (cells made by :mod:`lymphatlas_ds.codec`). Files are written
with pyarrow, not ``Dataset.to_parquet`` (which cannot set the codec), using the features' arrow
schema and its ``huggingface`` metadata, so plain ``datasets.load_dataset`` decodes the Nifti
columns. Choices, measured in ``benchmarks/bench_shards.py``:

- gzip cells (ISA-L deflate level 1, :data:`lymphatlas_ds.codec.GZIP_LEVEL`) stored as they are
  (parquet compression ``NONE`` on the image columns, zstd on the metadata). A row group's
  ``total_byte_size`` in the parquet metadata is the bytes of its data once read into arrow, which
  the Hub's dataset viewer refuses above 286 MiB ("Rows from parquet row groups are too big to be
  read"): with raw NIfTI cells under parquet zstd a 512x512x250-300 case was one 438-576 MiB row
  group; with gzip cells it is its compressed size (about 0.45x on the synthetic cases, see
  :data:`VIEWER_ROW_GROUP_LIMIT`). Same bytes on disk within a few %, encoded faster than zstd-3;
- one case per shard file, so a file is one row group (:data:`CASES_PER_SHARD`): a plain
  ``datasets`` stream that stops early (``next(iter(load_dataset(..., streaming=True)))``) then
  leaves no read in flight when the interpreter exits. ``datasets`` (5.2) scans a whole file with
  pyarrow's default ``pre_buffer``, which reads the file's later row groups ahead on pyarrow's I/O
  threads through the Python file object ``datasets`` opened; a read still running at exit needs the
  GIL during finalization, and the thread is ended under C++ frames: "terminate called without an
  active exception" (exit 134) or a hang in the I/O pool's shutdown (apache/arrow#45214,
  huggingface/datasets#7566). With three cases per file, 39 of 50 plain streams from a Hub served at
  50 MB/s aborted; with one case per file, 0 of 50 (``tests/test_hub_layout.py``);
- no dictionary encoding and no statistics on the image columns (useless on blobs);
- cells go into arrow without a copy (:func:`_row_table`), so writing a case holds its cells once.

Example:
    >>> feats = features()
    >>> type(feats["ct"]).__name__, feats["spacing_xyz"].length
    ('Nifti', 3)
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from lymphatlas_ds.errors import SchemaError
from lymphatlas_ds.schema import IMAGE_COLUMNS, METADATA_COLUMNS

from builder.release import provenance

log = logging.getLogger(__name__)

CASES_PER_SHARD = 1
"""Cases (row groups) in one shard file: with more, an early-stopped plain ``datasets`` stream leaves
pyarrow reading the next row groups ahead while the interpreter exits (see the module's docstring)."""

ZSTD_LEVEL = 3
"""zstd level of the metadata columns (the image cells are gzip already, stored uncompressed)."""

VIEWER_ROW_GROUP_LIMIT = 300_000_000
"""The Hub dataset viewer's ``max_arrow_data_in_memory`` (286 MiB): it refuses to read a row group whose
``total_byte_size`` (parquet metadata) is larger. A case whose cells pass it is logged as a warning."""

_LIST_TYPE = re.compile(r"list<(\w+)>\[(\d+)\]")


def _feature(type_name: str) -> Any:
    match = _LIST_TYPE.fullmatch(type_name)
    if match:
        return datasets.List(datasets.Value(match.group(1)), length=int(match.group(2)))
    return datasets.Value(type_name)


def features() -> datasets.Features:
    """The ``datasets.Features`` of a shard row: metadata columns, then the Nifti columns."""
    spec = {name: _feature(type_name) for name, type_name in METADATA_COLUMNS.items()}
    spec.update({name: datasets.Nifti() for name in IMAGE_COLUMNS})
    return datasets.Features(spec)


def arrow_schema() -> pa.Schema:
    """The arrow schema of a shard, with the ``huggingface`` features metadata that datasets reads."""
    return features().arrow_schema


def shard_name(split: str, index: int, count: int) -> str:
    """``train-00000-of-00002.parquet``: the Hub's shard naming, which its configs' globs match."""
    return f"{split}-{index:05d}-of-{count:05d}.parquet"


@dataclass(frozen=True)
class ShardInfo:
    """A written shard: its path relative to the release, the cases it holds (in order), its bytes
    on disk, its bytes once read into arrow (what ``datasets`` counts as a split's ``num_bytes``) and
    the largest ``total_byte_size`` of its row groups."""

    path: str
    case_ids: tuple[str, ...]
    size: int
    arrow_bytes: int = 0
    max_row_group_bytes: int = 0


def _leaf_paths(name: str, type_: pa.DataType) -> list[str]:
    """Parquet column paths of an arrow field (``spacing_xyz.list.element``, ``ct.bytes``): per-column options use them."""
    if pa.types.is_struct(type_):
        return [p for child in type_ for p in _leaf_paths(f"{name}.{child.name}", child.type)]
    if pa.types.is_list(type_) or pa.types.is_fixed_size_list(type_) or pa.types.is_large_list(type_):
        return _leaf_paths(f"{name}.list.element", type_.value_type)
    return [name]


def _writer(path: Path, schema: pa.Schema) -> pq.ParquetWriter:
    meta_cols = list(METADATA_COLUMNS)
    # The cells are gzip already: stored as they are (zstd over deflate gains nothing and costs time).
    meta_leaves = [p for c in meta_cols for p in _leaf_paths(c, schema.field(c).type)]
    compression = {p: "zstd" for p in meta_leaves}
    compression.update({p: "none" for c in IMAGE_COLUMNS for p in _leaf_paths(c, schema.field(c).type)})
    return pq.ParquetWriter(
        path,
        schema,
        compression=compression,
        compression_level={p: ZSTD_LEVEL for p in meta_leaves},
        use_dictionary=[c for c in meta_cols if METADATA_COLUMNS[c] == "string"],
        write_statistics=meta_cols,
        # A page index / bloom filters on blobs would cost space for nothing.
        write_page_index=False,
    )


def _cell_array(cell: Mapping[str, Any], type_: pa.DataType) -> pa.Array:
    """A one-cell Nifti struct array whose bytes are the cell's own buffer (no copy)."""
    data = cell["bytes"]
    offsets = pa.array([0, len(data)], pa.int32()).buffers()[1]
    blob = pa.Array.from_buffers(pa.binary(), 1, [None, offsets, pa.py_buffer(data)])
    return pa.StructArray.from_arrays([blob, pa.array([cell["path"]], pa.string())], fields=list(type_))


def _row_table(row: Mapping[str, Any], schema: pa.Schema) -> pa.Table:
    """One case's row as a one-row arrow table of the shard schema; the cells' bytes are not copied."""
    try:
        meta_schema = pa.schema([schema.field(name) for name in METADATA_COLUMNS])
        meta = pa.Table.from_pylist([{name: row[name] for name in METADATA_COLUMNS}], schema=meta_schema)
        columns = [meta.column(name) for name in METADATA_COLUMNS]
        columns += [_cell_array(row[name], schema.field(name).type) for name in IMAGE_COLUMNS]
        return pa.Table.from_arrays(columns, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError, TypeError) as e:
        raise SchemaError(
            f"case {row.get('case_id')!r}: its row does not fit the shard schema ({e}); "
            "check lymphatlas_ds.schema.METADATA_COLUMNS and the case.json it came from"
        ) from e


class _PartialShards:
    """The shards of one split under hidden temporary names, a new one opened for each case."""

    def __init__(self, out_dir: Path, split: str) -> None:
        self.out_dir, self.split = out_dir, split
        self.schema = arrow_schema()
        self.temp_paths: list[Path] = []
        self.shard_cases: list[list[str]] = []
        self.writer: pq.ParquetWriter | None = None
        self.arrow_bytes: list[int] = []  # per shard: bytes of its rows in arrow
        self.max_row_group: list[int] = []  # per shard: the largest row group (parquet total_byte_size)
        self.provenance: dict[str, Any] = {}  # case id -> provenance of the current shard (key-value metadata)

    def _open_new(self) -> pq.ParquetWriter:
        """Start the next temporary shard."""
        temp = self.out_dir / f".{self.split}-{len(self.temp_paths):05d}.parquet.partial"
        self.temp_paths.append(temp)
        self.shard_cases.append([])
        self.arrow_bytes.append(0)
        self.max_row_group.append(0)
        return _writer(temp, self.schema)

    def add(self, row: Mapping[str, Any]) -> None:
        """Write one case as the row group of a new shard (:data:`CASES_PER_SHARD`)."""
        if self.writer is None or len(self.shard_cases[-1]) >= CASES_PER_SHARD:
            if self.writer is not None:
                self._finish()
            self.writer = self._open_new()
        table = _row_table(row, self.schema)
        self.writer.write_table(table, row_group_size=1)
        self.arrow_bytes[-1] += table.nbytes
        del table
        # The writer's page buffers (about twice the largest cell) go back to the system now, not
        # kept by arrow's allocator under the next case's volumes (measured: 0.5 GB at 512x512x250).
        pa.default_memory_pool().release_unused()
        self.shard_cases[-1].append(row["case_id"])
        self.provenance[row["case_id"]] = provenance.shard_entry(row)

    def _finish(self) -> None:
        """Write the shard's provenance (key-value metadata) and close it."""
        assert self.writer is not None
        text = json.dumps(self.provenance, sort_keys=True)
        self.writer.add_key_value_metadata({provenance.SHARD_METADATA_KEY: text})
        self.writer.close()
        self.provenance = {}
        self._check_row_groups(self.temp_paths[-1], self.shard_cases[-1])

    def _check_row_groups(self, path: Path, case_ids: list[str]) -> None:
        """Record the shard's largest row group; warn about each one the Hub's viewer will refuse to read."""
        meta = pq.read_metadata(path)
        sizes = [meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)]
        self.max_row_group[-1] = max(sizes, default=0)
        for case_id, size in zip(case_ids, sizes):
            if size > VIEWER_ROW_GROUP_LIMIT:
                log.warning(
                    "case %s: its row group holds %.0f MiB, over the Hub dataset viewer's %.0f MiB limit: the viewer "
                    "cannot show that row (every client still reads it)", case_id, size / 2**20,
                    VIEWER_ROW_GROUP_LIMIT / 2**20)

    def close(self) -> None:
        """Finish the last shard."""
        if self.writer is not None:
            self._finish()
            self.writer = None

    def discard(self) -> None:
        """Close and delete every temporary shard (after a failure)."""
        if self.writer is not None:
            self.writer.close()
        for temp in self.temp_paths:
            temp.unlink(missing_ok=True)

    def rename_into_place(self, release_root: str | Path) -> list[ShardInfo]:
        """Give each shard its final ``<split>-i-of-N`` name now that ``N`` is known."""
        root = Path(release_root)
        infos = []
        for i, (temp, ids) in enumerate(zip(self.temp_paths, self.shard_cases)):
            final = self.out_dir / shard_name(self.split, i, len(self.temp_paths))
            os.replace(temp, final)
            infos.append(ShardInfo(final.relative_to(root).as_posix(), tuple(ids), final.stat().st_size,
                                   self.arrow_bytes[i], self.max_row_group[i]))
        return infos


def write_shards(
    rows: Iterable[Mapping[str, Any]],
    out_dir: str | Path,
    *,
    split: str,
    release_root: str | Path,
) -> list[ShardInfo]:
    """Write ``rows`` (one dict per case, in the order given) as ``<split>-i-of-N`` shards in ``out_dir``,
    one case per shard.

    Rows are consumed one at a time, so only one case is in memory. Files are first written under
    hidden temporary names and renamed once ``N`` is known. With no rows nothing is written
    (``datasets`` refuses a split made of empty files: the card then omits that split).
    Returns the shards in order.

    Example:
        >>> [s.path for s in write_shards(rows, tmp / "data" / "hl", split="test", release_root=tmp)]  # doctest: +SKIP
        ['data/hl/test-00000-of-00001.parquet']
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = _PartialShards(out_dir, split)
    try:
        for row in rows:
            shards.add(row)
            del row  # the cells go now, not when the next row is ready
        shards.close()
    except BaseException:
        shards.discard()
        raise
    infos = shards.rename_into_place(release_root)
    if infos:
        log.info("wrote %d shard(s) of %s in %s", len(infos), split, out_dir)
    return infos
