"""Exports of results (docs/architecture.md §3, exports): the queue on SQLite and PostgreSQL, the
C-STORE SCU against dcmtk's storescp and pynetdicom peers on free ports, the
CLI, and a running node whose dispatcher and worker deliver due rows.

Time is moved by passing ``now``; waits are conditions with deadlines.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import Engine, select

from pacsnode.core.settings import Destination, ExportPolicy, Settings, load_settings
from pacsnode.core.taskdefs import EXPORT_DUE
from pacsnode.db import exports
from pacsnode.db.index import upsert_instances
from pacsnode.db.migrate import upgrade
from pacsnode.db.models import Export, Instance
from pacsnode.db.session import create_db_engine
from pacsnode.lab.phantom import SeriesSpec, write_ct_series
from pacsnode.scp.export import run_due, send_batch
from pacsnode.workers.celery_app import make_app
from pacsnode.workers.dispatcher import ExportPublisher
from tests.faultreport import ledger
from tests.support import Node, free_port, node_config, require_binary, storescu, wait_for
from tests.test_index import _record

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


# --- helpers -------------------------------------------------------------------


def listening(port: int) -> bool:
    """Something listens on TCP ``port`` (read from /proc: no connection made,
    so a DICOM peer's association count stays exact)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                return True
    return False


@dataclass
class StoreSCP:
    """dcmtk's storescp on ``port``, verbose, every received object kept."""

    port: int
    folder: Path
    proc: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)

    def start(self) -> StoreSCP:
        exe = require_binary("storescp")
        out = self.folder / "received"
        out.mkdir(parents=True, exist_ok=True)
        log_path = self.folder / f"storescp-{len(self.logs)}.log"
        self.logs.append(log_path)
        with log_path.open("wb") as log_file:
            self.proc = subprocess.Popen(
                [exe, "-v", "+xa", "-aet", "STORESCP", "+uf", "-od", str(out), str(self.port)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, "TCP_NODELAY": "1"},
            )
        wait_for(lambda: listening(self.port), timeout=10, what="storescp to listen")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def _log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs)

    def associations(self) -> int:
        return self._log().count("Association Received")

    def received(self) -> Counter[str]:
        """SOP Instance UIDs of the stored files, with how often each came."""
        return Counter(
            str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for p in (self.folder / "received").iterdir()
        )


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(free_port(), tmp_path / "storescp")
    yield scp
    scp.stop()


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = create_db_engine(database_url)
    upgrade(engine)
    yield engine
    engine.dispose()


def settings_for(data_dir: Path, database_url: str = "", **exports_policy: Any) -> Settings:
    return load_settings(
        data_dir=data_dir,
        database_url=database_url,
        network_timeout_s=10,
        exports=ExportPolicy(**exports_policy),
    )


def spool(engine: Engine, spool_dir: Path, count: int, seed: int) -> dict[int, str]:
    """Write ``count`` phantom CT files into the spool and index them as the
    SCP would; return {instance pk: SOP Instance UID}."""
    folder = spool_dir / f"study{seed}"
    paths = write_ct_series(
        folder, SeriesSpec(slices=count, rows=32, columns=32, seed=seed, lesions=0)
    )
    records = []
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        records.append(
            replace(
                _record(0),
                study_instance_uid=str(ds.StudyInstanceUID),
                series_instance_uid=str(ds.SeriesInstanceUID),
                sop_instance_uid=str(ds.SOPInstanceUID),
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                path=str(path.relative_to(spool_dir)),
            )
        )
    with engine.begin() as conn:
        upsert_instances(conn, records)
        rows = conn.execute(
            select(Instance.id, Instance.sop_instance_uid).where(
                Instance.sop_instance_uid.in_([r.sop_instance_uid for r in records])
            )
        )
        return {int(pk): uid for pk, uid in rows}


def destination(port: int, name: str = "pacs") -> Destination:
    return Destination(name=name, ae_title="STORESCP", host="127.0.0.1", port=port)


def enqueue(
    engine: Engine,
    pks: list[int],
    dests: list[Destination],
    now: datetime = T0,
    deadline_s: float = 3600,
) -> list[int]:
    with engine.begin() as conn:
        return exports.enqueue_exports(
            conn,
            job_id=None,
            instance_pks=pks,
            destinations=dests,
            now=now,
            deadline=now + timedelta(seconds=deadline_s),
        )


def rows(engine: Engine) -> dict[int, Any]:
    with engine.connect() as conn:
        return {r.id: r for r in conn.execute(select(Export))}


# --- choosing destinations -------------------------------------------------------


