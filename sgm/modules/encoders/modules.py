"""Text conditioning (maps to ``sgm/modules/encoders/modules.py``): ``GeneralConditioner`` and ``FrozenT5Embedder``."""
from __future__ import annotations

import os
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn

from sat_cogvideo.distributed import is_cuda
from sat_cogvideo.errors import UserError
from sgm.util import disabled_train, expand_dims_like, instantiate_from_config


class AbstractEmbModel(nn.Module):
    """Base of every embedder; the conditioner sets ``is_trainable``, ``ucg_rate`` and ``input_key``."""

    def __init__(self):
        super().__init__()
        self._is_trainable = None
        self._ucg_rate = None
        self._input_key = None

    @property
    def is_trainable(self):
        return self._is_trainable

    @is_trainable.setter
    def is_trainable(self, value):
        self._is_trainable = value

    @is_trainable.deleter
    def is_trainable(self):
        del self._is_trainable

    @property
    def ucg_rate(self):
        return self._ucg_rate

    @ucg_rate.setter
    def ucg_rate(self, value):
        self._ucg_rate = value

    @ucg_rate.deleter
    def ucg_rate(self):
        del self._ucg_rate

    @property
    def input_key(self):
        return self._input_key

    @input_key.setter
    def input_key(self, value):
        self._input_key = value

    @input_key.deleter
    def input_key(self):
        del self._input_key


