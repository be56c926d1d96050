"""Batches written in place: the buffers of ``PatchDataset.__getitems__`` and the collate that hands them over.

torch's ``default_collate`` copies each batch (``torch.stack``) into new memory: in the main process
a torch allocation whose 4 KiB pages fault in one by one, in a DataLoader worker new shared memory
whose tmpfs pages are allocated and zeroed one by one (one-off timings on the 2-core VM, 32 MiB, the
batch of two 128^3 CT+PET patches: torch.empty + fill 19 ms, numpy 4.4-9.5 ms, shared memory 30-40 ms,
rewriting a kept buffer 2.9 ms; decompressing the two patches takes about 17 ms). Here the patches are
decompressed straight into their batch, into buffers that each process reuses: in the main process
once nothing refers to a batch's memory any more; in a worker, shared memory, once also the main process has freed the
batch it was sent in (:func:`collate` marks a buffer lent; the main process's copy of the batch
clears the mark when its memory is freed, so a batch a user keeps, or any view of it, is never
overwritten).
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate, get_worker_info

POOL_SLOTS = 10
"""Shared-memory buffers (an image and a label per batch) a worker keeps for reuse: the batches in flight
(``prefetch_factor``, 2 by default), the one the training step holds and one being written, with one to spare.
A worker whose buffers are all lent allocates anew."""
MAIN_POOL_SLOTS = 4
"""Buffers the main process keeps (``num_workers=0``): the batch the training step holds and the next one."""

BATCHED_KEYS = ("image", "label")
"""Item keys whose batch :meth:`PatchDataset.__getitems__` writes in place (the rest go through default_collate)."""


def _use_count(storage: torch.UntypedStorage) -> int | None:
    """References to a storage's memory in this process (tensors and views), or None where torch cannot say."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return None if count is None else int(count(storage._cdata))


class _Pool:
    """One process's reusable batch buffers (``shared``: in shared memory, a DataLoader worker's); ``lent[i]``
    (shared with the main process) is 1 while the main process holds the batch sent in buffer ``i``."""

    def __init__(self, *, shared: bool = True, slots: int = POOL_SLOTS) -> None:
        self.pid = os.getpid()
        self.shared = shared
        self.slots = slots
        self.lent = torch.zeros(slots, dtype=torch.uint8)
        if shared:
            self.lent.share_memory_()
        self.storages: list[torch.UntypedStorage] = []
        self._lock = threading.Lock()  # two threads making batches must not claim one buffer

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, int | None]:
        """An uninitialised tensor of ``shape`` on a buffer of the pool, and its slot (None: a new buffer outside
        the pool, every slot being lent or in use here)."""
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        with self._lock:
            slot = None
            for i, storage in enumerate(self.storages):
                # free: not lent to the main process, and nothing in this process refers to it but the pool
                if storage.nbytes() == nbytes and not self.lent[i] and _use_count(storage) == 1:
                    slot = i
                    break
            else:
                storage = torch.UntypedStorage._new_shared(nbytes) if self.shared else torch.UntypedStorage(nbytes)
                if len(self.storages) < self.slots and _use_count(storage) is not None:
                    self.storages.append(storage)
                    slot = len(self.storages) - 1
            return torch.empty(0, dtype=dtype).set_(storage).view(shape), slot


_pools: dict[bool, _Pool] = {}


def _pool(shared: bool) -> _Pool:
    pool = _pools.get(shared)
    if pool is None or pool.pid != os.getpid():  # a pool inherited through fork belongs to the parent
        pool = _pools[shared] = _Pool(shared=shared, slots=POOL_SLOTS if shared else MAIN_POOL_SLOTS)
    return pool


def batch_array(shape: tuple[int, ...], dtype: np.dtype | type) -> tuple[np.ndarray, torch.Tensor, Any]:
    """An uninitialised batch buffer as (numpy view, tensor, mark), reused (see the module doc): in a
    DataLoader worker in shared memory (``mark``: its lent flag and slot), else ordinary memory (``mark`` None)."""
    in_worker = get_worker_info() is not None
    pool = _pool(shared=in_worker)
    tensor, slot = pool.take(shape, torch.from_numpy(np.empty(0, dtype)).dtype)
    return tensor.numpy(), tensor, (pool.lent, slot) if in_worker and slot is not None else None


