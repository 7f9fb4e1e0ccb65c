"""docker-compose.yml (CPU, the default) and docker-compose.gpu.yml (the GPU override): validated by Compose
itself (`config`, schema-level; no engine needed) and read for the deployment promises: a plain `up` runs
the API, GPU reservation only with the override, settings names, sizing to the host, drain time, the model
volume refreshed from the image, mounts of the provisioned Prometheus and Grafana files."""

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
GPU_OVERRIDE = ROOT / "docker-compose.gpu.yml"


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


def run_compose_config(*extra: str, gpu: bool = False) -> subprocess.CompletedProcess[str]:
    command = require_compose()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DDM_", "COMPOSE_"))}
    files = ["-f", str(COMPOSE), *(["-f", str(GPU_OVERRIDE)] if gpu else [])]
    return subprocess.run(
        [*command, "--project-directory", str(ROOT), *files, *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_plain_up_runs_the_api_on_cpu_and_the_override_puts_it_on_a_gpu() -> None:
    result = run_compose_config("config")
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)
    assert set(rendered["services"]) == {"model-store-sync", "api", "prometheus", "grafana"}
    cpu = rendered["services"]["api"]
    assert "deploy" not in cpu and cpu["environment"]["DDM_DEVICE"] == "cpu"
    assert cpu["environment"]["DDM_MODEL_INSTANCES"] == "auto"  # sized to the host's CPUs
    assert Settings(model_instances="auto", torch_threads=1).model_instances >= 1
    result = run_compose_config("config", gpu=True)
    assert result.returncode == 0, result.stderr
    gpu = yaml.safe_load(result.stdout)["services"]["api"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert gpu["environment"]["DDM_DEVICE"] == "cuda" and gpu["build"]["args"]["VARIANT"] == "gpu"
    assert gpu["environment"]["DDM_MODEL_INSTANCES"] == "1"


def test_the_model_volume_is_refreshed_from_the_image(compose: dict[str, Any]) -> None:
    """A rebuilt image's model reaches the volume: a one-shot service copies the image's model_store over
    it before the API starts (profiles under other names stay), as the image's user."""
    sync, api = compose["services"]["model-store-sync"], compose["services"]["api"]
    assert api["depends_on"]["model-store-sync"]["condition"] == "service_completed_successfully"
    assert sync["image"] == api["image"] and sync["build"] == api["build"]
    (mount,) = sync["volumes"]
    volume, target = mount.split(":")
    assert any(v == f"{volume}:/opt/ddm/model_store" for v in api["volumes"])
    script = " ".join(sync["entrypoint"])
    assert f"cp -a /opt/ddm/model_store/. {target}/" in script and f"chown 10001:10001 {target}" in script
    assert sync["read_only"] is True and sync["cap_drop"] == ["ALL"]


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


def test_api_service(compose: dict[str, Any]) -> None:
    fields = {f"DDM_{name.upper()}" for name in Settings.model_fields}
    service = compose["services"]["api"]
    env = service["environment"]
    assert set(env) <= fields, set(env) - fields
    gpu_env = yaml.safe_load(GPU_OVERRIDE.read_text())["services"]["api"]["environment"]
    assert set(gpu_env) <= fields, set(gpu_env) - fields
    assert env["DDM_HOST"] == "0.0.0.0"
    assert service["ports"] == [f"${{DDM_PUBLISH_PORT:-8000}}:{env['DDM_PORT']}"]
    assert service["build"]["args"]["VARIANT"] == "cpu" and "profiles" not in service
    assert "ddm-anomaly" in service["networks"]["default"]["aliases"]
    # Docker's stop timeout must cover the service's drain after SIGTERM.
    grace = int(service["stop_grace_period"].removesuffix("s"))
    delay = float(env.get("DDM_SHUTDOWN_DELAY_S", Settings.model_fields["shutdown_delay_s"].default))
    assert grace > delay + float(env["DDM_DRAIN_TIMEOUT_S"])
    assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
    assert {"/tmp", "/home/app/.cache"} <= set(service["tmpfs"])
    assert any(v.endswith(":/opt/ddm/model_store") for v in service["volumes"])
    assert env["DDM_MODEL_DIR"].endswith("/opt/ddm/model_store/celeba32-ref}")


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
