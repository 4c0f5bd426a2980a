"""The one settings object of pacsnode.

Sources, lowest priority first: built-in defaults, the YAML file named by
``PACSNODE_CONFIG``, then ``PACSNODE_*`` environment variables. Peers and
destinations usually come from the YAML file; in the environment they are
JSON (``PACSNODE_PEERS='[{"ae_title": "CT1", "hosts": ["10.0.0.5"]}]'``).
"""

from __future__ import annotations

import ipaddress
import os
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from pacsnode.core.errors import ConfigError
from pacsnode.core.layout import DataLayout
from pacsnode.core.tls import ClientTLS, ServerTLS

CONFIG_ENV = "PACSNODE_CONFIG"
# The demonstration models shipped with pacsnode (docs/architecture.md §5), in the ``models``
# package beside this one. Found by location, not by ``import models``: a
# ``models/`` folder in the working directory could shadow that name.
BUNDLED_MODELS_DIR = (Path(__file__).parent.parent / "models" / "bundled").resolve()
# Where ``scripts/install-viewer`` puts the OHIF viewer by default: build/viewer/
# of the checkout this package runs from (docs/viewer.md).
DEFAULT_VIEWER_DIR = (Path(__file__).parent.parent.parent / "build" / "viewer").resolve()


def _check_ae_title(value: str) -> str:
    """PS3.5 §6.2 AE VR: 1-16 characters of the default repertoire, no backslash
    or control characters, not only spaces."""
    stripped = value.strip()
    if not stripped:
        raise ValueError("an AE title must not be empty")
    if len(value) > 16:
        raise ValueError(f"AE title {value!r} is longer than 16 characters")
    if any(ch == "\\" or not (0x20 <= ord(ch) < 0x7F) for ch in value):
        raise ValueError(f"AE title {value!r} holds a backslash or a non-printable character")
    return stripped


AETitle = Annotated[str, AfterValidator(_check_ae_title)]


def _check_host(value: str) -> str:
    """An IP address, a CIDR network or a host name."""
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        label_ok = all(part and part.replace("-", "").isalnum() for part in value.split("."))
        if not value or len(value) > 253 or not label_ok:
            raise ValueError(
                f"{value!r} is neither an IP address, a network nor a host name"
            ) from None
    return value


Host = Annotated[str, AfterValidator(_check_host)]


