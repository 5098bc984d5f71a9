"""CFG parallelism: the two halves of the guider's batch (unconditional first, then conditional) computed by
the two ranks of a CFG group, then gathered, so the sampler and DynamicCFG see the whole batch unchanged.

Maps to nothing in the original (the guider stacks ``[uc; c]`` and one process runs the DiT on both).  Done with
torch forward hooks on the DiT (``register_forward_pre_hook(with_kwargs=True)`` + ``register_forward_hook``), so
the model code is untouched: every tensor argument whose first dimension is the batch is cut to this rank's
half; a batch that does not divide runs whole on every rank (same result, no speed-up).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class CFGParallel:
    """The hooks of one DiT; :meth:`remove` takes them off again."""

    def __init__(self, module: torch.nn.Module, group, size: int, index: int):
        self.group, self.size, self.index = group, size, index
        self._split = []
        self._handles = [module.register_forward_pre_hook(self._pre, with_kwargs=True),
                         module.register_forward_hook(self._post)]

    def _cut(self, value, batch: int):
        if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch:
            part = batch // self.size
            return value[self.index * part:(self.index + 1) * part]
        return value

    def _pre(self, module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        batch = x.shape[0]
        split = batch % self.size == 0
        self._split.append(split)
        if not split:
            return None
        return (tuple(self._cut(a, batch) for a in args), {k: self._cut(v, batch) for k, v in kwargs.items()})

    def _post(self, module, args, output):
        if not self._split.pop():
            return None
        parts = [torch.empty_like(output) for _ in range(self.size)]
        dist.all_gather(parts, output.contiguous(), group=self.group)
        return torch.cat(parts, dim=0)

    def remove(self):
        for handle in self._handles:
            handle.remove()
