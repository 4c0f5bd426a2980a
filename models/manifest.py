"""The YAML manifest that describes one model (docs/architecture.md §5).

A model is a folder ``<models_dir>/<folder>/`` holding ``manifest.yaml`` and
its weights file. The manifest says what the model is (name, version, task),
which series it applies to, how its input is prepared, what its outputs mean
as coded concepts, and which thresholds turn its numbers into findings. The
registry (:mod:`models.registry`) reads every manifest at start-up, so a
mistake stops the node with a message naming the file and the key instead of
surfacing as a wrong result on a patient's study.

Everything here is plain data and validation: no TensorFlow, so the SCP and
the CLI can read manifests cheaply. ``models/example-manifest.yaml`` shows
every field.

Selection rules use DICOM attribute keywords in snake case (``modality`` for
Modality (0008,0060), ``body_part_examined`` for (0018,0015), …) and match a
:class:`SeriesInfo`, a small summary of one series.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from pacsnode.core.errors import ModelConfigError
from pacsnode.models.inputspec import PreprocessSpec

MANIFEST_FILE = "manifest.yaml"
# Bump when a field changes meaning; a manifest written for another format
# version is refused rather than misread.
MANIFEST_VERSION = 1

Task = Literal["classification", "segmentation", "fusion", "sequence", "anomaly"]

Slug = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]+(?:[-_][a-z0-9]+)*$", max_length=64)]


def _quoted(value: Any) -> Any:
    """YAML reads ``1.10`` as the float 1.1 and ``0123`` as an octal number:
    version strings and code values must be quoted to survive unchanged."""
    if not isinstance(value, str):
        raise ValueError(f"write {value!r} as a quoted string, e.g. '{value}'")
    return value


QuotedStr = Annotated[str, BeforeValidator(_quoted)]
Version = Annotated[
    QuotedStr, StringConstraints(pattern=r"^\d+(?:\.\d+){0,2}(?:[-+][0-9A-Za-z.-]+)?$")
]
Probability = Annotated[float, Field(gt=0, lt=1)]
# Code String (CS) values: upper case, digits, space and underscore, ≤ 16 (PS3.5 §6.2).
CodeString = Annotated[str, StringConstraints(pattern=r"^[A-Z0-9 _]{1,16}$")]


class KeyedValueError(ValueError):
    """A cross-field error that knows which key (relative to the model that
    raised it) is wrong, so the message can name it like any field error."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- which series a model applies to --------------------------------------------


class Range(_Strict):
    """An inclusive range; either end may be left open."""

    min: NonNegativeFloat | None = None
    max: NonNegativeFloat | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise KeyedValueError("min", f"min {self.min:g} is larger than max {self.max:g}")
        return self

    def contains(self, value: float) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def __str__(self) -> str:
        low = "" if self.min is None else f"{self.min:g}"
        high = "" if self.max is None else f"{self.max:g}"
        return f"{low}..{high}"


@dataclass(frozen=True)
class SeriesInfo:
    """What selection rules look at in one series.

    Text attributes come from the index (``db.models.Series``) or the headers;
    ``image_type`` is the values of ImageType (0008,0008); the geometry comes
    from the loaded volume: ``slices`` is the number of slices (frames),
    ``pixel_spacing`` is PixelSpacing (row, column) in mm and
    ``spacing_between_slices`` the step along the slice normal in mm. Unknown
    geometry is ``None`` and fails any rule that constrains it.
    """

    modality: str
    body_part_examined: str = ""
    series_description: str = ""
    image_type: tuple[str, ...] = ()
    slices: int | None = None
    pixel_spacing: tuple[float, float] | None = None
    spacing_between_slices: float | None = None


