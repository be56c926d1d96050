"""Phantoms whose continuous activity is known in closed form: a sphere of uniform SUV, sharp or
blurred by a Gaussian point-spread function, sampled on any grid (tests and benchmarks).

The blurred profile is the exact convolution of a uniform ball with an isotropic Gaussian
(a radial integral with a closed form), so a resampled value can be compared with the activity
the scanner would have seen at that point, not with another interpolator's output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy.special import ndtr


@dataclass(frozen=True)
class Sphere:
    """A uniform sphere of ``suv`` (background 0) at ``center`` (LPS mm), blurred by a Gaussian of
    ``fwhm_mm`` (0: sharp)."""

    center: tuple[float, float, float]
    radius_mm: float
    suv: float
    fwhm_mm: float = 0.0

    def activity(self, points: np.ndarray) -> np.ndarray:
        """SUV at ``points`` (..., 3) in LPS mm."""
        r = np.sqrt(((np.asarray(points, float) - np.asarray(self.center)) ** 2).sum(-1))
        if self.fwhm_mm <= 0:
            return np.where(r < self.radius_mm, self.suv, 0.0)
        s = self.fwhm_mm / (2.0 * math.sqrt(2.0 * math.log(2.0)))
        big_r = self.radius_mm
        rr = np.maximum(r, 1e-6)
        # exact ball * Gaussian: Phi terms minus the curvature term (r -> 0 limit is finite)
        term = ndtr((big_r - rr) / s) - ndtr((-big_r - rr) / s)
        curv = s / (rr * math.sqrt(2.0 * math.pi)) * (
            np.exp(-((rr - big_r) ** 2) / (2 * s * s)) - np.exp(-((rr + big_r) ** 2) / (2 * s * s))
        )
        return self.suv * (term - curv)


def grid_points(image: sitk.Image) -> np.ndarray:
    """LPS coordinates [z, y, x, 3] of every voxel centre of ``image``."""
    size = image.GetSize()
    k, j, i = np.meshgrid(*[np.arange(n, dtype=float) for n in size[::-1]], indexing="ij")
    idx = np.stack([i, j, k], -1)
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    a = direction * np.asarray(image.GetSpacing(), float)[None, :]
    return idx @ a.T + np.asarray(image.GetOrigin(), float)


def make_grid(center: tuple[float, float, float], extent_mm: float, spacing, *, offset=(0.0, 0.0, 0.0)) -> sitk.Image:
    """An empty float32 grid of about ``extent_mm`` per side around ``center`` (shifted by ``offset``)."""
    spacing = np.broadcast_to(np.asarray(spacing, float), (3,))
    size = [int(math.ceil(extent_mm / s)) + 1 for s in spacing]
    img = sitk.Image(size, sitk.sitkFloat32)
    img.SetSpacing(tuple(float(s) for s in spacing))
    origin = np.asarray(center, float) - (np.asarray(size) - 1) * spacing / 2.0 + np.asarray(offset, float)
    img.SetOrigin(tuple(float(v) for v in origin))
    return img


def affine_of(transform: sitk.Transform) -> np.ndarray:
    """The 4x4 matrix of an affine ``transform`` (CT point -> PET point), measured by mapping points
    with SimpleITK itself: the image of the origin and of 100 mm along each axis. The generator's own
    arithmetic, so that a wrong matrix in the builder (``builder.convert.align``) cannot move the truth
    with it. A non-affine transform (a B-spline) is refused.

    Example:
        >>> t = sitk.TranslationTransform(3, (1.0, 2.0, 3.0))
        >>> affine_of(t)[:3, 3].tolist()
        [1.0, 2.0, 3.0]
    """
    step = 100.0
    origin = np.asarray(transform.TransformPoint((0.0, 0.0, 0.0)), float)
    m = np.eye(4)
    m[:3, 3] = origin
    for axis in range(3):
        unit = [0.0, 0.0, 0.0]
        unit[axis] = step
        m[:3, axis] = (np.asarray(transform.TransformPoint(tuple(unit)), float) - origin) / step
    probes = np.random.default_rng(0).uniform(-500.0, 500.0, (4, 3))
    mapped = np.array([transform.TransformPoint(tuple(map(float, p))) for p in probes])
    if not np.allclose(mapped, probes @ m[:3, :3].T + m[:3, 3], atol=1e-6):
        raise ValueError(f"{transform.GetName()} is not affine: a phantom sampled through it has no closed form; "
                         "pass its affine part")
    return m


def sample(sphere: Sphere, grid: sitk.Image, transform: sitk.Transform | None = None) -> sitk.Image:
    """``sphere`` sampled at ``grid``'s voxel centres (the PET's native voxels), float32.

    With ``transform`` (CT point -> PET point, as the builder records it; affine) the sphere lives in
    the CT frame: the PET voxel at q shows the activity at ``transform^-1(q)``.
    """
    pts = grid_points(grid)
    if transform is not None:
        inv = np.linalg.inv(affine_of(transform))
        pts = pts @ inv[:3, :3].T + inv[:3, 3]
    out = sitk.GetImageFromArray(sphere.activity(pts).astype(np.float32))
    out.CopyInformation(grid)
    return out
