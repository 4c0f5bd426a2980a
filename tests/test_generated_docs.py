"""The documents generated from the code must match it: the configuration
reference (from the Settings class) and the conformance statement's tables
(from the SCP's presentation contexts, the C-FIND keys and the
implementation identifiers). Run scripts/generate-docs after a change."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.uid import UID
from pynetdicom import ALL_TRANSFER_SYNTAXES, StoragePresentationContexts

from pacsnode import configref, conformance
from pacsnode.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_configuration_reference_matches_the_settings() -> None:
    assert (DOCS / "configuration.md").read_text() == configref.render(), (
        "docs/configuration.md is out of date: run scripts/generate-docs"
    )


def test_every_setting_is_described_and_listed() -> None:
    assert configref.undocumented() == []
    text = (DOCS / "configuration.md").read_text()
    for name in Settings.model_fields:
        assert f"| `{name}` |" in text
    assert "| `retention.keep_days` |" in text
    assert "| `peers[].hosts` |" in text


def test_conformance_tables_match_the_code() -> None:
    document = (DOCS / "conformance.md").read_text()
    assert conformance.render(document) == document, (
        "docs/conformance.md tables are out of date: run scripts/generate-docs"
    )


def test_conformance_tables_list_what_the_scp_negotiates() -> None:
    """Independent of the generator: every storage SOP class and transfer
    syntax pynetdicom is configured with appears in the document."""
    text = (DOCS / "conformance.md").read_text()
    for context in StoragePresentationContexts:
        assert f"`{context.abstract_syntax}`" in text
    for syntax in ALL_TRANSFER_SYNTAXES:
        assert f"| {UID(syntax).name} | `{syntax}` |" in text
    assert "| StudyRoot" not in text  # names, not keywords
    assert "Study Root Query/Retrieve Information Model - MOVE" in text


def test_drift_is_detected() -> None:
    document = (DOCS / "conformance.md").read_text()
    tampered = document.replace(
        "| `1.2.840.10008.1.2.4.50` | yes |", "| `1.2.840.10008.1.2.4.50` | |"
    )
    assert tampered != document
    assert conformance.render(tampered) != tampered
    without = re.sub(r"<!-- generated: cfind-keys -->.*?<!-- end generated: cfind-keys -->",
                     "", document, flags=re.DOTALL)  # fmt: skip
    with pytest.raises(ValueError, match="cfind-keys"):
        conformance.render(without)


def test_generate_docs_check_passes() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate-docs"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
