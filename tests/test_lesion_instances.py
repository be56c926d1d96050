"""lymphatlas_ds.lesions.label_instances against a peer labeller (scikit-image) on random masks."""

from __future__ import annotations

import numpy as np
import pytest

from lymphatlas_ds.lesions import LESION_CONNECTIVITY, label_instances

skimage_measure = pytest.importorskip("skimage.measure")


def _partition(labels: np.ndarray) -> set[frozenset[int]]:
    """The components as sets of flat voxel indices (independent of how they are numbered)."""
    flat = labels.ravel()
    order = np.argsort(flat, kind="stable")
    ids, starts = np.unique(flat[order], return_index=True)
    groups = np.split(order, starts[1:])
    return {frozenset(g.tolist()) for i, g in zip(ids, groups) if i != 0}


@pytest.mark.parametrize("connectivity, sk", [(6, 1), (18, 2), (26, 3)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_components_match_scikit_image(connectivity: int, sk: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = (rng.random((14, 17, 19)) < 0.18).astype(np.uint8)
    mask[0] = 0  # an empty border plane: the bounding-box crop must not shift ids
    inst, n = label_instances(mask, connectivity=connectivity)
    ref, n_ref = skimage_measure.label(mask, connectivity=sk, return_num=True)
    assert inst.dtype == np.uint16 and n == n_ref and n > 10
    assert np.array_equal(inst > 0, mask > 0)  # consistent with the binary label voxel for voxel
    assert _partition(inst) == _partition(ref)
    # ids by decreasing size, ties in order of the first voxel (C order)
    sizes = np.bincount(inst.ravel(), minlength=n + 1)[1:]
    assert np.all(np.diff(sizes) <= 0)
    first = [int(np.flatnonzero(inst.ravel() == i)[0]) for i in range(1, n + 1)]
    for i in range(n - 1):
        if sizes[i] == sizes[i + 1]:
            assert first[i] < first[i + 1]


def test_default_connectivity_is_26_and_empty_mask() -> None:
    assert LESION_CONNECTIVITY == 26
    m = np.zeros((3, 3, 3), np.uint8)
    inst, n = label_instances(m)
    assert n == 0 and inst.dtype == np.uint16 and not inst.any()
    m[0, 0, 0] = m[1, 1, 1] = 1  # corner neighbours
    assert label_instances(m)[1] == 1 and label_instances(m, connectivity=18)[1] == 2
    with pytest.raises(ValueError, match="6, 18 or 26"):
        label_instances(m, connectivity=8)
