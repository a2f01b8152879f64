"""The optional kernels are chosen per stage and fall back to the default path: where their
packages or GPU are missing nothing changes (the default kernels stay in every layer), and where
they are installed but an input is not theirs (CPU, float32, few tokens) the layers compute what
the default path computes."""
from __future__ import annotations

import logging

import pytest
import torch

from bagel_model import attention, epilogue_gemm
from bagel_model.demo import demo_config, init_random_weights
from bagel_model.kernels import KernelChoice, Kernels, QuackRMSNorm, use_kernels
from bagel_model.model import BagelStage
from bagel_model.runner import StageRunner
from bagel_model.segments import Segment
from bagel_model.stage import full_model

MARKERS = (0, 1)


@pytest.fixture
def stage() -> BagelStage:
    return init_random_weights(BagelStage(demo_config(), full_model(2)), seed=0)


def layer_kernels(stage: BagelStage) -> tuple[set, set]:
    """The attention and fused-MLP kernels the stage's modules hold."""
    held = [m.kernels for m in stage.modules() if isinstance(getattr(m, "kernels", None), Kernels)]
    assert len(held) > 10
    return {k.attend for k in held}, {k.mlp for k in held}


def forward(stage: BagelStage) -> torch.Tensor:
    """Velocities of two noise blocks after a causal text prefill (one block with the text as
    context, one without), as in a text-to-image step."""
    g = torch.Generator().manual_seed(1)
    runner = StageRunner(stage, MARKERS, decode_slots=0)
    runner.run([Segment.text("c", torch.randint(2, 200, (7,), generator=g).tolist(), 0)])
    latents = torch.randn(16, stage.config.patch_latent_dim, generator=g)
    return torch.stack(runner.run([Segment.noise("c", latents, (4, 4), 0.7, 7), Segment.noise("u", latents, (4, 4), 0.7, 0)]))


def test_default_stage_uses_sdpa_and_the_plain_mlp(stage):
    assert layer_kernels(stage) == ({attention.attend}, {None})


def test_missing_packages_keep_the_default_kernels(stage, caplog):
    """On this CPU machine FA4 and quack cannot run: asking for them changes nothing, and says so."""
    with caplog.at_level(logging.WARNING):
        active = use_kernels(stage, KernelChoice(attention="fa4", mlp="quack", norm="quack"))
    assert active == KernelChoice("sdpa", "cublas", compile=False)
    assert layer_kernels(stage) == ({attention.attend}, {None})
    assert "FlashAttention-4 needs a CUDA GPU" in caplog.text and "quack GEMMs needs a CUDA GPU" in caplog.text
    assert "quack's RMSNorm needs a CUDA GPU" in caplog.text


def test_unknown_kernel_names_are_refused():
    with pytest.raises(ValueError, match="attention must be one of"):
        KernelChoice(attention="flash2")
    with pytest.raises(ValueError, match="mlp must be one of"):
        KernelChoice(mlp="cutlass")
    with pytest.raises(ValueError, match="norm must be one of"):
        KernelChoice(norm="apex")


def test_installed_kernels_go_into_every_layer_and_hand_back_what_they_cannot_run(stage, monkeypatch):
    """With the packages reported usable, every layer gets FA4, the epilogue GEMMs and quack's
    RMSNorm; this CPU float32 forward is not theirs, so it must equal the default forward exactly."""
    expected = forward(stage)
    monkeypatch.setattr(attention, "fa4_unavailable", lambda device: None)
    monkeypatch.setattr(epilogue_gemm, "quack_unavailable", lambda device: None)
    assert use_kernels(stage, KernelChoice(attention="fa4", mlp="quack", norm="quack")) == \
        KernelChoice("fa4", "quack", compile=False, norm="quack")
    attends, fused = layer_kernels(stage)
    assert attends == {attention.flash_attend}
    assert len(fused) == 1 and isinstance(fused.pop(), epilogue_gemm.EpilogueSwiGLU)
    assert {type(m.kernels.rms_norm) for m in stage.modules() if isinstance(getattr(m, "kernels", None), Kernels)} == \
        {QuackRMSNorm}
    assert torch.equal(forward(stage), expected)
    use_kernels(stage, KernelChoice())
    assert layer_kernels(stage) == ({attention.attend}, {None})
