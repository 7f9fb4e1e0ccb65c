"""What the pretrained models cost per image (docs/MODELS.md): FLOPs at K steps, engine images/s, memory.

Not a test.

    python benchmarks/model_costs.py --json benchmarks/results/model_costs/$(date +%F)-cpu.json
    python benchmarks/model_costs.py --device cuda --models diffpath-celeba32 celebahq-256 \
        --batch-sizes 1 16 64 --json model_costs-gpu.json                      # gpu_check.sh does this
    python benchmarks/model_costs.py --quick                                    # smoke run

The three real architectures with random weights (costs equal the real checkpoints'; scores mean nothing),
written as model folders the way ``ddm-anomaly import`` writes them (DiffPath's: learned sigma, t*1000/4000,
centre crop 140) and run through the engine exactly as the service runs them (``Engine.image_stats``:
trajectory, SSIM, sums, copy to host; default method, K = --steps):

* FLOPs per image: the UNet's forward counted by ``torch.utils.flop_counter`` on the meta device (no
  arithmetic is done, any size is instant; it includes the attention matmuls, which torch's fused CPU
  attention kernel hides from a counter on real tensors) times K; for the 32 px model also one whole
  ``Engine.image_stats`` on the torch runtime, whose count minus K real-tensor UNet counts is what the
  trajectory maths and SSIM add;
* images/s and ms/image at each batch size, median over --rounds (the device's default runtime: ONNX Runtime
  on CPU, torch with bf16 autocast on CUDA);
* memory: the weights, and per image of a batch: (peak at the largest batch - peak at batch 1) / (B - 1),
  from the process's peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.engine.engine import Engine  # noqa: E402
from app.engine.model.importers import ddim, improved_diffusion  # noqa: E402
from app.engine.model.importers.common import write_model_folder  # noqa: E402
from app.engine.model.sidecar import ModelSidecar  # noqa: E402
from app.engine.preprocessing import PreparedImage  # noqa: E402
from app.engine.types import MethodOptions  # noqa: E402

# ermongroup/ddim configs/celeba.yml (the DDIM paper's CelebA-64 checkpoint), the sections the network uses
DDIM_CELEBA64 = {
    "data": {"dataset": "CELEBA", "image_size": 64, "channels": 3, "logit_transform": False,
             "uniform_dequantization": False, "gaussian_dequantization": False, "random_flip": True,
             "rescaled": True, "num_workers": 4},
    "model": {"type": "simple", "in_channels": 3, "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 2, 2, 4],
              "num_res_blocks": 2, "attn_resolutions": [16], "dropout": 0.1, "var_type": "fixedlarge",
              "ema_rate": 0.9999, "ema": True, "resamp_with_conv": True},
    "diffusion": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                  "num_diffusion_timesteps": 1000},
}  # fmt: skip
CELEBAHQ_CONFIG = ROOT / "benchmarks" / "configs" / "ddpm-celebahq-256"
MODELS = ("diffpath-celeba32", "ddim-celeba64", "celebahq-256")


def make_folder(name: str, out: Path) -> Path:
    """A model folder of ``name``'s architecture with random weights (seed 0)."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    if name == "diffpath-celeba32":
        preset = improved_diffusion.PRESETS[name]
        flags = improved_diffusion.resolve_flags(preset["flags"])
        unet = UNet2DModel(**improved_diffusion.unet_config(flags))
        scheduler = improved_diffusion.scheduler_for(flags)
        sidecar = ModelSidecar(
            timestep_scale=improved_diffusion.timestep_scale(flags),
            epsilon_channels=3,
            input_transform=preset["input_transform"],
            alphas_cumprod_float64=True,
            source={"format": "random weights", "architecture": name},
        )
    elif name == "ddim-celeba64":
        unet = UNet2DModel(**ddim.unet_config(DDIM_CELEBA64))
        scheduler = ddim.scheduler_for(DDIM_CELEBA64)
        sidecar = ModelSidecar(input_transform=ddim.CELEBA_TRANSFORM, source={"format": "random weights"})
    elif name == "celebahq-256":
        unet = UNet2DModel.from_config(json.loads((CELEBAHQ_CONFIG / "unet" / "config.json").read_text()))
        scheduler = DDPMScheduler.from_config(
            json.loads((CELEBAHQ_CONFIG / "scheduler" / "scheduler_config.json").read_text())
        )
        sidecar = ModelSidecar(source={"format": "random weights"})
    else:
        raise SystemExit(f"unknown model {name!r}; one of {MODELS}")
    card = f"# {name}, random weights (benchmarks/model_costs.py)\n"
    return write_model_folder(out / name, unet, scheduler, sidecar, card, overwrite=True)


