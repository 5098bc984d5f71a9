"""Training losses (maps to ``sgm/modules/diffusionmodules/loss.py``)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from sat_cogvideo.errors import UserError
from sgm.util import append_dims, instantiate_from_config


def _broadcast_from_model_parallel_src(*tensors):
    """Give every rank of a model-parallel group the tensors of its first rank (no-op without model parallel)."""
    if not dist.is_initialized():
        return
    from sat import mpu

    if not mpu.model_parallel_is_initialized() or mpu.get_model_parallel_world_size() == 1:
        return
    for t in tensors:
        dist.broadcast(t, mpu.get_model_parallel_src_rank(), group=mpu.get_model_parallel_group())


class StandardDiffusionLoss(nn.Module):
    """Base loss holding the sigma sampler and the loss type (original ``StandardDiffusionLoss``)."""

    def __init__(self, sigma_sampler_config, type="l2", offset_noise_level=0.0, batch2model_keys=None):
        super().__init__()
        if type not in ("l2", "l1"):
            raise UserError(f"loss type {type!r} is not supported: use 'l2' or 'l1' in the loss_fn_config params")
        self.sigma_sampler = instantiate_from_config(sigma_sampler_config)
        self.type = type
        self.offset_noise_level = offset_noise_level
        if isinstance(batch2model_keys, str):
            batch2model_keys = [batch2model_keys]
        self.batch2model_keys = set(batch2model_keys or [])

    def get_loss(self, model_output, target, w):
        diff = model_output - target
        per_elem = w * (diff ** 2 if self.type == "l2" else diff.abs())
        return torch.mean(per_elem.reshape(target.shape[0], -1), 1)


class VideoDiffusionLoss(StandardDiffusionLoss):
    """v-prediction loss of CogVideoX (original ``VideoDiffusionLoss``).

    Per sample: draw a timestep and its ``s``, noise the latent ``x_t = s x0 + sqrt(1 - s^2) eps`` and return
    ``mean(w * (D(x_t) - x0)^2)`` with ``w = 1 / (1 - s^2)``, which equals the plain MSE between the predicted
    and the true velocity.  ``batch["concat_images"]`` (I2V) becomes ``cond["concat"]``.  Random numbers are
    drawn in the original's order: timesteps (CPU ``randint``), then ``eps`` in the latent's dtype, then the
    offset noise.  ``block_scale``, ``block_size``, ``min_snr_value`` and ``fixed_frames`` are accepted for
    config compatibility and unused, as in the original.
    """

    def __init__(self, block_scale=None, block_size=None, min_snr_value=None, fixed_frames=0, **kwargs):
        super().__init__(**kwargs)
        self.block_scale = block_scale
        self.block_size = block_size
        self.min_snr_value = min_snr_value
        self.fixed_frames = fixed_frames

    def __call__(self, network, denoiser, conditioner, input, batch):
        cond = conditioner(batch)
        additional_model_inputs = {k: batch[k] for k in self.batch2model_keys.intersection(batch)}

        alphas_cumprod_sqrt, idx = self.sigma_sampler(input.shape[0], return_idx=True)
        alphas_cumprod_sqrt = alphas_cumprod_sqrt.to(input.device)
        idx = idx.to(input.device)
        noise = torch.randn_like(input)
        _broadcast_from_model_parallel_src(idx, noise, alphas_cumprod_sqrt)
        additional_model_inputs["idx"] = idx

        if self.offset_noise_level > 0.0:
            noise = noise + self.offset_noise_level * append_dims(
                torch.randn(input.shape[0], device=input.device), input.ndim)

        s = append_dims(alphas_cumprod_sqrt, input.ndim)
        noised_input = input.float() * s + noise * (1 - s ** 2) ** 0.5

        if "concat_images" in batch:
            cond["concat"] = batch["concat_images"]

        model_output = denoiser(network, noised_input, alphas_cumprod_sqrt, cond, **additional_model_inputs)
        w = append_dims(1 / (1 - alphas_cumprod_sqrt ** 2), input.ndim)
        return self.get_loss(model_output, input, w)
