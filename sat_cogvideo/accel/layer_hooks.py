"""Wrapping the one call SAT makes per transformer layer, ``hooks['layer_forward']``.

SAT's ``BaseTransformer.forward`` runs every layer as ``hooks['layer_forward'](hidden, mask, layer_id=tensor(i),
**kw)`` (``AdaLNMixin.layer_forward`` in our DiT), never as ``layer(...)``; ``BaseModel.forward`` copies
``model.hooks`` into ``model.transformer.hooks`` at every call.  So replacing ``model.hooks['layer_forward']`` is
the one place an option can act per layer from outside the model code: regional compile and step caching do it.
Wrappers stack (the last one applied runs first) and :func:`unwrap_all` restores the model's own hook.
"""
from __future__ import annotations

from typing import Callable

_ORIGINAL = "_accel_original_layer_forward"


def dit_of(model):
    """The ``DiffusionTransformer`` of an engine (``engine.model.diffusion_model``) or the DiT itself."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "diffusion_model"):
        return inner.diffusion_model
    return model


def wrap_layer_forward(dit, make: Callable[[Callable], Callable]) -> Callable:
    """Replace the DiT's ``layer_forward`` hook by ``make(current_hook)``; returns the new hook."""
    current = dit.hooks["layer_forward"]
    if not hasattr(dit, _ORIGINAL):
        object.__setattr__(dit, _ORIGINAL, current)
    new = make(current)
    dit.hooks["layer_forward"] = new
    return new


def unwrap_all(dit) -> None:
    """Put the model's own ``layer_forward`` hook back."""
    original = getattr(dit, _ORIGINAL, None)
    if original is not None:
        dit.hooks["layer_forward"] = original
        object.__delattr__(dit, _ORIGINAL)


def layer_index(layer_id) -> int:
    """SAT passes ``layer_id`` as a 0-d tensor; options need a Python int."""
    return int(layer_id)
