"""Optional GPU kernels against the current path, one operation of the denoising forward at a
time, on BAGEL's shapes (from the model config and bench/latency.py's text-to-image and editing
jobs at --size): the current path (cuBLAS GEMMs, our torch.compile'd elementwise kernels, SDPA)
and each candidate, timed alone and checked against a float32 reference.

Candidates: FlashAttention-4 (`flash-attn-4`) for the non-causal noise blocks over their cached
context and for causal text; quack GEMMs (`quack-kernels`) with the SwiGLU of gate/up in the
epilogue, with the residual add in the epilogue (down and output projections), and with the
qkv bias; quack's RMSNorm; q and k norm + RoPE compiled as one function. A candidate is exact
when its relative L2 error to float32 is at most TOLERANCE x the current path's (the standard
of bench/check_fastpaths.py: a fast path may not be further from float32 than the plain bf16
path). Anything that fails is recorded with its error and the run goes on; a time budget skips
what is left (the quack autotuning pass runs last).

    python -m bench.kernels --out bench/results [--site /tmp/site] [--size 1024] [--budget-s 150]

The kernel packages are carried to the GPU machine by bench/carry_kernels.sh and
bench/install_kernels.sh; --site names the folder they were installed into.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bagel_model import attention, epilogue_gemm, layers
from bagel_model.config import BagelConfig
from bagel_model.demo import demo_tokenizer
from bagel_model.kernels import EAGER
from bench.check_fastpaths import deviation
from bench.kernel_args import add_site_dirs, quack_settings
from bench.latency import denoise_shapes
from bench.provenance import commit, write_report

TOLERANCE = 1.1
AUTOTUNE_S = 45.0  # budget an autotuning run needs (its compiles run in parallel CPU workers)
PACKAGES = ("flash-attn-4", "quack-kernels", "nvidia-cutlass-dsl", "apache-tvm-ffi")


class Unavailable(Exception):
    """A candidate that cannot run here (package or GPU missing)."""


@dataclass
class Op:
    """One operation of the forward: how often a two-branch forward runs it, its work (FLOPs
    for matrix products, bytes for memory-bound kernels), inputs, float32 reference and the
    variants to time (the first is the current path). `mutated` inputs are updated in place."""

    name: str
    calls_per_forward: int
    flops: float = 0.0
    bytes: float = 0.0
    inputs: dict = field(default_factory=dict)
    reference: Callable[[dict], Tensor] | None = None
    variants: dict[str, Callable[[], Callable[[dict], Tensor | tuple[Tensor, ...]]]] = field(default_factory=dict)
    mutated: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.pristine = {k: self.inputs[k].clone() for k in self.mutated}

    def fresh_inputs(self) -> dict:
        """The inputs as first made (timing runs update the mutated ones in place)."""
        return {**self.inputs, **{k: v.clone() for k, v in self.pristine.items()}}


class Bench:
    def __init__(self, device: str, deadline: float, iters: int):
        self.device, self.deadline, self.iters = torch.device(device), deadline, iters
        self.results: list[dict] = []

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time_ms(self, fn: Callable[[], object]) -> float:
        """Median milliseconds of fn() after warm-up (CUDA events on the GPU)."""
        for _ in range(3 if self.device.type == "cuda" else 1):
            fn()
        times = []
        for _ in range(self.iters):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1000)
        return statistics.median(times)

    def run(self, op: Op, names: list[str], min_left_s: float = 0.0) -> None:
        """Check and time the variants `names` of `op` ("current" first, or already recorded),
        appending one record each; a variant is skipped when less than `min_left_s` of the
        budget is left."""
        try:
            reference = flat(op.reference(op.fresh_inputs()))
        except Exception as e:  # e.g. out of memory: the op cannot be checked, so it is not timed
            self.results += [{"op": op.name, "variant": name, "error": f"float32 reference: {type(e).__name__}: {e}"[:400]}
                             for name in names]
            return
        current = next((r for r in self.results if r["op"] == op.name and r["variant"] == "current"), None)
        for name in names:
            row = self._record(op, name, op.variants[name], reference, current, min_left_s)
            current = row if name == "current" else current

    def _record(self, op: Op, name: str, make, reference: Tensor, current: dict | None, min_left_s: float) -> dict:
        row = {"op": op.name, "variant": name, "calls_per_forward": op.calls_per_forward}
        self.results.append(row)
        if time.monotonic() > self.deadline - min_left_s:
            row["skipped"] = "time budget"
            print(json.dumps(row), flush=True)
            return row
        try:
            fn = make()
            self.sync()
            t = time.perf_counter()
            out = flat(fn(op.fresh_inputs()))
            self.sync()
            row["first_call_s"] = time.perf_counter() - t
            dev = deviation(out, reference)
            row["vs_fp32"] = dev
            finite = bool(torch.isfinite(out).all())
            if current is None:
                row["exact"] = finite
            elif "vs_fp32" in current:
                limit = TOLERANCE * current["vs_fp32"]["relative_l2"]
                row["exact"] = finite and dev["relative_l2"] <= limit
            ms = self.time_ms(lambda: fn(op.inputs))
            row["ms"] = ms
            row["ms_per_forward"] = ms * op.calls_per_forward
            if op.flops:
                row["tflops"] = op.flops / ms / 1e9
            if op.bytes:
                row["gb_per_s"] = op.bytes / ms / 1e6
            if current is not None and "ms" in current:
                row["speedup"] = current["ms"] / ms
        except Unavailable as e:
            row["unavailable"] = str(e)
        except Exception as e:  # one shot on the GPU: record it and go on
            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            row["traceback"] = traceback.format_exc(limit=-4)[-1500:]
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
        return row


def flat(out: Tensor | tuple[Tensor, ...]) -> Tensor:
    """An output (or several) as one float32 vector, to compare."""
    parts = out if isinstance(out, tuple) else (out,)
    return torch.cat([o.float().flatten() for o in parts])


def compiled(fn: Callable, device: torch.device) -> Callable:
    """The current path's fused elementwise kernels are torch.compile'd on GPUs."""
    return torch.compile(fn) if device.type == "cuda" else fn


def needs(reason: str | None) -> None:
    if reason is not None:
        raise Unavailable(reason)


def random_linear(d_in: int, d_out: int, bias: bool, device, dtype, g: torch.Generator) -> nn.Linear:
    m = nn.Linear(d_in, d_out, bias=bias, device=device, dtype=dtype)
    with torch.no_grad():
        m.weight.copy_(torch.randn(d_out, d_in, generator=g, device=device) / d_in ** 0.5)
        if bias:
            m.bias.copy_(torch.randn(d_out, generator=g, device=device) * 0.05)
    return m


def attention_op(name: str, queries: int, keys: int, causal: bool, calls: int, cfg: BagelConfig, device, dtype,
                 g: torch.Generator) -> Op:
    llm = cfg.llm
    q = torch.randn(queries, llm.num_attention_heads, llm.head_dim, generator=g, device=device, dtype=dtype)
    k = torch.randn(keys, llm.num_key_value_heads, llm.head_dim, generator=g, device=device, dtype=dtype)
    v = torch.randn(keys, llm.num_key_value_heads, llm.head_dim, generator=g, device=device, dtype=dtype)
    pairs = queries * keys - (queries * (queries - 1) // 2 if causal else 0)  # query-key pairs computed
    dev = torch.device(device)

    def fa4():
        needs(attention.fa4_unavailable(dev))
        return lambda i: attention.flash_attend(i["q"], i["k"], i["v"], causal)

    return Op(name, calls, flops=4.0 * pairs * llm.num_attention_heads * llm.head_dim,
              inputs={"q": q, "k": k, "v": v},
              reference=lambda i: attention.attend(i["q"].float(), i["k"].float(), i["v"].float(), causal),
              variants={"current": lambda: lambda i: attention.attend(i["q"], i["k"], i["v"], causal), "fa4": fa4})


def quack_variants(fn: Callable[[dict, bool], Tensor], device: torch.device) -> dict:
    """quack with its default config, and autotuned (timed in the last pass)."""
    def make(tuned: bool):
        def factory():
            needs(epilogue_gemm.quack_unavailable(device))
            return lambda i: fn(i, tuned)
        return factory
    return {"quack": make(False), "quack_autotuned": make(True)}


def build_ops(cfg: BagelConfig, size: int, device: torch.device, dtype: torch.dtype) -> tuple[list[Op], dict]:
    llm, tok = cfg.llm, demo_tokenizer()
    g = torch.Generator(device).manual_seed(0)
    t2i_tokens, t2i_contexts = denoise_shapes(cfg, tok, "t2i", size)
    edit_tokens, edit_contexts = denoise_shapes(cfg, tok, "edit", size)
    # Rows through the generation expert's layers in a two-branch forward: the majority expert
    # runs on all rows, markers included (PackedLayout.route), so the GEMMs see M = 2 x tokens.
    m = len(t2i_contexts) * t2i_tokens
    d, h, hd = llm.hidden_size, llm.intermediate_size, llm.head_dim
    hq, hkv, layers_n = llm.num_attention_heads, llm.num_key_value_heads, llm.num_hidden_layers
    shapes = {"t2i": {"query_tokens": t2i_tokens, "contexts": t2i_contexts},
              "edit": {"query_tokens": edit_tokens, "contexts": edit_contexts},
              "generation_rows": m, "hidden": d, "intermediate": h, "heads": hq, "kv_heads": hkv, "head_dim": hd,
              "layers": layers_n}
    ops: list[Op] = []
    for branch, ctx in zip(("cond", "cfg_text"), t2i_contexts):
        ops.append(attention_op(f"attention t2i {branch}", t2i_tokens, t2i_tokens + ctx, False, layers_n, cfg, device, dtype, g))

    x = torch.randn(m, d, generator=g, device=device, dtype=dtype)
    gate_up = random_linear(d, 2 * h, False, device, dtype, g)
    silu_mul = compiled(EAGER.silu_mul, device)
    ops.append(Op(
        "gate_up + SwiGLU", layers_n, flops=2.0 * m * d * 2 * h, inputs={"x": x},
        reference=lambda i: EAGER.silu_mul(*F.linear(i["x"].float(), gate_up.weight.float()).chunk(2, dim=-1)),
        variants={"current": lambda: lambda i: silu_mul(*F.linear(i["x"], gate_up.weight).chunk(2, dim=-1)),
                  **quack_variants(lambda i, tuned: epilogue_gemm.swiglu_gate_up(i["x"], gate_up.weight, tuned), device)}))

    for name, d_in in (("down + residual", h), ("o_proj + residual", hq * hd)):
        lin = random_linear(d_in, d, False, device, dtype, g)
        a = torch.randn(m, d_in, generator=g, device=device, dtype=dtype)
        residual = torch.randn(m, d, generator=g, device=device, dtype=dtype)
        ops.append(Op(
            name, layers_n, flops=2.0 * m * d_in * d, inputs={"a": a, "residual": residual}, mutated=("residual",),
            reference=lambda i, lin=lin: i["residual"].float() + F.linear(i["a"].float(), lin.weight.float()),
            variants={"current": lambda lin=lin: lambda i: layers.add_linear_(i["residual"], i["a"], lin),
                      **quack_variants(lambda i, tuned, lin=lin: epilogue_gemm.add_linear_(
                          i["residual"], i["a"], lin.weight, tuned), device)}))

    qkv = random_linear(d, (hq + 2 * hkv) * hd, True, device, dtype, g)
    ops.append(Op(
        "qkv (bias)", layers_n, flops=2.0 * m * d * (hq + 2 * hkv) * hd, inputs={"x": x},
        reference=lambda i: F.linear(i["x"].float(), qkv.weight.float(), qkv.bias.float()),
        variants={"current": lambda: lambda i: F.linear(i["x"], qkv.weight, qkv.bias),
                  **quack_variants(lambda i, tuned: epilogue_gemm.linear(i["x"], qkv.weight, qkv.bias, tuned), device)}))

    norm_w = (1 + 0.1 * torch.randn(d, generator=g, device=device)).to(dtype)
    rms_norm = compiled(EAGER.rms_norm, device)

    def quack_rmsnorm():
        needs(epilogue_gemm.quack_unavailable(device))
        from quack import rmsnorm
        return lambda i: rmsnorm(i["x"], norm_w, eps=llm.rms_norm_eps)

    ops.append(Op(
        "rms_norm", 2 * layers_n, bytes=2.0 * x.numel() * x.element_size(), inputs={"x": x},
        reference=lambda i: EAGER.rms_norm(i["x"].float(), norm_w.float(), llm.rms_norm_eps),
        variants={"current": lambda: lambda i: rms_norm(i["x"], norm_w, llm.rms_norm_eps), "quack": quack_rmsnorm}))

    qkv_out = torch.randn(m, (hq + 2 * hkv) * hd, generator=g, device=device, dtype=dtype)
    qn_w, kn_w = ((1 + 0.1 * torch.randn(hd, generator=g, device=device)).to(dtype) for _ in range(2))
    cos, sin = layers.rope_cos_sin(torch.arange(m, device=device) % 4096, hd, llm.rope_theta, dtype)
    qk_norm_rope = compiled(EAGER.qk_norm_rope, device)
    eps = llm.rms_norm_eps

    def split(t: Tensor) -> tuple[Tensor, Tensor]:
        q, k, _ = t.split([hq * hd, hkv * hd, hkv * hd], dim=1)
        return q.unflatten(1, (hq, hd)), k.unflatten(1, (hkv, hd))

    def both(t: Tensor, norm_rope) -> tuple[Tensor, Tensor]:
        q, k = split(t)
        return norm_rope(q, qn_w, eps, cos, sin), norm_rope(k, kn_w, eps, cos, sin)

    def joint_eager(t: Tensor, qw: Tensor, kw: Tensor, c: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        q, k = split(t)
        return EAGER.qk_norm_rope(q, qw, eps, c, s), EAGER.qk_norm_rope(k, kw, eps, c, s)

    def joint():
        fn = compiled(joint_eager, device)
        return lambda i: fn(i["t"], qn_w, kn_w, cos, sin)

    qk_bytes = 2.0 * m * (hq + hkv) * hd * 2
    ops.append(Op(
        "q/k norm + RoPE", layers_n, bytes=qk_bytes, inputs={"t": qkv_out},
        reference=lambda i: both(i["t"].float(), lambda a, w, e, c, s: EAGER.qk_norm_rope(a, w.float(), e, c.float(), s.float())),
        variants={"current": lambda: lambda i: both(i["t"], qk_norm_rope), "compiled_joint": joint}))

    for branch, ctx in zip(("cond", "cfg_text", "cfg_img"), edit_contexts):
        ops.append(attention_op(f"attention edit {branch}", edit_tokens, edit_tokens + ctx, False, layers_n, cfg, device, dtype, g))
    prompt = t2i_contexts[0]
    ops.append(attention_op("causal prompt prefill", prompt, prompt, True, 0, cfg, device, dtype, g))
    ops.append(attention_op("causal text after image", edit_contexts[2], edit_contexts[0], True, 0, cfg, device, dtype, g))
    return ops, shapes


def summarize(results: list[dict]) -> dict:
    """Per operation: the current path's ms per forward, the fastest exact candidate that beats
    it and what it would save per forward; the total over the text-to-image forward's ops."""
    summary, total = {}, 0.0
    for op in dict.fromkeys(r["op"] for r in results):
        rows = [r for r in results if r["op"] == op and "ms" in r]
        current = next((r for r in rows if r["variant"] == "current"), None)
        if current is None:
            continue
        faster = [r for r in rows if r["variant"] != "current" and r.get("exact") and r["ms"] < current["ms"]]
        best = min(faster, key=lambda r: r["ms"], default=None)
        saving = (current["ms"] - best["ms"]) * current["calls_per_forward"] if best else 0.0
        summary[op] = {"current_ms_per_forward": current["ms_per_forward"], "best": best["variant"] if best else None,
                       "best_speedup": best["speedup"] if best else None, "saving_ms_per_forward": saving}
        total += saving if not op.startswith("attention edit") else 0.0
    return {"ops": summary, "t2i_saving_ms_per_two_branch_forward": total}


def versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--name", default="kernels")
    p.add_argument("--device", default="cuda")
    p.add_argument("--checkpoint", default=None, help="read the model config here (default: BAGEL-7B-MoT)")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--budget-s", type=float, default=150.0, help="skip what is left after this many seconds")
    p.add_argument("--site", action="append", default=[], help="site folder holding carried kernel packages")
    args = p.parse_args(argv)
    start = time.monotonic()
    add_site_dirs(args.site)
    quack_settings()
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device(args.device)
    cfg = BagelConfig.from_checkpoint_dir(args.checkpoint) if args.checkpoint else BagelConfig()
    dtype = torch.bfloat16
    bench = Bench(args.device, start + args.budget_s, args.iters if device.type == "cuda" else 2)
    with torch.no_grad():
        ops, shapes = build_ops(cfg, args.size, device, dtype)
        report = {
            "benchmark": "kernels", "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "python": platform.python_version(), "commit": commit(), "packages": versions(),
            "settings": {**vars(args), "dtype": str(dtype), "tolerance": TOLERANCE}, "shapes": shapes,
        }

        def save() -> None:  # after every operation: a crash keeps what was measured
            report.update(wall_s=time.monotonic() - start, results=bench.results, summary=summarize(bench.results))
            write_report(report, args.out, f"{args.name}.json")

        for op in ops:
            bench.run(op, [v for v in op.variants if v != "quack_autotuned"])
            save()
        for op in ops:  # autotuning compiles and times dozens of configs per GEMM: last
            if "quack_autotuned" in op.variants:
                bench.run(op, ["quack_autotuned"], min_left_s=AUTOTUNE_S)
                save()
    print(json.dumps(report["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
