"""DICOM-SEG and TID 1500 SR from model results (workers.encode, workers.outputs).

Real objects from a phantom CT (256² x 40 slices) and hand-made results whose
masks are the phantom's lesions, so nothing depends on a trained model: every
object is checked by dciodvfy and read back with highdicom. The last test runs
the encode stage on a real node's database and spool.
"""

from __future__ import annotations

import random
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
import yaml
from pydicom.sr.codedict import codes
from pydicom.uid import PYDICOM_ROOT_UID
from sqlalchemy import func, select

import pacsnode
from pacsnode.core.errors import EncodeError
from pacsnode.core.settings import SegOptions, Settings
from pacsnode.db.models import Assembly, Instance, Job, Patient, Series, Study
from pacsnode.db.results import Code, FindingRecord, ModelIdentity, SegmentRecord
from pacsnode.db.session import create_db_engine
from pacsnode.lab.phantom import StudySpec, write_study
from pacsnode.models.manifest import ModelManifest
from pacsnode.scp.dataset import is_valid_uid
from pacsnode.workers import pipeline
from pacsnode.workers.encode import (
    OOD_SCORE,
    OUT_OF_DISTRIBUTION,
    SourceSeries,
    encode_job,
    read_source,
)
from pacsnode.workers.infer import ModelResult
from pacsnode.workers.outputs import DISCLAIMER, EncodedObject
from pacsnode.workers.volume import Volume, load_series
from tests.support import Node, node_config, require_binary, storescu, wait_for
from tests.test_assembly import FAST, jobs

LESION = {"value": "52988006", "scheme_designator": "SCT", "meaning": "Lesion"}
MASS = {"value": "4147007", "scheme_designator": "SCT", "meaning": "Mass"}
ALTERED = {
    "value": "49755003",
    "scheme_designator": "SCT",
    "meaning": "Morphologically Altered Structure",
}
SHA = {"segmenter": "a" * 64, "classifier": "b" * 64}
SEGMENTER = "ct-lesion-segmenter"
CLASSIFIER = "ct-lesion-classifier"
SR_WARNING = (
    "Warning - Unrecognized defined term <99PACSNODE> for value 1 of attribute "
    "<Coding Scheme Designator>"
)


def manifest_data(name: str, task: str, outputs: list[dict[str, Any]], sha: str) -> dict[str, Any]:
    return {
        "manifest_version": 1,
        "name": name,
        "version": "1.0.0",
        "task": task,
        "description": "Test model; for demonstration, not clinical use.",
        "applies_to": {"modality": ["CT"]},
        "input": {
            "preprocess": {"normalise": "window", "window": [40, 400]},
            "shape": [32, 32],
        },
        "outputs": outputs,
        "architecture": {"name": "unet" if task == "segmentation" else "slice_classifier"},
        "weights": {"file": "model.weights.h5", "sha256": sha},
    }


def segment(concept: dict[str, str]) -> dict[str, Any]:
    return {"category": ALTERED, "type": concept}


SEGMENTER_DATA = manifest_data(
    SEGMENTER,
    "segmentation",
    [
        {"name": "lesion", "concept": LESION, "segment": segment(LESION)},
        {"name": "mass", "concept": MASS, "segment": segment(MASS)},
    ],
    SHA["segmenter"],
)
MANIFESTS = {
    (SEGMENTER, "1.0.0"): ModelManifest.model_validate(SEGMENTER_DATA),
    (CLASSIFIER, "1.0.0"): ModelManifest.model_validate(
        manifest_data(
            CLASSIFIER, "classification", [{"name": "lesion", "concept": LESION}], SHA["classifier"]
        )
    ),
}


@dataclass(frozen=True)
class Phantom:
    folder: Path
    paths: list[Path]
    volume: Volume
    source: SourceSeries
    lesions: np.ndarray  # label per lesion, on the CT grid (= the volume's slice order)

    @property
    def study_uid(self) -> str:
        return str(self.source.images[0].StudyInstanceUID)

    def masks(self) -> dict[int, np.ndarray]:
        """Segment 1: the first lesion; segment 2: the others."""
        return {1: self.lesions == 1, 2: self.lesions > 1}


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> Phantom:
    folder = tmp_path_factory.mktemp("phantom")
    written = write_study(
        folder, StudySpec(seed=7, size=256, slices=40, modalities=("CT",), lesions=3)
    )
    paths = written.series["CT"]
    volume = load_series(paths)
    with np.load(written.masks) as saved:
        lesions = saved["lesions"]
    assert lesions.shape == volume.array.shape and lesions.max() >= 2
    return Phantom(folder, paths, volume, read_source(paths, volume), lesions)


