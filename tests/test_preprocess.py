"""Series → volume → model input: geometry checks, decoding, resampling, cache.

Every series is written to disk as real DICOM files (variants of the phantom
made by editing its data sets before saving) and read back by load_series.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydantic import ValidationError
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels.encoders import JPEGLSLosslessEncoder
from pydicom.sequence import Sequence
from pydicom.uid import (
    EnhancedCTImageStorage,
    JPEG2000Lossless,
    JPEGLSLossless,
    NuclearMedicineImageStorage,
    RLELossless,
    generate_uid,
)

from pacsnode.core.errors import GeometryError, PixelDataError, PreprocessError
from pacsnode.lab.phantom import SeriesSpec, ct_phantom_volume, ct_series_datasets
from pacsnode.workers.preprocess import (
    PreprocessCache,
    PreprocessSpec,
    _write_atomically,
    output_geometry,
    preprocess,
    restore,
)
from pacsnode.workers.volume import Volume, load_series

SPEC = SeriesSpec(slices=24, rows=64, columns=64)
SMALL = SeriesSpec(slices=12, rows=16, columns=16)
PHI = ("Phantom^Demo", "PHANTOM-0001")
TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"  # bundled, no download


def expected_hu(spec: SeriesSpec) -> np.ndarray:
    """The phantom's HU as stored (rint, 12-bit clip), in ascending-z order."""
    hu = np.clip(np.rint(ct_phantom_volume(spec) + 1024), 0, 4095) - 1024
    return hu[::-1].astype(np.float32)  # file k lies at z = -k * thickness


def write(directory: Path, datasets: list[Dataset], shuffle: bool = False) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    order = list(range(len(datasets)))
    if shuffle:
        random.Random(7).shuffle(order)
    paths = []
    for name, k in enumerate(order):  # file names say nothing about position
        path = directory / f"IM{name:04d}.dcm"
        datasets[k].save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def geometry_error(tmp_path: Path, datasets: list[Dataset]) -> str:
    with pytest.raises(GeometryError) as info:
        load_series(write(tmp_path / "series", datasets))
    message = str(info.value)
    assert datasets[0].SeriesInstanceUID in message
    assert not any(phi in message for phi in PHI)
    return message


# -- geometry -------------------------------------------------------------------


def test_load_axial_series_geometry_and_exact_hu(tmp_path: Path) -> None:
    datasets = ct_series_datasets(SPEC)
    volume = load_series(write(tmp_path, datasets))
    assert volume.array.shape == (24, 64, 64) and volume.array.dtype == np.float32
    assert volume.spacing == pytest.approx((1.25, 0.7, 0.7))
    assert volume.origin == pytest.approx((-22.4, -22.4, -23 * 1.25))
    np.testing.assert_allclose(volume.direction, np.eye(3))
    assert (volume.modality, volume.units) == ("CT", "HU")
    assert volume.series_instance_uid == datasets[0].SeriesInstanceUID
    assert volume.frame_of_reference_uid == datasets[0].FrameOfReferenceUID
    assert volume.sop_instance_uids == tuple(ds.SOPInstanceUID for ds in datasets[::-1])
    assert volume.frame_numbers == ()
    np.testing.assert_array_equal(volume.array, expected_hu(SPEC))
    assert not volume.array.flags.writeable


def test_sorts_by_position_not_file_order_or_instance_number(tmp_path: Path) -> None:
    datasets = ct_series_datasets(SPEC)
    for k, ds in enumerate(datasets):
        ds.InstanceNumber = (k * 7) % len(datasets) + 1  # misleading
    paths = write(tmp_path, datasets, shuffle=True)
    random.Random(3).shuffle(paths)
    volume = load_series(paths)
    np.testing.assert_array_equal(volume.array, expected_hu(SPEC))
    assert volume.sop_instance_uids == tuple(ds.SOPInstanceUID for ds in datasets[::-1])


def test_coronal_stack_direction_and_origin(tmp_path: Path) -> None:
    datasets = ct_series_datasets(SMALL)
    for k, ds in enumerate(datasets):  # rows run feet-ward: normal = row x column = +y
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        ds.ImagePositionPatient = [-5.0, 10.0 + 2.0 * k, 30.0]
    volume = load_series(write(tmp_path, datasets, shuffle=True))
    np.testing.assert_allclose(volume.direction, [[1, 0, 0], [0, 0, -1], [0, 1, 0]])
    assert volume.origin == pytest.approx((-5.0, 10.0, 30.0))
    assert volume.spacing == pytest.approx((2.0, 0.7, 0.7))
    np.testing.assert_array_equal(volume.array, expected_hu(SMALL)[::-1])


