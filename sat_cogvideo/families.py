"""The two CogVideoX code generations and the five model families: their numbers, and telling them apart.

One home for the facts of the five released families (sizes, frame counts, fps, dtype, resolution), for what the
1.0 and 1.5 code of the original do differently (:class:`Generation`: frame conversion, decode plan, I2V
conditioning), and for recognising a family from a checkpoint's tensor shapes or from a model config.  Everything
else asks here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Mapping, Optional, Tuple

from sat_cogvideo.checkpoint import SAT_PREFIX
from sat_cogvideo.errors import UserError


TIME_COMPRESSION = 4  # the VAE's temporal compression: 4N+1 video frames <-> N+1 latent frames
SPATIAL_COMPRESSION = 8  # the VAE's spatial compression: H x W pixels <-> H/8 x W/8 latents


def decode_chunks_15(num_frames: int) -> List[int]:
    """Sizes of the ≤10 consecutive latent pieces the 1.5 ``decode_first_stage`` decodes one at a time.

    ``num_frames`` is the latent count after the padding frame was dropped (21 -> [3, 2, 2, …, 2]).
    """
    if num_frames < 2:
        raise ValueError(f"need at least 2 latent frames to decode, got {num_frames}")
    k = min(10, num_frames // 2)
    return [num_frames // k + (1 if i < num_frames % k else 0) for i in range(k)]


def decode_ranges_15(num_frames: int) -> List[Tuple[int, int]]:
    """:func:`decode_chunks_15` as latent ranges ``[start, stop)``."""
    ranges, start = [], 0
    for size in decode_chunks_15(num_frames):
        ranges.append((start, start + size))
        start += size
    return ranges


def decode_pieces_10(num_frames: int) -> List[Tuple[int, int]]:
    """Latent ranges the v1.0 sampling script decodes one at a time: [0, 3), [3, 5), [5, 7), …

    Only odd counts cover every frame (13 -> 49 pixel frames); the original silently dropped the last
    latent of an even count, here an even count is a ValueError.
    """
    if num_frames < 1 or (num_frames > 1 and num_frames % 2 == 0):
        raise ValueError(f"the 1.0 decode needs an odd number of latent frames, got {num_frames}")
    if num_frames == 1:
        return [(0, 1)]
    n = (num_frames - 1) // 2
    return [(0, 3)] + [(2 * i + 1, 2 * i + 3) for i in range(1, n)]


def decode_whole(num_frames: int) -> List[Tuple[int, int]]:
    """One range over every latent: the 1.0 ``decode_first_stage`` decodes in a single pass."""
    return [(0, num_frames)]


@dataclass(frozen=True)
class DecodePlan:
    """How ``SATVideoDiffusionEngine`` turns latents ``[B, C, T, h, w]`` into pixels: the VAE decodes the ranges
    one after the other, its causal-convolution cache carried from piece to piece and cleared after the last."""
    drop_leading: int                                 # padding latent frames dropped before decoding
    ranges: Callable[[int], List[Tuple[int, int]]]    # latent count (after the drop) -> [(start, stop), …]
    use_cp_first_only: bool                           # VAE ``use_cp`` on the first piece only (1.5), else on all
    per_video: bool                                   # one video at a time, else ``en_and_decode_n_samples_a_time``


@dataclass(frozen=True)
class Generation:
    """What the 1.0 code (2B, 5B, 5B-I2V) and the 1.5 code (CogVideoX1.5-5B, -I2V) of the original do differently;
    call sites ask this record instead of comparing generation names."""
    name: str                         # "1.0" or "1.5"
    patch_size_t: int                 # temporal patch of the DiT
    padding_latents: int              # latent frames added in front of the video's (1.5: 1), dropped at decode
    min_latents: int                  # fewest latent frames the decode plan covers
    released_frames: Tuple[int, ...]  # video frame counts of the released models
    sample_decode: DecodePlan         # the sampling script's decode (``decode_video``)
    stage_decode: DecodePlan          # ``decode_first_stage`` (training logs; the 1.5 sampling script)
    i2v_raw_latent: bool              # I2V conditions on the raw VAE latent ``z / scale_factor`` (1.5)
    i2v_ofs: Optional[float]          # the I2V DiT's ``ofs`` input (1.5: 2.0); None: no ofs
    i2v_resize: str                   # media's I2V image resize: "cover_crop_bicubic" or "lanczos"
    fixed_size: bool                  # only the configured video size (1.0); else any multiple of 16 within it
    rope_only: bool                   # every model uses 3D RoPE (no sincos-table model like the 2B)
    text_length: int                  # T5 tokens of the released models (226; 1.5: 224)
    vae_invert_scale_latents: bool    # the diffusers VAE config of the release sets invert_scale_latents (1.5)

    def latent_frames(self, video_frames: int) -> int:
        """Latent frames sampled for ``video_frames`` video frames (the original's ``sampling_num_frames``)."""
        return (video_frames - 1) // TIME_COMPRESSION + 1 + self.padding_latents

    def video_frames(self, latent_frames: int) -> int:
        """Video frames decoded from ``latent_frames`` sampled latents."""
        return TIME_COMPRESSION * (latent_frames - 1 - self.padding_latents) + 1

    def allowed_video_frames(self, max_latents: int) -> List[int]:
        """Video frame counts, longest first, for a DiT whose position grid has ``max_latents`` latent frames
        (``(num_frames - 1) / time_compressed_rate + 1`` of its config).  Latent counts step by 2: 1.0 decodes
        odd counts, 1.5 patches time by 2 (``T / 2`` within the grid)."""
        top = max_latents * self.patch_size_t
        return [self.video_frames(t) for t in range(top, self.min_latents - 1, -2)]


GENERATIONS: dict[str, Generation] = {
    g.name: g
    for g in (
        Generation(name="1.0", patch_size_t=1, padding_latents=0, min_latents=3, released_frames=(49, 41, 33),
                   sample_decode=DecodePlan(0, decode_pieces_10, use_cp_first_only=False, per_video=True),
                   stage_decode=DecodePlan(0, decode_whole, use_cp_first_only=False, per_video=False),
                   i2v_raw_latent=False, i2v_ofs=None, i2v_resize="cover_crop_bicubic", fixed_size=True,
                   rope_only=False, text_length=226, vae_invert_scale_latents=False),
        Generation(name="1.5", patch_size_t=2, padding_latents=1, min_latents=4, released_frames=(81, 161),
                   sample_decode=DecodePlan(1, decode_ranges_15, use_cp_first_only=True, per_video=False),
                   stage_decode=DecodePlan(1, decode_ranges_15, use_cp_first_only=True, per_video=False),
                   i2v_raw_latent=True, i2v_ofs=2.0, i2v_resize="lanczos", fixed_size=False, rope_only=True,
                   text_length=224, vae_invert_scale_latents=True),
    )
}


def get_generation(name) -> Generation:
    """The :class:`Generation` record of "1.0" or "1.5" (a record is returned as it is)."""
    if isinstance(name, Generation):
        return name
    try:
        return GENERATIONS[str(name)]
    except KeyError:
        raise UserError(f"unknown CogVideoX code generation {name!r}: use 1.0 or 1.5") from None


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
        return self.i2v and get_generation(self.generation).i2v_ofs is not None

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames the sampler runs for ``num_frames`` video frames (checked); 1.5 adds the padding frame."""
        check_num_frames(self, num_frames)
        return get_generation(self.generation).latent_frames(num_frames)

    def allowed_num_frames(self) -> tuple[int, ...]:
        return get_generation(self.generation).released_frames


_V10, _V15 = GENERATIONS["1.0"], GENERATIONS["1.5"]
_COMMON_10 = dict(generation=_V10.name, patch_size_t=_V10.patch_size_t, text_length=226, num_frames=49, fps=8,
                  height=480, width=720, inference_config="configs/inference.yaml")
_COMMON_15 = dict(generation=_V15.name, patch_size_t=_V15.patch_size_t, text_length=224, num_frames=81, fps=16,
                  height=768, width=1360, inference_config="configs/inference_1.5.yaml")
_FIVE_B = dict(hidden_size=3072, num_layers=42, num_attention_heads=48, rotary=True, dtype="bfloat16",
               scale_factor=0.7, shift_scale=1.0)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(name="cogvideox-2b", hidden_size=1920, num_layers=30, num_attention_heads=30, i2v=False, rotary=False,
               learnable_pos_embed=False, dtype="float16", scale_factor=1.15258426, shift_scale=3.0,
               config="configs/cogvideox_2b.yaml", diffusers_repo="CogVideoX-2b", **_COMMON_10),
        Family(name="cogvideox-5b", i2v=False, learnable_pos_embed=False, config="configs/cogvideox_5b.yaml",
               diffusers_repo="CogVideoX-5b", **_FIVE_B, **_COMMON_10),
        Family(name="cogvideox-5b-i2v", i2v=True, learnable_pos_embed=True, config="configs/cogvideox_5b_i2v.yaml",
               diffusers_repo="CogVideoX-5b-I2V", **_FIVE_B, **_COMMON_10),
        Family(name="cogvideox1.5-5b", i2v=False, learnable_pos_embed=False, config="configs/cogvideox1.5_5b.yaml",
               diffusers_repo="CogVideoX1.5-5B", **_FIVE_B, **_COMMON_15),
        Family(name="cogvideox1.5-5b-i2v", i2v=True, learnable_pos_embed=False,
               config="configs/cogvideox1.5_5b_i2v.yaml", diffusers_repo="CogVideoX1.5-5B-I2V", **_FIVE_B,
               **_COMMON_15),
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
    keys = {k[len(SAT_PREFIX):] if k.startswith(SAT_PREFIX) else k: v for k, v in state_dict.items()}
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
              or get_generation(generation).rope_only or hidden == 3072) and hidden != 1920
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


def _pos_kind(d: Detected) -> str:
    return "3D RoPE" if d.rotary else "3D sincos table (the 2B's)"


def check_checkpoint_fits_config(ckpt: Detected, config: Detected, source: str) -> None:
    """Refuse a transformer checkpoint whose model differs from the model config in a way strict key loading
    cannot see (the position embedding kind: its tables are computed, not loaded) or that would fail only after
    the other weights load (generation, sizes, I2V channels)."""
    fix = (f"use the model config of the checkpoint's family ({ckpt.family.config})" if ckpt.family else
           "use the model config the checkpoint was trained with")
    checks = (("code generation", ckpt.generation, config.generation),
              ("hidden_size", ckpt.hidden_size, config.hidden_size),
              ("num_layers", ckpt.num_layers, config.num_layers),
              ("in_channels", ckpt.in_channels, config.in_channels),
              ("position embedding", _pos_kind(ckpt), _pos_kind(config)),
              ("ofs embedding (1.5 I2V)", ckpt.ofs, config.ofs))
    for name, have, want in checks:
        if have != want:
            raise UserError(f"{source} does not fit the model config: the checkpoint has {name} {have}, the "
                            f"config says {want}; {fix}")