class GeneralConditioner(nn.Module):
    """Runs every embedder on its batch key and collects the outputs by rank (original ``GeneralConditioner``).

    Output keys: 2-D -> ``vector``, 3-D -> ``crossattn``, 4-/5-D -> ``concat``; several outputs with the same
    key are concatenated (``vector`` on dim 1, ``crossattn`` on dim 2, ``concat`` on dim 1).  Caption dropout:
    with ``ucg_rate > 0`` each sample's embedding is multiplied by a Bernoulli(1 - ucg_rate) mask, so dropped
    samples get an all-zero embedding (the same as the unconditional input at inference).
    """

    OUTPUT_DIM2KEYS = {2: "vector", 3: "crossattn", 4: "concat", 5: "concat"}
    KEY2CATDIM = {"vector": 1, "crossattn": 2, "concat": 1}

    def __init__(self, emb_models, cor_embs=(), cor_p=()):
        super().__init__()
        embedders = []
        for n, embconfig in enumerate(emb_models or []):
            embedder = instantiate_from_config(embconfig, where=f"conditioner_config.params.emb_models[{n}]")
            if not isinstance(embedder, AbstractEmbModel):
                raise UserError(f"embedder {embconfig['target']} (emb_models[{n}]) must derive from "
                                f"AbstractEmbModel")
            embedder.is_trainable = embconfig.get("is_trainable", False)
            embedder.ucg_rate = embconfig.get("ucg_rate", 0.0)
            if not embedder.is_trainable:
                nn.Module.train(embedder, False)  # eval before train is disabled (the original's eval was a no-op)
                embedder.train = disabled_train.__get__(embedder)
                for param in embedder.parameters():
                    param.requires_grad = False
            print(f"Initialized embedder #{n}: {embedder.__class__.__name__} with "
                  f"{sum(p.numel() for p in embedder.parameters())} params. Trainable: {embedder.is_trainable}")
            if "input_key" in embconfig:
                embedder.input_key = embconfig["input_key"]
            elif "input_keys" in embconfig:
                embedder.input_keys = embconfig["input_keys"]
            else:
                raise UserError(f"emb_models[{n}] ({embconfig['target']}) needs 'input_key' or 'input_keys'")
            embedder.legacy_ucg_val = embconfig.get("legacy_ucg_value", None)
            if embedder.legacy_ucg_val is not None:
                embedder.ucg_prng = np.random.RandomState()
            embedders.append(embedder)
        self.embedders = nn.ModuleList(embedders)

        cor_embs, cor_p = list(cor_embs or []), list(cor_p or [])
        if cor_embs and len(cor_p) != 2 ** len(cor_embs):
            raise UserError(f"cor_p needs 2**len(cor_embs) = {2 ** len(cor_embs)} entries, got {len(cor_p)}")
        self.cor_embs = cor_embs
        self.cor_p = cor_p

    def possibly_get_ucg_val(self, embedder, batch):
        values = list(batch[embedder.input_key])
        for i in range(len(values)):
            if embedder.ucg_prng.choice(2, p=[1 - embedder.ucg_rate, embedder.ucg_rate]):
                values[i] = embedder.legacy_ucg_val
        return {**batch, embedder.input_key: values}

    def surely_get_ucg_val(self, embedder, batch, cond_or_not):
        values = list(batch[embedder.input_key])
        for i in range(len(values)):
            if cond_or_not[i]:
                values[i] = embedder.legacy_ucg_val
        return {**batch, embedder.input_key: values}

    def get_single_embedding(self, embedder, batch, output, cond_or_not=None, force_zero_embeddings=None):
        context = nullcontext if embedder.is_trainable else torch.no_grad
        with context():
            if getattr(embedder, "input_key", None) is not None:
                if embedder.legacy_ucg_val is not None:
                    if cond_or_not is None:
                        batch = self.possibly_get_ucg_val(embedder, batch)
                    else:
                        batch = self.surely_get_ucg_val(embedder, batch, cond_or_not)
                emb_out = embedder(batch[embedder.input_key])
            else:
                emb_out = embedder(*[batch[k] for k in embedder.input_keys])
        if not isinstance(emb_out, (list, tuple)):
            emb_out = [emb_out]
        for emb in emb_out:
            out_key = self.OUTPUT_DIM2KEYS[emb.dim()]
            if embedder.ucg_rate > 0.0 and embedder.legacy_ucg_val is None:
                if cond_or_not is None:
                    keep = torch.bernoulli((1.0 - embedder.ucg_rate) * torch.ones(emb.shape[0], device=emb.device))
                else:
                    keep = 1.0 - torch.as_tensor(cond_or_not, dtype=emb.dtype, device=emb.device)
                emb = expand_dims_like(keep, emb) * emb
            if getattr(embedder, "input_key", None) in (force_zero_embeddings or []):
                emb = torch.zeros_like(emb)
            if out_key in output:
                output[out_key] = torch.cat((output[out_key], emb), self.KEY2CATDIM[out_key])
            else:
                output[out_key] = emb
        return output

    def forward(self, batch, force_zero_embeddings=None):
        output = {}
        force_zero_embeddings = force_zero_embeddings or []
        if self.cor_embs:
            batch_size = len(batch[list(batch.keys())[0]])
            rand_idx = np.random.choice(len(self.cor_p), size=(batch_size,), p=self.cor_p)
            for emb_idx in self.cor_embs:
                cond_or_not = rand_idx % 2
                rand_idx //= 2
                output = self.get_single_embedding(self.embedders[emb_idx], batch, output, cond_or_not,
                                                   force_zero_embeddings)
        for i, embedder in enumerate(self.embedders):
            if i in self.cor_embs:
                continue
            output = self.get_single_embedding(embedder, batch, output, force_zero_embeddings=force_zero_embeddings)
        return output

    def get_unconditional_conditioning(self, batch_c, batch_uc=None, force_uc_zero_embeddings=None,
                                       force_cond_zero_embeddings=None):
        """``(c, uc)`` without caption dropout; ``uc`` zeroes the embedders whose key is in the force list."""
        rates = [embedder.ucg_rate for embedder in self.embedders]
        cor_embs, cor_p = self.cor_embs, self.cor_p
        for embedder in self.embedders:
            embedder.ucg_rate = 0.0
        self.cor_embs, self.cor_p = [], []
        try:
            c = self(batch_c, force_cond_zero_embeddings or [])
            uc = self(batch_c if batch_uc is None else batch_uc, force_uc_zero_embeddings or [])
        finally:
            for embedder, rate in zip(self.embedders, rates):
                embedder.ucg_rate = rate
            self.cor_embs, self.cor_p = cor_embs, cor_p
        return c, uc


T5_FILES_HELP = ("config.json, spiece.model and the weights (model.safetensors, or model-*.safetensors with "
                 "model.safetensors.index.json, or pytorch_model.bin)")


