"""SAT checkpoints <-> a complete diffusers CogVideoX pipeline folder (the library behind ``tools/convert_*``).

Maps to the original ``tools/convert_weight_sat2hf.py`` with its defects fixed
(README, "Differences from the original"): only ``model.diffusion_model.`` keys are converted (finetune checkpoints
work), the 2B sincos table is dropped, LoRA is merged on request or refused clearly, the scheduler's SNR shift and the VAE scaling factor follow the model, T5 comes
from a local folder, loading is ``weights_only``.  Beyond the original it handles CogVideoX1.5 (``patch_size_t``,
``ofs``), detects the family from the checkpoint's shapes and checks the flags against it, and converts the other
way (diffusers -> SAT).

What it writes (the layout ``CogVideoXPipeline.save_pretrained`` writes)::

    <output>/model_index.json
    <output>/transformer/config.json + diffusion_pytorch_model[-0000i-of-0000n].safetensors (+ index)
    <output>/vae/config.json + diffusion_pytorch_model.safetensors
    <output>/scheduler/scheduler_config.json            CogVideoXDDIMScheduler (the original's settings)
    <output>/text_encoder/ + tokenizer/                 from a T5 folder (copied, or cast with typecast)

Memory: tensors are read from a memory-mapped checkpoint and written one at a time (transformer layer by layer),
so the peak resident memory stays near the size of the checkpoint file (files written by
:mod:`sat_cogvideo.convert.safetensors_io`).  The folder is written under a temporary
name beside ``output`` and renamed when complete; an existing ``output`` is refused unless ``overwrite``.

Public API::

    convert_sat_to_diffusers(output_path, *, transformer_ckpt_path=None, vae_ckpt_path=None, ...) -> dict
    convert_diffusers_to_sat(input_path, output_path, *, dtype=None, overwrite=False, ...) -> dict
    read_sat_transformer(path, trust_pickle=None) -> dict             bare DiT keys, memory-mapped
    read_sat_vae(path, trust_pickle=None) -> dict
    describe_transformer(state_dict, model_cfg=None) -> TransformerInfo  detection + diffusers config
    describe_vae(state_dict, model_cfg, scaling_factor, version) -> dict  diffusers VAE config
    check_flags(info, *, i2v, version, num_layers, num_attention_heads, use_rotary_positional_embeddings)
    merge_lora(state_dict, *, merge, lora_alpha=1.0, base=None) -> dict
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch

from sat_cogvideo.atomic import make_temp_dir
from sat_cogvideo.checkpoint import SAT_PREFIX, load_checkpoint_file, read_state_dict, save_checkpoint
from sat_cogvideo.errors import UserError
from sat_cogvideo.families import get_generation
from sat_cogvideo.convert.safetensors_io import open_weights_folder, write_streaming

WEIGHTS = "diffusion_pytorch_model"
T5_FILES = ("spiece.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
            "tokenizer.json")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
DTYPE_NAME = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _log_default(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# reading SAT checkpoints

def resolve_transformer_path(path: str) -> str:
    """A SAT transformer ``.pt`` file, its iteration folder, its checkpoint folder (``latest``) or the SAT model
    folder holding ``transformer/`` -> the ``mp_rank_00_model_states.pt`` file."""
    from sat_cogvideo.checkpoint import checkpoint_file

    path = os.fspath(path)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "latest")) \
            and os.path.isfile(os.path.join(path, "transformer", "latest")):
        path = os.path.join(path, "transformer")
    return str(checkpoint_file(path))


def resolve_vae_path(path: str) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        for cand in (os.path.join(path, "3d-vae.pt"), os.path.join(path, "vae", "3d-vae.pt")):
            if os.path.isfile(cand):
                return cand
        raise UserError(f"{path} is a folder without 3d-vae.pt: pass the VAE file (<SAT folder>/vae/3d-vae.pt)")
    if not os.path.exists(path):
        raise UserError(f"VAE checkpoint {path} does not exist")
    return path


def read_sat_transformer(path: str, trust_pickle: Optional[bool] = None, log: Callable = _log_default) -> dict:
    """The DiT state dict (bare SAT keys, memory-mapped tensors) of a SAT transformer checkpoint.

    Engine checkpoints keep only ``model.diffusion_model.`` keys (a full finetune also stores the VAE and T5:
    ignored).  A file with DiT keys without the prefix is accepted as is.
    """
    file = resolve_transformer_path(path)
    sd = read_state_dict(load_checkpoint_file(file, trust_pickle, what="transformer checkpoint"))
    if any(k.startswith(SAT_PREFIX) for k in sd):
        other = [k for k in sd if not k.startswith(SAT_PREFIX)]
        if other:
            log(f"ignoring {len(other)} non-transformer tensors of {file} (e.g. {other[0]})")
        sd = {k[len(SAT_PREFIX):]: v for k, v in sd.items() if k.startswith(SAT_PREFIX)}
    if "mixins.patch_embed.proj.weight" not in sd and not any(_LORA_KEY.search(k) for k in sd):
        hint = " (it looks like a VAE checkpoint: pass it as --vae_ckpt_path)" if any(
            k.startswith(("encoder.", "decoder.")) for k in sd) else ""
        raise UserError(f"{file} is not a CogVideoX SAT transformer checkpoint: it has no "
                        f"model.diffusion_model.mixins.patch_embed.proj.weight{hint}")
    return sd


_LORA_KEY = re.compile(r"\.(matrix_[AB]\.\d+|original\.(weight|bias))$")


def merge_lora(sd: Mapping, *, merge: bool, lora_alpha: float = 1.0, base: Optional[Mapping] = None) -> dict:
    """A DiT state dict without LoRA: unchanged if it has none; merged (``W + B A · alpha / r``) if ``merge``;
    else a UserError (diffusers' transformer has no place for SAT's LoRA factors)."""
    if not any(_LORA_KEY.search(k) for k in sd):
        return dict(sd)
    if not merge:
        raise UserError("the transformer checkpoint holds LoRA weights (matrix_A/matrix_B): pass --merge_lora "
                        "(with --lora_alpha, default 1, as in the config) to fold them into the base weights, or "
                        "export them separately with tools/export_sat_lora_weight.py")
    from sat_cogvideo.convert.lora import merge_lora_state_dict

    return merge_lora_state_dict(sd, lora_alpha=lora_alpha, base=base)


def read_sat_vae(path: str, trust_pickle: Optional[bool] = None) -> dict:
    """The VAE state dict of ``3d-vae.pt`` (memory-mapped tensors)."""
    file = resolve_vae_path(path)
    sd = read_state_dict(load_checkpoint_file(file, trust_pickle, what="VAE checkpoint"))
    if not any(k.startswith("encoder.") or k.startswith("decoder.") for k in sd):
        hint = " (it looks like a transformer checkpoint: pass it as --transformer_ckpt_path)" if any(
            "diffusion_model" in k or k.startswith("mixins.") for k in sd) else ""
        raise UserError(f"{file} is not a CogVideoX VAE checkpoint (no encoder.*/decoder.* keys){hint}")
    return sd


# ----------------------------------------------------------------------------------------------------------------
# model description: detection, SAT network config, diffusers config

@dataclass
class TransformerInfo:
    """What a SAT DiT state dict (+ optional model YAML) says about the model."""
    detected: object                 # families.Detected
    params: dict                     # SAT network_config params (from the YAML, or rebuilt from shapes)
    diffusers_config: dict           # CogVideoXTransformer3DModel init kwargs
    num_attention_heads: int
    text_length: int
    scale_factor: float
    shift_scale: float
    from_config: bool = False

    @property
    def version(self) -> str:
        return self.detected.generation

    @property
    def i2v(self) -> bool:
        return self.detected.i2v

    @property
    def name(self) -> str:
        fam = self.detected.family
        kind = fam.name if fam is not None else (
            f"CogVideoX{'1.5' if self.version == '1.5' else ''}-like "
            f"{'I2V' if self.i2v else 'T2V'} (hidden {self.detected.hidden_size}, {self.detected.num_layers} layers)")
        return kind


def _shape(t) -> tuple:
    return tuple(getattr(t, "shape", ()))


def load_model_config(paths) -> dict:
    """The ``model:`` section of one or more SAT YAML files (merged, later files win), as a plain dict."""
    from omegaconf import OmegaConf

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    cfgs = []
    for p in paths:
        if not os.path.isfile(p):
            raise UserError(f"config {p} does not exist")
        try:
            cfgs.append(OmegaConf.load(p))
        except Exception as err:  # yaml errors have many types
            raise UserError(f"config {p} is not valid YAML ({str(err).splitlines()[0]})") from None
    cfg = OmegaConf.merge(*cfgs)
    model = cfg.get("model")
    if model is None or model.get("network_config") is None:
        raise UserError(f"config {paths[0]} has no model.network_config: pass a CogVideoX model YAML")
    return OmegaConf.to_container(model, resolve=False)


def _heads_from_shapes(sd, hidden: int, fallback: Optional[int]) -> int:
    q = sd.get("mixins.adaln_layer.query_layernorm_list.0.weight")
    if q is not None and _shape(q) and hidden % _shape(q)[0] == 0:
        return hidden // _shape(q)[0]
    return fallback or max(1, hidden // 64)


def _params_from_shapes(sd, det) -> dict:
    """A SAT ``network_config.params`` rebuilt from a checkpoint: sizes from shapes, the rest from the family
    (released sizes) or the generation's defaults (other sizes)."""
    fam = det.family
    v15 = det.generation == "1.5"
    hidden = det.hidden_size
    proj = _shape(sd["mixins.patch_embed.proj.weight"])
    patch = [2, 2, 2] if v15 else int(proj[2]) if len(proj) == 4 else 2
    npatch = 8 if v15 else (patch * patch)
    final = sd.get("mixins.final_layer.linear.weight")
    out_ch = _shape(final)[0] // npatch if final is not None else 16
    time_embed = _shape(sd["time_embed.0.weight"])[0] if "time_embed.0.weight" in sd else 512
    text_proj = sd.get("mixins.patch_embed.text_proj.weight")
    text_hidden = _shape(text_proj)[1] if text_proj is not None else 4096
    text_length = fam.text_length if fam is not None else (224 if v15 else 226)
    num_frames = fam.num_frames if fam is not None else (81 if v15 else 49)
    lat_h, lat_w = (300, 300) if v15 else (60, 90)
    if det.rotary:
        pos = {"target": "dit_video_concat.Rotary3DPositionEmbeddingMixin",
               "params": {"hidden_size_head": hidden // _heads_from_shapes(sd, hidden, None),
                          "text_length": text_length, **({"learnable_pos_embed": True} if det.learnable_pos_embed
                                                         else {})}}
    else:
        pos = {"target": "dit_video_concat.Basic3DPositionEmbeddingMixin",
               "params": {"text_length": text_length, "height_interpolation": 1.875, "width_interpolation": 1.875}}
    params = {
        "time_embed_dim": time_embed, "elementwise_affine": True, "num_frames": num_frames,
        "time_compressed_rate": 4, "latent_width": lat_w, "latent_height": lat_h, "num_layers": det.num_layers,
        "patch_size": patch, "in_channels": det.in_channels, "out_channels": out_ch, "hidden_size": hidden,
        "num_attention_heads": _heads_from_shapes(sd, hidden, fam.num_attention_heads if fam else None),
        "modules": {"pos_embed_config": pos,
                    "patch_embed_config": {"target": "dit_video_concat.ImagePatchEmbeddingMixin",
                                           "params": {"text_hidden_size": text_hidden}}},
    }
    if det.ofs:
        params["ofs_embed_dim"] = _shape(sd["ofs_embed.0.weight"])[1]
    return params


