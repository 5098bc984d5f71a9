"""Code written the way the original's scripts are: ``get_args`` then the engine, without ``initialize``."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from sat_cogvideo.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny")
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                 "SLURM_LOCALID", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK")

# The original sample_video.py's steps (engine_and_inference.md 6.1, 6.3, 6.5), in a fresh process so that nothing
# has started torch.distributed before; only the step count is cut for speed.
PORTED_SCRIPT = r'''
import json, sys
import torch
import torch.distributed as dist
from sat_cogvideo.arguments import get_args
from sat_cogvideo.diffusion_video import SATVideoDiffusionEngine

builder, steps, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
args = get_args(argv)
report = {"device": args.device, "dist_after_get_args": dist.is_initialized()}
del args.deepspeed_config
args.model_config.first_stage_config.params.cp_size = 1
args.model_config.network_config.params.transformer_args.model_parallel_size = 1
args.model_config.network_config.params.transformer_args.checkpoint_activations = False
args.model_config.loss_fn_config.params.sigma_sampler_config.params.uniform_sampling = False
args.model_config.sampler_config.params.num_steps = steps
args.model_config.sampler_config.params.guider_config.params.num_steps = steps
if builder == "get_model":
    from sat.model.base_model import get_model
    model = get_model(args, SATVideoDiffusionEngine)
else:
    model = SATVideoDiffusionEngine(args).to(args.device)
model.eval()
T, C = args.sampling_num_frames, args.latent_channels
H, W = args.sampling_image_size
F = 8
c, uc = model.conditioner.get_unconditional_conditioning(
    {"txt": ["a panda on a stool"]}, batch_uc={"txt": [""]}, force_uc_zero_embeddings=["txt"])
for k in c:
    if k != "crossattn":
        c[k], uc[k] = map(lambda y: y[k][:1].to(args.device), (c, uc))
samples_z = model.sample(c, uc=uc, batch_size=1, shape=(T, C, H // F, W // F))
samples_z = samples_z.permute(0, 2, 1, 3, 4).contiguous()
samples_x = model.decode_first_stage(samples_z).to(torch.float32)
samples_x = samples_x.permute(0, 2, 1, 3, 4).contiguous()
samples = torch.clamp((samples_x + 1.0) / 2.0, min=0.0, max=1.0).cpu()
report.update(shape=list(samples.shape), finite=bool(torch.isfinite(samples_x).all()), std=float(samples.std()),
              latent_device=str(samples_z.device), backend=dist.get_backend() if dist.is_initialized() else None)
print("REPORT " + json.dumps(report))
'''


def _expected_device(local_rank: int = 0) -> str:
    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("model,builder,extra,shape", [
    # 1.0: 3 latents -> 9 frames of the inference file's 64x96
    ("cogvideox_5b", "direct", [], [1, 9, 3, 64, 96]),
    # 1.5 through SAT's get_model: 4 latents, the padding one dropped at decode -> 9 frames
    ("cogvideox1.5_5b", "get_model", ["--sampling-num-frames", "4", "--sampling-image-size", "64,64"],
     [1, 9, 3, 64, 64]),
])
def test_original_sample_sequence(demo_paths, tmp_path, model, builder, extra, shape):
    script = tmp_path / "ported_sample_video.py"
    script.write_text(PORTED_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(SAT_COGVIDEO_DEMO=demo_paths["folder"], PYTHONPATH=ROOT)
    argv = ["--base", os.path.join(TINY, f"{model}.yaml"), os.path.join(TINY, "inference.yaml"), *extra]
    proc = subprocess.run([sys.executable, str(script), builder, "2", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")][-1]
    report = json.loads(line[len("REPORT "):])
    assert report["device"] == _expected_device()
    assert report["dist_after_get_args"] is False  # get_args has no side effects; the engine starts it
    assert report["backend"] == ("nccl" if torch.cuda.is_available() else "gloo")
    assert report["latent_device"] == report["device"]
    assert report["shape"] == shape and report["finite"] and report["std"] > 0


def test_get_args_resolves_the_device(monkeypatch):
    from sat_cogvideo.arguments import get_args

    for key in LAUNCHER_VARS:
        monkeypatch.delenv(key, raising=False)
    assert get_args([]).device == _expected_device()
    assert get_args(["--device", "-1"]).device == _expected_device()
    assert get_args(["--device", "cpu"]).device == "cpu"
    # with CUDA: the original's "local rank" device, as a device string (torchrun's LOCAL_RANK=1 of 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    args = get_args([])
    assert args.device == "cuda:1" and args.local_rank == 1 and args.cuda
    assert get_args(["--device", "0"]).device == "cuda:0"  # the original's integer --device
    assert get_args(["--device", "cpu"]).device == "cpu"


def test_engine_not_on_args_device_is_one_line(demo_paths):
    from helpers import make_engine, text_cond

    engine = make_engine("cogvideox_5b", demo_paths, load=False, num_steps=2)
    c, uc = text_cond(engine)
    engine.device = "cuda:0"  # args.device on a CUDA machine, engine built but never moved there
    with pytest.raises(UserError, match=r"model is on cpu but args.device is cuda:0: move the engine with "
                                        r"model.to\(args.device\)"):
        engine.sample(c, uc=uc, batch_size=1, shape=(3, 16, 8, 12))
    engine.device = "cpu"
    assert engine.sample(c, uc=uc, batch_size=1, shape=(3, 16, 8, 12)).shape == (1, 3, 16, 8, 12)


def test_engine_device_and_distributed_start_follow_args(monkeypatch):
    import argparse

    import torch.distributed as dist

    import sat_cogvideo.distributed as distributed
    from sat_cogvideo.diffusion_video import engine_device, ensure_distributed

    # args that never went through get_args (SAT's own parser, a hand-made Namespace): resolved and written back,
    # as SAT's get_model fills in a missing args.device
    for device in (-1, "auto", None):
        args = argparse.Namespace(device=device, local_rank=0)
        assert engine_device(args) == _expected_device() and args.device == _expected_device()
    assert engine_device(argparse.Namespace()) == _expected_device()
    assert engine_device(argparse.Namespace(device="cpu")) == "cpu"

    calls = []
    monkeypatch.setattr(distributed, "init_distributed", lambda **kw: calls.append(kw))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    ensure_distributed(argparse.Namespace(device="cpu", distributed_backend="gloo", model_parallel_size=1))
    assert calls == [{"device": "cpu", "backend": "gloo", "model_parallel_size": 1}]
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    ensure_distributed(argparse.Namespace(device="cpu"))
    assert len(calls) == 1  # already started (initialize, or an earlier engine): left alone
