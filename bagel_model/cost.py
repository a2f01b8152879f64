"""The cost model: FLOPs of LLM forwards and KV bytes (spec §7), for MFU reporting."""
from __future__ import annotations

from .config import LLMConfig


def gemm_shapes(llm: LLMConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of one expert's GEMMs in one decoder layer, as they run (q/k/v and
    gate/up each as one GEMM)."""
    d, q, kv = llm.hidden_size, llm.num_attention_heads * llm.head_dim, llm.num_key_value_heads * llm.head_dim
    return {"qkv": (d, q + 2 * kv), "o_proj": (q, d), "gate_up": (d, 2 * llm.intermediate_size),
            "down": (llm.intermediate_size, d)}


def linear_macs_per_token(llm: LLMConfig) -> int:
    """Multiply-adds of one token through the linear layers of one decoder layer."""
    return sum(k * n for k, n in gemm_shapes(llm).values())


def forward_flops(llm: LLMConfig, query_tokens: int, context_tokens: int) -> float:
    """FLOPs (2 per multiply-add) of one LLM forward of `query_tokens` non-causal tokens that
    attend to `context_tokens` cached ones plus themselves."""
    linear = 2 * query_tokens * linear_macs_per_token(llm)
    attention = 4 * query_tokens * (query_tokens + context_tokens) * llm.num_attention_heads * llm.head_dim
    return float(llm.num_hidden_layers * (linear + attention))


def kv_bytes_per_token(llm: LLMConfig, dtype_bytes: int = 2, layers: int | None = None) -> int:
    """KV-cache bytes of one token over `layers` layers (default: all)."""
    layers = llm.num_hidden_layers if layers is None else layers
    return 2 * layers * llm.num_key_value_heads * llm.head_dim * dtype_bytes
