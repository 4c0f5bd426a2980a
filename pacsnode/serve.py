"""``pacsnode serve``: the all-in-one node on one machine.

Start-up order: check the configuration (done by the caller), bring the
database schema to head, then run the storage SCP processes and the study
assembler, each in its own process under one supervisor. Later parts of the
pipeline (the dispatcher, a worker, the HTTP API) join here.
"""

from __future__ import annotations

import logging
import signal
import threading

from db.migrate import upgrade
from db.session import create_db_engine
from pacsnode.assembler import run_assembler
from pacsnode.logs import configure_logging
from pacsnode.settings import Settings
from scp.server import SCPSupervisor

log = logging.getLogger("pacsnode.serve")


def assembler_service(settings: Settings, stop: threading.Event) -> None:
    engine = create_db_engine(settings.effective_database_url)
    run_assembler(engine, settings, stop)
    engine.dispose()


def serve(settings: Settings) -> int:
    configure_logging(settings.log_level)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = create_db_engine(settings.effective_database_url)
    revision = upgrade(engine)
    engine.dispose()
    log.info("database ready at revision %s", revision)
    if not settings.peers:
        log.warning("no peers configured: every association will be rejected (default-deny)")
    supervisor = SCPSupervisor(settings, services=[("assembler", assembler_service)])
    signal.signal(signal.SIGTERM, lambda *_: supervisor.stop())
    signal.signal(signal.SIGINT, lambda *_: supervisor.stop())
    # One machine-readable line on stdout: tests and scripts wait for it.
    address = f"{settings.ae_title}@{settings.dicom_host}:{supervisor.port}"
    print(f"pacsnode ready: {address}", flush=True)
    supervisor.run()
    log.info("pacsnode stopped")
    return 0
