"""A tiny random-weight CogVideoX in the real on-disk formats, built once and cached; and the demo run.

``build_demo(folder)`` writes, for the tiny configs of ``configs/tiny/`` (hidden 64, 2 layers):

```
<folder>/
  t5/                                      tiny T5 v1.1 encoder folder (config.json, sharded safetensors
                                           + index, spiece.model, tokenizer configs), as t5-v1_1-xxl
  vae/3d-vae.pt                            {"state_dict": encoder.* / decoder.*}, as the released file
  <model>/transformer/latest               "1"
  <model>/transformer/1/mp_rank_00_model_states.pt   {"module": model.diffusion_model.*}
  first_frame.png                          the I2V demos' first frame (drawn with PIL), when an I2V model is built
```

The tiny configs find the folder through ``${oc.env:SAT_COGVIDEO_DEMO}``; :func:`demo_dir` sets that variable.
Weights are random (seeded), so the generated video is noise: the demo exercises the whole inference path
(config, checkpoint loading, T5, sampler, VAE, mp4) in seconds on a CPU.

:func:`prepare_demo` adds ``<folder>/dataset/{labels,videos}``, two generated clips (:func:`build_demo_dataset`), for
the finetuning demo (``bash finetune.sh`` without arguments, through ``python -m sat_cogvideo.train_video
--prepare-demo DIR``).

``python -m sat_cogvideo.demo`` (``bash inference.sh`` without arguments) runs the TRAINED demo model of
``demo_model/`` (a tiny CogVideoX-5B-style model trained by ``tools/train_demo_model.py`` on the synthetic clips
of :mod:`sat_cogvideo.demo_world`, see ``demo_model/README.md``): text-to-video on a prompt such as "a red circle
moving to the right", an mp4 and a PNG strip of its frames, and a summary of what was asked and what the video
shows.  ``--model cogvideox_5b`` (any of :data:`DEMO_MODELS`) builds the folder of random-weight models if needed
and runs it instead; ``--model cogvideox_5b_i2v`` / ``cogvideox1.5_5b_i2v`` run image-to-video from the demo's own
first-frame image.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Dict, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_MODELS = ("cogvideox_5b", "cogvideox_2b", "cogvideox_5b_i2v", "cogvideox1.5_5b", "cogvideox1.5_5b_i2v")
DEFAULT_MODEL = "cogvideox_5b"
TRAINED = "demo"  # --model value of the trained demo model (demo_model/cogvideox_5b)
TRAINED_PROMPT = "a red circle moving to the right"
TRAINED_ENV = "SAT_COGVIDEO_DEMO_MODEL"
DEMO_PROMPT = "A panda, dressed in a small red jacket and a tiny hat, sits on a wooden stool in a bamboo forest."


def demo_dir(folder: Optional[str] = None) -> str:
    """The cache folder: ``folder``, else ``$SAT_COGVIDEO_DEMO``, else ``$SAT_COGVIDEO_CACHE/demo``, else
    ``~/.cache/sat-cogvideo/demo``.  Exports ``SAT_COGVIDEO_DEMO`` so the tiny configs resolve to it."""
    if folder is None:
        folder = os.environ.get("SAT_COGVIDEO_DEMO")
    if not folder:
        cache = os.environ.get("SAT_COGVIDEO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sat-cogvideo")
        folder = os.path.join(cache, "demo")
    folder = os.path.abspath(folder)
    os.environ["SAT_COGVIDEO_DEMO"] = folder
    return folder


def tiny_config_path(model: str) -> str:
    return os.path.join(ROOT, "configs", "tiny", f"{model}.yaml")


def _model_config(model: str):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(tiny_config_path(model))
    return cfg.model


def randomize_(module, seed: int = 0, scale: float = 0.05, *, skip=(), buffers: bool = False,
               unit_norms: bool = True, away_from_zero: bool = False):
    """Random, seeded values ``scale * N(0, 1)`` for every floating parameter (zero-initialised layers included)
    from a private generator (the global RNG is untouched); returns ``module``.

    ``skip``: parameter names left alone; ``buffers``: computed tables too (else kept); ``unit_norms``: norm
    weights become ``1 + noise``; ``away_from_zero``: every value moved by 1% of ``scale`` away from 0."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    tensors = list(module.named_parameters()) + (list(module.named_buffers()) if buffers else [])
    with torch.no_grad():
        for name, t in tensors:
            if not t.is_floating_point() or name in skip:
                continue
            noise = scale * torch.randn(t.shape, generator=gen)
            if away_from_zero:
                noise = noise + torch.sign(noise) * scale * 0.01
            norm = unit_norms and t.ndim == 1 and name.endswith("weight") and (
                "norm" in name.lower() or "ln" in name.lower())
            t.copy_((1.0 + noise if norm else noise).to(t.dtype))
    return module


