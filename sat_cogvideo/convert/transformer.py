"""SAT <-> diffusers key map of the CogVideoX transformer, all five families (the renames of the original's
``tools/convert_weight_sat2hf.py``, both ways).

The map is one table, :data:`TRANSFORMER_KEY_MAP`, read in both directions.  Each rule names a SAT key pattern and
the diffusers key pattern(s) it becomes; ``{i}`` is a layer index and ``{p}`` ``weight`` or ``bias``.  A SAT tensor
that becomes several diffusers tensors is cut into ``n`` equal chunks along dim 0 and each diffusers tensor is the
concatenation of the listed chunks (q/k/v thirds of ``query_key_value``; the 12-way AdaLN modulation split into
``norm1.linear`` = chunks 0,1,2,6,7,8 and ``norm2.linear`` = chunks 3,4,5,9,10,11).  Going back concatenates the
chunks in SAT order, so HF -> SAT -> HF is exact.

Public API::

    sat_to_diffusers_transformer(state_dict, *, learned_positional_embeddings=None) -> dict
    diffusers_to_sat_transformer(state_dict, *, prefix="") -> dict
    diffusers_key_placement(key) -> (SAT key, chunks, chunk indices) | None   # for streaming loads
    diffusers_transformer_config(network_config, *, sample_size=None) -> dict
    SAT_PREFIX                          # "model.diffusion_model." (the engine's prefix)
    SAT_DROPPED_KEYS                    # SAT keys with no diffusers counterpart (dropped on the way out)

``state_dict`` may hold bare DiT keys or engine keys (``model.diffusion_model.…``); in the latter case every other
key (VAE, T5, …) is ignored.  Unknown DiT keys and unmerged LoRA keys raise :class:`~sat_cogvideo.errors.UserError`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch

from sat_cogvideo.checkpoint import SAT_PREFIX
from sat_cogvideo.errors import UserError



@dataclass(frozen=True)
class KeyRule:
    """One SAT key pattern and the diffusers key pattern(s) it maps to.

    ``parts`` lists ``(diffusers pattern, chunk indices)``; ``chunks`` is the number of equal dim-0 chunks the SAT
    tensor is cut into (1 for a plain rename).
    """

    sat: str
    parts: tuple[tuple[str, tuple[int, ...]], ...]
    chunks: int = 1


def _rename(sat: str, hf: str) -> KeyRule:
    return KeyRule(sat, ((hf, (0,)),), 1)


_P = "{p}"
TRANSFORMER_KEY_MAP: tuple[KeyRule, ...] = (
    # per layer: SAT BaseTransformer layers
    _rename(f"transformer.layers.{{i}}.input_layernorm.{_P}", f"transformer_blocks.{{i}}.norm1.norm.{_P}"),
    _rename(f"transformer.layers.{{i}}.post_attention_layernorm.{_P}", f"transformer_blocks.{{i}}.norm2.norm.{_P}"),
    KeyRule(f"transformer.layers.{{i}}.attention.query_key_value.{_P}",
            ((f"transformer_blocks.{{i}}.attn1.to_q.{_P}", (0,)),
             (f"transformer_blocks.{{i}}.attn1.to_k.{_P}", (1,)),
             (f"transformer_blocks.{{i}}.attn1.to_v.{_P}", (2,))), 3),
    _rename(f"transformer.layers.{{i}}.attention.dense.{_P}", f"transformer_blocks.{{i}}.attn1.to_out.0.{_P}"),
    _rename(f"transformer.layers.{{i}}.mlp.dense_h_to_4h.{_P}", f"transformer_blocks.{{i}}.ff.net.0.proj.{_P}"),
    _rename(f"transformer.layers.{{i}}.mlp.dense_4h_to_h.{_P}", f"transformer_blocks.{{i}}.ff.net.2.{_P}"),
    # per layer: AdaLN mixin
    KeyRule(f"mixins.adaln_layer.adaLN_modulations.{{i}}.1.{_P}",
            ((f"transformer_blocks.{{i}}.norm1.linear.{_P}", (0, 1, 2, 6, 7, 8)),
             (f"transformer_blocks.{{i}}.norm2.linear.{_P}", (3, 4, 5, 9, 10, 11))), 12),
    _rename(f"mixins.adaln_layer.query_layernorm_list.{{i}}.{_P}", f"transformer_blocks.{{i}}.attn1.norm_q.{_P}"),
    _rename(f"mixins.adaln_layer.key_layernorm_list.{{i}}.{_P}", f"transformer_blocks.{{i}}.attn1.norm_k.{_P}"),
    # once per model
    _rename(f"transformer.final_layernorm.{_P}", f"norm_final.{_P}"),
    _rename(f"time_embed.0.{_P}", f"time_embedding.linear_1.{_P}"),
    _rename(f"time_embed.2.{_P}", f"time_embedding.linear_2.{_P}"),
    _rename(f"ofs_embed.0.{_P}", f"ofs_embedding.linear_1.{_P}"),
    _rename(f"ofs_embed.2.{_P}", f"ofs_embedding.linear_2.{_P}"),
    _rename(f"mixins.patch_embed.proj.{_P}", f"patch_embed.proj.{_P}"),  # Conv2d (1.0) or Linear (1.5), same layout
    _rename(f"mixins.patch_embed.text_proj.{_P}", f"patch_embed.text_proj.{_P}"),
    _rename(f"mixins.final_layer.norm_final.{_P}", f"norm_out.norm.{_P}"),
    _rename(f"mixins.final_layer.linear.{_P}", f"proj_out.{_P}"),
    _rename(f"mixins.final_layer.adaLN_modulation.1.{_P}", f"norm_out.linear.{_P}"),
    _rename("mixins.pos_embed.pos_embedding", "patch_embed.pos_embedding"),  # learned table (5B-I2V) only
)

# SAT keys that have no diffusers counterpart: recomputed RoPE tables and SAT's unused absolute table.
SAT_DROPPED_KEYS = ("mixins.pos_embed.freqs_sin", "mixins.pos_embed.freqs_cos",
                    "transformer.position_embeddings.weight")
_SINCOS_TABLE = "mixins.pos_embed.pos_embedding"
_LORA = re.compile(r"\.(matrix_[AB]\.\d+|original\.(weight|bias))$")


def _compile(pattern: str) -> re.Pattern:
    regex = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(f"^{regex}$")


_SAT_RULES = [(_compile(rule.sat), rule) for rule in TRANSFORMER_KEY_MAP]
_HF_RULES = [(_compile(hf), rule, n) for rule in TRANSFORMER_KEY_MAP for n, (hf, _) in enumerate(rule.parts)]


def _fill(pattern: str, groups: Mapping[str, str]) -> str:
    return pattern.format(**{k: v for k, v in groups.items() if v is not None}) if groups else pattern


def _dit_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bare DiT keys: strip ``model.diffusion_model.`` if the dict is an engine state dict (others ignored)."""
    if any(k.startswith(SAT_PREFIX) for k in state_dict):
        return {k[len(SAT_PREFIX):]: v for k, v in state_dict.items() if k.startswith(SAT_PREFIX)}
    return dict(state_dict)


