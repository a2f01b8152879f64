"""The one attention entry point of the LLM and the ViT.

`attend(q, k, v, causal)` handles one packed segment: `n` queries against `L >= n` keys whose
last `n` rows belong to the queries. Causal masks are bottom-right aligned (query i sees every
cached key plus block keys <= i). Grouped-query attention is native (no K/V expansion).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import layers


def attend(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    """q: [n, Hq, d]; k, v: [L, Hkv, d] with Hq a multiple of Hkv. Returns [n, Hq, d]."""
    n, length = q.shape[0], k.shape[0]
    mask = None
    if causal and n > 1:
        if n == length:
            return _sdpa(q, k, v, is_causal=True)
        mask = torch.ones(n, length, dtype=torch.bool, device=q.device).tril(diagonal=length - n)
    return _sdpa(q, k, v, mask=mask)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
        attn_mask=mask, is_causal=is_causal, enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.squeeze(0).transpose(0, 1)


def attend_slots(q: Tensor, k: Tensor, v: Tensor, k_slots: Tensor, v_slots: Tensor,
                 rows: Tensor, write_index: Tensor, bias: Tensor) -> Tensor:
    """One new token per row against preallocated K/V slots (row i uses slot i).

    q: [B, Hq, d]; k, v: [B, Hkv, d] are written at column `write_index` [B] of
    `k_slots`/`v_slots` [B, Hkv, capacity + 1, d] (`rows` = arange(B)); the query then attends
    to the first `bias.shape[1]` columns, `bias` [B, window] holding 0 (visible) or -inf.
    Fixed shapes throughout, so the step can be captured as a CUDA graph.
    """
    b, hq, d = q.shape
    hkv, window = k_slots.shape[1], bias.shape[1]
    k_slots[rows, :, write_index] = k
    v_slots[rows, :, write_index] = v
    scores = torch.matmul(q.view(b, hkv, hq // hkv, d), k_slots[:, :, :window].transpose(-1, -2))
    probs = layers.masked_softmax(scores, bias[:, None, None, :], d ** -0.5)
    return torch.matmul(probs, v_slots[:, :, :window]).reshape(b, hq, d)