def _model_scalars(model_cfg: Optional[dict], det) -> tuple[float, float, int]:
    """(VAE scale factor, schedule shift scale, text length) of the model: from the YAML, else the family."""
    fam = det.family
    scale = fam.scale_factor if fam else (1.15258426 if not det.rotary else 0.7)
    shift = fam.shift_scale if fam else (3.0 if not det.rotary else 1.0)
    text_length = fam.text_length if fam else get_generation(det.generation).text_length
    if model_cfg:
        scale = float(model_cfg.get("scale_factor", scale))
        disc = ((model_cfg.get("denoiser_config") or {}).get("params") or {}).get("discretization_config") or {}
        shift = float((disc.get("params") or {}).get("shift_scale", 1.0))
        try:
            emb = model_cfg["conditioner_config"]["params"]["emb_models"][0]["params"]
            text_length = int(emb.get("max_length", text_length))
        except (KeyError, IndexError, TypeError):
            pass
    return scale, shift, text_length


def describe_transformer(sd: Mapping, model_cfg: Optional[dict] = None) -> TransformerInfo:
    """Detect the model of a bare SAT DiT state dict and build its diffusers transformer config.

    With ``model_cfg`` (the YAML ``model:`` section) its network config is used and checked against the
    checkpoint; without it the network config is rebuilt from the checkpoint's shapes and the family table.
    """
    from sat_cogvideo.convert.transformer import diffusers_transformer_config
    from sat_cogvideo.families import detect_from_state_dict

    det = detect_from_state_dict(sd)
    if model_cfg is not None:
        params = dict(model_cfg["network_config"].get("params") or {})
        for name, have in (("hidden_size", det.hidden_size), ("num_layers", det.num_layers),
                           ("in_channels", det.in_channels)):
            if int(params.get(name, -1)) != have:
                raise UserError(f"the checkpoint has {name} {have}, the config says {params.get(name)}: "
                                "pass the config of this checkpoint's model")
        from sat_cogvideo.families import detect_from_model_config

        dcfg = detect_from_model_config(model_cfg)
        for name, what in (("rotary", "rotary position embeddings"),
                           ("learnable_pos_embed", "a learned position table"), ("ofs", "an ofs embedding")):
            if getattr(dcfg, name) != getattr(det, name):
                raise UserError(f"the config {'has' if getattr(dcfg, name) else 'has no'} {what}, the checkpoint "
                                f"{'has' if getattr(det, name) else 'has not'}: pass the config of this checkpoint's "
                                "model")
        v15_cfg = not isinstance(params.get("patch_size", 2), int)
        if v15_cfg != (det.generation == "1.5"):
            raise UserError(f"the checkpoint is a CogVideoX {det.generation} model, the config is for "
                            f"{'1.5' if v15_cfg else '1.0'}: pass the config of this checkpoint's model")
    else:
        params = _params_from_shapes(sd, det)
    config = diffusers_transformer_config(params)
    scale, shift, text_length = _model_scalars(model_cfg, det)
    heads = int(params["num_attention_heads"])
    info = TransformerInfo(det, params, config, heads, text_length, scale, shift, model_cfg is not None)
    _check_against_diffusers(sd, info)
    return info