def sat_to_diffusers_transformer(state_dict: Mapping[str, torch.Tensor], *,
                                 learned_positional_embeddings: bool | None = None) -> dict[str, torch.Tensor]:
    """SAT DiT state dict (bare or engine keys) -> ``CogVideoXTransformer3DModel`` state dict.

    ``mixins.pos_embed.pos_embedding`` is the learned table of 5B-I2V (kept) or the fixed sincos table of 2B
    (dropped: diffusers recomputes it).  ``learned_positional_embeddings=None`` decides from the state dict: a
    rotary model (RoPE tables or SAT's unused absolute table present) has a learned table; otherwise the sincos
    table is recognised by its all-zero text rows.  Pass the flag explicitly when the config is known
    (``diffusers_transformer_config(...)["use_learned_positional_embeddings"]``).
    """
    sd = _dit_keys(state_dict)
    lora = sorted(k for k in sd if _LORA.search(k))
    if lora:
        raise UserError(f"the transformer state dict holds LoRA tensors ({lora[0]}, …): merge the LoRA into the "
                        "base weights (or export it separately) before converting to diffusers")
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in sd.items():
        if key in SAT_DROPPED_KEYS:
            continue
        if key == _SINCOS_TABLE:
            learned = learned_positional_embeddings
            if learned is None:
                learned = any(k in sd for k in SAT_DROPPED_KEYS) or _looks_learned(tensor)
            if not learned:
                continue
        for regex, rule in _SAT_RULES:
            match = regex.match(key)
            if match:
                break
        else:
            unknown.append(key)
            continue
        groups = match.groupdict()
        if rule.chunks == 1:
            out[_fill(rule.parts[0][0], groups)] = tensor
            continue
        if tensor.shape[0] % rule.chunks:
            raise UserError(f"{key} has {tensor.shape[0]} rows, not divisible into {rule.chunks} chunks")
        pieces = tensor.chunk(rule.chunks, dim=0)
        for hf, idx in rule.parts:
            out[_fill(hf, groups)] = torch.cat([pieces[j] for j in idx], dim=0).contiguous()
    if unknown:
        raise UserError(f"{len(unknown)} transformer keys have no diffusers counterpart: "
                        f"{', '.join(sorted(unknown)[:5])}{' …' if len(unknown) > 5 else ''}")
    return out


