"""Weight formats (bagel_model/quantize.py) on the parity fixture, applied while loading.

Every format loads the fixture checkpoint (LLM and ViT) and runs every task. Tolerances against
the exact float32 run (measured on CPU, 6 steps at 64x64; relative L2 of the final latents,
relative L2 of the first answer token's logits):

| format | text-to-image | edit | logits | bound (image / logits) |
|---|---|---|---|---|
| df11 | 0 | 0 | 0 | exactly equal |
| int8 | 0.008 | 0.011 | see test | 0.03 / 0.03 |
| fp8  | 0.056 | 0.095 | see test | 0.2 / 0.2 |
| nf4  | 0.110 | 0.148 | see test | 0.3 / 0.3 |

The approximate formats must also differ measurably (> 1e-4): they really quantize. Stored
bytes equal `quantize.stored_bytes` for int8, fp8 and nf4 and are within 3% for df11; loading
quantized holds one decoder layer in full precision at a time, whatever the layer count.
"""
from __future__ import annotations

import gc
from dataclasses import replace

import pytest
import torch
from PIL import Image

from bagel_model.config import LLMConfig
from bagel_model.demo import demo_config, demo_tokenizer, write_checkpoint
from bagel_model.errors import InvalidRequest
from bagel_model.loader import load_stage, quantization_units
from bagel_model.memory_plan import stage_weight_bytes
from bagel_model.df11 import Df11Tensor
from bagel_model.quantize import (MODES, check_mode, quantize_module, quantize_weight, stored_bytes, tensor_bytes,
                                  vocabulary_modules, weight_bytes)
from bagel_model.stage import StageSpec, full_model
from pipelines.local import LocalExecutor
from pipelines.noise import NoiseSource
from pipelines.params import EDIT_DEFAULTS, ImageParams, TextParams
from pipelines.tasks import generate_image, understand
from .recording import RecordingExecutor

BOUNDS = {"df11": (0.0, 0.0), "int8": (0.03, 0.03), "fp8": (0.2, 0.2), "nf4": (0.3, 0.3)}


def run_tasks(executor: LocalExecutor, image: Image.Image) -> dict[str, torch.Tensor]:
    recorder = RecordingExecutor(executor)
    t2i = generate_image(executor, ["a red fox"], ImageParams(num_timesteps=6, height=64, width=64),
                         noise=NoiseSource(3)).latent
    edit = generate_image(executor, [image, "make it night"], replace(EDIT_DEFAULTS, num_timesteps=6),
                          noise=NoiseSource(4)).latent
    understand(recorder, [image, "What is this?"], TextParams(max_new_tokens=1))
    return {"t2i": t2i, "edit": edit, "logits": recorder.logits[0]}


@pytest.fixture(scope="module")
def image(fixture_dir) -> Image.Image:
    return Image.open(next((fixture_dir / "inputs").glob("*.png"))).convert("RGB")


@pytest.fixture(scope="module")
def exact_outputs(executor, image) -> dict[str, torch.Tensor]:
    return run_tasks(executor, image)


@pytest.mark.parametrize("mode", MODES)
def test_every_format_runs_every_task_near_the_exact_model(mode, checkpoint_dir, image, exact_outputs):
    quantized = LocalExecutor.from_checkpoint(checkpoint_dir, dtype=torch.float32, quantize=mode, quantize_vit=True)
    outputs = run_tasks(quantized, image)
    image_bound, logits_bound = BOUNDS[mode]
    for task, out in outputs.items():
        ref = exact_outputs[task]
        rel = float((out - ref).norm() / ref.norm())
        if mode == "df11":
            assert torch.equal(out, ref), task
        else:
            assert 1e-4 < rel < (logits_bound if task == "logits" else image_bound), (task, rel)