class Batch(list):
    """The items of one batch as ``PatchDataset.__getitems__`` returns them; ``collated`` is their batch
    (the voxels shared with the items), ``marks`` the pooled buffers it uses (key, lent flags, slot)."""

    collated: dict[str, Any] | None = None
    marks: tuple[tuple[str, torch.Tensor, int], ...] = ()

    def __reduce__(self) -> Any:  # sent between processes as a plain list (the batch would travel twice)
        return list, (list(self),)


class _Sent(dict):
    """A batch a worker sends: it arrives in the main process as a plain ``dict``, its small tensors sent by
    value (a shared-memory file and a file-descriptor handshake for each of its ~15 small tensors cost more
    than their bytes) and its pooled buffers given back when freed there (:func:`_arrived`)."""

    marks: tuple[tuple[str, torch.Tensor, int], ...] = ()

    def __reduce__(self) -> Any:
        voxels = {k: self[k] for k in BATCHED_KEYS if k in self}
        small = {k: _by_value(v) for k, v in self.items() if k not in voxels}
        return _arrived, (voxels, small, list(self), self.marks)


class _Value:
    """A small tensor sent by value (its numpy bytes) instead of through shared memory."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array


def _by_value(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return _Value(value.numpy())
    if isinstance(value, dict):
        return {k: _by_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_by_value(v) for v in value]
    return value


def _as_tensors(value: Any) -> Any:
    if isinstance(value, _Value):
        return torch.from_numpy(value.array)
    if isinstance(value, dict):
        return {k: _as_tensors(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_tensors(v) for v in value]
    return value


def _give_back(lent: torch.Tensor, slot: int) -> None:
    lent[slot] = 0


def _arrived(voxels: dict[str, torch.Tensor], small: dict[str, Any], keys: list[str],
             marks: tuple[tuple[str, torch.Tensor, int], ...]) -> dict[str, Any]:
    """In the main process: the batch (keys in their order), each pooled buffer given back to its worker when
    its memory is freed (the storage outlives every tensor and view of it)."""
    for key, lent, slot in marks:
        weakref.finalize(voxels[key].untyped_storage(), _give_back, lent, slot)
    return {k: voxels[k] if k in voxels else _as_tensors(small[k]) for k in keys}


def small_collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """torch's ``default_collate`` of the items' small values, in ordinary memory even in a worker (they are
    sent by value; default_collate would make a shared-memory file for each tensor there)."""
    try:
        from torch.utils.data._utils.collate import collate as collate_with, default_collate_fn_map
    except ImportError:  # a torch without the extension point: shared memory, as before
        return default_collate(items)

    def stack(batch: list[torch.Tensor], *, collate_fn_map: Any = None) -> torch.Tensor:  # noqa: ARG001
        return torch.stack(batch, 0)

    return collate_with(items, collate_fn_map={**default_collate_fn_map, torch.Tensor: stack})


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """A ``DataLoader(collate_fn=...)`` for :func:`~lymphatlas_ds.load_lymphatlas`'s patches: the batch the
    dataset wrote in place.

    Gives what torch's ``default_collate`` gives (same keys, dtypes and values, bit for bit) without its
    ``torch.stack`` copy of the voxels (``PatchDataset.__getitems__``). Anything else (whole cases,
    other datasets, items of a ``transform``) goes to ``default_collate``.

    Example:
        >>> loader = torch.utils.data.DataLoader(train, batch_size=2, shuffle=True, num_workers=2,
        ...                                      collate_fn=collate)  # doctest: +SKIP
    """
    collated = getattr(batch, "collated", None)
    if collated is None:
        return default_collate(batch)
    if get_worker_info() is None:
        return collated
    marks = getattr(batch, "marks", ())
    for _, lent, slot in marks:
        lent[slot] = 1  # the main process holds it from now until its copy is freed
    sent = _Sent(collated)
    sent.marks = marks
    return sent
