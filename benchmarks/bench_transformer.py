"""One DiT forward: ours (SAT-based) vs diffusers' CogVideoXTransformer3DModel on the same converted weights.

CPU, float32, a mid-size 5B-style config (rotary, qk-LN): hidden 512, 4 layers, 8 heads, 13 x 16 x 24 latents,
226 text tokens.  Same process, interleaved repeats, medians.  Prints the time ratio ours/diffusers, the peak
memory ratio (resident-set growth during the forward, Linux), and ours' achieved GFLOP/s against a large
``torch.matmul`` on the same machine.

    .venv/bin/python benchmarks/bench_transformer.py [--repeats 5] [--layers 4] [--hidden 512]
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def network_params(hidden, layers, heads, frames, lat_h, lat_w, text_length):
    return dict(
        transformer_args=dict(checkpoint_activations=False, vocab_size=1, max_sequence_length=64,
                              layernorm_order="pre", skip_init=False, model_parallel_size=1, is_decoder=False),
        num_frames=(frames - 1) * 4 + 1, time_compressed_rate=4, latent_width=lat_w, latent_height=lat_h,
        patch_size=2, in_channels=16, out_channels=16, hidden_size=hidden, num_layers=layers,
        num_attention_heads=heads, elementwise_affine=True, time_embed_dim=512, adm_in_channels=256,
        modules=dict(
            pos_embed_config={"target": "dit_video_concat.Rotary3DPositionEmbeddingMixin",
                              "params": {"hidden_size_head": hidden // heads, "text_length": text_length}},
            patch_embed_config={"target": "dit_video_concat.ImagePatchEmbeddingMixin",
                                "params": {"text_hidden_size": 4096}},
            adaln_layer_config={"target": "dit_video_concat.AdaLNMixin", "params": {"qk_ln": True}},
            final_layer_config={"target": "dit_video_concat.FinalLayerMixin"}))


def forward_flops(hidden, layers, seq, text_length, image_tokens, text_dim=4096, patch_in=64, patch_out=64):
    """Multiply-add FLOPs (2 per MAC) of the matmuls and attention of one forward."""
    per_layer = 2 * seq * hidden * (3 * hidden + hidden + 8 * hidden) + 2 * 2 * seq * seq * hidden
    embed = 2 * text_length * text_dim * hidden + 2 * image_tokens * patch_in * hidden
    final = 2 * image_tokens * hidden * patch_out
    return layers * per_layer + embed + final


_libc = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def peak_growth_mb(fn):
    """Growth of the resident set's high-water mark while ``fn`` runs (Linux; resets VmHWM first)."""
    gc.collect()
    if _libc is not None:
        _libc.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return float("nan")
    base = _status_kb("VmRSS")
    fn()
    return (_status_kb("VmHWM") - base) / 1024


def make_matmul(n=2048):
    """A large float32 ``torch.matmul`` (the machine's reachable GFLOP/s) and its FLOP count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return (lambda: torch.matmul(a, b)), 2 * n ** 3


def add_dit_args(ap, repeats: int) -> None:
    """The mid-size DiT's sizes and the repeat count (this benchmark's and bench_options.py's DiT rows)."""
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--frames", type=int, default=13)
    ap.add_argument("--height", type=int, default=16)
    ap.add_argument("--width", type=int, default=24)
    ap.add_argument("--text-length", type=int, default=226)
    ap.add_argument("--repeats", type=int, default=repeats)


def dit_pair(args, dtype=torch.float32):
    """Our mid-size DiffusionTransformer (seed 0) and diffusers' CogVideoXTransformer3DModel holding its weights."""
    from diffusers import CogVideoXTransformer3DModel

    from sat_cogvideo.convert.transformer import diffusers_transformer_config, sat_to_diffusers_transformer
    from sat_cogvideo.dit_video_concat import DiffusionTransformer

    torch.manual_seed(0)
    params = network_params(args.hidden, args.layers, args.heads, args.frames, args.height, args.width,
                            args.text_length)
    if dtype == torch.bfloat16:
        params["dtype"] = "bf16"
    ours = DiffusionTransformer(**params).eval().to(dtype)
    theirs = CogVideoXTransformer3DModel(**diffusers_transformer_config(params)).eval()
    theirs.norm_out.norm.eps = 1e-6
    theirs.load_state_dict(sat_to_diffusers_transformer(ours.state_dict(), learned_positional_embeddings=False))
    return ours, theirs.to(dtype)


