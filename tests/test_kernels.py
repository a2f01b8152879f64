"""Kernels are chosen when a stage is built (bagel_model/kernels.py): every module of the stage
runs the chosen ones, and choosing changes nothing for other stages in the process."""
from __future__ import annotations

from collections import Counter
from dataclasses import fields, replace

import pytest
import torch

from bagel_model import kernels
from bagel_model.kernels import EAGER, KernelChoice, Kernels, select_kernels
from pipelines.local import LocalExecutor
from pipelines.noise import NoiseSource
from pipelines.params import ImageParams, TextParams
from pipelines.tasks import generate_image, understand

# torch.compile's import warns about torch's own use of torch.jit.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

KERNELS = [f.name for f in fields(Kernels) if f.name not in ("choice", "mlp")]


def counting(calls: Counter) -> Kernels:
    """EAGER's kernels, counting their calls."""
    def counted(name):
        def run(*args, **kwargs):
            calls[name] += 1
            return getattr(EAGER, name)(*args, **kwargs)
        return run
    return replace(EAGER, **{name: counted(name) for name in KERNELS})


def test_every_kernel_runs_through_the_stages_choice(checkpoint_dir, executor):
    calls = Counter()
    chosen = LocalExecutor.from_checkpoint(checkpoint_dir, dtype=torch.float32, num_stages=2, kernels=counting(calls))
    assert all(m.kernels is s.kernels for s in chosen.stages for m in s.modules() if hasattr(m, "kernels"))
    params = ImageParams(num_timesteps=3, height=32, width=32)
    image = generate_image(chosen, ["a red fox"], params, noise=NoiseSource(1)).latent
    assert torch.equal(image, generate_image(executor, ["a red fox"], params, noise=NoiseSource(1)).latent)
    denoising = dict(calls)
    text = understand(chosen, ["Say hi."], TextParams(max_new_tokens=4)).token_ids  # decode steps: fast path
    assert text == understand(executor, ["Say hi."], TextParams(max_new_tokens=4)).token_ids
    assert all(denoising.get(k) for k in ("rms_norm", "silu_mul", "qk_norm_rope", "attend")), denoising
    assert calls["add_rms_norm"] > 0 and calls["masked_softmax"] > 0, calls
    # The executor built without a choice holds the plain kernels, untouched by the other one.
    assert all(s.kernels is EAGER for s in executor.stages)


def test_stage_worker_builds_its_stage_with_the_kernels_of_its_device(checkpoint_dir):
    from bagel_model.stage import full_model
    from cluster.stage_worker import StageWorker

    for compile, expected in ((None, False), (True, True)):  # None: compiled on CUDA only
        worker = StageWorker(str(checkpoint_dir), full_model(2), "cpu", torch.float32, compile=compile)
        stage = worker.runner.stage
        assert stage.kernels.choice == KernelChoice(compile=expected)
        assert all(m.kernels is stage.kernels for m in stage.modules() if hasattr(m, "kernels"))


def test_selection_changes_nothing_process_wide():
    before = (kernels.rms_norm, kernels.silu_mul, kernels.qk_norm_rope, kernels.add_rms_norm, kernels.masked_softmax)
    assert select_kernels("cpu") == EAGER and select_kernels("cuda", KernelChoice(compile=False)) == EAGER
    fused = select_kernels("cpu", KernelChoice(compile=True))  # compiled lazily: nothing compiles until a kernel runs
    assert fused.choice == KernelChoice(compile=True) and fused.rms_norm is not EAGER.rms_norm
    assert select_kernels("cpu", KernelChoice(compile=True)) == fused  # compiled once per process
    assert (kernels.rms_norm, kernels.silu_mul, kernels.qk_norm_rope, kernels.add_rms_norm,
            kernels.masked_softmax) == before
    assert EAGER.rms_norm is kernels.rms_norm
