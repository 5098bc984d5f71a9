"""One video on 1, 2 and 4 processes (sat_cogvideo.parallel): time per sampling step, speed-up, efficiency,
peak memory per rank and communication volume, then the on-paper projection for the released sizes.

The model is the mid-size random-weight CogVideoX-5B-style DiT of the other benchmarks (RoPE, hidden 256,
4 layers, 4 heads) at 17 frames of 240x352 pixels (5x15x22 = 1650 video tokens + 226 text tokens).  One step
is one DiT forward of the CFG batch (unconditional + conditional, batch 2), as the sampler calls it.  Each
process runs 1 thread (gloo on CPU); with 4 processes on a 2-core machine the run oversubscribes the cores and
says so.  Every layout's output is compared with the 1-process output (max relative error).  On a shared
machine the wall times follow the load; the CPU seconds per step of the busiest rank (``time.process_time``)
and the speed-up they imply are the stable figures.

The projection takes the per-step bytes each rank sends, counted here on every collective and checked against
the closed form (Ulysses: 4 all-to-alls of ``B·S/P·H`` per layer, sending (P-1)/P of it; Ring: K and V blocks
``2·B·S/P·H`` passed P-1 times per layer; a final all-gather), scales it to the released models (bf16) and
adds it, not overlapped, to the ideal ``T1/P`` compute time from the one-GPU step times users report.

    .venv/bin/python benchmarks/bench_parallel.py [--steps 5] [--procs 1 2 4] [--project-only]
"""
from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# (processes, ulysses, ring, cfg)
LAYOUTS = [(1, 1, 1, 1), (2, 2, 1, 1), (2, 1, 2, 1), (2, 1, 1, 2), (4, 4, 1, 1), (4, 2, 2, 1), (4, 2, 1, 2)]
MID = dict(hidden=256, layers=4, heads=4, frames=17, latent_hw=(30, 44), text=226)


def build_mid():
    import torch
    from omegaconf import OmegaConf

    from sat_cogvideo.demo import randomize_
    from sgm.util import instantiate_from_config

    cfg = OmegaConf.load(os.path.join(ROOT, "configs", "tiny", "cogvideox_5b.yaml")).model.network_config
    p = cfg.params
    p.hidden_size, p.num_layers, p.num_attention_heads = MID["hidden"], MID["layers"], MID["heads"]
    p.num_frames, (p.latent_height, p.latent_width) = MID["frames"], MID["latent_hw"]
    p.modules.pos_embed_config.params.hidden_size_head = MID["hidden"] // MID["heads"]
    p.modules.pos_embed_config.params.text_length = MID["text"]
    model = instantiate_from_config(cfg)
    randomize_(model, 0, 0.05, buffers=False, unit_norms=False, away_from_zero=True)
    model.mixins["pos_embed"].reset_tables()
    gen = torch.Generator().manual_seed(1)
    t = (MID["frames"] - 1) // 4 + 1
    x = torch.randn(2, t, 16, *MID["latent_hw"], generator=gen)
    ctx = torch.randn(2, MID["text"], p.modules.patch_embed_config.params.text_hidden_size, generator=gen)
    ctx[0] = 0  # the unconditional half: zero context, as the original
    return model.eval(), (x,), dict(timesteps=torch.tensor([500.0, 500.0]), context=ctx)


