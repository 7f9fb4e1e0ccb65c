"""``ddm-anomaly import``: original-format checkpoints become model folders that compute what the original
code computes.

The fixtures in ``../shared/checkpoints`` (NOTES.md there) are tiny random-init checkpoints saved exactly as
improved-diffusion (DiffPath) and ermongroup/ddim save theirs, with outputs of the *original* code, the real
CelebA configs with every state-dict key/shape, and a table of wrong conversion choices with how far each
moves the output. Locally the tests skip without them; in CI (CI=true) they fail.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from app.cli import main
from app.engine.model.importers import ddim
from app.engine.model.importers import improved_diffusion as idf
from app.engine.model.importers.common import CheckpointImportError, build_unet, parameter_count
from app.engine.model.loading import load_model
from app.engine.model.runtimes import TorchRuntime
from app.engine.model.sidecar import read_sidecar
from tests.helpers import REPO, missing

CHECKPOINTS = Path(os.environ.get("DDM_TEST_CHECKPOINTS", REPO.parent / "shared" / "checkpoints"))
ID = CHECKPOINTS / "improved-diffusion"
DD = CHECKPOINTS / "ddim-celeba64"
HQ = CHECKPOINTS / "diffusers-ddpm-celebahq-256"
TOL = 1e-4  # docs/MODELS.md: max |diff| against the original code's outputs
RUNTIMES = ("torch", "onnxruntime")


def fixture(path: Path) -> Path:
    if not path.exists():
        missing(f"checkpoint fixture {path} not present")
    return path


def load_json(path: Path) -> Any:
    return json.loads(fixture(path).read_text())


def reference(path: Path) -> dict[str, Any]:
    return torch.load(fixture(path), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def id_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("import") / "id-tiny"
    flags = idf.read_flags(fixture(ID / "tiny_flags.json"))
    return idf.import_checkpoint(fixture(ID / "tiny.pt"), flags, out)


@pytest.fixture(scope="module")
def ddim_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("import") / "ddim-tiny"
    return ddim.import_checkpoint(fixture(DD / "tiny.pth"), ddim.read_config(fixture(DD / "tiny.yml")), out)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# ------------------------------------------------------------------------------ tiny models vs the original


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_improved_diffusion_tiny_reproduces_the_original(id_folder: Path, runtime: str) -> None:
    ref = reference(ID / "tiny_reference.pt")
    model = load_model(id_folder, device="cpu", dtype="float32", runtime=runtime)
    assert model.info.parameters == load_json(ID / "tiny.json")["param_count"] == 1_679_782
    # the runtime gets schedule indices [0, 999, 2000, 3999] and must call the network at t * 1000/4000
    assert torch.equal(ref["t_model"], ref["t_index"].float() * 0.25)
    with torch.no_grad():
        eps = model.runtime(ref["x"].contiguous(), ref["t_index"].long())
    assert eps.shape == (4, 3, 32, 32)  # learned sigma: the first 3 of 6 channels
    for i in range(len(ref["t_index"])):  # every reference timestep
        assert max_diff(eps[i], ref["out"][i, :3]) <= TOL, f"t={int(ref['t_index'][i])}"
    with torch.no_grad():  # and the whole 6-channel output of the network at the model times
        full = model.unet(ref["x"], ref["t_model"]).sample
    assert max_diff(full, ref["out"]) <= TOL


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_ddim_tiny_reproduces_the_original_ema_model(ddim_folder: Path, runtime: str) -> None:
    ref = reference(DD / "tiny_reference.pt")
    model = load_model(ddim_folder, device="cpu", dtype="float32", runtime=runtime)
    assert model.info.parameters == load_json(DD / "tiny.json")["param_count"] == 702_499
    with torch.no_grad():
        eps = model.runtime(ref["x"].contiguous(), ref["t_index"].long())
    for i in range(len(ref["t_index"])):
        assert max_diff(eps[i], ref["out_ema"][i]) <= TOL, f"t={int(ref['t_index'][i])}"
    assert max_diff(eps, ref["out_raw"]) > 0.5  # the EMA weights, not states[0]


def test_schedules_are_the_originals(id_folder: Path, ddim_folder: Path) -> None:
    ref = reference(ID / "tiny_reference.pt")
    model = load_model(id_folder, device="cpu", dtype="float32", runtime="torch")
    # improved-diffusion: float64 numpy cosine (0.999 cap) and its float64 cumprod, bit for bit
    assert model.alphas_cumprod64 is not None and model.alphas_cumprod64.dtype == torch.float64
    assert torch.equal(model.alphas_cumprod64, ref["alphas_cumprod_4000_cosine"].double())
    assert torch.equal(model.alphas_cumprod, ref["alphas_cumprod_4000_cosine"].float())
    betas = json.loads((id_folder / "scheduler" / "scheduler_config.json").read_text())["trained_betas"]
    # get_named_beta_schedule's betas; the reference holds SpacedDiffusion's 1 - abar_t/abar_t-1, which
    # differ by an ulp of 1 (1 - ratio rounds there) and give the same abar above
    torch.testing.assert_close(torch.tensor(betas, dtype=torch.float64), ref["betas_4000_cosine"].double(),
                               rtol=0, atol=2.3e-16)  # fmt: skip
    assert max(betas) == 0.999 and betas.count(0.999) == 1  # only the last beta hits the cap
    # ddim: the runner's float32 betas and float32 cumprod, bit for bit
    dref = reference(DD / "tiny_reference.pt")
    dmodel = load_model(ddim_folder, device="cpu", dtype="float32", runtime="torch")
    assert torch.equal(dmodel.alphas_cumprod, dref["alphas_cumprod_float32_as_runner"].float())


def test_sidecars_record_the_calling_convention(id_folder: Path, ddim_folder: Path) -> None:
    s = read_sidecar(id_folder)
    assert s.timestep_scale == 0.25 and s.epsilon_channels == 3 and s.alphas_cumprod_float64
    assert s.source["format"] == "improved-diffusion" and len(s.source["checkpoint_sha256"]) == 64
    assert s.input_transform.kind == "center_square_resize"  # no preset: a generic improved-diffusion model
    d = read_sidecar(ddim_folder)
    assert d.timestep_scale == 1.0 and d.epsilon_channels is None and d.source["weights"] == "ema"
    # DDIM's CelebA crop: Crop(x1=57, x2=185, y1=25, y2=153) -> F.crop(top 57, left 25, 128, 128), Resize
    t = d.input_transform
    assert (t.kind, t.left, t.top, t.crop, t.interpolation) == ("box_crop_resize", 25, 57, 128, "bilinear")
    # DiffPath's CelebA preset: CenterCrop(140), Resize(32) bilinear
    p = idf.PRESETS["diffpath-celeba32"]["input_transform"]
    assert (p.kind, p.crop, p.interpolation) == ("center_crop_resize", 140, "bilinear")
    assert "non-commercial" in (ddim_folder / "README.md").read_text()


# ------------------------------------------------------------------------------ the real CelebA models


def meta_state(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


def test_diffpath_celeba32_config_maps_the_real_state_dict_one_to_one() -> None:
    real = load_json(ID / "celeba32-diffpath.json")
    flags = idf.preset_flags("diffpath-celeba32")
    # the preset is DiffPath's flags (timestep_respacing is evaluation-only, recorded as is)
    assert {k: flags[k] for k in real["flags"]} == real["flags"]
    config = idf.unet_config(flags)
    assert config == load_json(ID / "diffusers_equivalent.json")["celeba32_config"]
    assert parameter_count(config) == real["param_count"] == 52_546_438
    shapes = load_json(ID / "celeba32-diffpath.state_dict_shapes.json")
    assert len(shapes) == real["state_dict_keys"] == 446
    converted = idf.convert_state_dict(meta_state(shapes), flags)  # every key used, every shape checked
    assert len(converted) == 506
    build_unet(config, converted)  # strict load
    assert idf.timestep_scale(flags) == 0.25 and idf.attention_heads(flags) == {}


def test_ddim_celeba64_config_maps_the_real_state_dicts_one_to_one() -> None:
    real = load_json(DD / "celeba64.json")
    config = ddim.unet_config(real["config"])
    assert config == load_json(DD / "diffusers_equivalent.json")["celeba64_config"]
    assert parameter_count(config) == real["param_count"] == 78_700_803
    shapes = load_json(DD / "celeba64.state_dict_shapes.json")
    raw, ema = (meta_state(s) for s in shapes.values())
    assert all(k.startswith("module.") for k in raw) and not any(k.startswith("module.") for k in ema)
    weights, which = ddim.network_weights([raw, {}, 0, 1, ema], real["config"])
    assert which == "ema" and weights.keys() == ema.keys()
    converted = ddim.convert_state_dict(weights, real["config"])
    assert len(converted) == 390
    build_unet(config, converted)


def test_celebahq256_config_builds_the_published_parameter_count() -> None:
    config = {k: v for k, v in load_json(HQ / "config.json").items() if not k.startswith("_")}
    assert parameter_count(config) == load_json(HQ / "derived.json")["param_count"] == 113_673_219


# ------------------------------------------------------------------------------ every wrong choice fails


def tiny_outputs(config: dict, state: dict, x: torch.Tensor, t: torch.Tensor, scale: float, eps: int | None):
    try:
        unet = build_unet(config, {k: v.clone() for k, v in state.items()})
    except RuntimeError as exc:  # load_state_dict refuses the wrong config: also a caught mistake
        return exc
    with torch.no_grad():
        return TorchRuntime(unet, None, torch.device("cpu"), timestep_scale=scale, epsilon_channels=eps)(x, t)


def with_config(**change: Any) -> Callable[[dict], dict]:
    return lambda setup: {**setup, "config": {**setup["config"], **change}}


def id_setup() -> dict[str, Any]:
    flags = idf.read_flags(fixture(ID / "tiny_flags.json"))
    source = idf.tensor_dict(torch.load(fixture(ID / "tiny.pt"), weights_only=True), "tiny.pt")
    return {
        "config": idf.unet_config(flags),
        "state": idf.convert_state_dict(source, flags),
        "scale": 0.25,
        "eps": 3,
        "flags": flags,
        "source": source,
    }


ID_WRONG: dict[str, Callable[[dict], dict]] = {
    "flip_sin_to_cos=False": with_config(flip_sin_to_cos=False),
    "freq_shift=1": with_config(freq_shift=1),
    "attn_norm_num_groups=None": with_config(attn_norm_num_groups=None),
    "resnet_time_scale_shift=default": with_config(resnet_time_scale_shift="default"),
    "downsample_padding=0": with_config(downsample_padding=0),
    "norm_eps=1e-6": with_config(norm_eps=1e-6),
    "qkv split as [q|k|v] thirds": lambda s: {
        **s,
        "state": idf.convert_state_dict(s["source"], {**s["flags"], "use_new_attention_order": True}),
    },
    "timesteps passed as 0..3999 indices": lambda s: {**s, "scale": 1.0},
}


def ddim_setup() -> dict[str, Any]:
    config = ddim.read_config(fixture(DD / "tiny.yml"))
    states = torch.load(fixture(DD / "tiny.pth"), weights_only=True)
    weights, _ = ddim.network_weights(states, config)
    raw = {k.removeprefix("module."): v.float() for k, v in states[0].items()}
    return {
        "config": ddim.unet_config(config),
        "state": ddim.convert_state_dict(weights, config),
        "scale": 1.0,
        "eps": None,
        "raw": ddim.convert_state_dict(raw, config),
    }


DDIM_WRONG: dict[str, Callable[[dict], dict]] = {
    "flip_sin_to_cos=True": with_config(flip_sin_to_cos=True),
    "freq_shift=0": with_config(freq_shift=0),
    "downsample_padding=1": with_config(downsample_padding=1),
    "norm_eps=1e-5": with_config(norm_eps=1e-5),
    "states[0] (raw) instead of states[-1] (EMA)": lambda s: {**s, "state": s["raw"]},
    "timesteps multiplied by 0.25": lambda s: {**s, "scale": 0.25},
}


def which_mistake(listed: str, table: dict[str, Callable]) -> Callable[[dict], dict]:
    matches = [fn for name, fn in table.items() if listed.startswith(name)]
    assert len(matches) == 1, f"no test for the listed conversion mistake {listed!r}"
    return matches[0]


@pytest.mark.parametrize(
    "family, setup, table, ref_file, out_key",
    [
        ("improved-diffusion", id_setup, ID_WRONG, "tiny_reference.pt", "out"),
        ("ddim", ddim_setup, DDIM_WRONG, "tiny_reference.pt", "out_ema"),
    ],
)
def test_each_listed_conversion_mistake_would_fail(
    family: str, setup: Callable, table: dict, ref_file: str, out_key: str
) -> None:
    folder = ID if family == "improved-diffusion" else DD
    listed = load_json(folder / "diffusers_equivalent.json")["wrong_choices_max_abs_diff"]
    ref = reference(folder / ref_file)
    want = ref[out_key][:, :3]
    x, t = ref["x"].contiguous(), ref["t_index"].long()
    right = setup()
    # the config itself is the verified one (this also pins choices that move the tiny output only a little,
    # like norm_eps: 1.2e-4 on the ddim model)
    assert right["config"] == load_json(folder / "diffusers_equivalent.json")["tiny_config"]
    good = tiny_outputs(right["config"], right["state"], x, t, right["scale"], right["eps"])
    assert isinstance(good, torch.Tensor) and max_diff(good, want) <= TOL
    moved = {}
    for name in listed:
        wrong = which_mistake(name, table)(right)
        out = tiny_outputs(wrong["config"], wrong["state"], x, t, wrong["scale"], wrong["eps"])
        moved[name] = "load fails" if isinstance(out, Exception) else max_diff(out, want)
        if isinstance(out, torch.Tensor):  # the reference test above would fail with this choice
            assert moved[name] > TOL, f"{family}: {name} moves the output by only {moved[name]:.2e}"


# ------------------------------------------------------------------------------ the command and its errors


def test_cli_imports_improved_diffusion(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model"
    code = main(
        ["import", "improved-diffusion", str(fixture(ID / "tiny.pt")), "--flags", str(ID / "tiny_flags.json"),
         "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["model"] == str(out.absolute()) and answer["sidecar"]["timestep_scale"] == 0.25
    assert {p.name for p in out.iterdir()} == {"unet", "scheduler", "README.md", "ddm_anomaly.json"}
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left behind


def test_cli_imports_ddim(tmp_path: Path) -> None:
    out = tmp_path / "model"
    code = main(
        ["import", "ddim", str(fixture(DD / "tiny.pth")), "--config", str(DD / "tiny.yml"), "--out", str(out)]
    )
    assert code == 0 and read_sidecar(out).source["format"] == "ddim"


class NotAllowed:  # a pickled object of this class must never be unpickled by the importer
    pass


def _garbage(tmp: Path) -> Path:
    path = tmp / "not-a-checkpoint.pt"
    path.write_bytes(b"this is not a checkpoint" * 100)
    return path


def _pickled_object(tmp: Path) -> Path:
    path = tmp / "object.pt"
    torch.save({"model": NotAllowed()}, path)
    return path


def _missing_key(tmp: Path) -> Path:
    state = torch.load(fixture(ID / "tiny.pt"), weights_only=True)
    del state["middle_block.1.qkv.weight"]
    path = tmp / "missing.pt"
    torch.save(state, path)
    return path


def _flags(tmp: Path, **change: Any) -> Path:
    flags = {**json.loads(fixture(ID / "tiny_flags.json").read_text()), **change}
    path = tmp / "flags.json"
    path.write_text(json.dumps(flags))
    return path


def _ddim_without_ema(tmp: Path) -> Path:
    states = torch.load(fixture(DD / "tiny.pth"), weights_only=True)
    path = tmp / "no-ema.pth"
    torch.save(states[:4], path)
    return path


ERROR_CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "not a checkpoint": (
        lambda tmp: ["improved-diffusion", str(_garbage(tmp)), "--flags", str(ID / "tiny_flags.json")],
        "not a PyTorch checkpoint",
    ),
    "pickled code": (
        lambda tmp: ["improved-diffusion", str(_pickled_object(tmp)), "--flags", str(ID / "tiny_flags.json")],
        "weights_only",
    ),
    "missing key": (
        lambda tmp: ["improved-diffusion", str(_missing_key(tmp)), "--flags", str(ID / "tiny_flags.json")],
        "missing keys ['middle_block.1.qkv.weight']",
    ),
    "shape mismatch": (  # learn_sigma off: 3 output channels where the file has 6
        lambda tmp: [
            "improved-diffusion",
            str(ID / "tiny.pt"),
            "--flags",
            str(_flags(tmp, learn_sigma=False)),
        ],
        "shape mismatch out.2.weight: [6, 32, 3, 3] in the checkpoint, [3, 32, 3, 3]",
    ),
    "wrong architecture": (  # the real model's preset against the tiny file
        lambda tmp: ["improved-diffusion", str(ID / "tiny.pt"), "--preset", "diffpath-celeba32"],
        "does not match the architecture",
    ),
    "unknown flag": (
        lambda tmp: ["improved-diffusion", str(ID / "tiny.pt"), "--flags", str(_flags(tmp, use_flash=True))],
        "unknown improved-diffusion flags ['use_flash']",
    ),
    "wrong flag type": (
        lambda tmp: [
            "improved-diffusion",
            str(ID / "tiny.pt"),
            "--flags",
            str(_flags(tmp, num_channels="32")),
        ],
        "flag num_channels='32'",
    ),
    "wrong format": (
        lambda tmp: ["ddim", str(ID / "tiny.pt"), "--config", str(DD / "tiny.yml")],
        "not an ermongroup/ddim runner checkpoint",
    ),
    "ema missing": (
        lambda tmp: ["ddim", str(_ddim_without_ema(tmp)), "--config", str(DD / "tiny.yml")],
        "no EMA state dict at states[-1]",
    ),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_bad_inputs_fail_clearly_and_write_nothing(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fixture(ID / "tiny.pt")
    fixture(DD / "tiny.pth")
    make_args, message = ERROR_CASES[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    out_parent = tmp_path / "models"
    out_parent.mkdir()
    out = out_parent / "model"
    code = main(["import", *make_args(inputs), "--out", str(out)])
    err = capsys.readouterr().err
    assert code != 0
    assert message in err, err
    assert not out.exists() and list(out_parent.iterdir()) == []  # nothing at --out, no temporary folder


def test_existing_out_is_kept_unless_overwrite(tmp_path: Path, id_folder: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    flags = idf.read_flags(fixture(ID / "tiny_flags.json"))
    with pytest.raises(CheckpointImportError, match="exists and is not empty"):
        idf.import_checkpoint(ID / "tiny.pt", flags, out)
    assert (out / "keep.txt").read_text() == "mine"
    idf.import_checkpoint(ID / "tiny.pt", flags, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "ddm_anomaly.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_plain_diffusers_folder_is_called_as_before(tmp_path: Path) -> None:
    """No sidecar: integer timesteps and every output channel, exactly today's call."""
    from tests.helpers import make_tiny_model

    folder = make_tiny_model(tmp_path / "plain")
    model = load_model(folder, device="cpu", dtype="float32", runtime="torch")
    assert model.sidecar == read_sidecar(folder) and model.sidecar.timestep_scale == 1.0
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 57])
    with torch.no_grad():
        assert torch.equal(model.runtime(x, t), model.unet(x, t).sample.float().contiguous())
    assert torch.equal(model.alphas_cumprod64.float(), model.alphas_cumprod)


