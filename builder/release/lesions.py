"""The release's ``lesions`` config: one row per lesion (``lesions/<split>-*.parquet``, one row group per file).

Each row joins a case's metadata (case_id, subject_id, diagnosis, split, fold) with one item of its
case.json "lesions" block, as convert computed it (:mod:`builder.convert.lesions`): nothing is
recomputed here except the check that the items are the lesions of the label being released
(:func:`check_items`: the instance map of the label, :func:`lymphatlas_ds.lesions.label_instances`,
has exactly those ids with exactly those voxel counts). Columns: :data:`lymphatlas_ds.schema.LESION_COLUMNS`.

Example:
    >>> rows = lesion_rows(case.info, meta_row)  # doctest: +SKIP
    >>> rows[0]["lesion_id"], rows[0]["body_region"]  # doctest: +SKIP
    (1, 'thorax')
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa

from builder.release.shards import _feature, write_table_files
from lymphatlas_ds.lesions import instance_sizes, label_instances
from lymphatlas_ds.schema import LESION_COLUMNS, LESIONS_CONFIG, Split

ROW_GROUP_ROWS = 10_000
"""Rows per file, one row group each (:func:`builder.release.shards.write_table_files`): a lesion row is
~200 bytes, far under the Hub viewer's limit."""
_META = ("case_id", "subject_id", "diagnosis", "split", "fold")


def features() -> datasets.Features:
    """The ``datasets.Features`` of a lesion row (from :data:`LESION_COLUMNS`)."""
    return datasets.Features({name: _feature(kind) for name, kind in LESION_COLUMNS.items()})


def arrow_schema() -> pa.Schema:
    """The lesions config's parquet schema, with the ``huggingface`` features metadata that datasets reads."""
    return features().arrow_schema


def check_items(case_id: str, info: Mapping[str, Any], label: np.ndarray,
                instances: tuple[np.ndarray, int] | None = None) -> None:
    """Refuse a case whose case.json lesion items are not the lesions of ``label`` ([z, y, x]):
    the release's lesion table and instance ids must describe the very voxels it publishes.
    ``instances``: the label's :func:`label_instances`, when the caller has it already."""
    from builder.release.build import ReleaseError
    lesions = info.get("lesions") or {}
    items = lesions.get("items") or []
    fix = "re-run `python -m builder convert` for this case (a builder that writes per-lesion items)"
    if any("lesion_id" not in it or "body_region" not in it for it in items) or (lesions.get("count") and not items):
        raise ReleaseError(f"case {case_id}: case.json has no per-lesion items (lesion_id, body_region): converted by "
                           f"an older builder; {fix}")
    inst, n = label_instances(label) if instances is None else instances
    counts = instance_sizes(inst, n)
    want = {int(it["lesion_id"]): int(it["voxels"]) for it in items}
    have = {i + 1: int(c) for i, c in enumerate(counts)}
    if want != have or lesions.get("count") != n:
        raise ReleaseError(f"case {case_id}: case.json lists {len(want)} lesions {sorted(want.items())[:5]}, its label "
                           f"has {n} {sorted(have.items())[:5]} (id: voxels); {fix}")


def lesion_rows(info: Mapping[str, Any], meta: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The lesions-config rows of one case: ``meta`` (its metadata row) joined with each case.json item."""
    rows = []
    for item in (info.get("lesions") or {}).get("items") or []:
        row = {k: meta[k] for k in _META}
        row.update({k: item.get(k) for k in LESION_COLUMNS if k not in _META and k != "lesion_id"})
        row["lesion_id"] = int(item["lesion_id"])
        rows.append(row)
    return rows


def write_lesions(staging: Path, rows: Sequence[Mapping[str, Any]], splits: Iterable[str]) -> list[str]:
    """Write the lesions config of a release: one file per split in ``splits`` (the splits that hold a
    case; a split whose cases have no lesion gets an empty table); rows sorted by case then lesion
    id; return the files written (release-relative)."""
    written = []
    schema = arrow_schema()
    present = set(splits)
    for split in Split:
        if split.value not in present:
            continue
        mine = sorted((r for r in rows if r["split"] == split.value), key=lambda r: (r["case_id"], r["lesion_id"]))
        table = pa.Table.from_pylist([{k: r[k] for k in LESION_COLUMNS} for r in mine], schema=schema)
        paths = write_table_files(table, staging / LESIONS_CONFIG, split.value, ROW_GROUP_ROWS)
        written += [p.relative_to(staging).as_posix() for p in paths]
    return written


__all__ = ["arrow_schema", "features", "check_items", "lesion_rows", "write_lesions"]
