"""A release's ``manifest.json``: every file with its sha256 and size, and each case's content hash.

The builder writes it last (:func:`build_manifest`); the client checks a downloaded or mirrored
release against it (:func:`verify_files`: every file's size and sha256; :func:`verify_consistency`:
the manifest's version and cases against ``splits.json``, ``CHANGELOG.md``, the shards' case ids
and content hashes; :func:`verify_release` both, which ``publish`` runs first) and a decoded case
against its content hash (:func:`content_hash`).

Layout (docs/contracts.md section 4)::

    {"version": "1.0.0", "schema_version": "1.0", "builder_version": "0.1.0",
     "files": {"data/hl/train-00000-of-00001.parquet": {"sha256": "...", "size": 123}, ...},
     "cases": {"LA-3f9c2a1b": "<content hash>", ...}}

Example:
    >>> import numpy as np
    >>> z = np.zeros((2, 2, 2))
    >>> len(content_hash(z, z, z, np.eye(4)))
    64
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lymphatlas_ds import schema
from lymphatlas_ds._io import read_json
from lymphatlas_ds.errors import IntegrityError, SchemaError

MANIFEST_NAME = "manifest.json"
_CHUNK = 8 * 1024 * 1024


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks (shards are hundreds of MiB).

    Example:
        >>> sha256_file(__file__) == sha256_file(__file__)
        True
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def content_hash(ct: np.ndarray, pet: np.ndarray, label: np.ndarray, affine_ras: np.ndarray) -> str:
    """The content hash of a case: sha256 over its voxels and its geometry.

    Hashes the C-order little-endian bytes of ``ct`` (int16), ``pet`` (float32), ``label``
    (uint8), all ``[z, y, x]``, then the 4x4 RAS affine as float64: case.json's
    ``geometry.affine_ras``, which is a shard row's ``affine`` column (not the NIfTI header's
    float32 sform). It equals the ``content_hash`` that convert writes (``builder.convert.case``), so a
    client checks a decoded case with
    ``content_hash(ct, pet, label, np.reshape(row["affine"], (4, 4))) == manifest["cases"][case_id]``.

    Example:
        >>> a = np.ones((2, 3, 4))
        >>> content_hash(a, a, a, np.eye(4)) == content_hash(a, a, a, np.eye(4))
        True
    """
    digest = ContentHash()
    for name, array in zip(schema.IMAGE_COLUMNS, (ct, pet, label)):
        digest.update(name, array)
    return digest.hexdigest(affine_ras)


_HASH_DTYPES = {"ct": schema.CT_DTYPE, "pet": schema.PET_DTYPE, "label": schema.LABEL_DTYPE}


class ContentHash:
    """:func:`content_hash` one volume at a time (``ct``, then ``pet``, then ``label``, then the affine),
    so a caller can let each volume go before reading the next. A volume already in its dtype and
    C order is hashed in place (no copy).

    Example:
        >>> a = np.ones((2, 3, 4))
        >>> h = ContentHash()
        >>> for name in ("ct", "pet", "label"):
        ...     h.update(name, a)
        >>> h.hexdigest(np.eye(4)) == content_hash(a, a, a, np.eye(4))
        True
    """

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._next = 0

    def update(self, name: str, array: np.ndarray) -> None:
        expected = schema.IMAGE_COLUMNS[self._next] if self._next < len(schema.IMAGE_COLUMNS) else None
        if name != expected:
            raise ValueError(f"content hash: volume {name!r} given where {expected!r} comes next")
        self._put(array, _HASH_DTYPES[name])
        self._next += 1

    def hexdigest(self, affine_ras: np.ndarray) -> str:
        if self._next != len(schema.IMAGE_COLUMNS):
            raise ValueError(f"content hash: only {list(schema.IMAGE_COLUMNS[:self._next])} given")
        self._put(affine_ras, "float64")
        return self._digest.hexdigest()

    def _put(self, array: np.ndarray, dtype: str) -> None:
        data = np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<"))
        self._digest.update(memoryview(data.reshape(-1)).cast("B"))


def release_files(release_dir: str | Path) -> list[str]:
    """Every file of a release folder as sorted POSIX relative paths, the manifest itself excluded.

    Hidden files and folders (``.cache``, ``.git``, ``.huggingface``) are not part of a release.
    """
    root = Path(release_dir)
    out = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if path.is_file() and rel.as_posix() != MANIFEST_NAME and not any(p.startswith(".") for p in rel.parts):
            out.append(rel.as_posix())
    return sorted(out)


def build_manifest(
    release_dir: str | Path,
    *,
    version: str,
    builder_version: str,
    cases: dict[str, str],
    schema_version: str = schema.SCHEMA_VERSION,
) -> dict[str, Any]:
    """Describe every file now in ``release_dir`` (sha256, size) and each case's content hash.

    Example:
        >>> m = build_manifest(".", version="1.0.0", builder_version="0.1.0", cases={})  # doctest: +SKIP
    """
    root = Path(release_dir)
    files = {rel: {"sha256": sha256_file(root / rel), "size": (root / rel).stat().st_size} for rel in release_files(root)}
    return {
        "version": version,
        "schema_version": schema_version,
        "builder_version": builder_version,
        "files": files,
        "cases": dict(sorted(cases.items())),
    }


def dumps(manifest: dict[str, Any]) -> str:
    """The canonical text of a manifest (sorted keys, two-space indent, final newline): deterministic."""
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"


def read_manifest(release_dir: str | Path) -> dict[str, Any]:
    """Read and check the shape of ``<release_dir>/manifest.json``.

    Example:
        >>> read_manifest("lymphatlas")["version"]  # doctest: +SKIP
        '1.0.0'
    """
    path = Path(release_dir) / MANIFEST_NAME
    manifest = read_json(path, what=f"the manifest of a LymphAtlas release ({release_dir} should be a release folder)",
                         fix="point at a release folder, or re-download the release")
    missing = [k for k in ("version", "schema_version", "builder_version", "files", "cases") if k not in manifest]
    if missing:
        raise SchemaError(f"{path} lacks the keys {missing}; it was not written by the LymphAtlas builder")
    return manifest


@dataclass(frozen=True)
class FileProblem:
    """One file of a release that does not match its manifest."""

    path: str
    problem: str  # "missing" | "size" | "sha256" | "unlisted"
    expected: str | int | None = None
    found: str | int | None = None

    def __str__(self) -> str:
        if self.problem == "missing":
            return f"{self.path}: listed in the manifest but missing"
        if self.problem == "unlisted":
            return f"{self.path}: present but not listed in the manifest"
        return f"{self.path}: {self.problem} {self.found} != manifest {self.expected}"


def verify_files(
    release_dir: str | Path, manifest: dict[str, Any] | None = None, *, check_sha256: bool = True,
    progress: Callable[[int], object] | None = None,
) -> list[FileProblem]:
    """Compare the files of ``release_dir`` with the manifest; an empty list means all match.

    Sizes are always compared; sha256 too unless ``check_sha256=False`` (a quick check).
    ``progress`` is called with each listed file's manifest size once it is checked (a progress bar).

    Example:
        >>> problems = verify_files("lymphatlas")  # doctest: +SKIP
        >>> problems  # doctest: +SKIP
        []
    """
    root = Path(release_dir)
    manifest = manifest if manifest is not None else read_manifest(root)
    problems = []
    for rel, entry in sorted(manifest["files"].items()):
        path = root / rel
        if not path.is_file():
            problems.append(FileProblem(rel, "missing"))
            continue
        size = path.stat().st_size
        if size != entry["size"]:
            problems.append(FileProblem(rel, "size", entry["size"], size))
        elif check_sha256 and (found := sha256_file(path)) != entry["sha256"]:
            problems.append(FileProblem(rel, "sha256", entry["sha256"], found))
        if progress is not None:
            progress(int(entry["size"]))
    for rel in release_files(root):
        if rel not in manifest["files"]:
            problems.append(FileProblem(rel, "unlisted"))
    return problems


@dataclass(frozen=True)
class ConsistencyProblem:
    """The manifest disagrees with another part of the release (splits, changelog, shards)."""

    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


SPLITS_NAME = "splits.json"
CHANGELOG_NAME = "CHANGELOG.md"
CASES_CSV = "metadata/cases.csv"
_SHARD = re.compile(r"data/(?P<config>[a-z]+)/(?P<split>[a-z]+)-\d+-of-\d+\.parquet")
_PLACEMENT = ("subject_id", "diagnosis", "split", "fold")
"""The columns of a shard row that ``splits.json`` repeats for each case."""


def _ids(values: set[str] | list[str], limit: int = 5) -> str:
    values = sorted(values)
    return ", ".join(values[:limit]) + (f" (and {len(values) - limit} more)" if len(values) > limit else "")


def verify_consistency(release_dir: str | Path, manifest: dict[str, Any] | None = None) -> list[ConsistencyProblem]:
    """Cross-check the manifest with the rest of the release; an empty list means they agree.

    * ``splits.json`` is of the manifest's version and lists exactly the manifest's cases;
    * ``CHANGELOG.md`` has a ``## <version>`` section;
    * the shards (their ``case_id``, ``content_hash``, ``diagnosis`` and ``split`` columns, no
      volume is read) hold exactly the manifest's cases, each once, in the shard of its diagnosis
      and split, with the manifest's content hash; ``metadata/cases.csv`` agrees too.

    It reads the files as they are: run :func:`verify_files` too (``verify_release`` does both).

    Example:
        >>> verify_consistency("lymphatlas")  # doctest: +SKIP
        []
    """
    root = Path(release_dir)
    manifest = manifest if manifest is not None else read_manifest(root)
    version = str(manifest["version"])
    cases: dict[str, str] = dict(manifest["cases"])
    problems, splits_cases = _check_splits(root, version, cases)
    problems += _check_changelog(root, version)
    shard_problems, rows = _check_shards(root, sorted(manifest["files"]), cases, splits_cases)
    problems += shard_problems
    problems += _compare(cases, "the shards (data/)", set(rows), "case(s)")
    problems += _check_grouping(rows, _n_folds(root))
    if CASES_CSV in manifest["files"]:
        problems += _check_cases_csv(root, cases, rows)
    if not shard_problems:
        problems += _check_lesions(root, sorted(manifest["files"]), rows)  # the card and changelog are checked against shards that read and agree
        from lymphatlas_ds._release_text import check_card, check_changelog

        problems += [ConsistencyProblem(path, text) for path, text in
                     (*check_changelog(root, version, cases, rows), *check_card(root, version, rows))]
    return problems


def _check_lesions(root: Path, files: list[str], rows: dict[str, dict[str, Any]]) -> list[ConsistencyProblem]:
    """The lesions config against the main config's rows (a release of an older builder has none):
    each row's case is in the main config with the same subject, diagnosis, split and fold; each case
    has ``lesion_count`` rows with ids 1..n, whose volumes add up to its ``tmtv_ml`` and whose
    highest SUVmax is its ``suv_max``; the preview config lists exactly the main config's cases."""
    import math

    import pyarrow.parquet as pq

    where = f"the {schema.LESIONS_CONFIG} config ({schema.LESIONS_CONFIG}/)"
    lesion_files = [f for f in files if f.startswith(f"{schema.LESIONS_CONFIG}/") and f.endswith(".parquet")]
    if not lesion_files:
        return []
    problems: list[ConsistencyProblem] = []
    by_case: dict[str, list[dict[str, Any]]] = {}
    try:
        for rel in lesion_files:
            for r in pq.read_table(root / rel).to_pylist():
                by_case.setdefault(r["case_id"], []).append(r)
    except (OSError, ValueError, KeyError) as e:
        return [ConsistencyProblem(where, f"cannot be read ({e})")]
    unknown = set(by_case) - set(rows)
    if unknown:
        problems.append(ConsistencyProblem(where, f"has lesions of {len(unknown)} case(s) not in data/: {_ids(unknown)}"))
    for case_id, row in sorted(rows.items()):
        mine = by_case.get(case_id, [])
        n = int(row.get("lesion_count") or 0)
        if sorted(r["lesion_id"] for r in mine) != list(range(1, n + 1)):
            problems.append(ConsistencyProblem(where, f"case {case_id} has lesion ids {sorted(r['lesion_id'] for r in mine)[:8]}, "
                                                      f"data/ says lesion_count {n} (ids 1..{n})"))
            continue
        for r in mine:
            for key in ("subject_id", "diagnosis", "split", "fold"):
                if r[key] != row.get(key):
                    problems.append(ConsistencyProblem(where, f"case {case_id} lesion {r['lesion_id']} has {key} "
                                                              f"{r[key]!r}, data/ says {row.get(key)!r}"))
        volume = sum(float(r["volume_ml"]) for r in mine)
        if not math.isclose(volume, float(row.get("tmtv_ml") or 0.0), rel_tol=1e-9, abs_tol=1e-9):
            problems.append(ConsistencyProblem(where, f"case {case_id}: its lesions add up to {volume:.6g} ml, data/ "
                                                      f"says tmtv_ml {row.get('tmtv_ml')}"))
        hottest = max((float(r["suv_max"]) for r in mine), default=0.0)
        if mine and not math.isclose(hottest, float(row.get("suv_max") or 0.0), rel_tol=1e-9, abs_tol=1e-9):
            problems.append(ConsistencyProblem(where, f"case {case_id}: its hottest lesion has SUVmax {hottest:.6g}, "
                                                      f"data/ says suv_max {row.get('suv_max')}"))
    preview = [f for f in files if f.startswith(f"{schema.PREVIEW_CONFIG}/") and f.endswith(".parquet")]
    if preview:
        try:
            seen = {c for rel in preview for c in pq.read_table(root / rel, columns=["case_id"]).column(0).to_pylist()}
        except (OSError, ValueError, KeyError) as e:
            return [*problems, ConsistencyProblem(f"the {schema.PREVIEW_CONFIG} config", f"cannot be read ({e})")]
        problems += _compare({c: "" for c in rows}, f"the {schema.PREVIEW_CONFIG} config", seen, "case(s)")
    return problems


