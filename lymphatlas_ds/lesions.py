"""Lesion instances: the one connected-component labelling that the builder, the release and every
client (``evaluate``, the loader, the card) use, so a lesion is the same lesion everywhere.

* A **lesion** is a connected component of the binary label on the CT grid, with
  :data:`LESION_CONNECTIVITY` = 26 (voxels touching by a face, an edge or a corner belong to the same
  lesion; scipy's ``generate_binary_structure(3, 3)``).
* Instance ids are ``1..n`` (0 = background), **numbered by decreasing size** (voxel count), ties
  broken by the first voxel in C order (z, then y, then x); so id 1 is the largest lesion, and
  the ids of one mask are the same whoever labels it.
* The instance map is ``uint16`` (:data:`INSTANCE_DTYPE`): a case with more than 65,535 lesions
  is refused.

Example:
    >>> import numpy as np
    >>> m = np.zeros((4, 4, 4), np.uint8); m[0, 0, 0] = 1; m[1, 1, 1] = 1; m[3, 3, 0:3] = 1
    >>> inst, n = label_instances(m)
    >>> n, int(inst[3, 3, 0]), int(inst[0, 0, 0]), int(inst[1, 1, 1])  # corner neighbours: one lesion
    (2, 1, 2, 2)
    >>> label_instances(m, connectivity=6)[1]
    3
"""

from __future__ import annotations

import numpy as np

LESION_CONNECTIVITY = 26
"""Neighbourhood of the lesion components (6, 18 or 26 voxels); 26 everywhere in LymphAtlas."""
INSTANCE_DTYPE = "uint16"
"""dtype of the instance map (``instances.nii.gz``, the ``instances`` column)."""
_RANK = {6: 1, 18: 2, 26: 3}  # connectivity -> scipy's generate_binary_structure rank


def structure(connectivity: int = LESION_CONNECTIVITY) -> np.ndarray:
    """The 3x3x3 boolean neighbourhood of ``connectivity`` (6, 18 or 26)."""
    from scipy import ndimage

    if connectivity not in _RANK:
        raise ValueError(f"connectivity must be 6, 18 or 26 (voxel neighbours), got {connectivity!r}")
    return ndimage.generate_binary_structure(3, _RANK[connectivity])


def _box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Slices of the bounding box of ``mask``'s non-zero voxels, None when it has none."""
    spans = []
    for axis in range(mask.ndim):
        hit = np.nonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))[0]
        if len(hit) == 0:
            return None
        spans.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(spans)


def label_instances(mask: np.ndarray, connectivity: int = LESION_CONNECTIVITY) -> tuple[np.ndarray, int]:
    """(instance map uint16 of ``mask``'s shape, number of lesions) of a binary 3-D ``mask``.

    Every non-zero voxel of ``mask`` gets the id of its connected component (``connectivity``
    neighbours), ids ``1..n`` by decreasing voxel count (ties: first voxel in C order); 0 elsewhere.
    So ``(instances > 0) == (mask > 0)`` voxel for voxel.

    Example:
        >>> import numpy as np
        >>> m = np.zeros((3, 8, 8), np.uint8); m[1, 1, 1] = 1; m[1, 4:7, 4:7] = 1
        >>> inst, n = label_instances(m)
        >>> n, inst.dtype.name, int(inst[1, 5, 5]), int(inst[1, 1, 1])
        (2, 'uint16', 1, 2)
    """
    from scipy import ndimage

    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"label_instances needs a 3-D mask, got shape {mask.shape}")
    box = _box(mask)  # whole-body arrays are ~100 M voxels: label inside the lesions' box only
    if box is None:
        return np.zeros(mask.shape, INSTANCE_DTYPE), 0
    # 5 bytes a voxel of the box at the peak (the boolean box and the uint16 map it is relabelled in):
    # scipy's default int32 labels and a remapped copy took 9, 1.4 GB on a 600-slice CT
    try:
        components, n = ndimage.label(mask[box], structure=structure(connectivity), output=INSTANCE_DTYPE)
    except RuntimeError as e:  # scipy: "insufficient bit-depth in requested output type"
        raise ValueError(f"more lesions than a {INSTANCE_DTYPE} instance map holds (at most 65535): is this a "
                         f"label? ({e})") from e
    sizes = instance_sizes(components, n)
    # scipy numbers components in order of their first voxel (C order): a stable sort on size keeps that order in ties
    order = np.argsort(-sizes, kind="stable")
    remap = np.zeros(n + 1, INSTANCE_DTYPE)
    remap[order + 1] = np.arange(1, n + 1, dtype=INSTANCE_DTYPE)
    for slab in _slabs(components):
        slab[...] = remap[slab]  # in place, a slab at a time (a lookup of the whole map makes 8-byte indices)
    if components.shape == mask.shape:
        return components, int(n)
    out = np.zeros(mask.shape, INSTANCE_DTYPE)
    out[box] = components
    return out, int(n)


def instance_sizes(instances: np.ndarray, n: int) -> np.ndarray:
    """Voxel count of each id ``1..n`` of an instance map (index 0 is id 1), counted a slab at a time
    (``np.bincount`` of the whole map would first copy it to 8-byte integers: 1.3 GB at 600 slices).

    Example:
        >>> instance_sizes(np.array([[[0, 1, 1, 2]]], np.uint16), 2).tolist()
        [2, 1]
    """
    counts = np.zeros(n + 1, np.int64)
    for slab in _slabs(np.asarray(instances)):
        counts += np.bincount(slab.ravel(), minlength=n + 1)[:n + 1]
    return counts[1:]


def _slabs(array: np.ndarray, voxels: int = 1 << 21):
    """Views of ``array`` along its first axis, about ``voxels`` voxels each (16 MB of 8-byte indices)."""
    step = max(1, voxels // max(1, array[0].size)) if array.ndim > 1 else max(1, voxels)
    for start in range(0, len(array), step):
        yield array[start:start + step]


__all__ = ["INSTANCE_DTYPE", "LESION_CONNECTIVITY", "instance_sizes", "label_instances", "structure"]