def unet_flops(folder: Path) -> tuple[int, int]:
    """(FLOPs of one UNet forward on one image, parameters), counted on the meta device."""
    from diffusers import UNet2DModel

    config = json.loads((folder / "unet" / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DModel.from_config(config).eval()
        size = int(config["sample_size"])
        x = torch.empty(1, int(config["in_channels"]), size, size)
        t = torch.full((1,), 10.0)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, t)
    return counter.get_total_flops(), sum(p.numel() for p in unet.parameters())


def random_images(size: int, n: int) -> list[PreparedImage]:
    gen = torch.Generator().manual_seed(1)
    return [
        PreparedImage(torch.rand(3, size, size, generator=gen) * 2 - 1, (size, size), i.to_bytes(4, "little"))
        for i in range(n)
    ]


def peak_memory(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device))
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def measure(folder: Path, args: argparse.Namespace, count_engine_flops: bool) -> dict[str, Any]:
    options = MethodOptions(steps=args.steps)
    flops_eval, params = unet_flops(folder)
    result: dict[str, Any] = {
        "parameters": params,
        "unet_flops_per_eval": flops_eval,
        "unet_flops_per_image": flops_eval * args.steps,
    }
    if count_engine_flops:  # the whole engine once on the torch runtime (the counter cannot see ONNX Runtime)
        counter_engine = Engine(folder, device="cpu", dtype="float32", options=options, runtime="torch")
        counter_engine.load(warmup_batch=0)
        image = random_images(counter_engine.info.sample_size, 1)
        with FlopCounterMode(display=False) as counter:
            counter_engine.image_stats(image)
        with FlopCounterMode(display=False) as one_eval, torch.no_grad():
            counter_engine.model.unet(image[0].tensor[None], torch.tensor([1.0]))
        result["engine_flops_per_image_counted"] = counter.get_total_flops()
        result["trajectory_ssim_flops_per_image"] = (
            counter.get_total_flops() - args.steps * one_eval.get_total_flops()
        )
        del counter_engine
    if not args.batch_sizes:
        return result
    engine = Engine(folder, device=args.device, dtype=args.dtype, options=options, runtime=args.runtime,
                    torch_threads=args.threads)  # fmt: skip
    started = time.perf_counter()
    engine.load(warmup_batch=1)
    device = engine.model.device
    result.update(
        {
            "load_s": time.perf_counter() - started,
            "runtime": engine.info.runtime,
            "dtype": engine.info.dtype,
            "weights_bytes": 4 * params,
        }
    )
    images = random_images(engine.info.sample_size, max(args.batch_sizes))
    rows, peaks = [], {}
    for b in sorted(args.batch_sizes):
        batch = images[:b]
        engine.image_stats(batch)  # warm: first-call allocations at this shape
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            engine.image_stats(batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        peaks[b] = peak_memory(device)
        t = statistics.median(times)
        rows.append({"batch": b, "images_per_s": b / t, "ms_per_image": 1e3 * t / b, "runs_s": times})
        print(f"  {folder.name} batch {b}: {b / t:.2f} images/s, {1e3 * t / b:.0f} ms/image", flush=True)
    result["batches"] = rows
    result["peak_memory_bytes"] = {str(b): v for b, v in peaks.items()}
    low, high = min(peaks), max(peaks)
    if high > low:
        result["memory_per_image_bytes"] = (peaks[high] - peaks[low]) / (high - low)
    result["memory_kind"] = "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS"
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--timed", nargs="+", default=["diffpath-celeba32"],
                   help="models whose engine speed and memory are measured (others: FLOPs only)")  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--runtime", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch / ONNX Runtime threads (default: all)")
    p.add_argument("--steps", type=int, default=10, help="K")
    p.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 16])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke run: the 32 px model, batch 1, K=2, 1 round")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.timed, args.steps, args.batch_sizes, args.rounds = (
            ["diffpath-celeba32"], ["diffpath-celeba32"], 2, [1, 2], 1,
        )  # fmt: skip
    if args.device == "cuda":
        args.timed = list(args.models)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="model-costs-") as tmp:
        for name in args.models:
            print(f"{name}: building a random-weight folder", flush=True)
            folder = make_folder(name, Path(tmp))
            timed = name in args.timed
            saved = args.batch_sizes
            if not timed:
                args.batch_sizes = []
            try:
                results[name] = measure(folder, args, count_engine_flops=name == "diffpath-celeba32")
            except Exception as exc:  # one model failing (out of memory, ...) must not lose the others
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            args.batch_sizes = saved
            r = results[name]
            if "unet_flops_per_image" in r:
                gflop_eval, gflop_image = r["unet_flops_per_eval"] / 1e9, r["unet_flops_per_image"] / 1e9
                print(f"{name}: {r['parameters']:,} parameters, {gflop_eval:.2f} GFLOP per UNet eval, "
                      f"{gflop_image:.1f} GFLOP per image at K={args.steps}", flush=True)  # fmt: skip
            if args.json:  # written after each model: a run cut off by a time limit keeps what it measured
                write(args, results)
    return 0 if all("error" not in r for r in results.values()) else 1


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write(args: argparse.Namespace, results: dict[str, Any]) -> None:
    info = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "device": args.device,
        "cuda_device": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),  # other processes on the host: timings are only as quiet as this
        "torch": torch.__version__,
        "steps": args.steps,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": info, "models": results}, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
