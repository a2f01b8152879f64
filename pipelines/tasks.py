"""BAGEL's tasks as short compositions: image generation (text-to-image, editing, interleaved
inputs, optional thinking) and understanding (text answers about images and text).

Inputs are an ordered list of items, each a string or a PIL image, as in the official
inferencer. Contexts are built as spec §5.5 describes; all of them are freed when the task ends,
however it ends.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor

from bagel_model.errors import InvalidRequest
from bagel_model.latents import patchify, to_uint8, unpatchify
from bagel_model.transforms import to_rgb, to_tensor

from .blocks import vae_block, vit_block
from .context import Context, Session
from .executor import Executor
from .guidance import Branch
from .noise import NoiseSource
from .params import ImageParams, TextParams
from .previews import Preview
from .sampler import sample_image
from .step import StepProgress
from .text import TextStream, generate_text

Item = str | Image.Image

VLM_THINK_SYSTEM_PROMPT = (
    "You should first think about the reasoning process in the mind and then provide the user with the answer. \n"
    "The reasoning process is enclosed within <think> </think> tags, i.e. <think> reasoning process here </think> answer here"
)
GEN_THINK_SYSTEM_PROMPT = (
    "You should first think about the planning process in the mind and then generate the image. \n"
    "The planning process is enclosed within <think> </think> tags, i.e. <think> planning process here </think> image here"
)


@dataclass(frozen=True)
class TextResult:
    text: str
    token_ids: list[int]
    finish_reason: str = "stop"  # "length": ended by max_new_tokens
    prompt_tokens: int = 0  # the context it was generated from: text and image tokens, markers included
    cached_tokens: int = 0  # of those, reused from the prefix cache


@dataclass(frozen=True)
class ImageResult:
    image: Image.Image
    latent: Tensor  # final latent tokens [h*w, patch_latent_dim], float32
    thought: TextResult | None = None  # think mode: the generated plan
    prompt_tokens: int = 0  # the conditional context before any thought: text and image tokens
    prompt_image_tokens: int = 0  # of those, the input images'
    cached_tokens: int = 0  # of those, reused from the prefix cache
    image_tokens: int = 0  # latent tokens generated


def generate_image(executor: Executor, items: list[Item], params: ImageParams, *, think: bool = False,
                   text_params: TextParams = TextParams(), noise: NoiseSource | None = None,
                   negative_prompt: str | None = None, request_id: str | None = None,
                   on_step: Callable[[StepProgress], None] | None = None,
                   on_text: Callable[[str], None] | None = None,
                   previews: int = 0, on_preview: Callable[[Preview], None] | None = None) -> ImageResult:
    """Text-to-image (items = [prompt]), editing ([image, prompt]) or any interleaving.

    The output has params' height and width; where unset, the (last) input image's size, else
    the model's largest square. A `negative_prompt` is appended to the text-free guidance
    branch, which otherwise holds only what precedes the last text (nothing, for
    text-to-image): guidance then pushes away from it; empty or None is the official sampler.
    `previews`: up to that many `Preview`s of the image in the making go to `on_preview`
    (pipelines/previews.py); they do not change the result."""
    cfg, tok = executor.config, executor.tokenizer
    items = _prompt_items(items, tok, need_text=True)
    negative = tok.clean_prompt(negative_prompt or "").strip()
    params.validate(cfg.max_image_side, cfg.latent_downsample)
    text_params.validate()
    noise = noise or NoiseSource()
    with Session(executor, request_id) as session:
        cond, cfg_text, cfg_img = (session.new(b.value) for b in (Branch.COND, Branch.CFG_TEXT, Branch.CFG_IMG))
        size = (cfg.max_image_side, cfg.max_image_side)
        if think:
            session.append_text([cond, cfg_img], tok.encode(GEN_THINK_SYSTEM_PROMPT))
        for item in items:
            if isinstance(item, str):
                cfg_text = _refork(session, cond, cfg_text)
                session.append_text([cond, cfg_img], tok.encode(item))
            else:
                size = _append_image(session, cond, item, noise, with_vae=True)
                cfg_text = _refork(session, cond, cfg_text)
        if negative:
            session.append_text([cfg_text], tok.encode(negative))
        size = (params.height or size[0], params.width or size[1])
        session.materialize()
        prompt_tokens, prompt_image_tokens, cached_tokens = cond.kv_len, cond.image_tokens, cond.cached_tokens
        thought = None
        if think:
            thought = _generate(session, cond, text_params, noise.generator, on_text)
            session.append_text([cond], tok.encode(thought.text))
            session.materialize()
        grid = cfg.latent_grid(*size)
        x = noise.randn(grid[0] * grid[1], cfg.patch_latent_dim)
        contexts = {Branch.COND: cond, Branch.CFG_TEXT: cfg_text, Branch.CFG_IMG: cfg_img}
        x = sample_image(executor, contexts, grid, params, x, _with_previews(on_step, on_preview, grid, cfg),
                         previews if on_preview is not None else 0)
    latent = unpatchify(x.float().cpu(), *grid, p=cfg.latent_patch_size, channels=cfg.latent_channels)
    decoded = executor.decode_latents(latent)
    return ImageResult(Image.fromarray(to_uint8(decoded.cpu()).numpy()), x.float().cpu(), thought, prompt_tokens,
                       prompt_image_tokens, cached_tokens, grid[0] * grid[1])


def _with_previews(on_step: Callable[[StepProgress], None] | None, on_preview: Callable[[Preview], None] | None,
                   grid: tuple[int, int], cfg) -> Callable[[StepProgress], None] | None:
    """`on_step`, plus a `Preview` to `on_preview` for each step that carries clean latents."""
    if on_preview is None:
        return on_step
    count = itertools.count()

    def step(progress: StepProgress) -> None:
        if progress.clean is not None:
            clean = progress.clean
            on_preview(Preview(next(count), progress.step, progress.num_steps, grid[1] * cfg.latent_downsample,
                               grid[0] * cfg.latent_downsample,
                               lambda: unpatchify(clean(), *grid, p=cfg.latent_patch_size, channels=cfg.latent_channels)))
        if on_step is not None:
            on_step(progress)

    return step


def understand(executor: Executor, items: list[Item], text_params: TextParams = TextParams(), *,
               think: bool = False, seed: int | None = None, request_id: str | None = None,
               on_text: Callable[[str], None] | None = None) -> TextResult:
    """Answer about the items (images enter through the ViT only)."""
    items = _prompt_items(items, executor.tokenizer, need_text=False)
    text_params.validate()
    noise = NoiseSource(seed)
    with Session(executor, request_id) as session:
        cond = session.new(Branch.COND.value)
        if think:
            session.append_text([cond], executor.tokenizer.encode(VLM_THINK_SYSTEM_PROMPT))
        for item in items:
            if isinstance(item, str):
                session.append_text([cond], executor.tokenizer.encode(item))
            else:
                _append_image(session, cond, item, noise, with_vae=False)
        return _generate(session, cond, text_params, noise.generator, on_text)


def _generate(session: Session, context: Context, params: TextParams, generator: torch.Generator,
              on_text: Callable[[str], None] | None) -> TextResult:
    session.materialize()
    stream, prompt_tokens = TextStream(session.executor.tokenizer, params.stop), context.kv_len
    for token in generate_text(session, context, params, generator):
        delta = stream.push(token)
        if delta and on_text is not None:
            on_text(delta)
        if stream.stopped:
            break
    rest = stream.finish()
    if rest and on_text is not None:
        on_text(rest)
    length = not stream.stopped and len(stream.ids) >= params.max_new_tokens
    return TextResult(stream.text, stream.ids, "length" if length else "stop", prompt_tokens, context.cached_tokens)


def _refork(session: Session, cond: Context, old: Context) -> Context:
    """The text-free branch becomes a copy of the conditional context as it is now."""
    session.release(old)
    return session.fork(cond, Branch.CFG_TEXT.value)


def _append_image(session: Session, context: Context, image: Image.Image, noise: NoiseSource,
                  with_vae: bool) -> tuple[int, int]:
    """Queue an input image (VAE block, then ViT block); returns its VAE-resized (H, W). The
    posterior noise is drawn here, as the encoders' work may be skipped (a cached prefix)."""
    executor, cfg = session.executor, session.executor.config
    resized, vit_image = cfg.resize_input(to_rgb(image))
    width, height = resized.size
    if with_vae:
        z = cfg.vae.z_channels
        eps = noise.randn(1, z, height // cfg.vae.downsample, width // cfg.vae.downsample)
        session.append([context], vae_block(
            resized, eps, cfg.latent_grid(height, width),
            lambda: patchify(executor.encode_vae(to_tensor(resized)[None], eps), cfg.latent_patch_size)))
    session.append([context], vit_block(vit_image, lambda: executor.encode_vit([to_tensor(vit_image)])[0]))
    return height, width


def _prompt_items(items: list[Item], tokenizer, need_text: bool) -> list[Item]:
    """The items with chat-template markup removed from their text (BagelTokenizer.clean_prompt),
    checked: strings and images only, no empty text, text present where needed."""
    if not items:
        raise InvalidRequest("the input is empty: give at least one text or image")
    cleaned = []
    for item in items:
        if isinstance(item, str):
            item = tokenizer.clean_prompt(item)
            if not item.strip():
                raise InvalidRequest("a text input is empty")
        elif not isinstance(item, Image.Image):
            raise InvalidRequest(f"inputs must be strings or images, got {type(item).__name__}")
        cleaned.append(item)
    if need_text and not any(isinstance(i, str) for i in cleaned):
        raise InvalidRequest("image generation needs a text prompt")
    return cleaned
