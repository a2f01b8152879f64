"""The cost model: FLOPs of LLM forwards and KV bytes (spec §7), for MFU reporting."""
from __future__ import annotations

from .config import LLMConfig


def linear_macs_per_token(llm: LLMConfig) -> int:
    """Multiply-adds of one token through the linear layers of one decoder layer."""
    d, q, kv = llm.hidden_size, llm.num_attention_heads * llm.head_dim, llm.num_key_value_heads * llm.head_dim
    return d * q + 2 * d * kv + q * d + 3 * d * llm.intermediate_size


def forward_flops(llm: LLMConfig, query_tokens: int, context_tokens: int) -> float:
    """FLOPs (2 per multiply-add) of one LLM forward of `query_tokens` non-causal tokens that
    attend to `context_tokens` cached ones plus themselves."""
    linear = 2 * query_tokens * linear_macs_per_token(llm)
    attention = 4 * query_tokens * (query_tokens + context_tokens) * llm.num_attention_heads * llm.head_dim
    return float(llm.num_hidden_layers * (linear + attention))


def kv_bytes_per_token(llm: LLMConfig, dtype_bytes: int = 2) -> int:
    return 2 * llm.num_hidden_layers * llm.num_key_value_heads * llm.head_dim * dtype_bytes
