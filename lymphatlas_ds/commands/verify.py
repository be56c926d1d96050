"""`lymphatlas verify SOURCE [--version X.Y.Z]`: check a release against its manifest, end to end.

Compares each file's size and sha256 with ``manifest.json`` and reports missing and unlisted
files; then cross-checks the manifest and the rest of the release against each other: ``splits.json``,
the shards' metadata columns, ``metadata/cases.csv`` case by case, ``CHANGELOG.md`` and the card's
counts and configs (:func:`lymphatlas_ds.manifest.verify_all`). ``--content`` also decodes
every case and compares its voxels with the manifest's content hash. Exit status 0 when everything
matches, 1 when something does not; on a local mirror, the lineage of its versions too
(:func:`lymphatlas_ds.lineage.check_chain`: each version built on the one before it, no shared
case moved split or fold), 1 when it breaks (each problem is printed), 2 when the source cannot be read at all.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE", help="release folder, local mirror, or Hugging Face repo id (org/name)")
    parser.add_argument("--version", default=None, help="release version X.Y.Z (default: the newest)")
    parser.add_argument("--quick", action="store_true", help="compare sizes only (no sha256)")
    parser.add_argument("--all-versions", action="store_true", help="verify every version of a local mirror")
    parser.add_argument("--content", action="store_true",
                        help="also decode every case and compare its voxels with the manifest's content hash (slow)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from lymphatlas_ds.progress import progress_bar

    from lymphatlas_ds.reader import Release
    from lymphatlas_ds.source import list_versions, resolve_release

    versions = list_versions(args.source) if args.all_versions else [args.version]
    status = 0
    for version in versions:
        resolved = resolve_release(args.source, version=version)
        release = Release(resolved.path, verify=False, remember=False)
        total = sum(int(entry["size"]) for entry in release.manifest["files"].values())
        with progress_bar(total=total, desc=f"verify {release.version}", unit="B", unit_scale=True, disable=args.quiet,
                  file=sys.stderr, leave=False) as bar:
            problems: list = release.verify_all(check_sha256=not args.quick, progress=bar.update)
        if args.content and not problems:
            problems += _content_problems(release)
        n_files = len(release.manifest["files"])
        if problems:
            status = 1
            print(f"release {release.version} at {resolved.path}: {len(problems)} problem(s) in {n_files} files")
            for problem in problems:
                print(f"  {problem}")
            print(
                "  re-download or re-copy a published release (a published version never changes), or rebuild "
                "one not published yet, then verify again",
                file=sys.stderr,
            )
        else:
            what = "sizes" if args.quick else "sizes and sha256"
            content = f", {len(release.manifest['cases'])} cases decoded to their content hash" if args.content else ""
            print(f"release {release.version} at {resolved.path}: {n_files} files OK ({what} match the manifest; "
                  f"splits, cases.csv, shards, changelog and card agree with it{content})")
    return max(status, _check_lineage(args.source))


def _check_lineage(source: str) -> int:
    """On a local mirror, the chain of its versions (lymphatlas_ds.lineage.check_chain): 0 when it holds, else 1."""
    from pathlib import Path

    from lymphatlas_ds.lineage import check_chain
    from lymphatlas_ds.source import VERSIONS_NAME, list_versions

    mirror = Path(source).expanduser()
    if not (mirror / VERSIONS_NAME).is_file() or (mirror / "manifest.json").is_file():
        return 0
    versions = list_versions(mirror)
    problems = check_chain(mirror, versions)
    if not problems:
        print(f"mirror {source}: lineage of {len(versions)} version(s) holds (each built on the one before it, "
              "no shared case moved split or fold)")
        return 0
    print(f"mirror {source}: {len(problems)} lineage problem(s)")
    for problem in problems:
        print(f"  {problem}")
    return 1


def _content_problems(release) -> list[str]:
    """Decode every case and compare it with the manifest's content hash; one line per mismatch."""
    from lymphatlas_ds.errors import LymphAtlasError
    from lymphatlas_ds.schema import Split

    problems = []
    lesions = _lesion_voxels(release)
    for split in Split:
        for case_id in release.case_ids("all", split):
            try:
                record = release.read_case(case_id, check_content=True)
            except LymphAtlasError as e:
                problems.append(f"case {case_id}: {e}")
                continue
            if lesions is not None:
                problems += _instance_problems(case_id, record.label, lesions.get(case_id, {}))
    return problems


def _lesion_voxels(release) -> dict[str, dict[int, int]] | None:
    """{case_id: {lesion_id: voxels}} of the release's lesions config; None for a release without one."""
    import pyarrow.parquet as pq

    from lymphatlas_ds.schema import LESIONS_CONFIG

    files = [f for f in release.manifest["files"] if f.startswith(f"{LESIONS_CONFIG}/") and f.endswith(".parquet")]
    if not files:
        return None
    out: dict[str, dict[int, int]] = {}
    for rel in files:
        for r in pq.read_table(release.file(rel), columns=["case_id", "lesion_id", "voxels"]).to_pylist():
            out.setdefault(r["case_id"], {})[int(r["lesion_id"])] = int(r["voxels"])
    return out


def _instance_problems(case_id: str, label, want: dict[int, int]) -> list[str]:
    """The label's instance map (lymphatlas_ds.lesions.label_instances) against the lesions config's rows."""
    import numpy as np

    from lymphatlas_ds.lesions import label_instances

    instances, n = label_instances(label)
    have = {i + 1: int(c) for i, c in enumerate(np.bincount(instances.ravel(), minlength=n + 1)[1:])}
    if have != want:
        return [f"case {case_id}: its label has lesions (id: voxels) {sorted(have.items())[:5]}, the lesions config "
                f"lists {sorted(want.items())[:5]}"]
    return []
