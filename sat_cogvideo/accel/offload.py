"""``--offload model|group|sequential``: where the engine's weights live during inference.

- ``model``: T5, DiT and VAE each moved to the device only while it works (:class:`Placement`).
- ``group``: T5 and VAE as ``model``; the DiT stays on the CPU and diffusers' ``apply_group_offloading`` moves
  one group at a time onto the device: per SAT layer the attention block and the MLP block (the sub-modules SAT
  calls as modules), and every other module holding weights on its own.
- ``sequential``: the same with one group per module holding weights (the smallest device footprint).

diffusers' own block level never fires on SAT (layers run through ``hooks['layer_forward']``, never
``layer(...)``), and its leaf level only recognises torch layer classes, which leaves SAT's
``ColumnParallelLinear``/``RowParallelLinear`` to the top-level group (moved for the whole forward).  So
``apply_group_offloading`` is applied here per unit, to modules whose ``forward`` SAT does call.  The RoPE mixin
(its tables are read inside hook methods) and the unused ``transformer.position_embeddings`` (SAT reads the mask
dtype from it) stay on the device.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from sat_cogvideo.accel.layer_hooks import dit_of
from sat_cogvideo.distributed import is_cuda

RESIDENT = ("mixins.pos_embed", "transformer.position_embeddings")


def _has_own_weights(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(
        b.is_floating_point() for b in module.buffers(recurse=False))


def offload_units(dit, mode: str):
    """Names of the modules that become one offload group each, and the names kept on the device."""
    units, taken = [], set()
    if mode == "group":
        for i, layer in enumerate(dit.transformer.layers):
            for part in ("attention", "mlp"):
                name = f"transformer.layers.{i}.{part}"
                units.append(name)
                taken.update(n for n, _ in getattr(layer, part).named_modules(prefix=name))
    resident = [n for n, _ in dit.named_modules() if n in RESIDENT]
    for name, module in dit.named_modules():
        if name in taken or any(name == r or name.startswith(r + ".") for r in RESIDENT):
            continue
        if name and _has_own_weights(module):
            units.append(name)
    return units, resident


def apply_dit_offload(model, device, mode: str, use_stream: bool = False):
    """Offload the DiT of ``model`` with diffusers' group offloading; returns the number of groups."""
    from diffusers.hooks import apply_group_offloading

    dit = dit_of(model)
    device = torch.device(device)
    units, resident = offload_units(dit, mode)
    modules = dict(dit.named_modules())
    dit.to("cpu")
    for name in resident:
        modules[name].to(device)
    for name in units:
        apply_group_offloading(modules[name], onload_device=device, offload_device=torch.device("cpu"),
                               offload_type="block_level", num_blocks_per_group=1,
                               use_stream=use_stream and is_cuda(device))
    return len(units)


class Placement:
    """Where each part of the engine lives: all on the device, or (``--offload model``) each part moved to the
    device only while it works.  The original has no such class: it moves the whole engine with ``model.to(device)``."""

    def __init__(self, model, device, offload: bool):
        self.model, self.device, self.offload = model, device, offload
        if not offload:
            model.to(device)
        self._set_embedder_device(device)

    def _set_embedder_device(self, device):
        for emb in getattr(self.model.conditioner, "embedders", []):
            if hasattr(emb, "device"):
                emb.device = device

    def use(self, part):
        module = getattr(self.model, part)

        @contextlib.contextmanager
        def ctx():
            if self.offload:
                module.to(self.device)
            try:
                yield module
            finally:
                if self.offload:
                    module.to("cpu")
                    _empty_cache(self.device)

        return ctx()


def _empty_cache(device):
    if is_cuda(device):
        torch.cuda.empty_cache()


def make_placement(model, device, mode):
    """The placement of ``sample_video`` for ``--offload mode`` (None/False: everything on the device)."""
    if mode in (None, False):
        return Placement(model, device, False)
    if mode in (True, "model"):
        return Placement(model, device, True)
    return GroupPlacement(model, device, mode)


class GroupPlacement:
    """``Placement`` for ``group``/``sequential``: the DiT's groups are moved by hooks, T5 and VAE per use.
    (No counterpart in the original, which keeps everything on the GPU.)"""

    def __init__(self, model, device, mode):
        self._inner = Placement(model, device, True)
        self.model, self.device, self.offload, self.mode = model, device, mode, mode
        dit = dit_of(model)
        rest = [m for n, m in model.model.named_children() if m is not dit]
        for m in rest:
            m.to(device)
        apply_dit_offload(model, device, mode)

    def use(self, part):
        if part == "model":
            return contextlib.nullcontext(self.model.model)
        return self._inner.use(part)
