"""DICOM over TLS (PS3.15 Annex B.9, BCP 195 profile; B.1 for the older
authenticated-transport profile): the configuration of both ends and the
:class:`ssl.SSLContext` each one uses.

The storage SCP presents ``cert_file``/``key_file`` and, with ``ca_file``,
verifies client certificates: required with ``require_client_cert``,
otherwise checked only when a client offers one. An export destination with
``tls`` is reached over TLS; its certificate is verified against ``ca_file``
(or the system's trust store) and, unless ``verify_hostname`` is false,
against the destination's ``host``. PS3.15 B.9 asks for TLS 1.2 or later;
older versions are never offered.

Contexts are built once from the files at start-up (``Settings`` builds them
while validating), so a missing, unreadable or mismatched certificate stops
the node with the key named, instead of failing the first association.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


def _readable(value: Path | None) -> Path | None:
    if value is None:
        return None
    path = value.expanduser().absolute()
    if not path.is_file():
        raise ValueError(f"{path} does not exist or is not a file")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    return path


class ServerTLS(BaseModel):
    """TLS for the DICOM SCP: when set, the DICOM port speaks only TLS."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cert_file: Path = Field(description="the node's certificate (PEM)")
    key_file: Path = Field(description="its private key (PEM, no passphrase)")
    ca_file: Path | None = Field(
        default=None, description="CA certificates that sign client certificates (PEM)"
    )
    require_client_cert: bool = Field(
        default=False, description="refuse peers without a certificate signed by ca_file"
    )

    @field_validator("cert_file", "key_file", "ca_file")
    @classmethod
    def _files(cls, value: Path | None) -> Path | None:
        return _readable(value)

    @model_validator(mode="after")
    def _loads(self) -> ServerTLS:
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("require_client_cert needs ca_file (the CA of client certificates)")
        server_context(self)  # raises ValueError naming the file
        return self


class ClientTLS(BaseModel):
    """TLS for the C-STORE SCU towards one destination."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ca_file: Path | None = Field(
        default=None, description="CA certificates to trust (null: the system's trusted CAs)"
    )
    cert_file: Path | None = Field(
        default=None, description="a client certificate, for SCPs that require one (PEM)"
    )
    key_file: Path | None = Field(default=None, description="its private key (PEM)")
    verify_hostname: bool = Field(
        default=True, description="check that the certificate names the destination's host"
    )

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _files(cls, value: Path | None) -> Path | None:
        return _readable(value)

    @model_validator(mode="after")
    def _loads(self) -> ClientTLS:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        client_context(self)
        return self


def _new_context(purpose: ssl.Purpose) -> ssl.SSLContext:
    context = ssl.create_default_context(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # PS3.15 B.9 (BCP 195)
    return context


def _load_chain(context: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
    try:
        context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        raise ValueError(
            f"cert_file {cert_file} and key_file {key_file} are not a PEM certificate "
            f"and its private key ({exc.reason or exc})"
        ) from None
    except OSError as exc:
        raise ValueError(f"cannot load {cert_file} / {key_file}: {exc}") from None


def _load_ca(context: ssl.SSLContext, ca_file: Path) -> None:
    try:
        context.load_verify_locations(cafile=ca_file)
    except (ssl.SSLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, ssl.SSLError) else exc.strerror
        raise ValueError(
            f"ca_file {ca_file} holds no PEM CA certificate ({reason or exc})"
        ) from None


def server_context(tls: ServerTLS) -> ssl.SSLContext:
    context = _new_context(ssl.Purpose.CLIENT_AUTH)
    _load_chain(context, tls.cert_file, tls.key_file)
    if tls.ca_file is not None:
        _load_ca(context, tls.ca_file)
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_context(tls: ClientTLS) -> ssl.SSLContext:
    context = _new_context(ssl.Purpose.SERVER_AUTH)
    if tls.ca_file is not None:
        _load_ca(context, tls.ca_file)
    if tls.cert_file is not None and tls.key_file is not None:
        _load_chain(context, tls.cert_file, tls.key_file)
    # Certificates are always verified; only the name check can be waived,
    # for PACS whose certificates do not name the host they are reached at.
    context.check_hostname = tls.verify_hostname
    return context
