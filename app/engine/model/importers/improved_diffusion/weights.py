"""improved-diffusion ``UNetModel`` weights -> the diffusers state dict of the equal ``UNet2DModel``: a rule
per tensor (copied, or a 1x1 convolution as a linear layer) plus the fused ``qkv`` split per head."""

from __future__ import annotations

from typing import Any

import torch

from app.engine.model.importers.common import (
    ExtraRule,
    Rule,
    apply_rules,
    copy_rules,
    expected_shapes,
    linear_from_1x1,
)
from app.engine.model.importers.improved_diffusion.architecture import architecture, unet_config
from app.engine.model.importers.improved_diffusion.flags import resolve_flags


def _resblock(src: str, dst: str, has_skip: bool) -> list[Rule]:
    rules = (
        copy_rules(f"{src}.in_layers.0", f"{dst}.norm1")
        + copy_rules(f"{src}.in_layers.2", f"{dst}.conv1")
        + copy_rules(f"{src}.emb_layers.1", f"{dst}.time_emb_proj")
        + copy_rules(f"{src}.out_layers.0", f"{dst}.norm2")
        + copy_rules(f"{src}.out_layers.3", f"{dst}.conv2")
    )
    if has_skip:
        rules += copy_rules(f"{src}.skip_connection", f"{dst}.conv_shortcut")
    return rules


def _qkv_splitter(src: str, dst: str, channels: int, head_dim: int, legacy_order: bool):
    """The fused qkv Conv1d (3C, C, 1) -> to_q/to_k/to_v Linear (C, C); per-head order unless the model
    used guided-diffusion's new order ([q | k | v] thirds)."""
    heads = channels // head_dim

    def split(source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        w = source[f"{src}.qkv.weight"].reshape(3 * channels, channels)
        b = source[f"{src}.qkv.bias"]
        if legacy_order:
            w4 = w.reshape(heads, 3, head_dim, channels)
            b3 = b.reshape(heads, 3, head_dim)
            parts = [(w4[:, i].reshape(channels, channels), b3[:, i].reshape(channels)) for i in range(3)]
        else:
            parts = [
                (w[i * channels : (i + 1) * channels], b[i * channels : (i + 1) * channels]) for i in range(3)
            ]
        out = {}
        for name, (wi, bi) in zip(("to_q", "to_k", "to_v"), parts, strict=True):
            out[f"{dst}.{name}.weight"] = wi.clone()
            out[f"{dst}.{name}.bias"] = bi.clone()
        return out

    return split


def _attention(
    src: str, dst: str, channels: int, head_dim: int, legacy_order: bool
) -> tuple[list[Rule], list[ExtraRule]]:
    rules = copy_rules(f"{src}.norm", f"{dst}.group_norm") + linear_from_1x1(
        f"{src}.proj_out", f"{dst}.to_out.0", dims=1
    )
    split = _qkv_splitter(src, dst, channels, head_dim, legacy_order)
    extra: list[ExtraRule] = [
        (f"{src}.qkv.weight", (3 * channels, channels, 1), split),
        (f"{src}.qkv.bias", (3 * channels,), lambda s: {}),  # split together with the weight
    ]
    return rules, extra


class _Rules:
    """The conversion rules of one architecture, in the checkpoint's module order."""

    def __init__(self, arch: dict[str, Any], legacy_order: bool) -> None:
        self.arch = arch
        self.legacy_order = legacy_order
        self.rules: list[Rule] = []
        self.extra: list[ExtraRule] = []

    def resblock(self, src: str, dst: str, has_skip: bool) -> None:
        self.rules += _resblock(src, dst, has_skip)

    def copy(self, src: str, dst: str) -> None:
        self.rules += copy_rules(src, dst)

    def attention(self, src: str, dst: str, channels: int) -> None:
        heads = self.arch["attention_heads"]
        size = channels // heads[dst] if dst in heads else self.arch["head_dim"]
        r, e = _attention(src, dst, channels, size, self.legacy_order)
        self.rules += r
        self.extra += e


def convert_state_dict(source: dict[str, torch.Tensor], flags: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The improved-diffusion state dict as the diffusers state dict of ``unet_config(flags)``."""
    flags = resolve_flags(flags)
    arch = architecture(flags)
    expected = expected_shapes(unet_config(flags))
    rules = _Rules(arch, legacy_order=not flags["use_new_attention_order"])
    rules.copy("time_embed.0", "time_embedding.linear_1")
    rules.copy("time_embed.2", "time_embedding.linear_2")
    rules.copy("input_blocks.0.0", "conv_in")
    ch, skip_chans = _input_blocks(rules, arch)
    rules.resblock("middle_block.0", "mid_block.resnets.0", False)
    rules.attention("middle_block.1", "mid_block.attentions.0", ch)
    rules.resblock("middle_block.2", "mid_block.resnets.1", False)
    _output_blocks(rules, arch, ch, skip_chans)
    rules.copy("out.0", "conv_norm_out")
    rules.copy("out.2", "conv_out")
    return apply_rules(source, rules.rules, expected, "the improved-diffusion checkpoint", rules.extra)


def _input_blocks(rules: _Rules, arch: dict[str, Any]) -> tuple[int, list[int]]:
    """input_blocks: per level num_res_blocks x [ResBlock (+ attention)], then a Downsample except at the
    last; returns the channels at the bottom and those of every skip connection."""
    mult, nc, nrb = arch["channel_mult"], arch["model_channels"], arch["num_res_blocks"]
    attn_levels = set(arch["attn_levels"])
    index, ch = 1, nc
    skip_chans = [nc]
    for level, m in enumerate(mult):
        for j in range(nrb):
            out_ch = nc * m
            rules.resblock(f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{j}", ch != out_ch)
            ch = out_ch
            if level in attn_levels:
                rules.attention(f"input_blocks.{index}.1", f"down_blocks.{level}.attentions.{j}", ch)
            skip_chans.append(ch)
            index += 1
        if level != len(mult) - 1:
            rules.copy(f"input_blocks.{index}.0.op", f"down_blocks.{level}.downsamplers.0.conv")
            skip_chans.append(ch)
            index += 1
    return ch, skip_chans


def _output_blocks(rules: _Rules, arch: dict[str, Any], ch: int, skip_chans: list[int]) -> None:
    """output_blocks: levels from the lowest resolution up, num_res_blocks + 1 each; diffusers' up_blocks[0]
    is the lowest resolution too."""
    mult, nc, nrb = arch["channel_mult"], arch["model_channels"], arch["num_res_blocks"]
    attn_levels = set(arch["attn_levels"])
    index = 0
    for up, level in enumerate(reversed(range(len(mult)))):
        for j in range(nrb + 1):
            out_ch = nc * mult[level]
            in_ch = ch + skip_chans.pop()
            rules.resblock(f"output_blocks.{index}.0", f"up_blocks.{up}.resnets.{j}", in_ch != out_ch)
            ch = out_ch
            sub = 1
            if level in attn_levels:
                rules.attention(f"output_blocks.{index}.1", f"up_blocks.{up}.attentions.{j}", ch)
                sub = 2
            if level and j == nrb:
                rules.copy(f"output_blocks.{index}.{sub}.conv", f"up_blocks.{up}.upsamplers.0.conv")
            index += 1
