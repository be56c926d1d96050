"""builder.convert.align: registration recovers a known rigid misalignment; resampling against peers.

The phantoms are made here: a body with lungs, spine and hot nodes defined as functions of the
physical point, sampled on a CT grid, and on a PET grid through a known transform (anatomy at
CT point p appears at PET point M p). The truth is M itself.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from builder.convert import align
from builder.convert.align import AlignSettings, Deformable, Interpolation, Method

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
    from builder.convert.labels import body_mask

    b = sitk.GetImageFromArray(body_mask(ct).astype(np.uint8))
    b.CopyInformation(ct)
    return b


@pytest.fixture(scope="module")
def ct() -> sitk.Image:
    return make_ct()


@pytest.fixture(scope="module")
def registered(ct):
    """(PET, align_pet's result) of the phantom misaligned by ``rot`` degrees and ``trans`` mm, rigid only:
    registered once per module, shared by the recovery and determinism tests."""
    done: dict = {}

    def get(rot, trans):
        if (rot, trans) not in done:
            pet = make_pet(align.transform_matrix(euler(rot, trans)))
            done[rot, trans] = pet, align.align_pet(ct, pet, settings=AlignSettings(deformable=Deformable.OFF),
                                                    body=body_image(ct))
        return done[rot, trans]

    return get


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
def test_rigid_registration_recovers_known_misalignment(ct, registered, rot, trans) -> None:
    m = align.transform_matrix(euler(rot, trans))
    _, res = registered(rot, trans)
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


def test_registration_is_deterministic(ct, registered) -> None:
    # the recovery test's registration is the reference: the same record at 1, 2 and 3 threads, and twice
    # at 3 (thread timing); 4 registrations besides the shared one (12 when each thread count made its own)
    pet, reference = registered((0.0, 0.0, 1.0), (6.0, 4.0, -3.0))
    s = AlignSettings(deformable=Deformable.OFF)
    old = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    runs = {}
    try:  # the result must not depend on the machine's core count or on thread timing
        for key, threads in (("1", 1), ("2", 2), ("3", 3), ("3 again", 3)):
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
            runs[key] = align.align_pet(ct, pet, settings=s, body=body_image(ct)).record
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(old)
    assert reference.record["method"] == Method.RIGID.value
    assert {k: r == reference.record for k, r in runs.items()} == {k: True for k in runs}


@pytest.mark.parametrize("pet_mm,coarse", [(4.0, False), (8.0, True)], ids=["pet4-unchanged-path", "pet8-coarse-path"])
def test_coarse_pet_registers_its_last_level_on_the_upsampled_pet(ct, monkeypatch, pet_mm, coarse) -> None:
    """Issue 20's coarse-PET recipe: an 8 mm PET on the 3 mm metric grid is upsampled once (bounded
    cubic, every axis) and only the last level reads it, with the pyramid smoothed in millimetres; a
    4 mm PET (ratio 1.33, under UPSAMPLE_MIN_RATIO) is never upsampled and its levels smooth in voxels.
    On the coarse path the last level stops at COARSE_MAX_ITERATIONS (50), the others at the settings'
    200, and starts with a COARSE_LAST_FIRST_STEP_MM first step (the others 2 mm), and its metric uses COARSE_LAST_LEVEL_BINS histogram bins and COARSE_LAST_LEVEL_POINTS samples (the others the
    settings' 64 bins and 100 k samples); the 4 mm path keeps 200 at every level, each run once from a 2 mm first step.
    Either way the known misalignment is recovered and the result is the same run to run."""
    m = align.transform_matrix(euler((1.0, -1.0, 1.5), (5.0, -3.0, 4.0)))
    n = int(round(336 / pet_mm))
    pet = make_pet(m, size=(n, int(round(240 / pet_mm)), int(round(320 / pet_mm))), spacing=(pet_mm,) * 3)
    fixed, moving, mask = align._registration_images(ct, pet, body_image(ct), align.REGISTRATION_SPACING_MM)
    upsampled, executed, physical, optimiser, bins, executed_bins = [], [], [], [], [], []
    real_upsample, real_execute = align.upsample_cubic2, sitk.ImageRegistrationMethod.Execute
    real_units = sitk.ImageRegistrationMethod.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn
    real_optimiser = sitk.ImageRegistrationMethod.SetOptimizerAsRegularStepGradientDescent
    real_mattes = sitk.ImageRegistrationMethod.SetMetricAsMattesMutualInformation
    real_percentages = sitk.ImageRegistrationMethod.SetMetricSamplingPercentagePerLevel
    real_mask = sitk.ImageRegistrationMethod.SetMetricFixedMask
    sampling, executed_sampling = {}, []

    def spy_upsample(image, axes, **kwargs):
        upsampled.append(tuple(axes))
        return real_upsample(image, axes, **kwargs)

    def spy_execute(self, f, mv):
        executed.append(mv.GetSpacing())
        executed_bins.append(bins[-1])  # the bins of the method being executed: the last ones set
        executed_sampling.append((sampling["fractions"][-1], sampling["voxels"]))
        return real_execute(self, f, mv)

    def spy_percentages(self, fractions, seed):
        sampling["fractions"] = list(fractions)
        return real_percentages(self, fractions, seed)

    def spy_mask(self, mask):
        sampling["voxels"] = int(np.count_nonzero(sitk.GetArrayViewFromImage(mask)))
        return real_mask(self, mask)

    def spy_mattes(self, numberOfHistogramBins):
        bins.append(numberOfHistogramBins)
        return real_mattes(self, numberOfHistogramBins=numberOfHistogramBins)

    def spy_units(self):
        physical.append(True)
        return real_units(self)

    def spy_optimiser(self, **kwargs):
        optimiser.append((kwargs["learningRate"], kwargs["numberOfIterations"], kwargs["relaxationFactor"]))
        return real_optimiser(self, **kwargs)

    settled, real_settled = [], align._stop_when_settled
    scales, real_scales = [], sitk.ImageRegistrationMethod.SetOptimizerScales

    def spy_scales(self, values):
        scales.append(list(values))
        return real_scales(self, values)

    monkeypatch.setattr(sitk.ImageRegistrationMethod, "SetOptimizerScales", spy_scales)

    def spy_settled(r, center, points, window, mm):
        settled.append((window, mm, len(points)))
        return real_settled(r, center, points, window, mm)

    monkeypatch.setattr(align, "_stop_when_settled", spy_settled)
    monkeypatch.setattr(align, "upsample_cubic2", spy_upsample)
    monkeypatch.setattr(sitk.ImageRegistrationMethod, "Execute", spy_execute)
    monkeypatch.setattr(sitk.ImageRegistrationMethod, "SmoothingSigmasAreSpecifiedInPhysicalUnitsOn", spy_units)
    monkeypatch.setattr(sitk.ImageRegistrationMethod, "SetOptimizerAsRegularStepGradientDescent", spy_optimiser)
    monkeypatch.setattr(sitk.ImageRegistrationMethod, "SetMetricAsMattesMutualInformation", spy_mattes)
    monkeypatch.setattr(sitk.ImageRegistrationMethod, "SetMetricSamplingPercentagePerLevel", spy_percentages)
    monkeypatch.setattr(sitk.ImageRegistrationMethod, "SetMetricFixedMask", spy_mask)
    found = align.register_rigid(fixed, moving, mask, settings=AlignSettings())
    levels = len(AlignSettings().shrink_factors)
    native, half = (pet_mm,) * 3, (pet_mm / 2,) * 3
    if coarse:
        assert upsampled == [(True, True, True)]
        assert executed == [native] * (levels - 1) + [half]
        assert physical == [True] * levels
        # the last level starts from the middle level's result: a smaller first step
        assert optimiser == [(2.0, 200, 0.5)] * (levels - 1) + [(align.COARSE_LAST_FIRST_STEP_MM, 50, 0.5)]
        assert executed_bins == [64] * (levels - 1) + [align.COARSE_LAST_LEVEL_BINS]
        # every level stops once settled, read from ~300 body points (the last level at a smaller distance)
        window = align.COARSE_SETTLED_WINDOW
        assert [s[:2] for s in settled] == [(window, align.COARSE_SETTLED_MM)] * (levels - 1) + [(window, align.COARSE_LAST_SETTLED_MM)]
        assert all(250 <= s[2] <= 350 for s in settled), settled
        last_points = align.COARSE_LAST_LEVEL_POINTS
    else:
        # each level once, from a 2 mm first step
        assert upsampled == [] and executed == [native] * levels and physical == []
        assert optimiser == [(2.0, 200, 0.5)] * levels
        assert executed_bins == [64] * levels
        assert settled == []  # the 4 mm path runs each level to its optimiser's own stop
        last_points = AlignSettings().final_sampling_points
    # every level: the body's lever arms about the rotation centre (_body_scales)
    body = align._body_scales(fixed, sitk.GetArrayViewFromImage(mask), found.GetCenter())
    assert len(scales) == len(executed) and all(v == body for v in scales), (scales, body)
    fraction, voxels = executed_sampling[-1]  # the last level samples last_points of its region's voxels
    assert voxels > last_points and fraction == pytest.approx(last_points / voxels)
    errors = _node_errors(found, m)
    assert errors.mean() < 0.6, errors
    again = align.register_rigid(fixed, moving, mask, settings=AlignSettings())
    assert again.GetParameters() == found.GetParameters()


def test_coarse_pet_iteration_cap_enters_the_settings_record(monkeypatch) -> None:
    """The coarse path's iteration cap is part of the recipe the settings hash covers: another cap
    converts every exam again."""
    before = AlignSettings().to_dict()
    monkeypatch.setattr(align, "COARSE_MAX_ITERATIONS", align.COARSE_MAX_ITERATIONS + 30)
    after = AlignSettings().to_dict()
    assert before != after and {k for k in before if before[k] != after[k]} == {"coarse_pet_max_iterations"}


def test_rotation_scales_are_the_squared_lever_arms_of_the_sampled_body() -> None:
    """_body_scales: for a cylinder along z (radius 150 mm, 800 mm long) centred off the image's centre,
    the rotation about z moves its farthest point 150 mm per radian and those about x and y
    sqrt(150^2 + 400^2) mm; the scales are those squared (1 for the translations), whatever the image
    around the body. The image's corners give other arms (about z: the in-plane corners, 354 mm)."""
    spacing, size = 5.0, (101, 101, 201)
    image = sitk.Image(*size, sitk.sitkUInt8)
    image.SetSpacing((spacing,) * 3)
    image.SetOrigin((-250.0, -250.0, -500.0))
    z, y, x = np.meshgrid(*[np.arange(n) * spacing + o for n, o in zip(size[::-1], (-500.0, -250.0, -250.0))], indexing="ij")
    centre = np.array([40.0, -30.0, 50.0])
    body = ((x - centre[0]) ** 2 + (y - centre[1]) ** 2 <= 150.0 ** 2) & (np.abs(z - centre[2]) <= 400.0)
    scales = align._body_scales(image, body, tuple(centre))
    expected = [150.0 ** 2 + 400.0 ** 2] * 2 + [150.0 ** 2]
    # the points lie on a sub-grid of the voxels (every 4th here, 20 mm): the farthest within a few % of the surface
    np.testing.assert_allclose(np.sqrt(scales[:3]), np.sqrt(expected), rtol=0.05)
    assert scales[3:] == [1.0, 1.0, 1.0]
    corners = align._body_scales(image, None, tuple(centre))
    assert np.sqrt(corners[2]) > 300.0  # the in-plane corners, not the body


def test_optimizer_scales_enter_the_settings_record() -> None:
    """Another way of scaling the optimiser's parameters converts every exam again."""
    assert AlignSettings().to_dict()["optimizer_scales"] == "body-lever-arms"


class _Walk:
    """A stand-in for a registration method whose optimiser takes ``steps`` (Euler 3D parameter increments),
    calling the iteration command after each, until the command stops it."""

    def __init__(self, steps):
        self.steps, self.position, self.iterations, self.stopped = steps, np.zeros(6), 0, False

    def AddCommand(self, event, command):
        assert event == sitk.sitkIterationEvent
        self.command = command

    def GetOptimizerPosition(self):
        return tuple(self.position)

    def StopRegistration(self):
        self.stopped = True

    def run(self) -> int:
        for step in self.steps:
            self.position = self.position + np.asarray(step, float)
            self.iterations += 1
            self.command()
            if self.stopped:
                break
        return self.iterations


@pytest.mark.parametrize("steps,stops_after", [
    ([(0, 0, 0, 0.011, 0, 0)] * 60, None),  # 0.11 mm per 10 iterations: still moving
    ([(0, 0, 0, 0.009, 0, 0)] * 60, 11),  # 0.09 mm: settled once 10 iterations lie behind the first position
    ([(0, 0, 0, 0, 0, 0.5)] * 20 + [(0, 0, 0, 0, 0, 0.002)] * 40, 30),  # a fast start, then a crawl along z
    ([(0, 0, 0.00009, 0, 0, 0)] * 60, 11),  # a rotation about z: 0.009 and 0.171 mm per 10 iterations at the points, 0.09 mean
    ([(0, 0, 0.00011, 0, 0, 0)] * 60, None),  # 0.11 mm mean
], ids=["moving", "crawling", "fast-then-crawling", "rotation-mean-under", "rotation-mean-over"])
def test_coarse_level_stops_once_the_body_points_have_settled(steps, stops_after) -> None:
    """_stop_when_settled stops the optimiser at the first iteration after which the points moved on average
    less than the distance over the window (10 iterations, 0.1 mm here), measured through the Euler transform
    about the centre: rotations count by each point's distance from it (10 and 190 mm here, mean 100 mm)."""
    center = (200.0, -150.0, 120.0)  # far from the origin: a rotation about the origin would move the points 2.3x as far
    points = np.array([[200.0 + 10.0, -150.0, 120.0], [200.0, -150.0 + 190.0, 120.0]])
    walk = _Walk(steps)
    align._stop_when_settled(walk, center, points, window=10, mm=0.1)
    assert walk.run() == (stops_after or len(steps)) and walk.stopped == (stops_after is not None)


@pytest.mark.parametrize("name,key", [("COARSE_LAST_LEVEL_BINS", "coarse_pet_last_level_bins"),
                                      ("COARSE_LAST_LEVEL_POINTS", "coarse_pet_last_level_points"),
                                      ("COARSE_SETTLED_WINDOW", "coarse_pet_settled"),
                                      ("COARSE_SETTLED_MM", "coarse_pet_settled"),
                                      ("COARSE_LAST_SETTLED_MM", "coarse_pet_settled"),
                                      ("COARSE_LAST_FIRST_STEP_MM", "coarse_pet_last_level_first_step_mm")])
def test_coarse_recipe_enters_the_settings_record(monkeypatch, name, key) -> None:
    """The coarse path's last-level bins, samples, settled rule and first step are part of
    the recipe the settings hash covers."""
    before = AlignSettings().to_dict()
    monkeypatch.setattr(align, name, getattr(align, name) * 2)
    after = AlignSettings().to_dict()
    assert {k for k in before if before[k] != after[k]} == {key}


def test_deformable_on_records_bspline_and_never_worsens(ct) -> None:
    m = align.transform_matrix(euler((0, 0, 1.0), (4.0, 2.0, -2.0)))
    pet = make_pet(m)
    res = align.align_pet(ct, pet, settings=AlignSettings(deformable=Deformable.ON), body=body_image(ct))
    assert "metric_bspline" in res.record
    assert res.record["metric_after"] <= res.record["metric_rigid"]
    assert res.record["method"] in ("rigid", "rigid+bspline")
    assert _node_errors(res.transform, m).mean() < 2.0


def _continuous_index(moving: sitk.Image, reference: sitk.Image, transform: sitk.Transform) -> np.ndarray:
    """[z, y, x, 3] continuous (x, y, z) index in ``moving`` of every ``reference`` voxel, by numpy."""
    from lymphatlas_synth.phantoms import grid_points

    pts = grid_points(reference)
    m = align.transform_matrix(transform) if transform is not None else np.eye(4)
    inv = np.linalg.inv(align.affine_lps(moving))
    to_idx = inv @ m
    return pts @ to_idx[:3, :3].T + to_idx[:3, 3]


def _trilinear(moving: sitk.Image, reference: sitk.Image, transform: sitk.Transform) -> np.ndarray:
    """Trilinear interpolation by scipy (a peer of SimpleITK's), 0 outside the field of view."""
    from scipy import ndimage

    c = _continuous_index(moving, reference, transform)
    arr = sitk.GetArrayFromImage(moving).astype(np.float64)
    size = np.asarray(moving.GetSize(), float)
    coords = [np.clip(c[..., 2 - a], 0, size[2 - a] - 1) for a in range(3)]  # edge value up to the FOV's edge
    out = ndimage.map_coordinates(arr, coords, order=1, mode="nearest")
    inside = np.all((c >= -0.5) & (c < size - 0.5), axis=-1)
    return np.where(inside, out, 0.0)


ROTATION = euler((1.5, -1.0, 2.0), (0.7, -0.4, 0.3), center=(0.0, 0.0, 0.0))


def test_bounded_cubic_stays_within_the_native_voxels_around_each_point_and_is_0_outside_the_fov() -> None:
    # noisy positive PET, rotated, whose field of view ends inside the CT along z and x
    rng = np.random.default_rng(5)
    pet = sitk.GetImageFromArray((1.0 + rng.gamma(2.0, 1.0, (14, 18, 16))).astype(np.float32))
    pet.SetSpacing((4.0, 4.0, 4.0))
    pet.SetOrigin((-30.0, -34.0, -26.0))
    ct = sitk.Image((56, 60, 30), sitk.sitkInt16)
    ct.SetSpacing((1.5, 1.5, 2.5))
    ct.SetOrigin((-40.0, -44.0, -36.0))
    out = sitk.GetArrayFromImage(align.resample_to_reference(pet, ct, ROTATION))
    c = _continuous_index(pet, ct, ROTATION)
    size = np.asarray(pet.GetSize())
    inside = np.all((c >= -0.5) & (c < size - 0.5), axis=-1)
    assert 0.2 < inside.mean() < 0.9  # the test grid crosses the field of view's edges
    assert np.all(out[~inside] == 0.0)  # exactly 0, no 1e-42 residues
    assert np.all(out[inside] > 0.0)
    # the 2 x 2 x 2 native voxels around each point (edge voxels repeated up to the FOV's edge)
    arr = sitk.GetArrayFromImage(pet)
    base = np.floor(c[inside]).astype(int)
    corners = []
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                i = np.clip(base + (dx, dy, dz), 0, size - 1)
                corners.append(arr[i[:, 2], i[:, 1], i[:, 0]])
    corners = np.stack(corners)
    values = out[inside]
    assert np.all(values >= corners.min(0) - 1e-5)
    assert np.all(values <= corners.max(0) + 1e-5)
    # and it is not trilinear: the cubic half-way nodes differ from the linear ones
    assert np.abs(values - _trilinear(pet, ct, ROTATION)[inside]).max() > 0.1


# Mean |resampled - continuous activity| inside each phantom lesion (SUV 10), as measured with the
# bounded cubic plus 8 %: a 3 % scale or a 1 mm shift of the output exceeds it.
LESION_MEAN_ABS_ERROR = {
    (2.0, 0.0): 1.68, (4.0, 0.0): 2.89, (6.0, 0.0): 4.33, (8.0, 0.0): 4.74,
    (2.0, 6.5): 0.071, (4.0, 6.5): 0.43, (6.0, 6.5): 0.94, (8.0, 6.5): 1.30,
}


@pytest.mark.parametrize("fwhm", [0.0, 6.5], ids=["sharp", "psf6.5mm"])
@pytest.mark.parametrize("pet_mm", [2.0, 4.0, 6.0, 8.0])
def test_lesion_suvmax_between_trilinear_and_native_max(pet_mm: float, fwhm: float) -> None:
    from lymphatlas_synth.phantoms import Sphere, make_grid, sample

    rng = np.random.default_rng(int(pet_mm * 10 + fwhm))
    center = tuple(rng.uniform(-2.0, 2.0, 3))  # lesion off the voxel centres
    lesion = Sphere(center, radius_mm=7.0, suv=10.0, fwhm_mm=fwhm)
    pet = sample(lesion, make_grid((0, 0, 0), 64.0, pet_mm, offset=tuple(rng.uniform(-1, 1, 3))), ROTATION)
    ct = make_grid((0, 0, 0), 40.0, (1.0, 1.0, 2.0))
    native_max = float(sitk.GetArrayViewFromImage(pet).max())
    bounded = sitk.GetArrayFromImage(align.resample_to_reference(pet, ct, ROTATION))
    trilinear = _trilinear(pet, ct, ROTATION)
    assert trilinear.max() - 1e-5 <= bounded.max() <= native_max + 1e-5, (trilinear.max(), bounded.max(), native_max)
    # closer to the activity the scanner saw than trilinear is, inside the lesion
    from lymphatlas_synth.phantoms import grid_points

    truth_on_ct = lesion.activity(grid_points(ct))
    core = truth_on_ct > 0.5 * lesion.suv * (1 if fwhm == 0 else truth_on_ct.max() / lesion.suv)
    err_b = np.abs(bounded - truth_on_ct)[core].mean()
    err_l = np.abs(trilinear - truth_on_ct)[core].mean()
    assert err_b <= err_l * 1.001, (err_b, err_l)
    assert err_b < LESION_MEAN_ABS_ERROR[(pet_mm, fwhm)], err_b


def test_unbounded_cubic_option_overshoots_where_bounded_does_not() -> None:
    from lymphatlas_synth.phantoms import Sphere, make_grid, sample

    lesion = Sphere((1.3, -0.7, 2.1), radius_mm=6.0, suv=10.0, fwhm_mm=6.5)
    pet = sample(lesion, make_grid((0, 0, 0), 64.0, 8.0), ROTATION)
    ct = make_grid((0, 0, 0), 40.0, 1.0)
    native_max = float(sitk.GetArrayViewFromImage(pet).max())
    cubic = sitk.GetArrayFromImage(align.resample_to_reference(pet, ct, ROTATION, interpolation=Interpolation.CUBIC))
    bounded = sitk.GetArrayFromImage(align.resample_to_reference(pet, ct, ROTATION))
    assert cubic.max() > 1.02 * native_max  # the paper's cubic invents activity on 8 mm voxels
    assert bounded.max() <= native_max + 1e-5


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


def test_upsample_cubic2_bounded_clamps_each_new_node_to_its_two_neighbours() -> None:
    # one hot voxel along x: the cubic's half-way values ring below 0 beside it; bounded keeps each
    # between its two original neighbours (the cubic value clamped there), the nodes unchanged
    arr = np.zeros((1, 1, 9), np.float32)
    arr[0, 0, 4] = 10.0
    img = sitk.GetImageFromArray(arr)
    cubic = sitk.GetArrayFromImage(align.upsample_cubic2(img, (True, False, False)))[0, 0]
    bounded = sitk.GetArrayFromImage(align.upsample_cubic2(img, (True, False, False), bounded=True))[0, 0]
    line = arr[0, 0]
    lo, hi = np.minimum(line[:-1], line[1:]), np.maximum(line[:-1], line[1:])
    assert cubic[1::2].min() < -0.1  # the data exercise the bound
    np.testing.assert_array_equal(bounded[::2], line)
    np.testing.assert_allclose(bounded[1::2], np.clip(cubic[1::2], lo, hi), atol=1e-6)


def ndimage_smooth(a: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter(a, 1.5).astype(np.float32)


def test_saved_transform_file_resamples_the_pet_exactly(ct, tmp_path) -> None:
    # a deformable result: rigid + a B-spline with displacements everywhere, as align_pet applies it
    rigid = euler((0.5, -1.0, 1.5), (3.0, -2.0, 1.0))
    bspline = sitk.BSplineTransformInitializer(ct, [3, 3, 3], order=3)
    rng = np.random.default_rng(2)
    bspline.SetParameters(tuple(rng.uniform(-3.0, 3.0, len(bspline.GetParameters()))))
    applied = align._rounded(sitk.CompositeTransform([rigid, bspline]))
    pet = make_pet(align.transform_matrix(rigid))
    expected = sitk.GetArrayFromImage(align.resample_to_reference(pet, ct, applied))
    path = tmp_path / align.TRANSFORM_FILE
    path.write_text(align.transform_text(applied))
    again = sitk.GetArrayFromImage(align.resample_to_reference(pet, ct, sitk.ReadTransform(str(path))))
    np.testing.assert_array_equal(again, expected)
    # the rigid part alone does not reproduce it: the file carries the B-spline
    assert np.abs(sitk.GetArrayFromImage(align.resample_to_reference(pet, ct, rigid)) - expected).max() > 0.5


def test_bounded_cubic_does_not_depend_on_the_thread_count() -> None:
    # the 2x upsampling runs in slabs on SimpleITK's thread count: every line is filtered whole
    from lymphatlas_synth.phantoms import Sphere, make_grid, sample

    pet = sample(Sphere((1.0, -2.0, 0.5), 9.0, 8.0, 6.5), make_grid((0, 0, 0), 60.0, 4.0), ROTATION)
    ct = make_grid((0, 0, 0), 44.0, (1.0, 1.0, 1.5))
    old = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    try:
        outs = []
        for threads in (1, 3):
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
            outs.append(sitk.GetArrayFromImage(align.resample_to_reference(pet, ct, ROTATION)))
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(old)
    np.testing.assert_array_equal(outs[0], outs[1])


def _small_pet_crossing_the_ct() -> tuple[sitk.Image, sitk.Image, np.ndarray]:
    """A 4 mm PET (a hot block on a noisy background, one voxel below 0) and a rotated 1.5-2 mm CT grid
    that crosses its field of view's edges."""
    rng = np.random.default_rng(1)
    arr = rng.gamma(2.0, 0.2, (12, 14, 16)).astype(np.float32)
    arr[4:8, 5:9, 6:10] += 10.0  # sharp edges: the cubic rings below 0 around them
    arr[2, 3, 3] = -0.5
    pet = sitk.GetImageFromArray(arr)
    pet.SetSpacing((4.0, 4.0, 4.0))
    pet.SetOrigin((-30.0, -34.0, -26.0))
    ct = sitk.Image((40, 44, 30), sitk.sitkInt16)
    ct.SetSpacing((1.5, 1.5, 2.0))
    ct.SetOrigin((-40.0, -44.0, -36.0))
    return pet, ct, arr


def test_unbounded_cubic_and_linear_paths_equal_scipys_splines_clamped_at_0_and_0_outside_the_fov() -> None:
    from scipy import ndimage

    pet, ct, arr = _small_pet_crossing_the_ct()
    c = _continuous_index(pet, ct, ROTATION)
    size = np.asarray(pet.GetSize(), float)
    inside = np.all((c >= -0.5) & (c < size - 0.5), axis=-1)
    assert 0.3 < inside.mean() < 0.9
    cubic = sitk.GetArrayFromImage(align.resample_to_reference(pet, ct, ROTATION, interpolation=Interpolation.CUBIC))
    linear = sitk.GetArrayFromImage(align.resample_to_reference(pet, ct, ROTATION, interpolation=Interpolation.LINEAR))
    assert cubic.dtype == linear.dtype == np.float32
    assert np.all(cubic[~inside] == 0.0) and np.all(linear[~inside] == 0.0)
    # CUBIC: the cubic B-spline of the PET (scipy, mirror boundary as ITK's), negatives set to 0; compared
    # three voxels away from the edges, where the boundary condition no longer matters
    peer = ndimage.map_coordinates(arr.astype(np.float64), [c[..., 2 - a] for a in range(3)], order=3, mode="mirror")
    interior = np.all((c >= 3) & (c <= size - 4), axis=-1)
    assert (peer[interior] < 0).sum() > 100 and ((peer[interior] > 0) & (peer[interior] < 1)).sum() > 100
    np.testing.assert_allclose(cubic[interior], np.maximum(peer[interior], 0.0), atol=1e-5)
    # LINEAR: trilinear of the PET clamped at 0 (edge values up to the field of view's edge)
    clamped = sitk.Clamp(pet, lowerBound=0.0)
    np.testing.assert_allclose(linear[inside], _trilinear(clamped, ct, ROTATION)[inside], atol=1e-5)
    assert linear.min() == 0.0 and np.abs(linear[inside] - _trilinear(pet, ct, ROTATION)[inside]).max() > 0.05


@pytest.mark.parametrize("flip", [False, True], ids=["aligned", "flipped-xy"])
def test_bounded_cubic_field_of_view_edges_fall_exactly_on_ct_points(flip: bool) -> None:
    # CT points at PET continuous index -1, -0.5, 0, ..., n - 0.5, n on every axis (axis-aligned rows, and with
    # the PET's x and y flipped, rows that run backwards through it): [-0.5, n - 0.5) is inside, as pet_fov_mask
    n = np.array([5, 6, 7])  # PET x, y, z voxels of 4 mm
    arr = np.random.default_rng(2).uniform(1.0, 3.0, n[::-1]).astype(np.float32)
    pet = sitk.GetImageFromArray(arr)
    pet.SetSpacing((4.0, 4.0, 4.0))
    sign = np.array([-1.0, -1.0, 1.0]) if flip else np.ones(3)
    pet.SetDirection(tuple(np.diag(sign).ravel()))
    pet.SetOrigin(tuple(np.where(sign < 0, 4.0 * (n - 1), 0.0)))  # the same extent either way
    ct = sitk.Image(tuple(int(v) for v in 2 * n + 5), sitk.sitkInt16)  # 2 mm, from index -1 to n + 1.5
    ct.SetSpacing((2.0, 2.0, 2.0))
    ct.SetOrigin((-4.0, -4.0, -4.0))
    # the PET continuous index of every CT point, by hand: (p - origin) / 4 along each (flipped) axis
    axes = [(-4.0 + 2.0 * np.arange(int(2 * v + 5)) - (4.0 * (v - 1) if s < 0 else 0.0)) * s / 4.0
            for v, s in zip(n, sign)]
    inside_axis = [(a >= -0.5) & (a < v - 0.5) for a, v in zip(axes, n)]
    want = inside_axis[2][:, None, None] & inside_axis[1][None, :, None] & inside_axis[0][None, None, :]
    assert all(((a == -0.5).any() and (a == v - 0.5).any()) for a, v in zip(axes, n))  # points on both edges
    np.testing.assert_array_equal(sitk.GetArrayFromImage(align.pet_fov_mask(pet, ct)) > 0, want)
    for method in Interpolation:
        out = sitk.GetArrayFromImage(align.resample_to_reference(pet, ct, interpolation=method))
        np.testing.assert_array_equal(out > 0, want, err_msg=method.value)


def test_bounded_cubic_of_a_uniform_pet_is_its_value_inside_the_fov_from_the_ct_rows_first_voxel() -> None:
    # CT rows start inside the PET (x = 0 mm, PET x extent [-2, 58) mm) and leave it; the CT's z crosses
    # both z edges: every CT point inside the field of view, the rows' first voxel included, reads the PET's
    # one value, every point outside reads 0. The CT is 5x longer in x than in y (the crop's corners).
    n = np.array([15, 6, 7])
    pet = sitk.GetImageFromArray(np.full(n[::-1], 2.0, np.float32))
    pet.SetSpacing((4.0, 4.0, 4.0))
    ct = sitk.Image((40, 8, 20), sitk.sitkInt16)  # x 0..78, y 2..16, z -8..30 mm
    ct.SetSpacing((2.0, 2.0, 2.0))
    ct.SetOrigin((0.0, 2.0, -8.0))
    x, y, z = (o + 2.0 * np.arange(v) for o, v in zip(ct.GetOrigin(), ct.GetSize()))
    inside = ((z[:, None, None] >= -2.0) & (z[:, None, None] < 26.0)) & ((y[None, :, None] >= -2.0) & (y[None, :, None] < 22.0)) \
        & ((x[None, None, :] >= -2.0) & (x[None, None, :] < 58.0))
    assert inside[:, :, 0].any() and not inside.all()
    out = sitk.GetArrayFromImage(align.resample_to_reference(pet, ct))
    np.testing.assert_allclose(out[inside], 2.0, atol=1e-6)
    assert np.all(out[~inside] == 0.0)


@pytest.mark.parametrize("pet_mm", [2.0, 3.0])
def test_bounded_cubic_of_a_pet_at_most_1_5_times_coarser_than_the_ct_is_trilinear(pet_mm: float) -> None:
    # a PET voxel up to UPSAMPLE_MIN_RATIO (1.5) times the CT's, 1.5 included, is not upsampled: the bounded
    # path is then trilinear interpolation (scipy as the peer)
    pet = sitk.GetImageFromArray(np.random.default_rng(4).gamma(2.0, 1.0, (10, 10, 10)).astype(np.float32))
    pet.SetSpacing((pet_mm,) * 3)
    ct = sitk.Image((12, 12, 12), sitk.sitkInt16)
    ct.SetSpacing((2.0, 2.0, 2.0))
    ct.SetOrigin((1.0, 1.3, 0.7))
    identity = sitk.Euler3DTransform()
    out = sitk.GetArrayFromImage(align.resample_to_reference(pet, ct, identity))
    np.testing.assert_allclose(out, _trilinear(pet, ct, identity), atol=1e-5)


def test_bounded_cubic_of_a_pet_beside_the_ct_is_0() -> None:
    pet = sitk.GetImageFromArray(np.full((6, 6, 6), 3.0, np.float32))
    pet.SetSpacing((4.0, 4.0, 4.0))
    pet.SetOrigin((100.0, 0.0, 0.0))  # 100-124 mm in x; the CT ends at 38 mm
    ct = sitk.Image((20, 12, 12), sitk.sitkInt16)
    ct.SetSpacing((2.0, 2.0, 2.0))
    for method in Interpolation:
        out = sitk.GetArrayFromImage(align.resample_to_reference(pet, ct, interpolation=method))
        assert out.shape == (12, 12, 20) and np.all(out == 0.0), method.value


def _pet_below_1(dtype=np.float32) -> tuple[sitk.Image, np.ndarray]:
    """A 4 mm PET with SUVs in (0, 1) (background-like) and one voxel below 0, at the origin."""
    arr = np.random.default_rng(3).uniform(0.05, 0.95, (8, 9, 10))
    arr[3, 4, 5] = -0.5
    pet = sitk.GetImageFromArray(arr.astype(dtype))
    pet.SetSpacing((4.0, 4.0, 4.0))
    return pet, arr.astype(np.float32)


def test_bounded_cubic_of_a_pet_below_1_keeps_each_voxel_value_at_its_centre_and_clamps_at_0() -> None:
    # A 2 mm CT grid through every PET voxel centre (and half-way between them): the upsampled spline
    # interpolates the measured values, so at each centre the output is that voxel's SUV (0 where below 0)
    pet, arr = _pet_below_1()
    ct = sitk.Image((19, 17, 15), sitk.sitkInt16)
    ct.SetSpacing((2.0, 2.0, 2.0))
    out = sitk.GetArrayFromImage(align.resample_to_reference(pet, ct))
    np.testing.assert_allclose(out[::2, ::2, ::2], np.maximum(arr, 0.0), atol=1e-6)
    assert out.min() == 0.0 and out.max() <= arr.max() + 1e-6


@pytest.mark.parametrize("dtype", [np.float64, np.int16], ids=["float64", "int16"])
def test_bounded_cubic_and_linear_resample_a_pet_of_another_type_as_float32(dtype) -> None:
    # The PET is resampled as float32 whatever its pixel type: the same result as its float32 copy
    pet, _ = _pet_below_1(dtype)
    if dtype is np.int16:  # integer activity (Bq/ml-like counts)
        pet = sitk.GetImageFromArray(np.random.default_rng(4).integers(-5, 3000, (8, 9, 10)).astype(np.int16))
        pet.SetSpacing((4.0, 4.0, 4.0))
    ct = sitk.Image((30, 25, 21), sitk.sitkInt16)
    ct.SetSpacing((1.3, 1.5, 1.7))
    ct.SetOrigin((-1.1, -0.7, -0.3))
    as_float32 = sitk.Cast(pet, sitk.sitkFloat32)
    for method in (Interpolation.BOUNDED_CUBIC, Interpolation.LINEAR):
        out = align.resample_to_reference(pet, ct, ROTATION, interpolation=method)
        want = align.resample_to_reference(as_float32, ct, ROTATION, interpolation=method)
        assert out.GetPixelID() == sitk.sitkFloat32
        np.testing.assert_array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(want), err_msg=method.value)


def test_bounded_cubic_through_a_bspline_transform_cuts_the_field_of_view_where_the_transform_maps_it() -> None:
    # A B-spline transform whose control points all move by the same d is a translation by d (the
    # spline's weights sum to 1): each CT point p samples the PET at p + d, and is 0 where p + d lies
    # outside the PET's voxels' extent [-2, 4 n - 2) mm on each axis (computed here by hand)
    n = np.array([10, 9, 8])  # PET x, y, z voxels of 4 mm, first centre at the origin
    pet = sitk.GetImageFromArray(np.full(n[::-1], 0.4, np.float32))
    pet.SetSpacing((4.0, 4.0, 4.0))
    ct = sitk.Image((30, 26, 24), sitk.sitkInt16)  # 2 mm, from -10 mm: crosses every edge
    ct.SetSpacing((2.0, 2.0, 2.0))
    ct.SetOrigin((-10.0, -10.0, -10.0))
    d = np.array([3.3, -2.7, 7.3])
    bspline = sitk.BSplineTransformInitializer(ct, [3, 3, 3], 3)
    k = len(bspline.GetParameters()) // 3
    bspline.SetParameters(tuple(np.repeat(d, k)))
    grid = [-10.0 + 2.0 * np.arange(s) + shift for s, shift in zip(ct.GetSize(), d)]
    inside = [(g >= -2.0) & (g < 4.0 * v - 2.0) for g, v in zip(grid, n)]
    want = inside[2][:, None, None] & inside[1][None, :, None] & inside[0][None, None, :]
    assert 0.2 < want.mean() < 0.8
    out = sitk.GetArrayFromImage(align.resample_to_reference(pet, ct, bspline))
    np.testing.assert_array_equal(out > 0, want)
    np.testing.assert_allclose(out[want], 0.4, atol=1e-6)
