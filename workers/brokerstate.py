"""The broker as the API sees it: reachable or not, and how many messages
wait in each queue (the embedded filesystem broker, Redis or RabbitMQ alike, through
kombu's passive queue declaration, which creates nothing)."""

from __future__ import annotations

import contextlib

from kombu import Connection

from pacsnode.core.settings import Settings
from pacsnode.workers.celery_app import CPU_QUEUE, GPU_QUEUE, broker_options

QUEUES = (CPU_QUEUE, GPU_QUEUE)


def _connection(settings: Settings) -> Connection:
    url, options = broker_options(settings)
    return Connection(url, transport_options=options, connect_timeout=2)


def broker_reachable(settings: Settings) -> str:
    """ "ok", or why not (the exception's class: never a URL with a password)."""
    try:
        with _connection(settings) as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
    except Exception as exc:
        return f"unreachable: {type(exc).__name__}"
    return "ok"


def queue_depths(settings: Settings) -> dict[str, int]:
    """Messages waiting per queue; empty when the broker cannot be reached."""
    try:
        with _connection(settings) as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
            # A channel per queue: RabbitMQ closes the channel on which a
            # passive declaration named a queue that does not exist yet.
            return {name: _depth(conn, name) for name in QUEUES}
    except Exception:
        return {}


def _depth(conn: Connection, name: str) -> int:
    channel = conn.channel()
    try:
        return int(channel.queue_declare(queue=name, passive=True).message_count)
    except Exception:  # Redis: an empty queue has no key, so "does not exist"
        return 0
    finally:
        with contextlib.suppress(Exception):
            channel.close()
