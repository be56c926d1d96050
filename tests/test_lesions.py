"""builder.convert.lesions: lesion statistics on the grid clinical practice reads them on, against lesions
whose voxels and activity the test sets itself."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from builder.convert import lesions
from tests.support.small_data import grid, image_like


def test_volumes_mean_tlg_centroids_and_dmax_on_the_ctgrid() -> None:
    ct = grid((60, 50, 40), (2.0, 2.0, 4.0), (10.0, 20.0, 30.0))  # 16 ul voxels
    shape = ct.GetSize()[::-1]
    label = np.zeros(shape, np.uint8)
    pet = np.full(shape, 1.0, np.float32)
    label[5:10, 10:16, 10:17] = 1  # lesion A: 5 x 6 x 7 voxels of SUV 4, one voxel of 9
    pet[5:10, 10:16, 10:17] = 4.0
    pet[7, 12, 13] = 9.0
    label[30:33, 40:43, 50:53] = 1  # lesion B: 3 x 3 x 3 of SUV 2, far away
    pet[30:33, 40:43, 50:53] = 2.0
    # the native PET is this same grid here (identity transform)
    s = lesions.lesion_statistics(label, pet, ct, pet=image_like(pet, ct))
    voxel_ml = 2.0 * 2.0 * 4.0 / 1000.0
    assert s["count"] == 2
    a, b = s["items"]  # largest first
    assert a["voxels"] == 210 and a["volume_ml"] == pytest.approx(210 * voxel_ml)
    assert a["suv_max"] == pytest.approx(9.0) and a["suv_max_ct"] == pytest.approx(9.0)
    assert a["suv_mean"] == pytest.approx((209 * 4.0 + 9.0) / 210)
    assert b["voxels"] == 27 and b["suv_max"] == pytest.approx(2.0) and b["suv_mean"] == pytest.approx(2.0)
    np.testing.assert_allclose(a["centroid_lps"], [10 + 2 * 13, 20 + 2 * 12.5, 30 + 4 * 7], atol=1e-6)
    np.testing.assert_allclose(b["centroid_lps"], [10 + 2 * 51, 20 + 2 * 41, 30 + 4 * 31], atol=1e-6)
    assert s["tmtv_ml"] == pytest.approx(237 * voxel_ml)
    assert s["tlg"] == pytest.approx(210 * voxel_ml * a["suv_mean"] + 27 * voxel_ml * 2.0)
    assert s["suv_max"] == pytest.approx(9.0)
    assert s["dmax_mm"] == pytest.approx(np.linalg.norm(np.subtract(a["centroid_lps"], b["centroid_lps"])))
    # each item's own TLG, id and box (z, y, x slices above, written x, y, z); a CT without lungs has
    # no landmark: region unknown; 26-connected components (the label table's rule)
    assert (a["lesion_id"], b["lesion_id"]) == (1, 2)
    assert a["tlg"] == pytest.approx(210 * voxel_ml * a["suv_mean"]) and b["tlg"] == pytest.approx(27 * voxel_ml * 2.0)
    assert (a["bbox_min_xyz"], a["bbox_max_xyz"]) == ([10, 10, 5], [16, 15, 9])
    assert (b["bbox_min_xyz"], b["bbox_max_xyz"]) == ([50, 40, 30], [52, 42, 32])
    assert a["body_region"] == b["body_region"] == "unknown"
    assert s["connectivity"] == 26
    assert s["grids"] == {"volume_ml": "ct", "suv_mean": "ct", "tlg": "ct", "suv_max": "pet", "suv_peak": "pet",
                          "dmax_mm": "ct", "body_region": "ct"}


def test_suvmax_is_read_on_the_native_pet_through_the_transform() -> None:
    # CT 2 mm, PET 4 mm; the PET shows the anatomy moved by +8 mm in x (two PET voxels)
    ct = grid((40, 40, 40), (2.0, 2.0, 2.0))
    # PET voxel faces on CT voxel faces (odd mm), so each CT voxel lies in one PET voxel
    pet_grid = grid((24, 20, 20), (4.0, 4.0, 4.0), (-3.0, 1.0, 1.0))
    label = np.zeros(ct.GetSize()[::-1], np.uint8)
    label[18:22, 18:22, 18:22] = 1  # an 8 mm cube: voxels 35-43 mm on every axis
    pet = np.ones(pet_grid.GetSize()[::-1], np.float32)
    # moved by +8 mm in x: x 43-51 mm = PET x voxels 12-13; y, z 35-43 mm = PET voxels 9-10
    pet[9:11, 9:11, 12:14] = 6.0
    pet[10, 10, 13] = 7.5  # the lesion's hottest voxel
    pet[10, 10, 15] = 50.0  # a hot neighbour outside the lesion (the bladder next door)
    pet[10, 10, 10] = 40.0  # where the lesion would be read without the transform
    shift = sitk.TranslationTransform(3, (8.0, 0.0, 0.0))
    s = lesions.lesion_statistics(label, np.zeros(label.shape, np.float32), ct, pet=image_like(pet, pet_grid),
                                  transform=shift)
    (item,) = s["items"]
    assert item["suv_max"] == pytest.approx(7.5)
    assert item["pet_voxels"] == 8  # each 4 mm voxel of the lesion fully covered by the 2 mm mask
    without = lesions.lesion_statistics(label, np.zeros(label.shape, np.float32), ct, pet=image_like(pet, pet_grid))
    assert without["items"][0]["suv_max"] == pytest.approx(40.0)


def test_lesion_smaller_than_half_a_pet_voxel_keeps_the_voxel_it_covers() -> None:
    ct = grid((40, 40, 40), (1.0, 1.0, 1.0))
    pet_grid = grid((10, 10, 10), (4.0, 4.0, 4.0))
    label = np.zeros(ct.GetSize()[::-1], np.uint8)
    label[19:21, 19:21, 19:21] = 1  # 8 ul in one 64 ul PET voxel: cover 1/8
    pet = np.ones(pet_grid.GetSize()[::-1], np.float32)
    pet[5, 5, 5] = 3.0  # the PET voxel holding points 18-22 mm
    s = lesions.lesion_statistics(label, np.zeros(label.shape, np.float32), ct, pet=image_like(pet, pet_grid))
    assert s["items"][0]["suv_max"] == pytest.approx(3.0) and s["items"][0]["pet_voxels"] == 1


@pytest.mark.parametrize("pet_mm", [2.0, 4.0, 5.0])
def test_suvpeak_of_a_linear_ramp_is_the_ramp_at_the_sphere_centre(pet_mm: float) -> None:
    # a symmetric averaging sphere reads a linear field at its centre, whatever the voxel size
    ct = grid((50, 50, 50), (2.0, 2.0, 2.0))
    n = int(100 / pet_mm)
    pet_grid = grid((n, n, n), (pet_mm, pet_mm, pet_mm), (0.3, 0.3, 0.3))
    label = np.zeros(ct.GetSize()[::-1], np.uint8)
    label[15:35, 15:35, 15:35] = 1  # voxels 29-69 mm on every axis
    z, y, x = np.indices(pet_grid.GetSize()[::-1]) * pet_mm + 0.3
    pet = 2.0 + 0.05 * x + 0.02 * y + 0.01 * z
    s = lesions.lesion_statistics(label, np.zeros(label.shape, np.float32), ct, pet=image_like(pet, pet_grid))
    item = s["items"][0]
    # SUVmax: a PET voxel whose centre lies within half a voxel of the lesion (29-69 mm), none hotter
    near = (x >= 29 - pet_mm / 2) & (x <= 69 + pet_mm / 2) & (y >= 29 - pet_mm / 2) & (y <= 69 + pet_mm / 2) \
        & (z >= 29 - pet_mm / 2) & (z <= 69 + pet_mm / 2)
    assert np.isclose(pet[near], item["suv_max"], rtol=1e-6).any()
    assert item["suv_max"] <= pet[near].max() * (1 + 1e-6)
    # the sphere is centred on that voxel, and inside the ramp it reads the ramp there
    assert item["suv_peak"] == pytest.approx(item["suv_max"], rel=1e-6)


@pytest.mark.parametrize("spacing", [(4.0, 4.0, 4.0), (2.0, 2.0, 3.0), (4.07, 4.07, 2.0), (0.5, 0.5, 0.5)])
def test_suvpeak_sphere_holds_1_ml(spacing) -> None:
    fractions = lesions.peak_kernel(spacing, normalise=False)
    assert fractions.sum() * np.prod(spacing) / 1000.0 == pytest.approx(1.0, rel=0.01)


def test_suvpeak_sphere_has_the_radius_of_1_ml() -> None:
    k = lesions.peak_kernel((0.5, 0.5, 0.5))
    r = (3 * 1000.0 / (4 * math.pi)) ** (1 / 3)  # 6.2 mm
    zz, yy, xx = (np.indices(k.shape) - np.asarray(k.shape)[:, None, None, None] // 2) * 0.5
    # a ball's mean squared radius is 3/5 r^2; a radius 0.1 mm off moves it by 3 %
    assert float((k * (zz**2 + yy**2 + xx**2)).sum()) == pytest.approx(0.6 * r * r, rel=0.01)


def test_suvpeak_of_a_single_hot_voxel_is_diluted_by_the_sphere() -> None:
    ct = grid((40, 40, 40), (2.0, 2.0, 2.0))
    label = np.zeros(ct.GetSize()[::-1], np.uint8)
    label[10:30, 10:30, 10:30] = 1
    pet = np.where(label > 0, 5.0, 1.0).astype(np.float32)
    pet[20, 20, 20] = 50.0
    s = lesions.lesion_statistics(label, pet, ct, pet=image_like(pet, ct))
    item = s["items"][0]
    w_centre = lesions.peak_kernel((2.0, 2.0, 2.0))[3, 3, 3]
    assert item["suv_max"] == pytest.approx(50.0)
    assert item["suv_peak"] == pytest.approx(5.0 + 45.0 * w_centre, rel=1e-9)
    assert w_centre == pytest.approx(8.0 / 1000.0, rel=0.01)  # a fully covered 8 ul voxel of a 1 ml sphere


def test_empty_label_and_lesion_outside_the_pet() -> None:
    ct = grid((8, 8, 8), (1.0, 1.0, 1.0))
    s = lesions.lesion_statistics(np.zeros((8, 8, 8), np.uint8), np.ones((8, 8, 8), np.float32), ct,
                                  pet=image_like(np.ones((8, 8, 8)), ct))
    assert (s["count"], s["tmtv_ml"], s["tlg"], s["suv_max"], s["dmax_mm"], s["items"]) == (0, 0.0, 0.0, 0.0, 0.0, [])
    label = np.zeros((8, 8, 8), np.uint8)
    label[2, 2, 2] = label[3, 3, 3] = 1  # corner-connected: 26-connectivity joins them
    far = grid((4, 4, 4), (1.0, 1.0, 1.0), (100.0, 0.0, 0.0))
    s = lesions.lesion_statistics(label, np.ones((8, 8, 8), np.float32), ct, pet=image_like(np.ones((4, 4, 4)), far))
    assert s["count"] == 1 and s["items"][0]["suv_max"] == 0.0 and s["items"][0]["pet_voxels"] == 0


# --- cases the mutation run (scripts/mutation.sh) found unchecked ------------------------------------------


def test_nothing_found_reads_zero_everywhere() -> None:
    ct = grid((8, 8, 8), (1.0, 1.0, 1.0))
    s = lesions.lesion_statistics(np.zeros((8, 8, 8), np.uint8), np.ones((8, 8, 8), np.float32), ct,
                                  pet=image_like(np.ones((8, 8, 8)), ct))
    assert s["suv_peak"] == 0.0
    label = np.zeros((8, 8, 8), np.uint8)
    label[2:4, 2:4, 2:4] = 1
    far = grid((4, 4, 4), (1.0, 1.0, 1.0), (100.0, 0.0, 0.0))
    s = lesions.lesion_statistics(label, np.ones((8, 8, 8), np.float32), ct, pet=image_like(np.ones((4, 4, 4)), far))
    assert (s["items"][0]["suv_peak"], s["suv_peak"], s["dmax_mm"]) == (0.0, 0.0, 0.0)


def test_a_pet_voxel_half_covered_belongs_to_the_lesion_and_a_less_covered_one_does_not() -> None:
    # CT 2 mm, PET 4 mm with faces on CT faces: a 2 x 4 x 4 mm part of the mask covers half a PET voxel
    ct = grid((20, 20, 20), (2.0, 2.0, 2.0))
    pet_grid = grid((10, 10, 10), (4.0, 4.0, 4.0), (1.0, 1.0, 1.0))  # PET voxel k spans 4k - 1 .. 4k + 3 mm
    label = np.zeros(ct.GetSize()[::-1], np.uint8)
    label[8:12, 8:12, 8:12] = 1  # 15-23 mm: PET voxels 4 and 5 fully on every axis
    label[8:12, 8:12, 12] = 1  # x 23-25 mm: half of PET x voxel 6 (23-27 mm)
    label[8:10, 8:10, 13] = 1  # x 25-27 mm, y and z half: with the row above, PET y/z voxel 4 of x 6 -> 5/8
    pet = np.ones(pet_grid.GetSize()[::-1], np.float32)
    pet[4:6, 4:6, 4:6] = 3.0
    pet[5, 5, 6] = 8.0  # covered by half: in the lesion
    pet[4:6, 4:6, 7] = 50.0  # not covered at all
    s = lesions.lesion_statistics(label, np.zeros(label.shape, np.float32), ct, pet=image_like(pet, pet_grid))
    (item,) = s["items"]
    assert item["pet_voxels"] == 8 + 4 and item["suv_max"] == pytest.approx(8.0)
    pet[5, 5, 6] = 1.0
    pet[4, 4, 6] = 9.0  # 5/8 covered: in the lesion
    s = lesions.lesion_statistics(label, np.zeros(label.shape, np.float32), ct, pet=image_like(pet, pet_grid))
    assert s["items"][0]["suv_max"] == pytest.approx(9.0)


def test_a_lesion_on_the_pet_border_reads_its_voxels_and_no_activity_beyond_the_field_of_view() -> None:
    ct = grid((12, 12, 12), (2.0, 2.0, 2.0))
    label = np.zeros((12, 12, 12), np.uint8)
    label[0:3, 0:2, 0:4] = 1  # in the corner voxel (0, 0, 0) of the PET, which is this same grid
    pet = np.full((12, 12, 12), 4.0, np.float32)
    pet[0, 0, 0] = 6.0
    s = lesions.lesion_statistics(label, pet, ct, pet=image_like(pet, ct))
    (item,) = s["items"]
    assert item["suv_max"] == pytest.approx(6.0) and item["pet_voxels"] == 24
    # the sphere reaches past the volume there: outside counts as no activity (the kernel's own weights)
    k = lesions.peak_kernel((2.0, 2.0, 2.0))
    h = k.shape[0] // 2
    best = 0.0
    for z, y, x in np.argwhere(label):
        window = np.zeros_like(k)
        lo = np.array([z, y, x]) - h
        src = tuple(slice(max(a, 0), a + 2 * h + 1) for a in lo)
        dst = tuple(slice(max(-a, 0), max(-a, 0) + (s_.stop - s_.start)) for a, s_ in zip(lo, src))
        window[dst] = pet[src][tuple(slice(0, d.stop - d.start) for d in dst)]
        best = max(best, float((window * k).sum()))
    assert item["suv_peak"] == pytest.approx(best, rel=1e-9) and best < 4.0 - 0.1  # every sphere reaches out
    last = np.zeros((12, 12, 12), np.uint8)
    last[11, 11, 11] = 1  # the PET's last voxel
    assert lesions.lesion_statistics(last, pet, ct, pet=image_like(pet, ct))["items"][0]["pet_voxels"] == 1


def test_suvpeak_off_centre_in_each_axis_and_centroids_to_the_micrometre() -> None:
    ct = grid((40, 36, 32), (2.0, 2.0, 2.0), (0.1234, -3.4567, 7.8912))
    label = np.zeros(ct.GetSize()[::-1], np.uint8)
    label[3:29, 6:30, 9:37] = 1
    pet = np.where(label > 0, 2.0, 1.0).astype(np.float32)
    pet[5:18, 14:27, 11:24] = 10.0  # a 26 mm cube, at different offsets along z, y and x
    pet[20, 8, 30] = 30.0
    s = lesions.lesion_statistics(label, pet, ct, pet=image_like(pet, ct))
    (item,) = s["items"]
    assert item["suv_max"] == pytest.approx(30.0) and item["suv_peak"] == pytest.approx(10.0, rel=1e-6)
    want = [0.1234 + 2 * 22.5, -3.4567 + 2 * 17.5, 7.8912 + 2 * 15.5]
    assert item["centroid_lps"] == [round(v, 3) for v in want]


def test_peak_kernel_axes_follow_the_spacing() -> None:
    # spacing x 1, y 2, z 4 mm: the 6.2 mm sphere reaches into the voxels whose near face is within
    # 6.2 mm of the centre: 6, 3 and 2 voxels (faces at 5.5, 5 and 6 mm)
    k = lesions.peak_kernel((1.0, 2.0, 4.0), normalise=False)
    assert k.shape == (5, 7, 13)
    assert k[0].sum() < k[1].sum() and k[:, 0].sum() < k[:, 3].sum()


def test_statistics_through_a_bspline_refinement_read_where_it_maps() -> None:
    # a refinement with no displacement on top of a shift: the same PET voxels as the shift alone
    ct = grid((20, 20, 20), (2.0, 2.0, 2.0))
    label = np.zeros((20, 20, 20), np.uint8)
    label[8:12, 8:12, 8:12] = 1
    pet = np.ones((20, 20, 20), np.float32)
    pet[8:12, 8:12, 12:16] = 5.0
    pet[9, 10, 14] = 7.0
    shift = sitk.TranslationTransform(3, (8.0, 0.0, 0.0))
    bspline = sitk.BSplineTransformInitializer(ct, [2, 2, 2], order=3)
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(shift)
    composite.AddTransform(bspline)
    s = lesions.lesion_statistics(label, np.zeros(label.shape, np.float32), ct, pet=image_like(pet, ct), transform=composite)
    assert s["items"][0]["suv_max"] == pytest.approx(7.0) and s["items"][0]["pet_voxels"] == 64


def test_a_pet_voxel_the_mask_barely_touches_is_not_read_and_a_tiny_lesion_keeps_its_most_covered_voxel() -> None:
    ct = grid((20, 20, 20), (2.0, 2.0, 2.0))
    pet_grid = grid((10, 10, 10), (4.0, 4.0, 4.0), (1.0, 1.0, 1.0))  # PET voxel k spans 4k - 1 .. 4k + 3 mm
    label = np.zeros(ct.GetSize()[::-1], np.uint8)
    label[8:12, 8:12, 8:12] = 1  # PET voxels 4-5 on every axis, fully
    label[8, 8, 12] = 1  # one 8 ul CT voxel in PET voxel (4, 4, 6): 1/8 covered
    pet = np.ones(pet_grid.GetSize()[::-1], np.float32)
    pet[4:6, 4:6, 4:6] = 3.0
    pet[4, 4, 6] = 40.0
    s = lesions.lesion_statistics(label, np.zeros(label.shape, np.float32), ct, pet=image_like(pet, pet_grid))
    assert s["items"][0]["pet_voxels"] == 8 and s["items"][0]["suv_max"] == pytest.approx(3.0)
    tiny = np.zeros(ct.GetSize()[::-1], np.uint8)
    tiny[8, 8, 11:13] = 1  # x 21-25 mm: one CT voxel in PET x voxel 5, one in 6
    tiny[8, 9, 12] = 1  # a second one in PET x voxel 6: it is covered most (2/8)
    pet[4, 4, 5], pet[4, 4, 6] = 30.0, 2.0
    s = lesions.lesion_statistics(tiny, np.zeros(tiny.shape, np.float32), ct, pet=image_like(pet, pet_grid))
    assert s["items"][0]["pet_voxels"] == 1 and s["items"][0]["suv_max"] == pytest.approx(2.0)


def test_a_lesion_reaching_one_voxel_past_the_pets_last_index_reads_only_the_voxels_inside() -> None:
    # CT 12^3 and PET 10^3 on the same 2 mm grid: CT voxels 10 and 11 lie beyond the PET's last index 9
    ct = grid((12, 12, 12), (2.0, 2.0, 2.0))
    pet_grid = grid((10, 10, 10), (2.0, 2.0, 2.0))
    label = np.zeros((12, 12, 12), np.uint8)
    label[7:11, 8:11, 6:11] = 1  # z 7-10, y 8-10, x 6-10: index 10 is one past the PET on every axis
    pet = np.ones((10, 10, 10), np.float32)
    pet[7:10, 8:10, 6:10] = 3.0
    pet[9, 9, 9] = 7.0  # the last voxel of the PET, in the lesion
    s = lesions.lesion_statistics(label, np.zeros(label.shape, np.float32), ct, pet=image_like(pet, pet_grid))
    (item,) = s["items"]
    assert item["voxels"] == 4 * 3 * 5 and item["pet_voxels"] == 3 * 2 * 4  # the PET part only
    assert item["suv_max"] == pytest.approx(7.0)
    label[:] = 0
    label[10:12, 10:12, 10:12] = 1  # wholly beyond the PET's last index: nothing is read
    s = lesions.lesion_statistics(label, np.zeros(label.shape, np.float32), ct, pet=image_like(pet, pet_grid))
    assert (s["items"][0]["pet_voxels"], s["items"][0]["suv_max"], s["items"][0]["suv_peak"]) == (0, 0.0, 0.0)


def test_suvpeak_at_the_far_corner_of_a_lesion_is_read_where_it_is_on_every_axis() -> None:
    # the crop around the lesion starts at a different index on each axis (7, 9, 11): a peak read at
    # positions shifted by another axis' start misses the lesion's far corner, where a ramp rising
    # along z, y and x peaks (a symmetric sphere's mean on a ramp is the ramp at its centre)
    ct = grid((30, 30, 30), (2.0, 2.0, 2.0))
    label = np.zeros((30, 30, 30), np.uint8)
    label[10:20, 12:22, 14:24] = 1
    z, y, x = np.meshgrid(*(np.arange(30.0),) * 3, indexing="ij")
    pet = (1.0 + 0.5 * z + 0.3 * y + 0.2 * x).astype(np.float32)
    s = lesions.lesion_statistics(label, pet, ct, pet=image_like(pet, ct))
    corner = 1.0 + 0.5 * 19 + 0.3 * 21 + 0.2 * 23
    assert s["items"][0]["suv_peak"] == pytest.approx(corner, rel=1e-5)
    assert s["items"][0]["suv_max"] == pytest.approx(corner, rel=1e-6)
