"""Torch's thread count is process policy: set once by the entry point (app/bootstrap.py), never by the
engine while it loads a model."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from app.bootstrap import apply_thread_policy
from app.cli import main
from app.engine.engine import Engine
from app.settings import Settings
from tests.helpers import make_tiny_model


@pytest.fixture(autouse=True)
def restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_loading_a_model_leaves_torch_threads_alone(model: Path, runtime: str) -> None:
    torch.set_num_threads(3)
    engine = Engine(model, device="cpu", runtime=runtime, torch_threads=2)
    engine.load(warmup_batch=1)
    assert engine.info.runtime == runtime
    assert torch.get_num_threads() == 3


@pytest.mark.parametrize(
    ("runtime", "threads", "expected"),
    [("torch", 3, 3), ("onnxruntime", 3, 1), ("auto", 3, 1), ("torch", None, 2), ("auto", None, 1)],
)
def test_the_policy_gives_torch_one_thread_beside_onnxruntime(
    runtime: str, threads: int | None, expected: int
) -> None:
    torch.set_num_threads(2)  # "torch's choice" for the rows without a count
    settings = Settings(device="cpu", dtype="float32", runtime=runtime, torch_threads=threads)
    assert apply_thread_policy(settings) == expected == torch.get_num_threads()


class Loaded(Exception):
    """Stops a command where it would load the model: what was set up before it is the start path."""


def test_the_scoring_commands_set_the_policy_before_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    import app.commands.score as score

    seen: list[int] = []

    def load_engine(settings: Settings, *_: object, **__: object) -> None:
        seen.append(torch.get_num_threads())
        raise Loaded

    monkeypatch.setattr(score, "load_engine", load_engine)
    torch.set_num_threads(3)
    for runtime, expected in (("onnxruntime", 1), ("torch", 2)):
        with pytest.raises(Loaded):
            main(["score", "--device", "cpu", "--runtime", runtime, "--threads", "2", "x.png"])
        assert seen.pop() == expected


def test_serve_sets_the_policy_before_the_server_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.commands import serve

    seen: list[int] = []

    def run(self: object, *_: object) -> None:  # instead of uvicorn: the lifespan would load the model
        seen.append(torch.get_num_threads())

    monkeypatch.setattr(serve.DrainingServer, "run", run)
    monkeypatch.setattr(serve.signal, "signal", lambda *_: None)  # keep pytest's own handlers
    torch.set_num_threads(3)
    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--device", "cpu", "--runtime", "onnxruntime", "--torch-threads", "2"])
    serve.run(args)
    assert seen == [1]


def test_sample_sets_the_threads_it_is_given(model: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "grid.png"
    assert main(["sample", "--model", str(model), "--out", str(out), "--n", "1", "--steps", "1",
                 "--threads", "2", "--device", "cpu"]) == 0  # fmt: skip
    assert out.is_file() and torch.get_num_threads() == 2
