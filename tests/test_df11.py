"""The DF11 format (bagel_model/df11.py): every bf16 bit pattern comes back exactly, Gaussian
weights shrink to ~70%, and a `Df11Tensor` computes exactly what its dense tensor computes.

Measured (CPU): random N(0, 1/fan_in) weights 3584 x 3584: 3-bit codes, 2.35% escapes, 70.1%
of bf16 (11.22 bits per weight); bound 69-71.5%. The Triton kernel runs in Triton's CPU
interpreter where Triton is installed (it is not a CPU dependency; bench/quant.py checks the
kernel on the GPU).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bagel_model import df11

REPO = Path(__file__).resolve().parent.parent


def every_bf16() -> torch.Tensor:
    return torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


def test_every_bf16_bit_pattern_round_trips():
    """Zeros, subnormals, infinities and every NaN payload included."""
    values = every_bf16()
    packed = df11.encode(values)
    assert torch.equal(bits(df11.decode(packed)), bits(values))
    assert packed.escapes.numel() > 0  # 256 exponents cannot all have codes: escapes are exercised


@pytest.mark.parametrize("shape", [(1,), (7, 13), (3, df11.BLOCK + 5), (2, df11.CHUNK // 2 + 3)])
def test_shapes_that_do_not_fill_blocks_or_chunks(shape):
    torch.manual_seed(0)
    w = (torch.randn(shape) * 0.02).to(torch.bfloat16)
    back = df11.decode(df11.encode(w))
    assert back.shape == w.shape and torch.equal(bits(back), bits(w))


def test_gaussian_weights_take_about_70_percent():
    torch.manual_seed(0)
    w = (torch.randn(3584, 3584) / 3584 ** 0.5).to(torch.bfloat16)
    packed = df11.encode(w)
    ratio = packed.nbytes / (2 * w.numel())
    assert packed.bits == 3 and 0.69 < ratio < 0.715, (packed.bits, ratio)
    assert 0.015 < packed.escapes.numel() / w.numel() < 0.03
    assert packed.nbytes == df11.packed_bytes(w.numel(), packed.bits, packed.escapes.numel())
    assert torch.equal(bits(df11.decode(packed)), bits(w))


def test_code_width_follows_the_exponent_spread():
    """Few distinct exponents take 2-bit codes; a wide spread of scales takes 4 bits."""
    narrow = torch.tensor([1.0, 1.5, -1.25, 2.0, 3.0] * 400, dtype=torch.bfloat16)
    assert df11.encode(narrow).bits == 2
    wide = (torch.randn(1 << 16) * torch.logspace(-12, 12, 1 << 16, base=2)).to(torch.bfloat16)
    packed = df11.encode(wide)
    assert packed.bits == 4 and torch.equal(bits(df11.decode(packed)), bits(wide))


def test_float32_holding_bf16_values_is_accepted_and_others_are_refused():
    exact = torch.randn(64, 32).to(torch.bfloat16).float()
    t = df11.Df11Tensor.compress(exact)
    assert t.dtype == torch.float32 and torch.equal(t.dense(), exact)
    with pytest.raises(ValueError, match="bf16 cannot"):
        df11.encode(torch.tensor([1.0 + 2 ** -12]))


def test_compressed_weight_computes_exactly_what_the_dense_one_does():
    torch.manual_seed(1)
    w = torch.randn(96, 64).to(torch.bfloat16)
    b = torch.randn(96, dtype=torch.bfloat16)
    t = df11.Df11Tensor.compress(w)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    assert (t.shape, t.dtype, t.device) == (w.shape, w.dtype, w.device)
    assert torch.equal(F.linear(x, t, b), F.linear(x, w, b))
    r1 = torch.randn(5, 96, dtype=torch.bfloat16)
    r2 = r1.clone()
    assert torch.equal(r1.addmm_(x, t.t()), r2.addmm_(x, w.t()))  # add_linear_'s fused epilogue
    p = torch.nn.Parameter(t, requires_grad=False)  # as a module parameter
    assert isinstance(p, df11.Df11Tensor) and isinstance(p, torch.nn.Parameter)
    with torch.inference_mode():
        assert torch.equal(torch.nn.functional.linear(x, p), F.linear(x, w))
    assert t.packed.nbytes < 0.8 * w.numel() * 2 + 2 ** 4 + 64


def test_triton_kernel_matches_the_torch_decoder():
    pytest.importorskip("triton", reason="Triton is not installed here (GPU machines have it)")
    code = (
        "import torch\n"
        "from bagel_model import df11\n"
        "from bagel_model.df11_kernel import decode_cuda\n"
        "values = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)\n"
        "gauss = (torch.randn(300, 77) / 9).to(torch.bfloat16)\n"
        "for w in (values, gauss, torch.ones(5000, dtype=torch.bfloat16)):\n"
        "    p = df11.encode(w)\n"
        "    assert torch.equal(decode_cuda(p).view(torch.int16), w.view(torch.int16)), p.bits\n"
        "print('ok')\n")
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
