"""The synthetic body: organs and lymphoma lesions as analytic shapes in patient space (LPS, mm).

Part of :mod:`lymphatlas_synth.cohort`. A body is a list of :class:`Shape` objects painted in order
(later shapes win) onto any axis-aligned grid, so CT (on its grid) and PET (activity on an
extended CT-like grid, then blurred and sampled in the misaligned PET frame) see the same anatomy.

Canonical coordinates are those of an adult of scale 1: the vertex at z = 0, the body's
midline at x = 0 (+x = patient's left), the coronal mid-plane at y = 0 (+y = posterior),
and z decreasing towards the feet (the scan ends at mid-thigh, z = -1000).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Tissue", "Shape", "Lesion", "Body", "make_body", "place_lesions", "Grid1D", "paint"]


class Tissue(enum.IntEnum):
    """Label values of the tissue map; HU and SUV of each are in :data:`TISSUE_HU` / :data:`TISSUE_SUV`."""

    AIR = 0
    FAT = 1
    MUSCLE = 2
    SOFT = 3  # abdominal / mediastinal soft tissue, bowel
    LUNG = 4
    CORTICAL_BONE = 5
    MARROW = 6
    LIVER = 7
    SPLEEN = 8
    KIDNEY = 9
    BLADDER = 10
    BRAIN = 11
    BLOOD = 12  # heart chambers, aorta
    MYOCARDIUM = 13
    AIRWAY = 14
    LESION = 15


# Mean HU and noise-free SUVbw per tissue (FDG, 60 min uptake): brain and bladder high, liver
# ~2.4, blood pool ~1.8, background 0.4-0.9, as in clinical whole-body FDG PET.
TISSUE_HU = np.array([-1000, -100, 50, 30, -840, 1100, 220, 60, 48, 35, 8, 35, 42, 45, -990, 38], dtype=np.float32)
TISSUE_HU_SD = np.array([8, 10, 10, 10, 25, 120, 40, 8, 8, 8, 5, 6, 8, 8, 5, 10], dtype=np.float32)
TISSUE_SUV = np.array(
    [0.0, 0.35, 0.8, 1.0, 0.45, 0.4, 1.6, 2.4, 2.0, 3.5, 30.0, 9.0, 1.8, 3.0, 0.1, 0.0], dtype=np.float32
)


@dataclass(frozen=True)
class Grid1D:
    """The physical coordinate of every index along each axis of an axis-aligned grid.

    ``xs[i]``, ``ys[j]``, ``zs[k]`` are the LPS x, y, z (mm) of voxel index (i, j, k); the grid's
    direction must be a diagonal of +-1 (axial HFS/FFS grids are).
    """

    xs: np.ndarray
    ys: np.ndarray
    zs: np.ndarray


@dataclass
class Shape:
    """One painted structure.

    kind: ``ellipsoid`` (center, radii), ``cylinder`` (elliptic, along z, center x/y, radii x/y,
    z range), ``profile`` (elliptic cylinder whose radii follow piecewise-linear knots in z).
    ``shell`` > 0 paints only the outer shell of that thickness (mm); ``z_period`` paints only
    z where ``(z mod period) < z_duty * period`` (vertebrae between discs, ribs).
    """

    tissue: Tissue
    kind: str
    center: tuple[float, float, float] = (0.0, 0.0, 0.0)
    radii: tuple[float, float, float] = (1.0, 1.0, 1.0)
    z_range: tuple[float, float] = (0.0, 0.0)
    knots: tuple[tuple[float, float, float], ...] = ()  # (z, rx, ry) for kind="profile"
    shell: float = 0.0
    z_period: float = 0.0
    z_duty: float = 1.0
    scale_in: float = 0.0  # profile only: shrink radii by this many mm (inner layers)

    def z_extent(self) -> tuple[float, float]:
        if self.kind == "ellipsoid":
            return self.center[2] - self.radii[2], self.center[2] + self.radii[2]
        if self.kind == "cylinder":
            return min(self.z_range), max(self.z_range)
        zs = [k[0] for k in self.knots]
        return min(zs), max(zs)

    def xy_extent(self) -> tuple[float, float, float, float]:
        if self.kind == "profile":
            rx = max(k[1] for k in self.knots)
            ry = max(k[2] for k in self.knots)
        else:
            rx, ry = self.radii[0], self.radii[1]
        return self.center[0] - rx, self.center[0] + rx, self.center[1] - ry, self.center[1] + ry

    def inside(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Boolean mask of the points (broadcast arrays, mm) inside the shape."""
        cx, cy, cz = self.center
        if self.kind == "ellipsoid":
            a, b, c = self.radii
            r2 = ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 + ((z - cz) / c) ** 2
            m = r2 <= 1.0
            if self.shell:
                m &= ((x - cx) / max(a - self.shell, 1e-3)) ** 2 + ((y - cy) / max(b - self.shell, 1e-3)) ** 2 + (
                    (z - cz) / max(c - self.shell, 1e-3)
                ) ** 2 > 1.0
        else:
            if self.kind == "cylinder":
                a, b = self.radii[0], self.radii[1]
                zin = (z >= min(self.z_range)) & (z <= max(self.z_range))
            else:
                kz = np.array([k[0] for k in self.knots])
                order = np.argsort(kz)
                zz = np.asarray(z, dtype=float)
                a = np.interp(zz, kz[order], np.array([k[1] for k in self.knots])[order]) - self.scale_in
                b = np.interp(zz, kz[order], np.array([k[2] for k in self.knots])[order]) - self.scale_in
                a = np.maximum(a, 1e-3)
                b = np.maximum(b, 1e-3)
                zin = (zz >= kz.min()) & (zz <= kz.max())
            r2 = ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2
            m = (r2 <= 1.0) & zin
            if self.shell:
                m &= ((x - cx) / np.maximum(a - self.shell, 1e-3)) ** 2 + (
                    (y - cy) / np.maximum(b - self.shell, 1e-3)
                ) ** 2 > 1.0
        if self.z_period:
            m &= np.mod(z, self.z_period) < self.z_duty * self.z_period
        return m


