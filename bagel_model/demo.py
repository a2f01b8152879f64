"""The built-in demo model: a tiny BAGEL with RANDOM weights, written in the official folder
layout (configs, `ema.safetensors`, `ae.safetensors`, tokenizer files, `parity_config.json`).

It exists so the service, the CLI and the tests run anywhere without a download. Its outputs are
noise and its text is gibberish: everything that shows it says "random weights". The folder is
generated deterministically (same seed, same bytes) and cached; `init_random_weights` also
gives full-size models random weights for benchmarks.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .config import BagelConfig, LLMConfig, ViTConfig
from .layers import PositionTable, sincos_2d_table
from .loader import quantization_units
from .model import BagelStage
from .quantize import check_mode, compress_vocabulary, quantize_module
from .stage import full_model
from .tokenizer import QWEN2_CONTROL_TOKENS, BagelTokenizer, build_qwen2_tokenizer
from .transforms import ResizeRule
from .vae import AutoEncoder, VAEConfig
from .vit import VisionEncoder

DEMO_VERSION = 2
DEMO_LABEL = "bagel-demo (tiny model with RANDOM weights: outputs are noise)"


def demo_tokenizer() -> BagelTokenizer:
    """Byte-level BPE over the 256 byte symbols (token id = byte value, no merges) plus
    Qwen2's control tokens."""
    vocab = {symbol: byte for byte, symbol in enumerate(_byte_symbols())}
    added = {len(vocab) + i: t for i, t in enumerate(QWEN2_CONTROL_TOKENS)}
    return BagelTokenizer(build_qwen2_tokenizer(vocab, [], added))


def demo_config(num_layers: int = 2, vocab_size: int | None = None) -> BagelConfig:
    vocab = vocab_size or len(demo_tokenizer())
    return BagelConfig(
        llm=LLMConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab),
        vit=ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      patch_size=14, image_size=14 * 16),
        vae=VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1),
        max_latent_size=16, vit_max_num_patch_per_side=16,
        vae_transform=ResizeRule(256, 128, 16), vit_transform=ResizeRule(224, 56, 14),
    )


@torch.no_grad()
def init_random_weights(module: nn.Module, seed: int) -> nn.Module:
    """Fill every parameter in place, on its own device: Linear/conv weights N(0, 1/fan_in),
    norm weights 1 + N(0, 0.1^2), biases N(0, 0.05^2), embeddings N(0, 1), sin-cos tables exact.
    Numbers are drawn on the parameters' device (the same seed gives the same weights there)."""
    generators: dict[torch.device, torch.Generator] = {}
    for sub in module.modules():
        if isinstance(sub, PositionTable):
            if not sub.pos_embed.is_meta:
                sub.pos_embed.copy_(sincos_2d_table(sub.pos_embed.shape[1], sub.grid))
            continue
        for pname, p in sub.named_parameters(recurse=False):
            if p.is_meta:  # not materialised yet (random_quantized fills it later)
                continue
            if pname == "bias":
                std, mean = 0.05, 0.0
            elif isinstance(sub, nn.Embedding):
                std, mean = 1.0, 0.0
            elif p.ndim == 1:  # RMSNorm / LayerNorm / GroupNorm weights
                std, mean = 0.1, 1.0
            else:
                std, mean = 1.0 / math.sqrt(p[0].numel()), 0.0
            if p.device not in generators:
                generators[p.device] = torch.Generator(p.device).manual_seed(seed)
            flat = p.view(-1)
            for start in range(0, flat.numel(), 1 << 26):  # chunks bound the float32 scratch memory
                chunk = flat[start:start + (1 << 26)]
                noise = torch.randn(chunk.numel(), generator=generators[p.device], device=p.device)
                chunk.copy_(noise * std + mean)
    return module


def random_module(build: Callable[[], nn.Module], device: torch.device | str, dtype: torch.dtype,
                  seed: int) -> nn.Module:
    """A module built straight on `device` in `dtype` with random weights (benchmarks only)."""
    with torch.device("meta"):
        module = build()
    module = module.to_empty(device=device).to(dtype)
    return init_random_weights(module, seed).eval().requires_grad_(False)


