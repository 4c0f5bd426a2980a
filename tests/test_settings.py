from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pacsnode.core.errors import ConfigError
from pacsnode.core.settings import load_settings


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    import os

    for key in list(os.environ):
        if key.startswith("PACSNODE_"):
            monkeypatch.delenv(key)
    return monkeypatch


def test_defaults(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("PACSNODE_DATA_DIR", str(tmp_path))
    s = load_settings()
    assert s.ae_title == "PACSNODE"
    assert s.dicom_port == 11112
    assert s.http_port == 8000
    assert s.peers == []  # default-deny
    assert s.effective_database_url == f"sqlite:///{tmp_path / 'pacsnode.db'}"
    assert s.broker_url == ""


def test_yaml_then_environment(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "pacsnode.yaml"
    config.write_text(
        "ae_title: NODE_A\n"
        "dicom_port: 104\n"
        "peers:\n"
        "  - ae_title: CT_SCANNER_1\n"
        "    hosts: [127.0.0.1, 10.1.0.0/16]\n"
        "destinations:\n"
        "  - name: pacs\n"
        "    ae_title: ORTHANC\n"
        "    host: 127.0.0.1\n"
        "    port: 4242\n"
    )
    clean_env.setenv("PACSNODE_CONFIG", str(config))
    clean_env.setenv("PACSNODE_DICOM_PORT", "11113")
    s = load_settings()
    assert s.ae_title == "NODE_A"  # from YAML
    assert s.dicom_port == 11113  # environment wins over YAML
    peer = s.peer("CT_SCANNER_1")
    assert peer is not None
    assert peer.allows("127.0.0.1") and peer.allows("10.1.200.3")
    assert not peer.allows("10.2.0.1")
    assert s.destinations[0].port == 4242


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("dicom_port: 70000\n", "dicom_port"),
        ("ae_title: A_TITLE_LONGER_THAN_16\n", "ae_title"),
        ("peers:\n  - ae_title: CT1\n    hosts: ['bad host!']\n", "peers.0.hosts.0"),
        ("peers:\n  - ae_title: CT1\n", "peers.0.hosts"),
        ("destinations:\n  - {name: pacs, ae_title: X, host: h, port: 0}\n", "destinations.0.port"),
        ("unknown_key: 1\n", "unknown_key"),
    ],
)
def test_bad_value_names_the_key(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, yaml_text: str, key: str
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    clean_env.setenv("PACSNODE_CONFIG", str(config))
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert f"  {key}:" in str(info.value)


def test_bad_environment_value_names_the_key(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("PACSNODE_DICOM_PORT", "eleven")
    with pytest.raises(ConfigError, match="dicom_port"):
        load_settings()


def test_serve_refuses_bad_configuration(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("max_associations: 0\n")
    result = subprocess.run(
        [sys.executable, "-m", "pacsnode", "serve"],
        env={
            "PATH": "/usr/bin:/bin",
            "PACSNODE_CONFIG": str(config),
            "PACSNODE_DATA_DIR": str(tmp_path),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "max_associations" in result.stderr


def test_config_show_masks_secrets(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pacsnode", "config", "show", "--json"],
        env={
            "PATH": "/usr/bin:/bin",
            "PACSNODE_DATA_DIR": str(tmp_path),
            "PACSNODE_DATABASE_URL": "postgresql://pacs:s3cret@db.example:5432/pacsnode",
            "PACSNODE_BROKER_URL": "redis://:hunter2@127.0.0.1:6379/0",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "s3cret" not in result.stdout and "hunter2" not in result.stdout
    shown = json.loads(result.stdout)
    assert shown["database_url"] == "postgresql://pacs:***@db.example:5432/pacsnode"
    assert shown["broker_url"] == "redis://:***@127.0.0.1:6379/0"
    assert shown["ae_title"] == "PACSNODE"
