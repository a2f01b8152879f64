"""Model configuration read from an official BAGEL checkpoint folder.

`BagelConfig.from_checkpoint_dir` reads `llm_config.json` and `vit_config.json`, applies the
overrides the official loader applies in code (spec §1.2), and takes the values the official
loader hard-codes (latent patch size, table sizes, VAE shape, image transforms) from an optional
`parity_config.json`, defaulting to the released BAGEL-7B-MoT values.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .errors import CheckpointError
from .transforms import ResizeRule
from .vae import VAEConfig


@dataclass(frozen=True)
class LLMConfig:
    """Qwen2 Mixture-of-Transformers language model."""

    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    vocab_size: int = 152064
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size}, heads {self.num_attention_heads} and kv heads "
                f"{self.num_key_value_heads} must divide evenly"
            )


@dataclass(frozen=True)
class ViTConfig:
    """SigLIP NaViT vision tower (the layer count is the number actually built and loaded)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 26
    num_attention_heads: int = 16
    patch_size: int = 14
    image_size: int = 980
    num_channels: int = 3
    layer_norm_eps: float = 1e-6

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class BagelConfig:
    """Everything needed to build BAGEL; defaults are the released BAGEL-7B-MoT."""

    llm: LLMConfig = field(default_factory=LLMConfig)
    vit: ViTConfig = field(default_factory=ViTConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    latent_patch_size: int = 2
    max_latent_size: int = 64
    vit_max_num_patch_per_side: int = 70
    timestep_freq_size: int = 256
    vae_transform: ResizeRule = field(default_factory=lambda: ResizeRule(1024, 512, 16))
    vit_transform: ResizeRule = field(default_factory=lambda: ResizeRule(980, 224, 14))

    @property
    def latent_channels(self) -> int:
        return self.vae.z_channels

    @property
    def patch_latent_dim(self) -> int:
        return self.latent_patch_size**2 * self.vae.z_channels

    @property
    def latent_downsample(self) -> int:
        """Pixels per latent token side."""
        return self.vae.downsample * self.latent_patch_size

    @property
    def max_image_side(self) -> int:
        """Largest generated image side in pixels."""
        return self.max_latent_size * self.latent_downsample

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        """Latent tokens (rows, columns) of a `height` x `width` image."""
        return height // self.latent_downsample, width // self.latent_downsample

    def vit_grid(self, height: int, width: int) -> tuple[int, int]:
        """ViT patches (rows, columns) of a ViT-resized `height` x `width` image."""
        return height // self.vit.patch_size, width // self.vit.patch_size

    def resize_input(self, image: Image.Image) -> tuple[Image.Image, Image.Image]:
        """An RGB input image resized for the VAE, and for the ViT, whose rule applies to the
        VAE-resized image (the official order, spec §6)."""
        vae = self.vae_transform(image)
        return vae, self.vit_transform(vae)

    def input_image_sizes(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """The (width, height) pair `resize_input` gives an image of this size, without resizing."""
        vae = self.vae_transform.target_size(width, height)
        return vae, self.vit_transform.target_size(*vae)

    @classmethod
    def from_checkpoint_dir(cls, path: str | Path) -> BagelConfig:
        path = Path(path)
        llm = _read_json(path / "llm_config.json")
        vit = _read_json(path / "vit_config.json")
        parity = _read_json(path / "parity_config.json") if (path / "parity_config.json").exists() else {}
        try:
            return cls._from_dicts(llm, vit, parity)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: invalid configuration: {e}") from e

    @classmethod
    def _from_dicts(cls, llm: dict, vit: dict, parity: dict) -> BagelConfig:
        if llm.get("hidden_act", "silu") != "silu":
            raise ValueError(f"llm hidden_act {llm['hidden_act']!r} is not supported (silu only)")
        if llm.get("rope_scaling") is not None:
            raise ValueError("llm rope_scaling is not supported")
        if vit.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise ValueError(f"vit hidden_act {vit['hidden_act']!r} is not supported")
        llm_cfg = LLMConfig(
            hidden_size=llm["hidden_size"],
            intermediate_size=llm["intermediate_size"],
            num_hidden_layers=llm["num_hidden_layers"],
            num_attention_heads=llm["num_attention_heads"],
            num_key_value_heads=llm["num_key_value_heads"],
            vocab_size=llm["vocab_size"],
            rope_theta=float(llm.get("rope_theta", 1_000_000.0)),
            rms_norm_eps=float(llm.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=llm.get("max_position_embeddings", 32768),
        )
        # The official loader builds one ViT layer fewer than the file lists (penultimate features).
        vit_cfg = ViTConfig(
            hidden_size=vit["hidden_size"],
            intermediate_size=vit["intermediate_size"],
            num_hidden_layers=vit["num_hidden_layers"] - 1,
            num_attention_heads=vit["num_attention_heads"],
            patch_size=vit["patch_size"],
            image_size=vit["image_size"],
            num_channels=vit.get("num_channels", 3),
            layer_norm_eps=float(vit.get("layer_norm_eps", 1e-6)),
        )
        bagel = dict(parity.get("bagel", {}))
        if bagel.pop("interpolate_pos", False):
            raise ValueError("interpolate_pos=true is not supported (the released model uses false)")
        if bagel.pop("connector_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise ValueError("connector_act must be gelu_pytorch_tanh")
        for flag in ("visual_gen", "visual_und"):
            if not bagel.pop(flag, True):
                raise ValueError(f"{flag}=false is not supported")
        kwargs = {}
        for key in ("latent_patch_size", "max_latent_size", "vit_max_num_patch_per_side"):
            if key in bagel:
                kwargs[key] = int(bagel.pop(key))
        if bagel:
            raise ValueError(f"unknown keys in parity_config.json 'bagel': {sorted(bagel)}")
        if "vae" in parity:
            kwargs["vae"] = VAEConfig.from_dict(parity["vae"])
        for key in ("vae_transform", "vit_transform"):
            if key in parity:
                t = parity[key]
                kwargs[key] = ResizeRule(t["max_image_size"], t["min_image_size"], t["image_stride"], t["max_pixels"])
        cfg = cls(llm=llm_cfg, vit=vit_cfg, **kwargs)
        if vit_cfg.patches_per_side != cfg.vit_max_num_patch_per_side:
            raise ValueError(
                f"vit_config image_size/patch_size = {vit_cfg.patches_per_side} must equal "
                f"vit_max_num_patch_per_side = {cfg.vit_max_num_patch_per_side}"
            )
        return cfg

    def to_dicts(self) -> tuple[dict, dict, dict]:
        """The three JSON documents (`llm_config.json`, `vit_config.json`, `parity_config.json`)
        of a checkpoint folder that describes this configuration."""
        llm = {
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
            "hidden_size": self.llm.hidden_size, "intermediate_size": self.llm.intermediate_size,
            "num_hidden_layers": self.llm.num_hidden_layers,
            "num_attention_heads": self.llm.num_attention_heads,
            "num_key_value_heads": self.llm.num_key_value_heads, "vocab_size": self.llm.vocab_size,
            "rope_theta": self.llm.rope_theta, "rms_norm_eps": self.llm.rms_norm_eps,
            "max_position_embeddings": self.llm.max_position_embeddings, "rope_scaling": None,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        }
        vit = {
            "model_type": "siglip_vision_model", "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": self.vit.hidden_size, "intermediate_size": self.vit.intermediate_size,
            "num_hidden_layers": self.vit.num_hidden_layers + 1,
            "num_attention_heads": self.vit.num_attention_heads, "patch_size": self.vit.patch_size,
            "image_size": self.vit.image_size, "num_channels": self.vit.num_channels,
            "layer_norm_eps": self.vit.layer_norm_eps,
        }
        parity = {
            "bagel": {
                "latent_patch_size": self.latent_patch_size, "max_latent_size": self.max_latent_size,
                "vit_max_num_patch_per_side": self.vit_max_num_patch_per_side,
                "connector_act": "gelu_pytorch_tanh", "interpolate_pos": False,
            },
            "vae": {k: list(v) if isinstance(v, tuple) else v for k, v in self.vae.__dict__.items()},
            "vae_transform": _rule_dict(self.vae_transform),
            "vit_transform": _rule_dict(self.vit_transform),
        }
        return llm, vit, parity


def _rule_dict(rule: ResizeRule) -> dict:
    return {"max_image_size": rule.max_size, "min_image_size": rule.min_size,
            "image_stride": rule.stride, "max_pixels": rule.max_pixels}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
