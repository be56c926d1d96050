"""builder.align: registration recovers a known rigid misalignment; resampling against peers.

The phantoms are made here: a body with lungs, spine and hot nodes defined as functions of the
physical point, sampled on a CT grid, and on a PET grid through a known transform (anatomy at
CT point p appears at PET point M p). The truth is M itself.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from builder import align
from builder.align import AlignSettings, Deformable, Interpolation, Method

NODES = [((40.0, -20.0, 120.0), 12.0), ((-55.0, 25.0, 60.0), 9.0), ((20.0, 50.0, 170.0), 14.0)]


def _sig(d: np.ndarray, width: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(d / width, -50, 50)))


def _anatomy(p: np.ndarray, width: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Body, lungs and spine as fractions in [0, 1]: hard (width 0, for the CT) or with edges
    blurred over ``width`` mm (for the PET, so that sampling it on a coarse grid adds no bias)."""
    x, y, z = p[..., 0], p[..., 1], p[..., 2]

    def inside(d):  # d: signed distance in mm, positive inside
        return (d > 0).astype(float) if width == 0 else _sig(d, width)

    body = inside(100.0 * (1.0 - np.sqrt((x / 150.0) ** 2 + (y / 100.0) ** 2)))
    lung_l = 40.0 * (1.0 - np.sqrt(((x - 60) / 40.0) ** 2 + ((y + 10) / 45.0) ** 2))
    lung_r = 40.0 * (1.0 - np.sqrt(((x + 60) / 40.0) ** 2 + ((y + 10) / 45.0) ** 2))
    # z limits on CT voxel boundaries (3 mm grid from 0) so the hard CT has no half-voxel bias
    lungs = inside(np.maximum(lung_l, lung_r)) * inside(z - 91.5) * inside(190.5 - z) * body
    spine = inside(14.0 * (1.0 - np.sqrt((x / 14.0) ** 2 + ((y - 65) / 14.0) ** 2))) * body
    return body, lungs, spine


def _nodes(p: np.ndarray, width: float) -> np.ndarray:
    out = np.zeros(p.shape[:-1])
    for c, r in NODES:
        out = np.maximum(out, _sig(r - np.sqrt(((p - np.asarray(c)) ** 2).sum(-1)), width))
    return out


def _points(image: sitk.Image) -> np.ndarray:
    size = image.GetSize()
    k, j, i = np.meshgrid(*[np.arange(n, dtype=float) for n in size[::-1]], indexing="ij")
    idx = np.stack([i, j, k], -1)
    a = align.affine_lps(image)
    return idx @ a[:3, :3].T + a[:3, 3]


def make_ct(size=(112, 80, 80), spacing=(3.0, 3.0, 3.0)) -> sitk.Image:
    img = sitk.Image(size, sitk.sitkInt16)
    img.SetSpacing(spacing)
    img.SetOrigin((-(size[0] - 1) * spacing[0] / 2, -(size[1] - 1) * spacing[1] / 2, 0.0))
    body, lungs, spine = (a > 0.5 for a in _anatomy(_points(img)))
    arr = np.full(body.shape, -1000, np.int16)
    arr[body] = 40
    arr[lungs] = -820
    arr[spine] = 650
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    return out


def make_pet(m: np.ndarray, size=(84, 60, 80), spacing=(4.0, 4.0, 4.0), noise=0.03, seed=0, z0=-40.0) -> sitk.Image:
    """PET (SUV) of the phantom as seen through ``m`` (CT point -> PET point); by default its
    axial field of view reaches beyond the CT's at both ends, as on a PET/CT scanner."""
    img = sitk.Image(size, sitk.sitkFloat32)
    img.SetSpacing(spacing)
    img.SetOrigin((-(size[0] - 1) * spacing[0] / 2, -(size[1] - 1) * spacing[1] / 2, z0))
    pts = _points(img)
    minv = np.linalg.inv(m)
    anat = pts @ minv[:3, :3].T + minv[:3, 3]
    body, lungs, spine = _anatomy(anat, width=2.0)
    a = body * (1.0 - 0.65 * lungs + 0.6 * spine)
    a = np.maximum(a, 7.0 * _nodes(anat, 2.0)).astype(np.float32)
    out = sitk.GetImageFromArray(a)
    out.CopyInformation(img)
    a += np.random.default_rng(seed).normal(0, noise, a.shape).astype(np.float32) * (a > 0.05)
    res = sitk.GetImageFromArray(np.clip(a, 0, None))
    res.CopyInformation(out)
    return res


