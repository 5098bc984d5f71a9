#!/usr/bin/env python
"""Training-step benchmark of the DiT: ours (SAT DiffusionTransformer, LoRA via SAT's LoraMixin) vs diffusers
(CogVideoXTransformer3DModel with our converted weights, LoRA via PEFT from our exported adapter), LoRA vs full
finetuning, with and without activation checkpointing (ours: ``transformer_args.checkpoint_activations``;
diffusers: ``enable_gradient_checkpointing()``).

One step = forward + MSE loss + backward + AdamW step on the trainable parameters (the VAE and T5 are frozen and
run without gradients in finetuning, so their cost is the same in every configuration and is left out).
Reported per configuration (medians over ``--repeats`` interleaved rounds): wall time, process CPU time, the bytes
autograd saves for backward (exact, via ``saved_tensors_hooks``) and the peak RSS rise during the step (sampled).

    .venv/bin/python benchmarks/bench_train.py --sizes tiny mid --repeats 3

``--cache``: a whole finetuning step (data item, VAE encode / cache read, T5 / cache read, DiT forward and
backward, AdamW) of the engine on the fly vs on ``--cache-latents`` entries (sat_cogvideo.latent_cache), same
weights, same process; step time, peak RSS rise during the step, and the engine's parameter bytes (the cached
engine holds no VAE or T5).  tiny = the demo's CogVideoX-2B LoRA (9 frames 64x96); mid = a DiT of hidden 256 x 4
layers with a VAE of ch 64, ch_mult [1,2,2,4], 2 res blocks, on 17 frames of 128x192.

    .venv/bin/python benchmarks/bench_train.py --cache --sizes tiny mid --repeats 5

``--zero``: full finetuning on 2 processes (torchrun, gloo) with DeepSpeed ZeRO-2, ZeRO-3 (configs/sft_zero3.yaml)
and ZeRO-3 + CPU offload (configs/sft_zero3_offload.yaml), on cached latents; per rank: the bytes of the DiT's parameters,
gradients and optimizer state held by that rank (counted from the live DeepSpeed objects) and the peak RSS of the
process.  On a CPU-only machine "offloaded" state is in the same memory, so the RSS column cannot show offloading;
the per-rank state bytes are what a GPU would hold (offloaded state counted apart).

    .venv/bin/python benchmarks/bench_train.py --zero --sizes tiny mid
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

SIZES = {  # hidden, layers, heads, latent (t, h, w), text tokens, lora r
    "tiny": dict(hidden=64, layers=2, heads=2, latent=(3, 8, 12), text=16, r=4),
    "mid": dict(hidden=256, layers=4, heads=4, latent=(5, 16, 24), text=64, r=32),
}


def network_config(size: str, lora: bool, ckpt: bool):
    from omegaconf import OmegaConf

    s = SIZES[size]
    cfg = OmegaConf.load(os.path.join(ROOT, "configs", "tiny", "cogvideox_5b_lora.yaml")).model.network_config
    p = cfg.params
    p.hidden_size, p.num_layers, p.num_attention_heads = s["hidden"], s["layers"], s["heads"]
    t, h, w = s["latent"]
    p.num_frames, p.latent_height, p.latent_width = 4 * (t - 1) + 1, h, w
    p.transformer_args.checkpoint_activations = ckpt
    p.transformer_args.max_sequence_length = max(64, s["text"])
    p.modules.pos_embed_config.params.hidden_size_head = s["hidden"] // s["heads"]
    p.modules.pos_embed_config.params.text_length = s["text"]
    if lora:
        p.modules.lora_config.params.r = s["r"]
    else:
        del p.modules["lora_config"]
    return cfg


def build_pair(size: str, lora: bool, ckpt: bool):
    from diffusers import CogVideoXTransformer3DModel
    from helpers import randomize_
    from sgm.util import instantiate_from_config

    from sat_cogvideo.convert.lora import export_lora_sat_to_diffusers, split_lora_state_dict
    from sat_cogvideo.convert.transformer import diffusers_transformer_config, sat_to_diffusers_transformer

    cfg = network_config(size, lora, ckpt)
    ours = instantiate_from_config(cfg)
    randomize_(ours, seed=0, scale=0.05)
    pos = ours.mixins["pos_embed"]
    pos.reset_tables() if hasattr(pos, "reset_tables") else pos.reset_table()
    base, _ = split_lora_state_dict(ours.state_dict())
    conf = diffusers_transformer_config(cfg, sample_size=(cfg.params.latent_height, cfg.params.latent_width))
    hf = CogVideoXTransformer3DModel(**conf)
    hf.load_state_dict(sat_to_diffusers_transformer(base, learned_positional_embeddings=False), strict=True)
    if lora:
        hf.load_lora_adapter(export_lora_sat_to_diffusers(ours.state_dict()), adapter_name="sat", prefix="transformer")
        hf.set_adapters(["sat"], weights=[1.0 / SIZES[size]["r"]])
        for n, p in ours.named_parameters():
            p.requires_grad_(".matrix_A." in n or ".matrix_B." in n)
        for n, p in hf.named_parameters():
            p.requires_grad_("lora_" in n)
    else:
        for model in (ours, hf):
            for p in model.parameters():
                p.requires_grad_(True)
        ours.mixins["pos_embed"].requires_grad_(False)
    if ckpt:
        hf.enable_gradient_checkpointing()
    return ours.train(), hf.train(), conf


def inputs(size: str, seed: int = 1):
    s = SIZES[size]
    g = torch.Generator().manual_seed(seed)
    t, h, w = s["latent"]
    x = torch.randn(1, t, 16, h, w, generator=g)
    ctx = torch.randn(1, s["text"], 32, generator=g)
    return x, torch.tensor([500.0]), ctx


def rope(conf, x):
    from test_transformer import diffusers_rope

    return diffusers_rope(conf, x)


class RssPeak:
    """Peak resident set size rise while the block runs (sampled every 2 ms from /proc/self/statm)."""

    def __enter__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self._rss()
        self.peak = self.start
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _poll(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self._rss())
        self.rise = self.peak - self.start


def step(model, opt, run):
    saved = [0, 0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        saved[1] = max(saved[1], saved[0])
        return t

    def unpack(t):
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = run(model)
    loss = out.float().pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return saved[1]


def measure(size: str, lora: bool, ckpt: bool, repeats: int):
    ours, hf, conf = build_pair(size, lora, ckpt)
    x, ts, ctx = inputs(size)
    image_rotary_emb = rope(conf, x)
    runs = {
        "ours": (ours, lambda m: m(x, ts, ctx)),
        "diffusers": (hf, lambda m: m(x, ctx, ts, image_rotary_emb=image_rotary_emb, return_dict=False)[0]),
    }
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, (m, _) in runs.items()}
    stats = {k: {"wall": [], "cpu": [], "saved": 0, "rss": []} for k in runs}
    for name, (model, run) in runs.items():  # warm-up
        step(model, opts[name], run)
    for _ in range(repeats):
        for name, (model, run) in runs.items():
            w0, c0 = time.perf_counter(), time.process_time()
            with RssPeak() as peak:
                stats[name]["saved"] = step(model, opts[name], run)
            stats[name]["wall"].append(time.perf_counter() - w0)
            stats[name]["cpu"].append(time.process_time() - c0)
            stats[name]["rss"].append(peak.rise)
    trainable = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, (m, _) in runs.items()}
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return {k: dict(wall=med(v["wall"]), cpu=med(v["cpu"]), saved=v["saved"], rss=med(v["rss"]),
                    trainable=trainable[k]) for k, v in stats.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=list(SIZES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache", action="store_true", help="on-the-fly vs cached latents (see the module docstring)")
    ap.add_argument("--zero", action="store_true", help="ZeRO-2 / ZeRO-3 / ZeRO-3 + offload memory per rank")
    args = ap.parse_args(argv)
    if args.zero:
        return zero_main(args.sizes)
    if args.threads:
        torch.set_num_threads(args.threads)
    from sat_cogvideo.distributed import init_distributed

    init_distributed(device="cpu")
    if args.cache:
        return cache_main(args.sizes, args.repeats)
    mib = 1024 ** 2
    print("| size | mode | ckpt | trainable params | wall ours / diffusers (s) | ratio | CPU ratio | "
          "saved activations ours / diffusers (MiB) | ratio | peak RSS rise ours / diffusers (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        for lora in (True, False):
            for ckpt in (False, True):
                r = measure(size, lora, ckpt, args.repeats)
                o, d = r["ours"], r["diffusers"]
                print(f"| {size} | {'LoRA' if lora else 'full'} | {'on' if ckpt else 'off'} | {o['trainable']:,} / "
                      f"{d['trainable']:,} | {o['wall']:.3f} / {d['wall']:.3f} | {o['wall'] / d['wall']:.2f} | "
                      f"{o['cpu'] / d['cpu']:.2f} | {o['saved'] / mib:.1f} / {d['saved'] / mib:.1f} | "
                      f"{o['saved'] / max(d['saved'], 1):.2f} | {o['rss'] / mib:.1f} / {d['rss'] / mib:.1f} |",
                      flush=True)


# ------------------------------------------------------------------------------------------------------------
# on the fly vs --cache-latents

CACHE_SIZES = {  # overrides of the tiny demo configs
    "tiny": "",
    "mid": """model:
  network_config:
    params: {hidden_size: 256, num_layers: 4, num_attention_heads: 4, num_frames: 17, latent_height: 16,
             latent_width: 24, modules: {lora_config: {params: {r: 32}}}}
  first_stage_config:
    params:
      ckpt_path: VAE
      encoder_config: {params: {ch: 64, ch_mult: [1, 2, 2, 4], num_res_blocks: 2}}
      decoder_config: {params: {ch: 64, ch_mult: [1, 2, 2, 4], num_res_blocks: 2}}
