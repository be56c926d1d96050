"""Lesion statistics of one case, computed once, here: what case.json "lesions" holds and the release
metadata, the dataset card and ``lymphatlas info`` aggregate (paper 2.4).

Each value is read on the grid that clinical practice reads it on:

* **Lesions** are the connected components of the mask on the CT grid (where they were drawn), as
  :func:`lymphatlas_ds.lesions.label_instances` numbers them (26-connectivity, id 1 = the largest):
  the instance map convert writes (``instances.nii.gz``) and the ``lesion_id`` of each item.
* **Bounding box** (``bbox_min_xyz`` / ``bbox_max_xyz``, inclusive CT voxel indices in NIfTI (x, y, z)
  order) and **centroid** (``centroid_lps``, mm, DICOM patient coordinates) on the CT grid.
* **Body region** of the centroid, from CT landmarks only (:func:`body_regions`).
* **Volume, TMTV** (total metabolic tumour volume): voxel counts of the CT mask x the CT voxel volume.
* **SUVmax** and **SUVpeak** on the **native PET grid**, as a PET workstation reads them: resampling
  onto the CT grid can only smooth or (unbounded cubic) invent activity, and a peak depends on
  where CT voxels happen to fall. A lesion's PET voxels are those whose volume is at least half
  covered by the CT mask mapped through the applied registration transform (each CT lesion voxel
  is carried to the PET voxel holding its centre); a lesion smaller than half a PET voxel keeps
  the one PET voxel it covers most. SUVmax is their highest value; SUVpeak (PERCIST) the highest
  mean of a 1 ml sphere (radius 6.2 mm, partial-volume weights on the PET voxels) centred on one
  of them.
* **SUVmean** on the CT grid: the mean of the aligned PET over the CT mask, i.e. the activity
  integrated over the drawn volume divided by that volume; a lesion's **TLG** (total lesion
  glycolysis) is SUVmean x volume, the case's the sum over lesions: the integral of SUV over the mask, in ml.
* **Dmax**: the largest distance between two lesion centroids (CT mask, LPS mm), the lymphoma
  dissemination marker.

Example:
    >>> stats = lesion_statistics(label, pet_on_ct, ct, pet=pet_suv, transform=aligned.transform)  # doctest: +SKIP
    >>> stats["count"], round(stats["tmtv_ml"], 1), stats["grids"]["suv_max"]  # doctest: +SKIP
    (3, 41.2, 'pet')
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from lymphatlas_ds.lesions import label_instances
from lymphatlas_ds.schema import BodyRegion

SUV_PEAK_VOLUME_ML = 1.0
"""PERCIST's SUVpeak sphere: 1 ml (radius (3 / (4 pi))^(1/3) cm = 6.2 mm)."""
PET_VOXEL_MIN_COVER = 0.5
"""A PET voxel belongs to a lesion when the CT mask covers at least this fraction of its volume."""
GRIDS = {"volume_ml": "ct", "suv_mean": "ct", "tlg": "ct", "suv_max": "pet", "suv_peak": "pet", "dmax_mm": "ct",
         "body_region": "ct"}
"""Which grid each statistic is read on (recorded in case.json)."""
_SUBSAMPLES = 7  # per axis, for the partial-volume weights of the SUVpeak sphere


def peak_kernel(
    spacing_xyz: tuple[float, float, float], volume_ml: float = SUV_PEAK_VOLUME_ML, *, normalise: bool = True
) -> np.ndarray:
    """Averaging kernel [z, y, x] of a sphere of ``volume_ml`` on voxels of ``spacing_xyz`` mm.

    Each weight is the fraction of the voxel inside the sphere (``_SUBSAMPLES``^3 points per
    voxel), so the kernel holds the sphere's volume even on coarse PET voxels; it sums to 1
    (``normalise=False``: the fractions themselves).

    Example:
        >>> k = peak_kernel((4.0, 4.0, 4.0))
        >>> k.shape, round(float(k.sum()), 6)
        ((5, 5, 5), 1.0)
    """
    radius = (3.0 * volume_ml * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)
    spacing_zyx = np.asarray(spacing_xyz, float)[::-1]
    half = [int(math.ceil(radius / s + 0.5)) - 1 for s in spacing_zyx]  # voxels the sphere reaches into
    sub = (np.arange(_SUBSAMPLES) + 0.5) / _SUBSAMPLES - 0.5  # offsets inside a voxel, in voxels
    axes = []
    for h, s in zip(half, spacing_zyx):
        centres = np.arange(-h, h + 1, dtype=float)
        axes.append(((centres[:, None] + sub[None, :]) * s))  # [voxel, subsample] mm
    d2 = (axes[0][:, None, None, :, None, None] ** 2 + axes[1][None, :, None, None, :, None] ** 2
          + axes[2][None, None, :, None, None, :] ** 2)
    weights = (d2 <= radius**2).mean(axis=(3, 4, 5))
    return weights / weights.sum() if normalise else weights


