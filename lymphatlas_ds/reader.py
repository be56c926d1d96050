"""Read a local release folder: manifest, splits, the metadata table and the cases, one at a time.

This is the one reader of the release layout (docs/contracts.md section 4) on the client side; the
torch loader, the nnU-Net materializer and ``lymphatlas show`` all go through it. It reads shards
with pyarrow, one row group (one case) and one column (one volume) at a time, so memory stays at
one case even for a release of hundreds of whole-body exams.

Integrity: before a file of the release is first read it is checked against ``manifest.json``
(size and sha256). A check that passed is remembered in memory for this process (and the
DataLoader workers it starts). With ``remember=True`` it is also recorded under the client's cache
folder, keyed by the file's real path, size, inode, modification and change times (a change time
cannot be set back), so that the next run does not hash a 500 MB shard again. The torch loader
records checks only with its decoded cache, whose entries are checked against the manifest's
per-case content hash when they are built and against their own checksum when opened; without
it (``load_lymphatlas(cache=False)``, ``remember=False``) every process hashes the bytes of each
file it reads once (sha256), so a shard changed in place, even by silent disk corruption that
leaves every time stamp alone, is still caught.
A mismatch raises :class:`~lymphatlas_ds.errors.IntegrityError` naming the file and the fix.

Example:
    >>> release = Release("lymphatlas")  # doctest: +SKIP
    >>> release.version, len(release.case_ids("nhl", "train"))  # doctest: +SKIP
    ('1.0.0', 12)
    >>> for case in release.iter_cases("hl", "test"):  # doctest: +SKIP
    ...     print(case.case_id, case.ct.shape, case.pet.dtype)
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lymphatlas_ds import codec, manifest as manifest_mod
from lymphatlas_ds._io import write_atomic
from lymphatlas_ds.errors import IntegrityError, SchemaError
from lymphatlas_ds.manifest import SPLITS_NAME
from lymphatlas_ds.schema import IMAGE_COLUMNS, METADATA_COLUMNS, N_FOLDS, Config, Diagnosis, Split, Subset

log = logging.getLogger(__name__)

DATA_DIR = "data"
_VERIFIED_DIR = "verified"


@dataclass(frozen=True)
class CaseRecord:
    """One decoded case: arrays ``[z, y, x]`` (ct int16 HU, pet float32 SUVbw, label uint8) and the RAS affine.

    ``meta`` holds the shard row's metadata columns (``schema.METADATA_COLUMNS``). A volume that
    was not asked for (``columns=``) is ``None``.
    """

    case_id: str
    meta: dict[str, Any]
    ct: np.ndarray | None
    pet: np.ndarray | None
    label: np.ndarray | None
    affine: np.ndarray


@dataclass(frozen=True)
class CaseLocation:
    """Where a case lives: its shard (relative path) and row group, its config and split."""

    case_id: str
    shard: str
    row_group: int
    diagnosis: Diagnosis
    split: Split


def _as_config(config: Config | str) -> Config:
    try:
        return Config(config.value if isinstance(config, Config) else str(config).lower())
    except ValueError as e:
        raise SchemaError(f"unknown config {config!r}; expected one of {[c.value for c in Config]}") from e


def _as_split(split: Split | str) -> Split:
    try:
        return Split(split.value if isinstance(split, Split) else str(split).lower())
    except ValueError as e:
        raise SchemaError(f"unknown split {split!r}; expected one of {[s.value for s in Split]}") from e


def _diagnoses(config: Config) -> list[Diagnosis]:
    return list(Diagnosis) if config is Config.ALL else [d for d in Diagnosis if d.config is config]


@dataclass
class _Verified:
    """Files already checked against the manifest, keyed by (real path, size, inode, mtime_ns, ctime_ns)."""

    seen: set[tuple[str, int, int, int, int]] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Release:
    """A local LymphAtlas release folder (see :func:`lymphatlas_ds.source.resolve_release` to get one).

    ``verify=True`` checks each file against the manifest on first use (see the module doc);
    ``state_dir`` is where passed checks are recorded (default: the client cache folder,
    ``lymphatlas_ds.cache.default_cache_dir()``); ``None`` there and ``remember=False`` keeps
    them in memory only.

    Example:
        >>> release = Release("lymphatlas")  # doctest: +SKIP
        >>> release.cases_table("nhl", "train").num_rows  # doctest: +SKIP
        12
    """

    def __init__(
        self,
        path: str | Path,
        *,
        verify: bool = True,
        state_dir: str | Path | None = None,
        remember: bool = True,
    ) -> None:
        self.path = Path(path)
        self.verify = verify
        if remember and state_dir is None:
            from lymphatlas_ds.cache import default_cache_dir

            state_dir = default_cache_dir()
        self.state_dir = Path(state_dir) if remember and state_dir is not None else None
        self._verified = _Verified()
        # Open parquet files, one set per thread: pyarrow's ParquetFile is not safe to read from two
        # threads at once (its pre-buffer cache mixes up the ranges: "ReadRangeCache did not find
        # matching cache entry"), and the cache build, materialize and prepare() read with threads.
        self._local = threading.local()
        self._shard_rows: dict[str, dict[str, int]] = {}
        if not (self.path / manifest_mod.MANIFEST_NAME).is_file():
            raise SchemaError(
                f"{self.path} has no {manifest_mod.MANIFEST_NAME}: it is not a LymphAtlas release folder "
                "(a mirror holds one folder per version; see lymphatlas_ds.source.resolve_release)"
            )

    @classmethod
    def from_source(
        cls,
        source: str | Path,
        *,
        version: str | None = None,
        hub_cache_dir: str | Path | None = None,
        verify: bool = True,
        state_dir: str | Path | None = None,
        remember: bool = True,
    ) -> Release:
        """Open the release that ``source`` (folder, mirror or Hub repo id) and ``version`` name.

        Example:
            >>> Release.from_source("org/lymphatlas", version="1.0.0").version  # doctest: +SKIP
            '1.0.0'
        """
        from lymphatlas_ds.source import resolve_release

        resolved = resolve_release(source, version=version, cache_dir=hub_cache_dir)
        return cls(resolved.path, verify=verify, state_dir=state_dir, remember=remember)

    def __repr__(self) -> str:
        return f"Release({str(self.path)!r}, version={self.version!r})"

    # Pickled into DataLoader workers: open parquet files and locks stay behind.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_local"]
        state["_verified"] = _Verified(set(self._verified.seen))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    # ------------------------------------------------------------------ manifest, splits, files

    @cached_property
    def manifest(self) -> dict[str, Any]:
        """``manifest.json`` (version, schema version, files with sha256 and size, case content hashes)."""
        return manifest_mod.read_manifest(self.path)

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @cached_property
    def splits(self) -> dict[str, Any]:
        """``splits.json``: ``{"version", "seed", "n_folds", "cases": {case_id: {subject_id, diagnosis, split, fold}}}``."""
        path = self.file(SPLITS_NAME)
        try:
            data = json.loads(path.read_text())
            data["cases"]
        except (ValueError, KeyError, TypeError) as e:
            raise SchemaError(f"{path} is not a valid splits table ({e}); re-download the release") from e
        return data

    def file(self, relpath: str) -> Path:
        """The local path of a release file, checked against the manifest on first use (when ``verify``)."""
        entry = self.manifest["files"].get(relpath)
        path = self.path / relpath
        if entry is None:
            raise SchemaError(f"{relpath} is not listed in {self.path / manifest_mod.MANIFEST_NAME}; it is not part of the release")
        if not path.is_file():
            raise IntegrityError(
                f"{path} is missing (listed in the manifest of release {self.version}); "
                "re-download or re-copy the release, then run `lymphatlas verify`"
            )
        if self.verify:
            self._check_file(relpath, path, entry)
        return path

    def _record_path(self, real: str, sha256: str) -> Path | None:
        if self.state_dir is None:
            return None
        key = hashlib.sha256(f"{real}\0{sha256}".encode()).hexdigest()[:40]
        return self.state_dir / _VERIFIED_DIR / key

    def _check_file(self, relpath: str, path: Path, entry: dict[str, Any]) -> None:
        real = os.path.realpath(path)
        st = os.stat(real)
        # ctime cannot be set back by os.utime: a file rewritten in place with its mtime restored gets a new key.
        key = (real, st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
        if key in self._verified.seen:
            return
        record = self._record_path(real, entry["sha256"])
        stamp = " ".join(str(k) for k in key[1:])
        if record is not None and record.is_file():
            try:
                if record.read_text() == stamp:
                    self._verified.seen.add(key)
                    return
            except OSError:
                pass
        with self._verified.lock:
            if st.st_size != entry["size"]:
                raise IntegrityError(
                    f"{path} has {st.st_size} bytes, the manifest of release {self.version} says {entry['size']}: "
                    "the file is truncated or modified. Re-download or re-copy the release "
                    "(then `lymphatlas verify` it); a published version never changes"
                )
            log.info("checking %s against the manifest (sha256)", relpath)
            found = manifest_mod.sha256_file(real)
            if found != entry["sha256"]:
                raise IntegrityError(
                    f"{path} does not match the manifest of release {self.version} "
                    f"(sha256 {found[:16]}... != {entry['sha256'][:16]}...): the file is corrupt or modified. "
                    "Re-download or re-copy the release (then `lymphatlas verify` it); a published version never changes"
                )
            self._verified.seen.add(key)
        if record is not None:
            try:
                write_atomic(record, stamp)
            except OSError as e:  # a read-only cache folder only costs a re-check next time
                log.debug("could not record the check of %s in %s: %s", relpath, record, e)

    def verify_all(
        self, *, check_sha256: bool = True, progress: Callable[[int], object] | None = None
    ) -> list[manifest_mod.FileProblem | manifest_mod.ConsistencyProblem]:
        """Check every file against the manifest, and the manifest against the splits, changelog and
        shards (:func:`lymphatlas_ds.manifest.verify_all`) now; an empty list means the release is intact.
        ``progress`` gets the bytes of each file checked."""
        return manifest_mod.verify_all(self.path, self.manifest, check_sha256=check_sha256, progress=progress)

    # ------------------------------------------------------------------ shards and the case index

    def shards(self, config: Config | str = Config.ALL, split: Split | str = Split.TRAIN) -> list[str]:
        """Relative paths of the shards of a config and split, in order (as the manifest lists them).

        Example:
            >>> Release("lymphatlas").shards("hl", "test")  # doctest: +SKIP
            ['data/hl/test-00000-of-00001.parquet']
        """
        config, split = _as_config(config), _as_split(split)
        out = []
        for diagnosis in _diagnoses(config):
            pattern = f"{DATA_DIR}/{diagnosis.config.value}/{split.value}-*.parquet"
            out += sorted(p for p in self.manifest["files"] if fnmatch.fnmatchcase(p, pattern))
        return out

    def _parquet(self, relpath: str) -> pq.ParquetFile:
        """This thread's open handle on a shard (opened on first use)."""
        files = self._local.__dict__.setdefault("files", {})
        pf = files.get(relpath)
        if pf is None:
            path = self.file(relpath)
            try:
                pf = pq.ParquetFile(path)
            except (pa.ArrowException, OSError) as e:
                raise IntegrityError(
                    f"{path} is not a readable parquet file ({e}): it is truncated or corrupt. "
                    "Re-download or re-copy the release, then run `lymphatlas verify`"
                ) from e
            files[relpath] = pf
        return pf

    def _read(self, relpath: str, row_group: int | None, columns: list[str]) -> pa.Table:
        pf = self._parquet(relpath)
        try:
            if row_group is None:
                return pf.read(columns=columns)
            return pf.read_row_group(row_group, columns=columns)
        except (pa.ArrowException, OSError) as e:
            raise IntegrityError(
                f"cannot read {self.path / relpath} (row group {row_group}, columns {columns}): {e}. "
                "The shard is corrupt; re-download or re-copy the release, then run `lymphatlas verify`"
            ) from e

    def _shard_index(self, relpath: str) -> dict[str, int]:
        """case_id -> row group of one shard (read once per shard; only its case_id column)."""
        index = self._shard_rows.get(relpath)
        if index is not None:
            return index
        pf = self._parquet(relpath)
        ids = self._read(relpath, None, ["case_id"]).column("case_id").to_pylist()
        counts = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
        if len(counts) != len(ids) or any(n != 1 for n in counts):
            raise SchemaError(
                f"{self.path / relpath}: {len(ids)} rows in {len(counts)} row groups; a LymphAtlas shard holds "
                "one case per row group. It was not written by the LymphAtlas builder"
            )
        index = {case_id: i for i, case_id in enumerate(ids)}
        if len(index) != len(ids):
            raise SchemaError(f"{self.path / relpath} holds a case twice")
        self._shard_rows[relpath] = index
        return index

    def case_ids(self, config: Config | str = Config.ALL, split: Split | str = Split.TRAIN) -> list[str]:
        """Case ids of a config and split, in shard order. Reads (and verifies) only those shards."""
        return [c for relpath in self.shards(config, split) for c in self._shard_index(relpath)]

    def locate(self, case_id: str) -> CaseLocation:
        """Where a case is stored; :class:`SchemaError` naming the release when it is not there."""
        entry = self.splits["cases"].get(case_id)
        if entry is None:
            raise SchemaError(f"case {case_id!r} is not in release {self.version} at {self.path}")
        try:
            diagnosis, split = Diagnosis(entry["diagnosis"]), Split(entry["split"])
        except (KeyError, ValueError) as e:
            raise SchemaError(f"{SPLITS_NAME} entry of case {case_id} is malformed ({entry!r})") from e
        for relpath in self.shards(diagnosis.config, split):
            row_group = self._shard_index(relpath).get(case_id)
            if row_group is not None:
                return CaseLocation(case_id, relpath, row_group, diagnosis, split)
        raise SchemaError(
            f"case {case_id} is in {SPLITS_NAME} ({diagnosis.value}, {split.value}) but in none of its shards; "
            "the release is inconsistent: re-download it"
        )

    def cases_table(self, config: Config | str = Config.ALL, split: Split | str | None = None) -> pa.Table:
        """The metadata columns (``schema.METADATA_COLUMNS``, no images) of a config, one row per case.

        ``split=None`` gives both splits. Only the metadata columns are read, not the volumes.

        Example:
            >>> Release("lymphatlas").cases_table("hl").column("case_id").to_pylist()  # doctest: +SKIP
            ['LA-...', ...]
        """
        splits = list(Split) if split is None else [_as_split(split)]
        tables = [self._read(p, None, list(METADATA_COLUMNS)) for s in splits for p in self.shards(config, s)]
        if not tables:
            return pa.table({name: pa.array([], type=pa.string()) for name in METADATA_COLUMNS})
        return pa.concat_tables(tables)

    # ------------------------------------------------------------------ folds

    def fold_case_ids(
        self, fold: int, subset: Subset | str, *, config: Config | str = Config.ALL
    ) -> list[str]:
        """Case ids of the train or val subset of cross-validation fold ``fold`` (from ``splits.json``).

        ``val`` is the train-split cases placed in ``fold``; ``train`` is every other train-split
        case. Patients are grouped by construction of the split table, so a subject never falls on
        both sides. The order is the shard order of the train split.

        Example:
            >>> Release("lymphatlas").fold_case_ids(0, "val", config="nhl")  # doctest: +SKIP
            ['LA-...', ...]
        """
        n_folds = int(self.splits.get("n_folds", N_FOLDS))
        if not isinstance(fold, (int, np.integer)) or not 0 <= int(fold) < n_folds:
            raise SchemaError(f"fold must be an integer in 0..{n_folds - 1}, got {fold!r}")
        try:
            subset = Subset(subset.value if isinstance(subset, Subset) else str(subset).lower())
        except ValueError as e:
            raise SchemaError(f"unknown subset {subset!r}; expected 'train' or 'val'") from e
        table = self.splits["cases"]
        out = []
        for case_id in self.case_ids(config, Split.TRAIN):
            entry = table.get(case_id)
            if entry is None:
                raise SchemaError(f"case {case_id} is in the train shards but not in {SPLITS_NAME}; the release is inconsistent")
            in_fold = int(entry["fold"]) == int(fold)
            if in_fold == (subset is Subset.VAL):
                out.append(case_id)
        return out

    # ------------------------------------------------------------------ cases

    def read_meta(self, case_id: str) -> dict[str, Any]:
        """The metadata columns of one case (no volume is read)."""
        loc = self.locate(case_id)
        return self._read(loc.shard, loc.row_group, list(METADATA_COLUMNS)).to_pylist()[0]

    def read_volume_table(self, case_id: str, name: str) -> pa.Table:
        """The raw one-row table of one Nifti column of a case (the cell bytes stay in arrow memory).

        For readers that want to view voxels in place (``codec.decode_volume(buffer, copy=False)``)
        while keeping the table alive; most code wants :meth:`read_volume`.
        """
        if name not in IMAGE_COLUMNS:
            raise SchemaError(f"unknown volume {name!r}; expected one of {IMAGE_COLUMNS}")
        loc = self.locate(case_id)
        return self._read(loc.shard, loc.row_group, [name])

    def read_volume(self, case_id: str, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(array_zyx, affine_ras)`` of one volume (``ct``, ``pet`` or ``label``) of a case."""
        table = self.read_volume_table(case_id, name)
        return codec.decode_volume(codec.cell_bytes(table, name, where=f"case {case_id}"), copy=True,
                                   where=f"case {case_id} {name}")

    def read_case(
        self, case_id: str, *, columns: Iterable[str] = IMAGE_COLUMNS, check_content: bool = False
    ) -> CaseRecord:
        """Decode one case. ``check_content=True`` also compares its voxels with the manifest's content hash.

        Example:
            >>> case = Release("lymphatlas").read_case("LA-0000000")  # doctest: +SKIP
            >>> case.ct.dtype, case.label.max()  # doctest: +SKIP
            (dtype('int16'), 1)
        """
        columns = list(columns)
        if check_content and set(columns) != set(IMAGE_COLUMNS):
            raise SchemaError("check_content=True needs every volume (columns=ct, pet, label)")
        meta = self.read_meta(case_id)
        volumes: dict[str, np.ndarray | None] = dict.fromkeys(IMAGE_COLUMNS)
        affine = np.asarray(meta["affine"], dtype=np.float64).reshape(4, 4)
        for name in columns:
            volumes[name], affine = self.read_volume(case_id, name)
        record = CaseRecord(case_id, meta, volumes["ct"], volumes["pet"], volumes["label"], affine)
        if check_content:
            self.check_content(record)
        return record

    def check_content(self, record: CaseRecord) -> None:
        """Raise :class:`IntegrityError` if a decoded case does not hash to the manifest's content hash."""
        expected = self.manifest["cases"].get(record.case_id)
        if expected is None:
            raise IntegrityError(f"case {record.case_id} has no content hash in the manifest of release {self.version}")
        found = manifest_mod.content_hash(record.ct, record.pet, record.label, record.affine)
        if found != expected:
            raise IntegrityError(
                f"case {record.case_id} decoded from {self.locate(record.case_id).shard} does not match its content hash "
                f"in the manifest of release {self.version}: the shard is corrupt. Re-download the release, then run `lymphatlas verify`"
            )

    def iter_cases(
        self,
        config: Config | str = Config.ALL,
        split: Split | str = Split.TRAIN,
        *,
        case_ids: Iterable[str] | None = None,
        check_content: bool = False,
    ) -> Iterator[CaseRecord]:
        """Yield the decoded cases of a config and split (or the given ``case_ids``), one at a time.

        Example:
            >>> for case in Release("lymphatlas").iter_cases("nhl", "train"):  # doctest: +SKIP
            ...     print(case.case_id, case.ct.shape)
        """
        ids = self.case_ids(config, split) if case_ids is None else list(case_ids)
        for case_id in ids:
            yield self.read_case(case_id, check_content=check_content)


def summarize(release: Release) -> dict[str, Any]:
    """Counts and statistics of a release, per config and split (what ``lymphatlas info`` prints).

    Reads only the metadata columns of the shards; every figure comes from
    :func:`lymphatlas_ds.statistics.aggregate`, the function the dataset card uses too. Returns a
    JSON-able dict::

        {"version", "schema_version", "builder_version", "n_cases", "n_subjects", "n_folds",
         "release": aggregate(all cases)   # the card's figures
         "configs": {config: {split: {"cases", "subjects", "sex": {F: n, ...} (patients), "folds": {k: n},
                                      "lesion_count": {min, median, mean, max, total}, "tmtv_ml": {...},
                                      "suv_max": {...}}}}}

    Example:
        >>> summarize(Release("lymphatlas"))["configs"]["nhl"]["test"]["cases"]  # doctest: +SKIP
        24
    """
    from lymphatlas_ds.statistics import aggregate

    manifest = release.manifest
    all_rows = release.cases_table(Config.ALL).to_pylist()
    whole = aggregate(all_rows)
    out: dict[str, Any] = {
        "version": release.version,
        "schema_version": manifest.get("schema_version"),
        "builder_version": manifest.get("builder_version"),
        "n_folds": int(release.splits.get("n_folds", N_FOLDS)),
        "n_cases": whole["cases"],
        "n_subjects": whole["patients"],
        "release": whole,
        "configs": {},
    }
    for config in Config:
        wanted = {d.value for d in _diagnoses(config)}
        per_split = {}
        for split in Split:
            a = aggregate(r for r in all_rows if r["diagnosis"] in wanted and r["split"] == split.value)
            per_split[split.value] = {
                "cases": a["cases"],
                "subjects": a["patients"],
                "sex": a["sex"],
                "folds": a["cases_by_fold"] if split is Split.TRAIN else {},
                **{k: a[k] for k in ("lesion_count", "tmtv_ml", "suv_max")},
            }
        out["configs"][config.value] = per_split
    return out
