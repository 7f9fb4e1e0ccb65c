"""The KubeRay manifest (k8s/ray): a RayJob that runs ``ddm-anomaly score-dataset`` on a Ray cluster made for
it. Rendered by kustomize; each pod template (head, GPU workers) is validated against the Kubernetes Pod
schema (kubernetes-validate, strict); the RayJob's own fields are read against KubeRay's v1 RayJobSpec,
RayClusterSpec, HeadGroupSpec and WorkerGroupSpec; and what no schema knows is checked: the entrypoint parses
with the real command line, its paths lie on the mounted data volume, the GPUs per actor match the workers'
GPU limit, the image is the Ray (-bulk) build, the pods meet the restricted policy of the namespace."""

from __future__ import annotations

import copy
import shlex
from typing import Any

import kubernetes_validate
import pytest

from app.cli import build_parser
from tests.test_deploy_k8s import KUBERNETES_VERSIONS, render

Manifest = dict[str, Any]

# KubeRay's ray.io/v1 types (ray-operator/apis/ray/v1, 2026-10): the fields each level may have.
RAYJOB_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
    "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
    "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule",
}  # fmt: skip
CLUSTER_FIELDS = {
    "headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions",
    "headServiceAnnotations", "suspend",
}  # fmt: skip
HEAD_FIELDS = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_FIELDS = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams", "template",
    "scaleStrategy",
}  # fmt: skip
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode"}


def rayjob() -> Manifest:
    (doc,) = render("ray")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    return copy.deepcopy(doc)


def pods(job: Manifest) -> dict[str, Manifest]:
    cluster = job["spec"]["rayClusterSpec"]
    found = {"head": cluster["headGroupSpec"]["template"]}
    found.update({g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]})
    return found


def problems(job: Manifest) -> list[str]:
    """What is wrong with the RayJob, short of KubeRay's CRD schema."""
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    found = [f"RayJob spec: unknown field {k}" for k in sorted(set(spec) - RAYJOB_FIELDS)]
    found += [f"rayClusterSpec: unknown field {k}" for k in sorted(set(cluster) - CLUSTER_FIELDS)]
    found += [
        f"headGroupSpec: unknown field {k}" for k in sorted(set(cluster["headGroupSpec"]) - HEAD_FIELDS)
    ]
    for group in cluster["workerGroupSpecs"]:
        found += [f"worker group: unknown field {k}" for k in sorted(set(group) - WORKER_FIELDS)]
        if not group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]:
            found.append(f"worker group {group['groupName']}: replicas outside [min, max]")
    if spec.get("submissionMode", "K8sJobMode") not in SUBMISSION_MODES:
        found.append(f"submissionMode {spec['submissionMode']!r}")
    for level in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"]):
        found += [f"rayStartParams {k}: not a string" for k, v in level["rayStartParams"].items()
                  if not isinstance(v, str)]  # fmt: skip
    for name, template in pods(job).items():
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": template["spec"]}
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(pod, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                found.append(f"{name} pod for {version} at {'/'.join(map(str, exc.path))}: {exc.message}")
    return found


def entrypoint_args(job: Manifest) -> Any:
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:2] == ["ddm-anomaly", "score-dataset"]
    return build_parser().parse_args(words[1:])


def test_the_rayjob_validates() -> None:
    assert problems(rayjob()) == []


def test_validation_catches_mistakes() -> None:
    job = rayjob()
    job["spec"]["entrypiont"] = "typo"
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resorces"] = {}
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    found = "\n".join(problems(job))
    assert "unknown field entrypiont" in found and "resorces" in found and "num-cpus: not a string" in found


def test_the_entrypoint_is_a_valid_score_dataset_command_on_the_data_volume() -> None:
    job = rayjob()
    args = entrypoint_args(job)
    assert args.func.__module__ == "app.commands.score_dataset"
    assert args.resume, "a job applied again continues where the last one stopped"
    assert args.address is None, "the job server sets RAY_ADDRESS for the entrypoint"
    for name, template in pods(job).items():
        (container,) = template["spec"]["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        data = volumes[mounts["/data"]]
        assert data["persistentVolumeClaim"]["claimName"] == "ddm-anomaly-data", name
        assert str(args.input).startswith("/data/") and str(args.out).startswith("/data/")
        assert "emptyDir" in volumes[mounts["/tmp"]], f"{name}: Ray's session files under /tmp/ray"
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", f"{name}: the object store"


def test_gpus_per_actor_match_the_worker_pods() -> None:
    job = rayjob()
    args = entrypoint_args(job)
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "the head runs the driver, no actors"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    (workers,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    (container,) = workers["template"]["spec"]["containers"]
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert args.num_gpus_per_actor > 0 and gpus % args.num_gpus_per_actor == 0
    assert int(container["resources"]["requests"]["cpu"]) > args.cpus_per_actor, "CPUs left for decode tasks"
    assert any(t["key"] == "nvidia.com/gpu" for t in workers["template"]["spec"]["tolerations"])


@pytest.mark.parametrize("group", ["head", "gpu"])
def test_pods_are_restricted_and_run_the_ray_image(group: str) -> None:
    job = rayjob()
    spec = pods(job)[group]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    (container,) = spec["containers"]
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    # the service's GPU image built with --build-arg EXTRAS=bulk (Dockerfile); the service image has no Ray
    assert container["image"].endswith("-gpu-cu130-bulk")
    assert container["resources"]["limits"]["memory"] and container["resources"]["requests"]
    for probe in ("readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[:2] == ["python", "-c"] and "local_raylet_healthz" in command[2]
        compile(command[2], probe, "exec")  # the image has Python, not wget


def test_the_ray_version_matches_the_lock() -> None:
    from tests.test_security import _lock

    assert rayjob()["spec"]["rayClusterSpec"]["rayVersion"] == _lock()["ray"]
