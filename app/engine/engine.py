"""The engine object the service and the CLI hold: ``load()`` -> ``ready`` -> ``image_stats(batch)``.

After ``load()``, ``image_stats`` may be called from several threads at once (the batcher's model instances):
the model is only read (weights, schedule; no scheduler object), each call builds its own tensors and noise
generators, inference mode and autocast are thread-local, and the SSIM operators are cached read-only
tensors (a racing first call only builds one twice). Torch releases the GIL inside operators, so concurrent
calls use separate cores, each with the process's ``torch_threads`` intra-op threads; the exported runtimes
(runtimes.py) are safe for concurrent calls too. ``decode``/``prepare`` are thread-safe and meant for other
threads. Nothing here knows about HTTP.
"""

from __future__ import annotations

import logging
import resource
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from app.engine.model.loading import LoadedModel, load_model
from app.engine.model.sidecar import InputTransform
from app.engine.preprocessing import DecodeLimits, PreparedImage, decode_image, prepare
from app.engine.types import ImageStats, MethodOptions, ModelInfo
from app.engine.walk_driver import BatchStats, batch_statistics
from app.errors import DeviceOutOfMemory, EngineFailure, ModelNotReady

log = logging.getLogger(__name__)


class Engine:
    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        options: MethodOptions | None = None,
        torch_threads: int | None = None,
        runtime: str = "auto",
        limits: DecodeLimits | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.device_name = device
        self.dtype_name = dtype
        self.options = options or MethodOptions()
        self.torch_threads = torch_threads
        self.runtime_name = runtime
        self.limits = limits or DecodeLimits()
        self._model: LoadedModel | None = None
        self._transform = InputTransform()
        self._ready = threading.Event()

    # --- lifecycle ---------------------------------------------------------------------------------
    def load(self, warmup_batch: int = 2) -> None:
        """Load weights onto the device and run one warm-up batch (first-call allocations, kernels).

        Torch's own thread count is process-wide and left as it is: the entry point sets it once at start-up
        (app/bootstrap.py); ``torch_threads`` sizes an exported runtime's pool."""
        self._model = load_model(
            self.model_dir,
            self.device_name,
            self.dtype_name,
            runtime=self.runtime_name,
            threads=self.torch_threads,
        )
        # how uploads become this model's input (crop, filter) is the model's own: its folder's sidecar
        self._transform = self._model.sidecar.input_transform
        if warmup_batch > 0:
            size = self._model.info.sample_size
            blank = torch.zeros(self._model.info.in_channels, size, size)
            self.image_stats([PreparedImage(blank, (size, size), b"warmup")] * warmup_batch)
        self._ready.set()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def model(self) -> LoadedModel:
        if self._model is None:
            raise ModelNotReady("model not loaded")
        return self._model

    @property
    def info(self) -> ModelInfo:
        return self.model.info

    # --- any thread ----------------------------------------------------------------------------------
    def decode(self, data: bytes) -> PreparedImage:
        """Validate, decode and resize one encoded image (raises InvalidInput and subclasses)."""
        return self.prepare(decode_image(data, self.limits))

    def prepare(self, image: Image.Image) -> PreparedImage:
        """The model's input: its input transform (sidecar; default largest centred square, bicubic) to its
        ``sample_size``; ``crop_box`` records where in the upload that region lies (heat maps)."""
        return prepare(image, self.info.sample_size, self.info.in_channels, self._transform)

    @property
    def input_transform(self) -> InputTransform:
        return self._transform

    def memory(self) -> dict[str, float]:
        """Device memory in bytes: CUDA allocated/reserved, or this process's peak RSS on CPU."""
        if self._model is not None and self._model.device.type == "cuda":
            dev = self._model.device
            return {
                "allocated": float(torch.cuda.memory_allocated(dev)),
                "reserved": float(torch.cuda.memory_reserved(dev)),
            }
        return {"max_rss": float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}

    # --- the model threads -----------------------------------------------------------------------------
    def image_stats(self, batch: Sequence[PreparedImage]) -> list[ImageStats]:
        """Statistics for every image of the batch under the configured method, in order."""
        return self.image_stats_by_method(batch, (self.options.method,))[self.options.method]

    def image_stats_by_method(
        self, batch: Sequence[PreparedImage], methods: Sequence[str]
    ) -> dict[str, list[ImageStats]]:
        """Several methods' statistics from one pass where they share the trajectory (evaluation)."""
        if not batch:
            return {m: [] for m in methods}
        model = self.model
        x0 = torch.stack([item.tensor for item in batch])
        if model.device.type == "cuda":
            x0 = x0.pin_memory().to(model.device, non_blocking=True)
        digests = [item.digest for item in batch]
        try:
            with torch.inference_mode():
                stats = batch_statistics(model, x0, self.options, digests, tuple(methods))
                host = {m: _to_host(s) for m, s in stats.items()}
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            raise DeviceOutOfMemory(f"device out of memory on a batch of {len(batch)}") from exc
        except (RuntimeError, ValueError) as exc:
            raise EngineFailure(f"engine failed on a batch of {len(batch)}: {exc}") from exc
        return {m: _split(h, len(batch), self.options.aggregation) for m, h in host.items()}


def _to_host(stats: BatchStats) -> dict[str, np.ndarray]:
    return {
        "features": stats.features.double().cpu().numpy(),
        "step_sums": stats.step_sums.double().cpu().numpy(),
        "delta_sums": stats.delta_sums.double().cpu().numpy(),
        "heatmap": stats.heatmap.float().cpu().numpy(),
        "timesteps": np.asarray(stats.timesteps, dtype=np.int64),
        **{
            name: grid.double().cpu().numpy()
            for name, grid in (
                ("step_grid", stats.step_grid),
                ("delta_grid", stats.delta_grid),
                ("embeddings", stats.embeddings),
            )
            if grid is not None
        },
    }


def _split(host: dict[str, np.ndarray], n: int, aggregation: str) -> list[ImageStats]:
    out = []
    for i in range(n):
        features = host["features"][i]
        out.append(
            ImageStats(
                features=features,
                step_sums=host["step_sums"][i],
                delta_sums=host["delta_sums"][i],
                timesteps=host["timesteps"],
                heatmap=host["heatmap"][i],
                finite=bool(np.isfinite(features).all()),
                step_grid=host["step_grid"][i] if "step_grid" in host else None,
                delta_grid=host["delta_grid"][i] if "delta_grid" in host else None,
                embeddings=host["embeddings"][i] if "embeddings" in host else None,
                aggregation=aggregation if "step_grid" in host else None,
            )
        )
    return out
