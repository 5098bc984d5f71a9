"""Decode speed and peak memory of our VAE against diffusers' AutoencoderKLCogVideoX, same weights, same process.

For each latent size and mode the two decoders run alternately (``--repeats`` times each); reported are the
best wall time, the best CPU time of the calling thread (``--threads 1``: robust on a shared machine)
and the largest peak RSS increase during the call (sampled every millisecond by a thread; the
script re-executes itself with ``MALLOC_MMAP_THRESHOLD_`` fixed so that freed tensors leave the RSS, which
therefore follows live memory).  Modes:

* ``plain``: diffusers' default decode (latent frame batches of 2 with the causal cache) vs ours with
  ``enable_frame_batching()`` (the same chunks, so the same numbers);
* ``tiled``: both with ``enable_tiling()`` at the diffusers defaults (240x360-pixel tiles) on top of that.

Weights are random (``--ch``/``--num-res-blocks`` shrink the released architecture so a CPU run takes
minutes; the released VAE is ch 128, 3 blocks).  Example:

    .venv/bin/python benchmarks/bench_vae.py --sizes 32x48,48x72 --latent-frames 13 --repeats 2
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time

if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable] + sys.argv)

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident set size above the level at entry, sampled by a background thread."""

    def __enter__(self):
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.delta = self.peak - self.base


def vae_config(ch, ch_mult, num_res_blocks):
    params = dict(double_z=True, z_channels=16, resolution=256, in_channels=3, out_ch=3, ch=ch, ch_mult=ch_mult,
                  attn_resolutions=[], num_res_blocks=num_res_blocks, dropout=0.0)
    return {"target": "vae_modules.autoencoder.VideoAutoencoderInferenceWrapper", "params": {
        "cp_size": 1, "ckpt_path": None, "ignore_keys": ["loss"], "loss_config": {"target": "torch.nn.Identity"},
        "regularizer_config": {"target": "vae_modules.regularizers.DiagonalGaussianRegularizer"},
        "encoder_config": {"target": "vae_modules.cp_enc_dec.ContextParallelEncoder3D",
                           "params": dict(params, gather_norm=True)},
        "decoder_config": {"target": "vae_modules.cp_enc_dec.ContextParallelDecoder3D",
                           "params": dict(params, gather_norm=False)}}}


def measure(fn):
    import gc

    gc.collect()
    with PeakRSS() as mem:
        start, cpu = time.perf_counter(), time.thread_time()
        out = fn()
        seconds, cpu = time.perf_counter() - start, time.thread_time() - cpu
    return out, seconds, cpu, mem.delta


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="32x48", help="latent HxW list, e.g. 32x48,48x72")
    p.add_argument("--latent-frames", type=int, default=13)
    p.add_argument("--ch", type=int, default=32)
    p.add_argument("--ch-mult", default="1,2,2,4")
    p.add_argument("--num-res-blocks", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--modes", default="plain,tiled")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from diffusers import AutoencoderKLCogVideoX

    from sat_cogvideo.convert.vae import convert_vae_sat_to_diffusers, diffusers_vae_config
    from sgm.util import instantiate_from_config

    cfg = vae_config(args.ch, [int(v) for v in args.ch_mult.split(",")], args.num_res_blocks)
    ours = instantiate_from_config(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in ours.parameters():
            t.copy_(torch.randn(t.shape, generator=gen) * 0.05)
    theirs = AutoencoderKLCogVideoX(**diffusers_vae_config(cfg)).eval()
    theirs.load_state_dict(convert_vae_sat_to_diffusers(ours.state_dict()), strict=True)
    ours.enable_frame_batching()

    print(f"config ch={args.ch} ch_mult={args.ch_mult} num_res_blocks={args.num_res_blocks}; "
          f"{args.latent_frames} latent frames; threads={args.threads}; torch {torch.__version__}")
    print(f"{'latents':>8} {'mode':>6} {'ours s':>8} {'diff s':>8} {'time x':>7} {'ours cpu':>8} {'diff cpu':>8} "
          f"{'cpu x':>6} {'ours MiB':>9} {'diff MiB':>9} {'mem x':>6} {'max rel err':>11}")
    rows = []
    for size in args.sizes.split(","):
        h, w = (int(v) for v in size.lower().split("x"))
        z = torch.randn(1, 16, args.latent_frames, h, w, generator=torch.Generator().manual_seed(1))
        for mode in args.modes.split(","):
            if mode == "tiled":
                ours.enable_tiling(), theirs.enable_tiling()
            else:
                ours.disable_tiling(), theirs.disable_tiling()
            best = {"ours": [float("inf"), float("inf"), 0], "diffusers": [float("inf"), float("inf"), 0]}
            outs = {}
            with torch.no_grad():
                for _ in range(args.repeats):
                    for name, fn in (("ours", lambda: ours.decode(z)), ("diffusers", lambda: theirs.decode(z).sample)):
                        outs.pop(name, None)
                        out, sec, cpu, mem = measure(fn)
                        outs[name] = out
                        best[name][0] = min(best[name][0], sec)
                        best[name][1] = min(best[name][1], cpu)
                        best[name][2] = max(best[name][2], mem)
            ref = outs["diffusers"].double()
            err = float((outs["ours"].double() - ref).abs().max() / ref.abs().max())
            (ts, cs, ms), (td, cd, md) = best["ours"], best["diffusers"]
            row = (f"{h}x{w}", mode, ts, td, ts / td, cs, cd, cs / cd, ms / 2**20, md / 2**20, ms / md, err)
            rows.append(row)
            print(f"{row[0]:>8} {mode:>6} {ts:8.2f} {td:8.2f} {ts / td:7.3f} {cs:8.2f} {cd:8.2f} {cs / cd:6.3f} "
                  f"{ms / 2**20:9.1f} {md / 2**20:9.1f} {ms / md:6.3f} {err:11.2e}   "
                  f"(output {tuple(ref.shape)}, std {float(ref.std()):.3f})", flush=True)
            del outs
    return rows


if __name__ == "__main__":
    main()