@dataclass
class Lesion:
    """A lymphoma lesion: an ellipsoid with a smooth uptake peak ``suv_max`` at its centre."""

    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    suv_max: float
    station: str
    extranodal: bool

    def shape(self) -> Shape:
        return Shape(Tissue.LESION, "ellipsoid", center=self.center, radii=self.radii)

    def uptake(self, x, y, z) -> np.ndarray:
        """SUV at the points: ``suv_max * (1 - 0.3 rho^2)`` inside (rho = ellipsoidal radius), 0 outside."""
        cx, cy, cz = self.center
        a, b, c = self.radii
        r2 = ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 + ((z - cz) / c) ** 2
        return np.where(r2 <= 1.0, self.suv_max * (1.0 - 0.3 * r2), 0.0).astype(np.float32)

    @property
    def volume_ml_analytic(self) -> float:
        return 4.0 / 3.0 * math.pi * self.radii[0] * self.radii[1] * self.radii[2] / 1000.0


@dataclass
class Body:
    """A patient: painted shapes, the z extent of the scan (vertex to mid-thigh), lesions."""

    shapes: list[Shape]
    scale: float
    width: float
    z_top: float
    z_bottom: float
    center_mm: tuple[float, float, float]
    weight_kg: float
    lesions: list[Lesion] = field(default_factory=list)

    def p(self, x: float, y: float, z: float) -> tuple[float, float, float]:
        """Canonical coordinates -> this patient's LPS mm."""
        return (x * self.width * self.scale, y * self.width * self.scale, z * self.scale)


@dataclass
class _Sketch:
    """Shapes drawn in canonical coordinates (mm of an adult of scale 1) onto one patient, in painting order."""

    s: float  # height scale (z)
    w: float  # width scale (x and y)
    shapes: list[Shape] = field(default_factory=list)

    def mm(self, x: float, y: float, z: float) -> tuple[float, float, float]:
        """Canonical point or radii -> this patient's mm."""
        return (x * self.w, y * self.w, z * self.s)

    def ell(self, tissue: Tissue, center, radii, **kw) -> None:
        self.shapes.append(Shape(tissue, "ellipsoid", center=self.mm(*center), radii=self.mm(*radii), **kw))

    def cyl(self, tissue: Tissue, center_xy, radii_xy, z_hi: float, z_lo: float, **kw) -> None:
        self.shapes.append(Shape(tissue, "cylinder", center=self.mm(*center_xy, 0), radii=self.mm(*radii_xy, 0),
                                 z_range=(z_hi * self.s, z_lo * self.s), **kw))


