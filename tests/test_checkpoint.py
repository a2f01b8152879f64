"""Checkpoint layout and loader strictness.

* The default `BagelConfig()` describes exactly the tensors of the released BAGEL-7B-MoT files
  (names and shapes, from the official module tree; built on the meta device here).
* The loaders reject a missing, corrupt, incomplete, over-full or misshapen checkpoint with a
  `CheckpointError` that names the file or the tensors.
* A pipeline stage needs (and reads) only its own tensors.
* The tokenizer's fallback path (vocab.json + merges.txt + tokenizer_config.json) gives the same
  ids as tokenizer.json.
"""
from __future__ import annotations

import json
import re
import shutil
import unicodedata
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bagel_model.config import BagelConfig
from bagel_model.demo import demo_config, demo_tokenizer, write_checkpoint
from bagel_model.errors import CheckpointError
from bagel_model.loader import EMA_FILE, VAE_FILE, expected_ema_shapes, load_stage, load_vae, load_vision_encoder
from bagel_model.model import BagelStage
from bagel_model.stage import split_layers
from bagel_model.tokenizer import BagelTokenizer
from bagel_model.vae import AutoEncoder, VAEConfig
from pipelines.local import LocalExecutor

from .conftest import FIXTURE

KEYS_FILE = FIXTURE.parent / "bagel-7b-mot-keys.json"
NUM_LAYERS = 4


# --------------------------------------------------------------------------- released layout

def test_default_config_matches_released_checkpoint_keys():
    if not KEYS_FILE.is_file():
        pytest.fail(f"{KEYS_FILE} not found")
    doc = json.loads(KEYS_FILE.read_text())
    released_ema = {k: tuple(v[0]) for k, v in doc["ema.safetensors"].items()}
    released_ae = {k: tuple(v[0]) for k, v in doc["ae.safetensors"].items()}
    assert len(released_ema) == doc["counts"]["ema_tensors"] == 1223
    assert len(released_ae) == doc["counts"]["ae_tensors"] == 244

    ema = expected_ema_shapes(BagelConfig())
    with torch.device("meta"):
        ae = AutoEncoder(VAEConfig())
    ae_shapes = {k: tuple(v.shape) for k, v in ae.state_dict().items()}

    assert sorted(set(released_ema) - set(ema)) == [], "tensors of the released ema file we do not build"
    assert sorted(set(ema) - set(released_ema)) == [], "tensors we build that the released ema file lacks"
    wrong = {k: (ema[k], released_ema[k]) for k in ema if ema[k] != released_ema[k]}
    assert wrong == {}
    assert ae_shapes == released_ae
    assert sum(torch.Size(s).numel() for s in ema.values()) == doc["counts"]["ema_elements"]
    assert sum(torch.Size(s).numel() for s in ae_shapes.values()) == doc["counts"]["ae_elements"]


# --------------------------------------------------------------------------- demo checkpoint

@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    tok = demo_tokenizer()
    config = demo_config(num_layers=NUM_LAYERS, vocab_size=len(tok))
    return write_checkpoint(tmp_path_factory.mktemp("demo4"), config, tok)


@pytest.fixture(scope="module")
def demo_cfg(demo_dir) -> BagelConfig:
    return BagelConfig.from_checkpoint_dir(demo_dir)


@pytest.fixture
def copy_dir(demo_dir, tmp_path) -> Path:
    """A private copy of the demo checkpoint folder, free to damage."""
    return Path(shutil.copytree(demo_dir, tmp_path / "ckpt"))


def rewrite_ema(folder: Path, edit) -> None:
    tensors = load_file(str(folder / EMA_FILE))
    edit(tensors)
    save_file(tensors, str(folder / EMA_FILE))


def test_demo_checkpoint_loads(demo_dir, demo_cfg):
    assert demo_cfg.llm.num_hidden_layers == NUM_LAYERS
    stage = load_stage(demo_dir, demo_cfg, dtype=torch.float32)
    assert stage.dtype == torch.float32
    names = set(load_file(str(demo_dir / EMA_FILE)))
    assert names == set(expected_ema_shapes(demo_cfg))
    # Values arrive unchanged (bf16 -> float32 is exact).
    stored = load_file(str(demo_dir / EMA_FILE))
    key = "language_model.model.layers.3.self_attn.q_proj.weight"
    assert torch.equal(stage.state_dict()[key], stored[key].float())


