"""DICOM-SEG and a TID 1500 Measurement Report from one job's model results.

Objects are built only through highdicom's classes (STYLE 8), in memory;
:mod:`workers.outputs` names them (UIDs, series numbers, descriptions) and
writes them to the spool and the index.

- **One DICOM-SEG per (segmentation model, source series).** Segment ``n`` is
  the manifest's output ``n`` (the segment numbers of ``db.results`` rows), with
  its segment property category and type, algorithm identification (model
  name, version, family Artificial Intelligence, weights SHA-256) and a
  tracking UID shared with the SR's measurement group of that segment.
  ``settings.seg`` picks BINARY (default), FRACTIONAL or LABELMAP and
  ``omit_empty_frames``. Results hold boolean masks only, so FRACTIONAL stores
  0 and 1 (probability 0 or 1), not the model's voxel probabilities. A LABELMAP
  cannot hold overlapping segments: such a SEG is written BINARY (logged).
- **A model that segmented nothing gets no SEG.** highdicom would encode every
  frame of an all-empty SEG, which helps no reader; the SR's finding group of
  that model says Absent with a volume of 0 mm³ instead.
- **One Comprehensive 3D SR per job** (TID 1500): per finding a TID 1501 group
  (finding present/absent, probability, out-of-distribution flag and score),
  per segment with voxels a TID 1411 group (volume in mm³, the SEG segment with
  the source images it lies on, the OOD flag). Every group names its model in
  its algorithm identification (with the weights' SHA-256) and its tracking
  identifier (with the source series number); the observer is the node as a
  device. The evidence lists the SEGs and every source image. Finding groups
  do not list the source images one by one, nor does the report have an Image
  Library: at 200 slices either made the SR take seconds instead of 0.1 s.
  Completion flag COMPLETE when no result is out of distribution, PARTIAL
  otherwise (a flagged input means the models' answer is not the whole story);
  verification flag UNVERIFIED, preliminary flag PRELIMINARY. The OOD concepts
  are local codes (scheme ``99PACSNODE``, declared in the Coding Scheme
  Identification Sequence): DICOM has none for them, and dciodvfy warns
  "Unrecognized defined term" for each use.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from highdicom.sr import MeasurementsAndQualitativeEvaluations as FindingGroup  # TID 1501
from highdicom.sr import (
    VolumetricROIMeasurementsAndQualitativeEvaluations as SegmentGroup,  # TID 1411
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

import pacsnode
from pacsnode.core.errors import EncodeError
from pacsnode.core.settings import SegOptions
from pacsnode.db.results import Code, FindingRecord
from pacsnode.models.manifest import Code as ManifestCode
from pacsnode.models.manifest import ModelManifest
from pacsnode.workers import outputs
from pacsnode.workers.infer import ModelResult
from pacsnode.workers.outputs import DISCLAIMER, MANUFACTURER, EncodedObject, derived_uid, equipment
from pacsnode.workers.volume import Volume

log = logging.getLogger(__name__)

# Local concepts (PS3.16 §8: a "99" coding scheme is private to its user).
OUT_OF_DISTRIBUTION = hd.sr.CodedConcept("OOD", "99PACSNODE", "Input out of distribution")
OOD_SCORE = hd.sr.CodedConcept("OODSCORE", "99PACSNODE", "Out-of-distribution score")
LOCAL_CODES = hd.coding_schemes.CodingSchemeIdentificationItem(
    designator="99PACSNODE", name="pacsnode local concepts", responsible_organization="pacsnode"
)
# CID 100 procedure codes by source modality.
PROCEDURES = {
    "CT": codes.LN.CTUnspecifiedBodyRegion,
    "MR": codes.LN.MRIUnspecifiedBodyRegion,
    "PT": codes.LN.PETUnspecifiedBodyRegion,
    "NM": codes.LN.NMUnspecifiedBodyRegion,
}
SegKey = tuple[str, str, str]  # model name, model version, source SeriesInstanceUID


@dataclass(frozen=True)
class SourceSeries:
    """A source series as the encoders need it: image headers (no pixel data)
    in the volume's slice order, or one multi-frame image whose frame
    ``frame_numbers[k]`` is slice ``k``."""

    series_instance_uid: str
    modality: str
    images: tuple[Dataset, ...]
    frame_numbers: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        """The series in tracking identifiers: ``", series 3"`` (empty without
        a SeriesNumber)."""
        number = self.images[0].get("SeriesNumber")
        return "" if number in (None, "") else f", series {number}"


def read_source(paths: Sequence[Path], volume: Volume) -> SourceSeries:
    """The headers of ``paths`` in the slice order of ``volume``."""
    headers = {}
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        headers[str(ds.SOPInstanceUID)] = ds
    uids = list(dict.fromkeys(volume.sop_instance_uids))
    if volume.frame_numbers and len(uids) != 1:
        raise EncodeError(
            f"series {volume.series_instance_uid}: a SEG can reference one multi-frame "
            f"image, not {len(uids)}"
        )
    images = tuple(headers[uid] for uid in uids)
    return SourceSeries(volume.series_instance_uid, volume.modality, images, volume.frame_numbers)


def _coded(code: Code | ManifestCode) -> hd.sr.CodedConcept:
    if isinstance(code, Code):
        return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)
    return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning, code.scheme_version)


def _tracking_uid(study_uid: str, result: ModelResult, *what: object) -> str:
    m = result.model
    return derived_uid("tracking", study_uid, m.name, m.version, result.series_instance_uid, *what)


def _pixel_array(
    masks: Mapping[int, np.ndarray], segments: int, shape: tuple[int, ...], where: str
) -> tuple[np.ndarray, bool]:
    """(pixels, overlap): one label array (z, y, x) when no voxel lies in two
    segments (highdicom encodes it several times faster than a stack), else a
    (z, y, x, segment) boolean stack."""
    labels = np.zeros(shape, dtype=np.uint8 if segments < 256 else np.uint16)
    overlap = False
    for number, mask in sorted(masks.items()):
        if not 1 <= number <= segments or mask.shape != shape:
            raise EncodeError(f"{where}: segment {number} {mask.shape} does not fit {shape}")
        overlap = overlap or bool(labels[mask].any())
        labels[mask] = number
    if not overlap:
        return labels, False
    stack = np.zeros((*shape, segments), dtype=bool)
    for number, mask in masks.items():
        stack[..., number - 1] = mask
    return stack, True


def build_seg(
    study_uid: str,
    result: ModelResult,
    manifest: ModelManifest,
    source: SourceSeries,
    options: SegOptions,
    ae_title: str,
) -> hd.seg.Segmentation | None:
    """The SEG of one segmentation result; None when no voxel is segmented."""
    model, series_uid = result.model, source.series_instance_uid
    where = f"series {series_uid} model {model.name}@{model.version}"
    if not any(mask.any() for mask in result.masks.values()):
        log.info("%s: nothing segmented, no SEG", where)
        return None
    first = source.images[0]
    shape = (len(source.frame_numbers or source.images), int(first.Rows), int(first.Columns))
    pixels, overlap = _pixel_array(result.masks, len(manifest.outputs), shape, where)
    if source.frame_numbers:  # multi-frame source: SEG frames follow its frames
        frames = np.zeros((int(first.NumberOfFrames), *pixels.shape[1:]), dtype=pixels.dtype)
        frames[np.asarray(source.frame_numbers) - 1] = pixels
        pixels = frames
    kind = options.segmentation_type
    if kind == "LABELMAP" and overlap:
        log.warning("%s: overlapping segments, SEG written BINARY, not LABELMAP", where)
        kind = "BINARY"
    algorithm = hd.AlgorithmIdentificationSequence(
        name=model.name,
        family=codes.cid7162.ArtificialIntelligence,
        version=model.version,
        source=MANUFACTURER,
        parameters={"weights_sha256": model.weights_sha256},
    )
    segments = []
    for number, output in enumerate(manifest.outputs, start=1):
        if output.segment is None:
            raise EncodeError(f"{where}: output {output.name} has no segment properties")
        segments.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=output.name,
                segmented_property_category=_coded(output.segment.category),
                segmented_property_type=_coded(output.segment.type),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_uid=_tracking_uid(study_uid, result, "segment", number),
                tracking_id=f"{model.name} {output.name}",
            )
        )
    source_uids = [str(image.SOPInstanceUID) for image in source.images]
    series, instance = outputs.seg_uids(study_uid, model, series_uid, source_uids, options)
    return hd.seg.Segmentation(
        source_images=list(source.images),
        pixel_array=pixels,
        segmentation_type=kind,
        segment_descriptions=segments,
        series_instance_uid=series,
        series_number=outputs.seg_series_number(model.name, series_uid),
        sop_instance_uid=instance,
        instance_number=1,
        content_description=DISCLAIMER,
        content_label="AI_SEG",
        omit_empty_frames=options.omit_empty_frames,
        series_description=outputs.description(f"AI SEG {model.name} {model.version}"),
        **equipment(ae_title),
    )


def _flag(value: bool) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept.from_code(codes.SCT.Yes if value else codes.SCT.No)


def _finding_group(
    study_uid: str, result: ModelResult, finding: FindingRecord, source: SourceSeries,
    algorithm: hd.sr.AlgorithmIdentification, nothing_segmented: bool,
    contributing: Sequence[SourceSeries] = (),
) -> FindingGroup:  # fmt: skip
    """TID 1501: one finding of one model on one series. A fusion model's
    finding names the images of every contributing series as its Source
    (TID 1501 row 13, "Source of Measurement" by image reference)."""
    model, code = result.model, finding.code
    measurements = [
        hd.sr.Measurement(codes.DCM.Probability, finding.probability, codes.UCUM.NoUnits)
    ]
    if finding.ood_score is not None:
        measurements.append(hd.sr.Measurement(OOD_SCORE, finding.ood_score, codes.UCUM.NoUnits))
    if nothing_segmented:
        measurements.append(hd.sr.Measurement(codes.SCT.Volume, 0.0, codes.UCUM.CubicMillimeter))
    present = codes.SCT.Present if finding.positive else codes.SCT.Absent
    return FindingGroup(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=_tracking_uid(study_uid, result, "finding", code),
            identifier=f"{model.name} {model.version} {code.meaning}{source.label}",
        ),
        finding_type=_coded(code),
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(_coded(code), present),
            hd.sr.QualitativeEvaluation(OUT_OF_DISTRIBUTION, _flag(finding.ood)),
        ],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup.from_source_image(image)
            for series in contributing
            for image in series.images
        ]
        or None,
    )


def _segment_groups(
    study_uid: str, result: ModelResult, seg: hd.seg.Segmentation, source: SourceSeries,
    algorithm: hd.sr.AlgorithmIdentification,
) -> list[SegmentGroup]:  # fmt: skip
    """TID 1411: the volume of each segment with voxels, its SEG segment and
    the source images it lies on (built here: highdicom's
    ``ReferencedSegment.from_segmentation`` fails on a one-segment SEG)."""
    model, groups = result.model, []
    from_image = hd.sr.SourceImageForSegmentation.from_source_image
    for segment in result.segments:
        number, mask = segment.segment_number, result.masks.get(segment.segment_number)
        if mask is None or not mask.any():
            continue
        slices = np.flatnonzero(mask.any(axis=(1, 2)))
        if source.frame_numbers:
            frames = [source.frame_numbers[k] for k in slices]
            images = [from_image(source.images[0], referenced_frame_numbers=frames)]
        else:
            images = [from_image(source.images[k]) for k in slices]
        referenced = hd.sr.ReferencedSegment(
            seg.SOPClassUID, seg.SOPInstanceUID, number, source_images=images
        )
        volume = hd.sr.Measurement(codes.SCT.Volume, segment.volume_mm3, codes.UCUM.CubicMillimeter)
        groups.append(
            SegmentGroup(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=_tracking_uid(study_uid, result, "segment", number),
                    identifier=f"{model.name} {model.version} segment {number}{source.label}",
                ),
                referenced_segment=referenced,
                finding_type=_coded(segment.code),
                algorithm_id=algorithm,
                measurements=[volume],
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(OUT_OF_DISTRIBUTION, _flag(segment.ood))
                ],
            )
        )
    return groups


def build_sr(
    study_uid: str,
    job_id: int,
    results: Sequence[ModelResult],
    segs: Mapping[SegKey, hd.seg.Segmentation],
    sources: Mapping[str, SourceSeries],
    ae_title: str,
) -> hd.sr.Comprehensive3DSR:
    """The job's Measurement Report."""
    groups: list[FindingGroup | SegmentGroup] = []
    ood = False
    for result in results:
        model, source = result.model, sources[result.series_instance_uid]
        algorithm = hd.sr.AlgorithmIdentification(
            model.name, model.version, parameters=[f"weights_sha256={model.weights_sha256}"]
        )
        seg = segs.get((model.name, model.version, result.series_instance_uid))
        empty = model.task == "segmentation" and seg is None
        contributing = [sources[uid] for _, uid in result.sources]
        for finding in result.findings:
            ood |= finding.ood
            groups.append(
                _finding_group(study_uid, result, finding, source, algorithm, empty, contributing)
            )
        if seg is not None:
            ood |= any(s.ood for s in result.segments)
            groups += _segment_groups(study_uid, result, seg, source, algorithm)
    used_uids = [
        uid for r in results for uid in (r.series_instance_uid, *(u for _, u in r.sources))
    ]
    used = [sources[uid] for uid in dict.fromkeys(used_uids)]
    generic = codes.LN.DiagnosticImagingReport
    procedures = dict.fromkeys(PROCEDURES.get(s.modality, generic) for s in used)
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid("device", ae_title),
        name=ae_title,
        manufacturer_name=MANUFACTURER,
        model_name=f"{MANUFACTURER} {pacsnode.__version__}",
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(codes.DCM.Device, device)
        ),
        procedure_reported=list(procedures),
        imaging_measurements=groups,
    )
    series, instance = outputs.sr_uids(study_uid, job_id)
    return hd.sr.Comprehensive3DSR(
        evidence=[*segs.values(), *(image for s in used for image in s.images)],
        content=report,
        series_instance_uid=series,
        series_number=outputs.SR_SERIES_NUMBER,
        sop_instance_uid=instance,
        instance_number=1,
        is_complete=not ood,
        is_final=False,
        is_verified=False,
        series_description=outputs.description("AI SR measurement report"),
        coding_schemes=[LOCAL_CODES],
        **equipment(ae_title),
    )


