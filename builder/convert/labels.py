"""Lesion masks onto the CT grid and the body mask (paper 2.4).

A mask arrives either as NIfTI on the exam's CT grid (what ITK-SNAP saves) or as a DICOM SEG that
references the CT series. Both become ``uint8 {0, 1}`` on the CT grid; a NIfTI mask on another
grid, with values other than 0/1, or lying outside the patient's body is rejected with the reason
(:class:`builder.errors.LabelError`). A SEG is placed through physical space (its plane positions
and orientation), so it does not depend on the source instances being available.

Lesion statistics (SUVmax, SUVpeak, TMTV, TLG, Dmax) live in :mod:`builder.convert.lesions`.

Example:
    >>> label = load_mask(Path("masks/EX0001.nii.gz"), ct, exam_id="EX0001")  # doctest: +SKIP
    >>> int(label.max())  # doctest: +SKIP
    1
"""

from __future__ import annotations

import enum
import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from builder.errors import LabelError

logger = logging.getLogger(__name__)

# A NIfTI mask's grid must match the CT grid within these tolerances (NIfTI stores the affine in
# float32, so a few micrometres of rounding are normal; a different grid is off by far more).
GRID_ORIGIN_TOL_MM = 0.05
GRID_SPACING_REL_TOL = 1e-4
GRID_DIRECTION_TOL = 1e-4
# HU threshold separating the patient from the surrounding air (lungs are filled per slice).
BODY_HU = -500.0
# At most this fraction of the lesion voxels may lie outside the body: superficial nodes (axilla,
# groin, neck) drawn on PET reach a voxel or two past the skin, which on a 4 mm CT was measured at
# up to ~3 % of a small mask; a mask of another exam, flipped or shifted, is mostly in air.
MAX_OUTSIDE_BODY_FRACTION = 0.10


class MaskFormat(str, enum.Enum):
    NIFTI = "nifti"
    SEG = "seg"


MASK_NAMES = (("{}.nii.gz", MaskFormat.NIFTI), ("{}.nii", MaskFormat.NIFTI), ("{}.seg.dcm", MaskFormat.SEG))
"""The names an exam's mask may have in ``SOURCE/masks`` (``{}``: the exam id) and their formats."""


def mask_format(path: Path) -> MaskFormat:
    """The format of a mask file, from its name: ``.dcm`` is a DICOM SEG, anything else NIfTI."""
    return MaskFormat.SEG if path.name.endswith(".dcm") else MaskFormat.NIFTI


def mask_files(masks_dir: Path, exam_id: str) -> list[tuple[Path, MaskFormat]]:
    """Every file of ``masks_dir`` named as the exam's mask (:data:`MASK_NAMES`), with its format."""
    found = []
    for pattern, fmt in MASK_NAMES:
        path = masks_dir / pattern.format(exam_id)
        if path.is_file():
            found.append((path, fmt))
    return found


def find_mask(masks_dir: Path, exam_id: str, *, seg: Path | None = None) -> tuple[Path, MaskFormat]:
    """The exam's mask file in ``SOURCE/masks`` and its format; LabelError when there is none or two.

    ``seg``: a DICOM SEG exported in the exam's DICOM folder, taken when ``masks_dir`` holds no mask.
    Two masks for one exam (``EX1.nii.gz`` and ``EX1.seg.dcm``, or ``EX1.nii`` and ``EX1.nii.gz``,
    which SimpleITK would not tell apart) reject the exam rather than have one chosen silently.

    Example:
        >>> find_mask(Path("source/masks"), "EX0001")  # doctest: +SKIP
        (PosixPath('source/masks/EX0001.nii.gz'), <MaskFormat.NIFTI: 'nifti'>)
    """
    found = mask_files(masks_dir, exam_id)
    if not found and seg is not None:
        return seg, mask_format(seg)
    if not found:
        raise LabelError(f"no lesion mask: expected masks/{exam_id}.nii.gz or masks/{exam_id}.seg.dcm", exam_id=exam_id)
    if len(found) > 1:
        raise LabelError(
            f"two lesion masks for one exam ({', '.join(p.name for p, _ in found)}): keep exactly one",
            exam_id=exam_id,
        )
    return found[0]


def _grid_mismatch(image: sitk.Image, reference: sitk.Image) -> str | None:
    """A description of how ``image``'s grid differs from ``reference``'s, or None."""
    if image.GetSize() != reference.GetSize():
        return f"size {image.GetSize()} != CT size {reference.GetSize()}"
    sp, rsp = np.asarray(image.GetSpacing()), np.asarray(reference.GetSpacing())
    if np.any(np.abs(sp - rsp) > GRID_SPACING_REL_TOL * rsp):
        return f"spacing {tuple(np.round(sp, 4).tolist())} != CT spacing {tuple(np.round(rsp, 4).tolist())}"
    d, rd = np.asarray(image.GetDirection()), np.asarray(reference.GetDirection())
    if np.any(np.abs(d - rd) > GRID_DIRECTION_TOL):
        return f"direction {tuple(np.round(d, 4).tolist())} != CT direction {tuple(np.round(rd, 4).tolist())}"
    o, ro = np.asarray(image.GetOrigin()), np.asarray(reference.GetOrigin())
    if np.any(np.abs(o - ro) > GRID_ORIGIN_TOL_MM):
        return f"origin {tuple(np.round(o, 3).tolist())} != CT origin {tuple(np.round(ro, 3).tolist())} (LPS mm)"
    return None


def _binary(array: np.ndarray, *, exam_id: str, path: Path) -> np.ndarray:
    """``array`` as uint8 {0, 1}; LabelError for any other value."""
    # bincount: np.unique would sort the whole-body array (~100 M voxels)
    values = np.flatnonzero(np.bincount(array.ravel())) if array.dtype.kind == "u" else np.unique(array)
    extra = [v for v in values.tolist() if v not in (0, 1)]
    if extra:
        shown = ", ".join(f"{v:g}" for v in extra[:5])
        raise LabelError(
            f"mask is not binary: values {shown} besides 0/1 (a multi-label or probability map?); "
            "export a single 0/1 lesion mask",
            exam_id=exam_id,
            path=path,
        )
    return (array == 1).astype(np.uint8)