@torch.no_grad()
def random_quantized(build: Callable[[], nn.Module], device: torch.device | str, dtype: torch.dtype, seed: int,
                     quantize: str | None) -> nn.Module:
    """Like `random_module`, but made one quantization unit (decoder or ViT layer) at a time,
    each unit quantized (`quantize`, if any) before the next is made, as the loader does: the
    whole module never exists in `dtype`. Unit i is seeded `seed + 1 + i`, so every format gets
    the same weights before quantization (benchmarks compare them)."""
    check_mode(quantize, device)
    with torch.device("meta"):
        module = build()
    units = quantization_units(module)
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if not any(name.startswith(prefix) for prefix in units):
            owner, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner)
            real = torch.empty(tensor.shape, device=device, dtype=dtype)
            if leaf in owner._parameters:
                owner._parameters[leaf] = nn.Parameter(real, requires_grad=False)
            else:
                owner._buffers[leaf] = real
    init_random_weights(module, seed)
    compress_vocabulary(module, quantize)
    for i, unit in enumerate(units.values()):
        init_random_weights(unit.to_empty(device=device).to(dtype), seed + 1 + i)
        if quantize:
            quantize_module(unit, quantize)
    return module.eval().requires_grad_(False)


def write_config_folder(path: str | Path, config: BagelConfig, tokenizer: BagelTokenizer,
                        comment: str | None = None) -> Path:
    """A checkpoint folder without weights (configs and tokenizer), for `random_weights` runs;
    `comment` is recorded in parity_config.json."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    llm_cfg, vit_cfg, parity = config.to_dicts()
    if comment:
        parity["_comment"] = comment
    for name, doc in (("llm_config.json", llm_cfg), ("vit_config.json", vit_cfg), ("parity_config.json", parity)):
        (path / name).write_text(json.dumps(doc, indent=2) + "\n")
    tokenizer.save(path)
    return path


@torch.no_grad()
def write_checkpoint(path: str | Path, config: BagelConfig, tokenizer: BagelTokenizer, seed: int = 0) -> Path:
    """Write a random-weight checkpoint folder in the official layout."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    llm = init_random_weights(BagelStage(config, full_model(config.llm.num_hidden_layers)), seed)
    vision = init_random_weights(VisionEncoder(config), seed + 1)
    vae = init_random_weights(AutoEncoder(config.vae), seed + 2)
    # Make greedy demo text printable: damp the logits of control and non-printable byte tokens.
    damp = torch.tensor([0.0 if 32 <= i < 127 else 1.0 for i in range(config.llm.vocab_size)])
    llm.language_model.lm_head.weight.mul_(1.0 - 0.9 * damp[:, None])
    # Keep a posterior sample near its mean, as the released VAE does.
    vae.encoder.conv_out.bias[config.vae.z_channels:].fill_(-4.0)
    ema = {k: v.to(torch.bfloat16).contiguous() for m in (llm, vision) for k, v in m.state_dict().items()}
    save_file(ema, str(path / "ema.safetensors"))
    save_file({k: v.float().contiguous() for k, v in vae.state_dict().items()}, str(path / "ae.safetensors"))
    return write_config_folder(path, config, tokenizer, comment=DEMO_LABEL)


def _byte_symbols() -> list[str]:
    """The byte-level BPE symbol of each byte value 0..255 (printable bytes stand for
    themselves, the others are shifted to code points from 256 on)."""
    kept = [*range(33, 127), *range(161, 173), *range(174, 256)]
    symbols, shifted = {}, 0
    for b in range(256):
        if b in kept:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + shifted)
            shifted += 1
    return [symbols[b] for b in range(256)]


def demo_checkpoint_dir(cache_dir: str | Path | None = None) -> Path:
    """The demo checkpoint folder, generated on first use (`$BAGEL_DEMO_DIR` or
    `~/.cache/bagel-serve`)."""
    root = Path(cache_dir or os.environ.get("BAGEL_DEMO_DIR") or Path.home() / ".cache" / "bagel-serve")
    target = root / f"demo-v{DEMO_VERSION}"
    if (target / "ema.safetensors").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="demo-", dir=root))
    tokenizer = demo_tokenizer()
    write_checkpoint(tmp, demo_config(vocab_size=len(tokenizer)), tokenizer)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def checkpoint_or_demo(path: str | Path | None) -> Path:
    """`path`, or the demo checkpoint folder when no path is given."""
    return Path(path) if path else demo_checkpoint_dir()


def is_demo_checkpoint(path: str | Path) -> bool:
    parity = Path(path) / "parity_config.json"
    return parity.is_file() and DEMO_LABEL in parity.read_text()