def seg_result(volume: Volume, masks: dict[int, np.ndarray], ood: bool = False) -> ModelResult:
    """What workers.infer makes of a segmentation model's masks."""
    manifest = MANIFESTS[(SEGMENTER, "1.0.0")]
    result = ModelResult(
        volume.series_instance_uid,
        ModelIdentity(SEGMENTER, "1.0.0", SHA["segmenter"], "segmentation"),
    )
    voxel_mm3 = float(np.prod(volume.spacing))
    for number, output in enumerate(manifest.outputs, start=1):
        c = output.concept
        code = Code(c.scheme_designator, c.value, c.meaning)
        mask = masks.get(number, np.zeros(volume.array.shape, dtype=bool))
        count = int(mask.sum())
        result.findings.append(FindingRecord(code, 0.9 if count else 0.1, count > 0, ood, None))
        if count:
            result.masks[number] = mask
            result.segments.append(
                SegmentRecord(number, code, count, count * voxel_mm3, (0,) * 6, 0.0, ood, "")
            )
    return result


def cls_result(volume: Volume, probability: float = 0.73, ood: bool = False) -> ModelResult:
    code = Code("SCT", "52988006", "Lesion")
    return ModelResult(
        volume.series_instance_uid,
        ModelIdentity(CLASSIFIER, "1.0.0", SHA["classifier"], "classification"),
        [FindingRecord(code, probability, probability >= 0.5, ood, 0.042)],
    )


def encode(
    ct: Phantom, results: list[ModelResult], job_id: int = 1, **options: Any
) -> list[EncodedObject]:
    return encode_job(
        ct.study_uid,
        job_id,
        results,
        MANIFESTS,
        {ct.source.series_instance_uid: ct.source},
        SegOptions(**options),
        "PACSNODE",
    )


