"""The pictures are right, not just present: red outlines land where the lesion physically is.

Each test builds a case in physical space (a lesion box given in RAS millimetres, sampled on a grid
with a known affine), renders it, reads the PNG back and finds the red pixels inside each panel.
The expected pixel positions come from geometry alone: the panel spans the volume's field of view
in millimetres, the patient's right / anterior / superior edge first (radiological convention).
Head-first, feet-first, row-flipped and permuted-axis grids of the same anatomy must all give the
same picture.
"""

from __future__ import annotations

import io

import matplotlib.image
import numpy as np
import pytest

from lymphatlas_ds import figures
from lymphatlas_ds.figures import CanonicalCase, View, render_case

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

# name -> (direction: columns are the LPS directions of the x, y, z index axes, spacing xyz, size xyz)
GRIDS = {
    "head_first": (np.eye(3), (2.0, 2.5, 4.0), (60, 48, 36)),
    "feet_first": (np.diag([-1.0, 1.0, -1.0]), (2.0, 2.5, 4.0), (60, 48, 36)),
    "rows_flipped": (np.diag([1.0, -1.0, 1.0]), (2.0, 2.5, 4.0), (60, 48, 36)),
    # x index runs head-to-feet, y posterior-to-anterior, z right-to-left: a permuted (coronal-like) stack
    "permuted": (np.array([[0.0, 0.0, 1.0], [0.0, -1.0, 0.0], [-1.0, 0.0, 0.0]]), (4.0, 2.5, 2.0), (36, 48, 60)),
}
# The same physical field of view for every grid: RAS centre (mm).
FOV_CENTRE_RAS = np.array([5.0, -20.0, -300.0])

BIG_BOX_RAS = (np.array([-30.0, -30.0, -330.0]), np.array([-8.0, 0.0, -290.0]))  # patient's left (RAS x < 0)
SMALL_BOX_RAS = (np.array([25.0, -50.0, -260.0]), np.array([33.0, -43.0, -250.0]))  # right, posterior, higher


def _grid(name: str):
    direction, spacing, size = GRIDS[name]
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(spacing)
    centre_index = (np.array(size) - 1) / 2.0
    lps[:3, 3] = LPS_TO_RAS @ FOV_CENTRE_RAS - lps[:3, :3] @ centre_index
    affine_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    return affine_ras, size


