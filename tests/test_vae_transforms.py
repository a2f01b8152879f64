"""Parity tests of the VAE, latent packing and image transforms against the bagel-tiny fixture.

The fixture folder is ``$BAGEL_FIXTURE``, by default ``<repo>/../shared/fixtures/bagel-tiny``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from bagel_model.config import BagelConfig
from bagel_model.latents import patchify, to_uint8, unpatchify
from bagel_model.transforms import InvalidImage, ResizeRule, open_image, to_rgb, to_tensor, vit_patches
from bagel_model.vae import AutoEncoder, VAEConfig

from .conftest import FIXTURE

EDIT = "edit_text_channel"

# Observed max abs differences are ~1e-6 (decoder) and ~2.4e-6 (encoder); the fixture's own
# float32 noise (weights x (1 + 1e-6 N)) reaches 1.3e-5 / 2.1e-5. These bounds leave margin for other CPUs.
DECODE_TOL = 1e-4
ENCODE_TOL = 5e-5


def _load_json(path: Path) -> dict:
    if not path.is_file():
        pytest.fail(f"fixture file missing: {path} (set BAGEL_FIXTURE)")
    return json.loads(path.read_text())


PARITY = _load_json(FIXTURE / "checkpoint" / "parity_config.json")
CASES = {c["name"]: c for c in _load_json(FIXTURE / "cases.json")["cases"]}
DECODE_CASES = sorted(n for n, c in CASES.items() if f"{n}/decode_input_latent" in c["tensors"])


FIXTURE_CONFIG = BagelConfig.from_checkpoint_dir(FIXTURE / "checkpoint")  # its resize rules from parity_config.json
RELEASED = BagelConfig()


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "reference.safetensors")


@pytest.fixture(scope="module")
def ae() -> AutoEncoder:
    model = AutoEncoder(VAEConfig.from_dict(PARITY["vae"])).eval()
    model.load_state_dict(load_file(FIXTURE / "checkpoint" / "ae.safetensors"), strict=True)
    return model


@pytest.fixture(scope="module")
def edit_images() -> tuple[Image.Image, Image.Image]:
    """(VAE-resized, ViT-resized) input image of the edit case, as the inferencer makes them."""
    return FIXTURE_CONFIG.resize_input(to_rgb(open_image(FIXTURE / CASES[EDIT]["inputs"]["image"])))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _uint8(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.uint8))


# ----------------------------------------------------------------------------- VAE structure


def test_vae_config_from_dict() -> None:
    cfg = VAEConfig.from_dict(PARITY["vae"])
    assert cfg.ch == 32 and cfg.ch_mult == (1, 1, 1, 1) and cfg.num_res_blocks == 1
    assert cfg.scale_factor == 0.3611 and cfg.shift_factor == 0.1159
    with pytest.raises(ValueError, match="bogus"):
        VAEConfig.from_dict({**PARITY["vae"], "bogus": 1})


def test_state_dict_matches_fixture_checkpoint() -> None:
    model = AutoEncoder(VAEConfig.from_dict(PARITY["vae"]))
    with safe_open(FIXTURE / "checkpoint" / "ae.safetensors", "pt") as f:
        expected = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == expected


def test_released_layout() -> None:
    with torch.device("meta"):
        sd = AutoEncoder(VAEConfig()).state_dict()
    assert len(sd) == 244
    shapes = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.conv_out.weight": (32, 512, 3, 3),
        "decoder.conv_in.weight": (512, 16, 3, 3),
        "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
        "decoder.norm_out.bias": (128,),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith(("encoder.down.3.downsample", "decoder.up.0.upsample")) for k in sd)
    assert not any(k.startswith("decoder.up.3.block.3") or k.startswith("encoder.down.0.block.2") for k in sd)


# ----------------------------------------------------------------------------- VAE numerics


def test_vae_decode_case(ae: AutoEncoder, ref: dict) -> None:
    with torch.inference_mode():
        decoded = ae.decode(ref["vae_decode/latent"])
    torch.testing.assert_close(decoded, ref["vae_decode/decoded"], rtol=DECODE_TOL, atol=DECODE_TOL)


@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_pipeline_latents(case: str, ae: AutoEncoder, ref: dict) -> None:
    latent = ref[f"{case}/decode_input_latent"]
    with torch.inference_mode():
        decoded = ae.decode(latent)
    torch.testing.assert_close(decoded, ref[f"{case}/decoded"], rtol=DECODE_TOL, atol=DECODE_TOL)
    image = to_uint8(decoded)
    assert image.dtype == torch.uint8 and image.shape == ref[f"{case}/image_uint8"].shape
    assert _max_diff(image, ref[f"{case}/image_uint8"]) <= 1
    # The conversion itself is exact on the reference's own decoder output.
    assert torch.equal(to_uint8(ref[f"{case}/decoded"]), ref[f"{case}/image_uint8"])


@pytest.mark.parametrize("case", DECODE_CASES)
def test_patchify_roundtrip(case: str, ref: dict) -> None:
    latent, packed = ref[f"{case}/decode_input_latent"], ref[f"{case}/final_latent"]
    h, w = latent.shape[2] // 2, latent.shape[3] // 2
    assert torch.equal(unpatchify(packed, h, w, p=2, channels=16), latent)
    assert torch.equal(patchify(latent, p=2), packed)


def test_encoder_moments(ae: AutoEncoder, ref: dict) -> None:
    with torch.inference_mode():
        moments = ae.encode_moments(ref[f"{EDIT}/vae_pixels"])
    torch.testing.assert_close(moments, ref[f"{EDIT}/vae_encoder_moments"], rtol=ENCODE_TOL, atol=ENCODE_TOL)


def test_encode_with_injected_noise(ae: AutoEncoder, ref: dict) -> None:
    with torch.inference_mode():
        latent = ae.encode(ref[f"{EDIT}/vae_pixels"], noise=ref[f"{EDIT}/vae_encode_noise"])
    torch.testing.assert_close(latent, ref[f"{EDIT}/vae_latent"], rtol=ENCODE_TOL, atol=ENCODE_TOL)


def test_encode_mean_is_scaled_posterior_mean(ae: AutoEncoder, ref: dict) -> None:
    """vae_latent_mean = scale_factor * (mean - shift_factor), i.e. the sample with zero noise."""
    pixels = ref[f"{EDIT}/vae_pixels"]
    with torch.inference_mode():
        mean = ae.encode_mean(pixels)
        zero_noise = ae.encode(pixels, noise=torch.zeros_like(ref[f"{EDIT}/vae_encode_noise"]))
    torch.testing.assert_close(mean, ref[f"{EDIT}/vae_latent_mean"], rtol=ENCODE_TOL, atol=ENCODE_TOL)
    assert torch.equal(mean, zero_noise)


def test_encode_draws_noise_from_generator(ae: AutoEncoder, ref: dict) -> None:
    pixels = ref[f"{EDIT}/vae_pixels"]
    shape = ref[f"{EDIT}/vae_encode_noise"].shape
    with torch.inference_mode():
        drawn = ae.encode(pixels, generator=torch.Generator().manual_seed(7))
        injected = ae.encode(pixels, noise=torch.randn(shape, generator=torch.Generator().manual_seed(7)))
        mean = ae.encode_mean(pixels)
    assert torch.equal(drawn, injected)
    assert not torch.equal(drawn, mean)


def test_bf16_params_set_the_working_dtype(ae: AutoEncoder, ref: dict) -> None:
    model = AutoEncoder(ae.cfg).to(torch.bfloat16)
    model.load_state_dict(ae.state_dict())
    with torch.inference_mode():
        decoded = model.decode(ref["vae_decode/latent"])
    assert decoded.dtype == torch.bfloat16
    assert _max_diff(decoded, ref["vae_decode/decoded"]) < 0.2


def test_to_uint8_truncates_and_clamps() -> None:
    y = torch.tensor([-2.0, -1.0, 0.0, 0.99, 1.0, 3.0]).reshape(1, 1, 1, 6).expand(1, 3, 1, 6)
    out = to_uint8(y)
    assert out.shape == (1, 6, 3)
    # 0.5*0 + 0.5 = 0.5 -> 127.5 -> 127; 0.995 * 255 = 253.725 -> 253.
    assert out[0, :, 0].tolist() == [0, 0, 127, 253, 255, 255]


# ----------------------------------------------------------------------------- transforms on the fixture


def test_edit_resizes(edit_images: tuple[Image.Image, Image.Image], ref: dict) -> None:
    derived = CASES[EDIT]["derived"]
    vae_rule, vit_rule = FIXTURE_CONFIG.vae_transform, FIXTURE_CONFIG.vit_transform
    assert vae_rule.target_size(*derived["vae_resize"]["input_wh"]) == tuple(derived["vae_resize"]["output_wh"])
    assert vit_rule.target_size(*derived["vit_resize"]["input_wh"]) == tuple(derived["vit_resize"]["output_wh"])
    vae_img, vit_img = edit_images
    assert FIXTURE_CONFIG.input_image_sizes(*derived["vae_resize"]["input_wh"]) == (vae_img.size, vit_img.size)
    assert torch.equal(_uint8(vae_img), ref[f"{EDIT}/vae_resized_uint8"])
    assert torch.equal(_uint8(vit_img), ref[f"{EDIT}/vit_resized_uint8"])


def test_edit_pixels(edit_images: tuple[Image.Image, Image.Image], ref: dict) -> None:
    vae_img, vit_img = edit_images
    pixels = to_tensor(vae_img)
    assert pixels.dtype == torch.float32
    torch.testing.assert_close(pixels[None], ref[f"{EDIT}/vae_pixels"], rtol=0, atol=1e-6)
    patches, position_ids = vit_patches(
        to_tensor(vit_img), patch_size=14, max_patches_per_side=PARITY["bagel"]["vit_max_num_patch_per_side"]
    )
    torch.testing.assert_close(patches, ref[f"{EDIT}/vit_pixels"], rtol=0, atol=1e-6)
    assert position_ids.dtype == torch.int64
    assert torch.equal(position_ids, ref[f"{EDIT}/vit_position_ids"])


def test_vit_patches_layout() -> None:
    pixels = torch.arange(3 * 4 * 6, dtype=torch.float32).reshape(3, 4, 6)
    patches, position_ids = vit_patches(pixels, patch_size=2, max_patches_per_side=5)
    assert patches.shape == (6, 12)
    assert position_ids.tolist() == [0, 1, 2, 5, 6, 7]
    # patch (r=1, c=2), in-patch row 1, col 0, channel 2 -> index (1*2 + 0)*3 + 2
    assert patches[5, 8].item() == pixels[2, 2 * 1 + 1, 2 * 2 + 0].item()
    with pytest.raises(ValueError):
        vit_patches(pixels, patch_size=2, max_patches_per_side=2)


# ----------------------------------------------------------------------------- resize rule


@pytest.mark.parametrize(
    "size, vae_size, vit_size",
    [
        ((1024, 1024), (1024, 1024), (980, 980)),
        ((1024, 768), (1024, 768), (980, 728)),
        ((1920, 1080), (1024, 576), (980, 546)),
        ((1000, 1000), (992, 992), (980, 980)),
        ((640, 480), (688, 512), (686, 518)),
        ((300, 300), (512, 512), (518, 518)),
        ((3000, 500), (1024, 176), (980, 168)),
    ],
)
def test_resize_rule_spec_table(size: tuple, vae_size: tuple, vit_size: tuple) -> None:
    assert RELEASED.vae_transform.target_size(*size) == vae_size
    assert RELEASED.vit_transform.target_size(*vae_size) == vit_size
    assert RELEASED.input_image_sizes(*size) == (vae_size, vit_size)


def test_resize_rule_rounds_half_to_even() -> None:
    # 40 / 16 = 2.5 -> 2 (not 3); 600 / 16 = 37.5 -> 38.
    assert ResizeRule(1024, 16, 16).target_size(40, 600) == (32, 608)
    # The first rounding: 105 * 0.5 = 52.5 -> 52 (half-up would give 53).
    assert ResizeRule(100, 1, 1).target_size(200, 105) == (100, 52)
    assert ResizeRule(100, 1, 1).target_size(105, 200) == (52, 100)


def test_resize_rule_max_pixels_uses_area_ratio() -> None:
    # 2000 x 2000 > max_pixels: scale = 1806336 / 4e6 (area ratio, not its square root) -> 903 -> 896.
    assert ResizeRule(4096, 16, 16).target_size(2000, 2000) == (896, 896)


def test_resize_call() -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    out = RELEASED.vae_transform(img)
    assert out.size == (688, 512)
    assert torch.equal(_uint8(out), _uint8(img.resize((688, 512), Image.BICUBIC)))
    same = Image.fromarray(np.zeros((512, 688, 3), dtype=np.uint8))
    copy = RELEASED.vae_transform(same)
    assert copy is not same and copy.size == same.size


# ----------------------------------------------------------------------------- RGB conversion and decoding


def test_to_rgb_composites_transparency_on_white() -> None:
    rgba = Image.new("RGBA", (2, 1), (10, 20, 30, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 0))
    out = to_rgb(rgba)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (10, 20, 30)
    assert out.getpixel((1, 0)) == (255, 255, 255)

    la = Image.new("LA", (1, 1), (0, 0))
    assert to_rgb(la).getpixel((0, 0)) == (255, 255, 255)

    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    out = to_rgb(palette)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (200, 100, 50)

    assert to_rgb(Image.new("L", (1, 1), 7)).getpixel((0, 0)) == (7, 7, 7)


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_open_image() -> None:
    path = FIXTURE / CASES[EDIT]["inputs"]["image"]
    data = path.read_bytes()
    img = open_image(data)
    assert img.size == (72, 56)
    assert torch.equal(_uint8(img), _uint8(open_image(path)))

    assert issubclass(InvalidImage, ValueError)
    with pytest.raises(InvalidImage, match="not a decodable image"):
        open_image(b"definitely not an image" * 10)
    with pytest.raises(InvalidImage):
        open_image(data[: len(data) // 2])

    big = _png_bytes(Image.new("RGB", (100, 100)))
    assert open_image(big, max_pixels=10_000).size == (100, 100)
    with pytest.raises(InvalidImage, match="limit"):
        open_image(big, max_pixels=9_999)


def test_lean_vae_blocks_compute_what_the_plain_composition_does(monkeypatch):
    """The VAE's memory-lean blocks (activations in place, early frees, the residual added into
    the block's output) give bit for bit what the plain out-of-place composition gives."""
    import torch.nn.functional as F

    from bagel_model.demo import random_module
    from bagel_model.vae import AttnBlock, Decoder, Encoder, ResnetBlock

    cfg = VAEConfig(ch=32)
    vae = random_module(lambda: AutoEncoder(cfg), "cpu", torch.float32, 0)
    pixels = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = torch.randn(1, cfg.z_channels, 8, 6, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        lean = (vae.encode_moments(pixels), vae.decode(z))

    def resnet(block, x):
        h = block.conv1(F.silu(block.norm1(x)))
        h = block.conv2(F.silu(block.norm2(h)))
        return (x if block.nin_shortcut is None else block.nin_shortcut(x)) + h

    def attn(block, x):
        b, c, height, width = x.shape
        h = block.norm(x)
        q, k, v = (proj(h).flatten(2).transpose(1, 2) for proj in (block.q, block.k, block.v))
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, c, height, width)
        return x + block.proj_out(h)

    def encoder(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))

    def decoder(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    for cls, plain in ((ResnetBlock, resnet), (AttnBlock, attn), (Encoder, encoder), (Decoder, decoder)):
        monkeypatch.setattr(cls, "forward", plain)
    with torch.inference_mode():
        reference = (vae.encode_moments(pixels), vae.decode(z))
    for a, b in zip(lean, reference):
        assert torch.equal(a, b)