def _compare(cases: dict[str, str], where: str, found: set[str], what: str) -> list[ConsistencyProblem]:
    """The manifest's cases that ``where`` lacks, then those it has beyond them."""
    problems = []
    if missing := set(cases) - found:
        problems.append(ConsistencyProblem(where, f"lacks {len(missing)} case(s) of the manifest: {_ids(missing)}"))
    if extra := found - set(cases):
        problems.append(ConsistencyProblem(where, f"has {len(extra)} {what} the manifest does not list: {_ids(extra)}"))
    return problems


def _check_splits(root: Path, version: str, cases: dict[str, str]) -> tuple[list[ConsistencyProblem], dict[str, Any]]:
    """``splits.json`` against the manifest: its version and its cases; also returns its case entries."""
    problems: list[ConsistencyProblem] = []
    splits_cases: dict[str, Any] = {}
    try:
        splits = json.loads((root / SPLITS_NAME).read_text())
        splits_cases = dict(splits["cases"])
        if str(splits.get("version")) != version:
            problems.append(ConsistencyProblem(
                SPLITS_NAME, f"is of version {splits.get('version')}, the manifest says {version}"))
        problems += _compare(cases, SPLITS_NAME, set(splits_cases), "case(s)")
    except (OSError, ValueError, KeyError, TypeError) as e:
        problems.append(ConsistencyProblem(SPLITS_NAME, f"cannot be read as a splits table ({e})"))
    return problems, splits_cases