def make_body(rng: np.random.Generator, *, sex: str) -> Body:
    """A random adult body (scale 0.92-1.08, width 0.9-1.15, a bit narrower for F).

    Example:
        >>> body = make_body(np.random.default_rng(0), sex="F")
        >>> body.z_top > body.z_bottom
        True
    """
    scale = float(rng.uniform(0.92, 1.08))
    width = float(rng.uniform(0.9, 1.15)) * (0.94 if sex == "F" else 1.0)
    sk = _Sketch(scale, width * scale)
    torso, fat = _trunk(sk, sex)
    _thighs(sk, fat)
    _head(sk)
    _node_fat(sk)
    _chest(sk)
    _abdomen(sk, rng)
    _skeleton(sk, torso)
    weight = 72.0 * (width / (0.94 if sex == "F" else 1.0)) ** 2 * scale**3 * (0.85 if sex == "F" else 1.0)
    return Body(
        shapes=sk.shapes,
        scale=scale,
        width=width,
        z_top=8.0 * scale,
        z_bottom=-1000.0 * scale,
        center_mm=(0.0, 0.0, -470.0 * scale),
        weight_kg=round(float(weight), 1),
    )


def _trunk(sk: _Sketch, sex: str) -> tuple[tuple[tuple[float, float, float], ...], float]:
    """Skin fat, muscle wall and visceral soft tissue from the neck to the upper thighs; returns the
    torso contour (z, rx, ry in mm) and the fat thickness (mm)."""
    s, w = sk.s, sk.w
    # Torso contour (z, rx, ry) from the neck to the upper thighs; thighs are separate cylinders.
    torso = tuple(
        (z * s, rx * w, ry * w)
        for z, rx, ry in [
            (-205, 60, 62),
            (-255, 68, 66),
            (-275, 150, 95),
            (-300, 172, 108),
            (-420, 165, 112),
            (-550, 158, 114),
            (-700, 158, 112),
            (-800, 172, 108),
            (-880, 175, 100),
            (-905, 160, 90),
        ]
    )
    fat = 12.0 * w * (1.2 if sex == "F" else 1.0)
    sk.shapes.append(Shape(Tissue.FAT, "profile", knots=torso))
    sk.shapes.append(Shape(Tissue.MUSCLE, "profile", knots=torso, scale_in=fat))
    # Visceral soft tissue inside the muscular wall of the thorax/abdomen/pelvis.
    inner = tuple((z, rx, ry) for z, rx, ry in torso if z <= -300 * s)
    sk.shapes.append(Shape(Tissue.SOFT, "profile", knots=inner, scale_in=fat + 18.0 * w))
    return torso, fat


def _thighs(sk: _Sketch, fat: float) -> None:
    """Thighs: fat, muscle, femur (cortex and marrow), femoral heads."""
    B, M = Tissue.CORTICAL_BONE, Tissue.MARROW
    for side in (-1, 1):
        sk.cyl(Tissue.FAT, (side * 88, 0), (78, 82), -880, -1080)
        sk.cyl(Tissue.MUSCLE, (side * 88, 0), (78 - fat / sk.w, 82 - fat / sk.w), -880, -1080)
        sk.cyl(B, (side * 92, 5), (14, 14), -870, -1080)
        sk.cyl(M, (side * 92, 5), (8, 8), -885, -1080)
        sk.ell(B, (side * 90, 0, -865), (24, 24, 24))
        sk.ell(M, (side * 90, 0, -865), (18, 18, 18))


def _head(sk: _Sketch) -> None:
    """Head: scalp (soft), skull, brain; face and mandible."""
    B = Tissue.CORTICAL_BONE
    head_c, head_r = sk.mm(0, 5, -112), sk.mm(76, 96, 112)
    sk.shapes.append(Shape(Tissue.MUSCLE, "ellipsoid", center=head_c, radii=head_r))
    sk.shapes.append(Shape(B, "ellipsoid", center=head_c, radii=tuple(r - 5 for r in head_r)))
    sk.shapes.append(Shape(Tissue.BRAIN, "ellipsoid", center=head_c, radii=tuple(r - 12 for r in head_r)))
    sk.ell(Tissue.SOFT, (0, -35, -190), (45, 40, 35))
    sk.ell(B, (0, -45, -200), (42, 30, 14), shell=5)


def _node_fat(sk: _Sketch) -> None:
    """Fat where the nodes live (mediastinum, axillae, supraclavicular fossae), so that nodes show on CT."""
    sk.ell(Tissue.FAT, (0, -35, -400), (38, 45, 70))
    for side in (-1, 1):
        sk.ell(Tissue.FAT, (side * 148, 15, -330), (22, 35, 40))
        sk.ell(Tissue.FAT, (side * 60, -10, -272), (26, 26, 18))


