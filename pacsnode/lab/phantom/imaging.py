"""From anatomy to images: CT in HU, PET in SUV, MR T1/T2 signal.

Each function rasterises the anatomy onto its own grid, so the modalities
share patient space (one Frame of Reference) without resampling each other.
Lesions are painted into small bounding boxes only. PET resolution is a
Gaussian blur of the organ map plus, for lesions and foci, the closed-form
blur of a uniform ellipsoid, which stays right for lesions smaller than a
PET voxel.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.ndimage as ndi  # type: ignore[import-untyped]  # no scipy-stubs in dev deps yet
from scipy.special import erf  # type: ignore[import-untyped]

from pacsnode.lab.phantom.anatomy import PROPERTIES, Anatomy, Tissue
from pacsnode.lab.phantom.lesions import Focus, Lesion
from pacsnode.lab.phantom.shapes import paint
from pacsnode.workers.geometry import Grid

CT_NOISE_HU = 10.0
PT_NOISE = 0.15  # SD = PT_NOISE · sqrt(SUV): about 10 % in the liver
PT_FWHM_MM = 6.5
MR_NOISE = 0.012  # SD relative to the brightest tissue
LESION_BASE = 32  # lesion i is painted as LESION_BASE + i on MR label maps


def lesion_mask(grid: Grid, lesions: list[Lesion]) -> np.ndarray:
    """uint8 map: 0 outside lesions, ``lesion.label`` inside (labels ≤ 255)."""
    mask = np.zeros(grid.shape, dtype=np.uint8)
    for lesion in lesions:
        paint(mask, grid, lesion.shape, lesion.label)
    return mask


def ct_hu(
    tissues: np.ndarray,
    lesions_mask: np.ndarray,
    lesions: list[Lesion],
    rng: np.random.Generator,
    noise: float = 1.0,
) -> np.ndarray:
    """CT values in HU (float32) from the tissue map and the lesion mask."""
    lut = np.zeros(256, dtype=np.float32)
    for tissue, props in PROPERTIES.items():
        lut[tissue] = props.hu
    hu = lut[tissues]
    if lesions:
        values = np.zeros(256, dtype=np.float32)
        for lesion in lesions:
            values[lesion.label] = lesion.hu
        inside = lesions_mask > 0
        hu[inside] = values[lesions_mask[inside]]
    if noise > 0:  # in slabs: no second full-size array
        sd = np.float32(CT_NOISE_HU * noise)
        for start in range(0, hu.shape[0], 16):
            slab = hu[start : start + 16]
            slab += rng.standard_normal(slab.shape, dtype=np.float32) * sd
    return hu


def _suv_lut(anatomy: Anatomy) -> np.ndarray:
    lut = np.zeros(256, dtype=np.float32)
    for tissue, props in PROPERTIES.items():
        lut[tissue] = props.suv
    lut[Tissue.MYOCARDIUM] = anatomy.myocardium_suv
    return lut


def pt_suv(
    anatomy: Anatomy,
    grid: Grid,
    lesions: list[Lesion],
    foci: list[Focus],
    rng: np.random.Generator,
    noise: float = 1.0,
) -> np.ndarray:
    """FDG uptake as SUV (float32) on the PET grid, blurred to PET resolution."""
    lut = _suv_lut(anatomy)
    suv = lut[anatomy.labels(grid)]
    fwhm = max(PT_FWHM_MM * anatomy.scale, 1.2 * max(grid.spacing[1:]))
    sigma_mm = fwhm / (2 * math.sqrt(2 * math.log(2)))
    suv = ndi.gaussian_filter(suv, sigma=[sigma_mm / s for s in grid.spacing], mode="nearest")
    for lesion in lesions:
        delta = lesion.suv - float(lut[lesion.organ])
        _add_blurred(suv, grid, lesion.centre, lesion.semi_axes, lesion.rotation, sigma_mm, delta)
    for focus in foci:
        delta = focus.suv - float(lut[focus.tissue])
        semi = np.full(3, focus.radius)
        _add_blurred(suv, grid, focus.centre, semi, np.eye(3), sigma_mm, delta)
    if noise > 0:
        sd = np.sqrt(np.maximum(suv, 0)) * np.float32(PT_NOISE * noise)
        suv += rng.standard_normal(suv.shape, dtype=np.float32) * sd
    return np.maximum(suv, 0, out=suv)


def _add_blurred(
    out: np.ndarray,
    grid: Grid,
    centre: np.ndarray,
    semi: np.ndarray,
    rotation: np.ndarray,
    sigma: float,
    amount: float,
) -> None:
    """Add ``amount`` x (uniform ellipsoid ⊛ isotropic Gaussian) to ``out``.

    Exact for a sphere (the convolution has a closed form in r); for an
    ellipsoid the sphere formula is used with the ellipsoid's radius along
    each direction from the centre.
    """
    reach = float(semi.max()) + 4 * sigma
    box = grid.box(centre - reach, centre + reach)
    if box is None:
        return
    x, y, z = grid.coordinates(box)
    d = [
        np.asarray(c, dtype=np.float64) - float(c0) for c, c0 in zip((x, y, z), centre, strict=True)
    ]
    r = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2)
    rho2 = sum(
        (sum(d[a] * rotation[a, axis] for a in range(3)) / semi[axis]) ** 2 for axis in range(3)
    )
    mean_radius = float(np.prod(semi) ** (1 / 3))
    radius = np.where(rho2 > 1e-12, r / np.sqrt(np.maximum(rho2, 1e-12)), mean_radius)
    r = np.maximum(r, 1e-3 * sigma)
    s2 = sigma * math.sqrt(2)
    value = 0.5 * (erf((radius - r) / s2) + erf((radius + r) / s2)) - sigma / (
        r * math.sqrt(2 * math.pi)
    ) * (
        np.exp(-((radius - r) ** 2) / (2 * sigma**2))
        - np.exp(-((radius + r) ** 2) / (2 * sigma**2))
    )
    region = out[box]
    region += np.broadcast_to(value * amount, region.shape).astype(np.float32)


def mr_signal(
    anatomy: Anatomy,
    grid: Grid,
    lesions: list[Lesion],
    repetition_ms: float,
    echo_ms: float,
    rng: np.random.Generator,
    noise: float = 1.0,
) -> np.ndarray:
    """Spin-echo magnitude S = PD·(1 - e^(-TR/T1))·e^(-TE/T2), scaled so the
    brightest tissue is 1, with a smooth coil bias field and Rician noise."""

    def spin_echo(t1: float, t2: float, pd: float) -> float:
        return pd * (1 - math.exp(-repetition_ms / t1)) * math.exp(-echo_ms / t2)

    lut = np.zeros(256, dtype=np.float32)
    for tissue, props in PROPERTIES.items():
        lut[tissue] = spin_echo(props.t1, props.t2, props.pd)
    for lesion in lesions:
        lut[LESION_BASE + lesion.label] = spin_echo(*lesion.mr)
    lut /= lut.max()
    labels = anatomy.labels(grid)
    for lesion in lesions:
        paint(labels, grid, lesion.shape, LESION_BASE + lesion.label)
    signal = lut[labels]
    # coil sensitivity: a gentle gradient across the field, from the seed
    x, y, _ = grid.coordinates()
    lo, hi = grid.extent()
    span = np.maximum(hi - lo, 1e-6)
    gx, gy = rng.uniform(-0.12, 0.12, size=2)
    bias = (1 + gx * (2 * (x - lo[0]) / span[0] - 1)) * (1 + gy * (2 * (y - lo[1]) / span[1] - 1))
    signal *= bias.astype(np.float32)
    if noise > 0:
        sd = np.float32(MR_NOISE * noise)
        real = signal + rng.standard_normal(signal.shape, dtype=np.float32) * sd
        imag = rng.standard_normal(signal.shape, dtype=np.float32) * sd
        signal = np.hypot(real, imag)
    return signal
