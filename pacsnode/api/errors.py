"""The one FastAPI exception handler: any :class:`PacsnodeError` becomes the
HTTP status its class declares (:mod:`pacsnode.core.errors`), with the
message as ``{"detail": …}`` like FastAPI's own errors. Routes raise
pacsnode's errors and never build an ``HTTPException`` for them; only the
authentication dependencies (401/403, :mod:`pacsnode.api.deps`) and the
dashboard's login redirect do.

Any other exception keeps FastAPI's treatment: a 500 without details (the
traceback goes to the log, never to the client).
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

from pacsnode.core.errors import PacsnodeError


async def pacsnode_error_response(request: Request, exc: Exception) -> JSONResponse:
    """``exc``'s declared HTTP status and message. Messages of deliberate
    errors carry UIDs and names of rows, never patient data."""
    if not isinstance(exc, PacsnodeError):  # registered for PacsnodeError only
        raise exc
    return JSONResponse({"detail": str(exc)}, status_code=int(exc.http_status))
