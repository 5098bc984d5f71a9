"""Classifier-free guidance (maps to ``sgm/modules/diffusionmodules/guiders.py``).

Batches are stacked with the **unconditional half first**; the guider splits the denoiser output back and
combines ``uncond + w * (cond - uncond)``.
"""
from __future__ import annotations

import math

import torch

from sgm.util import default, instantiate_from_config

_STACKED_KEYS = ("vector", "crossattn", "concat")


def _stack_uc_c(x, s, c, uc):
    c_out = {}
    for k in c:
        if k in _STACKED_KEYS:
            c_out[k] = torch.cat((uc[k], c[k]), 0)
        else:
            if k in uc and not _same(c[k], uc[k]):
                raise ValueError(f"conditioning key {k!r} differs between cond and uc and cannot be stacked")
            c_out[k] = c[k]
    return torch.cat([x] * 2), torch.cat([s] * 2), c_out


def _same(a, b):
    if torch.is_tensor(a) and torch.is_tensor(b):
        return a.shape == b.shape and bool(torch.equal(a, b))
    return a == b


class IdentityGuider:
    """No guidance: the denoiser runs once on the conditional inputs (original ``IdentityGuider``)."""

    def __call__(self, x, sigma, **_):
        return x

    def prepare_inputs(self, x, s, c, uc):
        return x, s, dict(c)


class VanillaCFG:
    """Constant-scale classifier-free guidance (original ``VanillaCFG``)."""

    def __init__(self, scale, dyn_thresh_config=None):
        self.scale = scale
        self.dyn_thresh = instantiate_from_config(default(
            dyn_thresh_config,
            {"target": "sgm.modules.diffusionmodules.sampling_utils.NoDynamicThresholding"}))

    def __call__(self, x, sigma, scale=None, step_index=None):
        """``step_index`` (passed by the samplers to every guider) is ignored: the weight is constant."""
        x_u, x_c = x.chunk(2)
        return self.dyn_thresh(x_u, x_c, default(scale, self.scale))

    def prepare_inputs(self, x, s, c, uc):
        return _stack_uc_c(x, s, c, uc)


class DynamicCFG(VanillaCFG):
    """Guidance weight ``1 + scale * (1 - cos(pi * (step_index / num_steps) ** exp)) / 2`` (original ``DynamicCFG``).

    The samplers pass ``step_index = n - t`` with each call (``n`` the steps of the run, ``t`` the DDPM timestep
    999, 979, ...), so the weight follows an erratic but fixed sequence; the released models were tuned with it
    and diffusers' ``use_dynamic_cfg`` computes the same.  Evaluated in Python float64, like the original.
    """

    def __init__(self, scale, exp, num_steps, dyn_thresh_config=None):
        super().__init__(scale, dyn_thresh_config)
        self.exp = exp
        self.num_steps = num_steps

    def weight(self, step_index) -> float:
        if torch.is_tensor(step_index):
            step_index = step_index.item()
        return 1 + self.scale * (1 - math.cos(math.pi * (step_index / self.num_steps) ** self.exp)) / 2

    def __call__(self, x, sigma, step_index, scale=None):
        x_u, x_c = x.chunk(2)
        return self.dyn_thresh(x_u, x_c, self.weight(step_index))
