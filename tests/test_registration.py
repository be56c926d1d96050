"""Rigid registration on a scanner's grids: target registration error at every lesion, per exam.

Exams come from the synthetic generator at realistic grids (CT 2 mm in-plane and 3 mm slices,
PET 4 mm; a coarse PET at 8 mm), misaligned by up to 3 degrees per axis and 10 mm, with PET fields
of view matched to the CT or shorter, head first and feet first. The generator's truth holds the
misalignment ``M`` (CT point -> PET point) and the lesion centres ``c``: the target registration
error of a found transform ``T`` is ``|T(c) - M c|``. Bounds are per exam: issue 11's goals
(mean at most 0.5 mm and worst lesion at most 1.0 mm at PET 4 mm, mean at most 0.8 mm at PET 8 mm)
or tighter where the measured error is well below them. The recipe before 64 bins and 100 k final
samples left up to 1.0 mm mean at PET 4 mm and 1.4 mm at PET 8 mm
(``benchmarks/bench_registration.py``); moving the found transform by 0.3 mm along z fails all
three exams.

The independent generator (``../shared/phantoms``, :mod:`lymphatlas_synth.foreign`) is
converted and registered on a seed drawn per run (printed; ``LYMPHATLAS_REGISTRATION_SEED``
replays it) against issue 20's bounds: realistic grids at most 0.5 mm mean and 1.0 mm worst lesion,
coarse PET at most 1.0 mm mean, per exam (the goal, 0.6 mm, is met on 51 of 52 exams measured: see the
coarse test).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from builder.convert import align
from builder.convert.align import AlignSettings, Deformable, Interpolation, Method
from lymphatlas_synth.cohort import lesion_residuals, load_truth

MISALIGNMENT = {"max_rotation_deg": 3.0, "max_translation_mm": 10.0}
PET4 = {"ct_px": 2.0, "ct_dz": 3.0, "pet_px": 4.0, "pet_fwhm_mm": 6.5}
PET8 = {"ct_px": 2.0, "ct_dz": 3.0, "pet_px": 8.0, "pet_fwhm_mm": 8.0}
# (variant, mean bound, worst-lesion bound) per exam: the goal, or near the measured error where
# that is well below it (measured mean / worst: 0.08 / 0.12, 0.33 / 0.38, 0.43 / 0.48 mm; with the
# optimiser scaled from the image's corners instead of the body (align._body_scales) 0.09 / 0.12,
# 0.33 / 0.37, 0.75 / 0.95 mm; before issue 20's sampling region 0.11 / 0.15, 0.50 / 0.67, 0.67 / 0.81 mm)
EXAMS = [
    ({"grid": PET4}, 0.15, 0.2),
    ({"grid": PET4, "pet_fov": "short", "patient_position": "FFS"}, 0.45, 0.5),
    ({"grid": PET8, "pet_fov": "short"}, 0.6, 0.7),
]
SLOW_EXAMS = [
    ({"grid": {"ct_px": 1.0, "ct_dz": 3.0, "pet_px": 4.0, "pet_fwhm_mm": 6.5}}, 0.5, 1.0),
    ({"grid": {"ct_px": 1.5, "ct_dz": 2.0, "pet_px": 4.0, "pet_fwhm_mm": 6.5}, "pet_fov": "short"}, 0.5, 1.0),
    ({"grid": PET4, "patient_position": "FFS"}, 0.5, 1.0),
    ({"grid": {"ct_px": 2.0, "ct_dz": 2.0, "pet_px": 4.0, "pet_fwhm_mm": 6.5}, "pet_fov": "short", "patient_position": "FFS"}, 0.5, 1.0),
    ({"grid": PET4, "pet_fov": "short"}, 0.5, 1.0),
    ({"grid": PET8, "patient_position": "FFS"}, 0.6, 1.0),
    ({"grid": PET8}, 0.6, 1.0),
    ({"grid": {"ct_px": 1.5, "ct_dz": 3.0, "pet_px": 4.0, "pet_fwhm_mm": 6.5}, "patient_position": "FFS"}, 0.5, 1.0),
]


def _variants(exams) -> list[dict]:
    return [{**v, "misalignment": MISALIGNMENT, "lesions": "always"} for v, _, _ in exams]


def _cohort(tmp_path_factory, exams, seed: int) -> Path:
    from tests.support.cohort import cohort

    source, _ = cohort(tmp_path_factory, n_exams=len(exams), seed=seed, variants=_variants(exams), size="full")
    return source


def _images(source: Path, exam_id: str) -> tuple[sitk.Image, sitk.Image, sitk.Image]:
    """CT, PET in SUV and body mask of an exam, read by convert's own read step."""
    from builder.convert.discover import discover_exam
    from builder.convert.pipeline import body_image, read_exam

    images = read_exam(discover_exam(source / "dicom" / exam_id, exam_id))
    return images.ct, images.pet_suv, body_image(images.body, images.ct)


