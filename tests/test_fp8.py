"""The APPROXIMATE `fp8: true` mode (`quantize.quantize_gen_mlp`): torchao's float8 rowwise for
the generation expert's MLP only. Its numbers are those of e4m3 weights per output channel and
activations per token (checked against a reference written here, so a change of torchao's
granularity or format fails); the rest of the model stays exact; a whole text-to-image run stays
near the exact output without being equal to it. On the CPU torchao runs the same numbers through
`torch._scaled_mm`'s CPU kernel.

Measured (float32 fixture checkpoint, CPU): final latent relative L2 distance from the exact run
0.026 (8 steps, 64x64); bound 0.1, and at least 1e-3 (the mode must really quantise).
"""
from __future__ import annotations

import copy
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from bagel_model.config import BagelConfig
from bagel_model.errors import InvalidRequest
from bagel_model.loader import load_stage
from bagel_model.quantize import _torchao, quantize_gen_mlp
from pipelines.local import LocalExecutor
from pipelines.noise import NoiseSource
from pipelines.params import ImageParams, TextParams
from pipelines.tasks import generate_image, understand
from .recording import RecordingExecutor

E4M3 = torch.float8_e4m3fn


def e4m3_rows(x: torch.Tensor) -> torch.Tensor:
    """x rounded to e4m3 with one scale per row (its largest magnitude maps to e4m3's largest)."""
    scale = x.abs().amax(dim=-1, keepdim=True) / torch.finfo(E4M3).max
    return (x / scale).to(E4M3).float() * scale


@pytest.fixture(scope="module")
def fp8_executor(checkpoint_dir) -> LocalExecutor:
    return LocalExecutor.from_checkpoint(checkpoint_dir, dtype=torch.float32, fp8=True)


def test_only_the_generation_mlp_is_quantized_rowwise(checkpoint_dir):
    config = BagelConfig.from_checkpoint_dir(checkpoint_dir)
    stage = load_stage(checkpoint_dir, config, dtype=torch.float32)
    dense = copy.deepcopy(stage)
    quantize_gen_mlp(stage)
    torch.manual_seed(0)
    x = torch.randn(10, config.llm.hidden_size)
    for index, layer in stage.language_model.model.layers.items():
        exact = dense.language_model.model.layers[index]
        gen, ref = layer.mlp_moe_gen, exact.mlp_moe_gen
        assert gen.gate_up.weight.qdata.dtype == E4M3 and gen.down_proj.weight.qdata.dtype == E4M3
        gate, up = F.linear(e4m3_rows(x), e4m3_rows(ref.gate_up.params()[0])).chunk(2, dim=-1)
        expected = F.linear(e4m3_rows(F.silu(gate) * up), e4m3_rows(ref.down_proj.weight))
        assert ((gen(x) - expected).norm() / expected.norm()).item() < 1e-5  # float32 rounding only
        assert 1e-3 < ((gen(x) - ref(x)).norm() / ref(x).norm()).item() < 0.1
        assert torch.equal(layer.mlp(x), exact.mlp(x))  # the understanding expert stays exact
        assert type(layer.self_attn.o_proj_moe_gen.weight) is torch.nn.Parameter  # and attention too


def test_fp8_text_to_image_stays_near_exact(executor, fp8_executor):
    params = ImageParams(num_timesteps=8, height=64, width=64)
    exact = generate_image(executor, ["a red fox"], params, noise=NoiseSource(3)).latent
    approx = generate_image(fp8_executor, ["a red fox"], params, noise=NoiseSource(3)).latent
    rel = ((approx - exact).norm() / exact.norm()).item()
    assert 1e-3 < rel < 0.1, rel


def test_fp8_understanding_is_exact(executor, fp8_executor, fixture_dir):
    """Text and ViT tokens never reach the generation expert: answers keep their exact logits."""
    image = Image.open(next((fixture_dir / "inputs").glob("*.png"))).convert("RGB")
    logits = []
    for ex in (executor, fp8_executor):
        recorder = RecordingExecutor(ex)
        understand(recorder, [image, "What is this?"], TextParams(max_new_tokens=3))
        logits.append(torch.stack(recorder.logits))
    assert torch.equal(*logits)


def test_devices_without_fp8_are_clear_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 3090")
    with pytest.raises(InvalidRequest, match="fp8 needs FP8 tensor cores.*RTX 3090 has 8.6"):
        quantize_gen_mlp(SimpleNamespace(device=torch.device("cuda")))
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # torchao not installed
    _torchao.cache_clear()
    try:
        with pytest.raises(InvalidRequest, match="need the torchao package"):
            quantize_gen_mlp(SimpleNamespace(device=torch.device("cpu")))
    finally:
        monkeypatch.undo()
        _torchao.cache_clear()
