"""Preconditioning of the network (maps to ``sgm/modules/diffusionmodules/denoiser_scaling.py``).

Each scaling returns ``(c_skip, c_out, c_in, c_noise)`` so that the denoiser computes
``D(x) = network(x * c_in, c_noise) * c_out + x * c_skip``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class DenoiserScaling(ABC):
    @abstractmethod
    def __call__(self, sigma: torch.Tensor):
        raise NotImplementedError


class VideoScaling(DenoiserScaling):
    """v-prediction with ``sigma = s = sqrt(alpha_bar)``: ``D = s * x - sqrt(1 - s^2) * v``.

    The network sees ``x`` unchanged and the DDPM timestep ``idx`` (passed by the sampler or loss) as its
    noise input.  Maps to the original ``VideoScaling``.
    """

    def __call__(self, alphas_cumprod_sqrt: torch.Tensor, **additional_model_inputs):
        c_skip = alphas_cumprod_sqrt
        c_out = -((1 - alphas_cumprod_sqrt ** 2) ** 0.5)
        c_in = torch.ones_like(alphas_cumprod_sqrt, device=alphas_cumprod_sqrt.device)
        c_noise = additional_model_inputs["idx"].clone()
        return c_skip, c_out, c_in, c_noise


class EDMScaling(DenoiserScaling):
    """Karras et al. (EDM) preconditioning (original ``EDMScaling``)."""

    def __init__(self, sigma_data: float = 0.5):
        self.sigma_data = sigma_data

    def __call__(self, sigma, **_):
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2) ** 0.5
        c_in = 1 / (sigma ** 2 + self.sigma_data ** 2) ** 0.5
        c_noise = 0.25 * sigma.log()
        return c_skip, c_out, c_in, c_noise


class EpsScaling(DenoiserScaling):
    """Epsilon prediction in sigma space (original ``EpsScaling``)."""

    def __call__(self, sigma, **_):
        c_skip = torch.ones_like(sigma, device=sigma.device)
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1.0) ** 0.5
        c_noise = sigma.clone()
        return c_skip, c_out, c_in, c_noise


class VScaling(DenoiserScaling):
    """v prediction in sigma space (original ``VScaling``)."""

    def __call__(self, sigma, **_):
        c_skip = 1.0 / (sigma ** 2 + 1.0)
        c_out = -sigma / (sigma ** 2 + 1.0) ** 0.5
        c_in = 1.0 / (sigma ** 2 + 1.0) ** 0.5
        c_noise = sigma.clone()
        return c_skip, c_out, c_in, c_noise


class VScalingWithEDMcNoise(VScaling):
    """``VScaling`` with EDM's ``c_noise = ln(sigma) / 4`` (original ``VScalingWithEDMcNoise``)."""

    def __call__(self, sigma, **kwargs):
        c_skip, c_out, c_in, _ = super().__call__(sigma, **kwargs)
        return c_skip, c_out, c_in, 0.25 * sigma.log()
