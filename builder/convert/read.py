"""Reading: one CT or PET series -> a SimpleITK image with validated geometry, plus its metadata.

Slices are sorted by ImagePositionPatient projected on the slice normal (the cross product of
the ImageOrientationPatient rows), never by file name or InstanceNumber. The series is rejected
when its slices do not form one regular volume: mixed orientations or matrix sizes, a gap (a
missing slice, named by its position), two slices at one position, non-uniform spacing, or a
gantry tilt. RescaleSlope / RescaleIntercept are applied per slice (PET slopes differ per slice).

Spacing tolerance: each distance between consecutive slices must be a whole number of grid steps
(the smallest distance) within ``max(SPACING_TOLERANCE_MM, SPACING_TOLERANCE_REL * step)`` per step
(IPP values are rounded decimal strings). One step everywhere is a regular volume; two or more
somewhere, with every slice on the grid, is a missing slice; anything else is non-uniform spacing.

Pixel data is read with pydicom (native and, through the pylibjpeg plugins, RLE, JPEG, JPEG-LS and
JPEG 2000 transfer syntaxes), chosen by measurement: ``benchmarks/bench_read.py`` on a 512 x 512 x 400
CT put this reader at 1.1-1.3x SimpleITK's ImageSeriesReader and ~1.0x ``dcm2niix -z n`` (which check
less), and ~0.9x the alternative of the same header checks followed by SimpleITK for the pixels.
Headers are read first (geometry is checked before any pixel is touched), then each native slice is
read straight into its sorted place.

Example:
    >>> exam = discover_exam(Path("source/dicom/EX0001"), "EX0001")  # doctest: +SKIP
    >>> ct, meta = read_series(exam.ct, exam_id="EX0001")            # doctest: +SKIP
    >>> meta.size, meta.spacing, ct.GetPixelID() == sitk.sitkInt16   # doctest: +SKIP
    ((512, 512, 301), (0.977, 0.977, 3.0), True)
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.uid import UID

from builder.convert._dicom import multi, number, text
from builder.convert.discover import SeriesInfo
from builder.errors import GeometryError, ReadError

logger = logging.getLogger(__name__)

SPACING_TOLERANCE_MM = 0.02
"""Absolute tolerance (mm) on the distance between consecutive slices."""
SPACING_TOLERANCE_REL = 0.01
"""Relative tolerance on the distance between consecutive slices (fraction of the grid step)."""
ORIENTATION_TOLERANCE = 1e-4
"""Largest difference of an ImageOrientationPatient component between slices of one series."""
TILT_TOLERANCE = 1e-3
"""Largest sideways drift of slice positions per mm along the normal (tan of the tilt angle, ~0.06 deg)."""


@dataclass(frozen=True)
class SliceGeometry:
    """The sorted stack: file order, ITK origin / direction, slice distance and each slice's position."""

    order: tuple[int, ...]  # input indices, sorted by position along the normal
    origin: tuple[float, float, float]  # IPP of the first sorted slice (LPS mm)
    direction: tuple[float, ...]  # ITK row-major 3x3: columns = row direction, column direction, normal
    slice_spacing: float  # mm between consecutive slices along the normal
    positions_mm: tuple[float, ...]  # sorted projections on the normal


def _fmt_point(p: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.2f}" for v in p) + ")"


@dataclass(frozen=True)
class _Stack:
    """Slices sorted along their normal, with what the checks need to name them in errors."""

    pos: np.ndarray  # n x 3 ImagePositionPatient, input order
    normal: np.ndarray  # unit slice normal
    order: np.ndarray  # input indices, sorted by position along the normal
    proj: np.ndarray  # sorted projections on the normal
    names: list[str]  # each input slice's file, for errors
    where: dict  # exam_id / series_uid, for errors

    @property
    def diffs(self) -> np.ndarray:
        """Distances between consecutive sorted slices along the normal."""
        return np.diff(self.proj)