def _convert_transformer(info: TransformerInfo) -> Callable[[Mapping], dict]:
    from sat_cogvideo.convert.transformer import sat_to_diffusers_transformer

    learned = bool(info.diffusers_config.get("use_learned_positional_embeddings"))
    return lambda part: sat_to_diffusers_transformer(part, learned_positional_embeddings=learned)


def _meta(sd: Mapping) -> dict:
    return {k: torch.empty(_shape(v), dtype=v.dtype, device="meta") for k, v in sd.items()}


def _check_against_diffusers(sd: Mapping, info: TransformerInfo) -> None:
    """Convert the shapes (meta tensors) and compare with a meta-built diffusers model: every key and shape."""
    from diffusers import CogVideoXTransformer3DModel

    converted = _convert_transformer(info)(_meta(sd))
    with torch.device("meta"):
        model = CogVideoXTransformer3DModel(**info.diffusers_config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    _compare_keys(converted, expected, "transformer", info)


def _compare_keys(converted: Mapping, expected: Mapping, what: str, info=None) -> None:
    missing = sorted(set(expected) - set(converted))
    extra = sorted(set(converted) - set(expected))
    wrong = sorted(k for k in set(expected) & set(converted) if tuple(converted[k].shape) != expected[k])
    if not (missing or extra or wrong):
        return
    hint = "" if info is None or info.from_config else (
        "; if the model is not a released size, pass its SAT model YAML with --config")
    if wrong:
        k = wrong[0]
        raise UserError(f"{what} tensor {k} has shape {list(converted[k].shape)} in the checkpoint but "
                        f"{list(expected[k])} in the diffusers model{hint}")
    if missing:
        raise UserError(f"the {what} checkpoint lacks {len(missing)} tensors the diffusers model needs "
                        f"(e.g. {missing[0]}){hint}")
    raise UserError(f"the {what} checkpoint has {len(extra)} tensors the diffusers model does not have "
                    f"(e.g. {extra[0]}){hint}")


def check_flags(info: TransformerInfo, *, i2v: bool = False, version: Optional[str] = None,
                num_layers: Optional[int] = None, num_attention_heads: Optional[int] = None,
                use_rotary_positional_embeddings: Optional[bool] = None) -> None:
    """The original's model flags must agree with what the checkpoint is; a mismatch is a UserError."""
    det = info.detected
    if det.i2v and not i2v:
        raise UserError(f"the checkpoint is an image-to-video model (in_channels {det.in_channels}): pass --i2v")
    if i2v and not det.i2v:
        raise UserError(f"--i2v given, but the checkpoint is a text-to-video model (in_channels {det.in_channels}):"
                        " drop --i2v")
    if version is not None and str(version) != det.generation:
        why = ("its patch embedding is a Linear over 2x2x2 patches" if det.generation == "1.5"
               else "its patch embedding is a Conv2d over 2x2 patches")
        raise UserError(f"--version {version} given, but the checkpoint is a CogVideoX {det.generation} model "
                        f"({why}): pass --version {det.generation}")
    if num_layers is not None and int(num_layers) != det.num_layers:
        raise UserError(f"--num_layers {num_layers} given, but the checkpoint has {det.num_layers} layers")
    if num_attention_heads is not None and int(num_attention_heads) != info.num_attention_heads:
        raise UserError(f"--num_attention_heads {num_attention_heads} given, but the checkpoint has "
                        f"{info.num_attention_heads} heads (hidden {det.hidden_size}, qk-norm size "
                        f"{det.hidden_size // info.num_attention_heads})")
    if use_rotary_positional_embeddings is not None and bool(use_rotary_positional_embeddings) != det.rotary:
        raise UserError("--use_rotary_positional_embeddings given, but the checkpoint is the 2B-style model with a "
                        "sincos position table: drop the flag" if use_rotary_positional_embeddings else
                        "the checkpoint uses rotary position embeddings: pass --use_rotary_positional_embeddings")


# ----------------------------------------------------------------------------------------------------------------
# VAE

def vae_first_stage_config_from_shapes(sd: Mapping) -> dict:
    """A SAT ``first_stage_config`` (encoder params) rebuilt from a ``3d-vae.pt`` state dict's shapes."""
    try:
        conv_in = _shape(sd["encoder.conv_in.conv.weight"])
        ch = conv_in[0]
        levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down."))
        blocks = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down.0.block."))
        ch_mult = [_shape(sd[f"encoder.down.{i}.block.0.conv2.conv.weight"])[0] // ch for i in range(levels)]
        z = _shape(sd["decoder.conv_in.conv.weight"])[1]
        out_ch = _shape(sd["decoder.conv_out.conv.weight"])[0]
    except (KeyError, ValueError, IndexError) as err:
        raise UserError(f"the VAE checkpoint lacks an expected tensor ({err}): is it a CogVideoX 3d-vae.pt?") from None
    return {"params": {"encoder_config": {"params": {
        "ch": ch, "ch_mult": ch_mult, "num_res_blocks": blocks, "z_channels": z, "in_channels": conv_in[1],
        "out_ch": out_ch}}}}


def describe_vae(sd: Mapping, model_cfg: Optional[dict], scaling_factor: float, version: str) -> dict:
    """diffusers ``AutoencoderKLCogVideoX`` config for a SAT VAE state dict, checked key by key on a meta model."""
    from diffusers import AutoencoderKLCogVideoX
    from sat_cogvideo.convert.vae import convert_vae_sat_to_diffusers, diffusers_vae_config

    fsc = (model_cfg or {}).get("first_stage_config") if model_cfg else None
    if fsc is None:
        fsc = vae_first_stage_config_from_shapes(sd)
    config = diffusers_vae_config(fsc, scaling_factor=scaling_factor, version=version)
    converted = convert_vae_sat_to_diffusers(_meta(sd))
    with torch.device("meta"):
        model = AutoencoderKLCogVideoX(**config)
    _compare_keys(converted, {k: tuple(v.shape) for k, v in model.state_dict().items()}, "VAE")
    return config


# ----------------------------------------------------------------------------------------------------------------
# writing a diffusers folder

def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def write_json(path: str, obj: Mapping) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def write_model_config(folder: str, class_name: str, config: Mapping) -> None:
    cfg = {"_class_name": class_name, "_diffusers_version": _diffusers_version()}
    cfg.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()})
    write_json(os.path.join(folder, "config.json"), cfg)


