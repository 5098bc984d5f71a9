"""One video on several processes (sat_cogvideo.parallel): gloo on CPU, float32, against one process.

One spawn of 2 processes checks the DiT forward of every family under Ulysses, Ring and CFG parallel (uneven
heads and sequence included); the 4-process spawn (hybrid USP, CFG x SP) and the whole CLI are slow tests.
"""
from __future__ import annotations

import os
import socket
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from helpers import max_rel_err, random_model, inputs

from sat_cogvideo.errors import UserError
from sat_cogvideo.parallel.groups import Layout
from sat_cogvideo.rules import check_parallel_degrees as check_degrees
from sat_cogvideo.parallel.sequence import Chunking

TOL = 1e-5


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ no processes

def test_layout_groups_cover_every_rank_once():
    lay = Layout(world=16, rank=11, ulysses=2, ring=2, cfg=2)  # 2 videos x cfg 2 x ring 2 x ulysses 2
    assert (lay.data, lay.video, lay.video_rank, lay.cfg_index, lay.sp_rank) == (2, 1, 3, 0, 3)
    assert (lay.ring_index, lay.ulysses_index) == (1, 1)
    mine = lay.my_groups()
    assert mine == {"sp": [8, 9, 10, 11], "ulysses": [10, 11], "ring": [9, 11], "cfg": [11, 15],
                    "video": list(range(8, 16))}
    for kind, groups in lay.all_groups().items():
        flat = sorted(r for g in groups for r in g)
        assert flat == list(range(16)), kind


def test_degree_checks_name_the_fix():
    assert check_degrees(8, 4, None, None, True) == (4, 1, 2)
    assert check_degrees(6, None, 3, 2, False) == (3, 2, 1)
    assert check_degrees(5, 5, None, None, False) == (5, 1, 1)  # 48 heads on 5 ranks: allowed (padded)
    with pytest.raises(UserError, match=r"^--ulysses-degree 4 x --cfg-parallel 2 needs 8 processes but the world "
                                        r"size is 4: launch 8"):
        check_degrees(4, 4, None, None, True)
    with pytest.raises(UserError, match=r"^--ulysses-degree 2 x --ring-degree 2 = 4 does not divide the world size 6"):
        check_degrees(6, None, 2, 2, False)
    with pytest.raises(UserError, match=r"--sp-size 4 is not --ulysses-degree 3 x --ring-degree 1"):
        check_degrees(8, 4, 3, None, False)
    with pytest.raises(UserError, match=r"--ring-degree 0 must be at least 1"):
        check_degrees(2, None, None, 0, False)


def test_chunking_pads_at_the_end():
    c = Chunking(length=87, parts=4)  # 15 text + 72 video tokens on 4 ranks
    assert (c.chunk, c.padded) == (22, 88)
    assert [c.valid(i) for i in range(4)] == [22, 22, 22, 21]
    assert [c.text_in(i, 15) for i in range(4)] == [15, 0, 0, 0]
    assert [Chunking(5, 4).valid(i) for i in range(4)] == [2, 2, 1, 0]  # a rank may hold only padding


# ------------------------------------------------------------------------------------------------ DiT forward

# (family, overrides, context length or None, batch)
CASES = {
    "5b": ("cogvideox_5b", {}, None),
    "5b-uneven": ("cogvideox_5b", {"hidden_size": 96, "num_attention_heads": 3}, 15),  # 3 heads, 87 tokens
    "2b": ("cogvideox_2b", {}, None),
    "5b-i2v": ("cogvideox_5b_i2v", {}, None),
    "1.5": ("cogvideox1.5_5b", {}, None),
    "1.5-i2v": ("cogvideox1.5_5b_i2v", {}, 13),
}


def case_inputs(name):
    family, overrides, text = CASES[name]
    model, cfg = random_model(family, seed=3, **overrides)
    x, ts, ctx, extra = inputs(model, cfg, batch=2, seed=4)
    if text is not None:
        ctx = ctx[:, :text]
    if model.in_channels != model.out_channels:  # I2V: the image latents come as concat_images
        x, extra["concat_images"] = x[:, :, :model.out_channels], x[:, :, model.out_channels:]
    return model, (x,), dict(timesteps=ts, context=ctx, **extra)


def sample_case(engine, name, i2v_image=None):
    """Seeded sampling of one tiny video: (latents, whole-clip decoded video)."""
    from helpers import text_cond

    c, uc = text_cond(engine)
    net = engine.model.diffusion_model
    shape = (net.compressed_num_frames + (1 if net.is_v15 and net.compressed_num_frames % 2 else 0),
             net.out_channels, net.latent_height, net.latent_width)
    extra = {}
    if net.in_channels != net.out_channels:  # I2V: a random image latent as frame 0, as sample_video builds it
        z = torch.randn((1, 1) + shape[1:], generator=torch.Generator().manual_seed(8))
        c["concat"] = uc["concat"] = torch.cat([z, torch.zeros((1, shape[0] - 1) + shape[1:])], dim=1)
        if net.ofs_embed_dim is not None:
            extra["ofs"] = torch.tensor([2.0])
    torch.manual_seed(11)
    z = engine.sample(c, uc=uc, batch_size=1, shape=shape, **extra)
    return z, engine.decode_video(z)