def test_destinations_follow_rules_and_sender(caplog: pytest.LogCaptureFixture) -> None:
    settings = load_settings(
        peers=[
            {"ae_title": "CT1", "hosts": ["10.0.0.5"], "port": 104},
            {"ae_title": "MR1", "hosts": ["10.0.0.6"]},  # no port: cannot be @sender
        ],
        destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": "10.0.0.1", "port": 104},
            {"name": "research", "ae_title": "RES", "host": "10.0.0.2", "port": 11112},
        ],
        exports={
            "rules": [
                {"destinations": ["pacs", "@sender"]},
                {"destinations": ["research", "pacs"], "models": ["lesion-seg"]},
                {"destinations": ["research"], "calling_ae_titles": ["MR1"]},
            ]
        },
    )
    names = [d.name for d in exports.destinations_for(settings, "lesion-seg", "CT1")]
    assert names == ["pacs", "peer-CT1", "research"]  # pacs once, in rule order
    assert [d.name for d in exports.destinations_for(settings, "ct-classifier", "CT1")] == [
        "pacs",
        "peer-CT1",
    ]
    with caplog.at_level(logging.WARNING, logger="pacsnode.db.exports"):
        names = [d.name for d in exports.destinations_for(settings, "ct-classifier", "MR1")]
    assert names == ["pacs", "research"]
    assert "'MR1'" in caplog.text and "@sender" in caplog.text
    assert set(exports.known_destinations(settings)) == {"pacs", "research", "peer-CT1"}


# --- the queue ---------------------------------------------------------------------


def test_enqueue_is_idempotent_and_leaves_outcomes_alone(engine: Engine, tmp_path: Path) -> None:
    pks = sorted(spool(engine, tmp_path / "spool", 2, seed=1))
    dests = [destination(1000, "a"), destination(1001, "b")]
    created = enqueue(engine, pks, dests)
    assert len(created) == 4
    assert enqueue(engine, pks, dests) == []  # a re-run of the job
    policy = ExportPolicy()
    with engine.begin() as conn:
        claim = exports.claim_due(conn, now=T0, limit=1)
        assert claim is not None
        (item,) = claim.items
        assert exports.mark_sent(conn, item.id, claimed_at=claim.claimed_at, now=T0)
        claim = exports.claim_due(conn, now=T0, limit=1)
        assert claim is not None
        late = T0 + timedelta(hours=2)  # past the deadline: failed
        state = exports.mark_failed(
            conn,
            claim.items[0].id,
            claimed_at=claim.claimed_at,
            now=late,
            policy=policy,
            reason="x",
        )
        assert state == "failed"
    before = {i: (r.state, r.attempts) for i, r in rows(engine).items()}
    assert enqueue(engine, pks, dests, now=T0 + timedelta(hours=3)) == []
    assert {i: (r.state, r.attempts) for i, r in rows(engine).items()} == before
    assert sorted(s for s, _ in before.values()) == ["failed", "pending", "pending", "sent"]


