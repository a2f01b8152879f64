"""The Qwen2 byte-level BPE tokenizer with BAGEL's special tokens.

Reads `tokenizer.json` when the folder has one, otherwise builds the same tokenizer from
`vocab.json` + `merges.txt` + the added tokens of `tokenizer_config.json` (the files the official
slow tokenizer reads). `encode` adds no special tokens; `decode` keeps them (spec §1.4, §5.3).
`clean_prompt` takes chat-template markup out of user text before it is encoded.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers import AddedToken
from tokenizers.models import BPE

from .errors import CheckpointError

QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BOS = "<|im_start|>"
EOS = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
# The control tokens of Qwen2.5, in vocabulary order, following the BPE vocabulary.
# A chat template's role line after <|im_start|> ("user\n" and the like).
ROLE_HEADER = r"(?:system|user|assistant)[ \t]*\n"
QWEN2_CONTROL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)


def build_qwen2_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]],
                          added: dict[int, str]) -> Tokenizer:
    """A Qwen2-format tokenizer from its BPE vocabulary, merges and added (special) tokens."""
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    for token_id, content in sorted(added.items()):
        if tok.add_special_tokens([AddedToken(content, normalized=False, special=True)]) and \
                tok.token_to_id(content) != token_id:
            raise CheckpointError(f"added token {content!r} got id {tok.token_to_id(content)}, expected {token_id}")
    return tok


def text_block_len(tokens: int) -> int:
    """Tokens of a text block: its text's tokens plus <|im_start|> and <|im_end|>."""
    return tokens + 2


class BagelTokenizer:
    """Text <-> ids, plus the ids of the four tokens BAGEL uses."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        ids = {name: tokenizer.token_to_id(name) for name in (BOS, EOS, VISION_START, VISION_END)}
        missing = [name for name, i in ids.items() if i is None]
        if missing:
            raise CheckpointError(f"tokenizer lacks BAGEL's special tokens {missing}")
        self.bos_id, self.eos_id = ids[BOS], ids[EOS]
        self.vision_start_id, self.vision_end_id = ids[VISION_START], ids[VISION_END]
        specials = sorted((t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special),
                          key=len, reverse=True)
        self._markup = re.compile("|".join([re.escape(BOS) + f"(?:{ROLE_HEADER})?", *map(re.escape, specials)]))

    @classmethod
    def from_dir(cls, path: str | Path) -> BagelTokenizer:
        path = Path(path)
        try:
            if (path / "tokenizer.json").is_file():
                return cls(Tokenizer.from_file(str(path / "tokenizer.json")))
            vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
            merges = [tuple(line.split(" ")) for line in
                      (path / "merges.txt").read_text(encoding="utf-8").splitlines()
                      if line and not line.startswith("#version")]
            config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
            added = {int(i): t["content"] for i, t in config.get("added_tokens_decoder", {}).items()}
            return cls(build_qwen2_tokenizer(vocab, merges, added))
        except CheckpointError:
            raise
        except Exception as e:  # tokenizers raises plain Exception subclasses on bad files
            raise CheckpointError(f"cannot load the tokenizer from {path}: {e}") from e

    @property
    def image_markers(self) -> tuple[int, int]:
        """The ids of <|vision_start|> and <|vision_end|>, around every image block."""
        return self.vision_start_id, self.vision_end_id

    def text_block(self, ids: list[int]) -> list[int]:
        """A text block as contexts hold it: <|im_start|> ids <|im_end|> (`text_block_len` long)."""
        return [self.bos_id, *ids, self.eos_id]

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def clean_prompt(self, text: str) -> str:
        """User text without chat-template markup: every special token (<|im_start|>, <|im_end|>,
        <|image_pad|>, ...) and the role line after <|im_start|> are removed, and then the
        surrounding whitespace. BAGEL wraps each text in <|im_start|> ... <|im_end|> itself and
        places images by their position in the input, so markup that clients of other servers
        put into prompts would otherwise reach the model as control tokens (as vLLM-Omni, which
        strips the wrapper, we drop it; literal control tokens never reach the model from user
        text). Text without markup is returned unchanged."""
        cleaned = self._markup.sub("", text)
        return cleaned.strip() if cleaned != text else text

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        """Write `tokenizer.json`."""
        self._tok.save(str(Path(path) / "tokenizer.json"))
