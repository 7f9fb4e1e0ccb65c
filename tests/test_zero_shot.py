"""Profiles with their own features over one shared walk, the embedding expert, the choice of features from
normal images alone, and the cross-domain matrix command (docs/METHOD.md, "Features" and "Choosing
features")."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from app.cli import main as cli_main
from app.engine.calibration.choice import MAX_GAP, choose_options, generalisation_gap
from app.engine.calibration.profile import Profile, features_under
from app.engine.engine import Engine
from app.engine.methods import aggregations
from app.engine.types import ImageStats, MethodOptions
from tests.helpers import SHIPPED_MODEL, require_data

GOLDEN_IMAGES = sorted((Path(__file__).parent / "goldens" / "images").glob("*.png"))


@pytest.fixture(scope="module")
def engines() -> dict[str, Engine]:
    out = {}
    for runtime in ("torch", "onnxruntime"):
        engine = Engine(SHIPPED_MODEL, device="cpu", runtime=runtime)
        engine.load(warmup_batch=0)
        out[runtime] = engine
    return out


@pytest.fixture(scope="module")
def golden_stats(engines: dict[str, Engine]) -> dict[str, list[ImageStats]]:
    return {rt: s.image_stats([s.decode(p.read_bytes()) for p in GOLDEN_IMAGES]) for rt, s in engines.items()}


@pytest.mark.parametrize("aggregation", ["sum", "per-step", "per-step-centre"])
def test_a_profile_derives_from_one_walk_the_features_the_engine_computes_under_its_aggregation(
    engines: dict[str, Engine], golden_stats: dict[str, list[ImageStats]], aggregation: str
) -> None:
    """One walk under the default options gives every aggregation's features, equal to a walk made for it."""
    engine = engines["torch"]
    own = MethodOptions(aggregation=aggregation)  # type: ignore[arg-type]
    engine.options = own
    try:
        direct = np.stack(
            [s.features for s in engine.image_stats([engine.decode(p.read_bytes()) for p in GOLDEN_IMAGES])]
        )
    finally:
        engine.options = MethodOptions()
    # derived from the sums and grids, not read off the engine's own features (untagged)
    derived = features_under(own, [dataclasses.replace(s, aggregation=None) for s in golden_stats["torch"]])
    np.testing.assert_allclose(derived, direct, rtol=1e-5, atol=1e-5)


def test_the_embedding_comes_from_the_same_pass_on_both_runtimes(
    golden_stats: dict[str, list[ImageStats]],
) -> None:
    torch_e = np.stack([s.embeddings for s in golden_stats["torch"]])
    onnx_e = np.stack([s.embeddings for s in golden_stats["onnxruntime"]])
    assert torch_e.shape == (len(GOLDEN_IMAGES), 10, 2 * 128)  # channel means, then channel spreads
    np.testing.assert_allclose(onnx_e, torch_e, rtol=1e-3, atol=1e-4)
    # images differ in it: it describes the image, not a constant of the network
    assert np.abs(torch_e[0] - torch_e[3]).max() > 1e-2
    features = features_under(MethodOptions(aggregation="per-step-centre+embedding"), golden_stats["torch"])
    assert features.shape == (len(GOLDEN_IMAGES), 38 + 2 * 128)
    np.testing.assert_allclose(features[:, 38:166], torch_e[:, 2, :128], rtol=1e-6)  # step 0.2 K = 2
    np.testing.assert_allclose(features[:, 166:], torch_e[:, 4, :128], rtol=1e-6)  # 0.4 K = 4, means only
    options = MethodOptions(aggregation="per-step-centre+embedding+spread")
    spread = features_under(options, golden_stats["torch"])
    assert spread.shape == (len(GOLDEN_IMAGES), 38 + 2 * 256)
    np.testing.assert_allclose(spread[:, 38:294], torch_e[:, 2], rtol=1e-6)
    assert (spread[:, 38 + 128 : 294] > 0).all()  # spreads of a real image's activations
    assert aggregations.expert_blocks(options.aggregation, 10, spread.shape[1]) == [(0, 38), (38, 550)]


def test_the_embedding_is_the_spatial_mean_and_spread_of_the_first_up_blocks_output(
    engines: dict[str, Engine], golden_stats: dict[str, list[ImageStats]]
) -> None:
    """docs/METHOD.md, "Embedding expert": read by hand from the block's output at the walk's first step."""
    model = engines["torch"].model
    x0 = torch.stack([engines["torch"].decode(p.read_bytes()).tensor for p in GOLDEN_IMAGES])
    seen: list[torch.Tensor] = []
    hook = model.unet.up_blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    try:
        t = torch.tensor([int(golden_stats["torch"][0].timesteps[0])] * len(x0))
        abar = model.alphas_cumprod[t].view(-1, 1, 1, 1).float()
        noise = torch.from_numpy(np.random.default_rng(0).standard_normal(x0.shape).astype(np.float32))
        with torch.inference_mode():
            model.unet(abar.sqrt() * x0 + (1 - abar).sqrt() * noise, t)
    finally:
        hook.remove()
    (out,) = seen
    assert out.shape[1:] == (128, 8, 8)
    # the runtime's own hook gives each channel's mean over the image, then its standard deviation
    _, embedding = model.runtime.predict(abar.sqrt() * x0 + (1 - abar).sqrt() * noise, t)
    assert embedding is not None
    np.testing.assert_allclose(embedding[:, :128], out.mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)
    by_hand = (out - out.mean(dim=(2, 3), keepdim=True)).pow(2).mean(dim=(2, 3)).sqrt()
    np.testing.assert_allclose(embedding[:, 128:], by_hand, rtol=1e-4, atol=1e-6)