def _centres_ras(affine_ras: np.ndarray, size_xyz) -> np.ndarray:
    """RAS centre (mm) of every voxel, as an array [z, y, x, 3]."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in size_xyz[::-1]), indexing="ij")
    idx = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(float)
    return (idx @ affine_ras.T)[..., :3]


def _inside(centres: np.ndarray, box) -> np.ndarray:
    lo, hi = box
    return np.all((centres >= lo) & (centres <= hi), axis=-1)


def _case(name: str):
    affine, size = _grid(name)
    centres = _centres_ras(affine, size)
    rel = (centres - FOV_CENTRE_RAS) / np.array([55.0, 50.0, 1e9])
    body = (rel[..., 0] ** 2 + rel[..., 1] ** 2) <= 1.0
    ct = np.where(body, 40, -1000).astype(np.int16)
    pet = np.where(body, 1.0, 0.0).astype(np.float32)
    label = np.zeros(ct.shape, np.uint8)
    big, small = _inside(centres, BIG_BOX_RAS), _inside(centres, SMALL_BOX_RAS)
    label[big | small] = 1
    pet[big] = 6.0
    pet[small] = 25.0  # the hotter lesion is the smaller one: planes must follow size, not SUV
    return ct, pet, label, affine, centres


def _edges(centres: np.ndarray, mask: np.ndarray, spacing_ras: np.ndarray):
    """(low, high) RAS edges (mm) of the voxels in ``mask`` along each axis."""
    pts = centres[mask]
    return pts.min(axis=0) - spacing_ras / 2, pts.max(axis=0) + spacing_ras / 2


def _red_pixels(png: bytes, fig: figures.CaseFigure, key: str) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """(rows, cols) of strongly red pixels inside a panel, relative to its top-left, and the panel size."""
    rgba = matplotlib.image.imread(io.BytesIO(png))
    height = rgba.shape[0]
    box = fig.axes[key].get_window_extent()
    top, bottom = height - box.y1, height - box.y0
    left, right = box.x0, box.x1
    crop = rgba[int(np.ceil(top)) : int(np.floor(bottom)), int(np.ceil(left)) : int(np.floor(right)), :3]
    red = (crop[..., 0] > 0.7) & (crop[..., 1] < 0.35) & (crop[..., 2] < 0.35)
    rows, cols = np.nonzero(red)
    return np.stack([rows + np.ceil(top) - top, cols + np.ceil(left) - left], axis=1), (
        top,
        left,
        bottom - top,
        right - left,
    )


# For each view: (RAS axis along the columns, RAS axis down the rows); both run from the
# high (right / anterior / superior) end of the field of view.
VIEW_AXES = {"axial": (0, 1), "coronal": (0, 2), "sagittal": (1, 2), "mip": (0, 2)}


def _expected_mm(fov_hi: np.ndarray, edges, view: str):
    col_axis, row_axis = VIEW_AXES[view]
    lo, hi = edges
    return (fov_hi[row_axis] - hi[row_axis], fov_hi[row_axis] - lo[row_axis]), (
        fov_hi[col_axis] - hi[col_axis],
        fov_hi[col_axis] - lo[col_axis],
    )


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_red_outline_sits_on_the_lesion_in_every_view(grid):
    ct, pet, label, affine, centres = _case(grid)
    spacing_ras = np.abs(affine[:3, :3]).sum(axis=1)  # axis-aligned grids: one non-zero per row
    all_voxels = np.ones(label.shape, bool)
    fov_lo, fov_hi = _edges(centres, all_voxels, spacing_ras)
    fov = fov_hi - fov_lo
    big = _inside(centres, BIG_BOX_RAS)
    small = _inside(centres, SMALL_BOX_RAS)
    assert big.sum() > 8 * small.sum() > 0

    fig = render_case(ct, pet, label, affine, title="LA-test")
    png = fig.png_bytes()
    for key in ["axial/ct_label", "axial/pet_label", "coronal/ct_label", "coronal/pet_label",
                "sagittal/ct_label", "sagittal/pet_label", "mip"]:
        view = key.split("/")[0]
        col_axis, row_axis = VIEW_AXES[view]
        pts, (_, _, h_px, w_px) = _red_pixels(png, fig, key)
        assert len(pts) > 10, f"{grid} {key}: no red outline drawn"
        # The panel shows the whole field of view to scale.
        mm_per_px_row, mm_per_px_col = fov[row_axis] / h_px, fov[col_axis] / w_px
        assert mm_per_px_row == pytest.approx(mm_per_px_col, rel=0.03), f"{grid} {key}: aspect ratio is not 1 mm : 1 mm"
        rows_mm = pts[:, 0] * mm_per_px_row
        cols_mm = pts[:, 1] * mm_per_px_col
        mask = big | small if view == "mip" else big
        (r0, r1), (c0, c1) = _expected_mm(fov_hi, _edges(centres, mask, spacing_ras), view)
        tol = 2.5 * max(mm_per_px_row, mm_per_px_col)  # line width and anti-aliasing
        assert rows_mm.min() == pytest.approx(r0, abs=tol), f"{grid} {key}: top of the outline"
        assert rows_mm.max() == pytest.approx(r1, abs=tol), f"{grid} {key}: bottom of the outline"
        assert cols_mm.min() == pytest.approx(c0, abs=tol), f"{grid} {key}: left of the outline"
        assert cols_mm.max() == pytest.approx(c1, abs=tol), f"{grid} {key}: right of the outline"
        if view == "mip":
            # The small lesion is outlined too, at its own place.
            (s0, s1), (t0, t1) = _expected_mm(fov_hi, _edges(centres, small, spacing_ras), view)
            near = (np.abs(rows_mm - (s0 + s1) / 2) < (s1 - s0)) & (np.abs(cols_mm - (t0 + t1) / 2) < (t1 - t0))
            assert near.sum() > 4, f"{grid}: the small lesion is missing from the MIP"


def test_same_anatomy_gives_the_same_picture_on_every_grid():
    pictures = {}
    for grid in GRIDS:
        ct, pet, label, affine, _ = _case(grid)
        fig = render_case(ct, pet, label, affine)
        case = CanonicalCase.from_arrays(ct, pet, label, affine)
        pictures[grid] = [figures.plane(case.pet, v, fig.focus[figures._PLANES[v][0]]) for v in View]
    ref = pictures.pop("head_first")
    for grid, planes in pictures.items():
        for view, a, b in zip(View, ref, planes):
            assert a.shape == b.shape and np.array_equal(a, b), f"{grid}: {view.value} plane differs from head-first"


def test_planes_follow_the_largest_lesion_not_the_hottest():
    ct, pet, label, affine, centres = _case("head_first")
    case = CanonicalCase.from_arrays(ct, pet, label, affine)
    focus, in_lesion = figures.focus_index(case.label)
    assert in_lesion
    ras = case.ras(focus)
    lo, hi = BIG_BOX_RAS
    assert np.all(ras >= lo) and np.all(ras <= hi), f"focus {ras} is not in the largest lesion"


def test_no_lesion_no_red_and_says_so():
    ct, pet, label, affine, _ = _case("feet_first")
    label[:] = 0
    fig = render_case(ct, pet, label, affine)
    png = fig.png_bytes()
    for key in ["axial/ct_label", "coronal/pet_label", "sagittal/ct_label", "mip"]:
        pts, _ = _red_pixels(png, fig, key)
        assert len(pts) == 0, f"{key}: red pixels without a lesion"
    assert "no lesion" in fig.figure.get_suptitle()


def test_before_registration_recovers_the_unregistered_pet():
    """The PET as the scanner placed it, recomputed from the registered PET, matches SimpleITK's own resampling."""
    sitk = pytest.importorskip("SimpleITK")
    affine, size = _grid("feet_first")
    centres = _centres_ras(affine, size)
    # The PET as acquired (on the CT grid, scanner geometry): a bright ball at a known place.
    ball = np.linalg.norm(centres - np.array([-10.0, -25.0, -300.0]), axis=-1) <= 12.0
    original = np.where(ball, 10.0, 0.0).astype(np.float32)
    image = sitk.GetImageFromArray(original)
    direction, spacing, _ = GRIDS["feet_first"]
    image.SetSpacing(spacing)
    image.SetDirection(direction.ravel().tolist())
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    image.SetOrigin(lps[:3, 3].tolist())
    # Registration found T (CT point -> PET point): 3 degrees about z, (6, -4, 8) mm.
    euler = sitk.Euler3DTransform((-10.0, 25.0, -300.0), 0.0, 0.0, np.deg2rad(3.0), (6.0, -4.0, 8.0))
    matrix = np.eye(4)
    rot = np.array(euler.GetMatrix()).reshape(3, 3)
    matrix[:3, :3] = rot
    centre = np.array(euler.GetCenter())
    matrix[:3, 3] = centre + np.array(euler.GetTranslation()) - rot @ centre
    # What the case folder holds: aligned(p) = original(T p), as SimpleITK resamples it.
    aligned = sitk.GetArrayFromImage(sitk.Resample(image, image, euler, sitk.sitkLinear, 0.0))
    case = CanonicalCase.from_arrays(aligned, aligned, None, affine)
    truth = CanonicalCase.from_arrays(original, original, None, affine)
    focus = tuple(int(v) for v in np.argwhere(truth.pet > 5).mean(axis=0).round())
    for view in View:
        index = focus[figures._PLANES[view][0]]
        before = figures.before_registration(case, case, matrix, view, index)
        expected = figures.plane(truth.pet, view, index)
        moved = figures.plane(case.pet, view, index)
        # Two linear resamplings blur the edge by a voxel; the bulk must coincide.
        overlap = lambda a: ((a > 5) & (expected > 5)).sum() / max((expected > 5).sum(), 1)  # noqa: E731
        assert overlap(before) > 0.85, f"{view.value}: before-registration plane does not match the unregistered PET"
        assert overlap(before) > overlap(moved) + 0.1, f"{view.value}: the shift was not undone"


