"""Hardware profiles of the timing-faithful simulation: how long a GPU takes for a micro-batch.

A `Profile` turns a call's token counts into seconds with a small roofline model:

- linear layers: FLOPs at the profile's sustained GEMM rate, but never faster than reading the
  weights of each expert the call uses (decode steps and short prefills are memory-bound). In a
  mixed call the majority expert runs on every row and the minority on its own rows, as
  `PackedLayout.route` does;
- attention: FLOPs at the sustained attention rate;
- elementwise work (norms, SwiGLU, RoPE, copies): a time per token and layer;
- a fixed time per layer (gaps between kernels), and per denoising call on the last stage (the
  sampler step and latent embedding);
- stage to stage: `Link.seconds` of the hidden states' bytes.

The numbers are data (`hardware.json`): an `h200` entry calibrated from our measurements under
bench/results (each derived number is recomputed here from those files, never typed in), and
entries `scaled_from` it by public peak specifications (`rtx4090`). `Profile.derivation` says
where every number came from.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import cost
from .config import BagelConfig, LLMConfig
from .memory_plan import GiB

DATA = Path(__file__).with_name("hardware.json")
RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


@dataclass(frozen=True)
class Block:
    """One segment of a call as the cost model sees it."""

    tokens: int
    context: int = 0  # cached tokens it attends to (besides itself)
    latent: bool = False  # VAE / noise block: its inner tokens go to the generation expert
    logits: bool = False  # the last stage computes its last token's logits
    noise: bool = False  # a block being denoised


@dataclass(frozen=True)
class Link:
    name: str
    bytes_per_s: float
    latency_s: float
    copies: int  # 1: device to device; 2: staged through host memory (sender and receiver copy)

    def copy_s(self, nbytes: int) -> float:
        """One copy's time; a hop is `copies` of them plus the latency."""
        return nbytes / self.bytes_per_s

    def seconds(self, nbytes: int) -> float:
        return self.latency_s + self.copies * self.copy_s(nbytes)


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    memory_bytes: int
    gemm_flops_per_s: float
    attention_flops_per_s: float
    memory_bytes_per_s: float
    layer_s: float  # fixed time per decoder layer and call
    token_layer_s: float  # elementwise time per token and decoder layer
    denoise_call_s: float  # per call with noise blocks, on the last stage
    vae_flops_per_s: float
    link: Link
    dtype_bytes: int = 2
    derivation: dict = field(default_factory=dict, compare=False)

    def forward_s(self, llm: LLMConfig, blocks: list[Block], layers: int, last: bool) -> float:
        """Seconds of one micro-batch through `layers` decoder layers (plus the heads on the last
        stage), without stage-to-stage transfers."""
        rows = sum(b.tokens for b in blocks)
        gen = sum(b.tokens - 2 for b in blocks if b.latent)
        und = rows - gen
        weights = cost.expert_weight_bytes(llm, self.dtype_bytes) * layers
        gemm = 0.0
        for expert_rows in ((rows, min(gen, und)) if gen and und else (rows,)):
            gemm += max(cost.gemm_flops(llm, expert_rows, layers) / self.gemm_flops_per_s,
                        weights / self.memory_bytes_per_s)
        attention = sum(cost.attention_flops(llm, b.tokens, b.context, layers) for b in blocks)
        seconds = gemm + attention / self.attention_flops_per_s
        seconds += layers * (self.layer_s + rows * self.token_layer_s)
        if last:
            if any(b.logits for b in blocks):
                seconds += cost.lm_head_bytes(llm, self.dtype_bytes) / self.memory_bytes_per_s
            if any(b.noise for b in blocks):
                seconds += self.denoise_call_s
        return seconds

    def hidden_bytes(self, llm: LLMConfig, tokens: int) -> int:
        return tokens * llm.hidden_size * self.dtype_bytes

    def vit_s(self, config: BagelConfig, lengths: list[int]) -> float:
        gemm, attention = cost.vit_flops(config.vit, config.llm.hidden_size, lengths)
        return (gemm / self.gemm_flops_per_s + attention / self.attention_flops_per_s
                + config.vit.num_hidden_layers * self.layer_s)

    def vae_decode_s(self, config: BagelConfig, height: int, width: int) -> float:
        return cost.vae_decode_flops(config.vae, height, width) / self.vae_flops_per_s

    def vae_encode_s(self, config: BagelConfig, height: int, width: int) -> float:
        return cost.vae_encode_flops(config.vae, height, width) / self.vae_flops_per_s

    def summary(self) -> dict:
        """The profile's numbers in readable units, with their derivation (for reports)."""
        return {"name": self.name, "description": self.description, "memory_gib": self.memory_bytes / GiB,
                "gemm_tflops": self.gemm_flops_per_s / 1e12, "attention_tflops": self.attention_flops_per_s / 1e12,
                "memory_GBps": self.memory_bytes_per_s / 1e9, "layer_us": self.layer_s * 1e6,
                "token_layer_ns": self.token_layer_s * 1e9, "denoise_call_ms": self.denoise_call_s * 1e3,
                "vae_tflops": self.vae_flops_per_s / 1e12,
                "link": {"name": self.link.name, "GBps": self.link.bytes_per_s / 1e9,
                         "latency_us": self.link.latency_s * 1e6, "copies": self.link.copies},
                "derivation": self.derivation}


