"""One error disposition (pacsnode.core.errors): every deliberate error
declares once whether it is transient, its DIMSE status and its HTTP status,
and the three readers (the DICOM status mapping, the Celery retry decision,
the FastAPI exception handler) answer what the class declares."""

from __future__ import annotations

import ast
import errno
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from pacsnode.api import create_app
from pacsnode.core import errors
from pacsnode.core.errors import DimseStatus, PacsnodeError
from pacsnode.core.settings import load_settings
from pacsnode.scp.status import QRStatus, StoreStatus, dimse_status, qr_failure_status
from pacsnode.workers.celery_app import RETRY_OPTIONS, is_transient
from tests.test_architecture import ROOT, package_files


def all_errors() -> list[type[PacsnodeError]]:
    """The classes of the one hierarchy (subclasses elsewhere, such as the SCU
    helper's, inherit a core class's declaration: see the next tests)."""
    found = [
        value
        for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, PacsnodeError)
    ]
    return sorted(found, key=lambda c: c.__name__)


ERRORS = all_errors()


# Errors whose constructors take more than a message.
SAMPLES = {
    errors.AssociationRejected: lambda: errors.AssociationRejected(
        "PACS@127.0.0.1:104", 1, 1, 3, "calling AE title not recognized"
    ),
    errors.NoAssociation: lambda: errors.NoAssociation(
        "no answer from PACS@127.0.0.1:104", peer="PACS@127.0.0.1:104", connected=False
    ),
}


def make(cls: type[PacsnodeError]) -> PacsnodeError:
    if cls in SAMPLES:
        return SAMPLES[cls]()
    return cls(f"{cls.__name__} for 1.2.3.4")


def test_the_hierarchy_holds_every_error_the_issue_names() -> None:
    names = {cls.__name__ for cls in ERRORS}
    assert {
        "PreprocessError",
        "GeometryError",
        "PixelDataError",
        "CoregistrationError",
        "InvalidQuery",
        "IndexQueryError",
        "NotFound",
        "ModelLoadError",
        "ModelInputError",
        "ScuError",
        "FusionError",
        "EncodeError",
        "OutOfResources",
        "IndexUnavailable",
    } <= names


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_every_error_declares_its_disposition(cls: type[PacsnodeError]) -> None:
    assert isinstance(cls.transient, bool)
    assert isinstance(cls.dimse_status, DimseStatus)
    assert isinstance(cls.http_status, HTTPStatus)
    assert 400 <= cls.http_status < 600
    if PacsnodeError in cls.__bases__:
        # A direct child of the root says all three itself, so no family
        # inherits the root's "internal error" by accident.
        declared = {"transient", "dimse_status", "http_status"} <= set(vars(cls))
        assert declared, f"{cls.__name__} must declare transient, dimse_status and http_status"


def test_error_classes_live_in_the_core_only() -> None:
    """The one hierarchy is one module: a class anywhere else that derives
    from an exception must derive from a class of pacsnode.core.errors (it
    then inherits that class's disposition, e.g. the SCU helper's
    AssociationRejected from ScuError); deriving from a foreign exception
    would start a second hierarchy. KeyedValueError stays a ValueError:
    pydantic turns it into the manifest's validation error (a
    ModelConfigError) and it never leaves models.manifest."""
    allowed = {"KeyedValueError"}
    core_names = {cls.__name__ for cls in ERRORS}
    core = ROOT / "pacsnode" / "core" / "errors.py"
    strays = []
    for path in package_files():
        if path.resolve() == core.resolve():
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef) or node.name in allowed:
                continue
            bases = {ast.unparse(b).rsplit(".", 1)[-1] for b in node.bases}
            exceptional = any(b.endswith(("Error", "Exception")) for b in bases)
            if exceptional and not bases <= core_names:
                strays.append(f"{Path(path).relative_to(ROOT)}: {node.name}")
    assert strays == []


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_dicom_statuses_follow_the_declaration(cls: type[PacsnodeError]) -> None:
    exc = make(cls)
    assert dimse_status(exc) == StoreStatus(cls.dimse_status)
    find, move = qr_failure_status(exc, retrieve=False), qr_failure_status(exc, retrieve=True)
    if cls.dimse_status == DimseStatus.OUT_OF_RESOURCES:
        assert (find, move) == (QRStatus.OUT_OF_RESOURCES, QRStatus.OUT_OF_RESOURCES_MATCHES)
    elif cls.dimse_status in (  # C-STORE statuses only
        DimseStatus.PROCESSING_FAILURE,
        DimseStatus.SOP_CLASS_NOT_SUPPORTED,
    ):
        assert find == move == QRStatus.UNABLE_TO_PROCESS
    else:
        assert find == move == QRStatus(cls.dimse_status)


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_the_retry_decision_follows_the_declaration(cls: type[PacsnodeError]) -> None:
    assert is_transient(make(cls)) is cls.transient


def test_out_of_resources_means_later_everywhere() -> None:
    exc = errors.OutOfResources("disk above the high watermark")
    assert dimse_status(exc) == StoreStatus.OUT_OF_RESOURCES == 0xA700
    assert qr_failure_status(errors.IndexQueryError("down"), retrieve=False) == 0xA700
    assert is_transient(exc) and is_transient(errors.IndexUnavailable("no commit"))
    assert exc.http_status == HTTPStatus.SERVICE_UNAVAILABLE
    assert not is_transient(errors.GeometryError("duplicate slice position"))


def test_foreign_exceptions_keep_their_treatment() -> None:
    full = OSError(errno.ENOSPC, "No space left on device")
    assert dimse_status(full) == StoreStatus.OUT_OF_RESOURCES
    assert qr_failure_status(full, retrieve=True) == QRStatus.OUT_OF_RESOURCES_MATCHES
    assert dimse_status(RuntimeError("bug")) == StoreStatus.PROCESSING_FAILURE
    assert qr_failure_status(RuntimeError("bug"), retrieve=False) == QRStatus.UNABLE_TO_PROCESS
    assert is_transient(OperationalError("SELECT 1", {}, Exception("gone")))
    assert is_transient(ConnectionError()) and is_transient(TimeoutError())
    assert not is_transient(RuntimeError("bug")) and not is_transient(KeyError("x"))


def test_tasks_declare_celerys_own_retry_backoff() -> None:
    from pacsnode.workers.tasks import export_due, infer_job, run_job

    for task in (run_job, infer_job, export_due):
        for option, value in RETRY_OPTIONS.items():
            assert getattr(task, option) == value, (task.name, option)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The real application (its one registered handler), with one more route
    that raises the error it is told to."""
    folder = tmp_path_factory.mktemp("errors")
    url = f"sqlite:///{folder / 'index.db'}"
    app = create_app(load_settings(database_url=url, data_dir=folder / "data"))
    by_name = {cls.__name__: cls for cls in ERRORS}

    def raise_error(name: str) -> None:
        raise make(by_name[name])

    app.add_api_route("/raise/{name}", raise_error)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client
    app.state.engine.dispose()


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_the_http_handler_answers_the_declared_status(
    client: TestClient, cls: type[PacsnodeError]
) -> None:
    response = client.get(f"/raise/{cls.__name__}")
    assert response.status_code == cls.http_status
    assert response.json() == {"detail": str(make(cls))}


def test_other_exceptions_stay_a_bare_500(client: TestClient) -> None:
    response = client.get("/raise/NoSuchError")  # a KeyError inside the route
    assert response.status_code == 500
    assert "NoSuchError" not in response.text
