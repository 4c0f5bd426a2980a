"""Load one stored DICOM series into a float32 volume with checked geometry.

Two passes over the files. The first reads headers only (``stop_before_pixels``)
and builds one small record per frame: position, orientation, spacing and
rescale. All geometry is checked on these records before any pixel data is
decoded, so a broken series fails fast and cheaply. The second pass decodes
each file's frames straight into a preallocated float32 array at their sorted
slots; no pydicom data set outlives its loop iteration.

Conventions (PS3.3 C.7.6.2.1.1, Image Plane module): the first triplet of
ImageOrientationPatient is the row direction (increasing column index, array
axis x), the second the column direction (increasing row index, axis y), and
PixelSpacing is (row spacing, column spacing) = (y, x). Slices are sorted
ascending along ``normal = cross(row, column)``, so ``array[k, j, i]`` lies at
``origin + i·dx·row + j·dy·column + k·dz·normal`` (:class:`workers.geometry.Grid`,
which also converts to highdicom's ``VolumeGeometry``).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, iter_pixels

from pacsnode.core.errors import GeometryError, PixelDataError, PreprocessError
from pacsnode.workers.geometry import Grid

log = logging.getLogger(__name__)

ORIENTATION_TOLERANCE = 1e-3  # per direction-cosine component
SPACING_TOLERANCE = 1e-3  # relative, PixelSpacing between slices
DUPLICATE_TOLERANCE_MM = 0.01  # slices closer than this along the normal
GAP_TOLERANCE = 0.10  # relative deviation of a slice step from the median step
SHEAR_TOLERANCE_PX = 0.1  # in-plane drift of slice origins, in pixels


@dataclass(frozen=True, eq=False)
class Volume:
    """One series as a regular grid. ``eq=False``: arrays do not compare or hash.

    ``array`` is float32 (z, y, x) in modality units (after Rescale or the
    Modality LUT, PS3.3 C.11.1), read-only when loaded; ``grid`` its geometry
    (shape, spacing (z, y, x) in mm, origin: the patient (x, y, z)
    ImagePositionPatient of ``array[0, 0, 0]``, direction, Frame of Reference
    UID), also reachable as ``spacing``, ``origin``, ``direction`` and
    ``frame_of_reference_uid``. ``sop_instance_uids`` has one entry per
    slice, in slice order; for multi-frame inputs ``frame_numbers`` gives the
    1-based frame of each slice (PS3.3 C.7.6.6) and is empty for
    single-frame series. Raises ``ValueError`` when the grid's shape is not
    the array's.
    """

    array: np.ndarray
    grid: Grid
    series_instance_uid: str
    modality: str
    sop_instance_uids: tuple[str, ...]
    units: str
    frame_numbers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if tuple(self.array.shape) != self.grid.shape:
            raise ValueError(f"array shape {self.array.shape} is not the grid's {self.grid.shape}")

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.grid.spacing

    @property
    def origin(self) -> tuple[float, float, float]:
        return self.grid.origin

    @property
    def direction(self) -> np.ndarray:
        return self.grid.direction

    @property
    def frame_of_reference_uid(self) -> str:
        return self.grid.frame_of_reference_uid

    def to_highdicom(self) -> hd.Volume:
        """This volume as a :class:`highdicom.Volume` (patient coordinates,
        same array). Raises :class:`GeometryError`, naming the series, when
        its directions are not orthogonal within highdicom's tolerance."""
        try:
            geometry = self.grid.to_highdicom()
        except GeometryError as exc:
            raise GeometryError(f"series {self.series_instance_uid}: {exc}") from exc
        return geometry.with_array(self.array)


@dataclass
class _Frame:
    """Geometry and rescale of one 2-D frame, from its header only."""

    file_index: int
    frame_index: int  # 0-based within its file
    sop_instance_uid: str
    position: np.ndarray  # ImagePositionPatient (x, y, z)
    orientation: np.ndarray  # ImageOrientationPatient, 6 values
    pixel_spacing: tuple[float, float]
    label: str  # for messages: "instance <uid>" or "instance <uid> frame <n>"
    slope: float = 1.0
    intercept: float = 0.0
    lut: Dataset | None = None  # only the Modality LUT Sequence, when present


