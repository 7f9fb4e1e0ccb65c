"""What every checkpoint importer shares: reading a checkpoint safely, checking a converted state dict against
the diffusers model it must fill, and writing the model folder atomically.

A conversion is a list of :class:`Rule` s, one per source parameter: where it goes in the diffusers
``UNet2DModel`` and how it is reshaped. Every source key must be used by exactly one rule and every diffusers
parameter filled, with the shapes the flags imply; otherwise the import stops with an error that names the
keys, before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from app.engine.model.sidecar import ModelSidecar


class CheckpointImportError(ValueError):
    """The checkpoint, its flags or its config cannot be turned into a model folder (the message says why)."""


def load_checkpoint(path: str | Path) -> Any:
    """``torch.load(weights_only=True, map_location="cpu")``: no pickled code runs; GPU-saved files load."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointImportError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for garbage, foreign pickles and truncated zips
        raise CheckpointImportError(
            f"{path}: not a PyTorch checkpoint that loads with weights_only=True ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensor_dict(obj: Any, what: str) -> dict[str, torch.Tensor]:
    """``obj`` as {name: float32 tensor}, or an error saying what it is instead."""
    if not isinstance(obj, Mapping):
        raise CheckpointImportError(f"{what} is a {type(obj).__name__}, not a state dict (name -> tensor)")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointImportError(f"{what} is not a state dict: entries {bad[:5]} are not named tensors")
    if not obj:
        raise CheckpointImportError(f"{what} is an empty state dict")
    # nn.Parameter values (improved-diffusion saves its EMA parameters) become plain float32 tensors
    return {k: v.detach().to(torch.float32) for k, v in obj.items()}


# ---------------------------------------------------------------------------------------------- conversion


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _squeeze_1x1(t: torch.Tensor) -> torch.Tensor:
    """A 1x1 Conv1d/Conv2d weight (out, in, 1[, 1]) as a Linear weight (out, in)."""
    return t.reshape(t.shape[0], t.shape[1])


@dataclass(frozen=True)
class Rule:
    """Source key -> diffusers key; ``transform`` turns the source tensor into the target tensor and
    ``source_shape`` says which source shape a target shape implies (to name a mismatch in source terms)."""

    source: str
    target: str
    transform: Callable[[torch.Tensor], torch.Tensor] = _same
    source_shape: Callable[[tuple[int, ...]], tuple[int, ...]] = tuple


# (source key, its shape, function of the whole source state dict -> the target tensors it gives)
ExtraRule = tuple[str, tuple[int, ...], Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]]


def copy_rules(
    source_prefix: str, target_prefix: str, names: tuple[str, ...] = ("weight", "bias")
) -> list[Rule]:
    return [Rule(f"{source_prefix}.{n}", f"{target_prefix}.{n}") for n in names]


def linear_from_1x1(source_prefix: str, target_prefix: str, dims: int) -> list[Rule]:
    """A 1x1 convolution (Conv1d: dims=1, Conv2d: dims=2) that diffusers holds as a Linear."""
    return [
        Rule(
            f"{source_prefix}.weight",
            f"{target_prefix}.weight",
            _squeeze_1x1,
            lambda shape: (*shape, *([1] * dims)),
        ),
        Rule(f"{source_prefix}.bias", f"{target_prefix}.bias"),
    ]


def apply_rules(
    source: dict[str, torch.Tensor],
    rules: list[Rule],
    expected: Mapping[str, torch.Size | tuple[int, ...]],
    what: str,
    extra_rules: list[ExtraRule] | None = None,
) -> dict[str, torch.Tensor]:
    """Convert ``source`` by ``rules`` (plus ``extra_rules``: source key with its shape -> function giving
    several targets, e.g. a fused qkv) into the diffusers state dict whose keys/shapes are ``expected``; any
    missing, unused or mis-shaped key is an error naming it."""
    extra_rules = extra_rules or []
    problems = _source_problems(source, rules, expected, extra_rules)
    if problems:
        raise CheckpointImportError(
            f"{what} does not match the architecture its flags/config describe: " + "; ".join(problems)
        )
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        out[rule.target] = rule.transform(source[rule.source])
    for _key, _shape, fn in extra_rules:
        out.update(fn(source))
    not_filled = sorted(set(expected) - set(out))
    surplus = sorted(set(out) - set(expected))
    wrong = [
        f"{k}: {list(out[k].shape)} vs {list(expected[k])}"
        for k in out
        if k in expected and tuple(out[k].shape) != tuple(expected[k])
    ]
    if not_filled or surplus or wrong:  # a converter bug or an architecture the rules do not cover
        raise CheckpointImportError(
            f"{what}: conversion incomplete: unfilled {_few(not_filled)}, surplus {_few(surplus)}, "
            f"mismatched {wrong[:5]}"
        )
    return {k: v.contiguous() for k, v in out.items()}


