"""Guidance combiners ("thresholding") used by the guiders (maps to ``sampling_utils.py``)."""
from __future__ import annotations

import torch

from sgm.util import append_dims


class NoDynamicThresholding:
    """Plain classifier-free guidance: ``uncond + scale * (cond - uncond)``."""

    def __call__(self, uncond, cond, scale):
        scale = append_dims(scale, cond.ndim) if isinstance(scale, torch.Tensor) else scale
        return uncond + scale * (cond - uncond)


class StaticThresholding:
    """CFG followed by clamping to [-1, 1]."""

    def __call__(self, uncond, cond, scale):
        return torch.clamp(NoDynamicThresholding()(uncond, cond, scale), min=-1.0, max=1.0)