def _check_changelog(root: Path, version: str) -> list[ConsistencyProblem]:
    """``CHANGELOG.md`` has a section for the manifest's version."""
    try:
        changelog = (root / CHANGELOG_NAME).read_text()
    except OSError as e:
        return [ConsistencyProblem(CHANGELOG_NAME, f"cannot be read ({e.strerror or e})")]
    if not re.search(rf"^## {re.escape(version)}[ \t]*$", changelog, re.MULTILINE):
        return [ConsistencyProblem(CHANGELOG_NAME, f"has no section '## {version}' for the manifest's version")]
    return []


def _check_shards(
    root: Path, files: list[str], cases: dict[str, str], splits_cases: dict[str, Any]
) -> tuple[list[ConsistencyProblem], dict[str, dict[str, Any]]]:
    """The shards' rows against the manifest and ``splits.json``; also returns each case's metadata
    row (the metadata columns only, no volume is read) with its shard under ``"shard"``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    problems: list[ConsistencyProblem] = []
    in_shards: dict[str, dict[str, Any]] = {}
    for rel in files:
        match = _SHARD.fullmatch(rel)
        if not rel.startswith("data/"):
            continue
        if match is None:
            problems.append(ConsistencyProblem(rel, "is not named data/<config>/<split>-NNNNN-of-NNNNN.parquet"))
            continue
        try:
            names = pq.read_schema(root / rel).names
            table = pq.read_table(root / rel, columns=[c for c in schema.METADATA_COLUMNS if c in names])
        except (pa.ArrowException, OSError, ValueError) as e:
            problems.append(ConsistencyProblem(rel, f"cannot be read ({e})"))
            continue
        for row in table.to_pylist():
            problems += _check_shard_row(rel, match, row, in_shards, cases, splits_cases)
    return problems, in_shards


def _check_shard_row(
    rel: str, match: re.Match, row: dict[str, Any], in_shards: dict[str, dict[str, Any]], cases: dict[str, str],
    splits_cases: dict[str, Any],
) -> list[ConsistencyProblem]:
    """One shard row: its case in no other shard, in the shard of its diagnosis and split, with the
    manifest's hash and the subject, diagnosis, split and fold that ``splits.json`` gives it."""
    case_id = row["case_id"]
    if case_id in in_shards:
        return [ConsistencyProblem(rel, f"case {case_id} is also in {in_shards[case_id]['shard']}")]
    in_shards[case_id] = {**row, "shard": rel}
    problems = []
    if str(row["diagnosis"]).lower() != match["config"] or row["split"] != match["split"]:
        problems.append(ConsistencyProblem(rel, f"case {case_id} is {row['diagnosis']} {row['split']}, in the "
                                                f"{match['config']} {match['split']} shard"))
    expected = cases.get(case_id)
    if expected is not None and row["content_hash"] != expected:
        problems.append(ConsistencyProblem(rel, f"case {case_id} has content hash {str(row['content_hash'])[:16]}..., "
                                                f"the manifest says {str(expected)[:16]}..."))
    entry = splits_cases.get(case_id)
    if entry is not None and (differ := [c for c in _PLACEMENT if entry.get(c) != row.get(c)]):
        problems.append(ConsistencyProblem(
            f"{rel} and {SPLITS_NAME}", f"case {case_id}: " + ", ".join(
                f"{c} {row.get(c)!r} in the shard, {entry.get(c)!r} in {SPLITS_NAME}" for c in differ)))
    return problems


