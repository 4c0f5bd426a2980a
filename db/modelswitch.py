"""Administrators' model switches (``model_switch``): enable or disable a
model, or one version of it, at run time.

Workers read the switches before each job (:func:`effective_disabled`) and
choose models from the registry built with the result, so a switch applies
to every job that starts after it commits, on every worker, without a
restart. A switch overrides the ``disabled_models`` setting for its key: the
setting is the default a fresh installation starts with, the switch is the
operator's later decision. The storage SCP does not choose models; it is not
affected.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, select, update
from sqlalchemy.dialects import postgresql, sqlite

from pacsnode.core.errors import ModelConfigError
from pacsnode.core.settings import Settings
from pacsnode.db.models import ModelSwitch


@dataclass(frozen=True, slots=True)
class Switch:
    name: str
    version: str  # "": every version
    enabled: bool
    changed_at: datetime
    changed_by: str

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}" if self.version else self.name


def switches(conn: Connection) -> list[Switch]:
    rows = conn.execute(select(ModelSwitch).order_by(ModelSwitch.name, ModelSwitch.version))
    return [Switch(r.name, r.version, r.enabled, r.changed_at, r.changed_by) for r in rows]


def set_switch(conn: Connection, name: str, version: str, enabled: bool, changed_by: str) -> None:
    """Upsert the switch for ``name`` (``version`` "" for every version)."""
    insert: Any = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}[conn.dialect.name]
    now = datetime.now(UTC)
    values = {"enabled": enabled, "changed_at": now, "changed_by": changed_by}
    stmt = insert(ModelSwitch).values(name=name, version=version, **values)
    conn.execute(stmt.on_conflict_do_update(index_elements=["name", "version"], set_=values))
    if not version and enabled:
        # Enabling a model by name enables each of its versions too.
        conn.execute(
            update(ModelSwitch)
            .where(ModelSwitch.name == name, ModelSwitch.version != "")
            .values(**values)
        )


def effective_disabled(configured: Iterable[str], found: Iterable[Switch]) -> tuple[str, ...]:
    """The ``disabled_models`` entries after the switches: a switch's key is
    added when it disables and removed when it enables (enabling ``name``
    also clears the ``name@version`` entries of the setting)."""
    off = list(dict.fromkeys(configured))
    for switch in found:
        if switch.enabled:
            off = [
                key
                for key in off
                if key != switch.key
                and not (not switch.version and key.split("@")[0] == switch.name)
            ]
        elif switch.key not in off:
            off.append(switch.key)
    return tuple(off)


@dataclass(frozen=True, slots=True)
class ModelState:
    """One installed model as the next job will see it."""

    name: str
    version: str
    task: str
    applies_to: str
    sha256: str
    enabled: bool
    switched_by: str
    switched_at: datetime | None

    def as_json(self) -> dict[str, object]:
        at = self.switched_at
        if at is not None and at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
        return {
            "name": self.name,
            "version": self.version,
            "task": self.task,
            "applies_to": self.applies_to,
            "sha256": self.sha256,
            "enabled": self.enabled,
            "switched_by": self.switched_by,
            "switched_at": None if at is None else at.isoformat(),
        }


def list_models(conn: Connection, settings: Settings) -> list[ModelState]:
    """Installed models with their effective enabled state."""
    from pacsnode.models.registry import Registry

    found = switches(conn)
    registry = Registry.load(
        settings.models_dir, effective_disabled(settings.disabled_models, found)
    )
    by_key = {s.key: s for s in found}
    out = []
    for row in registry.describe():
        switch = by_key.get(f"{row.name}@{row.version}") or by_key.get(row.name)
        out.append(
            ModelState(
                row.name,
                row.version,
                row.task,
                row.applies_to,
                row.sha256,
                row.enabled,
                switch.changed_by if switch else "",
                switch.changed_at if switch else None,
            )
        )
    return out


def switch_model(
    conn: Connection,
    settings: Settings,
    name: str,
    version: str,
    enabled: bool,
    changed_by: str,
) -> None:
    """Enable or disable ``name`` (every version when ``version`` is "").

    Checked first by loading the registry as it would be: an unknown model,
    or disabling an anomaly gate that an enabled model needs, raises
    ModelConfigError and changes nothing."""
    from pacsnode.models.registry import Registry

    found = [s for s in switches(conn) if not (s.name == name and s.version == version)]
    proposed = Switch(name, version, enabled, datetime.now(UTC), changed_by)
    key = proposed.key
    registry = Registry.load(settings.models_dir, ())
    if not any(
        m.manifest.name == name and version in ("", m.manifest.version) for m in registry.models
    ):
        raise ModelConfigError(f"no installed model is named {key!r}")
    Registry.load(
        settings.models_dir, effective_disabled(settings.disabled_models, [*found, proposed])
    )
    set_switch(conn, name, version, enabled, changed_by)
