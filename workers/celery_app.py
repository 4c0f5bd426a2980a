"""The Celery application shared by ``pacsnode serve`` and ``pacsnode worker``.

Broker: ``PACSNODE_BROKER_URL`` (``redis://…`` for real deployments); empty
means the embedded broker, kombu's filesystem transport under
``<data_dir>/broker``: no server to run, messages are files, so queued work
survives a restart of the node. Either way the database outbox is the source
of truth (pacsnode.workers.dispatcher), so a message the broker loses is published
again.

Queues: ``cpu`` (load, preprocess, encode, export) and ``gpu`` (model
inference), so inference workers can run on GPU machines.

A worker sends DICOM (exports), so its start-up installs the networking
patches (:func:`install_networking_patches`, on Celery's ``worker_init`` and
``worker_process_init``) and stops when pynetdicom is an untested release.
"""

from __future__ import annotations

import sys

from celery import Celery, signals
from kombu import Exchange, Queue

from pacsnode.core.errors import ConfigError
from pacsnode.core.settings import Settings
from pacsnode.scp import patches

CPU_QUEUE = "cpu"
GPU_QUEUE = "gpu"
# Hard limit of one task (the worker kills it after this long); the soft
# limit before it raises inside the task so it can record its failure.
TASK_TIME_LIMIT_S = 1800
# The embedded broker polls its folder this often (kombu's default is 1 s).
EMBEDDED_POLL_S = 0.05


def broker_options(settings: Settings) -> tuple[str, dict[str, object]]:
    if settings.broker_url:
        # Unacknowledged messages go back to the queue after this long; a task
        # never runs longer (its hard time limit is shorter).
        return settings.broker_url, {"visibility_timeout": 3600}
    folder = settings.layout.broker
    for sub in ("queue", "processed", "control"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    return "filesystem://localhost/", {
        "data_folder_in": str(folder / "queue"),
        "data_folder_out": str(folder / "queue"),
        "processed_folder": str(folder / "processed"),
        "control_folder": str(folder / "control"),
        "store_processed": False,
        "polling_interval": EMBEDDED_POLL_S,
    }


def install_networking_patches(**_: object) -> None:
    """Celery signal receiver: :func:`scp.patches.install` in the worker
    (``worker_init``, before the pool starts) and in each pool process
    (``worker_process_init``; a no-op when forked from a patched parent).
    Celery logs and ignores exceptions of signal receivers, so a refused
    pynetdicom ends the worker here, with the reason on stderr (exit 2, as
    the CLI's configuration errors)."""
    try:
        patches.install()
    except ConfigError as exc:
        print(f"pacsnode: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def make_app(settings: Settings) -> Celery:
    broker, options = broker_options(settings)
    app = Celery("pacsnode", broker=broker, include=["pacsnode.workers.tasks"])
    app.conf.update(
        broker_transport_options=options,
        broker_connection_retry_on_startup=True,
        task_queues=[
            Queue(name, Exchange(name, type="direct"), routing_key=name)
            for name in (CPU_QUEUE, GPU_QUEUE)
        ],
        task_default_queue=CPU_QUEUE,
        # At-least-once: acknowledge after the task ran; a worker that dies
        # mid-task gets its message redelivered (tasks are idempotent).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_time_limit=TASK_TIME_LIMIT_S,
        task_soft_time_limit=TASK_TIME_LIMIT_S - 100,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    app.conf.pacsnode_settings = settings
    # Connected once however many apps are made (Celery keys receivers by id).
    signals.worker_init.connect(install_networking_patches, weak=False)
    signals.worker_process_init.connect(install_networking_patches, weak=False)
    return app
