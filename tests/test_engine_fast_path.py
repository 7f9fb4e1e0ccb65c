"""The engine's speed paths compute the same numbers as the straightforward ones they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pytorch_msssim.ssim import _fspecial_gauss_1d, gaussian_filter

from app.engine.model.loading import ModelLoadError, cpu_has_native_bf16, resolve_dtype
from app.engine.ssim import WINDOW, blur, ssim_map, ssim_reference


def _pad_and_convolve(t: torch.Tensor, mode: str) -> torch.Tensor:
    pad = WINDOW // 2
    window = _fspecial_gauss_1d(WINDOW, 1.5).repeat(t.shape[1], 1, 1, 1)
    return gaussian_filter(F.pad(t, (pad, pad, pad, pad), mode=mode), window)


@pytest.mark.parametrize(("shape", "mode"), [((2, 3, 32, 32), "reflect"), ((1, 2, 16, 24), "reflect"),
                                             ((1, 3, 4, 7), "replicate")])  # fmt: skip
def test_matrix_blur_equals_padded_gaussian_convolution(shape: tuple[int, ...], mode: str) -> None:
    t = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(blur(t), _pad_and_convolve(t, mode), atol=1e-6)


def test_large_images_take_the_convolution_path() -> None:
    t = torch.randn(1, 1, 300, 260, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(blur(t), _pad_and_convolve(t, "reflect"), atol=1e-6)


def test_a_reused_reference_gives_the_same_map() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(3, 3, 32, 32, generator=gen) * 2 - 1
    y = (x + 0.2 * torch.randn(3, 3, 32, 32, generator=gen)).clamp(-1, 1)
    assert torch.equal(ssim_map(ssim_reference(x), y), ssim_map(x, y))


def test_cpu_precision_is_float32_unless_bf16_is_asked_for_and_native() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == (torch.float32, None)
    if cpu_has_native_bf16():
        assert resolve_dtype("bfloat16", cpu) == (torch.float32, torch.bfloat16)
    else:
        with pytest.raises(ModelLoadError, match="native bf16"):
            resolve_dtype("bfloat16", cpu)
    with pytest.raises(ModelLoadError, match="only supported on CUDA"):
        resolve_dtype("float16", cpu)
