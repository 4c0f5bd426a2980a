"""The study assembler: decides when a study (or series) is complete.

DICOM has no end-of-study signal (docs/architecture.md §4). For each group still
assembling, in this order:

1. ``association_released``: the association that sent it was released at
   least ``debounce_s`` ago, no other association is still sending it, and
   nothing arrived after that release;
2. ``quiet_period``: nothing arrived for ``quiet_period_s`` (an aborted or
   crashed sender, or one that keeps its association open);
3. ``max_wait``: ``max_wait_s`` passed since its first instance, whatever
   else is going on.

Policies are per calling AE (``peers[].completion``). A trigger writes the
job row in the same transaction (db.assembly.trigger), so a job exists
exactly when its group is marked triggered, whatever crashes when.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine

from pacsnode.core.settings import CompletionPolicy, Settings
from pacsnode.db.assembly import assembling, reset_sending, trigger, utc
from pacsnode.db.fusion import expire_waits

log = logging.getLogger(__name__)

POLL_S = 0.2


def due(row: Any, policy: CompletionPolicy, now: datetime) -> str | None:
    """Why ``row`` is complete at ``now``, or None if it is not yet."""
    last = utc(row.last_received_at)
    released = utc(row.released_at) if row.released_at is not None else None
    if (
        row.sending == 0
        and released is not None
        and released >= last
        and (now - released).total_seconds() >= policy.debounce_s
    ):
        return "association_released"
    if (now - last).total_seconds() >= policy.quiet_period_s:
        return "quiet_period"
    if (now - utc(row.first_received_at)).total_seconds() >= policy.max_wait_s:
        return "max_wait"
    return None


def assemble_once(engine: Engine, settings: Settings, now: datetime | None = None) -> list[int]:
    """One pass over the groups still assembling; returns the new job ids."""
    now = now or datetime.now(UTC)
    jobs = []
    with engine.begin() as conn:
        for row in assembling(conn):
            reason = due(row, settings.completion_for(row.calling_ae_title), now)
            if reason is None:
                continue
            job_id = trigger(conn, row, reason, now)
            if job_id is not None:
                jobs.append(job_id)
                log.info(
                    "%s %s complete (%s): job %d (%s)",
                    row.grouping,
                    row.key_uid,
                    reason,
                    job_id,
                    row.next_kind,
                )
    return jobs


def run_assembler(engine: Engine, settings: Settings, stop: threading.Event) -> None:
    """Assemble until ``stop`` is set. Associations do not survive a restart,
    so counts of open ones left by a crash are cleared first."""
    with engine.begin() as conn:
        cleared = reset_sending(conn)
    if cleared:
        log.info("cleared open-association counts of %d group(s) after a restart", cleared)
    while not stop.is_set():
        try:
            assemble_once(engine, settings)
            with engine.begin() as conn:
                expire_waits(conn)  # fusion roles that never came (db.fusion)
        except Exception:
            # Database outage: nothing is lost (arrivals are committed rows);
            # try again on the next pass.
            log.exception("assembler pass failed")
        stop.wait(POLL_S)
