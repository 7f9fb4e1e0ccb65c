"""Load a diffusers ``UNet2DModel`` + noise-schedule folder from local disk (never from a hub).

Accepted layouts: ``DIR/unet/`` + ``DIR/scheduler/`` (what ``DDPMPipeline.save_pretrained`` writes, and
how ``google/ddpm-celebahq-256`` is published), or a flat folder with the UNet ``config.json`` and
``scheduler_config.json`` side by side. Weights are read from safetensors, or from ``.bin`` through
diffusers' ``torch.load(weights_only=True)``; no pickle is ever executed.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DModel

from app.engine.model.runtimes import NoiseRuntime, RuntimeUnavailable, build_runtime
from app.engine.model.schedule import ScheduleError, read_schedule
from app.engine.model.sidecar import ModelSidecar, SidecarError, read_sidecar
from app.engine.types import ModelInfo

log = logging.getLogger(__name__)

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class ModelLoadError(RuntimeError):
    """The folder is not a loadable diffusers UNet + scheduler."""


@dataclass
class LoadedModel:
    """A UNet on its device, read-only, with the noise schedule as a plain tensor (no scheduler object is
    shared between threads)."""

    unet: UNet2DModel  # the torch module, also when another runtime computes eps (benchmarks, training)
    alphas_cumprod: torch.Tensor  # (T,) float32 on ``device``
    device: torch.device
    autocast_dtype: torch.dtype | None  # bf16/fp16 autocast on CUDA, None = run in the weights' dtype
    info: ModelInfo
    runtime: NoiseRuntime  # what computes eps_theta(x_t, t): torch or onnxruntime
    # ddm_anomaly.json: calling convention (applied inside ``runtime``) and input transform; defaults for a
    # plain diffusers folder
    sidecar: ModelSidecar = field(default_factory=ModelSidecar)
    # (T,) float64 on the CPU: the schedule ``alphas_cumprod`` is cast from (the scheduler class's own, or
    # the float64 cumulative product of ``trained_betas`` when the sidecar asks for it; schedule.py)
    alphas_cumprod64: torch.Tensor | None = None
    # (T,) float64: abar recomputed from the scheduler's recipe in float64, as improved-diffusion computes
    # it (schedule.py); the diffpath walk derives its float64 coefficients from it. None when no known
    # recipe agrees with the loaded schedule: that walk then widens the float32 one.
    recipe_alphas_cumprod64: np.ndarray | None = None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device=cuda requested but CUDA is not available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """(weight dtype, autocast dtype). Weights stay float32; reduced precision is autocast.

    CPU: float32 unless bfloat16 is asked for explicitly on a CPU with native bf16 (AVX-512 BF16 / AMX):
    there it is faster on large batches but slower on single images, and moves scores a little
    (docs/PERFORMANCE.md#runtimes), so it is opt-in. fp16 on CPU is refused (no fast kernels)."""
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype == "float32":
        return torch.float32, None
    if device.type == "cpu" and dtype == "bfloat16":
        if not cpu_has_native_bf16():
            raise ModelLoadError("dtype=bfloat16 on CPU needs native bf16 (AVX-512 BF16 or AMX); use float32")
        return torch.float32, torch.bfloat16
    if device.type != "cuda":
        raise ModelLoadError(f"dtype={dtype} is only supported on CUDA; use float32 (or bfloat16) on CPU")
    return torch.float32, {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def cpu_has_native_bf16() -> bool:
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def find_layout(model_dir: Path) -> tuple[Path, Path]:
    """Return (unet folder, scheduler config file)."""
    if not model_dir.is_dir():
        raise ModelLoadError(f"model folder {model_dir} does not exist")
    unet_dir = model_dir / "unet" if (model_dir / "unet" / "config.json").is_file() else model_dir
    for candidate in (model_dir / "scheduler" / "scheduler_config.json", model_dir / "scheduler_config.json"):
        if candidate.is_file():
            scheduler_file = candidate
            break
    else:
        raise ModelLoadError(f"{model_dir}: no scheduler/scheduler_config.json or scheduler_config.json")
    if not (unet_dir / "config.json").is_file():
        raise ModelLoadError(f"{model_dir}: no unet/config.json")
    if not any((unet_dir / name).is_file() for name in WEIGHT_FILES):
        raise ModelLoadError(f"{unet_dir}: no {' or '.join(WEIGHT_FILES)}")
    return unet_dir, scheduler_file


def set_attention_heads(unet: UNet2DModel, heads: dict[str, int]) -> None:
    """Give the named attention layers their own head count (the sidecar's ``attention_heads``): the
    projections are the same matrices, only the split of their channels into heads differs."""
    for name, n in heads.items():
        try:
            attn = unet.get_submodule(name)
        except AttributeError as exc:
            raise ModelLoadError(f"attention_heads names {name!r}, which the UNet does not have") from exc
        inner = getattr(attn, "inner_dim", None)
        if inner is None or inner % n:
            raise ModelLoadError(f"attention_heads: {name!r} cannot be split into {n} heads")
        attn.heads = n
        attn.scale = (inner // n) ** -0.5
        if hasattr(attn, "sliceable_head_dim"):
            attn.sliceable_head_dim = n


def weights_digest(unet_dir: Path) -> str:
    path = next(unet_dir / name for name in WEIGHT_FILES if (unet_dir / name).is_file())
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_model(
    model_dir: str | Path,
    device: str = "auto",
    dtype: str = "auto",
    *,
    runtime: str = "torch",
    threads: int | None = None,
) -> LoadedModel:
    """Load a diffusers folder; ``runtime`` picks what computes the UNet (runtimes.py), ``threads`` sizes an
    exported runtime's thread pool (torch's is process-wide)."""
    model_dir = Path(model_dir)
    unet_dir, scheduler_file = find_layout(model_dir)
    try:
        sidecar = read_sidecar(model_dir)
    except SidecarError as exc:
        raise ModelLoadError(f"{model_dir}: {exc}") from exc
    dev = resolve_device(device)
    weight_dtype, autocast_dtype = resolve_dtype(dtype, dev)
    unet = read_unet(unet_dir, weight_dtype, sidecar)
    # channels_last weights: oneDNN convolutions skip their NCHW reorders; measured 1.1-1.3x on the UNet
    # alone on CPU (PERFORMANCE.md). Outputs stay correct in any layout; scores differ by float rounding.
    memory_format = torch.channels_last if dev.type == "cpu" else torch.contiguous_format
    unet = unet.to(dev, memory_format=memory_format).eval().requires_grad_(False)
    try:
        scheduler_config, abar, recipe = read_schedule(scheduler_file, float64=sidecar.alphas_cumprod_float64)
    except ScheduleError as exc:
        raise ModelLoadError(str(exc)) from exc
    try:
        noise_runtime = build_runtime(
            runtime,
            unet,
            dev,
            autocast_dtype,
            threads=threads,
            timestep_scale=sidecar.timestep_scale,
            epsilon_channels=sidecar.epsilon_channels,
        )
    except RuntimeUnavailable as exc:
        raise ModelLoadError(str(exc)) from exc
    info = model_info(
        model_dir, unet_dir, unet, scheduler_config, len(abar),
        device=str(dev), dtype=str(autocast_dtype or weight_dtype).replace("torch.", ""),
        runtime=noise_runtime.name,
    )  # fmt: skip
    log.info("loaded %s (%d params, %dpx) on %s", info.model_id, info.parameters, info.sample_size, dev)
    return LoadedModel(
        unet=unet,
        alphas_cumprod=abar.to(device=dev, dtype=torch.float32),
        device=dev,
        autocast_dtype=autocast_dtype,
        info=info,
        runtime=noise_runtime,
        sidecar=sidecar,
        alphas_cumprod64=abar.clone(),
        recipe_alphas_cumprod64=recipe,
    )


def read_unet(unet_dir: Path, weight_dtype: torch.dtype, sidecar: ModelSidecar) -> UNet2DModel:
    """The folder's UNet in ``weight_dtype`` on the CPU, checked against the sidecar's calling convention
    (its attention head counts applied)."""
    try:
        unet = UNet2DModel.from_pretrained(
            str(unet_dir), local_files_only=True, torch_dtype=weight_dtype, low_cpu_mem_usage=False
        )
    except Exception as exc:  # diffusers raises many types for a bad folder; one clear error for us
        raise ModelLoadError(f"{unet_dir}: cannot load UNet2DModel: {exc}") from exc
    in_channels, out_channels = int(unet.config.in_channels), int(unet.config.out_channels)
    if sidecar.epsilon_channels is None and out_channels != in_channels:
        raise ModelLoadError(
            f"the UNet takes {in_channels} channels and answers {out_channels}: it must predict noise with "
            "as many channels as it takes (a learned-sigma model needs epsilon_channels in ddm_anomaly.json)"
        )
    if sidecar.epsilon_channels is not None and not (
        sidecar.epsilon_channels == in_channels and out_channels >= in_channels
    ):
        raise ModelLoadError(
            f"epsilon_channels={sidecar.epsilon_channels} does not fit a UNet with {in_channels} input and "
            f"{out_channels} output channels"
        )
    set_attention_heads(unet, sidecar.attention_heads)
    return unet


def model_info(
    model_dir: Path,
    unet_dir: Path,
    unet: UNet2DModel,
    scheduler_config: dict,
    timesteps: int,
    *,
    device: str,
    dtype: str,
    runtime: str,
) -> ModelInfo:
    """What /v1/models and the profiles say about the loaded folder."""
    sha = weights_digest(unet_dir)
    card_path = model_dir / "README.md"
    sample_size = unet.config.sample_size
    if isinstance(sample_size, list | tuple):
        sample_size = int(sample_size[0])
    return ModelInfo(
        model_id=f"{model_dir.resolve().name}@{sha[:12]}",
        name=model_dir.resolve().name,
        path=str(model_dir),
        sample_size=int(sample_size),
        in_channels=int(unet.config.in_channels),
        parameters=sum(p.numel() for p in unet.parameters()),
        num_train_timesteps=timesteps,
        beta_schedule=str(scheduler_config.get("beta_schedule", "unknown")),
        prediction_type=str(scheduler_config.get("prediction_type", "epsilon")),
        scheduler_class=str(scheduler_config.get("_class_name", "DDPMScheduler")),
        weights_sha256=sha,
        device=device,
        dtype=dtype,
        runtime=runtime,
        card=card_path.read_text(errors="replace") if card_path.is_file() else "",
    )
