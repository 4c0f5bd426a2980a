"""Voxel grids in patient space, as the Image Plane module describes them.

Conventions are those of :mod:`workers.volume` (PS3.3 C.7.6.2.1.1): patient
coordinates are LPS millimetres (x to the patient's left, y to posterior, z
to head); ``array[k, j, i]`` lies at ``origin + i·dx·row + j·dy·column +
k·dz·normal`` with ``normal = row x column``, ``spacing = (dz, dy, dx)`` and
``direction`` rows (row cosine, column cosine, normal). Slices ascend along
the normal, so a loaded series compares with the generated array directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

Box = tuple[slice, slice, slice]
AXIAL = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))  # ImageOrientationPatient of an axial image
CORONAL = ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0))


@dataclass(frozen=True, eq=False)
class Grid:
    """A regular grid of voxel centres; ``eq=False`` because of the array field."""

    shape: tuple[int, int, int]  # (slices, rows, columns)
    spacing: tuple[float, float, float]  # (dz, dy, dx) in mm
    origin: tuple[float, float, float]  # patient (x, y, z) of voxel [0, 0, 0]
    orientation: tuple[tuple[float, float, float], tuple[float, float, float]] = AXIAL
    direction: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        row, col = (np.asarray(v, dtype=np.float64) for v in self.orientation)
        direction = np.stack([row, col, np.cross(row, col)])
        direction.flags.writeable = False
        object.__setattr__(self, "direction", direction)

    @classmethod
    def centred(
        cls,
        shape: tuple[int, int, int],
        spacing: tuple[float, float, float],
        centre: tuple[float, float, float],
        orientation: tuple[tuple[float, float, float], tuple[float, float, float]] = AXIAL,
    ) -> Grid:
        """The grid of this shape and spacing whose middle lies at ``centre``."""
        probe = cls(shape, spacing, (0.0, 0.0, 0.0), orientation)
        half = (np.asarray(shape, dtype=np.float64) - 1) / 2 * np.asarray(spacing)
        offset = probe.direction.T @ half[::-1]
        x, y, z = (float(v) for v in np.asarray(centre) - offset)
        return cls(shape, spacing, (x, y, z), orientation)

    @property
    def voxel_volume(self) -> float:
        """mm³ of one voxel."""
        return float(np.prod(self.spacing))

    def slice_position(self, k: int) -> tuple[float, float, float]:
        """ImagePositionPatient of slice ``k``."""
        x, y, z = (float(v) for v in self.to_patient(np.array([k, 0, 0], dtype=np.float64)))
        return (x, y, z)

    def to_patient(self, index_kji: np.ndarray) -> np.ndarray:
        """Index coordinates (..., 3) in (k, j, i) order → patient (..., 3) (x, y, z)."""
        scaled = np.asarray(index_kji, dtype=np.float64)[..., ::-1] * self.spacing[::-1]
        return np.asarray(self.origin) + scaled @ self.direction

    def to_index(self, xyz: np.ndarray) -> np.ndarray:
        """Patient (..., 3) (x, y, z) → fractional index (..., 3) in (k, j, i) order."""
        local = (np.asarray(xyz, dtype=np.float64) - self.origin) @ self.direction.T
        return (local / self.spacing[::-1])[..., ::-1]

    def extent(self) -> tuple[np.ndarray, np.ndarray]:
        """Patient-space bounding box (lo, hi) of the voxel centres."""
        corners = np.array(np.meshgrid(*[[0, n - 1] for n in self.shape], indexing="ij"))
        points = self.to_patient(corners.reshape(3, -1).T)
        return points.min(axis=0), points.max(axis=0)

    def contains_point(self, xyz: np.ndarray, margin_mm: float = 0.0) -> bool:
        """Whether a patient point lies inside the grid, ``margin_mm`` from its faces."""
        index = self.to_index(xyz)
        margin = margin_mm / np.asarray(self.spacing)
        upper = np.asarray(self.shape) - 1 - margin
        return bool(np.all(index >= margin - 0.5) and np.all(index <= upper + 0.5))

    def box(self, lo: np.ndarray, hi: np.ndarray) -> Box | None:
        """The index box covering the patient box [lo, hi]; None when it misses the grid."""
        corners = np.array(np.meshgrid(*zip(lo, hi, strict=True), indexing="ij"))
        index = self.to_index(corners.reshape(3, -1).T)
        first = np.maximum(np.floor(index.min(axis=0)).astype(int), 0)
        last = np.minimum(np.ceil(index.max(axis=0)).astype(int) + 1, self.shape)
        if np.any(last <= first):
            return None
        (k0, j0, i0), (k1, j1, i1) = (map(int, v) for v in (first, last))
        return (slice(k0, k1), slice(j0, j1), slice(i0, i1))

    def coordinates(self, box: Box | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Patient x, y, z of the voxel centres in ``box``, as broadcastable float32 arrays.

        For an axial grid each coordinate varies along one axis only, so the
        arrays stay one-dimensional in effect and shape tests cost one pass.
        """
        box = box or (slice(0, self.shape[0]), slice(0, self.shape[1]), slice(0, self.shape[2]))
        shapes = ((-1, 1, 1), (1, -1, 1), (1, 1, -1))
        steps = [
            (np.arange(s.start, s.stop, dtype=np.float64) * d).reshape(shape)
            for s, d, shape in zip(box, self.spacing, shapes, strict=True)
        ]
        # patient axis a = origin[a] + Σ over index axes of step · direction cosine
        cosines = (self.direction[2], self.direction[1], self.direction[0])  # for k, j, i
        result = []
        for a in range(3):
            value: np.ndarray = np.asarray(self.origin[a], dtype=np.float64)
            for step, cosine in zip(steps, cosines, strict=True):
                if abs(cosine[a]) > 1e-12:
                    value = value + step * cosine[a]
            result.append(np.asarray(value, dtype=np.float32))
        x, y, z = result
        return x, y, z
