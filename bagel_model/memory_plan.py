"""The memory planner: which layout (pipeline stages, weight format, KV budget) fits the GPUs.

`plan_memory` adds up, per GPU, what the processes placed there hold at their peak, for a
workload of `concurrency` requests of an S x S edit (the largest context a request brings:
VAE and ViT tokens of the input image and a prompt):

- **weights** of each stage, exact per format (`quantize.stored_bytes`; df11 at its planning
  ratio), from the model's own modules, which have the checkpoint's names and shapes;
- **KV cache**: per request the conditional context, a fork of it and the text-only context
  (`request_kv_bytes`, from `cost.kv_bytes_per_token`), shared out by layers, plus the decode
  slots (`kv_cache.py`: preallocated for the contexts being decoded);
- **activations**: one denoising forward (all guidance branches at once with one stage, one
  branch per micro-batch with several), and on CUDA the same again for the CUDA-graph pool,
  which stays allocated while the image's graphs live; plus, for df11/int8/nf4, the largest
  weight being decompressed; with df11 the larger of that and the vocabulary-sized weight
  (token embedding, LM head: stored compressed too) decompressed on its own;
- **CUDA context** per process (`CUDA_CONTEXT_BYTES`);
- the **encoder** (ViT + VAE, a VAE encode at S) and **decoder** (VAE, a VAE decode at S)
  processes: on a spare GPU when there is one, else on GPU 0 (Ray packs fractional GPU shares
  onto the first GPU with room). With `processes="local"` everything is one process on one GPU
  (the CLI, `bench/quant.py`): the graph pool plus the largest of the other transients; the
  VAE decode comes after its request's KV cache is freed, so it only needs to fit beside the
  others'. There CUDA graphs are a speed option: a layout without them (`Plan.graphs`) is
  tried after the same layout with them.

Layers are split so the KV budget (`kv_cache_bytes`, per stage with the most layers) is as
large as possible. `auto` tries exact bf16 first, then df11 (lossless), int8, nf4; one stage
if the model fits one GPU, else one stage per GPU (and, for one process, with CUDA graphs
before without). bench/quant.py prints these estimates next to measured peaks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from .config import BagelConfig
from .cost import kv_bytes_per_token
from .errors import InvalidRequest
from .kv_cache import MIN_CAPACITY, _bucket
from .layers import FusedLinear
from .model import BagelStage
from .mot import MoTDecoderLayer
from .quantize import APPROXIMATE, stored_bytes, vocabulary_modules
from .segments import image_block_len
from .stage import StageSpec, full_model, split_layers
from .tokenizer import text_block_len
from .vae import AutoEncoder
from .vit import EncoderLayer, VisionEncoder

GiB = 1 << 30
CUDA_CONTEXT_BYTES = 512 << 20  # per process with CUDA (bench/quant.py measures it)
AUTO_MODES = (None, "df11", "int8", "nf4")  # exact first, then lossless, then the approximate ones
NF4_DEQUANT_FACTOR = 12  # bytes of temporaries per weight while torchao dequantizes an NF4 weight
DECODE_NEW_TOKENS = 512  # room the decode slots keep for generated tokens
MAX_DECODE_SLOTS = 8  # StageRunner's default


@dataclass(frozen=True)
class Workload:
    """`concurrency` requests at once, each an edit of an `image_size`^2 image (None: the
    model's largest) with a `prompt_tokens` prompt."""

    concurrency: int = 1
    image_size: int | None = None
    prompt_tokens: int = 256


@dataclass
class Process:
    """One process's share of a GPU: labelled byte counts."""

    name: str
    items: list[tuple[str, int]] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(b for _, b in self.items)


@dataclass
class Plan:
    num_stages: int
    layer_sizes: list[int]
    quantize: str | None
    quantize_vit: bool
    gpu_bytes: int
    gpus: list[list[Process]]  # per GPU, the processes placed there
    kv_cache_bytes: int  # KV budget per stage (for the stage with the most layers), as AppArgs
    request_kv_bytes: int  # one workload request's KV on that stage
    workload: Workload
    image_size: int
    graphs: bool | None = True  # CUDA graphs for denoising and decode steps (False: memory is tight; None: no CUDA)

    @property
    def requests(self) -> int:
        """Workload requests whose KV fits at once."""
        return self.kv_cache_bytes // self.request_kv_bytes

    def app_args(self) -> dict:
        """The `AppArgs` fields this plan sets."""
        return {"num_stages": self.num_stages, "layer_sizes": self.layer_sizes, "quantize": self.quantize,
                "kv_cache_bytes": self.kv_cache_bytes}

    def describe(self) -> str:
        fmt = self.quantize or "bf16 (exact)"
        if self.quantize in APPROXIMATE:
            fmt += " (APPROXIMATE)"
        elif self.quantize == "df11":
            fmt += " (lossless)"
        w = self.workload
        lines = [f"plan: {self.num_stages} stage{'s' if self.num_stages > 1 else ''} on {len(self.gpus)} GPU"
                 f"{'s' if len(self.gpus) > 1 else ''} of {_gib(self.gpu_bytes)}, weights {fmt}"
                 f"{', ViT too' if self.quantize_vit and self.quantize else ''}, layers per stage {self.layer_sizes}"
                 f"{', CUDA graphs off (they would not fit)' if self.graphs is False else ''}",
                 f"  workload: {w.concurrency} concurrent {self.image_size}x{self.image_size} edit(s) with "
                 f"{w.prompt_tokens}-token prompts"]
        for i, processes in enumerate(self.gpus):
            total = sum(p.bytes for p in processes)
            lines.append(f"  GPU {i}: {_gib(total)} of {_gib(self.gpu_bytes)} ({_gib(self.gpu_bytes - total)} free)")
            for p in processes:
                parts = ", ".join(f"{label} {_gib(b)}" for label, b in p.items)
                lines.append(f"    {p.name}: {parts}")
        lines.append(f"  KV budget per stage (kv_cache_bytes): {_gib(self.kv_cache_bytes)} = {self.requests} request(s) "
                     f"of {_gib(self.request_kv_bytes)}")
        return "\n".join(lines)


def _gib(b: int) -> str:
    return f"{b / GiB:.2f} GiB"


# -------------------------------------------------------------------------- components


def _linear_groups(module: torch.nn.Module) -> list[tuple[int, int]]:
    """Shapes of the weights `quantize.quantize_module` makes of a layer: each fused group
    concatenated, then the other linears."""
    fused = [m for m in module.modules() if isinstance(m, FusedLinear)]
    parts = {id(lin) for f in fused for lin in f.linears}
    shapes = [(sum(lin.out_features for lin in f.linears), f.linears[0].in_features) for f in fused]
    return shapes + [(m.out_features, m.in_features) for m in module.modules()
                     if isinstance(m, torch.nn.Linear) and id(m) not in parts]


def _module_bytes(build, quantize: str | None, dtype: torch.dtype, unit_types: tuple) -> int:
    """Stored bytes of `build()`'s parameters with the linear weights of `unit_types` modules in
    format `quantize` (worked out on the meta device)."""
    with torch.device("meta"):
        module = build()
    total = sum(p.numel() * dtype.itemsize for p in module.parameters())
    if quantize is None:
        return total
    if quantize == "df11":  # the vocabulary-sized weights too (quantize.compress_vocabulary)
        for m in vocabulary_modules(module):
            total += stored_bytes(quantize, tuple(m.weight.shape), dtype) - m.weight.numel() * dtype.itemsize
    for unit in (m for m in module.modules() if isinstance(m, unit_types)):
        for shape in _linear_groups(unit):
            total += stored_bytes(quantize, shape, dtype) - math.prod(shape) * dtype.itemsize
    return total


def stage_weight_bytes(config: BagelConfig, spec: StageSpec, quantize: str | None,
                       dtype: torch.dtype = torch.bfloat16) -> int:
    return _module_bytes(lambda: BagelStage(config, spec), quantize, dtype, (MoTDecoderLayer,))


def vision_weight_bytes(config: BagelConfig, quantize: str | None, dtype: torch.dtype = torch.bfloat16) -> int:
    return _module_bytes(lambda: VisionEncoder(config), quantize, dtype, (EncoderLayer,))


def vae_weight_bytes(config: BagelConfig, dtype: torch.dtype = torch.float32) -> int:
    return _module_bytes(lambda: AutoEncoder(config.vae), None, dtype, ())


def image_tokens(config: BagelConfig, size: int) -> tuple[int, int]:
    """(VAE, ViT) context tokens of an input image resized to `size` x `size`, markers included."""
    (w, h), (vw, vh) = config.input_image_sizes(size, size)
    return (image_block_len(math.prod(config.latent_grid(h, w))),
            image_block_len(math.prod(config.vit_grid(vh, vw))))


def request_kv_bytes(config: BagelConfig, size: int, prompt_tokens: int, layers: int, dtype_bytes: int = 2) -> int:
    """KV bytes one S x S edit holds on a stage of `layers` layers: the conditional context
    (image and prompt), the text-free fork (image only) and the image-free context (prompt)."""
    vae, vit = image_tokens(config, size)
    return kv_bytes_per_token(config.llm, dtype_bytes, layers) * (2 * (vae + vit) + 2 * text_block_len(prompt_tokens))


def decode_slot_bytes(config: BagelConfig, size: int, prompt_tokens: int, concurrency: int, layers: int,
                      dtype_bytes: int = 2) -> int:
    """The decode slots' K/V buffers once `concurrency` answers about an S x S image are decoded."""
    _, vit = image_tokens(config, size)
    slots = _bucket(min(concurrency, MAX_DECODE_SLOTS))
    capacity = _bucket(vit + prompt_tokens + DECODE_NEW_TOKENS, MIN_CAPACITY) + 1
    return slots * capacity * kv_bytes_per_token(config.llm, dtype_bytes, layers)


def forward_tokens(config: BagelConfig, size: int, branches: int) -> int:
    return branches * image_block_len(math.prod(config.latent_grid(size, size)))


def forward_activation_bytes(config: BagelConfig, tokens: int, dtype_bytes: int = 2) -> int:
    """Peak transient memory of a decoder layer over `tokens` packed tokens: the gate/up output
    (2 x intermediate), its SiLU product (1 x), and ~8 hidden-sized tensors (residual, norms,
    q/k/v, attention output)."""
    llm = config.llm
    return tokens * (3 * llm.intermediate_size + 8 * llm.hidden_size) * dtype_bytes


def dequant_transient_bytes(config: BagelConfig, quantize: str | None, dtype_bytes: int = 2) -> int:
    """The largest decoder-layer weight while it is decompressed or dequantized for its GEMM."""
    if quantize is None or quantize == "fp8":  # dense, or FP8 GEMMs on the stored weights
        return 0
    llm = config.llm
    largest = 2 * llm.intermediate_size * llm.hidden_size  # gate/up
    return largest * (NF4_DEQUANT_FACTOR if quantize == "nf4" else dtype_bytes)


def vocabulary_transient_bytes(config: BagelConfig, spec: StageSpec, quantize: str | None,
                               dtype_bytes: int = 2) -> int:
    """With df11, the token embedding (first stage) or LM head (last stage) decompressed whole
    for a lookup or the logits, with little else alive then (0 otherwise)."""
    if quantize != "df11" or not (spec.is_first or spec.is_last):
        return 0
    return config.llm.vocab_size * config.llm.hidden_size * dtype_bytes


def _vae_levels(config: BagelConfig) -> list[int]:
    return [config.vae.ch * m for m in config.vae.ch_mult]


def _block_peak(c_in: int, c_out: int) -> int:
    """Channels live at once in a residual block (vae.ResnetBlock): its input, the normalised
    input (activated in place) and the first conv's output, or the input and two outputs."""
    return max(2 * c_in + c_out, c_in + 2 * c_out)


def vae_decode_bytes(config: BagelConfig, size: int, dtype_bytes: int = 4) -> int:
    """Peak activations of a VAE decode to `size` x `size` pixels: the largest of a residual
    block's (`_block_peak`) or an upsample's input + two outputs, over the levels (highest
    resolution last)."""
    widths, cfg = _vae_levels(config), config.vae
    peak, res, channels = 0, size // cfg.downsample, widths[-1]
    for level in reversed(range(len(widths))):
        c_out = widths[level]
        peak = max(peak, _block_peak(channels, c_out) * res * res)
        channels = c_out
        if level != 0:
            peak = max(peak, channels * res * res + 2 * channels * (2 * res) ** 2)
            res *= 2
    return peak * dtype_bytes


def vae_encode_bytes(config: BagelConfig, size: int, dtype_bytes: int = 4) -> int:
    """Peak activations of a VAE encode of a `size` x `size` image (residual blocks as above,
    then each downsample's padded copy and output)."""
    widths, res, channels, peak = _vae_levels(config), size, config.vae.ch, 0
    for level, c_out in enumerate(widths):
        peak = max(peak, _block_peak(channels, c_out) * res * res)
        channels = c_out
        if level != len(widths) - 1:
            peak = max(peak, channels * res * res + channels * (res + 1) ** 2 + channels * (res // 2) ** 2)
            res //= 2
    return peak * dtype_bytes


# -------------------------------------------------------------------------- planning


def plan_memory(config: BagelConfig, gpus: int, gpu_bytes: int, workload: Workload = Workload(), *,
                num_stages: int | None = None, quantize: str | None = "auto", quantize_vit: bool = False,
                layer_sizes: list[int] | None = None, processes: str = "serve", cuda: bool = True,
                graphs: bool | None = None) -> Plan:
    """The first layout that fits (see the module docstring); `num_stages`, `quantize`,
    `layer_sizes` and `graphs` (one process only; None: with if they fit, else without) fix
    those choices instead. Raises `InvalidRequest` naming what would fit when nothing does.
    `cuda=False` plans for CPU memory (no CUDA context, no graph pools: the tests)."""
    if gpus < 1 or gpu_bytes <= 0:
        raise InvalidRequest(f"plan for at least one GPU with memory (got {gpus} GPUs of {gpu_bytes} bytes)")
    if processes not in ("serve", "local"):
        raise InvalidRequest(f"processes must be 'serve' or 'local', got {processes!r}")
    size = workload.image_size or config.max_image_side
    modes = AUTO_MODES if quantize == "auto" else (quantize,)
    layers = config.llm.num_hidden_layers
    if num_stages is not None and not 1 <= num_stages <= min(layers, gpus if processes == "serve" else layers):
        raise InvalidRequest(f"{num_stages} stages need as many GPUs and at most {layers} stages; "
                             f"there {'is' if gpus == 1 else 'are'} {gpus}")
    if graphs is not None and processes == "serve" and not graphs:
        raise InvalidRequest("the service always captures CUDA graphs; graphs=False plans one process (local)")
    graph_options = [None] if not cuda else [graphs] if graphs is not None else [True, False] if processes == "local" \
        else [True]
    candidates = [(mode, stages, with_graphs) for mode in modes
                  for stages in ([num_stages] if num_stages else sorted({1, min(gpus, layers)}))
                  if processes == "serve" or stages == 1 or num_stages is not None
                  for with_graphs in graph_options]

    def layout(mode: str | None, stages: int, with_graphs: bool | None, load: Workload, side: int) -> Plan:
        return _layout(config, gpus, gpu_bytes, load, side, stages, mode, quantize_vit, processes, cuda, layer_sizes,
                       with_graphs)

    for candidate in candidates:
        plan = layout(*candidate, workload, size)
        if plan.requests >= workload.concurrency:
            return plan
    raise InvalidRequest(f"no layout fits {workload.concurrency} concurrent {size}x{size} edit(s) on {gpus} GPU(s) of "
                         f"{_gib(gpu_bytes)} with quantize={quantize}: {_what_fits(layout, candidates, workload, size)}. "
                         "Ask for fewer requests, a smaller image size, more or larger GPUs, or another weight format "
                         "(bagel plan shows the arithmetic)")


def _what_fits(layout, candidates: list, workload: Workload, size: int) -> str:
    """The most requests one of the candidate layouts holds at this size, else the largest
    image size at which one fits."""
    one = replace(workload, concurrency=1)
    best = max((layout(*c, one, size) for c in candidates), key=lambda p: p.requests)
    if best.requests >= 1:
        # decode slots grow with the concurrency: check the count before naming it
        most = next(n for n in range(best.requests, 0, -1) if layout(
            best.quantize, best.num_stages, best.graphs, replace(workload, concurrency=n), size).requests >= n)
        return f"the roomiest, {best.quantize or 'bf16'} weights in {best.num_stages} stage(s), holds {most} such request(s)"
    for side in range(size - 128, 127, -128):
        for mode, stages, with_graphs in candidates:
            if layout(mode, stages, with_graphs, one, side).requests >= 1:
                return f"one request fits at {side}x{side} with {mode or 'bf16'} weights in {stages} stage(s)"
    return "not even one request of 128x128 fits"


def _layout(config: BagelConfig, gpus: int, gpu_bytes: int, workload: Workload, size: int, stages: int,
            mode: str | None, quantize_vit: bool, processes: str, cuda: bool, layer_sizes: list[int] | None,
            graphs: bool | None) -> Plan:
    layers = config.llm.num_hidden_layers
    context = [("CUDA context", CUDA_CONTEXT_BYTES)] if cuda else []
    branches = 3 if stages == 1 else 1  # edit: COND, CFG_TEXT, CFG_IMG in one micro-batch, or one each
    forward = forward_activation_bytes(config, forward_tokens(config, size, branches))
    pool = [("CUDA-graph pool (one forward)", forward)] if cuda and graphs else []
    transient = dequant_transient_bytes(config, mode)
    vision, vae = vision_weight_bytes(config, mode if quantize_vit else None), vae_weight_bytes(config)
    weights = _StageWeights(config, mode)
    request = request_kv_bytes(config, size, workload.prompt_tokens, layers)

    def stage_process(spec: StageSpec) -> Process:
        vocabulary = vocabulary_transient_bytes(config, spec, mode)
        items = [("weights", weights(spec)), *pool,
                 ("decode slots", decode_slot_bytes(config, size, workload.prompt_tokens, workload.concurrency,
                                                    len(spec.layers)))]
        if vocabulary > forward + transient:
            items.append(("activations (the vocabulary weight decoded, df11)", vocabulary))
        else:
            items.append(("activations (one forward)", forward))
            items += [(f"largest weight decoded ({mode})", transient)] if transient else []
        return Process(f"stage {spec.index} (layers {spec.layers.start}-{spec.layers.stop - 1})", items + context)

    if processes == "local":  # one process: the weights add up, the transients take turns
        spec = full_model(layers)
        process = Process("all components (one process)", [
            ("LLM weights", weights(spec)), ("ViT + VAE weights", vision + vae),
            ("decode slots", decode_slot_bytes(config, size, workload.prompt_tokens, workload.concurrency, layers)),
            *pool, ("activations (largest of: one forward with its largest weight decoded, the vocabulary weight "
                    "decoded, VAE decode less its request's KV, VAE encode)",
                    max(forward + transient, vocabulary_transient_bytes(config, spec, mode),
                        vae_decode_bytes(config, size) - request, vae_encode_bytes(config, size)))] + context)
        placement, sizes = [[process]], [layers]
    else:
        extras = [Process("encoder", [("ViT + VAE weights", vision + vae),
                                      ("VAE encode", vae_encode_bytes(config, size))] + context),
                  Process("decoder", [("VAE weights", vae), ("VAE decode", vae_decode_bytes(config, size))] + context)]
        on_gpu0 = sum(p.bytes for p in extras) if gpus <= stages else 0
        sizes = layer_sizes or _split(layers, stages, lambda specs: [stage_process(x).bytes for x in specs],
                                      on_gpu0, gpu_bytes)
        placement = [[stage_process(spec)] for spec in split_layers(layers, stages, sizes)]
        placement += [[] for _ in range(gpus - stages)]
        (placement[stages] if gpus > stages else placement[0]).extend(extras)
    max_layers = max(sizes)
    budget = max(0, min((gpu_bytes - sum(p.bytes for p in procs)) * max_layers // n
                        for procs, n in zip(placement, sizes)))
    for procs, n in zip(placement, sizes):
        procs[0].items.append((f"KV budget x {n}/{max_layers} layers", budget * n // max_layers))
    request = request_kv_bytes(config, size, workload.prompt_tokens, max_layers)
    return Plan(stages, sizes, mode, quantize_vit, gpu_bytes, placement, budget, request, workload, size, graphs)


class _StageWeights:
    """Stage weight bytes as layers x one layer + the first and last stages' extras (three
    meta-device builds instead of one per candidate split)."""

    def __init__(self, config: BagelConfig, mode: str | None):
        one_layer = lambda index: stage_weight_bytes(config, StageSpec(index, 3, range(0, 1)), mode)  # noqa: E731
        self.layer = one_layer(1)  # neither first nor last
        self.first, self.last = one_layer(0) - self.layer, one_layer(2) - self.layer

    def __call__(self, spec: StageSpec) -> int:
        return len(spec.layers) * self.layer + self.first * spec.is_first + self.last * spec.is_last


def _split(layers: int, stages: int, stage_bytes, on_gpu0: int, gpu_bytes: int) -> list[int]:
    """Layers per stage maximising the KV budget (free memory per layer of the tightest stage,
    times the most layers): moves one layer at a time while that helps."""

    def budget(sizes: list[int]) -> float:
        used = stage_bytes(split_layers(layers, stages, sizes))
        used[0] += on_gpu0
        return min((gpu_bytes - u) / n for u, n in zip(used, sizes)) * max(sizes)

    sizes = [len(s.layers) for s in split_layers(layers, stages)]
    best = budget(sizes)
    while stages > 1:
        moves = []
        for a in range(stages):
            for b in range(stages):
                if a != b and sizes[a] > 1:
                    trial = sizes[:]
                    trial[a] -= 1
                    trial[b] += 1
                    moves.append(trial)
        trial = max(moves, key=budget)
        if budget(trial) <= best:
            break
        sizes, best = trial, budget(trial)
    return sizes