def test_claims_are_exclusive_and_a_lost_claim_comes_back(engine: Engine, tmp_path: Path) -> None:
    pks = sorted(spool(engine, tmp_path / "spool", 30, seed=2))
    enqueue(engine, pks, [destination(1000, "a"), destination(1001, "b")])
    taken: list[list[int]] = [[], []]
    # Both claim at the same moment, round after round: the loser of each
    # race must find other rows, never the winner's.
    rounds = 60 // 4 // 2 + 2
    together = threading.Barrier(2, timeout=60)

    def claimer(k: int) -> None:
        for _ in range(rounds):
            together.wait()
            with engine.begin() as conn:
                claim = exports.claim_due(conn, now=T0, limit=4)
            if claim is not None:
                taken[k].extend(item.id for item in claim.items)

    threads = [threading.Thread(target=claimer, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not set(taken[0]) & set(taken[1])
    assert sorted(taken[0] + taken[1]) == sorted(rows(engine))
    assert len(taken[0]) >= 20 and len(taken[1]) >= 20  # both got work, 4 at a time
    assert {r.state for r in rows(engine).values()} == {"sending"}

    # A worker that died holding its claim: due again after the lease.
    within = T0 + timedelta(seconds=exports.LEASE_S - 1)
    after = T0 + timedelta(seconds=exports.LEASE_S + 1)
    with engine.begin() as conn:
        assert exports.claim_due(conn, now=within) is None
        again = exports.claim_due(conn, now=after, limit=100)
        assert again is not None and again.items[0].attempts == 2
        # The old claim can no longer record an outcome.
        assert not exports.mark_sent(conn, again.items[0].id, claimed_at=T0, now=after)
        assert exports.mark_sent(conn, again.items[0].id, claimed_at=after, now=after)


def test_lease_outlasts_the_task() -> None:
    assert EXPORT_DUE.time_limit_s + 60 <= exports.LEASE_S


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    policy = ExportPolicy(initial_backoff_s=5, max_backoff_s=600, jitter=0.2)
    for attempts in range(1, 15):
        base = min(5 * 2 ** (attempts - 1), 600)
        delays = [exports.backoff_s(policy, attempts) for _ in range(200)]
        assert all(base * 0.8 <= d <= base * 1.2 for d in delays), attempts
        assert max(delays) - min(delays) > base * 0.2  # really spread
        assert exports.backoff_s(policy, attempts, -1.0) == pytest.approx(base * 0.8)
        assert exports.backoff_s(policy, attempts, 1.0) == pytest.approx(base * 1.2)
    assert exports.backoff_s(ExportPolicy(jitter=0), 3) == 20
    assert exports.backoff_s(ExportPolicy(jitter=0), 10_000) == 600


def test_failures_back_off_until_the_deadline(engine: Engine, tmp_path: Path) -> None:
    (pk,) = spool(engine, tmp_path / "spool", 1, seed=3)
    policy = ExportPolicy(initial_backoff_s=5, max_backoff_s=40, jitter=0.2)
    enqueue(engine, [pk], [destination(1000)], deadline_s=100)
    now, delays = T0, []
    while True:
        with engine.begin() as conn:
            claim = exports.claim_due(conn, now=now)
            assert claim is not None, now
            state = exports.mark_failed(
                conn, claim.items[0].id, claimed_at=now, now=now, policy=policy, reason="refused"
            )
        (row,) = rows(engine).values()
        if state == "failed":
            break
        assert state == "retrying" and row.last_error == "refused"
        next_at = exports.utc(row.next_attempt_at)
        delays.append((next_at - now).total_seconds())
        with engine.connect() as conn:  # not due before its time
            assert exports.due_keys(conn, now=next_at - timedelta(seconds=0.5)) == frozenset()
        now = next_at
    assert 4 <= delays[0] <= 6 and 8 <= delays[1] <= 12
    assert max(delays) <= 48  # capped (40 s, + 20 % jitter)
    assert now == T0 + timedelta(seconds=100)  # the last try happened at the deadline
    assert row.state == "failed" and row.next_attempt_at is None and row.attempts == len(delays) + 1


def test_dispatcher_publishes_once_per_newly_due_rows(engine: Engine, tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    app = make_app(settings)  # the embedded broker: one file per message
    queued = settings.data_dir / "broker" / "queue"

    def messages() -> int:
        return len(list(queued.iterdir()))

    pks = sorted(spool(engine, settings.spool_dir, 3, seed=9))
    publish = ExportPublisher()
    assert not publish(engine, app, now=T0)  # nothing due
    enqueue(engine, pks[:2], [destination(1000)], now=T0)
    down = make_app(replace_broker(settings, f"redis://127.0.0.1:{free_port()}/0"))
    assert not publish(engine, down, now=T0)  # broker down: the rows wait
    assert publish(engine, app, now=T0) and messages() == 1
    assert not publish(engine, app, now=T0 + timedelta(seconds=1))  # same rows: no pile-up
    assert messages() == 1
    enqueue(engine, pks[2:], [destination(1000)], now=T0 + timedelta(seconds=2))
    assert publish(engine, app, now=T0 + timedelta(seconds=2)) and messages() == 2
    with engine.begin() as conn:  # a worker took them all
        assert exports.claim_due(conn, now=T0 + timedelta(seconds=2)) is not None
    assert not publish(engine, app, now=T0 + timedelta(seconds=3))
    # The worker died holding the claim: due again after the lease, published again.
    assert publish(engine, app, now=T0 + timedelta(seconds=exports.LEASE_S + 3))
    assert messages() == 3


def replace_broker(settings: Settings, url: str) -> Settings:
    return settings.model_copy(update={"broker_url": url})


# --- the C-STORE SCU -------------------------------------------------------------


def test_send_batch_uses_one_association(storescp: StoreSCP, tmp_path: Path) -> None:
    storescp.start()
    paths = write_ct_series(
        tmp_path / "ct", SeriesSpec(slices=5, rows=32, columns=32, seed=4, lesions=0)
    )
    j2k = Path(get_testdata_file("JPEG2000.dcm"))  # type: ignore[arg-type]
    items = [(k, p) for k, p in enumerate([*paths, j2k])] + [(99, tmp_path / "gone.dcm")]
    outcomes = send_batch(settings_for(tmp_path), destination(storescp.port), items)
    assert all(outcomes[k].sent and outcomes[k].status == 0 for k in range(6))
    assert not outcomes[99].sent and "missing" in outcomes[99].reason
    assert storescp.associations() == 1
    sent = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in [*paths, j2k]}
    assert storescp.received() == Counter(sent)
    # The compressed file went as it is on disk, not decoded and re-encoded.
    (copy,) = [
        p
        for p in (storescp.folder / "received").iterdir()
        if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
        == pydicom.dcmread(j2k, stop_before_pixels=True).SOPInstanceUID
    ]
    original = pydicom.dcmread(j2k)
    assert pydicom.dcmread(copy).PixelData == original.PixelData


@pytest.fixture
def peer() -> Iterator[Any]:
    """Start pynetdicom SCPs that answer as told; shut them down afterwards."""
    servers: list[Any] = []

    def start(
        status: int = 0, syntaxes: list[str] = ALL_TRANSFER_SYNTAXES, **ae_options: Any
    ) -> int:
        ae = AE(ae_title="STORESCP")
        for key, value in ae_options.items():
            setattr(ae, key, value)
        ae.add_supported_context(CTImageStorage, syntaxes)
        handlers: list[Any] = [(evt.EVT_C_STORE, lambda _event: status)]
        server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        assert server is not None
        servers.append(server)
        return int(server.server_address[1])

    yield start
    for server in servers:
        server.shutdown()


def test_send_batch_outcomes(peer: Any, tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    paths = write_ct_series(
        tmp_path / "ct", SeriesSpec(slices=2, rows=32, columns=32, seed=5, lesions=0)
    )
    j2k = Path(get_testdata_file("JPEG2000.dcm"))  # type: ignore[arg-type]
    items = list(enumerate(paths))

    def send(port: int, batch: list[tuple[int, Path]] = items) -> dict[int, Any]:
        return send_batch(settings, destination(port), batch)

    refused = send(free_port())[0]
    assert (
        not refused.sent
        and not refused.reached
        and "cannot connect to STORESCP@127.0.0.1" in refused.reason
    )
    rejected = send(peer(require_calling_aet=["SOMEONE"]))[0]
    assert not rejected.reached and "rejected" in rejected.reason
    assert "Calling AE title not recognised" in rejected.reason
    full = send(peer(status=0xA700))[1]
    assert (full.sent, full.status, full.reached) == (False, 0xA700, True)
    assert "0xA700 Failure: Refused: Out of Resources" in full.reason
    warned = send(peer(status=0xB000))[0]
    assert warned.sent and warned.status == 0xB000 and "warning" in warned.reason
    # Only Implicit VR Little Endian accepted: the explicit file is re-encoded,
    # the JPEG 2000 one cannot be (PS3.5 §10: no decompression on the way).
    mixed = send(peer(syntaxes=[ImplicitVRLittleEndian]), [(0, paths[0]), (1, j2k)])
    assert mixed[0].sent
    assert not mixed[1].sent and "no accepted presentation context" in mixed[1].reason


def test_down_destination_retries_then_delivers_exactly_once(
    engine: Engine, storescp: StoreSCP, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, initial_backoff_s=5, jitter=0.2)
    uids = spool(engine, settings.spool_dir, 4, seed=6)
    enqueue(engine, sorted(uids), [destination(storescp.port)])
    summary = run_due(engine, settings, now=T0)  # nothing listens yet
    assert (summary.sent, summary.failed, summary.batches) == (0, 4, 1)
    retry_at = {r.next_attempt_at for r in rows(engine).values()}
    assert len(retry_at) == 1  # failed together, back together: one association
    for row in rows(engine).values():
        assert row.state == "retrying" and row.attempts == 1 and row.last_status is None
        assert "cannot connect to STORESCP@127.0.0.1" in row.last_error
        assert (
            T0 + timedelta(seconds=4)
            <= exports.utc(row.next_attempt_at)
            <= T0 + timedelta(seconds=6)
        )
    assert run_due(engine, settings, now=T0 + timedelta(seconds=1)).batches == 0  # not due yet

    storescp.start()
    summary = run_due(engine, settings, now=T0 + timedelta(seconds=7))
    assert (summary.sent, summary.failed, summary.batches) == (4, 0, 1)
    assert run_due(engine, settings, now=T0 + timedelta(hours=1)).batches == 0
    assert {(r.state, r.attempts, r.last_error) for r in rows(engine).values()} == {("sent", 2, "")}
    assert storescp.received() == Counter(uids.values())  # each exactly once
    assert storescp.associations() == 1


def test_failed_export_is_listed_and_retried_from_the_cli(
    make_node: Any, database_url: str, storescp: StoreSCP
) -> None:
    node: Node = make_node()  # not started: its configuration serves the CLI
    engine = create_db_engine(database_url)
    upgrade(engine)
    settings = settings_for(node.data_dir, database_url)
    uids = spool(engine, settings.spool_dir, 3, seed=7)
    enqueue(engine, sorted(uids), [destination(storescp.port)], now=T0, deadline_s=10)
    run_due(engine, settings, now=T0)  # refused: retry at the deadline at the latest
    run_due(engine, settings, now=T0 + timedelta(seconds=10))  # refused at the deadline
    assert {r.state for r in rows(engine).values()} == {"failed"}

    listed = node.cli("exports", "--state", "failed", "--json")
    assert listed.returncode == 0, listed.stderr
    found = [json.loads(line) for line in listed.stdout.splitlines()]
    assert {f["sop_instance_uid"] for f in found} == set(uids.values())
    assert all("cannot connect" in f["last_error"] and f["attempts"] == 2 for f in found)
    table = node.cli("exports", "--state", "failed")
    assert table.returncode == 0 and "3 failed" in table.stdout, table.stdout
    assert node.cli("exports", "--state", "lost").returncode == 2
    assert node.cli("exports", "retry", "--state", "sent").returncode == 2
    assert "Phantom" not in listed.stdout + table.stdout  # no patient names

    storescp.start()
    retried = node.cli("exports", "retry", "--destination", "pacs")
    assert retried.returncode == 0, retried.stderr
    assert "re-queued 3 export(s)" in retried.stdout
    assert node.cli("exports", "retry").stdout.strip() == "re-queued 0 export(s)"
    summary = run_due(engine, settings)  # the real clock: due at once
    assert summary.sent == 3
    assert {r.state for r in rows(engine).values()} == {"sent"}
    assert storescp.received() == Counter(uids.values())
    engine.dispose()


# --- through a running node -------------------------------------------------------

# The study never completes during the test, so no model job competes with
# the exports for the node's one worker.
NEVER = {"debounce_s": 3000, "quiet_period_s": 3000, "max_wait_s": 3000}


@pytest.mark.slow
@pytest.mark.faults
def test_node_delivers_due_exports_after_the_destination_returns(
    make_node: Any, database_url: str, storescp: StoreSCP, tmp_path: Path, fault_report: Any
) -> None:
    started = time.monotonic()
    config = node_config(
        completion=NEVER, exports={"initial_backoff_s": 0.5, "max_backoff_s": 1, "jitter": 0.2}
    )
    node: Node = make_node(config=config).start()
    write_ct_series(tmp_path / "ct", SeriesSpec(slices=3, rows=32, columns=32, seed=8, lesions=0))
    storescu(node, tmp_path / "ct")
    engine = create_db_engine(database_url)

    def indexed() -> list[int]:
        with engine.connect() as conn:
            return [int(i) for i in conn.execute(select(Instance.id)).scalars()]

    pks = wait_for(lambda: len(indexed()) == 3 and indexed(), what="instances indexed")
    now = datetime.now(UTC)
    enqueue(engine, pks, [destination(storescp.port)], now=now)

    def states() -> set[str]:
        return {r.state for r in rows(engine).values()}

    # Nothing listens: the worker tries, fails, and keeps retrying.
    wait_for(
        lambda: all(r.attempts >= 2 for r in rows(engine).values()),
        timeout=60,
        what="retries while the destination is down",
    )
    listed = node.cli("exports", "--json")
    assert all(
        "cannot connect" in json.loads(line)["last_error"] for line in listed.stdout.splitlines()
    )

    storescp.start()
    wait_for(lambda: states() == {"sent"}, timeout=60, what="exports sent")
    with engine.connect() as conn:
        uids = set(conn.execute(select(Instance.sop_instance_uid)).scalars())
    received = storescp.received()
    book = ledger(database_url)
    fault_report(
        "destination down, then back (storescp)",
        sent=3,
        acked=3,
        stored=len(book.instances),
        exports=book.exports_sent,
        lost=len(set(uids) - set(received)),
        duplicated=sum(n - 1 for n in received.values()) + book.export_duplicates,
        seconds=time.monotonic() - started,
    )
    assert received == Counter(uids)
    assert storescp.associations() == 1  # the rows failed together and came back together
    log = node.log()
    assert "export to pacs (STORESCP@127.0.0.1" in log and "cannot connect" in log
    assert "Phantom" not in log and "PHANTOM-0001" not in log  # UIDs only
    engine.dispose()
