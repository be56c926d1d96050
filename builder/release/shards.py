"""Parquet shards laid out as a Hugging Face dataset repo: ``data/<hl|nhl>/<split>-0000i-of-0000N.parquet``.

One row per case: the metadata columns of ``schema.METADATA_COLUMNS`` and the ``datasets.Nifti``
columns ``ct``, ``pet``, ``label`` (cells made by :mod:`lymphatlas_ds.codec`). Files are written
with pyarrow, not ``Dataset.to_parquet`` (which cannot set the codec), using the features' arrow
schema and its ``huggingface`` metadata, so plain ``datasets.load_dataset`` decodes the Nifti
columns. Choices, measured in ``benchmarks/bench_shards.py``:

- zstd level 3 over raw NIfTI bytes (not gzip cells). On a synthetic 512x512x300 case (CT int16,
  PET float32 resampled from PET resolution, label; 525 MiB of voxels) versus the three
  ``.nii.gz`` files (gzip 6) read by nibabel: 236 MiB vs 239 MiB on disk (0.99x), encode 3.6-3.9 s
  vs 16-27 s, decode one case 0.58-0.61 s vs 2.03-2.05 s (3.3-3.5x faster, two runs on a shared
  2-core machine). gzip cells in parquet: same size, no faster than the files. zstd-1: 1.00x size,
  not faster to decode; zstd-9: 0.97x size, but encode 12-25 s;
- one case per row group, so a reader (or ``streaming=True``) touches one case at a time;
- no dictionary encoding and no statistics on the image columns (useless on blobs);
- a shard holds at most ``schema.SHARD_MAX_BYTES`` of uncompressed NIfTI bytes, so on disk it is
  at most that plus its footer (schema and features, a few KiB); a case larger than the bound
  gets a shard of its own.

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
from lymphatlas_ds.schema import IMAGE_COLUMNS, METADATA_COLUMNS, SHARD_MAX_BYTES

from builder.release import provenance

log = logging.getLogger(__name__)

ZSTD_LEVEL = 3
"""zstd level of the shards: measured in benchmarks/bench_shards.py (higher levels barely shrink noisy volumes)."""

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


def _row_bytes(row: Mapping[str, Any]) -> int:
    return sum(len(row[name]["bytes"]) for name in IMAGE_COLUMNS)


@dataclass(frozen=True)
class ShardInfo:
    """A written shard: its path relative to the release and the cases it holds, in order."""

    path: str
    case_ids: tuple[str, ...]
    size: int


def _writer(path: Path, schema: pa.Schema) -> pq.ParquetWriter:
    meta_cols = list(METADATA_COLUMNS)
    return pq.ParquetWriter(
        path,
        schema,
        compression="zstd",
        compression_level=ZSTD_LEVEL,
        use_dictionary=[c for c in meta_cols if METADATA_COLUMNS[c] == "string"],
        write_statistics=meta_cols,
        # A page index / bloom filters on blobs would cost space for nothing.
        write_page_index=False,
    )


def _row_table(row: Mapping[str, Any], schema: pa.Schema) -> pa.Table:
    """One case's row as a one-row arrow table of the shard schema."""
    try:
        return pa.Table.from_pylist([dict(row)], schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError) as e:
        raise SchemaError(
            f"case {row.get('case_id')!r}: its row does not fit the shard schema ({e}); "
            "check lymphatlas_ds.schema.METADATA_COLUMNS and the case.json it came from"
        ) from e


class _PartialShards:
    """The shards of one split under hidden temporary names, a new one opened when a row would overfill one."""

    def __init__(self, out_dir: Path, split: str, max_bytes: int) -> None:
        self.out_dir, self.split, self.max_bytes = out_dir, split, max_bytes
        self.schema = arrow_schema()
        self.temp_paths: list[Path] = []
        self.shard_cases: list[list[str]] = []
        self.writer: pq.ParquetWriter | None = None
        self.current_bytes = 0
        self.provenance: dict[str, Any] = {}  # case id -> provenance of the current shard (key-value metadata)

    def _open_new(self) -> pq.ParquetWriter:
        """Start the next temporary shard."""
        temp = self.out_dir / f".{self.split}-{len(self.temp_paths):05d}.parquet.partial"
        self.temp_paths.append(temp)
        self.shard_cases.append([])
        return _writer(temp, self.schema)

    def add(self, row: Mapping[str, Any]) -> None:
        """Append one case as a row group, in a new shard if the current one would pass ``max_bytes``."""
        size = _row_bytes(row)
        if self.writer is None or (self.shard_cases[-1] and self.current_bytes + size > self.max_bytes):
            if self.writer is not None:
                self._finish()
            self.writer = self._open_new()
            self.current_bytes = 0
        self.writer.write_table(_row_table(row, self.schema), row_group_size=1)
        self.shard_cases[-1].append(row["case_id"])
        self.provenance[row["case_id"]] = provenance.shard_entry(row)
        self.current_bytes += size

    def _finish(self) -> None:
        """Write the shard's provenance (key-value metadata) and close it."""
        assert self.writer is not None
        text = json.dumps(self.provenance, sort_keys=True)
        self.writer.add_key_value_metadata({provenance.SHARD_METADATA_KEY: text})
        self.writer.close()
        self.provenance = {}

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
            infos.append(ShardInfo(final.relative_to(root).as_posix(), tuple(ids), final.stat().st_size))
        return infos


def write_shards(
    rows: Iterable[Mapping[str, Any]],
    out_dir: str | Path,
    *,
    split: str,
    release_root: str | Path,
    max_bytes: int = SHARD_MAX_BYTES,
) -> list[ShardInfo]:
    """Write ``rows`` (one dict per case, in the order given) as ``<split>-i-of-N`` shards in ``out_dir``.

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
    shards = _PartialShards(out_dir, split, max_bytes)
    try:
        for row in rows:
            shards.add(row)
        shards.close()
    except BaseException:
        shards.discard()
        raise
    infos = shards.rename_into_place(release_root)
    if infos:
        log.info("wrote %d shard(s) of %s in %s", len(infos), split, out_dir)
    return infos
