"""Strict, memory-mapped loading of an official BAGEL checkpoint folder.

Each loader builds its module on the meta device, reads only the tensors that module owns from
the safetensors file (memory-mapped, no pickle), checks names and shapes exactly, and assigns
them on the caller's device and dtype. A missing, unexpected or misshapen tensor raises
`CheckpointError` naming the tensors. `load_stage` loads one pipeline stage (a range of layers).

With `quantize`, tensors arrive one *unit* (decoder or ViT layer) at a time and each unit is
quantized (`quantize.py`) before the next is read, so the full-precision copy of a stage never
exists: the peak is the quantized part loaded so far plus one layer.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .config import BagelConfig
from .errors import CheckpointError, InvalidRequest
from .kernels import EAGER, Kernels
from .model import BagelStage
from .mot import MoTDecoderLayer
from .quantize import check_mode, compress_vocabulary, quantize_module
from .stage import StageSpec, full_model
from .vae import AutoEncoder
from .vit import EncoderLayer, VisionEncoder

EMA_FILE = "ema.safetensors"
VAE_FILE = "ae.safetensors"


def expected_ema_shapes(config: BagelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of `ema.safetensors` for this configuration."""
    with torch.device("meta"):
        modules = [BagelStage(config, full_model(config.llm.num_hidden_layers)), VisionEncoder(config)]
    return {k: tuple(v.shape) for m in modules for k, v in m.state_dict().items()}


def load_stage(checkpoint_dir: str | Path, config: BagelConfig, stage: StageSpec | None = None, *,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
               quantize: str | None = None, kernels: Kernels = EAGER) -> BagelStage:
    """The MoT language model restricted to `stage` (default: all layers), running `kernels`;
    `quantize`: the format of its decoder layers' linear weights (quantize.py)."""
    stage = stage or full_model(config.llm.num_hidden_layers)
    return _load(Path(checkpoint_dir) / EMA_FILE, lambda: BagelStage(config, stage, kernels),
                 set(expected_ema_shapes(config)), device, dtype, quantize)


def load_vision_encoder(checkpoint_dir: str | Path, config: BagelConfig, *,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                        quantize: str | None = None) -> VisionEncoder:
    """The ViT + connector; `quantize`: the format of the ViT layers' linear weights."""
    return _load(Path(checkpoint_dir) / EMA_FILE, lambda: VisionEncoder(config),
                 set(expected_ema_shapes(config)), device, dtype, quantize)


def load_vae(checkpoint_dir: str | Path, config: BagelConfig, *,
             device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> AutoEncoder:
    return _load(Path(checkpoint_dir) / VAE_FILE, lambda: AutoEncoder(config.vae), None, device, dtype)


def quantization_units(module: nn.Module) -> dict[str, nn.Module]:
    """The submodules quantized one at a time (decoder and ViT layers), by name prefix."""
    units = [m for m in module.modules() if isinstance(m, (MoTDecoderLayer, EncoderLayer))]
    names = {id(m): name for name, m in module.named_modules()}
    return {names[id(m)] + ".": m for m in units}


def _load(path: Path, build: Callable[[], nn.Module], known: set[str] | None,
          device: torch.device | str, dtype: torch.dtype, quantize: str | None = None) -> nn.Module:
    check_mode(quantize, device)
    with torch.device("meta"):
        module = build()
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    units = quantization_units(module) if quantize else {}  # unquantized: all tensors at once
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = set(f.keys())
            missing = sorted(set(expected) - names)
            unexpected = sorted(names - (known if known is not None else set(expected)))
            wrong = {k: (f.get_slice(k).get_shape(), expected[k]) for k in sorted(set(expected) & names)
                     if tuple(f.get_slice(k).get_shape()) != expected[k]}
            if missing or unexpected or wrong:
                raise CheckpointError(_describe(path, missing, unexpected, wrong))
            rest = [k for k in expected if not any(k.startswith(prefix) for prefix in units)]
            _assign(module, {k: f.get_tensor(k).to(device=device, dtype=dtype) for k in rest})
            compress_vocabulary(module, quantize)  # before the units: the dense copies go first
            for prefix, unit in units.items():
                _assign(unit, {k[len(prefix):]: f.get_tensor(k).to(device=device, dtype=dtype)
                               for k in expected if k.startswith(prefix)})
                quantize_module(unit, quantize)
    except (CheckpointError, InvalidRequest):
        raise
    except Exception as e:  # safetensors raises its own errors on corrupt headers or data
        raise CheckpointError(f"cannot read {path}: {e}") from e
    return module.eval().requires_grad_(False)


def _assign(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Make `tensors` (names relative to `module`, already checked) its parameters, in place of
    their meta placeholders."""
    result = module.load_state_dict(tensors, strict=False, assign=True)
    assert not result.unexpected_keys, result.unexpected_keys


def _describe(path: Path, missing: list[str], unexpected: list[str], wrong: dict) -> str:
    parts = [f"{path} does not match the model configuration:"]
    if missing:
        parts.append(f"{len(missing)} missing tensors: {_names(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensors: {_names(unexpected)}")
    if wrong:
        parts.append("wrong shapes: " + ", ".join(f"{k} {list(got)} (expected {list(exp)})"
                                                 for k, (got, exp) in list(wrong.items())[:10]))
    return " ".join(parts)


def _names(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
