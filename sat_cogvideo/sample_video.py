"""Inference CLI: text-, image- and video-to-video with a CogVideoX SAT checkpoint.

Maps to the original ``sat/sample_video.py``: ``--base <model>.yaml <inference>.yaml`` and the same options
(``input_type`` txt/cli, ``input_file``, ``sampling_num_frames`` in latent frames, ``sampling_image_size``,
``sampling_fps``, ``only_save_latents``, ``output_dir``, ``batch_size``, fp16/bf16) and output layout
``<output_dir>/<line>_<prompt-slug>/<index>/000000.mp4``.  Prompts of a txt file are shared out over
data-parallel ranks by line number.

Added for cluster scripts (no YAML editing): ``--prompt``, ``--image-or-video-path``, ``--output-path``,
``--num-frames`` (video frames), ``--num-steps``, ``--guidance-scale``, ``--sampler dpm|ddim``,
``--generate-type t2v|i2v|v2v``, ``--strength`` (v2v), ``--dtype``, ``--lora-path``, ``--offload``,
``--vae-slicing``/``--vae-tiling``, ``--skip-existing``/``--overwrite``.  Every input is checked before any
weight is loaded; a problem is one line on stderr and exit code 2.

Differences from the original: ``--seed`` decides the noise (each video is seeded with
``seed + 1000·line + index``, so a prompt's video does not depend on the others or on the number of ranks);
the device comes from ``--device``; outputs are written to a temporary name and renamed; existing outputs are
not overwritten unless ``--overwrite``; the I2V image is encoded in the model dtype (the original hard-codes
bfloat16, the dtype of the released I2V models).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterator, List, Optional

from sat_cogvideo.errors import UserError, run_cli

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif", ".m4v")
SAMPLERS = {
    "dpm": "sgm.modules.diffusionmodules.sampling.VPSDEDPMPP2MSampler",
    "ddim": "sgm.modules.diffusionmodules.sampling.VideoDDIMSampler",
}
DTYPES = {"float32": "fp32", "fp32": "fp32", "float16": "fp16", "fp16": "fp16", "half": "fp16",
          "bfloat16": "bf16", "bf16": "bf16"}


# --------------------------------------------------------------------------------------------------
# arguments


def _tile_size(value):
    from sat_cogvideo.arguments import image_size

    return image_size(value)


def add_inference_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options a cluster script needs, on top of the original's (see the module docstring)."""
    g = parser.add_argument_group("sat-cogvideo inference", "set on the command line, without editing YAML")
    g.add_argument("--prompt", type=str, default=None, help="one prompt (instead of --input-file / stdin)")
    g.add_argument("--image-or-video-path", type=str, default=None,
                   help="conditioning image (i2v) or input video (v2v) for --prompt or every prompt of the file")
    g.add_argument("--output-path", type=str, default=None, help="write the one video to this .mp4 file")
    g.add_argument("--generate-type", type=str, default=None, choices=["t2v", "i2v", "v2v"],
                   help="default: i2v for I2V models, v2v when --image-or-video-path is a video, else t2v")
    g.add_argument("--num-frames", type=int, default=None,
                   help="video frames (4N+1: 49 for 1.0 models, 81 or 161 for 1.5); sets sampling_num_frames")
    g.add_argument("--num-steps", type=int, default=None, help="sampler steps (default: the config's, 50)")
    g.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: the config's, 6)")
    g.add_argument("--sampler", type=str, default=None, choices=sorted(SAMPLERS),
                   help="dpm: VPSDEDPMPP2MSampler (the configs'), ddim: VideoDDIMSampler")
    g.add_argument("--strength", type=float, default=0.8, help="v2v: 0 keeps the input video, 1 ignores it")
    g.add_argument("--dtype", type=str, default=None, choices=sorted(DTYPES),
                   help="model dtype (default: the config's fp16/bf16 flags)")
    g.add_argument("--lora-path", type=str, default=None,
                   help="a SAT LoRA checkpoint folder (with 'latest'); its LoRA factors are merged into the model")
    g.add_argument("--lora-scale", type=float, default=None,
                   help="LoRA scaling (default: lora_alpha / r as SAT's LoraMixin, lora_alpha from the config's "
                        "lora_config or 1, r read from the checkpoint)")
    g.add_argument("--offload", action="store_true",
                   help="keep T5, transformer and VAE on the CPU and move each to the device only while it works")
    g.add_argument("--vae-slicing", action="store_true", help="encode/decode one video of a batch at a time")
    g.add_argument("--vae-tiling", action="store_true", help="decode in overlapping spatial tiles (less memory)")
    g.add_argument("--vae-tile-size", type=_tile_size, default=None,
                   help="tile size H,W in pixels for --vae-tiling (default 240,360 as diffusers)")
    g.add_argument("--skip-existing", action="store_true", help="skip prompts whose outputs exist (resume a list)")
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return parser


