"""Engine throughput vs this machine's measured peak and vs the naive peer (docs/PERFORMANCE.md). Not a test.

    python benchmarks/engine_bench.py --json benchmarks/results/engine.json       # batches 1..64, K=10
    python benchmarks/engine_bench.py --variants --batch-sizes 1 32                # + what each speed-up buys
    python benchmarks/engine_bench.py --device cuda --dtype bfloat16 --batch-sizes 1 64 256 1024
    python benchmarks/engine_bench.py --quick --model <tiny model folder>          # smoke run, seconds

What one run measures, interleaved round by round so that load from other processes hits every contender
alike (tables give the median over rounds):
* the fp32 peak: a large square matmul, GFLOP/s;
* the engine: ``Engine.image_stats`` (the service's path: trajectory, SSIM, sums, copy to host) at each batch
  size, images/s and ms per image; the bare UNet (K forward passes, nothing else) beside it, so the table
  shows what the trajectory maths costs on top;
* FLOPs per image (``torch.utils.flop_counter``, one ``Engine.image_stats``) -> achieved GFLOP/s -> % of peak;
* the naive peer (``naive_peer.py``: one image at a time, plain loop, NumPy sums) -> engine speed-up;
* that the naive peer and the engine give the same features (else the ratio would mean nothing);
* with ``--variants``: the engine as shipped beside single changes to it (channels_last, the other thread
  count, bf16 autocast, torch vs ONNX Runtime on CPU, ``torch.compile`` with ``--compile``)
  at ``--variant-batches``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import naive_peer  # a sibling script, not a package

from app.bootstrap import set_engine_threads
from app.engine.engine import Engine
from app.engine.model.runtimes import RuntimeUnavailable, TorchRuntime, build_runtime, torch_threads_beside
from app.engine.preprocessing import PreparedImage
from app.engine.trajectory import predict_noise, trajectory_timesteps
from app.engine.types import MethodOptions
from app.errors import DeviceOutOfMemory

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "model_store" / "celeba32-ref"
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "celeba"
FEATURE_TOL = 1e-3  # engine vs naive peer, in units of each feature's spread over the images
SUM_NAMES = ("sum a", "sum a^2", "sum a^3", "sum da", "sum da^2", "sum da^3")


def feature_names(options: MethodOptions) -> list[str]:
    if options.aggregation == "sum":
        return list(SUM_NAMES)
    k = options.steps
    if options.aggregation == "per-step-centre":
        return [f"log energy {q}_{i} {r}" for q, n in (("a", k), ("da", k - 1)) for i in range(n)
                for r in ("centre", "border")]  # fmt: skip
    return [f"log energy a_{i}" for i in range(k)] + [f"log energy da_{i}" for i in range(k - 1)]


# --- measurements ---------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, repeats: int = 3) -> float:
    """Best GFLOP/s of an n x n matmul (n = 2048 on CPU, 8192 on CUDA)."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def images_per_second(fn: Callable[[], Any], batch: int, min_images: int, device: torch.device) -> float:
    """Throughput of fn (one call = ``batch`` images), calling it until ``min_images`` are done."""
    calls = max(1, math.ceil(min_images / batch))
    return calls * batch / sum(timed(fn, device) for _ in range(calls))


def batch_of(images: list[PreparedImage], size: int) -> list[PreparedImage]:
    return [images[i % len(images)] for i in range(size)]


def bare_unet(engine: Engine, batch: list[PreparedImage]) -> Callable[[], None]:
    """K forward passes of the UNet on the batch: the floor under the engine's time."""
    model = engine.model
    x = torch.stack([item.tensor for item in batch]).to(model.device)
    steps = trajectory_timesteps(len(model.alphas_cumprod), engine.options.steps)

    def run() -> None:
        with torch.inference_mode():
            for t in steps:
                predict_noise(model, x, t)

    return run