def _to_pet_index(points: np.ndarray, transform: sitk.Transform, pet: sitk.Image) -> np.ndarray:
    """CT points (N x 3, LPS) -> nearest PET voxel index (N x 3, x y z) through ``transform``."""
    from builder.convert.align import _affine_parts, affine_lps

    m = _affine_parts(transform)
    if m is not None:
        moved = points @ m[:3, :3].T + m[:3, 3]
    else:  # B-spline refinement: no closed form
        moved = np.array([transform.TransformPoint(tuple(map(float, p))) for p in points])
    inv = np.linalg.inv(affine_lps(pet))
    return np.rint(moved @ inv[:3, :3].T + inv[:3, 3]).astype(np.int64)


def _native_peaks(
    comp_idx_zyx: np.ndarray, ct: sitk.Image, pet: sitk.Image, pet_arr: np.ndarray, transform: sitk.Transform,
    kernel: np.ndarray,
) -> tuple[float, float, int] | None:
    """(SUVmax, SUVpeak, number of PET voxels) of one lesion on the native PET grid, or None when
    the lesion lies outside the PET field of view."""
    from builder.convert.align import affine_lps

    a = affine_lps(ct)
    points = comp_idx_zyx[:, ::-1] @ a[:3, :3].T + a[:3, 3]
    idx = _to_pet_index(points, transform, pet)
    size = np.asarray(pet.GetSize())
    inside = np.all((idx >= 0) & (idx < size), axis=1)
    if not inside.any():
        return None
    idx = idx[inside]
    linear, counts = np.unique((idx[:, 2] * size[1] + idx[:, 1]) * size[0] + idx[:, 0], return_counts=True)
    voxels = np.stack([linear % size[0], (linear // size[0]) % size[1], linear // (size[0] * size[1])], 1)
    ct_ml = float(np.prod(ct.GetSpacing())) / 1000.0
    pet_ml = float(np.prod(pet.GetSpacing())) / 1000.0
    cover = counts * ct_ml / pet_ml
    chosen = voxels[cover >= PET_VOXEL_MIN_COVER]
    if len(chosen) == 0:
        chosen = voxels[[int(np.argmax(counts))]]
    x, y, z = chosen[:, 0], chosen[:, 1], chosen[:, 2]
    suv_max = float(pet_arr[z, y, x].max())
    # SUVpeak: the sphere's mean at each chosen voxel, on a crop reaching the sphere's extent
    margin = np.asarray(kernel.shape) // 2
    lo_zyx = np.maximum(np.array([z.min(), y.min(), x.min()]) - margin, 0)
    hi_zyx = np.minimum(np.array([z.max(), y.max(), x.max()]) + margin + 1, np.asarray(pet_arr.shape))
    crop = pet_arr[tuple(slice(l, h) for l, h in zip(lo_zyx, hi_zyx))].astype(np.float64)
    means = ndimage.correlate(crop, kernel, mode="constant", cval=0.0)
    suv_peak = float(means[z - lo_zyx[0], y - lo_zyx[1], x - lo_zyx[2]].max())
    return suv_max, suv_peak, len(chosen)


def lesion_statistics(
    label: np.ndarray,
    pet_on_ct: np.ndarray,
    ct: sitk.Image,
    *,
    pet: sitk.Image,
    transform: sitk.Transform | None = None,
    instances: np.ndarray | None = None,
) -> dict:
    """Per-lesion and whole-body statistics of ``label`` (uint8 [z, y, x] on the CT grid).

    ``pet_on_ct`` is the aligned PET (SUV) on the CT grid, ``pet`` the native PET (SUV) and
    ``transform`` the applied registration (CT point -> PET point; identity when None);
    ``instances`` the label's instance map (:func:`lymphatlas_ds.lesions.label_instances`,
    computed here when None). Returns the ``case.json`` "lesions" block: count, tmtv_ml, tlg,
    suv_max, suv_peak, dmax_mm, grids, connectivity, items (per lesion, in instance-id order:
    lesion_id, voxels, volume_ml, suv_max, suv_peak, suv_mean, tlg, suv_max_ct, pet_voxels,
    centroid_lps, bbox_min_xyz, bbox_max_xyz, body_region). ``suv_max_ct`` is the highest value of
    the aligned PET in the mask, kept to compare the two grids.

    Example:
        >>> s = lesion_statistics(label, pet_on_ct, ct, pet=pet_suv, transform=t)  # doctest: +SKIP
        >>> s["items"][0]["lesion_id"], s["items"][0]["body_region"]  # doctest: +SKIP
        (1, 'thorax')
    """
    from lymphatlas_ds.lesions import LESION_CONNECTIVITY

    transform = transform if transform is not None else sitk.Euler3DTransform()
    if instances is None:
        instances, _ = label_instances(label)
    items = _lesion_items(instances, pet_on_ct, ct, pet, transform)
    return dict(_whole_body(items), connectivity=LESION_CONNECTIVITY)


def _label_box(label: np.ndarray) -> tuple[np.ndarray, tuple[slice, ...]]:
    """The first voxel (z, y, x) and the slices of the label's bounding box."""
    nz = np.nonzero(np.any(label, axis=(1, 2)))[0]
    ny = np.nonzero(np.any(label, axis=(0, 2)))[0]
    nx = np.nonzero(np.any(label, axis=(0, 1)))[0]
    lo = np.array([nz[0], ny[0], nx[0]])
    return lo, tuple(slice(a, b + 1) for a, b in zip(lo, (nz[-1], ny[-1], nx[-1])))


def _lesion_items(
    instances: np.ndarray, pet_on_ct: np.ndarray, ct: sitk.Image, pet: sitk.Image, transform: sitk.Transform
) -> list[dict]:
    """One ``items`` entry per lesion of the instance map, in id order (1 = the largest)."""
    pet_arr = sitk.GetArrayViewFromImage(pet)
    kernel = peak_kernel(pet.GetSpacing())
    voxel_ml = float(np.prod(ct.GetSpacing())) / 1000.0
    items: list[dict] = []
    if not np.any(instances):
        return items
    # work inside the lesions' bounding box only: whole-body arrays are ~100 M voxels
    lo, box = _label_box(instances)
    components = instances[box]
    regions = body_regions(ct)
    for index, sl in enumerate(ndimage.find_objects(components), start=1):
        if sl is None:
            continue
        comp = components[sl] == index
        offset = lo + np.array([s.start for s in sl])
        values = np.asarray(pet_on_ct[box][sl][comp], np.float64)
        comp_idx = np.argwhere(comp) + offset  # z, y, x on the CT grid
        native = _native_peaks(comp_idx, ct, pet, pet_arr, transform, kernel)
        item = _lesion_item(comp_idx, values, native, ct, voxel_ml)
        items.append({"lesion_id": index, **item, "body_region": regions(comp_idx.mean(0)).value})
    return items


def _lesion_item(
    comp_idx: np.ndarray, values: np.ndarray, native: tuple[float, float, int] | None, ct: sitk.Image,
    voxel_ml: float,
) -> dict:
    """One lesion's entry from its CT voxels (z, y, x), its aligned-PET values and its native-grid peaks."""
    centre = comp_idx.mean(0)
    centroid = ct.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in centre[::-1]))
    suv_max, suv_peak, n_pet = native if native is not None else (0.0, 0.0, 0)
    volume_ml = float(len(comp_idx)) * voxel_ml
    suv_mean = float(values.mean())
    return {
        "voxels": len(comp_idx),
        "volume_ml": volume_ml,
        "suv_max": suv_max,
        "suv_peak": suv_peak,
        "suv_mean": suv_mean,
        "tlg": suv_mean * volume_ml,
        "suv_max_ct": float(values.max()),
        "pet_voxels": n_pet,
        "centroid_lps": [round(float(c), 3) for c in centroid],
        "bbox_min_xyz": [int(v) for v in comp_idx.min(0)[::-1]],
        "bbox_max_xyz": [int(v) for v in comp_idx.max(0)[::-1]],
    }


LUNG_HU = -400.0
"""Air inside the body below this HU is lung (or airway, bowel gas)."""
BODY_REGION_HU = -500.0
"""The patient's tissue above this HU (as :data:`builder.convert.labels.BODY_HU`)."""
LUNG_SLICE_FRACTION = 0.10
"""A slice belongs to the lungs when its internal air covers at least this fraction of the largest
slice's: the trachea (~2-3 cm2) and bowel gas stay below it, lungs (up to ~250 cm2) above."""
NECK_AREA_FRACTION = 0.5
"""Above the lungs' largest slice, the neck begins where the trunk's cross-section falls below this
fraction of its area there (the shoulders: a neck is about a quarter of a chest)."""
PELVIS_FRACTION = 0.35
"""The abdomen / pelvis boundary lies this fraction of the way from the trunk's bottom (the crotch, or
the CT's last slice) up to the lung base (the iliac crests lie about a third of the way from the
perineum to the diaphragm)."""


def body_regions(ct: sitk.Image) -> Callable[[np.ndarray], BodyRegion]:
    """A function of a CT voxel position (z, y, x, may be fractional) -> its :class:`BodyRegion`.

    A simple, CT-only rule on axial levels (~4 mm in-plane copy of the CT); an approximation of the
    anatomical regions, good to a few centimetres at each boundary, no organ segmentation:

    * **lungs**: per axial slice, the air (< :data:`LUNG_HU`) not connected to the air around the
      patient; lung slices are the contiguous run around the slice with the most of it where it
      covers at least :data:`LUNG_SLICE_FRACTION` of that maximum; their lowest is the lung base;
    * **trunk**: on each slice the body component (> :data:`BODY_REGION_HU`, holes filled) holding
      the body's in-plane centroid on the largest lung slice (above the chest, where the head may not
      hold that point, the largest component); its lowest slice is the crotch (or the CT's last slice);
    * **limbs**: outside the trunk component of its slice (an arm beside the chest, a leg); else
    * **head-neck** above the shoulders (:func:`_neck_slice`), **thorax** from there to the lung base,
      then **abdomen**, and **pelvis** below :data:`PELVIS_FRACTION` of the way from the crotch up to it;
    * **unknown**: no lungs in the CT (a partial field of view): no landmark.
    Levels are physical (LPS S axis), so head-first and feet-first scans read alike.

    Example:
        >>> region = body_regions(ct)  # doctest: +SKIP
        >>> region(np.array([120.0, 256.0, 256.0])).value  # doctest: +SKIP
        'thorax'
    """
    spacing = ct.GetSpacing()
    factors = [max(1, int(round(4.0 / s))) for s in spacing[:2]] + [1]
    small = sitk.GetArrayFromImage(sitk.BinShrink(ct, factors) if factors != [1, 1, 1] else ct)
    filled, lung_area = _body_and_lungs(small)
    nz = len(lung_area)
    if lung_area.max() <= 0:
        return lambda _p: BodyRegion.UNKNOWN
    a = np.asarray(ct.GetDirection(), float).reshape(3, 3) @ np.diag(spacing)
    s_of = lambda k: float(ct.GetOrigin()[2] + a[2, 2] * k)  # noqa: E731 - axial slices: S depends on k only
    up = 1 if a[2, 2] > 0 else -1  # the index step towards the head
    top = int(np.argmax(lung_area))
    keep = lung_area >= LUNG_SLICE_FRACTION * lung_area[top]
    k = top
    while 0 <= k - up < nz and keep[k - up]:
        k -= up
    lung_base = s_of(k)
    trunk = _trunk(filled, top, up)
    k = _neck_slice(trunk, top, up)
    neck = math.inf if k is None else s_of(k) - 0.5 * abs(a[2, 2])  # between the last chest and the first neck slice
    bottom = min(s_of(z) for z in range(nz) if trunk[z].any())
    pelvis_top = bottom + PELVIS_FRACTION * (lung_base - bottom)

    def region(position_zyx: np.ndarray) -> BodyRegion:
        z, y, x = (float(v) for v in position_zyx)
        kz = min(max(int(round(z)), 0), nz - 1)
        j = min(max(int(y // factors[1]), 0), trunk.shape[1] - 1)
        i = min(max(int(x // factors[0]), 0), trunk.shape[2] - 1)
        s = s_of(z)
        if not trunk[kz, j, i]:
            return BodyRegion.LIMBS
        if s > neck:
            return BodyRegion.HEAD_NECK
        if s >= lung_base:
            return BodyRegion.THORAX
        return BodyRegion.ABDOMEN if s > pelvis_top else BodyRegion.PELVIS

    return region


def _body_and_lungs(small: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the body, each axial slice's tissue with its holes filled; the enclosed air per slice) of a CT array."""
    tissue = small > BODY_REGION_HU
    filled = np.zeros_like(tissue)
    lung_area = np.zeros(small.shape[0])
    for z in range(small.shape[0]):
        filled[z] = ndimage.binary_fill_holes(tissue[z])
        lung_area[z] = np.count_nonzero(filled[z] & (small[z] < LUNG_HU))  # air enclosed by the body
    return filled, lung_area


def _trunk(filled: np.ndarray, top: int, up: int) -> np.ndarray:
    """The trunk's component on each slice: the one holding the body's centroid on slice ``top`` (above it,
    where a head may not hold that point, the largest); ``up`` is the index step towards the head."""
    cy, cx = (int(round(float(v))) for v in ndimage.center_of_mass(filled[top]))
    trunk = np.zeros(filled.shape, bool)
    for z in range(filled.shape[0]):
        lab, n = ndimage.label(filled[z])
        if lab[cy, cx]:
            trunk[z] = lab == lab[cy, cx]
        elif n and (z - top) * up > 0:  # above the chest (the vertex, a tilted head): the largest component
            trunk[z] = lab == 1 + int(np.argmax(np.bincount(lab.ravel())[1:]))
    return trunk


def _neck_slice(trunk: np.ndarray, top: int, up: int) -> int | None:
    """The first slice above ``top`` whose trunk area falls below NECK_AREA_FRACTION of it there (None: none)."""
    chest = np.count_nonzero(trunk[top])
    k = top
    while 0 <= k + up < trunk.shape[0]:
        k += up
        if np.count_nonzero(trunk[k]) < NECK_AREA_FRACTION * chest:
            return k
    return None


def _whole_body(items: list[dict]) -> dict:
    """The ``case.json`` "lesions" block: whole-body totals (TMTV, TLG, SUVmax, SUVpeak, Dmax) and ``items``."""
    dmax = 0.0
    if len(items) > 1:
        c = np.array([it["centroid_lps"] for it in items])
        dmax = float(np.sqrt(((c[:, None, :] - c[None, :, :]) ** 2).sum(-1)).max())
    return {
        "count": len(items),
        "tmtv_ml": float(sum(it["volume_ml"] for it in items)),
        "tlg": float(sum(it["volume_ml"] * it["suv_mean"] for it in items)),
        "suv_max": float(max((it["suv_max"] for it in items), default=0.0)),
        "suv_peak": float(max((it["suv_peak"] for it in items), default=0.0)),
        "dmax_mm": dmax,
        "grids": dict(GRIDS),
        "items": items,
    }


__all__ = ["GRIDS", "PET_VOXEL_MIN_COVER", "SUV_PEAK_VOLUME_ML", "body_regions", "lesion_statistics", "peak_kernel"]
