"""A local decoded cache of release cases: chunked, compressed volumes a patch reads piecewise.

A release shard stores each volume as one NIfTI blob, so reading any voxel means reading and
decoding the whole volume. For training, each case is decoded once into this cache: one blosc2
``NDArray`` file per volume (``ct``, ``pet``, ``label``), cut into 3-D chunks and compressed, so
reading a 128^3 patch decompresses only the chunks (and blocks inside them) that it touches and a
whole-case read decompresses with several threads. Beside them, ``case.json`` (geometry, metadata)
and ``foreground.npy`` (a seeded sample of foreground voxel positions for patch sampling, as
nnU-Net keeps its ``class_locations``).

Layout: ``<cache>/<version>/<case_id>-<content hash[:16]>/``. The key holds the release version
and the case's content hash from ``manifest.json``, so a case whose content changes gets a new
entry and a stale one is never read; :meth:`DecodedCache.prune` removes entries no release uses.

Safety: an entry is built in a temporary folder (``.<entry>.<random>.partial``) and renamed into
place (a rename is atomic), so a reader never sees half an entry; a file lock per entry makes
concurrent DataLoader workers or processes wait for the one that builds it instead of decoding the
same case twice. The decoded voxels are checked against the manifest's content hash before the
entry is published. Each entry's ``case.json`` records a checksum of each of its files and of its own
content (geometry, metadata: ``info_checksum``) (xxh3-128,
a non-cryptographic hash at ~10 GB/s: it guards against corruption such as a flipped bit on disk,
not against tampering), verified whenever the entry is opened (the torch loader: once per case
per dataset, its DataLoader workers share the record); an entry that fails it is rebuilt
(``benchmarks/bench_cache.py`` measures what the check costs). ``.partial`` folders left by a
killed build are removed on a cache's first use of the version, by the next build of that entry
and by :meth:`DecodedCache.prune` (never one being built: its entry lock is held). Errors
name the file and the cause (a full disk, a permission) and what to do.

The cache folder is ``$LYMPHATLAS_CACHE``, else ``$XDG_CACHE_HOME/lymphatlas``, else
``~/.cache/lymphatlas`` (:func:`default_cache_dir`; the only place the client reads that variable).

Example:
    >>> from lymphatlas_ds.reader import Release
    >>> cache = DecodedCache(tmp_path / "cache")  # doctest: +SKIP
    >>> entry = cache.ensure(Release("lymphatlas"), "LA-0000000")  # doctest: +SKIP
    >>> entry.read_patch("ct", (slice(0, 64), slice(0, 64), slice(0, 64))).shape  # doctest: +SKIP
    (64, 64, 64)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from lymphatlas_ds import codec
from lymphatlas_ds._io import CACHE_ENV, default_cache_dir  # noqa: F401 - CACHE_ENV: its earlier home
from lymphatlas_ds.errors import IntegrityError, LymphAtlasError, SchemaError
from lymphatlas_ds.schema import CT_DTYPE, IMAGE_COLUMNS, LABEL_DTYPE, PET_DTYPE

if TYPE_CHECKING:
    from lymphatlas_ds.reader import Release

log = logging.getLogger(__name__)

CACHE_FORMAT = 3
"""Bumped when the entry layout changes; entries of another format are rebuilt."""

CHUNKS = (64, 64, 64)
"""Chunk shape ``[z, y, x]``: a 128^3 patch touches at most 3x3x3 chunks (benchmarks/bench_loader.py)."""
BLOCKS = (16, 16, 16)
"""Block shape inside a chunk: the unit blosc2 decompresses when only part of a chunk is read. A 128^3 patch
at a random voxel decodes 1.4x its voxels in 16^3 blocks against 1.8x in 16 x 32 x 32 blocks: a PET patch
took 12 % less CPU time to decompress (6.0 against 6.8 ms, one thread, best of 4; entries written with the older
blocks are read as they are). Reading through a memory map (``mmap_mode="r"``, as nnU-Net does) saved another
15 % but counts every page of the cache a process has touched in its RSS (0.89 GB against 0.47 GB for 3 cases)."""
CODEC = "LZ4HC"
CLEVEL = 5
"""blosc2 codec and level. LZ4HC writes the LZ4 format with longer matches, so the same decoder has less to do:
on 3 full-size train cases a 128^3 PET patch decompresses in 0.63x LZ4 level 5's time (3.6 against 5.7 ms, one
thread), CT in 0.87x, for 0.93x / 0.98x the bytes; compressing costs ~2 s more CPU per case, once
(``benchmarks/bench_cache_codec.py``). ZSTD level 1 is 0.90x the bytes but 1.6x LZ4's patch time. Entries
written with another codec are read as they are (blosc2 records the codec per chunk)."""
MAX_FOREGROUND_SAMPLES = 10_000
"""Foreground positions kept per case, as nnU-Net keeps at most 10,000 per class."""

_DTYPES = {"ct": CT_DTYPE, "pet": PET_DTYPE, "label": LABEL_DTYPE}

_forked = False


def _mark_forked() -> None:
    global _forked
    _forked = True


# blosc2's worker threads do not survive fork(): a forked child (a DataLoader worker on Linux)
# that decompresses with more than one thread waits forever. Such children use one thread each,
# which is also what parallel workers want.
if hasattr(os, "register_at_fork"):  # POSIX only; elsewhere workers are spawned, not forked
    os.register_at_fork(after_in_child=_mark_forked)


def _nthreads() -> int:
    import blosc2

    if _forked:
        return 1
    try:
        from torch.utils.data import get_worker_info

        if get_worker_info() is not None:
            return 1
    except ImportError:
        pass
    return int(blosc2.nthreads)
_ENTRY_JSON = "case.json"
_FOREGROUND = "foreground.npy"
_PARTIAL = ".partial"
CHECKSUM = "xxh3_128"
"""Checksum of the entry files (xxhash's XXH3, 128 bits; ``xxhash``, a declared dependency)."""
_READ_BLOCK = 8 * 1024 * 1024


def file_checksum(path: str | Path) -> str:
    """The :data:`CHECKSUM` of a file's bytes, as hex.

    Example:
        >>> len(file_checksum(__file__))
        32
    """
    import xxhash

    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(_READ_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _info_checksum(info: dict[str, Any]) -> str:
    """The :data:`CHECKSUM` of an entry's ``case.json`` content (its geometry and metadata), itself left out."""
    import xxhash

    body = {k: v for k, v in info.items() if k != "info_checksum"}
    return xxhash.xxh3_128(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


def write_volume(
    array: np.ndarray, target: Path, *, chunks: tuple[int, ...] = CHUNKS, blocks: tuple[int, ...] = BLOCKS,
    codec: str = CODEC, clevel: int = CLEVEL, nthreads: int = 1,
) -> None:
    """Write ``array`` to ``target`` as the cache stores a volume: a blosc2 array in ``chunks`` of ``blocks``
    (each cut to the array), byte-shuffled, compressed with ``codec`` at ``clevel``
    (``benchmarks/bench_cache_codec.py`` writes its candidates through this too)."""
    import blosc2

    chunks = tuple(min(c, s) for c, s in zip(chunks, array.shape))
    blocks = tuple(min(b, c) for b, c in zip(blocks, chunks))
    cparams = blosc2.CParams(codec=blosc2.Codec[codec], clevel=clevel, filters=[blosc2.Filter.SHUFFLE], nthreads=nthreads)
    blosc2.asarray(np.ascontiguousarray(array), urlpath=str(target), mode="w", chunks=chunks, blocks=blocks,
                   cparams=cparams)


def _write_error(path: Path, case_id: str, error: BaseException) -> CacheError:
    """A CacheError naming the file, the cause (with the free space when the disk is nearly full) and the fix."""
    cause = (error.strerror or str(error)) if isinstance(error, OSError) else str(error)
    try:
        free = shutil.disk_usage(path.parent if path.parent.exists() else path.parent.parent).free
    except OSError:
        free = None
    if free is not None and free < 64 * 1024 * 1024:
        cause += f" (the disk holding it is full: {free / 2**20:.1f} MiB free)"
    return CacheError(
        f"cannot write the decoded cache file {path} of case {case_id}: {cause}. Free disk space there, or point "
        "the cache elsewhere (cache_dir=... or the LYMPHATLAS_CACHE variable); nothing half-written is kept"
    )


def _remove_partials(version_dir: Path) -> list[Path]:
    """Delete the ``.partial`` folders of interrupted builds under ``version_dir``; not one being built
    now (its entry lock is held by a live process). Returns the removed folders."""
    from filelock import FileLock, Timeout

    removed = []
    for partial in sorted(version_dir.glob(f".*{_PARTIAL}")):
        entry_name = partial.name[1 : -len(_PARTIAL)].rsplit(".", 1)[0]
        try:
            with FileLock(str(version_dir / ".locks" / f"{entry_name}.lock"), timeout=0):
                shutil.rmtree(partial, ignore_errors=True)
                removed.append(partial)
        except (Timeout, OSError):  # being built now (or no lock can be taken): leave it
            continue
    if removed:
        log.info("removed %d folder(s) left by interrupted cache builds in %s", len(removed), version_dir)
    return removed


class CacheError(LymphAtlasError):
    """The decoded cache cannot be written or an entry is unreadable."""


@dataclass
class CachedCase:
    """One case in the decoded cache: geometry, metadata and lazily opened chunked volumes.

    ``shape`` is ``(z, y, x)``; ``affine`` the RAS 4x4; ``meta`` the release's metadata row.
    Reads return new numpy arrays (never views of the cache files).
    """

    case_id: str
    path: Path
    shape: tuple[int, int, int]
    affine: np.ndarray
    meta: dict[str, Any]
    foreground_count: int

    def __post_init__(self) -> None:
        self._arrays: dict[str, Any] = {}
        self._pid = os.getpid()
        self._foreground: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        # blosc2 handles are per process: a DataLoader worker reopens them.
        state = self.__dict__.copy()
        state["_arrays"] = {}
        return state

    def _array(self, name: str) -> Any:
        import blosc2

        if name not in _DTYPES:
            raise SchemaError(f"unknown volume {name!r}; expected one of {IMAGE_COLUMNS}")
        if self._pid != os.getpid():  # handles opened before a fork: reopen with this process's threads
            self._arrays, self._pid = {}, os.getpid()
        array = self._arrays.get(name)
        if array is None:
            file = self.path / f"{name}.b2nd"
            try:
                array = blosc2.open(str(file), mode="r", dparams=blosc2.DParams(nthreads=_nthreads()))
            except Exception as e:  # blosc2 raises RuntimeError / ValueError for bad files
                raise CacheError(
                    f"decoded cache file {file} of case {self.case_id} is unreadable ({e}); "
                    f"delete {self.path} and it is rebuilt on next use"
                ) from e
            self._arrays[name] = array
        return array

    def read(self, name: str) -> np.ndarray:
        """The whole volume ``name`` (``ct``, ``pet`` or ``label``) as a numpy ``[z, y, x]`` array."""
        return self.read_patch(name, (slice(None),) * 3)

    def read_patch(self, name: str, box: tuple[slice, slice, slice]) -> np.ndarray:
        """The voxels of ``name`` inside ``box`` (three slices within the volume, step 1): only the chunks it touches are read."""
        array = self._array(name)
        try:
            out = np.asarray(array[box])
        except Exception as e:  # a damaged chunk: blosc2 raises RuntimeError / ValueError
            raise CacheError(
                f"decoded cache file {self.path / (name + '.b2nd')} of case {self.case_id} is damaged ({e}); "
                f"delete {self.path} and it is rebuilt on next use"
            ) from e
        if out.dtype != np.dtype(_DTYPES[name]):
            raise CacheError(f"decoded cache file {self.path / (name + '.b2nd')} holds {out.dtype}, expected {_DTYPES[name]}")
        return out

    def read_into(self, name: str, box: tuple[slice, slice, slice], out: np.ndarray) -> np.ndarray:
        """Decompress the voxels of ``name`` inside ``box`` straight into ``out`` (C-contiguous, same dtype).

        Saves the copy that :meth:`read_patch` followed by an assignment would make; the loader
        decompresses PET into its slot of the image tensor this way.
        """
        array = self._array(name)
        start = tuple(0 if s.start is None else int(s.start) for s in box)
        stop = tuple(n if s.stop is None else int(s.stop) for s, n in zip(box, self.shape))
        shape = tuple(b - a for a, b in zip(start, stop))
        if out.dtype != np.dtype(_DTYPES[name]) or out.shape != shape or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous {_DTYPES[name]} array of shape {shape}, got {out.dtype} {out.shape}")
        get_slice = getattr(array, "get_slice_numpy", None)
        if get_slice is None:  # a blosc2 without the in-place reader
            out[...] = self.read_patch(name, box)
            return out
        try:
            get_slice(out, (start, stop))
        except Exception as e:  # a damaged chunk
            raise CacheError(
                f"decoded cache file {self.path / (name + '.b2nd')} of case {self.case_id} is damaged ({e}); "
                f"delete {self.path} and it is rebuilt on next use"
            ) from e
        return out

    def foreground(self) -> np.ndarray:
        """A seeded sample (at most ``MAX_FOREGROUND_SAMPLES``) of foreground voxel indices, int32 ``[n, 3]`` (z, y, x)."""
        if self._foreground is None:
            self._foreground = np.load(self.path / _FOREGROUND)
        return self._foreground


def _entry_name(case_id: str, content_hash: str) -> str:
    return f"{case_id}-{content_hash[:16]}"


def _safe_version(version: str) -> str:
    if not version or any(c in version for c in "/\\") or version.startswith("."):
        raise SchemaError(f"release version {version!r} cannot name a cache folder")
    return version


class _ContentHasher:
    """Incremental form of :func:`lymphatlas_ds.manifest.content_hash`, fed one volume at a time.

    ``manifest.content_hash(ct, pet, label, affine)`` hashes the little-endian C-order bytes of
    the three volumes then of the affine; feeding them here in that order gives the same digest
    without holding the three volumes at once (tests check both agree).
    """

    ORDER = ("ct", "pet", "label")

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._next = 0

    def update(self, name: str, array: np.ndarray) -> None:
        if self.ORDER[self._next] != name:
            raise RuntimeError(f"volumes must be hashed in the order {self.ORDER}")
        self._next += 1
        dtype = np.dtype(_DTYPES[name]).newbyteorder("<")
        self._digest.update(np.ascontiguousarray(array, dtype=dtype).data)

    def hexdigest(self, affine: np.ndarray) -> str:
        self._digest.update(np.ascontiguousarray(affine, dtype=np.dtype("float64").newbyteorder("<")).tobytes())
        return self._digest.hexdigest()


def _decode_volume(release: Release, case_id: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """One volume of a case and its affine, checked against the schema's dtype.

    The array views the NIfTI bytes in place in arrow's buffer (no copy): drop it to free them.
    """
    table = release.read_volume_table(case_id, name)
    buffer = codec.cell_bytes(table, name, where=f"case {case_id}")
    array, affine = codec.decode_volume(buffer, copy=False, where=f"case {case_id} {name}")
    if array.dtype != np.dtype(_DTYPES[name]):
        raise SchemaError(
            f"case {case_id}: {name} is {array.dtype}, the schema says {_DTYPES[name]}; "
            "the release was not written by a matching builder"
        )
    return array, affine


def _publish(tmp: Path, path: Path, info: dict[str, Any], case_id: str) -> None:
    """Write ``case.json`` last (an entry without it is never opened), then rename the built folder into place."""
    try:
        with open(tmp / _ENTRY_JSON, "w") as f:
            f.write(json.dumps(info, sort_keys=True))
        # Under the entry's lock nobody else publishes it; the check guards a process without the lock.
        if path.exists():
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, path)
    except OSError as e:
        raise _write_error(path / _ENTRY_JSON, case_id, e) from e


class DecodedCache:
    """The decoded cache under ``root`` (default :func:`default_cache_dir`).

    Example:
        >>> cache = DecodedCache(tmp_path / "cache")  # doctest: +SKIP
        >>> cache.ensure(release, case_id).shape  # doctest: +SKIP
        (300, 512, 512)
    """

    def __init__(
        self,
        root: str | Path | None = None,
        *,
        chunks: tuple[int, int, int] = CHUNKS,
        blocks: tuple[int, int, int] = BLOCKS,
        clevel: int = CLEVEL,
        foreground_seed: int = 0,
    ) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        self.chunks = tuple(chunks)
        self.blocks = tuple(blocks)
        self.clevel = clevel
        self.foreground_seed = foreground_seed
        self._swept: set[str] = set()  # version folders cleared of interrupted builds by this object

    def __repr__(self) -> str:
        return f"DecodedCache({str(self.root)!r})"

    def entry_path(self, version: str, case_id: str, content_hash: str) -> Path:
        """The folder of one case's entry (it may not exist yet)."""
        return self.root / _safe_version(version) / _entry_name(case_id, content_hash)

    def open(self, version: str, case_id: str, content_hash: str) -> CachedCase | None:
        """The entry of a case if it is complete and of this cache format, else ``None``."""
        return self._load(self.entry_path(version, case_id, content_hash))

    @staticmethod
    def _load(path: Path, *, verify: bool = True) -> CachedCase | None:
        """The entry at ``path``, or ``None`` when it is absent, of another format or (``verify``)
        fails its checksums (logged with the file that differs)."""
        try:
            info = json.loads((path / _ENTRY_JSON).read_text())
        except (OSError, ValueError):
            return None
        if info.get("format") != CACHE_FORMAT:
            return None
        if verify:
            if info.get("info_checksum") != _info_checksum(info):  # the affine, shape and metadata served
                log.warning("decoded cache file %s does not match its checksum (%s, recorded %s): it is corrupt "
                            "and is rebuilt", path / _ENTRY_JSON, CHECKSUM, info.get("info_checksum"))
                return None
            checksums = info.get("checksums") or {}
            for name in (*(f"{n}.b2nd" for n in IMAGE_COLUMNS), _FOREGROUND):
                try:
                    found = file_checksum(path / name)
                except OSError as e:
                    log.warning("decoded cache entry %s: cannot read %s (%s); it is rebuilt", path, name, e.strerror or e)
                    return None
                if found != checksums.get(name):
                    log.warning("decoded cache file %s does not match its checksum (%s %s, recorded %s): it is "
                                "corrupt and is rebuilt", path / name, CHECKSUM, found, checksums.get(name))
                    return None
        return CachedCase(
            case_id=info["case_id"],
            path=path,
            shape=tuple(info["shape_zyx"]),
            affine=np.asarray(info["affine_ras"], dtype=np.float64),
            meta=info["meta"],
            foreground_count=int(info["foreground_count"]),
        )

    def ensure(self, release: Release, case_id: str, *, verified: bool = False) -> CachedCase:
        """The entry of ``case_id`` of ``release``, decoding the case into the cache first if needed.

        Safe to call from several threads, DataLoader workers or processes at once: one builds,
        the others wait on the entry's file lock and then open it. ``verified=True``: another
        process of the same run (the main process or a sibling DataLoader worker) has just
        checked this entry's checksums, so they are not read again here (a missing or
        other-format entry is still rebuilt).
        """
        from filelock import FileLock

        version = release.version
        content_hash = release.manifest["cases"].get(case_id)
        if content_hash is None:
            raise IntegrityError(
                f"case {case_id} has no content hash in the manifest of release {version} at {release.path}; "
                "the release is incomplete: re-download it"
            )
        path = self.entry_path(version, case_id, content_hash)
        if version not in self._swept and path.parent.is_dir():  # the first use: a killed build's leftovers
            self._swept.add(version)
            _remove_partials(path.parent)
        entry = self._load(path, verify=not verified)
        if entry is not None:
            return entry
        locks = path.parent / ".locks"
        try:
            locks.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(locks / f"{path.name}.lock"))
            lock.acquire()
        except OSError as e:
            raise CacheError(
                f"cannot create the decoded cache folder or lock {locks} ({e.strerror or e}); free disk space there "
                "or point the cache elsewhere (cache_dir=... or the LYMPHATLAS_CACHE variable)"
            ) from e
        try:
            entry = self._load(path)  # built by another worker while this one waited
            if entry is not None:
                return entry
            # Under the entry's lock nobody builds it: a .partial folder of it was left by a killed build.
            for leftover in path.parent.glob(f".{path.name}.*{_PARTIAL}"):
                log.info("removing %s, left by an interrupted cache build", leftover)
                shutil.rmtree(leftover, ignore_errors=True)
            if path.exists():  # an entry of another cache format, or a corrupt one
                shutil.rmtree(path)
            self._build(release, case_id, content_hash, path)
        finally:
            lock.release()
        entry = self._load(path)
        if entry is None:
            raise CacheError(f"decoded cache entry {path} of case {case_id} could not be read back after building it")
        return entry

    def _build(self, release: Release, case_id: str, content_hash: str, path: Path) -> None:
        """Decode a case into a ``.partial`` folder, check it against its content hash, and rename it into place."""
        log.info("decoding case %s of release %s into the cache %s", case_id, release.version, path)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=_PARTIAL, dir=path.parent))
        except OSError as e:
            raise _write_error(path, case_id, e) from e
        try:
            shape, affine, foreground, count = self._write_volumes(release, case_id, content_hash, tmp, path)
            try:
                np.save(tmp / _FOREGROUND, foreground)
            except OSError as e:
                raise _write_error(path / _FOREGROUND, case_id, e) from e
            meta = release.read_meta(case_id)
            info = {
                "format": CACHE_FORMAT,
                "case_id": case_id,
                "version": release.version,
                "content_hash": content_hash,
                "shape_zyx": list(shape),
                "affine_ras": np.asarray(affine).tolist(),
                "foreground_count": count,
                "meta": meta,
                "checksum": CHECKSUM,
                "checksums": {f.name: file_checksum(f) for f in sorted(tmp.iterdir())},
            }
            info["info_checksum"] = _info_checksum(info)
            _publish(tmp, path, info, case_id)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _write_volumes(
        self, release: Release, case_id: str, content_hash: str, tmp: Path, path: Path
    ) -> tuple[tuple[int, ...], np.ndarray, np.ndarray, int]:
        """Decode, hash and compress the volumes one at a time into ``tmp``; raise unless they match the content hash.

        Returns the grid's shape and affine, the foreground sample and the foreground voxel count.
        """
        hasher = _ContentHasher()
        affine = None
        shape = None
        foreground = np.zeros((0, 3), np.int32)
        count = 0
        for name in _ContentHasher.ORDER:
            array, vol_affine = _decode_volume(release, case_id, name)
            if shape is None:
                shape, affine = array.shape, vol_affine
            elif array.shape != shape or not np.allclose(vol_affine, affine):
                raise SchemaError(f"case {case_id}: {name} is not on the CT grid (shape {array.shape} vs {shape})")
            hasher.update(name, array)
            self._compress(array, tmp / f"{name}.b2nd", path, case_id)
            if name == "label":
                foreground, count = self._foreground(array, case_id)
            del array
            # Hand the volume's bytes back now: arrow's pool would otherwise keep them for the next volume.
            pa.default_memory_pool().release_unused()
        assert affine is not None and shape is not None  # noqa: S101 - set in the loop above
        found = hasher.hexdigest(affine)
        if found != content_hash:
            raise IntegrityError(
                f"case {case_id} decoded from {release.locate(case_id).shard} does not match its content hash in "
                f"the manifest of release {release.version}: the shard is corrupt. Re-download the release, "
                "then run `lymphatlas verify`"
            )
        return shape, affine, foreground, count

    def _compress(self, array: np.ndarray, target: Path, path: Path, case_id: str) -> None:
        """Write one volume to ``target`` as a blosc2 array cut into this cache's chunks and blocks."""
        try:
            write_volume(array, target, chunks=self.chunks, blocks=self.blocks, codec=CODEC, clevel=self.clevel,
                         nthreads=_nthreads())
        except (RuntimeError, ValueError, OSError) as e:  # blosc2: "Error while creating the NDArray"
            raise _write_error(path / target.name, case_id, e) from e

    def _foreground(self, label: np.ndarray, case_id: str) -> tuple[np.ndarray, int]:
        positions = np.argwhere(label > 0)
        count = len(positions)
        if count > MAX_FOREGROUND_SAMPLES:
            # Seeded by the case so the sample is the same in every process and on every rebuild.
            seed = int.from_bytes(hashlib.sha256(f"{self.foreground_seed}:{case_id}".encode()).digest()[:8], "little")
            keep = np.sort(np.random.default_rng(seed).choice(count, MAX_FOREGROUND_SAMPLES, replace=False))
            positions = positions[keep]
        return positions.astype(np.int32), count

    def prune(self, keep: dict[str, set[str]] | None = None) -> list[Path]:
        """Delete entries not in ``keep`` (version -> entry folder names); ``None`` deletes every entry.

        Also deletes the ``.partial`` folders of interrupted builds (not one being built now: its
        entry lock is held). Returns the removed folders. Use :meth:`entry_path` names to build ``keep``.
        """
        removed = []
        if not self.root.is_dir():
            return removed
        for version_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if version_dir.name == "verified":
                continue
            removed += _remove_partials(version_dir)
            wanted = (keep or {}).get(version_dir.name, set())
            for entry in sorted(p for p in version_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
                if entry.name not in wanted:
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(entry)
        return removed
