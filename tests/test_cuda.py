"""What only a CUDA GPU can show: device placement, the bf16/fp16 paths, the 5B float16 warning with ``--device
cuda``, SDPA running a fused kernel, nccl for one process, and ``--offload`` moving the parts between the CPU and the
GPU.  Every test is ``cuda``-marked: skipped without a GPU (conftest.py), run by ``pytest -m cuda`` and by
``benchmarks/gpu_check.sh``."""
from __future__ import annotations

import subprocess

import pytest
import torch

from helpers import PY, ROOT, clean_env, inputs, max_rel_err, random_model, sample_argv

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def no_tf32():
    """float32 on the GPU in full float32 (TF32 matmuls would move results by ~1e-3)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("family", ["cogvideox_2b", "cogvideox_5b", "cogvideox1.5_5b_i2v"])
def test_dit_on_the_gpu_matches_the_cpu_in_each_dtype(dist_cpu, family):
    """Every parameter and table moves with ``.to('cuda')``; float32 on the GPU equals the CPU (<= 1e-5), bfloat16
    and float16 stay within their precision (<= 3e-2) and finite, and the output lives on the GPU."""
    model, cfg = random_model(family)
    x, ts, ctx, extra = inputs(model, cfg)
    with torch.no_grad():
        ref = model(x, ts, ctx, **extra)
    moved = [t.to("cuda") for t in (x, ts, ctx)]
    extra = {k: v.to("cuda") for k, v in extra.items()}
    for dtype, name, bound in ((torch.float32, "fp32", 1e-5), (torch.bfloat16, "bf16", 3e-2),
                               (torch.float16, "fp16", 3e-2)):
        gpu = random_model(family, dtype=name)[0].to("cuda", dtype)  # same seed: the same weights
        assert {t.device.type for t in list(gpu.parameters()) + list(gpu.buffers())} == {"cuda"}
        with torch.no_grad():
            out = gpu(*moved, **extra)
        assert out.device.type == "cuda" and out.dtype == dtype
        assert torch.isfinite(out).all()
        assert max_rel_err(out.float().cpu(), ref) <= bound, dtype


def test_sdpa_runs_a_fused_kernel_in_bf16(dist_cpu):
    """The DiT's attention is one SDPA call that picks flash / memory-efficient / cuDNN attention on the GPU in
    bfloat16, never the math fallback (which materialises the score matrix)."""
    from torch.profiler import ProfilerActivity, profile

    model, cfg = random_model("cogvideox_5b", dtype="bf16")
    model = model.to("cuda", torch.bfloat16)
    x, ts, ctx, extra = inputs(model, cfg)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x.to("cuda", torch.bfloat16), ts.to("cuda"), ctx.to("cuda", torch.bfloat16))
    names = {e.key for e in prof.key_averages()}
    fused = {n for n in names if n.startswith("aten::_scaled_dot_product_") and
             any(k in n for k in ("flash", "efficient", "cudnn"))}
    assert fused, sorted(n for n in names if "scaled_dot" in n)
    assert "aten::_scaled_dot_product_attention_math" not in names


@pytest.mark.parametrize("config,dtype,warns", [("cogvideox_5b", "float16", True), ("cogvideox_5b", "bfloat16", False)])
def test_float16_warning_with_device_cuda(dist_cpu, config, dtype, warns, tmp_path, monkeypatch):
    """``--device cuda --dtype float16`` on a 5B config warns before anything is built; bfloat16 does not."""
    import warnings

    from sat_cogvideo import sample_video

    class Stop(Exception):
        pass

    def stop(args):
        raise Stop

    monkeypatch.setattr(sample_video, "build_engine", stop)
    monkeypatch.setattr(sample_video, "preflight_weights", lambda args: None, raising=False)
    argv = ["--base", f"{ROOT}/configs/{config}.yaml", f"{ROOT}/configs/inference.yaml", "--device", "cuda",
            "--load", str(tmp_path), "--prompt", "a cat", "--output-path", str(tmp_path / "a.mp4"), "--dtype", dtype]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(Stop):
            sample_video.main(argv)
    messages = [str(w.message) for w in caught if "float16 often gives black" in str(w.message)]
    assert len(messages) == int(warns)


def test_nccl_starts_for_world_size_one():
    """One process, ``--device cuda``: the nccl backend starts (no launcher variables), SAT's model-parallel state
    is set, and a collective on the GPU gives the right number."""
    code = ("import torch, torch.distributed as d\n"
            "from sat_cogvideo.distributed import init_distributed\n"
            "info = init_distributed(device='cuda')\n"
            "x = torch.full((3,), 2.0, device='cuda'); d.all_reduce(x)\n"
            "from sat import mpu\n"
            "print(d.get_backend(), info.world_size, info.rank, mpu.get_model_parallel_world_size(), x.sum().item())\n"
            "d.destroy_process_group()\n")
    proc = subprocess.run([PY, "-c", code], cwd=ROOT, env=clean_env(PYTHONPATH=ROOT), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-5:] == ["nccl", "1", "0", "1", "6.0"], proc.stdout


def cuda_argv(demo_paths):
    argv = sample_argv(demo_paths, "cogvideox_5b", steps=2) + ["--prompt", "a cat"]
    return argv[:argv.index("--device")] + ["--device", "cuda"] + argv[argv.index("--device") + 2:]


def test_offload_moves_the_parts_between_cpu_and_gpu(demo_paths, tmp_path, monkeypatch):
    """``--offload``: when T5, the DiT and the VAE decoder start, the part that works is on the GPU and the others
    are on the CPU (their parameters' real devices); without it everything stays on the GPU; the same video.  (The
    video is kept in memory: the GPU check's machine has no ffmpeg.)"""
    from sat_cogvideo import media, sample_video

    videos = []
    monkeypatch.setattr(media, "write_video", lambda path, video, fps=None, **kw: videos.append(video))

    real_build = sample_video.build_engine
    seen = []

    def build_engine(args):
        model = real_build(args)
        parts = {"T5": model.conditioner, "DiT": model.model, "VAE": model.first_stage_model}

        def snapshot(stage):
            seen.append((stage, {k: {p.device.type for p in m.parameters()} for k, m in parts.items()}))

        for stage, module in (("T5", model.conditioner.embedders[0]), ("DiT", model.model.diffusion_model),
                              ("VAE", model.first_stage_model.decoder)):
            module.register_forward_pre_hook(lambda m, a, stage=stage: snapshot(stage))
        return model

    monkeypatch.setattr(sample_video, "build_engine", build_engine)
    for offload in (False, True):
        seen.clear()
        out = tmp_path / f"v{int(offload)}.mp4"
        sample_video.main(cuda_argv(demo_paths) + ["--output-path", str(out)] + (["--offload"] if offload else []))
        stages = [stage for stage, _ in seen]
        assert stages[0] == "T5" and "DiT" in stages and stages[-1] == "VAE", stages
        for stage, where in seen:
            for part, devices in where.items():
                expect = {"cuda"} if (part == stage or not offload) else {"cpu"}
                assert devices == expect, (offload, stage, part, devices)
    assert len(videos) == 2
    assert max_rel_err(torch.as_tensor(videos[1]).float(), torch.as_tensor(videos[0]).float()) <= 1e-6
