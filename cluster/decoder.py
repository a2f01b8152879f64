"""Decoder deployment: VAE decode of scaled latents to raw pixels (float32)."""
from __future__ import annotations

import torch
from ray import serve
from torch import Tensor

from bagel_model.config import BagelConfig
from bagel_model.demo import checkpoint_or_demo, random_module
from bagel_model.latent_rgb import fit_latent_rgb
from bagel_model.loader import load_vae
from bagel_model.simulated import SimulatedAutoEncoder, Simulation
from bagel_model.vae import AutoEncoder

from .devices import resolve_device


def vae_of(checkpoint_dir: str, config: BagelConfig, device: torch.device, random_weights: bool) -> AutoEncoder:
    """The VAE (float32) the encoder and the decoder both hold: the checkpoint's, or random
    weights that are the same in both."""
    if random_weights:
        return random_module(lambda: AutoEncoder(config.vae), device, torch.float32, seed=101)
    return load_vae(checkpoint_dir, config, device=device, dtype=torch.float32)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Decoder:
    def __init__(self, checkpoint_dir: str | None, device: str, random_weights: bool = False,
                 simulation: Simulation | None = None):
        """`simulation`: no model, simulated time (bench/simulate.py)."""
        self.device = resolve_device(device)
        checkpoint_dir = checkpoint_or_demo(checkpoint_dir)
        config = BagelConfig.from_checkpoint_dir(checkpoint_dir)
        if simulation is not None:
            self.vae = SimulatedAutoEncoder(config, simulation)
        else:
            self.vae = vae_of(checkpoint_dir, config, self.device, random_weights)
        self._latent_rgb: Tensor | None = None

    @torch.inference_mode()
    def decode(self, latent: Tensor) -> Tensor:
        return self.vae.decode(latent).float().cpu()

    def latent_rgb_map(self) -> Tensor:
        """The VAE's linear latent-to-RGB map for cheap previews, fitted on first use."""
        if self._latent_rgb is None:
            self._latent_rgb = fit_latent_rgb(self.vae)
        return self._latent_rgb

    def ready(self) -> bool:
        """Answers once the replica is up (the ingress probes a restarted one with it)."""
        return True

    def check_health(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
