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
from typing import TYPE_CHECKING, Iterator, List, Optional

from sat_cogvideo import rules
from sat_cogvideo.errors import UserError, run_cli
from sat_cogvideo.families import get_generation
from sat_cogvideo.rules import (DTYPE_ALIASES, IMAGE_EXTS, SAMPLERS, max_sampling_steps,  # noqa: F401 (re-exported)
                                read_prompt_file, seed_for)

if TYPE_CHECKING:  # the placement lives with the other offload options
    from sat_cogvideo.accel.offload import Placement


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
    g.add_argument("--dtype", type=str, default=None, choices=sorted(DTYPE_ALIASES),
                   help="model dtype (default: the config's fp16/bf16 flags)")
    g.add_argument("--lora-path", type=str, default=None,
                   help="a SAT LoRA checkpoint folder (with 'latest'); its LoRA factors are merged into the model")
    g.add_argument("--lora-scale", type=float, default=None,
                   help="LoRA scaling (default: lora_alpha / r as SAT's LoraMixin, lora_alpha from the config's "
                        "lora_config or 1, r read from the checkpoint)")
    g.add_argument("--offload", nargs="?", const="model", default=None, choices=["model", "group", "sequential"],
                   help="model (the default when given alone): keep T5, transformer and VAE on the CPU and move each "
                        "to the device only while it works; group / sequential: the transformer by diffusers' group "
                        "offloading (attention/MLP blocks / single modules), see docs/speed.md")
    g.add_argument("--vae-slicing", action="store_true", help="encode/decode one video of a batch at a time")
    g.add_argument("--vae-tiling", action="store_true", help="decode in overlapping spatial tiles (less memory)")
    g.add_argument("--vae-tile-size", type=_tile_size, default=None,
                   help="tile size H,W in pixels for --vae-tiling (default 240,360 as diffusers)")
    g.add_argument("--skip-existing", action="store_true", help="skip prompts whose outputs exist (resume a list)")
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    g.add_argument("--preview", action="store_true", help="also write a PNG strip of frames beside every mp4")
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
    """Video frame counts this model can generate: the released family's, else what the config's position grid
    and the generation's decode allow (``Generation.allowed_video_frames``)."""
    from sat_cogvideo.families import get_generation

    if detected.family is not None:
        return list(detected.family.allowed_num_frames())
    return get_generation(detected.generation).allowed_video_frames(_compressed_frames(model_config))


def video_to_latent_frames(num_frames: int, generation: str) -> int:
    """``Generation.latent_frames`` by generation name (the original's ``sampling_num_frames``)."""
    from sat_cogvideo.families import get_generation

    return get_generation(generation).latent_frames(num_frames)


def latent_to_video_frames(latents: int, generation: str) -> int:
    """``Generation.video_frames`` by generation name."""
    from sat_cogvideo.families import get_generation

    return get_generation(generation).video_frames(latents)


def _model_name(detected) -> str:
    return detected.family.name if detected.family is not None else f"this {detected.generation} model"


def check_num_frames(num_frames: int, model_config, detected, flag: str = "--num-frames") -> int:
    """Video frames -> latent frames, or a UserError naming the allowed values (in video frames)."""
    rules.check_video_frames(flag, num_frames, allowed_video_frames(model_config, detected), _model_name(detected))
    return video_to_latent_frames(num_frames, detected.generation)


def check_latent_frames(latents: int, model_config, detected, flag: str = "--sampling-num-frames") -> int:
    """The original's ``sampling_num_frames`` (latent frames) checked; a UserError names the allowed values in
    latent frames, the unit of the option, with their video frame counts."""
    allowed = sorted(allowed_video_frames(model_config, detected), reverse=True)
    latent_allowed = [video_to_latent_frames(a, detected.generation) for a in allowed]
    if latents not in latent_allowed:
        raise UserError(f"{flag} {latents} is not allowed for {_model_name(detected)}: it counts latent frames, use "
                        f"{' or '.join(map(str, latent_allowed))} (= {' or '.join(map(str, allowed))} video "
                        f"frames), or give --num-frames in video frames")
    return latents