def count_flops(engine: Engine, image: PreparedImage) -> dict[str, float]:
    """FLOPs of one image, counted on the torch UNet: the counter sees torch operators only, so an exported
    runtime's work would be invisible to it (the graph is the same; so is the arithmetic)."""
    twin = copy.copy(engine)
    twin._model = copy.copy(engine.model)
    model = twin.model
    model.runtime = TorchRuntime(model.unet, model.autocast_dtype, model.device)
    x = image.tensor[None].to(model.device)
    with FlopCounterMode(display=False) as per_eval, torch.inference_mode():
        predict_noise(model, x, 0)
    with FlopCounterMode(display=False) as per_image:
        twin.image_stats([image])
    return {"unet_per_eval": per_eval.get_total_flops(), "per_image": per_image.get_total_flops()}


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


# --- inputs ---------------------------------------------------------------------------------------------
def load_images(engine: Engine, folder: Path, count: int) -> tuple[list[PreparedImage], float]:
    """Decoded, resized images (random ones when the folder has none) and decode+prepare ms per image."""
    paths = sorted(folder.glob("*.png"))[:count] if folder.is_dir() else []
    if not paths:
        size, channels = engine.info.sample_size, engine.info.in_channels
        gen = torch.Generator().manual_seed(0)
        fake = [torch.rand(channels, size, size, generator=gen) * 2 - 1 for _ in range(count)]
        return [PreparedImage(t, (size, size), bytes([i % 256])) for i, t in enumerate(fake)], math.nan
    blobs = [p.read_bytes() for p in paths]
    start = time.perf_counter()
    images = [engine.decode(b) for b in blobs]
    return images, (time.perf_counter() - start) / len(images) * 1e3


# --- variants -------------------------------------------------------------------------------------------
def variant_engines(
    base: Engine, args: argparse.Namespace, engine_threads: int
) -> dict[str, tuple[Engine, int | None]]:
    """The shipped engine and single changes to it: name -> (engine, torch threads)."""
    out: dict[str, tuple[Engine, int | None]] = {"engine as shipped": (base, engine_threads)}

    def clone() -> Engine:
        twin = copy.copy(base)
        twin._model = copy.copy(base.model)  # same weights unless the variant replaces the module
        return twin

    model = base.model
    layout = clone()  # the other weight layout than the shipped one
    shipped_cl = model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    other = torch.contiguous_format if shipped_cl else torch.channels_last
    relaid = copy.deepcopy(model.unet).to(memory_format=other)
    layout.model.runtime = TorchRuntime(relaid, model.autocast_dtype, model.device)
    out[f"torch, {'NCHW' if shipped_cl else 'channels_last'} weights"] = (layout, args.threads)
    if model.device.type == "cpu":  # torch's pool is process-wide; an exported runtime sizes its own
        other_threads = 1 if args.threads > 1 else 2
        rethreaded = clone()
        rethreaded.model.runtime = build_runtime(
            model.runtime.name, model.unet, model.device, model.autocast_dtype, threads=other_threads
        )
        out[f"threads = {other_threads}"] = (
            rethreaded,
            torch_threads_beside(rethreaded.model.runtime, other_threads),
        )
        if model.runtime.name != "torch" and args.threads > 1:  # what the policy's one torch thread buys
            out[f"torch maths on {args.threads} threads too"] = (base, args.threads)
    precisions = {"bf16 autocast": torch.bfloat16}
    if model.device.type == "cuda":
        precisions = {
            "float32 (no autocast)": None,
            "bf16 autocast": torch.bfloat16,
            "fp16 autocast": torch.float16,
        }
    contenders = {f"torch {name}": ("torch", dtype) for name, dtype in precisions.items()}
    if model.device.type == "cpu":  # the other runtime (runtimes.py) beside the shipped engine
        contenders |= {"torch float32": ("torch", None), "onnxruntime float32": ("onnxruntime", None)}
    for name, (runtime, dtype) in contenders.items():
        if runtime == model.runtime.name and dtype == model.autocast_dtype:
            continue  # that is the engine as shipped
        try:
            variant = clone()
            variant.model.runtime = build_runtime(
                runtime, model.unet, model.device, dtype, threads=args.threads
            )
        except RuntimeUnavailable as exc:
            print(f"variant {name} skipped: {exc}", file=sys.stderr)
            continue
        out[name] = (variant, torch_threads_beside(variant.model.runtime, args.threads))
    if args.compile:
        compiled = clone()
        module = torch.compile(copy.deepcopy(model.unet), mode=args.compile_mode)
        compiled.model.runtime = TorchRuntime(module, model.autocast_dtype, model.device)
        out[f"torch.compile ({args.compile_mode})"] = (compiled, args.threads)
    return out


