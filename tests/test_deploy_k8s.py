"""Kubernetes manifests: each overlay is rendered by kustomize (`kubectl kustomize`), every object is
validated against the Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields fail), and
the rendered objects are read for what the schema cannot know: probes on real endpoints, the drain
timing, the restricted security context, the GPU limit, and selectors that select the pods."""

from __future__ import annotations

import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from app.settings import Settings
from tests.helpers import missing

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
OVERLAYS = ("cpu", "gpu")
# The oldest Kubernetes release the manifests support, and the newest one kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.28", latest_version())

Manifest = dict[str, Any]


def kustomize_command() -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


@cache
def render(path: str) -> tuple[Manifest, ...]:
    command = kustomize_command()
    if command is None:
        missing("neither kubectl nor kustomize is installed; cannot render the kustomizations")
    result = subprocess.run([*command, str(K8S / path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def one(docs: tuple[Manifest, ...], kind: str) -> Manifest:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


@cache
def app_routes() -> frozenset[str]:
    """Paths the service really serves, from the FastAPI app's OpenAPI document."""
    from app.web.app import create_app

    return frozenset(create_app(Settings()).openapi()["paths"])


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, tuple[Manifest, ...]]:
    return request.param, render(f"overlays/{request.param}")


def test_every_object_validates_against_the_kubernetes_schema(
    overlay: tuple[str, tuple[Manifest, ...]],
) -> None:
    name, docs = overlay
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        [
            "Namespace",
            "ServiceAccount",
            "ConfigMap",
            "PersistentVolumeClaim",
            "Deployment",
            "Service",
            "PodDisruptionBudget",
            "HorizontalPodAutoscaler",
            "NetworkPolicy",
            "ServiceMonitor",
        ]
    ), name
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no schema in kubernetes-validate; read in test_service_monitor
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = "/".join(str(p) for p in exc.path)
                pytest.fail(f"{name}: {doc['kind']} invalid for {version} at {path}: {exc.message}")
        assert doc["metadata"].get("namespace", "ddm-anomaly") == "ddm-anomaly"


def test_validation_catches_an_unknown_field() -> None:
    deployment = dict(one(render("overlays/gpu"), "Deployment"))
    deployment["spec"] = {**deployment["spec"], "replicaz": 3}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def container(docs: tuple[Manifest, ...], name: str = "api") -> Manifest:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (c,) = [c for c in pod["containers"] if c["name"] == name]
    return c


def settings_of(docs: tuple[Manifest, ...]) -> dict[str, str]:
    data: dict[str, str] = one(docs, "ConfigMap")["data"]
    return data


def test_probes_point_at_real_endpoints(overlay: tuple[str, tuple[Manifest, ...]]) -> None:
    _, docs = overlay
    api = container(docs)
    routes = app_routes()
    ports = {p["name"]: p["containerPort"] for p in api["ports"]}
    assert ports["http"] == int(settings_of(docs)["DDM_PORT"])
    probes = {kind: api[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/livez"
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["startupProbe"]["path"] == "/readyz", "startup covers model load and warm-up"
    for kind, probe in probes.items():
        assert probe["path"] in routes, (kind, probe["path"])
        assert probe["port"] in ports or probe["port"] in ports.values(), kind
    startup = api["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "room for a large model's load"


def test_drain_timing(overlay: tuple[str, tuple[Manifest, ...]]) -> None:
    """terminationGracePeriodSeconds covers the preStop delay plus the service's SIGTERM drain."""
    _, docs = overlay
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    command = container(docs)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    settings = settings_of(docs)
    defaults = Settings.model_fields
    drain = float(settings.get("DDM_DRAIN_TIMEOUT_S", defaults["drain_timeout_s"].default))
    # The service's own delay (listening with /readyz at 503) comes after preStop and before the drain.
    delay = float(settings.get("DDM_SHUTDOWN_DELAY_S", defaults["shutdown_delay_s"].default))
    assert pre_stop >= 5
    needed = pre_stop + delay + drain
    assert needed < pod["terminationGracePeriodSeconds"] <= needed + 30


def test_restricted_security_context(overlay: tuple[str, tuple[Manifest, ...]]) -> None:
    _, docs = overlay
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    for c in pod["containers"] + pod.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], c["name"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["seccompProfile"]["type"] == "RuntimeDefault", c["name"]
        assert "privileged" not in sc or sc["privileged"] is False
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], c["name"]
    namespace = one(docs, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_writable_paths_are_volumes(overlay: tuple[str, tuple[Manifest, ...]]) -> None:
    _, docs = overlay
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container(docs)["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert "emptyDir" in volumes[mounts["/home/app/.cache"]]
    model_store = volumes[mounts["/opt/ddm/model_store"]]
    claim = one(docs, "PersistentVolumeClaim")
    assert model_store["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert settings_of(docs)["DDM_MODEL_DIR"].startswith("/opt/ddm/model_store/")
    (seed,) = pod["initContainers"]
    assert seed["image"] == container(docs)["image"], "the seed copies the model shipped in the same image"
    assert {m["name"] for m in seed["volumeMounts"]} == {mounts["/opt/ddm/model_store"]}


def test_settings_config_map(overlay: tuple[str, tuple[Manifest, ...]]) -> None:
    name, docs = overlay
    settings = settings_of(docs)
    fields = {f"DDM_{field.upper()}" for field in Settings.model_fields}
    assert set(settings) <= fields, set(settings) - fields
    assert settings["DDM_HOST"] == "0.0.0.0"
    assert settings["DDM_DEVICE"] == {"cpu": "cpu", "gpu": "cuda"}[name]
    # The generated name carries a content hash; the Deployment must reference that exact name.
    refs = [e["configMapRef"]["name"] for e in container(docs)["envFrom"]]
    assert refs == [one(docs, "ConfigMap")["metadata"]["name"]]
    # The values parse as the service's settings (pydantic validates every field).
    parsed = Settings(**{k.removeprefix("DDM_").lower(): v for k, v in settings.items()})
    assert parsed.port == int(settings["DDM_PORT"])


def test_gpu_limit_only_in_the_gpu_overlay(overlay: tuple[str, tuple[Manifest, ...]]) -> None:
    name, docs = overlay
    resources = container(docs)["resources"]
    image = container(docs)["image"]
    if name == "gpu":
        assert resources["limits"]["nvidia.com/gpu"] == 1
        # <version>-gpu-<CUDA flavour>: the Dockerfile's default (tests/test_deploy_docker.py holds it there)
        assert image.endswith("-gpu-cu130")
        tolerations = one(docs, "Deployment")["spec"]["template"]["spec"]["tolerations"]
        assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
    else:
        assert "nvidia.com/gpu" not in resources.get("limits", {})
        assert image.endswith("-cpu")
        settings = settings_of(docs)
        threads = int(settings["DDM_TORCH_THREADS"]) * int(settings["DDM_MODEL_INSTANCES"])
        assert threads == int(resources["requests"]["cpu"])


def test_selectors_select_the_pods(overlay: tuple[str, tuple[Manifest, ...]]) -> None:
    _, docs = overlay
    deployment = one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
        return bool(selector) and all(labels.get(k) == v for k, v in selector.items())

    assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    service = one(docs, "Service")
    assert selects(service["spec"]["selector"], pod_labels)
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http"
    assert selects(one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)
    policy = one(docs, "NetworkPolicy")
    assert selects(policy["spec"]["podSelector"]["matchLabels"], pod_labels)
    assert [p["port"] for r in policy["spec"]["ingress"] for p in r["ports"]] == ["http"]
    monitor = one(docs, "ServiceMonitor")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]


def test_service_monitor(overlay: tuple[str, tuple[Manifest, ...]]) -> None:
    _, docs = overlay
    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == one(docs, "Service")["spec"]["ports"][0]["name"]
    assert endpoint["path"] == "/metrics" and endpoint["path"] in app_routes()
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}


def test_hpa_scales_on_queue_metrics(overlay: tuple[str, tuple[Manifest, ...]]) -> None:
    _, docs = overlay
    hpa = one(docs, "HorizontalPodAutoscaler")["spec"]
    metrics = {m["pods"]["metric"]["name"]: m["pods"]["target"] for m in hpa["metrics"]}
    assert set(metrics) == {"anomaly_queue_images", "anomaly_queue_wait_seconds_avg"}
    batch = int(settings_of(docs)["DDM_MAX_BATCH_SIZE"])
    assert float(metrics["anomaly_queue_images"]["averageValue"]) == batch, "scale at one queued batch"
    assert batch <= int(settings_of(docs)["DDM_MAX_QUEUE_IMAGES"])
    assert 1 <= hpa["minReplicas"] < hpa["maxReplicas"]
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 60


def test_base_renders() -> None:
    kinds = {d["kind"] for d in render("base")}
    assert "Deployment" in kinds
