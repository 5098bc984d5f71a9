"""The rules of the cluster guide, in Python: from a SAT model folder and a few variables to a
``sample_video`` command line.

``scripts/slurm_inference.sh`` exports its variables (``MODEL_PATH``, ``FAMILY``, ``GENERATE_TYPE``,
``NUM_FRAMES``, ``FPS``, ``DTYPE``, ``IMAGE_OR_VIDEO_PATH``, ...) and runs ``python -m sat_cogvideo.launch``,
which, before anything is computed:

1. finds the parts of the model folder: ``transformer/`` (with ``latest``), ``vae/3d-vae.pt`` and a T5 folder
   (``t5-v1_1-xxl/``, ``t5/`` ...);
2. recognises the model family from the transformer checkpoint's tensor shapes
   (:func:`sat_cogvideo.families.detect_from_state_dict`; the file is memory-mapped, nothing is copied), or
   takes it from ``FAMILY`` (which must then agree with the checkpoint);
3. applies the guide's rules: unset ``NUM_FRAMES``/``FPS``/``DTYPE`` take the family's values (1.0: 49 frames,
   8 fps; 1.5: 81 frames, 16 fps; 2B float16, 5B bfloat16), an I2V model forces i2v and needs an image, v2v
   needs a video and a text-to-video model, ...; every violation is a :class:`UserError` (one line, exit 2);
4. writes a per-job YAML (the family's model config and inference settings, pointed at the folder's
   transformer, VAE and T5) and returns the ``sample_video`` arguments.

Nothing here loads weights or starts torch.distributed; the multi-process launch (srun / torchrun) is the
script's business, the prompt sharding across ranks is ``sample_video``'s.

Tiny or custom-size checkpoints (not one of the five released sizes) get the matching ``configs/tiny/`` file
when their hidden size is the tiny one, otherwise ``MODEL_CONFIG`` must name their model YAML; their default
frame count is the one of their config.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass, field
from typing import List, Mapping, Optional, Tuple

from sat_cogvideo import rules
from sat_cogvideo.errors import UserError, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T5_FOLDER_NAMES = ("t5-v1_1-xxl", "t5", "text_encoder", "google/t5-v1_1-xxl")

# The script's variables that this module reads (the environment interface of slurm_inference.sh).
VARIABLES = ("MODEL_PATH", "REVISION", "FAMILY", "MODEL_CONFIG", "T5_PATH", "VAE_PATH", "LORA_PATH", "PROMPT", "PROMPT_FILE",
             "PROMPT_LINE", "OUTPUT_PATH", "OUTPUT_DIR", "IMAGE_OR_VIDEO_PATH", "GENERATE_TYPE", "NUM_FRAMES",
             "NUM_STEPS", "GUIDANCE_SCALE", "DTYPE", "FPS", "SEED", "SAMPLER", "STRENGTH", "DEVICE", "JOB_ID",
             "JOB_YAML", "OVERWRITE")


# --------------------------------------------------------------------------------------------------------------
# the model folder


@dataclass(frozen=True)
class ModelFolder:
    """Where the three parts of a SAT model download are (of a diffusers pipeline: ``transformer`` is the
    pipeline folder, given to ``--load``, ``checkpoint`` its ``transformer/``, ``vae`` its ``vae/``, ``t5`` its
    ``text_encoder/``)."""
    root: str
    transformer: str   # folder with ``latest`` and ``<tag>/mp_rank_00_model_states.pt``
    checkpoint: str    # the ``mp_rank_00_model_states.pt`` file ``latest`` names
    vae: str           # ``3d-vae.pt``
    t5: str            # T5 folder (``config.json`` + weights + ``spiece.model``)


def _transformer_file(transformer: str, what: str) -> str:
    """The ``mp_rank_00_model_states.pt`` that ``<transformer>/latest`` names (:func:`checkpoint.checkpoint_file`)."""
    from sat_cogvideo.checkpoint import checkpoint_file

    if not os.path.isfile(os.path.join(transformer, "latest")):
        raise UserError(f"{what} {transformer!r} has no 'latest' file: point it at a SAT checkpoint folder "
                        f"(transformer/latest and transformer/<iteration>/mp_rank_00_model_states.pt)")
    return str(checkpoint_file(transformer))


def find_model_folder(model_path: str, t5_path: str = "", vae_path: str = "", revision: str = "") -> ModelFolder:
    """The parts of a SAT model folder: ``MODEL_PATH`` is the folder holding ``transformer/``, ``vae/`` and the T5
    folder, or the ``transformer`` folder itself (the other two are then looked for next to it); or a diffusers
    pipeline folder or Hugging Face id (``REVISION``: a branch, tag or commit of the id)."""
    if not model_path:
        raise UserError("MODEL_PATH is empty: set it to a CogVideoX SAT folder (transformer/, vae/3d-vae.pt, "
                        "t5-v1_1-xxl/)")
    from sat_cogvideo import hub

    if hub.is_pipeline_path(model_path):  # a diffusers pipeline folder or a Hugging Face id (resolved, checked)
        pipe = hub.resolve(os.path.expanduser(model_path), revision or None, what="MODEL_PATH")
        return ModelFolder(pipe.root, pipe.root, pipe.part("transformer"), pipe.part("vae"), pipe.part("text_encoder"))
    if revision:
        raise UserError(f"REVISION {revision} applies to Hugging Face ids, but MODEL_PATH {model_path} is a SAT "
                        f"folder: unset REVISION")
    from sat_cogvideo.checkpoint import not_sat_reason

    path = os.path.abspath(os.path.expanduser(model_path))
    reason = not_sat_reason(model_path) or not_sat_reason(os.path.join(path, "transformer"))
    if reason:
        raise UserError(f"MODEL_PATH: {reason}")
    if not os.path.exists(path):
        raise UserError(f"MODEL_PATH {model_path!r} does not exist: download a CogVideoX SAT checkpoint "
                        f"(transformer/, vae/3d-vae.pt, t5-v1_1-xxl/) to a disk the compute nodes see and set "
                        f"MODEL_PATH to it")
    if not os.path.isdir(path):
        raise UserError(f"MODEL_PATH {model_path!r} is a file: give the SAT model folder that holds transformer/, "
                        f"vae/ and the T5 folder")
    if os.path.isfile(os.path.join(path, "latest")):
        transformer, root = path, os.path.dirname(path)
    else:
        transformer, root = os.path.join(path, "transformer"), path
        if not os.path.isdir(transformer):
            raise UserError(f"MODEL_PATH {model_path!r} has no transformer/ folder: the SAT download has "
                            f"transformer/, vae/3d-vae.pt and t5-v1_1-xxl/ (diffusers folders are not SAT folders)")
    checkpoint = _transformer_file(transformer, "transformer folder")

    if vae_path:
        vae = os.path.abspath(os.path.expanduser(vae_path))
        if not os.path.isfile(vae):
            raise UserError(f"VAE_PATH {vae_path!r} does not exist: give the 3d-vae.pt file")
    else:
        vae = os.path.join(root, "vae", "3d-vae.pt")
        if not os.path.isfile(vae):
            raise UserError(f"VAE weights {vae} are missing: put 3d-vae.pt in {os.path.join(root, 'vae')} "
                            f"or set VAE_PATH")

    if t5_path:
        t5 = os.path.abspath(os.path.expanduser(t5_path))
        if not os.path.isfile(os.path.join(t5, "config.json")):
            raise UserError(f"T5_PATH {t5_path!r} is not a T5 folder (no config.json): give the t5-v1_1-xxl folder")
    else:
        candidates = [os.path.join(root, name) for name in T5_FOLDER_NAMES]
        found = [c for c in candidates if os.path.isfile(os.path.join(c, "config.json"))]
        if not found:
            raise UserError(f"no T5 folder in {root}: expected one of {', '.join(T5_FOLDER_NAMES)} with config.json "
                            f"(or set T5_PATH to the t5-v1_1-xxl folder)")
        t5 = found[0]
    return ModelFolder(root, transformer, checkpoint, vae, t5)


def read_checkpoint_state(path: str) -> Mapping:
    """The transformer state dict of a ``mp_rank_00_model_states.pt``, memory-mapped (cheap even at 11 GB), through
    the project's one safe loader (``SAT_COGVIDEO_TRUST_PICKLE=1`` allows pickled objects)."""
    from sat_cogvideo.checkpoint import load_checkpoint_file, read_state_dict

    if os.path.isdir(path):  # a diffusers pipeline's transformer/: its SAT keys and shapes, from the headers
        from sat_cogvideo.convert.diffusers_source import sat_meta_of

        return sat_meta_of(os.path.dirname(path))
    return read_state_dict(load_checkpoint_file(path))


