"""The administration commands against a real database (in-process Typer
runner): the same filters as the API, JSON lines, and audited actions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from pacsnode.cli import app
from pacsnode.db.migrate import upgrade
from pacsnode.db.models import AuditEvent
from pacsnode.db.session import create_db_engine
from tests.admin_data import populate, study_uid


@pytest.fixture
def cli(database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    engine = create_db_engine(database_url)
    upgrade(engine)
    with engine.begin() as conn:
        populate(conn)
    engine.dispose()
    monkeypatch.setenv("PACSNODE_DATABASE_URL", database_url)
    monkeypatch.setenv("PACSNODE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("PACSNODE_CONFIG", raising=False)
    runner = CliRunner()

    def run(*args: str, code: int = 0) -> list[Any]:
        result = runner.invoke(app, list(args))
        assert result.exit_code == code, result.output
        if "--json" not in args:
            return [result.stdout]
        return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]

    run.url = database_url  # type: ignore[attr-defined]
    return run


def test_queries_mirror_the_api(cli: Any) -> None:
    found = cli("studies", "--patient-id", "P1", "--date-from", "20260201", "--json")
    assert [s["study_instance_uid"] for s in found] == [study_uid(3)]
    assert [s["status"] for s in cli("studies", "--status", "failed", "--json")] == ["failed"]
    cli("studies", "--date-from", "2026-01-01", code=2)
    (job,) = cli("jobs", "--state", "failed", "--json")
    assert "duplicate" in job["error"]
    cli("jobs", "--state", "lost", code=2)
    high = cli("results", "--model", "lesion", "--min-probability", "0.8", "--json")
    assert {f["study_instance_uid"] for f in high} == {study_uid(1), study_uid(3)}
    assert len(cli("results", "--ood", "--json")) == 1
    assert len(cli("results", "--since", "2026-11-03", "--json")) == 1
    (segment,) = cli("results", "segments", "--study", study_uid(1), "--json")
    assert segment["volume_mm3"] == 50.0
    assert "Findings (2 of 2)" in cli("results")[0]
    stats = cli("stats", "--json")[0]
    assert stats["studies"] == 3 and stats["jobs"]["failed"] == 1
    assert "infer" in cli("stats")[0]
    models = cli("models", "--json")
    assert models and all(m["enabled"] for m in models)


def test_actions_are_audited(cli: Any) -> None:
    assert "re-queued 1 job(s)" in cli("jobs", "retry")[0]
    assert "queued for study" in cli("jobs", "reprocess", study_uid(1))[0]
    cli("jobs", "reprocess", "9.9.9", code=1)
    name = cli("models", "--json")[0]["name"]
    cli("models", "disable", name)
    assert cli("models", "--json")[0]["enabled"] is False
    cli("models", "disable", "no-such-model", code=1)
    assert "re-queued 1 export(s)" in cli("exports", "retry")[0]
    created = CliRunner().invoke(app, ["tokens", "create", "--role", "read", "--name", "bi"])
    assert created.exit_code == 0 and created.stdout.strip().startswith("pn_")
    (token,) = cli("tokens", "list", "--json")
    assert (token["name"], token["role"], token["revoked"]) == ("bi", "read", False)
    cli("tokens", "revoke", str(token["id"]))
    cli("tokens", "revoke", str(token["id"]), code=1)
    cli("tokens", "create", "--role", "root", code=2)
    rows = cli("audit", "--channel", "cli", "--json")
    assert [r["action"] for r in reversed(rows)] == [
        "jobs.retry", "studies.reprocess", "models.disable", "exports.retry",
        "tokens.create", "tokens.revoke",
    ]  # fmt: skip
    assert all(r["actor"].startswith("cli:") for r in rows)
    engine = create_db_engine(cli.url)
    with engine.connect() as conn:
        detail = conn.execute(
            select(AuditEvent.detail).where(AuditEvent.action == "tokens.create")
        ).scalar_one()
    engine.dispose()
    assert created.stdout.strip() not in detail  # the token itself is never stored


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_serve_refuses_a_placeholder_secret(cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACSNODE_API", '{"bootstrap_token": "changeme"}')
    result = CliRunner().invoke(app, ["serve"])
    assert result.exit_code == 2
    assert "api.bootstrap_token" in result.output and "placeholder" in result.output
