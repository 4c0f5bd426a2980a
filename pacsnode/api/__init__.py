"""The admin HTTP API, dashboard and ``/metrics`` of pacsnode (FastAPI)."""

from pacsnode.api.app import create_app

__all__ = ["create_app"]
