"""WORK (aligned cases) -> a versioned, split-aware release folder that is also a Hugging Face dataset repo.

``build_release(work, release_dir, version=...)`` writes (docs/contracts.md section 4)::

    README.md            the dataset card, rendered from dataset_card.md with statistics of this release
    CHANGELOG.md         one section per version: cases added / removed / changed, statistics before and after
    manifest.json        every file with sha256 and size, each case's content hash (written last)
    splits.json          case -> split and fold (builder/release/splits.py)
    metadata/cases.csv   one row per case, no images
    data/<hl|nhl>/<train|test>-0000i-of-0000N.parquet   (builder/release/shards.py)
    wheels/lymphatlas_ds-<version>-py3-none-any.whl     the client wheel (builder/release/client_wheel.py)

The release is assembled in a hidden sibling folder and renamed into place, so an interrupted run
never leaves a half release under the final name. Nothing depends on the clock or on file system
order: the same WORK and version give byte-identical files. One build at a time: the WORK folder and
the target are locked (:mod:`lymphatlas_ds._lock`). Cases whose exam the last convert found gone
from the source are refused unless ``keep_gone`` (withdraw them first: ``python -m builder withdraw``).

Example:
    >>> summary = build_release("work", "lymphatlas", version="1.0.0")  # doctest: +SKIP
    >>> summary.n_cases  # doctest: +SKIP
    483
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
import re
import shutil
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lymphatlas_ds import codec, manifest as manifest_mod, schema
from lymphatlas_ds._io import write_atomic
from lymphatlas_ds._lock import target_lock, work_lock
from lymphatlas_ds._target import RELEASE, RELEASE_LAYOUT, check_target
from lymphatlas_ds.errors import SchemaError
from lymphatlas_ds.lineage import BASE_KEY, base_record
from lymphatlas_ds.manifest import CASES_CSV, CHANGELOG_NAME
from lymphatlas_ds.schema import IMAGE_COLUMNS, METADATA_COLUMNS, Diagnosis, Split, Subtype
from lymphatlas_ds.statistics import lesion_table as lesion_aggregate

from builder import __version__ as BUILDER_VERSION
from builder.convert.case import CaseFileError, load_case, read_volumes
from builder.release import lesions as lesions_mod
from builder.release import preview as preview_mod
from builder.release import card, client_wheel, lineage, shards, splits
from builder.release import changes as changes_mod
from builder.release import provenance

log = logging.getLogger(__name__)

CSV_EXTRA_COLUMNS = ("shard", *provenance.PROVENANCE_COLUMNS)
"""Columns of metadata/cases.csv beyond METADATA_COLUMNS: the shard file that holds the case, then how
the case was made (builder/release/provenance.py)."""

_SUBTYPE_CODES = frozenset(s.value for s in Subtype)
_SEMVER = re.compile(r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)")
_DTYPES = {"ct": schema.CT_DTYPE, "pet": schema.PET_DTYPE, "label": schema.LABEL_DTYPE}


class ReleaseError(SchemaError):
    """A release cannot be built: a bad version, an inconsistent case, an existing target."""


def parse_version(version: str) -> tuple[int, int, int]:
    """``"1.2.0" -> (1, 2, 0)``; raises :class:`ReleaseError` for anything but X.Y.Z."""
    match = _SEMVER.fullmatch(version)
    if not match:
        raise ReleaseError(f"version {version!r} is not semantic X.Y.Z (e.g. 1.0.0); tags are v<version>")
    return tuple(int(g) for g in match.groups())  # type: ignore[return-value]


# --- reading WORK ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkCase:
    """One aligned case of WORK: its folder and its parsed case.json."""

    case_id: str
    folder: Path
    info: Mapping[str, Any]

    @property
    def subject_id(self) -> str:
        return self.info["subject_id"]

    @property
    def diagnosis(self) -> str:
        return self.info["clinical"]["diagnosis"]


def list_work_cases(work: str | Path) -> list[WorkCase]:
    """Every case folder of ``WORK/cases`` with a case.json, sorted by case id."""
    root = Path(work) / "cases"
    if not root.is_dir():
        raise ReleaseError(f"{root} not found: run `python -m builder convert SOURCE {work}` first")
    out = []
    # Hidden folders are convert's temporary / replaced cases (builder.convert.case TMP_PREFIX, OLD_PREFIX).
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        info = load_case(folder)  # validates case.json (keys, schema version) and the three files
        info.pop("folder", None)
        if info["case_id"] != folder.name:
            raise ReleaseError(f"case folder {folder} holds case.json of {info['case_id']!r}; folder and id must agree")
        out.append(WorkCase(folder.name, folder, info))
    if not out:
        raise ReleaseError(f"{root} holds no case: nothing to release")
    return out


def _as_dtype(array: np.ndarray, dtype: str, where: str) -> np.ndarray:
    target = np.dtype(dtype)
    if array.dtype == target:
        return array
    converted = array.astype(target)
    if not np.array_equal(converted, array):
        raise ReleaseError(f"{where}: voxels of type {array.dtype} do not fit {dtype} without loss; fix convert's output")
    return converted


def case_affine(case: WorkCase) -> np.ndarray:
    """The case's float64 RAS affine from case.json (the NIfTI headers hold it only as float32)."""
    try:
        affine = np.asarray(case.info["geometry"]["affine_ras"], dtype=np.float64).reshape(4, 4)
    except (KeyError, ValueError, TypeError) as e:
        raise ReleaseError(f"case {case.case_id}: case.json geometry.affine_ras is not a 4x4 matrix ({e})") from e
    return affine


