"""Network wrappers (maps to ``sgm/modules/diffusionmodules/wrappers.py``)."""
from __future__ import annotations

import torch
import torch.nn as nn

OPENAIUNETWRAPPER = "sgm.modules.diffusionmodules.wrappers.OpenAIWrapper"


class IdentityWrapper(nn.Module):
    """Holds the network as ``diffusion_model`` (state-dict prefix ``model.diffusion_model.``)."""

    def __init__(self, diffusion_model, compile_model: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        compile = torch.compile if compile_model else (lambda m: m)
        self.diffusion_model = compile(diffusion_model)
        self.dtype = dtype

    def forward(self, *args, **kwargs):
        return self.diffusion_model(*args, **kwargs)


class OpenAIWrapper(IdentityWrapper):
    """Routes the condition dict to the DiT (original ``OpenAIWrapper``).

    ``c["concat"]`` (I2V image latents) is concatenated to ``x`` along channels (dim 2 of ``[B, T, C, H, W]``,
    dim 1 of 4-D input); ``crossattn`` becomes ``context`` and ``vector`` becomes ``y``.  Condition tensors are
    cast to ``self.dtype``; unlike the original, the caller's dict is not modified.
    """

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: dict, **kwargs) -> torch.Tensor:
        c = {k: (v.to(self.dtype) if torch.is_tensor(v) else v) for k, v in c.items()}
        if x.dim() == 4:
            channel_dim = 1
        elif x.dim() == 5:
            channel_dim = 2
        else:
            raise ValueError(f"OpenAIWrapper expects 4-D or 5-D input, got shape {tuple(x.shape)}")
        concat = c.get("concat", None)
        if concat is not None:
            x = torch.cat((x, concat), dim=channel_dim)
        return self.diffusion_model(x, timesteps=t, context=c.get("crossattn", None), y=c.get("vector", None),
                                    **kwargs)