def load_nifti_mask(path: Path, ct: sitk.Image, *, exam_id: str) -> np.ndarray:
    """A NIfTI lesion mask that must lie on the CT grid -> uint8 [z, y, x] {0, 1}."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        # ITK reports an unreadable disk and a corrupt file alike: read the bytes once more, so an I/O
        # error (an error of the run, not of the mask) surfaces as the OSError it is.
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass
        raise LabelError(f"cannot read the NIfTI mask ({e}); re-export it", exam_id=exam_id, path=path) from e
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() != 3:
        raise LabelError("mask is not a single-channel 3-D image", exam_id=exam_id, path=path)
    mismatch = _grid_mismatch(image, ct)
    if mismatch:
        raise LabelError(
            f"mask is on another grid than the CT: {mismatch}; save the mask on the exam's CT series",
            exam_id=exam_id,
            path=path,
        )
    return _binary(sitk.GetArrayFromImage(image), exam_id=exam_id, path=path)


def load_seg_mask(path: Path, ct: sitk.Image, *, exam_id: str) -> np.ndarray:
    """A DICOM SEG (every segment united) placed on the CT grid through physical space -> uint8 {0, 1}."""
    import highdicom as hd

    try:
        seg = hd.seg.segread(str(path))
        volume = seg.get_volume(combine_segments=True, skip_overlap_checks=True)
    except Exception as e:  # noqa: BLE001 - highdicom raises many types for malformed SEGs
        raise LabelError(
            f"cannot read the DICOM SEG as a volume ({type(e).__name__}: {e}); re-export it referencing the CT series",
            exam_id=exam_id,
            path=path,
        ) from e
    array = np.asarray(volume.array)
    affine = np.asarray(volume.affine, float)  # array index (a0, a1, a2) -> LPS mm
    # SimpleITK's x/y/z index axes are the array's last/middle/first axes.
    columns = affine[:3, [2, 1, 0]]
    spacing = np.linalg.norm(columns, axis=0)
    image = sitk.GetImageFromArray((array > 0).astype(np.uint8))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetDirection(tuple(float(v) for v in (columns / spacing).ravel()))
    image.SetOrigin(tuple(float(v) for v in affine[:3, 3]))
    on_ct = sitk.Resample(image, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(on_ct)


def load_mask(path: Path, ct: sitk.Image, *, exam_id: str, fmt: MaskFormat | None = None) -> np.ndarray:
    """The exam's lesion mask on the CT grid, uint8 [z, y, x] {0, 1}.

    Example:
        >>> label = load_mask(Path("masks/EX0001.seg.dcm"), ct, exam_id="EX0001")  # doctest: +SKIP
    """
    if fmt is None:
        fmt = mask_format(path)
    if fmt is MaskFormat.SEG:
        return load_seg_mask(path, ct, exam_id=exam_id)
    return load_nifti_mask(path, ct, exam_id=exam_id)


def body_mask(ct: sitk.Image) -> np.ndarray:
    """bool [z, y, x]: the patient (largest connected tissue region, each axial slice filled).

    Computed on a copy averaged down to about 4 mm in-plane (a whole-body CT is ~100 M voxels)
    and expanded back, which is exact to a few millimetres at the skin: enough for sampling
    the registration metric and for the "label inside the body" check.

    Example:
        >>> body = body_mask(ct)  # doctest: +SKIP
    """
    factors = [max(1, int(round(4.0 / s))) for s in ct.GetSpacing()[:2]] + [1]
    small = sitk.GetArrayFromImage(sitk.BinShrink(ct, factors)) > BODY_HU
    labels, n = ndimage.label(small)
    if n == 0:
        return np.zeros(ct.GetSize()[::-1], bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = labels == int(np.argmax(sizes))
    for z in range(keep.shape[0]):
        if keep[z].any():
            keep[z] = ndimage.binary_fill_holes(keep[z])
    # back to the CT grid: each small voxel covers factors[1] x factors[0] CT voxels
    full = np.repeat(np.repeat(keep, factors[1], axis=1), factors[0], axis=2)
    nz, ny, nx = ct.GetSize()[::-1]
    out = np.zeros((nz, ny, nx), bool)
    out[:, : min(ny, full.shape[1]), : min(nx, full.shape[2])] = full[:, :ny, :nx]
    if full.shape[1] < ny:  # BinShrink drops the remainder voxels: extend the last row/column
        out[:, full.shape[1]:, :] = out[:, full.shape[1] - 1: full.shape[1], :]
    if full.shape[2] < nx:
        out[:, :, full.shape[2]:] = out[:, :, full.shape[2] - 1: full.shape[2]]
    return out


def outside_body_fraction(label: np.ndarray, body: np.ndarray) -> float:
    """Fraction of lesion voxels outside ``body`` (0 for an empty label)."""
    n = int(np.count_nonzero(label))
    if n == 0:
        return 0.0
    return float(np.count_nonzero(label.astype(bool) & ~body)) / n


def check_inside_body(label: np.ndarray, body: np.ndarray, *, exam_id: str, path: Path | None = None) -> float:
    """LabelError when more than MAX_OUTSIDE_BODY_FRACTION of the lesion voxels lie outside the body."""
    fraction = outside_body_fraction(label, body)
    if fraction > MAX_OUTSIDE_BODY_FRACTION:
        raise LabelError(
            f"mask lies outside the body: {fraction:.1%} of its voxels are in air "
            f"(at most {MAX_OUTSIDE_BODY_FRACTION:.0%} allowed); is it the mask of another exam or flipped?",
            exam_id=exam_id,
            path=path,
        )
    return fraction
