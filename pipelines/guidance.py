"""Classifier-free guidance of BAGEL: which branches a step needs and how their velocities
combine, including the renorm variants (spec §5.4). Pure tensor math, no model.

Branches: COND (full context), CFG_TEXT (context without the last text), CFG_IMG (context
without the input images). With a = v_text + g_T (v_cond - v_text):
- text_channel: a is rescaled per token to at most |v_cond|, then v = v_img + g_I (a - v_img);
- global / channel: d = v_img + g_I (a - v_img) (or a), rescaled to at most |v_cond| over the
  whole image (global) or per token (channel).
The rescale factor is clamp(|v_cond| / (|x| + 1e-8), cfg_renorm_min, 1). With g_T <= 1 there is
no guidance at all, image guidance included (as in the official code).
"""
from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor

from .params import ImageParams
from .schedule import cfg_active


class Branch(str, Enum):
    COND = "cond"
    CFG_TEXT = "cfg_text"
    CFG_IMG = "cfg_img"


def branches_for_step(t: float, params: ImageParams) -> tuple[Branch, ...]:
    """The branches whose velocity step t needs."""
    if params.cfg_text_scale <= 1.0 or not cfg_active(t, params.cfg_interval):
        return (Branch.COND,)
    if params.cfg_img_scale > 1.0:
        return Branch.COND, Branch.CFG_TEXT, Branch.CFG_IMG
    return Branch.COND, Branch.CFG_TEXT


def combine(v: dict[Branch, Tensor], params: ImageParams) -> Tensor:
    """The guided velocity [tokens, channels] from the branch velocities of one image."""
    v_cond = v[Branch.COND].float()
    if Branch.CFG_TEXT not in v or params.cfg_text_scale <= 1.0:
        return v_cond
    v_text = v[Branch.CFG_TEXT].float()
    v_img = v[Branch.CFG_IMG].float() if Branch.CFG_IMG in v else None
    g_t, g_i, kind = params.cfg_text_scale, params.cfg_img_scale, params.cfg_renorm_type
    guided = v_text + g_t * (v_cond - v_text)
    if kind == "text_channel":
        guided = guided * _scale(v_cond, guided, params.cfg_renorm_min, per_token=True)
        return guided if v_img is None else v_img + g_i * (guided - v_img)
    if v_img is not None:
        guided = v_img + g_i * (guided - v_img)
    return guided * _scale(v_cond, guided, params.cfg_renorm_min, per_token=kind == "channel")


def _scale(reference: Tensor, guided: Tensor, minimum: float, per_token: bool) -> Tensor:
    if per_token:
        ratio = reference.norm(dim=-1, keepdim=True) / (guided.norm(dim=-1, keepdim=True) + 1e-8)
    else:
        ratio = reference.norm() / (guided.norm() + 1e-8)
    return torch.clamp(ratio, min=minimum, max=1.0)