class SeriesRules(_Strict):
    """Which series a model (or one role of a fusion model) applies to.

    Every given rule must hold. Text matching follows DICOM: Code String
    values (Modality, BodyPartExamined, ImageType) compare exactly after
    trimming and upper-casing; ``series_description`` is a regular expression
    searched case-insensitively anywhere in SeriesDescription (anchor it with
    ``^``/``$`` when needed). A series whose BodyPartExamined is empty (Type 3,
    often absent) does not match a ``body_part_examined`` rule.
    """

    modality: list[CodeString] = Field(min_length=1)
    body_part_examined: list[CodeString] | None = Field(default=None, min_length=1)
    series_description: str | None = None
    image_type: list[CodeString] | None = Field(default=None, min_length=1)
    slices: Range | None = None
    pixel_spacing_mm: Range | None = None
    slice_spacing_mm: Range | None = None

    @field_validator("modality", "body_part_examined", "image_type", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            return [v.strip().upper() if isinstance(v, str) else v for v in value]
        return value

    @field_validator("series_description")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value, re.IGNORECASE)
            except re.error as exc:
                raise ValueError(f"{value!r} is not a valid regular expression: {exc}") from None
        return value

    def matches(self, series: SeriesInfo) -> bool:
        if series.modality.strip().upper() not in self.modality:
            return False
        body_part = series.body_part_examined.strip().upper()
        if self.body_part_examined is not None and body_part not in self.body_part_examined:
            return False
        if self.series_description is not None and not re.search(
            self.series_description, series.series_description, re.IGNORECASE
        ):
            return False
        image_type = {v.strip().upper() for v in series.image_type}
        if self.image_type is not None and not set(self.image_type) <= image_type:
            return False
        if self.slices is not None and (
            series.slices is None or not self.slices.contains(series.slices)
        ):
            return False
        if self.pixel_spacing_mm is not None and (
            series.pixel_spacing is None
            or not all(self.pixel_spacing_mm.contains(v) for v in series.pixel_spacing)
        ):
            return False
        return self.slice_spacing_mm is None or (
            series.spacing_between_slices is not None
            and self.slice_spacing_mm.contains(series.spacing_between_slices)
        )

    def summary(self) -> str:
        """One line for listings, e.g. ``CT; body CHEST,ABDOMEN; slices 16..``."""
        parts = ["/".join(self.modality)]
        if self.body_part_examined:
            parts.append("body " + ",".join(self.body_part_examined))
        if self.series_description is not None:
            parts.append(f"description ~ {self.series_description}")
        if self.image_type:
            parts.append("image type " + "\\".join(self.image_type))
        for label, bounds in (
            ("slices", self.slices),
            ("pixel mm", self.pixel_spacing_mm),
            ("slice mm", self.slice_spacing_mm),
        ):
            if bounds is not None:
                parts.append(f"{label} {bounds}")
        return "; ".join(parts)


# -- input ------------------------------------------------------------------------


class ModelInput(_Strict):
    """How a series becomes the model's input tensor.

    ``preprocess`` is applied to the whole volume (:mod:`workers.preprocess`);
    it is required because a model fed other intensities than it was trained
    on (raw HU instead of a window) gives confident nonsense.
    ``shape`` is the model's spatial input without batch and channel axes:
    (y, x) for models that see one slice at a time (classification,
    segmentation, and the per-slice encoder of sequence models) or (z, y, x)
    for volumetric models. ``batch_size`` is the number of slices (or volumes)
    per inference call; the runtime may lower it to fit memory.
    """

    preprocess: PreprocessSpec
    shape: tuple[PositiveInt, PositiveInt] | tuple[PositiveInt, PositiveInt, PositiveInt]
    channels: PositiveInt = 1
    batch_size: int = Field(default=16, ge=1, le=1024)

    @model_validator(mode="after")
    def _shape_fits_preprocess(self) -> Self:
        target = self.preprocess.target_shape
        if target is not None and tuple(target[-len(self.shape) :]) != self.shape:
            raise KeyedValueError(
                "shape",
                f"{list(self.shape)} does not match the last axes of "
                f"preprocess.target_shape {list(target)}",
            )
        return self


# -- outputs ----------------------------------------------------------------------


class Code(_Strict):
    """A coded concept (PS3.3 §8.8, Code Sequence Macro), named as in
    pydicom's ``Code``: ``value`` is CodeValue, ``scheme_designator`` is
    CodingSchemeDesignator (``SCT`` SNOMED CT, ``DCM``, ``RADLEX``, ``LN``…),
    ``meaning`` is CodeMeaning."""

    value: Annotated[QuotedStr, StringConstraints(min_length=1, max_length=64)]
    scheme_designator: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,16}$")]
    meaning: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    scheme_version: str | None = None

    @model_validator(mode="after")
    def _sctid(self) -> Self:
        # SNOMED CT identifiers are 6-18 digits; a text here is a mix-up with
        # the legacy SRT designator or with the meaning.
        if self.scheme_designator == "SCT" and not re.fullmatch(r"\d{6,18}", self.value):
            raise KeyedValueError("value", f"{self.value!r} is not a SNOMED CT identifier")
        return self

    def __str__(self) -> str:
        return f"({self.value}, {self.scheme_designator}, {self.meaning!r})"


class SegmentProperties(_Strict):
    """Segment Properties of a DICOM SEG segment (PS3.3 C.8.20.2):
    category from CID 7150, type from CID 7151 (both SNOMED CT for the
    usual cases, e.g. category (49755003, SCT, 'Morphologically Altered
    Structure'), type (52988006, SCT, 'Lesion'))."""

    category: Code
    type: Code


