"""Pictures of one PET/CT case: orthogonal views, fusion, label outlines, PET MIP, registration check.

Shared by the maintainers' QC report (``python -m builder report``) and the users' ``lymphatlas
show``; it imports nothing from ``builder``.

Orientation is taken from the RAS affine, never from the array order: the volumes are reoriented
to the closest canonical (RAS+) orientation with nibabel's orientation tools, so head-first,
feet-first and flipped-row exams all display the same way, in the radiological convention:

* axial: seen from the feet, anterior up, the patient's right on the image left;
* coronal: seen from the front, head up, the patient's right on the image left;
* sagittal: seen from the patient's left, head up, anterior on the image left.

Pixels are drawn in millimetres (``imshow`` extent from the voxel spacing, equal aspect), so a
5 mm slice looks 5 mm thick. Oblique acquisitions are shown in the closest canonical orientation
(no resampling), which tilts the picture by the obliquity, as most viewers' "native" mode does.

Example:
    >>> fig = render_case(ct, pet, label, affine, title="LA-3f9c2a1b")   # doctest: +SKIP
    >>> fig.save("LA-3f9c2a1b.png")                                       # doctest: +SKIP
"""

from __future__ import annotations

import enum
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lymphatlas_ds._io import write_atomic

logger = logging.getLogger(__name__)

FIGURES_VERSION = "1"
"""Bumped whenever the pictures change, so cached report images are redrawn."""

LABEL_COLOR = "red"
"""Lesion outlines are red (the paper's Figure 2); nothing else in the label panels is red."""

_EDGE_COLOR = "deepskyblue"
_LETTER_COLOR = "gold"


class View(str, enum.Enum):
    """The three orthogonal planes."""

    AXIAL = "axial"
    CORONAL = "coronal"
    SAGITTAL = "sagittal"


class Layer(str, enum.Enum):
    """The columns of the case figure (the paper's Figures 1-2)."""

    CT = "ct"
    PET = "pet"
    FUSION = "fusion"
    CT_LABEL = "ct_label"
    PET_LABEL = "pet_label"


# For each view, in canonical RAS+ index order (0 = towards Right, 1 = Anterior, 2 = Superior):
# the axis the plane is fixed on, the axis running down the rows, the axis running along the
# columns. Every displayed axis is reversed: rows start at the anterior / superior end, columns
# at the patient's right (axial, coronal) or anterior end (sagittal).
_PLANES: dict[View, tuple[int, int, int]] = {
    View.AXIAL: (2, 1, 0),
    View.CORONAL: (1, 2, 0),
    View.SAGITTAL: (0, 2, 1),
}

# Orientation letters (top, bottom, left, right) of each displayed plane.
_LETTERS: dict[View, tuple[str, str, str, str]] = {
    View.AXIAL: ("A", "P", "R", "L"),
    View.CORONAL: ("S", "I", "R", "L"),
    View.SAGITTAL: ("S", "I", "A", "P"),
}


@dataclass(frozen=True)
class Display:
    """Grey-level and layout settings of the pictures.

    Args:
        ct_window: CT window width in HU (400: soft tissue).
        ct_level: CT window centre in HU (40: soft tissue).
        suv_max: top of the PET scale (SUVbw); PET is inverted grey from 0 to this.
        mip_suv_max: top of the MIP's scale.
        fusion_suv_max: SUV at which the fusion colour saturates.
        dpi: resolution of the saved PNGs.
    """

    ct_window: float = 400.0
    ct_level: float = 40.0
    suv_max: float = 10.0
    mip_suv_max: float = 10.0
    fusion_suv_max: float = 10.0
    dpi: int = 100

    @property
    def ct_range(self) -> tuple[float, float]:
        return self.ct_level - self.ct_window / 2, self.ct_level + self.ct_window / 2


DEFAULT_DISPLAY = Display()


