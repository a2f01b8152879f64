"""Parity with the official implementation: every case of the fixture's cases.json.

Each case runs through the public pipelines (`generate_image` / `understand`) on the
`LocalExecutor` in float32 on CPU, with the fixture's recorded random tensors injected, and every
stored tensor is compared within the tolerances of the fixture README (tightened where noted),
except the case's inputs (`INPUTS`: the recorded noise, the latent a VAE-decode case decodes),
which are fed to the model and checked to arrive where they belong. A case of an unknown kind
or a stored tensor this test does not know fails.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.testing import assert_close

from bagel_model.latents import unpatchify
from bagel_model.segments import Segment
from bagel_model.transforms import to_rgb, to_tensor, vit_patches
from pipelines.guidance import Branch
from pipelines.noise import NoiseSource
from pipelines.schedule import timesteps
from pipelines.tasks import generate_image, understand

from .conftest import FIXTURE
from .fixture_cases import image_params, items_of, text_params
from .recording import RecordingExecutor

VIT_TOL = dict(rtol=1e-4, atol=1e-4)
DEEP_TOL = dict(rtol=5e-4, atol=5e-4)
LOOP_TOL = dict(rtol=1e-3, atol=1e-3)
# Stored tensors that are inputs of a case, not outputs: what each is fed to.
INPUTS = {"vae_encode_noise": "the VAE posterior sample of the input image",
          "init_noise": "the initial latent tokens", "latent": "the VAE decoder (vae_decode cases)"}
CASE_NAMES = [c["name"] for c in json.loads((FIXTURE / "cases.json").read_text())["cases"]] \
    if (FIXTURE / "cases.json").is_file() else []


class Checker:
    """Compares produced tensors with the case's stored ones and tracks what was compared and
    what was used as an input."""

    def __init__(self, case: dict, reference: dict):
        self.case, self.reference, self.name = case, reference, case["name"]
        self.stored = {k.split("/", 1)[1] for k in case["tensors"]}  # names without the case prefix
        self.checked: set[str] = set()
        self.inputs: set[str] = set()

    def expected(self, key: str) -> torch.Tensor:
        full = f"{self.name}/{key}"
        if full not in self.reference:
            pytest.fail(f"stored tensor {full} is missing from the reference file")
        return self.reference[full]

    def input(self, key: str) -> torch.Tensor:
        """A stored tensor the case feeds to the model (one of `INPUTS`), not an output to compare."""
        assert key in INPUTS, f"{key} is not an input"
        self.inputs.add(key)
        return self.expected(key)

    def close(self, key: str, actual: torch.Tensor, tol: dict) -> None:
        expected = self.expected(key)
        assert tuple(actual.shape) == tuple(expected.shape), key
        assert_close(actual.float(), expected.float(), **tol, msg=lambda m: f"{self.name}/{key}: {m}")
        self.checked.add(key)

    def equal(self, key: str, actual: torch.Tensor) -> None:
        expected = self.expected(key)
        assert torch.equal(actual.to(expected.dtype), expected), f"{self.name}/{key} differs"
        self.checked.add(key)

    def kv(self, prefix: str, cache: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        start, stop = self.case["derived"]["kv_stored_rows"][prefix]
        layers = sorted({int(k.split("/")[1][len("layer"):]) for k in self.stored if k.startswith(prefix + "/")})
        assert sorted(cache) == layers, f"{prefix}: layers {sorted(cache)} != {layers}"
        for layer in layers:
            k, v = cache[layer]
            self.close(f"{prefix}/layer{layer}/key", k[start:stop], DEEP_TOL)
            self.close(f"{prefix}/layer{layer}/value", v[start:stop], DEEP_TOL)

    def all_checked(self) -> None:
        assert not self.checked & self.inputs, f"inputs compared as outputs: {self.checked & self.inputs}"
        unchecked = sorted(self.stored - self.checked - self.inputs)
        assert not unchecked, f"stored tensors neither compared nor used as inputs: {unchecked}"


def check_image_inputs(check: Checker, case: dict, fixture: Path, rec: RecordingExecutor, with_vae: bool) -> None:
    """Resize, pixels, ViT / VAE encoder tensors of the case's input image."""
    cfg = rec.config
    vae_img, vit_img = cfg.resize_input(to_rgb(Image.open(fixture / case["inputs"]["image"])))
    stored = check.stored
    if "vae_resized_uint8" in stored:
        check.equal("vae_resized_uint8", torch.from_numpy(np.asarray(vae_img).copy()))
        check.equal("vit_resized_uint8", torch.from_numpy(np.asarray(vit_img).copy()))
        patches, position_ids = vit_patches(to_tensor(vit_img), cfg.vit.patch_size, cfg.vit_max_num_patch_per_side)
        check.close("vit_pixels", patches, dict(rtol=0, atol=1e-6))
        check.equal("vit_position_ids", position_ids)
        vision = rec.inner.vision
        features = vision.vit_model.vision_model(patches, position_ids, [patches.shape[0]])
        check.close("vit_output", features, VIT_TOL)
        check.close("connector_output", vision.connector(features), VIT_TOL)
        check.close("vit_tokens_to_llm", rec.vit[-1], VIT_TOL)
    if with_vae and "vae_pixels" in stored:
        pixels = to_tensor(vae_img)[None]
        check.close("vae_pixels", pixels, dict(rtol=0, atol=1e-6))
        vae = rec.inner.vae
        check.close("vae_encoder_moments", vae.encode_moments(pixels), DEEP_TOL)
        check.close("vae_latent", rec.vae_latents[-1], DEEP_TOL)
        check.close("vae_latent_mean", vae.encode_mean(pixels), DEEP_TOL)
        assert torch.equal(rec.vae_noise[-1], check.input("vae_encode_noise")), "the VAE was not given the stored noise"


