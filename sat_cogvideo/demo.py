"""A tiny random-weight CogVideoX in the real on-disk formats, built once and cached; and the demo run.

``build_demo(folder)`` writes, for the tiny configs of ``configs/tiny/`` (hidden 64, 2 layers):

```
<folder>/
  t5/                                      tiny T5 v1.1 encoder folder (config.json, sharded safetensors
                                           + index, spiece.model, tokenizer configs), as t5-v1_1-xxl
  vae/3d-vae.pt                            {"state_dict": encoder.* / decoder.*}, as the released file
  <model>/transformer/latest               "1"
  <model>/transformer/1/mp_rank_00_model_states.pt   {"module": model.diffusion_model.*}
```

The tiny configs find the folder through ``${oc.env:SAT_COGVIDEO_DEMO}``; :func:`demo_dir` sets that variable.
Weights are random (seeded), so the generated video is noise: the demo exercises the whole inference path
(config, checkpoint loading, T5, sampler, VAE, mp4) in seconds on a CPU.

``python -m sat_cogvideo.demo`` (``bash inference.sh`` without arguments) builds the folder if needed and
runs text-to-video on one prompt.
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
DEMO_PROMPT = "A panda, dressed in a small red jacket and a tiny hat, sits on a wooden stool in a bamboo forest."
FORMAT_VERSION = "1"


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


def _ready(path: str) -> bool:
    try:
        with open(path) as f:
            return f.read().strip() == FORMAT_VERSION
    except OSError:
        return False


def _mark_ready(path: str) -> None:
    from sat_cogvideo.atomic import atomic_write_text

    atomic_write_text(path, FORMAT_VERSION + "\n")


def _randomize(module, seed: int, scale: float = 0.05, skip=()) -> None:
    """Random, seeded, non-zero values for every floating parameter (zero-initialised layers included),
    drawn from a private generator (the global RNG is untouched).  Buffers (computed tables) are kept."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.named_parameters():
            if not t.is_floating_point() or name in skip:
                continue
            if name.endswith("weight") and ("norm" in name.lower() or "ln" in name.lower()) and t.ndim == 1:
                t.copy_(1.0 + scale * torch.randn(t.shape, generator=gen))
            else:
                t.copy_(scale * torch.randn(t.shape, generator=gen))


def build_t5(folder: str, model_config) -> str:
    from sat_cogvideo.tiny_t5 import build_tiny_t5

    d_model = int(model_config.network_config.params.modules.patch_embed_config.params.text_hidden_size)
    return build_tiny_t5(os.path.join(folder, "t5"), d_model=d_model, num_layers=2, num_heads=2, d_kv=16,
                         d_ff=2 * d_model, seed=0)


def build_vae(folder: str, model_config, seed: int = 1) -> str:
    """``vae/3d-vae.pt`` with the tiny VAE's random weights under ``state_dict`` (and no ``loss.*`` keys)."""
    import torch
    from omegaconf import OmegaConf
    from sgm.util import instantiate_from_config
    from sat_cogvideo.atomic import atomic_torch_save

    path = os.path.join(folder, "vae", "3d-vae.pt")
    if os.path.isfile(path):
        return path
    cfg = OmegaConf.to_container(model_config.first_stage_config, resolve=False)
    cfg["params"].pop("ckpt_path", None)
    vae = instantiate_from_config(cfg)
    _randomize(vae, seed, scale=0.05)
    sd = {k: v.detach().clone().contiguous() for k, v in vae.state_dict().items()}
    atomic_torch_save({"state_dict": sd}, path)
    return path


def build_transformer(folder: str, model: str, model_config, seed: int = 2) -> str:
    """``<model>/transformer/{latest, 1/mp_rank_00_model_states.pt}`` with random DiT weights."""
    import torch
    from omegaconf import OmegaConf
    from sgm.util import instantiate_from_config
    from sat_cogvideo.distributed import init_distributed
    from sat_cogvideo.atomic import atomic_torch_save, atomic_write_text

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
    _randomize(dit, seed, scale=0.05, skip=frozen)
    # as the released files: computed tables are not stored
    sd = {"model.diffusion_model." + k: v.detach().clone().contiguous() for k, v in dit.state_dict().items()
          if k not in frozen}
    atomic_torch_save({"module": sd, "iteration": 1}, os.path.join(tdir, "1", "mp_rank_00_model_states.pt"))
    atomic_write_text(marker, "1\n")
    return tdir


def build_demo(folder: Optional[str] = None, models=(DEFAULT_MODEL,)) -> Dict[str, str]:
    """Build (once) the tiny model folder; returns paths: ``folder``, ``t5``, ``vae``, ``<model>`` (transformer
    folder of each model) and ``config:<model>`` (its YAML)."""
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
    return paths


def demo_argv(paths: Dict[str, str], model: str, output: str, prompt: str = DEMO_PROMPT, steps: int = 10,
              extra=()) -> list:
    """``sample_video`` arguments for a t2v run of the tiny ``model``."""
    from omegaconf import OmegaConf

    mc = _model_config(model)
    net = mc.network_config.params
    num_frames = int(net.num_frames)
    patch = net.patch_size
    is15 = not isinstance(patch, int)
    argv = ["--base", paths["config:" + model], "--load", paths[model], "--prompt", prompt,
            "--output-path", output, "--num-frames", str(num_frames), "--num-steps", str(steps),
            "--sampling-fps", "16" if is15 else "8", "--device", "cpu", "--seed", "42"]
    if is15:
        argv += ["--sampling-image-size", f"{8 * int(net.latent_height)},{8 * int(net.latent_width)}"]
    return argv + list(extra)


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
    parser = argparse.ArgumentParser(description="sat-cogvideo demo: a tiny random-weight model, text-to-video")
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=DEMO_MODELS)
    parser.add_argument("--folder", default=None, help="cache folder (default ~/.cache/sat-cogvideo/demo)")
    parser.add_argument("--output-path", default=None, help="default: outputs/demo_<model>.mp4")
    parser.add_argument("--prompt", default=DEMO_PROMPT)
    parser.add_argument("--num-steps", type=int, default=10)
    parser.add_argument("--rebuild", action="store_true", help="delete the cached tiny model and build it again")
    args, rest = parser.parse_known_args(argv)
    folder = demo_dir(args.folder)
    if args.rebuild and os.path.isdir(folder):
        shutil.rmtree(folder)
    print(f">> tiny model in {folder} (built once, then cached)", file=sys.stderr, flush=True)
    paths = build_demo(folder, models=(args.model,))
    output = args.output_path or os.path.join("outputs", f"demo_{args.model}.mp4")
    from sat_cogvideo import sample_video

    run_argv = demo_argv(paths, args.model, output, prompt=args.prompt, steps=args.num_steps,
                         extra=["--overwrite"] + rest)
    print(">> sample_video " + " ".join(run_argv), file=sys.stderr, flush=True)
    sample_video.main(run_argv)
    print(f"\nwrote {output}\n\n{NOTICE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