class CompletionPolicy(BaseModel):
    """When a study (or series) counts as complete (docs/architecture.md §4).

    DICOM has no end-of-study signal. A study is ready ``debounce_s`` after
    the association that sent it was released, if no other association from
    the peer is still sending it; otherwise after ``quiet_period_s`` without a
    new instance; and in any case ``max_wait_s`` after its first instance.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    grouping: Literal["study", "series"] = Field(
        default="study", description="one job per study, or per series"
    )
    # docs/architecture.md §4 suggests about 2 s; 0.5 s still covers senders that open
    # their associations back to back, and lets work start within a second of
    # the release (bench/trigger). Raise it per peer for senders that pause
    # between series: each series that misses it costs a whole-study update job.
    debounce_s: float = Field(
        default=0.5, ge=0, le=3600, description="wait after the sending association's release"
    )
    quiet_period_s: float = Field(
        default=30.0, gt=0, le=86_400, description="complete after this long without an instance"
    )
    max_wait_s: float = Field(
        default=900.0, gt=0, le=7 * 86_400, description="complete this long after the first"
    )

    @model_validator(mode="after")
    def _ordered(self) -> CompletionPolicy:
        if not self.debounce_s <= self.quiet_period_s <= self.max_wait_s:
            raise ValueError("expected debounce_s <= quiet_period_s <= max_wait_s")
        return self


class Peer(BaseModel):
    """A remote AE allowed to associate with pacsnode (send, query, retrieve)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ae_title: AETitle = Field(description="the peer's calling AE title")
    hosts: list[Host] = Field(
        min_length=1, description="IP addresses, CIDR networks or host names it may call from"
    )
    completion: CompletionPolicy | None = Field(
        default=None, description="its own completion policy (null: the node's)"
    )
    # The port of the peer's own storage SCP: needed to return results to it
    # ("@sender" in an export rule) and to move studies to it by C-MOVE. It
    # is reached at its first host, which must then be an address or name.
    port: int | None = Field(
        default=None, ge=1, le=65535, description="its storage SCP's port (@sender, C-MOVE)"
    )

    def allows(self, address: str) -> bool:
        """True if ``address`` (the TCP peer) is one of this peer's hosts."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return address in self.hosts
        for host in self.hosts:
            try:
                if ip in ipaddress.ip_network(host, strict=False):
                    return True
            except ValueError:
                continue
        return False


class WebAuth(BaseModel):
    """Credentials for a DICOMweb destination: a bearer token, or a user name
    and password (HTTP basic), each secret given by value or by the name of
    an environment variable read when the export is sent. Never logged,
    never shown (``pacsnode config show`` masks them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bearer_token: SecretStr | None = Field(default=None, description="a bearer token")
    bearer_token_env: str | None = Field(
        default=None, min_length=1, description="the environment variable holding the token"
    )
    username: str | None = Field(default=None, min_length=1, description="HTTP basic user name")
    password: SecretStr | None = Field(default=None, description="its password")
    password_env: str | None = Field(
        default=None, min_length=1, description="the environment variable holding the password"
    )

    @model_validator(mode="after")
    def _one_scheme(self) -> WebAuth:
        bearer = [k for k in ("bearer_token", "bearer_token_env") if getattr(self, k) is not None]
        basic = [k for k in ("password", "password_env") if getattr(self, k) is not None]
        if len(bearer) > 1 or len(basic) > 1:
            raise ValueError(f"give one of {' or '.join(bearer if len(bearer) > 1 else basic)}")
        if bearer and (basic or self.username is not None):
            raise ValueError("give a bearer token or a username and password, not both")
        if not bearer and (self.username is None or not basic):
            raise ValueError(
                "give bearer_token (or bearer_token_env), or username with password "
                "(or password_env)"
            )
        return self

    def secret(self) -> str:
        """The token or the password, read now (from the environment when so
        configured); ConfigError names the variable when it is not set."""
        value, env = (
            (self.bearer_token, self.bearer_token_env)
            if self.username is None
            else (self.password, self.password_env)
        )
        if value is not None:
            return value.get_secret_value()
        assert env is not None
        found = os.environ.get(env)
        if not found:
            raise ConfigError(f"environment variable {env} (a destination's auth) is not set")
        return found


def _check_url(value: str) -> str:
    """A DICOMweb base URL: http or https, a host, no credentials, no query."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("the url must not hold credentials: give them under auth")
    if parts.query or parts.fragment:
        raise ValueError("the url is a base URL: no query or fragment")
    return value.rstrip("/")


WebURL = Annotated[str, AfterValidator(_check_url)]


class Destination(BaseModel):
    """Where results go: a DICOM AE by C-STORE (``ae_title``, ``host`` and
    ``port``) or a DICOMweb service by STOW-RS (``url``, with optional
    ``auth``). ``tls`` applies to both. Only an AE destination can be a
    C-MOVE destination."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        min_length=1, pattern=r"^[A-Za-z0-9_.-]+$", description="name used in export rules"
    )
    ae_title: AETitle | None = Field(default=None, description="its called AE title (C-STORE)")
    host: Host | None = Field(default=None, description="its address or host name (C-STORE)")
    port: int | None = Field(default=None, ge=1, le=65535, description="its DICOM port (C-STORE)")
    url: WebURL | None = Field(
        default=None,
        description="a DICOMweb base URL (STOW-RS to {url}/studies) instead of an AE; "
        "not a C-MOVE destination",
    )
    auth: WebAuth | None = Field(default=None, description="credentials for the url (null: none)")
    tls: ClientTLS | None = Field(
        default=None,
        description="TLS to this destination (PS3.15 B.9; for a url: its https "
        "certificate check); null: plain TCP, or the system's CAs for https",
    )

    @model_validator(mode="after")
    def _one_transport(self) -> Destination:
        dimse = {"ae_title": self.ae_title, "host": self.host, "port": self.port}
        given = [key for key, value in dimse.items() if value is not None]
        if self.url is not None:
            if given:
                raise ValueError(
                    f"give either url (DICOMweb) or ae_title, host and port (DICOM), "
                    f"not both: remove {', '.join(given)} or url"
                )
        elif len(given) < 3:
            missing = [key for key in dimse if key not in given]
            raise ValueError(
                f"missing {', '.join(missing)}: a destination needs ae_title, host and port "
                "(DICOM C-STORE) or a url (DICOMweb STOW-RS)"
            )
        if self.auth is not None and self.url is None:
            raise ValueError("auth applies to a url destination only")
        if self.url is not None and self.tls is not None and not self.tls.verify_hostname:
            raise ValueError(
                "tls.verify_hostname: false applies to DICOM destinations only; an https "
                "url's certificate must name its host"
            )
        return self

    @property
    def address(self) -> str:
        """Where it is: ``AE@host:port`` or the URL (never credentials)."""
        if self.url is not None:
            return self.url
        return f"{self.ae_title}@{self.host}:{self.port}"


