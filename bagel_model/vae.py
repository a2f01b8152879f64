"""FLUX.1 autoencoder, the VAE of BAGEL (spec §2.3, §3.2, §4.9).

Contract:
  * ``AutoEncoder(cfg).state_dict()`` has exactly the keys and shapes of ``ae.safetensors``.
  * ``encode_moments(pixels [B, 3, H, W] in [-1, 1]) -> [B, 2*z, H/8, W/8]`` (mean ‖ log-variance).
  * ``encode(pixels, noise=None, generator=None)`` returns the scaled posterior sample
    ``scale_factor * (mean + exp(0.5*logvar) * eps - shift_factor)``.
  * ``decode(z_scaled)`` returns the raw decoder output of ``z_scaled / scale_factor + shift_factor``
    (nominally [-1, 1], no clamp).
Inputs are cast to the dtype and device of the module's parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class VAEConfig:
    """Autoencoder hyper-parameters; defaults are those of the released BAGEL-7B-MoT."""

    resolution: int = 256
    in_channels: int = 3
    downsample: int = 8
    out_ch: int = 3
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VAEConfig:
        """Build from a dict such as the ``"vae"`` entry of ``parity_config.json``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown VAE config keys: {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """``x' + conv2(swish(norm2(conv1(swish(norm1(x))))))``; x' is a 1x1 conv when channels change."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        """Lean but exact: each activation runs in place on the fresh norm output, a tensor is
        dropped as soon as its successor exists, and the residual adds into the block's own
        output (a + b == b + a): at most 2 x in + out or in + 2 x out channels live at once
        (the decode of a 1024^2 image peaks at 2.5 GiB instead of 3)."""
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.norm2(h)
        h = self.conv2(F.silu(h, inplace=True))
        return h.add_(x if self.nin_shortcut is None else self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions (scale 1/sqrt(C)), residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))  # [B, HW, C]
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(1, 2).reshape(b, c, height, width)
        return self.proj_out(h).add_(x)


class Downsample(nn.Module):
    """Zero-pad right and bottom by 1, then 3x3 conv with stride 2 and no padding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResnetBlock, AttnBlock, ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class DownLevel(nn.Module):
    """One encoder level: residual blocks, then an optional downsample."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, downsample: bool) -> None:
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels) for i in range(num_blocks)
        )
        self.downsample = Downsample(out_channels) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class UpLevel(nn.Module):
    """One decoder level: residual blocks, then an optional upsample."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, upsample: bool) -> None:
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels) for i in range(num_blocks)
        )
        self.upsample = Upsample(out_channels) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    """pixels [B, in_channels, H, W] -> moments [B, 2*z_channels, H/f, W/f]."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        last = len(widths) - 1
        self.down = nn.ModuleList(
            DownLevel(cfg.ch if i == 0 else widths[i - 1], widths[i], cfg.num_res_blocks, downsample=i != last)
            for i in range(len(widths))
        )
        self.mid = MidBlock(widths[-1])
        self.norm_out = _group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class Decoder(nn.Module):
    """latent [B, z_channels, h, w] -> image [B, out_ch, h*f, w*f]; levels run from the last index to 0."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1])
        self.up = nn.ModuleList(
            UpLevel(widths[min(i + 1, len(widths) - 1)], widths[i], cfg.num_res_blocks + 1, upsample=i != 0)
            for i in range(len(widths))
        )
        self.norm_out = _group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], cfg.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class AutoEncoder(nn.Module):
    """FLUX autoencoder with BAGEL's scaled-latent interface (see module docstring)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        if cfg.downsample != 2 ** (len(cfg.ch_mult) - 1):
            raise ValueError(f"downsample={cfg.downsample} does not match {len(cfg.ch_mult)} levels in ch_mult")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def _param(self) -> Tensor:
        return next(self.parameters())

    def encode_moments(self, pixels: Tensor) -> Tensor:
        """Raw encoder output [B, 2*z, H/8, W/8]: channels [:z] mean, [z:] log-variance."""
        p = self._param()
        return self.encoder(pixels.to(device=p.device, dtype=p.dtype))

    def _scale(self, z: Tensor) -> Tensor:
        return self.cfg.scale_factor * (z - self.cfg.shift_factor)

    def encode(self, pixels: Tensor, noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Scaled posterior sample. ``noise`` (standard normal, [B, z, H/8, W/8]) is injected when given,
        else drawn on CPU in float32 with ``generator`` and moved to the parameters' device/dtype."""
        mean, logvar = self.encode_moments(pixels).chunk(2, dim=1)
        if noise is None:
            noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32, device="cpu")
        elif noise.shape != mean.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != latent shape {tuple(mean.shape)}")
        eps = noise.to(device=mean.device, dtype=mean.dtype)
        return self._scale(mean + torch.exp(0.5 * logvar) * eps)

    def encode_mean(self, pixels: Tensor) -> Tensor:
        """Scaled posterior mean ``scale_factor * (mean - shift_factor)`` (deterministic encode)."""
        mean, _ = self.encode_moments(pixels).chunk(2, dim=1)
        return self._scale(mean)

    def decode(self, z_scaled: Tensor) -> Tensor:
        """Raw decoder output [B, out_ch, H, W] of ``z_scaled / scale_factor + shift_factor`` (no clamp)."""
        p = self._param()
        z = z_scaled.to(device=p.device, dtype=p.dtype) / self.cfg.scale_factor + self.cfg.shift_factor
        return self.decoder(z)
