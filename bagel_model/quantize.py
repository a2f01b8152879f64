"""Weight formats for the LLM's linear layers (both experts) and optionally the ViT's:
`quantize` = None (exact, the checkpoint's bf16) | "df11" | "fp8" | "int8" | "nf4".

- **df11** (lossless): bf16 weights entropy-coded to ~70% of their size (`df11.py`, our own
  format and Triton decoder), decompressed per layer on use: outputs equal the bf16 model's.
- **int8** (APPROXIMATE): weight-only, symmetric, one scale per output channel (torchao
  `Int8Tensor`); the GEMM runs in the activations' dtype on the upcast weight.
- **nf4** (APPROXIMATE): 4-bit NormalFloat in blocks of 64 weights with double-quantized block
  scales (QLoRA's format, torchao `NF4Tensor`), dequantized per layer on use.
- **fp8** (APPROXIMATE): e4m3 weights per output channel and activations per token, products
  on FP8 tensor cores (torchao `Float8Tensor`, "float8 rowwise dynamic"; CUDA compute
  capability 8.9+). On the CPU the same numbers run through `torch._scaled_mm`'s CPU kernel.
  `quantize_gen_mlp` (`fp8: true`) applies it to the generation expert's MLP only.

Every format's storage size is `stored_bytes` (what the memory planner adds up); tests compare
it with the tensors made. Weights are quantized one layer at a time while they load
(`loader.py`), so a whole full-precision stage never exists.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .df11 import Df11Tensor, Packed, decode, packed_bytes
from .errors import InvalidRequest
from .layers import FusedLinear
from .model import BagelStage
from .weight_formats import APPROXIMATE, MODES, is_approximate  # noqa: F401  (re-exported)

NF4_BLOCK = 64  # weights per NF4 scale
NF4_SCALER_BLOCK = 256  # block scales per second-level scale (or the largest divisor of the count below it)
DF11_EXPECTED_BITS = 11.25  # planning figure: 8 + 3-bit codes + ~2.5% escaped exponents (tests/test_df11.py)


def check_mode(mode: str | None, device: torch.device | str) -> None:
    """Raise `InvalidRequest` naming the problem if `mode` cannot run on `device`."""
    if mode is None:
        return
    if mode not in MODES:
        raise InvalidRequest(f"quantize must be one of null, {', '.join(MODES)}; got {mode!r}")
    device = torch.device(device)
    if mode == "fp8" and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise InvalidRequest(f"quantize: fp8 needs FP8 tensor cores (CUDA compute capability 8.9+: Ada, Hopper "
                                 f"or later); {torch.cuda.get_device_name(device)} has {major}.{minor}. "
                                 "Use int8 or nf4, or df11 (lossless)")
    if mode != "df11":
        _torchao()


def quantize_weight(weight: Tensor, mode: str) -> Tensor:
    """`weight` [out, in] (on its device, in the compute dtype) in format `mode`."""
    if mode == "df11":
        return Df11Tensor.compress(weight, df11_decoder(weight.device))
    ao = _torchao()
    if mode == "int8":
        return ao.Int8Tensor.from_hp(weight, granularity=ao.PerRow())
    if mode == "nf4":
        n = weight.numel()
        if n % NF4_BLOCK:
            raise InvalidRequest(f"quantize: nf4 needs weights whose size is a multiple of {NF4_BLOCK}; "
                                 f"this one is {list(weight.shape)}")
        return ao.to_nf4(weight.contiguous(), NF4_BLOCK, nf4_scaler_block(n))
    if mode == "fp8":
        if weight.shape[0] % 16 or weight.shape[1] % 16:
            raise InvalidRequest(f"quantize: fp8 needs both sides of a weight to be multiples of 16; "
                                 f"this one is {list(weight.shape)}")
        from torchao.quantization.quantize_.workflows.float8.float8_tensor import QuantizeTensorToFloat8Kwargs

        return ao.Float8Tensor.from_hp(
            weight, float8_dtype=torch.float8_e4m3fn, granularity=ao.PerRow(),
            mm_config=ao.Float8MMConfig(use_fast_accum=True),
            act_quant_kwargs=QuantizeTensorToFloat8Kwargs(torch.float8_e4m3fn, ao.PerRow()))
    raise InvalidRequest(f"unknown quantize mode {mode!r}")


def df11_decoder(device: torch.device) -> Callable[[Packed], Tensor]:
    """The fastest bit-exact DF11 decoder for weights on `device`: the Triton kernel on CUDA
    when Triton imports, else torch ops."""
    if device.type == "cuda":
        try:
            from .df11_kernel import decode_cuda
        except ImportError:
            return decode
        return decode_cuda
    return decode


def nf4_scaler_block(numel: int) -> int:
    blocks = numel // NF4_BLOCK
    return max(d for d in range(1, NF4_SCALER_BLOCK + 1) if blocks % d == 0)


def stored_bytes(mode: str | None, shape: tuple[int, int], dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes one weight of `shape` takes in format `mode` (None: dense in `dtype`); for df11 the
    planning estimate (its size depends on the values)."""
    rows, cols = shape
    n, size = rows * cols, dtype.itemsize
    if mode is None:
        return n * size
    if mode == "df11":
        return packed_bytes(n, 3, 0) + round(n * (DF11_EXPECTED_BITS - 11) / 8)
    if mode == "int8":
        return n + rows * (4 + 1)  # int8 values, a float32 scale and an int8 zero point per row
    if mode == "fp8":
        return n + rows * 4  # e4m3 values, a float32 scale per row
    if mode == "nf4":
        blocks = n // NF4_BLOCK
        return n // 2 + blocks + (blocks // nf4_scaler_block(n)) * size + size + 16 * size
    raise InvalidRequest(f"unknown quantize mode {mode!r}")


