"""Phantom studies: CT, PET and MR T1/T2 of one synthetic patient.

:func:`generate_study` returns everything in memory as numpy arrays (for
training); :func:`write_study` writes the DICOM series plus the ground truth
beside them; :func:`study_datasets` yields the data sets for sending.

All series share one Frame of Reference: each is rasterised from the same
anatomy in patient space onto its own grid. The CT grid is the reference grid
of the ground truth (lesion and tissue maps). Same seed, same pixel data and
same UIDs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from pacsnode.lab.phantom.anatomy import PROPERTIES, Anatomy, Tissue, build_anatomy
from pacsnode.lab.phantom.dicom import (
    SOP_CLASSES,
    SYNTHETIC,
    MrSequence,
    PetAcquisition,
    SeriesImage,
    StudyHeader,
    series_datasets,
    uid,
)
from pacsnode.lab.phantom.imaging import ct_hu, lesion_mask, mr_signal, pt_suv
from pacsnode.lab.phantom.lesions import Focus, Lesion, place_foci, place_lesions
from pacsnode.workers.geometry import Grid

MODALITIES = ("CT", "PT", "MR")
TRUTH_FORMAT = "pacsnode-phantom-truth"
TRUTH_VERSION = 1
TRUTH_FILE = "ground_truth.json"
MASKS_FILE = "masks.npz"
MR_SEQUENCES = {
    "MR_T1": MrSequence("T1 SE", 500.0, 15.0, 1, "NONE", "se2d1"),
    "MR_T2": MrSequence("T2 TSE", 4000.0, 100.0, 16, "SK", "tse2d1_16"),
}


@dataclass(frozen=True)
class StudySpec:
    """What to generate. Lengths in mm; CT grid first, the others derived.

    - ``size`` x ``size`` CT pixels over ``fov_mm``; ``slices`` CT slices over
      ``z_extent_mm`` centred at ``z_centre_mm`` (the default covers the lower
      chest and the upper abdomen: lungs, heart, liver, spleen, kidneys).
    - ``lesions``: None draws 1-5 from the seed; 0 makes a normal study.
    - ``foci``: physiological PET hot spots; None draws 1-3.
    - ``pt_size`` (default ``size // 4``) and ``mr_size`` (``size // 2``) set
      the PET and MR matrices; their fields of view, slice steps and extents
      differ from the CT on purpose.
    - ``noise``: scale of the image noise (0: noiseless, for exact checks).
    """

    seed: int = 0
    modalities: tuple[str, ...] = MODALITIES
    size: int = 512
    slices: int = 200
    fov_mm: float = 400.0
    z_extent_mm: float = 400.0
    z_centre_mm: float = -60.0
    lesions: int | None = None
    foci: int | None = None
    pt_size: int | None = None
    mr_size: int | None = None
    noise: float = 1.0

    def __post_init__(self) -> None:
        unknown = set(self.modalities) - set(MODALITIES)
        if unknown or not self.modalities:
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}")
        if self.size < 8 or self.slices < 1:
            raise ValueError("size must be at least 8 and slices at least 1")
        if self.lesions is not None and not 0 <= self.lesions <= 200:
            raise ValueError("lesions must be between 0 and 200")
        if self.fov_mm <= 0 or self.z_extent_mm <= 0 or self.noise < 0:
            raise ValueError("fov_mm and z_extent_mm must be positive, noise not negative")

    def ct_grid(self) -> Grid:
        pixel, step = self.fov_mm / self.size, self.z_extent_mm / self.slices
        return Grid.centred(
            (self.slices, self.size, self.size), (step, pixel, pixel), (0.0, 0.0, self.z_centre_mm)
        )

    def pt_grid(self) -> Grid:
        """Coarser: 1.25 x the CT field of view, 1.5 x its slice step, 1.2 x its extent."""
        size = self.pt_size or max(16, self.size // 4)
        pixel, step = 1.25 * self.fov_mm / size, 1.5 * self.z_extent_mm / self.slices
        slices = max(1, round(1.2 * self.z_extent_mm / step))
        centre = (0.0, 0.0, self.z_centre_mm + 0.03 * self.z_extent_mm)
        return Grid.centred((slices, size, size), (step, pixel, pixel), centre)

    def mr_grid(self) -> Grid:
        """0.95 x the CT field of view, 2.5 x its slice step over 0.8 x its extent."""
        size = self.mr_size or max(16, self.size // 2)
        pixel, step = 0.95 * self.fov_mm / size, 2.5 * self.z_extent_mm / self.slices
        slices = max(1, round(0.8 * self.z_extent_mm / step))
        centre = (0.0, 10.0, self.z_centre_mm - 0.05 * self.z_extent_mm)
        return Grid.centred((slices, size, size), (step, pixel, pixel), centre)


@dataclass(frozen=True, eq=False)
class Study:
    """A generated study in memory.

    ``series`` maps "CT", "PT", "MR_T1", "MR_T2" (those requested) to images
    whose arrays ascend along the slice normal. ``lesion_mask`` (0 = none,
    else the lesion's label) and ``tissues`` (:class:`Tissue` values) lie on
    ``reference`` (the CT grid), also when no CT series was requested.
    """

    spec: StudySpec
    header: StudyHeader
    reference: Grid
    series: dict[str, SeriesImage]
    lesion_mask: np.ndarray
    tissues: np.ndarray
    lesions: list[Lesion]
    foci: list[Focus]
    pet: PetAcquisition
    anatomy: Anatomy

    @property
    def instance_count(self) -> int:
        """Instances :func:`study_datasets` yields: one per slice of each series."""
        return sum(image.grid.shape[0] for image in self.series.values())

    def sop_classes(self) -> list[str]:
        """The SOP Class UIDs of the study's series, for presentation contexts."""
        return sorted({str(SOP_CLASSES[image.modality]) for image in self.series.values()})

    def truth(self) -> dict[str, Any]:
        """The ground truth as JSON-ready data (see :data:`TRUTH_FORMAT`)."""
        return _truth(self)


def generate_study(spec: StudySpec) -> Study:
    """Generate all requested series and the ground truth, without writing anything."""
    rng = np.random.default_rng(spec.seed)
    anatomy = build_anatomy(rng)
    reference = spec.ct_grid()
    diagonal = math.sqrt(sum(s * s for s in reference.spacing))
    count = int(rng.integers(1, 6)) if spec.lesions is None else spec.lesions
    lesions = place_lesions(anatomy, reference, count, rng, min_diameter=1.05 * diagonal)
    n_foci = int(rng.integers(1, 4)) if spec.foci is None else spec.foci
    foci = place_foci(anatomy, reference, lesions, n_foci, rng)
    # independent streams per series: adding a modality leaves the others unchanged
    streams = dict(zip(("CT", "PT", "MR_T1", "MR_T2"), rng.spawn(4), strict=True))
    tissues = anatomy.labels(reference)
    mask = lesion_mask(reference, lesions)
    header = StudyHeader(
        study_instance_uid=str(uid(spec.seed, "phantom study", "study")),
        frame_of_reference_uid=str(uid(spec.seed, "phantom study", "frame")),
        patient_id=f"PHANTOM-{spec.seed:06d}"[-16:],
        patient_name="Phantom^Synthetic",
        accession_number=f"PH{spec.seed:08d}"[-16:],
        study_description="Synthetic phantom, for testing and demonstration only",
        body_part="CHEST",
    )
    pet = PetAcquisition()
    series: dict[str, SeriesImage] = {}

    def image(
        key: str, modality: str, grid: Grid, array: np.ndarray, number: int, description: str,
        thickness: float, mr: MrSequence | None = None,
    ) -> SeriesImage:  # fmt: skip
        uid_parts = (spec.seed, "phantom study", key)
        text = f"{description} (synthetic phantom)"
        return SeriesImage(key, modality, grid, array, number, text, uid_parts, thickness, mr)

    if "CT" in spec.modalities:
        hu = ct_hu(tissues, mask, lesions, streams["CT"], spec.noise)
        step = reference.spacing[0]
        series["CT"] = image("CT", "CT", reference, hu, 1, f"CT axial {step:.3g} mm", step)
    if "PT" in spec.modalities:
        grid = spec.pt_grid()
        suv = pt_suv(anatomy, grid, lesions, foci, streams["PT"], spec.noise)
        bqml = suv * np.float32(pet.bqml_per_suv(header.patient_weight_kg))
        series["PT"] = image("PT", "PT", grid, bqml, 2, "PET FDG AC", grid.spacing[0])
    if "MR" in spec.modalities:
        grid = spec.mr_grid()
        for number, (key, sequence) in enumerate(MR_SEQUENCES.items(), start=3):
            signal = mr_signal(
                anatomy, grid, lesions, sequence.repetition_ms, sequence.echo_ms,
                streams[key], spec.noise,
            )  # fmt: skip
            description = f"MR {sequence.label} axial"
            thickness = 0.8 * grid.spacing[0]  # a gap between slices, as usual in 2-D MR
            series[key] = image(key, "MR", grid, signal, number, description, thickness, sequence)
    return Study(spec, header, reference, series, mask, tissues, lesions, foci, pet, anatomy)


def study_datasets(study: Study) -> Iterator[Dataset]:
    """Every instance of the study, series by series."""
    for image in study.series.values():
        yield from series_datasets(study.header, image, study.pet)


@dataclass(frozen=True)
class WrittenStudy:
    folder: Path
    series: dict[str, list[Path]]
    truth: Path
    masks: Path


def write_study(folder: Path, study: Study | StudySpec) -> WrittenStudy:
    """Write ``<folder>/<series key>/<key><nnnn>.dcm`` per series, plus
    ``ground_truth.json`` and ``masks.npz`` (lesion and tissue maps on the CT grid)."""
    if isinstance(study, StudySpec):
        study = generate_study(study)
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {}
    for key, image in study.series.items():
        directory = folder / key
        directory.mkdir(exist_ok=True)
        paths = []
        for n, ds in enumerate(series_datasets(study.header, image, study.pet), start=1):
            path = directory / f"{image.modality}{n:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        written[key] = paths
    grid = study.reference
    masks = folder / MASKS_FILE
    np.savez_compressed(
        masks,
        lesions=study.lesion_mask,
        tissues=study.tissues,
        spacing=np.asarray(grid.spacing),
        origin=np.asarray(grid.origin),
        direction=grid.direction,
    )
    truth = folder / TRUTH_FILE
    truth.write_text(json.dumps(study.truth(), indent=2) + "\n")
    return WrittenStudy(folder, written, truth, masks)


def _grid_json(grid: Grid) -> dict[str, Any]:
    return {
        "shape": list(grid.shape),
        "spacing": list(grid.spacing),
        "origin": list(grid.origin),
        "direction": grid.direction.tolist(),
    }


def _rounded(values: np.ndarray, digits: int = 3) -> list[float]:
    return [round(float(v), digits) for v in values]


def _truth(study: Study) -> dict[str, Any]:
    voxel = study.reference.voxel_volume
    counts = np.bincount(study.lesion_mask.ravel(), minlength=len(study.lesions) + 1)
    lesions = []
    for lesion in study.lesions:
        voxels = int(counts[lesion.label])
        diameters = 2 * lesion.semi_axes
        lesions.append(
            {
                "label": lesion.label,
                "kind": lesion.kind,
                "organ": lesion.organ.name.lower(),
                "malignant": lesion.malignant,
                "avid": lesion.avid,
                "centre_mm": _rounded(lesion.centre),
                "semi_axes_mm": _rounded(lesion.semi_axes),
                "axes": np.round(lesion.rotation, 6).T.tolist(),
                "diameter_mm": round(float(diameters.max()), 3),
                "equivalent_diameter_mm": round(float(np.prod(diameters) ** (1 / 3)), 3),
                "volume_mm3": round(lesion.volume_mm3, 3),
                "mask_voxels": voxels,
                "mask_volume_mm3": round(voxels * voxel, 3),
                "hu": lesion.hu,
                "contrast_hu": lesion.contrast_hu,
                "conspicuity": "subtle" if lesion.subtle else "obvious",
                "suv": lesion.suv,
                "in_field": {
                    key: image.grid.contains_point(lesion.centre)
                    for key, image in study.series.items()
                },
            }
        )
    foci = [
        {
            "centre_mm": _rounded(f.centre),
            "diameter_mm": round(2 * f.radius, 3),
            "suv": f.suv,
            "site": f.site,
            "tissue": f.tissue.name.lower(),
        }
        for f in study.foci
    ]
    spec = asdict(study.spec)
    spec["modalities"] = list(study.spec.modalities)
    header = study.header
    return {
        "format": TRUTH_FORMAT,
        "version": TRUTH_VERSION,
        "note": SYNTHETIC,
        "spec": spec,
        "study_instance_uid": header.study_instance_uid,
        "frame_of_reference_uid": header.frame_of_reference_uid,
        "reference_grid": {"series": "CT", **_grid_json(study.reference)},
        "series": {
            key: {
                "series_instance_uid": image.series_instance_uid,
                "modality": image.modality,
                "description": image.description,
                "folder": key,
                **_grid_json(image.grid),
            }
            for key, image in study.series.items()
        },
        "labels": {
            "has_lesion": bool(study.lesions),
            "lesion_count": len(study.lesions),
            "any_malignant": any(x.malignant for x in study.lesions),
            "any_avid": any(x.avid for x in study.lesions),
            "any_malignant_avid": any(x.malignant and x.avid for x in study.lesions),
            "physiological_foci": len(study.foci),
        },
        "lesions": lesions,
        "foci": foci,
        "pet": {
            "units": "BQML",
            "bqml_per_suv": round(study.pet.bqml_per_suv(header.patient_weight_kg), 4),
            "injected_dose_bq": study.pet.injected_dose_bq,
            "patient_weight_kg": header.patient_weight_kg,
            "myocardium_suv": round(study.anatomy.myocardium_suv, 3),
        },
        "tissues": {t.name.lower(): {"label": int(t), **asdict(PROPERTIES[t])} for t in Tissue},
    }
