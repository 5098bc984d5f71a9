"""The speed/memory options at the command line and in the cluster scripts: refused values and combinations are
one line, exit 2, before any weight loads; the attention call goes through the swappable kernel; offloading by
diffusers' group offloading gives the plain model's output."""
from __future__ import annotations

import pytest
import torch

from helpers import inputs, random_model, sample_argv

from sat_cogvideo.accel import attention_backends, offload, options


@pytest.mark.parametrize("extra,message", [
    (["--cache", "teacache"], "--cache 'teacache': use teacache:<threshold> or fbcache:<threshold>"),
    (["--cache", "fbcache:-1"], "the threshold must be > 0"),
    (["--attention", "flash"], "--attention flash needs a CUDA GPU (the device is cpu); use --attention sdpa"),
    (["--attention", "sage"], "--attention sage needs a CUDA GPU"),
    (["--compile", "--offload", "group"], "--compile with --offload group"),
    (["--weights-dtype", "int8", "--offload", "sequential"], "--weights-dtype int8 with --offload sequential"),
    (["--weights-dtype", "fp8", "--compile"], "--weights-dtype fp8 with --compile"),
])
def test_refused_before_loading(demo_paths, tmp_path, capsys, monkeypatch, extra, message):
    from sat_cogvideo import sample_video

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded before the options were checked")

    monkeypatch.setattr(sample_video, "preflight_weights", no_weights)
    argv = sample_argv(demo_paths) + ["--prompt", "a cat", "--output-path", str(tmp_path / "o.mp4")] + extra
    with pytest.raises(SystemExit) as exc:
        sample_video.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_fbcache_refused_with_sequence_parallelism():
    from types import SimpleNamespace

    from sat_cogvideo.errors import UserError

    args = SimpleNamespace(cache="fbcache:0.1", sp_size=2, device="cpu")
    with pytest.raises(UserError, match="sequence parallelism .2 ranks.*use --cache teacache"):
        options.check_accel_args(args)
    args = SimpleNamespace(cache="teacache:0.1", sp_size=2, device="cpu")
    options.check_accel_args(args)
    assert args.cache_spec == ("teacache", 0.1)


def test_cluster_variables_become_options():
    env = {"COMPILE": "1", "WEIGHTS_DTYPE": "int8", "CACHE": "teacache:0.2", "OFFLOAD": "model"}
    assert options.launch_argv(env) == ["--compile", "--weights-dtype", "int8", "--offload", "model", "--cache",
                                        "teacache:0.2"]
    assert options.launch_argv({}) == []
    with pytest.raises(Exception, match=r"fp8 with --compile.*COMPILE / WEIGHTS_DTYPE"):
        options.launch_argv({"COMPILE": "yes", "WEIGHTS_DTYPE": "fp8"})
    with pytest.raises(Exception, match="invalid choice"):
        options.launch_argv({"ATTENTION": "xformers"})


def test_attention_goes_through_the_kernel(dist_cpu, monkeypatch):
    """Every layer's attention is the one swappable call; sdpa (the default) is the unchanged model."""
    from sat_cogvideo import dit_video_concat

    model, cfg = random_model("cogvideox_5b")
    x, ts, ctx, extra = inputs(model, cfg)
    with torch.no_grad():
        ref = model(x, ts, ctx, **extra)
    calls = []

    def counting(q, k, v, dropout_p=0.0):
        calls.append(q.shape)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)

    monkeypatch.setattr(dit_video_concat, "sdpa_kernel", counting)
    with torch.no_grad():
        assert torch.equal(model(x, ts, ctx, **extra), ref)
    assert len(calls) == model.num_layers
    previous = attention_backends.set_attention_backend("sdpa")
    assert previous is counting and dit_video_concat.sdpa_kernel is None  # None: torch's SDPA


@pytest.mark.parametrize("mode", ["group", "sequential"])
def test_group_offloading_is_exact(dist_cpu, mode):
    """diffusers' apply_group_offloading on SAT's modules (CPU to CPU here: the hooks run, the numbers must not
    change); every weight-holding module is in a group except the resident RoPE mixin and position table."""
    from diffusers.hooks import HookRegistry

    model, cfg = random_model("cogvideox_5b")
    x, ts, ctx, extra = inputs(model, cfg)
    with torch.no_grad():
        ref = model(x, ts, ctx, **extra)
    units, resident = offload.offload_units(model, mode)
    assert set(resident) == {"mixins.pos_embed", "transformer.position_embeddings"}
    assert ("transformer.layers.0.attention" in units) == (mode == "group")
    assert ("transformer.layers.0.attention.query_key_value" in units) == (mode == "sequential")
    n = offload.apply_dit_offload(model, "cpu", mode)
    modules = dict(model.named_modules())
    assert n == len(units) and all(hasattr(modules[u], "_diffusers_hook") for u in units)
    assert isinstance(modules[units[0]]._diffusers_hook, HookRegistry)
    with torch.no_grad():
        assert torch.equal(model(x, ts, ctx, **extra), ref)


@pytest.mark.parametrize("extra,expect", [
    (["--weights-dtype", "int8", "--cache", "fbcache:0.6", "--attention", "sdpa"],
     ("stored as int8", "fbcache:0.6: skipped ", " of 3 DiT evaluations")),
    pytest.param(["--offload", "group", "--cache", "teacache:0.5"], ("teacache:0.5: skipped ",),
                 marks=pytest.mark.slow),  # a second full sample_video run (~10 s); group offload is unit-tested
])
def test_cli_run_with_options(demo_paths, tmp_path, capsys, extra, expect):
    """sample_video applies the options to the engine it builds, writes the video and reports what it did."""
    from sat_cogvideo import sample_video

    out = tmp_path / "o.mp4"
    argv = sample_argv(demo_paths, steps=3) + ["--prompt", "a cat", "--output-path", str(out)] + extra
    assert sample_video.main(argv) == [str(out)] and out.stat().st_size > 0
    err = capsys.readouterr().err
    assert all(e in err for e in expect), err