def _n_folds(root: Path) -> int:
    """``splits.json``'s ``n_folds`` (a small release has fewer than N_FOLDS, one training patient none)."""
    try:
        n = json.loads((root / SPLITS_NAME).read_text()).get("n_folds", schema.N_FOLDS)
    except (OSError, ValueError, AttributeError):
        return schema.N_FOLDS  # _check_splits reports an unreadable splits.json
    return n if isinstance(n, int) and 0 <= n <= schema.N_FOLDS else schema.N_FOLDS


def _check_grouping(rows: dict[str, dict[str, Any]], n_folds: int = schema.N_FOLDS) -> list[ConsistencyProblem]:
    """Every subject in one split and one fold (test: fold -1; train: 0 to n_folds - 1, or -1 in a release
    without folds), as the splits are drawn."""
    problems = []
    placed: dict[str, dict[tuple[Any, Any], list[str]]] = {}
    train_folds = range(n_folds) if n_folds else (-1,)
    for case_id, row in sorted(rows.items()):
        split, fold = row.get("split"), row.get("fold")
        if (split == "test" and fold != -1) or (split == "train" and fold not in train_folds):
            problems.append(ConsistencyProblem(row["shard"], f"case {case_id} is in {split} with fold {fold}: test "
                                                             f"cases have fold -1, train cases "
                                                             f"{'0-' + str(n_folds - 1) if n_folds else '-1 (no folds)'}"))
        placed.setdefault(str(row.get("subject_id")), {}).setdefault((split, fold), []).append(case_id)
    for subject, groups in sorted(placed.items()):
        if len(groups) > 1:
            listing = "; ".join(f"{split} fold {fold}: {', '.join(ids)}" for (split, fold), ids in sorted(
                groups.items(), key=str))
            problems.append(ConsistencyProblem("the shards (data/)", f"subject {subject} is in more than one split or "
                                                                     f"fold ({listing}); a subject's cases share one"))
    return problems