def read_case_volume(case: WorkCase, name: str, affine_ras: np.ndarray | None = None) -> np.ndarray:
    """Read one volume (``ct``, ``pet`` or ``label``) of a case as a ``[z, y, x]`` array in its schema dtype.

    Checks that it lies on case.json's grid (shape and affine, the header's float32 sform against
    case.json's float64 affine) and, for the label, that it holds only 0 and 1.
    """
    affine_ras = case_affine(case) if affine_ras is None else affine_ras
    file = schema.CASE_FILES[name]
    try:
        data, header_affine = _read_nifti_once(case.folder / file)
    except CaseFileError as e:
        raise ReleaseError(f"case {case.case_id}: {e}") from e
    array = np.ascontiguousarray(_as_dtype(data, _DTYPES[name], f"case {case.case_id} {file}"))
    if not np.allclose(header_affine, affine_ras, rtol=1e-6, atol=1e-3):
        raise ReleaseError(
            f"case {case.case_id}: the affine of {file} differs from case.json geometry.affine_ras; "
            "the files are not on the case's CT grid: re-run convert for this case"
        )
    expected = tuple(case.info["geometry"].get("shape_zyx", array.shape))
    if tuple(array.shape) != expected:
        raise ReleaseError(f"case {case.case_id}: {file} is {array.shape}, case.json says {expected}; "
                           "the volumes must share the case's CT grid")
    if name == "label" and array.size and int(array.max()) > 1:  # uint8: {0, 1} iff max <= 1
        raise ReleaseError(f"case {case.case_id}: label.nii.gz holds values other than 0 and 1")
    return array


