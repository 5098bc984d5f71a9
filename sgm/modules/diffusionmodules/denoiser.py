"""Denoisers: wrap the network into an x0-predictor (maps to ``sgm/modules/diffusionmodules/denoiser.py``)."""
from __future__ import annotations

import torch
import torch.nn as nn

from sgm.util import append_dims, instantiate_from_config


class Denoiser(nn.Module):
    """``D(x, sigma) = network(x * c_in, c_noise, cond) * c_out + x * c_skip`` (original ``Denoiser``).

    Holds no parameters.  Extra keyword inputs (``idx``, ``ofs``, ``concat_images`` ...) go to the scaling
    and to the network alike.
    """

    def __init__(self, weighting_config, scaling_config):
        super().__init__()
        self.weighting = instantiate_from_config(weighting_config)
        self.scaling = instantiate_from_config(scaling_config)

    def possibly_quantize_sigma(self, sigma):
        return sigma

    def possibly_quantize_c_noise(self, c_noise):
        return c_noise

    def w(self, sigma):
        return self.weighting(sigma)

    def forward(self, network: nn.Module, input: torch.Tensor, sigma: torch.Tensor, cond: dict,
                **additional_model_inputs) -> torch.Tensor:
        sigma = self.possibly_quantize_sigma(sigma)
        sigma_shape = sigma.shape
        sigma = append_dims(sigma, input.ndim)
        c_skip, c_out, c_in, c_noise = self.scaling(sigma, **additional_model_inputs)
        c_noise = self.possibly_quantize_c_noise(c_noise.reshape(sigma_shape))
        return network(input * c_in, c_noise, cond, **additional_model_inputs) * c_out + input * c_skip


class DiscreteDenoiser(Denoiser):
    """Denoiser over a discrete 1000-entry noise table (original ``DiscreteDenoiser``).

    ``self.sigmas[i]`` is the table value of DDPM timestep ``i`` (a plain attribute, not in the state dict).
    Incoming sigmas are snapped to the nearest table entry before the scaling is evaluated, as in the original.
    """

    def __init__(self, weighting_config, scaling_config, num_idx, discretization_config,
                 do_append_zero=False, quantize_c_noise=True, flip=True):
        super().__init__(weighting_config, scaling_config)
        discretization = instantiate_from_config(discretization_config)
        self.sigmas = discretization(num_idx, do_append_zero=do_append_zero, flip=flip)
        self.quantize_c_noise = quantize_c_noise
        self.num_idx = num_idx

    def sigma_to_idx(self, sigma: torch.Tensor) -> torch.Tensor:
        table = self.sigmas.to(sigma.device)
        dists = sigma.reshape(1, -1) - table[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape)

    def idx_to_sigma(self, idx: torch.Tensor) -> torch.Tensor:
        return self.sigmas.to(idx.device)[idx]

    def possibly_quantize_sigma(self, sigma):
        return self.idx_to_sigma(self.sigma_to_idx(sigma))

    def possibly_quantize_c_noise(self, c_noise):
        return self.sigma_to_idx(c_noise) if self.quantize_c_noise else c_noise