def _transformer_groups(sd: Mapping, convert: Callable) -> list:
    """The DiT split into per-layer groups (every tensor of a layer together, so fused ones split and join)."""
    layer = re.compile(r"^(?:transformer\.layers|mixins\.adaln_layer\.[A-Za-z_]+)\.(\d+)\.")
    groups: dict = {}
    for key, value in sd.items():
        m = layer.match(key)
        groups.setdefault(int(m.group(1)) if m else -1, {})[key] = value
    return [(groups[g], convert) for g in sorted(groups)]


def write_transformer(folder: str, sd: Mapping, info: TransformerInfo, *, dtype=torch.float32,
                      max_shard_size="5GB") -> list[str]:
    os.makedirs(folder, exist_ok=True)
    files = write_streaming(folder, _transformer_groups(sd, _convert_transformer(info)), prefix=WEIGHTS,
                            max_shard_size=max_shard_size, dtype=dtype)
    write_model_config(folder, "CogVideoXTransformer3DModel", info.diffusers_config)
    return files


def write_vae(folder: str, sd: Mapping, config: Mapping, *, dtype=torch.float32, max_shard_size="5GB") -> list[str]:
    from sat_cogvideo.convert.vae import convert_vae_sat_to_diffusers

    os.makedirs(folder, exist_ok=True)
    files = write_streaming(folder, [(sd, convert_vae_sat_to_diffusers)], prefix=WEIGHTS,
                            max_shard_size=max_shard_size, dtype=dtype)
    write_model_config(folder, "AutoencoderKLCogVideoX", config)
    return files