# -- compressed transfer syntaxes -----------------------------------------------------


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless], ids=str)
def test_compressed_series_decode_to_the_same_values(tmp_path: Path, syntax: str) -> None:
    if syntax == JPEGLSLossless and not JPEGLSLosslessEncoder.is_available:
        pytest.skip("no JPEG-LS encoder here (pyjpegls); decoding is covered by pydicom's file")
    spec = SeriesSpec(slices=8, rows=64, columns=64)  # OpenJPEG refuses 16x16 tiles
    datasets = ct_series_datasets(spec)
    for ds in datasets:
        ds.compress(syntax)
    volume = load_series(write(tmp_path, datasets))
    np.testing.assert_array_equal(volume.array, expected_hu(spec))


@pytest.mark.parametrize(
    "name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"]
)
def test_pydicom_compressed_files_match_their_uncompressed_twin(name: str) -> None:
    reference = load_series([TEST_FILES / "MR_small.dcm"])
    volume = load_series([TEST_FILES / name])
    assert volume.array.shape == (1, 64, 64) and volume.modality == "MR"
    assert volume.spacing[1:] == pytest.approx((0.3125, 0.3125))
    np.testing.assert_array_equal(volume.array, reference.array)


# -- geometry errors ------------------------------------------------------------------


def test_mixed_series(tmp_path: Path) -> None:
    datasets = ct_series_datasets(SMALL)
    datasets[3].SeriesInstanceUID = generate_uid()
    assert "mix 2 series" in geometry_error(tmp_path, datasets)


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "FrameOfReferenceUID"])
def test_mixed_study_or_frame_of_reference(tmp_path: Path, keyword: str) -> None:
    datasets = ct_series_datasets(SMALL)
    setattr(datasets[3], keyword, generate_uid())
    assert f"different {keyword}" in geometry_error(tmp_path, datasets)


def test_inconsistent_orientation(tmp_path: Path) -> None:
    datasets = ct_series_datasets(SMALL)
    angle = math.radians(1.0)
    datasets[4].ImageOrientationPatient = [1, 0, 0, 0, math.cos(angle), math.sin(angle)]
    message = geometry_error(tmp_path, datasets)
    assert "inconsistent ImageOrientationPatient" in message
    assert datasets[4].SOPInstanceUID in message


def test_inconsistent_pixel_spacing(tmp_path: Path) -> None:
    datasets = ct_series_datasets(SMALL)
    datasets[2].PixelSpacing = [0.8, 0.8]
    assert "inconsistent PixelSpacing" in geometry_error(tmp_path, datasets)


def test_inconsistent_rows_and_columns(tmp_path: Path) -> None:
    datasets = ct_series_datasets(SMALL)
    datasets[5].Rows = datasets[5].Columns = 8
    datasets[5].PixelData = bytes(8 * 8 * 2)
    message = geometry_error(tmp_path, datasets)
    assert "inconsistent Rows/Columns" in message and "8x8 in 1 files" in message


@pytest.mark.parametrize(
    "keyword", ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"]
)
def test_missing_geometry_attribute(tmp_path: Path, keyword: str) -> None:
    datasets = ct_series_datasets(SMALL)
    delattr(datasets[3], keyword)
    message = geometry_error(tmp_path, datasets)
    assert f"lacks {keyword}" in message and datasets[3].SOPInstanceUID in message


def test_duplicate_slice_position(tmp_path: Path) -> None:
    datasets = ct_series_datasets(SMALL)
    datasets[6].ImagePositionPatient = datasets[5].ImagePositionPatient
    message = geometry_error(tmp_path, datasets)
    assert "duplicate slice position -6.250 mm" in message
    assert datasets[5].SOPInstanceUID in message and datasets[6].SOPInstanceUID in message


def test_missing_slice_is_reported_where(tmp_path: Path) -> None:
    datasets = ct_series_datasets(SMALL)
    del datasets[4]  # the slice at z = -5.0
    message = geometry_error(tmp_path, datasets)
    assert "irregular slice spacing (missing slices?)" in message
    assert "median step 1.250 mm" in message and "2.500 mm between -6.250 and -3.750" in message


