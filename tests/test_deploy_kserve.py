"""The KServe manifests (k8s/kserve): a ServingRuntime running our image and an InferenceService using it
with the Open Inference Protocol v2 on one GPU. Rendered by kustomize; the pod KServe would build (the
predictor's pod fields, the runtime's container with the model's resources merged in) is validated against
the Kubernetes schema (kubernetes-validate, strict); the KServe-only fields are read against the fields of
KServe's v1beta1 PredictorSpec / ModelSpec and v1alpha1 ServingRuntimeSpec; and what no schema knows is
checked: the probes hit the service's V2 health routes on the port it listens on, the settings parse, GPU,
protocol, runtime and model format agree. (The manifests were also checked once against KServe's own CRD
schemas, strict on unknown fields; those are not vendored here.)"""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest

from app.settings import Settings
from tests.test_deploy_k8s import KUBERNETES_VERSIONS, app_routes, render

Manifest = dict[str, Any]

# The field lists below are those of KServe's CRDs (2026-08) beyond the Kubernetes PodSpec / Container.
# KServe v1beta1 PredictorSpec: its own fields and those of ComponentExtensionSpec (the rest is a PodSpec).
PREDICTOR_FIELDS = {
    "name", "model", "storageUris", "storageContainerName", "workerSpec", "sklearn", "xgboost", "tensorflow",
    "pytorch", "triton", "onnx", "huggingface", "pmml", "lightgbm", "paddle",
    "minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "scaleMetricType", "autoScaling",
    "containerConcurrency", "timeout", "canaryTrafficPercent", "logger", "batcher", "labels", "annotations",
    "deploymentStrategy",
}  # fmt: skip
# ModelSpec: these plus a Container's fields.
MODEL_FIELDS = {
    "modelFormat", "runtime", "protocolVersion", "storageUri", "runtimeVersion", "storage", "confidential",
}  # fmt: skip
# ServingRuntimeSpec: these plus pod-level fields (containers, volumes, tolerations, ...).
RUNTIME_FIELDS = {
    "supportedModelFormats", "protocolVersions", "multiModel", "disabled", "grpcEndpoint", "grpcDataEndpoint",
    "httpDataEndpoint", "replicas", "storageHelper", "builtInAdapter", "annotations", "labels", "workerSpec",
}  # fmt: skip


def docs() -> tuple[Manifest, ...]:
    return render("kserve")


def one(kind: str) -> Manifest:
    (doc,) = [d for d in docs() if d["kind"] == kind]
    return copy.deepcopy(doc)


def pod_of(isvc: Manifest, runtime: Manifest) -> Manifest:
    """The pod KServe builds: predictor pod fields, runtime volumes, kserve-container + model fields."""
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    pod_spec = {k: v for k, v in predictor.items() if k not in PREDICTOR_FIELDS}
    runtime_spec = runtime["spec"]
    pod_spec.update({k: v for k, v in runtime_spec.items() if k not in RUNTIME_FIELDS})
    containers = [dict(c) for c in runtime_spec["containers"]]
    (main,) = [c for c in containers if c["name"] == "kserve-container"]
    main.update({k: v for k, v in model.items() if k not in MODEL_FIELDS})
    pod_spec["containers"] = containers
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "ddm-anomaly-predictor"},
        "spec": pod_spec,
    }


