"""Study completion: the assembler writes one job per complete group, on both backends."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import select

from pacsnode.core.settings import CompletionPolicy
from pacsnode.db.models import Job
from pacsnode.db.session import create_db_engine
from pacsnode.lab.phantom import SeriesSpec, ct_series_datasets, write_ct_series
from pacsnode.workers.assembler import due
from tests.support import Node, node_config, storescu, wait_for

FAST = {"debounce_s": 0.3, "quiet_period_s": 2.0, "max_wait_s": 4.0}


def jobs(node: Node) -> list[Any]:
    engine = create_db_engine(node.database_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(select(Job).order_by(Job.id)).all())
    finally:
        engine.dispose()


def open_association(node: Node):  # type: ignore[no-untyped-def]
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PACSNODE")
    assert assoc.is_established
    return assoc


def series(seed: int, slices: int = 6, **kw: Any) -> SeriesSpec:
    return SeriesSpec(slices=slices, rows=16, columns=16, seed=seed, **kw)


def row(**kw: Any) -> SimpleNamespace:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    base = {
        "sending": 0,
        "released_at": None,
        "first_received_at": now,
        "last_received_at": now,
    }
    return SimpleNamespace(**{**base, **kw})


def test_due_rules() -> None:
    policy = CompletionPolicy(**FAST)
    t0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    s = timedelta(seconds=1)
    released = row(released_at=t0 + 0.1 * s)
    assert due(released, policy, t0 + 0.2 * s) is None  # still debouncing
    assert due(released, policy, t0 + 0.5 * s) == "association_released"
    # Another association is still sending: wait for it, or for the quiet period.
    busy = row(released_at=t0 + 0.1 * s, sending=1)
    assert due(busy, policy, t0 + 1.0 * s) is None
    assert due(busy, policy, t0 + 2.1 * s) == "quiet_period"
    # Instances keep arriving on an open association: max wait.
    streaming = row(sending=1, last_received_at=t0 + 3.9 * s)
    assert due(streaming, policy, t0 + 4.0 * s) == "max_wait"
    # An instance after the release: not complete on the release alone.
    late = row(released_at=t0, last_received_at=t0 + 0.5 * s)
    assert due(late, policy, t0 + 1.0 * s) is None


def test_policy_order_is_validated() -> None:
    with pytest.raises(ValueError, match="debounce_s <= quiet_period_s <= max_wait_s"):
        CompletionPolicy(debounce_s=5, quiet_period_s=1, max_wait_s=10)


def test_release_triggers_one_job_then_a_late_series_an_update(make_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    node = make_node(config=node_config(completion=FAST)).start()
    write_ct_series(tmp_path / "a", series(1))
    released = time.monotonic()
    storescu(node, tmp_path / "a")
    (job,) = wait_for(lambda: jobs(node), timeout=15, what="the first job")
    assert time.monotonic() - released < 10
    # (serve's dispatcher and worker may already be running it)
    assert (job.kind, job.trigger_reason, job.instances) == ("initial", "association_released", 6)
    # A second series of the same study arrives later: an update job for the
    # whole study.
    late = ct_series_datasets(series(1))
    second_series = generate_uid()
    for k, ds in enumerate(late):
        ds.SeriesInstanceUID = second_series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesNumber = 2
        (tmp_path / "b").mkdir(exist_ok=True)
        ds.save_as(tmp_path / "b" / f"{k}.dcm", enforce_file_format=True)
    storescu(node, tmp_path / "b")
    first, update = wait_for(lambda: (j := jobs(node)) and len(j) == 2 and j, what="update")
    assert first.id == job.id
    assert (update.kind, update.instances, update.study_pk) == ("update", 12, job.study_pk)


def test_open_association_from_the_same_peer_holds_the_study(make_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    node = make_node(
        config=node_config(completion={**FAST, "quiet_period_s": 3.5, "max_wait_s": 30})
    ).start()
    datasets = ct_series_datasets(series(2, slices=8))
    held = open_association(node)
    for ds in datasets[:4]:
        assert held.send_c_store(ds).Status == 0x0000
    # Meanwhile the rest of the study comes over another association, released.
    other = open_association(node)
    for ds in datasets[4:]:
        assert other.send_c_store(ds).Status == 0x0000
    other.release()
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:  # well past the debounce: still no job
        assert jobs(node) == []
        time.sleep(0.1)
    held.release()
    (job,) = wait_for(lambda: jobs(node), timeout=10, what="the job after both released")
    assert (job.trigger_reason, job.instances) == ("association_released", 8)


def test_aborted_sender_completes_after_the_quiet_period(make_node) -> None:  # type: ignore[no-untyped-def]
    node = make_node(config=node_config(completion=FAST)).start()
    assoc = open_association(node)
    for ds in ct_series_datasets(series(3, slices=3)):
        assert assoc.send_c_store(ds).Status == 0x0000
    assoc.abort()
    (job,) = wait_for(lambda: jobs(node), timeout=15, what="quiet-period job")
    assert job.trigger_reason == "quiet_period"


def test_streaming_sender_hits_max_wait(make_node) -> None:  # type: ignore[no-untyped-def]
    node = make_node(config=node_config(completion=FAST)).start()
    assoc = open_association(node)
    datasets = ct_series_datasets(series(4, slices=40))
    started = time.monotonic()
    sent = 0
    while not jobs(node):
        assert time.monotonic() - started < 15, "no max-wait job"
        assert assoc.send_c_store(datasets[sent]).Status == 0x0000
        sent += 1
        time.sleep(0.25)  # a slow modality: one image every 250 ms
    assoc.release()
    (job,) = jobs(node)
    assert job.trigger_reason == "max_wait"


def test_grouping_by_series_per_peer(make_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    peers = [
        {
            "ae_title": "STORESCU",
            "hosts": ["127.0.0.1"],
            "completion": {**FAST, "grouping": "series"},
        }
    ]
    node = make_node(config=node_config(peers=peers, completion=FAST)).start()
    for k, seed in enumerate((5, 6)):
        folder = tmp_path / f"s{k}"
        write_ct_series(folder, series(seed, slices=3))
    storescu(node, tmp_path / "s0")
    storescu(node, tmp_path / "s1")
    found = wait_for(lambda: (j := jobs(node)) and len(j) == 2 and j, what="two series jobs")
    assert all(j.series_pk is not None and j.instances == 3 for j in found)


def test_node_killed_while_assembling_still_triggers_after_restart(make_node) -> None:  # type: ignore[no-untyped-def]
    node = make_node(config=node_config(completion=FAST)).start()
    assoc = open_association(node)
    for ds in ct_series_datasets(series(7, slices=3)):
        assert assoc.send_c_store(ds).Status == 0x0000
    node.kill9()  # the association is still open: nothing was released
    assert jobs(node) == []
    node.start()
    (job,) = wait_for(lambda: jobs(node), timeout=15, what="job after restart")
    assert job.trigger_reason == "quiet_period" and job.instances == 3
    (job,) = wait_for(
        lambda: (j := jobs(node)) and j[0].state in ("succeeded", "failed") and j,
        timeout=60,
        what="the job processed",
    )
    assert (job.state, job.error) == ("succeeded", "")
