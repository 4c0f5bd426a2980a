"""DICOMweb destinations (docs/destinations.md): results go by STOW-RS through
the same export rows, backoff and deadline as C-STORE destinations.

Against a real Orthanc with its DICOMweb plugin (Debian ``orthanc-dicomweb``)
and HTTP basic authentication: the queue's outcomes (an outage retries and
then delivers once; wrong credentials fail at once with a readable reason),
and a running node whose phantom study's SEG and SR reach Orthanc by STOW-RS
after Orthanc was down for a while. A small HTTP server on a free port
answers 503 and records the bearer token it receives; the reading of
per-instance FailureReasons is checked on response data sets built with
pydicom.

The bundled models are for demonstration and testing; the checks here are on
delivery, not on clinical meaning.
"""

from __future__ import annotations

import http.server
import json
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

import highdicom as hd
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom import Dataset
from sqlalchemy import Engine

from pacsnode.api import create_app
from pacsnode.core.errors import ConfigError
from pacsnode.core.settings import ApiSettings, Destination, load_settings
from pacsnode.db import exports
from pacsnode.db.migrate import upgrade
from pacsnode.db.session import create_db_engine
from pacsnode.lab.phantom import SeriesSpec, StudySpec, write_ct_series, write_study
from pacsnode.scp import stow
from pacsnode.scp.export import run_due, send
from tests.faultreport import ledger
from tests.orthanc import DICOMWEB_PLUGIN, Orthanc, orthanc_binary
from tests.support import IN_CI, Node, node_config, storescu, wait_for
from tests.test_assembly import FAST
from tests.test_exports import T0, enqueue, rows, settings_for, spool
from tests.test_results_orthanc import CT, JOB_TIMEOUT, read
from tests.tlscerts import make_certificates

USER, PASSWORD = "pacsnode", "stow-test-password-1f9c"


def web_destination(url: str, name: str = "webpacs", **auth: Any) -> Destination:
    return Destination(name=name, url=url, auth=auth or None)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = create_db_engine(database_url)
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """An Orthanc with its DICOMweb plugin and one user; configured (its
    ports fixed), not started."""
    binary = orthanc_binary()
    if binary is None or not DICOMWEB_PLUGIN.exists():
        message = "Orthanc or its DICOMweb plugin is missing (apt-get install orthanc-dicomweb)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    server = Orthanc(
        home=tmp_path / "orthanc", binary=binary, dicomweb=True, users={USER: PASSWORD}
    )
    server.configure()
    yield server
    server.stop()


# --- configuration --------------------------------------------------------------


def test_a_destination_is_an_ae_or_a_url() -> None:
    settings = load_settings(
        destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": "10.0.0.1", "port": 104},
            {
                "name": "web",
                "url": "https://pacs.example.org/dicom-web/",
                "auth": {"username": "node", "password_env": "WEB_PACS_PASSWORD"},
            },
        ],
        exports={"rules": [{"destinations": ["pacs", "web"]}]},
    )
    web = settings.destination("web")
    assert web is not None and web.url == "https://pacs.example.org/dicom-web"
    assert web.address == "https://pacs.example.org/dicom-web"
    assert settings.move_destination("PACS") is not None
    assert [d.name for d in exports.destinations_for(settings, "m", "CT1")] == ["pacs", "web"]

    def refused(destination: dict[str, Any]) -> str:
        with pytest.raises(ConfigError) as caught:
            load_settings(destinations=[{"name": "x", **destination}])
        return str(caught.value)

    both = refused({"url": "http://h/dw", "ae_title": "A", "host": "h", "port": 1})
    assert "destinations.0:" in both and "not both" in both and "ae_title" in both
    assert "destinations.0: " in refused({}) and "or a url" in refused({})
    assert "missing port" in refused({"ae_title": "A", "host": "h"})
    assert "destinations.0.url:" in refused({"url": "ftp://h/dw"})
    assert "under auth" in refused({"url": "https://u:p@h/dw"})
    assert "destinations.0.auth:" in refused({"url": "http://h", "auth": {"username": "u"}})
    assert "not both" in refused(
        {"url": "http://h", "auth": {"bearer_token": "t", "username": "u", "password": "p"}}
    )
    assert "an https url's certificate must name its host" in refused(
        {"url": "https://h/dw", "tls": {"verify_hostname": False}}
    )
    assert "url destination only" in refused(
        {"ae_title": "A", "host": "h", "port": 1, "auth": {"bearer_token": "t"}}
    )