def compare_features(fast: np.ndarray, slow: np.ndarray, names: list[str]) -> dict[str, Any]:
    """Engine vs naive peer. Sums of odd powers cancel (sum a^3 is small next to its terms), so float32
    reassociation moves them by more than their own relative precision: the pass criterion is the
    difference in units of the feature's spread over the images, which is what a density sees."""
    diff = np.abs(fast - slow)
    rel = diff / np.maximum(np.abs(slow), 1e-12)
    std = slow.std(axis=0, keepdims=True) if len(slow) > 1 else np.abs(slow)  # one image: relative
    spread = diff / np.maximum(std, 1e-12)
    return {
        "max_rel_diff": dict(zip(names, rel.max(axis=0).tolist(), strict=True)),
        "max_diff_over_image_std": dict(zip(names, spread.max(axis=0).tolist(), strict=True)),
        "tolerance_over_image_std": FEATURE_TOL,
        "same": bool((spread <= FEATURE_TOL).all()),
    }


class Samples:
    """Per-round measurements; ratios are taken within a round (close in time), then the median."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}

    def add(self, key: str, value: float) -> None:
        self.values.setdefault(key, []).append(value)

    def median(self, key: str) -> float:
        return median(self.values.get(key, []))

    def ratio(self, top: str, bottom: str) -> float:
        pairs = zip(self.values.get(top, []), self.values.get(bottom, []), strict=False)
        return median([a / b for a, b in pairs if b > 0])


# --- the run --------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    # The configured thread count: torch's for a torch engine, the runtime's pool for an exported one
    # (torch then keeps one thread for the trajectory maths). The matmul peak, the naive peer
    # and the torch variants always get the configured count.
    args.threads = args.threads or torch.get_num_threads()
    set_engine_threads(args.device, args.dtype, args.runtime, args.threads)  # as the entry points do
    options = MethodOptions(steps=args.steps)
    engine = Engine(
        args.model, device=args.device, dtype=args.dtype, options=options, runtime=args.runtime,
        torch_threads=args.threads,
    )  # fmt: skip
    engine.load(warmup_batch=2)
    engine_threads = torch.get_num_threads()
    device = engine.model.device
    images, decode_ms = load_images(engine, args.images, max([*args.batch_sizes, args.naive_images]))
    flops = count_flops(engine, images[0])
    unet, scheduler = naive_peer.load(args.model)
    unet.to(device)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
    autocast = engine.model.autocast_dtype  # the naive peer gets the engine's precision, for a fair race

    def naive_features(image: PreparedImage, dtype: torch.dtype | None = autocast) -> np.ndarray:
        tensor = image.tensor.to(device)
        return naive_peer.features(unet, scheduler, tensor, args.steps, dtype, options.aggregation)[0]

    def engine_rate(engine: Engine, b: int) -> float:
        batch = batch_of(images, b)
        return images_per_second(lambda: engine.image_stats(batch), b, args.min_images, device)

    variants = variant_engines(engine, args, engine_threads) if args.variants else {}
    warmup_s = {}
    for name, (variant, n_threads) in variants.items():  # first-call allocations, compilation
        with threads(n_threads):
            warmup_s[name] = sum(timed(lambda v=variant, b=b: v.image_stats(batch_of(images, b)), device)
                                 for b in args.variant_batches)  # fmt: skip
    if device.type == "cuda":  # first call per shape: cuDNN algorithm search, allocator growth
        for b in args.batch_sizes:
            with contextlib.suppress(DeviceOutOfMemory, torch.OutOfMemoryError):
                engine.image_stats(batch_of(images, b))

    naive_images = images[: args.naive_images]
    m = Samples()
    batches = list(args.batch_sizes)
    for round_ in range(args.rounds):
        for b in list(batches):
            try:  # the peak right beside each engine measurement: load from other processes hits both
                with threads(args.threads):
                    m.add(f"peak@{b}", matmul_peak(device, repeats=3))
                    if autocast is not None:
                        m.add("peak_autocast", matmul_peak(device, autocast, repeats=3))
                with threads(engine_threads):
                    m.add(f"engine@{b}", engine_rate(engine, b))
                    bare = bare_unet(engine, batch_of(images, b))
                    m.add(f"bare@{b}", images_per_second(bare, b, args.min_images, device))
            except (DeviceOutOfMemory, torch.OutOfMemoryError):
                batches = [x for x in batches if x < b]
                torch.cuda.empty_cache()
        with threads(args.threads):
            naive_s = sum(timed(lambda i=i: naive_features(i), device) for i in naive_images)
        m.add("naive", len(naive_images) / naive_s)
        with threads(engine_threads):
            for b in (1, batches[-1]):  # the engine again right after the naive peer, for the ratio
                m.add(f"engine_next_to_naive@{b}", engine_rate(engine, b))
        for name, (variant, n_threads) in variants.items():
            with threads(n_threads):
                for b in args.variant_batches:
                    m.add(f"{name}@{b}", engine_rate(variant, b))
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    # Same maths? Both in float32 (reduced precision is precision_check.py's subject).
    naive_feats = np.stack([naive_features(image, None) for image in naive_images])
    shipped_runtime = engine.model.runtime
    if autocast is not None:
        engine.model.runtime = TorchRuntime(engine.model.unet, None, device)
    fast_feats = np.stack([s.features for s in engine.image_stats(naive_images)])
    engine.model.runtime = shipped_runtime

    rows = []
    for b in batches:
        ips = m.median(f"engine@{b}")
        rows.append({
            "batch": b,
            "images_per_s": ips,
            "ms_per_image": 1e3 / ips,
            "bare_unet_images_per_s": m.median(f"bare@{b}"),
            "engine_over_bare": m.ratio(f"engine@{b}", f"bare@{b}"),
            "gflops": ips * flops["per_image"] / 1e9,
            "pct_of_peak": 100 * m.ratio(f"engine@{b}", f"peak@{b}") * flops["per_image"] / 1e9,
            "peak_gflops": m.median(f"peak@{b}"),
            "rounds": m.values[f"engine@{b}"],
        })  # fmt: skip
    shipped = next(iter(variants), "")
    variant_rows = [
        {"variant": name, "warmup_s": warmup_s[name],
         **{f"batch_{b}": m.median(f"{name}@{b}") for b in args.variant_batches},
         **{f"vs_shipped_{b}": m.ratio(f"{name}@{b}", f"{shipped}@{b}") for b in args.variant_batches},
         "rounds": {str(b): m.values[f"{name}@{b}"] for b in args.variant_batches}}
        for name in variants
    ]  # fmt: skip
    best = max(rows, key=lambda r: r["images_per_s"])
    peaks = [v for k, vs in m.values.items() if k.startswith("peak@") for v in vs]
    return {
        "machine": machine_info(device),
        "load_average_after": os.getloadavg(),
        "model": engine.info.model_id,
        "parameters": engine.info.parameters,
        "sample_size": engine.info.sample_size,
        "method": options.method,
        "steps": args.steps,
        "device": str(device),
        "dtype": engine.info.dtype,
        "runtime": engine.info.runtime,
        "torch_threads": args.threads,  # the configured count (see run())
        "engine_torch_threads": engine_threads,
        "rounds": args.rounds,
        "decode_ms_per_image": decode_ms,
        "flops": flops,
        "peak_gflops": median(peaks),
        "peak_range_gflops": [min(peaks), max(peaks)],
        "peak_autocast_gflops": m.median("peak_autocast") if autocast is not None else None,
        "engine": rows,
        "best_batch": best["batch"],
        "naive": {
            "images_per_s": m.median("naive"),
            "rounds": m.values["naive"],
            "images": len(naive_images),
        },
        "speedup_vs_naive": m.ratio(f"engine_next_to_naive@{batches[-1]}", "naive"),
        "speedup_vs_naive_batch1": m.ratio("engine_next_to_naive@1", "naive"),
        "feature_check": compare_features(fast_feats, naive_feats, feature_names(options)),
        "variants": variant_rows,
        "out_of_memory_batches": [b for b in args.batch_sizes if b not in batches],
        "samples": m.values,
    }


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def print_report(r: dict[str, Any]) -> None:
    f, check = r["flops"], r["feature_check"]
    head = f"{r['model']} ({r['parameters'] / 1e6:.1f} M params, {r['sample_size']} px)"
    print(f"{head}, {r['method']} K={r['steps']}, {r['device']} {r['dtype']} ({r['runtime']}), "
          f"{r['torch_threads']} threads, {r['rounds']} rounds (medians)")  # fmt: skip
    print(f"FLOPs: {f['unet_per_eval'] / 1e9:.3f} G per UNet eval, {f['per_image'] / 1e9:.2f} G per image; "
          f"fp32 matmul peak {r['peak_gflops']:.0f} GFLOP/s; "
          f"decode {r['decode_ms_per_image']:.2f} ms/img")  # fmt: skip
    columns = ("batch", "img/s", "ms/img", "bare UNet", "eng/bare", "GFLOP/s", "% peak")
    print(" ".join(f"{c:>9}" for c in columns))
    for row in r["engine"]:
        values = (row["images_per_s"], row["ms_per_image"], row["bare_unet_images_per_s"],
                  row["engine_over_bare"], row["gflops"], row["pct_of_peak"])  # fmt: skip
        print(f"{row['batch']:>9} " + " ".join(f"{v:>9.2f}" for v in values))
    worst = max(check["max_diff_over_image_std"].values())
    print(f"naive peer: {r['naive']['images_per_s']:.2f} img/s -> engine speed-up "
          f"{r['speedup_vs_naive']:.2f}x at batch {r['engine'][-1]['batch']}, "
          f"{r['speedup_vs_naive_batch1']:.2f}x at batch 1; "
          f"same features: {check['same']} (max diff {worst:.1e} image-std)")  # fmt: skip
    if r["variants"]:
        batches = [k[6:] for k in r["variants"][0] if k.startswith("batch_")]
        print(
            f"{'variant':<28} "
            + " ".join(f"{'img/s @' + b:>11} {'ratio':>6}" for b in batches)
            + "  warm-up s"
        )
        for v in r["variants"]:
            cells = " ".join(f"{v['batch_' + b]:>11.2f} {v['vs_shipped_' + b]:>6.2f}" for b in batches)
            print(f"{v['variant']:<28} {cells}  {v['warmup_s']:>9.1f}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of PNGs (random if none)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--runtime", default="auto", help="the engine's UNet runtime (DDM_RUNTIME)")
    p.add_argument("--steps", type=int, default=10, help="K")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-images", type=int, default=16, help="images per measurement (at least a batch)")
    p.add_argument("--naive-images", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--variants", action="store_true", help="also time single changes to the engine")
    p.add_argument("--variant-batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--compile", action="store_true", help="add a torch.compile variant (slow to build)")
    p.add_argument("--compile-mode", default="default")
    p.add_argument("--quick", action="store_true", help="smoke run: batches 1 2, K=2, 1 round")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.variant_batches, args.steps = [1, 2], [2], 2
        args.rounds, args.min_images, args.naive_images = 1, 2, 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print_report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if result["feature_check"]["same"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