def _latent_frames_flag(args) -> str:
    """How the user gave ``sampling_num_frames``: on the command line, or in a --base YAML."""
    yaml_args = (getattr(args, "config", None) or {}).get("args") or {}
    if "sampling_num_frames" in yaml_args and int(yaml_args["sampling_num_frames"]) == int(args.sampling_num_frames):
        return "sampling_num_frames:"  # as written in the YAML
    return "--sampling-num-frames"


def output_files(args, job: Job, batch_size: int) -> List[str]:
    """The files of one job's batch (:func:`sat_cogvideo.rules.batch_outputs`)."""
    return rules.batch_outputs(args.output_path, args.output_dir, job.cnt, job.text, batch_size,
                               latents=bool(args.only_save_latents))


def read_prompt_lines(args) -> Iterator[tuple]:
    """(text, line counter) for this data-parallel rank: ``--prompt``, the lines of ``input_file`` (txt) or of
    stdin (cli).  Blank lines are skipped but counted, so the counter is the 0-based line number."""
    from sat_cogvideo.distributed import data_parallel_rank_and_size

    rank, world = data_parallel_rank_and_size()
    if args.prompt is not None:
        if rank == 0:
            yield args.prompt.strip(), 0
        return
    if args.input_type == "txt":
        for cnt, text in read_prompt_file(args.input_file)[0]:
            if cnt % world == rank:
                yield text, cnt
    elif args.input_type == "cli":
        cnt = 0
        while True:
            try:
                text = input("Please input English text (Ctrl-D quit): ").strip()
            except EOFError:
                return
            if text:
                yield text, cnt
            cnt += 1
    else:
        raise UserError(f"input_type {args.input_type!r} is not supported: use txt or cli")


def _check_media(path: Optional[str], kind: str, where: str, need_frames: int = 0) -> None:
    """The path rules (:func:`sat_cogvideo.rules.check_media_path`), then the file is opened: an image that
    decodes, a video with at least ``need_frames`` frames."""
    from sat_cogvideo import media

    rules.check_media_path(kind, path, "--image-or-video-path", where)
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


def explicit(args, dest: str) -> bool:
    """Whether option ``dest`` was given on the command line (``get_args`` keeps them in ``args.explicit``)."""
    return dest in getattr(args, "explicit", ())


def guess_generate_type(args, detected, media_path: Optional[str]) -> str:
    """``--generate-type``, else i2v for I2V models, else v2v/i2v/t2v from the media path."""
    if args.generate_type:
        return args.generate_type
    if detected.i2v or args.image2video:
        return "i2v"
    if media_path:
        return "i2v" if media_path.lower().endswith(IMAGE_EXTS) and not media_path.lower().endswith(".gif") else "v2v"
    return "t2v"


def _generate_type(args, detected) -> str:
    """The generation type, checked against the model of the --base config."""
    probe_media = args.image_or_video_path
    if probe_media is None and args.prompt is not None and "@@" in args.prompt:
        probe_media = args.prompt.split("@@")[-1].strip()
    gtype = guess_generate_type(args, detected, probe_media)
    model = detected.family.name if detected.family else f"this {'I2V' if detected.i2v else 'T2V'} model"
    rules.check_generate_type(gtype, detected.i2v, model, "--base",
                              use_t2v="use --generate-type i2v with an image, or a T2V model config (e.g. "
                                      "configs/cogvideox_5b.yaml)",
                              use_i2v="use configs/cogvideox_5b_i2v.yaml or cogvideox1.5_5b_i2v.yaml")
    return gtype


def _check_outputs(args) -> None:
    """The output file or folder: a writable place, the right extension, one of --skip-existing/--overwrite."""
    if args.output_path:
        if not args.only_save_latents:
            rules.check_output_path("--output-path", args.output_path)
        _check_writable(os.path.dirname(args.output_path) or ".", "output folder")
    else:
        _check_writable(args.output_dir, "output_dir")
    if args.skip_existing and args.overwrite:
        raise UserError("give only one of --skip-existing and --overwrite")