@torch.no_grad()
def quantize_module(module: nn.Module, mode: str) -> nn.Module:
    """Every linear layer inside `module` (a decoder or ViT layer) in format `mode`, in place:
    fused groups (q/k/v, gate/up) as one concatenated weight, then the single linears. The
    dense weights are released as each one is replaced."""
    transform: Callable[[Tensor], Tensor] = lambda w: quantize_weight(w, mode)  # noqa: E731
    for fused in [m for m in module.modules() if isinstance(m, FusedLinear) and not m.packed]:
        fused.pack(transform)
    for linear in [m for m in module.modules() if isinstance(m, nn.Linear) and m.weight is not None]:
        linear.weight = nn.Parameter(transform(linear.weight), requires_grad=False)
    return module


def vocabulary_modules(stage: nn.Module) -> list[nn.Module]:
    """A stage's token embedding and LM head, those it has: the vocabulary-sized weights
    (1.1 GB each at full size)."""
    lm = getattr(stage, "language_model", None)
    return [m for m in (getattr(getattr(lm, "model", None), "embed_tokens", None), getattr(lm, "lm_head", None))
            if m is not None]


@torch.no_grad()
def compress_vocabulary(stage: nn.Module, mode: str | None) -> nn.Module:
    """With df11, the stage's vocabulary-sized weights are stored compressed too (30% of 2.2 GB
    saved, what lets the full model fit one 24 GB card): lossless, so every output is the
    same. They decompress whole on use, like a decoder layer's weights (a 1.1 GB temporary,
    which the memory planner counts). The approximate formats leave them dense, as the official
    quantized builds do."""
    if mode == "df11":
        for module in vocabulary_modules(stage):
            module.weight = nn.Parameter(quantize_weight(module.weight, mode), requires_grad=False)
    return stage


@torch.no_grad()
def quantize_gen_mlp(stage: BagelStage) -> BagelStage:
    """APPROXIMATE `fp8: true`: only the generation expert's MLP of every layer in fp8, in place.
    Its GEMMs hold ~70% of a denoising forward's FLOPs, so this is most of fp8's speed for the
    least deviation; text and ViT tokens (prefill, decoding) never reach it and stay exact."""
    check_mode("fp8", stage.device)
    layers = stage.language_model.model.layers.values()
    if any(layer.mlp_moe_gen.gate_up.packed for layer in layers):
        raise InvalidRequest("fp8: true needs the dense bf16 weights; these are already in another format "
                             "(quantize): use one or the other (quantize: fp8 is fp8 for every linear layer)")
    for layer in layers:
        quantize_module(layer.mlp_moe_gen, "fp8")
    return stage


def tensor_bytes(t: Tensor) -> int:
    """Bytes a tensor holds: its inner tensors' for quantized and compressed tensor subclasses."""
    if isinstance(t, Df11Tensor):
        return t.packed.nbytes
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def weight_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of `module`, as stored."""
    return sum(tensor_bytes(t) for t in (*module.parameters(), *module.buffers()))


@functools.cache
def _torchao():
    """torchao's quantized tensors (its GPU-only extensions' load warnings are silenced on
    machines without them)."""
    logger = logging.getLogger("torchao")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import torchao.quantization as ao
    except ImportError as e:
        raise InvalidRequest("quantize: int8, nf4 and fp8 (also fp8: true) need the torchao package "
                             "(pip install 'torchao>=0.18')") from e
    finally:
        logger.setLevel(level)
    return ao
