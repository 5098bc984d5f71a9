"""SAT -> diffusers conversion: our streaming converter vs the original's way (diffusers model + save_pretrained).

Both convert the same synthetic SAT transformer checkpoint (a RoPE DiT, hidden ``--hidden``, ``--layers`` layers,
random weights) in fresh subprocesses, one after the other, ``--repeats`` times:

* ours: ``sat_cogvideo.convert.pipeline.convert_sat_to_diffusers`` (memory-mapped read, tensor-by-tensor
  safetensors writing, 5 GB shards);
* diffusers (the original tool's method): ``torch.load(mmap=True)``, rename every key, build
  ``CogVideoXTransformer3DModel``, ``load_state_dict(strict=True)``, ``save_pretrained(safe_serialization=True,
  max_shard_size="5GB")``.

Reported: wall time of the conversion and peak RSS growth over the process's memory after imports (``VmHWM`` minus
``VmRSS`` before converting), ours / diffusers.  Both outputs are checked to hold identical tensors.

    .venv/bin/python benchmarks/bench_convert.py --hidden 1024 --layers 4 --repeats 3
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
from diffusers import CogVideoXTransformer3DModel, CogVideoXDDIMScheduler  # noqa
from sat_cogvideo.convert import pipeline
from sat_cogvideo.convert.transformer import sat_to_diffusers_transformer
def mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
which, ckpt, out = sys.argv[1:4]
base = mb("VmRSS")
t = time.perf_counter()
if which == "ours":
    pipeline.convert_sat_to_diffusers(out, transformer_ckpt_path=ckpt, log=lambda m: None)
else:
    sd = pipeline.read_sat_transformer(ckpt, log=lambda m: None)   # torch.load(mmap=True), prefix removed
    info = pipeline.describe_transformer(sd)
    hf = sat_to_diffusers_transformer(sd, learned_positional_embeddings=False)
    model = CogVideoXTransformer3DModel(**info.diffusers_config)
    model.load_state_dict(hf, strict=True)
    del hf, sd
    model.save_pretrained(out + "/transformer", safe_serialization=True, max_shard_size="5GB")
print(json.dumps({"seconds": time.perf_counter() - t, "base_mb": base, "peak_mb": mb("VmHWM")}))
"""


def make_checkpoint(path: str, hidden: int, layers: int) -> None:
    import torch
    from diffusers import CogVideoXTransformer3DModel
    from sat_cogvideo.convert.transformer import SAT_PREFIX, diffusers_to_sat_transformer

    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(num_attention_heads=hidden // 64, attention_head_dim=64, num_layers=layers,
                                        use_rotary_positional_embeddings=True, text_embed_dim=1024)
    sd = diffusers_to_sat_transformer(model.state_dict(), prefix=SAT_PREFIX)
    sd[SAT_PREFIX + "transformer.position_embeddings.weight"] = torch.zeros(64, hidden)
    torch.save({"module": sd}, path)


def run(which: str, ckpt: str, out: str) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _CHILD, which, ckpt, out], capture_output=True, text=True, env=env,
                          cwd=ROOT)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def same_tensors(a: str, b: str) -> bool:
    import torch
    from sat_cogvideo.convert.safetensors_io import open_weights_folder

    x = open_weights_folder(os.path.join(a, "transformer"), "diffusion_pytorch_model")
    y = open_weights_folder(os.path.join(b, "transformer"), "diffusion_pytorch_model")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as tmp:
        ckpt = os.path.join(tmp, "sat.pt")
        make_checkpoint(ckpt, args.hidden, args.layers)
        size = os.path.getsize(ckpt) / 2 ** 20
        print(f"checkpoint {size:.0f} MiB (hidden {args.hidden}, {args.layers} layers)")
        print("| run | time ours / diffusers | ratio | peak RSS rise ours / diffusers (MiB) | ratio | ours / file |")
        print("|---|---|---|---|---|---|")
        for r in range(args.repeats):
            a_out, b_out = os.path.join(tmp, f"ours{r}"), os.path.join(tmp, f"ref{r}")
            a, b = run("ours", ckpt, a_out), run("diffusers", ckpt, b_out)
            if r == 0 and not same_tensors(a_out, b_out):
                raise SystemExit("outputs differ")
            ga, gb = a["peak_mb"] - a["base_mb"], b["peak_mb"] - b["base_mb"]
            print(f"| {r + 1} | {a['seconds']:.2f} s / {b['seconds']:.2f} s | {a['seconds'] / b['seconds']:.2f} | "
                  f"{ga:.0f} / {gb:.0f} | {ga / gb:.2f} | {ga / size:.2f} |", flush=True)


if __name__ == "__main__":
    main()