def check_t5_folder(model_dir, tokenizer_dir=None) -> str:
    """Raise ``UserError`` unless ``model_dir`` is a local T5 folder with config, tokenizer and complete weights
    (the tokenizer may live in ``tokenizer_dir``, as in a diffusers pipeline's ``tokenizer/``)."""
    folder = os.fspath(model_dir)
    if not os.path.isdir(folder):
        raise UserError(f"T5 folder {folder!r} does not exist: set model_dir of FrozenT5Embedder (conditioner_config) "
                        f"to a local folder holding {T5_FILES_HELP}")
    present = set(os.listdir(folder))
    missing = [] if "config.json" in present else ["config.json"]
    tok = os.fspath(tokenizer_dir) if tokenizer_dir else folder
    if not (os.path.isfile(os.path.join(tok, "spiece.model")) or os.path.isfile(os.path.join(tok, "tokenizer.json"))):
        missing.append("spiece.model" if tok == folder else f"{tok}/spiece.model (or tokenizer.json)")
    weights = {"model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json"}
    if not present & weights:
        missing.append("weights (model.safetensors / model.safetensors.index.json / pytorch_model.bin)")
    if missing:
        raise UserError(f"T5 folder {folder!r} is incomplete: missing {', '.join(missing)}; it must hold "
                        f"{T5_FILES_HELP}")
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if index in present:
            import json

            with open(os.path.join(folder, index)) as f:
                shards = sorted(set(json.load(f).get("weight_map", {}).values()))
            lost = [s for s in shards if s not in present]
            if lost:
                raise UserError(f"T5 folder {folder!r} is incomplete: {index} lists missing shards {', '.join(lost)}")
    from sat_cogvideo.convert.safetensors_io import read_header

    for name in sorted(present):
        if name.endswith(".safetensors"):
            read_header(os.path.join(folder, name))  # a truncated download is one line, not a traceback later
    return folder


class FrozenT5Embedder(AbstractEmbModel):
    """T5 encoder hidden states for a list of prompts (original ``FrozenT5Embedder``).

    Tokenizes with padding to exactly ``max_length`` and truncation (EOS appended), runs transformers'
    ``T5EncoderModel`` **without an attention mask** (padding is attended, as in the original) and returns
    ``last_hidden_state`` ``[B, max_length, d_model]``.  Loads only from the local folder ``model_dir`` (the
    tokenizer from ``tokenizer_dir`` when given: a diffusers pipeline's ``tokenizer/``).
    Token ids go to the encoder's own device (the original sent them to CUDA); ``device`` is kept for
    config compatibility.  Weights appear in the engine's state dict as ``conditioner.embedders.0.transformer.*``.
    """

    def __init__(self, model_dir="google/t5-v1_1-xxl", device=None, max_length=77, freeze=True, cache_dir=None,
                 tokenizer_dir=None):
        super().__init__()
        from transformers import T5EncoderModel, T5Tokenizer

        folder = check_t5_folder(model_dir, tokenizer_dir)
        try:
            self.tokenizer = T5Tokenizer.from_pretrained(tokenizer_dir or folder, local_files_only=True,
                                                         cache_dir=cache_dir)
            self.transformer = T5EncoderModel.from_pretrained(folder, local_files_only=True, cache_dir=cache_dir)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load the T5 folder {folder!r}: {err}") from None
        self.device = device
        self.max_length = max_length
        if freeze:
            self.freeze()

    def freeze(self):
        self.transformer = self.transformer.eval()
        for param in self.parameters():
            param.requires_grad = False

    def forward(self, text):
        if isinstance(text, str):
            text = [text]
        batch_encoding = self.tokenizer(list(text), truncation=True, max_length=self.max_length, return_length=True,
                                        return_overflowing_tokens=False, padding="max_length", return_tensors="pt")
        device = self.transformer.get_input_embeddings().weight.device
        tokens = batch_encoding["input_ids"].to(device)
        autocast = torch.autocast(device.type, enabled=False) if is_cuda(device) else nullcontext()
        with autocast:
            outputs = self.transformer(input_ids=tokens)
        return outputs.last_hidden_state

    def encode(self, text):
        return self(text)
