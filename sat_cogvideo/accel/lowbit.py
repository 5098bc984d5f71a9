"""``--weights-dtype fp8|int8``: low-bit storage of the DiT's linear weights, compute in the model dtype.

- ``fp8``: diffusers' layerwise casting (``apply_layerwise_casting_hook``: weights stored as float8_e4m3fn, cast to
  the compute dtype around each forward).  Applied per module to SAT's ``ColumnParallelLinear``/
  ``RowParallelLinear`` and ``nn.Linear``, because ``apply_layerwise_casting``'s own walk only knows torch layer
  classes and would skip SAT's linears (~86% of a 5B's weights).  Norms, embeddings and the unused
  ``transformer.position_embeddings`` stay in the compute dtype: SAT takes the attention-mask dtype from the first
  parameter, which is that table, and comparisons on float8 masks have no CPU kernel.
- ``int8``: torchao's ``Int8WeightOnlyConfig`` (per-channel symmetric int8, dequantised in the matmul) through
  ``quantize_`` with a filter that accepts SAT's linears (torchao's default filter takes ``nn.Linear`` only).

Both run on CPU and CUDA: layerwise casting is a plain ``.to()`` around each call, and torchao's int8 weight-only
tensor has CPU kernels (optimum-quanto would also do; torchao is the PyTorch project's own library and its tensor
subclass works under ``torch.compile``).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from sat_cogvideo.accel.layer_hooks import dit_of

WEIGHT_DTYPES = ("fp8", "int8")


def _linear_classes():
    from sat.mpu.layers import ColumnParallelLinear, RowParallelLinear

    return (nn.Linear, ColumnParallelLinear, RowParallelLinear)


def is_linear(module: nn.Module) -> bool:
    """A linear layer with a 2-D weight (SAT's parallel linears included)."""
    weight = getattr(module, "weight", None)
    return isinstance(module, _linear_classes()) and isinstance(weight, torch.Tensor) and weight.dim() == 2


def apply_fp8_storage(dit, compute_dtype: torch.dtype, storage_dtype=torch.float8_e4m3fn) -> int:
    """Store every linear weight of ``dit`` in ``storage_dtype``; returns the number of modules converted."""
    from diffusers.hooks import apply_layerwise_casting_hook

    count = 0
    for module in dit.modules():
        if is_linear(module):
            apply_layerwise_casting_hook(module, storage_dtype, compute_dtype, non_blocking=False)
            count += 1
    return count


def apply_int8_weight_only(dit) -> int:
    """torchao int8 weight-only quantisation of every linear of ``dit``; returns the number of modules."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    names = [name for name, m in dit.named_modules() if is_linear(m)]
    wanted = set(names)
    quantize_(dit, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn in wanted and is_linear(m))
    return len(names)


def apply_weights_dtype(model, kind: str, compute_dtype: torch.dtype | None = None) -> int:
    """Apply ``--weights-dtype kind`` to the DiT of ``model`` (engine or DiT); returns modules converted."""
    dit = dit_of(model)
    if kind == "fp8":
        return apply_fp8_storage(dit, compute_dtype or dit.dtype)
    if kind == "int8":
        return apply_int8_weight_only(dit)
    raise ValueError(f"unknown weights dtype {kind!r}")


def _tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds, looking inside tensor subclasses (torchao keeps int8 data and scales inside)."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def weight_bytes(module: nn.Module) -> int:
    """Bytes of all parameters (and floating buffers) of ``module``, as stored."""
    total = sum(_tensor_bytes(p) for p in module.parameters())
    return total + sum(_tensor_bytes(b) for b in module.buffers() if b.is_floating_point())
