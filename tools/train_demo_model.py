#!/usr/bin/env python
"""Train the demo model: a tiny CogVideoX that has learned a small visual world (sat_cogvideo/demo_world.py).

    python tools/train_demo_model.py --output demo_model            # the committed model (seed 0, iteration 3200)

Steps, all seeded from ``--seed`` (scratch files in ``--work``: dataset, SAT run folders ``runs/``, logs, latent
cache):

1. data: ``--clips`` clips per training combination of colour x shape x direction (the held-out combinations and
   the new colour are never shown), written as a finetuning dataset ``<work>/dataset/{labels,videos}``;
2. VAE: the tiny 3D causal VAE of ``vae_modules`` (the real encoder/decoder classes) trained on clips of every
   colour (the generic codec) on reconstruction (L1 + MSE) plus a small KL term, written as ``<output>/vae/3d-vae.pt`` (``{"state_dict": ...}``); the latent
   scale factor of the model configs is 1 / (the latents' standard deviation), as CogVideoX's 0.7;
3. T5: the frozen tiny T5 folder (random weights, ``sat_cogvideo.tiny_t5``) at ``<output>/t5``, its tokenizer
   trained on the demo's captions;
4. DiTs: each model of ``--models`` trained from scratch for ``--dit-iters`` by ``python -m
   sat_cogvideo.train_video`` (full SFT, SAT's loop, DeepSpeed, ``mode: pretrain`` without ``load``, lr constant) on
   ``cache_latents: <work>/latent_cache`` (each clip VAE-encoded and its caption T5-embedded once; the I2V DiT trains
   on the fly: the cache refuses I2V), with ``save_ema`` (the optimizer's EMA of the weights, written as
   ``<iter>-ema/``); the EMA weights of the last iteration are copied to ``<output>/<model>/transformer/<iter>/``
   with ``latest`` (at a constant lr 0.002 the raw weights of neighbouring checkpoints differ in what they draw; the
   EMA's decay (1 + k) / (10 + k), k counting optimizer steps, two per iteration here (ZeRO-2 steps the weight and
   the no-decay groups apart), makes its time constant ~700 iterations at the end of 3200); the model config is
   ``<output>/<model>.yaml``;
5. ``<output>/training.json``: the command, the loss curves and timings; ``<output>/README.md``: only the block
   between ``<!-- curves:begin -->`` and ``<!-- curves:end -->`` is regenerated from it (the rest is written by
   hand; without a README or markers a minimal one is written).

Ours: the original has no demo model.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sat_cogvideo import demo_world as world  # noqa: E402
from sat_cogvideo.atomic import atomic_write_text  # noqa: E402
from sat_cogvideo.errors import UserError, run_cli  # noqa: E402

ENV_VAR = "SAT_COGVIDEO_DEMO_MODEL"
MODELS = {  # name -> (template config, DiT sizes)
    "cogvideox_5b": ("cogvideox_5b.yaml", dict(hidden_size=128, num_layers=4, num_attention_heads=4)),
    "cogvideox_5b_i2v": ("cogvideox_5b_i2v.yaml", dict(hidden_size=128, num_layers=4, num_attention_heads=4)),
}
TEXT_LENGTH = 32
T5_DIM = 64


# -----------------------------------------------------------------------------------------------------------
# data


def clip_tensor(clips) -> torch.Tensor:
    """uint8 ``[N, F, H, W, 3]`` -> float ``[N, 3, F, H, W]`` in [-1, 1] (the VAE's input)."""
    x = torch.from_numpy(np.asarray(clips)).float() / 127.5 - 1.0
    return x.permute(0, 4, 1, 2, 3).contiguous()


# -----------------------------------------------------------------------------------------------------------
# configs


def _template(name: str):
    from omegaconf import OmegaConf

    return OmegaConf.load(os.path.join(ROOT, "configs", "tiny", name))


def model_config(name: str, scale_factor: float):
    """The model config of ``name``: the tiny template with the demo's sizes and files."""
    template, sizes = MODELS[name]
    cfg = _template(template)
    m = cfg.model
    m.scale_factor = float(scale_factor)
    net = m.network_config.params
    latent = world.SIZE // 8
    net.num_frames = world.FRAMES
    net.latent_width = net.latent_height = latent
    for k, v in sizes.items():
        net[k] = v
    net.time_embed_dim = sizes["hidden_size"]
    mods = net.modules
    mods.pos_embed_config.params.hidden_size_head = sizes["hidden_size"] // sizes["num_attention_heads"]
    mods.pos_embed_config.params.text_length = TEXT_LENGTH
    mods.patch_embed_config.params.text_hidden_size = T5_DIM
    emb = m.conditioner_config.params.emb_models
    for e in emb:
        if "model_dir" in e.params:
            e.params.model_dir = "${oc.env:" + ENV_VAR + ",demo_model}/t5"
            e.params.max_length = TEXT_LENGTH
    m.first_stage_config.params.ckpt_path = "${oc.env:" + ENV_VAR + ",demo_model}/vae/3d-vae.pt"
    for part in ("encoder_config", "decoder_config"):
        m.first_stage_config.params[part].params.ch_mult = [1, 1, 1, 1]
    return cfg


def vae_from_config(cfg):
    from omegaconf import OmegaConf

    from sgm.util import instantiate_from_config

    vcfg = OmegaConf.to_container(cfg.model.first_stage_config, resolve=False)
    vcfg["params"].pop("ckpt_path", None)
    return instantiate_from_config(vcfg)


def sft_config(work: str, args, name: str):
    """The finetuning config of a from-scratch run (SAT args, data, DeepSpeed)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(os.path.join(ROOT, "configs", "tiny", "sft.yaml"))
    a = cfg.args
    a.experiment_name = name
    a.mode = "pretrain"
    a.load = None
    a.train_iters = args.dit_iters
    a.save = os.path.join(work, "runs")
    a.save_interval = min(args.dit_iters, 200)  # models to look at while it trains (and to use if a run is cut short)
    a.log_interval = log_interval(args.dit_iters)
    a.eval_interval = 10 ** 9
    a.train_data = [os.path.join(work, "dataset")]
    a.seed = args.seed
    # constant: the checkpoint of iteration k is the model of a k-iteration run (a cut-short run stays a recipe)
    a.lr_decay_style = "constant"
    a.warmup = 0.0
    a.save_ema = True  # <iter>-ema/ beside each checkpoint: the weights the demo ships (sat_cogvideo.ema)
    if "i2v" in name:  # latent_cache refuses image-to-video models (their first frame is noised in pixels)
        a.num_workers = 1  # decode the next clips while the model computes
    else:
        a.cache_latents = os.path.join(work, "latent_cache")
        a.num_workers = 0  # nothing to decode: the cache is read
    cfg.data.params.video_size = [world.SIZE, world.SIZE]
    cfg.data.params.fps = world.FPS
    cfg.data.params.max_num_frames = world.FRAMES
    ds = cfg.deepspeed
    ds.train_micro_batch_size_per_gpu = args.batch
    ds.gradient_clipping = 1.0
    ds.optimizer.params.lr = args.lr
    ds.optimizer.params.weight_decay = 0.0
    return cfg


def log_interval(iters: int) -> int:
    """Every 10th iteration's loss (every one for a run of under 20 iterations: the tests' tiny runs)."""
    return max(1, min(10, iters // 10))


# -----------------------------------------------------------------------------------------------------------
# VAE


def train_vae(clips: torch.Tensor, cfg, steps: int, batch: int, lr: float, kl_weight: float, seed: int):
    """Train the tiny VAE on ``clips``; returns (vae, curve of (step, reconstruction L1))."""
    torch.manual_seed(seed)
    vae = vae_from_config(cfg)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    curve, running = [], []
    for step in range(1, steps + 1):
        x = clips[torch.randint(len(clips), (batch,), generator=gen)]
        flips = torch.rand(batch, generator=gen) < 0.5  # mirrored clips: more positions for free
        x = torch.where(flips[:, None, None, None, None], x.flip(-1), x)
        z, reg = vae.encode(x, return_reg_log=True)
        y = vae.decode(z)
        rec = (y - x).abs().mean()
        loss = rec + 2.0 * ((y - x) ** 2).mean() + kl_weight * reg["kl_loss"].mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        running.append(float(rec.detach()))
        if step % 25 == 0 or step == steps:
            curve.append((step, float(np.mean(running))))
            print(f"vae step {step}/{steps}: L1 {curve[-1][1]:.4f}", flush=True)
            running = []
    vae.eval()
    return vae, curve


@torch.no_grad()
def latent_std(vae, clips: torch.Tensor) -> float:
    zs = [vae.encode(clips[i:i + 8]) for i in range(0, min(len(clips), 64), 8)]
    return float(torch.cat(zs).std())


@torch.no_grad()
def vae_psnr(vae, clips: torch.Tensor) -> float:
    x = clips[:16]
    y = vae.decode(vae.encode(x, unregularized=True)[0].chunk(2, dim=1)[0]).clamp(-1, 1)
    mse = float((((y - x) / 2) ** 2).mean())
    return 10 * np.log10(1.0 / max(mse, 1e-12))


# -----------------------------------------------------------------------------------------------------------
# DiT through train_video


LOSS_RE = re.compile(r"iteration\s+(\d+)\s*/\s*\d+.*?loss[^0-9]*([0-9.]+E[+-]\d+|[0-9.]+)", re.IGNORECASE)


def run_train_video(name: str, cfg, out: str, work: str, args) -> dict:
    """Run ``sat_cogvideo.train_video`` on ``<out>/<name>.yaml`` + ``cfg`` (log: ``<work>/train_<experiment>.log``).
    Returns its loss curve, its seconds and, with a latent cache, the seconds until the cache was ready (the line
    ``prepare_cache`` prints)."""
    from omegaconf import OmegaConf

    label = cfg.args.experiment_name
    sft = os.path.join(work, f"sft_{label}.yaml")
    OmegaConf.save(cfg, sft)
    env = dict(os.environ, **{ENV_VAR: out, "OMP_NUM_THREADS": str(args.threads)})
    cmd = [sys.executable, "-m", "sat_cogvideo.train_video", "--base", os.path.join(out, f"{name}.yaml"), sft,
           "--device", "cpu"]
    print(">> " + " ".join(cmd), flush=True)
    t0 = time.time()
    result = {"curve": []}
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p, \
            open(os.path.join(work, f"train_{label}.log"), "w", encoding="utf-8") as log:
        for line in p.stdout:
            log.write(line)
            if "latent cache" in line and "videos found" in line:
                result["cache_seconds"] = round(time.time() - t0, 1)
            m = LOSS_RE.search(line)
            if m:
                it, loss = int(m.group(1)), float(m.group(2))
                result["curve"].append((it, loss))
                print(f"{label} iteration {it}: loss {loss:.4f}", flush=True)
    if p.returncode:
        raise SystemExit(f"error: train_video failed for {label} (see {work}/train_{label}.log)")
    result["seconds"] = round(time.time() - t0, 1)
    return result


def train_dit(name: str, out: str, work: str, args) -> dict:
    """The DiT from scratch; the EMA weights of its last checkpoint are copied into ``out/name/transformer``.
    Returns the run's report (curve, seconds, cache seconds, iteration)."""
    cfg = sft_config(work, args, name)
    report = run_train_video(name, cfg, out, work, args)
    report["iteration"] = copy_final_checkpoint(os.path.join(work, "runs"), name, out, name)
    report["cache_latents"] = bool(cfg.args.get("cache_latents"))
    return report