def test_render_registration_draws_both_rows():
    ct, pet, label, affine, _ = _case("head_first")
    shift = np.eye(4)
    shift[:3, 3] = [8.0, 0.0, 12.0]
    fig = figures.render_registration(ct, pet, affine, shift, label=label, title="LA-test")
    assert set(fig.axes) == {f"{w}/{v.value}" for w in ("before", "after") for v in View}
    rgba = matplotlib.image.imread(io.BytesIO(fig.png_bytes()))
    assert rgba[..., :3].std() > 0.05


def test_mismatched_grids_are_refused_with_a_reason():
    ct, pet, label, affine, _ = _case("head_first")
    with pytest.raises(ValueError, match="one grid"):
        CanonicalCase.from_arrays(ct, pet[:-1], label, affine)


def test_fusion_keeps_ct_where_there_is_no_uptake():
    ct = np.array([[40, -1000]], np.int16)
    pet = np.array([[0.0, 4.0]], np.float32)
    rgb = figures.fusion_rgb(ct, pet)
    assert np.allclose(rgb[0, 0], 0.5, atol=0.01)  # W400/L40: 40 HU is mid grey, untouched by PET
    assert rgb[0, 1, 0] > rgb[0, 1, 2] + 0.3  # hot: uptake is warm (red-orange) over black air


