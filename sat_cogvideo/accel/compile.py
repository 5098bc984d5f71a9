"""``--compile``: regional ``torch.compile`` of the repeated SAT transformer layer (CPU inductor and CUDA).

diffusers' ``compile_repeated_blocks`` compiles ``block.forward``; SAT never calls ``layer.forward`` (it calls
``hooks['layer_forward']``, see :mod:`layer_hooks`), so the compiled region here is that hook: one
``AdaLNMixin.layer_forward`` call = attention + MLP of one layer with its adaLN modulation.  The wrapper runs
outside the compiled region and removes what would break the graph there:

- ``layer_id`` arrives as a 0-d tensor (``int(tensor)`` is a graph break): it is turned into a Python int first;
- the all-ones ``[1, 1]`` attention mask (``bool(mask > 0)`` is a graph break): SAT's own convention "``None``
  means full attention" is passed instead (``sdpa_attention`` treats both the same);
- the RoPE table cache (``data_ptr()``) and the in-place writes into token slices of the inference path are
  bypassed while compiling (``torch.compiler.is_compiling()`` in ``dit_video_concat``; eager is unchanged).

Parameters are graph inputs (``inline_inbuilt_nn_modules``), so every layer produces the same FX graph: dynamo
guards on the Python int ``layer_id`` and re-traces once per layer index, while inductor compiles once per layer
shape and serves the other layers from its FX-graph cache.  The recompile limit is raised to the layer count.
"""
from __future__ import annotations

import sys
import time

import torch

from sat_cogvideo.accel.layer_hooks import dit_of, layer_index, wrap_layer_forward


class CompileReport:
    """Compile time (first call of each layer index) and steady-state calls, for the log and the benchmark."""

    def __init__(self):
        self.compile_seconds = 0.0
        self.compiled_layers = set()

    def line(self) -> str:
        return (f"compile: {len(self.compiled_layers)} layer(s) compiled in {self.compile_seconds:.1f}s "
                "(regional torch.compile of the DiT layers)")


def _raise_recompile_limit(num_layers: int) -> None:
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), num_layers + 8))


def apply_compile(model, mode: str | None = None, fullgraph: bool = True, backend: str = "inductor",
                  verbose: bool = True):
    """Compile the layer of ``model`` (engine or DiT) regionally; returns a :class:`CompileReport` (its line is
    printed once every layer index has been compiled).  ``fullgraph``: a graph break inside a layer is an error."""
    dit = dit_of(model)
    _raise_recompile_limit(dit.num_layers)
    report = CompileReport()

    def make(hook):
        compiled = torch.compile(hook, mode=mode, fullgraph=fullgraph, dynamic=False, backend=backend)

        def layer_forward(hidden_states, mask, *args, layer_id=None, **kwargs):
            i = layer_index(layer_id)
            if mask is not None and mask.numel() == 1 and bool(mask.reshape(-1)[0] > 0):
                mask = None  # full attention, as SAT defines None
            if i in report.compiled_layers:
                return compiled(hidden_states, mask, *args, layer_id=i, **kwargs)
            t0 = time.perf_counter()
            out = compiled(hidden_states, mask, *args, layer_id=i, **kwargs)
            report.compile_seconds += time.perf_counter() - t0
            report.compiled_layers.add(i)
            if len(report.compiled_layers) == dit.num_layers and verbose:
                print(report.line(), file=sys.stderr, flush=True)
            return out

        return layer_forward

    wrap_layer_forward(dit, make)
    return report
