"""--compile (sat_cogvideo.accel.compile): the SAT layer compiles as one graph (fullgraph: a graph break inside a
layer is an error), every layer index is compiled, and the result matches the eager model."""
from __future__ import annotations

import pytest
import torch

from helpers import inputs, max_rel_err, random_model

from sat_cogvideo.accel.compile import apply_compile
from sat_cogvideo.accel.layer_hooks import unwrap_all


def _check(family, backend, tol):
    torch._dynamo.reset()
    model, cfg = random_model(family)
    x, ts, ctx, extra = inputs(model, cfg)
    with torch.no_grad():
        ref = model(x, ts, ctx, **extra)
        report = apply_compile(model, backend=backend, fullgraph=True, verbose=False)
        first = model(x, ts, ctx, **extra)
        again = model(x, ts, ctx, **extra)
    assert report.compiled_layers == set(range(model.num_layers)) and report.compile_seconds > 0
    assert max_rel_err(first, ref) < tol and max_rel_err(again, ref) < tol
    unwrap_all(model)
    with torch.no_grad():
        assert torch.equal(model(x, ts, ctx, **extra), ref)  # eager again: the model itself was not changed


def test_layer_traces_without_graph_breaks(dist_cpu):
    """Dynamo's full-graph capture of the layer (eager backend: the tracing, without inductor's C++ build)."""
    _check("cogvideox_5b", "eager", 1e-6)


@pytest.mark.slow  # inductor builds C++ kernels: about a minute per family on 2 shared cores
@pytest.mark.parametrize("family", ["cogvideox_2b", "cogvideox1.5_5b_i2v"])
def test_inductor_matches_eager(dist_cpu, family):
    _check(family, "inductor", 1e-5)