def _count_bytes(sent):
    import torch.distributed as dist

    def wrap(name, fn, size_of):
        def inner(*a, **k):
            sent[name] = sent.get(name, 0) + size_of(*a, **k)
            return fn(*a, **k)
        return inner

    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    ws = lambda k: dist.get_world_size(k.get("group"))  # noqa: E731
    dist.all_to_all_single = wrap("all_to_all", dist.all_to_all_single,
                                  lambda o, i, *a, **k: nbytes(i) * (ws(k) - 1) // ws(k))
    dist.isend = wrap("ring", dist.isend, lambda t, *a, **k: nbytes(t))
    dist.all_gather = wrap("all_gather", dist.all_gather, lambda o, t, *a, **k: nbytes(t) * (len(o) - 1))


def _worker(rank, world, port, layout, steps, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)
    from sat_cogvideo.distributed import init_distributed
    from sat_cogvideo.parallel import install
    from sat_cogvideo.parallel.groups import Layout, setup

    init_distributed(device="cpu")
    model, args, kwargs = build_mid()
    _, u, r, c = layout
    if world > 1:
        install(model, setup(Layout(world, rank, ulysses=u, ring=r, cfg=c)))
    sent = {}
    _count_bytes(sent)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, cpu = [], []
    with torch.no_grad():
        y = model(*args, **kwargs)  # warm-up (and the output compared)
        per_step = dict(sent)
        for _ in range(steps):
            torch.distributed.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            model(*args, **kwargs)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.save({"times": times, "cpu": cpu, "peak_mib": peak / 1024, "rise_mib": (peak - base) / 1024, "sent": per_step,
                "out": y if rank == 0 else None}, os.path.join(out, f"rank{rank}.pt"))


def run_layout(layout, steps):
    import torch
    import torch.multiprocessing as mp

    world = layout[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker, args=(r, world, port, layout, steps, out)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            raise SystemExit(f"layout {layout} failed")
        return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def closed_form_bytes(b, s, h, layers, u, r, elem=4):
    """Bytes one rank sends per step (all-to-alls and ring passes; the final gathers are counted apart).

    A rank holds ``c = ceil(S/P)`` tokens: per layer 4 all-to-alls of ``B·c·H`` elements sending (u-1)/u of
    them, and ``r-1`` passes of its K/V block (``2·B·c·H`` elements after the Ulysses exchange)."""
    c = -(-s // (u * r))
    block = b * c * h * elem
    return layers * (4 * block * (u - 1) // u + 2 * block * (r - 1))


HEADER = ("| processes | ulysses x ring x cfg | s / step | speed-up | efficiency | peak RSS / rank (rise) | "
          "sent / rank / step (a2a, ring, gather) | max rel. err. | CPU s / step (busiest rank) | CPU speed-up |"
          "\n|---|---|---|---|---|---|---|---|---|---|")


def _row(row, cores):
    (n, u, r, c), step, sp, eff, peak, rise, sent, err, cpu, cpu_sp = row
    over = " (oversubscribed: 4 procs on 2 cores)" if n > cores else ""
    mib = lambda k: sent.get(k, 0) / 2**20  # noqa: E731
    return (f"| {n}{over} | {u} x {r} x {c} | {step:.3f} | {sp:.2f} | {eff:.2f} | {peak:.0f} MiB ({rise:.0f}) | "
            f"{mib('all_to_all'):.1f} / {mib('ring'):.1f} / {mib('all_gather'):.1f} MiB | {err:.1e} | "
            f"{cpu:.3f} | {cpu_sp:.2f} |")


def measure(args):
    rows, ref = [], None
    cores = os.cpu_count()
    print(HEADER, flush=True)
    for layout in LAYOUTS:
        if layout[0] not in args.procs:
            continue
        res = run_layout(layout, args.steps)
        step = statistics.median(statistics.median(r["times"]) for r in res)
        cpu = max(statistics.median(r["cpu"]) for r in res)  # the busiest rank's CPU seconds per step
        if layout[0] == 1:
            ref = (step, res[0]["out"], cpu)
        err = float((res[0]["out"].double() - ref[1].double()).abs().max() / ref[1].double().abs().max())
        sent = res[0]["sent"]
        rows.append((layout, step, ref[0] / step, ref[0] / step / layout[0], max(r["peak_mib"] for r in res),
                     max(r["rise_mib"] for r in res), sent, err, cpu, ref[2] / cpu))
        print(_row(rows[-1], cores), f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    print(f"machine: {cores} cores, shared with other work", flush=True)
    return rows


# The released sizes: (name, hidden, layers, heads, tokens, one-GPU seconds per step (H100, CFG batch 2))
REAL = [("5B, 49 frames", 3072, 42, 48, 17_776, 90 / 50),
        ("1.5-5B, 81 frames", 3072, 42, 48, 45_104, 550 / 50),
        ("1.5-5B, 161 frames", 3072, 42, 48, 85_904, 2400 / 50)]


def project():
    """Projected speed-up on 8 GPUs: comm (bf16, not overlapped) + ideal compute T1/P."""
    nvlink = 450e9   # 900 GB/s bidirectional NVLink: 450 GB/s each way per GPU
    ib = 400e9 / 8   # 400 Gb/s per node
    print("\n| model | tokens | layout on 8 GPUs | sent / GPU / step | comm time / step | compute / step | "
          "projected speed-up |")
    print("|---|---|---|---|---|---|---|")
    for name, h, layers, heads, s, t1 in REAL:
        cases = [
            ("1 node, Ulysses 8", 2, 8, 1, 1, lambda by: by / nvlink),
            ("1 node, CFG 2 x Ulysses 4", 1, 4, 1, 2, lambda by: by / nvlink),
            # 2 nodes x 4 GPUs, Ulysses 8: half of each all-to-all leaves the node; 4 GPUs share the NIC
            ("2 nodes, Ulysses 8", 2, 8, 1, 1, lambda by: by * 4 / 7 * 4 / ib),
            # CFG halves on the two nodes (only the output gather crosses), Ulysses 4 inside each node
            ("2 nodes, CFG 2 (across) x Ulysses 4", 1, 4, 1, 2, lambda by: by / nvlink),
        ]
        for label, b, u, r, c, seconds in cases:
            by = closed_form_bytes(b, s, h, layers, u, r, elem=2)
            comm = seconds(by)
            compute = t1 / (u * r * c)
            print(f"| {name} | {s} | {label} | {by / 2**30:.2f} GiB | {comm * 1e3:.0f} ms | {compute * 1e3:.0f} ms | "
                  f"{t1 / (compute + comm):.2f}x |")
    print("xDiT (published, 8 GPUs, CogVideoX with Ulysses/Ring + CFG parallel): 4.3x for 2B, 7.75x for 5B.")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--project-only", action="store_true")
    args = ap.parse_args()
    if not args.project_only:
        rows = measure(args)
        h, layers = MID["hidden"], MID["layers"]
        s = MID["text"] + ((MID["frames"] - 1) // 4 + 1) * (MID["latent_hw"][0] // 2) * (MID["latent_hw"][1] // 2)
        for (n, u, r, c), *_, sent, _err, _cpu, _cpu_sp in rows:
            want = closed_form_bytes(2 // c, s, h, layers, u, r)
            got = sent.get("all_to_all", 0) + sent.get("ring", 0)
            print(f"check {n} procs {u}x{r}x{c}: counted {got} B, closed form {want} B", flush=True)
    project()


if __name__ == "__main__":
    main()