def _load(source: Path, exam_id: str) -> tuple[sitk.Image, sitk.Image, sitk.Image, dict]:
    """CT, PET in SUV and body mask (:func:`_images`) and the exam's truth."""
    return *_images(source, exam_id), load_truth(source / "truth", exam_id)


def _lesion_errors(transform: sitk.Transform, truth: dict) -> np.ndarray:
    """|T(c) - M c| (mm) at every lesion centre c."""
    return np.linalg.norm(lesion_residuals(transform, truth), axis=1)


def _register(ct, pet, body, settings: AlignSettings = AlignSettings()) -> sitk.Euler3DTransform:
    """The rigid stage exactly as align_pet runs it."""
    fixed, moving, mask = align._registration_images(ct, pet, body, settings.registration_spacing_mm)
    return align.register_rigid(fixed, moving, mask, settings=settings)


@pytest.fixture(scope="module")
def realistic(tmp_path_factory) -> Path:
    return _cohort(tmp_path_factory, EXAMS, seed=31)


def test_generator_grids_and_misalignment_as_asked(realistic) -> None:
    """The realistic exams have the grids and misalignment limits the tests rely on."""
    for k, (variant, _, _) in enumerate(EXAMS):
        truth = load_truth(realistic / "truth", f"EX{k:04d}")
        g = variant["grid"]
        np.testing.assert_allclose(truth["ct"]["spacing"], [g["ct_px"], g["ct_px"], g["ct_dz"]], atol=1e-6)
        np.testing.assert_allclose(truth["pet"]["spacing"], [g["pet_px"]] * 3, atol=1e-6)
        ct_z = truth["ct"]["origin"][2] + np.array([0, 1]) * (truth["ct"]["size"][2] - 1) * truth["ct"]["direction"][8] * g["ct_dz"]
        pet_z = truth["pet"]["origin"][2] + np.array([0, 1]) * (truth["pet"]["size"][2] - 1) * truth["pet"]["direction"][8] * g["pet_px"]
        assert min(ct_z) <= min(pet_z) and max(pet_z) <= max(ct_z), (truth["exam_id"], ct_z, pet_z)
        if variant.get("pet_fov") == "short":
            assert max(pet_z) - min(pet_z) < max(ct_z) - min(ct_z) - 90.0, truth["exam_id"]
        assert np.all(np.abs(truth["misalignment"]["rotation_deg"]) <= 3.0)
        assert 2.0 <= np.linalg.norm(truth["misalignment"]["translation_mm"]) <= 10.0
        assert truth["lesions"], truth["exam_id"]


@pytest.mark.parametrize("k", range(len(EXAMS)), ids=["pet4-matched-hfs", "pet4-short-ffs", "pet8-short-hfs"])
def test_rigid_registration_meets_tre_bounds_per_exam(realistic, k) -> None:
    variant, mean_bound, worst_bound = EXAMS[k]
    ct, pet, body, truth = _load(realistic, f"EX{k:04d}")
    errors = _lesion_errors(_register(ct, pet, body), truth)
    assert errors.mean() <= mean_bound and errors.max() <= worst_bound, (truth["exam_id"], variant, errors.round(3))


def test_align_pet_keeps_an_improving_transform_and_rejects_a_bad_one(realistic, monkeypatch) -> None:
    """The applied transform improves the metric and is the one recorded; a transform the metric
    says is worse than the scanner's alignment (the true one moved 25 mm) is not applied."""
    ct, pet, body, truth = _load(realistic, "EX0000")
    settings = AlignSettings(deformable=Deformable.OFF, interpolation=Interpolation.LINEAR)
    res = align.align_pet(ct, pet, settings=settings, body=body)
    assert res.record["method"] == Method.RIGID.value and res.record["improved"] is True
    assert res.record["metric_after"] < res.record["metric_before"]
    assert _lesion_errors(res.transform, truth).mean() <= 0.5
    m = np.asarray(res.record["transform"]["matrix"])
    np.testing.assert_allclose(m, align.transform_matrix(res.transform), atol=1e-5)

    def bad(fixed, moving, mask, *, settings):  # an optimiser that ran 25 mm past the truth
        t = sitk.Euler3DTransform()
        t.SetMatrix(np.asarray(truth["misalignment"]["matrix"])[:3, :3].ravel().tolist())
        t.SetTranslation((np.asarray(truth["misalignment"]["matrix"])[:3, 3] + [25.0, 0.0, 0.0]).tolist())
        return t

    monkeypatch.setattr(align, "register_rigid", bad)
    rejected = align.align_pet(ct, pet, settings=settings, body=body)
    assert rejected.record["method"] == Method.SCANNER.value and rejected.record["improved"] is False
    assert rejected.record["metric_rigid"] > rejected.record["metric_before"]
    assert rejected.record["shift_mm"] == 0.0


