"""``--attention sdpa|flash|sage``: the kernel behind the DiT's one attention call (``sdpa_attention`` in
``dit_video_concat``, full attention over ``[B, heads, S, head_dim]``).

``sdpa`` is PyTorch's ``scaled_dot_product_attention`` (any device; the default and the only choice on CPU).
``flash`` calls flash-attn's ``flash_attn_func`` (layout ``[B, S, heads, d]``, fp16/bf16, CUDA compute
capability >= 8.0); ``sage`` calls SageAttention's ``sageattn`` (``tensor_layout="HND"``, CUDA >= 8.0).  Neither
is a dependency: when missing or unsupported the option is refused with one line before anything loads.  The
kernel is process-wide (``dit_video_concat.sdpa_kernel``), as there is one attention call site.
"""
from __future__ import annotations

import importlib.util

from sat_cogvideo.errors import UserError

_PACKAGES = {"flash": ("flash_attn", "flash-attn"), "sage": ("sageattention", "sageattention")}


def check_backend(name: str, device_type: str) -> None:
    """Refuse a backend that cannot run here (one line)."""
    if name == "sdpa":
        return
    if name not in _PACKAGES:
        raise UserError(f"--attention {name}: use sdpa, flash or sage")
    module, pip_name = _PACKAGES[name]
    if device_type != "cuda":
        raise UserError(f"--attention {name} needs a CUDA GPU (the device is {device_type}); use --attention sdpa")
    if importlib.util.find_spec(module) is None:
        raise UserError(f"--attention {name}: {pip_name} is not installed (pip install {pip_name}), or use "
                        "--attention sdpa")
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"--attention {name} needs a CUDA GPU but torch sees none; use --attention sdpa")
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        raise UserError(f"--attention {name} needs compute capability 8.0 or newer (this GPU has {major}.{minor}); "
                        "use --attention sdpa")


def _flash(q, k, v, dropout_p=0.0):
    from flash_attn import flash_attn_func

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p)
    return out.transpose(1, 2)


def _sage(q, k, v, dropout_p=0.0):
    from sageattention import sageattn

    if dropout_p:
        raise ValueError("SageAttention has no dropout: use --attention sdpa for training")
    return sageattn(q, k, v, tensor_layout="HND", is_causal=False)


def kernel(name: str):
    """The callable ``(q, k, v, dropout_p=0.0) -> out`` of a backend, all in ``[B, heads, S, d]`` (None for sdpa:
    the model then calls ``torch.nn.functional.scaled_dot_product_attention`` itself)."""
    return {"sdpa": None, "flash": _flash, "sage": _sage}[name]


def set_attention_backend(name: str):
    """Make ``name`` the DiT's attention kernel; returns the previous kernel (to restore it)."""
    from sat_cogvideo import dit_video_concat

    previous = dit_video_concat.sdpa_kernel
    dit_video_concat.sdpa_kernel = kernel(name)
    return previous
