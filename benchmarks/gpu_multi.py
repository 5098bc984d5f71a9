"""Multi-GPU part of the GPU check: one process per GPU (``torchrun --nproc_per_node N``), the full-size 5B DiT step
(CFG batch 2) on one GPU and with ``sat_cogvideo.parallel`` (sequence parallel over all ranks; CFG parallel x
sequence parallel when N is even): outputs compared with the one-GPU output, the speed-up.  Rank 0 writes the rows
(JSON list) to ``--out``.  ``--dry-run``: tiny model, float32, gloo on CPU processes.

    torchrun --nproc_per_node 2 benchmarks/gpu_multi.py --out rows.json [--dry-run]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from gpu_models import build_dit, family_config  # noqa: E402


def timed(fn, device, repeats):
    """(output of the warm-up call, median seconds of ``repeats`` further calls), ranks in step."""
    import statistics

    import torch.distributed as dist

    out = fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return out.float(), statistics.median(times)


def layouts(world: int):
    """The parallel layouts to try on ``world`` ranks, as ``sample_video`` options."""
    found = [(f"--sp-size {world}", {"sp_size": world})]
    if world % 2 == 0:
        found.append((f"--cfg-parallel --sp-size {world // 2}", {"sp_size": world // 2, "cfg_parallel": True}))
    return found


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)

    from gpu_parts import dit_shape, rel_err
    from sat_cogvideo import parallel
    from sat_cogvideo.distributed import init_distributed
    from sat_cogvideo.families import FAMILIES

    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu" if args.dry_run else f"cuda:{local}")
    info = init_distributed(device=str(device))
    dtype, bound = (torch.float32, 1e-5) if args.dry_run else (torch.bfloat16, 3e-2)
    family = FAMILIES["cogvideox-5b"]
    cfg = family_config(family, tiny=args.dry_run)
    net = cfg.network_config
    (t, h, w), text = dit_shape(family, cfg, args.dry_run)
    model = build_dit(net, device, dtype, seed=0)  # the same seed: the same weights on every rank
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(2, t, int(net.params.in_channels), h, w, generator=gen, device=device, dtype=dtype)
    ctx = torch.randn(2, text, int(net.params.modules.patch_embed_config.params.text_hidden_size), generator=gen,
                      device=device, dtype=dtype)
    ts = torch.tensor([999.0, 999.0], device=device)

    @torch.no_grad()
    def step():
        return model(x, ts, ctx)

    ref, one = timed(step, device, args.repeats)
    rows = []
    for label, opts in layouts(info.world_size):
        ns = argparse.Namespace(**{**dict(sp_size=None, ulysses_degree=None, ring_degree=None, cfg_parallel=False,
                                          parallel_vae=False, input_type="txt", prompt="x", cache=None), **opts})
        handle = parallel.install(model, parallel.configure(ns))
        out, many = timed(step, device, args.repeats)
        handle.remove()
        err = rel_err(out, ref)
        rows.append(dict(check=f"{family.name} {label} on {info.world_size} ranks", status="ok" if err <= bound
                         else "failed", one_gpu_ms=round(one * 1e3, 1), parallel_ms=round(many * 1e3, 1),
                         speedup=round(one / many, 2), max_rel_err=float(f"{err:.2e}"), bound=bound))
    if info.rank == 0:
        with open(args.out + ".tmp", "w") as f:
            json.dump(rows, f)
        os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