def test_registration_is_deterministic_per_exam(realistic) -> None:
    """Same exam, same settings: the same transform to the last bit (with the metric split into
    16 work units it varied by up to 5e-7 mm, enough to flip the recorded 1e-6 rounding)."""
    ct, pet, body, _ = _load(realistic, "EX0002")
    assert _register(ct, pet, body).GetParameters() == _register(ct, pet, body).GetParameters()


@pytest.fixture(scope="module")
def larger(tmp_path_factory) -> Path:
    return _cohort(tmp_path_factory, SLOW_EXAMS, seed=57)


# EX0004 (CT 2 x 3 mm, PET 4 mm, short FOV) ended at 0.57 mm mean with the metric sampled at
# random over the whole body (a strict xfail until issue 20); 0.44 / 0.72 mm since, 0.34 / 0.48 mm with
# the optimiser scaled from the body (measured mean over the eight: 0.09-0.34 mm; PET 8 mm 0.14, 0.16).
_SLOW_IDS = [f"EX{k:04d}" for k in range(len(SLOW_EXAMS))]


@pytest.mark.slow
@pytest.mark.parametrize("k", range(len(SLOW_EXAMS)), ids=_SLOW_IDS)
def test_rigid_registration_meets_tre_bounds_on_a_larger_cohort(larger, k) -> None:
    """Eight more exams (CT 1-2 mm in-plane, 2-3 mm slices; PET 4 and 8 mm), each within its bounds."""
    variant, mean_bound, worst_bound = SLOW_EXAMS[k]
    ct, pet, body, truth = _load(larger, f"EX{k:04d}")
    errors = _lesion_errors(_register(ct, pet, body), truth)
    assert errors.mean() <= mean_bound and errors.max() <= worst_bound, (truth["exam_id"], variant, errors.round(3))


# --------------------------------------------------------------------------------------------
# the independent generator (shared/phantoms/foreign_cohort.py): its own body, PET field of view
# and 6.5 mm PSF. Sampling the whole CT body, registration left 1.2-1.9 mm along z on every
# realistic exam of it (issue 20): the shoulders' flat step, located by the CT's 3 mm slices only
# to within a slice, pulled the metric's optimum towards the feet.

SEED_ENV = "LYMPHATLAS_REGISTRATION_SEED"


@pytest.fixture(scope="module")
def foreign_seed() -> int:
    """A seed drawn per run (printed; ``LYMPHATLAS_REGISTRATION_SEED=N`` replays it)."""
    from lymphatlas_synth import foreign as foreign_phantoms

    if foreign_phantoms.foreign_script() is None:
        pytest.skip(foreign_phantoms.missing_reason())
    value = os.environ.get(SEED_ENV)
    seed = int(value) if value else random.SystemRandom().randrange(1, 1_000_000)
    print(f"independent generator seed {seed} (replay: {SEED_ENV}={seed})")
    return seed


def _foreign(tmp_path_factory, seed: int, size: str, limit: int) -> tuple[Path, list[dict]]:
    from lymphatlas_synth import foreign as foreign_phantoms

    root = tmp_path_factory.mktemp(f"foreign_{size}_{seed}")
    truths = foreign_phantoms.generate(root / "source", root / "truth", seed=seed, size=size, limit=limit)
    return root / "source", truths


def _foreign_errors(matrix, truth: dict) -> np.ndarray:
    from lymphatlas_synth import foreign as foreign_phantoms

    return foreign_phantoms.lesion_residuals(np.asarray(matrix, float), truth)


@pytest.fixture(scope="module")
def foreign_medium(tmp_path_factory, foreign_seed) -> tuple[int, Path, list[dict]]:
    """Two realistic exams of the independent generator (CT ~2 mm, 3 mm slices; PET ~4 mm, 6.5 mm PSF)."""
    source, truths = _foreign(tmp_path_factory, foreign_seed, "medium", limit=2)
    assert len(truths) == 2, [t["exam_id"] for t in truths]
    return foreign_seed, source, truths


