"""Step caching (--cache teacache:<t> / fbcache:<t>, sat_cogvideo.accel.step_cache) on tiny models.

A skipped evaluation must return exactly "input of the skipped layers + the residual they added last time", a
computed one exactly what the plain model returns; on a sampling run the cache must skip steps and stay within
the documented tolerance (docs/speed.md), and nothing changes when the option is off.
"""
from __future__ import annotations

import pytest
import torch

from helpers import inputs, make_engine, max_rel_err, random_model, text_cond

from sat_cogvideo.accel import step_cache
from sat_cogvideo.accel.layer_hooks import dit_of, unwrap_all


def _layer_outputs(model, x, ts, ctx, extra):
    """Input of layer 0 and the output of every layer of one plain forward."""
    seen = []
    hook = model.hooks["layer_forward"]

    def spy(h, mask, *a, **k):
        out = hook(h, mask, *a, **k)
        seen.append((h, out))
        return out

    model.hooks["layer_forward"] = spy
    try:
        with torch.no_grad():
            final = model(x, ts, ctx, **extra)
    finally:
        model.hooks["layer_forward"] = hook
    return seen, final


@pytest.mark.parametrize("kind", ["teacache", "fbcache"])
def test_repeated_step_is_skipped_and_equals_the_computed_one(dist_cpu, kind):
    model, cfg = random_model("cogvideox_5b")
    x, ts, ctx, extra = inputs(model, cfg)
    _, plain = _layer_outputs(model, x, ts, ctx, extra)
    cache = step_cache.apply_step_cache(model, kind, 0.05)
    with torch.no_grad():
        first = model(x, ts, ctx, **extra)
        second = model(x, ts, ctx, **extra)  # same emb / same first-layer residual: distance 0 < threshold
    assert torch.equal(first, plain)  # a computed step is the plain model, bit for bit
    assert (cache.evaluations, cache.skipped) == (2, 1)
    # skipped: layer input + cached residual, recomputed by hand from the plain run
    assert max_rel_err(second, plain) < 1e-6
    unwrap_all(model)
    with torch.no_grad():
        assert torch.equal(model(x, ts, ctx, **extra), plain)