def scheduler_config(snr_shift_scale: float) -> dict:
    """``CogVideoXDDIMScheduler`` settings of the original converter, SNR shift per model."""
    return {"snr_shift_scale": float(snr_shift_scale), "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "clip_sample": False, "num_train_timesteps": 1000,
            "prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "set_alpha_to_one": True,
            "timestep_spacing": "trailing"}


def write_scheduler(folder: str, snr_shift_scale: float) -> None:
    from diffusers import CogVideoXDDIMScheduler

    CogVideoXDDIMScheduler.from_config(scheduler_config(snr_shift_scale)).save_config(folder)


def resolve_text_encoder_source(source: str, cache_dir: Optional[str] = None) -> tuple[str, str]:
    """(text encoder folder, tokenizer folder) of a T5 source: a SAT-style T5 folder (weights and tokenizer
    together, e.g. ``t5-v1_1-xxl``), a diffusers pipeline folder (``text_encoder/`` + ``tokenizer/``), or a Hub id
    (downloaded into ``cache_dir``, as the original does)."""
    if os.path.isdir(source):
        if os.path.isdir(os.path.join(source, "text_encoder")) and os.path.isdir(os.path.join(source, "tokenizer")):
            return os.path.join(source, "text_encoder"), os.path.join(source, "tokenizer")
        if not os.path.isfile(os.path.join(source, "config.json")):
            raise UserError(f"T5 folder {source} has no config.json: pass a T5 folder such as t5-v1_1-xxl "
                            "(config.json, model safetensors, spiece.model)")
        return source, source
    if os.path.exists(source) or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise UserError(f"T5 folder {source} does not exist: pass --text_encoder_path <local t5-v1_1-xxl folder>")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(source, cache_dir=cache_dir, allow_patterns=[
            "*.json", "*.model", "model*.safetensors", "pytorch_model*.bin", "text_encoder/*", "tokenizer/*"])
    except Exception as err:  # network and hub errors have many types
        raise UserError(f"cannot download the T5 model {source!r} ({type(err).__name__}); pass "
                        "--text_encoder_path <local t5-v1_1-xxl folder>") from None
    return resolve_text_encoder_source(local)


def _t5_weights(folder: str) -> dict:
    if os.path.isfile(os.path.join(folder, "model.safetensors")) or \
            os.path.isfile(os.path.join(folder, "model.safetensors.index.json")):
        return open_weights_folder(folder, "model")
    index = os.path.join(folder, "pytorch_model.bin.index.json")
    files = ["pytorch_model.bin"]
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f).get("weight_map", {}).values()))
    out = {}
    for name in files:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            out.update(read_state_dict(load_checkpoint_file(path, what="T5 weights")))
    if out:
        return out
    raise UserError(f"T5 folder {folder} holds no model.safetensors (or sharded index) or pytorch_model.bin")


def write_text_encoder(te_src: str, tok_src: str, te_dst: str, tok_dst: str, *, dtype=None,
                       text_length: int = 226, max_shard_size="5GB") -> None:
    """``text_encoder/`` (T5 encoder weights: copied, or cast to ``dtype``, decoder weights dropped) and
    ``tokenizer/`` (sentencepiece model + configs, ``model_max_length`` = the model's text length)."""
    os.makedirs(te_dst, exist_ok=True)
    os.makedirs(tok_dst, exist_ok=True)
    with open(os.path.join(te_src, "config.json")) as f:
        config = json.load(f)
    weights = _t5_weights(te_src)
    encoder_only = all(not k.startswith(("decoder.", "lm_head.")) for k in weights)
    plain_copy = dtype is None and encoder_only and (
        os.path.isfile(os.path.join(te_src, "model.safetensors"))
        or os.path.isfile(os.path.join(te_src, "model.safetensors.index.json")))
    if plain_copy:
        for name in os.listdir(te_src):
            if name.startswith("model") and (name.endswith(".safetensors") or name.endswith(".index.json")):
                shutil.copyfile(os.path.join(te_src, name), os.path.join(te_dst, name))
    else:
        keep = {k: v for k, v in weights.items() if not k.startswith(("decoder.", "lm_head."))}
        write_streaming(te_dst, [(keep, dict)], prefix="model", max_shard_size=max_shard_size, dtype=dtype)
        if dtype is not None:
            config["torch_dtype"] = config["dtype"] = DTYPE_NAME[dtype]
    config["architectures"] = ["T5EncoderModel"]
    write_json(os.path.join(te_dst, "config.json"), config)
    if not os.path.isfile(os.path.join(tok_src, "spiece.model")) and \
            not os.path.isfile(os.path.join(tok_src, "tokenizer.json")):
        raise UserError(f"T5 folder {tok_src} has no spiece.model (or tokenizer.json): the tokenizer is missing")
    for name in T5_FILES:
        src = os.path.join(tok_src, name)
        if not os.path.isfile(src):
            continue
        if name == "tokenizer_config.json":
            with open(src) as f:
                tok_cfg = json.load(f)
            tok_cfg["model_max_length"] = int(text_length)
            write_json(os.path.join(tok_dst, name), tok_cfg)
        else:
            shutil.copyfile(src, os.path.join(tok_dst, name))