# --------------------------------------------------------------------------------------------------------------
# the family profile: which config, which defaults, which rules


@dataclass(frozen=True)
class Profile:
    """What the guide's rules need to know about a model."""
    name: str                  # e.g. "cogvideox-5b" or "tiny cogvideox-5b"
    rules: object              # the released families.Family whose rules apply
    released: bool             # the checkpoint has a released model's sizes
    generation: str
    i2v: bool
    num_frames: int            # default video frames
    fps: int
    dtype: str
    allowed_frames: Tuple[int, ...]
    config: str                # model YAML
    inference_config: str      # YAML with the args: section
    source: str                # "checkpoint" or "FAMILY"


def _same_kind(fam, detected) -> bool:
    return fam.generation == detected.generation and fam.i2v == detected.i2v and \
        (fam.generation != "1.0" or fam.i2v or fam.rotary == detected.rotary)


def _rules_family(detected):
    from sat_cogvideo.families import FAMILIES

    for fam in FAMILIES.values():
        if _same_kind(fam, detected):
            return fam
    raise UserError(f"the checkpoint (generation {detected.generation}, in_channels {detected.in_channels}) matches "
                    f"no CogVideoX family: set FAMILY and MODEL_CONFIG")


def _config_path(path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(ROOT, path)


def _load_yaml(path: str):
    from omegaconf import OmegaConf

    if not os.path.isfile(path):
        raise UserError(f"config file {path} does not exist (MODEL_CONFIG takes a model YAML, e.g. "
                        f"configs/cogvideox_5b.yaml)")
    try:
        return OmegaConf.load(path)
    except Exception as err:
        raise UserError(f"{path}: cannot read config: {str(err).splitlines()[0]}") from None


def _model_config_file(fam, detected, model_config: str) -> str:
    """MODEL_CONFIG, else the family's config (its LoRA variant for LoRA checkpoints), else the tiny one."""
    if model_config:
        return _config_path(model_config)
    if detected.family is not None:
        config = _config_path(fam.config)
        if detected.lora:  # a LoRA finetune checkpoint: load it with the LoRA variant of the config
            config = config[:-len(".yaml")] + "_lora.yaml"
        return config
    return os.path.join(ROOT, "configs", "tiny", os.path.basename(fam.config))


def resolve_profile(detected, family: str = "", model_config: str = "") -> Profile:
    """The profile of a detected checkpoint; ``family`` (the ``FAMILY`` variable) must agree with it."""
    from sat_cogvideo.families import get_family
    from sat_cogvideo.families import detect_from_model_config

    source = "checkpoint"
    if family:
        fam = get_family(family)
        if detected.family is not None and detected.family is not fam:
            raise UserError(f"FAMILY={family} but the checkpoint is {detected.family.name}: unset FAMILY or fix "
                            f"MODEL_PATH")
        if detected.family is None and not _same_kind(fam, detected):
            size = "tiny" if detected.hidden_size < 1920 else f"hidden-size-{detected.hidden_size}"
            raise UserError(f"FAMILY={family} but the checkpoint is a {size} {_rules_family(detected).name} model "
                            f"(in_channels {detected.in_channels}): unset FAMILY or fix MODEL_PATH")
        source = "FAMILY"
    else:
        fam = detected.family or _rules_family(detected)
    released = detected.family is not None
    config = _model_config_file(fam, detected, model_config)
    mc = _load_yaml(config).get("model")
    if mc is None:
        raise UserError(f"{config} has no model: section: MODEL_CONFIG must be a model YAML")
    from_config = detect_from_model_config(mc)
    if from_config.hidden_size != detected.hidden_size or from_config.in_channels != detected.in_channels:
        hint = "set MODEL_CONFIG to the model YAML it was trained with" if not model_config else "fix MODEL_CONFIG"
        raise UserError(f"the checkpoint (hidden size {detected.hidden_size}, in_channels {detected.in_channels}) does "
                        f"not fit {config} (hidden size {from_config.hidden_size}, in_channels "
                        f"{from_config.in_channels}): {hint}")

    if released:
        name, num_frames, allowed = fam.name, fam.num_frames, tuple(fam.allowed_num_frames())
        inference = _config_path(fam.inference_config)
    else:
        from sat_cogvideo.sample_video import allowed_video_frames

        allowed = tuple(allowed_video_frames(mc, from_config))
        net = mc["network_config"]["params"]
        num_frames = int(net.get("num_frames", allowed[0] if allowed else 1))
        if allowed and num_frames not in allowed:
            num_frames = max(allowed)
        name = f"{'tiny' if config.startswith(os.path.join(ROOT, 'configs', 'tiny')) else 'custom'} {fam.name}"
        inference = os.path.join(ROOT, "configs", "tiny", "inference.yaml") if "tiny" in name \
            else _config_path(fam.inference_config)
    return Profile(name, fam, released, detected.generation, detected.i2v, num_frames, fam.fps, fam.dtype,
                   allowed, config, inference, source)


# --------------------------------------------------------------------------------------------------------------
# the rules


@dataclass
class Launch:
    """The resolved job: every value the guide's rules decide, the job YAML and the sample_video arguments."""
    folder: ModelFolder
    profile: Profile
    generate_type: str
    num_frames: int
    fps: int
    dtype: str
    seed: int
    media: str
    prompt: Optional[str]
    prompt_file: Optional[str]
    prompt_line: Optional[int]
    output_path: Optional[str]
    output_dir: Optional[str]
    job_yaml: str
    argv: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def outputs(self) -> List[str]:
        return [self.output_path] if self.output_path else []

    def summary(self) -> str:
        what = (f"prompt file {self.prompt_file}" + (f" line {self.prompt_line + 1}" if self.prompt_line is not None
                                                      else "")) if self.prompt_file else "one prompt"
        out = self.output_path or self.output_dir
        return (f"model {self.profile.name} (from {self.profile.source}) in {self.folder.root}; {self.generate_type}, "
                f"{self.num_frames} frames, {self.fps} fps, {self.dtype}, seed {self.seed}; {what} -> {out}")


def _get(env: Mapping, key: str) -> str:
    value = env.get(key)
    return "" if value is None else str(value).strip()


def _int(env, key) -> Optional[int]:
    text = _get(env, key)
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{key}={text!r} is not an integer") from None


def _float(env, key) -> Optional[float]:
    text = _get(env, key)
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise UserError(f"{key}={text!r} is not a number") from None


def _flag(env, key) -> bool:
    return _get(env, key).lower() in ("1", "true", "yes", "on")


def prompt_lines(path: str) -> List[Tuple[int, str]]:
    """(0-based line counter, stripped text) of every non-blank line, read as sample_video reads them
    (:func:`sat_cogvideo.rules.read_prompt_file`); an empty prompt before '@@' is a UserError."""
    if not os.path.isfile(path):
        state = "is a folder" if os.path.isdir(path) else "does not exist"
        raise UserError(f"PROMPT_FILE {path!r} {state}: give a text file with one prompt per line")
    lines = rules.read_prompt_file(path)[0]
    for cnt, text in lines:
        rules.split_prompt(text, None, f"{path} line {cnt + 1}")
    return lines


def _generate_type(env, profile: Profile, notes: List[str]) -> str:
    """GENERATE_TYPE (default: the model's); an I2V model turns t2v into i2v."""
    gtype = rules.check_choice("GENERATE_TYPE", _get(env, "GENERATE_TYPE").lower() or
                               ("i2v" if profile.i2v else "t2v"), rules.GENERATE_TYPES)
    if profile.i2v and gtype == "t2v":
        notes.append(f"{profile.name} is an image-to-video model: GENERATE_TYPE t2v -> i2v")
        gtype = "i2v"
    rules.check_generate_type(gtype, profile.i2v, profile.name, "MODEL_PATH",
                              use_t2v="use a T2V model (CogVideoX-2b/-5b/1.5-5b) or GENERATE_TYPE=i2v with an image",
                              use_i2v="use a CogVideoX-5b-I2V or CogVideoX1.5-5b-I2V folder, or GENERATE_TYPE=t2v/v2v")
    return gtype


def _prompts(env, gtype: str):
    """(prompt, prompt_file, prompt_line, media, every line names its media) from PROMPT, PROMPT_FILE,
    PROMPT_LINE and IMAGE_OR_VIDEO_PATH."""
    prompt, prompt_file, prompt_line = _get(env, "PROMPT") or None, _get(env, "PROMPT_FILE") or None, None
    media, line_media = _get(env, "IMAGE_OR_VIDEO_PATH"), False
    if prompt_file:
        lines = prompt_lines(prompt_file)
        if not lines:
            raise UserError(f"PROMPT_FILE {prompt_file!r} has no prompts (all lines are empty)")
        line_no = _int(env, "PROMPT_LINE")
        if line_no is not None:  # one line of the file (an array element): becomes a single prompt
            rules.check_at_least("PROMPT_LINE", line_no, 0)
            texts = dict(lines)
            if line_no not in texts:
                raise UserError(f"PROMPT_LINE={line_no} (0-based) is not a non-empty line of {prompt_file} "
                                f"(it has {len(lines)} prompts on lines {lines[0][0]}..{lines[-1][0]})")
            prompt, prompt_line = texts[line_no], line_no
        elif gtype != "t2v":
            line_media = all("@@" in text for _, text in lines)
    if prompt is not None and "@@" in prompt:
        prompt, path = rules.split_prompt(prompt, None, "PROMPT")
        media = media or path
    if not prompt and not prompt_file:
        raise UserError("PROMPT is empty: give a prompt (PROMPT=... or the first argument) or PROMPT_FILE")
    return prompt, prompt_file, prompt_line, media, line_media


def _media(gtype: str, media: str, line_media: bool, profile: Profile, notes: List[str]) -> str:
    """The absolute media path ("" for t2v or when every prompt line names its own)."""
    if gtype == "t2v":
        if media:
            notes.append(f"t2v ignores IMAGE_OR_VIDEO_PATH={media}")
        return ""
    if line_media:
        return media
    rules.check_media_path(gtype, media, "IMAGE_OR_VIDEO_PATH", f"{profile.name}, GENERATE_TYPE={gtype}")
    return os.path.abspath(media)


def _sampling(env, profile: Profile, notes: List[str]) -> dict:
    """Frames, fps and dtype (the family's unless set), and the sampler settings that are set."""
    num_frames = _int(env, "NUM_FRAMES")
    if num_frames is None:
        num_frames = profile.num_frames
    else:
        rules.check_video_frames("NUM_FRAMES", num_frames, profile.allowed_frames, profile.name)
    fps = _int(env, "FPS")
    dtype = _get(env, "DTYPE").lower()
    dtype = rules.dtype_name("DTYPE", dtype) if dtype else profile.dtype
    if dtype == "float16" and profile.dtype == "bfloat16":
        notes.append(f"{profile.name} in float16 often gives black or NaN videos: DTYPE=bfloat16 is its dtype")
    values = dict(num_frames=num_frames, fps=rules.check_at_least("FPS", fps, 1) if fps is not None else profile.fps,
                  dtype=dtype, num_steps=_int(env, "NUM_STEPS"), guidance=_float(env, "GUIDANCE_SCALE"),
                  seed=_int(env, "SEED"), strength=_float(env, "STRENGTH"), sampler=_get(env, "SAMPLER").lower())
    if values["num_steps"] is not None:
        rules.check_num_steps("NUM_STEPS", values["num_steps"],
                              rules.max_sampling_steps(_load_yaml(profile.config).get("model") or {}))
    if values["guidance"] is not None:
        rules.check_guidance_scale("GUIDANCE_SCALE", values["guidance"])
    values["seed"] = 42 if values["seed"] is None else values["seed"]
    if values["strength"] is not None:
        rules.check_strength("STRENGTH", values["strength"])
    if values["sampler"]:
        rules.check_choice("SAMPLER", values["sampler"], tuple(rules.SAMPLERS))
    return values


def _lora(env) -> str:
    lora = _get(env, "LORA_PATH")
    if lora:
        if not os.path.isdir(lora):
            raise UserError(f"LORA_PATH {lora!r} is not a folder: give the SAT LoRA checkpoint folder (with 'latest')")
        _transformer_file(lora, "LORA_PATH")
        lora = os.path.abspath(lora)
    return lora


def _outputs(env, prompt, prompt_file, prompt_line) -> Tuple[Optional[str], Optional[str]]:
    """(output_path, output_dir): a folder for a whole prompt file, else one .mp4."""
    job_id = _get(env, "JOB_ID") or "local"
    if prompt_file and prompt_line is None:
        return None, _get(env, "OUTPUT_DIR") or os.path.join("outputs", f"inference_{job_id}")
    if prompt_line is not None and not _get(env, "OUTPUT_PATH"):
        return rules.output_file(_get(env, "OUTPUT_DIR") or "outputs", prompt_line, prompt), None
    output_path = _get(env, "OUTPUT_PATH") or os.path.join("outputs", f"inference_{job_id}.mp4")
    return rules.check_output_path("OUTPUT_PATH", output_path), None


def _sample_argv(launch: Launch, values: dict, lora: str, env) -> List[str]:
    """The sample_video arguments of a resolved job."""
    argv = ["--base", launch.job_yaml, "--generate-type", launch.generate_type, "--num-frames",
            str(launch.num_frames), "--sampling-fps", str(launch.fps), "--dtype", launch.dtype]
    if launch.prompt_file and launch.prompt_line is None:
        argv += ["--input-type", "txt", "--input-file", launch.prompt_file, "--output-dir", launch.output_dir,
                 "--seed", str(launch.seed)]
    else:
        # A line of a file keeps the seed it has in a sharded run of the whole file (seed + 1000·line).
        argv += ["--prompt", launch.prompt, "--output-path", launch.output_path, "--seed",
                 str(rules.line_seed(launch.seed, launch.prompt_line or 0))]
    options = [("--image-or-video-path", launch.media or None), ("--num-steps", values["num_steps"]),
               ("--guidance-scale", values["guidance"]), ("--sampler", values["sampler"] or None),
               ("--strength", values["strength"]), ("--lora-path", lora or None),
               ("--device", _get(env, "DEVICE") or None)]
    argv += [a for flag, value in options if value is not None for a in (flag, str(value))]
    from sat_cogvideo.accel.options import launch_argv

    argv += launch_argv(env)  # COMPILE=1, WEIGHTS_DTYPE, OFFLOAD, ATTENTION, CACHE (docs/speed.md)
    from sat_cogvideo import parallel

    argv += parallel.launch_argv(env)  # SP_SIZE, CFG_PARALLEL, ... (docs/parallel.md)
    return argv + (["--overwrite"] if _flag(env, "OVERWRITE") else ["--skip-existing"])


def resolve(env: Mapping[str, str], write_yaml: bool = True) -> Launch:
    """Apply every rule of the guide to the script's variables; return the job (and write its YAML)."""
    from sat_cogvideo.families import detect_from_state_dict

    notes: List[str] = []
    folder = find_model_folder(_get(env, "MODEL_PATH"), _get(env, "T5_PATH"), _get(env, "VAE_PATH"),
                               _get(env, "REVISION"))
    detected = detect_from_state_dict(read_checkpoint_state(folder.checkpoint))
    profile = resolve_profile(detected, _get(env, "FAMILY"), _get(env, "MODEL_CONFIG"))
    gtype = _generate_type(env, profile, notes)
    prompt, prompt_file, prompt_line, media, line_media = _prompts(env, gtype)
    media = _media(gtype, media, line_media, profile, notes)
    values = _sampling(env, profile, notes)
    lora = _lora(env)
    output_path, output_dir = _outputs(env, prompt, prompt_file, prompt_line)
    job_yaml = _get(env, "JOB_YAML") or os.path.join("logs", f"inference-{_get(env, 'JOB_ID') or 'local'}.yaml")
    launch = Launch(folder, profile, gtype, values["num_frames"], values["fps"], values["dtype"], values["seed"],
                    media, prompt, prompt_file, prompt_line, output_path, output_dir, job_yaml, notes=notes)
    launch.argv = _sample_argv(launch, values, lora, env)
    if write_yaml:
        write_job_yaml(launch)
    return launch


# --------------------------------------------------------------------------------------------------------------
# the per-job YAML


def job_config(launch: Launch):
    """The family's model config and inference settings, pointed at the folder's transformer, VAE and T5."""
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(_load_yaml(launch.profile.config), _load_yaml(launch.profile.inference_config))
    folder = launch.folder
    mc = merged.model
    mc.first_stage_config.params.ckpt_path = folder.vae
    n_t5 = 0
    for emb in mc.conditioner_config.params.emb_models:
        if "T5" in str(emb.get("target", "")):
            emb.params.model_dir = folder.t5
            n_t5 += 1
    if not n_t5:
        raise UserError(f"{launch.profile.config} has no T5 embedder in conditioner_config: is it a CogVideoX config?")
    args = merged.get("args") or OmegaConf.create({})
    args.load = folder.transformer
    args.image2video = launch.generate_type == "i2v"
    args.sampling_fps = launch.fps
    merged.args = args
    return merged


def write_job_yaml(launch: Launch) -> str:
    from omegaconf import OmegaConf
    from sat_cogvideo.atomic import atomic_write_text

    cfg = job_config(launch)
    header = (f"# Written by sat_cogvideo.launch for this job: {launch.profile.config} + "
              f"{launch.profile.inference_config}\n# with the paths of {launch.folder.root}.\n")
    text = OmegaConf.to_yaml(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)))
    os.makedirs(os.path.dirname(os.path.abspath(launch.job_yaml)), exist_ok=True)
    atomic_write_text(launch.job_yaml, header + text)
    return launch.job_yaml