def test_gantry_tilt(tmp_path: Path) -> None:
    datasets = ct_series_datasets(SMALL)
    shift = SMALL.slice_thickness * math.tan(math.radians(5))
    for k, ds in enumerate(datasets):
        x, y, z = ds.ImagePositionPatient
        ds.ImagePositionPatient = [x, y + k * shift, z]
    message = geometry_error(tmp_path, datasets)
    assert "gantry tilt or sheared stack" in message and "about 5.00 degrees" in message


def test_no_files() -> None:
    with pytest.raises(GeometryError, match="no input files"):
        load_series([])


def test_not_dicom(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not DICOM")
    with pytest.raises(PreprocessError, match=r"notes\.txt is not a readable DICOM file"):
        load_series([path])


def test_undecodable_pixel_data_names_instance_and_transfer_syntax(tmp_path: Path) -> None:
    datasets = ct_series_datasets(SMALL)
    for ds in datasets:
        ds.compress(RLELossless)
    datasets[7].PixelData = encapsulate([b"\x01\x00\x00\x00" + bytes(60)])  # bad RLE header
    with pytest.raises(PixelDataError) as info:
        load_series(write(tmp_path, datasets))
    message = str(info.value)
    assert isinstance(info.value, GeometryError)
    assert "cannot decode" in message and datasets[7].SOPInstanceUID in message
    assert "RLE Lossless" in message and datasets[0].SeriesInstanceUID in message
    assert not any(phi in message for phi in PHI)


# -- multi-frame --------------------------------------------------------------------


def enhanced_ct(spec: SeriesSpec, order: list[int]) -> Dataset:
    """One Enhanced CT object from the phantom slices, frames in ``order``.

    Geometry lives in functional groups (PS3.3 C.7.6.16): orientation, pixel
    measures and a wrong rescale in the shared item, positions and the right
    rescale per frame (the per-frame item must win).
    """
    slices = ct_series_datasets(spec)
    first = slices[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = first.file_meta.TransferSyntaxUID
    for keyword in (
        "PatientName", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
        "FrameOfReferenceUID", "SamplesPerPixel", "PhotometricInterpretation", "Rows",
        "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    ):  # fmt: skip
        setattr(ds, keyword, getattr(first, keyword))
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.NumberOfFrames = len(order)
    shared = Dataset()
    shared.PlaneOrientationSequence = [Dataset()]
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = first.ImageOrientationPatient
    shared.PixelMeasuresSequence = [Dataset()]
    shared.PixelMeasuresSequence[0].PixelSpacing = first.PixelSpacing
    shared.PixelMeasuresSequence[0].SliceThickness = first.SliceThickness
    shared.PixelValueTransformationSequence = [_rescale(0.0)]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for k in order:
        item = Dataset()
        item.PlanePositionSequence = [Dataset()]
        item.PlanePositionSequence[0].ImagePositionPatient = slices[k].ImagePositionPatient
        item.PixelValueTransformationSequence = [_rescale(-1024.0)]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = b"".join(slices[k].PixelData for k in order)
    return ds


def _rescale(intercept: float) -> Dataset:
    item = Dataset()
    item.RescaleIntercept, item.RescaleSlope, item.RescaleType = intercept, 1.0, "HU"
    return item


def test_enhanced_multi_frame_from_functional_groups(tmp_path: Path) -> None:
    order = list(range(SMALL.slices))
    random.Random(1).shuffle(order)
    ds = enhanced_ct(SMALL, order)
    path = tmp_path / "enhanced.dcm"
    ds.save_as(path, enforce_file_format=True)
    volume = load_series([path])
    assert volume.array.shape == (12, 16, 16)
    assert volume.spacing == pytest.approx((1.25, 0.7, 0.7))
    assert volume.origin == pytest.approx((-5.6, -5.6, -11 * 1.25))
    assert volume.units == "HU" and set(volume.sop_instance_uids) == {ds.SOPInstanceUID}
    # slice k of the volume is file slice n-1-k, stored as frame order.index(n-1-k)
    n = SMALL.slices
    assert volume.frame_numbers == tuple(order.index(n - 1 - k) + 1 for k in range(n))
    np.testing.assert_array_equal(volume.array, expected_hu(SMALL))


def test_enhanced_frame_without_position(tmp_path: Path) -> None:
    ds = enhanced_ct(SMALL, list(range(SMALL.slices)))
    del ds.PerFrameFunctionalGroupsSequence[3].PlanePositionSequence
    message = geometry_error(tmp_path, [ds])
    assert "frame 4 lacks the PlanePositionSequence functional group" in message


def test_segmentation_file_from_another_toolkit() -> None:
    """pydicom's liver_1frame.dcm: a real SEG with shared and per-frame groups."""
    volume = load_series([TEST_FILES / "liver_1frame.dcm"])
    assert volume.array.shape == (1, 512, 512) and volume.modality == "SEG"
    assert volume.spacing == pytest.approx((1.0, 0.810547, 0.810547))
    assert volume.origin == pytest.approx((-235.2, -226.8, -128.69))
    assert volume.frame_numbers == (1,)


def test_plain_multi_frame_without_positions(tmp_path: Path) -> None:
    slices = ct_series_datasets(SMALL)
    ds = slices[0]
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = NuclearMedicineImageStorage
    ds.Modality = "NM"
    ds.NumberOfFrames = 3
    ds.PixelData = b"".join(s.PixelData for s in slices[:3])
    del ds.ImagePositionPatient
    message = geometry_error(tmp_path, [ds])
    assert "multi-frame NM object (3 frames) with no ImagePositionPatient" in message


# -- preprocess -----------------------------------------------------------------------


def cube_series(tmp_path: Path) -> tuple[Volume, np.ndarray]:
    """A bright 6 mm cube at a known place; returns the volume and the cube's
    centroid (patient x, y, z) computed from the input voxel centres."""
    datasets = ct_series_datasets(SPEC)
    centre, half = np.array([3.0, -5.0, -10.0]), 3.0
    inside_points = []
    for ds in datasets:
        x0, y0, z = (float(v) for v in ds.ImagePositionPatient)
        ys, xs = np.mgrid[0 : SPEC.rows, 0 : SPEC.columns] * SPEC.pixel_spacing
        xs, ys = xs + x0, ys + y0
        inside = (
            (np.abs(xs - centre[0]) <= half)
            & (np.abs(ys - centre[1]) <= half)
            & (abs(z - centre[2]) <= half)
        )
        stored = np.where(inside, 2024, 24).astype(np.uint16)  # 1000 HU in -1000 HU
        ds.PixelData = stored.tobytes()
        inside_points += [(x, y, z) for x, y in zip(xs[inside], ys[inside], strict=True)]
    volume = load_series(write(tmp_path, datasets))
    return volume, np.mean(inside_points, axis=0)


@pytest.mark.parametrize(
    ("spec", "shape"),
    [
        (PreprocessSpec(target_spacing=(1.0, 1.0, 1.0)), (30, 45, 45)),
        (PreprocessSpec(target_spacing=(2.5, 0.5, 0.5)), (12, 90, 90)),
        (PreprocessSpec(target_spacing=(1.0, 1.0, 1.0), target_shape=(40, 32, 50)), (40, 32, 50)),
        (PreprocessSpec(target_shape=(12, 32, 48)), (12, 32, 48)),
        (PreprocessSpec(target_spacing=(1.25, 1.4, 1.4)), (24, 32, 32)),
    ],
    ids=["iso-1mm", "thick-fine", "crop-pad", "resize", "keep-z"],
)
def test_resampling_keeps_the_marker_in_place(
    tmp_path: Path, spec: PreprocessSpec, shape: tuple[int, int, int]
) -> None:
    volume, centroid = cube_series(tmp_path)
    out = preprocess(volume, spec)
    geometry = output_geometry(volume, spec)
    assert out.shape == geometry.shape == shape and out.dtype == np.float32
    weight = np.clip(out + 1000.0, 0, None)  # background -1000 HU weighs nothing
    nonzero = np.nonzero(weight)
    index_zyx = np.array(nonzero) @ weight[nonzero] / weight.sum()
    found = (
        np.asarray(geometry.origin)
        + volume.direction.T @ (index_zyx * np.asarray(geometry.spacing))[::-1]
    )
    # within half an output voxel, and in fact much closer (linear interpolation)
    tolerance = np.minimum(np.asarray(geometry.spacing)[::-1] / 2, 0.2)
    assert np.all(np.abs(found - centroid) <= tolerance), (found, centroid)


@pytest.mark.parametrize(
    "spec",
    [
        PreprocessSpec(target_spacing=(1.0, 1.0, 1.0)),
        PreprocessSpec(target_spacing=(1.0, 1.0, 1.0), target_shape=(40, 32, 50)),
        PreprocessSpec(target_shape=(12, 32, 48)),
    ],
    ids=["iso-1mm", "crop-pad", "resize"],
)
def test_restore_maps_a_mask_back_onto_the_source_voxels(
    tmp_path: Path, spec: PreprocessSpec
) -> None:
    """A mask made on the model's grid, mapped back, covers the source cube."""
    volume, _ = cube_series(tmp_path)
    mask = (preprocess(volume, spec) > 0).astype(np.float32)  # the cube at 1000 HU
    back = restore(mask, volume, spec) >= 0.5
    truth = volume.array > 0
    assert back.shape == volume.array.shape
    dice = 2 * np.logical_and(back, truth).sum() / (back.sum() + truth.sum())
    assert dice > 0.8, dice
    with pytest.raises(PreprocessError, match="not the preprocessed shape"):
        restore(mask[:-1], volume, spec)


def test_window_maps_to_unit_range(tmp_path: Path) -> None:
    volume = load_series(write(tmp_path, ct_series_datasets(SPEC)))
    out = preprocess(volume, PreprocessSpec(window=(40, 400), normalise="window"))
    assert out.min() == 0.0 and out.max() == 1.0  # air and bone clip
    hu = expected_hu(SPEC)
    probe = (hu > -160) & (hu < 240)  # inside the window: linear
    np.testing.assert_allclose(out[probe], (hu[probe] + 160) / 400, atol=1e-6)


@pytest.mark.parametrize("normalise", ["minmax", "percentile"])
def test_minmax_and_percentile_map_to_unit_range(tmp_path: Path, normalise: str) -> None:
    volume = load_series(write(tmp_path, ct_series_datasets(SPEC)))
    out = preprocess(volume, PreprocessSpec.model_validate({"normalise": normalise}))
    assert out.min() == 0.0 and out.max() == pytest.approx(1.0)
    if normalise == "percentile":  # 0.5 % of voxels clip at each end
        assert 0.002 < np.mean(out == 0.0) < 0.5 and np.mean(out >= 1.0 - 1e-6) > 0.002


@pytest.mark.parametrize("threshold", [None, -500.0])
def test_zscore(tmp_path: Path, threshold: float | None) -> None:
    volume = load_series(write(tmp_path, ct_series_datasets(SPEC)))
    out = preprocess(volume, PreprocessSpec(normalise="zscore", zscore_threshold=threshold))
    sample = out if threshold is None else out[volume.array > threshold]
    assert abs(float(sample.mean())) < 1e-4 and float(sample.std()) == pytest.approx(1, abs=1e-4)


@pytest.mark.parametrize("denoise", ["mean", "median", "gaussian"])
def test_denoise_reduces_noise(tmp_path: Path, denoise: str) -> None:
    datasets = ct_series_datasets(SMALL)
    rng = np.random.default_rng(5)
    for ds in datasets:  # water with noise of std 20 HU
        ds.PixelData = (1064 + np.rint(rng.normal(0, 20, (16, 16)))).astype(np.uint16).tobytes()
    volume = load_series(write(tmp_path, datasets))
    out = preprocess(volume, PreprocessSpec.model_validate({"denoise": denoise}))
    assert float(out.std()) < 0.5 * float(volume.array.std())
    assert float(out.mean()) == pytest.approx(float(volume.array.mean()), abs=2.0)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"normalise": "window"}, "window"),
        ({"window": (40, 400)}, "normalise"),
        ({"window": (40, -1), "normalise": "window"}, "window"),
        ({"zscore_threshold": 0.0}, "zscore_threshold"),
        ({"target_spacing": (1.0, 0.0, 1.0)}, "target_spacing"),
        ({"target_shape": (1, 2)}, "target_shape"),
        ({"denoise": "bilateral"}, "denoise"),
        ({"interpolation_order": 7}, "interpolation_order"),
        ({"target_spacng": (1, 1, 1)}, "target_spacng"),
    ],
)
def test_invalid_specs_name_the_field(fields: dict[str, object], named: str) -> None:
    with pytest.raises(ValidationError, match=named):
        PreprocessSpec.model_validate(fields)