def _slice_axes(iop: np.ndarray, names: list[str], where: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The orthonormal row, column and normal of the slices; rejects mixed or non-orthogonal orientations."""
    deviation = np.abs(iop - iop[0]).max(axis=1)
    if deviation.max() > ORIENTATION_TOLERANCE:
        bad = int(np.argmax(deviation))
        raise GeometryError(
            f"mixed slice orientations: {names[bad]} has ImageOrientationPatient {iop[bad].round(5).tolist()}, "
            f"{names[0]} has {iop[0].round(5).tolist()}; the series is not one volume (split it or re-export)",
            **where,
        )
    row, col = iop[0, :3], iop[0, 3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise GeometryError(
            f"ImageOrientationPatient {iop[0].tolist()} is not two orthogonal unit vectors; the header is damaged",
            **where,
        )
    row = row / np.linalg.norm(row)
    col = col - (col @ row) * row  # remove the rounding residue so the direction matrix is orthonormal
    col = col / np.linalg.norm(col)
    return row, col, np.cross(row, col)


def _sort_slices(pos: np.ndarray, normal: np.ndarray, names: list[str], where: dict) -> _Stack:
    """Sort the slices by their position projected on the normal (never by file name or InstanceNumber)."""
    proj = pos @ normal
    order = np.argsort(proj, kind="stable")
    return _Stack(pos=pos, normal=normal, order=order, proj=proj[order], names=names, where=where)


def _check_duplicates(stack: _Stack) -> None:
    """Reject two slices at one position (judged against the median distance, which one duplicate cannot move)."""
    diffs = stack.diffs
    spacing = float(np.median(diffs))
    tol = max(SPACING_TOLERANCE_MM, SPACING_TOLERANCE_REL * spacing)
    dup = np.flatnonzero(diffs <= tol if spacing > tol else diffs <= SPACING_TOLERANCE_MM)
    if dup.size:
        i = int(dup[0])
        a, b = int(stack.order[i]), int(stack.order[i + 1])
        raise GeometryError(
            f"two slices at one position ({stack.proj[i]:.3f} mm along the slice normal, point "
            f"{_fmt_point(stack.pos[a])}): {stack.names[a]} and {stack.names[b]}; a duplicated slice or two series "
            "mixed; remove the extra file or re-export the series",
            **stack.where,
        )


def _grid_steps(stack: _Stack) -> tuple[float, np.ndarray]:
    """The grid step and the whole number of steps between consecutive slices; reject non-uniform spacing."""
    # With duplicates ruled out, the smallest distance is the grid step even when a gap makes the
    # median ambiguous (3 slices left of 4).
    diffs = stack.diffs
    spacing = float(diffs.min())
    tol = max(SPACING_TOLERANCE_MM, SPACING_TOLERANCE_REL * spacing)
    steps = np.rint(diffs / spacing)
    on_grid = np.abs(diffs - steps * spacing) <= tol * steps
    if not on_grid.all():
        # Some distance is no whole number of steps: the spacing varies (not a gap).
        i = int(np.flatnonzero(~on_grid)[0])
        raise GeometryError(
            f"non-uniform slice spacing: {diffs[i]:.3f} mm between positions {stack.proj[i]:.2f} and "
            f"{stack.proj[i + 1]:.2f} mm along the slice normal, smallest distance {spacing:.3f} mm "
            f"(tolerance {tol:.3f} mm); "
            "variable-spacing series are not supported: resample or re-export with uniform spacing",
            **stack.where,
        )
    return spacing, steps


def _check_missing(stack: _Stack, spacing: float, steps: np.ndarray) -> None:
    """Reject empty grid positions between slices that all sit on one grid (missing slices, named by position)."""
    if not (steps > 1).any():
        return
    i = int(np.flatnonzero(steps > 1)[0])
    a = int(stack.order[i])
    missing = [stack.proj[i] + j * spacing for j in range(1, int(steps[i]))]
    points = [stack.pos[a] + j * spacing * stack.normal for j in range(1, int(steps[i]))]
    where_txt = ", ".join(
        f"{m:.2f} mm along the slice normal (LPS point {_fmt_point(p)})" for m, p in zip(missing, points)
    )
    raise GeometryError(
        f"missing slice: {int((steps - 1).sum())} slice(s) missing, the first at {where_txt}, between "
        f"{stack.names[a]} and {stack.names[int(stack.order[i + 1])]} (slice spacing {spacing:.3f} mm); re-export the "
        "complete series",
        **stack.where,
    )


def _check_tilt(stack: _Stack) -> None:
    """Reject a gantry tilt: positions that drift sideways of the normal as they move along it."""
    rel = stack.pos[stack.order] - stack.pos[stack.order[0]]
    along = rel @ stack.normal
    lateral = np.linalg.norm(rel - np.outer(along, stack.normal), axis=1)
    drift = lateral[-1] / max(along[-1], 1e-9)
    if lateral.max() > max(SPACING_TOLERANCE_MM, TILT_TOLERANCE * along[-1]):
        raise GeometryError(
            f"gantry tilt: slice positions drift {lateral.max():.2f} mm sideways over {along[-1]:.1f} mm "
            f"(about {math.degrees(math.atan(drift)):.2f} deg); tilted acquisitions must be resampled "
            "(e.g. dcm2niix's tilt correction) before they can be used",
            **stack.where,
        )


def slice_geometry(
    positions: Sequence[Sequence[float]] | np.ndarray,
    orientations: Sequence[Sequence[float]] | np.ndarray,
    *,
    files: Sequence[Path | str] | None = None,
    exam_id: str | None = None,
    series_uid: str | None = None,
) -> SliceGeometry:
    """Sort slices along their normal and check that they form one regular volume.

    Args:
        positions: ImagePositionPatient of each slice (n x 3, LPS mm), in any order.
        orientations: ImageOrientationPatient of each slice (n x 6).
        files: the slices' files, to name them in errors.

    Example:
        >>> g = slice_geometry([[0, 0, 6], [0, 0, 0], [0, 0, 3]], [[1, 0, 0, 0, 1, 0]] * 3)
        >>> g.order, g.slice_spacing, g.origin
        ((1, 2, 0), 3.0, (0.0, 0.0, 0.0))

    Raises:
        GeometryError: fewer than 2 slices, mixed or non-orthogonal orientations, a missing slice
            (its position named), two slices at one position, non-uniform spacing, gantry tilt.
    """
    where = {"exam_id": exam_id, "series_uid": series_uid}
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    iop = np.asarray(orientations, dtype=np.float64).reshape(-1, 6)
    n = len(pos)
    names = [str(f) for f in files] if files is not None else [f"slice #{i}" for i in range(n)]
    if n < 2:
        raise GeometryError(f"the series has {n} slice(s); a volume needs at least 2", **where)
    if len(iop) != n:
        raise GeometryError(f"{n} positions but {len(iop)} orientations", **where)
    row, col, normal = _slice_axes(iop, names, where)
    stack = _sort_slices(pos, normal, names, where)
    _check_duplicates(stack)
    spacing, steps = _grid_steps(stack)
    _check_missing(stack, spacing, steps)
    _check_tilt(stack)
    # Over the whole stack the mean distance is more exact than any one rounded difference.
    slice_spacing = float((stack.proj[-1] - stack.proj[0]) / (n - 1))
    direction = np.column_stack([row, col, normal])
    return SliceGeometry(
        order=tuple(int(i) for i in stack.order),
        origin=tuple(float(v) for v in pos[stack.order[0]]),
        direction=tuple(float(v) for v in direction.ravel()),
        slice_spacing=slice_spacing,
        positions_mm=tuple(float(v) for v in stack.proj),
    )


@dataclass(frozen=True)
class SeriesMetadata:
    """What the paper's step 2.3.1 extracts, without identifying fields (no names, UIDs, dates, institution).

    ``size``/``spacing``/``origin`` are ITK order (x, y, z); ``direction`` is ITK's row-major 3x3.
    """

    modality: str
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    fov_mm: tuple[float, float, float]
    n_slices: int
    patient_position: str | None
    manufacturer: str | None
    model: str | None
    kvp: float | None
    convolution_kernel: str | None
    slice_thickness: float | None
    units: str | None  # PET: BQML | CNTS | GML ...; CT: HU
    transfer_syntax: str
    reconstruction_method: str | None = None
    reconstruction_diameter_mm: float | None = None
    corrected_image: tuple[str, ...] = ()
    decay_correction: str | None = None
    attenuation_correction_method: str | None = None
    exposure_mas: float | None = None
    rescale_slope_range: tuple[float, float] = (1.0, 1.0)
    rescale_intercept_range: tuple[float, float] = (0.0, 0.0)
    bits_stored: int | None = None
    pixel_representation: int | None = None

    def to_dict(self) -> dict:
        """A JSON-able dict (lists instead of tuples)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


_NATIVE_SYNTAXES = {
    pydicom.uid.ImplicitVRLittleEndian,
    pydicom.uid.ExplicitVRLittleEndian,
}
_PIXEL_DATA_TAG = (0x7FE0, 0x0010)


@dataclass
class _Slice:
    """One file's header (no pixel data) and where its pixel data element starts."""

    path: Path
    ds: Dataset
    pixel_offset: int


def _read_slice_header(path: Path, exam_id: str, series_uid: str) -> _Slice:
    try:
        with open(path, "rb") as fp:
            ds = pydicom.dcmread(fp, stop_before_pixels=True)
            offset = fp.tell()  # pydicom leaves the file at the pixel data element's tag
    except Exception as e:  # pydicom raises many types for damaged files
        raise ReadError(
            f"the file is corrupt or truncated ({type(e).__name__}: {e}); re-export the series",
            exam_id=exam_id,
            series_uid=series_uid,
            path=path,
        ) from e
    return _Slice(path=path, ds=ds, pixel_offset=offset)


def _transfer_syntax(ds: Dataset) -> UID:
    file_meta = ds.get("file_meta")
    return UID(file_meta.get("TransferSyntaxUID", pydicom.uid.ImplicitVRLittleEndian) if file_meta is not None
               else pydicom.uid.ImplicitVRLittleEndian)


def _native_16bit(s: _Slice) -> bool:
    ds = s.ds
    return (
        _transfer_syntax(ds) in _NATIVE_SYNTAXES
        and int(ds.get("BitsAllocated", 0)) == 16
        and int(ds.get("SamplesPerPixel", 1)) == 1
    )


def _read_native_into(s: _Slice, out: np.ndarray, exam_id: str, series_uid: str) -> bool:
    """Read a native 16-bit frame straight into ``out`` (no intermediate copies); False if the layout is unusual.

    Reading ~400 CT slices this way is what keeps ``read_series`` near SimpleITK's speed
    (benchmarks/bench_read.py); anything unusual goes through pydicom's full decoder instead.
    """
    implicit = _transfer_syntax(s.ds) == pydicom.uid.ImplicitVRLittleEndian
    with open(s.path, "rb") as fp:
        fp.seek(s.pixel_offset)
        head = fp.read(8 if implicit else 12)
        if len(head) < (8 if implicit else 12):
            return False
        if struct.unpack("<HH", head[:4]) != _PIXEL_DATA_TAG:
            return False
        length = struct.unpack("<I", head[4:8] if implicit else head[8:12])[0]
        if length == 0xFFFFFFFF or length < out.nbytes:
            if length != 0xFFFFFFFF:
                raise ReadError(
                    f"the pixel data is too short ({length} of {out.nbytes} bytes); the file is corrupt: "
                    "re-export the series",
                    exam_id=exam_id,
                    series_uid=series_uid,
                    path=s.path,
                )
            return False
        got = fp.readinto(memoryview(out).cast("B"))
    if got < out.nbytes:
        raise ReadError(
            f"the pixel data is truncated ({got} of {out.nbytes} bytes); the file is corrupt: re-export the series",
            exam_id=exam_id,
            series_uid=series_uid,
            path=s.path,
        )
    return True


def _mask_bits(arr: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    """Keep only the stored bits (the high bits may hold old overlays) and sign-extend them."""
    arr = (arr.view("<u2") & np.uint16((1 << bits_stored) - 1)).astype(np.int32)
    if signed:
        arr = np.where(arr >= 1 << (bits_stored - 1), arr - (1 << bits_stored), arr)
    return arr


def _decode(s: _Slice, exam_id: str, series_uid: str) -> np.ndarray:
    """The stored values of a slice through pydicom's decoders (compressed or unusual layouts)."""
    try:
        ds = pydicom.dcmread(s.path)
    except Exception as e:
        raise ReadError(f"the file is corrupt or truncated ({type(e).__name__}: {e}); re-export the series",
                        exam_id=exam_id, series_uid=series_uid, path=s.path) from e
    ts = _transfer_syntax(ds)
    try:
        arr = ds.pixel_array
    except (NotImplementedError, ImportError) as e:
        raise ReadError(
            f"transfer syntax {ts} ({ts.name}) cannot be decoded by the installed decoders ({e}); install the "
            "pylibjpeg plugins (builder extra) or re-export the series uncompressed",
            exam_id=exam_id,
            series_uid=series_uid,
            path=s.path,
        ) from e
    except Exception as e:
        raise ReadError(
            f"the pixel data cannot be decoded ({type(e).__name__}: {e}); the file is corrupt or truncated: "
            "re-export the series",
            exam_id=exam_id,
            series_uid=series_uid,
            path=s.path,
        ) from e
    if arr.ndim != 2:
        raise ReadError(f"expected one 2-D frame, got pixel array of shape {arr.shape}",
                        exam_id=exam_id, series_uid=series_uid, path=s.path)
    return arr


def _required(ds: Dataset, keyword: str, path: Path, exam_id: str, series_uid: str):
    value = ds.get(keyword)
    if value is None or value == "":
        raise ReadError(
            f"{keyword} is missing; without it the slice cannot be placed in space; re-export the series",
            exam_id=exam_id,
            series_uid=series_uid,
            path=path,
        )
    return value


def _kernel(ds: Dataset) -> str | None:
    value = ds.get("ConvolutionKernel")
    if value in (None, ""):
        return None
    values = [value] if isinstance(value, str) else list(value)
    return "\\".join(str(v).strip() for v in values)


@dataclass
class _SeriesHeaders:
    """Pass 1: every slice's header and what geometry and rescale need from it, in file order."""

    slices: list[_Slice]
    positions: list[list[float]]  # ImagePositionPatient per slice
    orientations: list[list[float]]  # ImageOrientationPatient per slice
    shape: tuple[int, int]  # Rows, Columns (one for the whole series)
    spacing_yx: list[float]  # PixelSpacing: row spacing, column spacing (mm)
    slopes: list[float]  # RescaleSlope per slice (1 when absent)
    intercepts: list[float]  # RescaleIntercept per slice (0 when absent)


def _read_headers(files: list[Path | str], exam_id: str, uid: str) -> _SeriesHeaders:
    """Read every slice's header (no pixels) and check each is single-frame, placed in space and of one size."""
    slices = [_read_slice_header(Path(p), exam_id, uid) for p in files]
    positions, orientations, slopes, intercepts = [], [], [], []
    shape = spacing_yx = None
    for s in slices:
        ds, path = s.ds, s.path
        if int(ds.get("NumberOfFrames") or 1) > 1:
            raise ReadError(
                "multi-frame (enhanced) image objects are not supported; export the series as single-frame "
                "images (classic CT / PET image storage)",
                exam_id=exam_id,
                series_uid=uid,
                path=path,
            )
        positions.append([float(v) for v in _required(ds, "ImagePositionPatient", path, exam_id, uid)])
        orientations.append([float(v) for v in _required(ds, "ImageOrientationPatient", path, exam_id, uid)])
        ps = [float(v) for v in _required(ds, "PixelSpacing", path, exam_id, uid)]
        this_shape = (int(_required(ds, "Rows", path, exam_id, uid)), int(_required(ds, "Columns", path, exam_id, uid)))
        _check_declared_size(s, this_shape, exam_id, uid)
        if shape is None:
            shape, spacing_yx = this_shape, ps
        elif this_shape != shape or max(abs(a - b) for a, b in zip(ps, spacing_yx)) > 1e-4:
            raise GeometryError(
                f"mixed matrix sizes or pixel spacings: {path} is {this_shape} at {ps} mm, {files[0]} is "
                f"{shape} at {spacing_yx} mm; the series is not one volume",
                exam_id=exam_id,
                series_uid=uid,
            )
        slope, intercept = number(ds, "RescaleSlope"), number(ds, "RescaleIntercept")
        slopes.append(1.0 if slope is None else slope)
        intercepts.append(0.0 if intercept is None else intercept)
    return _SeriesHeaders(slices=slices, positions=positions, orientations=orientations, shape=shape,
                          spacing_yx=spacing_yx, slopes=slopes, intercepts=intercepts)


MAX_MATRIX = 8192
"""The largest Rows or Columns a slice may declare (clinical CT and PET: 128-1024; a corrupt header says 65535)."""


def _check_declared_size(s: _Slice, shape: tuple[int, int], exam_id: str, uid: str) -> None:
    """Refuse a header whose declared matrix the file cannot hold, before any pixel buffer is allocated.

    A native (uncompressed) slice needs Rows x Columns x SamplesPerPixel x BitsAllocated/8 bytes of
    pixel data after its header; a compressed one at most :data:`MAX_MATRIX` pixels a side.
    """
    rows, cols = shape
    if not (0 < rows <= MAX_MATRIX and 0 < cols <= MAX_MATRIX):
        raise ReadError(f"the header declares a {rows} x {cols} image (Rows x Columns); a slice has 1 to {MAX_MATRIX} "
                        "pixels a side: the header is corrupt, re-export the series", exam_id=exam_id,
                        series_uid=uid, path=s.path)
    if _transfer_syntax(s.ds) not in _NATIVE_SYNTAXES:
        return
    samples = int(s.ds.get("SamplesPerPixel") or 1)
    bits = int(s.ds.get("BitsAllocated") or 16)
    needed = rows * cols * samples * ((bits + 7) // 8)
    held = s.path.stat().st_size - s.pixel_offset
    if needed > held:
        raise ReadError(f"the header declares a {rows} x {cols} image of {bits}-bit pixels ({needed} bytes), but the "
                        f"file holds {max(held, 0)} bytes after its header: the header or the file is corrupt, "
                        "re-export the series", exam_id=exam_id, series_uid=uid, path=s.path)


def _check_gantry_tilt(ds: Dataset, exam_id: str, uid: str) -> None:
    """Reject a CT whose GantryDetectorTilt says it was acquired tilted."""
    tilt = number(ds, "GantryDetectorTilt")
    if tilt is not None and abs(tilt) > 1e-3:
        raise GeometryError(
            f"gantry tilt of {tilt} deg (GantryDetectorTilt); tilted CT must be resampled "
            "(e.g. dcm2niix's tilt correction) before it can be used",
            exam_id=exam_id,
            series_uid=uid,
        )


def _stored_values(s: _Slice, scratch: np.ndarray, hu_out: np.ndarray | None, exam_id: str,
                   uid: str) -> np.ndarray | None:
    """A slice's stored values; None when they were read straight into ``hu_out`` (CT already in HU, no rescale)."""
    signed = int(s.ds.get("PixelRepresentation", 0)) == 1
    bits_stored = int(s.ds.get("BitsStored") or s.ds.get("BitsAllocated") or 16)
    if _native_16bit(s):
        if hu_out is not None and signed and bits_stored == 16:
            if _read_native_into(s, hu_out, exam_id, uid):
                return None
        elif _read_native_into(s, scratch, exam_id, uid):
            stored = scratch.view(np.int16) if signed else scratch
            return _mask_bits(stored, bits_stored, signed) if bits_stored < 16 else stored
    return _decode(s, exam_id, uid)


def _rescale_to_hu(stored: np.ndarray, slope: float, intercept: float, out: np.ndarray) -> tuple[bool, int]:
    """Write ``stored * slope + intercept`` into the int16 ``out``; (the rescale was non-integral, voxels clipped)."""
    non_integral = False
    if slope == round(slope) and intercept == round(intercept):
        lo = int(stored.min()) * int(slope) + int(intercept)
        hi = int(stored.max()) * int(slope) + int(intercept)
        if slope == 1 and -32768 <= lo and hi <= 32767:
            np.add(stored, int(intercept), out=out, casting="unsafe", dtype=np.int32)
            return False, 0
        hu = stored.astype(np.int32) * int(slope) + int(intercept)
    else:
        non_integral = True
        hu = np.rint(stored * slope + intercept)
    clipped = 0
    if hu.min() < -32768 or hu.max() > 32767:
        clipped = int(np.count_nonzero((hu < -32768) | (hu > 32767)))
        hu = np.clip(hu, -32768, 32767)
    out[...] = hu
    return non_integral, clipped


def _read_pixels(headers: _SeriesHeaders, geom: SliceGeometry, *, is_ct: bool, exam_id: str,
                 uid: str) -> np.ndarray:
    """Pass 2: every slice's pixels, rescaled per slice, straight into its sorted place in one volume."""
    rows, cols = headers.shape
    volume = np.empty((len(headers.slices), rows, cols), dtype=np.int16 if is_ct else np.float32)
    scratch = np.empty((rows, cols), dtype=np.uint16)
    non_integral = clipped = 0
    for k, i in enumerate(geom.order):
        slope, intercept = headers.slopes[i], headers.intercepts[i]
        plain_hu = is_ct and slope == 1 and intercept == 0
        stored = _stored_values(headers.slices[i], scratch, volume[k] if plain_hu else None, exam_id, uid)
        if stored is None:
            continue  # already HU, in place
        if is_ct:
            rounded, n_clipped = _rescale_to_hu(stored, slope, intercept, volume[k])
            non_integral += rounded
            clipped += n_clipped
        else:
            volume[k] = stored * slope + intercept
    if non_integral:
        logger.warning("exam %s: CT series %s: %d slices with non-integer rescale; HU rounded to integers",
                       exam_id, uid, non_integral)
    if clipped:
        logger.warning("exam %s: CT series %s: %d voxels outside int16 clipped", exam_id, uid, clipped)
    return volume


def read_series(series: SeriesInfo, *, exam_id: str) -> tuple[sitk.Image, SeriesMetadata]:
    """Read a CT or PET series into one image with validated geometry and per-slice rescale applied.

    CT comes back as ``sitkInt16`` Hounsfield units; PET as ``sitkFloat32`` in the series' Units
    (BQML: Bq/ml, CNTS: counts, GML: SUV; see :mod:`builder.convert.suv` for the SUV factor).

    Example:
        >>> ct, meta = read_series(exam.ct, exam_id="EX0001")  # doctest: +SKIP
        >>> meta.to_dict()["spacing"]                          # doctest: +SKIP
        [0.9765625, 0.9765625, 3.0]

    Raises:
        GeometryError: the slices are not one regular volume (see :func:`slice_geometry`).
        ReadError: a file is corrupt, truncated, multi-frame or in a transfer syntax no installed
            decoder handles (named by path), or lacks the position / orientation / spacing.
    """
    uid = series.series_uid
    if series.modality not in ("CT", "PT"):
        raise ReadError(f"read_series reads CT and PET image series, not {series.modality}", exam_id=exam_id,
                        series_uid=uid)
    is_ct = series.modality == "CT"
    files = list(series.files)
    # Headers first, so that geometry is checked before any pixel is read.
    headers = _read_headers(files, exam_id, uid)
    if is_ct:
        _check_gantry_tilt(headers.slices[0].ds, exam_id, uid)
    geom = slice_geometry(headers.positions, headers.orientations, files=files, exam_id=exam_id, series_uid=uid)
    volume = _read_pixels(headers, geom, is_ct=is_ct, exam_id=exam_id, uid=uid)
    image = sitk.GetImageFromArray(volume)
    del volume
    spacing_yx = headers.spacing_yx
    image.SetSpacing((float(spacing_yx[1]), float(spacing_yx[0]), geom.slice_spacing))
    image.SetOrigin(geom.origin)
    image.SetDirection(geom.direction)
    datasets = [s.ds for s in headers.slices]
    meta = _metadata(series, datasets[geom.order[0]], datasets, image, geom, np.asarray(headers.slopes),
                     np.asarray(headers.intercepts))
    return image, meta


def _metadata(series: SeriesInfo, first: Dataset, datasets: list[Dataset], image: sitk.Image, geom: SliceGeometry,
              slopes: np.ndarray, intercepts: np.ndarray) -> SeriesMetadata:
    size = tuple(int(v) for v in image.GetSize())
    spacing = tuple(float(v) for v in image.GetSpacing())
    syntaxes = sorted({str(ds.file_meta.get("TransferSyntaxUID", "")) for ds in datasets})
    is_pet = series.modality == "PT"
    exposures = [number(ds, "Exposure") for ds in datasets]
    exposures = [e for e in exposures if e is not None]
    return SeriesMetadata(
        modality=series.modality,
        size=size,  # type: ignore[arg-type]
        spacing=spacing,  # type: ignore[arg-type]
        origin=geom.origin,
        direction=geom.direction,
        fov_mm=tuple(float(s * d) for s, d in zip(size, spacing)),  # type: ignore[arg-type]
        n_slices=size[2],
        patient_position=text(first, "PatientPosition"),
        manufacturer=text(first, "Manufacturer"),
        model=text(first, "ManufacturerModelName"),
        kvp=number(first, "KVP"),
        convolution_kernel=_kernel(first),
        slice_thickness=number(first, "SliceThickness"),
        units=text(first, "Units") if is_pet else "HU",
        transfer_syntax=syntaxes[0] if len(syntaxes) == 1 else "mixed:" + ",".join(syntaxes),
        reconstruction_method=text(first, "ReconstructionMethod") if is_pet else None,
        reconstruction_diameter_mm=number(first, "ReconstructionDiameter"),
        corrected_image=multi(first, "CorrectedImage") if is_pet else (),
        decay_correction=text(first, "DecayCorrection") if is_pet else None,
        attenuation_correction_method=text(first, "AttenuationCorrectionMethod") if is_pet else None,
        exposure_mas=float(np.mean(exposures)) if exposures else None,
        rescale_slope_range=(float(slopes.min()), float(slopes.max())),
        rescale_intercept_range=(float(intercepts.min()), float(intercepts.max())),
        bits_stored=int(first.get("BitsStored")) if first.get("BitsStored") is not None else None,
        pixel_representation=int(first.get("PixelRepresentation", 0)),
    )
