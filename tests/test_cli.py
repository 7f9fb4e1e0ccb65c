"""The offline CLI: calibrate -> score -> evaluate on a tiny random model and images made here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.cli import build_parser, main
from tests.helpers import make_tiny_model


def write_images(folder: Path, n: int, kind: str, seed: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        if kind == "smooth":  # gradients + mild noise: the "normal" domain
            x = np.linspace(0, 1, 24)
            base = np.outer(x, x)[..., None] * rng.uniform(0.5, 1.0, 3) * 255
            arr = np.clip(base + rng.normal(0, 4, base.shape), 0, 255)
        else:  # salt-and-pepper noise
            arr = rng.integers(0, 2, (24, 24, 3)) * 255.0
        Image.fromarray(arr.astype(np.uint8)).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    return {
        "model": make_tiny_model(root / "model"),
        "normal": write_images(root / "normal", 24, "smooth", 0),
        "odd": write_images(root / "odd", 8, "noise", 1),
    }


def test_every_command_explains_itself(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert {"serve", "score", "calibrate", "evaluate", "train", "sample"} <= set(commands)
    for name in ("score", "calibrate", "evaluate"):
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert len(capsys.readouterr().out) > 400


def test_calibrate_then_score(tiny: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--model", str(tiny["model"]), "--device", "cpu", "--steps", "3", "--batch-size", "8"]
    assert main(["calibrate", *common, "--name", "smooth", "--images", str(tiny["normal"])]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["name"] == "smooth" and summary["n_reference"] == 24
    assert Path(summary["profile"]).is_file()

    odd = sorted(tiny["odd"].glob("*.png"))[:2]
    missing = tiny["odd"] / "missing.png"
    code = main(["score", *common, "--profile", "smooth", *map(str, odd), str(missing)])
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert code == 1  # one unreadable file
    errors = [line for line in lines if "error" in line]
    scored = [line for line in lines if "score" in line]
    assert len(errors) == 1 and len(scored) == 2
    for line in scored:
        assert set(line) >= {"score", "threshold", "is_anomaly", "percentile", "p_value"}
        # a random tiny model has learnt nothing: only the plumbing is under test here
        assert line["threshold"] == summary["thresholds"]["0.05"]
        assert line["is_anomaly"] == (line["score"] > line["threshold"])


def test_evaluate_writes_table_json_and_plots(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval" / "result.json"
    args = ["evaluate", "--model", str(tiny["model"]), "--device", "cpu", "--steps", "3"]
    args += ["--id", str(tiny["normal"]), "--ood", f"noise={tiny['odd']}", "--limit", "8", "--json", str(out)]
    args += ["--methods", "diffpath-v2", "diffpath-6d"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "AUROC" in table and "noise" in table
    report = json.loads(out.read_text())
    assert {r["method"] for r in report["results"]} == {"diffpath-v2", "diffpath-6d"}
    for r in report["results"]:
        assert set(r) >= {"method", "id", "ood", "auroc", "aupr", "fpr95", "n_id", "n_ood"}
        assert r["n_id"] == 8 and r["n_ood"] == 8 and 0.0 <= r["auroc"] <= 1.0
    assert (tmp_path / "eval" / "result_roc.png").stat().st_size > 1000
    assert (tmp_path / "eval" / "result_hist.png").stat().st_size > 1000


def test_flags_come_from_the_settings_vocabulary() -> None:
    """serve's and the model commands' flags are generated from Settings: the same choices, and a flag
    given on the command line lands in the same field as its DDM_* variable."""
    import argparse
    import typing

    from app.commands import serve
    from app.commands.common import ENGINE_FLAGS, add_engine_args, settings_from_args
    from app.settings import Settings

    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", "--trajectory", "diffpath", "--runtime", "torch", "--port", "0"])
    settings = serve.settings_from_args(args)
    assert settings is not None
    assert (settings.trajectory, settings.runtime, settings.port) == ("diffpath", "torch", 0)
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--runtime", "tensorrt"])
    engine = argparse.ArgumentParser()
    add_engine_args(engine)
    actions = {a.dest: a for a in engine._actions}
    for name in ENGINE_FLAGS:
        annotation = Settings.model_fields[name].annotation
        if typing.get_origin(annotation) is typing.Literal:
            assert tuple(actions[name].choices) == typing.get_args(annotation), name
    assert settings_from_args(engine.parse_args(["--method", "diffpath-6d", "--steps", "4"])).steps == 4