class Output(_Strict):
    """One output channel of the model, in the order of the model's outputs.

    ``name`` keys result rows; ``concept`` is the finding written to SR (for
    classification, the concept whose presence the probability estimates);
    ``segment`` is required for segmentation and refused elsewhere;
    ``threshold`` overrides ``thresholds.positive`` (or ``thresholds.mask``)
    for this output only.
    """

    name: Slug
    concept: Code
    segment: SegmentProperties | None = None
    threshold: Probability | None = None


class Thresholds(_Strict):
    """Numbers that turn model outputs into decisions.

    ``positive``: probability at or above which a finding is reported present.
    ``mask``: per-voxel probability at or above which a voxel is in a segment.
    ``ood_reconstruction_error``: for anomaly models, the reconstruction error
    above which an input is out of distribution (learned on training data).
    """

    positive: Probability = 0.5
    mask: Probability = 0.5
    ood_reconstruction_error: PositiveFloat | None = None


class Weights(_Strict):
    """The weights file, relative to the manifest's folder, and its SHA-256.

    The hash ties every result to the exact weights that produced it; paths
    that could leave the folder are refused so a manifest cannot point the
    node at arbitrary files.
    """

    file: str = Field(min_length=1)
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{64}$", to_lower=True)]

    @field_validator("file")
    @classmethod
    def _inside_folder(cls, value: str) -> str:
        if "\\" in value or "\0" in value:
            raise ValueError(f"{value!r}: use '/' as separator and no NUL characters")
        path = PurePosixPath(value)
        if path.is_absolute():
            raise ValueError(f"{value!r} must be relative to the manifest's folder")
        if ".." in path.parts:
            raise ValueError(f"{value!r} must not contain '..'")
        return value


# The Keras architectures models/architectures.py builds (a test keeps the two
# lists equal; this module must not import TensorFlow).
ArchitectureName = Literal[
    "slice_classifier", "sequence_classifier", "unet", "autoencoder", "fusion_classifier"
]


class Architecture(_Strict):
    """How to rebuild the network a ``.weights.h5`` file belongs to: a name
    from models/architectures.py and its keyword parameters."""

    name: ArchitectureName
    params: dict[str, int | float | str | bool | None] = Field(default_factory=dict)


class Fusion(_Strict):
    """How a fusion model gathers and combines the series of one study.

    ``inputs`` maps a role (``ct``, ``pt``, ``t1``…) to the rules that pick
    its series within the study; the order of the roles is the order of the
    model's input channels. ``reference`` is the role whose grid the others
    are resampled onto by DICOM geometry (default: the first role); the
    model's ``input.preprocess`` prepares that role. ``preprocess`` gives the
    other roles' intensity steps (window, normalisation), applied after
    co-registration, so they must not resample (no ``target_spacing`` or
    ``target_shape``). ``decision_weights`` weighs each role's own
    probability in the decision-level combination (fitted on validation
    data); ``method`` says which probability becomes the reported finding:
    ``feature`` (the model's fused head) or ``decision`` (the weighted
    combination of the per-role heads).
    """

    inputs: dict[Slug, SeriesRules] = Field(default_factory=dict)
    reference: Slug | None = None
    preprocess: dict[Slug, PreprocessSpec] = Field(default_factory=dict)
    decision_weights: dict[Slug, NonNegativeFloat] = Field(default_factory=dict)
    method: Literal["feature", "decision"] = "feature"

    @model_validator(mode="after")
    def _roles_known(self) -> Self:
        for field_name in ("decision_weights", "preprocess"):
            for role in getattr(self, field_name):
                if role not in self.inputs:
                    raise KeyedValueError(
                        f"{field_name}.{role}", f"role {role!r} is not one of inputs"
                    )
        if self.reference is not None and self.reference not in self.inputs:
            raise KeyedValueError("reference", f"role {self.reference!r} is not one of inputs")
        for role, spec in self.preprocess.items():
            if spec.target_spacing is not None or spec.target_shape is not None:
                raise KeyedValueError(
                    f"preprocess.{role}",
                    "roles are resampled onto the reference grid; give no target_spacing "
                    "or target_shape here",
                )
        if self.method == "decision" and not self.decision_weights:
            raise KeyedValueError("method", "decision needs decision_weights")
        return self

    @property
    def roles(self) -> list[str]:
        return list(self.inputs)

    @property
    def reference_role(self) -> str:
        return self.reference or next(iter(self.inputs))


# -- the manifest -------------------------------------------------------------------