def problems(isvc: Manifest, runtime: Manifest) -> list[str]:
    """What is wrong with the pair, short of KServe's CRD schemas."""
    found = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(pod_of(isvc, runtime), version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            found.append(f"pod for {version} at {'/'.join(map(str, exc.path))}: {exc.message}")
    model = isvc["spec"]["predictor"]["model"]
    if model.get("protocolVersion") != "v2":
        found.append("the model's protocolVersion is not v2")
    if "v2" not in runtime["spec"].get("protocolVersions", []):
        found.append("the runtime does not declare protocol v2")
    if model.get("runtime") != runtime["metadata"]["name"]:
        found.append("the model names another runtime")
    formats = {(f["name"], f.get("version")) for f in runtime["spec"]["supportedModelFormats"]}
    if (model["modelFormat"]["name"], model["modelFormat"].get("version")) not in formats:
        found.append("the runtime does not support the model's format")
    return found


def kserve_container(runtime: Manifest) -> Manifest:
    (c,) = [c for c in runtime["spec"]["containers"] if c["name"] == "kserve-container"]
    return dict(c)


def test_renders_the_two_objects() -> None:
    kinds = {(d["apiVersion"], d["kind"]) for d in docs()}
    assert kinds == {
        ("serving.kserve.io/v1alpha1", "ServingRuntime"),
        ("serving.kserve.io/v1beta1", "InferenceService"),
    }
    assert {d["metadata"]["namespace"] for d in docs()} == {"ddm-anomaly"}


def test_the_pair_is_consistent_and_the_pod_validates() -> None:
    assert problems(one("InferenceService"), one("ServingRuntime")) == []


@pytest.mark.parametrize(
    "breakage",
    ["protocol v1", "typo in a probe", "unknown runtime", "other format", "gpu as text", "unknown pod field"],
)
def test_the_checks_catch_breakage(breakage: str) -> None:
    isvc, runtime = one("InferenceService"), one("ServingRuntime")
    model = isvc["spec"]["predictor"]["model"]
    container = kserve_container(runtime)
    runtime["spec"]["containers"] = [container]
    if breakage == "protocol v1":
        model["protocolVersion"] = "v1"
    elif breakage == "typo in a probe":
        container["readinessProbe"]["httpGet"]["paht"] = "/v2/health/ready"
    elif breakage == "unknown runtime":
        model["runtime"] = "kserve-tritonserver"
    elif breakage == "other format":
        model["modelFormat"]["name"] = "onnx"
    elif breakage == "gpu as text":
        model["resources"]["limits"]["nvidia.com/gpu"] = {"count": 1}
    elif breakage == "unknown pod field":
        isvc["spec"]["predictor"]["tolerationz"] = []
    assert problems(isvc, runtime), breakage


def test_kserve_fields_are_known() -> None:
    isvc, runtime = one("InferenceService"), one("ServingRuntime")
    predictor = isvc["spec"]["predictor"]
    assert set(isvc["spec"]) == {"predictor"}
    pod_fields = set(pod_of(isvc, runtime)["spec"])
    assert set(predictor) - PREDICTOR_FIELDS <= pod_fields
    assert set(predictor["model"]) & MODEL_FIELDS == {"modelFormat", "runtime", "protocolVersion"}
    assert "storageUri" not in predictor["model"], "the model ships in the image"


def test_probes_hit_the_v2_health_routes_on_the_served_port() -> None:
    container = kserve_container(one("ServingRuntime"))
    env = {e["name"]: e.get("value") for e in container["env"]}
    (port,) = container["ports"]
    assert port["containerPort"] == int(env["DDM_PORT"]) == 8080, "KServe routes to 8080"
    routes = app_routes()
    probes = {
        kind: container[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert probes["livenessProbe"]["path"] == "/v2/health/live"
    assert probes["readinessProbe"]["path"] == probes["startupProbe"]["path"] == "/v2/health/ready"
    for kind, probe in probes.items():
        assert probe["path"] in routes, kind
        assert probe["port"] == port["containerPort"], kind
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "room for a large model's load"
    annotations = one("ServingRuntime")["spec"]["annotations"]
    assert annotations["prometheus.kserve.io/port"] == env["DDM_PORT"]
    assert annotations["prometheus.kserve.io/path"] == "/metrics" and "/metrics" in routes


def test_settings_parse_and_drain_fits_the_grace_period() -> None:
    container = kserve_container(one("ServingRuntime"))
    values = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    fields = {f"DDM_{name.upper()}" for name in Settings.model_fields}
    assert {e["name"] for e in container["env"]} <= fields
    settings = Settings(**{k.removeprefix("DDM_").lower(): v for k, v in values.items()})
    assert settings.device == "cuda" and settings.host == "0.0.0.0"
    (secret,) = [e for e in container["env"] if "valueFrom" in e]
    assert secret["name"] == "DDM_API_KEYS" and secret["valueFrom"]["secretKeyRef"]["optional"] is True
    pre_stop = float(container["lifecycle"]["preStop"]["exec"]["command"][1])
    needed = pre_stop + settings.shutdown_delay_s + settings.drain_timeout_s
    grace = one("InferenceService")["spec"]["predictor"]["terminationGracePeriodSeconds"]
    assert needed < grace <= needed + 30


def test_gpu_raw_deployment_and_restricted_pod() -> None:
    isvc, runtime = one("InferenceService"), one("ServingRuntime")
    predictor = isvc["spec"]["predictor"]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    resources = predictor["model"]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1
    assert resources["limits"]["memory"]
    assert any(t["key"] == "nvidia.com/gpu" for t in predictor["tolerations"])
    assert kserve_container(runtime)["image"].endswith("-gpu-cu130")
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    pod = pod_of(isvc, runtime)["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    sc = kserve_container(runtime)["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in kserve_container(runtime)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]] and "emptyDir" in volumes[mounts["/home/app/.cache"]]
