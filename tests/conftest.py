from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from pacsnode.scp import patches
from tests.support import IN_CI, Node, node_config

pytest_plugins = ["tests.faultreport"]

POSTGRES_URL = os.environ.get(
    "PACSNODE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(autouse=True, scope="session")
def networking_patches() -> None:
    """The tests' own SCUs are pynetdicom associations too: give them the
    node's reactor checkpoint, as ``serve`` and the workers do."""
    patches.install()


def _postgres_database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test; dropped afterwards."""
    admin_url = make_url(POSTGRES_URL).set(drivername="postgresql+psycopg")
    name = f"pacsnode_{uuid.uuid4().hex[:12]}"
    try:
        admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        if IN_CI:
            pytest.fail(f"PostgreSQL at {POSTGRES_URL} is required under CI: {exc}")
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_URL}: {type(exc).__name__}")
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each test using this runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'index.db'}"
    else:
        yield from _postgres_database()


@pytest.fixture
def make_node(tmp_path: Path, database_url: str) -> Iterator[Node]:
    nodes: list[Node] = []

    def factory(**kwargs: object) -> Node:
        config = kwargs.pop("config", None) or node_config()
        node = Node(
            data_dir=tmp_path / f"node{len(nodes)}",
            database_url=database_url,
            config=config,  # type: ignore[arg-type]
            **kwargs,  # type: ignore[arg-type]
        )
        nodes.append(node)
        return node

    yield factory  # type: ignore[misc]
    for node in nodes:
        node.stop()


@pytest.fixture
def node(make_node) -> Node:  # type: ignore[no-untyped-def]
    return make_node().start()
