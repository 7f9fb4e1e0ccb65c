"""Where eps_theta(x_t, t) is computed: the diffusers UNet in eager PyTorch, or the same UNet exported once at
load time to ONNX and run by ONNX Runtime (CPU, float32).

Everything around the UNet (DDIM steps, SSIM, sums) stays in torch; only the K forward passes move. Why more
than torch: on CPU the UNet's small GroupNorm/SiLU/add/concat operators cost a third of the time in eager mode
and ONNX Runtime's graph runs them with far less per-operator overhead: the whole engine is 2.2-2.5x faster on
single images, 1.3-2.1x at batch 4 and 1.0-1.1x at batch 32, with scores equal to 0.002 (PERFORMANCE.md,
"runtimes"; OpenVINO was measured too and dropped there). The torch module stays loaded beside the session
(benchmarks and FLOP counting use it), so the weights are held twice in memory. Each runtime is called from
several batcher worker threads at once, so each is safe for concurrent calls.
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from typing import Protocol

import torch
from diffusers import UNet2DModel

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnxruntime")


class RuntimeUnavailable(RuntimeError):
    """The runtime cannot run this model here (not installed, wrong device or dtype, export failed)."""


class NoiseRuntime(Protocol):
    name: str

    def __call__(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """eps_theta for the batch: float32, NCHW-contiguous, on the input's device."""
        ...


class TorchRuntime:
    name = "torch"

    def __init__(self, unet: UNet2DModel, autocast_dtype: torch.dtype | None, device: torch.device) -> None:
        self.unet = unet
        self.autocast_dtype = autocast_dtype
        self.device_type = device.type

    def __call__(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        # a channels_last UNet answers channels_last; the sums downstream flatten, which would copy anyway
        if self.autocast_dtype is None:
            return self.unet(x_t, timesteps).sample.float().contiguous()
        with torch.autocast(device_type=self.device_type, dtype=self.autocast_dtype):
            return self.unet(x_t, timesteps).sample.float().contiguous()


class _EpsOnly(torch.nn.Module):
    """The UNet with a plain tensor output (exporters trace tensors, not diffusers' output dataclass)."""

    def __init__(self, unet: UNet2DModel) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep).sample


def _example(unet: UNet2DModel, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    size = unet.config.sample_size
    size = int(size[0] if isinstance(size, list | tuple) else size)
    return torch.zeros(batch, unet.config.in_channels, size, size), torch.full((batch,), 1, dtype=torch.long)


def export_onnx(unet: UNet2DModel) -> bytes:
    """The UNet as an ONNX graph with a dynamic batch dimension, in memory (nothing is written to disk)."""
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about diffusers' shape asserts
            torch.onnx.export(
                _EpsOnly(unet).eval(),  # traced as loaded: float32 weights, any layout (ONNX has none)
                _example(unet),
                buffer,  # type: ignore[arg-type]  # a file-like object is documented; the stub says path
                input_names=["sample", "timestep"],
                output_names=["eps"],
                dynamic_axes={"sample": {0: "batch"}, "timestep": {0: "batch"}, "eps": {0: "batch"}},
                dynamo=False,
            )
    except Exception as exc:  # the exporter raises many types; any of them means "not this runtime"
        raise RuntimeUnavailable(f"cannot export the UNet to ONNX: {exc}") from exc
    return buffer.getvalue()


class OnnxRuntime:
    """ONNX Runtime's CPU provider on the exported graph.

    ``InferenceSession.run`` is thread-safe; with ``threads`` = 1 each call computes on its caller's thread,
    so model instances use separate cores exactly as torch's do."""

    name = "onnxruntime"

    def __init__(self, unet: UNet2DModel, threads: int | None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeUnavailable("onnxruntime is not installed (pip install onnxruntime onnx)") from exc
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0  # 0 = one per physical core
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(export_onnx(unet), options, providers=["CPUExecutionProvider"])

    def __call__(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        feed = {"sample": x_t.contiguous().numpy(), "timestep": timesteps.numpy()}
        return torch.from_numpy(self.session.run(None, feed)[0])


def torch_threads_beside(runtime: NoiseRuntime, threads: int) -> int:
    """Torch's intra-op threads next to ``runtime`` when the UNet gets ``threads``: all of them for torch
    itself; one when the UNet runs in another runtime's own pool, which then needs the cores. Two spinning
    pools on the same cores slow each other down: ONNX Runtime on 2 threads with torch on 2 scored 5.9 /
    16.2 images/s at batch 1 / 32, with torch on 1 thread 11.3 / 20.9 (PERFORMANCE.md, "runtimes")."""
    return threads if runtime.name == "torch" else 1


def build_runtime(
    name: str,
    unet: UNet2DModel,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    *,
    threads: int | None = None,
) -> NoiseRuntime:
    """The runtime ``name`` asks for; ``auto`` = ONNX Runtime for float32 on CPU when it can run the model,
    else torch (always torch on CUDA, and for bf16 autocast on CPU)."""
    if name not in RUNTIMES:
        raise RuntimeUnavailable(f"unknown runtime {name!r}; one of {', '.join(RUNTIMES)}")
    if name == "torch" or (name == "auto" and (device.type != "cpu" or autocast_dtype is not None)):
        return TorchRuntime(unet, autocast_dtype, device)
    if device.type != "cpu":
        raise RuntimeUnavailable(f"runtime {name} runs on CPU only; use runtime=torch on {device.type}")
    if autocast_dtype is not None:
        raise RuntimeUnavailable("runtime onnxruntime runs float32 only; use torch for bfloat16 autocast")
    started = time.perf_counter()
    try:
        runtime = OnnxRuntime(unet, threads)
    except RuntimeUnavailable as exc:
        if name != "auto":
            raise
        log.warning("runtime auto: %s; using torch", exc)
        return TorchRuntime(unet, autocast_dtype, device)
    log.info("UNet exported to onnxruntime in %.1f s", time.perf_counter() - started)
    return runtime
