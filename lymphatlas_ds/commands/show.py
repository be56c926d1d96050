"""`lymphatlas show SOURCE CASE_ID [--out case.png] [--version X.Y.Z]`: one case of a release as an image.

The same case figure as the maintainers' QC report (:func:`lymphatlas_ds.figures.render_case`):
axial, coronal and sagittal planes through the largest lesion of CT, PET, fusion and the label
outlined in red, beside a coronal PET MIP, written in the format the ``--out`` suffix names (PNG,
JPEG, PDF or SVG; another suffix is refused before anything is read). The case is read from the release through
:class:`lymphatlas_ds.reader.Release` (folder, mirror or Hub repo id, any published version).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="release folder, local mirror or Hub repo id (org/name)")
    parser.add_argument("case_id", help="a case id of the release (metadata/cases.csv lists them), e.g. LA-3f9c2a1b")
    parser.add_argument("--out", type=Path, default=None, help="image to write: .png, .jpg, .pdf or .svg (default: CASE_ID.png)")
    parser.add_argument("--version", default=None, help="release version (default: the newest)")
    parser.add_argument("--cache-dir", default=None, help="Hugging Face Hub cache (Hub sources only)")


def find_case(source: str, case_id: str, *, version: str | None = None, cache_dir: str | None = None):
    """The ``CaseRecord`` of ``case_id`` in a release (folder, mirror or Hub repo id) and the release's version.

    Only the shard row group that holds the case is read (splits.json says where it is).

    Example:
        >>> record, version = find_case("lymphatlas", "LA-3f9c2a1b")  # doctest: +SKIP
    """
    from lymphatlas_ds.reader import Release

    release = Release.from_source(source, version=version, hub_cache_dir=cache_dir)
    return release.read_case(case_id), release.version


def run(args: argparse.Namespace) -> int:
    from lymphatlas_ds.errors import LymphAtlasError
    from lymphatlas_ds.figures import image_format, render_case

    if args.out is not None:
        try:
            image_format(args.out)
        except ValueError as e:
            raise LymphAtlasError(str(e)) from None
    record, version = find_case(args.source, args.case_id, version=args.version, cache_dir=args.cache_dir)
    diagnosis = record.meta.get("diagnosis", "")
    figure = render_case(
        record.ct, record.pet, record.label, record.affine, title=f"{record.case_id} ({diagnosis}, release {version})"
    )
    out = figure.save(args.out if args.out is not None else Path(f"{record.case_id}.png"))
    print(out)
    return 0
