"""The VAE posterior and its regularizer (original ``sat/vae_modules/regularizers.py`` and the
``DiagonalGaussianDistribution`` of ``sgm.modules.distributions``)."""
from __future__ import annotations

import torch
import torch.nn as nn


class DiagonalGaussianDistribution:
    """Diagonal Gaussian from encoder moments: mean and log-variance stacked along dim 1 (logvar clamped to [-30, 20])."""

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.var = self.std = torch.zeros_like(self.mean)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """``mean + std * noise``; the noise comes from the global RNG (as the original) unless ``generator``."""
        if generator is None:
            noise = torch.randn_like(self.mean)
        else:
            noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other=None) -> torch.Tensor:
        if self.deterministic:
            return torch.tensor([0.0], device=self.mean.device)
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum((self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0
                               - self.logvar + other.logvar, dim=[1, 2, 3])

    def nll(self, sample, dims=(1, 2, 3)) -> torch.Tensor:
        if self.deterministic:
            return torch.tensor([0.0], device=self.mean.device)
        logtwopi = torch.log(torch.tensor(2.0 * torch.pi, dtype=self.mean.dtype, device=self.mean.device))
        return 0.5 * torch.sum(logtwopi + self.logvar + (sample - self.mean).pow(2) / self.var, dim=list(dims))


class AbstractRegularizer(nn.Module):
    """Base class: ``forward(z) -> (z', log dict)``; no trainable parameters."""

    def forward(self, z: torch.Tensor):
        raise NotImplementedError

    def get_trainable_parameters(self):
        yield from ()


class IdentityRegularizer(AbstractRegularizer):
    def forward(self, z: torch.Tensor):
        return z, dict()


class DiagonalGaussianRegularizer(AbstractRegularizer):
    """Posterior sample (``sample=True``, the CogVideoX default) or mean, plus the batch-mean KL as ``kl_loss``."""

    def __init__(self, sample: bool = True):
        super().__init__()
        self.sample = sample

    def forward(self, z: torch.Tensor, generator: torch.Generator | None = None):
        posterior = DiagonalGaussianDistribution(z)
        z = posterior.sample(generator) if self.sample else posterior.mode()
        kl_loss = posterior.kl()
        kl_loss = torch.sum(kl_loss) / kl_loss.shape[0]
        return z, {"kl_loss": kl_loss}
