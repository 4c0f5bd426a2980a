"""The first run: what ``pacsnode serve`` prints when it is ready, and the
one-time login link that signs a browser into the dashboard.

The link is offered only on a local first run: the API listens on loopback,
no ``api.bootstrap_token`` is configured and no live admin token exists. Its
key (256 random bits) is printed once; only its SHA-256 is kept, in
``data_dir/first-run-login.sha256`` (mode 0600). Opening the link (from
loopback) deletes that file (so it works once, also with several API
processes: only one unlink succeeds), creates an admin token named
``dashboard-first-run`` and sets it as the dashboard cookie. Issuing and
using the link are audited. A restart before the link is used replaces it.

What can go wrong: an unknown or used key, or a request from another
address, is refused (:func:`redeem` returns None) and audited by the caller.
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
import ipaddress
import os
import secrets
import shutil
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import Engine

from pacsnode.core.settings import Settings
from pacsnode.db import audit
from pacsnode.db.tokens import create_token, list_tokens

LINK_FILE = "first-run-login.sha256"
LINK_PATH = "/ui/login/once/"
TOKEN_NAME = "dashboard-first-run"
DEMO_AE = "PACSNODE_DEMO"  # pacsnode demo send's default calling AE title


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _link_file(settings: Settings) -> Path:
    return settings.data_dir / LINK_FILE


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def needs_link(settings: Settings, engine: Engine) -> bool:
    """True on a local first run (see the module docstring)."""
    if not is_loopback(settings.api.host) or settings.api.bootstrap_token:
        return False
    with engine.connect() as conn:
        return not any(t.role == "admin" and t.revoked_at is None for t in list_tokens(conn))


def issue_link(settings: Settings, engine: Engine, base_url: str) -> str:
    """A new one-time login link (replacing an unused one); audited."""
    key = secrets.token_urlsafe(32)
    path = _link_file(settings)
    partial = path.with_suffix(".tmp")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(_digest(key))
    os.replace(partial, path)
    with engine.begin() as conn:
        actor = audit.Actor("cli", f"cli:{getpass.getuser()}", socket.gethostname())
        audit.record(conn, actor, "ui.first_run_link_issued", detail={"by": "serve"})
    return f"{base_url}{LINK_PATH}{key}"


def redeem(settings: Settings, engine: Engine, key: str, client: str) -> str | None:
    """The new admin token if ``key`` is the live link's key and ``client``
    is on loopback (the link is then used up), else None."""
    path = _link_file(settings)
    try:
        expected = path.read_text().strip()
    except OSError:
        return None
    if not is_loopback(client) or not hmac.compare_digest(_digest(key), expected):
        return None
    try:
        path.unlink()  # one winner, even with concurrent requests
    except FileNotFoundError:
        return None
    with engine.begin() as conn:
        token_id, token = create_token(conn, "admin", TOKEN_NAME)
        audit.record(
            conn,
            audit.Actor("api", f"token:{TOKEN_NAME}", client),
            "ui.first_run_login",
            target=f"token:{TOKEN_NAME}",
            detail={"id": token_id, "role": "admin"},
        )
    return token


def cli_name() -> str:
    """How the person who started the node runs ``pacsnode`` (``pacsnode``
    if it is on PATH, else the path they used, e.g. ``.venv/bin/pacsnode``)."""
    argv0 = os.path.abspath(sys.argv[0])
    if argv0.endswith("__main__.py"):
        return "python -m pacsnode"
    if os.path.basename(argv0) != "pacsnode":  # embedded, or started some other way
        return "pacsnode"
    found = shutil.which("pacsnode")
    if found and os.path.abspath(found) == argv0:
        return "pacsnode"
    relative = os.path.relpath(argv0)
    return relative if not relative.startswith("..") else argv0


def _local(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def next_steps(
    settings: Settings,
    dicom_port: int,
    api_url: str,
    login_link: str | None,
    more: Sequence[tuple[str, str]] = (),
) -> list[str]:
    """The lines ``pacsnode serve`` prints when it is ready; ``more``: further
    (what, URL) pairs shown beside the dashboard (e.g. a viewer)."""
    cli = cli_name()
    target = f"{settings.ae_title}@{_local(settings.dicom_host)}:{dicom_port}"
    calling = ""
    demo_peer = settings.peer(DEMO_AE)
    if demo_peer is None or not demo_peer.allows("127.0.0.1"):
        local = next((p for p in settings.peers if p.allows("127.0.0.1")), None)
        calling = f" --calling-ae {local.ae_title}" if local else ""
    lines = [
        "",
        "Next steps:",
        "  1. Send a demo study (synthetic phantoms, for testing and demonstration only):",
        f"       {cli} demo send {target}{calling}",
        f"     or your own DICOM files:  {cli} send FOLDER {target}{calling}",
    ]
    if not calling and demo_peer is None:
        lines.append(
            "     (no peer may send from this machine: add one under `peers` in the configuration)"
        )
    lines += [f"  2. Watch the study and its results on the dashboard: {api_url}/ui/"]
    lines += [f"     {what}: {url}" for what, url in more]
    if login_link:
        lines += [
            "  3. Sign in with this one-time link (works once; shown only now):",
            f"       {login_link}",
            f"     More tokens: {cli} tokens create --role read --name NAME",
        ]
    else:
        lines += [
            f"  3. Sign in with an API token ({cli} tokens create --role admin --name NAME)",
        ]
    return [*lines, ""]