def test_credentials_are_never_shown() -> None:
    settings = load_settings(
        destinations=[
            {"name": "a", "url": "http://h/dw", "auth": {"bearer_token": "tok-31415"}},
            {"name": "b", "url": "http://h/dw", "auth": {"username": "u", "password": "pw-2718"}},
        ]
    )
    shown = json.dumps(settings.public_dict()) + repr(settings)
    assert "tok-31415" not in shown and "pw-2718" not in shown
    auth = settings.destinations[0].auth
    assert auth is not None and auth.secret() == "tok-31415"
    unset = web_destination("http://h/dw", bearer_token_env="PACSNODE_TEST_UNSET_TOKEN").auth
    assert unset is not None
    with pytest.raises(ConfigError, match="PACSNODE_TEST_UNSET_TOKEN"):
        unset.secret()


# --- reading a STOW-RS response ----------------------------------------------------


def _response(stored: dict[str, int | None], refused: dict[str, int | None]) -> Dataset:
    response = Dataset()
    response.ReferencedSOPSequence = []
    response.FailedSOPSequence = []
    for uids, sequence, reason in (
        (stored, response.ReferencedSOPSequence, "WarningReason"),
        (refused, response.FailedSOPSequence, "FailureReason"),
    ):
        for uid, code in uids.items():
            item = Dataset()
            item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
            item.ReferencedSOPInstanceUID = uid
            if code is not None:
                setattr(item, reason, code)
            sequence.append(item)
    return response


def test_per_instance_reasons_map_to_retry_or_failure() -> None:
    items = [stow._Item(k, Dataset()) for k in range(6)]
    for k, item in enumerate(items):
        item.dataset.SOPInstanceUID = f"1.2.3.{k}"
    response = _response(
        {"1.2.3.0": None, "1.2.3.1": 0xB000},
        {"1.2.3.2": 0xA700, "1.2.3.3": 0xA900, "1.2.3.4": 0xC000},
    )
    found = stow._per_instance("http://h/dw", items, response)
    assert found[0].sent and not found[0].reason
    assert found[1].sent and found[1].status == 0xB000 and "warning" in found[1].reason
    assert not found[2].sent and not found[2].permanent and "0xA700" in found[2].reason
    assert not found[3].sent and found[3].permanent and found[3].status == 0xA900
    assert not found[4].sent and found[4].permanent and "Cannot Understand" in found[4].reason
    assert not found[5].sent and not found[5].permanent and "not in the response" in found[5].reason


# --- a plain HTTP server: 503, and the bearer token it is sent -------------------------


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: ClassVar[list[dict[str, str]]] = []

    def do_POST(self) -> None:
        _Recorder.seen.append({"path": self.path, **dict(self.headers)})
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(503, "Service Unavailable")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def busy_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Recorder.seen = []
    yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    server.shutdown()
    server.server_close()


@pytest.fixture
def busy_https(tmp_path: Path) -> Iterator[tuple[str, Any]]:
    """The same server behind TLS, with a certificate for 127.0.0.1 from a test CA."""
    certs = make_certificates(tmp_path / "certs")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.server.cert, certs.server.key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Recorder.seen = []
    yield f"https://127.0.0.1:{server.server_address[1]}/dicom-web", certs
    server.shutdown()
    server.server_close()


