"""Our side of the side-by-side with the official code: the official harness's runs
(bench/results/official_h200.json, copied unchanged from ../shared/research/official-h200.json)
repeated with the same settings in one process, on the full-size BAGEL-7B-MoT architecture with
random bf16 weights (bench/latency.py's build) or a real checkpoint, each run's seconds set
against the official ones read from that file.

    python -m bench.side_by_side --out bench/results --name side_by_side_h200 [--attention fa4 --norm quack --site /tmp/site]

Everything is read from the official JSON: its runs in their order (warm-ups first), the seed
(every run's noise), the notebook knobs of text-to-image and editing, the image sizes (t2i output,
edit and understanding inputs, all on the GPU, VAE included), the warm-ups' sizes and steps, the
answer length, and the prompts. With a checkpoint's tokenizer the prompts are used as they are.
Random-weight builds have the demo tokenizer (bytes, no merges), so each prompt's ids are cut to
the official count (or repeated up to it) and decoded back to text; that text's count is checked.
max_think_token_n counts the leading <|im_start|> (pipelines/params.TextParams): the official 128
decoding forwards make 127 tokens and one more that is dropped; ours make the 127. cuDNN's flags stay
ours (the official harness set deterministic; the report records both). --size, --warmup-size,
--steps and --answer-tokens override the official values (for the CPU test); the report then says
`same_settings_as_official: false`.

With --attention / --mlp / --norm (bench/kernel_args.py), each optional kernel named then runs on
its own on the same model: text-to-image and edit as in the official runs, after a full-size
warm-up with the official warm-up's steps, each final latent compared with the default kernels'
one on the same noise. The bound is check_fastpaths' standard, that a fast path may be no further
off than the plain path (bench/kernels.py's TOLERANCE), taken end to end: the plain elementwise
kernels (no torch.compile) are run the same way, and a kernel is within the bound when its max
|diff| and relative L2 to the default are at most TOLERANCE x the plain path's. The JSON and its
Markdown table are rewritten after every run; kernels that would start after --budget-s are
skipped. The last stdout line is the JSON report.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bagel_model.kernels import KernelChoice, select_kernels, use_kernels
from bagel_model.tokenizer import text_block_len
from bench.check_fastpaths import deviation
from bench.kernel_args import add_kernel_args, kernel_choice
from bench.kernels import TOLERANCE
from bench.latency import Timed, build, sync
from bench.provenance import commit, write_report
from bench.report import side_by_side_table
from pipelines.noise import NoiseSource
from pipelines.params import ImageParams, TextParams, with_overrides
from pipelines.tasks import generate_image, understand

OFFICIAL = Path(__file__).resolve().parent / "results" / "official_h200.json"
GIB = 1 << 30


@dataclass(frozen=True)
class Job:
    """One run of the official harness: `task` "t2i", "edit" or "und"; `side` the t2i output's or
    the input image's side; `steps` the timesteps, or for "und" the answer's max_think_token_n."""

    name: str
    task: str
    side: int
    steps: int

    @property
    def warmup(self) -> bool:
        return self.name.startswith("warmup_")


def official_jobs(official: dict, args: argparse.Namespace) -> list[Job]:
    """The official runs in their order, with this command's overrides."""
    s, jobs = official["settings"], []
    for name in official["runs"]:
        if name.startswith("warmup_"):
            task = name.removeprefix("warmup_")
            side, steps = s["warmups"][task]
            jobs.append(Job(name, task, args.warmup_size or side, steps))
            continue
        task = name.split("_")[0]
        knobs = s[f"{task}_notebook"]
        side = (knobs["image_shapes"] if task == "t2i" else knobs["input_image"])[0]
        steps = knobs["max_think_token_n"] if task == "und" else knobs["num_timesteps"]
        jobs.append(Job(name, task, args.size or side, (args.answer_tokens if task == "und" else args.steps) or steps))
    return jobs


def image_params(knobs: dict, job: Job) -> ImageParams:
    """The notebook's sampler knobs (same names as ours), at the job's steps and t2i size."""
    names = {f.name for f in fields(ImageParams)}
    params = with_overrides(ImageParams(), {k: v for k, v in knobs.items() if k in names})
    params = replace(params, num_timesteps=job.steps)
    return replace(params, height=job.side, width=job.side) if job.task == "t2i" else params


