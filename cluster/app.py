"""`build_app`: the Serve application (the `import_path` of ray_config.yaml).

Binds the encoder, decoder and image-store deployments into the orchestrator (the ingress),
which creates the pipeline's stage workers itself. With `simulate` set, every component runs
without a model on the CPU, in the hardware profile's simulated time (bagel_model/simulated.py).
"""
from __future__ import annotations

import ray
from ray.serve import Application

from bagel_model.simulated import Simulation, simulation_checkpoint_dir

from .args import AppArgs, with_gpu_shares
from .decoder import Decoder
from .devices import placed_device, resolve_dtype
from .encoder import Encoder
from .image_store import ImageStoreDeployment
from .orchestrator import Orchestrator
from .plan import with_plan


def build_app(args: dict | AppArgs | None = None) -> Application:
    a = args if isinstance(args, AppArgs) else AppArgs(**(args or {}))
    simulation = Simulation.named(a.simulate, a.simulate_time_scale) if a.simulate else None
    if simulation is not None:  # the full-size model's shapes, bf16 bytes, no GPU
        a = a.model_copy(update={"checkpoint_dir": a.checkpoint_dir or str(simulation_checkpoint_dir()),
                                 "dtype": "bfloat16" if a.dtype == "auto" else a.dtype, "device": "cpu"})
    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() and simulation is None else 0
    a, _ = with_plan(a, gpus)
    a = with_gpu_shares(a, gpus)
    checkpoint = a.checkpoint_dir
    enc_device, dec_device = placed_device(a.device, a.encoder_gpus), placed_device(a.device, a.decoder_gpus)
    encoder = Encoder.options(ray_actor_options={"num_cpus": 0, "num_gpus": a.encoder_gpus}).bind(
        checkpoint, enc_device, resolve_dtype(a.dtype, enc_device), a.random_weights,
        a.quantize if a.quantize_vit else None, simulation)
    decoder = Decoder.options(ray_actor_options={"num_cpus": 0, "num_gpus": a.decoder_gpus}).bind(
        checkpoint, dec_device, a.random_weights, simulation)
    store = ImageStoreDeployment.bind(a.image_url_store_bytes, a.image_url_store_images, a.image_url_ttl_s)
    return Orchestrator.bind(a, encoder, decoder, store)
