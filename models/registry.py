"""The models installed on this node, read once at start-up.

``Registry.load(models_dir)`` reads every sub-folder holding a
``manifest.yaml``: operators add a model by dropping in a folder with its
manifest and weights. Each manifest is validated (:mod:`models.manifest`),
its weights file must exist and match the manifest's SHA-256, a
(name, version) pair may appear once, and a named gate must be an anomaly
model here. Any failure is a :class:`~pacsnode.errors.ModelConfigError`
naming the file, so ``pacsnode serve`` stops before accepting studies it
would then process with a wrong or tampered model.

Several versions of one model may be installed side by side (to compare
them); each runs on the series it matches and its results carry its version.
The settings' ``disabled_models`` switch models off by ``name`` (every
version) or ``name@version``.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from pacsnode.core.errors import ModelConfigError
from pacsnode.models.manifest import MANIFEST_FILE, ModelManifest, SeriesInfo, read_manifest

__all__ = ["ModelRow", "RegisteredModel", "Registry", "SeriesInfo"]

log = logging.getLogger(__name__)

_SHA_PREFIX = 12


@dataclass(frozen=True)
class RegisteredModel:
    """A validated manifest with the files it was read from."""

    manifest: ModelManifest
    manifest_path: Path
    weights_path: Path
    enabled: bool

    @property
    def key(self) -> str:
        """``name@version``, unique within a registry."""
        return f"{self.manifest.name}@{self.manifest.version}"

    @property
    def folder(self) -> Path:
        return self.manifest_path.parent


@dataclass(frozen=True)
class ModelRow:
    """One line of a model listing (CLI table, API response)."""

    name: str
    version: str
    task: str
    applies_to: str
    sha256: str  # prefix, enough to tell weights apart at a glance
    enabled: bool


def version_key(version: str) -> tuple[tuple[int, ...], int, str]:
    """Order ``1.2`` < ``1.10`` < ``2.0.0-rc1`` < ``2.0.0``: numbers compare as
    numbers, a pre-release sorts before its release, build metadata is kept
    only as a tie-breaker."""
    match = re.match(r"^([\d.]+)(?:([-+])(.*))?$", version)
    if match is None:  # not reachable for validated manifests
        return ((), 0, version)
    numbers = tuple(int(n) for n in match[1].split("."))
    numbers += (0,) * (3 - len(numbers))
    return (numbers, 0 if match[2] == "-" else 1, match[3] or "")


def sha256_of(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (weights may be large)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


class Registry:
    """The installed models; build it with :meth:`load`."""

    def __init__(self, models_dir: Path, models: Iterable[RegisteredModel]) -> None:
        self.models_dir = models_dir
        self.models: tuple[RegisteredModel, ...] = tuple(
            sorted(models, key=lambda m: (m.manifest.name, version_key(m.manifest.version)))
        )

    @classmethod
    def load(cls, models_dir: Path, disabled: Iterable[str] = ()) -> Registry:
        """Read and check every model under ``models_dir``.

        A missing or empty folder gives an empty registry: the node then
        stores and indexes studies without running models.
        """
        models_dir = Path(models_dir).expanduser()
        if not models_dir.exists():
            log.warning("model registry: %s does not exist, no models loaded", models_dir)
            return cls(models_dir, _apply_disabled([], disabled))
        if not models_dir.is_dir():
            raise ModelConfigError(f"models_dir: {models_dir} is not a folder")
        loaded: dict[tuple[str, str], RegisteredModel] = {}
        for folder in sorted(p for p in models_dir.iterdir() if p.is_dir()):
            manifest_path = folder / MANIFEST_FILE
            if not manifest_path.is_file():
                if not folder.name.startswith((".", "_")):
                    log.warning("model registry: %s has no %s, skipped", folder, MANIFEST_FILE)
                continue
            model = _load_one(manifest_path)
            pair = (model.manifest.name, model.manifest.version)
            if pair in loaded:
                raise ModelConfigError(
                    f"model manifest {manifest_path}:\n  name, version: {model.key} is also "
                    f"installed by {loaded[pair].manifest_path}"
                )
            loaded[pair] = model
        registry = cls(models_dir, _apply_disabled(loaded.values(), disabled))
        registry._check_gates()
        for m in registry.models:
            log.info(
                "model %s (%s) from %s, weights sha256 %s…%s",
                m.key,
                m.manifest.task,
                m.folder,
                m.manifest.weights.sha256[:_SHA_PREFIX],
                "" if m.enabled else ", disabled",
            )
        if not registry.models:
            log.info("model registry: no models in %s", models_dir)
        return registry

    @property
    def enabled(self) -> tuple[RegisteredModel, ...]:
        return tuple(m for m in self.models if m.enabled)

    def get(self, name: str, version: str | None = None) -> RegisteredModel | None:
        """The model ``name`` at ``version``, or its highest installed version."""
        candidates = [
            m
            for m in self.models
            if m.manifest.name == name and (version is None or m.manifest.version == version)
        ]
        return candidates[-1] if candidates else None  # self.models is sorted by version

    def select(self, series: SeriesInfo) -> list[RegisteredModel]:
        """The enabled models whose ``applies_to`` rules match ``series``."""
        return [m for m in self.models if m.enabled and m.manifest.matches(series)]

    def gate_for(self, model: RegisteredModel) -> RegisteredModel | None:
        """The anomaly model that gates ``model`` (highest enabled version)."""
        if model.manifest.gate is None:
            return None
        gates = [g for g in self.enabled if g.manifest.name == model.manifest.gate]
        return gates[-1] if gates else None

    def describe(self) -> list[ModelRow]:
        """Rows for listings, sorted by name and version."""
        return [
            ModelRow(
                name=m.manifest.name,
                version=m.manifest.version,
                task=m.manifest.task,
                applies_to=m.manifest.applies_to_summary(),
                sha256=m.manifest.weights.sha256[:_SHA_PREFIX],
                enabled=m.enabled,
            )
            for m in self.models
        ]

    def _check_gates(self) -> None:
        """A gate named by an enabled model must be an enabled anomaly model:
        without it, out-of-distribution inputs would pass unflagged."""
        for model in self.enabled:
            gate_name = model.manifest.gate
            if gate_name is None:
                continue
            gates = [g for g in self.models if g.manifest.name == gate_name]
            problem = ""
            if not gates:
                problem = f"no model named {gate_name!r} is installed in {self.models_dir}"
            elif any(g.manifest.task != "anomaly" for g in gates):
                problem = f"{gate_name!r} is not an anomaly model"
            elif self.gate_for(model) is None:
                problem = f"{gate_name!r} is disabled; disable {model.key} too or drop its gate"
            if problem:
                raise ModelConfigError(f"model manifest {model.manifest_path}:\n  gate: {problem}")


def _load_one(manifest_path: Path) -> RegisteredModel:
    manifest = read_manifest(manifest_path)
    weights_path = manifest_path.parent / manifest.weights.file
    if not weights_path.is_file():
        raise ModelConfigError(
            f"model manifest {manifest_path}:\n  weights.file: {weights_path} does not exist"
        )
    try:
        actual = sha256_of(weights_path)
    except OSError as exc:
        raise ModelConfigError(
            f"model manifest {manifest_path}:\n  weights.file: cannot read {weights_path}: "
            f"{exc.strerror}"
        ) from None
    if actual != manifest.weights.sha256:
        raise ModelConfigError(
            f"model manifest {manifest_path}:\n  weights.sha256: {weights_path.name} has "
            f"SHA-256 {actual}, the manifest expects {manifest.weights.sha256}"
        )
    return RegisteredModel(manifest, manifest_path, weights_path, enabled=True)


def _apply_disabled(
    models: Iterable[RegisteredModel], disabled: Iterable[str]
) -> list[RegisteredModel]:
    """Mark the models named in ``disabled`` (``name`` or ``name@version``).
    An entry that names nothing is an error: a typo there would leave a model
    running that the operator meant to switch off."""
    models = list(models)
    off = set(disabled)
    for entry in sorted(off):
        if not any(entry in (m.manifest.name, m.key) for m in models):
            raise ModelConfigError(f"disabled_models: no installed model is named {entry!r}")
    return [replace(m, enabled=False) if off & {m.manifest.name, m.key} else m for m in models]
