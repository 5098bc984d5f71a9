"""The inference rules, in one place: the tables and the checks that ``sample_video`` (command-line options) and
``launch`` (the cluster scripts' environment variables) both apply before any weight is loaded.

Every check is a function of plain values that raises :class:`UserError` (one line, exit code 2).  ``name`` is
the option as the user wrote it: a command-line flag (``--num-frames``) is shown as ``--num-frames 50``, an
environment variable (``NUM_FRAMES``) as ``NUM_FRAMES=50``.
"""
from __future__ import annotations

import math
import os
import re
from typing import List, Optional, Sequence, Tuple

from sat_cogvideo.errors import UserError

GENERATE_TYPES = ("t2v", "i2v", "v2v")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif", ".m4v")
# every spelling of a model dtype -> its canonical name
DTYPE_ALIASES = {"float16": "float16", "fp16": "float16", "half": "float16", "bfloat16": "bfloat16",
                 "bf16": "bfloat16", "float32": "float32", "fp32": "float32", "float": "float32"}
SAMPLERS = {
    "dpm": "sgm.modules.diffusionmodules.sampling.VPSDEDPMPP2MSampler",
    "ddim": "sgm.modules.diffusionmodules.sampling.VideoDDIMSampler",
}
SEED_STRIDE = 1000  # prompt line ``n`` is seeded with ``seed + 1000·n`` (+ the batch index)
VIDEO_NAME = "000000.mp4"


# --------------------------------------------------------------------------------------------------------------
# tables: seeds and the output layout


def line_seed(seed: int, line: int) -> int:
    """The seed of prompt line ``line`` (0-based), batch index 0."""
    return int(seed) + SEED_STRIDE * int(line)


def seed_for(seed: int, line: int, index: int) -> int:
    """The seed of video ``index`` of prompt line ``line``: ``seed + 1000·line + index`` (within int64)."""
    return (line_seed(seed, line) + int(index)) % (2 ** 63)


def slugify(text: str) -> str:
    """Folder name part of a prompt, as the original: spaces -> '_', '/' removed, first 120 characters."""
    return text.replace(" ", "_").replace("/", "")[:120]


def output_file(output_dir: str, line: int, text: str, index: int = 0, name: str = VIDEO_NAME) -> str:
    """The original's output layout: ``<output_dir>/<line>_<slug>/<index>/000000.mp4``."""
    return os.path.join(output_dir, f"{line}_{slugify(text)}", str(index), name)


# --------------------------------------------------------------------------------------------------------------
# values


def said(name: str, value) -> str:
    """``name`` with ``value`` as the user wrote it: ``--flag value`` or ``VARIABLE=value``."""
    return f"{name} {value}" if name.startswith("-") else f"{name}={value}"


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise UserError(f"{said(name, repr(value))} is not one of {', '.join(choices)}")
    return value


def dtype_name(name: str, value: str) -> str:
    """The canonical dtype (``float16``/``bfloat16``/``float32``) of any alias in :data:`DTYPE_ALIASES`."""
    if value not in DTYPE_ALIASES:
        raise UserError(f"{said(name, repr(value))} is not one of float16, bfloat16, float32")
    return DTYPE_ALIASES[value]


def check_at_least(name: str, value: int, minimum: int) -> int:
    """``value`` if it is at least ``minimum``."""
    if int(value) < minimum:
        raise UserError(f"{said(name, value)} must be at least {minimum}")
    return value


def check_num_steps(name: str, steps: int, most: int) -> int:
    """Sampler steps: 1 up to the ``most`` steps of the model's noise schedule."""
    if not 1 <= steps <= most:
        raise UserError(f"{said(name, steps)} is outside 1..{most} (the noise schedule has {most} steps): the "
                        f"configs use 50")
    return steps


def check_guidance_scale(name: str, scale: float) -> float:
    """Classifier-free guidance scale: a finite number >= 0."""
    if not (math.isfinite(scale) and scale >= 0):
        raise UserError(f"{said(name, scale)} must be a number >= 0 (the configs use 6)")
    return scale


def check_strength(name: str, strength: float) -> float:
    """v2v strength: in [0, 1]."""
    if not 0.0 <= strength <= 1.0:
        raise UserError(f"{said(name, strength)} is outside [0, 1]")
    return strength


def check_finite(name: str, value: float) -> float:
    """``value`` if it is a finite number."""
    if not math.isfinite(value):
        raise UserError(f"{said(name, value)} is not a finite number")
    return value