def copy_final_checkpoint(runs: str, prefix: str, out: str, name: str) -> int:
    """The newest ``<runs>/<prefix>-*/<iter>-ema/mp_rank_00_model_states.pt`` (its ``module`` only) ->
    ``out/name/transformer/<iter>/`` with ``latest``; other tags there are removed.  Returns the tag."""
    from sat_cogvideo.atomic import atomic_torch_save
    from sat_cogvideo.checkpoint import load_torch_file

    run = sorted(d for d in os.listdir(runs) if d.startswith(prefix + "-"))[-1]
    with open(os.path.join(runs, run, "latest")) as f:
        it = f.read().strip()
    tag = str(int(it))
    target = os.path.join(out, name, "transformer")
    os.makedirs(os.path.join(target, tag), exist_ok=True)
    state = load_torch_file(os.path.join(runs, run, f"{it}-ema", "mp_rank_00_model_states.pt"), what="checkpoint")
    atomic_torch_save({"module": state["module"]}, os.path.join(target, tag, "mp_rank_00_model_states.pt"))
    atomic_write_text(os.path.join(target, "latest"), tag + "\n")
    for old in os.listdir(target):
        if old not in (tag, "latest"):
            shutil.rmtree(os.path.join(target, old))
    return int(tag)


# -----------------------------------------------------------------------------------------------------------
# README: only the training-curves block is regenerated (the rest of demo_model/README.md is written by hand)