def build_plan(args) -> Plan:
    """Check every input against the model config and return what will be generated (no weights loaded)."""
    from sat_cogvideo.families import detect_from_model_config

    mc = args.model_config
    if mc is None:
        raise UserError("no model: section: pass the model config with --base, e.g. "
                        "--base configs/cogvideox_5b.yaml configs/inference.yaml")
    detected = detect_from_model_config(mc)
    gtype = _generate_type(args, detected)
    check_numbers(args, mc)
    if args.num_frames is not None:
        latent_frames = check_num_frames(args.num_frames, mc, detected)
    else:
        latent_frames = check_latent_frames(int(args.sampling_num_frames), mc, detected, _latent_frames_flag(args))
    video_frames = latent_to_video_frames(latent_frames, detected.generation)
    height, width = check_image_size(args, mc, detected, gtype)
    if explicit(args, "latent_channels") and int(args.latent_channels) != latent_channels(args):
        raise UserError(f"latent_channels {args.latent_channels} does not match the model's out_channels "
                        f"{latent_channels(args)}")
    _check_outputs(args)
    jobs = plan_jobs(args, gtype, video_frames, height is None)
    return Plan(gtype, detected.generation, detected.family, latent_frames, video_frames, height, width,
                int(args.sampling_fps), jobs)


def check_numbers(args, model_config) -> None:
    """Ranges of the numeric options, checked before any weight is loaded."""
    if args.num_steps is not None:
        rules.check_num_steps("--num-steps", args.num_steps, max_sampling_steps(model_config))
    if args.guidance_scale is not None:
        rules.check_guidance_scale("--guidance-scale", args.guidance_scale)
    rules.check_strength("--strength", args.strength)
    if args.lora_scale is not None:
        rules.check_finite("--lora-scale", args.lora_scale)
    rules.check_at_least("--batch-size", args.batch_size, 1)
    rules.check_at_least("--sampling-fps", args.sampling_fps, 1)
    if args.vae_tiling:
        _check_tile_size(args.vae_tile_size, model_config)


def _note_blank_lines(path: str) -> None:
    from sat_cogvideo.distributed import data_parallel_rank_and_size

    blank = read_prompt_file(path)[1]
    if blank and data_parallel_rank_and_size()[0] == 0:
        _log(f"note: skipping {blank} blank line{'s' if blank > 1 else ''} of {path} (the other lines keep their "
             f"numbers in output names and seeds)")


def check_image_size(args, model_config, detected, gtype: str) -> tuple:
    """The video size (pixels) to generate, or a UserError naming a size that is accepted.

    1.0 models only work at their configured size (``latent_height`` x ``latent_width`` times 8; 480x720 for the
    released ones): an explicit ``--sampling-image-size`` must be that size, and a different YAML value is ignored
    with a note, as the original ignores it.  1.5 models take any multiple of 16 within the RoPE grid;
    1.5 I2V takes the size from the image unless it is given.  Returns ``(None, None)`` for "from the image"."""
    lat_h, lat_w = _max_latent_hw(model_config)
    most = (8 * lat_h, 8 * lat_w)
    size = tuple(int(v) for v in args.sampling_image_size)
    given = explicit(args, "sampling_image_size")
    flag = "--sampling-image-size" if given else "sampling_image_size:"
    if get_generation(detected.generation).fixed_size:
        if given:
            rules.check_fixed_size(flag, size, most, _model_name(detected))
        elif size != most and "sampling_image_size" in ((getattr(args, "config", None) or {}).get("args") or {}):
            _log(f"note: {flag} {size[0]}x{size[1]} of the --base YAML is ignored: {_model_name(detected)} "
                 f"generates {most[0]}x{most[1]}")
        return most
    if gtype == "i2v" and not given:
        return None, None  # from the image
    return rules.check_free_size(flag, size, most)


def _plan_job(args, text: str, cnt: int, where: str, gtype: str, video_frames: int, size_from_image: bool) -> Job:
    """One prompt line checked: its text and media, and its output files."""
    text, media_path = rules.split_prompt(text, args.image_or_video_path, where)
    if gtype == "t2v":
        media_path = None
    else:
        _check_media(media_path, gtype, where, need_frames=video_frames)
        if gtype == "i2v" and size_from_image:
            from sat_cogvideo import media

            i2v15_pixel_size(media.read_image(media_path).size, args.model_config, media_path)
    job = Job(text, cnt, media_path)
    job.outputs = output_files(args, job, int(args.batch_size))
    return job


