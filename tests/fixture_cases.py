"""A parity-fixture case's inputs and parameters as the pipelines take them."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from pipelines.params import ImageParams, TextParams


def image_params(p: dict) -> ImageParams:
    size = p.get("image_shapes")  # (H, W)
    return ImageParams(
        cfg_text_scale=p["cfg_text_scale"], cfg_img_scale=p["cfg_img_scale"],
        cfg_interval=tuple(p["cfg_interval"]), timestep_shift=p["timestep_shift"],
        num_timesteps=p["num_timesteps"], cfg_renorm_min=p["cfg_renorm_min"],
        cfg_renorm_type=p["cfg_renorm_type"], **(dict(height=size[0], width=size[1]) if size else {}),
    )


def text_params(p: dict) -> TextParams:
    # The official max_think_token_n counts the leading <|im_start|>.
    return TextParams(max_new_tokens=p["max_think_token_n"] - 1, do_sample=p["do_sample"],
                      temperature=p["text_temperature"])


def items_of(case: dict, fixture: Path) -> list:
    """The case's optional input image, then its text."""
    items = []
    if case["inputs"].get("image"):
        items.append(Image.open(fixture / case["inputs"]["image"]))
    items.append(case["inputs"]["text"])
    return items
