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
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from sat_cogvideo.distributed import init_distributed

    init_distributed(device="cpu")
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


if __name__ == "__main__":
    main()