# --------------------------------------------------------------------------------------------------------------
# submission helper: which lines of a prompt file still need a video


def pending_lines(prompt_file: str, output_dir: str) -> List[Tuple[int, str, str, bool]]:
    """(line, prompt, output, done) for each non-empty line of ``prompt_file``."""
    rows = []
    for cnt, text in prompt_lines(prompt_file):
        out = rules.output_file(output_dir, cnt, text.split("@@")[0].strip())
        rows.append((cnt, text, out, os.path.exists(out)))
    return rows


# --------------------------------------------------------------------------------------------------------------
# CLI


@run_cli
def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sat_cogvideo.launch",
        description="Apply the cluster guide's rules to the variables of scripts/slurm_inference.sh (read from the "
                    "environment) and print the sample_video arguments.")
    parser.add_argument("--args-file", default=None,
                        help="write the sample_video arguments there, NUL-separated (for the script)")
    parser.add_argument("--check", action="store_true", help="only check, write nothing")
    parser.add_argument("--pending", nargs=2, metavar=("PROMPT_FILE", "OUTPUT_DIR"), default=None,
                        help="list 'line<TAB>done<TAB>output' for each prompt of a file (used by submit_prompts.sh)")
    args = parser.parse_args(argv)
    if args.pending:
        for cnt, _text, out, done in pending_lines(*args.pending):
            print(f"{cnt}\t{int(done)}\t{out}")
        return 0
    launch = resolve(os.environ, write_yaml=not args.check)
    for note in launch.notes:
        print(f"note: {note}", file=sys.stderr)
    print(launch.summary())
    if args.args_file:
        from sat_cogvideo.atomic import atomic_write_text

        atomic_write_text(args.args_file, "\0".join(launch.argv) + "\0")
    else:
        print("python -m sat_cogvideo.sample_video " + " ".join(shlex.quote(a) for a in launch.argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
