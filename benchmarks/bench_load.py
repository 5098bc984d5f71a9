"""Loading a model for inference: a SAT folder vs the diffusers pipeline folder of the same weights (read directly
by the SAT engine) vs ``CogVideoXPipeline.from_pretrained``.

One mid-size random pipeline is written by diffusers (``save_pretrained``: a RoPE DiT with hidden ``--hidden``,
``--layers`` layers; the released VAE size; a T5 of the DiT's text width) and converted once with
``tools/convert_weight_hf2sat.py``; then, ``--repeats`` times, each of the three loads runs in a fresh subprocess
(peak RSS is a per-process high-water mark, so one process cannot measure three loads; the three children read the
same weights, one after the other):

* sat: ``sample_video.parse_args`` (``--base <sat>/model.yaml --load <sat>/transformer``), ``preflight_weights``,
  ``build_engine`` (T5, VAE from ``3d-vae.pt`` at build, DiT from ``mp_rank_00_model_states.pt``);
* diffusers folder (ours): the same with ``--load <pipeline folder>`` (config from the pipeline, DiT and VAE
  streamed from the safetensors files into the SAT modules);
* from_pretrained: ``CogVideoXPipeline.from_pretrained(<pipeline folder>)`` (float32).

Reported: wall time until every weight has been read once (``from_pretrained`` maps the safetensors files and
reads a page only when a weight is first used, so its load alone reads nothing; one pass summing every parameter
follows each load, the time of the load alone in brackets) and peak RSS rise over the process's memory after
imports (``VmHWM`` minus ``VmRSS`` before loading), each over the transformer + VAE + T5 weight files; ratios
against from_pretrained.

    .venv/bin/python benchmarks/bench_load.py --hidden 1024 --layers 6 --repeats 2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = r"""
import json, sys, time
import torch
from diffusers import CogVideoXPipeline
from sat_cogvideo import sample_video
from sat_cogvideo.distributed import init_distributed
import sat_cogvideo.convert.diffusers_source, sat_cogvideo.diffusion_video  # noqa: imports before the baseline
def mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
which, sat, pipe, out = sys.argv[1:5]
init_distributed(device="cpu")
base = mb("VmRSS")
t = time.perf_counter()
if which == "from_pretrained":
    model = CogVideoXPipeline.from_pretrained(pipe, torch_dtype=torch.float32)
else:
    load = ["--base", sat + "/model.yaml", "--load", sat + "/transformer"] if which == "sat" else ["--load", pipe]
    args = sample_video.parse_args(load + ["--prompt", "x", "--output-path", out, "--device", "cpu"])
    sample_video.preflight_weights(args)
    model = sample_video.build_engine(args)
loaded = time.perf_counter() - t
modules = model.components.values() if which == "from_pretrained" else [model]
with torch.no_grad():  # read every weight once: from_pretrained leaves them in a lazy memory map until first use
    total = sum(float(p.sum()) for m in modules if isinstance(m, torch.nn.Module) for p in m.parameters())
print(json.dumps({"seconds": time.perf_counter() - t, "loaded": loaded, "base_mb": base, "peak_mb": mb("VmHWM")}))
"""


def make_pipeline(folder: str, hidden: int, layers: int) -> None:
    """A random mid-size pipeline saved by diffusers."""
    import torch
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel
    from transformers import T5EncoderModel, T5Tokenizer

    from sat_cogvideo.tiny_t5 import build_tiny_t5

    t5 = build_tiny_t5(os.path.join(folder + "-t5"), d_model=hidden, num_layers=2, num_heads=hidden // 64, d_kv=64,
                       d_ff=2 * hidden, seed=0)
    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(num_attention_heads=hidden // 64, attention_head_dim=64,
                                              num_layers=layers, use_rotary_positional_embeddings=True,
                                              text_embed_dim=hidden)
    vae = AutoencoderKLCogVideoX(scaling_factor=0.7)  # the released VAE's sizes
    CogVideoXPipeline(tokenizer=T5Tokenizer.from_pretrained(t5), text_encoder=T5EncoderModel.from_pretrained(t5),
                      vae=vae, transformer=transformer,
                      scheduler=CogVideoXDDIMScheduler(snr_shift_scale=1.0)).save_pretrained(folder)


def folder_mb(folder: str) -> float:
    total = 0
    for dirpath, _, names in os.walk(folder):
        total += sum(os.path.getsize(os.path.join(dirpath, n)) for n in names if n.endswith(".safetensors"))
    return total / 2 ** 20


def run(which: str, sat: str, pipe: str, out: str) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _CHILD, which, sat, pipe, out], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as tmp:
        pipe, sat = os.path.join(tmp, "pipe"), os.path.join(tmp, "sat")
        make_pipeline(pipe, args.hidden, args.layers)
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_weight_hf2sat.py"), "--input_path", pipe,
                        "--output_path", sat], check=True, capture_output=True, cwd=ROOT)
        size = folder_mb(pipe)
        print(f"weights {size:.0f} MiB (transformer {folder_mb(pipe + '/transformer'):.0f}, VAE "
              f"{folder_mb(pipe + '/vae'):.0f}, T5 {folder_mb(pipe + '/text_encoder'):.0f}; hidden {args.hidden}, "
              f"{args.layers} layers, float32)")
        print("| run | load | time | / from_pretrained | peak RSS rise (MiB) | / from_pretrained | / weights |")
        print("|---|---|---|---|---|---|---|")
        for r in range(args.repeats):
            res = {w: run(w, sat, pipe, os.path.join(tmp, "o.mp4")) for w in ("from_pretrained", "sat", "diffusers")}
            ref_t, ref_m = res["from_pretrained"]["seconds"], res["from_pretrained"]["peak_mb"] - \
                res["from_pretrained"]["base_mb"]
            for which in ("sat", "diffusers", "from_pretrained"):
                x = res[which]
                rise = x["peak_mb"] - x["base_mb"]
                name = {"sat": "SAT folder", "diffusers": "diffusers folder (ours)",
                        "from_pretrained": "CogVideoXPipeline.from_pretrained"}[which]
                print(f"| {r + 1} | {name} | {x['seconds']:.2f} s ({x['loaded']:.2f} s) | {x['seconds'] / ref_t:.2f} | "
                      f"{rise:.0f} | "
                      f"{rise / ref_m:.2f} | {rise / size:.2f} |", flush=True)


if __name__ == "__main__":
    main()
