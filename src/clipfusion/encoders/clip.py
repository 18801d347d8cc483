"""CLIP (OpenCLIP) image and text encoding, with patch tokens and a dense text-aligned embedding."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clipfusion.config import ClipConfig, RuntimeConfig
from clipfusion.encoders.loading import OpenClipParts, load_open_clip
from clipfusion.encoders.text_cache import cached_text_embeddings
from clipfusion.errors import SettingError
from clipfusion.geometry import window_indices
from clipfusion.resampling import normalised_pixels


def state_probability(embeddings: torch.Tensor, prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    """(..., D) normalised embeddings, (2, D) [normal, anomalous] prototypes → (...) P(anomalous).

    The two-way softmax of cosine similarities at ``temperature`` (CLIP's 0.07 = logit scale 100).
    """
    logits = embeddings.float() @ prototypes.T.float() / temperature
    return logits.softmax(dim=-1)[..., 1]


def encode_tokens(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """(N, L) token ids → (N, D) text embeddings: open_clip's ``CLIP.encode_text``, run only on the columns up
    to the last end token.

    The text tower is causal and pools at each prompt's end token (``argmax``: the highest id), so the
    padding columns after it change nothing it returns, but they are most of its work: a prompt of the
    state ensembles is under 20 of the 77 columns.  Encoding ``fast``'s ensembles took 19 s of a 36-s cold
    start before (2-core AVX2 EPYC; ``benchmarks/text_encoder.py``).  A tower that is not causal or pools
    otherwise runs open_clip's own call on every column.
    """
    import open_clip

    mask = getattr(model, "attn_mask", None)
    if (not isinstance(model, open_clip.CLIP) or getattr(model, "text_pool_type", None) != "argmax" or mask is None
            or not torch.equal(torch.isinf(mask), torch.ones_like(mask, dtype=torch.bool).triu(1))):
        return model.encode_text(tokens)
    ends = tokens.argmax(dim=-1)
    used = int(ends.max()) + 1
    cast_dtype = model.transformer.get_cast_dtype()
    hidden = model.token_embedding(tokens[:, :used]).to(cast_dtype) + model.positional_embedding[:used].to(cast_dtype)
    hidden = model.ln_final(model.transformer(hidden, attn_mask=mask[:used, :used]))
    pooled = hidden[torch.arange(len(tokens), device=tokens.device), ends]
    projection = model.text_projection
    if projection is None:
        return pooled
    return projection(pooled) if isinstance(projection, torch.nn.Linear) else pooled @ projection


@dataclass
class ClipImageOutput:
    """What one pass of the image tower gives.

    global_embedding: (B, D) L2-normalised, exactly open_clip's ``encode_image`` direction.
    patch_tokens: {block index: (B, h*w, C)} raw outputs of the requested blocks (no CLS token).
    dense_embedding: (B, h*w, D) L2-normalised, text-aligned patch embeddings (value–value
    attention in the last block), or None when not requested.
    """

    global_embedding: torch.Tensor
    patch_tokens: dict[int, torch.Tensor]
    dense_embedding: torch.Tensor | None


class ClipEncoder:
    """An open_clip CLIP model, read the way PatchCLIP needs it.

    Images are resized (bicubic, whole image, no centre crop: anomaly maps must align with the
    masks) to the model's input size and normalised with its mean/std.
    """

    def __init__(self, parts: OpenClipParts) -> None:
        self.model = parts.model
        self.tokenizer = parts.tokenizer
        self.model_id = parts.model_id
        self.visual = self.model.visual  # open_clip's VisionTransformer
        visual = self.visual
        height, width = visual.image_size
        self.image_size = (int(height), int(width))
        rows, cols = visual.grid_size
        self.grid_size = (int(rows), int(cols))
        self.num_blocks = len(visual.transformer.resblocks)
        param = next(self.model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.mean, self.std = tuple(parts.mean), tuple(parts.std)
        self._text_cache: dict[tuple[str, ...], torch.Tensor] = {}

    @classmethod
    def from_config(cls, config: ClipConfig, runtime: RuntimeConfig | None = None,
                    device: str | torch.device | None = None) -> ClipEncoder:
        return cls(load_open_clip(config, runtime or RuntimeConfig(), device=device))

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(H, W, 3) uint8 images → (B, 3, S, S) normalised tensor on the model's device."""
        pixels = normalised_pixels(list(images), self.image_size, self.mean, self.std)
        return torch.from_numpy(pixels).to(device=self.device, dtype=self.dtype)

    def _block_index(self, block: int) -> int:
        index = block if block >= 0 else self.num_blocks + block
        if not 0 <= index < self.num_blocks:
            raise SettingError(f"block {block} out of range for a {self.num_blocks}-block vision tower")
        return index

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor, blocks: Sequence[int] = (), dense: bool = True) -> ClipImageOutput:
        """One pass of the vision tower over ``pixels`` (B, 3, S, S) from :meth:`preprocess`.

        blocks: indices of the blocks whose patch tokens to return (negative counts from the end).
        dense: also compute the dense text-aligned embedding of the last block.
        """
        visual = self.visual
        wanted = {b: self._block_index(b) for b in blocks}
        before_last = self.num_blocks - 2
        take = sorted(set(wanted.values()) | ({before_last} if dense else set())) or [self.num_blocks - 1]
        out = visual.forward_intermediates(pixels, indices=take, output_fmt="NLC", output_extra_tokens=True)
        by_index = dict(zip(take, out["image_intermediates"], strict=True))
        prefix = dict(zip(take, out["image_intermediates_prefix"], strict=True))
        dense_embedding = None
        if dense:
            sequence = torch.cat([prefix[before_last], by_index[before_last]], dim=1)
            dense_embedding = self._value_value_last_block(sequence)[:, 1:]
        return ClipImageOutput(
            global_embedding=F.normalize(out["image_features"].float(), dim=-1),
            patch_tokens={b: by_index[i].float() for b, i in wanted.items()},
            dense_embedding=dense_embedding,
        )

    def _value_value_last_block(self, sequence: torch.Tensor) -> torch.Tensor:
        """Dense embeddings (B, L, D) from the last block's input (B, L, C), value–value attention.

        The last block's attention is recomputed with values as queries and keys (each token
        attends to tokens with similar values rather than to the class token), without the
        residual and MLP branches, then ``ln_post`` and the projection are applied: a training-free
        dense read-out in the CLIP-Surgery / ClearCLIP family, run beside the normal path so the
        global embedding is untouched.  Reconstruction choice, see docs/method.md.
        """
        visual = self.visual
        block = visual.transformer.resblocks[-1]
        attention = block.attn
        if not isinstance(attention, torch.nn.MultiheadAttention):
            raise NotImplementedError(f"dense mode 'vv' needs nn.MultiheadAttention, not {type(attention).__name__}")
        batch, length, width = sequence.shape
        heads = attention.num_heads
        weight, bias = attention.in_proj_weight, attention.in_proj_bias
        values = F.linear(block.ln_1(sequence), weight[2 * width:], None if bias is None else bias[2 * width:])
        values = values.view(batch, length, heads, width // heads).transpose(1, 2)  # (B, heads, L, d)
        mixed = F.scaled_dot_product_attention(values, values, values)
        mixed = attention.out_proj(mixed.transpose(1, 2).reshape(batch, length, width))
        return self.final_patch_tokens(mixed, project=True)

    def final_patch_tokens(self, tokens: torch.Tensor, project: bool = False) -> torch.Tensor:
        """(B, N, C) raw patch tokens of the last block → ``ln_post`` applied (B, N, C), or, with
        ``project``, also the projection into the joint text–image space, L2-normalised (B, N, D)."""
        visual = self.visual
        # encode_image hands its tokens back in float32; the tower may run in half precision
        normed = visual.ln_post(tokens.to(visual.ln_post.weight.dtype))
        if not project:
            return normed.float()
        return F.normalize((normed @ visual.proj if visual.proj is not None else normed).float(), dim=-1)

    @torch.inference_mode()
    def window_embeddings(self, pixels: torch.Tensor, scales: Sequence[int]) -> dict[int, torch.Tensor]:
        """{scale: (B, W, D)} normalised class-token embeddings of every scale×scale window of patches."""
        embeddings = self.token_embeddings(pixels)
        return {scale: self.encode_token_subsets(embeddings, window_indices(self.grid_size, scale))
                for scale in scales}

    @torch.inference_mode()
    def token_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) → (B, 1 + h*w, C): class token and patch embeddings with positions, after ln_pre.

        The vision tower's input sequence, rebuilt from its public modules so that subsets of it
        (WinCLIP windows) can be run through the transformer.
        """
        visual = self.visual
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            raise NotImplementedError("window embeddings need a ViT pooled by its class token")
        patches = visual.conv1(pixels).flatten(2).transpose(1, 2)  # (B, h*w, C), row-major
        cls = visual.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        sequence = torch.cat([cls, patches], dim=1) + visual.positional_embedding.to(patches.dtype)
        return visual.ln_pre(sequence)  # per-token, so it commutes with taking subsets

    @torch.inference_mode()
    def encode_token_subsets(self, embeddings: torch.Tensor, subsets: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        """Class-token embedding of the image seen through each subset of its patches (WinCLIP windows).

        embeddings: (B, 1 + N, C) from :meth:`token_embeddings`; subsets: (W, k) patch indices.
        Returns (B, W, D), L2-normalised: for each window, the transformer runs on the class token
        plus those k patch tokens only.
        """
        visual = self.visual
        batch, n_windows = embeddings.shape[0], subsets.shape[0]
        index = torch.cat([torch.zeros(n_windows, 1, dtype=torch.long), subsets.long() + 1], dim=1)
        sequences = embeddings[:, index.to(embeddings.device)].flatten(0, 1)  # (B*W, 1 + k, C)
        pooled = []
        for start in range(0, sequences.shape[0], chunk):
            out = visual.transformer(sequences[start:start + chunk])
            pooled.append(visual.ln_post(out[:, 0]) @ visual.proj)
        return F.normalize(torch.cat(pooled).float(), dim=-1).view(batch, n_windows, -1)

    @torch.inference_mode()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """(N, D) L2-normalised text embeddings, cached per prompt list for the encoder's lifetime, and on disk
        per model and machine (:mod:`clipfusion.encoders.text_cache`)."""
        key = tuple(prompts)
        if key not in self._text_cache:
            tokens = self.tokenizer(list(prompts)).to(self.device)
            embeddings = cached_text_embeddings(self.model, tokens, lambda: encode_tokens(self.model, tokens))
            self._text_cache[key] = F.normalize(embeddings.float(), dim=-1)
        return self._text_cache[key]

    def encode_prompt_ensembles(self, ensembles: Sequence[Sequence[str]]) -> torch.Tensor:
        """(S, D): per state, the normalised mean of its normalised prompt embeddings."""
        return torch.stack([F.normalize(self.encode_text(prompts).mean(dim=0), dim=-1) for prompts in ensembles])