def plan_jobs(args, gtype: str, video_frames: int, size_from_image: bool) -> List[Job]:
    """The prompts of ``--prompt`` or the txt file for this rank, each checked (text, media, outputs); empty for
    stdin, whose prompts are checked as they come."""
    if args.prompt is None and args.input_type == "txt" and not os.path.isfile(args.input_file):
        raise UserError(f"input_file {args.input_file!r} does not exist: give a prompt file (one prompt per line) "
                        f"or --prompt")
    if args.prompt is not None:
        rules.split_prompt(args.prompt.strip(), None, "--prompt")  # an empty prompt fails on every rank
    elif args.input_type == "txt":
        _note_blank_lines(args.input_file)
    if args.prompt is None and args.input_type != "txt":
        return []
    jobs = [_plan_job(args, text, cnt, "--prompt" if args.prompt is not None else f"{args.input_file} line {cnt + 1}",
                      gtype, video_frames, size_from_image) for text, cnt in read_prompt_lines(args)]
    if args.output_path and len(jobs) > 1:
        raise UserError(f"--output-path writes one video but {args.input_file} has {len(jobs)} prompts: "
                        f"use --output-dir instead")
    for job in jobs:
        for out in job.outputs:
            if os.path.exists(out) and not (args.skip_existing or args.overwrite):
                raise UserError(f"output {out} exists: pass --skip-existing to keep it or --overwrite to "
                                f"replace it")
    return jobs


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
        d = DTYPE_ALIASES[args.dtype]
        args.fp16, args.bf16 = d == "float16", d == "bfloat16"


def build_engine(args):
    """Engine from ``args.model_config``, cast to the model dtype (DiT, T5 and VAE alike, as SAT's
    ``get_model``), transformer weights loaded from ``args.load``."""
    from sat_cogvideo.diffusion_video import SATVideoDiffusionEngine

    model = SATVideoDiffusionEngine(args)
    if args.fp16:
        model = model.half()
    elif args.bf16:
        model = model.bfloat16()
    if getattr(args, "model_source", None) is not None:
        args.model_source.load_into(model)  # a diffusers pipeline: DiT and VAE streamed from its files
    elif args.load:
        load_transformer_checkpoint(model, args.load)
    if args.lora_path:
        merge_lora_checkpoint(model, args.lora_path, args.lora_scale, args.model_config)
    apply_vae_memory_options(model, args)
    model.eval()
    return model


def read_dit_checkpoint(folder: str, what: str = "checkpoint") -> dict:
    """The DiT weights (``model.diffusion_model.*``, prefix removed) of a SAT checkpoint folder, loaded weights-only
    (pickled objects only with ``--trust-pickle``); T5/VAE keys of finetune checkpoints are left out."""
    from sat_cogvideo import checkpoint as ckpt

    sd = ckpt.read_state_dict(ckpt.load_checkpoint_file(folder))
    dit = {k[len(ckpt.SAT_PREFIX):]: v for k, v in sd.items() if k.startswith(ckpt.SAT_PREFIX)}
    if not dit:
        raise UserError(f"{what} {folder} has no model.diffusion_model.* keys: is it a CogVideoX SAT transformer "
                        f"folder?")
    return dit


def preflight_weights(args) -> None:
    """Check every weight file the run will read before any is loaded: the transformer checkpoint (memory-mapped,
    weights-only, its model against the config), the LoRA run, ``3d-vae.pt`` and the T5 folder."""
    from omegaconf import OmegaConf

    from sat_cogvideo import checkpoint as ckpt
    from sat_cogvideo.families import check_checkpoint_fits_config, detect_from_model_config, detect_from_state_dict
    from sat_cogvideo.vae_modules import read_vae_checkpoint
    from sgm.modules.encoders.modules import check_t5_folder

    mc = args.model_config
    if getattr(args, "model_source", None) is not None:
        args.model_source.preflight(mc)
    elif args.load:
        file = ckpt.checkpoint_file(args.load)
        dit = ckpt.read_state_dict(ckpt.load_checkpoint_file(file), prefix=ckpt.SAT_PREFIX)
        check_checkpoint_fits_config(detect_from_state_dict(dit), detect_from_model_config(mc), f"checkpoint {file}")
    if args.lora_path:
        ckpt.load_checkpoint_file(args.lora_path)
    vae = OmegaConf.select(mc, "first_stage_config.params.ckpt_path")
    if vae:
        read_vae_checkpoint(vae)
    for emb in OmegaConf.select(mc, "conditioner_config.params.emb_models") or []:
        if str(emb.get("target", "")).endswith("FrozenT5Embedder"):
            params = emb.get("params") or {}
            check_t5_folder(params.get("model_dir", ""), params.get("tokenizer_dir"))