def _sample_worker(rank, world, layouts, sample_cases, paths, results):
    from helpers import make_engine
    from sat_cogvideo.parallel import install
    from sat_cogvideo.parallel.groups import Layout, setup
    from sat_cogvideo.parallel.vae import decode_whole_clip, install_parallel_vae

    for name, sampler in sample_cases:
        engine = make_engine(name, paths, num_steps=2, sampler=sampler)
        engine.decode_video = lambda z, e=engine: decode_whole_clip(e, z)  # the one-process reference decode
        z_ref, video_ref = sample_case(engine, name)
        for u, r, c in layouts:
            groups = setup(Layout(world, rank, ulysses=u, ring=r, cfg=c))
            handle = install(engine.model.diffusion_model, groups)
            size = install_parallel_vae(engine, groups.layout.group_size, z_ref.shape[1])
            z, video = sample_case(engine, name)
            handle.remove()
            results[("sample", name, sampler, u, r, c)] = (max_rel_err(z, z_ref), max_rel_err(video, video_ref),
                                                           size)


def _dit_worker(rank, world, port, layouts, cases, out, sample_cases=(), paths=None):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from sat_cogvideo.distributed import init_distributed
    from sat_cogvideo.parallel import install
    from sat_cogvideo.parallel.groups import Layout, setup

    results = {}
    calls = {}

    def counting(name, fn):
        def wrapper(*a, **k):
            calls[name] = calls.get(name, 0) + 1
            return fn(*a, **k)
        return wrapper

    import torch.distributed as dist
    for name in ("all_to_all_single", "isend", "all_gather"):
        setattr(dist, name, counting(name, getattr(dist, name)))
    try:
        init_distributed(device="cpu")
        for name in cases:
            model, args, kwargs = case_inputs(name)
            with torch.no_grad():
                ref = model(*args, **kwargs)
                for u, r, c in layouts:
                    handle = install(model, setup(Layout(world, rank, ulysses=u, ring=r, cfg=c)))
                    calls.clear()
                    got = model(*args, **kwargs)
                    handle.remove()
                    results[(name, u, r, c)] = (max_rel_err(got, ref), dict(calls))
                assert max_rel_err(model(*args, **kwargs), ref) == 0.0  # removed: the plain model again
        if sample_cases:
            _sample_worker(rank, world, layouts, sample_cases, paths, results)
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    except Exception:
        traceback.print_exc()
        raise


def run_dit_spawn(world, layouts, cases, tmp_path, sample_cases=(), paths=None):
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_dit_worker, args=(r, world, port, layouts, cases, str(tmp_path), sample_cases,
                                                   paths))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * world, "a parallel worker failed (its traceback is above)"
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


LAYOUTS_2 = [(2, 1, 1), (1, 2, 1), (1, 1, 2)]  # (ulysses, ring, cfg): Ulysses 2, Ring 2, CFG parallel


def test_two_processes_equal_one_process(tmp_path, demo_paths):
    """DiT forwards (RoPE with 3 heads and 87 tokens, sincos, 1.5 I2V) and a whole seeded sampling run with
    the context-parallel VAE decode (5B, DPM++), each layout against the same process without parallelism."""
    cases, samples = ["5b-uneven", "2b", "1.5-i2v"], [("cogvideox_5b", "dpm")]
    results = run_dit_spawn(2, LAYOUTS_2, cases, tmp_path, samples, demo_paths)
    for per_rank in results:
        assert set(per_rank) == ({(n, *lay) for n in cases for lay in LAYOUTS_2} |
                                 {("sample", *s, *lay) for s in samples for lay in LAYOUTS_2})
        assert all(v[2] == 2 for k, v in per_rank.items() if k[0] == "sample")  # the VAE decode was split
        check_results(per_rank)


@pytest.mark.slow  # every family and both samplers: two minutes on 2 cores
def test_two_processes_every_family(tmp_path, demo_paths):
    samples = [("cogvideox1.5_5b_i2v", "ddim"), ("cogvideox_2b", "dpm"), ("cogvideox_5b_i2v", "ddim")]
    for per_rank in run_dit_spawn(2, LAYOUTS_2, list(CASES), tmp_path, samples, demo_paths):
        check_results(per_rank)