def run_image_case(case, reference, fixture, executor):
    rec = RecordingExecutor(executor)
    check = Checker(case, reference)
    p = case["params"]
    draws = [check.input(n) for n in ("vae_encode_noise", "init_noise") if n in check.stored]
    assert [list(d.shape) for d in draws] == [d["shape"] for d in case["derived"]["random_draws"]]
    steps = []
    result = generate_image(
        rec, items_of(case, fixture), image_params(p), think=p["think"],
        text_params=text_params(p), noise=NoiseSource(tensors=draws), on_step=steps.append,
    )
    # Contexts when denoising starts (a branch the sampler does not run still has its context).
    first = rec.denoise_calls[0]
    derived = case["derived"]
    names = {Branch.COND: "gen", Branch.CFG_TEXT: "cfg_text", Branch.CFG_IMG: "cfg_img"}
    for segment, branch in zip(first, (Branch.COND, Branch.CFG_TEXT, Branch.CFG_IMG)):
        assert segment.rope_pos == derived["latent_positions"][names[branch]], branch
    for prefix, branch in (("kv_gen", Branch.COND), ("kv_cfg_text", Branch.CFG_TEXT), ("kv_cfg_img", Branch.CFG_IMG)):
        cache = rec.caches_at_denoise[branch.value]
        length = next(iter(cache.values()))[0].shape[0] if cache else 0
        assert length == derived["kv_context_lengths"][names[branch]], branch
        if any(k.startswith(prefix + "/") for k in check.stored):
            check.kv(prefix, cache)
    if p["think"]:
        check.equal("generated_ids", torch.tensor([executor.tokenizer.bos_id] + result.thought.token_ids))
        check_logits(check, rec, case)
        check.kv("kv_text_context", rec.caches_at_decode)
        assert result.thought.text == derived["output_text"]
    if case["inputs"].get("image"):
        check_image_inputs(check, case, fixture, rec, with_vae=True)
    assert torch.equal(first[0].latents, check.input("init_noise")), "denoising did not start from the stored noise"
    check.close("sigmas", timesteps(p["num_timesteps"], p["timestep_shift"]), dict(rtol=0, atol=1e-6))
    check.close("v_combined", torch.stack([s.v for s in steps]), LOOP_TOL)
    for key, branch in (("v_cond", Branch.COND), ("v_text_uncond", Branch.CFG_TEXT), ("v_img_uncond", Branch.CFG_IMG)):
        if f"step0/{key}" in check.stored:
            check.close(f"step0/{key}", steps[0].velocities[branch], DEEP_TOL)
    check.close("final_latent", result.latent, LOOP_TOL)
    h, w = first[0].grid
    latent = unpatchify(result.latent, h, w, p=executor.config.latent_patch_size, channels=executor.config.latent_channels)
    check.close("decode_input_latent", latent, LOOP_TOL)
    check.close("decoded", rec.decoded[-1], LOOP_TOL)
    image = torch.from_numpy(np.asarray(result.image).copy())
    expected = check.expected("image_uint8")
    assert image.shape == expected.shape
    assert (image.int() - expected.int()).abs().max() <= 1
    check.checked.add("image_uint8")
    check.all_checked()


def check_logits(check: Checker, rec: RecordingExecutor, case: dict) -> None:
    """Compare the logits of every decoding step. The official loop also feeds the last
    generated token (and discards the prediction); that step is recomputed here."""
    expected = check.expected("logits")
    produced = list(rec.logits)
    if len(produced) < expected.shape[0]:
        ids = check.expected("generated_ids").tolist()
        executor = rec.inner
        ctx = "parity/last_step"
        executor.fork("parity/none", ctx)
        try:
            cache = rec.caches_at_decode
            for c in executor.caches:
                for layer in c.layers:
                    c.append(ctx, layer, *cache[layer])
            start = case["derived"].get("start_position_id", next(iter(cache.values()))[0].shape[0])
            produced.append(executor.decode([Segment.text(ctx, ids, start, want_logits=True)])[0])
        finally:
            executor.free([ctx])
    check.close("logits", torch.stack(produced), DEEP_TOL)


def run_understand_case(case, reference, fixture, executor):
    rec = RecordingExecutor(executor)
    check = Checker(case, reference)
    p = case["params"]
    result = understand(rec, items_of(case, fixture), text_params(p), think=p["think"])
    check.equal("generated_ids", torch.tensor([executor.tokenizer.bos_id] + result.token_ids))
    assert result.text == case["derived"]["output_text"]
    check_logits(check, rec, case)
    check.kv("kv_text_context", rec.caches_at_decode)
    if case["inputs"].get("image"):
        check_image_inputs(check, case, fixture, rec, with_vae=False)
    check.all_checked()


def run_vae_decode_case(case, reference, fixture, executor):
    check = Checker(case, reference)
    check.close("decoded", executor.decode_latents(check.input("latent")), LOOP_TOL)
    check.all_checked()


RUNNERS = {"t2i": run_image_case, "edit": run_image_case, "understand": run_understand_case,
           "vae_decode": run_vae_decode_case}


@pytest.mark.parametrize("name", CASE_NAMES)
def test_parity(name, cases, reference, fixture_dir, executor):
    case = cases[name]
    runner = RUNNERS.get(case["kind"])
    if runner is None:
        pytest.fail(f"unknown case kind {case['kind']!r}")
    for call in case["derived"].get("encode_calls", []):
        assert executor.tokenizer.encode(call["text"]) == call["ids"], call["text"]
    runner(case, reference, fixture_dir, executor)
    assert executor.live_contexts() == [], "contexts leaked"
