"""Serving the admin API with uvicorn: inside ``pacsnode serve`` (one more
supervised process) or alone (``pacsnode api``)."""

from __future__ import annotations

import logging
import socket
import threading

from pacsnode.core.settings import Settings

log = logging.getLogger("pacsnode.api")


def bind_api(settings: Settings) -> socket.socket:
    """Bind the API's listening socket (``api.host``:``http_port``; port 0:
    any free one, reported in the ready line)."""
    family = socket.AF_INET6 if ":" in settings.api.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.api.host, settings.http_port))
    sock.listen(128)
    return sock


def run_api(settings: Settings, stop: threading.Event, sock: socket.socket | None = None) -> None:
    """Serve until ``stop`` is set."""
    import uvicorn  # only in the API's own process

    from pacsnode.api import create_app

    sock = sock or bind_api(settings)
    # log_config=None: keep pacsnode's handler (configure_logging); uvicorn's
    # own lines only at WARNING unless log_level is DEBUG (pacsnode.core.logs).
    debug = settings.log_level.upper() == "DEBUG"
    config = uvicorn.Config(
        create_app(settings),
        log_config=None,
        log_level="debug" if debug else "warning",
        access_log=debug,
        lifespan="off",
    )
    # uvicorn handles SIGTERM/SIGINT while it serves (graceful shutdown), then
    # restores and re-raises them, so the caller's own handlers still run.
    server = uvicorn.Server(config)

    def watch() -> None:
        stop.wait()
        server.should_exit = True

    threading.Thread(target=watch, name="api-stop", daemon=True).start()
    host, port = sock.getsockname()[:2]
    log.info("admin API on http://%s:%d", host, port)
    server.run(sockets=[sock])
