"""A tiny random T5 v1.1 encoder folder in the on-disk layout of the released ``t5-v1_1-xxl`` folder.

``build_tiny_t5(folder)`` writes, in a few seconds and deterministically:

```
folder/
  config.json                               T5 v1.1 config (gated-GELU, relative bias, RMSNorm eps 1e-6)
  model-00001-of-0000N.safetensors ...      sharded encoder weights (T5EncoderModel names)
  model.safetensors.index.json
  spiece.model                              SentencePiece unigram model trained on a few sentences
  tokenizer_config.json  special_tokens_map.json  added_tokens.json
```

so ``FrozenT5Embedder(model_dir=folder)`` (and transformers' ``T5EncoderModel`` / ``T5Tokenizer``) load it
exactly as they load the real folder.  Used by the demo and by tests.
"""
from __future__ import annotations

import io
import json
import os
import shutil

from sat_cogvideo.atomic import make_temp_dir

# A few sentences to train the tokenizer on (lower and upper case, digits, punctuation).
_CORPUS = [
    "A panda, dressed in a small red jacket and a tiny hat, sits on a wooden stool in a serene bamboo forest.",
    "The camera follows behind a white vintage SUV with a black roof rack as it speeds up a steep dirt road.",
    "A street artist, clad in a worn-out denim jacket and a colorful bandana, stands before a vast concrete wall.",
    "In the haunting backdrop of a war-torn city, a young girl sits alone and looks at the sky.",
    "A cat wearing sunglasses is working as a lifeguard at a pool on a bright sunny day.",
    "The video shows 2 dogs playing with a ball in a green park while the wind moves the trees.",
    "Snow falls quietly over a small mountain village at night; warm lights glow in 3 windows.",
    "An old man plays the guitar by the sea, and waves break slowly on the rocks below him.",
    "Close-up of a hummingbird drinking nectar from a purple flower, its wings a blur of motion.",
    "A futuristic city skyline at sunset, with flying cars moving between tall glass towers.",
    "Two friends ride bicycles along a quiet country road past fields of yellow sunflowers.",
    "Rain drops run down a window as a candle flickers on the table inside the cozy room.",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 ! ? ( ) - : ' \"",
    "Zebras, elephants and giraffes walk across the savanna under a huge orange sky.",
    "Jellyfish drift through deep blue water, glowing softly in the dark ocean.",
    "Kites of many colors fly high above the beach, and children run along the sand.",
]


def _train_spiece(vocab_size: int) -> bytes:
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS), model_writer=out, vocab_size=vocab_size, model_type="unigram",
        character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>",
        unk_piece="<unk>", num_threads=1, minloglevel=2, seed_sentencepiece_size=10000,
        shuffle_input_sentence=False)
    return out.getvalue()


def tiny_t5_config(vocab_size: int = 128, d_model: int = 64, num_layers: int = 2, num_heads: int = 2,
                   d_kv: int = 32, d_ff: int = 128):
    """A T5 v1.1 style ``T5Config`` with tiny sizes."""
    from transformers import T5Config

    return T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=num_layers,
        num_decoder_layers=num_layers, num_heads=num_heads, relative_attention_num_buckets=32,
        relative_attention_max_distance=128, dropout_rate=0.1, layer_norm_epsilon=1e-6, initializer_factor=1.0,
        feed_forward_proj="gated-gelu", is_encoder_decoder=True, use_cache=True, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, tie_word_embeddings=False, architectures=["T5EncoderModel"])


def build_tiny_t5(folder, d_model: int = 64, num_layers: int = 2, num_heads: int = 2, d_kv: int = 32,
                  d_ff: int = 128, sp_vocab_size: int = 96, extra_ids: int = 4, seed: int = 0,
                  max_shard_size: str = "200KB", overwrite: bool = False) -> str:
    """Write a tiny T5 encoder folder at ``folder`` and return its path.

    The SentencePiece model has ``sp_vocab_size`` pieces (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, no BOS, as
    T5's); ``extra_ids`` sentinel tokens follow; the embedding has ``sp_vocab_size + extra_ids`` rows rounded
    up to a multiple of 8 (the real one: 32000 + 100 -> 32128).  Weights are random, drawn from ``seed``
    without touching the global RNG; the safetensors files are sharded at ``max_shard_size`` so the index
    file exists as in the real folder.  The folder is written under a temporary name and renamed.  An existing
    complete folder is kept unless ``overwrite``.
    """
    import torch
    from transformers import T5EncoderModel

    folder = os.path.abspath(os.fspath(folder))
    if os.path.isfile(os.path.join(folder, "config.json")) and not overwrite:
        return folder
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = make_temp_dir(parent, prefix=".tiny-t5-")
    try:
        vocab = sp_vocab_size + extra_ids
        config = tiny_t5_config(vocab_size=(vocab + 7) // 8 * 8, d_model=d_model, num_layers=num_layers,
                                num_heads=num_heads, d_kv=d_kv, d_ff=d_ff)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = T5EncoderModel(config).eval()
        model.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)

        with open(os.path.join(tmp, "spiece.model"), "wb") as f:
            f.write(_train_spiece(sp_vocab_size))
        sentinels = [f"<extra_id_{i}>" for i in range(extra_ids)]
        _write_json(tmp, "special_tokens_map.json", {
            "additional_special_tokens": sentinels, "eos_token": "</s>", "pad_token": "<pad>",
            "unk_token": "<unk>"})
        _write_json(tmp, "tokenizer_config.json", {
            "additional_special_tokens": sentinels, "eos_token": "</s>", "extra_ids": extra_ids,
            "legacy": True, "model_max_length": 226, "pad_token": "<pad>", "sp_model_kwargs": {},
            "tokenizer_class": "T5Tokenizer", "unk_token": "<unk>"})
        # sentinel ids count down from the end of the SentencePiece vocabulary + extra_ids, as in T5
        _write_json(tmp, "added_tokens.json", {s: vocab - 1 - i for i, s in enumerate(sentinels)})
        if os.path.exists(folder):
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _write_json(folder, name, obj):
    with open(os.path.join(folder, name), "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
