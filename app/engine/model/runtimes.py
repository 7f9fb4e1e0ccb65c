"""Where eps_theta(x_t, t) is computed: the diffusers UNet in eager PyTorch, or the same UNet exported once at
load time to ONNX and run by ONNX Runtime (CPU, float32).

Everything around the UNet (DDIM steps, SSIM, sums) stays in torch; only the K forward passes move. Why more
than torch: on CPU the UNet's small GroupNorm/SiLU/add/concat operators cost a third of the time in eager mode
and ONNX Runtime's graph runs them with far less per-operator overhead: the whole engine is much faster on
single images and about as fast on large batches, with the same scores to float rounding
(docs/PERFORMANCE.md#runtimes; OpenVINO was measured too and dropped there). The torch module stays loaded
beside the session (benchmarks and FLOP counting use it), so the weights are held twice in memory. Each
runtime is called from several batcher worker threads at once, so each is safe for concurrent calls.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import threading
import time
import warnings
from typing import Any, Protocol

import torch
from diffusers import UNet2DModel

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnxruntime")


class RuntimeUnavailable(RuntimeError):
    """The runtime cannot run this model here (not installed, wrong device or dtype, export failed)."""


# The UNet's image embedding: each channel's mean over the image of this up block's output, then each
# channel's spread (standard deviation) over the image (in the shipped 32 px model 128 channels at 8 x 8, so
# 256 values). The walk reads it beside eps at no extra cost; what it is for and why this block:
# docs/METHOD.md, "Embedding expert". EMBEDDING names it wherever cached walks or profiles must not mix
# embeddings of another definition.
EMBEDDING_UP_BLOCK = 0
EMBEDDING = f"up_blocks.{EMBEDDING_UP_BLOCK}/spatial-mean+spread"


class NoiseRuntime(Protocol):
    name: str

    def __call__(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """eps_theta for the batch: float32, NCHW-contiguous, on the input's device."""
        ...

    def predict(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """eps_theta and the UNet's image embedding (B, 2 C) float32 from the same forward pass (channel
        means, then channel spreads); None when the network has no such block."""
        ...


def embedding_block(unet: torch.nn.Module) -> torch.nn.Module | None:
    blocks = getattr(unet, "up_blocks", None)
    return blocks[EMBEDDING_UP_BLOCK] if blocks is not None and len(blocks) > EMBEDDING_UP_BLOCK else None


def _spatial_stats(output: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """(B, C, H, W) -> (B, 2 C): each channel's mean over the image, then its spread (population standard
    deviation, so a 1 x 1 map gives 0, not NaN)."""
    hidden = (output[0] if isinstance(output, tuple) else output).float()
    return torch.cat([hidden.mean(dim=(2, 3)), hidden.std(dim=(2, 3), correction=0)], dim=1)


def model_timesteps(timesteps: torch.Tensor, timestep_scale: float) -> torch.Tensor:
    """What the network receives for schedule indices ``timesteps``: the indices themselves (scale 1, a
    plain diffusers model), else ``float32(t) * scale`` exactly as improved-diffusion's ``_WrappedModel``
    computes ``t.float() * (1000 / T)``."""
    if timestep_scale == 1.0:
        return timesteps
    return timesteps.float() * timestep_scale


class TorchRuntime:
    name = "torch"

    def __init__(
        self,
        unet: UNet2DModel,
        autocast_dtype: torch.dtype | None,
        device: torch.device,
        *,
        timestep_scale: float = 1.0,
        epsilon_channels: int | None = None,
    ) -> None:
        self.unet = unet
        self.autocast_dtype = autocast_dtype
        self.device_type = device.type
        self.timestep_scale = timestep_scale
        self.epsilon_channels = epsilon_channels
        # the embedding is taken by a hook; per thread, because model instances call one UNet concurrently
        self._tap = threading.local()
        block = embedding_block(unet)
        self.has_embedding = block is not None
        if block is not None:
            block.register_forward_hook(self._capture)

    def _capture(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        if getattr(self._tap, "wanted", False):
            self._tap.value = _spatial_stats(output)

    def predict(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._tap.wanted, self._tap.value = True, None
        try:
            eps = self(x_t, timesteps)
            return eps, self._tap.value
        finally:
            self._tap.wanted, self._tap.value = False, None

    def __call__(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        # a channels_last UNet answers channels_last; the sums downstream flatten, which would copy anyway
        if self.timestep_scale == 1.0 and self.epsilon_channels is None:  # plain diffusers model
            if self.autocast_dtype is None:
                return self.unet(x_t, timesteps).sample.float().contiguous()
            with torch.autocast(device_type=self.device_type, dtype=self.autocast_dtype):
                return self.unet(x_t, timesteps).sample.float().contiguous()
        t_model = model_timesteps(timesteps, self.timestep_scale)
        if self.autocast_dtype is None:
            out = self.unet(x_t, t_model).sample
        else:
            with torch.autocast(device_type=self.device_type, dtype=self.autocast_dtype):
                out = self.unet(x_t, t_model).sample
        if self.epsilon_channels is not None:
            out = out[:, : self.epsilon_channels]
        return out.float().contiguous()


class _EpsOnly(torch.nn.Module):
    """The UNet with plain tensor outputs (exporters trace tensors, not diffusers' output dataclass): eps, and
    the embedding when the network has its block; the timestep rescale and the epsilon slice of imported
    models are part of the traced graph."""

    def __init__(
        self, unet: UNet2DModel, timestep_scale: float = 1.0, epsilon_channels: int | None = None
    ) -> None:
        super().__init__()
        self.unet = unet
        self.timestep_scale = timestep_scale
        self.epsilon_channels = epsilon_channels
        self._embedding: torch.Tensor | None = None
        block = embedding_block(unet)
        self.has_embedding = block is not None
        # removed after the export: the loaded UNet keeps serving torch callers without it
        self.hook = None if block is None else block.register_forward_hook(self._capture)

    def _capture(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        self._embedding = _spatial_stats(output)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> Any:
        if self.timestep_scale == 1.0 and self.epsilon_channels is None:
            out = self.unet(sample, timestep).sample
        else:
            out = self.unet(sample, model_timesteps(timestep, self.timestep_scale)).sample
            out = out if self.epsilon_channels is None else out[:, : self.epsilon_channels]
        return (out, self._embedding) if self._embedding is not None else out


def _example(unet: UNet2DModel, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    size = unet.config.sample_size
    size = int(size[0] if isinstance(size, list | tuple) else size)
    return torch.zeros(batch, unet.config.in_channels, size, size), torch.full((batch,), 1, dtype=torch.long)


def export_onnx(unet: UNet2DModel, timestep_scale: float = 1.0, epsilon_channels: int | None = None) -> bytes:
    """The UNet as an ONNX graph with a dynamic batch dimension, in memory (nothing is written to disk)."""
    buffer = io.BytesIO()
    wrapped = _EpsOnly(unet, timestep_scale, epsilon_channels).eval()
    outputs = ["eps", "embedding"] if wrapped.has_embedding else ["eps"]
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about diffusers' shape asserts
            torch.onnx.export(
                # traced as loaded: float32 weights, any layout (ONNX has none)
                wrapped,
                _example(unet),
                buffer,  # type: ignore[arg-type]  # a file-like object is documented; the stub says path
                input_names=["sample", "timestep"],
                output_names=outputs,
                dynamic_axes={
                    "sample": {0: "batch"},
                    "timestep": {0: "batch"},
                    **{o: {0: "batch"} for o in outputs},
                },
                dynamo=False,
            )
    except Exception as exc:  # the exporter raises many types; any of them means "not this runtime"
        raise RuntimeUnavailable(f"cannot export the UNet to ONNX: {exc}") from exc
    finally:
        if wrapped.hook is not None:
            wrapped.hook.remove()
    return buffer.getvalue()


class OnnxRuntime:
    """ONNX Runtime's CPU provider on the exported graph.

    ``InferenceSession.run`` is thread-safe; with ``threads`` = 1 each call computes on its caller's thread,
    so model instances use separate cores exactly as torch's do."""

    name = "onnxruntime"

    def __init__(
        self,
        unet: UNet2DModel,
        threads: int | None,
        *,
        timestep_scale: float = 1.0,
        epsilon_channels: int | None = None,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeUnavailable("onnxruntime is not installed (pip install onnxruntime onnx)") from exc
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0  # 0 = one per physical core
        options.inter_op_num_threads = 1
        graph = export_onnx(unet, timestep_scale, epsilon_channels)
        self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        self.has_embedding = len(self.session.get_outputs()) > 1

    def __call__(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        feed = {"sample": x_t.contiguous().numpy(), "timestep": timesteps.numpy()}
        return torch.from_numpy(self.session.run(["eps"], feed)[0])

    def predict(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        feed = {"sample": x_t.contiguous().numpy(), "timestep": timesteps.numpy()}
        if not self.has_embedding:
            return torch.from_numpy(self.session.run(["eps"], feed)[0]), None
        eps, embedding = self.session.run(["eps", "embedding"], feed)
        return torch.from_numpy(eps), torch.from_numpy(embedding)


def torch_threads_beside(runtime: NoiseRuntime | str, threads: int) -> int:
    """Torch's intra-op threads next to ``runtime`` (or its name) when the UNet gets ``threads``: all of them
    for torch itself; one when the UNet runs in another runtime's own pool, which then needs the cores. Two
    spinning pools on the same cores slow each other down (docs/PERFORMANCE.md#runtimes).
    Torch's count is process-wide, so the entry points set it once at start-up (app/bootstrap.py)."""
    name = runtime if isinstance(runtime, str) else runtime.name
    return threads if name == "torch" else 1


def choose_runtime(name: str, device: torch.device, autocast_dtype: torch.dtype | None) -> str:
    """The runtime ``build_runtime`` builds for ``name`` on ``device``, decided before anything is loaded:
    ``auto`` = onnxruntime for float32 on CPU when it is installed, else torch. (``auto`` still falls back
    to torch if the export itself fails, which only loading can tell.)"""
    if name not in RUNTIMES:
        raise RuntimeUnavailable(f"unknown runtime {name!r}; one of {', '.join(RUNTIMES)}")
    if name == "torch" or (name == "auto" and (device.type != "cpu" or autocast_dtype is not None)):
        return "torch"
    if name == "auto" and importlib.util.find_spec("onnxruntime") is None:
        return "torch"
    return "onnxruntime"


def build_runtime(
    name: str,
    unet: UNet2DModel,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    *,
    threads: int | None = None,
    timestep_scale: float = 1.0,
    epsilon_channels: int | None = None,
) -> NoiseRuntime:
    """The runtime ``name`` asks for; ``auto`` = ONNX Runtime for float32 on CPU when it can run the model,
    else torch (always torch on CUDA, and for bf16 autocast on CPU).

    ``timestep_scale`` and ``epsilon_channels`` are the model folder's calling convention (sidecar.py): the
    network receives ``t * timestep_scale`` and only its first ``epsilon_channels`` outputs are returned.
    The defaults are a plain diffusers model, called exactly as before either existed."""
    if choose_runtime(name, device, autocast_dtype) == "torch":
        if name == "auto" and device.type == "cpu" and autocast_dtype is None:
            log.warning(
                "runtime auto: onnxruntime is not installed (pip install onnxruntime onnx); using torch"
            )
        return TorchRuntime(
            unet, autocast_dtype, device, timestep_scale=timestep_scale, epsilon_channels=epsilon_channels
        )
    if device.type != "cpu":
        raise RuntimeUnavailable(f"runtime {name} runs on CPU only; use runtime=torch on {device.type}")
    if autocast_dtype is not None:
        raise RuntimeUnavailable("runtime onnxruntime runs float32 only; use torch for bfloat16 autocast")
    started = time.perf_counter()
    try:
        runtime = OnnxRuntime(unet, threads, timestep_scale=timestep_scale, epsilon_channels=epsilon_channels)
    except RuntimeUnavailable as exc:
        if name != "auto":
            raise
        # torch's thread count was set at start-up for onnxruntime's pool (one thread); say how to get more
        log.warning(
            "runtime auto: %s; using torch on its start-up threads (DDM_RUNTIME=torch gives it all)", exc
        )
        return TorchRuntime(
            unet, autocast_dtype, device, timestep_scale=timestep_scale, epsilon_channels=epsilon_channels
        )
    log.info("UNet exported to onnxruntime in %.1f s", time.perf_counter() - started)
    return runtime
