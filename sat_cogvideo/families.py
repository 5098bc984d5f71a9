"""The five CogVideoX model families: their numbers, and telling them apart.

One home for the family table of the spec (`models.md`): sizes, frame counts, fps, dtype, resolution, and how to
recognise a family from a checkpoint's tensor shapes or from a model config.  Everything else asks here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

from sat_cogvideo.errors import UserError


@dataclass(frozen=True)
class Family:
    name: str                 # e.g. "cogvideox-5b-i2v"
    generation: str           # "1.0" (v1.0 code) or "1.5"
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    i2v: bool
    rotary: bool              # 3D RoPE (else 3D sincos table: 2B)
    learnable_pos_embed: bool
    patch_size_t: int         # temporal patch (1 for 1.0, 2 for 1.5)
    text_length: int          # T5 max_length
    num_frames: int           # default video frames (4N+1)
    fps: int
    dtype: str                # "float16" or "bfloat16"
    scale_factor: float
    shift_scale: float
    height: int               # default video size
    width: int
    config: str               # model config file in configs/
    inference_config: str
    diffusers_repo: str       # the released diffusers repo name, for reference only

    @property
    def in_channels(self) -> int:
        return 32 if self.i2v else 16

    @property
    def ofs(self) -> bool:
        return self.i2v and self.generation == "1.5"

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames the sampler runs for ``num_frames`` video frames (checked)."""
        check_num_frames(self, num_frames)
        latents = (num_frames - 1) // 4 + 1
        if self.patch_size_t > 1 and latents % self.patch_size_t:
            latents += 1  # 1.5: one extra latent frame, dropped again after decoding
        return latents

    def allowed_num_frames(self) -> tuple[int, ...]:
        if self.generation == "1.0":
            return (49, 41, 33)
        return (81, 161)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("cogvideox-2b", "1.0", 1920, 30, 30, False, False, False, 1, 226, 49, 8, "float16", 1.15258426,
               3.0, 480, 720, "configs/cogvideox_2b.yaml", "configs/inference.yaml", "CogVideoX-2b"),
        Family("cogvideox-5b", "1.0", 3072, 42, 48, False, True, False, 1, 226, 49, 8, "bfloat16", 0.7,
               1.0, 480, 720, "configs/cogvideox_5b.yaml", "configs/inference.yaml", "CogVideoX-5b"),
        Family("cogvideox-5b-i2v", "1.0", 3072, 42, 48, True, True, True, 1, 226, 49, 8, "bfloat16", 0.7,
               1.0, 480, 720, "configs/cogvideox_5b_i2v.yaml", "configs/inference.yaml", "CogVideoX-5b-I2V"),
        Family("cogvideox1.5-5b", "1.5", 3072, 42, 48, False, True, False, 2, 224, 81, 16, "bfloat16", 0.7,
               1.0, 768, 1360, "configs/cogvideox1.5_5b.yaml", "configs/inference_1.5.yaml", "CogVideoX1.5-5B"),
        Family("cogvideox1.5-5b-i2v", "1.5", 3072, 42, 48, True, True, False, 2, 224, 81, 16, "bfloat16", 0.7,
               1.0, 768, 1360, "configs/cogvideox1.5_5b_i2v.yaml", "configs/inference_1.5.yaml",
               "CogVideoX1.5-5B-I2V"),
    )
}

_ALIASES = {
    "2b": "cogvideox-2b", "5b": "cogvideox-5b", "5b-i2v": "cogvideox-5b-i2v", "i2v": "cogvideox-5b-i2v",
    "1.5-5b": "cogvideox1.5-5b", "1.5": "cogvideox1.5-5b", "1.5-5b-i2v": "cogvideox1.5-5b-i2v",
    "1.5-i2v": "cogvideox1.5-5b-i2v",
}


def get_family(name: str) -> Family:
    """Look a family up by name: ``cogvideox-5b``, ``CogVideoX1.5-5B-I2V``, ``5b-i2v``, ``1.5-5b`` …"""
    key = str(name).strip().lower().replace("_", "-").replace(" ", "-")
    key = _ALIASES.get(key, key)
    if key.startswith("cogvideox-1.5"):
        key = "cogvideox1.5" + key[len("cogvideox-1.5"):]
    if key not in FAMILIES:
        raise UserError(f"unknown model family {name!r}: use one of {', '.join(FAMILIES)}")
    return FAMILIES[key]


def check_num_frames(family: Family, num_frames: int) -> None:
    """Video frame counts must be 4N+1 and, for the released models, one the family was trained for."""
    if num_frames < 1 or (num_frames - 1) % 4:
        raise UserError(f"--num-frames {num_frames} is not of the form 4N+1 (the VAE compresses time by 4): "
                        f"use {' or '.join(map(str, family.allowed_num_frames()))} for {family.name}")


