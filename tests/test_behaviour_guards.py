"""Behaviours whose wrong version the rest of the suite could not tell apart (issue 24): each test's data is
made so that the wrong rule gives a different answer, and the truth comes from the test's own arithmetic.

* Philips CNTS: the vendor's SUV factor (7053,1000) wins over activity scale x BQML when they differ.
* GE: the private scan start (0009,100D) is the decay reference when the series time is after the beds'.
* Registration acceptance and B-spline refinement (through ``align.align_pet`` with a crafted
  candidate from ``align.register_rigid`` / ``align.register_bspline``): a candidate is applied only
  when the keep-or-reject metric says it is better.
* De-identification: an AccessionNumber planted in a published column rejects the exam at the
  pipeline's leak check (the default-run version of test_deid's slow test).
* Patch items carry the case's spacing in array order on an anisotropic case (test_loader.py).
* Dmax is the farthest pair of three or more lesions, not the two largest; SUVpeak searches the lesion.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import time

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset

from builder.convert.suv import TimeReference, suv_from_headers
from tests.support.dicom_series import pet_timing
from tests.support.small_data import DOSE, HALF_LIFE, INJECTION, SERIES, WEIGHT, grid, image_like

# --- SUV: vendor factors that differ from the textbook one --------------------------------------------


def _bqml_factor(decay_s: float) -> float:
    return WEIGHT * 1000.0 / (DOSE * 2.0 ** (-decay_s / HALF_LIFE))


def _headers(n: int, *, units: str, series_dt: dt.datetime, acquisition: list[dt.datetime]) -> list[Dataset]:
    out = []
    for k in range(n):
        ds = Dataset()
        for key, value in pet_timing(series_dt=series_dt, injection_dt=INJECTION).items():
            setattr(ds, key, value)
        ds.AcquisitionDate = acquisition[k].strftime("%Y%m%d")
        ds.AcquisitionTime = acquisition[k].strftime("%H%M%S.%f")
        ds.Units, ds.DecayCorrection, ds.CorrectedImage = units, "START", ["ATTN", "DECY"]
        out.append(ds)
    return out


def test_philips_counts_use_the_vendor_suv_factor_where_it_differs_from_activity_times_bqml() -> None:
    # Real Philips headers carry both factors and they differ (the scanner's own dose / weight
    # rounding, its decay reference): the SUV factor (7053,1000) is the one the console reads SUV with.
    series = INJECTION + dt.timedelta(minutes=60)
    activity_scale = 1.73  # Bq/ml per count (7053,1009)
    vendor = activity_scale * _bqml_factor(3600.0) * 1.042  # 4.2 % off activity x BQML
    hs = _headers(3, units="CNTS", series_dt=series, acquisition=[series] * 3)
    for ds in hs:
        block = ds.private_block(0x7053, "Philips PET Private Group", create=True)
        block.add_new(0x00, "DS", f"{vendor:.10g}")
        block.add_new(0x09, "DS", f"{activity_scale:.10g}")
    c = suv_from_headers(hs, series=SERIES, exam_id="EX1")
    assert c.factor == pytest.approx(vendor, rel=1e-9)
    assert c.factor != pytest.approx(activity_scale * _bqml_factor(3600.0), rel=1e-3)
    assert any("differs" in note and "-4.03" in note for note in c.notes), c.notes  # 1 / 1.042 - 1


def test_ge_private_scan_start_is_the_decay_reference_when_it_differs_from_the_first_bed() -> None:
    # A re-created GE series: SeriesTime after the beds; the scanner's private scan start (0009,100D)
    # is 95 s before the first bed's AcquisitionTime (the bed's own start, after the table moved).
    first_bed = INJECTION + dt.timedelta(minutes=61)
    beds = [first_bed + dt.timedelta(seconds=s) for s in (180, 0, 360)]
    scan_start = first_bed - dt.timedelta(seconds=95)
    hs = _headers(3, units="BQML", series_dt=INJECTION + dt.timedelta(minutes=90), acquisition=beds)
    for ds in hs:
        block = ds.private_block(0x0009, "GEMS_PETD_01", create=True)
        block.add_new(0x0D, "DT", scan_start.strftime("%Y%m%d%H%M%S.%f"))
    c = suv_from_headers(hs, series=SERIES, exam_id="EX1")
    decay_s = (scan_start - INJECTION).total_seconds()
    assert c.time_reference is TimeReference.ACQUISITION
    assert c.decay_time_s == pytest.approx(decay_s, abs=1e-6)
    assert c.factor == pytest.approx(_bqml_factor(decay_s), rel=1e-9)
    assert c.factor != pytest.approx(_bqml_factor((first_bed - INJECTION).total_seconds()), rel=1e-3)


# --- lesion statistics: Dmax over every pair, SUVpeak searched over the lesion ---------------------------


def test_dmax_is_the_farthest_pair_of_centroids_not_the_two_largest_lesions() -> None:
    from builder.convert.lesions import lesion_statistics

    spacing, origin = (2.0, 2.0, 3.0), (-50.0, 10.0, 100.0)
    ct = grid((64, 48, 40), spacing, origin)
    label = np.zeros(ct.GetSize()[::-1], np.uint8)
    # (z, y, x) start and edge of each cube: two large lesions close together, two small ones far apart
    cubes = [((10, 10, 10), 8), ((10, 10, 22), 7), ((2, 2, 2), 2), ((35, 42, 58), 3)]
    for (z, y, x), n in cubes:
        label[z:z + n, y:y + n, x:x + n] = 1
    centres = np.array([[origin[a] + spacing[a] * (start[2 - a] + (n - 1) / 2) for a in range(3)]
                        for start, n in cubes])  # x, y, z in mm (identity direction)
    pairs = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    s = lesion_statistics(label, np.ones(label.shape, np.float32), ct, pet=image_like(np.ones(label.shape), ct))
    assert s["count"] == 4
    assert s["dmax_mm"] == pytest.approx(pairs.max(), abs=1e-3)  # lesions 2 and 3, the smallest
    assert s["dmax_mm"] > pairs[0, 1] + 50.0  # the two largest are 36 mm apart


def test_suvpeak_is_the_hottest_1_ml_sphere_in_the_lesion_not_the_one_at_its_hottest_voxel() -> None:
    from builder.convert.lesions import lesion_statistics

    ct = grid((40, 30, 30), (2.0, 2.0, 2.0))
    label = np.zeros(ct.GetSize()[::-1], np.uint8)
    label[5:25, 5:25, 5:35] = 1
    pet = np.full(label.shape, 1.0, np.float32)
    pet[5:25, 5:25, 5:35] = 2.0  # the lesion's rim
    pet[8:21, 8:21, 8:21] = 10.0  # a 26 mm cube of SUV 10: a 1 ml sphere (r 6.2 mm) fits inside it
    pet[14, 14, 30] = 20.0  # one hot voxel, away from that cube, in SUV 2 surroundings
    s = lesion_statistics(label, pet, ct, pet=image_like(pet, ct))
    (item,) = s["items"]
    assert item["suv_max"] == pytest.approx(20.0)
    # a sphere inside the cube averages SUV 10 whatever its weights; one on the hot voxel averages
    # at most 2 + 18 x (one 8 ul voxel of 1 ml, about 0.008) = 2.2
    assert item["suv_peak"] == pytest.approx(10.0, rel=1e-6)
    assert s["suv_peak"] == pytest.approx(10.0, rel=1e-6)


# --- registration acceptance and B-spline refinement, through align.align_pet -----------------------------


def _phantom(shift_mm: tuple[float, float, float]) -> tuple[sitk.Image, sitk.Image, sitk.Image]:
    """CT (HU), PET (SUV) and body mask of a small body with lungs, spine and three hot nodes; the PET
    shows the anatomy moved by ``shift_mm`` (CT point p appears at PET point p + shift)."""
    ct = sitk.Image((56, 40, 40), sitk.sitkInt16)
    ct.SetSpacing((6.0, 6.0, 6.0))
    ct.SetOrigin((-165.0, -117.0, 0.0))
    pet = sitk.Image((42, 30, 36), sitk.sitkFloat32)
    pet.SetSpacing((8.0, 8.0, 8.0))
    pet.SetOrigin((-164.0, -116.0, -20.0))

    def points(img):
        k, j, i = np.indices(img.GetSize()[::-1], dtype=float)
        return np.stack([i, j, k], -1) * np.asarray(img.GetSpacing()) + np.asarray(img.GetOrigin())

    def tissue(p):
        x, y, z = p[..., 0], p[..., 1], p[..., 2]
        body = (x / 150.0) ** 2 + (y / 100.0) ** 2 < 1.0
        lungs = (((np.abs(x) - 60) / 40.0) ** 2 + ((y + 10) / 45.0) ** 2 < 1.0) & (z > 90) & (z < 190) & body
        spine = (x / 14.0) ** 2 + ((y - 65) / 14.0) ** 2 < 1.0
        nodes = np.zeros(p.shape[:-1], bool)
        for c, r in (((40.0, -20.0, 120.0), 14.0), ((-55.0, 25.0, 60.0), 12.0), ((20.0, 50.0, 170.0), 16.0)):
            nodes |= ((p - c) ** 2).sum(-1) < r * r
        return body, lungs, spine & body, nodes & body

    body, lungs, spine, _ = tissue(points(ct))
    arr = np.full(body.shape, -1000, np.int16)
    arr[body], arr[lungs], arr[spine] = 40, -820, 650
    ct_img = sitk.GetImageFromArray(arr)
    ct_img.CopyInformation(ct)
    body_p, lungs_p, spine_p, nodes_p = tissue(points(pet) - np.asarray(shift_mm))
    suv = body_p * (1.0 - 0.65 * lungs_p + 0.6 * spine_p)
    suv = np.maximum(suv, 7.0 * nodes_p).astype(np.float32)
    pet_img = sitk.GetImageFromArray(sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(
        sitk.GetImageFromArray(suv), 0.6)).astype(np.float32))
    pet_img.CopyInformation(pet)
    mask = sitk.GetImageFromArray(body.astype(np.uint8))
    mask.CopyInformation(ct)
    return ct_img, pet_img, mask


def _translation(shift_mm) -> sitk.Euler3DTransform:
    t = sitk.Euler3DTransform()
    t.SetTranslation(tuple(float(v) for v in shift_mm))
    return t


@pytest.fixture(scope="module")
def aligned_phantom():
    return _phantom((0.0, 0.0, 0.0))


@pytest.fixture(scope="module")
def shifted_phantom():
    return _phantom((12.0, -6.0, 0.0))


def _settings(deformable="off"):
    from builder.convert.align import AlignSettings, Deformable, Interpolation

    return AlignSettings(deformable=Deformable(deformable), interpolation=Interpolation.LINEAR)


def _crafted_rigid(monkeypatch, shift_mm) -> None:
    """``align.register_rigid`` replaced by an optimiser that returns the translation ``shift_mm``."""
    from builder.convert import align

    monkeypatch.setattr(align, "register_rigid", lambda *a, **k: _translation(shift_mm))


def _applied_shift(res) -> np.ndarray:
    """Where the applied transform sends the centre of the body: the CT -> PET shift it applies."""
    p = (0.0, 0.0, 120.0)
    return np.subtract(res.transform.TransformPoint(p), p)


def test_a_rigid_candidate_worse_than_the_scanner_alignment_is_not_applied(aligned_phantom, monkeypatch) -> None:
    from builder.convert import align

    ct, pet, body = aligned_phantom  # the scanner's alignment is the truth here
    _crafted_rigid(monkeypatch, (15.0, 0.0, 0.0))
    res = align.align_pet(ct, pet, settings=_settings(), body=body)
    np.testing.assert_allclose(_applied_shift(res), 0.0, atol=1e-9)
    assert res.record["method"] == "scanner" and res.record["improved"] is False
    assert res.record["metric_rigid"] > res.record["metric_before"]  # the metric did see it was worse
    # the published PET is the identity resampling: the node at (40, -20, 120) mm stays on its CT voxel
    node = ct.TransformPhysicalPointToIndex((40.0, -20.0, 120.0))
    assert res.pet_on_ct[node] > 5.0


def test_a_rigid_candidate_better_than_the_scanner_alignment_is_applied(shifted_phantom, monkeypatch) -> None:
    from builder.convert import align

    ct, pet, body = shifted_phantom
    _crafted_rigid(monkeypatch, (12.0, -6.0, 0.0))  # exactly the truth
    t0 = time.perf_counter()
    res = align.align_pet(ct, pet, settings=_settings(), body=body)
    elapsed = time.perf_counter() - t0
    np.testing.assert_allclose(_applied_shift(res), (12.0, -6.0, 0.0), atol=1e-6)
    assert res.record["method"] == "rigid" and res.record["improved"] is True
    assert res.record["metric_after"] < res.record["metric_before"]
    node = ct.TransformPhysicalPointToIndex((40.0, -20.0, 120.0))
    assert res.pet_on_ct[node] > 5.0
    # resampled with the settings' interpolation (linear here): SimpleITK's own linear resampler agrees
    peer = sitk.Resample(sitk.Clamp(pet, lowerBound=0.0), ct, res.transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(res.pet_on_ct), sitk.GetArrayViewFromImage(peer), atol=1e-5)
    # every stage timed, each within the call's own duration
    assert set(res.timings_s) == {"register_prepare", "register_rigid", "register_evaluate", "resample"}
    assert all(0.0 <= v <= elapsed for v in res.timings_s.values())


def test_registration_disabled_keeps_the_scanner_alignment_and_says_so(aligned_phantom) -> None:
    import dataclasses

    from builder.convert import align

    ct, pet, body = aligned_phantom
    settings = dataclasses.replace(_settings(), register=False, interpolation=align.Interpolation.CUBIC)
    res = align.align_pet(ct, pet, settings=settings, body=body)
    np.testing.assert_allclose(_applied_shift(res), 0.0, atol=1e-9)
    assert res.record["method"] == "scanner" and res.record["improved"] is False
    assert res.record["metric_before"] is None and res.record["metric_after"] is None
    assert res.record["decision"] == "registration disabled: scanner alignment"
    assert set(res.timings_s) == {"resample"}
    # resampled with the settings' interpolation (the unbounded cubic here; on this 8 mm PET over a 6 mm CT the
    # default bounded cubic is trilinear): SimpleITK's B-spline resampler, negatives set to 0
    peer = sitk.GetArrayFromImage(sitk.Resample(pet, ct, sitk.Euler3DTransform(), sitk.sitkBSpline, 0.0, sitk.sitkFloat32))
    assert res.record["interpolation"] == "cubic"
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(res.pet_on_ct), np.maximum(peer, 0.0), atol=1e-5)


@pytest.mark.parametrize("deformable,threshold,refined", [("auto", -10.0, True), ("auto", 1.0, False), ("off", -10.0, False)])
def test_auto_refines_only_when_the_best_metric_stays_above_its_threshold(
    aligned_phantom, monkeypatch, deformable, threshold, refined
) -> None:
    # Mattes MI is negative: a threshold of 1 is above every metric (never refine), -10 below (always)
    from builder.convert import align

    ct, pet, body = aligned_phantom
    _crafted_rigid(monkeypatch, (0.0, 0.0, 0.0))
    _crafted_bspline(monkeypatch, 0.0)
    monkeypatch.setattr(align, "AUTO_BSPLINE_METRIC", threshold)
    res = align.align_pet(ct, pet, settings=_settings(deformable), body=body)
    assert ("metric_bspline" in res.record) is refined
    assert ("register_bspline" in res.timings_s) is refined


def _crafted_bspline(monkeypatch, amplitude_mm: float) -> None:
    """``align.register_bspline`` replaced by one that returns rigid + a B-spline of the given amplitude
    (0: no deformation, so no metric gain; else a seeded random warp, which only worsens the metric)."""
    from builder.convert import align

    def fake(fixed, moving, mask, rigid, *, settings, **kw):
        bspline = sitk.BSplineTransformInitializer(fixed, [2, 2, 2], order=3)
        rng = np.random.default_rng(5)
        bspline.SetParameters(tuple(rng.uniform(-amplitude_mm, amplitude_mm, len(bspline.GetParameters()))))
        composite = sitk.CompositeTransform(3)
        composite.AddTransform(rigid)
        composite.AddTransform(bspline)
        return composite

    monkeypatch.setattr(align, "register_bspline", fake)


@pytest.mark.parametrize("amplitude_mm", [0.0, 8.0], ids=["no-gain", "worse"])
def test_a_bspline_refinement_without_a_metric_gain_is_not_applied(shifted_phantom, monkeypatch, amplitude_mm) -> None:
    from builder.convert import align

    ct, pet, body = shifted_phantom
    _crafted_rigid(monkeypatch, (12.0, -6.0, 0.0))
    _crafted_bspline(monkeypatch, amplitude_mm)
    res = align.align_pet(ct, pet, settings=_settings("on"), body=body)
    assert res.record["metric_bspline"] >= res.record["metric_rigid"]  # the crafted refinement gained nothing
    assert res.record["method"] == "rigid"
    assert not isinstance(res.transform, sitk.CompositeTransform)
    assert res.record["metric_after"] == res.record["metric_rigid"]
    np.testing.assert_allclose(_applied_shift(res), (12.0, -6.0, 0.0), atol=1e-6)


# --- de-identification: the pipeline's leak check, on a default run ------------------------------------


def test_an_accession_number_in_a_published_column_rejects_the_exam_at_the_leak_check(
    synthetic_good_cohort, tmp_path, monkeypatch
) -> None:
    """The exam's AccessionNumber (from its own DICOM header) planted in case.json's clinical block: the
    convert rejects the exam at stage deid, naming the attribute, and publishes nothing of it."""
    import pydicom

    from builder.convert import clinical, pipeline
    from builder.convert.align import AlignSettings

    source = synthetic_good_cohort[0]
    first = sorted(p for p in (source / "dicom" / "EX0000").rglob("*") if p.is_file())[0]
    accession = str(pydicom.dcmread(first, stop_before_pixels=True).AccessionNumber)
    patient_ids = {row.split(",")[1] for row in (source / "clinical.csv").read_text().splitlines()[1:]}
    assert len(accession) >= 6 and accession not in patient_ids  # only AccessionNumber can name it
    published = clinical.ClinicalRecord.published
    monkeypatch.setattr(clinical.ClinicalRecord, "published", lambda self: {**published(self), "subtype": accession})
    work = tmp_path / "work"
    settings = pipeline.ConvertSettings(align=AlignSettings(register=False))
    summary = pipeline.convert_cohort(source, work, settings=settings, exams=["EX0000"], workers=1, progress=False)
    [result] = summary.results
    assert result.status is pipeline.Status.REJECTED and result.stage == "deid", (result.status, result.reason)
    assert "case.json contains the exam's AccessionNumber" in result.reason
    assert accession.lower() not in result.reason.lower()  # the message names the attribute, never its value
    assert not list((work / "cases").iterdir())
    failures = json.loads((work / "failures.json").read_text())
    assert [(f["exam_id"], f["stage"]) for f in failures] == [("EX0000", "deid")]
    id_map = work / "private" / "id_map.csv"
    assert not id_map.exists() or "EX0000" not in id_map.read_text()


# --- the phantoms' truth does not come from the builder ---------------------------------------------------


def test_phantom_truth_is_mapped_by_the_generators_own_arithmetic(monkeypatch) -> None:
    """A sphere seen through a rotation about z by 90 degrees and a shift: its PET image's hot centre is
    where the test's own rotation puts it, even with the builder's matrix code broken."""
    from builder.convert import align
    from lymphatlas_synth.phantoms import Sphere, affine_of, make_grid, sample

    monkeypatch.setattr(align, "transform_matrix", lambda t: np.eye(4))  # a wrong builder matrix
    t = sitk.Euler3DTransform()
    t.SetCenter((10.0, 0.0, 0.0))
    t.SetRotation(0.0, 0.0, math.pi / 2)
    t.SetTranslation((0.0, 0.0, 5.0))
    # CT point p -> R (p - c) + c + shift, R = rotation by +90 degrees about z: (x, y) -> (-y, x)
    centre_ct = np.array([30.0, 0.0, 0.0])
    centre_pet = np.array([10.0 - 0.0, 30.0 - 10.0, 5.0])
    np.testing.assert_allclose(affine_of(t)[:3, :3] @ centre_ct + affine_of(t)[:3, 3], centre_pet, atol=1e-9)
    grid = make_grid(tuple(centre_pet), 40.0, 2.0)
    image = sample(Sphere(tuple(centre_ct), 5.0, 5.0), grid, t)  # no voxel centre at r = 5 mm
    hot = np.argwhere(sitk.GetArrayViewFromImage(image) > 0).mean(0)[::-1]
    np.testing.assert_allclose(grid.TransformContinuousIndexToPhysicalPoint(tuple(hot)), centre_pet, atol=1e-6)
    with pytest.raises(ValueError, match="not affine"):
        affine_of(_warped(grid))


def _warped(grid: sitk.Image) -> sitk.Transform:
    bspline = sitk.BSplineTransformInitializer(grid, [2, 2, 2], order=3)
    bspline.SetParameters(tuple(np.random.default_rng(1).uniform(-3, 3, len(bspline.GetParameters()))))
    return bspline


def test_a_candidate_equal_to_the_scanner_alignment_is_no_improvement(aligned_phantom, monkeypatch) -> None:
    from builder.convert import align

    ct, pet, body = aligned_phantom
    _crafted_rigid(monkeypatch, (0.0, 0.0, 0.0))  # the identity itself: the same metric, not better
    res = align.align_pet(ct, pet, settings=_settings(), body=body)
    assert res.record["metric_rigid"] == res.record["metric_before"]
    assert res.record["method"] == "scanner" and res.record["improved"] is False
    assert res.record["decision"].startswith("scanner alignment kept")
    assert (res.record["metric"], res.record["seed"], res.record["interpolation"], res.record["transform_file"]) == (
        "mattes_mi", 0, "linear", align.TRANSFORM_FILE)


def test_a_bspline_refinement_with_a_metric_gain_is_applied(shifted_phantom, monkeypatch) -> None:
    """The rigid candidate is the identity (no gain: not applied); the refinement moves every control
    point by the true shift, which a cubic B-spline reproduces exactly inside its domain: applied."""
    from builder.convert import align

    ct, pet, body = shifted_phantom
    _crafted_rigid(monkeypatch, (0.0, 0.0, 0.0))

    def shifting(fixed, moving, mask, rigid, *, settings, **kw):
        bspline = sitk.BSplineTransformInitializer(fixed, [2, 2, 2], order=3)
        n = len(bspline.GetParameters()) // 3
        bspline.SetParameters((12.0,) * n + (-6.0,) * n + (0.0,) * n)
        return sitk.CompositeTransform([rigid, bspline])

    monkeypatch.setattr(align, "register_bspline", shifting)
    t0 = time.perf_counter()
    res = align.align_pet(ct, pet, settings=_settings("on"), body=body)
    elapsed = time.perf_counter() - t0
    assert set(res.timings_s) == {"register_prepare", "register_rigid", "register_evaluate", "register_bspline", "resample"}
    assert all(0.0 <= v <= elapsed for v in res.timings_s.values())
    assert res.record["metric_rigid"] == res.record["metric_before"]
    assert res.record["metric_bspline"] < res.record["metric_before"] * (1 - 0.02)
    assert res.record["method"] == "rigid+bspline" and res.record["improved"] is True
    assert res.record["metric_after"] == res.record["metric_bspline"]
    assert res.record["decision"].startswith("rigid+bspline registration applied")
    n_nodes = 3 * (2 + 3) ** 3  # mesh 2 per axis, order 3: 5 control points per axis, 3 components
    assert res.record["transform"]["bspline"] == {"mesh_size": [2, 2, 2], "n_parameters": n_nodes}
    np.testing.assert_allclose(_applied_shift(res), (12.0, -6.0, 0.0), atol=1e-6)
    node = ct.TransformPhysicalPointToIndex((40.0, -20.0, 120.0))
    assert res.pet_on_ct[node] > 5.0
