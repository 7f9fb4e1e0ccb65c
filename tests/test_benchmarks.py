"""The engine benchmark runs end to end (seconds: tiny random UNet, K=2, batches 1 and 2). No timings are
asserted; benchmarks are not tests."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tests.helpers import REPO, make_tiny_model


def _load_bench():
    spec = importlib.util.spec_from_file_location("engine_bench", REPO / "benchmarks" / "engine_bench.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_engine_bench_quick_run_writes_its_report(tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "tiny")
    out = tmp_path / "engine.json"
    args = ["--quick", "--model", str(model), "--images", str(tmp_path / "none"), "--threads", "1"]
    assert _load_bench().main([*args, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [row["batch"] for row in report["engine"]] == [1, 2]
    assert report["feature_check"]["same"]
    assert report["flops"]["per_image"] > 2 * report["flops"]["unet_per_eval"] > 0
