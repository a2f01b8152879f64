"""The Qwen2 Mixture-of-Transformers decoder layer.

Every layer holds two full parameter sets: the understanding expert (checkpoint names without
suffix) and the generation expert (`*_moe_gen`). Tokens are routed by type (latent tokens to
the generation expert, everything else to the understanding expert); attention is shared.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import attend
from .config import LLMConfig
from .kv_cache import KVCache
from . import layers
from .layers import RMSNorm, SwiGLU
from .segments import PackedLayout


class MoTAttention(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        for suffix in ("", "_moe_gen"):
            setattr(self, f"q_proj{suffix}", nn.Linear(d, cfg.num_attention_heads * hd))
            setattr(self, f"k_proj{suffix}", nn.Linear(d, cfg.num_key_value_heads * hd))
            setattr(self, f"v_proj{suffix}", nn.Linear(d, cfg.num_key_value_heads * hd))
            setattr(self, f"o_proj{suffix}", nn.Linear(cfg.num_attention_heads * hd, d, bias=False))
            setattr(self, f"q_norm{suffix}", RMSNorm(hd, cfg.rms_norm_eps))
            setattr(self, f"k_norm{suffix}", RMSNorm(hd, cfg.rms_norm_eps))

    def _qkv(self, h: Tensor, gen: bool) -> Tensor:
        s = "_moe_gen" if gen else ""
        q = getattr(self, f"q_proj{s}")(h).unflatten(-1, (self.num_heads, self.head_dim))
        k = getattr(self, f"k_proj{s}")(h).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = getattr(self, f"v_proj{s}")(h).unflatten(-1, (self.num_kv_heads, self.head_dim))
        q, k = getattr(self, f"q_norm{s}")(q), getattr(self, f"k_norm{s}")(k)
        return torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=1)

    def forward(self, h: Tensor, layout: PackedLayout, cos: Tensor, sin: Tensor,
                cache: KVCache, layer: int) -> Tensor:
        qkv = layout.route(h, lambda x: self._qkv(x, False), lambda x: self._qkv(x, True))
        q, k, v = _unpack(qkv, self.num_heads, self.num_kv_heads, self.head_dim)
        q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
        out = q.new_empty(q.shape)
        for i, seg in enumerate(layout.segments):
            rows = layout.rows(i)
            k_seg, v_seg = k[rows], v[rows]
            past = cache.get(seg.context_id, layer)
            k_all, v_all = (k_seg, v_seg) if past is None else (torch.cat([past[0], k_seg]), torch.cat([past[1], v_seg]))
            out[rows] = attend(q[rows], k_all, v_all, seg.causal)
            if seg.updates_cache:
                cache.append(seg.context_id, layer, k_seg, v_seg)
        out = out.flatten(1)
        return layout.route(out, self.o_proj, self.o_proj_moe_gen)


def _unpack(qkv: Tensor, hq: int, hkv: int, d: int) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=1)
    return q.unflatten(1, (hq, d)), k.unflatten(1, (hkv, d)), v.unflatten(1, (hkv, d))


class MoTDecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, index: int):
        super().__init__()
        self.index = index
        self.self_attn = MoTAttention(cfg)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.mlp_moe_gen = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        for suffix in ("", "_moe_gen"):
            setattr(self, f"input_layernorm{suffix}", RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))
            setattr(self, f"post_attention_layernorm{suffix}", RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))

    def forward(self, x: Tensor, layout: PackedLayout, cos: Tensor, sin: Tensor, cache: KVCache) -> Tensor:
        h = layout.route(x, self.input_layernorm, self.input_layernorm_moe_gen)
        x = x + self.self_attn(h, layout, cos, sin, cache, self.index)
        return x + layout.route(
            x,
            lambda y: self.mlp(self.post_attention_layernorm(y)),
            lambda y: self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(y)),
        )