def test_missing_ema_file(copy_dir, demo_cfg):
    (copy_dir / EMA_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"missing.*ema\.safetensors"):
        load_stage(copy_dir, demo_cfg)
    with pytest.raises(CheckpointError, match=r"ema\.safetensors"):
        LocalExecutor.from_checkpoint(copy_dir, dtype=torch.float32)


def test_missing_ae_file(copy_dir, demo_cfg):
    (copy_dir / VAE_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"missing.*ae\.safetensors"):
        load_vae(copy_dir, demo_cfg)


def test_garbage_ema_file(copy_dir, demo_cfg):
    (copy_dir / EMA_FILE).write_bytes(b"\x00\x01garbage bytes, not a safetensors file" * 10)
    with pytest.raises(CheckpointError, match=r"cannot read .*ema\.safetensors"):
        load_stage(copy_dir, demo_cfg)
    (copy_dir / EMA_FILE).write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"ema\.safetensors"):
        load_vision_encoder(copy_dir, demo_cfg)


def test_truncated_ema_file(copy_dir, demo_cfg):
    data = (copy_dir / EMA_FILE).read_bytes()
    (copy_dir / EMA_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"ema\.safetensors"):
        load_stage(copy_dir, demo_cfg)


def test_truncated_ae_file(copy_dir, demo_cfg):
    data = (copy_dir / VAE_FILE).read_bytes()
    (copy_dir / VAE_FILE).write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"ae\.safetensors"):
        load_vae(copy_dir, demo_cfg)


def test_missing_tensor_is_named(copy_dir, demo_cfg):
    gone = "language_model.model.layers.2.mlp_moe_gen.down_proj.weight"
    rewrite_ema(copy_dir, lambda t: t.pop(gone))
    with pytest.raises(CheckpointError, match=r"1 missing tensors: " + gone.replace(".", r"\.")):
        load_stage(copy_dir, demo_cfg)
    # A stage that does not own the tensor does not need it.
    first = split_layers(NUM_LAYERS, 2)[0]
    assert len(load_stage(copy_dir, demo_cfg, first).language_model.model.layers) == 2
    # The ViT tower does not need it either.
    load_vision_encoder(copy_dir, demo_cfg)


def test_missing_vit_tensor_is_named(copy_dir, demo_cfg):
    gone = "connector.fc2.weight"
    rewrite_ema(copy_dir, lambda t: t.pop(gone))
    with pytest.raises(CheckpointError, match=r"missing tensors: connector\.fc2\.weight"):
        load_vision_encoder(copy_dir, demo_cfg)


def test_unexpected_tensor_is_named(copy_dir, demo_cfg):
    def add(t):
        t["language_model.model.extra_head.weight"] = torch.zeros(3, 3, dtype=torch.bfloat16)
        # A layer beyond the configured depth is unexpected too.
        t[f"language_model.model.layers.{NUM_LAYERS}.input_layernorm.weight"] = torch.ones(64, dtype=torch.bfloat16)
    rewrite_ema(copy_dir, add)
    with pytest.raises(CheckpointError, match=r"2 unexpected tensors") as info:
        load_stage(copy_dir, demo_cfg)
    assert "language_model.model.extra_head.weight" in str(info.value)
    assert f"language_model.model.layers.{NUM_LAYERS}.input_layernorm.weight" in str(info.value)
    with pytest.raises(CheckpointError, match=r"unexpected tensors: .*extra_head"):
        load_vision_encoder(copy_dir, demo_cfg)


def test_unexpected_ae_tensor_is_named(copy_dir, demo_cfg):
    tensors = load_file(str(copy_dir / VAE_FILE))
    tensors["decoder.extra.bias"] = torch.zeros(2)
    save_file(tensors, str(copy_dir / VAE_FILE))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: decoder\.extra\.bias"):
        load_vae(copy_dir, demo_cfg)


def test_wrong_shape_is_named(copy_dir, demo_cfg):
    name = "language_model.model.layers.1.mlp_moe_gen.gate_proj.weight"

    def transpose(t):
        t[name] = t[name].t().contiguous()
    rewrite_ema(copy_dir, transpose)
    hidden, inter = demo_cfg.llm.hidden_size, demo_cfg.llm.intermediate_size
    assert hidden != inter
    with pytest.raises(CheckpointError, match=rf"wrong shapes: {re.escape(name)} \[{hidden}, {inter}\] "
                                              rf"\(expected \[{inter}, {hidden}\]\)"):
        load_stage(copy_dir, demo_cfg)


