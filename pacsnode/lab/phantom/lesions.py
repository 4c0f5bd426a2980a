"""Lesions (the ground truth a model should find) and physiological PET foci.

Each lesion is an ellipsoid (a sphere when its axes are equal) inside one
host organ, with its own CT density, FDG uptake and MR relaxation times. Some
lesions are avid on PET and some are not; some benign lesions are avid too.
Physiological foci are hot on PET over normal CT tissue (bowel, muscle, brown
fat): they look like lesions on PET alone and are not lesions, so a label that
is right on both modalities needs both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pacsnode.lab.phantom.anatomy import PROPERTIES, Anatomy, Tissue
from pacsnode.lab.phantom.shapes import Ellipsoid
from pacsnode.workers.geometry import Grid

SUBTLE_HU = 30.0  # |lesion - host| below this is "subtle" on CT
DIAMETER_MM = (5.0, 30.0)  # largest diameter, log-uniform, in reference mm


@dataclass(frozen=True)
class Kind:
    """One kind of lesion: where it grows and how it images."""

    name: str
    weight: float
    malignant: bool
    avid_probability: float
    # per host: ("relative", lo, hi) HU added to the host, or ("absolute", lo, hi)
    hu: dict[Tissue, tuple[str, float, float]]
    avid_suv: tuple[float, float]
    quiet_suv: float | None  # uptake when not avid; None: like the host organ
    mr: tuple[float, float, float]  # T1 ms, T2 ms, proton density


KINDS = (
    Kind(
        "metastasis", 0.45, True, 0.85,
        {Tissue.LIVER: ("relative", -60, -12), Tissue.LUNG: ("absolute", 10, 45)},
        (4.0, 14.0), None, (900, 95, 0.85),
    ),
    Kind(
        "cyst", 0.2, False, 0.0,
        {Tissue.LIVER: ("absolute", 0, 15), Tissue.KIDNEY: ("absolute", 0, 15)},
        (0.3, 0.3), 0.3, (3000, 1500, 1.0),
    ),
    Kind(
        "hemangioma", 0.1, False, 0.0,
        {Tissue.LIVER: ("relative", 15, 55)},
        (2.0, 2.0), None, (1100, 160, 0.9),
    ),
    Kind(
        "granuloma", 0.15, False, 0.25,  # inflammation: benign, sometimes avid
        {Tissue.LUNG: ("absolute", 60, 300)},
        (3.0, 6.0), 0.8, (900, 40, 0.5),
    ),
    Kind(
        "renal carcinoma", 0.1, True, 0.5,
        {Tissue.KIDNEY: ("relative", -100, -40)},
        (3.0, 8.0), None, (1100, 120, 0.85),
    ),
)  # fmt: skip

FOCUS_SITES = {Tissue.SOFT_TISSUE: "bowel", Tissue.MUSCLE: "muscle", Tissue.FAT: "brown fat"}


@dataclass(frozen=True, eq=False)
class Lesion:
    """One lesion; ``label`` is its value in the lesion mask (1-based)."""

    label: int
    kind: str
    organ: Tissue
    centre: np.ndarray  # patient (x, y, z) mm
    semi_axes: np.ndarray  # mm, along the rotation's columns
    rotation: np.ndarray
    hu: float
    contrast_hu: float  # hu minus the host organ's hu
    suv: float
    avid: bool
    malignant: bool
    mr: tuple[float, float, float]

    @property
    def shape(self) -> Ellipsoid:
        return Ellipsoid(self.centre, self.semi_axes, self.rotation)

    @property
    def volume_mm3(self) -> float:
        return float(4 / 3 * np.pi * np.prod(self.semi_axes))

    @property
    def subtle(self) -> bool:
        return abs(self.contrast_hu) < SUBTLE_HU


@dataclass(frozen=True, eq=False)
class Focus:
    """Physiological uptake on PET in normal tissue: not a lesion."""

    centre: np.ndarray
    radius: float
    suv: float
    site: str
    tissue: Tissue = field(default=Tissue.SOFT_TISSUE)


def _directions() -> np.ndarray:
    steps = np.array(np.meshgrid([-1, 0, 1], [-1, 0, 1], [-1, 0, 1])).reshape(3, -1).T
    steps = steps[np.any(steps != 0, axis=1)]
    return steps / np.linalg.norm(steps, axis=1, keepdims=True)


_DIRECTIONS = _directions()


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _fits(
    anatomy: Anatomy,
    field_grid: Grid,
    centre: np.ndarray,
    semi: np.ndarray,
    rotation: np.ndarray,
    hosts: set[Tissue],
    margin: float,
) -> bool:
    """The ellipsoid, grown by ``margin`` mm, lies in the hosts and in the field."""
    if not field_grid.contains_point(centre, margin_mm=float(semi.max()) + margin):
        return False
    grown = semi + margin
    points = centre + (_DIRECTIONS * grown) @ rotation.T
    points = np.vstack([centre, points])
    return bool(np.isin(anatomy.tissue_at(points), list(hosts)).all())


def place_lesions(
    anatomy: Anatomy, field_grid: Grid, count: int, rng: np.random.Generator, min_diameter: float
) -> list[Lesion]:
    """Up to ``count`` non-overlapping lesions inside ``field_grid`` (the CT).

    ``min_diameter`` (mm) keeps every axis wide enough to cover voxel centres
    of the grid. Fewer lesions come back only when the organs in the field
    have no room left.
    """
    lesions: list[Lesion] = []
    scale = anatomy.scale
    lo_field, hi_field = field_grid.extent()
    available = []  # (kind, host, box of the host within the field)
    for kind in KINDS:
        for host in kind.hu:
            bounds = anatomy.organ_bounds(host)
            if bounds is None:
                continue
            lo, hi = np.maximum(bounds[0], lo_field), np.minimum(bounds[1], hi_field)
            if np.all(hi > lo):
                available.append((kind, host, lo, hi))
    if not available:
        return lesions
    weights = np.array([kind.weight / len(kind.hu) for kind, *_ in available])
    weights /= weights.sum()
    for _ in range(count):
        lesion = None
        for attempt in range(200):
            kind, host, lo, hi = available[int(rng.choice(len(available), p=weights))]
            shrink = 0.8 ** (attempt // 40)
            low, high = np.log(DIAMETER_MM[0] * scale), np.log(DIAMETER_MM[1] * scale * shrink)
            diameter = max(float(np.exp(rng.uniform(low, max(low, high)))), min_diameter)
            if rng.random() < 0.5:
                semi, rotation = np.full(3, diameter / 2), np.eye(3)
            else:
                ratios = np.concatenate([[1.0], rng.uniform(0.55, 1.0, size=2)])
                semi = np.maximum(diameter * ratios, min_diameter) / 2
                rotation = _rotation(rng)
            centre = rng.uniform(lo, hi)
            if not _fits(anatomy, field_grid, centre, semi, rotation, {host}, scale * 1.5):
                continue
            if any(
                np.linalg.norm(centre - other.centre)
                < semi.max() + other.semi_axes.max() + scale * 3
                for other in lesions
            ):
                continue
            lesion = _make(kind, host, len(lesions) + 1, centre, semi, rotation, rng, anatomy)
            break
        if lesion is None:
            break
        lesions.append(lesion)
    return lesions


def _make(
    kind: Kind,
    host: Tissue,
    label: int,
    centre: np.ndarray,
    semi: np.ndarray,
    rotation: np.ndarray,
    rng: np.random.Generator,
    anatomy: Anatomy,
) -> Lesion:
    mode, lo, hi = kind.hu[host]
    host_hu = PROPERTIES[host].hu
    hu = float(rng.uniform(lo, hi)) + (host_hu if mode == "relative" else 0.0)
    avid = bool(rng.random() < kind.avid_probability)
    host_suv = _suv(host, anatomy)
    if avid:
        suv = float(rng.uniform(*kind.avid_suv))
    else:
        suv = kind.quiet_suv if kind.quiet_suv is not None else host_suv * 0.9
    return Lesion(
        label=label,
        kind=kind.name,
        organ=host,
        centre=centre,
        semi_axes=semi,
        rotation=rotation,
        hu=round(hu, 1),
        contrast_hu=round(hu - host_hu, 1),
        suv=round(suv, 2),
        avid=avid,
        malignant=kind.malignant,
        mr=kind.mr,
    )


def _suv(tissue: Tissue, anatomy: Anatomy) -> float:
    if tissue == Tissue.MYOCARDIUM:
        return anatomy.myocardium_suv
    return PROPERTIES[tissue].suv


def place_foci(
    anatomy: Anatomy,
    field_grid: Grid,
    lesions: list[Lesion],
    count: int,
    rng: np.random.Generator,
) -> list[Focus]:
    """Up to ``count`` physiological hot spots in normal tissue of the field."""
    foci: list[Focus] = []
    scale = anatomy.scale
    lo_field, hi_field = field_grid.extent()
    for _ in range(count):
        for _attempt in range(200):
            radius = float(rng.uniform(4, 8)) * scale
            centre = rng.uniform(lo_field, hi_field)
            tissue = Tissue(int(anatomy.tissue_at(centre[None])[0]))
            if tissue not in FOCUS_SITES:
                continue
            semi = np.full(3, radius)
            if not _fits(anatomy, field_grid, centre, semi, np.eye(3), {tissue}, scale * 2):
                continue
            clear = scale * 20
            if any(
                np.linalg.norm(centre - other.centre) < radius + other.semi_axes.max() + clear
                for other in lesions
            ) or any(np.linalg.norm(centre - f.centre) < radius + f.radius + clear for f in foci):
                continue
            suv = round(float(rng.uniform(3.5, 9.0)), 2)
            foci.append(Focus(centre, radius, suv, FOCUS_SITES[tissue], tissue))
            break
    return foci
