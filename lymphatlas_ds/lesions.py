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
    out = np.zeros(mask.shape, INSTANCE_DTYPE)
    box = _box(mask)  # whole-body arrays are ~100 M voxels: label inside the lesions' box only
    if box is None:
        return out, 0
    components, n = ndimage.label(mask[box] != 0, structure=structure(connectivity))
    if n > np.iinfo(INSTANCE_DTYPE).max:
        raise ValueError(f"{n} lesions do not fit a {INSTANCE_DTYPE} instance map (at most 65535): is this a label?")
    sizes = np.bincount(components.ravel(), minlength=n + 1)[1:]
    # scipy numbers components in order of their first voxel (C order): a stable sort on size keeps that order in ties
    order = np.argsort(-sizes, kind="stable")
    remap = np.zeros(n + 1, INSTANCE_DTYPE)
    remap[order + 1] = np.arange(1, n + 1, dtype=INSTANCE_DTYPE)
    out[box] = remap[components]
    return out, int(n)


__all__ = ["INSTANCE_DTYPE", "LESION_CONNECTIVITY", "label_instances", "structure"]