def test_spec_is_frozen_and_cache_key_stable() -> None:
    spec = PreprocessSpec(target_spacing=(1.0, 1.0, 1.0), window=(40, 400), normalise="window")
    same = PreprocessSpec.model_validate(  # as read from YAML: lists and ints
        {"normalise": "window", "window": [40, 400], "target_spacing": [1, 1, 1]}
    )
    assert spec.cache_key() == same.cache_key() and len(spec.cache_key()) == 64
    assert spec.cache_key() != spec.model_copy(update={"denoise": "mean"}).cache_key()
    with pytest.raises(ValidationError):
        spec.normalise = "none"  # type: ignore[misc]


# -- cache -------------------------------------------------------------------------


def counting_loader(paths: list[Path]) -> tuple[Callable[[], Volume], list[int]]:
    calls = [0]

    def loader() -> Volume:
        calls[0] += 1
        return load_series(paths)

    return loader, calls


def test_cache_hit_skips_the_loader(tmp_path: Path) -> None:
    datasets = ct_series_datasets(SMALL)
    paths = write(tmp_path / "series", datasets)
    series, sops = datasets[0].SeriesInstanceUID, [ds.SOPInstanceUID for ds in datasets]
    cache = PreprocessCache(tmp_path / "cache")
    spec = PreprocessSpec(window=(40, 400), normalise="window")
    loader, calls = counting_loader(paths)
    first = cache.get_or_compute(loader, series, sops, spec)
    second = cache.get_or_compute(loader, series, reversed(sops), spec)  # order is irrelevant
    assert calls == [1]
    assert isinstance(second, np.memmap) and not second.flags.writeable
    assert not first.flags.writeable
    np.testing.assert_array_equal(first, second)
    entries = list((tmp_path / "cache").rglob("*"))
    assert [p.name for p in entries if p.is_file() and p.suffix != ".npy"] == []  # no temp
    assert cache.path_for(series, sops, spec).parent.name == series