def test_config_that_does_not_fit_the_weights(copy_dir):
    llm = json.loads((copy_dir / "llm_config.json").read_text())
    llm["intermediate_size"] = 96
    (copy_dir / "llm_config.json").write_text(json.dumps(llm))
    with pytest.raises(CheckpointError, match=r"wrong shapes: .*mlp.*\[128, 64\] \(expected \[96, 64\]\)"):
        LocalExecutor.from_checkpoint(copy_dir, dtype=torch.float32)


def test_missing_llm_config(copy_dir):
    (copy_dir / "llm_config.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing.*llm_config\.json"):
        BagelConfig.from_checkpoint_dir(copy_dir)
    with pytest.raises(CheckpointError, match=r"llm_config\.json"):
        LocalExecutor.from_checkpoint(copy_dir, dtype=torch.float32)


def test_corrupt_llm_config(copy_dir):
    (copy_dir / "llm_config.json").write_text('{"hidden_size": 64, ')
    with pytest.raises(CheckpointError, match=r"cannot read .*llm_config\.json"):
        BagelConfig.from_checkpoint_dir(copy_dir)
    (copy_dir / "llm_config.json").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(CheckpointError, match=r"llm_config\.json"):
        BagelConfig.from_checkpoint_dir(copy_dir)


def test_incomplete_llm_config_names_the_key(copy_dir):
    llm = json.loads((copy_dir / "llm_config.json").read_text())
    del llm["num_key_value_heads"]
    (copy_dir / "llm_config.json").write_text(json.dumps(llm))
    with pytest.raises(CheckpointError, match=r"invalid configuration: .*num_key_value_heads"):
        BagelConfig.from_checkpoint_dir(copy_dir)


def test_unsupported_llm_config_value(copy_dir):
    llm = json.loads((copy_dir / "llm_config.json").read_text())
    llm["hidden_act"] = "gelu"
    (copy_dir / "llm_config.json").write_text(json.dumps(llm))
    with pytest.raises(CheckpointError, match=r"hidden_act"):
        BagelConfig.from_checkpoint_dir(copy_dir)


# --------------------------------------------------------------------------- stages

LAST_STAGE_HEADS = {
    "language_model.model.norm.weight", "language_model.model.norm_moe_gen.weight",
    "language_model.lm_head.weight", "llm2vae.weight", "llm2vae.bias",
}


def test_stage_owns_only_its_tensors(demo_dir, demo_cfg, tmp_path):
    first, second = split_layers(NUM_LAYERS, 2)
    assert (first.layers, second.layers) == (range(0, 2), range(2, 4))
    full = load_file(str(demo_dir / EMA_FILE))
    llm_names = {k for k in full if k.startswith(("language_model.", "time_embedder.", "vae2llm.",
                                                   "latent_pos_embed.", "llm2vae."))}
    # Write a file holding ONLY the second stage's tensors.
    with torch.device("meta"):
        names_1 = set(BagelStage(demo_cfg, second).state_dict())
        names_0 = set(BagelStage(demo_cfg, first).state_dict())
    layer_of = {k: int(k.split(".")[3]) for k in names_1 if k.startswith("language_model.model.layers.")}
    assert set(layer_of.values()) == {2, 3}
    assert names_1 - set(layer_of) == LAST_STAGE_HEADS
    assert names_0.isdisjoint(names_1) and names_0 | names_1 == llm_names
    assert not any(k.startswith("language_model.model.layers.") and int(k.split(".")[3]) >= 2 for k in names_0)
    assert {"language_model.model.embed_tokens.weight", "vae2llm.weight", "time_embedder.mlp.0.weight",
            "latent_pos_embed.pos_embed"} <= names_0

    only = tmp_path / "stage1-only"
    only.mkdir()
    for name in ("llm_config.json", "vit_config.json", "parity_config.json"):
        shutil.copy(demo_dir / name, only / name)
    save_file({k: full[k] for k in names_1}, str(only / EMA_FILE))

    stage = load_stage(only, demo_cfg, second, dtype=torch.float32)
    state = stage.state_dict()
    assert set(state) == names_1
    assert all(torch.equal(state[k], full[k].float()) for k in names_1)
    assert stage.stage.is_last and not stage.stage.is_first
    # The first stage cannot come from that file: its tensors are missing and named.
    with pytest.raises(CheckpointError, match=r"missing tensors: .*embed_tokens"):
        load_stage(only, demo_cfg, first)
    with pytest.raises(CheckpointError, match=r"missing tensors: .*connector"):
        load_vision_encoder(only, demo_cfg)


