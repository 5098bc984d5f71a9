"""The video samplers of CogVideoX (maps to ``sgm/modules/diffusionmodules/sampling.py``).

The sampling variable is ``s = sqrt(alpha_bar)``: ``s = 0`` is pure noise (t = 999) and ``s = 1`` is clean.
Samplers are called as ``sampler(denoiser, x, cond, uc=None, num_steps=None, ...)`` where ``x`` is the initial
noise drawn by the caller and ``denoiser(x, sigma, cond, **extra)`` returns the x0 prediction.

Layout (as k-diffusion's ``sampling.py``): each update below is a pure function of the state
``(x, D, D_prev, s_prev, s, s_next, noise)``; ``VideoDDIMSampler.__call__`` is the one loop, which keeps its state
(``x``, the previous prediction) in locals and can start at any step (video-to-video); the sampler classes only
choose the update.

Additions to the original signatures (all optional): ``callback(step, x, denoised)`` called after every step,
``generator`` for the per-step noise (default: the global RNG of ``x``'s device, as the original's
``randn_like``) and ``start``, the first step to run.
"""
from __future__ import annotations

from functools import partial

import torch
from tqdm import tqdm

from sgm.util import append_dims, default, instantiate_from_config

DEFAULT_GUIDER = {"target": "sgm.modules.diffusionmodules.guiders.IdentityGuider"}


def _randn(x: torch.Tensor, generator=None) -> torch.Tensor:
    """``randn_like(x)``, optionally from ``generator`` (same RNG consumption as ``randn_like``)."""
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


# -- the updates: one step each, from the prediction D of the current step -------------------------------------

def half_log_snr(s: torch.Tensor) -> torch.Tensor:
    """``lambda(s) = ln sqrt(s^2 / (1 - s^2))``, evaluated as written (``s = 0`` gives ``-inf``)."""
    return ((s ** 2 / (1 - s ** 2)) ** 0.5).log()


def ddim_update(x, denoised, s, s_next):
    """DDIM with eta = 0: ``x <- a x + (s_next - s a) D`` with ``a = sqrt((1 - s_next^2) / (1 - s^2))``."""
    a = ((1 - s_next ** 2) / (1 - s ** 2)) ** 0.5
    b = s_next - s * a
    return append_dims(a, x.ndim) * x + append_dims(b, x.ndim) * denoised


def _extrapolate_2m(denoised, old_denoised, s_prev, s, h):
    """The 2M prediction ``D' = (1 + 1/(2r)) D - 1/(2r) D_prev`` with ``r = h_last / h``.

    At step 1 ``s_prev = 0`` gives ``h_last = inf``, ``1/(2r) = 0``: ``D' = D``, the step stays first order.
    """
    r = (half_log_snr(s) - half_log_snr(s_prev)) / h
    w_now = append_dims(1 + 1 / (2 * r), denoised.ndim)
    w_old = append_dims(1 / (2 * r), denoised.ndim)
    return w_now * denoised - w_old * old_denoised


def _no_second_order(old_denoised, s_next) -> bool:
    return old_denoised is None or bool(torch.sum(s_next) < 1e-14)


def dpmpp_2m_sde_update(x, denoised, old_denoised, s_prev, s, s_next, noise_like):
    """DPM-Solver++(2M) SDE, VP form, with ``h = lambda(s_next) - lambda(s)``:

    ``x <- sqrt((1 - s_next^2)/(1 - s^2)) e^-h x - expm1(-2h) s_next D' + sqrt(1 - s_next^2) sqrt(1 - e^-2h) eps``

    ``D' = D`` without a previous prediction.  ``noise_like(x)`` draws ``eps``; as in the original the first-order
    result is always computed with one draw, and a second-order step discards it and draws again.
    At ``s = 0`` (first step) ``h = inf``: ``x = s_next D + sqrt(1 - s_next^2) eps``.
    """
    h = half_log_snr(s_next) - half_log_snr(s)
    decay = append_dims(((1 - s_next ** 2) / (1 - s ** 2)) ** 0.5 * (-h).exp(), x.ndim)
    gain = append_dims((-2 * h).expm1() * s_next, x.ndim)  # negative
    noise_std = append_dims((1 - s_next ** 2) ** 0.5 * (1 - (-2 * h).exp()) ** 0.5, x.ndim)
    x_first = decay * x - gain * denoised + noise_std * noise_like(x)
    if _no_second_order(old_denoised, s_next):
        return x_first
    denoised_2m = _extrapolate_2m(denoised, old_denoised, s_prev, s, h)
    return decay * x - gain * denoised_2m + noise_std * noise_like(x)