class ModelManifest(_Strict):
    """One model's manifest; see the module docstring and the example file."""

    manifest_version: int
    name: Slug
    version: Version
    task: Task
    description: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
    applies_to: SeriesRules | None = None
    input: ModelInput
    outputs: list[Output] = Field(default_factory=list)
    thresholds: Thresholds = Thresholds()
    gate: Slug | None = None
    fusion: Fusion | None = None
    weights: Weights
    architecture: Architecture | None = None

    @field_validator("manifest_version")
    @classmethod
    def _known_format(cls, value: int) -> int:
        if value != MANIFEST_VERSION:
            raise ValueError(
                f"this pacsnode reads manifest_version {MANIFEST_VERSION}, not {value}"
            )
        return value

    @model_validator(mode="after")
    def _task_rules(self) -> Self:
        self._check_outputs()
        if self.task == "anomaly":
            if self.thresholds.ood_reconstruction_error is None:
                raise KeyedValueError(
                    "thresholds.ood_reconstruction_error", "required for anomaly models"
                )
            if self.gate is not None:
                raise KeyedValueError("gate", "an anomaly model cannot have a gate")
        elif self.thresholds.ood_reconstruction_error is not None:
            raise KeyedValueError(
                "thresholds.ood_reconstruction_error",
                "only anomaly models use it; name an anomaly model as gate instead",
            )
        if self.gate == self.name:
            raise KeyedValueError("gate", "a model cannot gate itself")
        if self.architecture is None and not self.weights.file.endswith(".keras"):
            raise KeyedValueError(
                "architecture", "required unless weights.file is a whole .keras model"
            )
        if self.fusion is not None and self.task != "fusion":
            raise KeyedValueError("fusion", f"only fusion models take it, not {self.task}")
        if self.task == "fusion" and self.fusion is not None and self.fusion.inputs:
            self._check_fusion(self.fusion)
        if self.applies_to is None and not (self.fusion is not None and self.fusion.inputs):
            raise KeyedValueError(
                "applies_to", "required (fusion models may give fusion.inputs instead)"
            )
        return self

    def _check_fusion(self, fusion: Fusion) -> None:
        if len(fusion.inputs) < 2:
            raise KeyedValueError("fusion.inputs", "a fusion model needs at least two roles")
        if self.input.channels != len(fusion.inputs):
            raise KeyedValueError(
                "input.channels", f"{self.input.channels} channels for {len(fusion.inputs)} roles"
            )
        for role in fusion.inputs:
            if role != fusion.reference_role and role not in fusion.preprocess:
                raise KeyedValueError(
                    f"fusion.preprocess.{role}", "required for every role but the reference"
                )

    def _check_outputs(self) -> None:
        if not self.outputs and self.task != "anomaly":
            raise KeyedValueError("outputs", f"{self.task} models need at least one output")
        seen: set[str] = set()
        for i, output in enumerate(self.outputs):
            if output.name in seen:
                raise KeyedValueError(f"outputs.{i}.name", f"{output.name!r} appears twice")
            seen.add(output.name)
            if self.task == "segmentation" and output.segment is None:
                raise KeyedValueError(
                    f"outputs.{i}.segment",
                    "segmentation outputs need segment category and type codes",
                )
            if self.task != "segmentation" and output.segment is not None:
                raise KeyedValueError(
                    f"outputs.{i}.segment",
                    f"only segmentation models have segments, not {self.task}",
                )

    def matches(self, series: SeriesInfo) -> bool:
        """True if ``applies_to`` selects this series (fusion models that
        select by role only are chosen per study, not here)."""
        return self.applies_to is not None and self.applies_to.matches(series)

    def applies_to_summary(self) -> str:
        if self.applies_to is not None:
            return self.applies_to.summary()
        assert self.fusion is not None  # guaranteed by _task_rules
        return " + ".join(f"{role}: {r.summary()}" for role, r in self.fusion.inputs.items())


# -- reading a manifest file -------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; in a manifest that silently
    drops a block (a second ``thresholds:``), so it is an error here."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def validation_messages(exc: ValidationError) -> list[str]:
    """One ``  dotted.key: message`` line per error, like the node's
    configuration errors; cross-field errors name their own key."""
    lines = []
    for err in exc.errors():
        loc = [str(part) for part in err["loc"]]
        message = err["msg"]
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, KeyedValueError):
            loc.append(cause.key)
            message = str(cause)
        elif message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        lines.append(f"  {'.'.join(loc) or '(top level)'}: {message}")
    return lines


def read_manifest(path: Path) -> ModelManifest:
    """Parse and validate one manifest file; every failure is a
    :class:`ModelConfigError` that names the file (and the key, if any)."""
    try:
        with path.open(encoding="utf-8") as fh:  # a stream, so YAML errors name the file
            data = yaml.load(fh, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelConfigError(f"model manifest {path}: cannot read it: {exc}") from None
    except yaml.YAMLError as exc:
        raise ModelConfigError(f"model manifest {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ModelConfigError(f"model manifest {path} must hold a mapping of fields")
    try:
        return ModelManifest.model_validate(data)
    except ValidationError as exc:
        lines = validation_messages(exc)
        raise ModelConfigError(f"invalid model manifest {path}:\n" + "\n".join(lines)) from None
