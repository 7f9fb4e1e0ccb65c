"""The benchmarks run end to end on a tiny random UNet: the engine benchmark (seconds, K=2, batches 1 and
2) and the service load generator (live servers, two settings); the embedding search on synthetic caches.
No timings are asserted; benchmarks are not tests."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import REPO, make_tiny_model


def test_engine_bench_quick_run_writes_its_report(tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "tiny")
    out = tmp_path / "engine.json"
    args = ["--quick", "--model", str(model), "--images", str(tmp_path / "none"), "--threads", "1"]
    assert _load("engine_bench").main([*args, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [row["batch"] for row in report["engine"]] == [1, 2]
    assert report["feature_check"]["same"]
    assert report["flops"]["per_image"] > 2 * report["flops"]["unet_per_eval"] > 0


def _load(name: str):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.live
def test_service_load_compares_settings_in_one_run(tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "tiny")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(14):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(images / f"{i:02d}.png")
    out = tmp_path / "service.json"
    args = [
        "--serve", "--env", f"DDM_MODEL_DIR={model}", "--env", "DDM_TORCH_THREADS=1", "--env", "DDM_STEPS=2",
        "--setting", "one=DDM_MODEL_INSTANCES=1", "--setting", "two=DDM_MODEL_INSTANCES=2,DDM_RUNTIME=torch",
        "--compare", "DDM_MAX_BATCH_SIZE=1", "--engine-reference", "--engine-runs", "1x1", "1x2",
        "--engine-batch", "2", "--images", str(images), "--count", "2", "-c", "1", "2", "-n", "2",
        "--warmup", "0", "--json", str(out),
    ]  # fmt: skip
    assert _load("service_load").main(args) == 0
    report = json.loads(out.read_text())
    assert [s["name"] for s in report["settings"]] == ["one", "two"]
    for setting in report["settings"]:
        assert [lv["ok"] for lv in setting["levels"]] == [2, 2]
        assert [lv["ok"] for lv in setting["compare"]["levels"]] == [2, 2]
        assert setting["compare"]["server_env"]["DDM_MAX_BATCH_SIZE"] == "1"
        assert setting["summary"]["saturation_over_engine"] > 0
    # one engine reference per UNet runtime, each setting divided by its own runtime's
    assert sorted(report["engines"]) == ["auto", "torch"]
    for engine in report["engines"].values():
        assert [(r["threads"], r["instances"]) for r in engine["runs"]] == [(1, 1), (1, 2)]
    engines = {s["name"]: s["summary"]["engine_img_s"] for s in report["settings"]}
    assert engines == {"one": report["engines"]["auto"]["img_s"], "two": report["engines"]["torch"]["img_s"]}


def test_embedding_search_scores_every_pair_with_the_shipped_experts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On synthetic caches where ImageNet's embedding is shifted, every pair involving ImageNet separates
    (AUROC 1) while identical sets do not; the generalisation gap is reported per set."""
    search = _load("embedding_search")
    rng = np.random.default_rng(0)
    (tmp_path / "K10").mkdir()
    (tmp_path / "blocks").mkdir()
    for s in search.SETS:
        for part, n in (("fit", 40), ("held", 20)):
            amp = rng.normal(size=(n, 10, 3, 32, 32)).astype(np.float16)
            np.savez(tmp_path / "K10" / f"{s}_{part}.npz", amp=amp, eps=amp, x0=amp[:, 0])
            pool = rng.normal(size=(n, 5, 8, 4, 4)) + (4.0 if s == "imagenet" else 0.0)
            std = np.abs(rng.normal(size=(n, 5, 8)))
            np.savez(tmp_path / "blocks" / f"{s}_{part}.npz", u0_pool=pool.astype(np.float16), u0_std=std)
    args = ["search", "--cache", str(tmp_path), "--split", "held", "u0/2,4/mean:lw", "--gaps"]
    assert search.main(args) == 0
    line, gaps = capsys.readouterr().out.splitlines()
    pairs = dict(
        zip(line.split("|")[1].split()[::2], map(float, line.split("|")[1].split()[1::2]), strict=True)
    )
    assert pairs["cel>ima"] == pairs["ima>dtd"] == 1.0
    assert pairs["cel>cif"] < 0.8 and pairs["dtd>cif"] < 0.8
    assert gaps.startswith("  gaps: celeba ") and len(gaps.split()) == 11
