"""The five parts of the GPU check (see ``gpu_check.py``): each takes a :class:`Ctx` and adds rows to its report.

A part never raises: what fails (out of memory included) becomes a row with its status; the caller also guards the
part as a whole (time limit, unexpected errors).
"""
from __future__ import annotations

import gc
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from gpu_models import (ROOT, build_dit, build_vae, diffusers_dit, diffusers_rope, diffusers_vae, family_config)

PEAK_TFLOPS = 990.0  # dense bf16/fp16 tensor-core peak of an H100 SXM, the unit of the published FLOP floors
# Published 50-step times (49 frames; 1.5: 81 frames) of the whole pipeline on one H100 (T5 and the VAE decode
# included; the DiT is most of it), and the FLOP floors of the DiT alone at PEAK_TFLOPS (CFG batch 2, 50 steps).
# The rows' proj_50_steps_s is the DiT alone: 50 x the measured step.
ANCHORS = {
    "cogvideox-2b": {"anchor_s": 45.0, "floor_s": 12.1},
    "cogvideox-5b": {"anchor_s": 90.0, "floor_s": 33.6, "compiled_s": 87.5, "fp8_compile_s": 75.0},
    "cogvideox1.5-5b": {"anchor_s": 550.0, "floor_s": 149.0},
}
DIT_RUNS = (("cogvideox-2b", torch.float16), ("cogvideox-5b", torch.bfloat16), ("cogvideox1.5-5b", torch.bfloat16))
VAE_RUNS = (("cogvideox-5b", 13), ("cogvideox1.5-5b", 21))  # (family of the decode size, latent frames)


@dataclass
class Ctx:
    """What every part needs: the device, dry-run (tiny sizes on CPU), the part's deadline, the report."""
    device: torch.device
    dry: bool
    deadline: float
    report: object
    part: str
    repeats: int = 2

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def add(self, **row):
        self.report.add(self.part, row)


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def guarded(ctx: Ctx, name: str, fn):
    """Run ``fn()`` (which adds its own row); an exception becomes a row ``oom`` / ``error`` named ``name``."""
    if ctx.left() <= 0:
        ctx.add(check=name, status="skipped", note="part's time budget spent")
        return
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the check reports everything and goes on
        status = ("oom" if is_oom(err) else "not available" if isinstance(err, ImportError)
                  else "timeout" if type(err).__name__ == "PartTimeout" else "error")
        ctx.add(check=name, status=status, note=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
    finally:
        free(ctx.device)


def measure(ctx: Ctx, fns: dict) -> dict:
    """Interleaved timing of the callables in ``fns``: one warm-up call each (its output kept, its time reported as
    ``first``), then up to ``ctx.repeats`` rounds while the deadline allows (``repeats`` 0: the warm-up is the
    measurement).  Median seconds and peak memory (GiB allocated on CUDA; None on CPU) per name."""
    times = {k: [] for k in fns}
    first, peak, outs = {}, {k: None for k in fns}, {}

    def timed(k, fn):
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        sync(ctx.device)
        t0 = time.perf_counter()
        out = fn()
        sync(ctx.device)
        if ctx.device.type == "cuda":
            peak[k] = max(peak[k] or 0.0, torch.cuda.max_memory_allocated(ctx.device) / 2**30)
        return out, time.perf_counter() - t0

    for k, fn in fns.items():
        out, first[k] = timed(k, fn)
        outs[k] = out.float()
        del out
    for r in range(ctx.repeats):
        if r and ctx.left() < sum(statistics.median(v) for v in times.values()):
            break
        for k, fn in fns.items():
            times[k].append(timed(k, fn)[1])
    if ctx.repeats == 0:
        times = {k: [v] for k, v in first.items()}
    if not all(times.values()):
        raise TimeoutError("no timed round fitted in the part's budget after the warm-up")
    return {"sec": {k: statistics.median(v) for k, v in times.items()}, "peak": peak, "outs": outs,
            "first": first, "rounds": len(times[next(iter(times))])}


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------------ part 1: tests


def cuda_test_files() -> list:
    """The test files that hold ``cuda``-marked tests (found by their text: collecting every module would import
    optional libraries the bare GPU machine lacks)."""
    import glob

    found = []
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "test_*.py"))):
        with open(path, encoding="utf-8") as f:
            if "mark.cuda" in f.read():
                found.append(path)
    return found


