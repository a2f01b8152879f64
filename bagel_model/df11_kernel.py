"""The CUDA decoder of DF11 weights (df11.py): one Triton program per block of `df11.BLOCK`
weights. Each program rebuilds its weights' codes from the bit planes, ranks its escapes with a
prefix sum (offset by the block's stored escape count), looks exponents up and writes bf16 bit
patterns. Bit-identical to `df11.decode` (tests/test_df11.py runs both; bench/quant.py checks
it on the GPU). Importing this module needs Triton.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .df11 import BLOCK, Packed


@triton.jit
def _decode_kernel(planes_ptr, sign_mantissa_ptr, escapes_ptr, block_escapes_ptr, table_ptr, out_ptr,
                   n, plane_bytes, BITS: tl.constexpr, BLOCK: tl.constexpr):
    block = tl.program_id(0)
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    code = tl.zeros([BLOCK], dtype=tl.int32)
    for p in tl.static_range(BITS):  # planes are padded to whole blocks: no mask needed
        byte = tl.load(planes_ptr + p * plane_bytes + offsets // 8).to(tl.int32)
        code |= ((byte >> (offsets % 8)) & 1) << p
    escaped = (code == (1 << BITS) - 1) & inside
    flags = escaped.to(tl.int32)
    rank = tl.cumsum(flags, axis=0) - flags + tl.load(block_escapes_ptr + block)
    exponent = tl.where(escaped, tl.load(escapes_ptr + rank, mask=escaped, other=0).to(tl.int32),
                        tl.load(table_ptr + code).to(tl.int32))
    sm = tl.load(sign_mantissa_ptr + offsets, mask=inside, other=0).to(tl.int32)
    value = ((sm & 0x80) << 8) | (exponent << 7) | (sm & 0x7F)
    tl.store(out_ptr + offsets, value.to(tl.int16), mask=inside)


def decode_cuda(packed: Packed) -> Tensor:
    """The bf16 tensor back, bit for bit, in one kernel launch (stream-ordered; graph-capturable)."""
    n = packed.numel
    out = torch.empty(n, dtype=torch.int16, device=packed.sign_mantissa.device)
    escapes = packed.escapes if packed.escapes.numel() else packed.table  # never read; a valid pointer
    grid = (triton.cdiv(n, BLOCK),)
    _decode_kernel[grid](packed.planes, packed.sign_mantissa, escapes, packed.block_escapes, packed.table,
                         out, n, packed.planes.shape[1], BITS=packed.bits, BLOCK=BLOCK)
    return out.view(torch.bfloat16).view(packed.shape)
