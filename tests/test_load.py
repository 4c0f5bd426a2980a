"""Load, the light CI shape of ``bench/load``: 8 concurrent senders while the
worker is busy with jobs; every acknowledged instance is stored and
processed, the SCP side's memory stays bounded, latencies are printed."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from bench.loadgen import RssSampler, make_series, send_concurrently
from pacsnode.db.models import Instance
from pacsnode.db.session import create_db_engine
from tests.support import Node, node_config, wait_for
from tests.test_assembly import FAST, jobs
from tests.test_pipeline import NO_MODELS, finished

SENDERS, PER_SENDER, SIZE = 8, 25, 64
# A study completes when its association is released (not by max_wait while
# it still arrives, which would add an update job per study).
COMPLETION = {**FAST, "quiet_period_s": 30.0, "max_wait_s": 300.0}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_eight_concurrent_senders_while_workers_are_busy(make_node: Any) -> None:
    node: Node = make_node(
        config=node_config(completion=COMPLETION, disabled_models=NO_MODELS, scp_processes=2)
    ).start()
    # Keep the worker busy: a first wave whose jobs run while the load arrives.
    warmup = send_concurrently(node.port, make_series(2, 60, 128, seed=900))
    assert node.process is not None
    wait_for(lambda: jobs(node), timeout=30, what="the first wave's jobs")
    series = make_series(SENDERS, PER_SENDER, SIZE)
    with RssSampler(node.process.pid) as rss:
        result = send_concurrently(node.port, series)
    print(f"\nload ({SENDERS} x {PER_SENDER}, {SIZE}x{SIZE}): {result.summary()}")
    print(
        f"SCP-side RSS {rss.scp_start_mb:.0f} -> peak {rss.scp_peak_mb:.0f} MB; "
        f"whole node peak {rss.tree_peak_mb:.0f} MB"
    )
    assert not result.refused
    assert len(result.acked) == SENDERS * PER_SENDER
    engine = create_db_engine(node.database_url)
    try:
        with engine.connect() as conn:
            stored = set(conn.execute(select(Instance.sop_instance_uid)).scalars())
    finally:
        engine.dispose()
    assert result.acked | warmup.acked <= stored
    done = wait_for(
        lambda: finished(node, SENDERS + 2), timeout=120, what="every study's job to finish"
    )
    assert [j.state for j in done] == ["succeeded"] * (SENDERS + 2)
    assert sum(j.instances for j in done) == len(result.acked) + len(warmup.acked)
    # Bounded: data sets stream to disk as they arrive, nothing piles up in memory.
    assert rss.scp_peak_mb - rss.scp_start_mb < 150