def test_a_busy_destination_is_retried_and_gets_the_bearer_token(
    engine: Engine, busy_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PACSNODE_TEST_STOW_TOKEN", "bearer-token-16180")
    settings = settings_for(tmp_path, initial_backoff_s=5, jitter=0)
    dest = web_destination(busy_server, bearer_token_env="PACSNODE_TEST_STOW_TOKEN")
    settings = settings.model_copy(update={"destinations": [dest]})
    uids = spool(engine, settings.spool_dir, 2, seed=31)
    enqueue(engine, sorted(uids), [dest])
    summary = run_due(engine, settings, now=T0)
    assert (summary.sent, summary.failed, summary.unreachable) == (0, 2, ["webpacs"])
    for row in rows(engine).values():
        assert row.state == "retrying" and row.url == busy_server
        assert "HTTP 503" in row.last_error and "bearer-token" not in row.last_error
        assert exports.utc(row.next_attempt_at) == T0 + timedelta(seconds=5)
    (request,) = _Recorder.seen  # one request for the batch
    assert request["path"] == "/dicom-web/studies"
    assert request["Authorization"] == "Bearer bearer-token-16180"
    assert request["Content-Type"].startswith('multipart/related; type="application/dicom"')


def test_an_unset_secret_fails_the_export_with_the_variable_named(
    engine: Engine, busy_server: str, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path)
    dest = web_destination(busy_server, bearer_token_env="PACSNODE_TEST_NEVER_SET")
    settings = settings.model_copy(update={"destinations": [dest]})
    uids = spool(engine, settings.spool_dir, 1, seed=35)
    enqueue(engine, sorted(uids), [dest])
    assert run_due(engine, settings, now=T0).failed == 1
    (row,) = rows(engine).values()
    assert row.state == "failed" and "PACSNODE_TEST_NEVER_SET" in row.last_error
    assert _Recorder.seen == []  # nothing was sent without its credentials


# --- a real Orthanc with its DICOMweb plugin ---------------------------------------------


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_stow_to_orthanc_outage_then_once_and_wrong_credentials_fail(
    engine: Engine,
    orthanc: Orthanc,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("PACSNODE_TEST_ORTHANC_PASSWORD", PASSWORD)
    good = web_destination(
        orthanc.dicomweb_url + "/", username=USER, password_env="PACSNODE_TEST_ORTHANC_PASSWORD"
    )
    wrong = web_destination(
        orthanc.dicomweb_url, "wrongpw", username=USER, password="not-the-password-4242"
    )
    settings = settings_for(tmp_path, initial_backoff_s=5, jitter=0)
    settings = settings.model_copy(update={"destinations": [good, wrong]})
    uids = spool(engine, settings.spool_dir, 3, seed=32)
    pks = sorted(uids)
    enqueue(engine, pks, [good])

    # Orthanc is down: every row waits for its backoff, with the reason.
    summary = run_due(engine, settings, now=T0)
    assert (summary.sent, summary.failed, summary.unreachable) == (0, 3, ["webpacs"])
    for row in rows(engine).values():
        assert row.state == "retrying" and "cannot connect" in row.last_error
        assert orthanc.dicomweb_url in row.last_error

    orthanc.start()
    summary = run_due(engine, settings, now=T0 + timedelta(seconds=6))
    assert (summary.sent, summary.failed, summary.batches) == (3, 0, 1)
    assert {(r.state, r.attempts) for r in rows(engine).values()} == {("sent", 2)}
    assert run_due(engine, settings, now=T0 + timedelta(hours=1)).batches == 0
    assert orthanc.count_instances() == 3  # each once
    held = {str(read(orthanc, i).SOPInstanceUID) for i in orthanc.get("/instances")}
    assert held == set(uids.values())

    # Wrong credentials: HTTP 401, a failed row at once (no retries), readable.
    with caplog.at_level("INFO"):
        enqueue(engine, pks[:1], [wrong], now=T0 + timedelta(hours=2))
        summary = run_due(engine, settings, now=T0 + timedelta(hours=2))
    assert (summary.sent, summary.failed) == (0, 1)
    (failed,) = [r for r in rows(engine).values() if r.destination == "wrongpw"]
    assert failed.state == "failed" and failed.attempts == 1 and failed.next_attempt_at is None
    assert "HTTP 401 Unauthorized" in failed.last_error and "auth" in failed.last_error
    assert PASSWORD not in caplog.text and "not-the-password" not in caplog.text
    assert orthanc.count_instances() == 3

    # The API and the dashboard show the URL and the reason, never a credential.
    admin = "a" * 40
    shown = settings.model_copy(
        update={"database_url": str(engine.url), "api": ApiSettings(bootstrap_token=admin)}
    )
    with TestClient(create_app(shown, engine)) as client:
        headers = {"Authorization": f"Bearer {admin}"}
        listed = client.get("/api/v1/exports", headers=headers)
        assert listed.status_code == 200, listed.text
        assert {item["url"] for item in listed.json()["items"]} == {orthanc.dicomweb_url}
        page = client.get("/ui/exports", headers=headers)
        assert page.status_code == 200
        assert f"wrongpw ({orthanc.dicomweb_url})" in page.text
        assert "HTTP 401 Unauthorized" in page.text
        for text in (listed.text, page.text):
            assert PASSWORD not in text and "not-the-password" not in text


@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_node_stows_seg_and_sr_to_orthanc_after_an_outage(
    make_node: Any, orthanc: Orthanc, tmp_path: Path, fault_report: Any
) -> None:
    """One pipeline run: Orthanc is down while the node processes a phantom
    CT; the SEG and SR exports retry, and arrive once after it is back."""
    started = time.monotonic()
    config = node_config(
        completion=FAST,
        destinations=[
            {
                "name": "webpacs",
                "url": orthanc.dicomweb_url,
                "auth": {"username": USER, "password_env": "PACSNODE_TEST_ORTHANC_PASSWORD"},
            }
        ],
        exports={
            "rules": [{"destinations": ["webpacs"]}],
            "initial_backoff_s": 0.5,
            "max_backoff_s": 2.0,
        },
    )
    node: Node = make_node(
        config=config, env_extra={"PACSNODE_TEST_ORTHANC_PASSWORD": PASSWORD}
    ).start()
    study = write_study(tmp_path / "study", StudySpec(**CT))
    truth = json.loads(study.truth.read_text())
    study_uid = truth["study_instance_uid"]
    storescu(node, study.series["CT"][0].parent)

    def listed() -> list[dict[str, Any]]:
        result = node.cli("exports", "--json")
        assert result.returncode == 0, result.stderr
        return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]

    def retrying() -> list[dict[str, Any]] | None:
        found = listed()
        waiting = [r for r in found if r["state"] == "retrying" and r["attempts"] >= 2]
        return found if len(found) == 2 and len(waiting) == 2 else None

    waiting = wait_for(retrying, JOB_TIMEOUT, "STOW-RS exports retrying while Orthanc is down")
    assert all("cannot connect" in r["last_error"] for r in waiting)
    assert {r["address"] for r in waiting} == {orthanc.dicomweb_url}
    orthanc.start()
    sent = wait_for(
        lambda: (r := listed()) and all(x["state"] == "sent" for x in r) and r,
        60,
        "STOW-RS exports sent after Orthanc is back",
    )
    assert len(sent) == 2
    found = {m: orthanc.instances_of_modality(study_uid, m) for m in ("SEG", "SR")}
    assert len(found["SEG"]) == 1 and len(found["SR"]) == 1
    seg = hd.seg.Segmentation.from_dataset(read(orthanc, found["SEG"][0]))
    assert seg.StudyInstanceUID == study_uid and "not clinical" in seg.SeriesDescription
    sr = hd.sr.Comprehensive3DSR.from_dataset(read(orthanc, found["SR"][0]))
    assert sr.StudyInstanceUID == study_uid
    held = orthanc.count_instances()
    book = ledger(node.database_url)
    fault_report(
        "DICOMweb destination down, then back (Orthanc STOW-RS)",
        sent=CT["slices"],
        acked=CT["slices"],
        stored=len(book.instances) - 2,
        jobs=book.jobs,
        results=book.results,
        exports=book.exports_sent,
        lost=max(0, 2 - held) + 1 - book.job_states["succeeded"],
        duplicated=max(0, held - 2) + book.export_duplicates + book.result_duplicates,
        seconds=time.monotonic() - started,
    )
    assert held == 2  # the SEG and the SR, once each (the CT never went to Orthanc)
    log = node.log()
    assert PASSWORD not in log
    assert f"export to webpacs ({orthanc.dicomweb_url})" in log
    table = subprocess.run(
        [sys.executable, "-m", "pacsnode", "exports"],
        env={**node.env(), "COLUMNS": "300"},  # one line per row
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert table.returncode == 0 and orthanc.dicomweb_url in table.stdout, table.stdout
    shown = node.cli("config", "show")
    assert shown.returncode == 0 and PASSWORD not in shown.stdout + table.stdout


def test_stow_over_https_checks_the_certificate(
    busy_https: tuple[str, Any], tmp_path: Path
) -> None:
    """An https url: the certificate is checked against tls.ca_file (or the
    system's CAs); an untrusted one is a TLS failure and nothing is sent.
    (The server answers 503 to what reaches it.)"""
    url, certs = busy_https
    paths = write_ct_series(
        tmp_path / "ct", SeriesSpec(slices=1, rows=32, columns=32, seed=34, lesions=0)
    )
    settings = settings_for(tmp_path)

    def stow_to(**tls: Any) -> Any:
        dest = Destination(name="https", url=url, tls=tls or None)
        return stow.send_batch(settings, dest, [(1, paths[0])])[1]

    for untrusted in (stow_to(ca_file=certs.rogue_ca.cert), stow_to()):
        assert not untrusted.sent and not untrusted.reached and not untrusted.permanent
        assert "TLS failed (certificate verify failed)" in untrusted.reason
    assert _Recorder.seen == []
    trusted = stow_to(ca_file=certs.ca.cert, cert_file=certs.client.cert, key_file=certs.client.key)
    assert "HTTP 503" in trusted.reason and len(_Recorder.seen) == 1


def test_send_picks_the_transport(tmp_path: Path) -> None:
    """One seam: a url destination goes by STOW-RS, an AE by C-STORE."""
    paths = write_ct_series(
        tmp_path / "ct", SeriesSpec(slices=1, rows=32, columns=32, seed=33, lesions=0)
    )
    settings = settings_for(tmp_path)
    web = send(settings, web_destination("http://127.0.0.1:9/dicom-web"), [(1, paths[0])])
    assert "STOW-RS to http://127.0.0.1:9/dicom-web: cannot connect" in web[1].reason
    ae = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=9)
    dimse = send(settings, ae, [(1, paths[0])])
    assert "cannot connect to PACS@127.0.0.1:9" in dimse[1].reason
    assert not web[1].reached and not dimse[1].reached
    assert pydicom.dcmread(paths[0]).Modality == "CT"
