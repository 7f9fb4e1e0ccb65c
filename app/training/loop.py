"""The training loop: epsilon-prediction DDPM training of a ``UNet2DModel`` with EMA, checkpoints, resume.

Same code on CPU and CUDA (bf16 autocast on CUDA only). All randomness (data order, flips, noise, timesteps)
comes from one seeded CPU generator whose state is checkpointed, so a resumed run continues the same stream.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import diffusers
import torch
import torch.nn.functional as F
from diffusers.models.unets.unet_2d import UNet2DModel
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from app.engine.model.loading import ModelLoadError
from app.engine.model.loading import resolve_device as engine_device
from app.errors import InvalidInput
from app.training import checkpoint as ckpt
from app.training.data import BatchSampler, load_image_folders, to_model_input
from app.training.model import (
    UNetSpec,
    build_unet,
    default_scheduler,
    describe,
    load_model_dir,
    unet_from_config,
)
from app.training.sampling import ddim_sample, save_grid

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything a training run is made of. ``steps`` and ``minutes`` are totals over all sessions of the
    run (a resumed run stops at the same point an uncut one would); at least one must be set."""

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
    threads: int | None = None


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


def _check(config: TrainConfig) -> None:
    if config.steps is None and config.minutes is None:
        raise InvalidInput("give --steps or --minutes (or both: whichever comes first)")
    if not config.images:
        raise InvalidInput("give at least one image folder")
    if config.batch_size < 1 or config.checkpoint_every < 0 or config.sample_every < 0:
        raise InvalidInput("batch size must be >= 1 and the periods >= 0")


def _initial_model(config: TrainConfig, resume: Path | None, state: dict[str, Any] | None):
    if resume is not None and state is not None:
        unet = unet_from_config(state["unet_config"])
        scheduler = DDPMScheduler.from_pretrained(resume / "scheduler")
        if config.init_from is not None:
            logger.info("resuming from %s; --init-from is ignored", resume)
        return unet, scheduler
    if config.init_from is not None:
        return load_model_dir(config.init_from)
    spec = UNetSpec(
        resolution=config.resolution or 32,
        channels=tuple(config.channels),
        layers_per_block=config.layers_per_block,
        attention_resolutions=tuple(config.attention_resolutions),
        dropout=config.dropout,
    )
    return build_unet(spec), default_scheduler()


