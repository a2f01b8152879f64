"""`BagelStage`: the MoT language model, or a contiguous range of its layers, with the adapters
that range needs.

The first stage embeds segments (token embeddings, ViT embeddings, latent tokens through
`vae2llm` + timestep embedding + 2-D position table); every stage runs its layers; the last stage
owns the final per-expert norms and the heads (`lm_head` for text logits, `llm2vae` for
velocities). Parameter names equal the checkpoint's, so loading a stage is a key filter.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import BagelConfig
from .kernels import EAGER, Kernels
from .kv_cache import KVCache
from .layers import PositionTable, RMSNorm, TimestepEmbedder, grid_position_ids, rope_cos_sin
from .mot import MoTDecoderLayer
from .segments import PackedLayout, Segment, SegmentKind, to_device
from .stage import StageSpec


class _Body(nn.Module):
    """Holds `embed_tokens`, `layers.{i}`, `norm`, `norm_moe_gen` (names of `language_model.model`)."""


class _LanguageModel(nn.Module):
    """Holds `model` and `lm_head` (names of `language_model`)."""


class BagelStage(nn.Module):
    def __init__(self, config: BagelConfig, stage: StageSpec, kernels: Kernels = EAGER):
        """`kernels`: what its layers run (kernels.py), chosen for the stage's device."""
        super().__init__()
        llm = config.llm
        if stage.layers.start < 0 or stage.layers.stop > llm.num_hidden_layers or len(stage.layers) == 0:
            raise ValueError(f"{stage} does not fit a model of {llm.num_hidden_layers} layers")
        self.config, self.stage, self.kernels = config, stage, kernels
        self.language_model = _LanguageModel()
        body = self.language_model.model = _Body()
        body.layers = nn.ModuleDict({str(i): MoTDecoderLayer(llm, i, kernels) for i in stage.layers})
        if stage.is_first:
            body.embed_tokens = nn.Embedding(llm.vocab_size, llm.hidden_size)
            self.time_embedder = TimestepEmbedder(llm.hidden_size, config.timestep_freq_size)
            self.vae2llm = nn.Linear(config.patch_latent_dim, llm.hidden_size)
            self.latent_pos_embed = PositionTable(config.max_latent_size, llm.hidden_size)
        if stage.is_last:
            body.norm = RMSNorm(llm.hidden_size, llm.rms_norm_eps, kernels)
            body.norm_moe_gen = RMSNorm(llm.hidden_size, llm.rms_norm_eps, kernels)
            self.language_model.lm_head = nn.Linear(llm.hidden_size, llm.vocab_size, bias=False)
            self.llm2vae = nn.Linear(llm.hidden_size, config.patch_latent_dim)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def embed(self, segments: list[Segment], vision_start_id: int, vision_end_id: int) -> Tensor:
        """Input embeddings [T, hidden] of the packed segments (first stage only)."""
        embed_tokens = self.language_model.model.embed_tokens
        device = self.device
        markers = embed_tokens(to_device(torch.tensor([vision_start_id, vision_end_id]), device))
        parts = []
        for seg in segments:
            if seg.kind is SegmentKind.TEXT:
                parts.append(embed_tokens(to_device(seg.token_ids, device)))
                continue
            if seg.kind is SegmentKind.VIT:
                inner = to_device(seg.embeds, device).to(self.dtype)
            else:
                inner = self.embed_latents(seg.latents, seg.grid, seg.t)
            parts += [markers[:1], inner, markers[1:]]
        return torch.cat(parts)

    def embed_latents(self, latents: Tensor, grid: tuple[int, int], t: float) -> Tensor:
        """vae2llm(latent tokens) + timestep embedding + 2-D latent position embedding."""
        device = self.device
        temb = self.time_embedder(to_device(torch.tensor([t]), device))
        pos = self.latent_pos_embed(grid_position_ids(*grid, self.config.max_latent_size, device))
        return self.vae2llm(to_device(latents, device).to(self.dtype)) + temb + pos

    def forward(self, hidden: Tensor, layout: PackedLayout, cache: KVCache) -> Tensor:
        """Run this stage's layers over the packed hidden states; updates `cache` as the
        segments say."""
        llm = self.config.llm
        cos, sin = rope_cos_sin(layout.positions, llm.head_dim, llm.rope_theta, hidden.dtype)
        hidden = hidden.clone()  # the layers update the residual stream in place
        for layer in self.language_model.model.layers.values():
            hidden = layer(hidden, layout, cos, sin, cache)
        return hidden

    def heads(self, hidden: Tensor, layout: PackedLayout) -> list[Tensor | None]:
        """Per segment (last stage only): last-token logits [vocab] of text segments that want
        them, velocities [h*w, patch_latent_dim] of noise segments, None otherwise."""
        body = self.language_model.model
        outputs: list[Tensor | None] = []
        for i, seg in enumerate(layout.segments):
            rows = layout.rows(i)
            if seg.kind is SegmentKind.TEXT and seg.want_logits:
                last = hidden[rows.stop - 1: rows.stop]
                outputs.append(self.language_model.lm_head(body.norm(last))[0])
            elif seg.kind is SegmentKind.NOISE:
                inner = seg.image_rows(rows.start)
                latent = hidden[inner.start:inner.stop]
                outputs.append(self.llm2vae(body.norm_moe_gen(latent)))
            else:
                outputs.append(None)
        return outputs
