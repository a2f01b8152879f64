"""Automatic prefix caching in the pipelines (pipelines/prefix_cache.py), on the parity fixture
(float32, CPU): every task gives bit-identical results with and without the cache, a repeated
or extended prompt reuses the cached prefix (and skips the encoders of its images), a small
budget evicts least recently used prefixes without touching running requests, and nothing but
the cache's own contexts is left after a request, whatever way it ended."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.noise import NoiseSource
from pipelines.params import ImageParams, TextParams
from pipelines.local import LocalExecutor
from pipelines.tasks import generate_image, understand

PARAMS = ImageParams(num_timesteps=3, height=32, width=32, cfg_interval=(0.0, 1.0))
TEXT = TextParams(max_new_tokens=6)


def picture(seed: int, width: int = 48, height: int = 40) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def cached(checkpoint_dir) -> LocalExecutor:
    return LocalExecutor.from_checkpoint(checkpoint_dir, dtype=torch.float32, prefix_cache_bytes=2**30)


@pytest.fixture(autouse=True)
def empty_cache(cached):
    cached.prefix_cache.clear()
    yield
    assert cached.live_contexts() == sorted(cached.prefix_cache.context_ids()), "a request's context leaked"


def image_task(executor, items, params=PARAMS, seed=3, **kwargs):
    return generate_image(executor, items, params, noise=NoiseSource(seed=seed), **kwargs)


def text_task(executor, items, **kwargs):
    return understand(executor, items, TEXT, seed=5, **kwargs)


def counting(executor: LocalExecutor) -> dict[str, int]:
    """Count the encoders' calls (wraps the executor's methods)."""
    calls = {"encode_vit": 0, "encode_vae": 0}
    for name in calls:
        method = getattr(executor, name)

        def wrapped(*args, _method=method, _name=name):
            calls[_name] += 1
            return _method(*args)
        setattr(executor, name, wrapped)
    return calls


def uncount(executor: LocalExecutor) -> None:
    for name in ("encode_vit", "encode_vae"):
        executor.__dict__.pop(name, None)


TASKS = {
    "t2i": lambda ex: image_task(ex, ["A red fox in the snow."]),
    "t2i_negative": lambda ex: image_task(ex, ["A red fox in the snow."], negative_prompt="blurry"),
    "edit": lambda ex: image_task(ex, [picture(1), "make it night"], ImageParams(
        num_timesteps=3, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel")),
    "two_images": lambda ex: image_task(ex, [picture(1), picture(2, 40, 48), "blend them"], PARAMS),
    "think_image": lambda ex: image_task(ex, ["a car made of cars"], think=True, text_params=TEXT),
    "understand": lambda ex: text_task(ex, [picture(1), "What is in this picture?"]),
    "understand_think": lambda ex: text_task(ex, [picture(1), "Why?"], think=True),
    "text_only": lambda ex: text_task(ex, ["Write about a dog."]),
}


def same(a, b) -> bool:
    if hasattr(a, "latent"):
        return torch.equal(a.latent, b.latent) and a.image.tobytes() == b.image.tobytes() and (
            (a.thought is None) == (b.thought is None)) and (a.thought is None or a.thought.token_ids == b.thought.token_ids)
    return a.token_ids == b.token_ids


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_is_bit_identical_with_the_cache(task, executor, cached):
    plain = TASKS[task](executor)
    first = TASKS[task](cached)  # fills the cache
    calls = counting(cached)
    try:
        again = TASKS[task](cached)  # the whole prompt hits
    finally:
        uncount(cached)
    assert same(plain, first) and same(plain, again)
    assert first.cached_tokens == 0 and again.cached_tokens == again.prompt_tokens == plain.prompt_tokens > 0
    assert calls == {"encode_vit": 0, "encode_vae": 0}, "a cached image was encoded again"
    stats = cached.prefix_cache.stats()
    assert stats["hits"] > 0 and stats["misses"] > 0 and stats["entries"] > 0 and stats["bytes"] > 0


def test_multi_turn_chat_reuses_the_conversation(executor, cached):
    image, q1, q2 = picture(7), "What is in this picture?", "And which colours?"
    turn1 = text_task(cached, [image, q1])
    calls = counting(cached)
    try:
        turn2 = text_task(cached, [image, q1, turn1.text or "nothing", q2])
    finally:
        uncount(cached)
    assert turn2.cached_tokens == turn1.prompt_tokens, "turn 2 did not reuse turn 1's prompt"
    assert calls["encode_vit"] == 0
    assert same(turn2, text_task(executor, [image, q1, turn1.text or "nothing", q2]))


def test_iterative_edits_reuse_the_image(executor, cached):
    params = ImageParams(num_timesteps=3, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0))
    image = picture(8)
    first = image_task(cached, [image, "make it night"], params)
    calls = counting(cached)
    try:
        second = image_task(cached, [image, "add a moon"], params)
    finally:
        uncount(cached)
    assert second.cached_tokens == first.prompt_image_tokens > 0, "the image blocks were not reused"
    assert calls == {"encode_vit": 0, "encode_vae": 0}
    assert same(second, image_task(executor, [image, "add a moon"], params))
    # Another seed draws other posterior noise: the VAE block differs, so nothing is reused.
    other = image_task(cached, [image, "add a moon"], params, seed=4)
    assert other.cached_tokens == 0


def test_a_new_cache_never_reuses_an_entry_name(checkpoint_dir, cached):
    """After a stage-group rebuild the service makes a new cache: its entries must not take the
    names of the old one's, which the cluster executor may still have placed on a branch group."""
    text_task(cached, ["Write about a fox."])
    other = LocalExecutor.from_checkpoint(checkpoint_dir, dtype=torch.float32, prefix_cache_bytes=2**30)
    text_task(other, ["Write about a fox."])
    old, new = set(cached.prefix_cache.context_ids()), set(other.prefix_cache.context_ids())
    assert old and new and not old & new


