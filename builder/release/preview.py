"""The release's ``preview`` config, for the Hugging Face dataset viewer: ``preview/<split>-*.parquet``.

The viewer shows nothing of a Nifti cell, and a full-size case's row group is far over its limit
(286 MiB). The preview holds, per case, two PNG images (``datasets.Image``) and the metadata columns
of :data:`lymphatlas_ds.schema.PREVIEW_COLUMNS`: ``mip``, the coronal PET MIP with the lesion
outlines, and ``fusion``, an axial PET/CT fusion through the largest lesion
(:class:`lymphatlas_ds.figures.PreviewDrawing`, fed one volume at a time by the release). Rows are a few tens of kB: row groups of
:data:`ROW_GROUP_ROWS` rows stay far under the viewer's limit (a test reads it from the parquet
metadata). The card's gallery shows the MIPs of a few cases (``preview/gallery/<case_id>.png``,
:func:`gallery_cases`).

Example:
    >>> images = image_cells(case_id, preview_images(ct, pet, label, affine))  # doctest: +SKIP
    >>> sorted(images)  # doctest: +SKIP
    ['fusion', 'mip']
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa

from builder.release.shards import _feature, write_table_files
from lymphatlas_ds._io import write_atomic
from lymphatlas_ds.schema import (METADATA_COLUMNS, PREVIEW_COLUMNS, PREVIEW_CONFIG, PREVIEW_GALLERY_DIR,
                                  PREVIEW_IMAGE_COLUMNS, Split)

ROW_GROUP_ROWS = 64
"""Cases per file, one row group each (:func:`builder.release.shards.write_table_files`): at ~100 kB per row,
a few MiB per group (the viewer's limit is 286 MiB)."""
VIEWER_ROW_GROUP_LIMIT = 286 * 1024 * 1024
"""The Hub dataset viewer's largest row group (uncompressed bytes) it will show."""
GALLERY_SIZE = 6
"""Cases in the card's gallery."""


def features() -> datasets.Features:
    """The ``datasets.Features`` of a preview row: metadata columns, then the Image columns."""
    spec: dict[str, Any] = {name: _feature(METADATA_COLUMNS[name]) for name in PREVIEW_COLUMNS}
    spec.update({name: datasets.Image() for name in PREVIEW_IMAGE_COLUMNS})
    return datasets.Features(spec)


def image_cells(case_id: str, images: Mapping[str, bytes]) -> dict[str, dict[str, Any]]:
    """The Image cells of one case from its PNGs (:func:`lymphatlas_ds.figures.preview_images` or
    :meth:`lymphatlas_ds.figures.PreviewDrawing.images`)."""
    return {name: {"bytes": images[name], "path": f"{case_id}_{name}.png"} for name in PREVIEW_IMAGE_COLUMNS}


def gallery_cases(rows: Sequence[Mapping[str, Any]], n: int = GALLERY_SIZE) -> list[str]:
    """The cases the card shows: the largest TMTV of each diagnosis in turn (HL, NHL, HL, ...), ids
    breaking ties; deterministic and independent of the shard order."""
    by_dx: dict[str, list[Mapping[str, Any]]] = {}
    for r in sorted(rows, key=lambda r: (-(r.get("tmtv_ml") or 0.0), r["case_id"])):
        by_dx.setdefault(r["diagnosis"], []).append(r)
    out: list[str] = []
    queues = [by_dx[d] for d in sorted(by_dx)]
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0)["case_id"])
    return out


def gallery_path(case_id: str) -> str:
    return f"{PREVIEW_GALLERY_DIR}/{case_id}.png"


def write_preview(staging: Path, rows: Iterable[Mapping[str, Any]], cells: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Write ``preview/<split>-*.parquet`` (rows: the metadata rows; ``cells``: case id -> Image cells)
    and the gallery PNGs; return the files written (release-relative)."""
    rows = list(rows)
    schema = features().arrow_schema
    written = []
    for split in Split:
        mine = sorted((r for r in rows if r["split"] == split.value), key=lambda r: r["case_id"])
        if not mine:
            continue
        table = pa.Table.from_pylist([{**{k: r[k] for k in PREVIEW_COLUMNS}, **cells[r["case_id"]]} for r in mine],
                                     schema=schema)
        paths = write_table_files(table, staging / PREVIEW_CONFIG, split.value, ROW_GROUP_ROWS)
        written += [p.relative_to(staging).as_posix() for p in paths]
    for case_id in gallery_cases(rows):
        rel = gallery_path(case_id)
        write_atomic(staging / rel, cells[case_id]["mip"]["bytes"])
        written.append(rel)
    return written


__all__ = ["GALLERY_SIZE", "ROW_GROUP_ROWS", "VIEWER_ROW_GROUP_LIMIT", "features", "gallery_cases", "gallery_path",
           "image_cells", "write_preview"]