@dataclass(frozen=True)
class CanonicalCase:
    """A case's volumes in closest-canonical RAS+ index order ``[R, A, S]`` (index 0 grows to the right).

    Build it with :meth:`from_arrays`; the arrays are views of the inputs where no flip needs a copy.
    """

    ct: np.ndarray
    pet: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray  # canonical RAS affine: index [i, j, k] -> RAS mm
    spacing: tuple[float, float, float]  # mm along the canonical axes

    @classmethod
    def from_arrays(
        cls, ct: np.ndarray, pet: np.ndarray, label: np.ndarray | None, affine_ras: np.ndarray
    ) -> CanonicalCase:
        """Reorient ``[z, y, x]`` arrays (SimpleITK order) with their RAS affine.

        Example:
            >>> c = CanonicalCase.from_arrays(ct, pet, label, affine)  # doctest: +SKIP
            >>> c.ct.shape   # (n_right_left, n_anterior_posterior, n_superior_inferior)  # doctest: +SKIP
        """
        affine_ras = np.asarray(affine_ras, dtype=float)
        if affine_ras.shape != (4, 4):
            raise ValueError(f"expected a 4x4 RAS affine, got shape {affine_ras.shape}")
        shapes = {a.shape for a in (ct, pet, label) if a is not None}
        if len(shapes) != 1 or len(ct.shape) != 3:
            raise ValueError(
                f"CT, PET and label must be 3-D arrays on one grid, got shapes {sorted(shapes)}; "
                "resample the PET and label onto the CT grid first (python -m builder convert does)"
            )
        ornt, affine, spacing = canonical_geometry(affine_ras, ct.shape)

        def canon(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else to_canonical(a, ornt)

        return cls(canon(ct), canon(pet), canon(label), affine, spacing)  # type: ignore[arg-type]

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.ct.shape  # type: ignore[return-value]

    def ras(self, index: tuple[float, float, float]) -> np.ndarray:
        """RAS position (mm) of a canonical voxel index."""
        return (self.affine @ np.array([*index, 1.0]))[:3]


def canonical_geometry(affine_ras: np.ndarray, shape_zyx: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """``(orientation, canonical RAS affine, spacing)`` of a ``[z, y, x]`` grid with RAS affine ``affine_ras``
    (what :meth:`CanonicalCase.from_arrays` applies; :func:`to_canonical` reorients one array with it)."""
    import nibabel.orientations as nio

    affine_ras = np.asarray(affine_ras, dtype=float)
    ornt = nio.io_orientation(affine_ras)
    affine = affine_ras @ nio.inv_ornt_aff(ornt, tuple(shape_zyx)[::-1])
    spacing = tuple(float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    return ornt, affine, spacing  # type: ignore[return-value]


def to_canonical(array_zyx: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """A ``[z, y, x]`` array in canonical ``[R, A, S]`` index order (a view: transposes and flips)."""
    import nibabel.orientations as nio

    # [z, y, x] -> index order [x, y, z] of the affine, then flip/permute to RAS+.
    return nio.apply_orientation(np.asarray(array_zyx).transpose(2, 1, 0), ornt)


def plane(volume: np.ndarray, view: View, index: int) -> np.ndarray:
    """The 2-D picture of a canonical volume at ``index`` along the view's fixed axis.

    Row 0 is the anterior (axial) or superior (coronal, sagittal) end; column 0 the patient's
    right (axial, coronal) or anterior end (sagittal).
    """
    fixed, row_axis, col_axis = _PLANES[view]
    cut: list[slice | int] = [slice(None)] * 3
    cut[fixed] = int(index)  # basic indexing: a view, where np.take would copy through the flips
    return _orient(volume[tuple(cut)], fixed, row_axis, col_axis)


def projection(volume: np.ndarray, view: View) -> np.ndarray:
    """Maximum-intensity projection through the view's fixed axis, laid out like :func:`plane`."""
    fixed, row_axis, col_axis = _PLANES[view]
    return _orient(volume.max(axis=fixed), fixed, row_axis, col_axis)


def _orient(slab: np.ndarray, fixed: int, row_axis: int, col_axis: int) -> np.ndarray:
    remaining = [a for a in range(3) if a != fixed]
    slab = slab.transpose(remaining.index(row_axis), remaining.index(col_axis))
    return slab[::-1, ::-1]


def pixel_spacing(case: CanonicalCase, view: View) -> tuple[float, float]:
    """(row height, column width) in mm of the pictures of ``view``."""
    _, row_axis, col_axis = _PLANES[view]
    return case.spacing[row_axis], case.spacing[col_axis]


def focus_index(label: np.ndarray | None, pet: np.ndarray | None = None) -> tuple[tuple[int, int, int], bool]:
    """The canonical voxel the views cut through, and whether it lies in a lesion.

    The largest lesion (instance 1 of :func:`lymphatlas_ds.lesions.label_instances`, the lesion the
    release's lesion table calls 1) gives the point: its voxel nearest to its centre of mass, so a
    curved lesion still shows in all three planes. Without lesions the centre of the volume is used.
    """
    from lymphatlas_ds.lesions import label_instances

    shape = (label if label is not None else pet).shape  # type: ignore[union-attr]
    centre = tuple(int(s // 2) for s in shape)
    if label is None:
        return centre, False  # type: ignore[return-value]
    instances, n = label_instances(np.asarray(label))  # labels inside the lesions' bounding box only
    return lesion_focus(instances, n), n > 0


def lesion_focus(instances: np.ndarray, n: int) -> tuple[int, int, int]:
    """The voxel of instance 1 (the largest lesion) nearest to its centre of mass, in ``instances``'
    own index order; the centre of the volume when ``n`` is 0. Only lesion 1's bounding box is searched."""
    from scipy import ndimage

    if n == 0:
        return tuple(int(s // 2) for s in instances.shape)  # type: ignore[return-value]
    box = ndimage.find_objects(instances, max_label=1)[0]
    biggest = np.argwhere(instances[box] == 1) + np.array([b.start for b in box])
    nearest = biggest[np.argmin(((biggest - biggest.mean(axis=0)) ** 2).sum(axis=1))]
    return tuple(int(v) for v in nearest)  # type: ignore[return-value]


@dataclass
class CaseFigure:
    """A rendered figure and its panels, keyed ``"<view>/<layer>"``, ``"mip"`` or ``"<before|after>/<view>"``.

    ``focus`` is the canonical voxel index the planes cut through.
    """

    figure: object  # matplotlib.figure.Figure
    axes: dict[str, object] = field(default_factory=dict)
    focus: tuple[int, int, int] = (0, 0, 0)
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def png_bytes(self) -> bytes:
        return self.to_bytes("png")

    def to_bytes(self, fmt: str = "png") -> bytes:
        """The figure encoded as ``fmt`` (a value of :data:`IMAGE_FORMATS`), without time stamps."""
        buf = io.BytesIO()
        # No bbox_inches="tight": figure pixels stay where the axes say they are.
        self.figure.savefig(buf, format=fmt, dpi=self.figure.dpi, metadata=_NO_STAMPS.get(fmt))
        return buf.getvalue()

    def save(self, path: str | Path) -> Path:
        """Write the figure in the format its suffix names (:func:`image_format`), through a temporary file renamed into place."""
        return write_atomic(path, self.to_bytes(image_format(path)))


IMAGE_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".pdf": "pdf", ".svg": "svg"}
"""File suffixes a figure can be saved as, and matplotlib's format names."""
_NO_STAMPS = {"png": {"Software": None}, "pdf": {"Creator": None, "Producer": None, "CreationDate": None},
              "svg": {"Date": None, "Creator": None}}  # deterministic bytes


def image_format(path: str | Path) -> str:
    """The format ``path``'s suffix names; ``ValueError`` naming the accepted suffixes otherwise.

    Example:
        >>> image_format("case.JPG")
        'jpeg'
    """
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise ValueError(f"{path}: cannot tell the image format from {suffix or 'no suffix'!r}; "
                         f"end the name with one of {', '.join(IMAGE_FORMATS)}")
    return IMAGE_FORMATS[suffix]


def _new_figure(width_in: float, height_in: float, dpi: int):
    # The object-oriented API with an Agg canvas: no pyplot global state, no GUI backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def _extent(image: np.ndarray, spacing_rc: tuple[float, float]) -> tuple[float, float, float, float]:
    # (left, right, bottom, top) in mm with the first row at the top.
    rows, cols = image.shape[:2]
    return (0.0, cols * spacing_rc[1], rows * spacing_rc[0], 0.0)


def _show(ax, image: np.ndarray, spacing_rc, **kwargs) -> None:
    ax.imshow(image, extent=_extent(image, spacing_rc), aspect="equal", interpolation="antialiased", **kwargs)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _outline(ax, mask: np.ndarray, spacing_rc, *, color: str = LABEL_COLOR, linewidth: float = 1.0) -> None:
    """Draw the boundary of a binary 2-D mask; the 0.5 iso-line at voxel centres runs along voxel edges."""
    if not mask.any():
        return
    rows, cols = mask.shape
    x = (np.arange(cols) + 0.5) * spacing_rc[1]
    y = (np.arange(rows) + 0.5) * spacing_rc[0]
    # Pad by one voxel so a lesion touching the border is closed.
    padded = np.pad(mask.astype(np.float32), 1)
    xp = np.concatenate([[x[0] - spacing_rc[1]], x, [x[-1] + spacing_rc[1]]])
    yp = np.concatenate([[y[0] - spacing_rc[0]], y, [y[-1] + spacing_rc[0]]])
    ax.contour(xp, yp, padded, levels=[0.5], colors=[color], linewidths=linewidth, antialiased=True)
    rng = _extent(mask, spacing_rc)
    ax.set_xlim(rng[0], rng[1])
    ax.set_ylim(rng[2], rng[3])


def _letters(ax, view: View, *, color: str = _LETTER_COLOR) -> None:
    top, bottom, left, right = _LETTERS[view]
    kw = dict(transform=ax.transAxes, color=color, fontsize=7, fontweight="bold")
    ax.text(0.5, 0.99, top, ha="center", va="top", **kw)
    ax.text(0.5, 0.01, bottom, ha="center", va="bottom", **kw)
    ax.text(0.01, 0.5, left, ha="left", va="center", **kw)
    ax.text(0.99, 0.5, right, ha="right", va="center", **kw)


def _ct_grey(ct2d: np.ndarray, display: Display) -> np.ndarray:
    lo, hi = display.ct_range
    return np.clip((ct2d.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)


def fusion_rgb(ct2d: np.ndarray, pet2d: np.ndarray, display: Display = DEFAULT_DISPLAY) -> np.ndarray:
    """PET/CT fusion: windowed CT in grey under PET in the "hot" colour map.

    PET opacity grows with SUV (0 at SUV 0, 0.8 at ``fusion_suv_max / 3`` and above), so the
    anatomy stays visible where there is little uptake.
    """
    from matplotlib import colormaps

    grey = _ct_grey(ct2d, display)[..., None].repeat(3, axis=2)
    suv = np.clip(pet2d.astype(np.float32) / display.fusion_suv_max, 0.0, 1.0)
    hot = colormaps["hot"](suv)[..., :3]
    alpha = np.clip(suv * 3.0, 0.0, 1.0)[..., None] * 0.8
    return (1.0 - alpha) * grey + alpha * hot


def _focus_mm(case: CanonicalCase, focus: tuple[int, int, int]) -> np.ndarray:
    return case.ras(focus)


def _plane_title(view: View, case: CanonicalCase, focus: tuple[int, int, int]) -> str:
    r, a, s = _focus_mm(case, focus)
    pos = {
        View.AXIAL: f"{'S' if s >= 0 else 'I'} {abs(s):.0f} mm",
        View.CORONAL: f"{'A' if a >= 0 else 'P'} {abs(a):.0f} mm",
        View.SAGITTAL: f"{'R' if r >= 0 else 'L'} {abs(r):.0f} mm",
    }[view]
    return f"{view.value} ({pos})"


def render_case(
    ct: np.ndarray,
    pet: np.ndarray,
    label: np.ndarray | None,
    affine_ras: np.ndarray,
    *,
    title: str = "",
    display: Display = DEFAULT_DISPLAY,
    focus: tuple[int, int, int] | None = None,
) -> CaseFigure:
    """The case figure: axial, coronal and sagittal planes through the largest lesion of CT, PET,
    fusion, CT + label outline and PET + label outline, beside a coronal PET MIP with the label's
    projection outlined.

    Args:
        ct, pet, label: ``[z, y, x]`` arrays on one grid (HU, SUVbw, {0, 1}); ``label`` may be None.
        affine_ras: the grid's 4x4 RAS affine (NIfTI convention).
        title: shown above the figure; case ids only, never identifying data.
        display: windows and scales.
        focus: canonical RAS+ voxel index to cut through (default: the largest lesion).

    Example:
        >>> fig = render_case(ct, pet, label, affine, title="LA-3f9c2a1b")  # doctest: +SKIP
        >>> fig.save("LA-3f9c2a1b.png")                                      # doctest: +SKIP
    """
    case = CanonicalCase.from_arrays(ct, pet, label, affine_ras)
    in_lesion = True
    if focus is None:
        focus, in_lesion = focus_index(case.label, case.pet)
    logger.debug("%s: planes through RAS %s mm (%s)", title or "case", np.round(case.ras(focus), 1).tolist(),
                 "largest lesion" if in_lesion else "volume centre")
    fig, grid = _case_grid(case, display)
    heading = f"{title}  -  " if title else ""
    heading += "planes through the largest lesion" if in_lesion else "no lesion: planes through the volume centre"
    fig.suptitle(heading, fontsize=12, x=0.01, ha="left")
    out = CaseFigure(figure=fig, focus=focus, spacing=case.spacing)
    for row, view in enumerate(View):
        _draw_plane_row(out, grid, row, view, case, display)
    ax = fig.add_subplot(grid[:, -1])
    _draw_mip(ax, case, out.focus, display)
    out.axes["mip"] = ax
    return out


def _case_grid(case: CanonicalCase, display: Display):
    """The case figure and its grid: a row per view, a column per layer and a wider one for the MIP."""
    n_layers = len(Layer)
    # Rows as tall as their anatomy: a whole-body coronal plane (1-2 m) gets more height than an
    # axial one (0.5 m), every panel at the same mm-per-inch scale.
    extent = np.array(case.shape) * np.array(case.spacing)  # mm along R, A, S
    width_in, title_in, gap = 16.0, 0.75, 0.1
    column_in = width_in * 0.96 / (n_layers + 1.15 + (n_layers + 1) * 0.04)
    scale = column_in / max(extent[0], extent[1])
    heights = [extent[1], extent[2], extent[2]]
    height_in = min(sum(heights) * scale * (1 + gap) + title_in + 0.1, 30.0)
    fig = _new_figure(width_in, height_in, display.dpi)
    grid = fig.add_gridspec(3, n_layers + 1, width_ratios=[1.0] * n_layers + [1.15], height_ratios=heights,
                            left=0.035, right=0.995, bottom=0.1 / height_in, top=1 - title_in / height_in,
                            wspace=0.04, hspace=gap)
    return fig, grid


def _column_titles(display: Display) -> dict[Layer, str]:
    """The title above each layer's column, with the window or scale it is drawn in."""
    return {
        Layer.CT: f"CT (W{display.ct_window:.0f} / L{display.ct_level:.0f})",
        Layer.PET: f"PET (SUV 0-{display.suv_max:g}, inverted)",
        Layer.FUSION: "PET/CT fusion",
        Layer.CT_LABEL: "CT + label (red)",
        Layer.PET_LABEL: "PET + label (red)",
    }


def _draw_plane_row(out: CaseFigure, grid, row: int, view: View, case: CanonicalCase, display: Display) -> None:
    """One row of the case figure: the plane of ``view`` through the focus, drawn as each layer."""
    fig, focus = out.figure, out.focus
    lo, hi = display.ct_range
    idx = focus[_PLANES[view][0]]
    spacing_rc = pixel_spacing(case, view)
    ct2d = plane(case.ct, view, idx)
    pet2d = plane(case.pet, view, idx)
    lab2d = plane(case.label, view, idx) > 0 if case.label is not None else None
    for col, layer in enumerate(Layer):
        ax = fig.add_subplot(grid[row, col])
        ax.set_facecolor("white")
        if layer in (Layer.CT, Layer.CT_LABEL):
            _show(ax, ct2d, spacing_rc, cmap="gray", vmin=lo, vmax=hi)
        elif layer in (Layer.PET, Layer.PET_LABEL):
            _show(ax, pet2d, spacing_rc, cmap="gray_r", vmin=0.0, vmax=display.suv_max)
        else:
            _show(ax, fusion_rgb(ct2d, pet2d, display), spacing_rc)
        if layer in (Layer.CT_LABEL, Layer.PET_LABEL) and lab2d is not None:
            _outline(ax, lab2d, spacing_rc)
        if layer is Layer.CT:
            _letters(ax, view)
            ax.set_ylabel(_plane_title(view, case, focus), fontsize=9)
        if row == 0:
            ax.set_title(_column_titles(display)[layer], fontsize=9)
        out.axes[f"{view.value}/{layer.value}"] = ax


def _draw_mip(ax, case: CanonicalCase, focus: tuple[int, int, int], display: Display) -> None:
    """The coronal PET MIP with the label's projection outlined and the axial plane's level marked."""
    spacing_rc = pixel_spacing(case, View.CORONAL)
    _show(ax, projection(case.pet, View.CORONAL), spacing_rc, cmap="gray_r", vmin=0.0, vmax=display.mip_suv_max)
    if case.label is not None:
        _outline(ax, projection(case.label, View.CORONAL) > 0, spacing_rc, linewidth=0.8)
    _letters(ax, View.CORONAL, color=_EDGE_COLOR)
    # Where the axial plane cuts: ticks at both edges, as viewers mark the slice on a MIP.
    axial_mm = (case.shape[2] - 1 - focus[2] + 0.5) * spacing_rc[0]
    width_mm = case.shape[0] * spacing_rc[1]
    for x0, x1 in ((0.0, 0.06 * width_mm), (0.94 * width_mm, width_mm)):
        ax.plot([x0, x1], [axial_mm, axial_mm], color=_EDGE_COLOR, linewidth=1.5, solid_capstyle="butt",
                scalex=False, scaley=False)
    ax.set_title(f"PET MIP, coronal (SUV 0-{display.mip_suv_max:g})", fontsize=9)


PREVIEW_HEIGHT_PX = 384
"""Height of the preview images (the Hub viewer's thumbnails; a few tens of kB each)."""


def _panel(image: np.ndarray, spacing_rc: tuple[float, float], *, height_px: int, draw) -> bytes:
    """One borderless panel of ``image`` (mm aspect) ``height_px`` tall as PNG bytes; ``draw(ax)`` paints it."""
    rows_mm, cols_mm = image.shape[0] * spacing_rc[0], image.shape[1] * spacing_rc[1]
    dpi = 100
    height_in = height_px / dpi
    width_in = max(height_in * cols_mm / rows_mm, 0.5)
    fig = _new_figure(width_in, height_in, dpi)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    draw(ax)
    return CaseFigure(figure=fig).png_bytes()


def preview_images(
    ct: np.ndarray,
    pet: np.ndarray,
    label: np.ndarray | None,
    affine_ras: np.ndarray,
    *,
    display: Display = DEFAULT_DISPLAY,
    height_px: int = PREVIEW_HEIGHT_PX,
) -> dict[str, bytes]:
    """PNG bytes of the release's ``preview`` config: ``"mip"`` (coronal PET MIP, inverted, lesion
    outlines in red) and ``"fusion"`` (axial PET/CT fusion through the largest lesion, its outline in
    blue, which the "hot" PET colours do not hide; the volume centre without lesions). Same orientation rules as :func:`render_case`.
    :class:`PreviewDrawing` draws the same images from one volume at a time.

    Example:
        >>> png = preview_images(ct, pet, label, affine)["mip"]  # doctest: +SKIP
        >>> png[:4]  # doctest: +SKIP
        b'\x89PNG'
    """
    CanonicalCase.from_arrays(ct, pet, label, affine_ras)  # the same checks of shapes and affine
    drawing = PreviewDrawing(affine_ras, ct.shape, display=display, height_px=height_px)
    if label is not None:
        drawing.add_label(label)
    drawing.add_pet(pet)
    drawing.add_ct(ct)
    return drawing.images()


class PreviewDrawing:
    """:func:`preview_images` fed one ``[z, y, x]`` volume at a time, so a caller never holds the three
    at once (a release reads, hashes and encodes each volume in turn): the label first (it places the
    axial plane through lesion 1), then the PET and the CT in either order; only 2-D pictures are kept.

    Example:
        >>> drawing = PreviewDrawing(affine, label.shape)  # doctest: +SKIP
        >>> drawing.add_label(label, instances=(instances, n))  # doctest: +SKIP
        >>> drawing.add_pet(pet); drawing.add_ct(ct)  # doctest: +SKIP
        >>> sorted(drawing.images())  # doctest: +SKIP
        ['fusion', 'mip']
    """

    def __init__(self, affine_ras: np.ndarray, shape_zyx: tuple[int, ...], *, display: Display = DEFAULT_DISPLAY,
                 height_px: int = PREVIEW_HEIGHT_PX) -> None:
        self.ornt, _, self.spacing = canonical_geometry(affine_ras, shape_zyx)
        self.shape_zyx = tuple(int(v) for v in shape_zyx)
        self.display, self.height_px = display, height_px
        shape = [0, 0, 0]
        for size, (target, _) in zip(self.shape_zyx[::-1], np.asarray(self.ornt, dtype=int)):
            shape[target] = size
        self.focus = tuple(s // 2 for s in shape)  # no lesion: the volume's centre
        self._planes: dict[str, np.ndarray] = {}

    def _canonical(self, array: np.ndarray, what: str) -> np.ndarray:
        if tuple(array.shape) != self.shape_zyx:
            raise ValueError(f"{what} is {tuple(array.shape)}, the preview's grid is {self.shape_zyx}")
        return to_canonical(array, self.ornt)

    @property
    def _axial_index(self) -> int:
        return self.focus[_PLANES[View.AXIAL][0]]

    def add_label(self, label: np.ndarray, instances: tuple[np.ndarray, int] | None = None) -> None:
        """The label (``instances``: its :func:`lymphatlas_ds.lesions.label_instances`, when already computed)."""
        from lymphatlas_ds.lesions import label_instances

        if "mip" in self._planes or "ct" in self._planes:
            raise ValueError("add the label before the PET and the CT: it places the axial plane")
        canon = self._canonical(label, "the label")
        inst, n = label_instances(np.asarray(label)) if instances is None else instances
        self.focus = to_canonical_index(lesion_focus(inst, n), self.ornt, self.shape_zyx)
        self._planes["label_mip"] = projection(canon, View.CORONAL) > 0
        self._planes["label"] = plane(canon, View.AXIAL, self._axial_index) > 0

    def add_pet(self, pet: np.ndarray) -> None:
        canon = self._canonical(pet, "the PET")
        self._planes["mip"] = projection(canon, View.CORONAL)
        self._planes["pet"] = np.array(plane(canon, View.AXIAL, self._axial_index))

    def add_ct(self, ct: np.ndarray) -> None:
        self._planes["ct"] = np.array(plane(self._canonical(ct, "the CT"), View.AXIAL, self._axial_index))

    def images(self) -> dict[str, bytes]:
        """``{"mip": png, "fusion": png}`` once the PET and the CT were added."""
        missing = [v for v in ("mip", "ct") if v not in self._planes]
        if missing:
            raise ValueError(f"the preview needs the {' and '.join('PET' if v == 'mip' else 'CT' for v in missing)}")
        p, display = self._planes, self.display
        mip_rc = tuple(self.spacing[a] for a in _PLANES[View.CORONAL][1:])
        axial_rc = tuple(self.spacing[a] for a in _PLANES[View.AXIAL][1:])
        fused = fusion_rgb(p["ct"], p["pet"], display)

        def draw_mip(ax) -> None:
            _show(ax, p["mip"], mip_rc, cmap="gray_r", vmin=0.0, vmax=display.mip_suv_max)
            if "label_mip" in p:
                _outline(ax, p["label_mip"], mip_rc, linewidth=0.8)
            _letters(ax, View.CORONAL, color=_EDGE_COLOR)

        def draw_fusion(ax) -> None:
            _show(ax, fused, axial_rc)
            if "label" in p:
                # red would vanish in the "hot" PET colours: the fusion's outline is the edge colour
                _outline(ax, p["label"], axial_rc, color=_EDGE_COLOR, linewidth=1.2)
            _letters(ax, View.AXIAL)

        return {"mip": _panel(p["mip"], mip_rc, height_px=self.height_px, draw=draw_mip),
                "fusion": _panel(fused, axial_rc, height_px=self.height_px, draw=draw_fusion)}


def to_canonical_index(index_zyx: tuple[int, int, int], ornt: np.ndarray, shape_zyx: tuple[int, ...]) -> tuple[int, int, int]:
    """The canonical ``[R, A, S]`` index of voxel ``index_zyx`` of a ``[z, y, x]`` array (:func:`to_canonical`)."""
    xyz = list(index_zyx[::-1])
    shape_xyz = tuple(shape_zyx)[::-1]
    out = [0, 0, 0]
    for axis, (target, flip) in enumerate(np.asarray(ornt, dtype=int)):
        out[target] = shape_xyz[axis] - 1 - xyz[axis] if flip == -1 else xyz[axis]
    return tuple(int(v) for v in out)  # type: ignore[return-value]


def before_registration(
    pet_aligned: CanonicalCase | np.ndarray,
    case: CanonicalCase,
    transform_lps: np.ndarray,
    view: View,
    index: int,
) -> np.ndarray:
    """The PET plane as it lay on the CT grid before registration (scanner geometry only).

    The case folder keeps only the registered PET: ``aligned(p) = pet(T p)`` with ``T`` the
    ``alignment.transform.matrix`` of case.json (CT point -> PET point, LPS). The unregistered
    picture is ``pet(p) = aligned(T^-1 p)``, so the plane's points are mapped through ``T^-1`` and
    the registered PET is sampled there (trilinear; 0 outside the volume). Only the rigid part
    is undone: a B-spline refinement, where one was applied, is not in the matrix.
    """
    from scipy import ndimage

    volume = pet_aligned.pet if isinstance(pet_aligned, CanonicalCase) else pet_aligned
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS <-> RAS, its own inverse
    to_before = np.linalg.inv(case.affine) @ flip @ np.linalg.inv(np.asarray(transform_lps, float)) @ flip @ case.affine
    fixed, row_axis, col_axis = _PLANES[view]
    shape = volume.shape
    rows = np.arange(shape[row_axis])[::-1]
    cols = np.arange(shape[col_axis])[::-1]
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    idx = np.zeros((4, rr.size))
    idx[fixed] = index
    idx[row_axis] = rr.ravel()
    idx[col_axis] = cc.ravel()
    idx[3] = 1.0
    src = (to_before @ idx)[:3]
    # Sample from the slab the plane's points fall in, not the whole (possibly 100M-voxel) volume:
    # map_coordinates would first copy all of it to a contiguous float array.
    lo = np.clip(np.floor(src.min(axis=1)).astype(int) - 1, 0, np.array(shape) - 1)
    hi = np.clip(np.ceil(src.max(axis=1)).astype(int) + 2, 1, np.array(shape))
    if np.any(hi <= lo):
        return np.zeros(rr.shape, np.float32)
    slab = np.asarray(volume[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], np.float32)
    values = ndimage.map_coordinates(slab, src - lo[:, None], order=1, mode="constant", cval=0.0)
    return values.reshape(rr.shape)


def render_registration(
    ct: np.ndarray,
    pet: np.ndarray,
    affine_ras: np.ndarray,
    transform_lps: np.ndarray,
    *,
    label: np.ndarray | None = None,
    title: str = "",
    display: Display = DEFAULT_DISPLAY,
    focus: tuple[int, int, int] | None = None,
    ct_edges_hu: tuple[float, ...] = (-400.0, 250.0),
) -> CaseFigure:
    """Before/after registration check: PET (inverted grey) with CT edges drawn over it.

    Top row: the PET as placed by the scanner geometry alone (recomputed from the registered PET,
    see :func:`before_registration`); bottom row: the registered PET. The blue lines are CT
    iso-contours (skin/lung at -400 HU, bone at 250 HU): PET uptake should sit inside them in the
    bottom row.

    Example:
        >>> fig = render_registration(ct, pet, affine, case_json["alignment"]["transform"]["matrix"])  # doctest: +SKIP
    """
    case = CanonicalCase.from_arrays(ct, pet, label, affine_ras)
    if focus is None:
        focus, _ = focus_index(case.label, case.pet)
    fig, grid = _registration_grid(case, title, display)
    out = CaseFigure(figure=fig, focus=focus, spacing=case.spacing)
    for col, view in enumerate(View):
        idx = focus[_PLANES[view][0]]
        spacing_rc = pixel_spacing(case, view)
        ct2d = plane(case.ct, view, idx).astype(np.float32)
        pictures = {
            "before": before_registration(case, case, transform_lps, view, idx),
            "after": plane(case.pet, view, idx),
        }
        for row, (when, pet2d) in enumerate(pictures.items()):
            ax = fig.add_subplot(grid[row, col])
            _show(ax, pet2d, spacing_rc, cmap="gray_r", vmin=0.0, vmax=display.suv_max)
            _ct_edges(ax, ct2d, spacing_rc, ct_edges_hu)
            if row == 0:
                ax.set_title(_plane_title(view, case, focus), fontsize=9)
            if col == 0:
                ax.set_ylabel("before (scanner geometry)" if when == "before" else "after registration", fontsize=9)
            out.axes[f"{when}/{view.value}"] = ax
    return out


def _registration_grid(case: CanonicalCase, title: str, display: Display):
    """The registration figure, titled, and its grid: before and after rows, a column per view."""
    extent = np.array(case.shape) * np.array(case.spacing)  # mm along R, A, S
    widths = [extent[0], extent[0], extent[1]]
    row_mm = max(extent[1], extent[2])
    title_in = 0.6
    scale = min(12.0 * 0.9 / sum(widths), 5.5 / row_mm)  # inches per mm: 12 in wide, rows at most 5.5 in
    width_in, height_in = sum(widths) * scale / 0.9 + 0.2, 2 * row_mm * scale * 1.08 + title_in + 0.1
    fig = _new_figure(max(width_in, 6.0), height_in, display.dpi)
    grid = fig.add_gridspec(2, 3, width_ratios=widths, left=0.07, right=0.995, bottom=0.1 / height_in,
                            top=1 - title_in / height_in, wspace=0.04, hspace=0.08)
    fig.suptitle(f"{title}  -  registration check: PET with CT edges (blue)" if title else
                 "registration check: PET with CT edges (blue)", fontsize=12, x=0.01, ha="left")
    return fig, grid


def _ct_edges(ax, ct2d: np.ndarray, spacing_rc: tuple[float, float], levels_hu: tuple[float, ...]) -> None:
    """Draw the CT iso-contours at ``levels_hu`` that the plane crosses, keeping the panel's extent."""
    rows, cols = ct2d.shape
    x = (np.arange(cols) + 0.5) * spacing_rc[1]
    y = (np.arange(rows) + 0.5) * spacing_rc[0]
    levels = [h for h in levels_hu if ct2d.min() < h < ct2d.max()]
    if levels:
        ax.contour(x, y, ct2d, levels=levels, colors=[_EDGE_COLOR], linewidths=0.6)
    rng = _extent(ct2d, spacing_rc)
    ax.set_xlim(rng[0], rng[1])
    ax.set_ylim(rng[2], rng[3])
