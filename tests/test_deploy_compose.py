"""docker-compose.yml: validated by Compose itself (`config`, schema-level; no engine needed) and read
for the deployment promises: GPU reservation, settings names, drain time, mounts of the provisioned
Prometheus and Grafana files."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.settings import Settings
from tests.helpers import missing

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
API_SERVICES = ("api-gpu", "api-cpu")


def compose_command() -> list[str] | None:
    """`docker compose` (v2 plugin) where present, else Debian's `docker-compose`."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def require_compose() -> list[str]:
    command = compose_command()
    if command is None:
        missing(
            "neither `docker compose` nor `docker-compose` is installed (Debian `docker-compose`; .ci/run)"
        )
    return command


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def run_compose_config(*extra: str) -> subprocess.CompletedProcess[str]:
    command = require_compose()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DDM_", "COMPOSE_"))}
    return subprocess.run(
        [*command, "--project-directory", str(ROOT), "-f", str(COMPOSE), *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_compose_file_is_valid_for_compose() -> None:
    result = run_compose_config("--profile", "gpu", "--profile", "cpu", "config")
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)
    assert set(rendered["services"]) == {"api-gpu", "api-cpu", "prometheus", "grafana"}
    gpu = rendered["services"]["api-gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "deploy" not in rendered["services"]["api-cpu"]


def test_compose_validation_rejects_a_broken_file(tmp_path: Path) -> None:
    """Guard against a validator that accepts anything."""
    broken = yaml.safe_load(COMPOSE.read_text())
    broken["services"]["prometheus"]["restart_policy_typo"] = "always"
    (tmp_path / "docker-compose.yml").write_text(yaml.safe_dump(broken))
    command = require_compose()
    result = subprocess.run(
        [*command, "-f", str(tmp_path / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "restart_policy_typo" in result.stdout + result.stderr


def test_api_services(compose: dict[str, Any]) -> None:
    fields = {f"DDM_{name.upper()}" for name in Settings.model_fields}
    for name in API_SERVICES:
        service = compose["services"][name]
        env = service["environment"]
        assert set(env) <= fields, set(env) - fields
        assert env["DDM_HOST"] == "0.0.0.0"
        assert service["ports"] == [f"${{DDM_PUBLISH_PORT:-8000}}:{env['DDM_PORT']}"]
        assert service["build"]["args"]["VARIANT"] == name.removeprefix("api-")
        assert service["profiles"] == [name.removeprefix("api-")]
        assert "ddm-anomaly" in service["networks"]["default"]["aliases"]
        # Docker's stop timeout must cover the service's drain after SIGTERM.
        grace = int(service["stop_grace_period"].removesuffix("s"))
        delay = float(env.get("DDM_SHUTDOWN_DELAY_S", Settings.model_fields["shutdown_delay_s"].default))
        assert grace > delay + float(env["DDM_DRAIN_TIMEOUT_S"])
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
        assert {"/tmp", "/home/app/.cache"} <= set(service["tmpfs"])
        assert any(v.endswith(":/opt/ddm/model_store") for v in service["volumes"])
        assert env["DDM_MODEL_DIR"].endswith("/opt/ddm/model_store/celeba32-ref}")
    assert compose["services"]["api-gpu"]["environment"]["DDM_DEVICE"] == "cuda"
    assert compose["services"]["api-cpu"]["environment"]["DDM_DEVICE"] == "cpu"


def test_monitoring_services_mount_files_that_exist(compose: dict[str, Any]) -> None:
    for name in ("prometheus", "grafana"):
        service = compose["services"][name]
        image, _, tag = service["image"].partition(":")
        assert tag and tag != "latest", f"pin {image}"
        for volume in service["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), volume
    command = compose["services"]["prometheus"]["command"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in command
    mounts = dict(v.split(":")[:2] for v in compose["services"]["prometheus"]["volumes"])
    config_in_container = Path(mounts["./deploy/prometheus/prometheus.yml"])
    rule_files = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())["rule_files"]
    for rule_file in rule_files:
        # Prometheus resolves relative rule files next to its config file.
        assert str(config_in_container.parent / rule_file) in mounts.values(), rule_file