def profile_names() -> list[str]:
    return sorted(json.loads(DATA.read_text()))


def load_profile(name: str, results_dir: str | Path | None = None) -> Profile:
    """The named profile of hardware.json, calibrated from the measurements in `results_dir`
    (default: the repository's bench/results)."""
    entries = json.loads(DATA.read_text())
    if name not in entries:
        raise ValueError(f"unknown hardware profile {name!r}; known: {sorted(entries)}")
    entry = entries[name]
    results = Path(results_dir) if results_dir else RESULTS
    if "calibration" in entry:
        return _calibrated(name, entry, results)
    reference = entries[entry["scaled_from"]]
    return _scaled(name, entry, load_profile(entry["scaled_from"], results), reference)


def _link(entry: dict) -> Link:
    link = entry["link"]
    return Link(link["name"], link["GBps"] * 1e9, link["latency_us"] * 1e-6, link["copies"])


def _read(results: Path, filename: str) -> dict:
    path = results / filename
    if not path.is_file():
        raise FileNotFoundError(f"calibration file missing: {path} (the profile is derived from it)")
    return json.loads(path.read_text())


def _calibrated(name: str, entry: dict, results: Path) -> Profile:
    """Rates and overheads that reproduce our measurements of the full-size architecture:
    GEMM and attention rates from the profiled two-branch denoising forward's kernel times;
    per-layer and per-token overheads from the rest of that forward together with the profiled
    decode step (two equations, two unknowns); the per-call denoising overhead from the
    in-process text-to-image loop; the VAE rate from its measured decode."""
    profiled = _read(results, entry["calibration"]["profile"])
    latency = _read(results, entry["calibration"]["latency"])
    config = BagelConfig()
    llm, layers = config.llm, config.llm.num_hidden_layers
    bandwidth = entry["peak"]["memory_GBps"] * 1e9
    base = Profile(name, entry["description"], int(entry["memory_gib"] * GiB), 1.0, 1.0, bandwidth, 0.0, 0.0, 0.0,
                   1.0, _link(entry))

    settings = profiled["settings"]
    side = settings["size"] // config.latent_downsample
    contexts = [settings["prompt_tokens"]] + [0] * (settings["branches"] - 1)  # COND holds the prompt
    forward = [Block(side * side + 2, c, latent=True, noise=True) for c in contexts]
    rows = sum(b.tokens for b in forward)
    gemm_s, attention_s = profiled["by_kind_ms"]["gemm"] / 1e3, profiled["by_kind_ms"]["attention"] / 1e3
    minority_s = cost.expert_weight_bytes(llm) * layers / bandwidth  # the marker rows' expert: memory-bound
    gemm_rate = cost.gemm_flops(llm, rows, layers) / (gemm_s - minority_s)
    attention_rate = sum(cost.attention_flops(llm, b.tokens, b.context, layers) for b in forward) / attention_s
    rated = replace(base, gemm_flops_per_s=gemm_rate, attention_flops_per_s=attention_rate)

    decode = profiled["decode"]
    step = [Block(1, decode["context_tokens"], logits=True)]
    rest_forward = profiled["forward_ms"] / 1e3 - rated.forward_s(llm, forward, layers, last=False)
    rest_decode = decode["ms_per_token"] / 1e3 - rated.forward_s(llm, step, layers, last=True)
    token_layer_s = (rest_forward - rest_decode) / ((rows - 1) * layers)
    layer_s = rest_decode / layers - token_layer_s
    if min(token_layer_s, layer_s) < 0:
        raise ValueError(f"{name}: calibration gives negative overheads ({layer_s=}, {token_layer_s=})")
    timed = replace(rated, layer_s=layer_s, token_layer_s=token_layer_s)

    t2i = latency["results"]["t2i"]
    size = t2i["settings"]["height"], t2i["settings"]["width"]
    grid = (size[0] // config.latent_downsample) * (size[1] // config.latent_downsample)
    calls = t2i["denoise_calls"]
    modelled = sum(timed.forward_s(llm, [Block(grid + 2, c, latent=True, noise=True) for c in contexts[:n]],
                                   layers, last=False) for n in calls)
    denoise_call_s = max(0.0, (t2i["denoise_s"]["median"] - modelled) / len(calls))
    vae_rate = cost.vae_decode_flops(config.vae, *size) / t2i["vae_decode_s"]["median"]
    derivation = {
        "gemm_tflops": f"{profiled['settings']['branches']}-branch {settings['size']}² forward: GEMM FLOPs / "
                       f"GEMM kernel time {gemm_s * 1e3:.1f} ms ({entry['calibration']['profile']})",
        "attention_tflops": f"attention FLOPs / attention kernel time {attention_s * 1e3:.1f} ms",
        "layer_us, token_layer_ns": f"rest of the forward ({rest_forward * 1e3:.1f} ms of "
                                    f"{profiled['forward_ms']:.1f}) and of the decode step "
                                    f"({rest_decode * 1e3:.2f} ms of {decode['ms_per_token']:.2f})",
        "denoise_call_ms": f"in-process text-to-image denoising {t2i['denoise_s']['median']:.2f} s over "
                           f"{len(calls)} calls minus the modelled forwards {modelled:.2f} s "
                           f"({entry['calibration']['latency']})",
        "vae_tflops": f"VAE decode FLOPs at {size[0]}x{size[1]} / {t2i['vae_decode_s']['median'] * 1e3:.0f} ms",
        "link": entry["link"]["why"], "sources": entry["sources"],
    }
    return replace(timed, denoise_call_s=denoise_call_s, vae_flops_per_s=vae_rate, derivation=derivation)


def _scaled(name: str, entry: dict, ref: Profile, ref_entry: dict) -> Profile:
    """`ref`'s sustained fractions of peak applied to this GPU's peaks: GEMM and attention by the
    dense BF16 peak, the VAE (float32 convolutions on TF32 tensor cores) by the TF32 peak,
    elementwise time by memory bandwidth; per-layer and per-call gaps unchanged."""
    peak, ref_peak = entry["peak"], ref_entry["peak"]
    bf16 = peak["bf16_dense_tflops"] / ref_peak["bf16_dense_tflops"]
    tf32 = peak["tf32_dense_tflops"] / ref_peak["tf32_dense_tflops"]
    memory = peak["memory_GBps"] / ref_peak["memory_GBps"]
    gemm = ref.gemm_flops_per_s * bf16
    derivation = {
        "gemm_tflops": f"{ref.name}'s sustained GEMM rate {ref.gemm_flops_per_s / 1e12:.0f} TFLOP/s = "
                       f"{ref.gemm_flops_per_s / 1e12 / ref_peak['bf16_dense_tflops']:.0%} of its dense BF16 peak, "
                       f"applied to {peak['bf16_dense_tflops']} TFLOP/s: {gemm / 1e12:.0f} TFLOP/s",
        "attention_tflops": f"{ref.name}'s attention rate x {bf16:.3f} (BF16 peak ratio)",
        "vae_tflops": f"{ref.name}'s VAE rate x {tf32:.3f} (TF32 peak ratio)",
        "token_layer_ns": f"{ref.name}'s x {1 / memory:.2f} (memory bandwidth ratio)",
        "layer_us, denoise_call_ms": f"as {ref.name} (kernel gaps and host work)",
        "link": entry["link"]["why"], "sources": entry["sources"],
    }
    return replace(ref, name=name, description=entry["description"], memory_bytes=int(entry["memory_gib"] * GiB),
                   gemm_flops_per_s=gemm, attention_flops_per_s=ref.attention_flops_per_s * bf16,
                   memory_bytes_per_s=peak["memory_GBps"] * 1e9, token_layer_s=ref.token_layer_s / memory,
                   vae_flops_per_s=ref.vae_flops_per_s * tf32, link=_link(entry), derivation=derivation)
