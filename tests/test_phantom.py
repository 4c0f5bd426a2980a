"""The phantom generator: reproducibility, geometry, values against the ground
truth, DICOM validity, and ``pacsnode demo`` against real receivers.

Studies are small (at most 128² CT) so the module runs in seconds, apart from
the test that starts a node.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
    PositronEmissionTomographyImageStorage,
)

from pacsnode.lab.phantom import (
    MASKS_FILE,
    TRUTH_FILE,
    SeriesSpec,
    StudySpec,
    Tissue,
    WrittenStudy,
    ct_phantom_volume,
    generate_study,
    study_datasets,
    write_study,
)
from pacsnode.lab.phantom.anatomy import PROPERTIES
from pacsnode.workers.geometry import AXIAL, CORONAL, Grid
from pacsnode.workers.volume import Volume, load_series
from tests.support import Node, node_config, require_binary

SPEC = StudySpec(seed=7, size=128, slices=64, lesions=4)
PHI = ("Phantom^Synthetic", "PHANTOM-")


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> WrittenStudy:
    return write_study(tmp_path_factory.mktemp("study"), SPEC)


@pytest.fixture(scope="module")
def volumes(written: WrittenStudy) -> dict[str, Volume]:
    return {key: load_series(paths) for key, paths in written.series.items()}


@pytest.fixture(scope="module")
def truth(written: WrittenStudy) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(written.truth.read_text())
    return data


@pytest.fixture(scope="module")
def masks(written: WrittenStudy) -> dict[str, np.ndarray]:
    with np.load(written.masks) as npz:
        return {name: npz[name] for name in npz.files}


# -- reproducibility ------------------------------------------------------------------


def test_same_seed_same_pixels_and_uids() -> None:
    spec = StudySpec(seed=3, size=48, slices=12)
    a, b = generate_study(spec), generate_study(spec)
    for key in a.series:
        np.testing.assert_array_equal(a.series[key].array, b.series[key].array)
    np.testing.assert_array_equal(a.lesion_mask, b.lesion_mask)
    assert a.truth() == b.truth()
    first, second = list(study_datasets(a)), list(study_datasets(b))
    assert [ds.SOPInstanceUID for ds in first] == [ds.SOPInstanceUID for ds in second]
    assert all(x.PixelData == y.PixelData for x, y in zip(first, second, strict=True))
    assert len({ds.SOPInstanceUID for ds in first}) == len(first)
    other = generate_study(StudySpec(seed=4, size=48, slices=12))
    assert other.header.study_instance_uid != a.header.study_instance_uid
    assert not np.array_equal(other.series["CT"].array, a.series["CT"].array)
    assert all(ds.SOPInstanceUID.startswith("1.2.826.0.1.3680043.8.498.") for ds in first)


def test_a_modality_does_not_change_the_others() -> None:
    ct_only = generate_study(StudySpec(seed=5, size=48, slices=12, modalities=("CT",)))
    full = generate_study(StudySpec(seed=5, size=48, slices=12))
    np.testing.assert_array_equal(ct_only.series["CT"].array, full.series["CT"].array)
    assert set(ct_only.series) == {"CT"} and set(full.series) == {"CT", "PT", "MR_T1", "MR_T2"}


# -- geometry -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "orientation",
    [AXIAL, CORONAL, ((0.8660254, 0.5, 0.0), (0.0, 0.0, -1.0))],
    ids=["axial", "coronal", "oblique"],
)
def test_grid_coordinates_agree_with_the_image_plane_equation(
    orientation: tuple[tuple[float, float, float], tuple[float, float, float]],
) -> None:
    grid = Grid((5, 6, 7), (2.0, 0.5, 0.75), (10.0, -20.0, 30.0), orientation)
    x, y, z = grid.coordinates()
    points = np.stack(np.broadcast_arrays(x, y, z), axis=-1)
    index = np.stack(np.meshgrid(range(5), range(6), range(7), indexing="ij"), axis=-1)
    np.testing.assert_allclose(points, grid.to_patient(index), atol=1e-4)
    np.testing.assert_allclose(grid.to_index(grid.to_patient(index)), index, atol=1e-9)
    # PS3.3 C.7.6.2.1.1: column index i moves along the row cosine by dx
    step = grid.to_patient(np.array([0, 0, 1])) - grid.to_patient(np.array([0, 0, 0]))
    np.testing.assert_allclose(step, 0.75 * np.asarray(orientation[0]), atol=1e-9)


def test_series_geometry_as_loaded(written: WrittenStudy, volumes: dict[str, Volume]) -> None:
    study = generate_study(SPEC)
    frames = {v.frame_of_reference_uid for v in volumes.values()}
    assert len(frames) == 1 and frames == {study.header.frame_of_reference_uid}
    for key, volume in volumes.items():
        grid = study.series[key].grid
        assert volume.array.shape == grid.shape, key
        assert volume.spacing == pytest.approx(grid.spacing, abs=1e-4), key
        assert volume.origin == pytest.approx(grid.origin, abs=1e-3), key
        np.testing.assert_allclose(volume.direction, np.eye(3))
    ct, pt, t1 = volumes["CT"], volumes["PT"], volumes["MR_T1"]
    assert (ct.modality, ct.units, pt.modality, pt.units, t1.modality) == (
        "CT", "HU", "PT", "BQML", "MR",
    )  # fmt: skip
    # PET: coarser, and its own field of view and extent
    assert pt.spacing[1] > 3 * ct.spacing[1] and pt.spacing[0] > ct.spacing[0]
    assert pt.origin != ct.origin and pt.array.shape[0] != ct.array.shape[0]
    assert t1.origin != ct.origin and t1.spacing != ct.spacing
    assert volumes["MR_T2"].origin == t1.origin
    # stored values: CT to the HU, PET within one step of its per-slice slope
    stored = np.clip(np.rint(study.series["CT"].array + 1024), 0, 4095) - 1024
    np.testing.assert_array_equal(ct.array, stored)
    pet = study.series["PT"].array
    np.testing.assert_allclose(pt.array, pet, atol=float(pet.max()) / 65535)


def test_lesion_centres_land_in_their_masks_and_avid_ones_on_pet_hot_spots() -> None:
    study = generate_study(StudySpec(seed=11, size=128, slices=64, lesions=6, pt_size=64, noise=0))
    assert study.lesions, "the field has room for lesions"
    pet = study.series["PT"]
    bqml_per_suv = study.pet.bqml_per_suv(study.header.patient_weight_kg)
    pt_tissues = study.anatomy.labels(pet.grid)
    for lesion in study.lesions:
        k, j, i = np.rint(study.reference.to_index(lesion.centre)).astype(int)
        assert study.lesion_mask[k, j, i] == lesion.label
        pk, pj, pi = np.rint(pet.grid.to_index(lesion.centre)).astype(int)
        at_centre = pet.array[pk, pj, pi] / bqml_per_suv
        host = float(np.median(pet.array[pt_tissues == lesion.organ])) / bqml_per_suv
        if lesion.avid:
            assert at_centre > host * 1.1, (lesion.kind, at_centre, host)
        elif lesion.suv < PROPERTIES[lesion.organ].suv:
            assert at_centre < host, (lesion.kind, at_centre, host)
    for focus in study.foci:
        pk, pj, pi = np.rint(pet.grid.to_index(focus.centre)).astype(int)
        k, j, i = np.rint(study.reference.to_index(focus.centre)).astype(int)
        assert study.lesion_mask[k, j, i] == 0  # hot on PET, normal tissue on CT
        assert pet.array[pk, pj, pi] / bqml_per_suv > 2 * PROPERTIES[focus.tissue].suv


def test_study_is_varied_across_seeds() -> None:
    kinds, organs, avid = set(), set(), set()
    diameters = []
    for seed in range(12):
        study = generate_study(StudySpec(seed=seed, size=128, slices=100, modalities=("CT",)))
        for lesion in study.lesions:
            kinds.add(lesion.kind)
            organs.add(lesion.organ)
            avid.add(lesion.avid)
            diameters.append(2 * float(lesion.semi_axes.max()))
    assert {"metastasis", "cyst"} <= kinds and {Tissue.LIVER, Tissue.LUNG} <= organs
    assert avid == {True, False}
    assert min(diameters) < 15 and max(diameters) > 20


# -- values against the ground truth ---------------------------------------------------------


def test_ct_tissue_and_lesion_hu(volumes: dict[str, Volume], truth: dict[str, Any],
                                 masks: dict[str, np.ndarray]) -> None:  # fmt: skip
    hu, tissues, lesions = volumes["CT"].array, masks["tissues"], masks["lesions"]
    assert hu.shape == tissues.shape == lesions.shape
    for tissue in (Tissue.FAT, Tissue.MUSCLE, Tissue.LUNG, Tissue.LIVER, Tissue.KIDNEY,
                   Tissue.CORTICAL_BONE, Tissue.BLOOD):  # fmt: skip
        region = (tissues == tissue) & (lesions == 0)
        assert region.sum() > 50, tissue
        assert float(hu[region].mean()) == pytest.approx(PROPERTIES[tissue].hu, abs=1.5), tissue
    assert float(hu[tissues == Tissue.AIR].mean()) == pytest.approx(-1000, abs=2)
    for lesion in truth["lesions"]:
        inside = lesions == lesion["label"]
        tolerance = 4 * 10 / np.sqrt(inside.sum()) + 0.5  # 4 SD of the mean of 10 HU noise
        assert float(hu[inside].mean()) == pytest.approx(lesion["hu"], abs=tolerance)
        host = truth["tissues"][lesion["organ"]]["hu"]
        assert lesion["contrast_hu"] == pytest.approx(lesion["hu"] - host, abs=0.11)


def test_masks_match_the_json(truth: dict[str, Any], masks: dict[str, np.ndarray]) -> None:
    voxel = float(np.prod(masks["spacing"]))
    assert truth["labels"]["lesion_count"] == len(truth["lesions"]) == 4
    assert truth["labels"]["has_lesion"] is True
    assert set(np.unique(masks["lesions"])) == {0, *(x["label"] for x in truth["lesions"])}
    for lesion in truth["lesions"]:
        count = int((masks["lesions"] == lesion["label"]).sum())
        assert count == lesion["mask_voxels"]
        assert count * voxel == pytest.approx(lesion["mask_volume_mm3"], rel=1e-6)
        semi = lesion["semi_axes_mm"]
        assert lesion["volume_mm3"] == pytest.approx(4 / 3 * np.pi * np.prod(semi), rel=1e-3)
        assert 5 <= lesion["diameter_mm"] <= 30
    grid = truth["reference_grid"]
    assert grid["shape"] == list(masks["lesions"].shape)
    assert masks["spacing"].tolist() == pytest.approx(grid["spacing"])


def test_voxelised_volume_converges_to_the_true_volume() -> None:
    study = generate_study(
        StudySpec(seed=21, size=256, slices=160, lesions=5, modalities=("CT",), noise=0)
    )
    voxel = study.reference.voxel_volume
    checked = 0
    for lesion in study.lesions:
        measured = float((study.lesion_mask == lesion.label).sum()) * voxel
        if 2 * lesion.semi_axes.min() >= 10:
            assert measured == pytest.approx(lesion.volume_mm3, rel=0.2), lesion.kind
            checked += 1
    assert checked >= 2


def test_normal_study_has_no_lesions_but_has_physiological_uptake() -> None:
    study = generate_study(StudySpec(seed=9, size=64, slices=24, lesions=0, foci=2))
    truth = study.truth()
    assert truth["labels"] == {
        "has_lesion": False, "lesion_count": 0, "any_malignant": False, "any_avid": False,
        "any_malignant_avid": False, "physiological_foci": 2,
    }  # fmt: skip
    assert not study.lesion_mask.any() and truth["lesions"] == []
    assert len(truth["foci"]) == 2


def test_mr_relative_contrasts() -> None:
    study = generate_study(StudySpec(seed=2, size=128, slices=48, modalities=("MR",), noise=0))
    grid = study.series["MR_T1"].grid
    labels = study.anatomy.labels(grid)

    def mean(key: str, tissue: Tissue) -> float:
        return float(study.series[key].array[labels == tissue].mean())

    for fluid in (Tissue.CSF,):
        assert mean("MR_T1", fluid) < mean("MR_T1", Tissue.MUSCLE)  # dark on T1
        assert mean("MR_T2", fluid) > 2 * mean("MR_T2", Tissue.MUSCLE)  # bright on T2
    assert mean("MR_T1", Tissue.FAT) > mean("MR_T1", Tissue.LIVER) > mean("MR_T1", Tissue.MUSCLE)
    assert mean("MR_T2", Tissue.SPLEEN) > mean("MR_T2", Tissue.LIVER)
    assert mean("MR_T1", Tissue.LUNG) < 0.2 * mean("MR_T1", Tissue.FAT)


# -- DICOM ------------------------------------------------------------------------------------


def test_every_instance_is_valid_dicom(written: WrittenStudy) -> None:
    exe = require_binary("dciodvfy")
    for key, paths in written.series.items():
        ds = pydicom.dcmread(paths[0])
        assert "synthetic" in ds.SeriesDescription and "synthetic" in ds.StudyDescription.lower()
        assert "testing and demonstration" in ds.ImageComments
        result = subprocess.run([exe, str(paths[0])], capture_output=True, text=True, timeout=60)
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
        assert not errors, (key, errors)
    pt = pydicom.dcmread(written.series["PT"][0])
    assert pt.SOPClassUID == PositronEmissionTomographyImageStorage
    assert (pt.Units, pt.DecayCorrection, pt.RescaleIntercept) == ("BQML", "START", 0)
    isotope = pt.RadiopharmaceuticalInformationSequence[0]
    assert isotope.RadionuclideCodeSequence[0].CodeValue == "77004003"  # 18F
    slopes = {float(pydicom.dcmread(p).RescaleSlope) for p in written.series["PT"]}
    assert len(slopes) > 1  # one slope per slice
    t1 = pydicom.dcmread(written.series["MR_T1"][0])
    t2 = pydicom.dcmread(written.series["MR_T2"][0])
    assert t1.SOPClassUID == MRImageStorage and "RescaleSlope" not in t1
    assert t1.RepetitionTime < t2.RepetitionTime and t1.EchoTime < t2.EchoTime


def test_written_folder_layout(written: WrittenStudy, truth: dict[str, Any]) -> None:
    assert written.truth.name == TRUTH_FILE and written.masks.name == MASKS_FILE
    assert sorted(p.name for p in written.folder.iterdir()) == sorted(
        ["CT", "PT", "MR_T1", "MR_T2", TRUTH_FILE, MASKS_FILE]
    )
    assert (
        truth["series"]["PT"]["series_instance_uid"]
        == pydicom.dcmread(written.series["PT"][0]).SeriesInstanceUID
    )
    assert "synthetic" in truth["note"].lower()


def test_legacy_series_spec_shows_the_anatomy() -> None:
    hu = ct_phantom_volume(SeriesSpec(slices=24, rows=64, columns=64, seed=1))
    assert hu.shape == (24, 64, 64)
    assert (hu < -900).mean() > 0.1 and (hu > 300).any()  # air around, bone inside
    assert ((hu > 80) & (hu < 130)).mean() > 0.02  # liver


def test_generation_is_fast_enough_for_training() -> None:
    import time

    started = time.perf_counter()
    study = generate_study(StudySpec(seed=1, size=128, slices=64, modalities=("CT",)))
    assert time.perf_counter() - started < 5
    assert study.series["CT"].array.dtype == np.float32


# -- pacsnode demo ------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pacsnode", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def refusing_scp() -> Iterator[tuple[int, list[str]]]:
    """A pynetdicom storage SCP that stores CT and refuses PET (Out of Resources)."""
    received: list[str] = []
    lock = threading.Lock()

    def handle_store(event: evt.Event) -> int:
        with lock:
            received.append(str(event.request.AffectedSOPInstanceUID))
        return (
            0xA700
            if event.request.AffectedSOPClassUID == PositronEmissionTomographyImageStorage
            else 0x0000
        )

    ae = AE(ae_title="REFUSER")
    for sop_class in (CTImageStorage, PositronEmissionTomographyImageStorage, MRImageStorage):
        ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)]
    )
    try:
        yield server.server_address[1], received
    finally:
        server.shutdown()


def test_demo_send_reports_failures_and_exits_non_zero(refusing_scp: tuple[int, list[str]]) -> None:
    port, received = refusing_scp
    result = run_cli(
        "demo", "send", f"REFUSER@127.0.0.1:{port}", "--modalities", "ct,pt",
        "--slices", "6", "--size", "32", "--seed", "5",
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    study = generate_study(StudySpec(seed=5, size=32, slices=6, modalities=("CT", "PT")))
    n_ct, n_pt = study.series["CT"].grid.shape[0], study.series["PT"].grid.shape[0]
    assert len(received) == n_ct + n_pt
    assert f"{n_ct} stored, {n_pt} failed" in result.stdout
    assert "0xA700" in result.stdout
    assert "synthetic" in result.stdout.lower()
    assert not any(phi in result.stdout + result.stderr for phi in PHI)


def test_demo_send_bad_target_and_unreachable_peer() -> None:
    bad = run_cli("demo", "send", "no-port", "--slices", "2", "--size", "16")
    assert bad.returncode == 2 and "AE@HOST:PORT" in bad.stderr
    modality = run_cli("demo", "send", "X@127.0.0.1:1", "--modalities", "ct,us")
    assert modality.returncode == 2 and "modalities" in modality.stderr


def test_demo_write(tmp_path: Path) -> None:
    result = run_cli(
        "demo", "write", str(tmp_path / "study"), "--slices", "8", "--size", "32", "--lesions", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    truth = json.loads((tmp_path / "study" / TRUTH_FILE).read_text())
    assert truth["labels"]["lesion_count"] == 2
    assert (tmp_path / "study" / MASKS_FILE).exists()
    assert len(list((tmp_path / "study" / "CT").glob("*.dcm"))) == 8
    assert "synthetic" in result.stdout.lower()


def test_demo_send_to_a_pacsnode_node(make_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    peers = [{"ae_title": "PACSNODE_DEMO", "hosts": ["127.0.0.1"]}]
    node: Node = make_node(config=node_config(peers=peers)).start()
    target = f"{node.ae_title}@127.0.0.1:{node.port}"
    result = node.cli("demo", "send", target, "--slices", "8", "--size", "32", "--seed", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    study = generate_study(StudySpec(seed=3, size=32, slices=8))
    expected = sum(image.grid.shape[0] for image in study.series.values())
    assert f"{expected} stored, 0 failed" in result.stdout
    listing = [json.loads(line) for line in node.cli("studies", "--json").stdout.splitlines()]
    assert len(listing) == 1
    assert listing[0]["instance_count"] == expected and listing[0]["series_count"] == 4
    assert listing[0]["study_instance_uid"] == study.header.study_instance_uid
    assert set(listing[0]["modalities"]) == {"CT", "PT", "MR"}
    # A calling AE title the node does not know: rejected, exit status 1.
    refused = node.cli("demo", "send", target, "--slices", "2", "--size", "16",
                       "--calling-ae", "STRANGER")  # fmt: skip
    assert refused.returncode == 1 and "rejected" in refused.stderr