def save(obj: EncodedObject, folder: Path) -> Path:
    path = folder / f"{obj.kind}-{obj.dataset.SOPInstanceUID}.dcm"
    obj.dataset.save_as(path, enforce_file_format=True)
    return path


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) of dicom3tools' dciodvfy on ``path``."""
    run = subprocess.run(
        [require_binary("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120
    )
    lines = (run.stdout + run.stderr).splitlines()
    return [x for x in lines if x.startswith("Error")], [
        x for x in lines if x.startswith("Warning")
    ]


def assert_valid(path: Path, kind: str) -> None:
    errors, warnings = dciodvfy(path)
    assert errors == []
    # SR: only the local OOD codes, which dciodvfy cannot know (workers.encode).
    assert set(warnings) <= ({SR_WARNING} if kind == "SR" else set())


def report(sr: Any) -> hd.sr.MeasurementReport:
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    return sr.content


def concept(value: Any) -> tuple[str, str]:
    return (value.value, value.scheme_designator)


def volume_mm3(group: Any) -> float:
    (measurement,) = [m for m in group.get_measurements() if m.name == codes.SCT.Volume]
    assert measurement.unit == codes.UCUM.CubicMillimeter
    return float(measurement.value)


def evaluations(group: Any) -> dict[tuple[str, str], tuple[str, str]]:
    return {concept(q.name): concept(q.value) for q in group.get_qualitative_evaluations()}


def test_binary_seg_and_sr_are_valid_and_read_back(ct: Phantom, tmp_path: Path) -> None:
    masks = ct.masks()
    segmentation, classification = seg_result(ct.volume, masks), cls_result(ct.volume)
    objects = encode(ct, [segmentation, classification])
    assert [o.kind for o in objects] == ["SEG", "SR"]
    assert objects[1].model_names == (SEGMENTER, CLASSIFIER)
    seg_path, sr_path = (save(o, tmp_path) for o in objects)
    assert_valid(seg_path, "SEG")
    assert_valid(sr_path, "SR")

    seg = hd.seg.segread(seg_path)
    source = ct.source.images[0]
    assert (seg.SegmentationType, seg.Modality) == ("BINARY", "SEG")
    assert 9000 <= seg.SeriesNumber < 9900
    assert seg.SeriesDescription == "AI SEG ct-lesion-segmenter 1.0.0 (demo, not clinical)"
    assert seg.ContentDescription == DISCLAIMER
    assert (seg.StudyInstanceUID, seg.PatientID) == (ct.study_uid, source.PatientID)
    assert seg.FrameOfReferenceUID == ct.volume.frame_of_reference_uid
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == ct.volume.series_instance_uid
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} == set(
        ct.volume.sop_instance_uids
    )
    (ours,) = [e for e in seg.ContributingEquipmentSequence if e.Manufacturer == "pacsnode"]
    assert ours.SoftwareVersions == pacsnode.__version__
    assert "not for clinical use" in ours.ContributionDescription
    for number, (label, code) in enumerate([("lesion", LESION), ("mass", MASS)], start=1):
        description = seg.get_segment_description(number)
        assert description.segment_label == label
        assert concept(description.segmented_property_type) == (code["value"], "SCT")
        assert concept(description.segmented_property_category) == ("49755003", "SCT")
        algorithm = description.algorithm_identification
        assert algorithm is not None
        assert (algorithm.name, algorithm.version) == (SEGMENTER, "1.0.0")
        assert concept(algorithm.family) == concept(codes.cid7162.ArtificialIntelligence)
    pixels = seg.get_pixels_by_source_instance(list(ct.volume.sop_instance_uids))
    assert pixels.shape == (*ct.lesions.shape, 2)
    for number, mask in masks.items():
        assert np.array_equal(pixels[..., number - 1].astype(bool), mask)
    # omit_empty_frames (default): one frame per (slice, segment) with content
    content = sum(int(m.any(axis=(1, 2)).sum()) for m in masks.values())
    assert seg.NumberOfFrames == content

    sr = hd.sr.srread(sr_path)
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == (
        "COMPLETE",
        "UNVERIFIED",
        "PRELIMINARY",
    )
    assert (sr.SeriesNumber, sr.StudyInstanceUID) == (9999, ct.study_uid)
    assert "demo, not clinical" in sr.SeriesDescription
    evidence = {
        i.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for i in series.ReferencedSOPSequence
    }
    assert evidence == {seg.SOPInstanceUID, *ct.volume.sop_instance_uids}
    volumetric = report(sr).get_volumetric_roi_measurement_groups()
    assert len(volumetric) == 2
    for group, record in zip(volumetric, segmentation.segments, strict=True):
        ref = group.referenced_segment
        assert ref is not None
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert ref.referenced_segment_numbers == [record.segment_number]
        assert volume_mm3(group) == pytest.approx(record.volume_mm3, rel=1e-6)
        assert group.tracking_uid == seg.get_segment_description(record.segment_number).tracking_uid
        assert concept(group.finding_type) == (record.code.value, "SCT")
        assert evaluations(group) == {concept(OUT_OF_DISTRIBUTION): ("373067005", "SCT")}
        mask_slices = np.flatnonzero(masks[record.segment_number].any(axis=(1, 2)))
        assert {i.referenced_sop_instance_uid for i in ref.source_images_for_segmentation} == {
            ct.volume.sop_instance_uids[k] for k in mask_slices
        }
    findings = report(sr).get_image_measurement_groups()
    assert [str(g.tracking_identifier).split(",")[0] for g in findings] == [
        "ct-lesion-segmenter 1.0.0 Lesion",
        "ct-lesion-segmenter 1.0.0 Mass",
        "ct-lesion-classifier 1.0.0 Lesion",
    ]
    classifier = findings[2]
    by_name = {concept(m.name): float(m.value) for m in classifier.get_measurements()}
    assert by_name == {
        ("122157", "DCM"): pytest.approx(0.73),
        concept(OOD_SCORE): pytest.approx(0.042),
    }
    assert evaluations(classifier) == {
        ("52988006", "SCT"): ("52101004", "SCT"),  # Lesion: Present
        concept(OUT_OF_DISTRIBUTION): ("373067005", "SCT"),  # No
    }


def test_fractional_with_every_frame(ct: Phantom, tmp_path: Path) -> None:
    masks = ct.masks()
    objects = encode(
        ct, [seg_result(ct.volume, masks)], segmentation_type="FRACTIONAL", omit_empty_frames=False
    )
    seg_path = save(objects[0], tmp_path)
    assert_valid(seg_path, "SEG")
    seg = hd.seg.segread(seg_path)
    assert (seg.SegmentationType, seg.SegmentationFractionalType) == ("FRACTIONAL", "PROBABILITY")
    assert seg.NumberOfFrames == 2 * len(ct.paths)  # every slice, for each segment
    pixels = seg.get_pixels_by_source_instance(list(ct.volume.sop_instance_uids))
    assert set(np.unique(pixels)) <= {0.0, 1.0}  # boolean masks: probabilities 0 and 1
    for number, mask in masks.items():
        assert np.array_equal(pixels[..., number - 1] == 1.0, mask)


def test_labelmap_and_its_fallback_for_overlapping_segments(ct: Phantom, tmp_path: Path) -> None:
    masks = ct.masks()
    (seg_obj, _) = encode(ct, [seg_result(ct.volume, masks)], segmentation_type="LABELMAP")
    seg = hd.seg.segread(save(seg_obj, tmp_path))  # Debian 12's dciodvfy does not know it
    assert seg.SegmentationType == "LABELMAP"
    pixels = seg.get_pixels_by_source_instance(list(ct.volume.sop_instance_uids))
    for number, mask in masks.items():
        assert np.array_equal(pixels[..., number - 1].astype(bool), mask)

    overlapping = {1: ct.lesions > 0, 2: ct.lesions > 1}
    (seg_obj, _) = encode(ct, [seg_result(ct.volume, overlapping)], segmentation_type="LABELMAP")
    path = save(seg_obj, tmp_path)
    assert_valid(path, "SEG")
    seg = hd.seg.segread(path)
    assert seg.SegmentationType == "BINARY"
    pixels = seg.get_pixels_by_source_instance(list(ct.volume.sop_instance_uids))
    for number, mask in overlapping.items():
        assert np.array_equal(pixels[..., number - 1].astype(bool), mask)


@pytest.mark.parametrize("masks", ["none", "all-false"])
def test_nothing_segmented_writes_no_seg(ct: Phantom, tmp_path: Path, masks: str) -> None:
    result = seg_result(ct.volume, {})
    if masks == "all-false":  # a result holding an empty mask all the same
        result.masks[1] = np.zeros(ct.lesions.shape, dtype=bool)
    (sr_obj,) = encode(ct, [result])
    assert sr_obj.kind == "SR"
    path = save(sr_obj, tmp_path)
    assert_valid(path, "SR")
    sr = hd.sr.srread(path)
    assert sr.CompletionFlag == "COMPLETE"
    assert report(sr).get_volumetric_roi_measurement_groups() == []
    findings = report(sr).get_image_measurement_groups()
    assert len(findings) == 2
    for group in findings:
        assert volume_mm3(group) == 0.0
        assert evaluations(group)[concept(group.finding_type)] == ("272519000", "SCT")  # Absent


def test_out_of_distribution_makes_the_report_partial(ct: Phantom, tmp_path: Path) -> None:
    (sr_obj,) = encode(ct, [cls_result(ct.volume, probability=0.2, ood=True)])
    path = save(sr_obj, tmp_path)
    assert_valid(path, "SR")
    sr = hd.sr.srread(path)
    assert sr.CompletionFlag == "PARTIAL"
    (group,) = report(sr).get_image_measurement_groups()
    assert evaluations(group) == {
        ("52988006", "SCT"): ("272519000", "SCT"),  # Lesion: Absent
        concept(OUT_OF_DISTRIBUTION): ("373066001", "SCT"),  # Yes
    }


def test_no_results_no_objects_and_bad_masks_refused(ct: Phantom) -> None:
    assert encode(ct, []) == []
    wrong = seg_result(ct.volume, ct.masks())
    wrong.masks[1] = wrong.masks[1][:-1]
    with pytest.raises(EncodeError, match="does not fit"):
        encode(ct, [wrong])


def test_multi_frame_source(tmp_path: Path) -> None:
    """An Enhanced CT with shuffled frames (a minimal one, from the preprocess
    tests): the SEG's frames follow the source's frames."""
    from tests.test_preprocess import SMALL, enhanced_ct

    order = list(range(SMALL.slices))
    random.Random(3).shuffle(order)
    path = tmp_path / "enhanced.dcm"
    ds = enhanced_ct(SMALL, order)
    for keyword in ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
                    "AccessionNumber", "ReferringPhysicianName"):  # fmt: skip
        setattr(ds, keyword, "")  # Type 2: highdicom copies them
    ds.save_as(path, enforce_file_format=True)
    volume = load_series([path])
    mask = np.zeros(volume.array.shape, dtype=bool)
    mask[2:5, 4:9, 3:7] = True
    source = read_source([path], volume)
    phantom = Phantom(tmp_path, [path], volume, source, mask.astype(np.uint8))
    seg_obj, sr_obj = encode(phantom, [seg_result(volume, {1: mask})])
    seg = hd.seg.segread(save(seg_obj, tmp_path))
    pixels = seg.get_pixels_by_source_frame(
        volume.sop_instance_uids[0],
        source_frame_numbers=list(volume.frame_numbers),
        assert_missing_frames_are_empty=True,
    )
    assert np.array_equal(pixels[..., 0].astype(bool), mask)
    (group,) = report(hd.sr.srread(save(sr_obj, tmp_path))).get_volumetric_roi_measurement_groups()
    assert group.referenced_segment is not None
    (image,) = group.referenced_segment.source_images_for_segmentation
    assert image.referenced_frame_numbers == [volume.frame_numbers[k] for k in (2, 3, 4)]