def _source_problems(
    source: dict[str, torch.Tensor],
    rules: list[Rule],
    expected: Mapping[str, torch.Size | tuple[int, ...]],
    extra_rules: list[ExtraRule],
) -> list[str]:
    """What keeps ``source`` from filling ``expected`` by the rules: missing, unexpected, mis-shaped keys."""
    wanted = [r.source for r in rules] + [k for k, _, _ in extra_rules]
    missing = [k for k in wanted if k not in source]
    unused = sorted(set(source) - set(wanted))
    problems = []
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if unused:
        problems.append(f"unexpected keys {_few(unused)}")
    shape_errors = []
    for rule in rules:
        if rule.source in source and rule.target in expected:
            want = tuple(rule.source_shape(tuple(expected[rule.target])))
            got = tuple(source[rule.source].shape)
            if got != want:
                shape_errors.append(
                    f"{rule.source}: {list(got)} in the checkpoint, {list(want)} from the config"
                )
    for key, want_shape, _ in extra_rules:
        if key in source and tuple(source[key].shape) != tuple(want_shape):
            got = tuple(source[key].shape)
            shape_errors.append(f"{key}: {list(got)} in the checkpoint, {list(want_shape)} from the config")
    if shape_errors:
        problems.append(
            "shape mismatch " + "; ".join(shape_errors[:5]) + (" ..." if len(shape_errors) > 5 else "")
        )
    return problems


def _few(keys: list[str], n: int = 8) -> str:
    return str(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def build_unet(config: dict[str, Any], state_dict: dict[str, torch.Tensor] | None = None):
    """A diffusers ``UNet2DModel`` from ``config``; with ``state_dict`` loaded strictly (no random init is
    computed: the module is built on the meta device and the tensors assigned)."""
    from diffusers import UNet2DModel

    try:
        with torch.device("meta"):
            unet = UNet2DModel(**config)
    except Exception as exc:  # diffusers asserts on impossible configs
        raise CheckpointImportError(f"diffusers cannot build this UNet2DModel: {exc}") from exc
    if state_dict is not None:
        unet.load_state_dict(state_dict, strict=True, assign=True)
        unet.eval()
    return unet


def expected_shapes(config: dict[str, Any]) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in build_unet(config).state_dict().items()}


def parameter_count(config: dict[str, Any]) -> int:
    return sum(p.numel() for p in build_unet(config).parameters())


# ---------------------------------------------------------------------------------------------- writing


def write_model_folder(
    out_dir: str | Path,
    unet,
    scheduler,
    sidecar: ModelSidecar,
    card: str,
    *,
    overwrite: bool = False,
    verify: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``unet/`` (safetensors), ``scheduler/``, ``README.md`` and ``ddm_anomaly.json`` into a temporary
    folder beside ``out_dir``, run ``verify`` on it, and only then rename it to ``out_dir``: a failed import
    leaves ``out_dir`` as it was."""
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CheckpointImportError(f"{out_dir} exists and is not empty (pass --overwrite to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.importing-", dir=out_dir.parent))
    try:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        scheduler.save_pretrained(tmp / "scheduler")
        (tmp / "README.md").write_text(card)
        sidecar.write(tmp)
        if verify is not None:
            verify(tmp)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.replaced-", dir=out_dir.parent))
            os.replace(out_dir, old / "old")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def model_card(title: str, lines: list[str], config: Mapping[str, Any], licence: str) -> str:
    """README.md of an imported folder: where it came from, how it is called, the licence caveat."""
    body = "\n".join(lines)
    return (
        f"# {title}\n\n{body}\n\n## Licence\n\n{licence}\n\n"
        f"## Source configuration\n\n```json\n{json.dumps(dict(config), indent=2, sort_keys=True)}\n```\n"
    )


def verify_folder(folder: Path) -> None:
    """The written folder loads through the project's own loader (what every command and the service do)."""
    from app.engine.model.loading import ModelLoadError, load_model

    try:
        load_model(folder, device="cpu", dtype="float32", runtime="torch")
    except ModelLoadError as exc:
        raise CheckpointImportError(f"the written folder does not load: {exc}") from exc
