"""The decode fast path (static K/V slots, decode_step.py) gives the logits of the ordinary packed
path, in every situation the slot bookkeeping has to handle.

Both executors run the parity checkpoint in float32 on the CPU (the same code the GPU replays
as CUDA graphs); the ordinary path (`decode_slots=0`) is itself checked against the official
reference by test_parity.py. Measured max |diff| of logits: ~1e-6 (different reduction order
in the attention); tolerance 1e-4.
"""
from __future__ import annotations

import pytest
import torch

from bagel_model.kv_cache import MIN_CAPACITY
from bagel_model.segments import Segment
from pipelines.context import Session
from pipelines.local import LocalExecutor
from pipelines.params import TextParams
from pipelines.tasks import understand

ATOL = 1e-4


@pytest.fixture(scope="module")
def pair(checkpoint_dir):
    """(fast, ordinary) executors on the same weights; the fast one has 2 slots per stage."""
    base = LocalExecutor.from_checkpoint(checkpoint_dir, dtype=torch.float32, num_stages=2)
    parts = (base.config, base.tokenizer, base.stages, base.vision, base.vae)
    return LocalExecutor(*parts, decode_slots=2), LocalExecutor(*parts, decode_slots=0)


def _step(executor, contexts, tokens, step):
    segs = [Segment.text(c.context_id, [t], c.rope_pos + step, want_logits=True) for c, t in zip(contexts, tokens)]
    return executor.decode(segs)


def _prompted(session, n, text):
    contexts = [session.new(f"c{i}") for i in range(n)]
    session.append_text(contexts, session.executor.tokenizer.encode(text))
    session.materialize()  # appending only queues the block
    return contexts


def test_batched_decode_matches_packed_path(pair):
    fast, slow = pair
    with Session(fast, "f") as sf, Session(slow, "s") as ss:
        cf, cs = _prompted(sf, 2, "a short prompt"), _prompted(ss, 2, "a short prompt")
        tokens = [fast.tokenizer.bos_id] * 2
        for step in range(6):
            lf, ls = _step(fast, cf, tokens, step), _step(slow, cs, tokens, step)
            for a, b in zip(lf, ls):
                torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
            tokens = [int(x.argmax()) for x in lf]
        assert all(r.cache.length(cf[0].context_id) == cf[0].kv_len + 6 for r in fast.runners)
        assert fast.runners[0].cache._slot, "the fast path was not taken"


def test_more_contexts_than_slots_and_eviction(pair):
    """Three contexts take turns on two slots (eviction and moving back in), then one of them is
    extended by an ordinary prefill and forked: contents must survive every move."""
    fast, slow = pair
    with Session(fast, "f") as sf, Session(slow, "s") as ss:
        cf, cs = _prompted(sf, 3, "xyz"), _prompted(ss, 3, "xyz")
        tok = fast.tokenizer.bos_id
        for step, order in enumerate([[0, 1], [2], [0], [1, 2], [0]]):
            lf = _step(fast, [cf[i] for i in order], [tok] * len(order), step)
            ls = _step(slow, [cs[i] for i in order], [tok] * len(order), step)
            for a, b in zip(lf, ls):
                torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
        # Three contexts for two slots: the whole call falls back to the packed path.
        lf, ls = _step(fast, cf, [tok] * 3, 5), _step(slow, cs, [tok] * 3, 5)
        for a, b in zip(lf, ls):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
        for c in cf + cs:
            c.rope_pos += 6
        sf.append_text([cf[0]], fast.tokenizer.encode("more"))
        ss.append_text([cs[0]], slow.tokenizer.encode("more"))
        kf, ks = sf.fork(cf[0], "k"), ss.fork(cs[0], "k")
        torch.testing.assert_close(_step(fast, [kf], [tok], 0)[0], _step(slow, [ks], [tok], 0)[0], atol=ATOL, rtol=0)
        for runner in fast.runners:
            assert runner.cache.length(kf.context_id) == runner.cache.length(cf[0].context_id) + 1


def test_slots_grow_past_the_first_capacity(pair):
    """A context longer than the smallest slot capacity reallocates the slots, contents kept."""
    fast, slow = pair
    text = " ".join(str(i) for i in range(MIN_CAPACITY))
    with Session(fast, "f") as sf, Session(slow, "s") as ss:
        short_f, short_s = _prompted(sf, 1, "hi"), _prompted(ss, 1, "hi")
        tok = fast.tokenizer.bos_id
        _step(fast, short_f, [tok], 0), _step(slow, short_s, [tok], 0)
        long_f, long_s = _prompted(sf, 1, text), _prompted(ss, 1, text)
        assert long_f[0].kv_len > MIN_CAPACITY
        version = fast.runners[0].cache.storage.version
        lf = _step(fast, short_f + long_f, [tok, tok], 1)
        ls = _step(slow, short_s + long_s, [tok, tok], 1)
        assert fast.runners[0].cache.storage.version > version
        for a, b in zip(lf, ls):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_understanding_is_identical_and_frees_every_slot(pair, checkpoint_dir):
    fast, slow = pair
    params = TextParams(max_new_tokens=12)
    assert understand(fast, ["Describe a cat."], params).token_ids == understand(slow, ["Describe a cat."], params).token_ids
    for runner in fast.runners:
        assert runner.cache.context_ids() == [] and not runner.cache._slot and runner.cache.nbytes() == 0
