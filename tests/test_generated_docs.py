"""The documents generated from the code must match it: the configuration
reference (from the Settings class) and the conformance statement's tables
(from the SCP's presentation contexts, the C-FIND keys and the
implementation identifiers). Run scripts/generate-docs after a change."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from pydicom.uid import UID
from pynetdicom import ALL_TRANSFER_SYNTAXES, StoragePresentationContexts

from pacsnode import configref, conformance
from pacsnode.cli import app
from pacsnode.core.settings import Settings

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


def _documented_commands() -> list[tuple[str, list[str]]]:
    """Every ``pacsnode …`` command line in the README's and docs' shell blocks."""
    found = []
    for path in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        for block in re.findall(r"```sh\n(.*?)```", path.read_text(), re.DOTALL):
            for line in block.replace("\\\n", " ").splitlines():
                tokens = shlex.split(line, comments=True)
                for stop in ("|", "&&", ">", "&"):
                    if stop in tokens:
                        tokens = tokens[: tokens.index(stop)]
                # In command position: first, after VAR=value, or `exec <service>`.
                starts = [
                    i for i, t in enumerate(tokens)
                    if t in ("pacsnode", ".venv/bin/pacsnode")
                    and (i == 0 or "=" in tokens[i - 1] or tokens[i - 2 : i - 1] == ["exec"])
                ]  # fmt: skip
                if starts:
                    found.append((path.name, tokens[starts[0] + 1 :]))
    return found


def test_documented_commands_exist() -> None:
    """The commands the README and the guides tell operators to type parse
    against the real CLI (subcommands, options and option values)."""
    root: Any = typer.main.get_command(app)
    commands = _documented_commands()
    assert len(commands) >= 15
    for where, args in commands:
        command, rest = root, list(args)
        while hasattr(command, "commands") and rest and rest[0] in command.commands:
            command = command.commands[rest.pop(0)]
        try:
            command.make_context("pacsnode", rest)
        except Exception as exc:
            raise AssertionError(f"{where}: pacsnode {' '.join(args)}: {exc}") from None


def test_guide_manifest_and_configuration_are_valid(tmp_path: Path) -> None:
    """The manifest and node configuration printed in the plug-in guide load."""
    from pacsnode.models.manifest import read_manifest

    text = (DOCS / "plug-in-your-model.md").read_text()
    manifest = re.search(r"```yaml\n(# Written by docs/examples.*?)```", text, re.DOTALL)
    assert manifest is not None
    (tmp_path / "manifest.yaml").write_text(manifest[1])
    parsed = read_manifest(tmp_path / "manifest.yaml")
    assert parsed.name == "tiny-lesion-segmenter" and parsed.task == "segmentation"
    config = re.search(r"cat > my-node.yaml <<'EOF'\n(.*?)\nEOF", text, re.DOTALL)
    assert config is not None
    data = yaml.safe_load(config[1])
    settings = Settings(**data)
    assert settings.peer("PACSNODE_DEMO") is not None
    assert settings.exports.rules[0].destinations == ["pacs"]
