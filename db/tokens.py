"""Bearer tokens of the admin API: created by ``pacsnode tokens create``,
stored as their SHA-256 only.

A token is 32 random bytes from :mod:`secrets` (256 bits), so a plain
SHA-256 is enough to store it: nobody can brute-force a preimage, and a
lookup by hash needs no per-token salt.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, insert, select, update

from pacsnode.db.models import ApiToken

# read: queries (admin API, dashboard, DICOMweb QIDO/WADO); admin: everything;
# store: DICOMweb STOW-RS only (a modality or gateway that sends studies).
ROLES = ("read", "admin", "store")
PREFIX = "pn_"


@dataclass(frozen=True, slots=True)
class TokenInfo:
    id: int
    name: str
    role: str
    created_at: datetime
    revoked_at: datetime | None


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def create_token(conn: Connection, role: str, name: str) -> tuple[int, str]:
    """Store a new token of ``role``; return its id and the token (shown once)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    token = new_token()
    token_id = conn.execute(
        insert(ApiToken)
        .values(name=name, role=role, token_sha256=digest(token), created_at=datetime.now(UTC))
        .returning(ApiToken.id)
    ).scalar_one()
    return int(token_id), token


def lookup(conn: Connection, token: str) -> TokenInfo | None:
    """The live token matching ``token``, or None."""
    row = conn.execute(
        select(ApiToken).where(
            ApiToken.token_sha256 == digest(token), ApiToken.revoked_at.is_(None)
        )
    ).first()
    if row is None:
        return None
    return TokenInfo(row.id, row.name, row.role, row.created_at, row.revoked_at)


def list_tokens(conn: Connection) -> list[TokenInfo]:
    rows = conn.execute(select(ApiToken).order_by(ApiToken.id)).all()
    return [TokenInfo(r.id, r.name, r.role, r.created_at, r.revoked_at) for r in rows]


def revoke(conn: Connection, token_id: int) -> bool:
    result = conn.execute(
        update(ApiToken)
        .where(ApiToken.id == token_id, ApiToken.revoked_at.is_(None))
        .values(revoked_at=datetime.now(UTC))
    )
    return bool(result.rowcount)