def csv_text(value: Any) -> str:
    """A shard value as metadata/cases.csv writes it (builder.release.build.cases_csv): lists as JSON."""
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return json.dumps(list(value))
    return str(value)


def _check_cases_csv(root: Path, cases: dict[str, str], rows: dict[str, dict[str, Any]]) -> list[ConsistencyProblem]:
    """``metadata/cases.csv`` lists the manifest's cases, each row equal to its shard row column by column
    (the content hash, subject, diagnosis, split, fold, ... and the shard file itself)."""
    import csv

    problems: list[ConsistencyProblem] = []
    try:
        with open(root / CASES_CSV, newline="") as f:
            table = list(csv.DictReader(f))
        problems += _compare(cases, CASES_CSV, {r["case_id"] for r in table}, "case(s)")
        for r in table:
            expected = cases.get(r["case_id"])
            if expected is not None and r.get("content_hash") not in (None, expected):
                problems.append(ConsistencyProblem(CASES_CSV, f"case {r['case_id']} has content hash "
                                                              f"{str(r['content_hash'])[:16]}..., the manifest says "
                                                              f"{expected[:16]}..."))
            elif (shard_row := rows.get(r["case_id"])) is not None:
                differ = [c for c in (*schema.METADATA_COLUMNS, "shard")
                          if c in r and c in shard_row and r[c] != csv_text(shard_row[c])]
                if differ:
                    listing = ", ".join(f"{c} {r[c]!r} in {CASES_CSV}, {csv_text(shard_row[c])!r} in the shard"
                                        for c in differ)
                    problems.append(ConsistencyProblem(f"{CASES_CSV} and {shard_row['shard']}",
                                                       f"case {r['case_id']}: {listing}"))
    except (OSError, KeyError, csv.Error) as e:
        problems.append(ConsistencyProblem(CASES_CSV, f"cannot be read as the cases table ({e})"))
    return problems


