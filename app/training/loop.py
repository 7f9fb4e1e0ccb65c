"""The training loop: epsilon-prediction DDPM training of a ``UNet2DModel`` with EMA, checkpoints, resume.

Same code on CPU and CUDA (bf16 autocast on CUDA only). All randomness (data order, flips, noise, timesteps)
comes from one seeded CPU generator whose state is checkpointed, so a resumed run continues the same stream.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import shutil
import sys
import threading
import time
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

from app.errors import InvalidInput
from app.training import checkpoint as ckpt
from app.training.config import TrainConfig, TrainResult, resolve_device
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

__all__ = ["TrainConfig", "TrainResult", "Trainer", "resolve_device", "train"]

logger = logging.getLogger(__name__)


def train(config: TrainConfig, stop: threading.Event | None = None) -> TrainResult:
    """Train (or resume training of) a model into ``config.out``; see the module docstring of
    ``app.training.checkpoint`` for the checkpoint layout. Returns when the step or time budget is used up
    or ``stop`` is set; in every case the last state is checkpointed and ``out/unet``, ``out/scheduler``
    and ``out/training.json`` hold the current EMA model."""
    return Trainer(config).run(stop)


def _initial_model(
    config: TrainConfig, resume: Path | None, state: dict[str, Any] | None
) -> tuple[UNet2DModel, DDPMScheduler]:
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


class Trainer:
    """One invocation of a training run in ``config.out``: built from the newest resumable checkpoint
    (``restore``) or from scratch / ``init_from``, it runs optimiser ``step``s, writes ``checkpoint``s and
    finally ``record``s the run (``training.json``). The order of every random draw is part of the contract: a
    resumed run must continue exactly the stream an uncut one would have drawn."""

    def __init__(self, config: TrainConfig) -> None:
        config.check()
        self.config = config
        self.out = Path(config.out)
        self.device = resolve_device(config.device)
        torch.manual_seed(config.seed)  # fresh weights and dropout draw from the global generators
        self.resume = ckpt.latest_resumable(self.out)
        state = ckpt.load_state(self.resume, self.device) if self.resume is not None else None
        self.unet, self.scheduler = _initial_model(config, self.resume, state)
        self.resolution = int(self.unet.config.sample_size)
        if config.resolution is not None and config.resolution != self.resolution:
            raise InvalidInput(
                f"--resolution {config.resolution} but the model is made for {self.resolution} px"
            )
        self.cache = load_image_folders(config.images, self.resolution)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.sampler = BatchSampler(len(self.cache), config.batch_size, self.generator)
        self.unet.to(self.device).train()
        self.optimizer = torch.optim.AdamW(
            self.unet.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.ema = EMAModel(self.unet.parameters(), decay=config.ema_decay, foreach=True)
        self.ema_unet = unet_from_config(self.unet.config).to(self.device)  # EMA weights for saving/sampling
        self.step_count, self.elapsed_before = 0, 0.0
        self.loss_ema: float | None = None
        self.sessions: list[dict[str, Any]] = []
        self.init_from = str(config.init_from) if config.init_from is not None else None
        if state is not None:
            self.restore(state)
        self.abar = self.scheduler.alphas_cumprod.to(device=self.device, dtype=torch.float32)
        self.num_t = int(self.scheduler.config.num_train_timesteps)
        self.use_bf16 = self.device.type == "cuda"
        self.start_step, self.t0 = self.step_count, time.monotonic()
        self.session = {
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "from_step": self.step_count,
            "device": str(self.device),
            "threads": torch.get_num_threads() if self.device.type == "cpu" else None,
        }
        self.recent: collections.deque[float] = collections.deque(maxlen=100)
        self.saved: list[Path] = []
        self.last_saved = self.step_count if self.resume is not None else -1

    # --- the loop ----------------------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None) -> TrainResult:
        config = self.config
        show_bar = sys.stderr.isatty() if config.progress is None else config.progress
        bar = tqdm(total=config.steps, initial=self.step_count, disable=not show_bar, unit="step",
                   dynamic_ncols=True)  # fmt: skip
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            while (stop_reason := self.stop_reason(stop)) is None:
                loss, lr = self.step()
                bar.update(1)
                bar.set_postfix(loss=f"{self.loss_ema:.4f}", lr=f"{lr:.1e}", refresh=False)
                self.log(loss, lr, to_logger=not show_bar)
                at_sample = bool(config.sample_every) and self.step_count % config.sample_every == 0
                if config.checkpoint_every and self.step_count % config.checkpoint_every == 0:
                    self.checkpoint(with_samples=at_sample)
                elif at_sample:
                    self.draw_samples(self.out / "samples" / f"step-{self.step_count:06d}.png")
        finally:
            bar.close()
        if self.step_count != self.last_saved:
            self.checkpoint(with_samples=config.sample_every > 0)
        return self.record(stop_reason)

    def stop_reason(self, stop: threading.Event | None) -> str | None:
        """Why this invocation ends before the next step ("steps", "minutes", "interrupted"), or None."""
        if self.config.steps is not None and self.step_count >= self.config.steps:
            return "steps"
        if self.config.minutes is not None and self.elapsed() >= self.config.minutes * 60:
            return "minutes"
        if stop is not None and stop.is_set():
            return "interrupted"
        return None

    def step(self) -> tuple[float, float]:
        """One optimiser step on the next batch: (its loss, its learning rate); a non-finite loss raises."""
        generator, device = self.generator, self.device
        idx = self.sampler.next_indices()
        b = idx.numel()
        flip = torch.rand(b, generator=generator) < 0.5
        x0 = to_model_input(self.cache.pixels[idx], flip).to(device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        t = torch.randint(0, self.num_t, (b,), generator=generator).to(device)
        a = self.abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        lr_now = self.config.lr_at(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_now
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            pred = self.unet(xt, t).sample
        loss = F.mse_loss(pred.float(), noise)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.ema.step(self.unet.parameters())
        self.step_count += 1

        value = float(loss.detach())
        if not math.isfinite(value):
            raise RuntimeError(
                f"loss became {value} at step {self.step_count}; last checkpoint: step {self.last_saved}"
            )
        self.recent.append(value)
        decay = min(0.99, 1.0 - 1.0 / self.step_count)  # running mean for the first 100 steps, then an EMA
        self.loss_ema = value if self.loss_ema is None else decay * self.loss_ema + (1.0 - decay) * value
        return value, lr_now

    def log(self, loss: float, lr: float, to_logger: bool) -> None:
        """Every ``log_every`` steps: a line in ``log.jsonl`` (and in the log when no bar is shown)."""
        every, step = self.config.log_every, self.step_count
        if not every or step % every:
            return
        rate = (step - self.start_step) / max(1e-9, time.monotonic() - self.t0)
        entry = {"step": step, "loss": loss, "loss_ema": self.loss_ema, "lr": lr,
                 "elapsed_s": round(self.elapsed(), 1), "steps_per_s": round(rate, 4)}  # fmt: skip
        with (self.out / "log.jsonl").open("a") as fh:
            fh.write(json.dumps(entry) + "\n")
        if to_logger:
            logger.info("step %d loss %.4f (ema %.4f) lr %.2e %.3f steps/s", step, loss,
                        self.loss_ema, lr, rate)  # fmt: skip

    # --- state ---------------------------------------------------------------------------------------------
    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's resume state: weights, optimiser, EMA, data order, RNG, counters."""
        self.unet.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema.load_state_dict(state["ema"])
        self.generator.set_state(state["generator"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        if self.device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)
        self.sampler.load_state_dict(state["sampler"])
        self.step_count, self.elapsed_before = int(state["step"]), float(state["elapsed_s"])
        self.loss_ema, self.sessions = state["loss_ema"], list(state["sessions"])
        self.init_from = state["init_from"]
        logger.info("resumed from %s at step %d", self.resume, self.step_count)

    def resume_state(self) -> dict[str, Any]:
        device = self.device
        return {
            "step": self.step_count,
            "model": self.unet.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "sampler": self.sampler.state_dict(),
            "elapsed_s": self.elapsed(),
            "loss_ema": self.loss_ema,
            "sessions": self.sessions_so_far(),
            "init_from": self.init_from,
            "unet_config": dict(self.unet.config),
        }

    def checkpoint(self, with_samples: bool) -> None:
        config = self.config
        folder = ckpt.save_checkpoint(
            self.out, self.step_count, self.ema_model(), self.scheduler, self.resume_state(),
            config.save_fp16, samples_writer=self.draw_samples if with_samples else None,
        )  # fmt: skip
        ckpt.prune_resume_states(self.out, config.keep_resume_states)
        self.saved.append(folder)
        self.last_saved = self.step_count
        loss_ema = self.loss_ema if self.loss_ema is not None else math.nan
        logger.info("checkpoint %s (loss_ema %.4f)", folder, loss_ema)

    def elapsed(self) -> float:
        """Training seconds of the whole run, every resumed invocation of the command included."""
        return self.elapsed_before + time.monotonic() - self.t0

    def ema_model(self) -> UNet2DModel:
        self.ema.copy_to(self.ema_unet.parameters())
        return self.ema_unet

    def draw_samples(self, path: Path) -> None:
        config = self.config
        images = ddim_sample(self.ema_model(), self.scheduler.config, config.sample_n, config.sample_steps,
                             config.seed)  # fmt: skip
        save_grid(images, path)

    def sessions_so_far(self) -> list[dict[str, Any]]:
        now = {**self.session, "to_step": self.step_count, "wall_s": round(time.monotonic() - self.t0, 1)}
        return [*self.sessions, now]

    # --- the end of an invocation ---------------------------------------------------------------------------
    def record(self, stop_reason: str) -> TrainResult:
        """Write the EMA model to ``out/unet`` + ``out/scheduler`` and the run to ``out/training.json``."""
        wall = self.elapsed()
        session_rate = (self.step_count - self.start_step) / max(1e-9, time.monotonic() - self.t0)
        _write_output(self.out, self.ema_model(), self.scheduler, self.config.save_fp16)
        record = self.run_record(stop_reason, wall, session_rate)
        (self.out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
        last = ckpt.list_checkpoints(self.out)
        if last and (last[-1][1] / ckpt.SAMPLES_FILE).is_file():
            shutil.copyfile(last[-1][1] / ckpt.SAMPLES_FILE, self.out / ckpt.SAMPLES_FILE)
        return TrainResult(
            self.out, self.start_step, self.step_count, self.loss_ema, wall, session_rate, stop_reason,
            self.saved,
        )  # fmt: skip

    def run_record(self, stop_reason: str, wall: float, session_rate: float) -> dict[str, Any]:
        """training.json: data, architecture, optimisation, where and how long (one ``sessions`` entry per
        invocation of the command), the config."""
        config, unet, scheduler = self.config, self.unet, self.scheduler
        return {
            "data": [{"folder": k, "images": v} for k, v in self.cache.counts.items()],
            "images": len(self.cache),
            "init_from": self.init_from,
            **describe(unet),
            "attention_resolutions": [
                self.resolution // 2**i
                for i, kind in enumerate(unet.config.down_block_types)
                if kind.startswith("Attn")
            ],
            "steps": self.step_count,
            "batch": config.batch_size,
            "lr": config.lr,
            "warmup_steps": config.warmup_steps,
            "weight_decay": config.weight_decay,
            "grad_clip": config.grad_clip,
            "ema": config.ema_decay,
            "schedule": scheduler.config.beta_schedule,
            "prediction_type": scheduler.config.prediction_type,
            "seed": config.seed,
            "device": str(self.device),
            "bf16_autocast": self.use_bf16,
            "threads": self.session["threads"],
            "wall_time_s": round(wall, 1),
            "session_steps_per_s": round(session_rate, 4),
            "loss_ema": self.loss_ema,
            "loss_last100_mean": sum(self.recent) / len(self.recent) if self.recent else None,
            "stop_reason": stop_reason,
            "weights_dtype": "float16" if config.save_fp16 else "float32",
            "sessions": self.sessions_so_far(),
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
            "config": config.to_json(),
        }


def _write_output(out: Path, ema_unet: UNet2DModel, scheduler: DDPMScheduler, fp16: bool) -> None:
    tmp = out / ".model.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    ckpt.write_model_folder(ema_unet, scheduler, tmp, fp16)
    for name in ("unet", "scheduler"):
        ckpt.replace_dir(tmp / name, out / name)
    tmp.rmdir()