def model_index(i2v: bool, components: Mapping[str, bool]) -> dict:
    classes = {"scheduler": ("diffusers", "CogVideoXDDIMScheduler"),
               "text_encoder": ("transformers", "T5EncoderModel"), "tokenizer": ("transformers", "T5Tokenizer"),
               "transformer": ("diffusers", "CogVideoXTransformer3DModel"),
               "vae": ("diffusers", "AutoencoderKLCogVideoX")}
    index = {"_class_name": "CogVideoXImageToVideoPipeline" if i2v else "CogVideoXPipeline",
             "_diffusers_version": _diffusers_version()}
    for name, lib_cls in classes.items():
        index[name] = list(lib_cls) if components.get(name) else [None, None]
    return index


class AtomicFolder:
    """Build a folder under a temporary name beside ``path``; rename into place on success, remove on failure."""

    def __init__(self, path: str, overwrite: bool = False):
        self.path = os.path.abspath(os.fspath(path))
        if os.path.exists(self.path) and not overwrite:
            raise UserError(f"output {self.path} already exists: pass --overwrite to replace it, or choose "
                            "another --output_path")
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise UserError(f"output {self.path} exists and is not a folder")
        self.parent = os.path.dirname(self.path)
        self.tmp = None

    def __enter__(self) -> str:
        try:
            os.makedirs(self.parent, exist_ok=True)
            self.tmp = make_temp_dir(self.parent, prefix=f".{os.path.basename(self.path)}.tmp-")
        except OSError as err:
            raise UserError(f"cannot create the output folder beside {self.path} ({err.strerror})") from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if os.path.exists(self.path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(self.path)}.old-", dir=self.parent)
            os.replace(self.path, os.path.join(old, "x"))
        os.replace(self.tmp, self.path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
        return False


def _read_transformer(path: str, *, base_path: Optional[str], merge: bool, lora_alpha: float, model_cfg,
                      flags: dict, trust_pickle: bool, log: Callable):
    """The DiT state dict to convert (LoRA merged on request) and its :class:`TransformerInfo`, flags checked."""
    tsd = read_sat_transformer(path, trust_pickle, log)
    base = read_sat_transformer(base_path, trust_pickle, log) if base_path is not None else None
    tsd = merge_lora(tsd, merge=merge, lora_alpha=lora_alpha, base=base)
    info = describe_transformer(tsd, model_cfg)
    check_flags(info, **flags)
    log(f"transformer: {info.name}, CogVideoX {info.version}, {'I2V' if info.i2v else 'T2V'}, "
        f"{info.detected.num_layers} layers, {info.num_attention_heads} heads")
    return tsd, info


def _pipeline_scalars(info, model_cfg, version: str, scaling_factor, snr_shift_scale, log: Callable):
    """(VAE scaling factor, scheduler SNR shift, text length): the model's, or the flags' (with a warning when
    they differ from a known model's)."""
    if info is not None:
        default_scale, default_shift, text_length = info.scale_factor, info.shift_scale, info.text_length
    elif model_cfg:
        from sat_cogvideo.families import detect_from_model_config

        default_scale, default_shift, text_length = _model_scalars(model_cfg, detect_from_model_config(model_cfg))
    else:  # the original tool's defaults (2B values) when nothing tells the model
        default_scale, default_shift, text_length = 1.15258426, 3.0, get_generation(version).text_length
    scale = float(scaling_factor) if scaling_factor is not None else default_scale
    shift = float(snr_shift_scale) if snr_shift_scale is not None else default_shift
    if info is not None and scaling_factor is not None and abs(scale - default_scale) > 1e-9:
        log(f"warning: --scaling_factor {scale} differs from this model's {default_scale}")
    if info is not None and snr_shift_scale is not None and abs(shift - default_shift) > 1e-9:
        log(f"warning: --snr_shift_scale {shift} differs from this model's {default_shift}")
    return scale, shift, text_length


def _text_encoder_source(path: Optional[str], cache_dir: Optional[str], log: Callable):
    """(text encoder folder, tokenizer folder) of ``path``, or (None, None) with a note on using the pipeline."""
    if path is not None:
        return resolve_text_encoder_source(path, cache_dir)
    log("no text encoder: the folder gets no text_encoder/ and tokenizer/; load it with "
        "from_pretrained(path, text_encoder=None, tokenizer=None) and pass prompt_embeds")
    return None, None


def convert_sat_to_diffusers(output_path: str, *, transformer_ckpt_path: Optional[str] = None,
                             vae_ckpt_path: Optional[str] = None, config=None, dtype=torch.float32,
                             i2v: bool = False, version: Optional[str] = None, num_layers: Optional[int] = None,
                             num_attention_heads: Optional[int] = None,
                             use_rotary_positional_embeddings: Optional[bool] = None,
                             scaling_factor: Optional[float] = None, snr_shift_scale: Optional[float] = None,
                             text_encoder_path: Optional[str] = None, text_encoder_cache_dir: Optional[str] = None,
                             typecast_text_encoder: bool = False, overwrite: bool = False, trust_pickle: bool = False,
                             max_shard_size="5GB", merge_lora_weights: bool = False, lora_alpha: float = 1.0,
                             base_transformer_ckpt_path: Optional[str] = None,
                             log: Callable = _log_default) -> dict:
    """Write a complete diffusers pipeline folder at ``output_path`` from SAT checkpoints; returns a summary.

    ``config``: optional SAT model YAML path(s) (needed only for models of non-released sizes, e.g. tiny test
    models, whose text length / latent size cannot be read off the weights).  Every input is checked before the
    first byte is written.
    """
    if transformer_ckpt_path is None and vae_ckpt_path is None:
        raise UserError("nothing to convert: pass --transformer_ckpt_path and/or --vae_ckpt_path")
    target = AtomicFolder(output_path, overwrite)
    model_cfg = load_model_config(config) if config else None
    info = tsd = vsd = vae_config = None
    if transformer_ckpt_path is not None:
        flags = dict(i2v=i2v, version=version, num_layers=num_layers, num_attention_heads=num_attention_heads,
                     use_rotary_positional_embeddings=use_rotary_positional_embeddings)
        tsd, info = _read_transformer(transformer_ckpt_path, base_path=base_transformer_ckpt_path,
                                      merge=merge_lora_weights, lora_alpha=lora_alpha, model_cfg=model_cfg,
                                      flags=flags, trust_pickle=trust_pickle, log=log)
        version = info.version
    version = str(version or "1.0")
    scale, shift, text_length = _pipeline_scalars(info, model_cfg, version, scaling_factor, snr_shift_scale, log)
    if vae_ckpt_path is not None:
        vsd = read_sat_vae(vae_ckpt_path, trust_pickle)
        vae_config = describe_vae(vsd, model_cfg, scale, version)
    te_src, tok_src = _text_encoder_source(text_encoder_path, text_encoder_cache_dir, log)

    with target as tmp:
        if tsd is not None:
            files = write_transformer(os.path.join(tmp, "transformer"), tsd, info, dtype=dtype,
                                      max_shard_size=max_shard_size)
            log(f"transformer: {len(files)} file(s), {DTYPE_NAME.get(dtype, dtype)}")
        if vsd is not None:
            write_vae(os.path.join(tmp, "vae"), vsd, vae_config, dtype=torch.float32, max_shard_size=max_shard_size)
            log(f"vae: scaling_factor {scale}{', invert_scale_latents' if version == '1.5' else ''}")
        write_scheduler(os.path.join(tmp, "scheduler"), shift)
        if te_src is not None:
            write_text_encoder(te_src, tok_src, os.path.join(tmp, "text_encoder"), os.path.join(tmp, "tokenizer"),
                               dtype=dtype if (typecast_text_encoder and dtype != torch.float32) else None,
                               text_length=text_length, max_shard_size=max_shard_size)
        write_json(os.path.join(tmp, "model_index.json"), model_index(
            i2v if info is None else info.i2v,
            {"scheduler": True, "transformer": tsd is not None, "vae": vsd is not None,
             "text_encoder": te_src is not None, "tokenizer": te_src is not None}))
    log(f"wrote {target.path}")
    return {"output": target.path, "info": info, "vae_config": vae_config, "scaling_factor": scale,
            "snr_shift_scale": shift, "text_length": text_length, "version": version}


# ----------------------------------------------------------------------------------------------------------------
# diffusers -> SAT

def _read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{folder} has no config.json: pass a diffusers pipeline folder or its transformer/ folder")
    with open(path) as f:
        try:
            return json.load(f)
        except ValueError:
            raise UserError(f"{path} is not valid JSON") from None


def _diffusers_parts(input_path: str) -> dict:
    """``{part: folder}`` of a diffusers pipeline folder (transformer, vae, text_encoder, tokenizer) or of a single
    transformer / VAE folder."""
    if not os.path.isdir(input_path):
        raise UserError(f"{input_path} is not a folder: pass a diffusers pipeline folder (with model_index.json) "
                        "or its transformer/ folder")
    parts = {}
    if os.path.isfile(os.path.join(input_path, "model_index.json")):
        parts["model"] = input_path
        for name in ("transformer", "vae", "text_encoder", "tokenizer"):
            if os.path.isdir(os.path.join(input_path, name)):
                parts[name] = os.path.join(input_path, name)
    else:
        cls = _read_config(input_path).get("_class_name")
        if cls == "CogVideoXTransformer3DModel":
            parts["transformer"] = input_path
        elif cls == "AutoencoderKLCogVideoX":
            parts["vae"] = input_path
        else:
            raise UserError(f"{input_path}/config.json describes {cls!r}, not a CogVideoX transformer or VAE")
    if "transformer" not in parts and "vae" not in parts:  # (a pipeline folder's root is parts["model"])
        raise UserError(f"{input_path} holds neither transformer/ nor vae/: nothing to convert")
    return parts


def _read_diffusers_transformer(folder: str, dtype) -> dict:
    """SAT engine keys of a diffusers transformer folder; 1.0 RoPE models get SAT's unused (zero) position table."""
    from sat_cogvideo.convert.transformer import diffusers_to_sat_transformer

    tcfg = _read_config(folder)
    if tcfg.get("_class_name") not in (None, "CogVideoXTransformer3DModel"):
        raise UserError(f"{folder} holds a {tcfg.get('_class_name')}, not a CogVideoX transformer")
    tsd = diffusers_to_sat_transformer(open_weights_folder(folder, WEIGHTS), prefix=SAT_PREFIX)
    hidden = int(tcfg.get("num_attention_heads", 30)) * int(tcfg.get("attention_head_dim", 64))
    if tcfg.get("use_rotary_positional_embeddings") and tcfg.get("patch_size_t") is None:
        ref = tsd[SAT_PREFIX + "mixins.patch_embed.proj.weight"]
        tsd[SAT_PREFIX + "transformer.position_embeddings.weight"] = torch.zeros(64, hidden, dtype=ref.dtype)
    if dtype is not None:
        tsd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tsd.items()}
    return tsd


