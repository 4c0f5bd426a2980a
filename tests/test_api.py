"""The admin API through the real app (FastAPI TestClient) against a real
database (SQLite and PostgreSQL): auth, filters, pagination, actions and
their audit rows. Tests whose subject does not depend on the database
(request validation, the model registry, db.exports' own PostgreSQL tests)
run on SQLite only."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select

from pacsnode.api import create_app
from pacsnode.core.errors import ConfigError
from pacsnode.core.settings import load_settings
from pacsnode.db.migrate import upgrade
from pacsnode.db.models import AuditEvent, Job
from pacsnode.db.session import create_db_engine
from pacsnode.db.tokens import create_token
from tests.admin_data import STUDIES, populate, study_uid

V1 = "/api/v1"


@dataclass
class Api:
    client: TestClient
    engine: Engine
    read: dict[str, str]
    admin: dict[str, str]
    ids: dict[str, int]

    def get(self, path: str, token: dict[str, str] | None = None, **params: Any) -> Any:
        response = self.client.get(V1 + path, headers=token or self.read, params=params)
        assert response.status_code == 200, response.text
        return response.json()

    def audit(self) -> list[AuditEvent]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(AuditEvent).order_by(AuditEvent.id)).all())


@pytest.fixture
def api(database_url: str, tmp_path: Path) -> Iterator[Api]:
    engine = create_db_engine(database_url)
    upgrade(engine)
    with engine.begin() as conn:
        ids = populate(conn)
        _, read = create_token(conn, "read", "reader")
        _, admin = create_token(conn, "admin", "ops")
    settings = load_settings(database_url=database_url, data_dir=tmp_path / "data")
    with TestClient(create_app(settings, engine), client=("10.1.2.3", 5555)) as client:
        yield Api(
            client,
            engine,
            {"Authorization": f"Bearer {read}"},
            {"Authorization": f"Bearer {admin}"},
            ids,
        )
    engine.dispose()


def test_no_token_is_401_and_read_only_on_admin_action_is_403(api: Api) -> None:
    assert api.client.get(V1 + "/studies").status_code == 401
    bad = {"Authorization": "Bearer pn_not-a-token"}
    response = api.client.get(V1 + "/studies", headers=bad)
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    response = api.client.post(V1 + "/jobs/retry", headers=api.read, json={})
    assert response.status_code == 403 and "admin" in response.json()["detail"]
    assert api.client.get(V1 + "/audit", headers=api.read).status_code == 403
    assert api.client.get("/metrics").status_code == 401
    denied = [(e.actor, e.outcome, e.source) for e in api.audit()]
    assert denied == [
        ("anonymous", "denied", "10.1.2.3"),
        ("anonymous", "denied", "10.1.2.3"),
        ("token:reader", "denied", "10.1.2.3"),
        ("token:reader", "denied", "10.1.2.3"),
        ("anonymous", "denied", "10.1.2.3"),
    ]


def test_study_filters_combine_and_paginate(api: Api) -> None:
    every = api.get("/studies")
    assert every["total"] == 3 and [s["study_instance_uid"] for s in every["items"]] == [
        study_uid(3),
        study_uid(2),
        study_uid(1),
    ]
    assert every["items"][1]["status"] == "failed"
    cases = {
        (("patient_id", "P1"),): {1, 3},
        (("patient_id", "P1"), ("modality", "CT"), ("date_from", "20260201")): {3},
        (("accession_number", "A2"),): {2},
        (("date_from", "20260101"), ("date_to", "20260228")): {1, 2},
        (("status", "failed"),): {2},
        (("status", "succeeded"), ("patient_id", "P2")): set(),
        (("modality", "MR"),): {2},
        (("status", "receiving"),): set(),
    }
    for filters, expected in cases.items():
        found = api.get("/studies", **dict(filters))
        assert {s["study_instance_uid"] for s in found["items"]} == {
            study_uid(k) for k in expected
        }, filters
        assert found["total"] == len(expected)
    pages = [api.get("/studies", limit=2, offset=o) for o in (0, 2, 4)]
    assert [len(p["items"]) for p in pages] == [2, 1, 0]
    assert all(p["total"] == 3 for p in pages)
    listed = [s["study_instance_uid"] for p in pages for s in p["items"]]
    assert listed == [s["study_instance_uid"] for s in every["items"]]
    one = api.get(f"/studies/{study_uid(1)}")
    assert (one["patient_id"], one["instance_count"], one["modalities"]) == ("P1", 3, ["CT"])
    assert api.client.get(V1 + "/studies/9.9.9", headers=api.read).status_code == 404
    series = api.get("/series", study_instance_uid=study_uid(2))
    assert series["total"] == 1 and series["items"][0]["modality"] == "MR"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_bad_filters_get_a_readable_422(api: Api) -> None:
    for params in (
        {"date_from": "2026-01-01"},
        {"status": "lost"},
        {"limit": 0},
        {"limit": 100_000},
        {"offset": -1},
    ):
        response = api.client.get(V1 + "/studies", headers=api.read, params=params)
        assert response.status_code == 422, params
        assert response.json()["detail"][0]["loc"][-1] in params
    response = api.client.get(
        V1 + "/results/findings", headers=api.read, params={"probability_min": 2}
    )
    assert response.status_code == 422


def test_results_filters(api: Api) -> None:
    everything = api.get("/results/findings")
    assert everything["total"] == 2
    high = api.get("/results/findings", model="lesion", label="Lesion", probability_min=0.8)
    assert {f["study_instance_uid"] for f in high["items"]} == {study_uid(1), study_uid(3)}
    assert api.get("/results/findings", probability_min=0.9, probability_max=1)["total"] == 1
    assert api.get("/results/findings", ood=True)["items"][0]["study_instance_uid"] == study_uid(3)
    assert api.get("/results/findings", ood=False, probability_min=0.9)["total"] == 1
    assert api.get("/results/findings", version="2.0")["total"] == 0
    assert api.get("/results/findings", label="52988006")["total"] == 2
    # created 2026-11-02 (study 1) and 2026-11-04 (study 3)
    window = api.get("/results/findings", since="2026-11-03T00:00:00Z", until="2026-11-05")
    assert [f["study_instance_uid"] for f in window["items"]] == [study_uid(3)]
    segments = api.get("/results/segments", model="lesion-seg", study_instance_uid=study_uid(3))
    (segment,) = segments["items"]
    assert (segment["volume_mm3"], segment["voxel_count"], segment["bbox"]) == (
        150.0,
        300,
        [0, 1, 2, 3, 4, 5],
    )
    reads = [e for e in api.audit() if e.action.startswith("results.")]
    assert len(reads) == 9
    detail = json.loads(reads[1].detail)
    assert detail["probability_min"] == 0.8 and detail["returned"] == 2
    assert reads[1].actor == "token:reader" and reads[1].source == "10.1.2.3"


def test_job_retry_and_reprocess_go_through_the_outbox(api: Api) -> None:
    failed = api.get("/jobs", state="failed")
    assert [j["id"] for j in failed["items"]] == [api.ids["failed_job"]]
    response = api.client.post(V1 + "/jobs/retry", headers=api.admin, json={})
    assert response.json() == {"action": "retry", "count": 1, "ids": [api.ids["failed_job"]]}
    assert api.get("/jobs", state="pending")["total"] == 1
    again = api.client.post(V1 + f"/jobs/{api.ids['failed_job']}/retry", headers=api.admin)
    assert again.status_code == 409
    response = api.client.post(V1 + f"/studies/{study_uid(1)}/reprocess", headers=api.admin)
    assert response.status_code == 200
    (job_id,) = response.json()["ids"]
    with api.engine.connect() as conn:
        job = conn.execute(select(Job).where(Job.id == job_id)).one()
    assert (job.state, job.kind, job.instances) == ("pending", "rerun", 3)
    assert api.client.post(V1 + "/studies/9.9/reprocess", headers=api.admin).status_code == 404
    actions = [(e.action, e.actor) for e in api.audit() if e.channel == "api"]
    assert ("jobs.retry", "token:ops") in actions and ("studies.reprocess", "token:ops") in actions


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_export_retry(api: Api) -> None:
    assert api.get("/exports", state="failed")["total"] == 1
    assert api.get("/exports", limit=1)["total"] == 2
    response = api.client.post(
        V1 + "/exports/retry", headers=api.admin, json={"destination": "pacs"}
    )
    assert response.json()["count"] == 1
    (row,) = api.get("/exports", state="pending")["items"]
    assert row["id"] == api.ids["failed_export"] and row["attempts"] == 0
    bad = api.client.post(V1 + "/exports/retry", headers=api.admin, json={"state": "sent"})
    assert bad.status_code == 422


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_models_disable_and_enable_persist(api: Api) -> None:
    models = api.get("/models")["items"]
    assert models and all(m["enabled"] for m in models)
    name = models[0]["name"]
    assert api.client.post(V1 + f"/models/{name}/disable", headers=api.read).status_code == 403
    response = api.client.post(V1 + f"/models/{name}/disable", headers=api.admin)
    assert response.status_code == 200, response.text
    after = {m["name"]: m for m in api.get("/models")["items"]}
    assert after[name]["enabled"] is False and after[name]["switched_by"] == "token:ops"
    api.client.post(V1 + f"/models/{name}/enable", headers=api.admin)
    assert all(m["enabled"] for m in api.get("/models")["items"])
    unknown = api.client.post(V1 + "/models/no-such-model/disable", headers=api.admin)
    assert unknown.status_code == 409 and "no-such-model" in unknown.json()["detail"]


def test_stats_report_latencies_and_counts(api: Api) -> None:
    stats = api.get("/stats")
    assert (stats["studies"], stats["instances"], stats["findings"]) == (3, 9, 2)
    assert stats["jobs"] == {"succeeded": 2, "failed": 1}
    latency = {(x["stage"], x["model_name"]): x for x in stats["latencies"]}
    # infer took 1.0 s and 3.0 s: the median is 2.0, p95 2.9 (linear interpolation)
    assert latency[("infer", "")]["p50_s"] == pytest.approx(2.0)
    assert latency[("infer", "")]["p95_s"] == pytest.approx(2.9)
    assert latency[("forward", "lesion")]["count"] == 2


def test_health_and_metrics(api: Api) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    ready = api.client.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"database": "ok", "broker": "ok"}
    text = api.client.get("/metrics", headers=api.read).text
    assert "pacsnode_instances_received_total 9.0" in text
    assert 'pacsnode_jobs{state="failed"} 1.0' in text
    assert 'pacsnode_exports{state="failed"} 1.0' in text
    assert 'pacsnode_stage_duration_seconds_count{model="",stage="infer"} 2.0' in text
    assert 'pacsnode_stage_duration_seconds_bucket{le="1.0",model="",stage="infer"} 1.0' in text
    assert 'pacsnode_queue_depth{queue="cpu"}' in text
    assert api.client.get("/openapi.json").json()["info"]["title"] == "pacsnode admin API"


def test_scripted_session_leaves_one_audit_row_per_call(api: Api) -> None:
    calls = [
        ("GET", "/studies", api.read),
        ("GET", "/jobs", api.read),
        ("GET", "/results/findings", api.read),
        ("GET", "/results/segments", api.read),
        ("GET", "/exports", api.read),
        ("GET", "/stats", api.read),
        ("POST", "/jobs/retry", api.admin),
        ("POST", "/exports/retry", api.admin),
        ("GET", "/audit", api.admin),
    ]
    for method, path, token in calls:
        kwargs: dict[str, Any] = {"json": {}} if method == "POST" else {}
        assert api.client.request(method, V1 + path, headers=token, **kwargs).status_code == 200
    rows = api.audit()
    assert [r.action for r in rows] == [
        "studies.read",
        "jobs.read",
        "results.findings.read",
        "results.segments.read",
        "exports.read",
        "stats.read",
        "jobs.retry",
        "exports.retry",
        "audit.read",
    ]
    assert all(r.channel == "api" and r.source == "10.1.2.3" for r in rows)
    listed = api.get("/audit", api.admin, action="jobs.retry")
    assert listed["total"] == 1 and listed["items"][0]["actor"] == "token:ops"


def test_injection_strings_in_filters_change_nothing(api: Api) -> None:
    def counts() -> tuple[int, int]:
        with api.engine.connect() as conn:
            jobs = conn.execute(select(func.count(Job.id))).scalar_one()
            events = conn.execute(select(func.count(AuditEvent.id))).scalar_one()
        return int(jobs), int(events)

    before = counts()
    for evil in ("' OR '1'='1", "P1'; DROP TABLE job; --", "%", "*", "\\", "P_"):
        assert api.get("/studies", patient_id=evil)["total"] == 0
        assert api.get("/results/findings", model=evil, label=evil)["total"] == 0
    nul = api.client.get(V1 + "/studies", headers=api.read, params={"patient_id": "P1\x00"})
    assert nul.status_code == 400 and "control characters" in nul.json()["detail"]
    jobs, events = counts()
    assert jobs == before[0] and events == before[1] + 12
    assert len(STUDIES) == api.get("/studies")["total"]


def test_placeholder_bootstrap_token_is_refused_at_start() -> None:
    for value in ("changeme", "short-but-not-placeholder"):
        with pytest.raises(ConfigError, match=r"api\.bootstrap_token"):
            load_settings(api={"bootstrap_token": value})
    assert (
        load_settings(api={"bootstrap_token": "x" * 40}).public_dict()["api"]["bootstrap_token"]
        == "***"
    )


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_bootstrap_token_is_an_admin_token(api: Api, database_url: str, tmp_path: Path) -> None:
    secret = "b" * 40
    settings = load_settings(
        database_url=database_url, data_dir=tmp_path / "data", api={"bootstrap_token": secret}
    )
    with TestClient(create_app(settings, api.engine)) as client:
        headers = {"Authorization": f"Bearer {secret}"}
        assert client.post(V1 + "/jobs/retry", headers=headers, json={}).status_code == 200
        assert client.get(V1 + "/audit", headers=headers).json()["items"][0]["actor"] == (
            "token:bootstrap"
        )
        wrong = {"Authorization": f"Bearer {'c' * 40}"}
        assert client.get(V1 + "/studies", headers=wrong).status_code == 401