def euler(rot_deg, trans_mm, center=(0.0, 0.0, 120.0)) -> sitk.Euler3DTransform:
    t = sitk.Euler3DTransform()
    t.SetCenter(center)
    t.SetRotation(*np.deg2rad(rot_deg))
    t.SetTranslation(trans_mm)
    return t


def body_image(ct: sitk.Image) -> sitk.Image:
    from builder.labels import body_mask

    b = sitk.GetImageFromArray(body_mask(ct).astype(np.uint8))
    b.CopyInformation(ct)
    return b


@pytest.fixture(scope="module")
def ct() -> sitk.Image:
    return make_ct()


def _node_errors(found: sitk.Transform, truth: np.ndarray) -> np.ndarray:
    errs = []
    for c, _ in NODES:
        p = np.array(found.TransformPoint(c))
        q = truth[:3, :3] @ np.asarray(c) + truth[:3, 3]
        errs.append(np.linalg.norm(p - q))
    return np.asarray(errs)


def test_transform_matrix_matches_simpleitk() -> None:
    t = euler((1.0, -2.0, 0.5), (3.0, -4.0, 5.0), center=(10.0, 20.0, 30.0))
    m = align.transform_matrix(t)
    for p in [(0.0, 0.0, 0.0), (100.0, -50.0, 300.0)]:
        np.testing.assert_allclose(m[:3, :3] @ p + m[:3, 3], t.TransformPoint(p), atol=1e-9)


@pytest.mark.parametrize(
    "rot,trans",
    [((0.0, 0.0, 1.0), (6.0, 4.0, -3.0)), ((2.0, -1.5, 2.0), (-8.0, 5.0, 6.0))],
    ids=["6-4-3mm-1deg", "8mm-2deg"],
)
def test_rigid_registration_recovers_known_misalignment(ct, rot, trans) -> None:
    truth = euler(rot, trans)
    m = align.transform_matrix(truth)
    pet = make_pet(m)
    res = align.align_pet(ct, pet, settings=AlignSettings(deformable=Deformable.OFF), body=body_image(ct))
    errors = _node_errors(res.transform, m)
    assert errors.mean() < 1.5, errors
    assert res.record["method"] == Method.RIGID.value
    assert res.record["improved"] is True
    assert res.record["metric_after"] < res.record["metric_before"]
    # the recorded matrix is the applied CT -> PET mapping
    np.testing.assert_allclose(np.asarray(res.record["transform"]["matrix"]), align.transform_matrix(res.transform), atol=1e-5)
    # the hot nodes of the resampled PET sit on the CT's node positions
    pet_on_ct = sitk.GetArrayFromImage(res.pet_on_ct)
    for c, _ in NODES:
        idx = np.round(ct.TransformPhysicalPointToContinuousIndex(c)).astype(int)
        assert pet_on_ct[idx[2], idx[1], idx[0]] > 5.0


def test_no_misalignment_moves_less_than_half_a_millimetre(ct) -> None:
    pet = make_pet(np.eye(4))
    res = align.align_pet(ct, pet, settings=AlignSettings(deformable=Deformable.OFF), body=body_image(ct))
    assert res.record["shift_mm"] < 0.5
    assert _node_errors(res.transform, np.eye(4)).max() < 0.5


def test_registration_that_worsens_the_metric_keeps_scanner_alignment(ct, monkeypatch) -> None:
    pet = make_pet(np.eye(4))

    def bad(*args, **kwargs):  # an optimiser that ran away: 20 mm off
        return euler((0, 0, 0), (20.0, 0.0, 0.0))

    monkeypatch.setattr(align, "register_rigid", bad)
    res = align.align_pet(ct, pet, settings=AlignSettings(deformable=Deformable.OFF), body=body_image(ct))
    assert res.record["method"] == "scanner"
    assert res.record["improved"] is False
    assert "kept" in res.record["decision"]
    assert res.record["metric_after"] == res.record["metric_before"]
    assert res.record["shift_mm"] == 0.0


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_registration_is_deterministic(ct, threads) -> None:
    pet = make_pet(align.transform_matrix(euler((0, 0, 1.0), (5.0, -3.0, 2.0))))
    s = AlignSettings(deformable=Deformable.OFF)
    reference = align.align_pet(ct, pet, settings=s, body=body_image(ct)).record
    old = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    try:  # the result must not depend on the machine's core count or on thread timing
        runs = [align.align_pet(ct, pet, settings=s, body=body_image(ct)).record for _ in range(3)]
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(old)
    assert all(r == reference for r in runs)