def load_transformer_checkpoint(model, folder: str) -> None:
    """Load the DiT of a SAT checkpoint into the engine with strict key/shape checks; the RoPE tables, the unused
    position table and the 2B sincos table may be absent or extra (``DiffusionTransformer.known_unused_keys``)."""
    from sat_cogvideo import checkpoint as ckpt

    dit = model.model.diffusion_model
    known = dit.known_unused_keys() if hasattr(dit, "known_unused_keys") else set()
    # computed tables (RoPE, 2B sincos) keep their computed values even when a checkpoint stores them
    dit_sd = {k: v for k, v in read_dit_checkpoint(folder).items() if k not in known}
    ckpt.load_state_dict_strict(dit, dit_sd, known_unused=known, source=f"checkpoint {folder}")


def lora_scale(lora, model_config, folder: str) -> float:
    """SAT's LoraMixin scaling ``lora_alpha / r``: ``lora_alpha`` from the config's ``lora_config``, else (a plain
    ``--base``) from the run's ``training_config.yaml`` (the alpha it was trained with), else 1; ``r`` from the
    factors (checked against that ``r``)."""
    from sat_cogvideo.convert.lora import lora_params_from_run, lora_rank

    params = ((_net_params(model_config).get("modules") or {}).get("lora_config") or {}).get("params")
    params = params if params is not None else lora_params_from_run(folder)
    r = lora_rank(lora)
    if params.get("r") is not None and int(params["r"]) != r:
        raise UserError(f"--lora-path {folder} has rank {r} but lora_config says r: {params['r']}")
    return float(params.get("lora_alpha", 1.0)) / r


def merge_lora_checkpoint(model, folder: str, scale: Optional[float], model_config) -> None:
    """Merge the LoRA factors of a SAT LoRA run into the plain DiT weights, ``W += scale · B @ A`` per projection,
    through :func:`sat_cogvideo.convert.lora.merge_lora_state_dict`."""
    import torch

    from sat_cogvideo.convert.lora import find_lora_layers, lora_rank, merge_lora_state_dict, split_lora_state_dict

    _, lora = split_lora_state_dict(read_dit_checkpoint(folder, "--lora-path"))
    if not lora:
        raise UserError(f"--lora-path {folder} has no LoRA factors (matrix_A/matrix_B keys)")
    scale = lora_scale(lora, model_config, folder) if scale is None else scale
    own = dict(model.model.diffusion_model.named_parameters())
    weights = [layer + ".weight" for layer in find_lora_layers(lora)]
    foreign = [w for w in weights if w not in own]
    if foreign:
        raise UserError(f"--lora-path {folder}: {foreign[0][:-7]} is not a layer of this model (wrong --base?)")
    with torch.no_grad():
        merged = merge_lora_state_dict(lora, lora_alpha=scale * lora_rank(lora), base={w: own[w] for w in weights})
        for key in weights:
            own[key].copy_(merged[key])


