"""The admin API, dashboard and audit trail of a real ``pacsnode serve``:
a phantom study through the real pipeline, a study that fails, an export to
a destination that is down, the dashboard in headless Chromium (Debian's
``chromium`` and ``chromium-driver``), and an abrupt stop that loses no
audit row of a completed call."""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from pacsnode.db.models import AuditEvent
from pacsnode.db.session import create_db_engine
from pacsnode.lab.phantom import SeriesSpec, StudySpec, ct_series_datasets, write_study
from tests.support import IN_CI, Node, free_port, node_config, storescu, wait_for
from tests.test_assembly import FAST

# A study the bundled segmenter finds lesions in (as tests/test_results_orthanc.py).
CT = {"seed": 900_011, "size": 256, "slices": 60, "modalities": ("CT",), "lesions": 2}
JOB_TIMEOUT = 240.0
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _browser() -> Any:
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        message = "chromium and chromium-driver are not installed (scripts/install-debian-packages)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


@pytest.fixture
def browser() -> Iterator[Any]:
    driver = _browser()
    yield driver
    driver.quit()


def _token(node: Node, role: str) -> str:
    result = node.cli("tokens", "create", "--role", role, "--name", f"test-{role}")
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert token.startswith("pn_") and "cannot be shown again" in result.stderr
    return token


def _audit(node: Node) -> list[Any]:
    engine = create_db_engine(node.database_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(select(AuditEvent).order_by(AuditEvent.id)).all())
    finally:
        engine.dispose()