def test_learned_sigma_folder_without_sidecar_is_refused(tmp_path: Path, id_folder: Path) -> None:
    import shutil

    from app.engine.model.loading import ModelLoadError

    copy_dir = tmp_path / "copy"
    shutil.copytree(id_folder, copy_dir)
    (copy_dir / "ddm_anomaly.json").unlink()
    with pytest.raises(ModelLoadError, match="answers 6"):
        load_model(copy_dir, device="cpu", dtype="float32", runtime="torch")


def test_flags_refused_with_reasons() -> None:
    base = copy.deepcopy(idf.read_flags(fixture(ID / "tiny_flags.json")))
    for change, why in [
        ({"class_cond": True}, "class-conditional"),
        ({"predict_xstart": True}, "predicts x0"),
        ({"image_size": 48}, "no default channel_mult"),
        ({"attention_resolutions": "5"}, "do not divide"),
        ({"noise_schedule": "sqrt"}, "noise_schedule"),
    ]:
        with pytest.raises(CheckpointImportError, match=why):
            idf.unet_config({**base, **change}) and idf.betas({**base, **change})


def test_sidecar_attention_heads_give_layers_their_own_head_count(tmp_path: Path, id_folder: Path) -> None:
    """The tiny model with a config head size of 64 (one head per layer) plus the sidecar's per-layer head
    count 4 is the original network again; without the sidecar entry it is not."""
    import shutil

    ref = reference(ID / "tiny_reference.pt")
    folder = tmp_path / "heads"
    shutil.copytree(id_folder, folder)
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "attention_head_dim": 64}))
    sidecar = json.loads((folder / "ddm_anomaly.json").read_text())
    layers = ["down_blocks.1.attentions.0", "down_blocks.2.attentions.0", "mid_block.attentions.0"] + [
        f"up_blocks.{u}.attentions.{j}" for u in (1, 2) for j in (0, 1)
    ]
    x, t = ref["x"].contiguous(), ref["t_index"].long()
    outputs = {}
    for name, heads in (("one head", {}), ("four heads", dict.fromkeys(layers, 4))):
        (folder / "ddm_anomaly.json").write_text(json.dumps({**sidecar, "attention_heads": heads}))
        for runtime in RUNTIMES:
            model = load_model(folder, device="cpu", dtype="float32", runtime=runtime)
            with torch.no_grad():
                outputs[name, runtime] = max_diff(model.runtime(x, t), ref["out"][:, :3])
    assert outputs["four heads", "torch"] <= TOL and outputs["four heads", "onnxruntime"] <= TOL
    assert outputs["one head", "torch"] > 10 * TOL


def test_fixed_head_count_across_widths_needs_per_layer_heads() -> None:
    """OpenAI's ImageNet-64 flags (DiffPath's imagenet_model_config.yaml): 4 heads at 384 and 512 channels."""
    flags = {"image_size": 64, "num_channels": 128, "num_res_blocks": 3, "learn_sigma": True,
             "diffusion_steps": 4000, "noise_schedule": "cosine", "dropout": 0.0}  # fmt: skip
    config = idf.unet_config(flags)
    assert config["attention_head_dim"] == 128  # divides 384 and 512: the projections keep their shapes
    assert parameter_count(config) == 121_063_942  # the original UNetModel's count (checkpoints/NOTES.md)
    heads = idf.attention_heads(flags)
    # 384 channels in 4 heads of 96 where the config alone would give 3 heads of 128; 512 = 4 x 128 needs none
    assert heads == {"down_blocks.2.attentions.0": 4, "down_blocks.2.attentions.1": 4,
                     "down_blocks.2.attentions.2": 4, "up_blocks.1.attentions.0": 4,
                     "up_blocks.1.attentions.1": 4, "up_blocks.1.attentions.2": 4,
                     "up_blocks.1.attentions.3": 4}  # fmt: skip