def max_sampling_steps(model_config) -> int:
    """The most sampler steps the model's noise schedule has: the smaller of the sampler discretization's
    ``num_timesteps`` and the denoiser's ``num_idx`` where the config sets them, else 1000 (both defaults)."""
    from omegaconf import OmegaConf

    limits = [OmegaConf.select(OmegaConf.create(model_config), key) for key in (
        "sampler_config.params.discretization_config.params.num_timesteps", "denoiser_config.params.num_idx")]
    return min([int(v) for v in limits if v is not None] or [1000])


# --------------------------------------------------------------------------------------------------------------
# frames and size


def check_video_frames(name: str, num_frames: int, allowed: Sequence[int], model: str) -> int:
    """``num_frames`` video frames if ``model`` (a name for messages) generates them: 4N+1 and in ``allowed``."""
    allowed_text = " or ".join(str(a) for a in sorted(allowed, reverse=True))
    if num_frames < 1 or (num_frames - 1) % 4:
        raise UserError(f"{said(name, num_frames)} is not of the form 4N+1 (the VAE compresses time by 4): "
                        f"use {allowed_text} for {model}")
    if num_frames not in allowed:
        raise UserError(f"{said(name, num_frames)} is not allowed for {model}: use {allowed_text}")
    return num_frames


def _multiple_of_16_within(value: int, maximum: int) -> int:
    """The multiple of 16 nearest to ``value`` that is at least 16 and at most ``maximum``."""
    return max(16, min(16 * (maximum // 16), 16 * int(value / 16 + 0.5)))


def check_fixed_size(name: str, size: Tuple[int, int], fixed: Tuple[int, int], model: str) -> None:
    """1.0 models generate only their configured size."""
    if tuple(size) != tuple(fixed):
        raise UserError(f"{name} {size[0]}x{size[1]}: {model} only generates {fixed[0]}x{fixed[1]} (its configured "
                        f"size): use --sampling-image-size {fixed[0]},{fixed[1]} or leave it out")


def check_free_size(name: str, size: Tuple[int, int], most: Tuple[int, int]) -> Tuple[int, int]:
    """1.5 models: any multiple of 16 pixels within the RoPE grid (``most``, pixels)."""
    (height, width), (max_h, max_w) = size, most
    problems = (["is not a multiple of 16 pixels"] if height % 16 or width % 16 else []) + \
        ([f"exceeds the model's maximum {max_h}x{max_w} pixels"] if height > max_h or width > max_w else [])
    if problems:
        fit = f"{_multiple_of_16_within(height, max_h)}x{_multiple_of_16_within(width, max_w)}"
        raise UserError(f"{name} {height}x{width} {' and '.join(problems)}: use e.g. {fit}")
    return height, width


# --------------------------------------------------------------------------------------------------------------
# prompts, media, generation type, outputs


def split_prompt(text: str, default_media: Optional[str], where: str) -> Tuple[str, Optional[str]]:
    """``prompt@@path`` -> (prompt, path), else (text, ``default_media``); an empty prompt is a UserError."""
    media = default_media
    if "@@" in text:
        parts = text.split("@@")
        if len(parts) != 2:
            raise UserError(f"{where}: more than one '@@' in {text[:60]!r}: use 'prompt@@path'")
        text, media = parts[0].strip(), parts[1].strip()
        if not text:
            raise UserError(f"{where}: the prompt before '@@' is empty: write 'prompt@@path'")
    if not text.strip():
        raise UserError(f"{where}: the prompt is empty: give the text the video should show")
    return text, media


def read_prompt_file(path: str) -> tuple:
    """``(prompts, blank)`` of a UTF-8 prompt file: ``prompts`` lists ``(line counter, stripped text)`` of the
    non-blank lines, the counter being the 0-based line number (output names and seeds do not move when blank
    lines are added or removed elsewhere); ``blank`` counts the blank lines skipped.  A UTF-8 byte-order mark is
    dropped; bytes that are not UTF-8 are a UserError naming the line."""
    prompts, blank = [], 0
    try:
        with open(path, "rb") as f:
            raw_lines = re.split(rb"\r\n|\r|\n", f.read())  # the universal newlines of text mode
    except OSError as err:
        raise UserError(f"prompt file {path!r} cannot be read ({err.strerror or err}): give a text file with one "
                        f"prompt per line") from None
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()  # the newline that ends the last line
    for cnt, raw in enumerate(raw_lines):
        try:
            text = raw.decode("utf-8-sig" if cnt == 0 else "utf-8").strip()
        except UnicodeDecodeError as err:
            raise UserError(f"{path} line {cnt + 1}: byte 0x{raw[err.start]:02x} at column {err.start + 1} is not "
                            f"UTF-8: save the file as UTF-8 text") from None
        if text:
            prompts.append((cnt, text))
        else:
            blank += 1
    return prompts, blank


def check_media_path(gtype: str, path: Optional[str], name: str, where: str) -> str:
    """The image (i2v) or input video (v2v) path: given, an existing file, with an image or video extension."""
    what, example, exts = {"i2v": ("an image", ".jpg/.png file", IMAGE_EXTS),
                           "v2v": ("a video", ".mp4 file", VIDEO_EXTS)}[gtype]
    if not path:
        noun = "an image" if gtype == "i2v" else "an input video"
        raise UserError(f"{gtype} needs {noun}: set {name} to a {example} or write 'prompt@@path' ({where})")
    if not os.path.isfile(path):
        raise UserError(f"{name} {path!r} does not exist: give an absolute path the compute node can read ({where})")
    if not path.lower().endswith(exts):
        raise UserError(f"{gtype} needs {what} but {name} {path!r} is not one ({', '.join(exts)})")
    return path


def check_generate_type(gtype: str, i2v_model: bool, model: str, source: str, use_t2v: str, use_i2v: str) -> None:
    """An I2V model does only i2v, and i2v needs an I2V model; ``model`` names the model, ``source`` where it comes
    from, ``use_t2v``/``use_i2v`` the fixes."""
    if i2v_model and gtype != "i2v":
        raise UserError(f"{model} is an image-to-video model and cannot do {gtype}: {use_t2v}")
    if gtype == "i2v" and not i2v_model:
        raise UserError(f"i2v needs an I2V model but {source} holds {model} (text-to-video): {use_i2v}")


def check_output_path(name: str, path: str, suffix: str = ".mp4") -> str:
    """An output file name with the right extension."""
    if not path.lower().endswith(suffix):
        raise UserError(f"{name} {path!r} must end in {suffix}")
    return path


def batch_outputs(output_path: Optional[str], output_dir: str, line: int, text: str, batch_size: int,
                  latents: bool = False) -> List[str]:
    """The files of one prompt's batch: ``output_path`` (``_i`` added for batches) or the original's layout."""
    if output_path:
        base, ext = os.path.splitext(output_path)
        ext = ".pt" if latents else ext
        return [base + ext] if batch_size == 1 else [f"{base}_{i}{ext}" for i in range(batch_size)]
    name = "latent.pt" if latents else VIDEO_NAME
    return [output_file(output_dir, line, text, i, name) for i in range(batch_size)]


# --------------------------------------------------------------------------------------------------------------
# speed and memory options (sat_cogvideo.accel; docs/speed.md)


def check_speed_options(compile_: bool, weights_dtype: Optional[str], offload: Optional[str]) -> None:
    """The combinations of --compile, --weights-dtype and --offload that cannot work."""
    hooked = offload in ("group", "sequential")
    if compile_ and hooked:
        raise UserError(f"--compile with --offload {offload}: the offload hooks move weights inside the compiled "
                        "layer; use --offload model with --compile, or drop --compile")
    if weights_dtype and hooked:
        raise UserError(f"--weights-dtype {weights_dtype} with --offload {offload}: both hook every linear layer; "
                        "use --offload model")
    if weights_dtype == "fp8" and compile_:
        raise UserError("--weights-dtype fp8 with --compile: the casting hooks rewrite weights inside the compiled "
                        "layer; use --weights-dtype int8 with --compile")


def check_parallel_degrees(world: int, sp_size: Optional[int], ulysses: Optional[int], ring: Optional[int],
                           cfg_parallel: bool) -> Tuple[int, int, int]:
    """One video on several processes (sat_cogvideo.parallel): the (ulysses, ring, cfg) degrees of the options for
    ``world`` processes, or a UserError naming the fix.  ``--sp-size N`` alone means Ulysses N (heads that do not
    divide are padded)."""
    for flag, value in (("--sp-size", sp_size), ("--ulysses-degree", ulysses), ("--ring-degree", ring)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value} must be at least 1")
    u, r = ulysses or 1, ring or 1
    if sp_size is not None:
        if ulysses is None and ring is None:
            u = sp_size
        elif u * r != sp_size:
            raise UserError(f"--sp-size {sp_size} is not --ulysses-degree {u} x --ring-degree {r}: "
                            f"give --sp-size alone or degrees whose product is {sp_size}")
    cfg = 2 if cfg_parallel else 1
    need = u * r * cfg
    what = " x ".join([f"--ulysses-degree {u}"] * (u > 1) + [f"--ring-degree {r}"] * (r > 1) +
                      ["--cfg-parallel 2"] * cfg_parallel) or "1"
    if need > world:
        raise UserError(f"{what} needs {need} processes but the world size is {world}: launch {need} "
                        f"(e.g. torchrun --nproc_per_node {need}) or lower the degrees")
    if world % need:
        raise UserError(f"{what} = {need} does not divide the world size {world}: use degrees whose product "
                        f"divides {world}, or launch a multiple of {need} processes")
    return u, r, cfg
