"""Sampler overhead: our VPSDEDPMPP2MSampler + DiscreteDenoiser + DynamicCFG versus diffusers'
CogVideoXDPMScheduler loop (as in CogVideoXPipeline), 50 steps, CFG batch of 2, around a trivial network so the
numbers measure the diffusion machinery itself.  Times: both sides alternately in one process, best of
``--repeats``.  Peak memory: each side in its own subprocess, the rise of the peak RSS during one sampling run.

    .venv/bin/python benchmarks/bench_sampler.py [--shape 13 16 30 45] [--repeats 3]
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def make(side, shape):
    """A no-argument function running one full 50-step sampling for ``side``."""
    import torch

    torch.set_num_threads(1)
    ctx = torch.randn(2, 4, 8)

    def network(x, t, c):  # trivial v-predictor
        return 0.5 * x + c.mean()

    noise = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
    if side == "ours":
        from sgm.util import instantiate_from_config

        p = "sgm.modules.diffusionmodules."
        disc = {"target": p + "discretizer.ZeroSNRDDPMDiscretization", "params": {"shift_scale": 3.0}}
        den = instantiate_from_config({"target": p + "denoiser.DiscreteDenoiser", "params": {
            "num_idx": 1000, "quantize_c_noise": False, "discretization_config": disc,
            "weighting_config": {"target": p + "denoiser_weighting.EpsWeighting"},
            "scaling_config": {"target": p + "denoiser_scaling.VideoScaling"}}})
        smp = instantiate_from_config({"target": p + "sampling.VPSDEDPMPP2MSampler", "params": {
            "num_steps": 50, "verbose": False, "discretization_config": disc, "guider_config": {
                "target": p + "guiders.DynamicCFG", "params": {"scale": 6, "exp": 5, "num_steps": 50}}}})
        net = lambda x, t, c, **kw: network(x, t, c["crossattn"])  # noqa: E731

        def once():
            return smp(lambda x, s, c, **e: den(net, x, s, c, **e), noise.clone(), {"crossattn": ctx[1:]},
                       uc={"crossattn": ctx[:1]})
    else:
        from diffusers import CogVideoXDPMScheduler

        sched = CogVideoXDPMScheduler.from_config(dict(
            snr_shift_scale=3.0, beta_schedule="scaled_linear", clip_sample=False, prediction_type="v_prediction",
            rescale_betas_zero_snr=True, timestep_spacing="trailing"))

        def once():
            sched.set_timesteps(50)
            latents, old = noise.clone(), None
            for i, t in enumerate(sched.timesteps):
                v = network(torch.cat([latents] * 2), t, ctx)
                w = 1 + 6 * ((1 - math.cos(math.pi * ((50 - t.item()) / 50) ** 5.0)) / 2)
                v_u, v_c = v.chunk(2)
                latents, old = sched.step(v_u + w * (v_c - v_u), old, t,
                                          sched.timesteps[i - 1] if i > 0 else None, latents, return_dict=False)
            return latents

    return once


def peak_memory(side, shape):
    import torch

    once = make(side, shape)
    with torch.no_grad():
        once()  # warm-up
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
        base = _rss_kib("VmRSS")
        once()
    return {"peak_mib": (_rss_kib("VmHWM") - base) / 1024}


def interleaved_times(shape, repeats):
    """Both sides alternately in one process (the machine is shared), best of ``repeats`` each."""
    import torch

    fns = {side: make(side, shape) for side in ("ours", "diffusers")}
    times = {side: [] for side in fns}
    with torch.no_grad():
        for side in fns:
            fns[side]()  # warm-up
        for _ in range(repeats):
            for side, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[side].append(time.perf_counter() - t0)
    return {side: min(t) for side, t in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs=4, default=[13, 16, 30, 45])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--side", choices=["ours", "diffusers"])
    a = ap.parse_args()
    if a.side:
        print(json.dumps(peak_memory(a.side, a.shape)))
        return
    res = {}
    for side in ("ours", "diffusers"):
        out = subprocess.run([sys.executable, __file__, "--side", side, "--shape", *map(str, a.shape)],
                             capture_output=True, text=True, check=True)
        res[side] = json.loads(out.stdout.strip().splitlines()[-1])
    o, d = res["ours"], res["diffusers"]
    t = interleaved_times(a.shape, a.repeats)
    print(f"latent {a.shape}, 50 steps DPM++2M + DynamicCFG, 1 thread")
    print(f"time  ours {t['ours']:.3f}s  diffusers {t['diffusers']:.3f}s  ratio {t['ours'] / t['diffusers']:.2f}")
    print(f"peak  ours {o['peak_mib']:.1f}MiB  diffusers {d['peak_mib']:.1f}MiB  "
          f"ratio {o['peak_mib'] / max(d['peak_mib'], 1e-9):.2f}")


if __name__ == "__main__":
    main()