# --------------------------------------------------------------------------------------------------
# generation


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
    """One video (or latent) for one job; returns the sampled latents ``[1, T, C, h, w]`` and the video.
    The original's sampling loop body (``sample_video.py`` of each generation; ``families.Generation`` holds what
    the two differ in)."""
    import torch

    torch.manual_seed(seed_for(args.seed, job.cnt, index))
    with placement.use("conditioner"):
        c, uc = conditionings(model, job.text, placement.device)
    H, W = plan.height, plan.width
    if plan.generate_type == "i2v" and H is None:  # 1.5 I2V: the size follows the image
        from sat_cogvideo import media

        H, W = i2v15_pixel_size(media.read_image(job.media).size, args.model_config, job.media)
    extra = _i2v_conditioning(model, plan, job, placement, c, uc, H, W) if plan.generate_type == "i2v" else {}
    with placement.use("model"):
        if plan.generate_type == "v2v":
            samples_z = _sample_v2v(args, model, plan, job, placement, c, uc, H, W)
        else:
            shape = (plan.latent_frames, latent_channels(args), H // 8, W // 8)
            samples_z = model.sample(c, uc=uc, batch_size=1, shape=shape, **extra)
    if args.only_save_latents:
        return samples_z, None
    with placement.use("first_stage_model"):
        video = model.decode_video(samples_z)
    return samples_z, video[0].cpu()


def _i2v_conditioning(model, plan: Plan, job: Job, placement: Placement, c, uc, H: int, W: int) -> dict:
    """Image-to-video: the encoded image as latent frame 0 of ``c``/``uc["concat"]`` (zeros after it); returns
    the sampler's extra inputs (1.5: ``ofs``).  Maps to the original's ``image2video`` branch."""
    import torch
    from sat_cogvideo import media
    from sat_cogvideo.families import get_generation

    gen, device = get_generation(plan.generation), placement.device
    image = media.load_i2v_image(job.media, gen, H, W)
    with placement.use("first_stage_model"):
        z = model.encode_pixels(image.to(device=device, dtype=model.dtype))
    if gen.i2v_raw_latent:
        z = z / model.scale_factor  # the 1.5 code conditions on the raw VAE latent
    z = z.permute(0, 2, 1, 3, 4).contiguous()  # [1, 1, 16, h, w]
    pad = torch.zeros((1, plan.latent_frames - 1) + tuple(z.shape[2:]), dtype=z.dtype, device=z.device)
    c["concat"] = uc["concat"] = torch.cat([z, pad], dim=1)
    return {} if gen.i2v_ofs is None else {"ofs": torch.tensor([gen.i2v_ofs], device=device)}


def _sample_v2v(args, model, plan: Plan, job: Job, placement: Placement, c, uc, H: int, W: int):
    """Video-to-video (SDEdit): encode the input video and denoise it from the ``--strength`` step; the 1.5
    padding latent frame (a copy of the first) goes in front, dropped again at decode."""
    import torch
    from sat_cogvideo import media
    from sat_cogvideo.families import get_generation

    video = media.load_v2v_video(job.media, plan.video_frames, H, W)
    with placement.use("first_stage_model"):
        z0 = model.encode_pixels(video.to(device=placement.device, dtype=model.dtype))
    z0 = z0.permute(0, 2, 1, 3, 4).contiguous()  # [1, t, 16, h, w]
    pad = min(get_generation(plan.generation).padding_latents, plan.latent_frames - z0.shape[1])
    if pad > 0:
        z0 = torch.cat([z0[:, :pad], z0], dim=1)
    return model.sample_from(z0, c, uc=uc, strength=args.strength)


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
        problem = _tile_problem((vae.tile_sample_min_height, vae.tile_sample_min_width),
                                (vae.tile_overlap_factor_height, vae.tile_overlap_factor_width),
                                int(getattr(vae, "spatial_compression", 8)))
        if problem:
            raise UserError(problem)


def _tile_problem(tile_hw, overlap_hw, f: int) -> Optional[str]:
    """Why a VAE tile size does not work, or None.  diffusers' tiling (reproduced) only tiles the output exactly
    when the latent stride times the spatial compression ``f`` equals the tile minus its blend width."""
    for tile, overlap, axis in zip(tile_hw, overlap_hw, ("height", "width")):
        if int(int(tile / f) * (1 - overlap)) * f != tile - int(tile * overlap):
            return (f"--vae-tile-size: a tile {axis} of {tile} px does not tile evenly with overlap {overlap:.3g}: "
                    f"use e.g. 240,360 (the default), 96,80 or 480,720")
    return None


def _check_tile_size(size, model_config) -> None:
    """``--vae-tile-size`` against the VAE's default overlaps and the config's spatial compression, before
    the VAE is built (:func:`apply_vae_memory_options` checks the built VAE again)."""
    from omegaconf import OmegaConf

    from sat_cogvideo.vae_modules.tiling import VAEMemoryFeatures as vae  # class defaults

    key = "first_stage_config.params.encoder_config.params.ch_mult"
    ch_mult = OmegaConf.select(OmegaConf.create(model_config), key)
    f = 2 ** (len(ch_mult) - 1) if ch_mult else 8
    size = size or (vae.tile_sample_min_height, vae.tile_sample_min_width)
    problem = _tile_problem(size, (vae.tile_overlap_factor_height, vae.tile_overlap_factor_width), f)
    if problem:
        raise UserError(problem)


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
        if getattr(args, "preview", False):
            media.write_preview(os.path.splitext(out)[0] + ".png", video)
    return out


def _log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: List[str]):
    """The inference arguments, with the checks that need no model config."""
    from sat_cogvideo.arguments import get_args

    if "--mode" not in argv:
        argv = ["--mode", "inference"] + argv
    from sat_cogvideo.accel.options import add_accel_args, check_accel_args

    from sat_cogvideo.parallel import add_parallel_args

    args = get_args(argv, extra=[add_inference_args, add_accel_args, add_parallel_args])
    if args.output_path and not explicit(args, "batch_size"):
        args.batch_size = 1  # --output-path names one video
    args.mode = "inference"
    if hasattr(args, "deepspeed_config"):
        del args.deepspeed_config
    _set_dtype(args)
    if args.fp16 and args.bf16:
        raise UserError("choose one of fp16 and bf16")
    if args.prompt is None and args.input_type == "cli" and args.output_path:
        raise UserError("--output-path needs --prompt (one video); use --output-dir for prompt lists")
    check_accel_args(args)  # --compile / --weights-dtype / --offload / --attention / --cache
    from sat_cogvideo.convert.diffusers_source import use_pipeline_load

    use_pipeline_load(args)  # --load <diffusers folder or Hub id>: its SAT config unless --base gives one
    if args.model_config is None:
        raise UserError("no model: section: pass the model config with --base, e.g. "
                        "--base configs/cogvideox_5b.yaml configs/inference.yaml")
    apply_overrides(args)
    return args