SENDER = "@sender"  # export rule destination: the AE that sent the study


class ExportRule(BaseModel):
    """Where results go: every output of the ``models`` listed (all when
    empty) for studies sent by the ``calling_ae_titles`` listed (all when
    empty) goes to each named destination; ``@sender`` returns it to the
    peer that sent the study (the peer needs a ``port``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    destinations: list[str] = Field(min_length=1, description="destination names, or @sender")
    models: list[str] = Field(default=[], description="model names (empty: every model)")
    calling_ae_titles: list[AETitle] = Field(
        default=[], description="senders whose studies match (empty: every sender)"
    )

    def matches(self, model: str, calling_ae_title: str) -> bool:
        return (not self.models or model in self.models) and (
            not self.calling_ae_titles or calling_ae_title.strip() in self.calling_ae_titles
        )


class ExportPolicy(BaseModel):
    """Export of results by C-STORE or STOW-RS (docs/architecture.md §3,
    exports): the rules choosing destinations, and how long and how often a
    failed export is retried."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: list[ExportRule] = Field(default=[], description="export rules (empty: no exports)")
    deadline_s: float = Field(default=86_400.0, gt=0, description="give up after this long")
    initial_backoff_s: float = Field(
        default=5.0, gt=0, description="first retry delay; doubles after each failure"
    )
    max_backoff_s: float = Field(default=600.0, gt=0, description="longest retry delay")
    jitter: float = Field(default=0.2, ge=0, le=1, description="± fraction of each delay")


class SegOptions(BaseModel):
    """How DICOM-SEG objects are written."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # BINARY is read by every viewer; FRACTIONAL keeps the model's
    # probabilities; LABELMAP needs a recent viewer (and Debian 12's dciodvfy
    # does not know it).
    segmentation_type: Literal["BINARY", "FRACTIONAL", "LABELMAP"] = Field(
        default="BINARY", description="Segmentation Type (PS3.3 C.8.20.2)"
    )
    # Frames without any segmented pixel are left out (smaller objects);
    # some viewers expect one frame per source image: set false for them.
    omit_empty_frames: bool = Field(
        default=True, description="leave out frames without a segmented pixel"
    )


class RetentionPolicy(BaseModel):
    """How long received studies and their results stay on the node
    (``pacsnode cleanup``). Disabled by default: nothing is ever deleted
    unless ``keep_days`` is set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    keep_days: float | None = Field(
        default=None,
        gt=0,
        description="delete studies whose last instance arrived more than this many days ago "
        "(null: keep everything)",
    )
    discard_failed_exports: bool = Field(
        default=False,
        description="also delete studies whose exports failed for good (past their deadline); "
        "by default they are kept until sent or retried",
    )


# Values that look like a configured secret but are an example's placeholder.
PLACEHOLDER_SECRETS = frozenset(
    {"changeme", "change-me", "change_me", "changethis", "secret", "password", "admin", "token",
     "example", "test", "xxx", "todo"}
)  # fmt: skip


class ApiSettings(BaseModel):
    """The admin HTTP API, dashboard and ``/metrics`` (``pacsnode serve`` and ``pacsnode api``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(
        default="127.0.0.1",
        description="listen address; loopback by default: expose it deliberately, "
        "behind a TLS proxy",
    )
    bootstrap_token: str = Field(
        default="",
        description="an admin token accepted besides those created with `pacsnode tokens create`, "
        "for automated set-ups; at least 32 characters, never a placeholder",
    )
    open_metrics: bool = Field(
        default=False, description="serve /metrics without a token (a scraper on a trusted network)"
    )

    @field_validator("bootstrap_token")
    @classmethod
    def _no_placeholder(cls, value: str) -> str:
        if value and (value.strip().lower() in PLACEHOLDER_SECRETS or len(value) < 32):
            raise ValueError(
                "refusing a placeholder or short secret: generate one with "
                "`pacsnode tokens create --role admin` or use at least 32 random characters"
            )
        return value


class DicomwebSettings(BaseModel):
    """The DICOMweb server (PS3.18) under ``/dicom-web`` on the HTTP port."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=True, description="serve QIDO-RS, WADO-RS and STOW-RS")
    cors_origins: list[str] = Field(
        default=[],
        description="origins allowed to call /dicom-web from a browser (CORS); "
        "empty: none (same-origin only)",
    )
    max_part_mb: int = Field(
        default=1024, ge=1, le=65_536, description="largest instance one STOW-RS part may carry"
    )
    max_request_mb: int = Field(
        default=8192, ge=1, le=1_048_576, description="largest STOW-RS request body"
    )
    max_results: int = Field(
        default=1000, ge=1, le=1_000_000, description="most matches one QIDO-RS answer carries"
    )
    thumbnail_size: int = Field(
        default=128, ge=16, le=1024, description="edge of a thumbnail, in pixels"
    )


