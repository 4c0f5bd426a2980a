"""Synthetic CT series with real geometry, written as DICOM Part 10 files.

Seeded and reproducible. This is the start of the phantom generator: tests
and benchmarks use it to send realistic studies without any download.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

# UIDs under the pydicom root, derived from the seed so runs are reproducible.
_PREFIX = "1.2.826.0.1.3680043.8.498."


@dataclass(frozen=True)
class SeriesSpec:
    slices: int = 20
    rows: int = 64
    columns: int = 64
    pixel_spacing: float = 0.7
    slice_thickness: float = 1.25
    seed: int = 0
    patient_id: str = "PHANTOM-0001"
    patient_name: str = "Phantom^Demo"
    accession_number: str = "ACC0001"


def _uid(seed: int, *parts: object) -> UID:
    return generate_uid(_PREFIX, entropy_srcs=[str(seed), *map(str, parts)])


def ct_phantom_volume(spec: SeriesSpec) -> np.ndarray:
    """A water cylinder with a bone rim and a few spherical lesions, in HU."""
    rng = np.random.default_rng(spec.seed)
    z, y, x = np.mgrid[0 : spec.slices, 0 : spec.rows, 0 : spec.columns].astype(np.float32)
    cy, cx = (spec.rows - 1) / 2, (spec.columns - 1) / 2
    r = np.hypot((y - cy) / spec.rows, (x - cx) / spec.columns)
    hu = np.full(z.shape, -1000.0, dtype=np.float32)
    hu[r < 0.45] = 40.0
    hu[(r >= 0.42) & (r < 0.45)] = 700.0
    for _ in range(3):
        lz = rng.uniform(0.2, 0.8) * spec.slices
        ly, lx = rng.uniform(0.35, 0.65, size=2) * (spec.rows, spec.columns)
        radius = rng.uniform(0.04, 0.09) * spec.rows
        d = np.sqrt(
            ((z - lz) * spec.slice_thickness / spec.pixel_spacing) ** 2
            + (y - ly) ** 2
            + (x - lx) ** 2
        )
        hu[d < radius] = rng.uniform(60, 120)
    hu += np.asarray(rng.normal(0, 8, size=hu.shape), dtype=np.float32)
    return hu


def ct_series_datasets(spec: SeriesSpec) -> list[Dataset]:
    """One CT Image Storage data set per slice, axial, head first supine."""
    study_uid = _uid(spec.seed, "study")
    series_uid = _uid(spec.seed, "series")
    frame_uid = _uid(spec.seed, "frame")
    hu = ct_phantom_volume(spec)
    slope, intercept = 1.0, -1024.0
    stored = np.clip(np.rint((hu - intercept) / slope), 0, 4095).astype(np.uint16)
    datasets = []
    for k in range(spec.slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = _uid(spec.seed, "instance", k)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyDate = "20260101"
        ds.SeriesDate = "20260101"
        ds.StudyTime = "101500"
        ds.AccessionNumber = spec.accession_number
        ds.Modality = "CT"
        ds.Manufacturer = "pacsnode phantom"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "Phantom CT (synthetic, for testing)"
        ds.SeriesDescription = "Axial 1.25 mm"
        ds.PatientName = spec.patient_name
        ds.PatientID = spec.patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = spec.slice_thickness
        ds.KVP = 120
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [
            -spec.columns * spec.pixel_spacing / 2,
            -spec.rows * spec.pixel_spacing / 2,
            -k * spec.slice_thickness,
        ]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = -k * spec.slice_thickness
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = spec.rows
        ds.Columns = spec.columns
        ds.PixelSpacing = [spec.pixel_spacing, spec.pixel_spacing]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = intercept
        ds.RescaleSlope = slope
        ds.RescaleType = "HU"
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        ds.PixelData = stored[k].tobytes()
        datasets.append(ds)
    return datasets


def write_ct_series(directory: Path, spec: SeriesSpec) -> list[Path]:
    """Write the series as ``<directory>/CT<nnnn>.dcm``; return the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, ds in enumerate(ct_series_datasets(spec)):
        path = directory / f"CT{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
