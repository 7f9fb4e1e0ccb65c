"""The offline CLI: calibrate -> score -> evaluate on a tiny random model and images made here."""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.cli import build_parser, main
from tests.helpers import make_tiny_model, require_data


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


COMMON = ["--device", "cpu", "--steps", "3", "--batch-size", "8"]


@pytest.fixture(scope="module")
def smooth_profile(tiny: dict[str, Path]) -> dict:
    """The 'smooth' profile of the tiny model, fitted once for the module; its summary."""
    out = io.StringIO()
    args = [
        "calibrate",
        "--model",
        str(tiny["model"]),
        *COMMON,
        "--name",
        "smooth",
        "--images",
        str(tiny["normal"]),
    ]
    with redirect_stdout(out):
        assert main(args) == 0
    return json.loads(out.getvalue().strip().splitlines()[-1])


def test_help_does_not_load_the_engine() -> None:
    """``--help`` answers without importing torch (it took 6 s when every command loaded the engine)."""
    code = (
        "import sys\n"
        "from app.cli import main\n"
        "for argv in ([], ['score'], ['calibrate'], ['evaluate'], ['serve'], ['import', 'ddim']):\n"
        "    try:\n"
        "        main([*argv, '--help'])\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, argv\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_calibrate_then_score(
    tiny: dict[str, Path], smooth_profile: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--model", str(tiny["model"]), *COMMON]
    summary = smooth_profile
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
        assert line["threshold"] == round(summary["thresholds"]["0.05"], 3)  # printed rounded
        assert line["is_anomaly"] == (line["score"] > line["threshold"])


def test_score_takes_folders_and_globs_and_writes_table_csv_and_heat_maps(
    tiny: dict[str, Path], smooth_profile: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nested = tiny["odd"].parent / "nested" / "deeper"
    nested.mkdir(parents=True, exist_ok=True)
    (nested / "x.png").write_bytes((tiny["odd"] / "000.png").read_bytes())
    common = ["score", "--model", str(tiny["model"]), *COMMON, "--profile", "smooth"]
    glob = str(tiny["normal"] / "00[0-2].png")
    assert main([*common, "--format", "table", str(tiny["odd"]), glob]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].split() == ["image", "score", "threshold", "verdict", "percentile", "p-value"]
    rows = [line.split() for line in table[2:]]
    assert len(rows) == 8 + 3  # the folder's 8 images and the glob's 3
    assert all(r[3] in ("ANOMALY", "normal") and len(r[1].split(".")[1]) == 2 for r in rows)

    maps = tmp_path / "maps"
    code = main(
        [*common, "--format", "csv", "-r", "--heatmaps", str(maps), str(tiny["odd"].parent / "nested")]
    )
    assert code == 0
    (row,) = list(csv.DictReader(capsys.readouterr().out.strip().splitlines()))
    assert row["image"] == str(nested / "x.png") and row["is_anomaly"] in ("True", "False")
    assert len(row["score"].split(".")[1]) <= 3  # rounded, not 15 decimals
    with Image.open(maps / "x.heatmap.png") as overlay:
        assert overlay.size == (24, 24)  # the image with its map over it, at the image's size

    assert (
        main([*common, "--format", "csv", str(tiny["odd"] / "no-such-*.png")]) == 1
    )  # a glob matching nothing
    assert "no-such-*.png" in capsys.readouterr().out


def test_a_missing_model_is_one_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["score", "--model", str(tmp_path / "nowhere"), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "nowhere" in err and "Traceback" not in err


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


@pytest.mark.slow
def test_score_from_another_folder_finds_the_shipped_model_and_shows_progress(tmp_path: Path) -> None:
    """A user away from the repository: ``ddm-anomaly score DIR --format table`` with no --model, stderr a
    terminal (a pseudo-terminal here) so the progress bar draws; faces normal, textures and digits not."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    for kind in ("celeba", "dtd", "mnist"):
        for path in require_data(kind, 2):
            (folder / f"{kind}-{path.name}").write_bytes(path.read_bytes())
    script = Path(sys.executable).with_name("ddm-anomaly")
    primary, secondary = pty.openpty()
    # a terminal 120 columns wide (a fresh pseudo-terminal has 0, where tqdm draws nothing)
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    try:
        done = subprocess.run(
            [str(script), "score", str(folder), "--format", "table"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=secondary,
            text=True,
            timeout=300,
        )
        os.close(secondary)
        terminal = b""
        while select.select([primary], [], [], 0.1)[0]:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # the other end closed
                break
            if not chunk:
                break
            terminal += chunk
    finally:
        os.close(primary)
    assert done.returncode == 0, terminal.decode(errors="replace")
    assert b"scoring: 100%" in terminal and b"6/6" in terminal
    verdicts = {line.split()[0]: line.split()[3] for line in done.stdout.strip().splitlines()[2:]}
    assert len(verdicts) == 6
    for image, verdict in verdicts.items():
        assert verdict == ("normal" if "celeba-" in image else "ANOMALY"), image