class FusionOptions(BaseModel):
    """Study-level fusion models (``task: fusion``)."""

    model_config = ConfigDict(extra="forbid")

    max_wait_s: float = Field(
        default=600.0,
        ge=0,
        le=7 * 86_400,
        description="how long after a study's first instance a fusion model waits for its "
        "missing roles before recording the study as incomplete",
    )


BROKER_SCHEMES = ("redis://", "rediss://", "amqp://", "amqps://")


class Settings(BaseSettings):
    """Effective configuration of one pacsnode installation."""

    model_config = SettingsConfigDict(
        env_prefix="PACSNODE_", extra="forbid", validate_default=True, frozen=True
    )

    ae_title: AETitle = Field(
        default="PACSNODE",
        description="this node's AE title; associations calling another title are rejected",
    )
    dicom_host: str = Field(default="0.0.0.0", description="DICOM listen address")
    dicom_port: int = Field(
        default=11112, ge=0, le=65535, description="DICOM port (0 = any free port)"
    )
    http_port: int = Field(
        default=8000, ge=0, le=65535, description="HTTP API and dashboard port (0 = any free port)"
    )
    api: ApiSettings = Field(
        default=ApiSettings(), description="HTTP API and dashboard: bind host, tokens, metrics"
    )
    dicomweb: DicomwebSettings = Field(
        default=DicomwebSettings(),
        description="DICOMweb server: enabled, CORS origins, STOW-RS and QIDO-RS limits",
    )
    data_dir: Path = Field(
        default=Path.home() / ".local" / "share" / "pacsnode",
        description="spool, results, preprocessing cache, embedded broker, default SQLite database",
    )
    database_url: str = Field(
        default="",
        description="sqlite:///path or postgresql://user:pass@host/db "
        "(empty: SQLite under data_dir)",
    )
    broker_url: str = Field(
        default="",
        description="Celery broker: redis://host:6379/0 or amqp://user:pass@host:5672/vhost "
        "(RabbitMQ); empty: the embedded broker under data_dir, for one machine only",
    )
    job_heartbeat_timeout_s: float = Field(
        default=15.0,
        ge=3,
        le=600,
        description="a worker renews the lease of the job it runs every third of this; a job "
        "whose lease is this old lost its worker (killed, or its host gone) and is published "
        "again",
    )
    peers: list[Peer] = Field(
        default=[], description="AEs allowed to associate (default-deny: empty = nobody)"
    )
    destinations: list[Destination] = Field(
        default=[],
        description="where results go by C-STORE or STOW-RS; AE destinations are also "
        "C-MOVE destinations",
    )
    exports: ExportPolicy = Field(
        default=ExportPolicy(), description="which results go where, and their retries"
    )
    seg: SegOptions = Field(default=SegOptions(), description="how DICOM-SEG objects are written")
    fusion: FusionOptions = Field(
        default=FusionOptions(),
        description="study-level fusion models: how long to wait for series",
    )
    completion: CompletionPolicy = Field(
        default=CompletionPolicy(), description="when a study counts as complete"
    )
    retention: RetentionPolicy = Field(
        default=RetentionPolicy(), description="how long studies stay (pacsnode cleanup)"
    )
    max_associations: int = Field(
        default=32, ge=1, le=1000, description="concurrent associations for the whole node"
    )
    scp_processes: int = Field(
        default=0, ge=0, le=64, description="SCP processes sharing the port (0 = one per core)"
    )
    min_free_disk_mb: int = Field(
        default=1024,
        ge=0,
        description="below this free space in data_dir, C-STORE answers Out of Resources (0xA700)",
    )
    max_pdu_size: int = Field(
        default=262_144, ge=0, description="largest PDU the node accepts (0 = unlimited)"
    )
    tls: ServerTLS | None = Field(
        default=None, description="TLS on the DICOM port (PS3.15 B.9); null: plain TCP"
    )
    network_timeout_s: float = Field(
        default=60.0, gt=0, description="idle association and DIMSE timeout"
    )
    log_level: str = Field(
        default="INFO",
        pattern=r"^(DEBUG|INFO|WARNING|ERROR)$",
        description="DEBUG, INFO, WARNING or ERROR",
    )
    log_format: Literal["text", "json"] = Field(
        default="text", description="text lines, or one JSON object per line"
    )
    models_dir: Path = Field(
        default=BUNDLED_MODELS_DIR,
        description="one sub-folder per model (manifest.yaml + weights), checked at start-up "
        "(default: the bundled demonstration models)",
    )
    viewer_dir: Path = Field(
        default=DEFAULT_VIEWER_DIR,
        description="the OHIF viewer served at /viewer/, as scripts/install-viewer installs it "
        "(default: build/viewer/ of the checkout; missing: /viewer/ says how to install it)",
    )
    disabled_models: list[Annotated[str, Field(min_length=1)]] = Field(
        default=[], description='models not to run: "name" (every version) or "name@version"'
    )

    @field_validator("data_dir", "models_dir", "viewer_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @field_validator("broker_url")
    @classmethod
    def _known_broker(cls, value: str) -> str:
        if value and not value.startswith(BROKER_SCHEMES):
            raise ValueError(
                "only redis://, rediss://, amqp:// and amqps:// URLs are supported "
                "(empty: the embedded broker, for one machine)"
            )
        return value

    @field_validator("database_url")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if value and not value.startswith(("sqlite", "postgresql")):
            raise ValueError("only sqlite:// and postgresql:// URLs are supported")
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        names = [d.name for d in self.destinations]
        if len(names) != len(set(names)):
            raise ValueError("destination names must be unique")
        aets = [p.ae_title for p in self.peers]
        if len(aets) != len(set(aets)):
            raise ValueError("peer AE titles must be unique")
        for i, rule in enumerate(self.exports.rules):
            for name in rule.destinations:
                if name != SENDER and name not in names:
                    raise ValueError(
                        f"exports.rules.{i}: unknown destination {name!r} "
                        f"(configured: {', '.join(names) or 'none'}; or {SENDER})"
                    )
        return self

    @property
    def layout(self) -> DataLayout:
        """Where each kind of file lives under ``data_dir``."""
        return DataLayout(self.data_dir)

    @cached_property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.layout.database}"

    @property
    def spool_dir(self) -> Path:
        return self.layout.spool

    @property
    def effective_scp_processes(self) -> int:
        return self.scp_processes or os.cpu_count() or 1

    def peer(self, ae_title: str) -> Peer | None:
        return next((p for p in self.peers if p.ae_title == ae_title.strip()), None)

    def destination(self, name: str) -> Destination | None:
        return next((d for d in self.destinations if d.name == name), None)

    def move_destination(self, ae_title: str) -> Destination | None:
        """Where a C-MOVE to ``ae_title`` goes: a configured destination with
        that AE title, else a peer with a ``port``; None if neither."""
        title = ae_title.strip()
        found = next((d for d in self.destinations if d.url is None and d.ae_title == title), None)
        if found is not None:
            return found
        return self.sender_destination(title)

    def sender_destination(self, calling_ae_title: str) -> Destination | None:
        """The peer ``calling_ae_title`` as a destination (its first host and
        ``port``), for ``@sender`` and C-MOVE; None without a port."""
        peer = self.peer(calling_ae_title)
        if peer is None or peer.port is None:
            return None
        host = peer.hosts[0].split("/")[0]
        return Destination(
            name=f"peer-{peer.ae_title}", ae_title=peer.ae_title, host=host, port=peer.port
        )

    def completion_for(self, ae_title: str) -> CompletionPolicy:
        peer = self.peer(ae_title)
        return peer.completion if peer and peer.completion else self.completion

    def public_dict(self) -> dict[str, Any]:
        """The effective configuration with secrets (passwords in URLs) masked."""
        data = self.model_dump(mode="json")
        data["database_url"] = _mask_url(self.effective_database_url)
        data["broker_url"] = _mask_url(self.broker_url)
        if self.api.bootstrap_token:
            data["api"]["bootstrap_token"] = "***"
        return data

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls))


class _YamlSource(PydanticBaseSettingsSource):
    """Reads the YAML file named by ``PACSNODE_CONFIG`` (if set)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # pragma: no cover - __call__ does the work

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get(CONFIG_ENV)
        if not path:
            return {}
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{CONFIG_ENV}: cannot read {path}: {exc.strerror}") from exc
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{CONFIG_ENV}: {path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{CONFIG_ENV}: {path} must hold a mapping of settings")
        return data


def _mask_url(url: str) -> str:
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else url


def load_settings(**overrides: Any) -> Settings:
    """Build the settings, turning validation errors into a ConfigError that
    names each bad key (``peers.0.hosts.1: ...``)."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(part) for part in err["loc"]) or "(top level)"
            lines.append(f"  {key}: {err['msg']}")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None