data:
  params: {video_size: [128, 192], max_num_frames: 17}
""",
}


def cache_setup(size: str, tmp: str):
    """(args on the fly, args on the cache, cached dataset, pixel dataset) for ``size``, the cache filled."""
    from omegaconf import OmegaConf

    from sat_cogvideo import demo, latent_cache
    from sat_cogvideo.arguments import get_args
    from sat_cogvideo.data_video import SFTDataset
    from sat_cogvideo.train_video import add_finetune_args

    folder = demo.prepare_demo(os.path.join(tmp, "demo"))
    data = os.path.join(tmp, f"data_{size}")
    h, w, f = (128, 192, 40) if size == "mid" else (64, 96, 24)
    demo.build_demo_dataset(data, height=h, width=w, frames=f)
    override = os.path.join(tmp, f"{size}.yaml")
    text = CACHE_SIZES[size]
    if "VAE" in text:
        mc = OmegaConf.merge(OmegaConf.load(os.path.join(ROOT, "configs", "tiny", "cogvideox_2b_lora.yaml")),
                             OmegaConf.create(text.replace("VAE", "null"))).model
        text = text.replace("VAE", demo.build_vae(os.path.join(tmp, "vae_mid"), mc))
    with open(override, "w") as fh:
        fh.write(text or "{}\n")
    base = ["--base", os.path.join(ROOT, "configs", "tiny", "cogvideox_2b_lora.yaml"),
            os.path.join(ROOT, "configs", "tiny", "sft.yaml"), override, "--train-data",
            os.path.join(data, "dataset"), "--device", "cpu"]
    live = get_args(base, extra=[add_finetune_args, latent_cache.add_cache_args])
    cached = get_args(base + ["--cache-latents", os.path.join(tmp, f"cache_{size}")],
                      extra=[add_finetune_args, latent_cache.add_cache_args])
    params = OmegaConf.to_container(live.data_config.params, resolve=True)
    latent_cache.prepare_cache(cached, SFTDataset, params)
    assert folder
    return live, cached, latent_cache.prepared_dataset(cached.train_data[0]), SFTDataset(
        data_dir=live.train_data[0], **params)


def cache_step(engine, opt, item_fn):
    batch = torch.utils.data.default_collate([item_fn()])
    loss, _ = engine.shared_step(batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def cache_measure(size: str, repeats: int, tmp: str):
    from sat_cogvideo.diffusion_video import SATVideoDiffusionEngine

    live_args, cached_args, cached_ds, pixel_ds = cache_setup(size, tmp)
    torch.manual_seed(0)
    live = SATVideoDiffusionEngine(live_args).train()
    on_cache = SATVideoDiffusionEngine(cached_args).train()
    missing = on_cache.load_state_dict(live.state_dict(), strict=False)
    assert not missing.missing_keys, missing.missing_keys  # same DiT weights
    for e in (live, on_cache):
        e.disable_untrainable_params()
    runs = {"on the fly": (live, lambda: pixel_ds[0]), "cached": (on_cache, lambda: cached_ds[0])}
    opts = {k: torch.optim.AdamW([p for p in e.parameters() if p.requires_grad], lr=1e-4) for k, (e, _) in runs.items()}
    stats = {k: {"wall": [], "rss": []} for k in runs}
    for name, (engine, item) in runs.items():
        cache_step(engine, opts[name], item)  # warm-up
    for _ in range(repeats):
        for name, (engine, item) in runs.items():
            t0 = time.perf_counter()
            with RssPeak() as peak:
                cache_step(engine, opts[name], item)
            stats[name]["wall"].append(time.perf_counter() - t0)
            stats[name]["rss"].append(peak.rise)
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    weights = {k: sum(t.numel() * t.element_size() for t in e.state_dict().values()) for k, (e, _) in runs.items()}
    return {k: dict(wall=med(v["wall"]), rss=med(v["rss"]), weights=weights[k]) for k, v in stats.items()}


def cache_main(sizes, repeats):
    import tempfile

    mib = 1024 ** 2
    print("| size | step on the fly / cached (s) | ratio | peak RSS rise on the fly / cached (MiB) | "
          "engine weights on the fly / cached (MiB) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            r = cache_measure(size, repeats, tmp)
            a, b = r["on the fly"], r["cached"]
            print(f"| {size} | {a['wall']:.3f} / {b['wall']:.3f} | {b['wall'] / a['wall']:.2f} | "
                  f"{a['rss'] / mib:.1f} / {b['rss'] / mib:.1f} | {a['weights'] / mib:.2f} / "
                  f"{b['weights'] / mib:.2f} |", flush=True)


# ------------------------------------------------------------------------------------------------------------
# ZeRO stages: memory per rank

ZERO_CONFIGS = {"ZeRO-2": None, "ZeRO-3": "sft_zero3.yaml", "ZeRO-3 + offload": "sft_zero3_offload.yaml"}


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _state_tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _state_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _state_tensors(v)


def zero_worker(argv):
    """Runs under torchrun: train, then print this rank's state bytes and peak RSS as one JSON line."""
    import json
    import resource

    from sat_cogvideo import train_video

    engine = train_video.run(argv)
    dit = list(engine.module.model.parameters())
    params = _bytes(p.ds_tensor if hasattr(p, "ds_tensor") else p for p in dit)
    opt = engine.optimizer
    base = opt.optimizer if hasattr(opt, "optimizer") else opt
    opt_bytes = _bytes(_state_tensors(list(base.state.values())))  # moments and EMA shadow of this rank's part
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        opt_bytes += _bytes(getattr(opt, name, []) or [])
    zero = engine.zero_optimization_stage()
    cfg = engine.config if isinstance(engine.config, dict) else {}
    offload = bool(getattr(engine, "zero_cpu_offload", lambda: False)())
    print("ZERO_STATS " + json.dumps({"rank": torch.distributed.get_rank(), "stage": zero, "offload": offload,
                                      "params": params, "optimizer": opt_bytes, "cfg": bool(cfg),
                                      "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}),
          flush=True)


def zero_run(size: str, config, tmp: str):
    import json
    import subprocess

    from omegaconf import OmegaConf

    live, cached, _, _ = cache_setup(size, tmp)  # fills the cache (in this process) and writes the override
    sizes = OmegaConf.load(os.path.join(tmp, f"{size}.yaml"))
    modules = OmegaConf.select(sizes, "model.network_config.params.modules")
    if modules is not None and "lora_config" in modules:
        del modules["lora_config"]  # full finetuning: the size override without the LoRA rank
    override = os.path.join(tmp, f"{size}_zero.yaml")
    OmegaConf.save(sizes, override)
    full = os.path.join(tmp, f"{size}_full.yaml")
    OmegaConf.save(OmegaConf.create({"args": {"load": None, "mode": "pretrain"}}), full)  # random DiT weights
    argv = ["--base", os.path.join(ROOT, "configs", "tiny", "cogvideox_2b.yaml"),  # full finetuning
            os.path.join(ROOT, "configs", "tiny", "sft.yaml"), override, full]
    if config:
        argv.append(os.path.join(ROOT, "configs", config))
    argv += ["--train-data", cached.train_data[0], "--cache-latents", cached.cache_latents, "--train-iters", "2",
             "--save-interval", "100", "--save", os.path.join(tmp, "ckpt"), "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(k, None)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          os.path.abspath(__file__), "--zero-worker", *argv], env=env, capture_output=True,
                         text=True, cwd=tmp)
    stats = [json.loads(line.split("ZERO_STATS ", 1)[1]) for line in out.stdout.splitlines() if "ZERO_STATS" in line]
    if out.returncode or len(stats) != 2:
        raise RuntimeError(out.stdout[-3000:] + out.stderr[-3000:])
    return sorted(stats, key=lambda r: r["rank"])


def zero_main(sizes):
    import tempfile

    mib = 1024 ** 2
    print("| size | config | per rank: DiT params / fp32 master + optimizer state (MiB) | of these on the GPU (MiB) | "
          "peak RSS rank 0 / 1 (MiB) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            for name, config in ZERO_CONFIGS.items():
                r = zero_run(size, config, tmp)
                s0 = r[0]
                gpu = 0 if s0["offload"] else s0["params"] + s0["optimizer"]
                print(f"| {size} | {name} | {s0['params'] / mib:.2f} / {s0['optimizer'] / mib:.2f} | "
                      f"{gpu / mib:.2f} | {r[0]['maxrss'] / mib:.0f} / "
                      f"{r[1]['maxrss'] / mib:.0f} |", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--zero-worker":
        zero_worker(sys.argv[2:])
        sys.exit(0)
    main()