def fit_prompt(tokenizer, text: str, block_tokens: int) -> str:
    """`text` with its token ids cut to (or repeated up to) the count that makes a text block of
    `block_tokens`, decoded back to text."""
    n = block_tokens - text_block_len(0)
    ids = tokenizer.encode(text)
    fitted = tokenizer.decode((ids * math.ceil(n / len(ids)))[:n])
    if len(tokenizer.encode(fitted)) != n:
        raise ValueError(f"cannot fit {text[:40]!r}... to {n} tokens with this tokenizer")
    return fitted


def prompts(official: dict, tokenizer, fit: bool) -> dict[str, dict]:
    s = official["settings"]
    out = {}
    for task, block in s["prompt_tokens"].items():
        text = s[f"{task}_prompt"]
        text = fit_prompt(tokenizer, text, block) if fit else text
        out[task] = {"text": text, "tokens": text_block_len(len(tokenizer.encode(text))), "official_tokens": block,
                     "how": "official ids cut or repeated to the official count" if fit else "official prompt"}
    return out


def random_image(side: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


class TimedText(Timed):
    """`Timed`, plus when the first text-decoding step started and how many ran."""

    def reset(self) -> None:
        super().reset()
        self.first_decode, self.decode_steps = None, 0

    def decode(self, segments):
        if self.first_decode is None:
            sync()
            self.first_decode = time.perf_counter()
        self.decode_steps += 1
        return self.inner.decode(segments)


class SideBySide:
    def __init__(self, args: argparse.Namespace, official: dict):
        self.args, self.official = args, official
        self.settings = official["settings"]
        self.start = time.perf_counter()
        self.cuda = args.device == "cuda"
        requested = kernel_choice(args, compile=None)  # the carried packages importable first
        self.default = KernelChoice()
        default = select_kernels(args.device, self.default)
        self.executor = TimedText(build(args.checkpoint, args.device, None, default))
        self.prompts = prompts(official, self.executor.tokenizer, fit=not args.checkpoint)
        self.jobs = official_jobs(official, args)
        self.seed = self.settings["seed"]
        self.kernels = {f"{f}={getattr(requested, f)}": replace(self.default, **{f: getattr(requested, f)})
                        for f in ("attention", "mlp", "norm") if getattr(requested, f) != getattr(self.default, f)}
        overrides = {k: getattr(args, k) for k in ("size", "warmup_size", "steps", "answer_tokens") if getattr(args, k)}
        device = torch.cuda.get_device_name(0) if self.cuda else platform.processor() or "cpu"
        self.report = {
            "benchmark": "side_by_side", "device": device, "torch": torch.__version__,
            "python": platform.python_version(), "commit": commit(),
            "weights": args.checkpoint or "random bf16 (full-size BAGEL-7B-MoT architecture)",
            "official": {"file": Path(args.official).name, "official_commit": official["official_commit"],
                         "device": official["device"]["gpu"], "torch": official["device"]["torch"]},
            "same_settings_as_official": not overrides, "overrides": overrides, "seed": self.seed,
            "prompts": self.prompts, "kernels_in_effect": vars(default.choice),
            "cudnn": {"ours": {"deterministic": torch.backends.cudnn.deterministic,
                               "benchmark": torch.backends.cudnn.benchmark},
                      "official": self.settings["cudnn"]},
            "build_s": time.perf_counter() - self.start, "settings": vars(args), "runs": {}, "summary": {},
            "kernels": {}, "skipped": []}
        self.latents: dict[str, torch.Tensor] = {}  # the default kernels' first timed t2i / edit

    def run(self) -> None:
        for job in self.jobs:
            row, latent = self.run_job(job)
            if not job.warmup:
                self.compare(job.name, row)
                if latent is not None and job.task in self.latents:  # the same run again
                    row["latent_equal_to_first_run"] = torch.equal(latent, self.latents[job.task])
                elif latent is not None:
                    self.latents[job.task] = latent
            self.report["runs"][job.name] = row
            self.write()
        if self.kernels:
            self.kernel_variants()

    def items(self, job: Job) -> list:
        prompt = self.prompts[job.task]["text"]
        return [prompt] if job.task == "t2i" else [random_image(job.side, self.seed), prompt]

    def run_job(self, job: Job, steps: int | None = None) -> tuple[dict, torch.Tensor | None]:
        """Runs `job` (with `steps` instead of its own, if given); returns its timings and the
        final latent of an image."""
        job = replace(job, steps=steps or job.steps)
        ex = self.executor
        ex.reset()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        knobs = self.settings[f"{job.task}_notebook"]
        latent = None
        sync()
        t = time.perf_counter()
        if job.task == "und":  # max_think_token_n counts the leading <|im_start|> (pipelines/params.TextParams)
            params = TextParams(max_new_tokens=job.steps - 1, do_sample=knobs["do_sample"])
            result = understand(ex, self.items(job), params, seed=self.seed)
            sync()
            end = time.perf_counter()
            decode_s = end - ex.first_decode
            row = {"total_s": end - t, "prefill_s": ex.first_decode - t, "decode_s": decode_s,
                   "decode_steps": ex.decode_steps, "tokens": len(result.token_ids),
                   "decode_tokens_per_s": ex.decode_steps / decode_s}
        else:
            result = generate_image(ex, self.items(job), image_params(knobs, job), noise=NoiseSource(self.seed))
            sync()
            end = time.perf_counter()
            row = {"total_s": end - t, "denoise_loop_s": ex.last_denoise - ex.first_denoise,
                   "vae_decode_s": ex.decode_s, "llm_forwards_denoise": sum(ex.denoise_calls),
                   "image_size": [result.image.height, result.image.width], "num_timesteps": job.steps}
            latent = result.latent
        if self.cuda:
            row["peak_gib_allocated"] = torch.cuda.max_memory_allocated() / GIB
        print(job.name, json.dumps(row), flush=True)
        return row, latent

    def compare(self, name: str, row: dict) -> None:
        theirs = self.official["runs"][name]
        row["official"] = {k: theirs[k] for k in ("total_s", "denoise_loop_s", "vae_decode_s", "decode_s",
                                                  "decode_steps", "decode_tokens_per_s") if k in theirs}
        row["speedup"] = theirs["total_s"] / row["total_s"]
        self.report["summary"][name] = {"official_s": theirs["total_s"], "ours_s": row["total_s"],
                                        "speedup": row["speedup"]}

    def kernel_variants(self) -> None:
        """The plain elementwise kernels (the bound), then each optional kernel on its own."""
        timed, warm = {}, {}  # the first timed run of t2i and edit; the warm-ups' steps
        for job in self.jobs:
            if job.warmup:
                warm[job.task] = job.steps
            elif job.task in self.latents:
                timed.setdefault(job.task, job)
        variants = {"plain (no torch.compile)": replace(self.default, compile=False), **self.kernels}
        for name, choice in variants.items():
            if time.perf_counter() - self.start > self.args.budget_s:
                self.report["skipped"].append(name)
                continue
            entry = self.report["kernels"][name] = {}
            try:
                entry["in_effect"] = [vars(use_kernels(s, choice)) for s in self.executor.inner.stages]
                for task, job in timed.items():
                    self.run_job(job, steps=warm.get(task))  # compiles, JIT, autotuning: out of the timing
                    row, latent = self.run_job(job)
                    row["vs_default"] = deviation(latent, self.latents[task])
                    entry[task] = row
            except Exception as e:  # one shot on the GPU: a kernel that fails is a result, the others go on
                entry["error"] = f"{type(e).__name__}: {e}"[:400]
            self.judge()
            self.write()

    def judge(self) -> None:
        """`within_bound` of every kernel measured on both tasks, once the plain path's bound is."""
        kernels = self.report["kernels"]
        bound = kernels.get("plain (no torch.compile)", {})
        tasks = ("t2i", "edit")
        if not all(t in bound for t in tasks):
            return
        self.report["tolerance"] = TOLERANCE
        for entry in kernels.values():
            if all(t in entry for t in tasks):
                entry["within_bound"] = all(entry[t]["vs_default"][k] <= TOLERANCE * bound[t]["vs_default"][k]
                                            for t in tasks for k in ("max_abs_diff", "relative_l2"))

    def write(self) -> None:
        self.report["elapsed_s"] = time.perf_counter() - self.start
        path = write_report(self.report, self.args.out, f"{self.args.name}.json")
        path.with_suffix(".md").write_text(side_by_side_table(self.report))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--official", default=str(OFFICIAL), help="the official harness's JSON")
    p.add_argument("--checkpoint", default=None, help="real checkpoint folder (default: random full-size weights)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", type=int, default=None, help="instead of the official image sides (t2i, edit, und)")
    p.add_argument("--warmup-size", type=int, default=None, help="instead of the official warm-ups' sides")
    p.add_argument("--steps", type=int, default=None, help="instead of the official timesteps")
    p.add_argument("--answer-tokens", type=int, default=None, help="instead of the official max_think_token_n")
    p.add_argument("--budget-s", type=float, default=200.0, help="no kernel variant starts after this many seconds")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--name", default="side_by_side")
    add_kernel_args(p)
    args = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    bench = SideBySide(args, json.loads(Path(args.official).read_text()))
    bench.run()
    print(json.dumps(bench.report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