def prepare(args) -> Plan:
    """Start the process group, check every input and every weight file; nothing is loaded yet."""
    from sat_cogvideo.arguments import initialize

    # Validation reads prompts through the data-parallel sharding, so start the process group first
    # (cheap; no weights involved).
    user_seed = args.seed
    initialize(args)  # seeds with seed + data-parallel rank, as the original
    args.seed = user_seed  # our per-video seeds do not depend on the rank
    from sat_cogvideo import parallel

    parallel.configure(args)  # --sp-size/--cfg-parallel groups, before the prompts are shared out
    plan = build_plan(args)
    preflight_weights(args)
    if plan.family is not None and args.fp16 and plan.family.dtype == "bfloat16":
        warnings.warn(f"{plan.family.name} in float16 often gives black or NaN videos: use --dtype bfloat16")
    return plan


@run_cli
def main(argv: Optional[List[str]] = None) -> List[str]:
    """Run inference; returns the output files written (or kept with --skip-existing) by this rank."""
    from sat_cogvideo.checkpoint import trusting

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    with trusting(args.trust_pickle):
        return run(args, prepare(args))


def run(args, plan: Plan) -> List[str]:
    """Generate every video of the plan; returns the outputs written or kept."""
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
    from sat_cogvideo.accel import offload, options as accel_options

    accel_options.apply(model, args)  # --weights-dtype, --attention, --compile, --cache (nothing when off)
    from sat_cogvideo import parallel

    parallel.install_engine(model, args, plan)  # --sp-size, --cfg-parallel, --parallel-vae (nothing when off)
    placement = offload.make_placement(model, device, args.offload)
    written = []
    if args.input_type == "cli" and args.prompt is None:
        # interactive: validate each prompt as it comes
        for text, cnt in read_prompt_lines(args):
            text, media_path = rules.split_prompt(text, args.image_or_video_path, "stdin")
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
        if parallel.writes_outputs():  # the first rank of the video's group (all ranks without --sp-size)
            written.append(save_outputs(args, plan, job, i, samples_z, video))
            _log(f"wrote {written[-1]} ({time.time() - t0:.1f}s)")
    return kept + written


if __name__ == "__main__":
    main()
