"""Two-way key map between the SAT VAE (``3d-vae.pt``) and diffusers' ``AutoencoderKLCogVideoX``.

Maps to ``convert_vae`` of the original ``tools/convert_weight_sat2hf.py``: the block renames, the decoder's
up-block index reversal (SAT ``up.i`` is diffusers ``up_blocks.{L-1-i}``) and dropping the training-loss keys
(any key containing ``loss``).  Tensors are not changed, only renamed.

    hf_sd = convert_vae_sat_to_diffusers(sat_sd)            # drops loss.*; strict-loads into diffusers
    sat_sd = convert_vae_diffusers_to_sat(hf_sd)
    AutoencoderKLCogVideoX(**diffusers_vae_config(first_stage_config, scaling_factor=..., version=...))
"""
from __future__ import annotations

import re
from typing import Mapping

from sat_cogvideo.errors import UserError
from sat_cogvideo.families import get_generation

# (SAT prefix, diffusers prefix). ``{i}``/``{j}`` are integers; ``{r}`` is the reversed up-level ``L-1-i``.
PREFIX_RULES = (
    ("encoder.down.{i}.block.{j}.", "encoder.down_blocks.{i}.resnets.{j}."),
    ("encoder.down.{i}.downsample.", "encoder.down_blocks.{i}.downsamplers.0."),
    ("encoder.mid.block_1.", "encoder.mid_block.resnets.0."),
    ("encoder.mid.block_2.", "encoder.mid_block.resnets.1."),
    ("decoder.mid.block_1.", "decoder.mid_block.resnets.0."),
    ("decoder.mid.block_2.", "decoder.mid_block.resnets.1."),
    ("decoder.up.{i}.block.{j}.", "decoder.up_blocks.{r}.resnets.{j}."),
    ("decoder.up.{i}.upsample.", "decoder.up_blocks.{r}.upsamplers.0."),
)
# Keys under these prefixes have the same name on both sides.
SAME_PREFIXES = tuple(f"{side}.{name}." for side in ("encoder", "decoder") for name in ("conv_in", "norm_out", "conv_out"))
# Renames inside a block (SAT name, diffusers name).
SUFFIX_RULES = ((".nin_shortcut.", ".conv_shortcut."),)


def is_removed_key(key: str) -> bool:
    """Keys the converter drops: the training-loss weights stored beside the model in ``3d-vae.pt``."""
    return "loss" in key


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name in ("i", "j", "r"):
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>\\d+)")
    return re.compile("^" + pattern)


_SAT_TO_HF = [(_compile(s), h, "{r}" in h) for s, h in PREFIX_RULES]
_HF_TO_SAT = [(_compile(h), s, "{r}" in h) for s, h in PREFIX_RULES]


def _map_key(key, rules, same, suffixes, num_up_levels):
    for pattern, template, reverse in rules:
        m = pattern.match(key)
        if m is None:
            continue
        groups = {k: int(v) for k, v in m.groupdict().items()}
        if reverse:  # SAT i <-> diffusers r = L-1-i (its own inverse)
            level = groups.get("i", groups.get("r"))
            groups["i"] = groups["r"] = num_up_levels - 1 - level
        new = template.format(**groups) + key[m.end():]
        break
    else:
        if not key.startswith(same):
            return None
        new = key
    for a, b in suffixes:
        new = new.replace(a, b)
    return new


def _num_up_levels(keys, pattern):
    levels = [int(m.group(1)) for k in keys for m in [re.match(pattern, k)] if m]
    return max(levels) + 1 if levels else 0


def sat_to_diffusers_key(key: str, num_up_levels: int = 4) -> str | None:
    """diffusers name of a SAT VAE key, None for a removed (loss) key; UserError for an unknown key."""
    if is_removed_key(key):
        return None
    new = _map_key(key, _SAT_TO_HF, SAME_PREFIXES, SUFFIX_RULES, num_up_levels)
    if new is None:
        raise UserError(f"key {key!r} is not a CogVideoX VAE key: expected encoder.* / decoder.* of 3d-vae.pt")
    return new


def diffusers_to_sat_key(key: str, num_up_levels: int = 4) -> str:
    """SAT name of a diffusers ``AutoencoderKLCogVideoX`` key; UserError for an unknown key."""
    new = _map_key(key, _HF_TO_SAT, SAME_PREFIXES, tuple((b, a) for a, b in SUFFIX_RULES), num_up_levels)
    if new is None:
        raise UserError(f"key {key!r} is not an AutoencoderKLCogVideoX key: expected encoder.* / decoder.*")
    return new


def convert_vae_sat_to_diffusers(state_dict: Mapping, num_up_levels: int | None = None) -> dict:
    """Rename a SAT VAE state dict (``3d-vae.pt``'s ``state_dict``) to diffusers names; loss keys dropped."""
    if num_up_levels is None:
        num_up_levels = _num_up_levels(state_dict, r"decoder\.up\.(\d+)\.") or 4
    out = {}
    for key, value in state_dict.items():
        new = sat_to_diffusers_key(key, num_up_levels)
        if new is not None:
            out[new] = value
    return out


def convert_vae_diffusers_to_sat(state_dict: Mapping, num_up_levels: int | None = None) -> dict:
    """Rename a diffusers ``AutoencoderKLCogVideoX`` state dict to the SAT names of ``3d-vae.pt``."""
    if num_up_levels is None:
        num_up_levels = _num_up_levels(state_dict, r"decoder\.up_blocks\.(\d+)\.") or 4
    return {diffusers_to_sat_key(k, num_up_levels): v for k, v in state_dict.items()}


def diffusers_vae_config(first_stage_config: Mapping | None = None, scaling_factor: float = 1.15258426,
                         version: str = "1.0") -> dict:
    """``AutoencoderKLCogVideoX`` constructor kwargs for a SAT ``first_stage_config`` (None: the released VAE).

    Like the original converter: ``scaling_factor`` from the engine's ``scale_factor`` (1.15258426 for 2B, 0.7
    for 5B/5B-I2V/1.5) and ``invert_scale_latents=True`` for version "1.5".
    """
    enc = dict((first_stage_config or {}).get("params", {}).get("encoder_config", {}).get("params", {}))
    ch = enc.get("ch", 128)
    ch_mult = list(enc.get("ch_mult", (1, 2, 2, 4)))
    levels = len(ch_mult)
    config = {
        "in_channels": enc.get("in_channels", 3),
        "out_channels": enc.get("out_ch", 3),
        "down_block_types": ["CogVideoXDownBlock3D"] * levels,
        "up_block_types": ["CogVideoXUpBlock3D"] * levels,
        "block_out_channels": [ch * m for m in ch_mult],
        "latent_channels": enc.get("z_channels", 16),
        "layers_per_block": enc.get("num_res_blocks", 3),
        "act_fn": "silu",
        "norm_eps": 1e-6,
        "norm_num_groups": 32,
        "temporal_compression_ratio": enc.get("temporal_compress_times", 4),
        "scaling_factor": scaling_factor,
    }
    if get_generation(str(version)).vae_invert_scale_latents:
        config["invert_scale_latents"] = True
    return config