def _chest(sk: _Sketch) -> None:
    """Airway, lungs, heart and great vessels."""
    # Airway: trachea from the larynx to the carina, then the main bronchi.
    sk.cyl(Tissue.AIRWAY, (0, -25), (8, 8), -205, -395)
    for side in (-1, 1):
        sk.ell(Tissue.AIRWAY, (side * 22, -18, -405), (20, 6, 14))
    # Lungs inside the chest wall (skin, fat, muscle, ribs: at least ~2.5 cm laterally and
    # posteriorly), so that no axial slice shows lung touching the outside air.
    for side in (-1, 1):
        sk.ell(Tissue.LUNG, (side * 74, 4, -420), (54, 80, 135))
    # Heart (blood pool inside a myocardial shell), descending aorta, aortic arch.
    sk.ell(Tissue.MYOCARDIUM, (22, -30, -470), (58, 50, 55))
    sk.ell(Tissue.BLOOD, (22, -30, -470), (46, 38, 43))
    sk.cyl(Tissue.BLOOD, (18, 38), (12, 12), -385, -790)
    sk.ell(Tissue.BLOOD, (5, 0, -385), (30, 42, 13), shell=9 * sk.w)


def _abdomen(sk: _Sketch, rng: np.random.Generator) -> None:
    """Liver (patient's right = -x), spleen, kidneys, bladder, stomach with an air cap, colon gas."""
    sk.ell(Tissue.LIVER, (-62, 0, -575), (95, 82, 78))
    sk.ell(Tissue.SPLEEN, (92, 45, -575), (38, 50, 55))
    for side in (-1, 1):
        sk.ell(Tissue.KIDNEY, (side * 62, 55, -650), (28, 28, 55))
    sk.ell(Tissue.BLADDER, (0, -40, -842), (42, 35, 32))
    sk.ell(Tissue.SOFT, (45, -45, -575), (42, 32, 45))
    sk.ell(Tissue.AIRWAY, (45, -55, -548), (30, 18, 16))
    # Colon gas: bubbles of random size along the ascending, transverse and descending colon.
    path = [(-100, -5, z) for z in range(-790, -660, 24)] + [(x, -55, -650) for x in range(-90, 91, 30)]
    path += [(100, -5, z) for z in range(-670, -800, -24)]
    for x, y, z in path:
        r = float(rng.uniform(6, 15))
        sk.ell(Tissue.AIRWAY, (x + rng.normal(0, 5), y + rng.normal(0, 5), z + rng.normal(0, 5)), (r, r * 0.8, r * 0.9))


def _skeleton(sk: _Sketch, torso: tuple[tuple[float, float, float], ...]) -> None:
    """Spine, ribs, sternum, clavicles, iliac wings and sacrum."""
    B, M = Tissue.CORTICAL_BONE, Tissue.MARROW
    s, w = sk.s, sk.w
    # Spine: vertebral bodies between discs (z_period), marrow inside, spinous processes. The
    # cervical spine sits in the back half of the neck; thoracic and lumbar spine further back.
    for y_body, y_spinous, (z_hi, z_lo), (rx, ry), period in (
        (18, 38, (-205, -272), (12, 11), 20),
        (72, 96, (-272, -840), (18, 16), 30),
    ):
        sk.cyl(B, (0, y_body), (rx, ry), z_hi, z_lo, z_period=period * s, z_duty=0.8)
        sk.cyl(M, (0, y_body), (rx - 5, ry - 5), z_hi, z_lo, z_period=period * s, z_duty=0.8)
        sk.cyl(B, (0, y_spinous), (7, 8), z_hi, z_lo, z_period=period * s, z_duty=0.6)
    # Ribs (an elliptic shell cut into bands), sternum, clavicles, iliac wings, sacrum.
    rib_knots = tuple((z, rx - 14 * w, ry - 12 * w) for z, rx, ry in torso if -640 * s <= z <= -290 * s)
    sk.shapes.append(Shape(B, "profile", knots=rib_knots, shell=7 * w, z_period=24 * s, z_duty=0.38))
    sk.cyl(B, (0, -98), (14, 6), -320, -480)
    for side in (-1, 1):
        sk.ell(B, (side * 70, -55, -285), (62, 9, 8))
        sk.ell(B, (side * 95, 35, -790), (55, 28, 62), shell=8 * w)
        sk.ell(M, (side * 95, 35, -790), (47, 20, 54), shell=3 * w)
    sk.ell(B, (0, 70, -815), (35, 20, 40), shell=6 * w)