# --------------------------------------------------------------------------------------------------
# plan: what will be generated, checked before any weight is loaded


@dataclass
class Job:
    text: str              # the prompt
    cnt: int               # line counter (folder name and seed)
    media: Optional[str]   # image (i2v) or video (v2v) path
    outputs: List[str] = field(default_factory=list)   # one per batch index


@dataclass
class Plan:
    generate_type: str
    generation: str        # "1.0" or "1.5"
    family: object         # families.Family or None (tiny models)
    latent_frames: int     # T sampled
    video_frames: int      # pixel frames written
    height: Optional[int]  # pixels (None: i2v 1.5, from the image)
    width: Optional[int]
    fps: int
    jobs: List[Job]


def _net_params(model_config):
    return model_config["network_config"]["params"]


def _max_latent_hw(model_config):
    p = _net_params(model_config)
    return int(p.get("latent_height")), int(p.get("latent_width"))


def _compressed_frames(model_config) -> int:
    p = _net_params(model_config)
    return (int(p.get("num_frames")) - 1) // int(p.get("time_compressed_rate", 4)) + 1


def allowed_video_frames(model_config, detected) -> List[int]:
    """Video frame counts this model can generate."""
    if detected.family is not None:
        return list(detected.family.allowed_num_frames())
    max_t = _compressed_frames(model_config)
    if detected.generation == "1.0":
        return [4 * (t - 1) + 1 for t in range(max_t, 0, -2) if t >= 3]  # odd latent counts
    # 1.5: the padded latent count T = (F-1)/4 + 2 must be even and T/2 <= the RoPE grid
    return [4 * (t - 2) + 1 for t in range(2 * max_t, 3, -2)]


def video_to_latent_frames(num_frames: int, generation: str) -> int:
    if generation == "1.5":
        return (num_frames - 1) // 4 + 2
    return (num_frames - 1) // 4 + 1


def latent_to_video_frames(latents: int, generation: str) -> int:
    if generation == "1.5":
        return 4 * (latents - 2) + 1
    return 4 * (latents - 1) + 1


def check_num_frames(num_frames: int, model_config, detected, flag: str = "--num-frames") -> int:
    """Video frames -> latent frames, or a UserError naming the allowed values."""
    allowed = allowed_video_frames(model_config, detected)
    name = detected.family.name if detected.family is not None else f"this {detected.generation} model"
    allowed_text = " or ".join(str(a) for a in sorted(allowed, reverse=True))
    if num_frames < 1 or (num_frames - 1) % 4:
        raise UserError(f"{flag} {num_frames} is not of the form 4N+1 (the VAE compresses time by 4): "
                        f"use {allowed_text} for {name}")
    if num_frames not in allowed:
        raise UserError(f"{flag} {num_frames} is not allowed for {name}: use {allowed_text}")
    return video_to_latent_frames(num_frames, detected.generation)


def slugify(text: str) -> str:
    """Folder name part of a prompt, as the original: spaces -> '_', '/' removed, first 120 characters."""
    return text.replace(" ", "_").replace("/", "")[:120]


def output_files(args, job: Job, batch_size: int) -> List[str]:
    name = "latent.pt" if args.only_save_latents else "000000.mp4"
    if args.output_path:
        base, ext = os.path.splitext(args.output_path)
        if args.only_save_latents:
            ext = ".pt"
        if batch_size == 1:
            return [base + ext]
        return [f"{base}_{i}{ext}" for i in range(batch_size)]
    folder = os.path.join(args.output_dir, f"{job.cnt}_{slugify(job.text)}")
    return [os.path.join(folder, str(i), name) for i in range(batch_size)]


