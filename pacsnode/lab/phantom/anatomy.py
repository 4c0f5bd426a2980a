"""The phantom's body: tissues, their imaging properties, and organ shapes.

The body is a list of (tissue, shape) layers in patient space, painted in
order (later layers win), so it can be rasterised onto any grid (CT, PT, MR)
or queried at single points. It is laid out in a reference frame of an adult
torso (z = 0 near the dome of the liver, body axis on x = y = 0) and placed
into patient space with a uniform ``scale`` and an ``offset``, so a small
legacy field of view still shows the whole cross-section.

Imaging properties are plausible textbook values: CT in HU for a portal
venous phase, PET uptake as SUV for FDG, MR as T1, T2 (ms, 1.5 T) and proton
density, turned into signal by the spin-echo equation in :mod:`imaging`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from pacsnode.lab.phantom.shapes import (
    Bands,
    Cylinder,
    Ellipsoid,
    EllipticCylinder,
    Shape,
    Slab,
    contains_points,
    paint,
)
from pacsnode.workers.geometry import Grid


class Tissue(IntEnum):
    """Label values of the tissue map (``tissues`` in the ground truth)."""

    AIR = 0
    FAT = 1
    MUSCLE = 2
    SOFT_TISSUE = 3  # mediastinum and abdominal contents between the organs
    LUNG = 4
    BLOOD = 5  # contrast-enhanced heart chambers and aorta
    MYOCARDIUM = 6
    LIVER = 7
    SPLEEN = 8
    KIDNEY = 9
    BLADDER = 10  # urine
    CORTICAL_BONE = 11
    MARROW = 12  # cancellous bone
    DISC = 13
    CSF = 14
    BRAIN = 15


@dataclass(frozen=True)
class Properties:
    hu: float  # CT, portal venous phase
    suv: float  # PET, FDG at 60 min
    t1: float  # ms at 1.5 T
    t2: float  # ms
    pd: float  # relative proton density; flowing blood is dark in spin echo


PROPERTIES: dict[Tissue, Properties] = {
    Tissue.AIR: Properties(-1000, 0.0, 1000, 1, 0.0),
    Tissue.FAT: Properties(-100, 0.4, 260, 80, 0.9),
    Tissue.MUSCLE: Properties(55, 0.8, 870, 47, 0.8),
    Tissue.SOFT_TISSUE: Properties(30, 1.0, 800, 70, 0.8),
    Tissue.LUNG: Properties(-830, 0.5, 1200, 30, 0.1),
    Tissue.BLOOD: Properties(160, 1.7, 1200, 250, 0.05),
    Tissue.MYOCARDIUM: Properties(100, 4.0, 870, 50, 0.8),
    Tissue.LIVER: Properties(105, 2.3, 500, 43, 0.75),
    Tissue.SPLEEN: Properties(115, 1.9, 780, 80, 0.8),
    Tissue.KIDNEY: Properties(170, 4.5, 960, 85, 0.85),
    Tissue.BLADDER: Properties(8, 25.0, 3000, 1500, 1.0),
    Tissue.CORTICAL_BONE: Properties(900, 0.6, 1000, 1, 0.05),
    Tissue.MARROW: Properties(250, 1.6, 365, 70, 0.85),
    Tissue.DISC: Properties(90, 0.6, 1000, 120, 0.8),
    Tissue.CSF: Properties(8, 0.3, 4000, 2000, 1.0),
    Tissue.BRAIN: Properties(35, 8.0, 900, 100, 0.75),
}


@dataclass(frozen=True, eq=False)
class Anatomy:
    """Layers painted in order; ``scale`` maps reference mm to patient mm."""

    layers: tuple[tuple[Tissue, Shape], ...]
    scale: float
    myocardium_suv: float  # FDG uptake of the heart varies a lot between patients

    def labels(self, grid: Grid) -> np.ndarray:
        """The tissue map on ``grid``: uint8 :class:`Tissue` values."""
        labels = np.zeros(grid.shape, dtype=np.uint8)
        for tissue, shape in self.layers:
            paint(labels, grid, shape, int(tissue))
        return labels

    def tissue_at(self, points: np.ndarray) -> np.ndarray:
        """Tissue values at an (n, 3) array of patient points."""
        found = np.zeros(len(points), dtype=np.uint8)
        for tissue, shape in self.layers:
            found[contains_points(shape, points)] = int(tissue)
        return found

    def organ_bounds(self, tissue: Tissue) -> tuple[np.ndarray, np.ndarray] | None:
        """Patient bounding box of all layers of one tissue."""
        boxes = [shape.bounds() for t, shape in self.layers if t == tissue]
        if not boxes:
            return None
        lo = np.min([b[0] for b in boxes], axis=0)
        hi = np.max([b[1] for b in boxes], axis=0)
        return lo, hi


class _Frame:
    """Reference-frame mm → patient mm, with a little per-patient jitter."""

    def __init__(self, scale: float, offset: np.ndarray, rng: np.random.Generator) -> None:
        self.scale, self.offset, self.rng = scale, offset, rng

    def p(self, x: float, y: float, z: float, jitter: float = 0.0) -> np.ndarray:
        shift = self.rng.uniform(-jitter, jitter, size=3) if jitter else np.zeros(3)
        return self.offset + self.scale * (np.array([x, y, z]) + shift)

    def mm(self, *lengths: float) -> np.ndarray:
        return self.scale * np.asarray(lengths, dtype=np.float64)

    def xy(self, x: float, y: float) -> tuple[float, float]:
        return (float(self.offset[0] + self.scale * x), float(self.offset[1] + self.scale * y))

    def zr(self, z0: float, z1: float) -> tuple[float, float]:
        return (float(self.offset[2] + self.scale * z0), float(self.offset[2] + self.scale * z1))


def build_anatomy(
    rng: np.random.Generator, scale: float = 1.0, offset: tuple[float, float, float] = (0, 0, 0)
) -> Anatomy:
    """One patient: the adult layout with per-seed variation of size and position."""
    f = _Frame(scale, np.asarray(offset, dtype=np.float64), rng)
    g = float(rng.uniform(0.93, 1.07))  # organ size factor
    width = float(rng.uniform(0.94, 1.06))
    fat = float(rng.uniform(10, 24))
    body_knots = np.array(
        [
            (-540, 170, 110),
            (-350, 175, 115),
            (-200, 160, 118),
            (0, 165, 115),
            (150, 170, 112),
            (260, 145, 92),
        ],
        dtype=np.float64,
    )
    body_knots[:, 1] *= width
    knots = np.column_stack([f.offset[2] + scale * body_knots[:, 0], scale * body_knots[:, 1:]])

    def torso(inset: float) -> EllipticCylinder:
        return EllipticCylinder(f.xy(0, 0), knots, f.zr(-540, 260), inset=scale * inset)

    def neck(inset: float) -> EllipticCylinder:
        k = np.array([[f.zr(240, 380)[0], *f.mm(60, 55)], [f.zr(240, 380)[1], *f.mm(60, 55)]])
        return EllipticCylinder(f.xy(0, 0), k, f.zr(240, 380), inset=scale * inset)

    def head(inset: float) -> Ellipsoid:
        return Ellipsoid(f.p(0, -5, 455), f.mm(72 - inset, 92 - inset, 100 - inset))

    def ellipsoid(c: tuple[float, float, float], axes: tuple[float, float, float]) -> Ellipsoid:
        return Ellipsoid(f.p(*c, jitter=6), f.mm(*(g * a for a in axes)))

    def box(lo: tuple[float, float, float], hi: tuple[float, float, float]) -> Slab:
        return Slab(f.p(*lo), f.p(*hi))

    inner = fat + 12  # fat, then a layer of muscle, then the contents
    cage = torso(inner)  # inside the ribs
    band = Bands(period=scale * 28, width=scale * 10, phase=f.offset[2])
    spine_bands = Bands(period=scale * 32, width=scale * 26, phase=f.offset[2])
    marrow_bands = Bands(period=scale * 32, width=scale * 23, phase=f.offset[2] + scale * 1.5)
    spine_z = f.zr(-430, 380)
    inf = float("inf")
    below_apex = box((-inf, -inf, -inf), (inf, inf, 235))
    rib_cage = box((-inf, -60, -120), (inf, inf, 230))  # open in front: costal cartilage

    def paraspinal(x: float) -> EllipticCylinder:
        return EllipticCylinder(f.xy(x, 80), _const(f, 25, 18, -430, 250), f.zr(-430, 250))

    layers: list[tuple[Tissue, Shape]] = [
        (Tissue.FAT, torso(0)),
        (Tissue.MUSCLE, torso(fat)),
        (Tissue.SOFT_TISSUE, torso(inner)),
        (Tissue.FAT, neck(0)),
        (Tissue.MUSCLE, neck(5)),
        (Tissue.SOFT_TISSUE, head(0)),
        (Tissue.CORTICAL_BONE, head(5)),
        (Tissue.CSF, head(12)),
        (Tissue.BRAIN, head(14)),
        (Tissue.MUSCLE, paraspinal(-35)),
        (Tissue.MUSCLE, paraspinal(35)),
        (Tissue.LUNG, ellipsoid((-75, 5, 110), (62, 80, 140)) & cage & below_apex),
        (Tissue.LUNG, ellipsoid((80, 5, 110), (58, 80, 135)) & cage & below_apex),
        (Tissue.LIVER, ellipsoid((-55, 0, -75), (95, 85, 95)) & cage),
        (Tissue.SPLEEN, ellipsoid((95, 45, -60), (33, 42, 52)) & cage),
        (Tissue.KIDNEY, ellipsoid((-72, 55, -170), (28, 25, 55))),
        (Tissue.KIDNEY, ellipsoid((72, 55, -160), (28, 25, 55))),
        (Tissue.BLADDER, ellipsoid((0, -40, -440), (45, 38, 35))),
        (Tissue.BLOOD, Cylinder(f.xy(28, 15), scale * 12, f.zr(-260, 110))),
        (Tissue.MYOCARDIUM, Ellipsoid(f.p(25, -30, 45), f.mm(60 * g, 50 * g, 55 * g))),
        (Tissue.BLOOD, Ellipsoid(f.p(25, -30, 45), f.mm(60 * g - 11, 50 * g - 11, 55 * g - 11))),
        (Tissue.DISC, Cylinder(f.xy(0, 45), scale * 19, spine_z)),
        (Tissue.CORTICAL_BONE, Cylinder(f.xy(0, 45), scale * 20, spine_z) & spine_bands),
        (Tissue.MARROW, Cylinder(f.xy(0, 45), scale * 17.5, spine_z) & marrow_bands),
        (Tissue.CORTICAL_BONE, Cylinder(f.xy(0, 78), scale * 15, spine_z) & spine_bands),
        (Tissue.CORTICAL_BONE, box((-5, 88, -430), (5, 104, 380)) & spine_bands),
        (Tissue.CSF, Cylinder(f.xy(0, 78), scale * 9, spine_z)),
        (Tissue.CORTICAL_BONE, (cage - torso(inner + 8)) & band & rib_cage),
        (Tissue.CORTICAL_BONE, box((-14, -200, 20), (14, 0, 200)) & (cage - torso(inner + 9))),
    ]  # fmt: skip
    return Anatomy(tuple(layers), scale, myocardium_suv=float(rng.uniform(1.5, 9.0)))


def _const(f: _Frame, a: float, b: float, z0: float, z1: float) -> np.ndarray:
    (lo, hi), (sa, sb) = f.zr(z0, z1), f.mm(a, b)
    return np.array([[lo, sa, sb], [hi, sa, sb]])
