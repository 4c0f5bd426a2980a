"""The one exception hierarchy of pacsnode.

Every error the node raises on purpose derives from :class:`PacsnodeError`.
Each part of the node maps these classes to its own protocol in one function:
``scp.status.dimse_status`` for DICOM statuses; later the HTTP API and the
Celery retry policy do the same for HTTP statuses and retry decisions.
"""

from __future__ import annotations


class PacsnodeError(Exception):
    """Root of every error pacsnode raises deliberately."""


class ConfigError(PacsnodeError):
    """The configuration is invalid; the message names the offending key."""


class ModelConfigError(ConfigError):
    """A model manifest or its weights file is invalid (``models.registry``);
    the message names the manifest file and the key. Raised at start-up, so
    the node never runs a model it cannot vouch for."""


class IngestError(PacsnodeError):
    """An instance offered by a peer could not be accepted."""


class InvalidDataset(IngestError):
    """The data set cannot be parsed (PS3.4 B.2.3 'Cannot understand')."""


class NonConformantDataset(IngestError):
    """The data set parses but lacks or misuses attributes the node needs.

    Examples: a missing Study Instance UID (Type 1 in every IOD), a UID that
    breaks the PS3.5 §9.1 grammar, a SOP Instance UID that differs from the
    request's Affected SOP Instance UID.
    """


class OutOfResources(IngestError):
    """The node cannot store now (disk watermark, index unavailable): transient."""


class IndexUnavailable(OutOfResources):
    """The database did not commit the index rows."""