def _read_diffusers_vae(folder: str):
    """(SAT ``3d-vae.pt`` state dict, the diffusers config's scaling factor)."""
    from sat_cogvideo.convert.vae import convert_vae_diffusers_to_sat

    vcfg = _read_config(folder)
    if vcfg.get("_class_name") not in (None, "AutoencoderKLCogVideoX"):
        raise UserError(f"{folder} holds a {vcfg.get('_class_name')}, not a CogVideoX VAE")
    return convert_vae_diffusers_to_sat(open_weights_folder(folder, WEIGHTS)), vcfg.get("scaling_factor")


def _copy_t5(text_encoder: str, tokenizer: str, t5: str) -> None:
    """One T5 folder (encoder weights + tokenizer files), as the SAT release ships ``t5-v1_1-xxl``."""
    os.makedirs(t5)
    for src in (text_encoder, tokenizer):
        for name in os.listdir(src):
            shutil.copyfile(os.path.join(src, name), os.path.join(t5, name))


def convert_diffusers_to_sat(input_path: str, output_path: str, *, dtype=None, overwrite: bool = False,
                             iteration: str = "1", log: Callable = _log_default) -> dict:
    """Write a SAT model folder from a diffusers CogVideoX pipeline folder (or a transformer / VAE folder)::

        <output>/transformer/latest, <output>/transformer/<iteration>/mp_rank_00_model_states.pt
        <output>/vae/3d-vae.pt
        <output>/t5-v1_1-xxl/          (T5 encoder + tokenizer in one folder, as the SAT release; if present)
        <output>/model.yaml            (pipeline folders: the SAT model config of these weights, any size)

    Tensors keep their dtype unless ``dtype`` is given.  The 1.0 RoPE models also get SAT's unused
    ``transformer.position_embeddings.weight`` (zeros, shape [64, hidden]) so the files look like the released
    ones (and the family detection sees a RoPE model).
    """
    from sat_cogvideo.families import detect_from_state_dict

    parts = _diffusers_parts(os.fspath(input_path))
    target = AtomicFolder(output_path, overwrite)
    summary = {"output": target.path}
    tsd = _read_diffusers_transformer(parts["transformer"], dtype) if "transformer" in parts else None
    vsd = None
    if "vae" in parts:
        vsd, summary["vae_scaling_factor"] = _read_diffusers_vae(parts["vae"])

    with target as tmp:
        if tsd is not None:
            det = summary["detected"] = detect_from_state_dict(tsd)
            save_checkpoint(os.path.join(tmp, "transformer"), tsd, iteration)
            fam = det.family
            log(f"transformer: CogVideoX {det.generation} {'I2V' if det.i2v else 'T2V'}, {det.num_layers} layers"
                + (f" = {fam.name}: use --base {fam.config}" if fam else ""))
        if vsd is not None:
            from sat_cogvideo.vae_modules import save_vae_checkpoint

            save_vae_checkpoint(vsd, os.path.join(tmp, "vae", "3d-vae.pt"))
        if "text_encoder" in parts and "tokenizer" in parts:
            _copy_t5(parts["text_encoder"], parts["tokenizer"], os.path.join(tmp, "t5-v1_1-xxl"))
            summary["t5"] = True
        if "transformer" in parts and "vae" in parts and "model" in parts:
            summary["yaml"] = write_sat_model_yaml(parts["model"], os.path.join(tmp, SAT_MODEL_YAML), target.path,
                                                   with_t5=bool(summary.get("t5")))
            log(f"model config: {summary['yaml']} (run with --base {os.path.join(target.path, SAT_MODEL_YAML)} "
                f"<inference yaml> --load {os.path.join(target.path, 'transformer')})")
    log(f"wrote {target.path}")
    return summary