def dpmpp_2m_update(x, denoised, old_denoised, s_prev, s, s_next):
    """DPM-Solver++(2M) ODE, VP form: ``x <- sqrt((1 - s_next^2)/(1 - s^2)) x - expm1(-h) s_next D'``."""
    h = half_log_snr(s_next) - half_log_snr(s)
    decay = append_dims(((1 - s_next ** 2) / (1 - s ** 2)) ** 0.5, x.ndim)
    gain = append_dims((-h).expm1() * s_next, x.ndim)
    if _no_second_order(old_denoised, s_next):
        return decay * x - gain * denoised
    return decay * x - gain * _extrapolate_2m(denoised, old_denoised, s_prev, s, h)


# -- the samplers ------------------------------------------------------------------------------------------------

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

    def get_sigma_gen(self, num_sigmas, start=0):
        """The step indices ``start … num_sigmas - 2``, with a progress bar when ``verbose``."""
        steps = range(start, num_sigmas - 1)
        if self.verbose:
            steps = tqdm(steps, total=len(steps), desc=f"Sampling with {self.__class__.__name__} for "
                                                       f"{len(steps)} steps")
        return steps


class VideoDDIMSampler(BaseDiffusionSampler):
    """Deterministic DDIM over the ``s`` schedule (original ``VideoDDIMSampler``); its ``__call__`` is the loop
    of every video sampler, the subclasses only replace :meth:`update`.

    ``fixed_frames > 0`` keeps the first latent frames of the initial tensor fixed at every step (or, with
    ``sdedit``, re-noised to the current level).
    """

    last_step_returns_prediction = False  # DDIM's formula already gives x = D at s_next = 1

    def __init__(self, fixed_frames=0, sdedit=False, **kwargs):
        super().__init__(**kwargs)
        self.fixed_frames = fixed_frames
        self.sdedit = sdedit

    def schedule(self, num_steps=None, device=None):
        """``(s, timesteps)``: ``s[0] = 0 … s[n] = 1`` and ``[-1, t_0, …, t_{n-1}]`` (step ``i`` runs at
        ``timesteps[-(i + 1)]``: 999, 979, … for 50 steps)."""
        s, timesteps = self.discretization(num_steps or self.num_steps, device=default(self.device, device),
                                           return_idx=True, do_append_zero=False)
        s = torch.cat([s, s.new_ones([1])])
        return s, torch.tensor([-1] + list(timesteps), dtype=torch.long)

    def prepare_sampling_loop(self, x, cond, uc=None, num_steps=None):
        """The original's set-up tuple ``(x, s_in, s, n + 1, cond, uc, timesteps)``."""
        s, timesteps = self.schedule(num_steps, x.device)
        return x, x.new_ones([x.shape[0]]), s, len(s), cond, default(uc, cond), timesteps

    def denoise(self, x, denoiser, alpha_cumprod_sqrt, cond, uc, timestep=None, idx=None, scale=None,
                scale_emb=None, ofs=None, step_index=None):
        """One (guided) x0 prediction in float32.  ``timestep`` is the DDPM timestep given to the DiT.

        ``step_index`` goes to the guider (DynamicCFG); by default the original's ``num_steps - timestep``.
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
        denoised = denoiser(x_in, s_in, c_in, **extra).to(torch.float32)
        sigma = (1 - alpha_cumprod_sqrt ** 2) ** 0.5
        if step_index is None and self.num_steps is not None:
            step_index = self.num_steps - timestep
        return self.guider(denoised, sigma, step_index=step_index, scale=scale)

    def update(self, x, denoised, old_denoised, s_prev, s, s_next, noise_like):
        """The step ``x -> x_next`` from this step's prediction (DDIM here)."""
        return ddim_update(x, denoised, s, s_next)

    def sampler_step(self, alpha_cumprod_sqrt, next_alpha_cumprod_sqrt, denoiser, x, cond, uc=None, idx=None,
                     timestep=None, scale=None, scale_emb=None, ofs=None):
        """One DDIM step on its own (original signature); returns ``(x_next, D)``."""
        denoised = self.denoise(x, denoiser, alpha_cumprod_sqrt, cond, uc, timestep, idx, scale=scale,
                                scale_emb=scale_emb, ofs=ofs)
        return ddim_update(x, denoised, alpha_cumprod_sqrt, next_alpha_cumprod_sqrt), denoised

    def __call__(self, denoiser, x, cond, uc=None, num_steps=None, scale=None, scale_emb=None, ofs=None,
                 callback=None, generator=None, start=0):
        """Run steps ``start … n-1`` from ``x`` and return the sample.

        ``start > 0`` (video-to-video): ``x`` is already at level ``s[start]``; the first step has no previous
        prediction.  The fixed frames are held only in a run from noise (``start = 0``).
        """
        x, s_in, s, num_sigmas, cond, uc, timesteps = self.prepare_sampling_loop(x, cond, uc, num_steps)
        n = num_sigmas - 1
        noise_like = partial(_randn, generator=generator)
        prefix = None
        if self.fixed_frames > 0 and start == 0:
            x = x.clone()  # the fixed frames are written in place; keep the caller's tensor intact
            prefix = x[:, :self.fixed_frames].clone()
        old_denoised = None
        for i in self.get_sigma_gen(num_sigmas, start):
            if prefix is not None:
                x = self._hold_frames(x, prefix, s[i], noise_like)
            t = timesteps[-(i + 1)]
            s_prev, s_i, s_next = (None if i == 0 else s_in * s[i - 1]), s_in * s[i], s_in * s[i + 1]
            denoised = self.denoise(x, denoiser, s_i, cond, uc, t, n - i, scale=scale, scale_emb=scale_emb,
                                    ofs=ofs, step_index=n - t)  # the DynamicCFG quirk: n - DDPM timestep
            if i == n - 1 and self.last_step_returns_prediction:
                x = denoised
            else:
                x = self.update(x, denoised, old_denoised, s_prev, s_i, s_next, noise_like)
            old_denoised = denoised
            if callback is not None:
                callback(i, x, denoised)
        if prefix is not None:
            x[:, :self.fixed_frames] = prefix
        return x

    def _hold_frames(self, x, prefix, s_i, noise_like):
        if self.sdedit:
            rho = noise_like(prefix)
            x[:, :self.fixed_frames] = s_i * prefix + (1 - s_i ** 2) ** 0.5 * rho
        else:
            x[:, :self.fixed_frames] = prefix
        return x


