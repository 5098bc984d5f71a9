"""``--parallel-vae``: each video decoded by the original's context-parallel VAE over its group's ranks.

Uses what ``vae_modules`` already has (``context_parallel.py``, ``cp_enc_dec.py``, the wrapper's ``cp_size``): the
latent clip is split in time (CP rank 0 holds frame 0 and ``(L-1)/cp`` latents, the others ``(L-1)/cp`` each),
causal-convolution borders travel between neighbours, GroupNorm statistics are all-reduced, the pixels are
gathered.  Frame layout rule: the CP size must divide ``L - 1`` (``L`` latents decoded, after 1.5's padding
latent is dropped) and the video group's size; the largest such size is used (13 latents of a 49-frame 1.0 video:
2, 3, 4 or 6 ranks; 1.5 at 81 frames decodes 20 latents, 19 is prime: no split, stated in the log).

The context-parallel VAE decodes the whole clip in one pass (the original's ``decode_first_stage``), so this
replaces the sampling scripts' piecewise decode (1.0: [0,3), [3,5), …; 1.5: ≤10 pieces with carried caches),
whose GroupNorm statistics cover one piece at a time.  It equals the one-process whole-clip decode
(:func:`decode_whole_clip` with ``cp_size`` 1); the two plans differ in the 4th–5th digit of the pixels.
1.0 decoders are built without ``gather_norm``: their GroupNorms are switched to the all-reduce variant
(the same computation outside a CP region) so that the split decode equals the whole one.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from functools import partial

import torch
from torch import nn

from sat_cogvideo.families import decode_whole
from sat_cogvideo.vae_modules import context_parallel as cp
from sat_cogvideo.vae_modules.cp_enc_dec import ContextParallelGroupNorm


def cp_size_for(group_size: int, latents: int) -> int:
    """The largest size dividing both the video group and ``latents - 1`` (1: no split)."""
    common = math.gcd(group_size, max(latents - 1, 0))
    return max(common, 1)


@torch.no_grad()
def decode_whole_clip(engine, samples_z: torch.Tensor) -> torch.Tensor:
    """:meth:`SATVideoDiffusionEngine.decode_video` with the whole-clip plan (one VAE call per video)."""
    plan = dataclasses.replace(engine.gen.sample_decode, ranges=decode_whole, use_cp_first_only=False,
                               per_video=True)
    x = engine._decode(samples_z.permute(0, 2, 1, 3, 4).contiguous(), plan)
    x = x.to(torch.float32).permute(0, 2, 1, 3, 4).contiguous()
    return torch.clamp((x + 1.0) / 2.0, min=0.0, max=1.0)


def install_parallel_vae(engine, group_size: int, latents: int) -> int:
    """Make ``engine.decode_video`` decode over CP groups of the returned size (collective: every rank calls it
    with the same arguments).  ``latents``: latent frames sampled per video."""
    size = cp_size_for(group_size, latents - engine.gen.sample_decode.drop_leading)
    vae = engine.first_stage_model
    if size > 1:
        if cp.is_context_parallel_initialized() and cp.get_context_parallel_world_size() != size:
            raise RuntimeError("the VAE context-parallel group is already set to another size")
        if not cp.is_context_parallel_initialized():
            cp.initialize_context_parallel(size)
        for module in vae.decoder.modules():
            if type(module) is nn.GroupNorm:
                module.__class__ = ContextParallelGroupNorm  # same maths; all-reduced inside a CP region
        vae.cp_size = size
    else:
        print(f"--parallel-vae: {latents} latent frames cannot be split over {group_size} ranks (the split needs "
              "a size dividing both the group and the latents minus 1): one rank per video decodes",
              file=sys.stderr, flush=True)
    engine.decode_video = partial(decode_whole_clip, engine)
    return size
