"""Attention of the LLM and the ViT (the LLM's stages call it through their `Kernels.attend`).

`attend(q, k, v, causal)` handles one packed segment: `n` queries against `L >= n` keys whose
last `n` rows belong to the queries. Causal masks are bottom-right aligned (query i sees every
cached key plus block keys <= i). Grouped-query attention is native (no K/V expansion).

Which kernel runs `attend` is chosen per stage when it is built (`kernels.select_kernels`):
PyTorch SDPA (cuDNN / flash on GPUs) by default, or FlashAttention-4 ("fa4", the optional
`flash-attn-4` package, CuTe DSL kernels for Hopper and Blackwell), which was faster on
BAGEL's denoising shapes. Without that package or GPU, "fa4" falls back to SDPA.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

Attend = Callable[[Tensor, Tensor, Tensor, bool], Tensor]
Softmax = Callable[[Tensor, Tensor, float], Tensor]  # (scores, additive bias, scale) -> probabilities
ATTENTION_BACKENDS = ("sdpa", "fa4")


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


@functools.cache
def _fa4():
    from flash_attn.cute import flash_attn_func
    return flash_attn_func


def flash_attend(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    """`attend` through FlashAttention-4 for bf16/fp16 CUDA tensors (its causal mask is
    bottom-right aligned, as ours); anything else goes to SDPA."""
    if not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16):
        return attend(q, k, v, causal)
    out, _ = _fa4()(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), causal=causal and q.shape[0] > 1)
    return out.squeeze(0)


def fa4_unavailable(device: torch.device) -> str | None:
    """Why FlashAttention-4 cannot run on `device`, or None when it can."""
    if device.type != "cuda":
        return f"needs a CUDA GPU, not {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in (9, 10):
        return f"has kernels for compute capability 9.x and 10.x, not {major}.{minor}"
    try:
        _fa4()
    except Exception as e:  # ImportError, or the DSL failing to load its libraries
        return f"flash-attn-4 does not import: {type(e).__name__}: {e}"
    return None


def attention_backend(name: str, device: torch.device) -> tuple[str, Attend]:
    """The attention function for backend `name` on `device`, and the name of the one that
    will actually run: "fa4" falls back to "sdpa" (logged) where it cannot run."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, not {name!r}")
    if name == "fa4":
        reason = fa4_unavailable(torch.device(device))
        if reason is None:
            return "fa4", flash_attend
        log.warning("attention: FlashAttention-4 %s; using SDPA", reason)
    return "sdpa", attend


def attend_slots(q: Tensor, k: Tensor, v: Tensor, k_slots: Tensor, v_slots: Tensor,
                 rows: Tensor, write_index: Tensor, bias: Tensor, softmax: Softmax) -> Tensor:
    """One new token per row against preallocated K/V slots (row i uses slot i).

    q: [B, Hq, d]; k, v: [B, Hkv, d] are written at column `write_index` [B] of
    `k_slots`/`v_slots` [B, Hkv, capacity + 1, d] (`rows` = arange(B)); the query then attends
    to the first `bias.shape[1]` columns, `bias` [B, window] holding 0 (visible) or -inf;
    `softmax` is the stage's `Kernels.masked_softmax`.
    Fixed shapes throughout, so the step can be captured as a CUDA graph.
    """
    b, hq, d = q.shape
    hkv, window = k_slots.shape[1], bias.shape[1]
    k_slots[rows, :, write_index] = k
    v_slots[rows, :, write_index] = v
    scores = torch.matmul(q.view(b, hkv, hq // hkv, d), k_slots[:, :, :window].transpose(-1, -2))
    probs = softmax(scores, bias[:, None, None, :], d ** -0.5)
    return torch.matmul(probs, v_slots[:, :, :window]).reshape(b, hq, d)
