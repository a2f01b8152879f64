"""A linear map from VAE latents to RGB, for cheap previews at latent resolution.

Each latent vector encodes its 8x8 pixel patch, whose mean colour is close to a linear function
of the vector. `fit_latent_rgb` finds that function for the VAE at hand by least squares: it
encodes smooth random colour fields (the posterior mean) and regresses each patch's mean colour
on its latent vector plus a bias. Fitting costs a few small encodes, so any VAE (the released
FLUX one, the test fixtures' random ones) gets its own map instead of hard-coded numbers.

Contract:
  * ``fit_latent_rgb(vae) -> [z_channels + 1, 3]`` float32 weights (the last row is the bias),
    mapping a scaled latent (``AutoEncoder.encode`` / ``decode`` convention) to decoder-range
    RGB ([-1, 1]).
  * ``latent_rgb(latent [1, z, h, w], weights) -> uint8 [h, w, 3]``, with ``to_uint8``'s
    conversion (clamp(0.5 y + 0.5, 0, 1) * 255, truncated).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .vae import AutoEncoder


@torch.inference_mode()
def fit_latent_rgb(vae: AutoEncoder, size: int = 128, count: int = 8, seed: int = 0) -> Tensor:
    """Least-squares weights [z + 1, 3] from `count` smooth random colour fields of size x size."""
    f = vae.cfg.downsample
    generator = torch.Generator().manual_seed(seed)
    fields = []
    for i in range(count):
        cells = 2 ** (1 + i % 4)  # colour variation from 2x2 to 16x16 cells across the image
        coarse = torch.rand(1, 3, cells, cells, generator=generator) * 2 - 1
        fields.append(F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False))
    pixels = torch.cat(fields)
    latents = vae.encode_mean(pixels).float().cpu()  # [B, z, size/f, size/f]
    colours = F.avg_pool2d(pixels, f)  # each latent position's patch mean, [B, 3, size/f, size/f]
    x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).double()
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    y = colours.permute(0, 2, 3, 1).reshape(-1, 3).double()
    return torch.linalg.lstsq(x, y).solution.float()


def latent_rgb(latent: Tensor, weights: Tensor) -> Tensor:
    """[1, z, h, w] scaled latent -> uint8 [h, w, 3] RGB through the fitted linear map."""
    if latent.dim() != 4 or latent.shape[0] != 1 or weights.shape != (latent.shape[1] + 1, 3):
        raise ValueError(f"expected a [1, z, h, w] latent and [z + 1, 3] weights, got {tuple(latent.shape)} "
                         f"and {tuple(weights.shape)}")
    z = latent[0].float().permute(1, 2, 0)  # [h, w, z]
    w = weights.to(z.device)
    rgb = z @ w[:-1] + w[-1]
    return ((rgb * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8).cpu()