@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_node_api_dashboard_and_audit(make_node: Any, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    down = free_port()  # a destination nobody listens on
    config = node_config(
        completion=FAST,
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": down}],
        exports={"rules": [{"destinations": ["pacs"]}], "initial_backoff_s": 60},
    )
    node = make_node(config=config).start()
    assert node.api_url.startswith("http://127.0.0.1:")
    admin, read = _token(node, "admin"), _token(node, "read")
    client = httpx.Client(base_url=node.api_url, timeout=30)
    auth = {"Authorization": f"Bearer {read}"}
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"database": "ok", "broker": "ok"}
    # Switched off through the API: the worker must honour it (and the test runs faster).
    for name in ("ct-lesion-classifier", "ct-lesion-sequence"):
        switched = client.post(
            f"/api/v1/models/{name}/disable", headers={"Authorization": f"Bearer {admin}"}
        )
        assert switched.status_code == 200, switched.text

    study = write_study(tmp_path / "study", StudySpec(**CT))
    study_uid = json.loads(study.truth.read_text())["study_instance_uid"]
    storescu(node, study.series["CT"][0].parent)
    bad = tmp_path / "bad"
    bad.mkdir()
    datasets = ct_series_datasets(SeriesSpec(slices=6, rows=32, columns=32, seed=12))
    datasets[3].ImagePositionPatient = list(datasets[2].ImagePositionPatient)  # duplicate
    for k, ds in enumerate(datasets):
        ds.save_as(bad / f"{k}.dcm", enforce_file_format=True)
    storescu(node, bad)

    def finished() -> dict[str, Any] | None:
        page = client.get("/api/v1/jobs", headers=auth).json()
        done = [j for j in page["items"] if j["state"] in ("succeeded", "failed")]
        return page if page["total"] == 2 and len(done) == 2 else None

    jobs = wait_for(finished, JOB_TIMEOUT, "both jobs to finish")["items"]
    by_state = {j["state"]: j for j in jobs}
    assert set(by_state) == {"succeeded", "failed"}
    failed_id = by_state["failed"]["id"]

    # Stage latencies measured by the real pipeline.
    stats = client.get("/api/v1/stats", headers=auth).json()
    latency = {(x["stage"], x["model_name"]): x for x in stats["latencies"]}
    assert latency[("infer", "")]["p50_s"] > 0 and latency[("load", "")]["count"] >= 2
    assert {model for stage, model in latency if stage == "forward" and model} == {
        "ct-lesion-segmenter"
    }
    segments = client.get(
        "/api/v1/results/segments", headers=auth, params={"study_instance_uid": study_uid}
    ).json()
    assert segments["total"] >= 1 and segments["items"][0]["volume_mm3"] > 0
    exports = wait_for(
        lambda: client.get("/api/v1/exports", headers=auth, params={"state": "retrying"}).json()[
            "items"
        ],
        60,
        "an export attempt to fail",
    )
    metrics = client.get("/metrics", headers=auth).text
    assert 'pacsnode_associations_total{outcome="released"} 2.0' in metrics
    assert "pacsnode_export_failures_total" in metrics

    # Every association and export attempt is in the audit trail.
    rows = _audit(node)
    assoc = [r for r in rows if r.action == "association.released"]
    assert len(assoc) == 2 and {r.actor for r in assoc} == {"STORESCU"}
    assert sorted(json.loads(r.detail)["stored"] for r in assoc) == [6, 60]
    attempts = [r for r in rows if r.action == "export.attempt"]
    assert attempts and attempts[0].outcome == "retrying"
    assert attempts[0].source == f"PACS@127.0.0.1:{down}"

    # The dashboard: sign in, pages, the overlay image, retry a failed job.
    url = node.api_url
    browser.get(url + "/ui/")
    assert browser.current_url.endswith("/ui/login")
    browser.find_element(By.ID, "token").send_keys(admin)
    browser.find_element(By.ID, "signin").click()
    wait_for(lambda: browser.current_url.endswith("/ui/"), 30, "the overview page")
    assert browser.find_element(By.ID, "studies").text == "2"
    assert "infer" in browser.find_element(By.ID, "latencies").text
    browser.get(url + "/ui/studies?q=" + study_uid)
    browser.find_element(By.LINK_TEXT, study_uid).click()
    wait_for(lambda: "/ui/studies/" in browser.current_url, 30, "the study page")
    image = browser.find_element(By.ID, "key-image")
    loaded = wait_for(
        lambda: browser.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth", image
        ),
        60,
        "the key image to load",
    )
    assert loaded == 256
    if os.environ.get("PACSNODE_SCREENSHOT"):  # how the README's picture is made
        browser.set_window_size(1100, 900)
        browser.save_screenshot(os.environ["PACSNODE_SCREENSHOT"])
    assert "Lesion" in browser.find_element(By.ID, "segments").text
    png = client.get(f"/ui/studies/{study_uid}/key.png", headers=auth)
    assert png.headers["content-type"] == "image/png"
    picture = Image.open(io.BytesIO(png.content))
    assert picture.size == (256, 256) and picture.mode == "RGB"
    rgb = np.asarray(picture).astype(int)
    assert (rgb[..., 0] > rgb[..., 1] + 60).any(), "no overlay colour in the key image"
    browser.get(url + "/ui/jobs?state=failed")
    browser.find_element(By.ID, f"retry-{failed_id}").click()
    wait_for(lambda: browser.current_url.endswith("/ui/jobs"), 30, "the jobs page again")
    retried = wait_for(
        lambda: next(
            (
                j
                for j in client.get("/api/v1/jobs", headers=auth).json()["items"]
                if j["id"] == failed_id and j["attempts"] == 2 and j["state"] == "failed"
            ),
            None,
        ),
        JOB_TIMEOUT,
        "the retried job to run again",
    )
    assert "duplicate" in retried["error"].lower()
    browser.get(url + "/ui/exports")
    assert browser.find_element(By.ID, f"retry-export-{exports[0]['id']}")
    for page in ("/ui/models", "/ui/exports", "/ui/studies"):
        browser.get(url + page)
        assert "pacsnode" in browser.title
    retry_rows = [r for r in _audit(node) if r.action == "jobs.retry"]
    assert retry_rows and retry_rows[-1].actor == "token:test-admin"

    # An abrupt stop loses no audit row of a call that completed.
    before = len(_audit(node))
    for _ in range(10):
        assert client.get("/api/v1/results/findings", headers=auth).status_code == 200
    node.kill9()
    after = [r for r in _audit(node) if r.action == "results.findings.read"]
    assert len(_audit(node)) >= before + 10 and len(after) >= 10
    shutil.rmtree(tmp_path / "study")
