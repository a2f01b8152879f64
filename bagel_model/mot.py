"""The Qwen2 Mixture-of-Transformers decoder layer.

Every layer holds two full parameter sets: the understanding expert (checkpoint names without
suffix) and the generation expert (`*_moe_gen`). Tokens are routed by type (latent tokens to
the generation expert, everything else to the understanding expert); attention is shared.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import attend_slots
from .config import LLMConfig
from .kernels import EAGER, Kernels
from .kv_cache import KVCache
from .layers import FusedLinear, RMSNorm, SwiGLU, add_linear_
from .segments import PackedLayout


class MoTAttention(nn.Module):
    def __init__(self, cfg: LLMConfig, kernels: Kernels = EAGER):
        super().__init__()
        self.kernels = kernels
        d, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        for suffix in ("", "_moe_gen"):
            setattr(self, f"q_proj{suffix}", nn.Linear(d, cfg.num_attention_heads * hd))
            setattr(self, f"k_proj{suffix}", nn.Linear(d, cfg.num_key_value_heads * hd))
            setattr(self, f"v_proj{suffix}", nn.Linear(d, cfg.num_key_value_heads * hd))
            setattr(self, f"o_proj{suffix}", nn.Linear(cfg.num_attention_heads * hd, d, bias=False))
            setattr(self, f"q_norm{suffix}", RMSNorm(hd, cfg.rms_norm_eps, kernels))
            setattr(self, f"k_norm{suffix}", RMSNorm(hd, cfg.rms_norm_eps, kernels))
        self.qkv = nn.ModuleDict({"gen" if s else "und": FusedLinear(*(getattr(self, f"{n}_proj{s}") for n in "qkv"))
                                  for s in ("", "_moe_gen")})

    def qkv_rope(self, h: Tensor, cos: Tensor, sin: Tensor, gen: bool) -> tuple[Tensor, Tensor, Tensor]:
        """q [T, Hq, d] and k [T, Hkv, d] (qk-normed, rotated) and v [T, Hkv, d] of one expert;
        the three projections run as one GEMM."""
        s = "_moe_gen" if gen else ""
        q, k, v = _unpack(self.qkv["gen" if gen else "und"](h), self.num_heads, self.num_kv_heads, self.head_dim)
        q_norm, k_norm = getattr(self, f"q_norm{s}"), getattr(self, f"k_norm{s}")
        qk_norm_rope = self.kernels.qk_norm_rope
        return (qk_norm_rope(q, q_norm.weight, q_norm.eps, cos, sin),
                qk_norm_rope(k, k_norm.weight, k_norm.eps, cos, sin), v)

    def forward(self, h: Tensor, layout: PackedLayout, cos: Tensor, sin: Tensor,
                cache: KVCache, layer: int, residual: Tensor) -> Tensor:
        """`residual` + attention(h): the output projection adds into `residual` in place."""
        q, k, v = layout.route(h, lambda *a: self.qkv_rope(*a, gen=False), lambda *a: self.qkv_rope(*a, gen=True), cos, sin)
        out = q.new_empty(q.shape)
        for i, seg in enumerate(layout.segments):
            rows = layout.rows(i)
            k_seg, v_seg = k[rows], v[rows]
            past = cache.get(seg.context_id, layer)
            k_all, v_all = (k_seg, v_seg) if past is None else (torch.cat([past[0], k_seg]), torch.cat([past[1], v_seg]))
            out[rows] = self.kernels.attend(q[rows], k_all, v_all, seg.causal)
            if seg.updates_cache:
                cache.append(seg.context_id, layer, k_seg, v_seg)
        return layout.route(out.flatten(1), lambda o, r: add_linear_(r, o, self.o_proj),
                            lambda o, r: add_linear_(r, o, self.o_proj_moe_gen), residual)


def _unpack(qkv: Tensor, hq: int, hkv: int, d: int) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=1)
    return q.unflatten(1, (hq, d)), k.unflatten(1, (hkv, d)), v.unflatten(1, (hkv, d))


class MoTDecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, index: int, kernels: Kernels = EAGER):
        super().__init__()
        self.index, self.kernels = index, kernels
        self.self_attn = MoTAttention(cfg, kernels)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, kernels)
        self.mlp_moe_gen = SwiGLU(cfg.hidden_size, cfg.intermediate_size, kernels)
        for suffix in ("", "_moe_gen"):
            setattr(self, f"input_layernorm{suffix}", RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernels))
            setattr(self, f"post_attention_layernorm{suffix}", RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernels))

    def forward(self, x: Tensor, layout: PackedLayout, cos: Tensor, sin: Tensor, cache: KVCache) -> Tensor:
        """Updates the residual stream `x` in place (each residual add happens in the epilogue
        of the GEMM before it) and returns it."""
        h = layout.route(x, self.input_layernorm, self.input_layernorm_moe_gen)
        x = self.self_attn(h, layout, cos, sin, cache, self.index, x)
        return layout.route(
            x,
            lambda y: self.mlp(self.post_attention_layernorm(y), y),
            lambda y: self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(y), y),
        )

    def decode(self, x: Tensor, pending: Tensor, cos: Tensor, sin: Tensor, k_slots: Tensor, v_slots: Tensor,
               rows: Tensor, write_index: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        """One text token per row (understanding expert) against static K/V slots; see
        `attention.attend_slots` and `decode_step.py`. Takes the residual stream and the
        previous layer's output not yet added to it, returns the same pair: each residual add
        is fused into the RMSNorm that follows it."""
        attn, eps, kernels = self.self_attn, self.input_layernorm.eps, self.kernels
        x, h = kernels.add_rms_norm(x, pending, self.input_layernorm.weight, eps)
        q, k, v = attn.qkv_rope(h, cos, sin, gen=False)
        out = attend_slots(q, k, v, k_slots, v_slots, rows, write_index, bias, kernels.masked_softmax)
        x, h = kernels.add_rms_norm(x, attn.o_proj(out.flatten(1)), self.post_attention_layernorm.weight, eps)
        return x, self.mlp(h)