def read_prompt_lines(args) -> Iterator[tuple]:
    """(text, line counter) for this data-parallel rank, as the original: every line counts, empty ones too."""
    from sat_cogvideo.distributed import data_parallel_rank_and_size

    rank, world = data_parallel_rank_and_size()
    if args.prompt is not None:
        if rank == 0:
            yield args.prompt.strip(), 0
        return
    if args.input_type == "txt":
        with open(args.input_file, "r", encoding="utf-8") as f:
            for cnt, line in enumerate(f):
                if cnt % world == rank:
                    yield line.strip(), cnt
    elif args.input_type == "cli":
        cnt = 0
        while True:
            try:
                text = input("Please input English text (Ctrl-D quit): ")
            except EOFError:
                return
            yield text.strip(), cnt
            cnt += 1
    else:
        raise UserError(f"input_type {args.input_type!r} is not supported: use txt or cli")


def _split_media(text: str, default_media: Optional[str], where: str):
    if "@@" in text:
        parts = text.split("@@")
        if len(parts) != 2:
            raise UserError(f"{where}: more than one '@@' in {text[:60]!r}: use 'prompt@@path'")
        return parts[0].strip(), parts[1].strip()
    return text, default_media


def _check_media(path: str, kind: str, where: str, need_frames: int = 0):
    from sat_cogvideo import media

    if not path:
        raise UserError(f"{where}: {kind} needs an {'image' if kind == 'i2v' else 'input video'}: "
                        f"give --image-or-video-path or write 'prompt@@path'")
    if not os.path.isfile(path):
        raise UserError(f"{where}: {'image' if kind == 'i2v' else 'video'} {path!r} does not exist")
    if kind == "i2v":
        media.read_image(path)
    else:
        frames, _ = media.read_video(path, max_frames=need_frames)
        if len(frames) < need_frames:
            raise UserError(f"{where}: video {path!r} has {len(frames)} frames but {need_frames} are needed: "
                            f"give a longer video or fewer --num-frames")


def _check_writable(folder: str, what: str):
    folder = os.path.abspath(folder or ".")
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise UserError(f"{what} {folder!r} is not writable ({err.strerror or err}): choose another folder") from None


def guess_generate_type(args, detected, media_path: Optional[str]) -> str:
    if args.generate_type:
        return args.generate_type
    if detected.i2v or args.image2video:
        return "i2v"
    if media_path:
        return "i2v" if media_path.lower().endswith(IMAGE_EXTS) and not media_path.lower().endswith(".gif") else "v2v"
    return "t2v"


