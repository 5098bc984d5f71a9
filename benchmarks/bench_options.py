"""Speed and memory options side by side: ours (sat_cogvideo.accel) vs the plain run and vs diffusers' equivalent
option on the same weights (CogVideoXTransformer3DModel holding our converted DiT), one process.

DiT section (mid-size random 5B-style DiT, as benchmarks/bench_transformer.py; CPU): one forward per row, medians
of interleaved repeats; time ratio against diffusers eager, peak resident-set growth, max relative error against
the plain run (exact options) or the bf16 run (low-bit, with weight bytes against bf16).
  compile   ours: regional compile of the SAT layer; diffusers: torch.compile of each transformer block
  offload   ours: group / sequential (diffusers' group offloading on SAT's modules); diffusers: leaf level
  low-bit   ours fp8 / int8; diffusers: enable_layerwise_casting (fp8), torchao int8 weight-only (default filter)
Quality section (an engine with its VAE: --model DIR, else the tiny random demo model): the decoded video of each
lossy option against the plain video, PSNR and SSIM (scikit-image), DiT evaluations and skipped ones.
FBCache section (same model): our ``--cache fbcache:<t>`` beside diffusers' First Block Cache
(``FirstBlockCacheConfig(threshold=t)`` on the CogVideoXPipeline holding the same weights, same prompt embeddings
and noise), each against its own uncached video; the two uncached videos against each other show it is one model.

    .venv/bin/python benchmarks/bench_options.py [--repeats 3] [--model demo_model] [--steps 20]
        [--sections exact lowbit quality fbcache] [--fbcache 0.1 0.3 0.5]
"""
from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from bench_transformer import add_dit_args, dit_inputs, dit_pair, dit_runners, peak_growth_mb  # noqa: E402


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def timed(fn, repeats):
    out, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


# ---------------------------------------------------------------------------------------------- DiT section


def row(name, t, base_t, mem, err, extra=""):
    print(f"| {name} | {t * 1e3:.0f} ms | {t / base_t:.2f} | {mem:.0f} MB | {err:.1e} | {extra} |", flush=True)


def dit_exact_rows(args):
    """Plain, compile and offload rows (fp32): ratios against diffusers eager."""
    from sat_cogvideo.accel.compile import apply_compile
    from sat_cogvideo.accel.layer_hooks import unwrap_all
    from sat_cogvideo.accel.offload import apply_dit_offload

    ours, theirs = dit_pair(args)
    x, ctx, ts, rope = dit_inputs(args, torch.float32)
    run_ours, run_theirs = dit_runners(ours, theirs, x, ctx, ts, rope)
    t_d, ref_d = timed(run_theirs, args.repeats)
    t_o, ref = timed(run_ours, args.repeats)
    print("| row (DiT forward, fp32) | time | / diffusers eager | peak growth | max rel err vs plain | notes |")
    print("|---|---|---|---|---|---|")
    row("diffusers eager", t_d, t_d, peak_growth_mb(run_theirs), rel_err(ref_d, ref))
    row("ours eager (plain)", t_o, t_d, peak_growth_mb(run_ours), 0.0)
    report = apply_compile(ours, verbose=False)
    t_first, _ = timed(run_ours, 1)
    timed(run_ours, 2)  # warm-up calls after compilation
    t_c, out = timed(run_ours, args.repeats)
    row("ours --compile (steady state)", t_c, t_d, peak_growth_mb(run_ours), rel_err(out, ref),
        f"compile {report.compile_seconds:.0f}s for {len(report.compiled_layers)} layers")
    unwrap_all(ours)
    t0 = time.perf_counter()
    for block in theirs.transformer_blocks:
        block.compile(fullgraph=True)
    run_theirs()
    t_dc_first = time.perf_counter() - t0
    timed(run_theirs, 2)
    t_dc, out_d = timed(run_theirs, args.repeats)
    row("diffusers per-block torch.compile", t_dc, t_d, peak_growth_mb(run_theirs), rel_err(out_d, ref),
        f"first call {t_dc_first:.0f}s")
    for mode in ("group", "sequential"):
        o2, _ = dit_pair(args)
        apply_dit_offload(o2, "cpu", mode)
        r2, _ = dit_runners(o2, theirs, x, ctx, ts, rope)
        t, out = timed(r2, args.repeats)
        row(f"ours --offload {mode} (CPU->CPU)", t, t_d, peak_growth_mb(r2), rel_err(out, ref), "hooks' overhead")
    _, th2 = dit_pair(args)
    th2.enable_group_offload(torch.device("cpu"), offload_type="leaf_level")
    _, r2 = dit_runners(ours, th2, x, ctx, ts, rope)
    t, out = timed(r2, args.repeats)
    row("diffusers group offload leaf (CPU->CPU)", t, t_d, peak_growth_mb(r2), rel_err(out, ref), "hooks' overhead")
    return t_o / t_d, t_c / t_d