def test_middle_stage_has_no_heads(demo_dir, demo_cfg):
    specs = split_layers(NUM_LAYERS, 3)
    assert [s.layers for s in specs] == [range(0, 2), range(2, 3), range(3, 4)]
    middle = load_stage(demo_dir, demo_cfg, specs[1], dtype=torch.float32)
    names = set(middle.state_dict())
    assert all(k.startswith("language_model.model.layers.2.") for k in names), sorted(names)[:5]


def test_split_layers_rejects_bad_splits():
    with pytest.raises(ValueError):
        split_layers(4, 5)
    with pytest.raises(ValueError):
        split_layers(4, 0)
    with pytest.raises(ValueError):
        split_layers(4, 2, sizes=[3, 2])
    assert [s.layers for s in split_layers(5, 2, sizes=[1, 4])] == [range(0, 1), range(1, 5)]
    assert [s.layers for s in split_layers(5, 2)] == [range(0, 3), range(3, 5)]


# --------------------------------------------------------------------------- tokenizer

NFC_E = unicodedata.normalize("NFC", "é")
NFD_E = unicodedata.normalize("NFD", "é")
TRICKY = [
    "", "Hello, world!", "  leading and trailing spaces  ", "tabs\tand\nnewlines\n\n\r\nend\n",
    "digits 1234567890 and 3.14159, 2024-06-01", "naïve café résumé Ærøskøbing",
    f"NFC {NFC_E} vs NFD {NFD_E}", NFD_E * 3, "日本語のテキストと中文", "emoji 🦊🌅👍🏽 done",
    "a literal <|im_end|> inside text, then <|im_start|>again<|vision_start|>",
    "<think> reasoning </think> answer", "don't you'll I'M we've", "x" * 300, "!!!???...,,,",
]


@pytest.fixture(scope="module")
def tokenizers(checkpoint_dir, tmp_path_factory) -> tuple[BagelTokenizer, BagelTokenizer]:
    fallback_dir = tmp_path_factory.mktemp("tok-fallback")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(checkpoint_dir / name, fallback_dir / name)
    assert not (fallback_dir / "tokenizer.json").exists()
    return BagelTokenizer.from_dir(checkpoint_dir), BagelTokenizer.from_dir(fallback_dir)


def test_tokenizer_fallback_matches_tokenizer_json(tokenizers, cases):
    fast, slow = tokenizers
    assert len(fast) == len(slow)
    assert (fast.bos_id, fast.eos_id, fast.vision_start_id, fast.vision_end_id) == \
        (slow.bos_id, slow.eos_id, slow.vision_start_id, slow.vision_end_id) == (2001, 2002, 2009, 2010)
    calls = [c for case in cases.values() for c in case["derived"].get("encode_calls", [])]
    assert len(calls) >= 10
    for call in calls:
        assert fast.encode(call["text"]) == call["ids"], call["text"]
        assert slow.encode(call["text"]) == call["ids"], call["text"]
    for text in TRICKY:
        ids = fast.encode(text)
        assert slow.encode(text) == ids, repr(text)
        assert fast.decode(ids) == slow.decode(ids)


def test_tokenizer_special_cases(tokenizers):
    for tok in tokenizers:
        # NFC normalisation: composed and decomposed forms give the same ids.
        assert tok.encode(NFD_E) == tok.encode(NFC_E)
        # A literal control token inside user text becomes the special id (stock Qwen2.5 behaviour).
        ids = tok.encode("a <|im_end|> b")
        assert ids.count(tok.eos_id) == 1
        assert tok.decode(ids) == "a <|im_end|> b"
        # Digits are split one by one.
        assert len(tok.encode("12345")) == 5
        # Round trip of plain text (already NFC).
        for text in TRICKY:
            assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)


def test_tokenizer_missing_files(tmp_path, checkpoint_dir):
    with pytest.raises(CheckpointError, match="tokenizer"):
        BagelTokenizer.from_dir(tmp_path)
    shutil.copy(checkpoint_dir / "vocab.json", tmp_path / "vocab.json")
    shutil.copy(checkpoint_dir / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    with pytest.raises(CheckpointError, match="merges.txt"):
        BagelTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer"):
        BagelTokenizer.from_dir(tmp_path)
