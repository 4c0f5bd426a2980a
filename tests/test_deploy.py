"""Deployment files: docker-compose.yml validated by docker-compose itself
(Debian's docker-compose 1.29, whose ``config`` command needs no engine), every
service command checked against the real CLI, every ``PACSNODE_*`` variable
against the settings, the Dockerfile's stages, the GPU requirements, the
compose configuration file, and JSON logs."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from pacsnode.cli import app
from pacsnode.core.logs import configure_logging
from pacsnode.core.settings import CONFIG_ENV, Settings, load_settings
from tests.support import require_binary

ROOT = Path(__file__).resolve().parent.parent
SECRETS = {"POSTGRES_PASSWORD": "test-secret", "ORTHANC_PASSWORD": "demo-secret"}


def compose_config(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    exe = require_binary("docker-compose")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PACSNODE_", "POSTGRES_"))}
    return subprocess.run(
        [exe, "--project-directory", str(ROOT), "-f", str(ROOT / "docker-compose.yml"),
         "config", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The resolved compose file (variables substituted, anchors merged)."""
    result = compose_config(SECRETS)
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = yaml.safe_load(result.stdout)
    return data


def test_compose_file_is_valid_and_complete(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {
        "postgres", "redis", "migrate", "scp", "worker", "worker-gpu", "orthanc",
    }  # fmt: skip
    for name in ("postgres", "redis"):
        assert services[name]["healthcheck"]["test"], name
        assert services[name]["volumes"], name
    # Migrations run once, and everything of pacsnode's waits for them.
    assert services["migrate"]["command"] == ["pacsnode", "db", "upgrade"]
    assert services["migrate"]["restart"] == "no"
    for name in ("scp", "worker", "worker-gpu"):
        condition = services[name]["depends_on"]["migrate"]["condition"]
        assert condition == "service_completed_successfully", name
        assert "pacsnode-data:/var/lib/pacsnode:rw" in services[name]["volumes"], name
    assert services["scp"]["command"] == ["pacsnode", "serve", "--no-worker"]
    assert services["worker"]["command"][:4] == ["pacsnode", "worker", "--queues", "cpu,gpu"]
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["target"] == "gpu"
    assert gpu["command"][:4] == ["pacsnode", "worker", "--queues", "gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert services["orthanc"]["profiles"] == ["demo"]
    modalities = json.loads(services["orthanc"]["environment"]["ORTHANC__DICOM_MODALITIES"])
    assert modalities["pacsnode"] == ["PACSNODE", "scp", 11112]
    # The secrets arrive where they are needed.
    assert "test-secret@postgres" in services["scp"]["environment"]["PACSNODE_DATABASE_URL"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == "test-secret"


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_compose_refuses_to_run_without_a_secret(missing: str) -> None:
    env = {k: v for k, v in SECRETS.items() if k != missing}
    result = compose_config(env)
    assert result.returncode != 0
    assert f"set {missing}" in result.stderr


def test_worker_queues_follow_the_environment() -> None:
    result = compose_config({**SECRETS, "WORKER_QUEUES": "cpu", "WORKER_CONCURRENCY": "4"})
    assert result.returncode == 0, result.stderr
    command = yaml.safe_load(result.stdout)["services"]["worker"]["command"]
    assert command == ["pacsnode", "worker", "--queues", "cpu", "--concurrency", "4"]


def _pacsnode_commands(compose: dict[str, Any]) -> list[list[str]]:
    commands = []
    for service in compose["services"].values():
        if str(service.get("image", "")).startswith("pacsnode:"):
            commands.append(service["command"])
            test = service.get("healthcheck", {}).get("test", [])
            if test[:1] == ["CMD"]:
                commands.append(test[1:])
    dockerfile = (ROOT / "Dockerfile").read_text()
    for line in re.findall(r"^\s*(?:CMD|HEALTHCHECK.*?CMD)\s+(\[.*\])\s*$", dockerfile, re.M):
        commands.append(json.loads(line))
    return commands


def test_every_pacsnode_command_exists_in_the_cli(compose: dict[str, Any]) -> None:
    """Each command line parses against the real Typer app: the subcommand
    exists and every option and value is accepted (nothing runs)."""
    commands = _pacsnode_commands(compose)
    assert len(commands) >= 8
    root = typer.main.get_command(app)  # Typer's own (vendored) click classes
    for argv in commands:
        assert argv[0] == "pacsnode", argv
        command: Any = root
        args = argv[1:]
        while hasattr(command, "commands") and args and args[0] in command.commands:
            command = command.commands[args.pop(0)]
        assert not hasattr(command, "commands"), f"no such command: {argv}"
        command.make_context(argv[0], list(args))
    serve = root.commands["serve"]  # type: ignore[attr-defined]
    with pytest.raises(Exception, match="No such option"):  # the check can fail
        serve.make_context("serve", ["--no-such-flag"])
    with pytest.raises(Exception, match="valid integer"):
        root.commands["worker"].make_context("worker", ["--concurrency", "many"])  # type: ignore[attr-defined]


def test_every_pacsnode_variable_is_a_setting(compose: dict[str, Any]) -> None:
    fields = set(Settings.model_fields)
    seen = set()
    for name, service in compose["services"].items():
        for key in service.get("environment", {}):
            if key.startswith("PACSNODE_") and key != CONFIG_ENV:
                seen.add(key)
                assert key.removeprefix("PACSNODE_").lower() in fields, f"{name}: {key}"
    assert {"PACSNODE_DATABASE_URL", "PACSNODE_BROKER_URL", "PACSNODE_LOG_FORMAT"} <= seen


def test_the_compose_configuration_file_is_valid(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """deploy/pacsnode.yaml with the compose environment loads, and its demo
    peer is the Orthanc service's fixed address."""
    scp = compose["services"]["scp"]
    monkeypatch.setenv(CONFIG_ENV, str(ROOT / "deploy" / "pacsnode.yaml"))
    for key, value in scp["environment"].items():
        if key.startswith("PACSNODE_") and key != CONFIG_ENV:
            monkeypatch.setenv(key, str(value))
    settings = load_settings()
    orthanc_ip = compose["services"]["orthanc"]["networks"]["pacsnode"]["ipv4_address"]
    peer = settings.peer("ORTHANC")
    assert peer is not None and peer.allows(orthanc_ip) and peer.port == 4242
    assert settings.log_format == "json"
    assert settings.broker_url == "redis://redis:6379/0"


def test_dockerfile_builds_cpu_and_gpu_from_shared_stages() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = {name: base for base, name in re.findall(r"^FROM\s+(\S+)\s+AS\s+(\S+)", text, re.M)}
    assert stages["cpu"] == "runtime" and stages["gpu"] == "runtime"
    assert stages["build-cpu"] == "build" and stages["build-gpu"] == "build"
    last = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, re.M)[-1]
    assert last == "cpu"  # the default target
    assert re.search(r"^USER pacsnode$", text, re.M)
    assert "HEALTHCHECK" in text
    for copied in re.findall(r"^COPY (?!--from)(\S+)", text, re.M):
        assert (ROOT / copied).exists(), copied


def test_gpu_requirements_swap_tensorflow_at_the_pinned_version(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu-requirements"), str(tmp_path)], check=True
    )
    pins = (ROOT / "constraints.txt").read_text()
    version = re.search(r"^tensorflow[-_]cpu==(\S+)$", pins, re.M)
    assert version is not None
    requirements = (tmp_path / "requirements.txt").read_text().splitlines()
    constraints = (tmp_path / "constraints.txt").read_text().splitlines()
    assert f"tensorflow[and-cuda]=={version[1]}" in requirements
    assert f"tensorflow=={version[1]}" in constraints
    assert not any(re.match(r"tensorflow[-_]cpu", line) for line in requirements + constraints)
    assert len(constraints) == len(pins.splitlines())


def test_json_logs_hold_one_object_per_line() -> None:
    stream = io.StringIO()
    configure_logging("INFO", "scp-0", "json")
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    try:
        logging.getLogger("pacsnode.test").info("study %s stored", "1.2.3")
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("pacsnode.test").exception("failed")
    finally:
        configure_logging("INFO")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "study 1.2.3 stored"
    assert first["level"] == "INFO" and first["process"] == "scp-0"
    assert first["logger"] == "pacsnode.test" and first["time"].endswith("+00:00")
    assert second["level"] == "ERROR" and "ValueError: boom" in second["exception"]
    with pytest.raises(ValueError, match="log_format"):
        configure_logging("INFO", "main", "xml")