def test_a_small_budget_evicts_least_recently_used(checkpoint_dir, executor):
    small = LocalExecutor.from_checkpoint(checkpoint_dir, dtype=torch.float32, prefix_cache_bytes=2**30)
    cache = small.prefix_cache
    text_task(small, ["Write about a dog."])
    cache.budget_bytes = cache.used_bytes  # room for that prompt only
    text_task(small, ["Write about a cat."])
    assert cache.stats()["evictions"] == 1 and cache.stats()["entries"] == 1
    assert text_task(small, ["Write about a cat."]).cached_tokens > 0, "the newest prompt was evicted"
    assert text_task(small, ["Write about a dog."]).cached_tokens == 0, "the oldest prompt stayed"
    cache.budget_bytes = 1  # nothing fits: nothing is cached, results stay exact
    result = text_task(small, ["Write about a bird."])
    assert same(result, text_task(executor, ["Write about a bird."])) and cache.stats()["entries"] <= 1
    assert small.live_contexts() == sorted(cache.context_ids())


def test_eviction_never_touches_a_running_request(executor, cached):
    prompt = ["A red fox in the snow."]
    image_task(cached, prompt)  # cached
    evicted = []
    result = image_task(cached, prompt, on_step=lambda p: evicted.append(cached.prefix_cache.clear()))
    assert sum(evicted) > 0 and result.cached_tokens > 0
    assert same(result, image_task(executor, prompt))


def test_no_context_leaks_after_an_error(cached):
    def fail(progress):
        raise RuntimeError("client went away")

    with pytest.raises(RuntimeError):
        image_task(cached, [picture(3), "make it night"], on_step=fail)
    with pytest.raises(RuntimeError):
        text_task(cached, [picture(3), "What?"], on_text=lambda delta: fail(None))
    # the autouse fixture checks that only the cache's contexts are left


def test_off_means_no_cache(executor):
    assert executor.prefix_cache is None
    result = text_task(executor, ["Write about a dog."])
    assert result.cached_tokens == 0 and executor.live_contexts() == []


def test_a_queued_call_runs_for_all_its_contexts_or_none(executor, cached):
    """After text-to-image of P, an edit [image, P] finds P cached for its image-free branch but
    not for its conditional one: both are prefilled in one call, as without the cache."""
    prompt, params = "make it night", ImageParams(num_timesteps=3, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0))
    image_task(cached, [prompt])
    hits = cached.prefix_cache.stats()["hits"]
    edit = image_task(cached, [picture(9), prompt], params)
    assert edit.cached_tokens == 0 and cached.prefix_cache.stats()["hits"] == hits
    assert same(edit, image_task(executor, [picture(9), prompt], params))


def test_a_prefix_is_reused_only_where_it_was_prefilled_alike(cached):
    """A block prefilled for one context is not reused by a call that prefills it for two (other
    GEMM shapes, so other rounding on a GPU), and is reused by another call for one."""
    from pipelines.context import Session

    ids = cached.tokenizer.encode("a cat on a mat")
    with Session(cached) as alone:
        alone.append_text([alone.new("a")], ids)
        alone.materialize()
    with Session(cached) as pair:
        contexts = [pair.new("b"), pair.new("c")]
        pair.append_text(contexts, ids)
        pair.materialize()
        assert [c.cached_tokens for c in contexts] == [0, 0]
    with Session(cached) as again:
        context = again.new("d")
        again.append_text([context], ids)
        again.materialize()
        assert context.cached_tokens == context.kv_len > 0


def test_running_out_of_device_memory_evicts_every_prefix(cached):
    text_task(cached, ["Write about a dog."])
    assert cached.prefix_cache.stats()["entries"] > 0
    def out_of_memory(segments):
        raise torch.OutOfMemoryError("CUDA out of memory")

    cached.prefill = out_of_memory
    try:
        with pytest.raises(torch.OutOfMemoryError):
            text_task(cached, ["Write about a cat."])
    finally:
        del cached.prefill
    assert cached.prefix_cache.stats()["entries"] == 0
