"""STOW-RS to DICOMweb destinations (PS3.18 §10.5): the export sender for a
destination with a ``url``, beside the C-STORE SCU (:mod:`scp.export`).

:func:`send_batch` stores the files of one claim in one request, ``POST
{url}/studies`` with ``multipart/related; type="application/dicom"``,
through ``dicomweb-client`` (its own retries off: the export rows' durable
backoff decides when to try again). Credentials (bearer token or HTTP basic,
:class:`~pacsnode.core.settings.WebAuth`) go in the session, never in a log
line, a reason or a row; ``tls.ca_file`` and a client certificate apply to
``https`` URLs.

Outcomes, each the disposition of an error class of
:mod:`pacsnode.core.errors`:

- no connection, a timeout, HTTP 408, 425, 429 or 5xx: :class:`StowUnavailable`
  (transient; the destination counts as not reached, its rows wait);
- any other HTTP 4xx (401 wrong credentials, 403, 404, 413, 415…):
  :class:`StowRejected` (permanent: the rows fail now, with the status);
- HTTP 200, 202 or 409 with a response data set: per instance, stored when
  in the ReferencedSOPSequence (with its WarningReason, if any), refused when
  in the FailedSOPSequence with its FailureReason: 0xA7xx (Out of Resources)
  and 0x0110 (Processing failure) are transient, anything else (0xA9xx,
  0xC000, 0x0122…) permanent. An instance missing from both sequences of a
  response that has them was not acknowledged: transient.

Reasons name the URL and UIDs; the response's free text is never kept.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import requests
from dicomweb_client import DICOMwebClient
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from requests import PreparedRequest, Response
from requests.adapters import HTTPAdapter

from pacsnode.core.errors import ConfigError, StowError, StowRejected, StowUnavailable
from pacsnode.core.settings import Destination, Settings
from pacsnode.core.tls import ClientTLS
from pacsnode.db.exports import SendOutcome
from pacsnode.scp.status import store_status_text

log = logging.getLogger(__name__)

# HTTP statuses that mean "later" (besides 5xx): Request Timeout, Too Early,
# Too Many Requests (RFC 9110, RFC 8470, RFC 6585).
TRANSIENT_HTTP = frozenset({408, 425, 429})


@dataclass(frozen=True, slots=True)
class _Item:
    export_id: int
    dataset: Dataset

    @property
    def uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)


def _session(destination: Destination) -> requests.Session:
    """An HTTP session with the destination's credentials and TLS settings."""
    session = requests.Session()
    auth = destination.auth
    if auth is not None:
        secret = auth.secret()
        if auth.username is None:
            session.headers["Authorization"] = f"Bearer {secret}"
        else:
            session.auth = (auth.username, secret)
    if destination.tls is not None:
        session.mount("https://", _TLSAdapter(destination.tls))
    return session


class _TLSAdapter(HTTPAdapter):
    """The destination's ``tls`` on every https request: its CA file (else
    the system's trusted CAs) and client certificate. Set here rather than on
    the session, where ``REQUESTS_CA_BUNDLE`` in the environment would
    override the configured CA file."""

    def __init__(self, tls: ClientTLS) -> None:
        super().__init__()
        self._verify: bool | str = str(tls.ca_file) if tls.ca_file is not None else True
        self._cert = (
            (str(tls.cert_file), str(tls.key_file))
            if tls.cert_file is not None and tls.key_file is not None
            else None
        )

    def send(self, request: PreparedRequest, **kwargs: Any) -> Response:  # type: ignore[override]
        kwargs["verify"], kwargs["cert"] = self._verify, self._cert
        return super().send(request, **kwargs)


