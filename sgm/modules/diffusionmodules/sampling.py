"""The video samplers of CogVideoX (maps to ``sgm/modules/diffusionmodules/sampling.py``).

The sampling variable is ``s = sqrt(alpha_bar)``: ``s = 0`` is pure noise (t = 999) and ``s = 1`` is clean.
Samplers are called as ``sampler(denoiser, x, cond, uc=None, num_steps=None, ...)`` where ``x`` is the initial
noise drawn by the caller and ``denoiser(x, sigma, cond, **extra)`` returns the x0 prediction.

Additions to the original signatures (all optional): ``callback(step, x, denoised)`` called after every step,
and ``generator`` for the per-step noise (default: the global RNG of ``x``'s device, as the original's
``randn_like``).
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from sgm.modules.diffusionmodules.guiders import DynamicCFG
from sgm.util import append_dims, default, instantiate_from_config

DEFAULT_GUIDER = {"target": "sgm.modules.diffusionmodules.guiders.IdentityGuider"}


def _randn(x: torch.Tensor, generator=None) -> torch.Tensor:
    """``randn_like(x)``, optionally from ``generator`` (same RNG consumption as ``randn_like``)."""
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


class BaseDiffusionSampler:
    """Holds the discretization, guider and step count (original ``BaseDiffusionSampler``).

    ``device`` is accepted for config compatibility; ``None`` (our default; the original's was CUDA)
    means "the device of the input noise".
    """

    def __init__(self, discretization_config, num_steps=None, guider_config=None, verbose=False, device=None):
        self.num_steps = num_steps
        self.discretization = instantiate_from_config(discretization_config)
        self.guider = instantiate_from_config(default(guider_config, DEFAULT_GUIDER))
        self.verbose = verbose
        self.device = device

    def get_sigma_gen(self, num_sigmas):
        steps = range(num_sigmas - 1)
        if self.verbose:
            steps = tqdm(steps, total=num_sigmas - 1, desc=f"Sampling with {self.__class__.__name__} for "
                                                            f"{num_sigmas - 1} steps")
        return steps


class VideoDDIMSampler(BaseDiffusionSampler):
    """Deterministic DDIM over the ``s`` schedule (original ``VideoDDIMSampler``).

    ``fixed_frames > 0`` keeps the first latent frames of the initial tensor fixed at every step (or, with
    ``sdedit``, re-noised to the current level).
    """

    def __init__(self, fixed_frames=0, sdedit=False, **kwargs):
        super().__init__(**kwargs)
        self.fixed_frames = fixed_frames
        self.sdedit = sdedit

    def prepare_sampling_loop(self, x, cond, uc=None, num_steps=None):
        device = self.device if self.device is not None else x.device
        s, timesteps = self.discretization(num_steps or self.num_steps, device=device, return_idx=True,
                                           do_append_zero=False)
        s = torch.cat([s, s.new_ones([1])])  # s[n] = 1: the clean end
        timesteps = torch.tensor([-1] + list(timesteps), dtype=torch.long)
        uc = default(uc, cond)
        s_in = x.new_ones([x.shape[0]])
        num_sigmas = len(s)
        self._num_steps_now = num_sigmas - 1
        return x, s_in, s, num_sigmas, cond, uc, timesteps

    def denoise(self, x, denoiser, alpha_cumprod_sqrt, cond, uc, timestep=None, idx=None, scale=None,
                scale_emb=None, ofs=None):
        """One (guided) x0 prediction in float32.  ``timestep`` is the DDPM timestep given to the DiT.

        ``idx`` is the sampler's countdown (n ... 1); it is only kept for signature compatibility.
        """
        extra = {}
        if ofs is not None:
            extra["ofs"] = ofs
        if not isinstance(scale, torch.Tensor) and scale == 1:
            extra["idx"] = x.new_ones([x.shape[0]]) * timestep
            if scale_emb is not None:
                extra["scale_emb"] = scale_emb
            return denoiser(x, alpha_cumprod_sqrt, cond, **extra).to(torch.float32)

        x_in, s_in, c_in = self.guider.prepare_inputs(x, alpha_cumprod_sqrt, cond, uc)
        # the original always doubles idx (so IdentityGuider failed here); we follow the guider's batch
        extra["idx"] = x_in.new_ones([x_in.shape[0]]) * timestep
        denoised = denoiser(x_in, s_in, c_in, **extra)
        denoised = denoised.to(torch.float32)
        sigma = (1 - alpha_cumprod_sqrt ** 2) ** 0.5
        if isinstance(self.guider, DynamicCFG):
            # quirk reproduced: step_index is (number of steps - DDPM timestep), see DynamicCFG
            num_steps = getattr(self, "_num_steps_now", self.num_steps)
            return self.guider(denoised, sigma, step_index=num_steps - timestep, scale=scale)
        return self.guider(denoised, sigma, scale=scale)

    def sampler_step(self, alpha_cumprod_sqrt, next_alpha_cumprod_sqrt, denoiser, x, cond, uc=None, idx=None,
                     timestep=None, scale=None, scale_emb=None, ofs=None):
        denoised = self.denoise(x, denoiser, alpha_cumprod_sqrt, cond, uc, timestep, idx, scale=scale,
                                scale_emb=scale_emb, ofs=ofs)
        a = ((1 - next_alpha_cumprod_sqrt ** 2) / (1 - alpha_cumprod_sqrt ** 2)) ** 0.5
        b = next_alpha_cumprod_sqrt - alpha_cumprod_sqrt * a
        x = append_dims(a, x.ndim) * x + append_dims(b, x.ndim) * denoised
        return x, denoised

    # -- the loop shared by the video samplers -------------------------------------------------------------
    def _fix_frames(self, x, prefix, s_i, generator):
        if self.sdedit:
            rho = _randn(prefix, generator)
            x[:, :self.fixed_frames] = s_i * prefix + (1 - s_i ** 2) ** 0.5 * rho
        else:
            x[:, :self.fixed_frames] = prefix
        return x

    def _step(self, i, s, s_in, timesteps, denoiser, x, cond, uc, n, scale, scale_emb, ofs, generator):
        x, denoised = self.sampler_step(s_in * s[i], s_in * s[i + 1], denoiser, x, cond, uc, idx=n - i,
                                        timestep=timesteps[-(i + 1)], scale=scale, scale_emb=scale_emb, ofs=ofs)
        return x, denoised

    def __call__(self, denoiser, x, cond, uc=None, num_steps=None, scale=None, scale_emb=None, ofs=None,
                 callback=None, generator=None):
        x, s_in, s, num_sigmas, cond, uc, timesteps = self.prepare_sampling_loop(x, cond, uc, num_steps)
        n = num_sigmas - 1
        self._reset()
        prefix = None
        if self.fixed_frames > 0:
            x = x.clone()  # the fixed frames are written in place; keep the caller's tensor intact
            prefix = x[:, :self.fixed_frames].clone()
        for i in self.get_sigma_gen(num_sigmas):
            if prefix is not None:
                x = self._fix_frames(x, prefix, s[i], generator)
            x, denoised = self._step(i, s, s_in, timesteps, denoiser, x, cond, uc, n, scale, scale_emb, ofs,
                                     generator)
            if callback is not None:
                callback(i, x, denoised)
        if prefix is not None:
            x[:, :self.fixed_frames] = prefix
        return x

    def _reset(self):
        pass


class VPSDEDPMPP2MSampler(VideoDDIMSampler):
    """Stochastic DPM-Solver++(2M) in VP form (original ``VPSDEDPMPP2MSampler``; every released config).

    With ``lambda(s) = ln sqrt(s^2 / (1 - s^2))`` and ``h = lambda_next - lambda``:
    ``x <- sqrt((1-s_next^2)/(1-s^2)) e^-h x - expm1(-2h) s_next D' + sqrt(1-s_next^2) sqrt(1-e^-2h) eps``
    where ``D'`` is the 2M extrapolation of the last two x0 predictions.  As in the original: the first step
    (``s = 0``, ``h = inf``) is first order, the last step returns the prediction itself, and every middle
    step draws one noise tensor that is discarded before the one it uses (same RNG stream as the original).
    """

    def get_variables(self, alpha_cumprod_sqrt, next_alpha_cumprod_sqrt, previous_alpha_cumprod_sqrt=None):
        def lam(a):
            return ((a ** 2 / (1 - a ** 2)) ** 0.5).log()

        lamb, lamb_next = lam(alpha_cumprod_sqrt), lam(next_alpha_cumprod_sqrt)
        h = lamb_next - lamb
        if previous_alpha_cumprod_sqrt is not None:
            h_last = lamb - lam(previous_alpha_cumprod_sqrt)
            return h, h_last / h, lamb, lamb_next
        return h, None, lamb, lamb_next

    def get_mult(self, h, r, alpha_cumprod_sqrt, next_alpha_cumprod_sqrt, previous_alpha_cumprod_sqrt=None):
        mult1 = ((1 - next_alpha_cumprod_sqrt ** 2) / (1 - alpha_cumprod_sqrt ** 2)) ** 0.5 * (-h).exp()
        mult2 = (-2 * h).expm1() * next_alpha_cumprod_sqrt
        if previous_alpha_cumprod_sqrt is not None:
            mult3 = 1 + 1 / (2 * r)
            mult4 = 1 / (2 * r)
            return mult1, mult2, mult3, mult4
        return mult1, mult2

    def sampler_step(self, old_denoised, previous_alpha_cumprod_sqrt, alpha_cumprod_sqrt, next_alpha_cumprod_sqrt,
                     denoiser, x, cond, uc=None, idx=None, timestep=None, scale=None, scale_emb=None, ofs=None,
                     last=None, generator=None):
        denoised = self.denoise(x, denoiser, alpha_cumprod_sqrt, cond, uc, timestep, idx, scale=scale,
                                scale_emb=scale_emb, ofs=ofs)
        # the original tests idx == 1 (only right when num_steps is the configured one); we test the loop index
        if last if last is not None else idx == 1:
            return denoised, denoised

        h, r, lamb, lamb_next = self.get_variables(alpha_cumprod_sqrt, next_alpha_cumprod_sqrt,
                                                   previous_alpha_cumprod_sqrt)
        mult = [append_dims(m, x.ndim) for m in
                self.get_mult(h, r, alpha_cumprod_sqrt, next_alpha_cumprod_sqrt, previous_alpha_cumprod_sqrt)]
        noise_std = append_dims((1 - next_alpha_cumprod_sqrt ** 2) ** 0.5 * (1 - (-2 * h).exp()) ** 0.5, x.ndim)

        x_standard = mult[0] * x - mult[1] * denoised + noise_std * _randn(x, generator)
        if old_denoised is None or torch.sum(next_alpha_cumprod_sqrt) < 1e-14:
            return x_standard, denoised
        denoised_d = mult[2] * denoised - mult[3] * old_denoised
        x_advanced = mult[0] * x - mult[1] * denoised_d + noise_std * _randn(x, generator)
        return x_advanced, denoised

    def _reset(self):
        self._old_denoised = None

    def _step(self, i, s, s_in, timesteps, denoiser, x, cond, uc, n, scale, scale_emb, ofs, generator):
        s_prev = None if i == 0 else s_in * s[i - 1]
        x, denoised = self.sampler_step(self._old_denoised, s_prev, s_in * s[i], s_in * s[i + 1], denoiser, x,
                                        cond, uc=uc, idx=n - i, timestep=timesteps[-(i + 1)], scale=scale,
                                        scale_emb=scale_emb, ofs=ofs, last=(i == n - 1), generator=generator)
        self._old_denoised = denoised
        return x, denoised


class VPODEDPMPP2MSampler(VPSDEDPMPP2MSampler):
    """Deterministic DPM-Solver++(2M) in VP form (original ``VPODEDPMPP2MSampler``; unused by the configs)."""

    def get_mult(self, h, r, alpha_cumprod_sqrt, next_alpha_cumprod_sqrt, previous_alpha_cumprod_sqrt=None):
        mult1 = ((1 - next_alpha_cumprod_sqrt ** 2) / (1 - alpha_cumprod_sqrt ** 2)) ** 0.5
        mult2 = (-h).expm1() * next_alpha_cumprod_sqrt
        if previous_alpha_cumprod_sqrt is not None:
            return mult1, mult2, 1 + 1 / (2 * r), 1 / (2 * r)
        return mult1, mult2

    def sampler_step(self, old_denoised, previous_alpha_cumprod_sqrt, alpha_cumprod_sqrt, next_alpha_cumprod_sqrt,
                     denoiser, x, cond, uc=None, idx=None, timestep=None, scale=None, scale_emb=None, ofs=None,
                     last=None, generator=None):
        denoised = self.denoise(x, denoiser, alpha_cumprod_sqrt, cond, uc, timestep, idx, scale=scale, ofs=ofs)
        if last if last is not None else idx == 1:
            return denoised, denoised
        h, r, _, _ = self.get_variables(alpha_cumprod_sqrt, next_alpha_cumprod_sqrt, previous_alpha_cumprod_sqrt)
        mult = [append_dims(m, x.ndim) for m in
                self.get_mult(h, r, alpha_cumprod_sqrt, next_alpha_cumprod_sqrt, previous_alpha_cumprod_sqrt)]
        x_standard = mult[0] * x - mult[1] * denoised
        if old_denoised is None or torch.sum(next_alpha_cumprod_sqrt) < 1e-14:
            return x_standard, denoised
        denoised_d = mult[2] * denoised - mult[3] * old_denoised
        return mult[0] * x - mult[1] * denoised_d, denoised
