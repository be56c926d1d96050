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
- the cells never pass through pyarrow's writer: it copies a cell twice (its encoder's buffer and
  the page it builds, measured: 2 x 530 MiB for the PET of a 512x512x600 case, the release's peak).
  The writer gets a placeholder of the cell's length that costs no memory (untouched private
  anonymous pages, :func:`_placeholder`), and once the shard is closed the cell's bytes are copied
  into the place the footer gives (:func:`_fill_cells`: the last bytes of the column chunk, after the
  value's 4-byte length, which is checked). A cell is a ``{"bytes", "path"}`` dict, or a
  ``{"file", "path"}`` dict whose file holds the bytes (the builder streams its cells there: no
  cell in memory at all); files and spilled bytes are removed once copied.

Example:
    >>> feats = features()
    >>> type(feats["ct"]).__name__, feats["spacing_xyz"].length
    ('Nifti', 3)
"""

from __future__ import annotations

import json
import logging
import mmap
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


def write_table_files(table: pa.Table, folder: Path, split: str, rows_per_file: int) -> list[Path]:
    """Write ``table`` as ``folder/<split>-0000i-of-0000N.parquet``, each file one row group of at most
    ``rows_per_file`` rows (an empty table: one empty file), zstd, each file under a temporary name
    until complete; return the paths written.

    One row group per file, as for the cases' shards: a plain ``datasets`` stream that stops early
    leaves no read-ahead of a file's later row groups in flight at exit (see the module's docstring)."""
    count = max(1, -(-table.num_rows // rows_per_file))
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index in range(count):
        part = table.slice(index * rows_per_file, rows_per_file)
        path = folder / shard_name(split, index, count)
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(part, tmp, row_group_size=max(1, part.num_rows), compression="zstd", write_page_index=False)
        tmp.replace(path)
        written.append(path)
    return written


def _cell_size(cell: Mapping[str, Any]) -> int:
    """Bytes of a cell: its ``bytes``, or its ``file``'s size."""
    if "file" in cell:
        return os.path.getsize(cell["file"])
    return memoryview(cell["bytes"]).nbytes


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


def _placeholder(size: int) -> Any:
    """``size`` zero bytes that cost no memory: a private anonymous mapping that is only read (its pages
    are the kernel's shared zero page), standing for a cell while pyarrow's writer copies it."""
    if size == 0:
        return b""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)


def _cell_array(data: Any, path: str, type_: pa.DataType) -> pa.Array:
    """A one-cell Nifti struct array whose bytes are ``data``'s own buffer (no copy)."""
    buffer = pa.py_buffer(data)
    offsets = pa.array([0, buffer.size], pa.int32()).buffers()[1]
    blob = pa.Array.from_buffers(pa.binary(), 1, [None, offsets, buffer])
    return pa.StructArray.from_arrays([blob, pa.array([path], pa.string())], fields=list(type_))


def _row_table(row: Mapping[str, Any], schema: pa.Schema, sizes: Mapping[str, int]) -> pa.Table:
    """One case's row as a one-row arrow table of the shard schema, each image cell a placeholder of ``sizes[name]`` bytes."""
    try:
        meta_schema = pa.schema([schema.field(name) for name in METADATA_COLUMNS])
        meta = pa.Table.from_pylist([{name: row[name] for name in METADATA_COLUMNS}], schema=meta_schema)
        columns = [meta.column(name) for name in METADATA_COLUMNS]
        columns += [_cell_array(_placeholder(sizes[name]), row[name]["path"], schema.field(name).type)
                    for name in IMAGE_COLUMNS]
        return pa.Table.from_arrays(columns, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError, TypeError) as e:
        raise SchemaError(
            f"case {row.get('case_id')!r}: its row does not fit the shard schema ({e}); "
            "check lymphatlas_ds.schema.METADATA_COLUMNS and the case.json it came from"
        ) from e


@dataclass(frozen=True)
class _Cell:
    """Where a cell's bytes wait to be copied into its shard: ``size`` bytes at ``offset`` of ``source``."""

    row_group: int
    column: str
    source: Path
    offset: int
    size: int


