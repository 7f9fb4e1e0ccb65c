"""The UNet runtimes (app/engine/model/runtimes.py) on the shipped model: the exported ones compute what torch
computes, are safe under concurrent model instances, and refuse what they cannot do with a clear error."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from app.engine.engine import Engine
from app.engine.model.loading import ModelLoadError, load_model
from app.engine.model.runtimes import RuntimeUnavailable, build_runtime
from tests.helpers import require_data

pytestmark = pytest.mark.slow

MODEL = Path(__file__).resolve().parent.parent / "model_store" / "celeba32-ref"
# Features are log energies; float32 reassociation in another runtime moves them by ~1e-4 (measured
# 6e-5). A wrong graph (missing timestep embedding, wrong layout) moves them by ~1.
FLOAT32_TOL = 2e-3


def images(folder: str, count: int, start: int = 0) -> list[bytes]:
    return [p.read_bytes() for p in require_data(folder, count, start)]


def features(engine: Engine, blobs: list[bytes]) -> np.ndarray:
    return np.stack([s.features for s in engine.image_stats([engine.decode(b) for b in blobs])])


@pytest.fixture(scope="module")
def torch_features() -> np.ndarray:
    engine = Engine(MODEL, device="cpu", dtype="float32", runtime="torch")
    engine.load(warmup_batch=0)
    return features(engine, images("celeba", 4) + images("cifar10", 4))


def test_onnxruntime_computes_what_torch_computes(torch_features: np.ndarray) -> None:
    runtime = "onnxruntime"
    engine = Engine(MODEL, device="cpu", dtype="float32", runtime=runtime)
    engine.load(warmup_batch=0)
    assert engine.info.runtime == runtime and engine.info.dtype == "float32"
    # the export traced the loaded module without touching it: the torch UNet keeps its CPU layout
    assert engine.model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    got = features(engine, images("celeba", 4) + images("cifar10", 4))
    np.testing.assert_allclose(got, torch_features, atol=FLOAT32_TOL)
    # batch-size independence: the exported graph has a dynamic batch dimension
    single = features(engine, images("cifar10", 1))
    np.testing.assert_allclose(single[0], torch_features[4], atol=FLOAT32_TOL)


def test_concurrent_instances_get_their_own_results() -> None:
    """Two threads computing different batches at once (model instances) on one session each get their
    own answer (a runtime sharing an output buffer between calls would hand one thread the other's eps)."""
    engine = Engine(MODEL, device="cpu", dtype="float32", runtime="onnxruntime", torch_threads=1)
    engine.load(warmup_batch=0)
    batches = [images("celeba", 6), images("mnist", 6)]
    expected = [features(engine, b) for b in batches]
    results: dict[int, list[np.ndarray]] = {0: [], 1: []}
    start = threading.Barrier(2, timeout=120)

    def work(i: int) -> None:
        start.wait()
        for _ in range(3):
            results[i].append(features(engine, batches[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i in (0, 1):
        assert len(results[i]) == 3
        for got in results[i]:
            np.testing.assert_allclose(got, expected[i], atol=1e-6)


def test_refusals_are_clear() -> None:
    unet = load_model(MODEL, device="cpu", dtype="float32").unet
    with pytest.raises(RuntimeUnavailable, match="float32 only"):
        build_runtime("onnxruntime", unet, torch.device("cpu"), torch.bfloat16)
    with pytest.raises(RuntimeUnavailable, match="CPU only"):
        build_runtime("onnxruntime", unet, torch.device("cuda"), None)
    with pytest.raises(RuntimeUnavailable, match="unknown runtime"):
        build_runtime("tensorrt", unet, torch.device("cpu"), None)


def test_auto_falls_back_to_torch_when_the_runtime_is_missing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    with caplog.at_level("WARNING"):
        model = load_model(MODEL, device="cpu", dtype="float32", runtime="auto")
    assert model.runtime.name == "torch" and model.info.runtime == "torch"
    assert "onnxruntime is not installed" in caplog.text
    with pytest.raises(ModelLoadError, match="onnxruntime is not installed"):
        load_model(MODEL, device="cpu", dtype="float32", runtime="onnxruntime")  # asked for: no fallback


def test_auto_is_torch_on_cuda_and_for_bf16() -> None:
    unet = load_model(MODEL, device="cpu", dtype="float32").unet
    assert build_runtime("auto", unet, torch.device("cuda"), torch.bfloat16).name == "torch"
    assert build_runtime("auto", unet, torch.device("cpu"), torch.bfloat16).name == "torch"  # bf16 autocast
