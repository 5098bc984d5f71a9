"""One text-to-video generation with our engine and with diffusers' CogVideoXPipeline, same weights, same process.

The model is a mid-size random-weight CogVideoX-5B-style network (RoPE, hidden 256, 4 layers, 4 heads) built
from ``configs/tiny/cogvideox_5b.yaml`` with larger sizes, at 17 frames of 240×352 pixels (5×30×44 latents,
1650 video tokens), 10 DPM steps with dynamic CFG, then VAE decoding.  Both sides get the same prompt
embeddings and the same initial noise; diffusers runs the transformer and VAE converted by our key maps.

Prints wall time and the peak rise of the process's resident memory (sampled every 2 ms) for each side and
the ratios ours / diffusers.  On CUDA (``--device cuda``) the peak is ``torch.cuda.max_memory_allocated``.

    .venv/bin/python benchmarks/bench_pipeline.py [--steps 10] [--repeats 3] [--threads 1] [--device cpu]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


class PeakRSS:
    """Peak resident-set size above the starting value, sampled in a background thread."""

    def __init__(self, device):
        import psutil

        self.proc = psutil.Process()
        self.device = device

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, self.proc.memory_info().rss)
                time.sleep(0.002)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.rise = torch.cuda.max_memory_allocated() - self.base
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.rise = self.peak - self.base


def build(folder, device, steps):
    import torch
    from omegaconf import OmegaConf, open_dict

    from sat_cogvideo import demo
    from sat_cogvideo.diffusion_video import SATVideoDiffusionEngine
    from sat_cogvideo.distributed import init_distributed

    init_distributed(device="cpu")
    demo.demo_dir(folder)
    cfg = OmegaConf.load(demo.tiny_config_path("cogvideox_5b"))
    mc = cfg.model
    with open_dict(mc):
        p = mc.network_config.params
        p.hidden_size, p.num_layers, p.num_attention_heads, p.time_embed_dim = 256, 4, 4, 256
        p.num_frames, p.latent_height, p.latent_width = 17, 30, 44
        p.modules.pos_embed_config.params.hidden_size_head = 64
        mc.sampler_config.params.num_steps = steps
        mc.sampler_config.params.guider_config.params.num_steps = steps
        mc.sampler_config.params.verbose = False
    OmegaConf.resolve(mc)
    demo.build_t5(folder, mc)
    demo.build_vae(folder, mc)
    name = "bench_mid"
    tdir = demo.build_transformer(folder, name, mc, seed=5)
    engine = SATVideoDiffusionEngine(SimpleNamespace(model_config=mc, fp16=False, bf16=False, device=str(device)))
    from sat_cogvideo.sample_video import load_transformer_checkpoint

    load_transformer_checkpoint(engine, tdir)
    return engine.eval().to(device)


def diffusers_pipe(engine, device):
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_engine_diffusers import diffusers_pipeline

    return diffusers_pipeline(engine, "t2v").to(device)


def main(argv=None):
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "sat_cogvideo_bench_pipeline"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    engine = build(args.folder, device, args.steps)
    pipe = diffusers_pipe(engine, device)
    from sat_cogvideo.sample_video import conditionings

    c, uc = conditionings(engine, "a panda in a bamboo forest", device)
    net = engine.model_config.network_config.params
    T, h, w = 5, int(net.latent_height), int(net.latent_width)
    H, W = 8 * h, 8 * w

    def run_ours():
        torch.manual_seed(0)
        with torch.no_grad():
            z = engine.sample(c, uc=uc, batch_size=1, shape=(T, 16, h, w))
            return engine.decode_video(z)

    def run_diffusers():
        torch.manual_seed(0)
        with torch.no_grad():
            return pipe(prompt_embeds=c["crossattn"], negative_prompt_embeds=uc["crossattn"], height=H, width=W,
                        num_frames=17, num_inference_steps=args.steps, guidance_scale=6.0, use_dynamic_cfg=True,
                        output_type="pt", return_dict=False)[0]

    run_ours(), run_diffusers()  # warm-up
    print(f"t2v, {args.steps} DPM steps, 17 frames {H}x{W} ({T}x{h}x{w} latents), hidden 256 x 4 layers, "
          f"device {device}, {args.threads} thread(s)")
    print("| run | time ours / diffusers | ratio | peak memory rise ours / diffusers | ratio |")
    print("|---|---|---|---|---|")
    rows = []
    for r in range(args.repeats):
        result = {}
        for name, fn in (("ours", run_ours), ("diffusers", run_diffusers)):
            with PeakRSS(device) as mem:
                t0 = time.perf_counter()
                out = fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
            result[name] = (dt, mem.rise / 2 ** 20, out)
        (to, mo, vo), (td, md, vd) = result["ours"], result["diffusers"]
        assert vo.shape[1:] == vd.shape[1:], (vo.shape, vd.shape)
        rows.append((to / td, mo / max(md, 1e-9)))
        print(f"| {r + 1} | {to:.2f} s / {td:.2f} s | {to / td:.2f} | {mo:.0f} / {md:.0f} MiB | {mo / max(md, 1e-9):.2f} |")
    tr = sorted(x[0] for x in rows)[len(rows) // 2]
    mr = sorted(x[1] for x in rows)[len(rows) // 2]
    print(f"median ratios ours/diffusers: time {tr:.2f}, peak memory {mr:.2f}")


if __name__ == "__main__":
    main()
