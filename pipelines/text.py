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
    """Greedy argmax (lowest index on ties), or a draw from softmax(logits / temperature)."""
    if not params.do_sample or params.temperature == 0.0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / params.temperature, dim=-1)
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
    """Turns token ids into text deltas, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta, self.text = text[len(self.text):], text
        return delta

    def finish(self) -> str:
        """The final text (and any held-back remainder is included)."""
        self.text = self.tokenizer.decode(self.ids)
        return self.text
