"""``load_lymphatlas()``: a LymphAtlas release as a torch ``Dataset`` of whole cases or random patches.

An item is a dict::

    {"image": float32 [2, Z, Y, X]   channels schema.CHANNELS: CT in HU, PET in SUVbw (no rescaling),
     "label": uint8 [1, Z, Y, X]     schema.LABELS: 0 background, 1 lesion,
     "case_id": str,
     "affine": float64 [4, 4]        RAS, maps (x, y, z, 1) voxel indices of *this* array to mm
                                     (NIfTI's order: index the array as [z, y, x]),
     "spacing_zyx": float64 [3]      mm, in the order of the array axes,
     "meta": dict                    the release's metadata columns but the geometry ones (ids, diagnosis,
                                     sex, age band, lesion statistics...),
     "patch_start": int64 [3]        the array's first voxel in the case, z y x (zeros for a whole case),
     "foreground_centred": bool      whether the patch sampler centred it on a lesion voxel (False for a whole case)}

``instances=True`` adds ``"instances"``: int32 [1, Z, Y, X], the lesion instance map of the label
(:func:`lymphatlas_ds.lesions.label_instances`: 0 background, ``lesion_id`` of the release's
``lesions`` config elsewhere, 26-connected, id 1 the largest; in patch mode the case's ids, cropped).

Every item has these keys (``schema.ITEM_KEYS``), whole case or patch, from ``load_lymphatlas`` or
from :func:`hf_torch` (docs/contracts.md, "Items"). Patches (``patch_size=(z, y, x)``) are drawn as nnU-Net draws
them: a fraction ``foreground_ratio`` (default 0.33, nnU-Net's ``oversample_foreground_percent``)
is centred on a random lesion voxel, the rest lie uniformly in the volume; a patch reaching past
the volume (a volume smaller than the patch) is padded with air (-1024 HU), SUV 0 and background.

Randomness: patch ``i`` of epoch ``e`` is drawn from ``numpy.random.default_rng([seed, e, i])``,
and the random transforms given as ``transform=`` (MONAI ``RandFlipd`` / ``RandAffined`` or a MONAI
``Compose``, TorchIO ``RandomAffine``, a callable taking ``rng=``) draw from
``default_rng([seed, e, i, 1])`` (:mod:`lymphatlas_ds.augment`), whole cases too. An item depends
only on the seed, the epoch and its index, never on which DataLoader worker makes it or in what
order: ``DataLoader(num_workers=k)`` gives the same batches for any ``k``, each epoch new ones, the
same seed the same ones again. Call ``set_epoch`` before each epoch; the epoch lives in shared
memory, so workers, persistent ones included, see it.

Volumes come from the decoded cache (:mod:`lymphatlas_ds.cache`): each case is decoded once,
then a patch reads only the compressed chunks it touches, so a worker never holds a whole decoded
case in patch mode (building an entry holds one volume's bytes; :meth:`prepare` builds them all
up front, in the main process). ``cache=False`` decodes from the shards each time (whole-case mode).

Batches: give the ``DataLoader`` ``collate_fn=collate`` (this module's, :mod:`lymphatlas_ds._batch`): the
dataset's ``__getitems__`` decompresses a batch's patches straight into one ``[N, 2, Z, Y, X]`` tensor and
``collate`` hands it over, instead of ``default_collate`` stacking the items into a new one
(``benchmarks/bench_peers.py`` prints the speed of both). The batch is the same, key for key and
bit for bit; without ``collate_fn`` it is too, only slower. In a worker the batch is written into
shared memory that the worker reuses once the main process has freed the batch.

DataLoader workers: each worker opens its own cache file handles (after fork or spawn, keyed by
process id) and decompresses with one thread (blosc2 and torch set to one thread on its first
item: N workers on N cores, not N x cores threads). An entry's checksums are read once per
dataset: a shared-memory record tells workers, persistent or started anew each epoch, which
entries the main process or a sibling already checked. The dataset imports blosc2 when it is
made, so workers forked from the main process do not import it again each epoch.

Intensity presets (CT window, SUV clip) are transforms (:mod:`lymphatlas_ds.transforms`), never
silent defaults.

Example:
    >>> from lymphatlas_ds import load_lymphatlas
    >>> train = load_lymphatlas("org/lymphatlas", config="nhl", split="train", fold=0, subset="train",
    ...                         version="1.0.0", patch_size=(128, 128, 128), samples_per_case=4)  # doctest: +SKIP
    >>> from lymphatlas_ds.loader import collate
    >>> loader = torch.utils.data.DataLoader(train, batch_size=2, shuffle=True, num_workers=2,
    ...                                      persistent_workers=True, collate_fn=collate)  # doctest: +SKIP
    >>> train.set_epoch(0)  # doctest: +SKIP
    >>> batch = next(iter(loader))  # doctest: +SKIP
    >>> batch["image"].shape  # doctest: +SKIP
    torch.Size([2, 2, 128, 128, 128])
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

try:
    import torch
except ModuleNotFoundError as e:  # the client's torch extra is not installed: one line that says what to install
    from lymphatlas_ds._optional import missing

    raise missing(e.name or "torch", "load_lymphatlas / hf_torch (lymphatlas_ds.loader)") from e
from torch.utils.data import Dataset, default_collate  # noqa: E402 - after the check above

from lymphatlas_ds import codec
from lymphatlas_ds._batch import BATCHED_KEYS, Batch, batch_array, collate, small_collate  # noqa: F401 - collate: public here
from lymphatlas_ds.augment import AUGMENT_STREAM, apply_seeded, item_rng
from lymphatlas_ds.cache import CachedCase, DecodedCache
from lymphatlas_ds.errors import SchemaError, SelectionError
from lymphatlas_ds.reader import Release, _as_config, _as_split
from lymphatlas_ds.schema import (
    CHANNELS,
    CT_DTYPE,
    IMAGE_COLUMNS,
    ITEM_KEYS,
    LABEL_DTYPE,
    METADATA_COLUMNS,
    N_FOLDS,
    PET_DTYPE,
    Config,
    Split,
    Subset,
)

log = logging.getLogger(__name__)

Item = dict[str, Any]
Transform = Callable[[Item], Item]

DEFAULT_FOREGROUND_RATIO = 1 / 3
"""nnU-Net's ``oversample_foreground_percent`` (0.33)."""
PAD_VALUES = {"ct": -1024, "pet": 0.0, "label": 0}
"""Values of voxels a patch reaches outside the volume: air, no uptake, background."""