CURVES_BEGIN, CURVES_END = "<!-- curves:begin -->", "<!-- curves:end -->"
MINIMAL_README = """\
# A demo model: a tiny CogVideoX trained on a small visual world

Made by `tools/train_demo_model.py` (`training.json` holds the losses and timings of the run):

```bash
{command}
```

The repository's `demo_model/README.md` describes the world, the layout and the recipe.

## Training curves

{block}
"""


def _pick(curve, n: int):
    """``n`` evenly spaced entries of ``curve`` (all of them when it is shorter), as tuples."""
    return [tuple(curve[int(round(i))]) for i in np.linspace(0, len(curve) - 1, min(n, len(curve)))] if curve else []


def curves_block(report: dict, name: str) -> str:
    """The curves table of ``training.json``'s content: ten rows of the VAE's curve beside ten of the DiT's."""
    vrows = _pick(report.get("vae", {}).get("curve", []), 10)
    drows = _pick(report.get(name, {}).get("curve", []), 10)
    lines = ["| VAE step | L1 (pixels in [-1, 1]) |   | DiT iteration | loss |", "|---:|---:|---|---:|---:|"]
    for i in range(max(len(vrows), len(drows))):
        v = f"{vrows[i][0]} | {vrows[i][1]:.4f}" if i < len(vrows) else " | "
        d = f"{drows[i][0]} | {drows[i][1]:.4f}" if i < len(drows) else " | "
        lines.append(f"| {v} |   | {d} |")
    return "\n".join(lines) + "\n"