def _looks_learned(table: torch.Tensor) -> bool:
    """True unless the table's leading rows are exactly zero (the sincos table's text rows are)."""
    if table.device.type == "meta":
        return False
    return bool(table.reshape(-1, table.shape[-1])[0].abs().sum() != 0)


def diffusers_key_placement(key: str) -> tuple[str, int, tuple[int, ...]] | None:
    """Where one diffusers tensor goes in the SAT DiT, from :data:`TRANSFORMER_KEY_MAP`: ``(SAT key, n, idx)``
    means the SAT tensor is cut into ``n`` equal dim-0 chunks and the diffusers tensor's ``len(idx)`` equal dim-0
    pieces are SAT chunks ``idx`` in that order (a rename is ``(key, 1, (0,))``).  None for an unknown key.
    Lets a loader write each file tensor straight into its rows of the SAT parameter."""
    for regex, rule, part in _HF_RULES:
        match = regex.match(key)
        if match:
            return _fill(rule.sat, match.groupdict()), rule.chunks, tuple(rule.parts[part][1])
    return None


def diffusers_to_sat_transformer(state_dict: Mapping[str, torch.Tensor], *, prefix: str = "") -> dict[str, torch.Tensor]:
    """``CogVideoXTransformer3DModel`` state dict -> SAT DiT state dict (keys get ``prefix``, e.g. SAT_PREFIX).

    The result holds no RoPE tables / unused absolute table (the SAT loader accepts their absence).
    """
    groups_by_sat: dict[str, dict[int, torch.Tensor]] = {}
    rules: dict[str, KeyRule] = {}
    unknown = []
    for key, tensor in state_dict.items():
        for regex, rule, part in _HF_RULES:
            match = regex.match(key)
            if match:
                break
        else:
            unknown.append(key)
            continue
        sat_key = _fill(rule.sat, match.groupdict())
        groups_by_sat.setdefault(sat_key, {})[part] = tensor
        rules[sat_key] = rule
    if unknown:
        raise UserError(f"{len(unknown)} diffusers transformer keys have no SAT counterpart: "
                        f"{', '.join(sorted(unknown)[:5])}{' …' if len(unknown) > 5 else ''}")
    out = {}
    for sat_key, parts in groups_by_sat.items():
        rule = rules[sat_key]
        if len(parts) != len(rule.parts):
            have = {rule.parts[n][0] for n in parts}
            missing = [hf for hf, _ in rule.parts if hf not in have]
            raise UserError(f"diffusers state dict lacks part of {sat_key}: needs {missing[0]} "
                            f"(pattern) as well")
        if rule.chunks == 1:
            out[prefix + sat_key] = parts[0]
            continue
        pieces: list[torch.Tensor | None] = [None] * rule.chunks
        for n, (hf, idx) in enumerate(rule.parts):
            for j, piece in zip(idx, parts[n].chunk(len(idx), dim=0)):
                pieces[j] = piece
        out[prefix + sat_key] = torch.cat(pieces, dim=0).contiguous()
    return out


# ----------------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------------

def _plain(cfg):
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(cfg, (DictConfig, ListConfig)):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return cfg


def _network_params(network_config: Mapping) -> dict:
    cfg = _plain(network_config)
    if isinstance(cfg, Mapping) and "model" in cfg:
        cfg = _plain(cfg["model"]).get("network_config", cfg)
    if isinstance(cfg, Mapping) and "network_config" in cfg:
        cfg = cfg["network_config"]
    if isinstance(cfg, Mapping) and "params" in cfg and "target" in cfg:
        cfg = cfg["params"]
    if not isinstance(cfg, Mapping) or "hidden_size" not in cfg:
        raise UserError("expected a network_config (model.network_config or its params) with hidden_size")
    return dict(cfg)