def _read(export_id: int, path: Path) -> _Item | SendOutcome:
    try:
        return _Item(export_id, dcmread(path))
    except FileNotFoundError:
        return SendOutcome(False, reason=f"file missing: {path.name}")
    except (OSError, AttributeError, ValueError, InvalidDicomError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not a DICOM file"
        return SendOutcome(False, reason=f"cannot read {path.name}: {reason}")


def _http_error(url: str, status: int) -> StowError:
    """The error for an HTTP status without a per-instance answer, in the
    status's standard words (the server's own reason phrase is not kept)."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    words = f"STOW-RS to {url}: HTTP {status} {phrase}".rstrip()
    if status >= 500 or status in TRANSIENT_HTTP:
        return StowUnavailable(words)
    if status == 401:
        return StowRejected(f"{words} (check the destination's auth)")
    return StowRejected(words)


def _post(destination: Destination, datasets: list[Dataset], timeout: float) -> Dataset:
    """One STOW-RS request; the response data set (empty if none came).
    Raises a :class:`StowError` when no per-instance answer came."""
    url = str(destination.url)
    try:
        session = _session(destination)
    except ConfigError as exc:  # a secret's environment variable is not set
        raise StowRejected(f"STOW-RS to {url}: {exc}") from None
    client = DICOMwebClient(url, session=session, timeout=timeout)
    client.set_http_retry_params(retry=False)
    try:
        return client.store_instances(datasets)
    except requests.HTTPError as exc:
        response = exc.response
        if response is None:
            raise StowUnavailable(f"STOW-RS to {url}: no response") from None
        if response.status_code == 409:  # every instance failed: the reasons are in the body
            found = _response_dataset(response)
            if found is not None:
                return found
        raise _http_error(url, response.status_code) from None
    except requests.Timeout:
        raise StowUnavailable(f"STOW-RS to {url}: no answer within {timeout:g} s") from None
    except requests.exceptions.SSLError as exc:
        raise StowUnavailable(f"STOW-RS to {url}: TLS failed ({_tls_words(exc)})") from None
    except requests.ConnectionError:
        raise StowUnavailable(f"STOW-RS to {url}: cannot connect") from None
    except (ValueError, KeyError) as exc:  # a response dicomweb-client could not read
        raise StowUnavailable(
            f"STOW-RS to {url}: unreadable response ({type(exc).__name__})"
        ) from None
    finally:
        session.close()


def _tls_words(exc: Exception) -> str:
    text = str(exc)
    return "certificate verify failed" if "CERTIFICATE_VERIFY_FAILED" in text else "handshake"


def _response_dataset(response: requests.Response) -> Dataset | None:
    kind = response.headers.get("Content-Type", "").split(";")[0].strip()
    if kind not in ("application/dicom+json", "application/json") or not response.content:
        return None
    try:
        return Dataset.from_json(response.json())
    except (ValueError, TypeError, KeyError):
        return None


def _sequence(response: Dataset, keyword: str, reason: str) -> dict[str, int | None]:
    """SOP Instance UID → its Failure or Warning Reason (None if absent)."""
    found: dict[str, int | None] = {}
    for item in response.get(keyword, []):
        uid = str(item.get("ReferencedSOPInstanceUID", ""))
        value = item.get(reason)
        found[uid] = int(value) if value is not None else None
    return found


def _transient_reason(code: int) -> bool:
    return code & 0xFF00 == 0xA700 or code == 0x0110


def _per_instance(url: str, items: list[_Item], response: Dataset) -> dict[int, SendOutcome]:
    stored = _sequence(response, "ReferencedSOPSequence", "WarningReason")
    refused = _sequence(response, "FailedSOPSequence", "FailureReason")
    answered = "ReferencedSOPSequence" in response or "FailedSOPSequence" in response
    outcomes: dict[int, SendOutcome] = {}
    for item in items:
        if item.uid in refused:
            code = refused[item.uid]
            words = store_status_text(code) if code is not None else "no FailureReason given"
            outcomes[item.export_id] = SendOutcome(
                False,
                code,
                f"STOW-RS to {url} refused the instance: {words}",
                permanent=code is None or not _transient_reason(code),
            )
        elif item.uid in stored:
            code = stored[item.uid]
            warning = f"stored with warning {store_status_text(code)}" if code else ""
            outcomes[item.export_id] = SendOutcome(True, code, warning)
        elif answered:
            outcomes[item.export_id] = SendOutcome(
                False, reason=f"STOW-RS to {url}: the instance is not in the response"
            )
        else:  # a 200 without a response data set: stored, as the status says
            outcomes[item.export_id] = SendOutcome(True)
    return outcomes


def send_batch(
    settings: Settings, destination: Destination, items: Sequence[tuple[int, Path]]
) -> dict[int, SendOutcome]:
    """STOW-RS the files ``items`` (export id, path) to ``destination`` in
    one request; return each export id's outcome. Never raises for network
    or HTTP trouble: that is an outcome."""
    outcomes: dict[int, SendOutcome] = {}
    readable: list[_Item] = []
    for export_id, path in items:
        read = _read(export_id, path)
        if isinstance(read, SendOutcome):
            log.warning("export %d to %s: %s", export_id, destination.name, read.reason)
            outcomes[export_id] = read
        else:
            readable.append(read)
    if not readable:
        return outcomes
    url = str(destination.url)
    try:
        response = _post(destination, [i.dataset for i in readable], settings.network_timeout_s)
    except StowError as exc:
        # Unavailable: the destination takes nothing now; its other rows wait too.
        reached = not isinstance(exc, StowUnavailable)
        log.warning("export to %s: %s; %d object(s)", destination.name, exc, len(readable))
        outcome = SendOutcome(False, reason=str(exc), reached=reached, permanent=not exc.transient)
        outcomes.update((item.export_id, outcome) for item in readable)
        return outcomes
    found = _per_instance(url, readable, response)
    for item in readable:
        if not found[item.export_id].sent or found[item.export_id].reason:
            log.warning(
                "export of %s to %s: %s", item.uid, destination.name, found[item.export_id].reason
            )
    outcomes.update(found)
    stored = sum(o.sent for o in found.values())
    log.info(
        "export to %s (%s): %d of %d object(s) stored by STOW-RS",
        destination.name,
        url,
        stored,
        len(readable),
    )
    return outcomes
