"""Noise schedules (maps to ``sgm/modules/diffusionmodules/discretizer.py``).

CogVideoX is a v-prediction, zero-terminal-SNR, 1000-step DDPM.  Its "sigma" is ``s = sqrt(alpha_bar)``,
which rises from 0 (pure noise, t = 999) to about 1 (clean, t = 0) along a sampling schedule.
"""
from __future__ import annotations

from abc import abstractmethod

import numpy as np
import torch

from sgm.util import append_zero


def make_beta_schedule(schedule, n_timestep, linear_start=1e-4, linear_end=2e-2):
    """``beta_i = linspace(sqrt(start), sqrt(end), n)_i ** 2`` in float64 (diffusers' "scaled_linear")."""
    if schedule != "linear":
        raise NotImplementedError(f"beta schedule {schedule!r} is not implemented (only 'linear')")
    return np.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, dtype=np.float64) ** 2


def generate_roughly_equally_spaced_steps(num_substeps: int, max_step: int) -> np.ndarray:
    """Ascending integer timesteps ending at ``max_step - 1``: 50 of 1000 gives 19, 39, ..., 999."""
    return np.linspace(max_step - 1, 0, num_substeps, endpoint=False).astype(int)[::-1]


class Discretization:
    """Base class: ``__call__`` appends a final zero and optionally flips what ``get_sigmas`` returns."""

    def __call__(self, n, do_append_zero=True, device="cpu", flip=False, return_idx=False):
        if return_idx:
            sigmas, idx = self.get_sigmas(n, device=device, return_idx=True)
        else:
            sigmas = self.get_sigmas(n, device=device)
        sigmas = append_zero(sigmas) if do_append_zero else sigmas
        sigmas = torch.flip(sigmas, (0,)) if flip else sigmas
        return (sigmas, idx) if return_idx else sigmas

    @abstractmethod
    def get_sigmas(self, n, device="cpu", return_idx=False):
        raise NotImplementedError


class ZeroSNRDDPMDiscretization(Discretization):
    """Shifted scaled-linear DDPM schedule rescaled to zero terminal SNR (original class of the same name).

    ``shift_scale`` divides the SNR (3.0 for CogVideoX-2B, 1.0 for the others).  ``get_sigmas(n)`` returns
    ``s = sqrt(alpha_bar)`` at ``n`` roughly equally spaced timesteps, rescaled so that the value at the
    largest selected timestep is exactly 0 while the one at the smallest is unchanged (the rescale uses the
    *selected* endpoints, as in the original), ordered from t = 999 down.
    """

    def __init__(self, linear_start=0.00085, linear_end=0.0120, num_timesteps=1000, shift_scale=1.0,
                 keep_start=False, post_shift=False):
        super().__init__()
        if keep_start and not post_shift:
            linear_start = linear_start / (shift_scale + (1 - shift_scale) * linear_start)
        self.num_timesteps = num_timesteps
        betas = make_beta_schedule("linear", num_timesteps, linear_start=linear_start, linear_end=linear_end)
        alphas_cumprod = np.cumprod(1.0 - betas, axis=0)
        self.post_shift = post_shift
        self.shift_scale = shift_scale
        if not post_shift:
            alphas_cumprod = alphas_cumprod / (shift_scale + (1 - shift_scale) * alphas_cumprod)
        self.alphas_cumprod = alphas_cumprod

    def get_sigmas(self, n, device="cpu", return_idx=False):
        if n < self.num_timesteps:
            timesteps = generate_roughly_equally_spaced_steps(n, self.num_timesteps)
            alphas_cumprod = self.alphas_cumprod[timesteps]
        elif n == self.num_timesteps:
            # The original has no timesteps here (return_idx crashed); every timestep is the natural answer.
            timesteps = np.arange(self.num_timesteps)
            alphas_cumprod = self.alphas_cumprod
        else:
            raise ValueError(f"cannot sample {n} steps from a {self.num_timesteps}-step schedule")

        s = torch.tensor(alphas_cumprod, dtype=torch.float32, device=device).sqrt()
        s_0, s_T = s[0].clone(), s[-1].clone()
        # subtract first, then multiply (float32), so s[-1] becomes exactly 0
        s = (s - s_T) * (s_0 / (s_0 - s_T))
        if self.post_shift:
            s = (s ** 2 / (self.shift_scale + (1 - self.shift_scale) * s ** 2)) ** 0.5

        s = torch.flip(s, (0,))
        return (s, timesteps) if return_idx else s
