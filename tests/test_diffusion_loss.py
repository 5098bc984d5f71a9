"""VideoDiffusionLoss and DiscreteSampling against hand-computed values (diffusion.md section 9)."""
import pytest
import torch

from sat_cogvideo.errors import UserError
from sgm.modules.diffusionmodules.wrappers import OpenAIWrapper
from sgm.util import instantiate_from_config
from helpers import B, C, D, H, L, T, W, ToyDiT

P = "sgm.modules.diffusionmodules."
DISC = {"target": P + "discretizer.ZeroSNRDDPMDiscretization", "params": {"shift_scale": 3.0}}


def sampler_cfg(**params):
    return {"target": P + "sigma_sampling.DiscreteSampling",
            "params": {"num_idx": 1000, "discretization_config": DISC, **params}}


def build(offset_noise_level=0.0, uniform=True):
    # as in cogvideox_2b.yaml
    loss = instantiate_from_config({"target": P + "loss.VideoDiffusionLoss", "params": {
        "offset_noise_level": offset_noise_level, "sigma_sampler_config": sampler_cfg(uniform_sampling=uniform)}})
    denoiser = instantiate_from_config({"target": P + "denoiser.DiscreteDenoiser", "params": {
        "num_idx": 1000, "quantize_c_noise": False,
        "weighting_config": {"target": P + "denoiser_weighting.EpsWeighting"},
        "scaling_config": {"target": P + "denoiser_scaling.VideoScaling"}, "discretization_config": DISC}})
    return loss, denoiser


def hand_loss(net, x0, ctx, seed, offset=0.0, concat=None):
    """Per-sample v-prediction MSE, drawing randint -> randn_like -> offset randn as the original does."""
    table = instantiate_from_config(DISC)(1000, do_append_zero=False, flip=True)
    torch.manual_seed(seed)
    idx = torch.randint(0, 1000, (x0.shape[0],))
    eps = torch.randn_like(x0)
    if offset:
        eps = eps + offset * torch.randn(x0.shape[0])[:, None, None, None, None]
    s = table[idx][:, None, None, None, None]
    sigma = (1 - s ** 2).sqrt()
    x_t = s * x0 + sigma * eps
    inp = x_t if concat is None else torch.cat([x_t, concat], 2)
    f = net(inp, timesteps=idx, context=ctx)
    v = s * eps - sigma * x0
    return ((f - v) ** 2).reshape(x0.shape[0], -1).mean(1), idx


@pytest.mark.parametrize("offset", [0.0, 0.3])
def test_video_diffusion_loss_equals_hand_computed(offset):
    loss, denoiser = build(offset)
    toy = ToyDiT()
    net = OpenAIWrapper(toy)
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, T, C, H, W, generator=gen)
    ctx = torch.randn(2, L, D, generator=gen)
    torch.manual_seed(11)
    with torch.no_grad():
        ours = loss(net, denoiser, lambda batch: {"crossattn": ctx}, x0, {"txt": ["a", "b"]})
        ref, idx = hand_loss(toy, x0, ctx, 11, offset)
    assert ours.shape == (2,)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
    seen = toy.seen[0]["timesteps"]  # the network sees the int64 DDPM timestep
    assert seen.dtype == torch.int64 and torch.equal(seen, idx)


def test_loss_concat_images_bf16_noise_and_l1():
    loss, denoiser = build()
    toy = ToyDiT(in_channels=2 * C)
    net = OpenAIWrapper(toy)
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randn(B, T, C, H, W, generator=gen)
    image = torch.randn(B, T, C, H, W, generator=gen)
    ctx = torch.randn(B, L, D, generator=gen)
    torch.manual_seed(2)
    with torch.no_grad():
        ours = loss(net, denoiser, lambda batch: {"crossattn": ctx}, x0, {"concat_images": image})
        ref, _ = hand_loss(toy, x0, ctx, 2, concat=image)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)

    # the training noise has the latent's dtype (bf16 under bf16 training); the loss is float32
    drawn = []
    orig = torch.randn_like
    torch.randn_like = lambda x, *a, **k: drawn.append(x.dtype) or orig(x, *a, **k)
    try:
        with torch.no_grad():
            out = loss(net.to(torch.float32), denoiser, lambda batch: {"crossattn": ctx}, x0.bfloat16(),
                       {"concat_images": image})
    finally:
        torch.randn_like = orig
    assert drawn == [torch.bfloat16] and out.dtype == torch.float32

    with pytest.raises(UserError, match="loss type 'lpips'"):
        instantiate_from_config({"target": P + "loss.VideoDiffusionLoss",
                                 "params": {"type": "lpips", "sigma_sampler_config": sampler_cfg()}})


@pytest.mark.parametrize("world,rank,group_num,expected", [
    (1, 0, 0, (0, 1000)),        # v1.0 automatic groups: one group
    (16, 5, 0, (250, 375)),      # v1.0: 8 groups of 2 ranks, 125 timesteps each
    (80, 5, 40, (50, 75)),       # 1.5: 40 groups of 2 ranks, 25 timesteps each
    (8, 5, 40, (0, 1000)),       # 1.5 turns uniform sampling off on <= 8 ranks
])
def test_discrete_sampling_uniform_groups(monkeypatch, world, rank, group_num, expected):
    import sat_cogvideo.distributed as distributed

    monkeypatch.setattr(distributed, "data_parallel_rank_and_size", lambda: (rank, world))
    smp = instantiate_from_config(sampler_cfg(uniform_sampling=True, group_num=group_num))
    s, idx = smp(4000, return_idx=True)
    assert idx.dtype == torch.int64 and int(idx.min()) == expected[0] and int(idx.max()) == expected[1] - 1
    assert torch.equal(s, smp.sigmas[idx])
    torch.manual_seed(0)
    a = smp(3, return_idx=True)[1]
    torch.manual_seed(0)
    assert torch.equal(a, torch.randint(*expected, (3,)))  # same CPU-generator draw as the original


def test_discrete_sampling_given_idx_and_bad_group(monkeypatch):
    import sat_cogvideo.distributed as distributed

    smp = instantiate_from_config(sampler_cfg())
    s = smp(2, rand=torch.tensor([0, 999]))
    assert s[1].item() == 0.0 and s[0].item() == pytest.approx(0.99872637, abs=1e-7)
    monkeypatch.setattr(distributed, "data_parallel_rank_and_size", lambda: (0, 12))
    with pytest.raises(UserError, match="group_num 40"):
        instantiate_from_config(sampler_cfg(uniform_sampling=True, group_num=40))(2)


@pytest.mark.parametrize("uniform,world,rank,bounds", [(False, 1, 0, (0, 1000)), (True, 4, 3, (750, 1000))])
def test_discrete_sampling_given_idx_consumes_the_originals_draw(monkeypatch, uniform, world, rank, bounds):
    """diffusion.md 9.1: ``default(rand, randint(...))`` draws even when ``rand`` is given; the stream after the
    call must be the original's, and the values those of ``rand``."""
    import sat_cogvideo.distributed as distributed

    monkeypatch.setattr(distributed, "data_parallel_rank_and_size", lambda: (rank, world))
    smp = instantiate_from_config(sampler_cfg(uniform_sampling=uniform))
    idx = torch.tensor([3, 500, 998])
    torch.manual_seed(1234)
    s, got = smp(3, rand=idx, return_idx=True)
    after = torch.randn(8)
    torch.manual_seed(1234)
    torch.randint(*bounds, (3,))  # the original's discarded draw
    expected = torch.randn(8)
    assert torch.equal(after, expected)
    assert torch.equal(got, idx) and torch.equal(s, smp.sigmas[idx])
