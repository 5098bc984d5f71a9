"""build_tiny_t5 (real on-disk layout) and FrozenT5Embedder against transformers' T5 encoder."""
import hashlib
import json
import os

import pytest
import sentencepiece as spm
import torch
from transformers import T5EncoderModel

from sat_cogvideo.errors import UserError
from sat_cogvideo.tiny_t5 import build_tiny_t5
from sgm.modules.encoders.modules import FrozenT5Embedder

PROMPTS = ["A panda sits in a bamboo forest.", "", "Zebras walk across the savanna, 3 of them!"]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return build_tiny_t5(tmp_path_factory.mktemp("t5") / "t5-v1_1-xxl")


def expected_ids(folder, text, max_length):
    """Token ids from sentencepiece itself: pieces, EOS (1), truncated to max_length, padded with 0."""
    sp = spm.SentencePieceProcessor(model_file=os.path.join(folder, "spiece.model"))
    ids = sp.encode(text)[:max_length - 1] + [1]
    return ids + [0] * (max_length - len(ids))


def test_tiny_t5_layout_and_determinism(t5_dir, tmp_path):
    names = set(os.listdir(t5_dir))
    for required in ("config.json", "spiece.model", "tokenizer_config.json", "special_tokens_map.json",
                     "added_tokens.json", "model.safetensors.index.json"):
        assert required in names
    with open(os.path.join(t5_dir, "model.safetensors.index.json")) as f:
        shards = set(json.load(f)["weight_map"].values())
    assert len(shards) >= 2 and shards <= names
    cfg = json.load(open(os.path.join(t5_dir, "config.json")))
    assert cfg["feed_forward_proj"] == "gated-gelu" and cfg["layer_norm_epsilon"] == 1e-6
    assert cfg["relative_attention_num_buckets"] == 32 and cfg["architectures"] == ["T5EncoderModel"]
    sp = spm.SentencePieceProcessor(model_file=os.path.join(t5_dir, "spiece.model"))
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    assert not any(n.startswith(".tiny-t5-") for n in os.listdir(os.path.dirname(t5_dir)))  # no temp left

    again = build_tiny_t5(tmp_path / "again")

    def digest(folder):
        return {n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest() for n in os.listdir(folder)}

    assert digest(again) == digest(t5_dir)


def test_frozen_t5_equals_transformers_encoder(t5_dir):
    emb = FrozenT5Embedder(model_dir=t5_dir, max_length=24)
    assert all(not p.requires_grad for p in emb.parameters()) and not emb.transformer.training
    ref_model = T5EncoderModel.from_pretrained(t5_dir).eval()
    ids = torch.tensor([expected_ids(t5_dir, p, 24) for p in PROMPTS])
    tokens = emb.tokenizer(PROMPTS, truncation=True, max_length=24, padding="max_length", return_tensors="pt")
    assert torch.equal(tokens["input_ids"], ids) and ids[1, 1] == 0 and ids[0, -1] == 1
    with torch.no_grad():
        ours = emb(PROMPTS)
        ref = ref_model(input_ids=ids).last_hidden_state  # no attention mask: padding is attended, as SAT
        masked = ref_model(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
    assert ours.shape == (3, 24, 64)
    assert torch.equal(ours, ref)
    assert not torch.allclose(ours[1], masked[1], atol=1e-3)  # a mask would change the padded prompt
    assert torch.equal(emb.encode(PROMPTS[:1]), ours[:1])


def test_truncation_to_max_length(t5_dir):
    emb = FrozenT5Embedder(model_dir=t5_dir, max_length=8)
    long_prompt = "The camera follows behind a white vintage SUV with a black roof rack as it speeds up."
    ids = emb.tokenizer([long_prompt], truncation=True, max_length=8, padding="max_length",
                        return_tensors="pt")["input_ids"][0].tolist()
    assert ids == expected_ids(t5_dir, long_prompt, 8) and ids[-1] == 1 and 0 not in ids
    with torch.no_grad():
        out = emb([long_prompt])
        ref = T5EncoderModel.from_pretrained(t5_dir)(input_ids=torch.tensor([ids])).last_hidden_state
    assert out.shape == (1, 8, 64) and torch.equal(out, ref)


def test_model_dtype_follows_the_cast(t5_dir):
    emb = FrozenT5Embedder(model_dir=t5_dir, max_length=8).to(torch.bfloat16)
    with torch.no_grad():
        out = emb(["a cat"])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_missing_or_incomplete_t5_folder(t5_dir, tmp_path):
    with pytest.raises(UserError, match=r"T5 folder .*nope.* does not exist.*spiece.model"):
        FrozenT5Embedder(model_dir=str(tmp_path / "nope"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(open(os.path.join(t5_dir, "config.json")).read())
    with pytest.raises(UserError, match=r"broken.* incomplete: missing spiece.model, weights"):
        FrozenT5Embedder(model_dir=str(broken))
    (broken / "spiece.model").write_bytes(open(os.path.join(t5_dir, "spiece.model"), "rb").read())
    (broken / "model.safetensors.index.json").write_text(
        open(os.path.join(t5_dir, "model.safetensors.index.json")).read())
    with pytest.raises(UserError, match=r"lists missing shards model-00001-of-"):
        FrozenT5Embedder(model_dir=str(broken))