def dit_inputs(args, dtype=torch.float32):
    """Latents, text context, timestep and diffusers' RoPE table of one forward (seeded)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, args.frames, 16, args.height, args.width, generator=g).to(dtype)
    ctx = torch.randn(1, args.text_length, 4096, generator=g).to(dtype)
    gh, gw = args.height // 2, args.width // 2
    rope = get_3d_rotary_pos_embed(args.hidden // args.heads, ((0, 0), (gh, gw)), (gh, gw), args.frames)
    return x, ctx, torch.tensor([500.0]), rope


def dit_runners(ours, theirs, x, ctx, ts, rope):
    """One forward of each model, without gradients."""
    def run_ours():
        with torch.no_grad():
            return ours(x, ts, ctx)

    def run_theirs():
        with torch.no_grad():
            return theirs(x, ctx, ts, image_rotary_emb=rope, return_dict=False)[0]

    return run_ours, run_theirs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dit_args(ap, repeats=5)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default); with 1 the CPU-time figures are robust to other load")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from sat_cogvideo.distributed import init_distributed

    init_distributed(device="cpu")
    ours, theirs = dit_pair(args)
    run_ours, run_theirs = dit_runners(ours, theirs, *dit_inputs(args))

    err = float((run_ours() - run_theirs()).abs().max() / run_theirs().abs().max())
    run_matmul, matmul_flops = make_matmul()
    run_matmul()
    # interleaved, so that load from other processes hits all three alike
    times = {"ours": [], "diffusers": [], "matmul": []}
    cpu = {"ours": [], "diffusers": [], "matmul": []}
    for _ in range(args.repeats):
        for name, fn in (("ours", run_ours), ("diffusers", run_theirs), ("matmul", run_matmul)):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    ratios = sorted(o / d for o, d in zip(times["ours"], times["diffusers"]))
    mem = {"ours": peak_growth_mb(run_ours), "diffusers": peak_growth_mb(run_theirs)}
    mem2 = {"ours": peak_growth_mb(run_ours), "diffusers": peak_growth_mb(run_theirs)}
    mem = {k: min(mem[k], mem2[k]) for k in mem}

    image_tokens = args.frames * (args.height // 2) * (args.width // 2)
    seq = image_tokens + args.text_length
    flops = forward_flops(args.hidden, args.layers, seq, args.text_length, image_tokens)
    ours_gflops = flops / med["ours"] / 1e9
    mm = matmul_flops / med["matmul"] / 1e9
    ours_cpu_gflops = flops / cpu_med["ours"] / 1e9
    mm_cpu = matmul_flops / cpu_med["matmul"] / 1e9

    print(f"config: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, latents "
          f"{args.frames}x{args.height}x{args.width}, {args.text_length} text tokens -> sequence {seq}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"max rel diff ours vs diffusers: {err:.1e}")
    print(f"time   ours {med['ours'] * 1e3:.1f} ms   diffusers {med['diffusers'] * 1e3:.1f} ms   "
          f"ratio ours/diffusers {med['ours'] / med['diffusers']:.3f}  (medians of {args.repeats}; per-round "
          f"ratios {ratios[0]:.2f}..{ratios[-1]:.2f})")
    print(f"cpu    ours {cpu_med['ours'] * 1e3:.1f} ms   diffusers {cpu_med['diffusers'] * 1e3:.1f} ms   "
          f"ratio ours/diffusers {cpu_med['ours'] / cpu_med['diffusers']:.3f}  (process CPU time, medians)")
    print(f"peak   ours {mem['ours']:.1f} MB   diffusers {mem['diffusers']:.1f} MB   "
          f"ratio ours/diffusers {mem['ours'] / mem['diffusers']:.3f}  (resident-set growth during one forward)")
    print(f"ours {ours_gflops:.1f} GFLOP/s vs matmul 2048^3 {mm:.1f} GFLOP/s -> {ours_gflops / mm:.0%} of matmul "
          f"(wall); {ours_cpu_gflops:.1f} vs {mm_cpu:.1f} per CPU-second -> {ours_cpu_gflops / mm_cpu:.0%} (CPU time)")


if __name__ == "__main__":
    main()
