"""Autoregressive text generation on a copy of a context (spec §5.3).

The copy is fed <|im_start|> at the context's next RoPE position, then each chosen token; the
copy's cache is dropped afterwards. Generation stops at <|im_end|> (not emitted), at a stray
<|im_start|> (where the official decoder cuts the text anyway), or after `max_new_tokens`.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from bagel_model.segments import Segment

from .context import Context, Session
from .params import TextParams


def next_token(logits: Tensor, params: TextParams, generator: torch.Generator) -> int:
    """Greedy argmax (lowest index on ties), or a draw from softmax(logits / temperature),
    restricted with top_p < 1 to the most probable tokens whose probabilities reach top_p."""
    if not params.do_sample or params.temperature == 0.0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the more probable tokens
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs * (before < params.top_p))
    return int(torch.multinomial(probs, 1, generator=generator))


def generate_text(session: Session, context: Context, params: TextParams,
                  generator: torch.Generator) -> Iterator[int]:
    """Yield generated token ids one by one."""
    executor, tok = session.executor, session.executor.tokenizer
    work = session.fork(context, "decode")
    try:
        token, position = tok.bos_id, work.rope_pos
        for _ in range(params.max_new_tokens):
            logits = executor.decode([Segment.text(work.context_id, [token], position, want_logits=True)])[0]
            position += 1
            token = next_token(logits, params, generator)
            if token in (tok.eos_id, tok.bos_id):
                return
            yield token
    finally:
        session.release(work)


class TextStream:
    """Turns token ids into text deltas, holding back incomplete UTF-8 sequences and any end
    of the text that may be the start of a stop string; `stopped` once a stop string appeared
    (the text is then cut before it)."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of `text` given out as deltas
        self.stopped = False

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        self.text = text
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.text, self.stopped = text[:min(cuts)], True
            return self._release(len(self.text))
        return self._release(len(text) - self._held(text))

    def finish(self) -> str:
        """The rest of the text not given out yet (the final text is then `text`)."""
        if not self.stopped:
            self.text = self.tokenizer.decode(self.ids)
        return self._release(len(self.text))

    def _held(self, text: str) -> int:
        """Length of the longest end of `text` that a stop string starts with."""
        for k in range(min(len(text), max(map(len, self.stop), default=1) - 1), 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stop):
                return k
        return 0

    def _release(self, end: int) -> str:
        delta = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta
