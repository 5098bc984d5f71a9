"""Helpers the DiT needs from ``sgm/modules/diffusionmodules/util.py`` of the original."""
from __future__ import annotations

import math

import torch


def timestep_embedding(timesteps, dim, max_period=10000, repeat_only=False, dtype=torch.float32):
    """Sinusoidal embedding of (possibly fractional) timesteps, ``[B] -> [B, dim]``.

    Maps to ``sgm.modules.diffusionmodules.util.timestep_embedding``: the cosine half comes first, then the
    sine half; an odd ``dim`` gets one zero column.  Frequencies are computed in float32 on CPU and moved to
    the timesteps' device, as in the original, so CPU and CUDA give the same table.
    """
    if repeat_only:
        return timesteps[:, None].expand(-1, dim).to(dtype)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs.to(timesteps.device)[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb.to(dtype)
