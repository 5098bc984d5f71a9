"""Helpers shared by the tests."""
from __future__ import annotations

import torch


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Give every parameter and floating buffer random non-zero values (including zero-initialised ones).

    Values are ``scale * N(0, 1)`` plus a small offset away from zero, drawn from a private generator, so the
    global RNG is untouched and the result is deterministic for a given ``seed`` and module structure.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if not tensor.is_floating_point():
            continue
        noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float32) * scale
        noise = noise + torch.sign(noise) * scale * 0.01
        tensor.copy_(noise.to(tensor.dtype))
    return module


def max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest reference magnitude."""
    ours, ref = ours.detach().double(), ref.detach().double()
    return float((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