def test_lymphatlas_show_draws_the_release_case(tmp_path, monkeypatch, capsys):
    """`lymphatlas show` on a built release draws the same picture as the arrays written into WORK."""
    from builder.release.build import build_release
    from lymphatlas_ds.cli import main
    from lymphatlas_synth.fake_work import make_fake_work

    monkeypatch.setenv("LYMPHATLAS_CACHE", str(tmp_path / "cache"))
    cases = make_fake_work(tmp_path / "work", n_patients=3, shape_zyx=(16, 20, 24))
    build_release(tmp_path / "work", tmp_path / "release", version="1.0.0")
    case = max(cases, key=lambda c: int(c.label.sum()))
    out = tmp_path / "show.png"
    assert main(["show", str(tmp_path / "release"), case.case_id, "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    title = f"{case.case_id} ({case.diagnosis}, release 1.0.0)"
    truth = render_case(case.ct, case.pet, case.label, case.affine, title=title)
    assert out.read_bytes() == truth.png_bytes(), "the release case is drawn differently from the arrays written"

    assert main(["show", str(tmp_path / "release"), "LA-nope", "--out", str(tmp_path / "x.png")]) == 2
    assert "LA-nope" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_lymphatlas_show_writes_the_format_its_suffix_names(tmp_path):
    """As typed: `lymphatlas show REL CASE --out x.jpg` writes JPEG bytes; an unknown suffix is refused up front."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    from builder.release.build import build_release
    from lymphatlas_synth.fake_work import make_fake_work

    cases = make_fake_work(tmp_path / "work", n_patients=2, shape_zyx=(16, 20, 24))
    build_release(tmp_path / "work", tmp_path / "release", version="1.0.0")
    env = {**os.environ, "LYMPHATLAS_CACHE": str(tmp_path / "cache")}
    lymphatlas = str(Path(sys.executable).with_name("lymphatlas"))
    for name, fmt, magic in (("x.jpg", "JPEG", b"\xff\xd8\xff"), ("x.pdf", None, b"%PDF"), ("x.PNG", "PNG", b"\x89PNG")):
        proc = subprocess.run([lymphatlas, "show", "release", cases[0].case_id, "--out", name], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / name).read_bytes()[: len(magic)] == magic
        if fmt:
            with Image.open(tmp_path / name) as image:
                assert image.format == fmt
    png_size = Image.open(tmp_path / "x.PNG").size
    assert Image.open(tmp_path / "x.jpg").size == png_size
    proc = subprocess.run([lymphatlas, "show", "release", cases[0].case_id, "--out", "x.gif"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "x.gif" in proc.stderr and ".jpg" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.gif").exists()


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_preview_drawn_one_volume_at_a_time_cuts_through_the_largest_lesion_on_every_grid(name):
    """PreviewDrawing (what a release uses: the label, then the CT, then the PET, never all three) finds the
    largest lesion's voxel on a [z, y, x] grid and maps it to the canonical axial plane: that plane's RAS
    height lies in the big lesion's box (truth: the generator's RAS boxes), its pictures are the canonical
    case's own plane and coronal MIP, and the PNGs are those of preview_images."""
    ct, pet, label, affine, centres = _case(name)
    drawing = figures.PreviewDrawing(affine, ct.shape)
    drawing.add_label(label)
    drawing.add_ct(ct)
    drawing.add_pet(pet)
    case = CanonicalCase.from_arrays(ct, pet, label, affine)
    k = drawing.focus[2]
    height = case.ras((0, 0, k))[2]
    lo, hi = BIG_BOX_RAS
    assert lo[2] <= height <= hi[2], f"{name}: axial plane at S {height:.1f} mm, the big lesion spans {lo[2]}..{hi[2]}"
    # the voxel nearest the lesion's centre (ties between equidistant voxels may go either way)
    assert case.label[drawing.focus] == 1 and drawing.focus[2] == figures.focus_index(case.label)[0][2]
    assert np.array_equal(drawing._planes["ct"], figures.plane(case.ct, View.AXIAL, k))
    assert np.array_equal(drawing._planes["mip"], figures.projection(case.pet, View.CORONAL))
    assert drawing.images() == figures.preview_images(ct, pet, label, affine)
    with pytest.raises(ValueError, match="before the PET"):
        drawing.add_label(label)
    with pytest.raises(ValueError, match="grid"):
        figures.PreviewDrawing(affine, ct.shape).add_label(label[:-1])