def build_plan(args) -> Plan:
    """Check every input against the model config and return what will be generated (no weights loaded)."""
    from sat_cogvideo.families import detect_from_model_config

    mc = args.model_config
    if mc is None:
        raise UserError("no model: section: pass the model config with --base, e.g. "
                        "--base configs/cogvideox_5b.yaml configs/inference.yaml")
    detected = detect_from_model_config(mc)
    generation = detected.generation

    # generation type vs model family
    probe_media = args.image_or_video_path
    if probe_media is None and args.prompt is not None and "@@" in args.prompt:
        probe_media = args.prompt.split("@@")[-1].strip()
    gtype = guess_generate_type(args, detected, probe_media)
    model_name = detected.family.name if detected.family else f"this {'I2V' if detected.i2v else 'T2V'} model"
    if detected.i2v and gtype != "i2v":
        raise UserError(f"{model_name} is an image-to-video model and cannot do {gtype}: use --generate-type i2v "
                        f"with an image, or a T2V model config (e.g. configs/cogvideox_5b.yaml)")
    if gtype == "i2v" and not detected.i2v:
        raise UserError(f"i2v needs an I2V model, but {model_name} is text-to-video (in_channels "
                        f"{detected.in_channels}): use configs/cogvideox_5b_i2v.yaml or cogvideox1.5_5b_i2v.yaml")
    if gtype == "v2v" and detected.ofs:
        raise UserError(f"v2v runs with a T2V model; {model_name} is not one")
    if not 0.0 <= args.strength <= 1.0:
        raise UserError(f"--strength {args.strength} is outside [0, 1]")
    if args.num_steps is not None and args.num_steps < 1:
        raise UserError(f"--num-steps {args.num_steps} must be at least 1")

    # frames
    if args.num_frames is not None:
        latent_frames = check_num_frames(args.num_frames, mc, detected)
    else:
        latent_frames = int(args.sampling_num_frames)
        check_num_frames(latent_to_video_frames(latent_frames, generation), mc, detected,
                         flag=f"sampling_num_frames {latent_frames} (latent) means video frames")
    video_frames = latent_to_video_frames(latent_frames, generation)

    # resolution
    lat_h, lat_w = _max_latent_hw(mc)
    if generation == "1.0":
        height, width = 8 * lat_h, 8 * lat_w  # the 1.0 models only work at their configured size (480x720)
    elif gtype == "i2v" and not _explicit_size(args):
        height = width = None  # from the image
    else:
        height, width = (int(v) for v in args.sampling_image_size)
        if height % 16 or width % 16:
            raise UserError(f"sampling_image_size {height}x{width} is not a multiple of 16 pixels: "
                            f"use e.g. {16 * round(height / 16)}x{16 * round(width / 16)}")
        if height > 8 * lat_h or width > 8 * lat_w:
            raise UserError(f"sampling_image_size {height}x{width} exceeds the model's maximum "
                            f"{8 * lat_h}x{8 * lat_w} pixels")
    fps = int(args.sampling_fps)
    if getattr(args, "_explicit_channels", False) and int(args.latent_channels) != latent_channels(args):
        raise UserError(f"latent_channels {args.latent_channels} does not match the model's out_channels "
                        f"{latent_channels(args)}")

    # outputs
    if args.output_path:
        if not args.output_path.lower().endswith(".mp4") and not args.only_save_latents:
            raise UserError(f"--output-path {args.output_path!r} must end in .mp4")
        if args.prompt is None and args.input_type != "txt":
            pass
        _check_writable(os.path.dirname(args.output_path) or ".", "output folder")
    else:
        _check_writable(args.output_dir, "output_dir")
    if args.skip_existing and args.overwrite:
        raise UserError("give only one of --skip-existing and --overwrite")

    # prompts
    if args.prompt is None and args.input_type == "txt" and not os.path.isfile(args.input_file):
        raise UserError(f"input_file {args.input_file!r} does not exist: give a prompt file (one prompt per line) "
                        f"or --prompt")
    jobs: List[Job] = []
    if args.prompt is not None or args.input_type == "txt":
        where_file = "--prompt" if args.prompt is not None else args.input_file
        for text, cnt in read_prompt_lines(args):
            where = where_file if args.prompt is not None else f"{where_file} line {cnt + 1}"
            text, media_path = _split_media(text, args.image_or_video_path, where)
            if gtype == "t2v":
                media_path = None
            else:
                _check_media(media_path, gtype, where, need_frames=video_frames)
                if gtype == "i2v" and generation == "1.5" and height is None:
                    from sat_cogvideo import media as _media
                    i2v15_pixel_size(_media.read_image(media_path).size, mc, media_path)
            job = Job(text, cnt, media_path)
            job.outputs = output_files(args, job, int(args.batch_size))
            jobs.append(job)
        if args.output_path and len(jobs) > 1:
            raise UserError(f"--output-path writes one video but {args.input_file} has {len(jobs)} prompts: "
                            f"use --output-dir instead")
        for job in jobs:
            for out in job.outputs:
                if os.path.exists(out) and not (args.skip_existing or args.overwrite):
                    raise UserError(f"output {out} exists: pass --skip-existing to keep it or --overwrite to replace it")
    return Plan(gtype, generation, detected.family, latent_frames, video_frames, height, width, fps, jobs)


def i2v15_pixel_size(image_size, model_config, path: str = "image") -> tuple:
    """CogVideoX1.5 I2V video size for an image of ``image_size`` (w, h): short side 768 px, long side the
    aspect ratio rounded to 16 px.  For models whose RoPE grid is smaller (tiny test models) the short side
    shrinks in 16 px steps until the size fits; released models (≤ 2400 px) keep 768."""
    from sat_cogvideo import media

    lat_h, lat_w = _max_latent_hw(model_config)
    for short in range(768, 15, -16):
        h, w = media.i2v_15_latent_size(*image_size, short_side=short)
        if h <= lat_h and w <= lat_w:
            return 8 * h, 8 * w
    raise UserError(f"{path}: aspect ratio {image_size[0]}x{image_size[1]} does not fit the model's maximum "
                    f"{8 * lat_h}x{8 * lat_w} pixels")


def latent_channels(args) -> int:
    """C of the sampled latent: the DiT's out_channels (the original read ``latent_channels``, whose parser
    default 32 is wrong for every model; a conflicting explicit value is an error, see build_plan)."""
    return int(_net_params(args.model_config).get("out_channels", 16))


