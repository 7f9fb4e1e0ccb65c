"""A stand-in for the engine's ``Engine`` for in-process API tests: real decoding, no model.

Features are simple statistics of the decoded pixels, so a score depends only on its own image; hooks let
a test hold the worker at a gate, fail a batch, or make an image's features non-finite.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence

import numpy as np
from PIL import Image

from app.engine.preprocessing import DecodeLimits, PreparedImage, decode_image, prepare
from app.engine.types import ImageStats, MethodOptions, ModelInfo
from app.errors import EngineFailure

K = 4  # fake trajectory steps


class FakeEngine:
    def __init__(self, sample_size: int = 8) -> None:
        self.options = MethodOptions(steps=K)
        self.limits = DecodeLimits()
        self.sample_size = sample_size
        self.loaded = threading.Event()
        self.release = threading.Event()  # load() waits for it (set by default)
        self.release.set()
        self.load_error: Exception | None = None
        self.gate = threading.Event()  # run() waits for it (set by default)
        self.gate.set()
        self.entered = threading.Event()
        self.fail_next = False
        self.batches: list[int] = []
        self.seen: list[bytes] = []  # digests of every image computed

    # --- the Engine protocol ----------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.loaded.is_set()

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(
            model_id="fake@000000000000",
            name="fake",
            path="",
            sample_size=self.sample_size,
            in_channels=3,
            parameters=0,
            num_train_timesteps=1000,
            beta_schedule="linear",
            prediction_type="epsilon",
            scheduler_class="DDPMScheduler",
            weights_sha256="0" * 64,
            device="cpu",
            dtype="float32",
        )

    def load(self, warmup_batch: int = 2) -> None:
        assert self.release.wait(30)
        if self.load_error is not None:
            raise self.load_error
        self.loaded.set()

    def decode(self, data: bytes) -> PreparedImage:
        return prepare(decode_image(data, self.limits), self.sample_size, 3)

    def image_stats(self, batch: Sequence[PreparedImage]) -> list[ImageStats]:
        self.entered.set()
        assert self.gate.wait(30)
        if self.fail_next:
            self.fail_next = False
            raise EngineFailure("fake engine failure")
        self.batches.append(len(batch))
        self.seen.extend(p.digest for p in batch)
        return [self._stats(p) for p in batch]

    def memory(self) -> dict[str, float]:
        return {"max_rss": 1.0}

    # --- helpers ------------------------------------------------------------------------------------------
    def hold(self) -> None:
        self.gate.clear()
        self.entered.clear()

    @staticmethod
    def _stats(image: PreparedImage) -> ImageStats:
        x = image.tensor.double().numpy()
        features = np.array([x.mean(), x.std(), *x.mean(axis=(1, 2)), np.abs(x).max()])
        if x.max() <= -1.0:  # an all-black image: pretend the trajectory blew up
            features[:] = np.nan
        return ImageStats(
            features=features,
            step_sums=np.tile(features[:3], (K, 1)),
            delta_sums=np.zeros((K - 1, 3)),
            timesteps=np.linspace(0, 999, K).astype(np.int64),
            heatmap=np.abs(x).mean(axis=0).astype(np.float32),
            finite=bool(np.isfinite(features).all()),
        )


def png(seed: int, size: tuple[int, int] = (16, 16), color: tuple[int, int, int] | None = None) -> bytes:
    """A small PNG: random noise around a seeded colour, or one flat colour."""
    rng = np.random.default_rng(seed)
    if color is None:
        base = rng.integers(40, 215, size=3)
        arr = np.clip(base + rng.normal(0, 25, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
    else:
        arr = np.full((size[1], size[0], 3), color, dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="PNG")
    return out.getvalue()
