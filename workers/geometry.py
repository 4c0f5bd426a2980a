"""The one voxel ↔ patient geometry type: :class:`Grid`.

Conventions (PS3.3 C.7.6.2.1.1, Image Plane module): patient coordinates
are LPS millimetres (x to the patient's left, y to posterior, z to head).
The first triplet of ImageOrientationPatient is the row direction
(increasing column index, array axis i), the second the column direction
(increasing row index, axis j), and PixelSpacing is (row spacing, column
spacing) = (dy, dx). Slices ascend along ``normal = row x column``, so
``array[k, j, i]`` lies at ``origin + i·dx·row + j·dy·column + k·dz·normal``,
with ``spacing = (dz, dy, dx)`` and ``direction`` rows (row cosine, column
cosine, normal).

These are highdicom's conventions too: :attr:`Grid.affine` is the affine of
:class:`highdicom.VolumeGeometry` (voxel (k, j, i) to patient (x, y, z)),
and :meth:`Grid.to_highdicom` / :meth:`Grid.from_highdicom` convert. pacsnode
keeps its own type rather than ``hd.VolumeGeometry`` because a series the
loader accepts (:mod:`workers.volume`, orientation tolerance 1e-3 per
component, with errors naming the series and instance) may be refused by
highdicom's stricter orthogonality check (1e-4) with a generic message, and
because the phantoms and the resampling need per-axis coordinate helpers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import highdicom as hd
import numpy as np
from pacsnode.core.errors import GeometryError

Box = tuple[slice, slice, slice]
Orientation = tuple[tuple[float, float, float], tuple[float, float, float]]
AXIAL: Orientation = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))  # ImageOrientationPatient, axial
CORONAL: Orientation = ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0))


@dataclass(frozen=True, eq=False)
class Grid:
    """A regular grid of voxel centres in patient space.

    ``shape`` (slices, rows, columns); ``spacing`` (dz, dy, dx) in mm;
    ``origin`` the patient (x, y, z) of voxel [0, 0, 0]; ``orientation`` the
    ImageOrientationPatient (row cosine, column cosine); ``direction`` (derived,
    read-only) its rows are the row cosine, column cosine and unit normal.
    ``frame_of_reference_uid`` (PS3.3 C.7.4.1.1.1) is empty when unknown.
    ``eq=False``: the direction array does not compare or hash.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    orientation: Orientation = AXIAL
    frame_of_reference_uid: str = ""
    direction: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        row, col = (np.asarray(v, dtype=np.float64) for v in self.orientation)
        normal = np.cross(row, col)
        norm = float(np.linalg.norm(normal))
        if not norm:
            raise GeometryError(f"orientation {self.orientation}: row and column are parallel")
        direction = np.stack([row, col, normal / norm])
        direction.flags.writeable = False
        object.__setattr__(self, "direction", direction)

    @classmethod
    def centred(
        cls,
        shape: tuple[int, int, int],
        spacing: tuple[float, float, float],
        centre: tuple[float, float, float],
        orientation: Orientation = AXIAL,
        frame_of_reference_uid: str = "",
    ) -> Grid:
        """The grid of this shape and spacing whose middle lies at ``centre``."""
        probe = cls(shape, spacing, (0.0, 0.0, 0.0), orientation)
        half = (np.asarray(shape, dtype=np.float64) - 1) / 2 * np.asarray(spacing)
        offset = probe.direction.T @ half[::-1]
        x, y, z = (float(v) for v in np.asarray(centre) - offset)
        return cls(shape, spacing, (x, y, z), orientation, frame_of_reference_uid)

    @classmethod
    def from_direction(
        cls,
        shape: tuple[int, ...],
        spacing: tuple[float, ...],
        origin: tuple[float, ...],
        direction: np.ndarray,
        frame_of_reference_uid: str = "",
    ) -> Grid:
        """A grid from a direction matrix (rows: row cosine, column cosine, normal)."""
        row, col = (tuple(float(v) for v in direction[i]) for i in (0, 1))
        (k, j, i), (dz, dy, dx), (x, y, z) = shape, spacing, origin
        return cls(
            (int(k), int(j), int(i)),
            (float(dz), float(dy), float(dx)),
            (float(x), float(y), float(z)),
            (row, col),  # type: ignore[arg-type]  # two triplets
            frame_of_reference_uid,
        )

    # -- highdicom ------------------------------------------------------------

    @property
    def affine(self) -> np.ndarray:
        """The 4x4 affine taking (k, j, i, 1) voxel indices to patient
        (x, y, z, 1): highdicom's ``VolumeGeometry.affine``."""
        affine = np.eye(4)
        # column n of the 3x3 part: the patient step of one voxel along index axis n
        affine[:3, :3] = np.stack(
            [self.direction[2] * self.spacing[0], self.direction[1] * self.spacing[1],
             self.direction[0] * self.spacing[2]], axis=1,
        )  # fmt: skip
        affine[:3, 3] = self.origin
        return affine

    def to_highdicom(self) -> hd.VolumeGeometry:
        """This grid as a :class:`highdicom.VolumeGeometry` (patient
        coordinates). Raises :class:`GeometryError` when its directions are
        not orthogonal within highdicom's tolerance (1e-4)."""
        try:
            return hd.VolumeGeometry(
                self.affine, self.shape, "PATIENT", self.frame_of_reference_uid or None
            )
        except ValueError as exc:
            raise GeometryError(
                f"grid with ImageOrientationPatient {self.orientation}: {exc}"
            ) from exc

    @classmethod
    def from_highdicom(cls, geometry: hd.VolumeGeometry) -> Grid:
        """A :class:`highdicom.VolumeGeometry` (or ``Volume``) as a grid."""
        k, j, i = geometry.spatial_shape
        slices, rows, columns = geometry.unit_vectors()
        if float(np.cross(columns, rows) @ slices) < 0:
            raise GeometryError(
                "slices descend along the normal (a left-handed volume): flip its first "
                "axis (highdicom: ensure_handedness) before converting"
            )
        return cls.from_direction(
            (k, j, i),
            geometry.spacing,
            geometry.position,
            np.stack([columns, rows, slices]),
            str(geometry.frame_of_reference_uid or ""),
        )

    # -- coordinates -----------------------------------------------------------

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