def test_teacache_skips_by_the_accumulated_distance(dist_cpu):
    """The skip pattern equals the one computed by hand from the embeddings: accumulate d = mean|emb - prev| /
    mean|prev| while under the threshold; the first and the last step always run."""
    from sat_cogvideo.dit_video_concat import timestep_embedding

    model, cfg = random_model("cogvideox_5b")
    x, _, ctx, extra = inputs(model, cfg, batch=1)
    steps = [999.0, 990.0, 980.0, 960.0, 950.0, 900.0, 890.0]
    with torch.no_grad():
        embs = [model.time_embed(timestep_embedding(torch.tensor([t]), model.model_channels)) for t in steps]
    d = [step_cache.rel_l1(embs[k], embs[k - 1]) for k in range(1, len(steps))]
    threshold = 2.5 * sorted(d)[len(d) // 2]
    expect, acc = [0], 0.0
    for k in range(1, len(steps)):
        acc = 0.0 if k == len(steps) - 1 else acc + d[k - 1]
        skip = 0 < k < len(steps) - 1 and acc < threshold
        acc = acc if skip else 0.0
        expect.append(int(skip))
    cache = step_cache.apply_step_cache(model, "teacache", threshold)
    cache.start(num_steps=len(steps))
    seen = []
    with torch.no_grad():
        for t in steps:
            before = cache.skipped
            model(x, torch.tensor([t]), ctx, **extra)
            seen.append(cache.skipped - before)
    assert seen == expect and 0 < sum(seen) < len(steps) - 2, (seen, d, threshold)


def test_fbcache_computes_when_the_first_layer_moves(dist_cpu):
    model, cfg = random_model("cogvideox_2b")
    x, ts, ctx, extra = inputs(model, cfg)
    cache = step_cache.apply_step_cache(model, "fbcache", 0.05)
    with torch.no_grad():
        model(x, ts, ctx, **extra)
        model(x * 3.0, ts, ctx, **extra)
    assert cache.skipped == 0


def test_teacache_coefficients_per_family():
    assert step_cache.TEACACHE_COEFFICIENTS[("1.5", True, True)][0] == pytest.approx(1.22842302e+02)
    assert step_cache.TEACACHE_COEFFICIENTS[("1.0", False, False)][-1] == pytest.approx(-3.61568434e-03)
    model, _ = random_model("cogvideox1.5_5b")
    assert step_cache.teacache_coefficients(model) == step_cache.RAW_DISTANCE  # tiny: no calibration


@pytest.mark.parametrize("spec,message", [("teacache", "use teacache:<threshold>"), ("foo:0.1", "use teacache"),
                                          ("fbcache:x", "is not a number"), ("teacache:0", "must be > 0")])
def test_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        step_cache.parse_cache_spec(spec)


@pytest.mark.parametrize("kind", ["teacache", pytest.param("fbcache", marks=pytest.mark.slow)])  # fbcache: 3 more
def test_sampling_run_skips_steps_within_tolerance(demo_paths, capsys, kind):  # sampling runs; exactness above
    """A 6-step run: off is the plain engine bit for bit; teacache/fbcache at 0.6 skip steps, relative error of the
    latents < 2e-2 (random tiny weights, documented in docs/speed.md), and the count is printed."""
    engine = make_engine("cogvideox_5b", demo_paths, num_steps=6)
    c, uc = text_cond(engine)

    def run():
        torch.manual_seed(0)
        return engine.sample(c, uc=uc, batch_size=1, shape=(3, 16, 8, 12))

    plain = run()
    hook = dit_of(engine).hooks["layer_forward"]
    cache = step_cache.apply_step_cache(engine, kind, 0.6)
    cached = run()
    assert cache.skipped >= 1, cache.line()
    assert max_rel_err(cached, plain) < 2e-2
    assert f"{kind}:0.6: skipped {cache.skipped} of 6 DiT evaluations" in capsys.readouterr().err
    unwrap_all(dit_of(engine))
    del engine.sample, engine.sample_from
    assert dit_of(engine).hooks["layer_forward"] == hook
    assert torch.equal(run(), plain)


@pytest.mark.parametrize("threshold", [0.05, 0.9])  # the tiny random DiT's steps differ by 0.58-1.29 (measured)
def test_fbcache_skips_the_steps_diffusers_skips(demo_paths, threshold):
    """Our ``fbcache:<t>`` and diffusers' ``FirstBlockCacheConfig(threshold=t)`` on the same weights (the tiny 5B
    DiT converted into CogVideoXTransformer3DModel), schedule, prompt embeddings and noise: the same steps are
    skipped and the latents agree to float rounding.  Both measure the first block's residual on the video tokens
    (a measure over the whole joint sequence, text included, skipped more steps at the same threshold)."""
    from diffusers.hooks import FirstBlockCacheConfig

    from helpers import diffusers_pipeline, use_diffusers_schedule
    from test_engine_diffusers import STEPS, ours, run_diffusers

    engine = make_engine("cogvideox_5b", demo_paths, num_steps=STEPS)
    pipe = diffusers_pipeline(engine, "t2v")
    use_diffusers_schedule(engine, pipe.scheduler)
    cache = step_cache.apply_step_cache(engine, "fbcache", threshold)
    z, _, c, uc, size = ours(engine, "t2v")
    calls = []  # diffusers' block 1 runs on computed steps only
    pipe.transformer.transformer_blocks[1].attn1.register_forward_pre_hook(lambda *a: calls.append(1))
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    latents, _ = run_diffusers(pipe, "t2v", c, uc, size)
    assert cache.evaluations == STEPS and cache.skipped == STEPS - len(calls), (cache.skipped, len(calls))
    assert (cache.skipped > 0) == (threshold == 0.9), cache.skipped  # 0.05 computes every step, 0.9 skips
    assert max_rel_err(z, latents) < 1e-4, max_rel_err(z, latents)