def encode_job(
    study_uid: str,
    job_id: int,
    results: Sequence[ModelResult],
    manifests: Mapping[tuple[str, str], ModelManifest],
    sources: Mapping[str, SourceSeries],
    options: SegOptions,
    ae_title: str,
) -> list[EncodedObject]:
    """The SEGs and the SR of one job (nothing when no model ran).
    ``manifests`` by (name, version), ``sources`` by SeriesInstanceUID."""
    objects: list[EncodedObject] = []
    segs: dict[SegKey, hd.seg.Segmentation] = {}
    for result in results:
        model, series_uid = result.model, result.series_instance_uid
        if model.task != "segmentation":
            continue
        manifest = manifests.get((model.name, model.version))
        if manifest is None:
            raise EncodeError(f"model {model.name}@{model.version} is no longer installed")
        seg = build_seg(study_uid, result, manifest, sources[series_uid], options, ae_title)
        if seg is not None:
            segs[(model.name, model.version, series_uid)] = seg
            objects.append(EncodedObject(seg, "SEG", (model.name,), series_uid))
    if results:
        sr = build_sr(study_uid, job_id, results, segs, sources, ae_title)
        names = tuple(dict.fromkeys(r.model.name for r in results))
        objects.append(EncodedObject(sr, "SR", names, ""))
    return objects
