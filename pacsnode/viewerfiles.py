"""Whether the OHIF viewer is installed (``scripts/install-viewer``) and what
to say when it is not. Apart from :mod:`pacsnode.api.viewer` so that
``pacsnode serve`` can tell before its API process starts, without loading
the web framework."""

from __future__ import annotations

from pacsnode.core.settings import Settings

STAMP = ".pacsnode-viewer"  # written last by scripts/install-viewer
INSTALL_COMMAND = "scripts/install-viewer"


def installed(settings: Settings) -> bool:
    folder = settings.viewer_dir
    return (folder / STAMP).is_file() and (folder / "index.html").is_file()


def missing_message(settings: Settings) -> str:
    return (
        f"the OHIF viewer is not installed in {settings.viewer_dir}: "
        f"run {INSTALL_COMMAND} (needs npm; docs/viewer.md), then restart the node"
    )
