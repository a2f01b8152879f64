"""Encoder deployment: ViT + connector (images -> LLM embeddings) and the VAE encoder
(images -> scaled latents). Scaled separately from the stages."""
from __future__ import annotations

import torch
from ray import serve
from torch import Tensor

from bagel_model.config import BagelConfig
from bagel_model.demo import checkpoint_or_demo, random_quantized
from bagel_model.loader import load_vision_encoder
from bagel_model.simulated import SimulatedAutoEncoder, SimulatedVisionEncoder, Simulation
from bagel_model.vit import VisionEncoder

from .decoder import vae_of
from .devices import resolve_device


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Encoder:
    def __init__(self, checkpoint_dir: str | None, device: str, dtype: torch.dtype, random_weights: bool = False,
                 quantize: str | None = None, simulation: Simulation | None = None):
        """`quantize`: the ViT layers' weight format (bagel_model/quantize.py); `simulation`: no model,
        simulated time (bench/simulate.py)."""
        self.device = resolve_device(device)
        checkpoint_dir = checkpoint_or_demo(checkpoint_dir)
        config = BagelConfig.from_checkpoint_dir(checkpoint_dir)
        if simulation is not None:
            self.vision, self.vae = SimulatedVisionEncoder(config, simulation), SimulatedAutoEncoder(config, simulation)
            return
        if random_weights:
            self.vision = random_quantized(lambda: VisionEncoder(config), self.device, dtype, 100, quantize)
        else:
            self.vision = load_vision_encoder(checkpoint_dir, config, device=self.device, dtype=dtype,
                                              quantize=quantize)
        self.vae = vae_of(checkpoint_dir, config, self.device, random_weights)

    def encode_vit(self, images: list[Tensor]) -> list[Tensor]:
        return [e.cpu() for e in self.vision.embed_images(images)]

    @torch.inference_mode()
    def encode_vae(self, pixels: Tensor, noise: Tensor) -> Tensor:
        return self.vae.encode(pixels, noise=noise).cpu()

    def ready(self) -> bool:
        """Answers once the replica is up (the ingress probes a restarted one with it)."""
        return True

    def check_health(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