class VPSDEDPMPP2MSampler(VideoDDIMSampler):
    """Stochastic DPM-Solver++(2M) in VP form (original ``VPSDEDPMPP2MSampler``; every released config).

    Update: :func:`dpmpp_2m_sde_update`.  As in the original: the first step (``s = 0``, ``h = inf``) is first
    order, the last step returns the prediction itself (no noise drawn), and every middle step draws one noise
    tensor that is discarded before the one it uses (1 + 2 (n - 2) draws for n steps, the original's RNG stream).
    """

    last_step_returns_prediction = True

    def update(self, x, denoised, old_denoised, s_prev, s, s_next, noise_like):
        return dpmpp_2m_sde_update(x, denoised, old_denoised, s_prev, s, s_next, noise_like)

    def sampler_step(self, old_denoised, previous_alpha_cumprod_sqrt, alpha_cumprod_sqrt, next_alpha_cumprod_sqrt,
                     denoiser, x, cond, uc=None, idx=None, timestep=None, scale=None, scale_emb=None, ofs=None,
                     last=None, generator=None):
        """One step on its own (original signature); returns ``(x_next, D)``.  ``last`` marks the final step;
        without it the original's test ``idx == 1`` is used (right only for the configured step count)."""
        denoised = self.denoise(x, denoiser, alpha_cumprod_sqrt, cond, uc, timestep, idx, scale=scale,
                                scale_emb=scale_emb, ofs=ofs)
        if last if last is not None else idx == 1:
            return denoised, denoised
        x = self.update(x, denoised, old_denoised, previous_alpha_cumprod_sqrt, alpha_cumprod_sqrt,
                        next_alpha_cumprod_sqrt, partial(_randn, generator=generator))
        return x, denoised


class VPODEDPMPP2MSampler(VPSDEDPMPP2MSampler):
    """Deterministic DPM-Solver++(2M) in VP form (original ``VPODEDPMPP2MSampler``; unused by the configs).

    Update: :func:`dpmpp_2m_update`; same first/last step rules as the SDE sampler, no noise.
    """

    def update(self, x, denoised, old_denoised, s_prev, s, s_next, noise_like):
        return dpmpp_2m_update(x, denoised, old_denoised, s_prev, s, s_next)