_COPY_CHUNK = 16 * 2**20


def _fill_cells(path: Path, cells: list[_Cell]) -> None:
    """Copy each cell's bytes over its placeholder in the closed shard ``path``.

    A one-row column chunk of an uncompressed, PLAIN-encoded binary column (no dictionary, no page
    checksum, no statistics: see :func:`_writer`) is one data page that ends with the value; the
    4-byte little-endian length before it must be the cell's size, or nothing is written."""
    meta = pq.read_metadata(path)
    names = [meta.schema.column(i).path for i in range(meta.num_columns)]
    with open(path, "r+b") as out:
        for cell in cells:
            chunk = meta.row_group(cell.row_group).column(names.index(f"{cell.column}.bytes"))
            start = chunk.data_page_offset + chunk.total_compressed_size - cell.size
            out.seek(start - 4)
            if (chunk.dictionary_page_offset is not None or chunk.compression != "UNCOMPRESSED"
                    or chunk.num_values != 1 or int.from_bytes(out.read(4), "little") != cell.size):
                raise SchemaError(
                    f"shard {path.name}: the {cell.column} column chunk of row group {cell.row_group} is not the one "
                    "uncompressed PLAIN value of the cell's size that shards._writer writes (a pyarrow change?)")
            with open(cell.source, "rb") as src:
                src.seek(cell.offset)
                left = cell.size
                while left:
                    piece = src.read(min(left, _COPY_CHUNK))
                    if not piece:
                        raise SchemaError(f"cell file {cell.source} ended {left} bytes early")
                    out.write(piece)
                    left -= len(piece)
        out.flush()
        os.fsync(out.fileno())


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
        self.cells: list[_Cell] = []  # the current shard's cells, copied in when it is closed
        self.spill: Path | None = None  # the current shard's cells given as bytes, until then
        self.sources: set[Path] = set()  # cell files and spills not yet removed

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
        sizes = {name: _cell_size(row[name]) for name in IMAGE_COLUMNS}
        if self.writer is None or len(self.shard_cases[-1]) >= CASES_PER_SHARD:
            if self.writer is not None:
                self._finish()
            self.writer = self._open_new()
        row_group = len(self.shard_cases[-1])
        for name in IMAGE_COLUMNS:
            self.cells.append(self._keep(row[name], row_group, name, sizes[name]))
        table = _row_table(row, self.schema, sizes)
        self.writer.write_table(table, row_group_size=1)
        self.arrow_bytes[-1] += table.nbytes
        del table
        # The writer's page buffers (about twice the largest cell) go back to the system now, not
        # kept by arrow's allocator under the next case's volumes (measured: 0.5 GB at 512x512x250).
        pa.default_memory_pool().release_unused()
        self.shard_cases[-1].append(row["case_id"])
        self.provenance[row["case_id"]] = provenance.shard_entry(row)

    def _keep(self, cell: Mapping[str, Any], row_group: int, column: str, size: int) -> _Cell:
        """Where the cell's bytes stay until the shard is closed: its file, or appended to the shard's spill file."""
        if "file" in cell:
            source = Path(cell["file"])
            self.sources.add(source)
            return _Cell(row_group, column, source, 0, size)
        if self.spill is None:
            self.spill = self.temp_paths[-1].with_suffix(".cells")
            self.spill.write_bytes(b"")
            self.sources.add(self.spill)
        with open(self.spill, "ab") as f:
            offset = f.tell()
            f.write(cell["bytes"])
        return _Cell(row_group, column, self.spill, offset, size)

    def _finish(self) -> None:
        """Write the shard's provenance (key-value metadata), close it and copy its cells in."""
        assert self.writer is not None
        text = json.dumps(self.provenance, sort_keys=True)
        self.writer.add_key_value_metadata({provenance.SHARD_METADATA_KEY: text})
        self.writer.close()
        self.provenance = {}
        _fill_cells(self.temp_paths[-1], self.cells)
        for cell in self.cells:
            cell.source.unlink(missing_ok=True)
            self.sources.discard(cell.source)
        self.cells, self.spill = [], None
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
        for temp in [*self.temp_paths, *self.sources]:
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
