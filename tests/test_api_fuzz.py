"""Fuzz the admin API from its own OpenAPI schema (schemathesis): no
operation answers 5xx, and no generated filter (injection strings included)
changes the stored data. A small budget: a few examples per operation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from sqlalchemy import Engine, func, select

from pacsnode.api import create_app
from pacsnode.core.settings import load_settings
from pacsnode.db.migrate import upgrade
from pacsnode.db.models import Export, Finding, Instance, Job, Study
from pacsnode.db.session import create_db_engine
from pacsnode.db.tokens import create_token
from tests.admin_data import populate

EXAMPLES = 8


@pytest.fixture
def fuzz_app(tmp_path: Path) -> Iterator[tuple[Any, Engine, str]]:
    url = f"sqlite:///{tmp_path / 'index.db'}"
    engine = create_db_engine(url)
    upgrade(engine)
    with engine.begin() as conn:
        populate(conn)
        _, token = create_token(conn, "admin", "fuzz")
    app = create_app(load_settings(database_url=url, data_dir=tmp_path / "data"), engine)
    yield app, engine, token
    engine.dispose()


def _stored(engine: Engine) -> tuple[int, ...]:
    with engine.connect() as conn:
        return tuple(
            int(conn.execute(select(func.count()).select_from(t)).scalar_one())
            for t in (Study, Instance, Job, Finding, Export)
        )


def test_no_server_error_and_reads_change_nothing(fuzz_app: tuple[Any, Engine, str]) -> None:
    app, engine, token = fuzz_app
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    headers = {"Authorization": f"Bearer {token}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case: Any) -> None:
            before = _stored(engine)
            response = case.call(headers=headers)
            assert response.status_code < 500, (case.method, case.path, response.text)
            if case.method == "GET":
                assert _stored(engine) == before, (case.method, case.path, case.query)

        fuzz()