def _convert_meets_the_realistic_bounds(tmp_path_factory, seed: int, source: Path, truths: list[dict]) -> None:
    """Convert the exams as `convert` runs them: each keeps its rigid registration, and the transform
    case.json records puts every lesion centre within issue 20's bounds (mean at most 0.5 mm, worst
    lesion at most 1.0 mm, per exam)."""
    from builder.convert import pipeline

    work = tmp_path_factory.mktemp("foreign_work")
    summary = pipeline.convert_cohort(source, work, workers=1, progress=False)
    assert summary.n_converted == len(truths), (seed, summary.line())
    ids = pipeline.read_id_map(work)
    for truth in truths:
        case = json.loads((work / "cases" / ids[truth["exam_id"]]["case_id"] / "case.json").read_text())
        alignment = case["alignment"]
        errors = _foreign_errors(alignment["transform"]["matrix"], truth)
        tre = np.linalg.norm(errors, axis=1)
        what = (f"seed {seed} exam {truth['exam_id']} ({truth['variant']}): TRE per lesion "
                f"{tre.round(3).tolist()} mm, mean residual xyz {errors.mean(0).round(3).tolist()} mm")
        assert alignment["method"] == Method.RIGID.value and alignment["improved"] is True, (what, alignment["decision"])
        assert tre.mean() <= 0.5 and tre.max() <= 1.0, what


def test_convert_meets_tre_bounds_on_the_independent_generator(tmp_path_factory, foreign_medium) -> None:
    """The two realistic exams of the seed drawn for this run, converted: see
    :func:`_convert_meets_the_realistic_bounds`."""
    _convert_meets_the_realistic_bounds(tmp_path_factory, *foreign_medium)


@pytest.mark.slow
def test_convert_keeps_the_registration_of_fmp3_of_seed_269172(tmp_path_factory) -> None:
    """The exam that found the keep-or-reject metric's bias: FMP3 of seed 269172 (GE, scout and NAC
    series beside it), whose scanner alignment is 4-6 mm off at its lesions, scored lower than the
    registration (0.2 mm) until the metric's coarser region took whole blocks (:func:`align._evaluator`),
    and convert kept the scanner's alignment."""
    from lymphatlas_synth import foreign as foreign_phantoms

    if foreign_phantoms.foreign_script() is None:
        pytest.skip(foreign_phantoms.missing_reason())
    source, truths = _foreign(tmp_path_factory, 269172, "medium", limit=2)
    assert "FMP3" in [t["exam_id"] for t in truths]
    _convert_meets_the_realistic_bounds(tmp_path_factory, 269172, source, truths)


def _affine(matrix: np.ndarray) -> sitk.AffineTransform:
    t = sitk.AffineTransform(3)
    t.SetMatrix(np.asarray(matrix, float)[:3, :3].ravel().tolist())
    t.SetTranslation(np.asarray(matrix, float)[:3, 3].tolist())
    return t


def test_keep_or_reject_metric_has_its_optimum_at_the_truth(foreign_medium) -> None:
    """The metric that decides whether a registration is kept (:func:`align._evaluator`, on its 2x
    coarser grid for these exams) prefers the true transform to the scanner's alignment, and its optimum
    along each axis, from a parabola through the truth and +-1.5 mm, lies within 0.8 mm of the truth.
    Measured on 36 exams of 4 seeds: within 0.57 mm; with the region resampled by nearest neighbour
    (half a fine voxel off) 0.2-3.5 mm off in y, over 0.8 mm on 30 of 36, and FMP3 of seed 269172
    scored its scanner alignment (4-6 mm off) lower than the truth."""
    seed, source, truths = foreign_medium
    settings = AlignSettings()
    for truth in truths:
        ct, pet, body = _images(source, truth["exam_id"])
        fixed, moving, mask = align._registration_images(ct, pet, body, settings.registration_spacing_mm)
        assert np.prod(fixed.GetSize()) > align.EVALUATION_MAX_VOXELS  # the coarser grid is the one tested
        true = np.asarray(truth["misalignment"]["ct_to_pet_lps"], float)
        identity = align._scanner_alignment(fixed)
        region = align._overlap_mask(fixed, mask, moving, [identity, _affine(true)], settings.fov_margin_mm)
        evaluate = align._evaluator(settings, fixed, moving, region)
        at_truth, at_scanner = evaluate(_affine(true)), evaluate(identity)
        what = f"seed {seed} exam {truth['exam_id']} ({truth['variant']})"
        assert at_truth < at_scanner - align.MIN_RELATIVE_IMPROVEMENT * abs(at_scanner), (what, at_truth, at_scanner)
        for axis in range(3):
            values = []
            for d in (-1.5, 1.5):
                moved = true.copy()
                moved[axis, 3] += d
                values.append(evaluate(_affine(moved)))
            curvature = values[0] + values[1] - 2 * at_truth
            assert curvature > 0, (what, axis, values, at_truth)
            optimum = 1.5 * (values[0] - values[1]) / (2 * curvature)
            assert abs(optimum) <= 0.8, (what, "xyz"[axis], round(optimum, 3))