def write_readme(out: str, report: dict, name: str) -> None:
    """Replace what lies between the curves markers of ``<out>/README.md`` by :func:`curves_block`; without a
    README or its markers, write a minimal one (the command and the curves)."""
    path = os.path.join(out, "README.md")
    block = f"{CURVES_BEGIN}\n\n{curves_block(report, name)}\n{CURVES_END}"
    text = open(path, encoding="utf-8").read() if os.path.isfile(path) else ""
    begin, end = text.find(CURVES_BEGIN), text.find(CURVES_END)
    if 0 <= begin < end:
        text = text[:begin] + block + text[end + len(CURVES_END):]
    else:
        text = MINIMAL_README.format(command=report["command"], block=block)
    atomic_write_text(path, text)


# -----------------------------------------------------------------------------------------------------------
# main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output", default=os.path.join(ROOT, "demo_model"))
    p.add_argument("--work", default=None,
                   help="scratch folder (dataset, runs, logs); default ~/.cache/sat-cogvideo/demo_work")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", nargs="+", default=["cogvideox_5b"], choices=sorted(MODELS))
    p.add_argument("--clips", type=int, default=10, help="clips per training combination")
    p.add_argument("--vae-steps", type=int, default=500)
    p.add_argument("--vae-batch", type=int, default=3)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=1e-3)
    p.add_argument("--dit-iters", type=int, default=3200, help="DiT iterations from scratch")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    p.add_argument("--skip-vae", action="store_true", help="keep <output>/vae and the model configs")
    return p.parse_args(argv)


def build_vae_and_configs(args, out: str, work: str, report: dict) -> None:
    from sat_cogvideo.vae_modules import save_vae_checkpoint

    rng = np.random.default_rng(args.seed + 1)
    # the VAE is the generic codec: it sees every colour (the new one included), as the real VAE has seen all images
    combos = world.combinations(list(world.COLORS) + [world.NEW_COLOR[0]])
    clips = clip_tensor([world.make_clip(*combos[i % len(combos)], rng) for i in range(len(combos) * 8)])
    t0 = time.time()
    cfg = model_config(args.models[0], 1.0)
    vae, curve = train_vae(clips, cfg, args.vae_steps, args.vae_batch, args.vae_lr, args.kl_weight, args.seed)
    std = latent_std(vae, clips)
    report["vae"] = {"curve": curve, "seconds": round(time.time() - t0, 1), "latent_std": std,
                     "psnr_db": round(vae_psnr(vae, clips), 2)}
    print(f"vae: {report['vae']['seconds']} s, latent std {std:.3f}, PSNR {report['vae']['psnr_db']} dB", flush=True)
    save_vae_checkpoint(vae, os.path.join(out, "vae", "3d-vae.pt"))
    write_configs(out, args.models, round(1.0 / std, 4))