def build_t5(folder: str, model_config) -> str:
    from sat_cogvideo.tiny_t5 import build_tiny_t5

    d_model = int(model_config.network_config.params.modules.patch_embed_config.params.text_hidden_size)
    return build_tiny_t5(os.path.join(folder, "t5"), d_model=d_model, num_layers=2, num_heads=2, d_kv=16,
                         d_ff=2 * d_model, seed=0)


def build_vae(folder: str, model_config, seed: int = 1) -> str:
    """``vae/3d-vae.pt`` with the tiny VAE's random weights under ``state_dict`` (and no ``loss.*`` keys)."""
    from omegaconf import OmegaConf
    from sgm.util import instantiate_from_config
    from sat_cogvideo.vae_modules import save_vae_checkpoint

    path = os.path.join(folder, "vae", "3d-vae.pt")
    if os.path.isfile(path):
        return path
    cfg = OmegaConf.to_container(model_config.first_stage_config, resolve=False)
    cfg["params"].pop("ckpt_path", None)
    vae = instantiate_from_config(cfg)
    randomize_(vae, seed, scale=0.05)
    save_vae_checkpoint(vae, path)
    return path


def build_transformer(folder: str, model: str, model_config, seed: int = 2) -> str:
    """``<model>/transformer/{latest, 1/mp_rank_00_model_states.pt}`` with random DiT weights."""
    import torch
    from omegaconf import OmegaConf
    from sgm.util import instantiate_from_config
    from sat_cogvideo.checkpoint import SAT_PREFIX, save_checkpoint
    from sat_cogvideo.distributed import init_distributed

    tdir = os.path.join(folder, model, "transformer")
    marker = os.path.join(tdir, "latest")
    if os.path.isfile(marker):
        return tdir
    init_distributed(device="cpu")
    cfg = OmegaConf.to_container(model_config.network_config, resolve=True)
    cfg["params"]["dtype"] = "fp32"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dit = instantiate_from_config(cfg)
    frozen = {n for n, p in dit.named_parameters() if not p.requires_grad}  # e.g. the 2B sincos table
    randomize_(dit, seed, scale=0.05, skip=frozen)
    # as the released files: computed tables are not stored
    sd = {SAT_PREFIX + k: v.detach().clone().contiguous() for k, v in dit.state_dict().items() if k not in frozen}
    save_checkpoint(tdir, sd, 1)
    return tdir


def is_i2v(model: str) -> bool:
    """Whether the tiny ``model`` is image-to-video: its DiT takes the image latent beside the noise."""
    net = _model_config(model).network_config.params
    return int(net.in_channels) == 2 * int(net.out_channels)


