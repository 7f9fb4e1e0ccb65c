"""The decode stage of a bulk job, a Ray task: file bytes -> the model's input, exactly as the service
decodes an upload (app/engine/preprocessing.py). Kept apart from the scoring stage so that a decode
worker imports only the decoder (torch, Pillow), not the engine's model stack."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from app.engine.model.sidecar import InputTransform
from app.engine.preprocessing import DecodeLimits, PreparedImage, decode_image, prepare
from app.errors import InvalidInput

if TYPE_CHECKING:
    from app.engine.engine import Engine
    from app.settings import Settings

DIGEST_BYTES = 32  # PreparedImage.digest: sha256 of the prepared pixels, seeds the image's noise


@dataclass(frozen=True)
class InputSpec:
    """What ``Engine.decode`` applies to an upload, as plain data a decode task can carry: the service's
    caps (file size, pixels, formats) and the model's input transform and resolution."""

    size: int
    channels: int
    transform: InputTransform
    limits: DecodeLimits
    max_bytes: int

    @classmethod
    def of(cls, engine: Engine, settings: Settings) -> InputSpec:
        info = engine.info
        return cls(info.sample_size, info.in_channels, engine.input_transform, engine.limits,
                   settings.max_upload_bytes)  # fmt: skip

    def read(self, path: str) -> PreparedImage:
        """One file -> the model's input; raises InvalidInput (and subclasses) or OSError."""
        size = os.stat(path).st_size
        if size > self.max_bytes:
            raise InvalidInput(
                f"file is {size} bytes, over the cap of {self.max_bytes} (DDM_MAX_UPLOAD_BYTES)"
            )
        with open(path, "rb") as fh:
            data = fh.read()
        return prepare(decode_image(data, self.limits), self.size, self.channels, self.transform)


def decode_batch(batch: dict[str, np.ndarray], spec: InputSpec) -> dict[str, np.ndarray]:
    """Paths -> prepared pixels, digests and errors (an unreadable file: zeros and its error)."""
    paths = [str(p) for p in batch["path"]]
    images = np.zeros((len(paths), spec.channels, spec.size, spec.size), np.float32)
    digests = np.zeros((len(paths), DIGEST_BYTES), np.uint8)
    errors = np.full(len(paths), "", dtype=object)
    for i, path in enumerate(paths):
        try:
            prepared = spec.read(path)
        except (InvalidInput, OSError) as exc:
            errors[i] = str(exc) or type(exc).__name__
            continue
        images[i] = prepared.tensor.numpy()
        digests[i] = np.frombuffer(prepared.digest, np.uint8)
    return {"path": np.asarray(paths, dtype=object), "image": images, "digest": digests, "error": errors}