def train(config: TrainConfig, stop: threading.Event | None = None) -> TrainResult:
    """Train (or resume training of) a model into ``config.out``; see the module docstring of
    ``app.training.checkpoint`` for the checkpoint layout. Returns when the step or time budget is used up
    or ``stop`` is set; in every case the last state is checkpointed and ``out/unet``, ``out/scheduler``
    and ``out/training.json`` hold the current EMA model."""
    _check(config)
    out = Path(config.out)
    device = resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)

    torch.manual_seed(config.seed)  # fresh weights and dropout draw from the global generators

    resume = ckpt.latest_resumable(out)
    state = ckpt.load_state(resume, device) if resume is not None else None
    unet, scheduler = _initial_model(config, resume, state)
    resolution = int(unet.config.sample_size)
    if config.resolution is not None and config.resolution != resolution:
        raise InvalidInput(f"--resolution {config.resolution} but the model is made for {resolution} px")

    cache = load_image_folders(config.images, resolution)
    generator = torch.Generator().manual_seed(config.seed)
    sampler = BatchSampler(len(cache), config.batch_size, generator)

    unet.to(device).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    ema = EMAModel(unet.parameters(), decay=config.ema_decay, foreach=True)
    ema_unet = unet_from_config(unet.config).to(device)  # holds EMA weights for saving/sampling
    step, elapsed_before, loss_ema = 0, 0.0, None
    sessions: list[dict[str, Any]] = []
    init_from = str(config.init_from) if config.init_from is not None else None
    if state is not None:
        unet.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        generator.set_state(state["generator"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
        sampler.load_state_dict(state["sampler"])
        step, elapsed_before = int(state["step"]), float(state["elapsed_s"])
        loss_ema, sessions, init_from = state["loss_ema"], list(state["sessions"]), state["init_from"]
        logger.info("resumed from %s at step %d", resume, step)

    abar = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    num_t = int(scheduler.config.num_train_timesteps)
    use_bf16 = device.type == "cuda"
    start_step, t0 = step, time.monotonic()
    session = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "from_step": step,
        "device": str(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
    }
    recent: collections.deque[float] = collections.deque(maxlen=100)
    saved: list[Path] = []
    last_saved = step if resume is not None else -1

    def elapsed() -> float:
        return elapsed_before + time.monotonic() - t0

    def ema_model() -> UNet2DModel:
        ema.copy_to(ema_unet.parameters())
        return ema_unet

    def draw_samples(path: Path) -> None:
        images = ddim_sample(ema_model(), scheduler.config, config.sample_n, config.sample_steps, config.seed)
        save_grid(images, path)

    def sessions_so_far() -> list[dict[str, Any]]:
        now = {**session, "to_step": step, "wall_s": round(time.monotonic() - t0, 1)}
        return [*sessions, now]

    def checkpoint(with_samples: bool) -> None:
        nonlocal last_saved
        resume_state = {
            "step": step,
            "model": unet.state_dict(),
            "optimizer": optimizer.state_dict(),
            "ema": ema.state_dict(),
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "sampler": sampler.state_dict(),
            "elapsed_s": elapsed(),
            "loss_ema": loss_ema,
            "sessions": sessions_so_far(),
            "init_from": init_from,
            "unet_config": dict(unet.config),
        }
        folder = ckpt.save_checkpoint(
            out, step, ema_model(), scheduler, resume_state, config.save_fp16,
            samples_writer=draw_samples if with_samples else None,
        )  # fmt: skip
        ckpt.prune_resume_states(out, config.keep_resume_states)
        saved.append(folder)
        last_saved = step
        logger.info("checkpoint %s (loss_ema %.4f)", folder, loss_ema if loss_ema is not None else math.nan)

    show_bar = sys.stderr.isatty() if config.progress is None else config.progress
    bar = tqdm(total=config.steps, initial=step, disable=not show_bar, unit="step", dynamic_ncols=True)
    log_path = out / "log.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    stop_reason = "steps"
    try:
        while True:
            if config.steps is not None and step >= config.steps:
                stop_reason = "steps"
                break
            if config.minutes is not None and elapsed() >= config.minutes * 60:
                stop_reason = "minutes"
                break
            if stop is not None and stop.is_set():
                stop_reason = "interrupted"
                break
            idx = sampler.next_indices()
            b = idx.numel()
            flip = torch.rand(b, generator=generator) < 0.5
            x0 = to_model_input(cache.pixels[idx], flip).to(device)
            noise = torch.randn(x0.shape, generator=generator).to(device)
            t = torch.randint(0, num_t, (b,), generator=generator).to(device)
            a = abar[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            lr_now = (
                config.lr * min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else config.lr
            )
            for group in optimizer.param_groups:
                group["lr"] = lr_now
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                pred = unet(xt, t).sample
            loss = F.mse_loss(pred.float(), noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), config.grad_clip)
            optimizer.step()
            ema.step(unet.parameters())
            step += 1

            value = float(loss.detach())
            if not math.isfinite(value):
                raise RuntimeError(f"loss became {value} at step {step}; last checkpoint: step {last_saved}")
            recent.append(value)
            decay = min(0.99, 1.0 - 1.0 / step)  # running mean for the first 100 steps, then an EMA
            loss_ema = value if loss_ema is None else decay * loss_ema + (1.0 - decay) * value
            bar.update(1)
            bar.set_postfix(loss=f"{loss_ema:.4f}", lr=f"{lr_now:.1e}", refresh=False)
            if config.log_every and step % config.log_every == 0:
                rate = (step - start_step) / max(1e-9, time.monotonic() - t0)
                entry = {"step": step, "loss": value, "loss_ema": loss_ema, "lr": lr_now,
                         "elapsed_s": round(elapsed(), 1), "steps_per_s": round(rate, 4)}  # fmt: skip
                with log_path.open("a") as fh:
                    fh.write(json.dumps(entry) + "\n")
                if not show_bar:
                    logger.info("step %d loss %.4f (ema %.4f) lr %.2e %.3f steps/s", step, value,
                                loss_ema, lr_now, rate)  # fmt: skip
            at_sample = bool(config.sample_every) and step % config.sample_every == 0
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                checkpoint(with_samples=at_sample)
            elif at_sample:
                draw_samples(out / "samples" / f"step-{step:06d}.png")
    finally:
        bar.close()

    if step != last_saved:
        checkpoint(with_samples=config.sample_every > 0)
    wall = elapsed()
    session_rate = (step - start_step) / max(1e-9, time.monotonic() - t0)
    _write_output(out, ema_model(), scheduler, config.save_fp16)
    record = {
        "data": [{"folder": k, "images": v} for k, v in cache.counts.items()],
        "images": len(cache),
        "init_from": init_from,
        **describe(unet),
        "attention_resolutions": [
            resolution // 2**i
            for i, kind in enumerate(unet.config.down_block_types)
            if kind.startswith("Attn")
        ],
        "steps": step,
        "batch": config.batch_size,
        "lr": config.lr,
        "warmup_steps": config.warmup_steps,
        "weight_decay": config.weight_decay,
        "grad_clip": config.grad_clip,
        "ema": config.ema_decay,
        "schedule": scheduler.config.beta_schedule,
        "prediction_type": scheduler.config.prediction_type,
        "seed": config.seed,
        "device": str(device),
        "bf16_autocast": use_bf16,
        "threads": session["threads"],
        "wall_time_s": round(wall, 1),
        "session_steps_per_s": round(session_rate, 4),
        "loss_ema": loss_ema,
        "loss_last100_mean": sum(recent) / len(recent) if recent else None,
        "stop_reason": stop_reason,
        "weights_dtype": "float16" if config.save_fp16 else "float32",
        "sessions": sessions_so_far(),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "config": {k: _jsonable(v) for k, v in dataclasses.asdict(config).items()},
    }
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    last = ckpt.list_checkpoints(out)
    if last and (last[-1][1] / ckpt.SAMPLES_FILE).is_file():
        shutil.copyfile(last[-1][1] / ckpt.SAMPLES_FILE, out / ckpt.SAMPLES_FILE)
    return TrainResult(out, start_step, step, loss_ema, wall, session_rate, stop_reason, saved)


def _write_output(out: Path, ema_unet: UNet2DModel, scheduler: DDPMScheduler, fp16: bool) -> None:
    tmp = out / ".model.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    ckpt.write_model_folder(ema_unet, scheduler, tmp, fp16)
    for name in ("unet", "scheduler"):
        ckpt.replace_dir(tmp / name, out / name)
    tmp.rmdir()