def dit_lowbit_rows(args):
    """Low-bit rows (bf16 compute): weight bytes against bf16, time, error against the bf16 output."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from sat_cogvideo.accel.lowbit import apply_weights_dtype, weight_bytes

    x, ctx, ts, rope = dit_inputs(args, torch.bfloat16)
    ours, theirs = dit_pair(args, torch.bfloat16)
    run_ours, run_theirs = dit_runners(ours, theirs, x, ctx, ts, rope)
    t_b, ref = timed(run_ours, args.repeats)
    t_db, ref_d = timed(run_theirs, args.repeats)
    b_ours, b_theirs = weight_bytes(ours), weight_bytes(theirs)
    print("\n| row (DiT forward, bf16 compute) | time | / ours bf16 | weight bytes / bf16 | max rel err vs bf16 |")
    print("|---|---|---|---|---|")
    print(f"| ours bf16 | {t_b * 1e3:.0f} ms | 1.00 | 1.00 ({b_ours / 2**20:.0f} MiB) | 0 |")
    print(f"| diffusers bf16 | {t_db * 1e3:.0f} ms | {t_db / t_b:.2f} | 1.00 | {rel_err(ref_d, ref):.1e} |")
    ratios = {}
    for kind in ("fp8", "int8"):
        o2, th2 = dit_pair(args, torch.bfloat16)
        apply_weights_dtype(o2, kind, compute_dtype=torch.bfloat16)
        if kind == "fp8":
            th2.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
        else:
            quantize_(th2, Int8WeightOnlyConfig())
        r_o, r_d = dit_runners(o2, th2, x, ctx, ts, rope)
        t, out = timed(r_o, args.repeats)
        ratios[kind] = weight_bytes(o2) / b_ours
        print(f"| ours --weights-dtype {kind} | {t * 1e3:.0f} ms | {t / t_b:.2f} | {ratios[kind]:.3f} | "
              f"{rel_err(out, ref):.1e} |")
        t, out = timed(r_d, args.repeats)
        print(f"| diffusers {'layerwise casting fp8' if kind == 'fp8' else 'torchao int8 (default filter)'} | "
              f"{t * 1e3:.0f} ms | {t / t_b:.2f} | {weight_bytes(th2) / b_theirs:.3f} | {rel_err(out, ref):.1e} |")
    return ratios


# ---------------------------------------------------------------------------------------------- quality section


def _model_argv(args, tmp):
    """sample_video arguments of the model: --model DIR (its YAMLs, the folder holding 'latest'), else the demo."""
    from sat_cogvideo import demo

    if args.model:
        yamls = sorted((p for p in glob.glob(os.path.join(args.model, "*.yaml")) if not p.endswith("_lora.yaml")),
                       key=lambda p: "inference" in p)
        latest = sorted(glob.glob(os.path.join(args.model, "**", "latest"), recursive=True))
        if not yamls or not latest:
            raise SystemExit(f"error: {args.model} has no *.yaml or no SAT checkpoint folder (with 'latest')")
        return (["--base", *yamls, "--load", os.path.dirname(latest[0]), "--device", "cpu", "--seed", "42"],
                f"{args.model} (trained)")
    paths = demo.build_demo(os.path.join(tmp, "demo"), models=("cogvideox_5b",))
    argv = demo.demo_argv(paths, "cogvideox_5b", os.path.join(tmp, "unused.mp4"))
    drop = {"--prompt", "--output-path", "--num-steps"}
    keep, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in drop:
            skip = True
        else:
            keep.append(a)
    return keep, "tiny demo model, RANDOM weights (rerun on the trained demo model)"


def _video(argv, extra, prompt):
    from sat_cogvideo import sample_video as sv
    from sat_cogvideo.accel import offload, options

    args = sv.parse_args(argv + list(extra) + ["--prompt", prompt, "--output-path", "/tmp/unused.mp4"])
    plan = sv.prepare(args)
    model = sv.build_engine(args)
    done = options.apply(model, args, log=lambda m: None)
    placement = offload.make_placement(model, torch.device("cpu"), None)
    t0 = time.perf_counter()
    _, video = sv.generate(args, model, plan, plan.jobs[0], placement, 0)
    return video, time.perf_counter() - t0, done.get("cache")


def psnr_ssim(video, ref):
    """PSNR (dB) and mean per-frame SSIM of two videos ``[F, 3, H, W]`` in [0, 1] (what ``sample_video.generate``
    and diffusers' ``output_type="pt"`` give), compared as 8-bit frames."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    # [F, H, W, 3] in 0..255
    a, b = ((v.detach().float().clamp(0, 1) * 255).round().permute(0, 2, 3, 1).numpy() for v in (video, ref))
    psnr = peak_signal_noise_ratio(b, a, data_range=255)
    ssim = statistics.mean(structural_similarity(b[t], a[t], channel_axis=-1, data_range=255)
                           for t in range(a.shape[0]))
    return psnr, ssim


def quality_rows(args):
    import contextlib
    import io

    with tempfile.TemporaryDirectory() as tmp:
        argv, source = _model_argv(args, tmp)
        argv = argv + ["--num-steps", str(args.steps)]
        with contextlib.redirect_stderr(io.StringIO()):
            ref, t_ref, _ = _video(argv, [], args.prompt)
        print(f"\nquality: model {source}; prompt {args.prompt!r}, {args.steps} steps, video {tuple(ref.shape)}")
        print("| option | time / plain | DiT evaluations (skipped) | PSNR dB | SSIM |")
        print("|---|---|---|---|---|")
        print(f"| plain | 1.00 ({t_ref:.1f} s) | {args.steps} (0) | inf | 1.000 |")
        for extra in [["--weights-dtype", w] for w in args.weights] + [["--cache", c] for c in args.caches]:
            with contextlib.redirect_stderr(io.StringIO()):
                video, t, cache = _video(argv, extra, args.prompt)
            psnr, ssim = psnr_ssim(video, ref)
            evals = f"{cache.evaluations} ({cache.skipped})" if cache is not None else f"{args.steps} (0)"
            print(f"| {' '.join(extra)} | {t / t_ref:.2f} | {evals} | {psnr:.1f} | {ssim:.3f} |", flush=True)


def _diffusers_video(pipe, c, uc, plan, steps, seed, threshold=None):
    """diffusers' video ``[F, 3, H, W]`` in [0, 1], seconds, skipped steps (``threshold``: its First Block Cache)."""
    from diffusers.hooks import FirstBlockCacheConfig

    from helpers import run_diffusers

    tr = pipe.transformer
    calls = []  # layer 1's attention runs only on computed steps
    handle = tr.transformer_blocks[1].attn1.register_forward_pre_hook(lambda *a: calls.append(1))
    if threshold is not None:
        tr.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    try:
        t0 = time.perf_counter()
        with torch.no_grad():
            _, video = run_diffusers(pipe, "t2v", c, uc, (plan.video_frames, plan.height, plan.width), seed, steps)
        seconds = time.perf_counter() - t0
    finally:
        handle.remove()
        if threshold is not None:
            tr.disable_cache()
    return video, seconds, steps - len(calls)


def fbcache_rows(args):
    import contextlib
    import io

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from helpers import diffusers_pipeline

    from sat_cogvideo import rules, sample_video as sv

    with tempfile.TemporaryDirectory() as tmp:
        argv, source = _model_argv(args, tmp)
        argv = argv + ["--num-steps", str(args.steps)]
        sargs = sv.parse_args(argv + ["--prompt", args.prompt, "--output-path", os.path.join(tmp, "unused.mp4")])
        plan = sv.prepare(sargs)
        with contextlib.redirect_stderr(io.StringIO()):
            engine = sv.build_engine(sargs)
            pipe = diffusers_pipeline(engine, "t2v")
            c, uc = sv.conditionings(engine, args.prompt, torch.device("cpu"))
            seed = rules.seed_for(sargs.seed, 0, 0)
            ours_ref, to_ref, _ = _video(argv, [], args.prompt)
            theirs_ref, td_ref, _ = _diffusers_video(pipe, c, uc, plan, args.steps, seed)
        psnr, ssim = psnr_ssim(ours_ref, theirs_ref)
        print(f"\nfbcache: model {source}; prompt {args.prompt!r}, {args.steps} DPM steps; uncached ours / diffusers "
              f"{to_ref:.2f} s / {td_ref:.2f} s, ours against diffusers PSNR {psnr:.1f} dB, SSIM {ssim:.3f}")
        print("| threshold | skipped of %d ours / diffusers | PSNR dB ours / diffusers | SSIM ours / diffusers "
              "| time / uncached ours / diffusers |" % args.steps)
        print("|---|---|---|---|---|")
        for t in args.fbcache:
            with contextlib.redirect_stderr(io.StringIO()):
                ours, to, cache = _video(argv, ["--cache", f"fbcache:{t}"], args.prompt)
                theirs, td, skipped = _diffusers_video(pipe, c, uc, plan, args.steps, seed, threshold=t)
            (po, so), (pd, sd) = psnr_ssim(ours, ours_ref), psnr_ssim(theirs, theirs_ref)
            print(f"| {t:g} | {cache.skipped} / {skipped} | {po:.1f} / {pd:.1f} | {so:.3f} / {sd:.3f} "
                  f"| {to / to_ref:.2f} / {td / td_ref:.2f} |", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dit_args(ap, repeats=3)
    ap.add_argument("--model", default=None, help="a SAT model folder (YAMLs + checkpoint) for the quality rows")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompt", default="a red circle moving to the left")
    ap.add_argument("--weights", nargs="*", default=["int8", "fp8"], help="low-bit rows of the quality section")
    ap.add_argument("--caches", nargs="*", default=["teacache:0.1", "teacache:0.3", "fbcache:0.1", "fbcache:0.3"])
    ap.add_argument("--fbcache", nargs="*", type=float, default=[0.1, 0.3, 0.5],
                    help="thresholds of the FBCache section (ours and diffusers')")
    ap.add_argument("--sections", nargs="*", default=["exact", "lowbit", "quality"],
                    choices=["exact", "lowbit", "quality", "fbcache"])
    args = ap.parse_args(argv)

    from sat_cogvideo.distributed import init_distributed

    init_distributed(device="cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; DiT hidden {args.hidden}, {args.layers} "
          f"layers, latents {args.frames}x{args.height}x{args.width}, {args.text_length} text tokens")
    if "exact" in args.sections:
        dit_exact_rows(args)
    if "lowbit" in args.sections:
        dit_lowbit_rows(args)
    if "quality" in args.sections:
        quality_rows(args)
    if "fbcache" in args.sections:
        fbcache_rows(args)


if __name__ == "__main__":
    main()
