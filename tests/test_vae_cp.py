"""Context parallelism of the VAE: 2 gloo processes give the same encode/decode as 1 process.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from helpers import build_tiny_vae, max_rel_err


def cp_inputs():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 3, 17, 16, 16, generator=gen)  # 17 frames: rank 0 gets 9, rank 1 gets 8
    z = torch.randn(1, 16, 5, 2, 2, generator=gen)    # 5 latents: rank 0 gets 3, rank 1 gets 2
    return x, z


def _worker(rank, world, port, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        vae = build_tiny_vae(cp_size=world, gather_norm_decoder=True)
        x, z = cp_inputs()
        if rank != 0:  # the wrapper broadcasts CP rank 0's input: other ranks' inputs must not matter
            x, z = torch.zeros_like(x), torch.zeros_like(z)
        with torch.no_grad():
            moments, _ = vae.encode(x, unregularized=True)
            video = vae.decode(z)
            sample = vae.encode(x, generator=torch.Generator().manual_seed(5))
            local, _ = vae.encode(x, unregularized=True, output_cp=True)  # this rank's share of the latents
        torch.save({"moments": moments, "video": video, "sample": sample, "local": local}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_context_parallel_equals_one_process(tmp_path):
    world = 2
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, str(tmp_path))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0], "a context-parallel worker failed"

    vae = build_tiny_vae(cp_size=1, gather_norm_decoder=True)
    x, z = cp_inputs()
    with torch.no_grad():
        moments, _ = vae.encode(x, unregularized=True)
        video = vae.decode(z)
        sample = vae.encode(x, generator=torch.Generator().manual_seed(5))
    assert moments.shape == (1, 32, 5, 2, 2) and video.shape == (1, 3, 17, 16, 16)
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["moments"].shape == moments.shape and got["video"].shape == video.shape
        assert max_rel_err(got["moments"], moments) <= 1e-5
        assert max_rel_err(got["video"], video) <= 1e-5
        assert max_rel_err(got["sample"], sample) <= 1e-5
        # the work was really split: rank 0 encoded frames 0..8 (3 latents), rank 1 frames 9..16 (2 latents)
        share = slice(0, 3) if rank == 0 else slice(3, 5)
        assert max_rel_err(got["local"], moments[:, :, share]) <= 1e-5


def test_context_parallel_split_rules_need_divisible_frames():
    from sat_cogvideo.errors import UserError
    from sat_cogvideo.vae_modules import context_parallel as cp

    cp.check_split(49, 2, multiple=4)   # 24 frames per rank after frame 0
    cp.check_split(17, 2, multiple=4)
    with pytest.raises(UserError, match="cannot be split over 2 context-parallel ranks"):
        cp.check_split(13, 2, multiple=4)  # 6 frames per rank would pair frames across ranks
    with pytest.raises(UserError, match="positive multiple of 2"):
        cp.check_split(4, 2, what="latent frames")
    assert cp.active() is None and cp.get_context_parallel_world_size() >= 1