def test_cache_entries_per_spec_and_instance_set(tmp_path: Path) -> None:
    datasets = ct_series_datasets(SMALL)
    paths = write(tmp_path / "series", datasets)
    series, sops = datasets[0].SeriesInstanceUID, [ds.SOPInstanceUID for ds in datasets]
    cache = PreprocessCache(tmp_path / "cache")
    loader, calls = counting_loader(paths)
    window = PreprocessSpec(window=(40, 400), normalise="window")
    zscore = PreprocessSpec(normalise="zscore")
    a = cache.get_or_compute(loader, series, sops, window)
    b = cache.get_or_compute(loader, series, sops, zscore)
    cache.get_or_compute(loader, series, sops, window)
    assert calls == [2] and not np.array_equal(a, b)
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 2
    # a series that lost (or gained) an instance is another entry
    fewer, fewer_calls = counting_loader(paths[1:])
    cache.get_or_compute(fewer, series, sops[1:], window)
    assert fewer_calls == [1] and len(list((tmp_path / "cache").rglob("*.npy"))) == 3


def test_cache_rejects_a_loader_for_other_instances(tmp_path: Path) -> None:
    datasets = ct_series_datasets(SMALL)
    paths = write(tmp_path / "series", datasets)
    cache = PreprocessCache(tmp_path / "cache")
    loader, _ = counting_loader(paths)
    with pytest.raises(PreprocessError, match="not the 3 instances of the cache key"):
        sops = [ds.SOPInstanceUID for ds in datasets[:3]]
        cache.get_or_compute(loader, datasets[0].SeriesInstanceUID, sops, PreprocessSpec())
    assert list((tmp_path / "cache").rglob("*.npy")) == []


def test_cache_recomputes_a_truncated_entry(tmp_path: Path) -> None:
    datasets = ct_series_datasets(SMALL)
    paths = write(tmp_path / "series", datasets)
    series, sops = datasets[0].SeriesInstanceUID, [ds.SOPInstanceUID for ds in datasets]
    cache, spec = PreprocessCache(tmp_path / "cache"), PreprocessSpec()
    loader, calls = counting_loader(paths)
    good = np.array(cache.get_or_compute(loader, series, sops, spec))
    entry = cache.path_for(series, sops, spec)
    entry.write_bytes(entry.read_bytes()[:200])  # what a non-atomic writer could leave
    again = cache.get_or_compute(loader, series, sops, spec)
    assert calls == [2]
    np.testing.assert_array_equal(again, good)
    np.testing.assert_array_equal(np.load(entry), good)


def test_failed_write_leaves_neither_entry_nor_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "entry.npy"
    with pytest.raises(ValueError):  # object arrays need pickle, which is refused
        _write_atomically(target, np.array([object()]))
    assert list(target.parent.iterdir()) == []