def test_deformable_on_records_bspline_and_never_worsens(ct) -> None:
    m = align.transform_matrix(euler((0, 0, 1.0), (4.0, 2.0, -2.0)))
    pet = make_pet(m)
    res = align.align_pet(ct, pet, settings=AlignSettings(deformable=Deformable.ON), body=body_image(ct))
    assert "metric_bspline" in res.record
    assert res.record["metric_after"] <= res.record["metric_rigid"]
    assert res.record["method"] in ("rigid", "rigid+bspline")
    assert _node_errors(res.transform, m).mean() < 2.0


@pytest.mark.parametrize("interpolation", [Interpolation.CUBIC, Interpolation.CUBIC_TWO_STEP])
def test_resample_outside_fov_is_zero_and_never_negative(ct, interpolation) -> None:
    pet = make_pet(np.eye(4), size=(84, 60, 30), z0=0.0)  # PET covers z 0..116 mm; CT reaches 237 mm
    fine_ct = make_ct(size=(224, 160, 80), spacing=(1.5, 1.5, 3.0))  # finer than the PET: two-step upsamples
    out = sitk.GetArrayFromImage(align.resample_to_reference(pet, fine_ct, interpolation=interpolation))
    z_mm = np.arange(out.shape[0]) * ct.GetSpacing()[2]
    assert np.all(out[z_mm > 116.0 + 2.0 + 1e-6] == 0)  # the last PET voxel reaches half a voxel (2 mm) past its centre
    assert out.min() >= 0.0
    assert out[z_mm < 100].max() > 5.0


def test_two_step_cubic_is_closer_to_direct_cubic_than_linear_is() -> None:
    # a fine CT grid (1.5 mm) and a coarse PET (4 mm), rotated: the case where it matters
    ct = make_ct(size=(160, 120, 40), spacing=(1.5, 1.5, 3.0))
    pet = make_pet(np.eye(4), noise=0.0)
    t = euler((0.0, 0.0, 1.5), (2.0, -1.0, 0.0))
    ref = sitk.GetArrayFromImage(align.resample_to_reference(pet, ct, t, interpolation=Interpolation.CUBIC_DIRECT))
    two = sitk.GetArrayFromImage(align.resample_to_reference(pet, ct, t, interpolation=Interpolation.CUBIC_TWO_STEP))
    lin = sitk.GetArrayFromImage(align.resample_to_reference(pet, ct, t, interpolation=Interpolation.LINEAR))
    inside = ref > 0.05
    err_two = np.abs(two - ref)[inside].mean()
    err_lin = np.abs(lin - ref)[inside].mean()
    assert err_two < 0.6 * err_lin, (err_two, err_lin)
    assert abs(two.max() - ref.max()) < 0.02 * ref.max()


def test_upsample_cubic2_matches_simpleitk_bspline_inside() -> None:
    rng = np.random.default_rng(3)
    arr = ndimage_smooth(rng.normal(size=(12, 14, 16)).astype(np.float32))
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((2.0, 3.0, 4.0))
    img.SetOrigin((5.0, -7.0, 11.0))
    up = align.upsample_cubic2(img, (True, True, False))
    assert up.GetSize() == (31, 27, 12)
    assert up.GetOrigin() == img.GetOrigin()
    peer = sitk.GetArrayFromImage(sitk.Resample(img, up, sitk.Transform(), sitk.sitkBSpline, 0.0, sitk.sitkFloat32))
    mine = sitk.GetArrayFromImage(up)
    # away from the borders (boundary conditions differ) both are the same cubic B-spline
    inner = (slice(None), slice(8, -8), slice(8, -8))
    np.testing.assert_allclose(mine[inner], peer[inner], atol=2e-3)
    # original nodes are kept exactly
    np.testing.assert_allclose(mine[:, ::2, ::2], arr, atol=1e-5)


def ndimage_smooth(a: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter(a, 1.5).astype(np.float32)