def build_t5(out: str, seed: int) -> str:
    """``<out>/t5``: the tiny T5 encoder folder (random, frozen weights) whose SentencePiece model is trained on the
    demo's captions (every colour, the new one included), so that each word of the world is one or two pieces
    (the stock tiny tokenizer, trained on other sentences, spells most of these words letter by letter)."""
    import io

    import sentencepiece as spm

    from sat_cogvideo.tiny_t5 import build_tiny_t5

    folder = build_tiny_t5(os.path.join(out, "t5"), d_model=T5_DIM, num_layers=2, num_heads=2, d_kv=32, d_ff=128,
                           seed=seed, overwrite=True)
    captions = [world.caption(*c) for c in world.combinations(list(world.COLORS) + [world.NEW_COLOR[0]])]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions * 4), model_writer=model, vocab_size=64, model_type="word",
        character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>",
        unk_piece="<unk>", num_threads=1, minloglevel=2, hard_vocab_limit=False, shuffle_input_sentence=False)
    with open(os.path.join(folder, "spiece.model"), "wb") as f:
        f.write(model.getvalue())
    return folder


INFERENCE_YAML = """\
# Inference settings of the trained demo model (written by tools/train_demo_model.py): 9 frames of 32x32 at 8 fps.
args:
  image2video: False
  latent_channels: 16
  mode: inference
  batch_size: 1
  input_type: cli
  sampling_image_size: [32, 32]
  sampling_num_frames: 3
  sampling_fps: 8
  output_dir: outputs/demo
  force_inference: True
"""


def write_configs(out: str, models, scale_factor: float) -> None:
    """``<out>/<model>.yaml`` per model, ``<out>/cogvideox_5b_lora.yaml`` (the finetuning demo's LoRA model: rank 4
    (scale lora_alpha / r = 2) on the attention, everything else frozen) and ``<out>/inference.yaml``."""
    from omegaconf import OmegaConf

    for name in models:
        OmegaConf.save(model_config(name, scale_factor), os.path.join(out, f"{name}.yaml"))
    lora = model_config("cogvideox_5b", scale_factor)
    lora.model.not_trainable_prefixes = ["all"]
    lora.model.network_config.params.modules.lora_config = {"target": "sat.model.finetune.lora2.LoraMixin",
                                                            "params": {"r": 4, "lora_alpha": 8}}
    OmegaConf.save(lora, os.path.join(out, "cogvideox_5b_lora.yaml"))
    with open(os.path.join(out, "inference.yaml"), "w", encoding="utf-8") as f:
        f.write(INFERENCE_YAML)


def check_args(args) -> None:
    if args.dit_iters < 1:
        raise UserError(f"--dit-iters {args.dit_iters}: the DiT needs at least one iteration; pass a count >= 1")


@run_cli
def main(argv=None) -> int:
    args = parse_args(argv)
    check_args(args)
    torch.set_num_threads(args.threads)
    out = os.path.abspath(args.output)
    cache = os.environ.get("SAT_COGVIDEO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sat-cogvideo")
    work = os.path.abspath(args.work or os.path.join(cache, "demo_work"))
    os.makedirs(out, exist_ok=True)
    report_path = os.path.join(out, "training.json")
    report = {"command": " ".join(["python", "tools/train_demo_model.py"] + list(sys.argv[1:] if argv is None
                                                                                  else argv)),
              "seed": args.seed}
    if args.skip_vae and os.path.isfile(report_path):
        report.update({k: v for k, v in json.load(open(report_path)).items() if k in ("vae", "data_seconds")})
    t0 = time.time()
    if not os.path.isdir(os.path.join(work, "dataset", "videos")):
        shutil.rmtree(work, ignore_errors=True)
        combos = world.training_combinations()
        world.write_dataset(os.path.join(work, "dataset"), combos, args.clips, args.seed)
        report["data_seconds"] = round(time.time() - t0, 1)
    shutil.rmtree(os.path.join(work, "runs"), ignore_errors=True)
    if not args.skip_vae:
        build_vae_and_configs(args, out, work, report)
        atomic_write_text(report_path, json.dumps(report, indent=1))
    build_t5(out, args.seed)
    for name in args.models:
        report[name] = train_dit(name, out, work, args)
        report["total_seconds"] = round(time.time() - t0, 1)
        atomic_write_text(report_path, json.dumps(report, indent=1))
    write_readme(out, report, args.models[0])
    print(f"done in {report['total_seconds']} s -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
