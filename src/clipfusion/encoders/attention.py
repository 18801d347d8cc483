"""Cross-attention capture in the Stable Diffusion UNet: which ``attn2`` layers exist, and a processor
that records their attention probabilities while computing exactly what diffusers' plain processor does.
"""
from __future__ import annotations

import math
import re
import threading
from collections.abc import Sequence

import torch
from diffusers import UNet2DConditionModel

from clipfusion.errors import SettingError

_LAYER = re.compile(r"^(down_blocks|up_blocks|mid_block)(?:\.(\d+))?\.attentions\.(\d+)\..*attn2$")
_PLACE_RANK = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


class CaptureState(threading.local):
    """Shared by the processors of one encoder: which token columns to keep, the maps captured so far.

    Per thread: model replicas in one process share one encoder and its UNet (the weights load once) and
    run it at the same time from their own threads; each thread captures into its own maps."""

    def __init__(self) -> None:
        self.token_indices: list[int] | None = None
        self.maps: dict[str, torch.Tensor] = {}
        self.active = False


class CrossAttnCaptureProcessor:
    """diffusers' plain attention maths for one ``attn2`` layer, with its probabilities captured.

    Output is the same as diffusers' ``AttnProcessor`` (and, to float rounding, ``AttnProcessor2_0``).
    While capturing, stores (batch, queries, T) = mean over heads of the probabilities of the
    selected token columns, in float32.
    """

    def __init__(self, name: str, state: CaptureState) -> None:
        self.name = name
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(attn.head_to_batch_dim(query), key, attention_mask)  # (B·heads, Q, K)
        if self.state.active:
            per_head = probs.view(batch, attn.heads, probs.shape[1], probs.shape[2])
            selected = per_head if self.state.token_indices is None else per_head[..., self.state.token_indices]
            self.state.maps[self.name] = selected.mean(dim=1, dtype=torch.float32)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def layer_order(name: str) -> tuple[int, int, float]:
    """Execution order of a UNet module: down blocks, then mid, then up blocks, then attentions within."""
    parts = name.split(".")
    rank = _PLACE_RANK[parts[0]]
    block = int(parts[1]) if parts[0] != "mid_block" else 0
    inner = float(parts[parts.index("attentions") + 1]) if "attentions" in parts else math.inf
    return rank, block, inner


def cross_attention_layers(unet: UNet2DConditionModel) -> dict[str, tuple[str, int]]:
    """{attn2 module name: (place, downsampling factor relative to the latent)} in execution order."""
    n_down, n_up = len(unet.down_blocks), len(unet.up_blocks)
    layers = {}
    for key in unet.attn_processors:
        name = key.removesuffix(".processor")
        match = _LAYER.match(name)
        if not match:
            continue
        place, block = match.group(1), int(match.group(2) or 0)
        exponent = {"down_blocks": block, "mid_block": n_down - 1, "up_blocks": n_up - 1 - block}[place]
        layers[name] = (place.split("_")[0], 2**exponent)
    return dict(sorted(layers.items(), key=lambda item: layer_order(item[0])))


def select_cross_attention_layers(
    unet: UNet2DConditionModel, factors: Sequence[int], places: Sequence[str]
) -> list[str]:
    chosen = [name for name, (place, factor) in cross_attention_layers(unet).items()
              if factor in factors and place in places]
    if not chosen:
        raise SettingError(f"no cross-attention layer at factors {list(factors)} in places {list(places)}")
    return chosen