def uids(objects: list[EncodedObject]) -> list[tuple[str, str, int]]:
    return [
        (o.dataset.SeriesInstanceUID, o.dataset.SOPInstanceUID, o.dataset.SeriesNumber)
        for o in objects
    ]


def test_uids_are_deterministic(ct: Phantom) -> None:
    results = [seg_result(ct.volume, ct.masks()), cls_result(ct.volume)]
    first = uids(encode(ct, results))
    assert uids(encode(ct, results)) == first  # a redelivered job: the same objects
    assert all(
        is_valid_uid(u) and u.startswith(PYDICOM_ROOT_UID) for s, i, _ in first for u in (s, i)
    )
    (seg, sr) = first
    # An update job of the study: a new report in the same series, the same SEG.
    (seg2, sr2) = uids(encode(ct, results, job_id=2))
    assert seg2 == seg and sr2[0] == sr[0] and sr2[1] != sr[1]
    # The series lost its last slice: a new SEG instance in the same SEG series.
    shorter = replace(ct, source=replace(ct.source, images=ct.source.images[:-1]))
    masks = {n: m[:-1] for n, m in ct.masks().items()}
    (seg3, _) = uids(encode(shorter, [seg_result(ct.volume, masks)]))
    assert seg3[0] == seg[0] and seg3[1] != seg[1] and seg3[2] == seg[2]
    # Other SEG options: another instance too.
    (seg4, _) = uids(encode(ct, results, segmentation_type="FRACTIONAL"))
    assert seg4[0] == seg[0] and seg4[1] != seg[1]


