"""SigLIP NaViT vision tower + connector: images -> LLM input embeddings of ViT tokens.

Several images are packed row after row; attention is bidirectional inside each image only.
The output adds the 2-D sin-cos table `vit_pos_embed` (spec §4.6).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import attend
from .config import BagelConfig, ViTConfig
from .layers import PositionTable
from .transforms import vit_patches


class _Attention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_attention_heads, d // cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: Tensor, lengths: list[int]) -> Tensor:
        shape = (self.num_heads, self.head_dim)
        q, k, v = (p(x).unflatten(-1, shape) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = torch.cat([attend(qi, ki, vi, causal=False) for qi, ki, vi in
                         zip(q.split(lengths), k.split(lengths), v.split(lengths))])
        return self.out_proj(out.flatten(1))


class _MLP(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = _Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = _MLP(cfg)

    def forward(self, x: Tensor, lengths: list[int]) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), lengths)
        return x + self.mlp(self.layer_norm2(x))


class _Embeddings(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.patch_embedding = nn.Linear(cfg.num_channels * cfg.patch_size**2, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.patches_per_side**2, cfg.hidden_size)


class _Encoder(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class SiglipVisionModel(nn.Module):
    """Patches [N, 3*p*p] + position ids [N] -> post-layernorm features [N, vit_hidden]."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, patches: Tensor, position_ids: Tensor, lengths: list[int]) -> Tensor:
        x = self.embeddings.patch_embedding(patches) + self.embeddings.position_embedding(position_ids)
        for layer in self.encoder.layers:
            x = layer(x, lengths)
        return self.post_layernorm(x)


class _VitModel(nn.Module):
    """Holds `vision_model` (checkpoint names `vit_model.vision_model.*`)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.vision_model = SiglipVisionModel(cfg)


class Connector(nn.Module):
    """fc2(gelu_tanh(fc1(x))): ViT features -> LLM hidden size."""

    def __init__(self, vit_hidden: int, llm_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(vit_hidden, llm_hidden)
        self.fc2 = nn.Linear(llm_hidden, llm_hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionEncoder(nn.Module):
    """`vit_model` + `connector` + `vit_pos_embed`: packed patches -> LLM embeddings [N, hidden]."""

    def __init__(self, config: BagelConfig):
        super().__init__()
        self.vit_model = _VitModel(config.vit)
        self.connector = Connector(config.vit.hidden_size, config.llm.hidden_size)
        self.vit_pos_embed = PositionTable(config.vit_max_num_patch_per_side, config.llm.hidden_size)
        self.patching = (config.vit.patch_size, config.vit_max_num_patch_per_side)

    def forward(self, patches: Tensor, position_ids: Tensor, lengths: list[int]) -> Tensor:
        dtype = self.connector.fc1.weight.dtype
        features = self.vit_model.vision_model(patches.to(dtype), position_ids, lengths)
        return self.connector(features) + self.vit_pos_embed(position_ids)

    @torch.inference_mode()
    def embed_images(self, images: list[Tensor]) -> list[Tensor]:
        """ViT-transformed images [3, H, W] in [-1, 1] -> LLM embeddings [N_i, hidden] each,
        packed into one call (attention stays inside each image)."""
        patch_size, per_side = self.patching
        device = self.connector.fc1.weight.device
        packed = [vit_patches(img, patch_size, per_side) for img in images]
        lengths = [p.shape[0] for p, _ in packed]
        patches = torch.cat([p for p, _ in packed]).to(device)
        position_ids = torch.cat([i for _, i in packed]).to(device)
        return list(self(patches, position_ids, lengths).split(lengths))