@pytest.mark.parametrize("mode", MODES)
def test_stored_bytes_follow_the_format(mode, checkpoint_dir, exact_outputs):
    """Each decoder layer's weights take the bytes `stored_bytes` says (the planner's figure),
    and shrink by the format's factor against bf16."""
    exact = LocalExecutor.from_checkpoint(checkpoint_dir, dtype=torch.bfloat16).stages[0]
    stage = LocalExecutor.from_checkpoint(checkpoint_dir, dtype=torch.bfloat16, quantize=mode).stages[0]
    for prefix, layer in quantization_units(stage).items():
        dense_layer = exact.get_submodule(prefix[:-1])
        weights = [p for name, p in layer.named_parameters() if name.endswith("weight") and p.ndim == 2]
        shapes = [tuple(w.shape) for w in weights]
        actual = sum(tensor_bytes(w) for w in weights)
        planned = sum(stored_bytes(mode, s) for s in shapes)
        dense = sum(p.numel() * 2 for n, p in dense_layer.named_parameters() if p.ndim == 2)
        assert sum(s[0] * s[1] for s in shapes) * 2 == dense  # every linear weight is stored, once
        if mode == "df11":
            assert abs(actual - planned) < 0.03 * planned, (actual, planned)
        else:
            assert actual == planned, (actual, planned)
        factor = {"df11": (0.65, 0.80), "int8": (0.5, 0.56), "fp8": (0.5, 0.56), "nf4": (0.25, 0.32)}[mode]
        assert factor[0] < actual / dense < factor[1], actual / dense
    assert weight_bytes(stage) < weight_bytes(exact)
    vocabulary, names = vocabulary_modules(stage), {id(m): n for n, m in stage.named_modules()}
    assert len(vocabulary) == 2  # one stage: the token embedding and the LM head
    for module in vocabulary:  # df11 stores them compressed too (lossless); the others leave them dense
        shape = tuple(module.weight.shape)
        assert isinstance(module.weight, Df11Tensor) == (mode == "df11")
        if mode == "df11":
            assert abs(tensor_bytes(module.weight) - stored_bytes(mode, shape)) < 0.03 * stored_bytes(mode, shape)
            assert torch.equal(module.weight.dense(), exact.get_submodule(names[id(module)]).weight)


def live_tensor_bytes() -> int:
    """Bytes of every CPU tensor storage that Python objects hold right now."""
    storages = {}
    for obj in gc.get_objects():
        if type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def test_quantized_loading_holds_one_layer_at_a_time(tmp_path, monkeypatch):
    """Whenever a decoder layer is about to be quantized, the tensors alive beyond the layers
    quantized so far and that one float32 layer are the same for 3 layers as for 12 (the
    embeddings and heads): never the whole float32 stage."""
    import bagel_model.loader as loader

    tokenizer = demo_tokenizer()
    quantized, margins = [], []

    def quantize_and_measure(unit, mode):
        margins.append(live_tensor_bytes() - sum(quantized) - weight_bytes(unit))
        quantize_module(unit, mode)
        quantized.append(weight_bytes(unit))

    monkeypatch.setattr(loader, "quantize_module", quantize_and_measure)
    worst, peak = {}, 0
    for layers in (2, 10):
        config = replace(demo_config(vocab_size=len(tokenizer)), llm=LLMConfig(
            hidden_size=128, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=len(tokenizer)))
        path = write_checkpoint(tmp_path / f"l{layers}", config, tokenizer)
        gc.collect()
        baseline = live_tensor_bytes()
        quantized.clear()
        margins.clear()
        load_stage(path, config, dtype=torch.float32, quantize="int8")
        assert len(margins) == layers
        worst[layers] = max(margins) - baseline
        peak = max(m + sum(quantized[:i]) for i, m in enumerate(margins)) - baseline
    dense = stage_weight_bytes(config, full_model(10), None, torch.float32)
    layer = stage_weight_bytes(config, StageSpec(1, 3, range(0, 1)), None, torch.float32)
    assert abs(worst[10] - worst[2]) < 0.1 * layer, (worst, layer)
    assert peak + layer < 0.6 * dense, (peak, layer, dense)


def test_bad_combinations_are_clear_errors(monkeypatch, checkpoint_dir):
    with pytest.raises(InvalidRequest, match="fp8: true needs the dense bf16 weights"):
        LocalExecutor.from_checkpoint(checkpoint_dir, dtype=torch.float32, quantize="int8", fp8=True)
    with pytest.raises(InvalidRequest, match="quantize must be one of"):
        check_mode("int3", "cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(InvalidRequest, match="fp8 needs FP8 tensor cores.*A100 has 8.0"):
        check_mode("fp8", "cuda")
    with pytest.raises(InvalidRequest, match="nf4 needs weights whose size is a multiple of 64"):
        quantize_weight(torch.randn(3, 7), "nf4")
    with pytest.raises(InvalidRequest, match="fp8 needs both sides of a weight to be multiples of 16"):
        quantize_weight(torch.randn(24, 40), "fp8")
