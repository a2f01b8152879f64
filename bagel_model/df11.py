"""DF11: bf16 weights stored losslessly in about 11 bits each, decompressed on use.

DFloat11's observation (Zhang et al., 2025): a bf16 weight is a sign bit, 8 exponent bits and 7
mantissa bits, and the exponents of a weight matrix carry only ~2.6 bits of information, because
weights cluster within a few powers of two of their scale. This is our own format built on that
observation (not DFloat11's file format or its Huffman kernel). It is chosen so that every block
of `BLOCK` weights decodes on its own, with one gather and one prefix sum:

- `sign_mantissa`: one byte per weight, kept as is;
- `planes`: a `bits`-bit code per weight (2 to 4 bits, chosen per tensor for the smallest size),
  stored as `bits` bit planes; codes below `2**bits - 1` name one of the tensor's most frequent
  exponents (`table`), the last code says "escaped";
- `escapes`: the exponents of escaped weights, in order, one byte each; `block_escapes[b]`
  counts the escapes before block b, so a block finds its own without scanning the others.

With 3-bit codes and ~2% escapes that is 8 + 3 + 0.2 = ~11.2 bits per weight (70%). Every bf16
bit pattern (zeros, subnormals, infinities, NaN payloads) round-trips exactly.

`Df11Tensor` holds one compressed weight and looks like the dense tensor (shape, dtype, device);
any operation on it (a linear layer's GEMM, `.t()`) first decompresses it into a temporary
dense tensor with the decoder chosen when it was made (`quantize.py`): the Triton kernel of
`df11_kernel.py` on CUDA, `decode` (vectorised torch ops, bit-identical) elsewhere.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

BLOCK = 1024  # weights per independently decoded block
CHUNK = 1 << 22  # weights per encode/decode step of the torch code (bounds its temporaries)
CODE_BITS = (2, 3, 4)


@dataclass(frozen=True)
class Packed:
    """One tensor in DF11 form (see the module docstring)."""

    shape: torch.Size
    bits: int
    table: Tensor  # uint8 [2**bits]: the exponent of each code (the escape code's entry is unused)
    planes: Tensor  # uint8 [bits, padded / 8]: bit p of weight i is bit i % 8 of planes[p, i // 8]
    sign_mantissa: Tensor  # uint8 [numel]
    escapes: Tensor  # uint8 [escaped]
    block_escapes: Tensor  # int32 [blocks + 1]: escapes before each block

    @property
    def numel(self) -> int:
        return self.sign_mantissa.numel()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.table, self.planes, self.sign_mantissa, self.escapes, self.block_escapes))


def packed_bytes(numel: int, bits: int, escaped: int) -> int:
    """Bytes of a `Packed` tensor of `numel` weights with `escaped` escapes (the planner's formula)."""
    padded = -(-numel // BLOCK) * BLOCK
    return 2 ** bits + bits * padded // 8 + numel + escaped + 4 * (padded // BLOCK + 1)


# -------------------------------------------------------------------------- encoding


def _bf16_bits(t: Tensor) -> Tensor:
    """The int16 bit patterns of `t`'s values, which must all be bf16 values."""
    if t.dtype != torch.bfloat16:
        as_bf16 = t.to(torch.bfloat16)
        if not torch.equal(as_bf16.to(t.dtype), t):
            raise ValueError(f"df11 stores bf16 values losslessly; this {t.dtype} tensor holds values bf16 cannot")
        t = as_bf16
    return t.contiguous().view(-1).view(torch.int16)


@torch.no_grad()
def encode(weight: Tensor) -> Packed:
    """Compress a tensor of bf16 values (any float dtype holding only bf16 values), on its device."""
    bits16 = _bf16_bits(weight)
    n, device = bits16.numel(), bits16.device
    counts = torch.zeros(256, dtype=torch.int64, device=device)
    for start in range(0, n, CHUNK):
        counts += torch.bincount(_exponent(bits16[start:start + CHUNK]), minlength=256)
    order = counts.argsort(descending=True, stable=True).cpu()
    counts = counts.cpu()
    k = min(CODE_BITS, key=lambda b: n * b + 8 * int(n - counts[order[:2 ** b - 1]].sum()))
    escape = 2 ** k - 1
    table = torch.zeros(2 ** k, dtype=torch.uint8)
    table[:escape] = order[:escape].to(torch.uint8)
    code_of = torch.full((256,), escape, dtype=torch.uint8)
    code_of[order[:escape]] = torch.arange(escape, dtype=torch.uint8)
    code_of, table = code_of.to(device), table.to(device)

    padded = -(-n // BLOCK) * BLOCK
    planes = torch.zeros(k, padded // 8, dtype=torch.uint8, device=device)
    sign_mantissa = torch.empty(n, dtype=torch.uint8, device=device)
    escapes, per_block = [], torch.zeros(padded // BLOCK, dtype=torch.int32, device=device)
    shifts = torch.arange(8, dtype=torch.uint8, device=device)
    for start in range(0, n, CHUNK):  # CHUNK is a multiple of BLOCK: chunks cover whole blocks
        b = bits16[start:start + CHUNK]
        exponent = _exponent(b)
        sign_mantissa[start:start + b.numel()] = (((b >> 8) & 0x80) | (b & 0x7F)).to(torch.uint8)
        code = code_of[exponent]
        width = -(-b.numel() // BLOCK) * BLOCK
        if width != b.numel():  # the tensor's last chunk: pad with code 0 (not an escape)
            code = torch.cat([code, code.new_zeros(width - b.numel())])
        for p in range(k):
            plane_bits = ((code >> p) & 1).view(-1, 8) << shifts
            planes[p, start // 8:(start + width) // 8] = plane_bits.sum(dim=1, dtype=torch.uint8)
        escaped = code == escape
        escapes.append(exponent[escaped[:b.numel()]].to(torch.uint8))
        per_block[start // BLOCK:(start + width) // BLOCK] = escaped.view(-1, BLOCK).sum(dim=1, dtype=torch.int32)
    block_escapes = torch.cat([per_block.new_zeros(1), per_block.cumsum(0, dtype=torch.int32)])
    return Packed(torch.Size(weight.shape), k, table, planes, sign_mantissa, torch.cat(escapes), block_escapes)


def _exponent(bits16: Tensor) -> Tensor:
    return ((bits16 >> 7) & 0xFF).to(torch.int64)


# -------------------------------------------------------------------------- decoding


@torch.no_grad()
def decode(packed: Packed) -> Tensor:
    """The bf16 tensor back, bit for bit, with torch ops (any device)."""
    n, device = packed.numel, packed.sign_mantissa.device
    out = torch.empty(n, dtype=torch.int16, device=device)
    escape = 2 ** packed.bits - 1
    shifts = torch.arange(8, dtype=torch.uint8, device=device)
    place = (1 << torch.arange(packed.bits, dtype=torch.uint8, device=device))[:, None, None]
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        width = -(-(stop - start) // BLOCK) * BLOCK
        planes = packed.planes[:, start // 8:(start + width) // 8]  # [bits, bytes]
        code = (((planes[:, :, None] >> shifts) & 1) * place).sum(0, dtype=torch.uint8).view(-1)[:stop - start]
        escaped = code == escape
        exponent = packed.table[code.long()].to(torch.int32)
        first = packed.block_escapes[start // BLOCK].long()
        rank = escaped.cumsum(0) - 1 + first
        exponent[escaped] = packed.escapes[rank[escaped]].to(torch.int32)
        sm = packed.sign_mantissa[start:stop].to(torch.int32)
        value = ((sm & 0x80) << 8) | (exponent << 7) | (sm & 0x7F)
        out[start:stop] = value.to(torch.int16)  # keeps the low 16 bits
    return out.view(torch.bfloat16).view(packed.shape)


# -------------------------------------------------------------------------- the tensor


_ON_WRAPPER = {Tensor.detach, Tensor.requires_grad_, Tensor.size, Tensor.dim, Tensor.numel, Tensor.element_size,
               Tensor.is_floating_point, Tensor.__repr__, Tensor.__format__}


class Df11Tensor(Tensor):
    """A DF11-compressed weight. It reports the dense tensor's shape, dtype and device; every
    operation decompresses it first (into `dtype`), so the dense result is computed exactly."""

    lossless = True  # layers.add_linear_ may treat it as the dense tensor it decompresses to

    @staticmethod
    def __new__(cls, packed: Packed, dtype: torch.dtype, decoder: Callable[[Packed], Tensor]):
        return Tensor._make_wrapper_subclass(cls, packed.shape, dtype=dtype, device=packed.sign_mantissa.device)

    def __init__(self, packed: Packed, dtype: torch.dtype, decoder: Callable[[Packed], Tensor]):
        self.packed, self.decoder = packed, decoder

    @classmethod
    def compress(cls, weight: Tensor, decoder: Callable[[Packed], Tensor] = decode) -> Df11Tensor:
        """`weight` compressed on its device; decompresses back to `weight.dtype` with `decoder`."""
        return cls(encode(weight), weight.dtype, decoder)

    def dense(self) -> Tensor:
        return self.decoder(self.packed).to(self.dtype)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """Metadata and detaching act on the compressed tensor itself; every other operation
        gets the dense tensor instead (above autograd, so views of it are ordinary tensors)."""
        kwargs = kwargs or {}
        if func in _ON_WRAPPER or getattr(func, "__name__", "") == "__get__":
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        unpack = lambda a: a.dense() if isinstance(a, Df11Tensor) else a  # noqa: E731
        return func(*tree_map(unpack, args), **tree_map(unpack, kwargs))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.detach.default:  # nn.Parameter(...) detaches
            (self,) = args
            return cls(self.packed, self.dtype, self.decoder)
        raise NotImplementedError(f"{func} on a df11-compressed weight")

    def __repr__(self) -> str:
        return (f"Df11Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, "
                f"{8 * self.packed.nbytes / max(self.numel(), 1):.2f} bits/weight)")