_DTYPES = {"ct": CT_DTYPE, "pet": PET_DTYPE, "label": LABEL_DTYPE}
_GEOMETRY_COLUMNS = ("spacing_xyz", "shape_xyz", "affine")  # returned as tensors, not in "meta"


def _meta(row: dict[str, Any]) -> dict[str, Any]:
    """Metadata for an item: the scalar columns, with missing values made collatable."""
    out: dict[str, Any] = {}
    for name, kind in METADATA_COLUMNS.items():
        if name in _GEOMETRY_COLUMNS:
            continue
        value = row.get(name)
        if value is None:
            # default_collate refuses None: a missing string is "", a missing number NaN.
            value = "" if kind == "string" else math.nan
        out[name] = value
    return out


def _patch_size(value: Any) -> tuple[int, int, int]:
    """``128`` -> ``(128, 128, 128)``; a sequence of three positive voxel counts (z, y, x) as it is."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (value,) * 3
    try:
        patch = tuple(int(p) for p in value)
        ok = len(patch) == 3 and all(p == q for p, q in zip(patch, value)) and min(patch) >= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise SchemaError(
            f"patch_size must be a positive voxel count (128 -> a 128^3 cube) or three of them (z, y, x), "
            f"got {value!r}"
        )
    return patch  # type: ignore[return-value]


def _whole_case_keys() -> dict[str, Any]:
    """``patch_start`` and ``foreground_centred`` of an item that is a whole case."""
    return {"patch_start": torch.zeros(3, dtype=torch.int64), "foreground_centred": False}


def _draw_start(
    shape: Sequence[int], patch: Sequence[int], foreground_ratio: float, foreground_count: int,
    foreground: Callable[[], np.ndarray], rng: np.random.Generator,
) -> tuple[np.ndarray, bool]:
    """The first voxel (z, y, x) of a random patch, and whether it is centred on a lesion voxel (nnU-Net's rule).

    ``foreground()`` gives lesion voxel indices ``[n, 3]`` (called only when a centred patch is drawn).
    """
    shape_a, patch_a = np.asarray(shape), np.asarray(patch)
    room = np.maximum(shape_a - patch_a, 0)
    # Decide first, so the stream of draws does not depend on the case having foreground.
    want_foreground = rng.random() < foreground_ratio
    if want_foreground and foreground_count > 0:
        locations = foreground()
        centre = locations[rng.integers(len(locations))]
        start = np.clip(centre - patch_a // 2, 0, room)
        return start.astype(np.int64), True
    return rng.integers(0, room + 1).astype(np.int64), False


def _spacing_zyx(row: dict[str, Any], affine: np.ndarray) -> torch.Tensor:
    """Voxel size in array order (z, y, x): the row's ``spacing_xyz`` reversed, or the affine's column norms."""
    spacing_xyz = row.get("spacing_xyz")
    if spacing_xyz is None:
        spacing_xyz = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return torch.tensor(np.asarray(spacing_xyz, dtype=np.float64)[::-1].copy())


_CT, _PET = CHANNELS.index("CT"), CHANNELS.index("PET")


def _image(ct: np.ndarray, pet: np.ndarray) -> torch.Tensor:
    image = np.empty((len(CHANNELS), *ct.shape), np.float32)
    image[_CT] = ct
    image[_PET] = pet
    return torch.from_numpy(image)


def _read_image_into(entry: CachedCase, box: tuple[slice, slice, slice], image: np.ndarray) -> np.ndarray:
    """Decompress CT and PET of ``box`` into ``image`` (float32 ``[2, ...]``, C-contiguous): PET in place, CT
    (int16) into a scratch array converted into its channel by one ``np.copyto`` (no float intermediate)."""
    entry.read_into("pet", box, image[_PET])
    ct = np.empty(image.shape[1:], _DTYPES["ct"])
    np.copyto(image[_CT], entry.read_into("ct", box, ct), casting="safe")
    return image


def _cached_image(entry: CachedCase, box: tuple[slice, slice, slice], shape: tuple[int, ...]) -> torch.Tensor:
    """CT and PET of ``box`` as one float32 ``[2, ...]`` tensor, decompressed in place (no extra copy)."""
    return torch.from_numpy(_read_image_into(entry, box, np.empty((len(CHANNELS), *shape), np.float32)))


def _instances(label_zyx: np.ndarray) -> torch.Tensor:
    """int32 [1, Z, Y, X] lesion instance map of a label (torch has no full uint16 support)."""
    from lymphatlas_ds.lesions import label_instances

    ids, _ = label_instances(label_zyx)
    return torch.from_numpy(ids.astype(np.int32))[None]


def _one_thread_per_worker() -> None:
    """In a DataLoader worker, decompress and convert with one thread: the workers are the parallelism.

    torch sets its own intra-op threads to 1 in a worker; blosc2's global thread count is set here
    (the cache also opens a worker's files with one decompression thread).
    """
    if torch.utils.data.get_worker_info() is None:
        return
    import blosc2

    torch.set_num_threads(1)
    blosc2.set_nthreads(1)


def worker_init_fn(worker_id: int) -> None:  # noqa: ARG001 - DataLoader's signature
    """A ``DataLoader(worker_init_fn=...)`` doing what the dataset does on a worker's first item (one thread).

    Not needed with :func:`load_lymphatlas`'s datasets; for a wrapper dataset that reads the cache itself.
    """
    _one_thread_per_worker()


class _Base(Dataset):
    """Shared state: the release, the case list and the decoded cache."""

    def __init__(
        self,
        release: Release,
        case_ids: Sequence[str],
        *,
        transform: Transform | None,
        cache: DecodedCache | None,
        progress: bool = True,
        seed: int = 0,
        instances: bool = False,
    ) -> None:
        self.instances = bool(instances)
        self.release = release
        self.case_ids = list(case_ids)
        self.transform = transform
        self.cache = cache
        self.progress = progress
        self.seed = int(seed)
        self._entries: dict[str, CachedCase] = {}
        self._bar: Any = None  # the first-use bar of this process (never pickled into workers)
        # In shared memory, so DataLoader workers (persistent ones too) see set_epoch() of the main process.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        # Which cases' cache entries some process of this dataset has opened and checked (shared like the epoch):
        # a worker opening one of them skips re-reading its files for the checksums.
        self._position = {case_id: i for i, case_id in enumerate(self.case_ids)}
        self._checked = torch.zeros(max(1, len(self.case_ids)), dtype=torch.bool).share_memory_()
        self._pid = os.getpid()
        if cache is not None:
            # Import the cache's codec here, in the process that makes the DataLoader: forked workers inherit it.
            # Imported on a worker's first item instead, blosc2 (and the httpx it pulls in) cost each worker of
            # each epoch about 0.4 s (20 % of the workers' time in a profile of 60-patch epochs at 128^3).
            import blosc2  # noqa: F401

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Draw the patches and augmentations of epoch ``epoch`` (new ones each epoch, reproducibly); call it
        before iterating."""
        self._epoch.fill_(int(epoch))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_bar"] = None
        return state

    def entry(self, case_id: str) -> CachedCase:
        """The decoded-cache entry of a case (built on first use, with a progress bar over the cases still to decode)."""
        if self.cache is None:
            raise SchemaError("this dataset was made with cache=False; patch mode needs the decoded cache")
        if self._pid != os.getpid():
            self._pid = os.getpid()
            _one_thread_per_worker()
        entry = self._entries.get(case_id)
        if entry is None:
            building = self.progress and not self._cached(case_id)
            position = self._position.get(case_id)
            checked = position is not None and bool(self._checked[position])
            entry = self.cache.ensure(self.release, case_id, verified=checked)
            if position is not None:
                self._checked[position] = True
            self._entries[case_id] = entry
            if building:
                bar = self._first_use_bar()
                bar.update(1)
                if bar.n >= bar.total:
                    bar.close()
        return entry

    def _cached(self, case_id: str) -> bool:
        """Whether the case's cache entry exists (a stat, not a check: ``ensure`` checks)."""
        content_hash = self.release.manifest["cases"].get(case_id, "")
        return self.cache is not None and self.cache.entry_path(self.release.version, case_id, content_hash).is_dir()

    def _first_use_bar(self) -> Any:
        """A bar over the cases not yet decoded, drawn while the first epoch fills the cache (one per DataLoader worker)."""
        if self._bar is None or self._bar.n >= self._bar.total:
            import sys

            from tqdm import tqdm

            worker = torch.utils.data.get_worker_info()
            todo = 1 + sum(not self._cached(c) for c in self.case_ids if c not in self._entries)
            where = f" (worker {worker.id})" if worker is not None else ""
            self._bar = tqdm(total=todo, desc=f"decoding release {self.release.version} into the cache{where}",
                             unit="case", file=sys.stderr, mininterval=1.0)
        return self._bar

    def prepare(
        self, *, workers: int = 1, progress: Callable[[Iterable[str]], Iterable[str]] | None = None
    ) -> None:
        """Decode every case of this dataset into the cache now (it is otherwise built on first use).

        ``workers`` threads build entries side by side (decoding, hashing and compressing release
        the GIL); ``progress`` wraps the stream of finished case ids (e.g. ``tqdm``).

        Example:
            >>> train.prepare(workers=4, progress=tqdm)  # doctest: +SKIP
        """
        if self.cache is None:
            return
        from concurrent.futures import ThreadPoolExecutor

        def build(case_id: str) -> str:
            if case_id not in self._entries:
                # ensure() has checked the entry's checksums: recorded, so that workers do not read them again.
                self._entries[case_id] = self.cache.ensure(self.release, case_id)  # type: ignore[union-attr]
                self._checked[self._position[case_id]] = True
            return case_id

        with ThreadPoolExecutor(max(1, int(workers))) as pool:
            done = pool.map(build, self.case_ids)
            for _ in progress(done) if progress is not None else done:
                pass

    def _finish(self, item: Item, index: int) -> Item:
        """Apply ``transform``, its random decisions drawn from (seed, epoch, index) (:mod:`lymphatlas_ds.augment`)."""
        if self.transform is None:
            return item
        return apply_seeded(self.transform, item, item_rng(seed=self.seed, epoch=self.epoch, index=index))


class CaseDataset(_Base):
    """Whole cases: item ``i`` is case ``case_ids[i]`` (see the module doc for the item)."""

    def __len__(self) -> int:
        return len(self.case_ids)

    def __getitem__(self, index: int) -> Item:
        index = range(len(self))[index]  # IndexError past the end; a negative index counts from it
        case_id = self.case_ids[index]
        if self.cache is not None:
            entry = self.entry(case_id)
            image = _cached_image(entry, (slice(None),) * 3, entry.shape)
            label, affine, row = entry.read("label"), entry.affine, entry.meta
        else:
            image, label, affine, row = self._from_shard(case_id)
        item = {
            "image": image,
            "label": torch.from_numpy(np.ascontiguousarray(label)[None]),
            "case_id": case_id,
            "affine": torch.from_numpy(np.array(affine, dtype=np.float64)),
            "spacing_zyx": _spacing_zyx(row, affine),
            "meta": _meta(row),
            **_whole_case_keys(),
        }
        if self.instances:
            item["instances"] = _instances(np.asarray(label))
        return self._finish(item, index)


    def _from_shard(self, case_id: str) -> tuple[torch.Tensor, np.ndarray, np.ndarray, dict[str, Any]]:
        """Decode a case straight from its shard (``cache=False``): each volume is viewed in arrow memory, copied once."""
        row = self.release.read_meta(case_id)
        image = None
        label = affine = None
        for name in IMAGE_COLUMNS:
            table = self.release.read_volume_table(case_id, name)
            array, affine = codec.decode_volume(codec.cell_bytes(table, name, where=f"case {case_id}"), copy=False,
                                                where=f"case {case_id} {name}")
            if name == "label":
                label = np.array(array, dtype=_DTYPES["label"])
                continue
            if image is None:
                image = np.empty((len(CHANNELS), *array.shape), np.float32)
            image[_CT if name == "ct" else _PET] = array
            del array, table
        assert image is not None and label is not None and affine is not None  # noqa: S101 - three columns read
        return torch.from_numpy(image), label, affine, row


class PatchDataset(_Base):
    """Random patches: item ``i`` is patch ``i % samples_per_case`` of case ``case_ids[i // samples_per_case]``."""

    def __init__(
        self,
        release: Release,
        case_ids: Sequence[str],
        *,
        patch_size: tuple[int, int, int],
        samples_per_case: int,
        foreground_ratio: float,
        seed: int,
        transform: Transform | None,
        cache: DecodedCache,
        progress: bool = True,
        instances: bool = False,
    ) -> None:
        super().__init__(release, case_ids, transform=transform, cache=cache, progress=progress, seed=seed,
                         instances=instances)
        patch = _patch_size(patch_size)
        if samples_per_case < 1:
            raise SchemaError(f"samples_per_case must be >= 1, got {samples_per_case}")
        if not 0.0 <= foreground_ratio <= 1.0:
            raise SchemaError(f"foreground_ratio must be in [0, 1], got {foreground_ratio}")
        self.patch_size = patch
        self.samples_per_case = int(samples_per_case)
        self.foreground_ratio = float(foreground_ratio)

    def __len__(self) -> int:
        return len(self.case_ids) * self.samples_per_case

    def _start(self, entry: CachedCase, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
        return _draw_start(entry.shape, self.patch_size, self.foreground_ratio, entry.foreground_count,
                           entry.foreground, rng)

    def __getitem__(self, index: int) -> Item:
        return self._finish(self._patch(index), index)

    def __getitems__(self, indices: Sequence[int]) -> list[Item]:
        """The items ``indices`` (what a ``DataLoader`` asks of a batch), their voxels written into one batch.

        Each patch's CT, PET and label are decompressed straight into its slot of one float32 ``[N, 2, Z, Y, X]``
        and one uint8 ``[N, 1, Z, Y, X]`` tensor (in shared memory inside a DataLoader worker, where they are
        sent from), and the items' ``image`` / ``label`` are views of those slots: with
        ``collate_fn=`` :func:`collate` the DataLoader's batch *is* these two tensors (no ``torch.stack`` copy
        and, from a worker, no copy into shared memory); with the default collate the items are stacked as
        before. The values equal ``[self[i] for i in indices]`` stacked, bit for bit. With a ``transform`` (it
        may change an item's shape or type) each item is made alone.
        """
        indices = [int(i) for i in indices]
        if self.transform is not None or not indices:
            return [self[i] for i in indices]
        n = len(indices)
        image_np, image, image_mark = batch_array((n, len(CHANNELS), *self.patch_size), np.float32)
        label_np, label, label_mark = batch_array((n, 1, *self.patch_size), _DTYPES["label"])
        items = Batch(self._patch(i, image_np[j], label_np[j]) for j, i in enumerate(indices))
        # The batch of everything but the voxels is torch's own collate of the items' small values.
        rest = small_collate([{k: v for k, v in item.items() if k not in BATCHED_KEYS} for item in items])
        items.collated = {k: image if k == "image" else label if k == "label" else rest[k] for k in items[0]}
        items.marks = tuple((key, *mark) for key, mark in (("image", image_mark), ("label", label_mark)) if mark)
        return items

    def _patch(self, index: int, image: np.ndarray | None = None, label: np.ndarray | None = None) -> Item:
        """Patch ``index`` (before the transform), its voxels written into ``image`` (float32 ``[2, Z, Y, X]``)
        and ``label`` (uint8 ``[1, Z, Y, X]``) when given (C-contiguous, as slots of a batch are), else new arrays."""
        if not 0 <= index < len(self):
            raise IndexError(f"patch index {index} out of range for {len(self)} patches")
        case_id = self.case_ids[index // self.samples_per_case]
        entry = self.entry(case_id)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        start, centred = self._start(entry, rng)
        stop = np.minimum(start + np.asarray(self.patch_size), entry.shape)
        box = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
        inner = tuple(slice(0, int(b - a)) for a, b in zip(start, stop))
        if image is None:
            image = np.empty((len(CHANNELS), *self.patch_size), np.float32)
        if label is None:
            label = np.empty((1, *self.patch_size), _DTYPES["label"])
        if tuple(int(b - a) for a, b in zip(start, stop)) == self.patch_size:
            _read_image_into(entry, box, image)
            entry.read_into("label", box, label[0])
        else:  # the volume is smaller than the patch along some axis: pad
            image[_CT].fill(PAD_VALUES["ct"])
            image[_PET].fill(PAD_VALUES["pet"])
            label.fill(PAD_VALUES["label"])
            image[_CT][inner] = entry.read_patch("ct", box)
            image[_PET][inner] = entry.read_patch("pet", box)
            label[0][inner] = entry.read_patch("label", box)
        affine = np.array(entry.affine, dtype=np.float64)
        # Shift the origin to the patch's first voxel: the affine indexes (x, y, z), start is (z, y, x).
        affine[:3, 3] = affine[:3, :3] @ start[::-1].astype(np.float64) + affine[:3, 3]
        item = {
            "image": torch.from_numpy(image),
            "label": torch.from_numpy(label),
            "case_id": case_id,
            "affine": torch.from_numpy(affine),
            "spacing_zyx": _spacing_zyx(entry.meta, entry.affine),
            "meta": _meta(entry.meta),
            "patch_start": torch.from_numpy(start),
            "foreground_centred": centred,
        }
        if self.instances:  # the case's ids: label the whole case, then crop (a patch alone would renumber)
            whole = _instances(np.asarray(entry.read("label")))[0]
            patch_ids = torch.zeros(self.patch_size, dtype=whole.dtype)
            patch_ids[inner] = whole[box]
            item["instances"] = patch_ids[None]
        return item


def select_cases(
    release: Release,
    *,
    config: Config | str = Config.ALL,
    split: Split | str = Split.TRAIN,
    fold: int | None = None,
    subset: Subset | str | None = None,
) -> list[str]:
    """The case ids ``load_lymphatlas`` would use (see its arguments).

    A fold that does not exist, or whose subset holds no case of the config, raises
    :class:`SelectionError` naming the release's patients and folds and what to ask instead.
    """
    config, split = _as_config(config), _as_split(split)
    if (fold is None) != (subset is None):
        raise SchemaError("fold and subset go together: fold=k, subset='train' or 'val' (or neither)")
    if fold is None:
        return release.case_ids(config, split)
    if split is not Split.TRAIN:
        raise SchemaError(f"folds subdivide the train split; split={split.value!r} has no folds (use split='train')")
    subset_name = str(getattr(subset, "value", subset))
    if isinstance(fold, (int, np.integer)) and not 0 <= int(fold) < int(release.splits.get("n_folds", N_FOLDS)):
        raise SelectionError(_empty_fold_message(release, config, int(fold), subset_name))
    case_ids = release.fold_case_ids(fold, subset, config=config)  # type: ignore[arg-type]
    if not case_ids:
        raise SelectionError(_empty_fold_message(release, config, int(fold), subset_name))
    return case_ids


def _empty_fold_message(release: Release, config: Config, fold: int, subset: str) -> str:
    """Why fold ``fold`` / ``subset`` of ``config`` is empty: the release's patients, its usable folds, the fix."""
    entries = release.splits.get("cases", {})
    n_folds = int(release.splits.get("n_folds", N_FOLDS))
    in_config = {c: e for c, e in entries.items()
                 if config is Config.ALL or str(e.get("diagnosis", "")).lower() == config.value}
    patients = {e["subject_id"] for e in entries.values()}
    train = {e["subject_id"] for e in in_config.values() if e["split"] == Split.TRAIN.value}
    folds_of = {k: {e["subject_id"] for e in in_config.values() if e["split"] == Split.TRAIN.value and e["fold"] == k}
                for k in range(n_folds)}
    usable = [k for k, val in folds_of.items() if val and train - val]
    what = "does not exist" if not 0 <= fold < n_folds else f"has no {subset} case in config {config.value}"
    has = f"folds 0-{n_folds - 1}" if n_folds else "no cross-validation folds (a single training patient)"
    fix = (f"use fold={usable[0]}" + (f" (folds with a training and a validation patient in config {config.value}: "
                                      f"{', '.join(map(str, usable))})" if len(usable) > 1 else "")
           if usable else "train on every training case (split='train' without fold and subset)")
    return (
        f"fold {fold} {what} in release {release.version}: it has {len(patients)} patients, {len(train)} of them in "
        f"the train split of config {config.value}, and {has}. A release with fewer training patients than "
        f"{N_FOLDS} has one fold per training patient. Instead: {fix}, or use a release with more patients"
    )


def load_lymphatlas(
    source: str | Path,
    *,
    config: Config | str = Config.ALL,
    split: Split | str = Split.TRAIN,
    fold: int | None = None,
    subset: Subset | str | None = None,
    version: str | None = None,
    transform: Transform | None = None,
    patch_size: int | tuple[int, int, int] | None = None,
    samples_per_case: int = 1,
    foreground_ratio: float = DEFAULT_FOREGROUND_RATIO,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    cache: bool = True,
    hub_cache_dir: str | Path | None = None,
    verify: bool = True,
    progress: bool = True,
    instances: bool = False,
) -> CaseDataset | PatchDataset:
    """A LymphAtlas release as a torch ``Dataset`` (see the module doc for items and sampling).

    ``source``: a release folder, a local mirror (``version`` picks one, default the newest) or a
    Hub repo id (downloaded at tag ``v<version>``; ``HF_HUB_OFFLINE=1`` works from the Hub cache).
    ``config``: ``all`` / ``hl`` / ``nhl``. ``split``: ``train`` / ``test``. ``fold=k`` with
    ``subset="train"|"val"``: the cross-validation subsets of the train split, patient-grouped,
    from the release's ``splits.json``. ``patch_size=(z, y, x)`` (or one int for a cube) switches to patch mode, with
    ``samples_per_case`` patches per case per epoch. ``cache_dir``: the decoded cache (default
    :func:`lymphatlas_ds.cache.default_cache_dir`). ``verify``: check release files against the
    manifest on first use. ``progress``: a bar on stderr while the first epoch decodes cases into
    the cache (one per DataLoader worker; ``False`` for none). ``transform``: applied to each item,
    its random decisions drawn from (``seed``, epoch, index) (see the module doc); ``seed`` also
    draws the patches. A ``fold`` that does not exist or holds no case of the config raises
    :class:`~lymphatlas_ds.errors.SelectionError` (a small release has fewer folds). ``instances=True``
    adds the label's lesion ids (the ``lesions`` config's ``lesion_id``) as ``"instances"``.

    Example:
        >>> val = load_lymphatlas("lymphatlas", config="hl", fold=0, subset="val")  # doctest: +SKIP
        >>> item = val[0]  # doctest: +SKIP
        >>> item["image"].shape[0], item["label"].dtype  # doctest: +SKIP
        (2, torch.uint8)
    """
    # Without the decoded cache nothing re-checks the voxels: hash each file's bytes in this process (remember=False).
    release = Release.from_source(
        source, version=version, hub_cache_dir=hub_cache_dir, verify=verify, state_dir=cache_dir, remember=cache
    )
    case_ids = select_cases(release, config=config, split=split, fold=fold, subset=subset)
    if not case_ids:  # a split of a config without cases (a fold without cases raised above)
        log.warning(
            "no case in config %s, split %s (fold %s, subset %s) of release %s",
            _as_config(config).value, _as_split(split).value, fold, subset, release.version,
        )
    decoded = DecodedCache(cache_dir) if cache else None
    common = dict(seed=seed, transform=transform, cache=decoded, progress=progress, instances=instances)
    if patch_size is None:
        return CaseDataset(release, case_ids, **common)
    if decoded is None:
        raise SchemaError("patch mode reads patches from the decoded cache; use cache=True")
    return PatchDataset(release, case_ids, patch_size=patch_size, samples_per_case=samples_per_case,
                        foreground_ratio=foreground_ratio, **common)


# ---------------------------------------------------------------------- Hugging Face datasets


def _volume(value: Any) -> tuple[np.ndarray, np.ndarray]:
    """A Nifti column value as ``(array_zyx, affine)``: a decoded nibabel image or a raw ``{"bytes"}`` cell."""
    if isinstance(value, dict):
        return codec.decode_volume(value)
    if hasattr(value, "dataobj") and hasattr(value, "affine"):
        # nibabel's array is (x, y, z); the project's is (z, y, x).
        return np.asanyarray(value.dataobj).transpose(2, 1, 0), np.asarray(value.affine, dtype=np.float64)
    raise SchemaError(f"cannot read a volume from a {type(value).__name__}; expected a datasets Nifti value")


def _hf_case_item(row: dict[str, Any]) -> Item:
    """A whole-case item (``schema.ITEM_KEYS``) from one ``datasets`` row of a LymphAtlas release."""
    ct, affine = _volume(row["ct"])
    pet, _ = _volume(row["pet"])
    label, _ = _volume(row["label"])
    meta = _meta(row)
    # columns a user added (``ds.map``) travel in meta too; the release's geometry columns are the tensors
    meta.update({k: v for k, v in row.items()
                 if k not in meta and k not in (*IMAGE_COLUMNS, *_GEOMETRY_COLUMNS)})
    return {
        "image": _image(np.asarray(ct), np.asarray(pet)),
        "label": torch.from_numpy(np.ascontiguousarray(label, dtype=np.uint8)[None]),
        "case_id": row.get("case_id"),
        "affine": torch.from_numpy(np.array(affine, dtype=np.float64)),
        "spacing_zyx": _spacing_zyx(row, affine),
        "meta": meta,
        **_whole_case_keys(),
    }


def _crop_item(case: Item, start: np.ndarray, patch: tuple[int, int, int], centred: bool) -> Item:
    """The patch of a whole-case item at ``start`` (z, y, x), padded as :class:`PatchDataset` pads."""
    shape = np.asarray(case["label"].shape[1:])
    stop = np.minimum(start + np.asarray(patch), shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
    inner = tuple(slice(0, int(b - a)) for a, b in zip(start, stop))
    image = torch.empty((len(CHANNELS), *patch), dtype=torch.float32)
    image[_CT].fill_(PAD_VALUES["ct"])
    image[_PET].fill_(PAD_VALUES["pet"])
    image[(slice(None), *inner)] = case["image"][(slice(None), *box)]
    label = torch.full((1, *patch), PAD_VALUES["label"], dtype=case["label"].dtype)
    label[(slice(None), *inner)] = case["label"][(slice(None), *box)]
    affine = case["affine"].numpy().copy()
    # Shift the origin to the patch's first voxel: the affine indexes (x, y, z), start is (z, y, x).
    affine[:3, 3] = affine[:3, :3] @ start[::-1].astype(np.float64) + affine[:3, 3]
    return {**case, "image": image, "label": label, "affine": torch.from_numpy(affine),
            "patch_start": torch.from_numpy(start.astype(np.int64)), "foreground_centred": bool(centred)}


def _draw_patch(case: Item, patch: tuple[int, int, int], foreground_ratio: float, rng: np.random.Generator) -> Item:
    """A random patch of a whole-case item, drawn by :class:`PatchDataset`'s rule from ``rng``."""
    label = case["label"][0].numpy()
    count = int(np.count_nonzero(label))
    start, centred = _draw_start(label.shape, patch, foreground_ratio, count,
                                 lambda: np.argwhere(label > 0).astype(np.int32), rng)
    return _crop_item(case, start, patch, centred)


def hf_torch_transform(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """A ``datasets`` ``with_transform`` function giving ``load_lymphatlas``'s whole-case items.

    ``datasets``' ``with_format("torch")`` fails on Nifti columns (``TypeError: object of type
    'Nifti1ImageWrapper' has no len()``); this builds the items of the module doc (``image``
    [2, Z, Y, X] float32 (CT, PET), ``label`` [1, Z, Y, X] uint8, ``affine``, ``spacing_zyx``,
    ``case_id``, the metadata columns under ``meta``, ``patch_start`` zeros, ``foreground_centred``
    False) from the ``ct`` / ``pet`` / ``label`` columns (decoded or, faster, ``Nifti(decode=False)``
    raw cells: see :func:`hf_torch`).

    Example:
        >>> ds = datasets.load_dataset("lymphatlas", "nhl", split="train")  # doctest: +SKIP
        >>> item = ds.with_transform(hf_torch_transform)[0]  # doctest: +SKIP
        >>> item["image"].shape[0], item["meta"]["diagnosis"]  # doctest: +SKIP
        (2, 'NHL')
    """
    missing = [name for name in IMAGE_COLUMNS if name not in batch]
    if missing:
        raise SchemaError(f"the dataset lacks the Nifti columns {missing}; is it a LymphAtlas release?")
    n = len(batch[IMAGE_COLUMNS[0]])
    items = [_hf_case_item({k: v[i] for k, v in batch.items()}) for i in range(n)]
    return {k: [item[k] for item in items] for k in ITEM_KEYS}


class _HFBase:
    """Options and the shared epoch of the ``hf_torch`` datasets that sample patches or augment."""

    def __init__(self, dataset: Any, *, patch_size: Any, samples_per_case: int, foreground_ratio: float,
                 seed: int, transform: Transform | None) -> None:
        self.dataset = dataset
        self.patch_size = None if patch_size is None else _patch_size(patch_size)
        if samples_per_case < 1:
            raise SchemaError(f"samples_per_case must be >= 1, got {samples_per_case}")
        if self.patch_size is None and samples_per_case != 1:
            raise SchemaError("samples_per_case needs patch_size (whole cases are one item per case)")
        if not 0.0 <= foreground_ratio <= 1.0:
            raise SchemaError(f"foreground_ratio must be in [0, 1], got {foreground_ratio}")
        self.samples_per_case = int(samples_per_case)
        self.foreground_ratio = float(foreground_ratio)
        self.seed = int(seed)
        self.transform = transform
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Draw the patches and augmentations of epoch ``epoch``; call it before iterating."""
        self._epoch.fill_(int(epoch))
        if hasattr(self.dataset, "set_epoch"):  # a streamed dataset's shuffle buffer follows the epoch too
            self.dataset.set_epoch(int(epoch))

    def _make(self, case: Item, rng: np.random.Generator, augment_rng: np.random.Generator) -> Item:
        item = case if self.patch_size is None else _draw_patch(case, self.patch_size, self.foreground_ratio, rng)
        return item if self.transform is None else apply_seeded(self.transform, item, augment_rng)


class HFCaseDataset(_HFBase, Dataset):
    """A ``datasets.Dataset`` of a release as a torch ``Dataset`` of whole cases or patches (see :func:`hf_torch`).

    Item ``i`` is patch ``i % samples_per_case`` of row ``i // samples_per_case``, drawn from
    ``default_rng([seed, epoch, i])`` like :func:`load_lymphatlas`'s (the same patch for the same
    case at the same index), its ``transform`` from ``[seed, epoch, i, 1]``. Each item decodes its
    whole case (the HF route has no decoded cache): use ``samples_per_case`` > 1 with a
    ``DataLoader`` ``batch_size`` that takes them together, or ``load_lymphatlas`` for speed.
    """

    def __len__(self) -> int:
        return len(self.dataset) * self.samples_per_case

    def __getitem__(self, index: int) -> Item:
        if not 0 <= index < len(self):
            raise IndexError(f"item index {index} out of range for {len(self)} items")
        case = _hf_case_item(self.dataset[index // self.samples_per_case])
        return self._make(case, np.random.default_rng([self.seed, self.epoch, index]),
                          item_rng(seed=self.seed, epoch=self.epoch, index=index))


def _case_key(case_id: str) -> int:
    """A stable 64-bit number for a case id (the streamed route's stand-in for an item index)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(str(case_id).encode()).digest()[:8], "little")


class HFStreamDataset(_HFBase, torch.utils.data.IterableDataset):
    """A streamed (``streaming=True``) release as a torch ``IterableDataset`` of whole cases or patches.

    A stream has no item index: patch ``k`` of a case is drawn from ``default_rng([seed, epoch,
    key, k])`` and its ``transform`` from ``[seed, epoch, key, k, 1]``, ``key`` a hash of the case
    id, so the items do not depend on the order or on the DataLoader worker (``datasets`` hands
    each worker whole shards of the stream).
    """

    def __iter__(self) -> Any:
        epoch = self.epoch
        for row in self.dataset:
            case = _hf_case_item(row)
            key = _case_key(case["case_id"])
            for k in range(self.samples_per_case):
                yield self._make(case, np.random.default_rng([self.seed, epoch, key, k]),
                                 np.random.default_rng([self.seed, epoch, key, k, AUGMENT_STREAM]))


def hf_torch(
    dataset: Any,
    *,
    patch_size: int | tuple[int, int, int] | None = None,
    samples_per_case: int = 1,
    foreground_ratio: float = DEFAULT_FOREGROUND_RATIO,
    seed: int = 0,
    transform: Transform | None = None,
) -> Any:
    """A ``datasets`` dataset of a LymphAtlas release made to return ``load_lymphatlas``'s torch items.

    The items have the keys and dtypes of :func:`load_lymphatlas`'s (``schema.ITEM_KEYS``; the
    metadata columns under ``meta``). The Nifti columns are switched to raw cells
    (``Nifti(decode=False)``) first, so the project's codec reads the voxels in place instead of
    nibabel parsing a file object per volume.

    - a ``datasets.Dataset``, no option: the same ``datasets.Dataset`` with
      :func:`hf_torch_transform` (indexing, ``filter``, ``select`` keep working);
    - ``patch_size=`` (with ``samples_per_case``, ``foreground_ratio``, ``seed``) or ``transform=``:
      an :class:`HFCaseDataset` (a torch ``Dataset`` with ``set_epoch``) whose patches and
      augmentations are drawn as ``load_lymphatlas``'s, so batches of equal-sized patches collate;
    - a ``datasets.IterableDataset`` (``streaming=True``): an :class:`HFStreamDataset` (a torch
      ``IterableDataset``) of whole cases or patches.

    Example:
        >>> item = hf_torch(datasets.load_dataset("lymphatlas", "hl", split="test"))[0]  # doctest: +SKIP
        >>> train = hf_torch(datasets.load_dataset("lymphatlas", "all", split="train"), patch_size=96,
        ...                  samples_per_case=2, seed=0)  # doctest: +SKIP
        >>> loader = torch.utils.data.DataLoader(train, batch_size=2, num_workers=1)  # doctest: +SKIP
    """
    import datasets

    missing = [name for name in IMAGE_COLUMNS if name not in (dataset.column_names or IMAGE_COLUMNS)]
    if missing:
        raise SchemaError(f"the dataset lacks the Nifti columns {missing}; is it a LymphAtlas release?")
    for name in IMAGE_COLUMNS:
        dataset = dataset.cast_column(name, datasets.Nifti(decode=False))
    options = {"patch_size": patch_size, "samples_per_case": samples_per_case, "foreground_ratio": foreground_ratio,
               "seed": seed, "transform": transform}
    if isinstance(dataset, datasets.IterableDataset):
        return HFStreamDataset(dataset, **options)
    if patch_size is None and transform is None:
        if samples_per_case != 1:
            raise SchemaError("samples_per_case needs patch_size (whole cases are one item per case)")
        return dataset.with_transform(hf_torch_transform)
    return HFCaseDataset(dataset, **options)
