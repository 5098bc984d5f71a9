"""Random-weight models of the GPU check, built directly on the target device: our DiT / VAE and diffusers' models
holding the same (converted) weights.

SAT creates its linear layers with an explicit ``device='cpu'``, so ``with torch.device("cuda")`` alone would build
a full-size 5B on the CPU first (22 GB of float32 and minutes of CPU init).  :class:`OnDevice` is a
``TorchFunctionMode`` that rewrites the ``device=`` of every tensor factory call (``torch.empty``, ``torch.zeros``,
...) to the target device, whatever the caller asked; the tests check it at tiny size with ``device="meta"``.
Random values are then drawn on the device (:func:`randomize_on_device_`), not on the CPU as the demo's
``randomize_`` does, because 5.6 billion CPU draws take minutes.
"""
from __future__ import annotations

import math
import os
import sys

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


DIT_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class OnDevice(TorchFunctionMode):
    """Every tensor factory call creates its tensor on ``device``, even where the code names another device."""

    def __init__(self, device):
        super().__init__()
        self.device = torch.device(device)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _device_constructors():
            kwargs["device"] = self.device
        return func(*args, **kwargs)


def randomize_on_device_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random trainable parameters drawn where they live: matrices and convolutions ``N(0, 1/fan_in)`` (activations
    keep unit scale through 42 layers in float16), other vectors ``N(0, 0.02)``; norm weights and frozen tables
    (sincos/RoPE) are kept."""
    gens = {}
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not p.is_floating_point() or not p.requires_grad:
                continue
            if p.device not in gens:
                gens[p.device] = torch.Generator(device=p.device).manual_seed(seed)
            gen = gens[p.device]
            if p.ndim >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(max(1, p[0].numel())), generator=gen)
            elif not ("norm" in name.lower() and name.endswith("weight")):
                p.normal_(0.0, 0.02, generator=gen)
    return module


def family_config(family, tiny: bool):
    """The family's YAML ``model:`` section (``configs/`` or ``configs/tiny/``), resolved."""
    from omegaconf import OmegaConf

    name = os.path.basename(family.config)
    path = os.path.join(ROOT, "configs", "tiny", name) if tiny else os.path.join(ROOT, family.config)
    cfg = OmegaConf.load(path).model
    OmegaConf.resolve(cfg)
    return cfg


def build_dit(network_config, device, dtype, seed: int = 0):
    """Our ``DiffusionTransformer`` with random weights, built on ``device`` in float32, then cast to ``dtype``."""
    from omegaconf import OmegaConf

    from sgm.util import instantiate_from_config

    cfg = OmegaConf.create(OmegaConf.to_container(network_config, resolve=True))
    cfg.params.dtype = DIT_DTYPE_NAMES[dtype]  # the DiT casts its inputs to this (the engine sets it the same way)
    cfg.params.transformer_args.checkpoint_activations = False  # as sample_video sets it for inference
    with OnDevice(device):
        model = instantiate_from_config(cfg)
    model = randomize_on_device_(model.to(device), seed)
    return model.to(dtype).eval()


def diffusers_dit(network_config, ours, device, dtype):
    """diffusers' ``CogVideoXTransformer3DModel`` holding ``ours``' weights (our key map), on ``device``; returns the
    model and its config."""
    from diffusers import CogVideoXTransformer3DModel

    from sat_cogvideo.convert.transformer import diffusers_transformer_config, sat_to_diffusers_transformer

    p = network_config.params
    conf = diffusers_transformer_config(network_config, sample_size=(int(p.latent_height), int(p.latent_width)))
    with torch.device(device):
        hf = CogVideoXTransformer3DModel(**conf)
    hf = hf.to(dtype).eval()
    hf.norm_out.norm.eps = 1e-6  # SAT's final-norm eps (diffusers builds it with norm_eps)
    converted = sat_to_diffusers_transformer(ours.state_dict(),
                                             learned_positional_embeddings=conf["use_learned_positional_embeddings"])
    hf.load_state_dict(converted, strict=True)
    del converted
    return hf, conf


def diffusers_rope(conf, latents_shape, device):
    """The RoPE tables diffusers' pipelines pass for latents of ``latents_shape`` ``[B, T, C, h, w]`` (1.0: crop
    grid; 1.5: slice grid); None for the sincos 2B."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    if not conf["use_rotary_positional_embeddings"]:
        return None
    p, pt = conf["patch_size"], conf["patch_size_t"]
    _, t, _, h, w = latents_shape
    gh, gw = h // p, w // p
    base_h, base_w = conf["sample_height"] // p, conf["sample_width"] // p
    if pt is None:
        crops = get_resize_crop_region_for_grid((gh, gw), base_w, base_h)
        cos, sin = get_3d_rotary_pos_embed(conf["attention_head_dim"], crops, (gh, gw), t, device=device)
    else:
        cos, sin = get_3d_rotary_pos_embed(conf["attention_head_dim"], None, (gh, gw), t // pt, grid_type="slice",
                                           max_size=(base_h, base_w), device=device)
    return cos.to(device), sin.to(device)


def vae_config_without_checkpoint(first_stage_config):
    """A copy of ``first_stage_config`` that loads no ``3d-vae.pt``."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(OmegaConf.to_container(first_stage_config, resolve=True))
    cfg.params.ckpt_path = None
    return cfg


def build_vae(first_stage_config, device, dtype, seed: int = 0):
    """Our VAE (``VideoAutoencoderInferenceWrapper``) with random weights on ``device``, no checkpoint."""
    from sgm.util import instantiate_from_config

    cfg = vae_config_without_checkpoint(first_stage_config)
    with OnDevice(device):
        vae = instantiate_from_config(cfg)
    vae = randomize_on_device_(vae.to(device), seed)
    return vae.to(dtype).eval(), cfg


def diffusers_vae(cfg, ours, device, dtype, version: str):
    """diffusers' ``AutoencoderKLCogVideoX`` holding ``ours``' weights, on ``device``."""
    from diffusers import AutoencoderKLCogVideoX

    from sat_cogvideo.convert.vae import convert_vae_sat_to_diffusers, diffusers_vae_config

    with torch.device(device):
        theirs = AutoencoderKLCogVideoX(**diffusers_vae_config(cfg, version=version))
    theirs = theirs.to(dtype).eval()
    theirs.load_state_dict(convert_vae_sat_to_diffusers(ours.state_dict()), strict=True)
    return theirs