# -- the encode stage on a real node's index and spool --------------------------


def install_segmenter(root: Path) -> Path:
    """A models folder whose segmenter passes the registry's checks (its
    weights are never loaded: the results are made by hand)."""
    import hashlib

    folder = root / SEGMENTER
    folder.mkdir(parents=True)
    weights = b"not a real model"
    (folder / "model.weights.h5").write_bytes(weights)
    data = {
        **SEGMENTER_DATA,
        "weights": {"file": "model.weights.h5", "sha256": hashlib.sha256(weights).hexdigest()},
    }
    (folder / "manifest.yaml").write_text(yaml.safe_dump(data))
    return root


def test_encode_stage_stores_and_indexes_outputs_without_a_new_job(
    make_node: Any, ct: Phantom, tmp_path: Path
) -> None:
    empty = tmp_path / "no-models"
    empty.mkdir()
    node: Node = make_node(config=node_config(completion=FAST, models_dir=str(empty))).start()
    storescu(node, ct.folder / "CT")
    (job,) = wait_for(
        lambda: (j := jobs(node)) and j[0].state == "succeeded" and j, timeout=60, what="job"
    )
    settings = Settings(
        data_dir=node.data_dir,
        database_url=node.database_url,
        models_dir=install_segmenter(tmp_path / "models"),
        ae_title="PACSNODE",
    )
    engine = create_db_engine(node.database_url)

    def run_stages(results: list[ModelResult]) -> pipeline.JobContext:
        """The stages as pipeline.run calls them, with results made by hand
        in place of infer's."""
        ctx = pipeline.JobContext(job_id=job.id, study_instance_uid="", settings=settings)
        pipeline.load(ctx, engine)
        for series in ctx.series:
            ctx.volumes[series.series_instance_uid] = load_series(series.paths)
        volume = ctx.volumes[ct.volume.series_instance_uid]
        assert volume.sop_instance_uids == ct.volume.sop_instance_uids
        ctx.results = results
        pipeline.persist(ctx, engine)
        pipeline.encode(ctx, engine)
        return ctx

    try:
        ctx = run_stages([seg_result(ct.volume, ct.masks()), cls_result(ct.volume)])
        assert [(o.kind, o.model_name) for o in ctx.outputs] == [("SEG", SEGMENTER), ("SR", "")]
        assert ctx.outputs[1].model_names == (SEGMENTER, CLASSIFIER)
        for out in ctx.outputs:
            ds = pydicom.dcmread(settings.spool_dir / out.relpath, stop_before_pixels=True)
            assert (ds.SOPInstanceUID, ds.SOPClassUID) == (out.sop_instance_uid, out.sop_class_uid)
            assert ds.SeriesInstanceUID == out.series_instance_uid
        assert ctx.outputs[0].source_series_instance_uid == ct.volume.series_instance_uid
        assert list((settings.spool_dir / ".incoming").iterdir()) == []
        with engine.connect() as conn:
            rows = conn.execute(
                select(
                    Instance.sop_instance_uid,
                    Instance.path,
                    Instance.calling_ae_title,
                    Instance.peer_host,
                    Series.modality,
                    Study.study_instance_uid,
                )
                .join(Series, Instance.series_pk == Series.id)
                .join(Study, Series.study_pk == Study.id)
                .where(Instance.id.in_([o.instance_pk for o in ctx.outputs]))
                .order_by(Instance.id)
            ).all()
            assert [tuple(r) for r in rows] == [
                (o.sop_instance_uid, o.relpath, "PACSNODE", "", kind, ct.study_uid)
                for o, kind in zip(ctx.outputs, ("SEG", "SR"), strict=True)
            ]
            assert conn.execute(select(func.count(Patient.id))).scalar_one() == 1
            assert conn.execute(select(func.count(Study.id))).scalar_one() == 1
            # The assembler was not told: no group assembles again, no new job.
            assert set(conn.execute(select(Assembly.state)).scalars()) == {"triggered"}
            assert conn.execute(select(func.count(Job.id))).scalar_one() == 1
            count = conn.execute(select(func.count(Instance.id))).scalar_one()
        assert count == len(ct.paths) + 2

        # A redelivered job writes the same objects again: same files, same rows.
        again = run_stages([seg_result(ct.volume, ct.masks()), cls_result(ct.volume)])
        same = [(o.sop_instance_uid, o.relpath, o.instance_pk) for o in again.outputs]
        assert same == [(o.sop_instance_uid, o.relpath, o.instance_pk) for o in ctx.outputs]
        with engine.connect() as conn:
            assert conn.execute(select(func.count(Instance.id))).scalar_one() == count
        # The next job's inputs are the CT alone: the outputs are skipped.
        later = pipeline.JobContext(job_id=job.id, study_instance_uid="", settings=settings)
        pipeline.load(later, engine)
        assert [s.series_instance_uid for s in later.series] == [ct.volume.series_instance_uid]
        assert sorted(later.skipped) == sorted(o.series_instance_uid for o in ctx.outputs)
        assert len(jobs(node)) == 1
    finally:
        engine.dispose()