# Lymph-node stations in canonical coordinates; sided stations get x *= -1 for the right side.
STATIONS: dict[str, tuple[float, float, float]] = {
    "cervical": (42, -5, -232),
    "supraclavicular": (62, -10, -272),
    "axillary": (148, 15, -330),
    "mediastinal": (-8, -45, -385),
    "hilar": (42, 10, -430),
    "para-aortic": (28, 45, -690),
    "iliac": (62, 15, -800),
    "inguinal": (82, -55, -895),
}
SIDED = {"cervical", "supraclavicular", "axillary", "hilar", "para-aortic", "iliac", "inguinal"}
HL_CHAIN = ["cervical", "supraclavicular", "mediastinal", "hilar", "axillary"]


def place_lesions(
    rng: np.random.Generator, body: Body, *, diagnosis: str, n: int, small_one: bool = True
) -> list[Lesion]:
    """Plant up to ``n`` lesions at least 10 mm apart: HL contiguous and above the diaphragm, NHL scattered,
    bulky and sometimes extranodal (spleen, bone). With ``small_one`` and n >= 2 one lesion is < 1 ml.

    Example:
        >>> body = make_body(np.random.default_rng(0), sex="M")
        >>> len(place_lesions(np.random.default_rng(1), body, diagnosis="HL", n=3))
        3
    """
    lesions: list[Lesion] = []
    if diagnosis == "HL":
        start = int(rng.integers(0, 3))
        names = [HL_CHAIN[(start + i) % len(HL_CHAIN)] for i in range(n)]
    else:
        pool = list(STATIONS) + ["spleen", "bone"]
        names = [pool[int(i)] for i in rng.choice(len(pool), size=n, replace=n > len(pool))]
    for i, name in enumerate(names):
        for _attempt in range(40):
            small = small_one and n >= 2 and i == n - 1
            if small:  # 0.3-0.9 ml whatever the jitter below
                r = float(rng.uniform(4.5, 5.5))
            elif diagnosis == "HL":
                r = float(rng.uniform(7.0, 20.0))
            else:
                r = float(rng.uniform(8.0, 32.0))
            radii = tuple(float(r * rng.uniform(*((0.9, 1.1) if small else (0.8, 1.2)))) for _ in range(3))
            extranodal = name in ("spleen", "bone")
            if name == "spleen":
                c = (92, 45, -575)
                radii = tuple(min(q, 18.0) for q in radii)
            elif name == "axillary":  # between the ribs and the skin: no room for bulk
                c = STATIONS[name]
                c = (-c[0], c[1], c[2]) if rng.random() < 0.5 else c
                radii = tuple(min(q, 16.0) for q in radii)
            elif name == "bone":
                c = (0, 72, float(rng.uniform(-760, -450)))
                radii = tuple(min(q, 11.0) for q in radii)
            else:
                c = STATIONS[name]
                if name in SIDED and rng.random() < 0.5:
                    c = (-c[0], c[1], c[2])
            jitter = rng.normal(0, 5.0, 3)
            center = tuple(float(v) for v in np.add(body.p(*c), jitter))
            ok = all(
                np.linalg.norm(np.subtract(center, o.center)) > max(radii) + max(o.radii) + 10.0 for o in lesions
            )
            if ok:
                break
        else:  # no room left at this station: fewer lesions rather than two that touch
            continue
        suv = float(rng.uniform(3.0, 25.0)) if not small else float(rng.uniform(4.0, 12.0))
        lesions.append(Lesion(center=center, radii=radii, suv_max=round(suv, 2), station=name, extranodal=extranodal))
    return lesions


def paint(grid: Grid1D, shapes: list[Shape], out: np.ndarray, values: np.ndarray | None = None) -> None:
    """Paint each shape's tissue label (or ``values[i]``) into ``out[z, y, x]`` in order.

    Only the sub-block inside each shape's bounding box is evaluated, so a full-size CT
    (512 x 512 x 300+) paints in seconds.
    """
    for n, shape in enumerate(shapes):
        z0, z1 = shape.z_extent()
        x0, x1, y0, y1 = shape.xy_extent()
        kk = np.nonzero((grid.zs >= z0) & (grid.zs <= z1))[0]
        jj = np.nonzero((grid.ys >= y0) & (grid.ys <= y1))[0]
        ii = np.nonzero((grid.xs >= x0) & (grid.xs <= x1))[0]
        if not (len(kk) and len(jj) and len(ii)):
            continue
        ks, js, is_ = slice(kk.min(), kk.max() + 1), slice(jj.min(), jj.max() + 1), slice(ii.min(), ii.max() + 1)
        z = grid.zs[ks][:, None, None]
        y = grid.ys[js][None, :, None]
        x = grid.xs[is_][None, None, :]
        m = shape.inside(x, y, z)
        block = out[ks, js, is_]
        block[m] = shape.tissue if values is None else values[n]