def test_a_profile_of_the_earlier_embedding_is_refused_and_others_still_load() -> None:
    from app.engine.calibration.fit import fit_profile
    from app.errors import ProfileMismatch

    rng = np.random.default_rng(0)
    plain = fit_profile("p", rng.normal(size=(40, 4)), model_id="m@1", options=MethodOptions()).to_dict()
    assert Profile.from_dict({**plain, "format_version": 4}).name == "p"
    earlier = {
        **plain,
        "format_version": 4,
        "options": {**plain["options"], "aggregation": "per-step-centre+embedding"},
    }
    with pytest.raises(ProfileMismatch, match="earlier UNet embedding"):
        Profile.from_dict(earlier)


def test_choice_on_few_textures_keeps_the_energies_and_records_why(engines: dict[str, Engine]) -> None:
    """30 textures do not support a density over 256 or 512 embedding values (their gaps are over the
    limit): the energies are taken. (200 textures take the embedding expert: tests/test_zero_shot_live.py.)"""
    engine = engines["onnxruntime"]
    stats = engine.image_stats([engine.decode(p.read_bytes()) for p in require_data("dtd", 30)])
    choice = choose_options(MethodOptions(), stats)
    assert choice.options.aggregation == "per-step-centre"
    assert choice.options.walk_key() == MethodOptions().walk_key()
    assert list(choice.gaps) == [
        "per-step-centre+embedding+spread",
        "per-step-centre+embedding",
        "per-step-centre",
    ]
    richest, richer = (
        choice.gaps["per-step-centre+embedding+spread"],
        choice.gaps["per-step-centre+embedding"],
    )
    taken = choice.gaps["per-step-centre"]
    assert richest is not None and richest > MAX_GAP
    assert richer is not None and richer > MAX_GAP
    assert taken is not None and taken <= MAX_GAP


def test_choice_falls_back_when_the_richer_density_does_not_generalise(
    golden_stats: dict[str, list[ImageStats]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A candidate with far more values than the images can support overfits them: its gap is large and the
    next candidate is taken."""
    stats = golden_stats["torch"] * 3  # 18 images

    draws = iter(range(10**6))  # each image its own 120 values of noise

    def noise(bank: aggregations.PathBank) -> torch.Tensor:
        return torch.from_numpy(np.random.default_rng(next(draws)).normal(size=(len(bank.step_sums), 120)))

    monkeypatch.setitem(aggregations.AGGREGATIONS, "noise-test", noise)
    overfit = MethodOptions(aggregation="noise-test")  # type: ignore[arg-type]
    assert generalisation_gap(overfit, features_under(overfit, stats))[0] > MAX_GAP
    choice = choose_options(MethodOptions(), stats, candidates=("noise-test", "per-step-centre"))
    assert choice.options.aggregation == "per-step-centre"
    assert choice.gaps["noise-test"] > MAX_GAP  # type: ignore[operator]


def test_profiles_of_one_walk_load_whatever_their_features(tmp_path: Path) -> None:
    shipped = json.loads((SHIPPED_MODEL / "profiles" / "default.json").read_text())
    assert shipped["options"]["aggregation"] == "per-step-centre"
    profile = Profile.from_dict(shipped)
    assert profile.selection is None  # format 2: fitted before features were chosen
    assert Profile.from_dict(profile.to_dict()).to_dict() == profile.to_dict()


def test_the_matrix_command_fits_every_set_as_normal_and_scores_the_others(tmp_path: Path) -> None:
    sets = {name: require_data(name, 24)[0].parent for name in ("celeba", "mnist", "dtd")}
    out = tmp_path / "matrix.json"
    argv = ["evaluate", "--matrix", *(f"{n}={d}" for n, d in sets.items()), "--fit-limit", "12",
            "--limit", "6", "--aggregation", "per-step-centre", "--exclude-from-mean", "mnist",
            "--json", str(out)]  # fmt: skip
    assert cli_main(argv) == 0
    report = json.loads(out.read_text())
    assert list(report["rows"]) == ["celeba", "mnist", "dtd"]
    celeba = report["rows"]["celeba"]
    assert celeba["n_fit"] == 12 and celeba["n_normal"] == 6
    assert set(celeba["scored"]) == {"mnist", "dtd"}
    assert celeba["scored"]["mnist"]["auroc"] > 0.9  # digits are nothing like faces
    assert report["summary"]["pairs"] == 6 and report["summary"]["pairs_without"] == 2
    assert out.with_suffix(".png").stat().st_size > 1000


def test_every_aggregation_a_profile_may_name_is_computed_and_no_other() -> None:
    """The wire schemas and settings accept the names in calibration/limits.py; each must be computable."""
    from typing import get_args

    from app.engine.calibration.limits import PROFILE_AGGREGATIONS, Aggregation

    assert set(get_args(Aggregation)) == set(aggregations.AGGREGATIONS)
    assert ("auto", *get_args(Aggregation)) == PROFILE_AGGREGATIONS