SAT_MODEL_YAML = "model.yaml"


def write_sat_model_yaml(pipeline_root: str, path: str, output_root: str, with_t5: bool) -> str:
    """The SAT ``model:`` YAML of a converted pipeline (any size: the configs/ file of a released family, else
    derived from the diffusers configs, :class:`~sat_cogvideo.convert.diffusers_source.DiffusersSource`), pointed
    at the SAT folder's ``vae/3d-vae.pt`` and ``t5-v1_1-xxl/`` by absolute paths; returns how it was chosen."""
    from omegaconf import OmegaConf

    from sat_cogvideo.atomic import atomic_write_text
    from sat_cogvideo.convert.diffusers_source import DiffusersSource
    from sat_cogvideo.hub import PipelineFolder

    mc = DiffusersSource(PipelineFolder(os.path.abspath(pipeline_root), "")).model_config()
    how = mc.pop("_source")
    mc["first_stage_config"]["params"]["ckpt_path"] = os.path.join(output_root, "vae", "3d-vae.pt")
    for emb in mc["conditioner_config"]["params"]["emb_models"]:
        if str(emb.get("target", "")).endswith("FrozenT5Embedder"):
            emb["params"].pop("tokenizer_dir", None)
            emb["params"]["model_dir"] = os.path.join(output_root, "t5-v1_1-xxl") if with_t5 else "t5-v1_1-xxl"
    header = (f"# SAT model config of {os.path.abspath(pipeline_root)}, written by tools/convert_weight_hf2sat.py\n"
              f"# ({how}).  Use: --base <this file> configs/inference{'_1.5' if 'cogvideox1.5' in how else ''}.yaml "
              f"--load {os.path.join(output_root, 'transformer')}\n")
    atomic_write_text(path, header + OmegaConf.to_yaml(OmegaConf.create({"model": mc})))
    return how