def verify_all(
    release_dir: str | Path, manifest: dict[str, Any] | None = None, *, check_sha256: bool = True,
    progress: Callable[[int], object] | None = None,
) -> list[FileProblem | ConsistencyProblem]:
    """Every file against the manifest (:func:`verify_files`), then the manifest against the rest of
    the release (:func:`verify_consistency`); an empty list means the release is intact."""
    manifest = manifest if manifest is not None else read_manifest(release_dir)
    return [*verify_files(release_dir, manifest, check_sha256=check_sha256, progress=progress),
            *verify_consistency(release_dir, manifest)]


def verify_release(release_dir: str | Path, *, check_sha256: bool = True) -> dict[str, Any]:
    """Raise :class:`IntegrityError` naming every problem (:func:`verify_all`), else return the manifest.

    Example:
        >>> verify_release("lymphatlas")["version"]  # doctest: +SKIP
        '1.0.0'
    """
    manifest = read_manifest(release_dir)
    problems = verify_all(release_dir, manifest, check_sha256=check_sha256)
    if problems:
        listing = "; ".join(str(p) for p in problems[:20])
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        raise IntegrityError(
            f"release {release_dir} (version {manifest['version']}) does not match its manifest: {listing}{more}. "
            "Re-download or re-copy a published release (a published version never changes); rebuild one that "
            "is not published yet (python -m builder release)"
        )
    return manifest