def test_rigid_registration_meets_the_coarse_bound_on_the_independent_generator(tmp_path_factory, foreign_seed) -> None:
    """Coarse grids of the independent generator (CT 3.9 mm, PET 7.8 mm), on its first four layouts
    (vendors, feet first): mean TRE at most 0.6 mm per exam, issue 20's goal. The coarse-PET recipe (last
    level on the upsampled PET with 128 bins and 200 k samples, stopped once settled, the optimiser scaled
    from the body) gave 0.07-0.36 mm on the 72 independent exams measured (``benchmarks/results/registration.md``: seeds 119036, 555123, 2026,
    2027, 271828, 161803, 424242, 777001); with 64 bins 6MVM of 119036 ended at 0.70 mm, which this bound fails."""
    source, truths = _foreign(tmp_path_factory, foreign_seed, "small", limit=4)
    assert len(truths) == 4, [t["exam_id"] for t in truths]
    for truth in truths:
        ct, pet, body = _images(source, truth["exam_id"])
        errors = _foreign_errors(align.transform_matrix(_register(ct, pet, body)), truth)
        tre = np.linalg.norm(errors, axis=1)
        assert tre.mean() <= 0.6, (f"seed {foreign_seed} exam {truth['exam_id']} ({truth['variant']}): TRE per lesion "
                                   f"{tre.round(3).tolist()} mm, mean residual xyz {errors.mean(0).round(3).tolist()} mm")


@pytest.mark.slow
def test_rigid_registration_meets_tre_bounds_on_independent_scanner_sizes(tmp_path_factory, foreign_seed) -> None:
    """Two exams of the independent generator at a scanner's sizes (CT 512 x 512 at ~1 mm, PET ~4 mm):
    mean at most 0.5 mm and worst lesion at most 1.0 mm per exam."""
    source, truths = _foreign(tmp_path_factory, foreign_seed, "full", limit=2)
    for truth in truths:
        ct, pet, body = _images(source, truth["exam_id"])
        errors = _foreign_errors(align.transform_matrix(_register(ct, pet, body)), truth)
        tre = np.linalg.norm(errors, axis=1)
        assert tre.mean() <= 0.5 and tre.max() <= 1.0, (
            f"seed {foreign_seed} exam {truth['exam_id']}: TRE per lesion {tre.round(3).tolist()} mm, "
            f"mean residual xyz {errors.mean(0).round(3).tolist()} mm")



def test_an_interrupted_independent_cohort_is_generated_again(tmp_path, monkeypatch) -> None:
    """A generator run that fails after writing part of its truth leaves no truth folder, so the next
    call generates the cohort again instead of taking the part for the whole (seen: a benchmark
    stopped mid-generation, then run again, found one exam of nine)."""
    from lymphatlas_synth import foreign as foreign_phantoms

    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / foreign_phantoms.SCRIPT).write_text(
        "import argparse, json, os, pathlib, sys\n"
        "ap = argparse.ArgumentParser(); [ap.add_argument(a) for a in ('--out', '--truth', '--seed', '--size', '--limit')]\n"
        "a = ap.parse_args(); t = pathlib.Path(a.truth); t.mkdir(parents=True); pathlib.Path(a.out).mkdir(parents=True)\n"
        "for i in range(3):\n"
        "    (t / f'E{i}.json').write_text(json.dumps({'exam_id': f'E{i}', 'expected_outcome': 'ok'}))\n"
        "    if i == 0 and os.environ.get('FAIL_AFTER_ONE'): sys.exit(3)\n")
    monkeypatch.setenv(foreign_phantoms.ENV, str(fake))
    monkeypatch.setenv("FAIL_AFTER_ONE", "1")
    with pytest.raises(RuntimeError, match="--seed 5 --size small failed"):
        foreign_phantoms.generate(tmp_path / "source", tmp_path / "truth", seed=5, size="small")
    assert not (tmp_path / "truth").exists() and not (tmp_path / "source").exists()
    monkeypatch.delenv("FAIL_AFTER_ONE")
    truths = foreign_phantoms.generate(tmp_path / "source", tmp_path / "truth", seed=5, size="small")
    assert [t["exam_id"] for t in truths] == ["E0", "E1", "E2"]
