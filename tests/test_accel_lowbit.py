"""--weights-dtype fp8|int8 (sat_cogvideo.accel.lowbit) on tiny DiTs: SAT's parallel linears are converted (not
skipped as by the libraries' default filters), weight bytes fall, the output stays within the documented
tolerance (fp8 < 6e-2, int8 < 2e-2 relative to the bf16 model, docs/speed.md), and it runs on CPU."""
from __future__ import annotations

import pytest
import torch

from helpers import inputs, max_rel_err, random_model

from sat_cogvideo.accel import lowbit


def _bf16_model(family):
    model, cfg = random_model(family)
    model = model.bfloat16()
    model.dtype = torch.bfloat16
    return model, cfg


@pytest.mark.parametrize("kind,tol", [("fp8", 6e-2), ("int8", 2e-2)])
@pytest.mark.parametrize("family", ["cogvideox_5b", "cogvideox1.5_5b_i2v"])
def test_low_bit_weights(dist_cpu, family, kind, tol):
    from sat.mpu.layers import ColumnParallelLinear

    model, cfg = _bf16_model(family)
    x, ts, ctx, extra = inputs(model, cfg)
    with torch.no_grad():
        ref = model(x, ts, ctx, **extra)
    before = lowbit.weight_bytes(model)
    n = lowbit.apply_weights_dtype(model, kind)
    qkv = model.transformer.layers[0].attention.query_key_value
    assert isinstance(qkv, ColumnParallelLinear)
    if kind == "fp8":
        assert qkv.weight.dtype == torch.float8_e4m3fn
        assert model.transformer.position_embeddings.weight.dtype == torch.bfloat16  # SAT reads the mask dtype here
    else:
        assert lowbit._tensor_bytes(qkv.weight) < 0.6 * 2 * qkv.weight.numel()  # int8 data + per-row scales
    assert n == sum(1 for m in model.modules() if lowbit.is_linear(m))
    with torch.no_grad():
        out = model(x, ts, ctx, **extra)
    err = max_rel_err(out, ref)
    assert 0 < err < tol, err
    assert lowbit.weight_bytes(model) < 0.62 * before  # tiny model: norms and embeddings weigh relatively more


def test_fp8_storage_computes_in_fp32_on_cpu(dist_cpu):
    model, cfg = random_model("cogvideox_2b")
    x, ts, ctx, extra = inputs(model, cfg)
    with torch.no_grad():
        ref = model(x, ts, ctx, **extra)
        lowbit.apply_weights_dtype(model, "fp8", compute_dtype=torch.float32)
        out = model(x, ts, ctx, **extra)
    assert out.dtype == torch.float32 and 0 < max_rel_err(out, ref) < 6e-2