def _check_diffusers_counterparts(p: Mapping, patch) -> None:
    """Refuse network options that ``CogVideoXTransformer3DModel`` cannot express."""
    spatial = (patch, patch) if isinstance(patch, int) else tuple(patch)[1:]
    if spatial[0] != spatial[1]:
        raise UserError(f"diffusers needs square spatial patches, the config has patch_size {patch}")
    for flag in ("use_SwiGLU", "use_RMSNorm"):
        if p.get(flag):
            raise UserError(f"network_config {flag}: true has no diffusers counterpart")
    if p.get("num_classes") is not None:
        raise UserError("network_config num_classes has no diffusers counterpart")


def _position_embedding(modules: Mapping, p: Mapping):
    """(rotary, learned table, height/width interpolation, time interpolation, text length) of the config's
    ``pos_embed_config``."""
    pos_cfg = modules.get("pos_embed_config", {})
    pos_target = str(pos_cfg.get("target", ""))
    pos_params = dict(pos_cfg.get("params") or {})
    rotary = pos_target.endswith("Rotary3DPositionEmbeddingMixin")
    if not rotary and not pos_target.endswith("Basic3DPositionEmbeddingMixin"):
        raise UserError(f"position embedding {pos_target!r} has no diffusers counterpart")
    learned = bool(pos_params.get("learnable_pos_embed", False)) if rotary else False
    hi = pos_params.get("height_interpolation", p.get("height_interpolation", 1.0))
    wi = pos_params.get("width_interpolation", p.get("width_interpolation", 1.0))
    ti = pos_params.get("time_interpolation", p.get("time_interpolation", 1.0))
    if not rotary and hi != wi:
        raise UserError(f"diffusers has one spatial interpolation scale; the config has height {hi}, width {wi}")
    return rotary, learned, hi, ti, int(pos_params.get("text_length", 226))


def diffusers_transformer_config(network_config: Mapping, *, sample_size: tuple[int, int] | None = None) -> dict:
    """``CogVideoXTransformer3DModel`` config (init kwargs) for a SAT ``network_config`` (or its ``params``).

    ``sample_size`` = (latent height, latent width) of diffusers' default resolution.  Default: the configured
    latent size for 1.0 (60 x 90 for the releases); 96 x 170 (768 x 1360 px) for 1.5, whose SAT config gives only
    the 300 x 300 maximum.  ``norm_eps`` is diffusers' 1e-5, as in the released diffusers configs: diffusers uses it
    for the final adaLN LayerNorm too, where SAT has 1e-6.
    """
    p = _network_params(network_config)
    modules = _plain(p.get("modules") or {})
    patch = _plain(p["patch_size"])
    v15 = not isinstance(patch, int)
    pt, ph, pw = (1, patch, patch) if not v15 else tuple(patch)
    _check_diffusers_counterparts(p, patch)
    rotary, learned, hi, ti, text_length = _position_embedding(modules, p)
    patch_params = dict((modules.get("patch_embed_config") or {}).get("params") or {})
    hidden, heads = int(p["hidden_size"]), int(p["num_attention_heads"])
    if sample_size is None:
        sample_size = (96, 170) if v15 else (int(p["latent_height"]), int(p["latent_width"]))
    return dict(
        num_attention_heads=heads,
        attention_head_dim=hidden // heads,
        in_channels=int(p["in_channels"]),
        out_channels=int(p["out_channels"]),
        flip_sin_to_cos=True,
        freq_shift=0,
        time_embed_dim=int(p.get("time_embed_dim") or hidden),
        ofs_embed_dim=p.get("ofs_embed_dim"),
        text_embed_dim=int(patch_params.get("text_hidden_size", 4096)),
        num_layers=int(p["num_layers"]),
        dropout=0.0,
        attention_bias=True,
        sample_width=int(sample_size[1]),
        sample_height=int(sample_size[0]),
        sample_frames=int(p["num_frames"]),
        patch_size=ph,
        patch_size_t=pt if v15 else None,
        temporal_compression_ratio=int(p["time_compressed_rate"]),
        max_text_seq_length=text_length if (not rotary or learned) else 226,
        activation_fn="gelu-approximate",
        timestep_activation_fn="silu",
        norm_elementwise_affine=bool(p.get("elementwise_affine", True)),
        norm_eps=1e-5,
        spatial_interpolation_scale=float(hi) if not rotary else 1.875,
        temporal_interpolation_scale=float(ti) if not rotary else 1.0,
        use_rotary_positional_embeddings=rotary,
        use_learned_positional_embeddings=learned,
        patch_bias=not v15,
    )