def part_tests(ctx: Ctx):
    """``pytest -m cuda`` over the files with cuda-marked tests (tests/test_cuda.py, ...) in a child process."""
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "-rs"] + cuda_test_files()
    if ctx.dry:
        cmd.append("--collect-only")
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(5.0, ctx.left()))
    except subprocess.TimeoutExpired:
        ctx.add(check="pytest -m cuda", status="timeout", seconds=round(time.monotonic() - t0, 1))
        return
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    summary = lines[-1] if lines else proc.stderr.strip()[-200:]
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    ok = proc.returncode == 0 or (ctx.dry and proc.returncode == 5)
    ctx.add(check="pytest -m cuda" + (" --collect-only" if ctx.dry else ""), status="ok" if ok else "failed",
            seconds=round(time.monotonic() - t0, 1),
            note=summary[:200] + ("; " + "; ".join(failed)[:400] if failed else ""))


# ------------------------------------------------------------------------------------------------ part 2: DiT steps


def dit_flops(net, t, h, w, text_length, batch=2) -> float:
    """FLOPs (2 per multiply-add) of one DiT call on latents ``[batch, t, C, h, w]``: the transformer's matmuls and
    attention (``bench_transformer.forward_flops``) with the patch sizes of the config."""
    from bench_transformer import forward_flops

    p = net.patch_size
    pt, ps = (p[0], p[1]) if isinstance(p, (list, tuple)) or hasattr(p, "__len__") else (1, p)
    image_tokens = (t // pt) * (h // ps) * (w // ps)
    patch = int(net.in_channels) * pt * ps * ps
    seq = image_tokens + text_length
    return batch * forward_flops(int(net.hidden_size), int(net.num_layers), seq, text_length, image_tokens,
                                 patch_in=patch, patch_out=int(net.out_channels) * pt * ps * ps)


def dit_shape(family, cfg, dry):
    """Latent shape ``(t, h, w)`` and text length of one sampling step at the family's default video size."""
    net = cfg.network_config.params
    text = int(net.modules.pos_embed_config.params.text_length)
    if dry:
        t = 4 if family.patch_size_t == 2 else 3
        return (t, int(net.latent_height), int(net.latent_width)), text
    return (family.latent_frames(family.num_frames), family.height // 8, family.width // 8), text


def dit_row(ctx: Ctx, family, dtype):
    cfg = family_config(family, tiny=ctx.dry)
    net = cfg.network_config
    (t, h, w), text = dit_shape(family, cfg, ctx.dry)
    dev = ctx.device
    ours = build_dit(net, dev, dtype)
    hf, conf = diffusers_dit(net, ours, dev, dtype)
    weights_gib = sum(p.numel() * p.element_size() for p in ours.parameters()) / 2**30
    gen = torch.Generator(device=dev).manual_seed(1)
    c = int(net.params.in_channels)
    x = torch.randn(2, t, c, h, w, generator=gen, device=dev, dtype=dtype)
    txt_dim = int(net.params.modules.patch_embed_config.params.text_hidden_size)
    ctx_emb = torch.randn(2, text, txt_dim, generator=gen, device=dev, dtype=dtype)
    ts = torch.tensor([999.0, 999.0], device=dev)
    extra = {"ofs": torch.tensor([2.0, 2.0], device=dev)} if net.params.get("ofs_embed_dim") else {}
    rope = diffusers_rope(conf, x.shape, dev)

    @torch.no_grad()
    def run_ours():
        return ours(x, ts, ctx_emb, **extra)

    @torch.no_grad()
    def run_theirs():
        return hf(x, ctx_emb, ts, ofs=extra.get("ofs"), image_rotary_emb=rope, return_dict=False)[0]

    m = measure(ctx, {"ours": run_ours, "diffusers": run_theirs})
    flops = dit_flops(net.params, t, h, w, text)
    err = rel_err(m["outs"]["ours"], m["outs"]["diffusers"])
    add_dit_row(ctx, family, dtype, (t, h, w), m, flops, weights_gib, err)


def add_dit_row(ctx, family, dtype, shape, m, flops, weights_gib, err):
    so, sd = m["sec"]["ours"], m["sec"]["diffusers"]
    anchors = ANCHORS.get(family.name, {})
    proj = 50 * so
    row = dict(check=f"{family.name} {str(dtype).replace('torch.', '')} latents {'x'.join(map(str, shape))}",
               status="ok", ours_ms=round(so * 1e3, 1), diffusers_ms=round(sd * 1e3, 1), time_ratio=round(so / sd, 3),
               ours_peak_gib=_r(m["peak"]["ours"]), diffusers_peak_gib=_r(m["peak"]["diffusers"]),
               weights_gib=round(weights_gib, 2), tflops_ours=round(flops / so / 1e12, 1),
               tflops_diffusers=round(flops / sd / 1e12, 1), pct_of_990=round(100 * flops / so / 1e12 / PEAK_TFLOPS, 1),
               step_tflop=round(flops / 1e12, 1), proj_50_steps_s=round(proj, 1), rounds=m["rounds"],
               max_rel_err=float(f"{err:.2e}"))
    if anchors and not ctx.dry:
        row.update(anchor_s=anchors["anchor_s"], floor_s=anchors["floor_s"],
                   proj_vs_anchor=round(proj / anchors["anchor_s"], 2),
                   proj_vs_floor=round(proj / anchors["floor_s"], 2))
    ctx.add(**row)


def _r(v, nd=2):
    return None if v is None else round(v, nd)


def part_dit(ctx: Ctx):
    from sat_cogvideo.families import FAMILIES

    for name, dtype in DIT_RUNS:
        if ctx.dry:
            dtype = torch.float32
        guarded(ctx, name, lambda: dit_row(ctx, FAMILIES[name], dtype))


# ------------------------------------------------------------------------------------------------ part 3: VAE decode


def vae_rows(ctx: Ctx, family, latents: int):
    dev = ctx.device
    dtype = torch.float32 if ctx.dry else torch.bfloat16
    cfg = family_config(family, tiny=ctx.dry)
    ours, vcfg = build_vae(cfg.first_stage_config, dev, dtype)
    theirs = diffusers_vae(vcfg, ours, dev, dtype, version=family.generation)
    ours.enable_frame_batching()  # diffusers' default decode: latent frames in batches of 2 with the causal cache
    h, w = (4, 4) if ctx.dry else (family.height // 8, family.width // 8)
    if ctx.dry:
        latents = 2
    z = torch.randn(1, 16, latents, h, w, generator=torch.Generator(device=dev).manual_seed(2), device=dev,
                    dtype=dtype)
    if not ctx.dry:
        with torch.no_grad():  # CUDA kernels load on first use: not in the first measured decode
            small = z[:, :, :1, :8, :8]
            ours.decode(small), theirs.decode(small)
    for mode in ("tiled", "untiled"):
        name = f"{family.name} decode {latents}x{h}x{w} -> {h * 8}x{w * 8} {mode}"
        guarded(ctx, name, lambda: vae_row(ctx, name, ours, theirs, z, mode))


def vae_row(ctx, name, ours, theirs, z, mode):
    if mode == "tiled":
        # diffusers' default tiles (240x360 pixels); the dry run's tiny input gets 16x16-pixel tiles so it tiles too
        tiles = dict(tile_sample_min_height=16, tile_sample_min_width=16) if ctx.dry else {}
        ours.enable_tiling(**tiles), theirs.enable_tiling(**tiles)
    else:
        ours.disable_tiling(), theirs.disable_tiling()
    with torch.no_grad():
        m = measure(ctx, {"ours": lambda: ours.decode(z), "diffusers": lambda: theirs.decode(z).sample})
    so, sd = m["sec"]["ours"], m["sec"]["diffusers"]
    ctx.add(check=name, status="ok", ours_s=round(so, 3), diffusers_s=round(sd, 3), time_ratio=round(so / sd, 3),
            ours_peak_gib=_r(m["peak"]["ours"]), diffusers_peak_gib=_r(m["peak"]["diffusers"]), rounds=m["rounds"],
            max_rel_err=float(f"{rel_err(m['outs']['ours'], m['outs']['diffusers']):.2e}"))


def part_vae(ctx: Ctx):
    from sat_cogvideo.families import FAMILIES

    ctx.repeats = 0  # one decode each (after a small warm-up decode): a 1.5 decode takes tens of seconds
    for name, latents in VAE_RUNS[:1] if ctx.dry else VAE_RUNS:  # dry run: the code path once
        guarded(ctx, f"{name} VAE", lambda: vae_rows(ctx, FAMILIES[name], latents))


# ------------------------------------------------------------------------------------------------ part 4: options

# Each variant: (label, the options as sample_video's argument names, DiT calls per timed run).  The caches decide
# from one call to the next, so they run a short descending-timestep sequence; the others one CFG step.
ACCEL_VARIANTS = (
    ("plain", {}, 1),
    ("--compile", {"compile": True}, 1),
    ("--weights-dtype fp8", {"weights_dtype": "fp8"}, 1),
    ("--weights-dtype int8", {"weights_dtype": "int8"}, 1),
    ("--cache teacache:0.2 (6 steps)", {"cache": "teacache:0.2"}, 6),
    ("--cache fbcache:0.1 (6 steps)", {"cache": "fbcache:0.1"}, 6),
    ("--weights-dtype int8 --compile", {"weights_dtype": "int8", "compile": True}, 1),
)
ACCEL_OPTIONS = ("--compile", "--weights-dtype", "--cache")


def discover_accel():
    """``(options module, the options it registers)``, or ``(None, reason)`` when the speed options do not exist."""
    import argparse

    try:
        options = importlib.import_module("sat_cogvideo.accel.options")
        parser = options.add_accel_args(argparse.ArgumentParser(add_help=False))
        apply = options.apply
    except Exception as err:  # noqa: BLE001 - absent or half-built package: reported, not fatal
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    flags = {s for a in parser._actions for s in a.option_strings}
    del apply
    return options, flags


def accel_row(ctx: Ctx, family, label, opts, calls):
    import argparse

    from sat_cogvideo.accel.layer_hooks import dit_of

    options, _ = discover_accel()
    dtype = torch.float32 if ctx.dry else torch.bfloat16
    cfg = family_config(family, tiny=ctx.dry)
    net = cfg.network_config
    (t, h, w), text = dit_shape(family, cfg, ctx.dry)
    dev = ctx.device
    model = build_dit(net, dev, dtype)
    base = dict(compile=False, weights_dtype=None, attention="sdpa", cache=None, cache_spec=None, offload=None,
                device=str(dev), mode="inference")
    args = argparse.Namespace(**{**base, **opts})
    options.check_accel_args(args)
    done = options.apply(model, args, log=lambda msg: None)
    gen = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(2, t, int(net.params.in_channels), h, w, generator=gen, device=dev, dtype=dtype)
    emb = torch.randn(2, text, int(net.params.modules.patch_embed_config.params.text_hidden_size), generator=gen,
                      device=dev, dtype=dtype)
    cache = done.get("cache")
    steps = torch.linspace(999, 0, min(calls, 3) if ctx.dry else calls).tolist()

    @torch.no_grad()
    def run():
        if cache is not None:
            cache.start(calls)
        out = None
        for s in steps:
            out = model(x, torch.tensor([s, s], device=dev), emb)
        return out

    m = measure(ctx, {"run": run})
    first = m["first"]["run"]
    per_step = m["sec"]["run"] / calls
    try:  # the options' own count (low-bit tensors are subclasses whose element_size is not their storage)
        from sat_cogvideo.accel.lowbit import weight_bytes
    except ImportError:
        def weight_bytes(module):
            return sum(p.numel() * p.element_size() for p in module.parameters())
    if label == "plain":
        ctx.plain_ms = per_step * 1e3
    plain = getattr(ctx, "plain_ms", None)
    ctx.add(check=f"{family.name} {label}", status="ok", ms_per_step=round(per_step * 1e3, 1),
            vs_plain=round(per_step * 1e3 / plain, 3) if plain else None, first_call_s=round(first, 1),
            proj_50_steps_s=round(50 * per_step, 1), anchor_s=None if ctx.dry else accel_anchor(family, opts),
            peak_gib=_r(m["peak"]["run"]),
            weights_gib=round(weight_bytes(dit_of(model)) / 2**30, 3), note=cache.line() if cache is not None else "")


def accel_anchor(family, opts):
    """The published 50-step time to hold a variant against: 87.5 s compiled, 75 s low-bit + compile, 90 s else."""
    anchors = ANCHORS.get(family.name, {})
    if opts.get("compile"):
        return anchors.get("fp8_compile_s" if opts.get("weights_dtype") else "compiled_s")
    return anchors.get("anchor_s")


def part_accel(ctx: Ctx):
    from sat_cogvideo.families import FAMILIES

    options, flags = discover_accel()
    if options is None:
        ctx.add(check="speed options", status="not available", note=flags)
        return
    family = FAMILIES["cogvideox-5b"]
    ctx.repeats = min(ctx.repeats, 1)
    for label, opts, calls in ACCEL_VARIANTS:
        missing = [f for f in ("--" + k.replace("_", "-") for k in opts) if f not in flags]
        if missing:
            ctx.add(check=f"{family.name} {label}", status="not available", note=f"no option {', '.join(missing)}")
            continue
        if ctx.dry and opts.get("compile"):
            ctx.add(check=f"{family.name} {label}", status="skipped",
                    note="dry run: inductor compiles for minutes on CPU")
            continue
        guarded(ctx, f"{family.name} {label}", lambda: accel_row(ctx, family, label, opts, calls))


# ------------------------------------------------------------------------------------------------ part 5: multi-GPU

PARALLEL_OPTIONS = ("--sp-size", "--cfg-parallel")


def discover_parallel():
    """``(the parallel package, None)``, or ``(None, reason)`` when it or its options are missing."""
    import argparse

    try:
        pkg = importlib.import_module("sat_cogvideo.parallel")
        parser = pkg.add_parallel_args(argparse.ArgumentParser(add_help=False))
        pkg.configure, pkg.install  # noqa: B018 - the two calls gpu_multi.py makes
    except Exception as err:  # noqa: BLE001 - absent or half-built package: reported, not fatal
        return None, f"sat_cogvideo.parallel: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
    flags = {s for a in parser._actions for s in a.option_strings}
    missing = [f for f in PARALLEL_OPTIONS if f not in flags]
    return (None, f"no option {', '.join(missing)}") if missing else (pkg, None)


def run_multi(nproc: int, out_dir: str, dry: bool, seconds: float) -> list:
    """``benchmarks/gpu_multi.py`` on ``nproc`` processes (torchrun); its rows."""
    rows_file = os.path.join(out_dir, "gpu_multi_rows.json")
    if os.path.exists(rows_file):
        os.remove(rows_file)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, "benchmarks", "gpu_multi.py"), "--out", rows_file] + (["--dry-run"] if dry else [])
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(10.0, seconds))
    if proc.returncode != 0 or not os.path.exists(rows_file):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return [dict(check=f"gpu_multi.py on {nproc} processes", status="error", note=" / ".join(tail)[:400])]
    with open(rows_file) as f:
        return json.load(f)


def part_multi(ctx: Ctx, out_dir: str):
    """Outputs of 2+ GPUs against 1 and the speed-up (``gpu_multi.py``); 'not available' / 'skipped' rows when the
    parallel package or a second GPU is missing."""
    count = torch.cuda.device_count() if torch.cuda.is_available() and not ctx.dry else 0
    pkg, why = discover_parallel()
    name = "multi-GPU (--sp-size / --cfg-parallel)"
    if pkg is None:
        ctx.add(check=name, status="not available", gpus=count, note=why)
    elif ctx.dry or count < 2:
        ctx.add(check=name, status="skipped", gpus=count,
                note="dry run (tests/test_gpu_check.py runs gpu_multi.py on 2 CPU processes, slow-marked)"
                if ctx.dry else "needs >= 2 visible GPUs")
    else:
        for row in run_multi(count, out_dir, False, ctx.left()):
            ctx.add(**row)
