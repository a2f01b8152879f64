"""What partial images cost: text-to-image in this process with 0 previews, then with
`--previews` previews through each preview decoder (pipelines/previews.py), as the service makes
them (rendered on another thread, PNG-encoded and base64'd), with the full-size BAGEL-7B-MoT
architecture and random bf16 weights on the GPU (or a checkpoint).

    python -m bench.previews --out bench/results            # 1024x1024, 50 steps, 3 previews

Runs are interleaved (none, linear, vae, none, ...) so drift hits every variant alike. Reports,
per variant, the end-to-end seconds (median of --repeats after --warmup), the extra time over no
previews in percent (the target: <= 5% with 3 previews at 1024x1024), the seconds spent
rendering each preview (off the sampling thread), the preview sizes, the linear map's one-time
fitting cost, and how close each linear preview is to the VAE's picture of the same latents
(PSNR at the linear preview's size, on the last VAE run's previews; meaningful with a real
checkpoint only). Takes ~100 s on an H200 at the defaults. The last stdout line is the JSON
report, also written to --out.
"""
from __future__ import annotations

import argparse
import base64
import json
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from bagel_model.kernels import select_kernels
from bench.latency import PROMPT, build, sync
from bench.provenance import commit, write_report
from cluster.image_encoding import OutputFormat, encode_image
from pipelines.noise import NoiseSource
from pipelines.params import ImageParams
from pipelines.previews import PREVIEW_DECODERS, Preview, PreviewRenderer, render_preview
from pipelines.tasks import generate_image

VARIANTS = ("none", *PREVIEW_DECODERS)


def run_once(executor, params: ImageParams, decoder: str | None, previews: int, pool) -> tuple[dict, list]:
    """One text-to-image; with a decoder, its previews rendered and encoded as the service does.
    A preview's render time runs from its latents being on hand to its base64 being ready.
    Returns the timings and each preview's (latents, picture)."""
    rendered: list[dict] = []
    fetched: dict[int, tuple[float, Tensor]] = {}
    pictures: list[tuple[Tensor, Image.Image]] = []

    def timed(preview: Preview) -> Preview:
        def latent():
            out = preview.latent()
            fetched[preview.index] = (time.perf_counter(), out)
            return out
        return replace(preview, latent=latent)

    def send(preview: Preview, image: Image.Image) -> None:
        decoded = time.perf_counter()
        start, latent = fetched[preview.index]
        b64 = base64.b64encode(encode_image(image, OutputFormat())).decode()
        rendered.append({"index": preview.index, "step": preview.step, "size": list(image.size),
                         "decode_s": decoded - start, "render_s": time.perf_counter() - start,
                         "b64_chars": len(b64)})
        pictures.append((latent, image))

    renderer = PreviewRenderer(executor, decoder, pool, send) if decoder else None
    sync()
    t = time.perf_counter()
    generate_image(executor, [PROMPT], params, noise=NoiseSource(0), previews=previews if renderer else 0,
                   on_preview=(lambda p: renderer(timed(p))) if renderer else None)
    if renderer is not None:
        renderer.wait()
    sync()
    return {"end_to_end_s": time.perf_counter() - t, "previews": rendered}, pictures


def linear_vs_vae(executor, vae_pictures: list[tuple[Tensor, Image.Image]]) -> list[float]:
    """PSNR (dB) of the linear preview of each latent against the VAE's picture of it, at the
    linear preview's size."""
    out = []
    for latent, vae in vae_pictures:
        linear = np.asarray(render_preview(executor, latent, "linear"), dtype=np.float64)
        vae = np.asarray(vae.resize(linear.shape[1::-1], Image.BOX), dtype=np.float64)
        mse = float(((linear - vae) ** 2).mean())
        out.append(float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: random full-size weights)")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=50, help="num_timesteps")
    p.add_argument("--previews", type=int, default=3, help="partial_images")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--name", default="previews")
    args = p.parse_args(argv)
    t = time.perf_counter()
    kernels = select_kernels(args.device)  # the service's defaults
    executor = build(args.checkpoint, args.device, None, kernels)
    build_s = time.perf_counter() - t
    params = ImageParams(num_timesteps=args.steps, height=args.size, width=args.size)
    t = time.perf_counter()
    executor.latent_rgb_map()
    fit_s = time.perf_counter() - t
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    vae_pictures = []
    with ThreadPoolExecutor(1, thread_name_prefix="preview") as pool:
        for i in range(args.warmup + args.repeats):
            for variant in VARIANTS:
                row, pictures = run_once(executor, params, None if variant == "none" else variant, args.previews,
                                         pool)
                if variant == "vae":
                    vae_pictures = pictures
                if i >= args.warmup:
                    runs[variant].append(row)
                print(variant, f"{row['end_to_end_s']:.3f} s", flush=True)
    base = statistics.median(r["end_to_end_s"] for r in runs["none"])
    results = {}
    for variant, rows in runs.items():
        e2e = [r["end_to_end_s"] for r in rows]
        renders = [p["render_s"] for r in rows for p in r["previews"]]
        decodes = [p["decode_s"] for r in rows for p in r["previews"]]
        results[variant] = {
            "end_to_end_s": {"median": statistics.median(e2e), "min": min(e2e), "max": max(e2e), "n": len(e2e)},
            "extra_pct": 100 * (statistics.median(e2e) / base - 1),
            "previews_per_image": len(rows[0]["previews"]),
            "preview_steps": [p["step"] for p in rows[0]["previews"]],
            "preview_size": rows[0]["previews"][0]["size"] if rows[0]["previews"] else None,
            "render_s_per_preview": statistics.median(renders) if renders else None,
            "decode_s_per_preview": statistics.median(decodes) if decodes else None,
            "runs": rows}
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu"
    report = {"benchmark": "previews", "device": device, "torch": torch.__version__,
              "python": platform.python_version(), "commit": commit(),
              "weights": args.checkpoint or "random bf16 (full-size BAGEL-7B-MoT architecture)",
              "build_s": build_s, "settings": vars(args), "kernels": vars(kernels.choice), "linear_map_fit_s": fit_s,
              "target_extra_pct": 5.0,
              "within_target": {v: results[v]["extra_pct"] <= 5.0 for v in PREVIEW_DECODERS},
              "linear_vs_vae_psnr_db": linear_vs_vae(executor, vae_pictures), "results": results}
    write_report(report, args.out, f"{args.name}.json")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