def _explicit_size(args) -> bool:
    return bool(getattr(args, "_explicit_size", False))


# --------------------------------------------------------------------------------------------------
# model


def apply_overrides(args) -> None:
    """The original's four config edits plus the command-line options that live in the model config."""
    from omegaconf import open_dict

    mc = args.model_config
    with open_dict(mc):
        mc.first_stage_config.params.cp_size = 1
        targs = mc.network_config.params.transformer_args
        targs.model_parallel_size = 1
        targs.checkpoint_activations = False
        if mc.get("loss_fn_config") is not None:
            mc.loss_fn_config.params.sigma_sampler_config.params.uniform_sampling = False
        sampler = mc.get("sampler_config")
        if sampler is None:
            raise UserError("the model config has no sampler_config: use one of the configs/ model files")
        if args.sampler:
            sampler.target = SAMPLERS[args.sampler]
        if args.num_steps is not None:
            sampler.params.num_steps = args.num_steps
        guider = sampler.params.get("guider_config")
        if guider is not None:
            if args.num_steps is not None and "num_steps" in (guider.get("params") or {}):
                guider.params.num_steps = args.num_steps
            if args.guidance_scale is not None:
                guider.params.scale = args.guidance_scale
        elif args.guidance_scale is not None:
            raise UserError("--guidance-scale given but the sampler_config has no guider_config")
        if args.vae_slicing:
            mc.en_and_decode_n_samples_a_time = 1


def _set_dtype(args):
    if args.dtype:
        d = DTYPES[args.dtype]
        args.fp16, args.bf16 = d == "fp16", d == "bf16"


def build_engine(args):
    """Engine from ``args.model_config``, cast to the model dtype (DiT, T5 and VAE alike, as SAT's
    ``get_model``), transformer weights loaded from ``args.load``."""
    import torch
    from sat_cogvideo.diffusion_video import SATVideoDiffusionEngine

    model = SATVideoDiffusionEngine(args)
    if args.fp16:
        model = model.half()
    elif args.bf16:
        model = model.bfloat16()
    if args.load:
        load_transformer_checkpoint(model, args.load)
    if args.lora_path:
        merge_lora_checkpoint(model, args.lora_path, args.lora_scale, args.model_config)
    apply_vae_memory_options(model, args)
    model.eval()
    return model


def _read_sat_checkpoint(folder: str) -> dict:
    """The weights of a SAT checkpoint folder (``latest`` + ``<iter>/mp_rank_00_model_states.pt``).

    Read with ``weights_only``; DeepSpeed finetune checkpoints also pickle optimizer/RNG objects, so a refused
    file is read again with full unpickling (the user's own checkpoint) and a warning."""
    from sat_cogvideo import checkpoint as ckpt

    try:
        return ckpt.read_state_dict(ckpt.load_checkpoint_file(folder))
    except UserError as err:
        if "weights-only" not in str(err):
            raise
    warnings.warn(f"{folder}: the checkpoint holds pickled Python objects besides the weights; loading it fully")
    return ckpt.read_state_dict(ckpt.load_checkpoint_file(folder, allow_pickle=True))


DIT_PREFIX = "model.diffusion_model."


def load_transformer_checkpoint(model, folder: str) -> None:
    """Load the DiT of a SAT checkpoint into the engine with strict key/shape checks.

    Only ``model.diffusion_model.*`` keys are read: T5/VAE keys in finetune checkpoints are ignored (they come
    from the T5 folder and ``3d-vae.pt``); the RoPE tables, the unused position table and the 2B sincos table
    may be absent or extra (``DiffusionTransformer.known_unused_keys``)."""
    from sat_cogvideo import checkpoint as ckpt

    sd = _read_sat_checkpoint(folder)
    dit_sd = {k[len(DIT_PREFIX):]: v for k, v in sd.items() if k.startswith(DIT_PREFIX)}
    if not dit_sd:
        raise UserError(f"checkpoint {folder} has no model.diffusion_model.* keys: is it a CogVideoX SAT transformer "
                        f"folder?")
    dit = model.model.diffusion_model
    known = dit.known_unused_keys() if hasattr(dit, "known_unused_keys") else set()
    # computed tables (RoPE, 2B sincos) keep their computed values even when a checkpoint stores them
    dit_sd = {k: v for k, v in dit_sd.items() if k not in known}
    ckpt.load_state_dict_strict(dit, dit_sd, known_unused=known, source=f"checkpoint {folder}")


