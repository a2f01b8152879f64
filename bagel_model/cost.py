"""The cost model: FLOPs and bytes of BAGEL's forwards (spec §7), for MFU reporting and the
timing-faithful simulation (`simulated.py`).

LLM counts are per decoder layer unless a function says otherwise, so a pipeline stage's cost is
its layer count times the per-layer cost. GEMM and attention FLOPs are separate because they run
at different sustained rates. ViT and VAE counts are for the released architecture's modules.
"""
from __future__ import annotations

from .config import LLMConfig, ViTConfig
from .vae import VAEConfig


def gemm_shapes(llm: LLMConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of one expert's GEMMs in one decoder layer, as they run (q/k/v and
    gate/up each as one GEMM)."""
    d, q, kv = llm.hidden_size, llm.num_attention_heads * llm.head_dim, llm.num_key_value_heads * llm.head_dim
    return {"qkv": (d, q + 2 * kv), "o_proj": (q, d), "gate_up": (d, 2 * llm.intermediate_size),
            "down": (llm.intermediate_size, d)}


def linear_macs_per_token(llm: LLMConfig) -> int:
    """Multiply-adds of one token through the linear layers of one decoder layer (one expert)."""
    return sum(k * n for k, n in gemm_shapes(llm).values())


def gemm_flops(llm: LLMConfig, query_tokens: int, layers: int = 1) -> float:
    """FLOPs (2 per multiply-add) of the linear layers of `layers` decoder layers."""
    return float(2 * query_tokens * linear_macs_per_token(llm) * layers)


def attention_flops(llm: LLMConfig, query_tokens: int, context_tokens: int, layers: int = 1) -> float:
    """FLOPs of attention (QK^T and PV) of `query_tokens` non-causal tokens attending to
    `context_tokens` cached ones plus themselves, over `layers` decoder layers."""
    return float(4 * query_tokens * (query_tokens + context_tokens) * llm.num_attention_heads * llm.head_dim * layers)


def forward_flops(llm: LLMConfig, query_tokens: int, context_tokens: int) -> float:
    """FLOPs of one whole-LLM forward of `query_tokens` non-causal tokens that attend to
    `context_tokens` cached ones plus themselves."""
    layers = llm.num_hidden_layers
    return gemm_flops(llm, query_tokens, layers) + attention_flops(llm, query_tokens, context_tokens, layers)


def expert_weight_bytes(llm: LLMConfig, dtype_bytes: int = 2) -> int:
    """Bytes of one expert's linear weights in one decoder layer (what a memory-bound forward
    reads per layer and expert)."""
    return linear_macs_per_token(llm) * dtype_bytes


def lm_head_bytes(llm: LLMConfig, dtype_bytes: int = 2) -> int:
    return llm.vocab_size * llm.hidden_size * dtype_bytes


def kv_bytes_per_token(llm: LLMConfig, dtype_bytes: int = 2, layers: int | None = None) -> int:
    """KV-cache bytes of one token over `layers` layers (default: all)."""
    layers = llm.num_hidden_layers if layers is None else layers
    return 2 * layers * llm.num_key_value_heads * llm.head_dim * dtype_bytes


def vit_flops(vit: ViTConfig, llm_hidden: int, lengths: list[int]) -> tuple[float, float]:
    """(GEMM, attention) FLOPs of the SigLIP encoder plus connector for images of `lengths`
    patches each (attention stays inside each image)."""
    d, inner = vit.hidden_size, vit.intermediate_size
    n = sum(lengths)
    patch = vit.num_channels * vit.patch_size**2 * d
    per_layer = 4 * d * d + 2 * d * inner
    connector = d * llm_hidden + llm_hidden * llm_hidden
    gemm = 2 * n * (patch + vit.num_hidden_layers * per_layer + connector)
    attention = sum(4 * length * length * d for length in lengths) * vit.num_hidden_layers
    return float(gemm), float(attention)


def _conv(c_in: int, c_out: int, pixels: int, kernel: int = 3) -> int:
    return 2 * c_in * c_out * kernel * kernel * pixels


def _resnet(c_in: int, c_out: int, pixels: int) -> int:
    shortcut = _conv(c_in, c_out, pixels, 1) if c_in != c_out else 0
    return _conv(c_in, c_out, pixels) + _conv(c_out, c_out, pixels) + shortcut


def _mid(c: int, pixels: int) -> int:
    """Two residual blocks around single-head attention over all positions (4 1x1 convs)."""
    return 2 * _resnet(c, c, pixels) + 4 * _conv(c, c, pixels, 1) + 4 * pixels * pixels * c


def vae_decode_flops(vae: VAEConfig, height: int, width: int) -> float:
    """FLOPs of decoding one latent to a `height` x `width` image (convolutions and the
    mid-block attention; normalisations and activations left out)."""
    widths = [vae.ch * m for m in vae.ch_mult]
    pixels = (height // vae.downsample) * (width // vae.downsample)
    total = _conv(vae.z_channels, widths[-1], pixels) + _mid(widths[-1], pixels)
    for i in reversed(range(len(widths))):
        c_in = widths[min(i + 1, len(widths) - 1)]
        for b in range(vae.num_res_blocks + 1):
            total += _resnet(c_in if b == 0 else widths[i], widths[i], pixels)
        if i != 0:
            pixels *= 4
            total += _conv(widths[i], widths[i], pixels)
    return float(total + _conv(widths[0], vae.out_ch, pixels))


def vae_encode_flops(vae: VAEConfig, height: int, width: int) -> float:
    """FLOPs of encoding one `height` x `width` image to its latent moments."""
    widths = [vae.ch * m for m in vae.ch_mult]
    pixels = height * width
    total = _conv(vae.in_channels, vae.ch, pixels)
    for i, c in enumerate(widths):
        for b in range(vae.num_res_blocks):
            total += _resnet((vae.ch if i == 0 else widths[i - 1]) if b == 0 else c, c, pixels)
        if i != len(widths) - 1:
            pixels //= 4
            total += _conv(c, c, pixels)
    return float(total + _mid(widths[-1], pixels) + _conv(widths[-1], 2 * vae.z_channels, pixels))