# ----------------------------------------------------------------------------------------------------------------
# detection

_DIT_PREFIX = "model.diffusion_model."


@dataclass(frozen=True)
class Detected:
    """What a checkpoint's shapes say about its model (works for full-size and tiny models)."""
    generation: str
    hidden_size: int
    in_channels: int
    i2v: bool
    rotary: bool
    ofs: bool
    learnable_pos_embed: bool
    num_layers: int
    lora: bool
    family: Optional[Family]   # None when the sizes are not a released model's (e.g. tiny test models)


def _shape(t):
    return tuple(getattr(t, "shape", ()))


def detect_from_state_dict(state_dict: Mapping) -> Detected:
    """Recognise the model in a SAT transformer state dict (bare DiT keys or ``model.diffusion_model.`` keys)."""
    keys = {k[len(_DIT_PREFIX):] if k.startswith(_DIT_PREFIX) else k: v for k, v in state_dict.items()}
    proj = keys.get("mixins.patch_embed.proj.weight")
    if proj is None:
        raise UserError("not a CogVideoX transformer checkpoint: it has no mixins.patch_embed.proj.weight")
    shape = _shape(proj)
    hidden = shape[0]
    layers = 1 + max((int(k.split(".")[2]) for k in keys if k.startswith("transformer.layers.")), default=-1)
    ofs = any(k.startswith("ofs_embed") for k in keys)
    lora = any("lora" in k for k in keys)
    if len(shape) == 4:  # Conv2d patch embedding: v1.0
        generation, in_ch = "1.0", shape[1]
    elif len(shape) == 2:
        out_ch = _out_channels(keys, hidden)
        # 1.5 checkpoints: Linear over (C * pt * ph * pw); a 1.0 model saved with a Linear embedding has pt == 1.
        per_patch = shape[1]
        if out_ch and per_patch % (out_ch * 8) == 0 and per_patch // (out_ch * 8) in (1, 2):
            generation, in_ch = "1.5", per_patch // 8
        else:
            generation, in_ch = "1.0", per_patch // 4
    else:
        raise UserError(f"unexpected patch embedding shape {list(shape)} (expected 2 or 4 dimensions)")
    out_ch = _out_channels(keys, hidden) or 16
    i2v = in_ch == 2 * out_ch
    # The 2B model has a sincos table (``pos_embedding``, frozen) and no position_embeddings; RoPE models keep that
    # (unused) table and, in v1.0, their RoPE buffers.  A ``pos_embedding`` is a learned table only in a RoPE model.
    rotary = ("transformer.position_embeddings.weight" in keys or "mixins.pos_embed.freqs_sin" in keys
              or generation == "1.5" or hidden == 3072) and hidden != 1920
    learnable = rotary and "mixins.pos_embed.pos_embedding" in keys
    family = None
    for fam in FAMILIES.values():
        if (fam.generation, fam.hidden_size, fam.i2v) == (generation, hidden, i2v):
            family = fam
    return Detected(generation, hidden, in_ch, i2v, rotary, ofs, learnable, layers, lora, family)


def _out_channels(keys, hidden) -> int:
    w = keys.get("mixins.final_layer.linear.weight")
    if w is None:
        return 0
    out_features = _shape(w)[0]
    for patch in (8, 4):  # 2*2*2 (1.5) or 2*2 (1.0)
        if out_features % patch == 0 and out_features // patch in (16,):
            return out_features // patch
    return out_features // 4


def detect_from_model_config(model_config) -> Detected:
    """Recognise the family a model config (the YAML ``model:`` section) describes."""
    try:
        net = model_config["network_config"]["params"]
    except (KeyError, TypeError):
        raise UserError("the model config has no network_config.params: is this a CogVideoX model YAML?") from None
    patch = net.get("patch_size", 2)
    generation = "1.5" if isinstance(patch, (list, tuple)) or hasattr(patch, "__len__") else "1.0"
    hidden = int(net.get("hidden_size"))
    in_ch = int(net.get("in_channels", 16))
    out_ch = int(net.get("out_channels", 16))
    modules = net.get("modules", {}) or {}
    pos = (modules.get("pos_embed_config") or {})
    rotary = "Rotary3D" in str(pos.get("target", ""))
    learnable = bool((pos.get("params") or {}).get("learnable_pos_embed", False))
    i2v = in_ch == 2 * out_ch
    ofs = net.get("ofs_embed_dim") is not None
    lora = modules.get("lora_config") is not None
    family = None
    for fam in FAMILIES.values():
        if (fam.generation, fam.hidden_size, fam.i2v) == (generation, hidden, i2v):
            family = fam
    return Detected(generation, hidden, in_ch, i2v, rotary, ofs, learnable, int(net.get("num_layers", 0)), lora,
                    family)