def check_results(per_rank):
    """Each error within TOL, and the split really happened: the collectives each mode needs were called."""
    layers = 2  # the tiny models' num_layers
    for key, value in per_rank.items():
        if key[0] == "sample":
            assert value[0] <= TOL and value[1] <= TOL, (key, value)
    for (name, u, r, c), (err, calls) in ((k, v) for k, v in per_rank.items() if k[0] != "sample"):
        assert err <= TOL, (name, u, r, c, err)
        assert calls.get("all_to_all_single", 0) == (4 * layers if u > 1 else 0), (name, u, r, c, calls)
        assert calls.get("isend", 0) == ((r - 1) * layers if r > 1 else 0), (name, u, r, c, calls)
        assert calls.get("all_gather", 0) == int(u * r > 1) + int(c > 1), (name, u, r, c, calls)


@pytest.mark.slow  # 4 processes on 2 cores: about a minute
def test_four_processes_equal_one_process(tmp_path, demo_paths):
    layouts = [(4, 1, 1), (1, 4, 1), (2, 2, 1), (2, 1, 2), (1, 2, 2)]  # 2 heads on Ulysses 4: padded heads
    results = run_dit_spawn(4, layouts, ["5b-uneven", "2b", "1.5-i2v"], tmp_path, [("cogvideox_5b", "dpm")],
                            demo_paths)
    for per_rank in results:
        check_results(per_rank)


# ------------------------------------------------------------------------------------------------ command line

def test_degree_errors_stop_the_cli_before_loading(demo_paths, tmp_path, capsys, monkeypatch):
    from helpers import sample_argv
    from sat_cogvideo import sample_video

    def no_loading(args):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(sample_video, "build_engine", no_loading)
    argv = sample_argv(demo_paths) + ["--prompt", "a cat", "--output-path", str(tmp_path / "a.mp4")]
    for extra, message in ((["--sp-size", "2"], "error: --ulysses-degree 2 needs 2 processes but the world "
                                                "size is 1: launch 2"),
                           (["--cfg-parallel"], "error: --cfg-parallel 2 needs 2 processes"),
                           (["--ring-degree", "0"], "error: --ring-degree 0 must be at least 1")):
        with pytest.raises(SystemExit) as exc:
            sample_video.main(argv + extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and err[0].startswith(message), err
    assert not (tmp_path / "a.mp4").exists()


def test_cluster_variables_become_options():
    from sat_cogvideo.parallel import launch_argv

    assert launch_argv({}) == []
    assert launch_argv({"SP_SIZE": "4", "CFG_PARALLEL": "1", "NPROC": "8"}) == ["--sp-size", "4", "--cfg-parallel"]
    assert launch_argv({"ULYSSES_DEGREE": "2", "RING_DEGREE": "2", "SLURM_NTASKS": "4"}) == [
        "--ulysses-degree", "2", "--ring-degree", "2"]
    with pytest.raises(UserError, match=r"= 3 does not divide the world size 4.*\(from SP_SIZE"):
        launch_argv({"SP_SIZE": "3", "NPROC": "4"})
    with pytest.raises(UserError, match=r"needs 2 processes but the world size is 1"):
        launch_argv({"SP_SIZE": "2"})  # one task, no NPROC: one process
    with pytest.raises(UserError, match=r"SP_SIZE='two' is not an integer"):
        launch_argv({"SP_SIZE": "two", "NPROC": "2"})


def _cli(argv, nproc, env_extra=None, timeout=900):
    import subprocess
    import sys

    from helpers import ROOT, clean_env

    env = clean_env(PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **(env_extra or {}))
    if nproc == 1:
        cmd = [sys.executable, "-m", "sat_cogvideo.sample_video"] + argv
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(_free_port()), "-m", "sat_cogvideo.sample_video"] + argv
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # three CLI runs of the tiny model (torchrun, 2 processes): two minutes
def test_cli_two_processes_write_the_one_process_video(demo_paths, tmp_path):
    from helpers import read_frames, sample_argv

    argv = sample_argv(demo_paths, "cogvideox_5b", steps=2) + ["--prompt", "a cat"]
    one = _cli(argv + ["--output-path", str(tmp_path / "one.pt"), "--only-save-latents", "true"], 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _cli(argv + ["--output-path", str(tmp_path / "two.pt"), "--only-save-latents", "true",
                       "--ring-degree", "2"], 2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (torch.load(tmp_path / f, weights_only=True) for f in ("one.pt", "two.pt"))
    assert max_rel_err(b, a) <= TOL
    one = _cli(argv + ["--output-path", str(tmp_path / "one.mp4")], 1)
    cfg = _cli(argv + ["--output-path", str(tmp_path / "cfg.mp4"), "--cfg-parallel"], 2)
    assert one.returncode == 0 and cfg.returncode == 0, cfg.stderr[-3000:]
    assert cfg.stderr.count("wrote ") == 1  # only the first rank of the video's group writes
    assert {"one.pt", "two.pt", "one.mp4", "cfg.mp4"} <= set(os.listdir(tmp_path))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".") or "tmp" in n]  # no temporary names left
    fa, fb = read_frames(tmp_path / "one.mp4"), read_frames(tmp_path / "cfg.mp4")
    assert fa.shape == fb.shape and float(abs(fa.astype(float) - fb.astype(float)).max()) <= 1