def merge_lora_checkpoint(model, folder: str, scale: Optional[float], model_config) -> None:
    """Merge the LoRA factors of a SAT LoRA checkpoint into the plain DiT weights: per projection
    ``W += scale · B @ A`` (q, k and v of ``query_key_value`` have their own factors)."""
    import torch

    sd = _read_sat_checkpoint(folder)
    pre = "model.diffusion_model."
    lora = {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre) and (".matrix_A." in k or ".matrix_B." in k)}
    if not lora:
        raise UserError(f"--lora-path {folder} has no LoRA factors (matrix_A/matrix_B keys)")
    if scale is None:
        # SAT's LoraMixin: scaling = lora_alpha / r, lora_alpha defaulting to 1
        lcfg = (_net_params(model_config).get("modules") or {}).get("lora_config")
        params = (lcfg or {}).get("params") or {}
        r = int(next(v for k, v in lora.items() if ".matrix_A." in k).shape[0])
        if params.get("r") is not None and int(params["r"]) != r:
            raise UserError(f"--lora-path {folder} has rank {r} but lora_config says r: {params['r']}")
        scale = float(params.get("lora_alpha", 1.0)) / r
    dit = model.model.diffusion_model
    own = dict(dit.named_parameters())
    layers = sorted({k.rsplit(".matrix_", 1)[0] for k in lora})
    with torch.no_grad():
        for layer in layers:
            weight_key = layer + ".weight"
            if weight_key not in own:
                raise UserError(f"--lora-path {folder}: {layer} is not a layer of this model (wrong --base?)")
            w = own[weight_key]
            parts = sorted(int(k.rsplit(".", 1)[1]) for k in lora if k.startswith(layer + ".matrix_A."))
            rows = w.shape[0] // len(parts)
            for j in parts:
                a = lora[f"{layer}.matrix_A.{j}"].to(torch.float32)
                b = lora[f"{layer}.matrix_B.{j}"].to(torch.float32)
                delta = (b @ a) * scale
                if delta.shape != (rows, w.shape[1]):
                    raise UserError(f"--lora-path {folder}: {layer} factors give {list(delta.shape)}, "
                                    f"the layer part is {[rows, w.shape[1]]}")
                w[j * rows:(j + 1) * rows] += delta.to(w.dtype)


# --------------------------------------------------------------------------------------------------
# generation


class Placement:
    """Where each part of the engine lives: all on the device, or (``--offload``) each part moved to the
    device only while it works."""

    def __init__(self, model, device, offload: bool):
        self.model, self.device, self.offload = model, device, offload
        if not offload:
            model.to(device)
        self._set_embedder_device(device)

    def _set_embedder_device(self, device):
        for emb in getattr(self.model.conditioner, "embedders", []):
            if hasattr(emb, "device"):
                emb.device = device

    def use(self, part):
        import contextlib

        module = getattr(self.model, part)

        @contextlib.contextmanager
        def ctx():
            if self.offload:
                module.to(self.device)
            try:
                yield module
            finally:
                if self.offload:
                    module.to("cpu")
                    _empty_cache(self.device)

        return ctx()


def _empty_cache(device):
    import torch

    from sat_cogvideo.distributed import is_cuda

    if is_cuda(device):
        torch.cuda.empty_cache()


def seed_for(seed: int, cnt: int, index: int) -> int:
    return (int(seed) + 1000 * int(cnt) + int(index)) % (2 ** 63)


def conditionings(model, text: str, device):
    """(c, uc): T5(prompt) and the all-zero unconditional context, as the original."""
    import torch

    batch = {"txt": [text]}
    batch_uc = {"txt": [""]}
    c, uc = model.conditioner.get_unconditional_conditioning(batch, batch_uc=batch_uc,
                                                             force_uc_zero_embeddings=["txt"])
    for k in list(c):
        if isinstance(c[k], torch.Tensor):
            c[k], uc[k] = c[k][:1].to(device), uc[k][:1].to(device)
    return c, uc