@dataclass
class _File:
    path: Path
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str
    modality: str
    transfer_syntax: str
    rows: int
    columns: int
    multi_frame: bool
    units: str = ""
    fallback_z: float = 1.0  # slice step of a one-slice volume
    frames: list[_Frame] = field(default_factory=list)


# A volume larger than this (float32: 4 GiB) is refused before anything is
# allocated: a header may claim any Rows x Columns x Frames (PS3.3 C.7.6.3
# allows 65535 x 65535 per frame), and the worker must not take the machine down.
MAX_VOXELS = 1 << 30


def _check_declared_size(ds: Dataset, path: Path, where: str) -> None:
    """Native (uncompressed) pixel data must hold what Rows, Columns, Frames,
    Samples and Bits Allocated declare (PS3.5 8.1.1); a claim larger than the
    file is refused here, before any buffer of that size exists."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None or syntax.is_compressed:
        return
    frames = int(ds.get("NumberOfFrames") or 1)
    samples = int(ds.get("SamplesPerPixel") or 1)
    bits = int(ds.get("BitsAllocated") or 16)
    declared = int(ds.Rows) * int(ds.Columns) * frames * samples * bits // 8
    size = path.stat().st_size
    if declared > size:
        raise PixelDataError(
            f"{where} declares {declared} bytes of pixel data ({ds.Rows} x {ds.Columns} x "
            f"{frames} frames, {bits} bits) but its file holds {size} bytes"
        )


def load_series(paths: Sequence[Path]) -> Volume:
    """Read all instances (or multi-frame objects) of one series into a Volume.

    Raises :class:`GeometryError` when the files do not form one regular stack,
    :class:`PixelDataError` when a frame cannot be decoded, and
    :class:`PreprocessError` when a file is not DICOM at all.
    """
    started = time.perf_counter()
    if not paths:
        raise GeometryError("no input files: a volume needs at least one slice")
    files = [_read_header(Path(p), i) for i, p in enumerate(paths)]
    series_uid = _check_same_series(files)
    frames = [f for file in files for f in file.frames]
    multi = any(file.multi_frame for file in files)
    if not frames:
        raise GeometryError(f"series {series_uid}: the inputs hold no frames")
    _check_consistent(files, frames, series_uid)
    order, z_step = _sort_stack(frames, files[0].fallback_z, series_uid)
    rows, columns = files[0].rows, files[0].columns
    if len(frames) * rows * columns > MAX_VOXELS:
        raise GeometryError(
            f"series {series_uid}: {len(frames)} x {rows} x {columns} voxels is more than "
            f"the node's limit of {MAX_VOXELS}"
        )
    frames = [frames[k] for k in order]
    array = np.empty((len(frames), rows, columns), dtype=np.float32)
    slot = {(f.file_index, f.frame_index): k for k, f in enumerate(frames)}
    for file in files:
        _decode_into(array, file, slot)
    array.flags.writeable = False
    row, col = frames[0].orientation[:3], frames[0].orientation[3:]
    (dy, dx), (x0, y0, z0) = frames[0].pixel_spacing, map(float, frames[0].position)
    grid = Grid(
        (len(frames), rows, columns),
        (z_step, dy, dx),
        (x0, y0, z0),
        (tuple(map(float, row)), tuple(map(float, col))),  # type: ignore[arg-type]
        files[0].frame_of_reference_uid,
    )
    volume = Volume(
        array=array,
        grid=grid,
        series_instance_uid=series_uid,
        modality=files[0].modality,
        sop_instance_uids=tuple(f.sop_instance_uid for f in frames),
        units=files[0].units,
        frame_numbers=tuple(f.frame_index + 1 for f in frames) if multi else (),
    )
    elapsed = time.perf_counter() - started
    log.debug("loaded series %s: shape %s in %.3f s", series_uid, array.shape, elapsed)
    return volume


# -- pass 1: headers ---------------------------------------------------------

# Functional groups of PS3.3 C.7.6.16.2 that carry a frame's geometry and
# rescale; the last one is optional (identity when absent).
_GROUPS = (
    "PlanePositionSequence",
    "PlaneOrientationSequence",
    "PixelMeasuresSequence",
    "PixelValueTransformationSequence",
)


def _read_header(path: Path, file_index: int) -> _File:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise PreprocessError(f"{path.name} is not a readable DICOM file: {exc}") from exc
    try:
        return _header(ds, path, file_index)
    except PreprocessError:
        raise
    except Exception as exc:
        # Elements decode lazily: a malformed value (a list where one number
        # belongs, an unknown VR, a short binary value) surfaces here. Found by
        # fuzzing (tests/test_hostile.py); the job records this as its error.
        raise GeometryError(
            f"{path.name}: malformed image attributes ({type(exc).__name__})"
        ) from exc


def _header(ds: Dataset, path: Path, file_index: int) -> _File:
    sop, series = str(ds.get("SOPInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))
    where = f"series {series}: instance {sop}"
    if int(ds.get("SamplesPerPixel") or 1) != 1:
        raise GeometryError(f"{where} is not monochrome (SamplesPerPixel {ds.SamplesPerPixel})")
    if "Rows" not in ds or "Columns" not in ds:
        raise GeometryError(f"{where} lacks Rows or Columns")
    try:
        _check_declared_size(ds, path, where)
        n_frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError, OverflowError) as exc:
        raise GeometryError(f"{where}: invalid image dimensions ({type(exc).__name__})") from exc
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared = ds.get("SharedFunctionalGroupsSequence") or []
    functional = bool(per_frame or shared)
    if n_frames > 1 and not functional:
        # Plain multi-frame objects (NM, US, XA, RT Dose, ...) carry at most one
        # ImagePositionPatient for all frames: no position per frame.
        has = "one" if "ImagePositionPatient" in ds else "no"
        raise GeometryError(
            f"{where} is a multi-frame {ds.get('Modality', '')} object ({n_frames} frames) "
            f"with {has} ImagePositionPatient and no Plane Position functional groups "
            "(PS3.3 C.7.6.16.2.3), so its frames have no positions in patient space"
        )
    file = _File(
        path=path,
        sop_instance_uid=sop,
        series_instance_uid=series,
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
        modality=str(ds.get("Modality", "")),
        transfer_syntax=_transfer_syntax_name(ds),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        multi_frame=functional,
    )
    for i in range(n_frames):
        label = f"instance {sop} frame {i + 1}" if functional else f"instance {sop}"
        name = f"series {series}: {label}"
        if functional:  # enhanced multi-frame: per-frame item wins over shared
            groups = [_group(per_frame, shared, i, keyword, name) for keyword in _GROUPS]
        else:  # single frame: the Image Plane and Modality LUT modules
            groups = [ds] * len(_GROUPS)
        position, orientation, measures, transform = groups
        file.frames.append(
            _Frame(
                file_index=file_index,
                frame_index=i,
                sop_instance_uid=sop,
                position=_floats(position, "ImagePositionPatient", 3, name),
                orientation=_floats(orientation, "ImageOrientationPatient", 6, name),
                pixel_spacing=_pixel_spacing(_floats(measures, "PixelSpacing", 2, name)),
                label=label,
                slope=float(transform.get("RescaleSlope") or 1.0),
                intercept=float(transform.get("RescaleIntercept") or 0.0),
                lut=None if functional else _modality_lut(ds),
            )
        )
        if i == 0:
            file.fallback_z = abs(
                float(measures.get("SpacingBetweenSlices") or measures.get("SliceThickness") or 1)
            )
            file.units = _units(transform, file.modality, str(ds.get("Units", "")))
    return file


def _group(
    per_frame: Sequence[Dataset], shared: Sequence[Dataset], index: int, keyword: str, name: str
) -> Dataset:
    """The item of one functional group for one frame (PS3.3 C.7.6.16)."""
    for items in (per_frame[index : index + 1], shared[:1]):
        if items and items[0].get(keyword):
            item: Dataset = items[0][keyword].value[0]
            return item
    if keyword == "PixelValueTransformationSequence":
        return Dataset()  # optional, e.g. in Enhanced MR: identity rescale
    raise GeometryError(f"{name} lacks the {keyword} functional group")


def _floats(ds: Dataset, keyword: str, count: int, where: str) -> np.ndarray:
    value: Any = ds.get(keyword)
    if value is None or value == "":
        raise GeometryError(f"{where} lacks {keyword}")
    try:
        values = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise GeometryError(f"{where} has a malformed {keyword}") from exc
    if values.shape != (count,) or not np.all(np.isfinite(values)):
        raise GeometryError(f"{where} has {keyword} with {values.size} values, need {count}")
    return values


def _pixel_spacing(values: np.ndarray) -> tuple[float, float]:
    return float(values[0]), float(values[1])


def _modality_lut(ds: Dataset) -> Dataset | None:
    """Keep only what apply_modality_lut needs, not the whole header."""
    if not ds.get("ModalityLUTSequence"):
        return None
    lut = Dataset()
    lut.ModalityLUTSequence = ds.ModalityLUTSequence
    lut.file_meta = ds.file_meta
    return lut


def _units(transform: Dataset, modality: str, pet_units: str) -> str:
    """Units of the rescaled values: RescaleType (PS3.3 C.11.1.1.2), HU for CT
    (C.8.2.1), the PET Series Units (C.8.9.1.1.3) for PT, else unknown ("")."""
    rescale_type = str(transform.get("RescaleType", "")).strip()
    if rescale_type and rescale_type != "US":  # "US" means unspecified
        return rescale_type
    if modality == "CT":
        return "HU"
    if modality == "PT":
        return pet_units.strip()
    return ""


def _transfer_syntax_name(ds: Dataset) -> str:
    uid = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    return f"{uid.name} ({uid})" if uid else "unknown transfer syntax"


# -- geometry checks -----------------------------------------------------------


def _check_same_series(files: list[_File]) -> str:
    series = Counter(f.series_instance_uid for f in files)
    if len(series) > 1:
        listed = ", ".join(f"{uid or '(none)'} ({n} files)" for uid, n in series.most_common())
        raise GeometryError(f"inputs mix {len(series)} series: {listed}; a volume is one series")
    uid = files[0].series_instance_uid
    for keyword, attr in (
        ("StudyInstanceUID", "study_instance_uid"),
        ("FrameOfReferenceUID", "frame_of_reference_uid"),
    ):
        values = {getattr(f, attr) for f in files}
        if len(values) > 1:
            raise GeometryError(
                f"series {uid}: instances carry {len(values)} different {keyword}s "
                f"({', '.join(sorted(v or '(none)' for v in values))})"
            )
    return uid


def _check_consistent(files: list[_File], frames: list[_Frame], uid: str) -> None:
    sizes = Counter((f.rows, f.columns) for f in files)
    if len(sizes) > 1:
        odd = next(f for f in files if (f.rows, f.columns) != sizes.most_common(1)[0][0])
        raise GeometryError(
            f"series {uid}: inconsistent Rows/Columns: "
            + ", ".join(f"{r}x{c} in {n} files" for (r, c), n in sizes.most_common())
            + f" (e.g. instance {odd.sop_instance_uid})"
        )
    first = frames[0]
    row, col = first.orientation[:3], first.orientation[3:]
    if (
        abs(np.linalg.norm(row) - 1) > ORIENTATION_TOLERANCE
        or abs(np.linalg.norm(col) - 1) > ORIENTATION_TOLERANCE
        or abs(float(row @ col)) > ORIENTATION_TOLERANCE
    ):
        raise GeometryError(
            f"series {uid}: ImageOrientationPatient {_fmt(first.orientation)} of "
            f"{first.label} is not two orthogonal unit vectors"
        )
    for f in frames[1:]:
        if np.max(np.abs(f.orientation - first.orientation)) > ORIENTATION_TOLERANCE:
            raise GeometryError(
                f"series {uid}: inconsistent ImageOrientationPatient: {_fmt(first.orientation)} "
                f"in {first.label} but {_fmt(f.orientation)} in {f.label} "
                f"(tolerance {ORIENTATION_TOLERANCE}); localizers or reformats mixed in?"
            )
        if not np.allclose(f.pixel_spacing, first.pixel_spacing, rtol=SPACING_TOLERANCE, atol=0):
            raise GeometryError(
                f"series {uid}: inconsistent PixelSpacing: {_fmt(first.pixel_spacing)} mm in "
                f"{first.label} but {_fmt(f.pixel_spacing)} mm in {f.label}"
            )


def _sort_stack(frames: list[_Frame], fallback_z: float, uid: str) -> tuple[np.ndarray, float]:
    """Sort along the slice normal; reject duplicates, shear and gaps.

    Returns the order and the slice step in mm (the median step; for one slice
    SpacingBetweenSlices or SliceThickness, else 1 mm).
    """
    row, col = frames[0].orientation[:3], frames[0].orientation[3:]
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    positions = np.stack([f.position for f in frames])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    if len(frames) == 1:
        return order, fallback_z
    along_sorted = along[order]
    steps = np.diff(along_sorted)
    for k in np.flatnonzero(steps < DUPLICATE_TOLERANCE_MM)[:1]:
        a, b = frames[order[k]], frames[order[k + 1]]
        raise GeometryError(
            f"series {uid}: duplicate slice position {along_sorted[k]:.3f} mm along the "
            f"normal: {a.label} and {b.label}"
        )
    # In-plane drift of each slice origin away from the line through the first
    # one along the normal: a tilted gantry or a sheared stack (PS3.3
    # C.7.6.2.1.1 allows it, but it is not a regular grid).
    relative = positions[order] - positions[order[0]]
    drift = np.linalg.norm(relative - np.outer(relative @ normal, normal), axis=1)
    limit = SHEAR_TOLERANCE_PX * min(frames[0].pixel_spacing)
    if drift.max() > limit:
        k = int(np.argmax(drift))
        angle = math.degrees(math.atan2(float(drift[k]), float(along_sorted[k] - along_sorted[0])))
        raise GeometryError(
            f"series {uid}: slice positions are not along the slice normal (gantry tilt or "
            f"sheared stack): {frames[order[k]].label} is offset {drift[k]:.3f} mm "
            f"in-plane at {along_sorted[k] - along_sorted[0]:.3f} mm along the normal "
            f"(about {angle:.2f} degrees; tolerance {limit:.3f} mm)"
        )
    step = float(np.median(steps))
    bad = np.flatnonzero(np.abs(steps - step) > GAP_TOLERANCE * step)
    if bad.size:
        where = "; ".join(
            f"{steps[k]:.3f} mm between {along_sorted[k]:.3f} and {along_sorted[k + 1]:.3f} mm "
            f"(after {frames[order[k]].label})"
            for k in bad[:3]
        )
        more = f" and {bad.size - 3} more" if bad.size > 3 else ""
        raise GeometryError(
            f"series {uid}: irregular slice spacing (missing slices?): median step "
            f"{step:.3f} mm, but {where}{more}"
        )
    return order, step


def _fmt(values: Any) -> str:
    return "[" + ", ".join(f"{float(v):.4g}" for v in values) + "]"


# -- pass 2: pixel data ------------------------------------------------------------


def _decode_into(out: np.ndarray, file: _File, slot: dict[tuple[int, int], int]) -> None:
    """Decode one file's frames into their sorted slots, rescaling in float32.

    The linear case of PS3.3 C.11.1 is done here in float32 (pydicom's
    ``apply_rescale`` returns float64, doubling memory traffic); a Modality LUT
    Sequence goes through pydicom's ``apply_modality_lut``.
    """
    expected = len(file.frames)
    decoded = 0
    try:
        for frame_index, pixels in enumerate(iter_pixels(file.path)):
            if frame_index >= expected:
                break
            if pixels.shape != out.shape[1:]:
                raise PixelDataError(
                    f"series {file.series_instance_uid}: instance {file.sop_instance_uid} "
                    f"decoded to shape {pixels.shape}, expected {out.shape[1:]}"
                )
            frame = file.frames[frame_index]
            target = out[slot[(frame.file_index, frame_index)]]
            if frame.lut is not None:
                target[...] = apply_modality_lut(pixels, frame.lut)
            else:
                np.multiply(pixels, np.float32(frame.slope), out=target, casting="unsafe")
                target += np.float32(frame.intercept)
            decoded += 1
    except PixelDataError:
        raise
    except Exception as exc:  # any decoder failure: the plugin's own exception type
        raise PixelDataError(
            f"series {file.series_instance_uid}: cannot decode the pixel data of instance "
            f"{file.sop_instance_uid} ({file.transfer_syntax}): "
            f"{type(exc).__name__}: {str(exc)[:200]}"
        ) from exc
    if decoded < expected:
        raise PixelDataError(
            f"series {file.series_instance_uid}: instance {file.sop_instance_uid} "
            f"({file.transfer_syntax}) holds {decoded} decodable frames, expected {expected}"
        )