def build_image(folder: str, width: int = 192, height: int = 128) -> str:
    """``first_frame.png``, the I2V demos' first frame: a red disc and a yellow bar on a blue background (drawn
    deterministically with PIL, written atomically; kept once written).  Ours: the original has no demo."""
    from PIL import Image, ImageDraw

    from sat_cogvideo.atomic import atomic_path

    path = os.path.join(folder, "first_frame.png")
    if os.path.isfile(path):
        return path
    img = Image.new("RGB", (width, height), (40, 90, 170))
    draw = ImageDraw.Draw(img)
    draw.ellipse((width // 8, height // 4, width // 8 + height // 2, 3 * height // 4), fill=(220, 40, 40))
    draw.rectangle((width // 2, height // 3, 7 * width // 8, height // 2), fill=(240, 210, 60))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def build_demo(folder: Optional[str] = None, models=(DEFAULT_MODEL,)) -> Dict[str, str]:
    """Build (once) the tiny model folder; returns paths: ``folder``, ``t5``, ``vae``, ``<model>`` (transformer
    folder of each model), ``config:<model>`` (its YAML) and, when an I2V model is among them, ``image``."""
    folder = demo_dir(folder)
    os.makedirs(folder, exist_ok=True)
    paths = {"folder": folder}
    first = _model_config(models[0])
    paths["t5"] = build_t5(folder, first)
    paths["vae"] = build_vae(folder, first)
    for model in models:
        mc = _model_config(model)
        paths[model] = build_transformer(folder, model, mc)
        paths["config:" + model] = tiny_config_path(model)
        if is_i2v(model):
            paths["image"] = build_image(folder)
    return paths


def build_demo_dataset(folder: str, num_videos: int = 2, height: int = 64, width: int = 96, frames: int = 24,
                       fps: int = 8) -> str:
    """``<folder>/dataset/{labels,videos}`` with ``num_videos`` small generated clips (a moving gradient), once."""
    import numpy as np

    from sat_cogvideo.atomic import make_temp_dir
    from sat_cogvideo.media import write_video

    target = os.path.join(folder, "dataset")
    if os.path.isdir(os.path.join(target, "videos")):
        return target
    os.makedirs(folder, exist_ok=True)
    tmp = make_temp_dir(folder, prefix=".dataset-")
    captions = ["a red square drifts slowly to the right over a blue background",
                "green stripes scroll upwards on a dark screen"]
    yy, xx = np.mgrid[0:height, 0:width]
    for n in range(num_videos):
        clip = np.zeros((frames, height, width, 3), np.uint8)
        for t in range(frames):
            if n % 2 == 0:
                clip[t, ..., 2] = 160
                x0 = 8 + 2 * t
                clip[t, 20:44, x0:x0 + 24, 0] = 230
            else:
                clip[t, ..., 1] = (((yy + 3 * t) // 8) % 2 * 200).astype(np.uint8)
        write_video(os.path.join(tmp, "videos", f"{n + 1}.mp4"), clip, fps=fps)
        os.makedirs(os.path.join(tmp, "labels"), exist_ok=True)
        with open(os.path.join(tmp, "labels", f"{n + 1}.txt"), "w", encoding="utf-8") as f:
            f.write(captions[n % len(captions)] + "\n")
    try:
        os.replace(tmp, target)
    except OSError:  # built meanwhile by another process
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def prepare_demo(folder: Optional[str] = None) -> str:
    """Build the tiny demo model (CogVideoX-2B layout) and the 2-video dataset; return the demo folder."""
    folder = demo_dir(folder)
    build_demo(folder, models=("cogvideox_2b",))
    build_demo_dataset(folder)
    return folder


def demo_argv(paths: Dict[str, str], model: str, output: str, prompt: str = DEMO_PROMPT, steps: int = 10,
              extra=(), image: Optional[str] = None) -> list:
    """``sample_video`` arguments for a run of the tiny ``model``: t2v, or i2v from ``image`` (the I2V models'
    first frame; without it the caller adds its own)."""
    mc = _model_config(model)
    net = mc.network_config.params
    num_frames = int(net.num_frames)
    patch = net.patch_size
    is15 = not isinstance(patch, int)
    argv = ["--base", paths["config:" + model], "--load", paths[model], "--prompt", prompt,
            "--output-path", output, "--num-frames", str(num_frames), "--num-steps", str(steps),
            "--sampling-fps", "16" if is15 else "8", "--device", "cpu", "--seed", "42"]
    if image is not None:
        argv += ["--image-or-video-path", image]
    elif is15:
        argv += ["--sampling-image-size", f"{8 * int(net.latent_height)},{8 * int(net.latent_width)}"]
    return argv + list(extra)


def trained_model_dir() -> str:
    """The trained demo model's folder: ``$SAT_COGVIDEO_DEMO_MODEL``, else ``<repository>/demo_model`` (exported, so
    its configs find their T5 and VAE through ``${oc.env:SAT_COGVIDEO_DEMO_MODEL}``)."""
    folder = os.path.abspath(os.environ.get(TRAINED_ENV) or os.path.join(ROOT, "demo_model"))
    os.environ[TRAINED_ENV] = folder
    return folder


def trained_argv(prompt: str, output: str, steps: int = 10, seed: int = 42, model: str = "cogvideox_5b",
                 extra=()) -> list:
    """``sample_video`` arguments for text-to-video with the trained demo model (``--preview`` on)."""
    folder = trained_model_dir()
    return ["--base", os.path.join(folder, f"{model}.yaml"), os.path.join(folder, "inference.yaml"),
            "--load", os.path.join(folder, model, "transformer"), "--prompt", prompt, "--output-path", output,
            "--num-steps", str(steps), "--device", "cpu", "--seed", str(seed), "--preview"] + list(extra)


def run_trained(prompt: str, output: str, steps: int, rest) -> int:
    """Generate ``prompt`` with the trained demo model; print what was asked and what the video shows."""
    from sat_cogvideo import demo_world, media, sample_video

    folder = trained_model_dir()
    if not os.path.isfile(os.path.join(folder, "cogvideox_5b", "transformer", "latest")):
        from sat_cogvideo.errors import UserError

        raise UserError(f"no trained demo model in {folder}: run python tools/train_demo_model.py --output {folder}")
    run_argv = trained_argv(prompt, output, steps=steps, extra=["--overwrite"] + list(rest))
    print(">> sample_video " + " ".join(run_argv), file=sys.stderr, flush=True)
    sample_video.main(run_argv)
    video, _ = media.read_video(output)
    seen = demo_world.describe(video)
    shows = (f"a {seen['color']} shape moving {seen['direction']}" if seen["direction"] else
             f"a {seen['color']} shape, not clearly moving" if seen["color"] else "no shape")
    print(f"\nasked:   {prompt!r}  (tiny CogVideoX-5B-style model trained on synthetic clips: {folder})")
    print(f"shows:   {shows}  (dominant colour and centroid motion, measured on the video)")
    print(f"wrote    {output}\n         {os.path.splitext(output)[0]}.png  (its frames side by side)")
    print("try:     python -m sat_cogvideo.demo --prompt 'a yellow square moving up'   (colours: "
          f"{', '.join(demo_world.COLORS)}; circle/square; left/right/up/down)")
    return 0


LORA_PROMPTS = ("a cyan circle moving to the right", "a cyan square moving up")


def prepare_finetune(folder: Optional[str] = None, clips: int = 3, seed: int = 0) -> str:
    """The finetuning demo's dataset ``<demo folder>/lora_dataset``: clips of the colour the trained model has never
    seen (:data:`sat_cogvideo.demo_world.NEW_COLOR`), every shape and direction; returns its path."""
    from sat_cogvideo import demo_world as world

    combos = world.combinations([world.NEW_COLOR[0]])
    return world.write_dataset(os.path.join(demo_dir(folder), "lora_dataset"), combos, clips, seed)


def newest_run(save: str = os.path.join("outputs", "demo_lora"), prefix: str = "demo-lora-") -> str:
    from sat_cogvideo.errors import UserError

    runs = sorted((os.path.join(save, d) for d in os.listdir(save) if d.startswith(prefix)) if os.path.isdir(save)
                  else [], key=os.path.getmtime)
    if not runs:
        raise UserError(f"no finetuning run {save}/{prefix}*: run bash finetune.sh first")
    return runs[-1]


def compare_lora(run: str, output_dir: str = "outputs", steps: int = 10) -> list:
    """Generate :data:`LORA_PROMPTS` with the trained model before and after merging the LoRA ``run``; write the
    mp4s, their previews and ``demo_lora_before_after.png`` (before above after); print what each video shows.
    Returns ``[(prompt, before description, after description)]``."""
    import numpy as np
    from PIL import Image

    from sat_cogvideo import demo_world as world, media, sample_video
    from sat_cogvideo.atomic import atomic_path

    rows, results = [], []
    for i, prompt in enumerate(LORA_PROMPTS):
        seen = {}
        for when, extra in (("before", []), ("after", ["--lora-path", run])):
            out = os.path.join(output_dir, f"demo_lora_{when}_{i}.mp4")
            sample_video.main(trained_argv(prompt, out, steps=steps, extra=["--overwrite"] + extra))
            video = media.read_video(out)[0]
            seen[when] = world.describe(video)
            rows.append(media.preview_strip(video))
            print(f"{when:>6} LoRA: asked {prompt!r}, shows a {seen[when]['color']} shape moving "
                  f"{seen[when]['direction']}  ({out})", flush=True)
        results.append((prompt, seen["before"], seen["after"]))
    grid = np.concatenate([np.concatenate(rows[0::2], axis=0), np.concatenate(rows[1::2], axis=0)], axis=0)
    path = os.path.join(output_dir, "demo_lora_before_after.png")
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(tmp, format="PNG")
    print(f"wrote {path} (rows: before, before, after, after)", flush=True)
    return results


NOTICE = """\
The demo model has RANDOM weights: the video above is noise. It shows that the whole inference path
(config, SAT checkpoint, T5, sampler, VAE, mp4) works on this machine.
To generate real videos, download a CogVideoX SAT checkpoint (transformer/, vae/3d-vae.pt, a t5-v1_1-xxl
folder), set in configs/<model>.yaml  model_dir: <t5 folder>  and  ckpt_path: <...>/vae/3d-vae.pt, then run
  bash inference.sh --base configs/cogvideox_5b.yaml configs/inference.yaml --load <...>/transformer \\
      --prompt "..." --output-path out.mp4
(CogVideoX1.5: configs/cogvideox1.5_5b.yaml configs/inference_1.5.yaml; I2V: the *_i2v.yaml files with
--image-or-video-path <image>)."""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="sat-cogvideo demo: the trained tiny model of demo_model/ "
                                                 "(text-to-video), or a tiny random-weight model of each family "
                                                 "(image-to-video from a drawn first frame for the I2V models)")
    parser.add_argument("--model", default=TRAINED, choices=(TRAINED,) + DEMO_MODELS,
                        help="demo: the trained model of demo_model/; the others: random-weight tiny models")
    parser.add_argument("--folder", default=None, help="cache folder (default ~/.cache/sat-cogvideo/demo)")
    parser.add_argument("--output-path", default=None, help="default: outputs/demo_<model>.mp4")
    parser.add_argument("--prompt", default=None, help=f"default: {TRAINED_PROMPT!r} (trained), else a panda")
    parser.add_argument("--num-steps", type=int, default=10)
    parser.add_argument("--rebuild", action="store_true", help="delete the cached tiny model and build it again")
    parser.add_argument("--prepare-finetune", action="store_true", help="write the LoRA demo's dataset and exit")
    parser.add_argument("--compare-lora", metavar="RUN", default=None,
                        help="before/after previews of a LoRA run (auto: the newest outputs/demo_lora/demo-lora-*)")
    args, rest = parser.parse_known_args(argv)
    if args.prepare_finetune:
        print(prepare_finetune(args.folder))
        return 0
    if args.compare_lora:
        trained_model_dir()
        compare_lora(newest_run() if args.compare_lora == "auto" else args.compare_lora)
        return 0
    if args.model == TRAINED:
        return run_trained(args.prompt or TRAINED_PROMPT, args.output_path or os.path.join("outputs", "demo.mp4"),
                           args.num_steps, rest)
    args.prompt = args.prompt or DEMO_PROMPT
    folder = demo_dir(args.folder)
    if args.rebuild and os.path.isdir(folder):
        shutil.rmtree(folder)
    print(f">> tiny model in {folder} (built once, then cached)", file=sys.stderr, flush=True)
    paths = build_demo(folder, models=(args.model,))
    output = args.output_path or os.path.join("outputs", f"demo_{args.model}.mp4")
    from sat_cogvideo import sample_video

    run_argv = demo_argv(paths, args.model, output, prompt=args.prompt, steps=args.num_steps,
                         extra=["--overwrite"] + rest, image=paths.get("image") if is_i2v(args.model) else None)
    print(">> sample_video " + " ".join(run_argv), file=sys.stderr, flush=True)
    sample_video.main(run_argv)
    print(f"\nwrote {output}\n\n{NOTICE}")
    return 0


if __name__ == "__main__":
    from sat_cogvideo.errors import run_cli

    sys.exit(run_cli(main)())
