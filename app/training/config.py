"""What a training run is made of (``TrainConfig``) and what one invocation returns (``TrainResult``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from app.engine.model.loading import ModelLoadError
from app.engine.model.loading import resolve_device as engine_device
from app.errors import InvalidInput


@dataclass
class TrainConfig:
    """Everything a training run is made of. ``steps`` and ``minutes`` are totals over every invocation
    of the run (a resumed run stops at the same point an uncut one would); at least one must be set."""

    images: list[Path]
    out: Path
    init_from: Path | None = None
    # fresh-model architecture (ignored with init_from / on resume, except that resolution must match)
    resolution: int | None = None
    channels: tuple[int, ...] = (32, 64, 128, 128)
    layers_per_block: int = 1
    attention_resolutions: tuple[int, ...] = (8,)
    dropout: float = 0.1
    # budget
    steps: int | None = None
    minutes: float | None = None
    # optimisation
    batch_size: int = 64
    lr: float = 2e-4
    warmup_steps: int = 500
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    # outputs
    checkpoint_every: int = 500
    sample_every: int = 500
    sample_n: int = 16
    sample_steps: int = 50
    keep_resume_states: int = 2
    save_fp16: bool = True
    log_every: int = 50
    progress: bool | None = None  # None: a bar only when stderr is a terminal, log lines otherwise
    # runtime
    seed: int = 0
    device: str = "auto"
    # torch's CPU threads as asked for (recorded; torch's count is process-wide, so the entry point sets it
    # at start-up: app.bootstrap.set_torch_threads)
    threads: int | None = None

    def check(self) -> None:
        if self.steps is None and self.minutes is None:
            raise InvalidInput("give --steps or --minutes (or both: whichever comes first)")
        if not self.images:
            raise InvalidInput("give at least one image folder")
        if self.batch_size < 1 or self.checkpoint_every < 0 or self.sample_every < 0:
            raise InvalidInput("batch size must be >= 1 and the periods >= 0")

    def lr_at(self, step: int) -> float:
        """The learning rate of optimiser step ``step`` (0-based): linear warm-up, then constant."""
        return self.lr * min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else self.lr

    def to_json(self) -> dict[str, Any]:
        return {k: _jsonable(v) for k, v in dataclasses.asdict(self).items()}


@dataclass
class TrainResult:
    out: Path
    start_step: int
    step: int
    loss_ema: float | None
    wall_time_s: float
    session_steps_per_s: float
    stop_reason: str
    checkpoints: list[Path] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    """The engine's device choice, reported as a usage error (the commands print it, no traceback)."""
    try:
        return engine_device(name)
    except ModelLoadError as exc:
        raise InvalidInput(str(exc)) from exc


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value