def generate(args, model, plan: Plan, job: Job, placement: Placement, index: int):
    """One video (or latent) for one job; returns the sampled latents ``[1, T, C, h, w]`` and the video."""
    import torch
    from sat_cogvideo import media

    device = placement.device
    torch.manual_seed(seed_for(args.seed, job.cnt, index))
    T, C = plan.latent_frames, latent_channels(args)
    with placement.use("conditioner"):
        c, uc = conditionings(model, job.text, device)
    sample_kwargs = {}
    if plan.generate_type == "i2v":
        if plan.generation == "1.5":
            if plan.height is None:
                H, W = i2v15_pixel_size(media.read_image(job.media).size, args.model_config, job.media)
            else:
                H, W = plan.height, plan.width
            image = media.load_i2v_image(job.media, "1.5", H, W)
        else:
            H, W = plan.height, plan.width
            image = media.load_i2v_image(job.media, "1.0", H, W)
        with placement.use("first_stage_model"):
            z = model.encode_pixels(image.to(device=device, dtype=model.dtype))
        if plan.generation == "1.5":
            z = z / model.scale_factor  # the 1.5 code conditions on the raw VAE latent
        z = z.permute(0, 2, 1, 3, 4).contiguous()  # [1, 1, 16, h, w]
        pad = torch.zeros((1, T - 1) + tuple(z.shape[2:]), dtype=z.dtype, device=z.device)
        image_latent = torch.cat([z, pad], dim=1)
        c["concat"] = image_latent
        uc["concat"] = image_latent
        if plan.generation == "1.5":
            sample_kwargs["ofs"] = torch.tensor([2.0], device=device)
        shape = (T, C, H // 8, W // 8)
    else:
        H, W = plan.height, plan.width
        shape = (T, C, H // 8, W // 8)

    with placement.use("model"):
        if plan.generate_type == "v2v":
            video = media.load_v2v_video(job.media, plan.video_frames, H, W)
            with placement.use("first_stage_model"):
                z0 = model.encode_pixels(video.to(device=device, dtype=model.dtype))
            z0 = z0.permute(0, 2, 1, 3, 4).contiguous()  # [1, t, 16, h, w]
            if plan.generation == "1.5" and z0.shape[1] < T:
                z0 = torch.cat([z0[:, :T - z0.shape[1]], z0], dim=1)  # padding latent frame, dropped at decode
            samples_z = model.sample_from(z0, c, uc=uc, strength=args.strength)
        else:
            samples_z = model.sample(c, uc=uc, batch_size=1, shape=shape, **sample_kwargs)
    if args.only_save_latents:
        return samples_z, None
    with placement.use("first_stage_model"):
        video = model.decode_video(samples_z)
    return samples_z, video[0].cpu()


def apply_vae_memory_options(model, args) -> None:
    """--vae-slicing / --vae-tiling: diffusers' switches on our VAE (``enable_slicing`` / ``enable_tiling``)."""
    vae = model.first_stage_model
    if args.vae_slicing:
        model.en_and_decode_n_samples_a_time = 1
        if hasattr(vae, "enable_slicing"):
            vae.enable_slicing()
    if args.vae_tiling:
        if not hasattr(vae, "enable_tiling"):
            raise UserError("--vae-tiling: this first_stage_config's VAE has no tiling (use "
                            "vae_modules.autoencoder.VideoAutoencoderInferenceWrapper)")
        size = args.vae_tile_size or [None, None]
        vae.enable_tiling(tile_sample_min_height=size[0], tile_sample_min_width=size[1])
        # diffusers' tiling (reproduced) only tiles the output exactly when the latent stride times the spatial
        # compression equals the tile minus its blend width
        f = int(getattr(vae, "spatial_compression", 8))
        for tile, overlap, axis in ((vae.tile_sample_min_height, vae.tile_overlap_factor_height, "height"),
                                    (vae.tile_sample_min_width, vae.tile_overlap_factor_width, "width")):
            if int(int(tile / f) * (1 - overlap)) * f != tile - int(tile * overlap):
                raise UserError(f"--vae-tile-size: a tile {axis} of {tile} px does not tile evenly with overlap "
                                f"{overlap:.3g}: use e.g. 240,360 (the default), 96,80 or 480,720")


def save_outputs(args, plan: Plan, job: Job, index: int, samples_z, video):
    from sat_cogvideo import media
    from sat_cogvideo.atomic import atomic_torch_save, atomic_write_text

    out = job.outputs[index]
    if args.only_save_latents:
        latent = (samples_z.permute(0, 2, 1, 3, 4) / float(args.model_config.get("scale_factor", 1.0))).cpu()
        atomic_torch_save(latent, out)
        atomic_write_text(os.path.join(os.path.dirname(out), "text.txt") if not args.output_path
                          else os.path.splitext(out)[0] + ".txt", job.text)
    else:
        media.write_video(out, video, fps=plan.fps)
    return out


def _log(msg: str):
    print(msg, file=sys.stderr, flush=True)


@run_cli
def main(argv: Optional[List[str]] = None) -> List[str]:
    """Run inference; returns the output files written (or kept with --skip-existing) by this rank."""
    from sat_cogvideo.arguments import get_args, initialize

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--mode" not in argv:
        argv = ["--mode", "inference"] + argv
    args = get_args(argv, extra=[add_inference_args])
    args._explicit_size = any(a.startswith("--sampling-image-size") for a in argv)
    args._explicit_channels = any(a.startswith("--latent-channels") for a in argv)
    if args.output_path and not any(a.startswith("--batch-size") for a in argv):
        args.batch_size = 1  # --output-path names one video
    args.mode = "inference"
    if hasattr(args, "deepspeed_config"):
        del args.deepspeed_config
    _set_dtype(args)
    if args.fp16 and args.bf16:
        raise UserError("choose one of fp16 and bf16")
    if args.lora_path and not os.path.isdir(args.lora_path):
        raise UserError(f"--lora-path {args.lora_path!r} is not a folder: give a SAT LoRA checkpoint folder")
    if args.load and not os.path.isdir(args.load):
        raise UserError(f"load {args.load!r} is not a folder: point it at the 'transformer' folder of a SAT download")
    if args.prompt is None and args.input_type == "cli" and args.output_path:
        raise UserError("--output-path needs --prompt (one video); use --output-dir for prompt lists")
    if args.model_config is None:
        raise UserError("no model: section: pass the model config with --base, e.g. "
                        "--base configs/cogvideox_5b.yaml configs/inference.yaml")
    apply_overrides(args)
    # Validation reads prompts through the data-parallel sharding, so start the process group first
    # (cheap; no weights involved).
    user_seed = args.seed
    initialize(args)  # seeds with seed + data-parallel rank, as the original
    args.seed = user_seed  # our per-video seeds do not depend on the rank
    plan = build_plan(args)
    if plan.family is not None and args.fp16 and plan.family.dtype == "bfloat16":
        warnings.warn(f"{plan.family.name} in float16 often gives black or NaN videos: use --dtype bfloat16")
    todo = []
    kept = []
    for job in plan.jobs:
        for i, out in enumerate(job.outputs):
            if args.skip_existing and os.path.exists(out):
                kept.append(out)
            else:
                todo.append((job, i))
    if plan.jobs and not todo:
        _log(f"all {len(kept)} outputs exist; nothing to do")
        return kept
    if not plan.jobs and not (args.input_type == "cli" and args.prompt is None):
        _log("no prompts for this rank; nothing to do")
        return []
    _log(f"{plan.generate_type}: {plan.video_frames} frames ({plan.latent_frames} latent), "
         f"{'%dx%d' % (plan.height, plan.width) if plan.height else 'size from the image'}, "
         f"{len(todo)} video(s) to generate")

    import torch

    device = torch.device(args.device)
    model = build_engine(args)
    placement = Placement(model, device, args.offload)
    written = []
    if args.input_type == "cli" and args.prompt is None:
        # interactive: validate each prompt as it comes
        for text, cnt in read_prompt_lines(args):
            text, media_path = _split_media(text, args.image_or_video_path, "stdin")
            job = Job(text, cnt, media_path if plan.generate_type != "t2v" else None)
            if plan.generate_type != "t2v":
                _check_media(job.media, plan.generate_type, "stdin", plan.video_frames)
            job.outputs = output_files(args, job, int(args.batch_size))
            for i, out in enumerate(job.outputs):
                if os.path.exists(out) and args.skip_existing:
                    continue
                if os.path.exists(out) and not args.overwrite:
                    raise UserError(f"output {out} exists: pass --skip-existing or --overwrite")
                samples_z, video = generate(args, model, plan, job, placement, i)
                written.append(save_outputs(args, plan, job, i, samples_z, video))
                _log(f"wrote {written[-1]}")
        return written
    for job, i in todo:
        t0 = time.time()
        samples_z, video = generate(args, model, plan, job, placement, i)
        written.append(save_outputs(args, plan, job, i, samples_z, video))
        _log(f"wrote {written[-1]} ({time.time() - t0:.1f}s)")
    return kept + written


if __name__ == "__main__":
    main()