def _read_nifti_once(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(array_zyx, header affine)`` of a WORK ``.nii.gz``, inflated straight into the array (nibabel's
    reader holds the voxels twice at its peak: 1.2 GB for a 600-slice PET). Files with scaling, or that
    this reader does not understand, go through :func:`builder.convert.case.read_volumes`' nibabel path."""
    import nibabel as nib

    try:
        from isal import igzip as gz
    except ImportError:  # pragma: no cover - the builder extra installs isal
        import gzip as gz  # type: ignore[no-redef]
    try:
        with gz.open(path, "rb") as f:
            header = nib.Nifti1Header.from_fileobj(f, check=True)
            shape = header.get_data_shape()
            slope, inter = header.get_slope_inter()
            dtype = header.get_data_dtype()
            if len(shape) != 3 or (slope not in (None, 1.0)) or (inter not in (None, 0.0)):
                raise ValueError("not a plain 3-D volume")
            f.seek(int(header["vox_offset"]))
            out = np.empty(shape[::-1], dtype)  # [z, y, x] C order is NIfTI's x-fastest order
            view = memoryview(out.reshape(-1)).cast("B")
            got = 0
            while got < len(view):
                n = f.readinto(view[got:got + (16 << 20)])  # in chunks: readinto(all) reads a copy of all first
                if not n:
                    raise CaseFileError(path, f"is truncated ({got} of {len(view)} voxel bytes)")
                got += n
        if not dtype.isnative:
            out = out.astype(dtype.newbyteorder("="))
        return out, header.get_best_affine()
    except CaseFileError:
        raise
    except Exception:  # anything unusual: nibabel's reader, with its own messages
        return read_volumes(path.parent, (path.name.split(".")[0],))[path.name.split(".")[0]]


def read_case_volumes(case: WorkCase) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Read ct / pet / label of a case as ``[z, y, x]`` arrays in the schema dtypes, and the RAS affine.

    Checks that the three share one grid and that it matches case.json's geometry; the affine
    returned is case.json's float64 one (what the content hash and the ``affine`` column use).
    """
    affine_ras = case_affine(case)
    return {name: read_case_volume(case, name, affine_ras) for name in IMAGE_COLUMNS}, affine_ras


def case_raw_bytes(case: WorkCase) -> int:
    """The voxel bytes of a case (ct int16 + pet float32 + label uint8) from case.json's shape."""
    shape = case.info.get("geometry", {}).get("shape_zyx") or (0, 0, 0)
    return int(np.prod([int(v) for v in shape])) * sum(np.dtype(t).itemsize for t in _DTYPES.values())


def metadata_row(case: WorkCase, placement: splits.Placement, content_hash: str) -> dict[str, Any]:
    """The metadata columns of a shard row (schema.METADATA_COLUMNS) from case.json and the split."""
    info = case.info
    clinical = info.get("clinical", {})
    geometry = info["geometry"]
    ct = info.get("ct", {}) or {}
    pet = info.get("pet", {}) or {}
    lesions = info.get("lesions", {}) or {}
    affine = case_affine(case)
    if clinical.get("subtype") not in _SUBTYPE_CODES:  # the value itself is not shown: it may be free text
        raise ReleaseError(
            f"case {case.case_id}: its clinical subtype is not a code of lymphatlas_ds.schema.Subtype (a case converted "
            "before the vocabulary, or case.json edited by hand); run `python -m builder convert` again, which "
            "checks the clinical row and reconverts the exam"
        )
    row = {
        "case_id": case.case_id,
        "subject_id": info["subject_id"],
        "diagnosis": clinical.get("diagnosis"),
        "subtype": clinical.get("subtype"),
        "sex": clinical.get("sex"),
        "age_band": clinical.get("age_band"),
        "exam_index": clinical.get("exam_index"),
        "days_from_first_exam": clinical.get("days_from_first_exam"),
        "split": placement.split.value,
        "fold": placement.fold,
        "spacing_xyz": [float(v) for v in geometry["spacing_xyz"]],
        "shape_xyz": [int(v) for v in geometry["shape_zyx"][::-1]],
        "affine": [float(v) for v in affine.ravel()],
        "ct_manufacturer": ct.get("manufacturer"),
        "ct_model": ct.get("model"),
        "pet_manufacturer": pet.get("manufacturer"),
        "pet_model": pet.get("model"),
        "suv_factor": (pet.get("suv") or {}).get("factor"),
        "registration": (info.get("alignment") or {}).get("method"),
        "lesion_count": lesions.get("count"),
        "tmtv_ml": lesions.get("tmtv_ml"),
        "tlg": lesions.get("tlg"),
        "suv_max": lesions.get("suv_max"),
        "dmax_mm": lesions.get("dmax_mm"),
        "content_hash": content_hash,
    }
    missing = set(METADATA_COLUMNS) - set(row)
    if missing:  # schema.py gained a column this function does not fill yet
        raise ReleaseError(f"metadata columns {sorted(missing)} are not filled by builder.release.build.metadata_row")
    return row


# --- statistics, CSV, changelog ---------------------------------------------------------------


def cases_csv(rows: list[dict[str, Any]]) -> str:
    """metadata/cases.csv text: METADATA_COLUMNS + the shard, rows sorted by case id; lists as JSON."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    columns = [*METADATA_COLUMNS, *CSV_EXTRA_COLUMNS]
    writer.writerow(columns)
    for row in sorted(rows, key=lambda r: r["case_id"]):
        writer.writerow([manifest_mod.csv_text(row.get(c)) for c in columns])
    return out.getvalue()


def read_cases_csv(path: str | Path) -> list[dict[str, Any]]:
    """Read metadata/cases.csv back into typed rows (numbers as numbers, lists as lists)."""
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row: dict[str, Any] = {}
            for key, text in raw.items():
                kind = METADATA_COLUMNS.get(key, "string")
                if text == "":
                    row[key] = None
                elif kind.startswith("list"):
                    row[key] = json.loads(text)
                elif kind.startswith("int"):
                    row[key] = int(text)
                elif kind.startswith("float"):
                    row[key] = float(text)
                else:
                    row[key] = text
            rows.append(row)
    return rows


def release_statistics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Statistics of a release from its metadata rows (the card and the changelog show them).

    One aggregation for the card, the changelog and ``lymphatlas info``:
    :func:`lymphatlas_ds.statistics.aggregate` (sex and age per patient at the first exam, SUVmax
    over the cases with a lesion).
    """
    from lymphatlas_ds.statistics import aggregate

    return aggregate(rows)


@dataclass(frozen=True)
class CaseChanges:
    """Cases added, removed and changed (content hash differs) relative to the previous release."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    metadata: tuple[str, ...] = ()  # same content, other metadata or provenance (builder/release/changes.py)
    details: Mapping[str, str] = field(default_factory=dict)  # case id -> what changed, old -> new
    moved: tuple[str, ...] = ()  # published cases that changed split or fold (never, by construction)
    emptied: tuple[str, ...] = ()  # "config/split" pairs that held cases in the base and hold none now

    @property
    def none(self) -> bool:
        """Nothing added, removed, changed in content or in metadata."""
        return not (self.added or self.removed or self.changed or self.metadata or self.emptied)


def compare_cases(previous: Mapping[str, str], current: Mapping[str, str]) -> CaseChanges:
    """Compare two ``manifest["cases"]`` mappings (case id -> content hash)."""
    return CaseChanges(
        added=tuple(sorted(set(current) - set(previous))),
        removed=tuple(sorted(set(previous) - set(current))),
        changed=tuple(sorted(c for c in set(current) & set(previous) if current[c] != previous[c])),
    )


_STAT_LINES = (
    ("cases", lambda s: s["cases"]),
    ("patients", lambda s: s["patients"]),
    *(
        (f"{split} cases ({diag})", (lambda s, sp=split, d=diag: s["cases_by_split"].get(sp, {}).get(d, 0)))
        for split in ("train", "test")
        for diag in ("HL", "NHL")
    ),
    ("lesions (total)", lambda s: s["lesion_count"]["total"]),
    ("TMTV median (ml)", lambda s: s["tmtv_ml"]["median"]),
    ("cases without lesion", lambda s: s["cases_without_lesion"]),
)


def changelog_section(
    version: str,
    changes: CaseChanges,
    after: Mapping[str, Any],
    *,
    before: Mapping[str, Any] | None = None,
    previous_version: str | None = None,
) -> str:
    """The ``## <version>`` section of CHANGELOG.md."""

    def listing(ids: tuple[str, ...]) -> str:
        return ", ".join(ids) if ids else "none"

    lines = [f"## {version}", ""]
    if previous_version is None:
        lines.append(f"First release: {after['cases']} cases of {after['patients']} patients.")
    else:
        moved = (f"{len(changes.moved)} published case(s) changed split or fold." if changes.moved
                 else "No published case changed split or fold.")
        lines.append(
            f"Update of {previous_version}: {len(changes.added)} added, {len(changes.removed)} removed, "
            f"{len(changes.changed)} changed, {len(changes.metadata)} with metadata changes. {moved}"
        )
    lines += [
        "",
        f"- added ({len(changes.added)}): {listing(changes.added)}",
        f"- removed ({len(changes.removed)}): {listing(changes.removed)}",
        f"- changed ({len(changes.changed)}): {listing(changes.changed)}",
        f"- metadata changed ({len(changes.metadata)}): {listing(changes.metadata)}",
        "",
        *changes_mod.render_details(changes.details, list(changes.emptied)),
    ]
    if before is not None:
        lines += [f"| statistic | {previous_version} | {version} |", "|---|---:|---:|"]
        lines += [f"| {name} | {get(before)} | {get(after)} |" for name, get in _STAT_LINES]
    else:
        lines += [f"| statistic | {version} |", "|---|---:|"]
        lines += [f"| {name} | {get(after)} |" for name, get in _STAT_LINES]
    return "\n".join(lines) + "\n"


CHANGELOG_HEADER = (
    "# Changelog\n\n"
    "Every version of the LymphAtlas release, newest first. A published version never changes; an\n"
    "update adds or corrects cases without moving any published case between splits or folds.\n"
)


def merge_changelog(previous_text: str | None, section: str) -> str:
    """Put ``section`` on top of the previous changelog's sections."""
    older = ""
    if previous_text:
        start = previous_text.find("\n## ")
        older = previous_text[start + 1 :] if start >= 0 else ""
    return CHANGELOG_HEADER + "\n" + section + ("\n" + older if older else "")


# --- the release --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReleaseSummary:
    """What :func:`build_release` wrote."""

    path: Path
    version: str
    n_cases: int
    shards: tuple[shards.ShardInfo, ...]
    changes: CaseChanges
    statistics: Mapping[str, Any] = field(default_factory=dict)
    base_version: str | None = None

    @property
    def unchanged(self) -> bool:
        """An update with no change at all from its base (the release CLI warns)."""
        return self.base_version is not None and self.changes.none


def _gone_cases(work: Path) -> dict[str, str]:
    """{case id: exam id} of cases whose exam the last convert found gone from the source (build.json)."""
    path = work / "build.json"
    if not path.is_file():
        return {}
    try:
        gone = json.loads(path.read_text()).get("gone_from_source") or {}
    except (json.JSONDecodeError, AttributeError) as e:
        raise ReleaseError(f"{path} is not valid JSON ({e}); run convert again to rewrite it") from e
    return {c: e for e, c in gone.items() if c}


def _previous_release(previous: str | Path | None, version: str) -> dict[str, Any] | None:
    if previous is None:
        return None
    prev = Path(previous)
    versions = prev / "versions.json"
    if versions.is_file() and not (prev / manifest_mod.MANIFEST_NAME).exists():
        # A local mirror: extend its latest version.
        try:
            latest = json.loads(versions.read_text())["latest"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ReleaseError(f"{versions} has no 'latest' version ({e}); pass the version folder as --previous") from e
        prev = prev / latest
    if (prev / lineage.HUB_BASE_MARK).is_file():  # a Hub base without shards, its files checked by fetch_hub_base
        prev_manifest = manifest_mod.read_manifest(prev)
    else:
        prev_manifest = manifest_mod.verify_release(prev, check_sha256=False)
    if parse_version(version) <= parse_version(prev_manifest["version"]):
        raise ReleaseError(f"version {version} must be newer than the previous release's {prev_manifest['version']}")
    changelog = prev / CHANGELOG_NAME
    return {
        "path": prev,
        "manifest": prev_manifest,
        "splits": splits.read_splits(prev),
        "rows": read_cases_csv(prev / CASES_CSV),
        "changelog": changelog.read_text() if changelog.exists() else None,
    }


def build_release(
    work: str | Path,
    release_dir: str | Path,
    *,
    version: str,
    previous: str | Path | None = None,
    seed: int = 0,
    overwrite: bool = False,
    on_case: Callable[[str], None] | None = None,
    workers: int = 2,
    keep_gone: bool = False,
    wait_for_lock: bool = False,
    mirror: str | Path | None = None,
    repo_id: str | None = None,
) -> ReleaseSummary:
    """Build the release folder ``release_dir`` from the aligned cases of ``work``.

    ``previous`` is the folder of the last published release (or a local mirror, meaning its
    latest version): its cases keep their split and fold, its seed is reused and its changelog is
    extended. ``on_case`` is called with each case
    id as it is written (the CLI's progress bar); up to ``workers`` cases are read and encoded ahead in
    threads, within :data:`RELEASE_MEMORY_BUDGET` of voxels in flight (a case is read one volume at a
    time and holds about its largest volume plus its gzip cells), so the peak memory does not grow
    with the number or the size of the cases.

    ``mirror`` is the local mirror the release is for: the update is built on its latest version
    (``previous``, if given too, must be that version); ``repo_id`` the same for a Hub dataset repo
    (its newest tag's metadata is fetched); see :mod:`builder.release.lineage`.
    ``keep_gone`` releases cases whose exam is gone from the source (refused by default). WORK and
    the target are locked for the build; another build or convert is refused, or waited for with
    ``wait_for_lock``. A write error (a full disk) raises :class:`ReleaseError` naming the path;
    the previous release at ``release_dir`` is then left as it was.

    Example:
        >>> build_release("work", "lymphatlas", version="1.1.0", previous="mirror/1.0.0")  # doctest: +SKIP
    """
    parse_version(version)
    work, release_dir = Path(work), Path(release_dir)
    if not (work / "cases").is_dir():
        raise ReleaseError(f"{work / 'cases'} not found: run `python -m builder convert SOURCE {work}` first")
    guard_target(work, release_dir, previous=previous, overwrite=overwrite)
    with work_lock(work, wait=wait_for_lock), target_lock(release_dir, what="release folder", wait=wait_for_lock):
        try:
            return _build_release(work, release_dir, version=version, previous=previous, seed=seed,
                                  overwrite=overwrite, on_case=on_case,
                                  workers=workers, keep_gone=keep_gone, mirror=mirror, repo_id=repo_id)
        except OSError as e:
            where = e.filename or release_dir
            raise ReleaseError(
                f"cannot write release {version} ({where}): {e.strerror or e}; nothing was replaced, "
                f"{release_dir} is as it was: free space on that disk (or fix the permissions) and run again"
            ) from e


def _build_release(work: Path, release_dir: Path, *, version: str, previous: str | Path | None, seed: int,
                   overwrite: bool, on_case: Callable[[str], None] | None, workers: int,
                   keep_gone: bool, mirror: str | Path | None = None, repo_id: str | None = None) -> ReleaseSummary:
    _check_target(release_dir, overwrite=overwrite)
    with tempfile.TemporaryDirectory(prefix=".lymphatlas-base-") as scratch:  # a Hub base's metadata
        base = lineage.resolve_base(previous, mirror, work, version, repo_id=repo_id, scratch=Path(scratch))
        prev = _previous_release(base, version)
    if prev is not None and prev["splits"].get("seed") not in (None, seed):
        log.info("reusing the previous release's split seed %s", prev["splits"]["seed"])
        seed = int(prev["splits"]["seed"])
    cases = _releasable_cases(work, keep_gone=keep_gone)
    if prev is not None:
        lineage.check_related(prev["splits"]["cases"], {c.subject_id for c in cases}, work=work,
                              base_version=prev["manifest"]["version"], mirror_hint=repo_id or mirror or prev["path"])
    split_cases = [
        splits.SplitCase(c.case_id, c.subject_id, c.diagnosis, float((c.info.get("lesions") or {}).get("tmtv_ml") or 0.0))
        for c in cases
    ]
    placements = splits.assign_splits(split_cases, seed=seed, previous=prev["splits"]["cases"] if prev else None)

    staging = release_dir.parent / f".{release_dir.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)  # left by an interrupted run
    staging.mkdir(parents=True)
    try:
        extras: dict[str, CaseExtras] = {}
        rows, hashes, written = _write_data(staging, {c.case_id: c for c in cases}, placements,
                                            on_case=on_case, workers=workers,
                                            extras=extras)
        lesion_rows = [r for c in sorted(extras) for r in extras[c].lesion_rows]
        side = {"lesions": lesions_mod.write_lesions(staging, lesion_rows, {r["split"] for r in rows}),
                "preview": preview_mod.write_preview(staging, rows, {c: e.preview for c, e in extras.items()})}
        changes, stats = _write_metadata(staging, rows, hashes, written, placements, prev, version=version, seed=seed,
                                         removed_reasons=changes_mod.read_withdrawals(work),
                                         lesion_rows=lesion_rows, side_files=side)
        _swap_into_place(staging, release_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    lineage.record_release(work, manifest_mod.read_manifest(release_dir))
    log.debug("release %s: %d cases in %d shards at %s", version, len(rows), len(written), release_dir)
    return ReleaseSummary(release_dir, version, len(rows), tuple(written), changes, stats,
                          base_version=prev["manifest"]["version"] if prev else None)


def work_source(work: Path) -> Path | None:
    """The DICOM source WORK was converted from, as the last convert recorded it in build.json (None: unknown)."""
    try:
        source = json.loads((work / "build.json").read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return None
    return Path(source) if isinstance(source, str) and source else None


def guard_target(work: Path, release_dir: Path, *, previous: str | Path | None, overwrite: bool) -> None:
    """Refuse, before anything is written, a target that is, contains or lies inside WORK, its DICOM
    source, the previous release or a mirror, or (``overwrite``) holds what a release does not
    (:func:`lymphatlas_ds._target.check_target`)."""
    check_target(release_dir, command="release", layout=RELEASE_LAYOUT, own_kind=RELEASE, replace=overwrite,
                 protected={"WORK": work, "the DICOM source of WORK (build.json)": work_source(work),
                            "the previous release (--previous)": previous})


def _check_target(release_dir: Path, *, overwrite: bool) -> None:
    """Put back a release a killed run left renamed aside; refuse a non-empty target without ``overwrite``."""
    trash = release_dir.parent / f".{release_dir.name}.old"
    if trash.exists() and not release_dir.exists():
        os.replace(trash, release_dir)  # a run killed between its two renames: the previous release goes back
    if release_dir.exists() and any(release_dir.iterdir()) and not overwrite:
        raise ReleaseError(f"{release_dir} exists and is not empty; choose another folder or pass --overwrite "
                           "(overwrite=True) to replace it")


def _releasable_cases(work: Path, *, keep_gone: bool) -> list[WorkCase]:
    """The WORK cases, refusing those whose exam is gone from the source unless ``keep_gone``."""
    cases = list_work_cases(work)
    gone = _gone_cases(work)
    refused = sorted(c.case_id for c in cases if c.case_id in gone)
    if refused and not keep_gone:
        exams = " ".join(gone[c] for c in refused)
        raise ReleaseError(
            f"{len(refused)} cases of {work} belong to exams gone from the source ({', '.join(refused)}; exams "
            f"{exams.replace(' ', ', ')}): withdraw them with `python -m builder withdraw {work} {exams}` "
            "(or `convert --prune`), or pass --keep-gone to release them anyway"
        )
    return cases


def _prepare_case(case: WorkCase, placement: splits.Placement,
                  cells_dir: Path) -> tuple[dict[str, Any], dict[str, Any], CaseExtras]:
    """A case's metadata row, volume cells (files in ``cells_dir``, which the shard writer copies and
    removes) and its lesion rows and preview images, after checking its voxels (and its lesion items)
    against case.json.

    One volume at a time: the label is read first (its lesions are checked and place the preview's
    axial plane), then the CT and the PET are each read, hashed, encoded and drawn, and let go before
    the next is read; the label is hashed and encoded last (the content hash's order). The cells are
    gzipped straight into their files, so at the peak the case holds the label and the PET: 5 of the 7
    voxel bytes, no cell and no instance map.
    """
    from lymphatlas_ds.figures import PreviewDrawing
    from lymphatlas_ds.lesions import label_instances

    affine = case_affine(case)
    label = read_case_volume(case, "label", affine)
    instances = label_instances(label)
    try:
        lesions_mod.check_items(case.case_id, case.info, label, instances)
        items_error = None
    except ReleaseError as e:  # raised after the content hash: a changed file is named as such first
        items_error = e
    drawing = PreviewDrawing(affine, label.shape)
    drawing.add_label(label, instances)
    del instances
    digest = manifest_mod.ContentHash()
    cells = {}
    for name in IMAGE_COLUMNS:
        array = label if name == "label" else read_case_volume(case, name, affine)
        digest.update(name, array)
        cells[name] = _encode_to_file(cells_dir, array, affine, codec.cell_path(case.case_id, name))
        if name == "pet":
            drawing.add_pet(array)
        elif name == "ct":
            drawing.add_ct(array)
        del array
    del label
    content_hash = digest.hexdigest(affine)
    if case.info.get("content_hash") != content_hash:
        raise ReleaseError(
            f"case {case.case_id}: the voxels of {case.folder} do not match case.json content_hash "
            "(a file changed after convert, or a corrupt copy): re-run convert for this case"
        )
    if items_error is not None:
        raise items_error
    row = {**metadata_row(case, placement, content_hash), **provenance.case_provenance(case.info)}
    extras = CaseExtras(lesions_mod.lesion_rows(case.info, row), preview_mod.image_cells(case.case_id, drawing.images()))
    return row, cells, extras


def _encode_to_file(cells_dir: Path, array: np.ndarray, affine: np.ndarray, path: str) -> dict[str, Any]:
    """A ``{"file", "path"}`` cell: the gzip NIfTI bytes written to ``cells_dir/path`` as they are compressed."""
    target = cells_dir / path
    with open(target, "wb") as out:
        codec.encode_volume_to(out, array, affine, path)
    return {"file": target, "path": path}


@dataclasses.dataclass
class CaseExtras:
    """What a case adds to the lesions and preview configs."""

    lesion_rows: list[dict[str, Any]]
    preview: dict[str, dict[str, Any]]


RELEASE_MEMORY_BUDGET = 640 * 2**20
"""Voxel bytes (raw, as in case.json's shape) of the cases a release holds at once: read and encoded
ahead in threads, or being written. A case larger than the budget is handled alone. 640 MiB keeps one
512x512x250 case (437.5 MiB) in flight, read one volume at a time, its cells gzipped into files: 3, 6 and
12 such cases peak at 0.79-0.82 GB (the process's VmHWM), a 600-slice case at 1.42 GB (pyarrow's writer's
two copies of a placeholder of its 530 MiB PET cell); before the cells went to files, 1.05-1.09 and
2.08 GB; ``benchmarks/bench_shards.py --release``, tests/test_hub_layout.py (slow)."""


def _write_data(staging: Path, by_id: dict[str, WorkCase], placements: dict[str, splits.Placement], *,
                on_case: Callable[[str], None] | None, workers: int,
                extras: dict[str, CaseExtras] | None = None,
                memory_budget: int = RELEASE_MEMORY_BUDGET,
                ) -> tuple[list[dict[str, Any]], dict[str, str], list[shards.ShardInfo]]:
    """Write ``data/<config>/<split>-*.parquet``; return the metadata rows, the content hashes and the
    shards; each case's lesion rows and preview images go to ``extras`` (case id -> :class:`CaseExtras`)."""
    rows: list[dict[str, Any]] = []
    hashes: dict[str, str] = {}
    extras = {} if extras is None else extras

    def shard_rows(ids: list[str]) -> Iterator[dict[str, Any]]:
        # The next cases are read and encoded in threads while one is written (gunzip, sha256 and ISA-L release
        # the GIL); the cases in flight stay within RELEASE_MEMORY_BUDGET of voxels: one at least, workers + 1 at most.
        pending: deque[tuple[str, Future]] = deque()
        queue = deque(ids)
        in_flight = 0  # voxel bytes of the cases submitted and not yet written

        def fill(pool: ThreadPoolExecutor) -> None:
            nonlocal in_flight
            while queue and len(pending) < workers:
                size = case_raw_bytes(by_id[queue[0]])
                if in_flight and in_flight + size > memory_budget:
                    return
                case_id = queue.popleft()
                in_flight += size
                pending.append((case_id, pool.submit(_prepare_case, by_id[case_id], placements[case_id], cells_dir)))

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            try:
                fill(pool)
                while pending:
                    case_id, future = pending.popleft()
                    row, cells, extra = future.result()
                    extras[row["case_id"]], hashes[row["case_id"]] = extra, row["content_hash"]
                    fill(pool)  # the next case prepares while this one is written
                    rows.append(row)
                    yield {**row, **cells}
                    del cells
                    in_flight -= case_raw_bytes(by_id[case_id])
                    if on_case is not None:
                        on_case(row["case_id"])
                    fill(pool)
            finally:
                for _, future in pending:
                    future.cancel()

    cells_dir = staging / ".cells"  # the encoded cells until their shard is written (removed, whatever happens)
    cells_dir.mkdir()
    try:
        written = _write_configs(staging, placements, rows, shard_rows)
    finally:
        shutil.rmtree(cells_dir, ignore_errors=True)
    return rows, hashes, written


def _write_configs(staging: Path, placements: dict[str, splits.Placement], rows: list[dict[str, Any]],
                   shard_rows: Callable[[list[str]], Iterator[dict[str, Any]]],
                   ) -> list[shards.ShardInfo]:
    """Write the shards of each config and split from ``shard_rows(ids)``; record each row's shard."""
    written: list[shards.ShardInfo] = []
    for diagnosis in Diagnosis:
        for split in Split:
            ids = sorted(c for c, p in placements.items() if p.diagnosis == diagnosis.value and p.split is split)
            before = len(rows)
            infos = shards.write_shards(shard_rows(ids), staging / "data" / diagnosis.config.value, split=split.value,
                                        release_root=staging)
            for info in infos:
                for row in rows[before:]:
                    if row["case_id"] in info.case_ids:
                        row["shard"] = info.path
            written.extend(infos)
    return written


def _write_metadata(staging: Path, rows: list[dict[str, Any]], hashes: dict[str, str],
                    written: list[shards.ShardInfo], placements: dict[str, splits.Placement],
                    prev: dict[str, Any] | None, *, version: str, seed: int,
                    removed_reasons: Mapping[str, str] | None = None, lesion_rows: list[dict[str, Any]] | None = None,
                    side_files: Mapping[str, list[str]] | None = None) -> tuple[CaseChanges, dict[str, Any]]:
    """Write cases.csv, splits.json, CHANGELOG.md, the card (README.md) and, last, manifest.json.

    ``lesion_rows`` (the lesions config's rows) give the card's lesion table; ``side_files`` the files of the
    lesions and preview configs (``{"lesions": [...], "preview": [...]}``) the card's YAML and gallery name."""
    write_atomic(staging / CASES_CSV, cases_csv(rows), fsync=True)
    doc = splits.splits_document(placements, version=version, seed=seed)
    write_atomic(staging / splits.SPLITS_NAME, json.dumps(doc, indent=2, sort_keys=True) + "\n", fsync=True)

    stats = release_statistics(rows)
    changes = compare_cases(prev["manifest"]["cases"] if prev else {}, hashes)
    if prev:
        changes = _detailed(changes, prev, rows, removed_reasons)
    section = changelog_section(
        version,
        changes,
        stats,
        before=release_statistics(prev["rows"]) if prev else None,
        previous_version=prev["manifest"]["version"] if prev else None,
    )
    changelog_text = merge_changelog(prev["changelog"] if prev else None, section)
    write_atomic(staging / CHANGELOG_NAME, changelog_text, fsync=True)
    readme = card.render_card(
        version=version,
        statistics=stats,
        shards=written,
        changelog=changelog_text,
        seed=seed,
        n_folds=doc["n_folds"],
        provenance=provenance.summarise(rows),
        lesion_statistics=lesion_aggregate(rows, lesion_rows or []),
        side_files=side_files or {},
    )
    write_atomic(staging / "README.md", readme, fsync=True)
    client_wheel.ship(staging)  # the card's install line: wheels/lymphatlas_ds-<version>-py3-none-any.whl

    manifest = manifest_mod.build_manifest(staging, version=version, builder_version=BUILDER_VERSION, cases=hashes)
    manifest[BASE_KEY] = base_record(prev["manifest"] if prev else None)
    write_atomic(staging / manifest_mod.MANIFEST_NAME, manifest_mod.dumps(manifest), fsync=True)
    return changes, stats


def _detailed(changes: CaseChanges, prev: dict[str, Any], rows: list[dict[str, Any]],
              removed_reasons: Mapping[str, str] | None) -> CaseChanges:
    """``changes`` with the per-case fields (old -> new), the moved cases and the emptied configs (changes.py)."""
    from lymphatlas_ds.lineage import moved_cases

    details = changes_mod.case_details(prev["rows"], rows, removed_reasons=removed_reasons or {})
    now = {r["case_id"]: {"split": r["split"], "fold": r["fold"]} for r in rows}
    return dataclasses.replace(
        changes,
        metadata=changes_mod.metadata_changed(details, changes.changed, changes.removed),
        details=details,
        moved=tuple(m.split(":")[0] for m in moved_cases(prev["splits"]["cases"], now)),
        emptied=tuple(changes_mod.emptied_configs(prev["rows"], rows)),
    )


def _swap_into_place(staging: Path, release_dir: Path) -> None:
    """Rename the finished staging folder to ``release_dir``; a previous release there is renamed aside first."""
    if release_dir.exists():
        trash = release_dir.parent / f".{release_dir.name}.old"
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(release_dir, trash)
        os.replace(staging, release_dir)
        shutil.rmtree(trash)
    else:
        os.replace(staging, release_dir)


__all__ = ["ReleaseError", "ReleaseSummary", "build_release", "list_work_cases", "read_cases_csv"]
