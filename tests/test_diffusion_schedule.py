"""ZeroSNRDDPMDiscretization, DiscreteDenoiser snapping and DynamicCFG weights against diffusers and the spec."""
import math

import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

from sgm.modules.diffusionmodules.discretizer import ZeroSNRDDPMDiscretization
from sgm.modules.diffusionmodules.guiders import DynamicCFG
from helpers import diffusers_scheduler, table
from sgm.util import instantiate_from_config

DISC = "sgm.modules.diffusionmodules.discretizer.ZeroSNRDDPMDiscretization"


@pytest.mark.parametrize("cls", [CogVideoXDPMScheduler, CogVideoXDDIMScheduler])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_table_equals_diffusers_alphas_cumprod(cls, shift):
    sched = diffusers_scheduler(cls, shift)
    ours = table(shift).double()
    assert ours.shape == (1000,)
    # index i <-> DDPM timestep i; our values are sqrt(alpha_bar)
    err = (ours ** 2 - sched.alphas_cumprod.double()).abs().max().item()
    assert err <= 1e-6, err
    assert ours[999].item() == 0.0 and sched.alphas_cumprod[999].item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sampling_timesteps_equal_diffusers_trailing(shift):
    sched = diffusers_scheduler(CogVideoXDPMScheduler, shift)
    for n in (50, 10, 1000):
        sched.set_timesteps(n)
        s, ts = ZeroSNRDDPMDiscretization(shift_scale=shift)(n, return_idx=True, do_append_zero=False)
        assert list(ts[::-1]) == sched.timesteps.tolist()
        assert s.shape == (n,)
    # with every timestep the sampling schedule is the table itself (same rescale endpoints as diffusers)
    s, _ = ZeroSNRDDPMDiscretization(shift_scale=shift)(1000, return_idx=True, do_append_zero=False)
    assert torch.equal(s, table(shift).flip(0))


# spec diffusion.md 4.4: (i, t, s_i, s_next, q, table[q])
VECTORS = {
    3.0: [(0, 999, 0.0, 0.00522029, 999, 0.0), (1, 979, 0.00522029, 0.01092453, 979, 0.00521482),
          (2, 959, 0.01092453, 0.01713505, 959, 0.01091309), (24, 519, 0.28969160, 0.31011432, 519, 0.28938824),
          (25, 499, 0.31011432, 0.33125472, 499, 0.30978954), (46, 79, 0.88635212, 0.91635859, 78, 0.88693714),
          (48, 39, 0.94562322, 0.97393978, 38, 0.94607145), (49, 19, 0.97393978, 1.0, 18, 0.97430551)],
    1.0: [(0, 999, 0.0, 0.00926799, 999, 0.0), (1, 979, 0.00926799, 0.01938105, 979, 0.00926217),
          (24, 519, 0.46536425, 0.49260932, 519, 0.46507192), (46, 79, 0.95650935, 0.96902847, 78, 0.95655811),
          (49, 19, 0.99108231, 1.0, 18, 0.99096084)],
}
TABLE_VALUES = {3.0: {0: 0.99872637, 1: 0.99739695, 500: 0.30875248, 998: 0.00024961, 999: 0.0},
                1.0: {0: 0.9995749, 1: 0.99911636, 500: 0.49093667, 998: 0.00044361, 999: 0.0}}


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_50_step_schedule_and_snapping_match_spec_vectors(shift):
    from sgm.modules.diffusionmodules.denoiser import DiscreteDenoiser

    disc_cfg = {"target": DISC, "params": {"shift_scale": shift}}
    s, ts = instantiate_from_config(disc_cfg)(50, return_idx=True, do_append_zero=False)
    s = torch.cat([s, torch.ones(1)])
    den = DiscreteDenoiser(
        weighting_config={"target": "sgm.modules.diffusionmodules.denoiser_weighting.EpsWeighting"},
        scaling_config={"target": "sgm.modules.diffusionmodules.denoiser_scaling.VideoScaling"},
        num_idx=1000, discretization_config=disc_cfg, quantize_c_noise=False)
    for k, v in TABLE_VALUES[shift].items():
        assert den.sigmas[k].item() == pytest.approx(v, abs=1e-7)
    for i, t, s_i, s_next, q, tq in VECTORS[shift]:
        assert ts[49 - i] == t
        assert s[i].item() == pytest.approx(s_i, abs=1e-7)
        assert s[i + 1].item() == pytest.approx(s_next, abs=1e-7)
        assert den.sigma_to_idx(s[i:i + 1]).item() == q
        assert den.possibly_quantize_sigma(s[i:i + 1]).item() == pytest.approx(tq, abs=1e-7)
    # the subsampled schedule is rescaled on its own endpoints, so it differs slightly from the table
    diff = (s[:50] - den.sigmas[torch.as_tensor(ts[::-1].copy())]).abs().max().item()
    assert 1e-4 < diff < 2e-3
    # nearest-index mismatches q = t - 1 exactly where the spec lists them
    q = den.sigma_to_idx(s[:50])
    mismatches = sorted(int(t) for t, qq in zip(ts[::-1], q) if qq != t)
    expected = [19, 39, 59, 79, 99, 119, 139, 159] if shift == 3.0 else list(range(19, 220, 20))
    assert mismatches == expected


SPEC_CFG = [2.291487, 2.543503, 6.974352, 6.420358, 2.788098, 4.271942, 1.037598, 4.1704, 1.617975, 6.983127,
            1.004789, 2.871981, 6.976805, 1.633099, 4.329747, 2.436601, 6.377304, 6.00684, 3.447874, 3.198098,
            1.654759, 6.610011, 1.194746, 4.29534, 6.985373, 1.521266, 1.761637, 1.057938, 4.127507, 1.482273,
            2.002566, 5.947659, 4.143219, 6.53055, 6.139848, 6.999941, 6.168399, 1.11992, 2.097506, 6.685006,
            6.999215, 2.343218, 6.212752, 1.25053, 6.999645, 6.864372, 1.063552, 1.000001, 1.000004, 1.123398]


def test_dynamic_cfg_weights_match_spec_and_diffusers_formula():
    guider = DynamicCFG(scale=6, exp=5, num_steps=50)
    sched = diffusers_scheduler(CogVideoXDPMScheduler, 1.0)
    sched.set_timesteps(50)
    for i, t in enumerate(sched.timesteps):
        ours = guider.weight(torch.tensor(50) - t)
        # the expression of diffusers' CogVideoXPipeline with use_dynamic_cfg=True
        theirs = 1 + 6 * ((1 - math.cos(math.pi * ((50 - t.item()) / 50) ** 5.0)) / 2)
        assert ours == theirs
        assert ours == pytest.approx(SPEC_CFG[i], abs=1e-6)
    # the guider combines uncond (first half) and cond with that weight
    x = torch.randn(4, 3)
    out = guider(x, None, step_index=torch.tensor(50 - 999))
    assert torch.allclose(out, x[:2] + SPEC_CFG[0] * (x[2:] - x[:2]), atol=1e-5, rtol=0)


def test_schedule_errors_and_append_zero():
    disc = ZeroSNRDDPMDiscretization(shift_scale=3.0)
    with pytest.raises(ValueError, match="1001 steps"):
        disc(1001)
    s = disc(10)
    assert s.shape == (11,) and s[-1] == 0 and s[0] == 0  # appended zero; s ascends from 0 (t=999)
    assert bool((s[:-1][1:] > s[:-1][:-1]).all())


@pytest.mark.parametrize("name", ["cogvideox_2b", "cogvideox_5b", "cogvideox_5b_i2v", "cogvideox1.5_5b",
                                  "cogvideox1.5_5b_i2v", "cogvideox_2b_lora"])
def test_original_yaml_builds_diffusion_parts(repo_root, name):
    """The denoiser, sampler and loss sections of the original YAML files build unchanged."""
    import os

    from omegaconf import OmegaConf

    from sgm.modules.diffusionmodules import (DiscreteDenoiser, DiscreteSampling, VideoDiffusionLoss,
                                              VPSDEDPMPP2MSampler)

    path = os.path.join(repo_root, "configs", f"{name}.yaml")
    if not os.path.isfile(path):
        pytest.fail(f"config {path} missing")
    model = OmegaConf.load(path).model
    shift = 3.0 if name.startswith("cogvideox_2b") else 1.0
    den = instantiate_from_config(model.denoiser_config)
    assert isinstance(den, DiscreteDenoiser) and den.quantize_c_noise is False
    assert den.sigmas[0].item() == pytest.approx(TABLE_VALUES[shift][0], abs=1e-7)
    if "sampler_config" in model:
        smp = instantiate_from_config(model.sampler_config)
        assert isinstance(smp, VPSDEDPMPP2MSampler) and smp.num_steps == 50 and smp.guider.weight(50 - 999) == \
            pytest.approx(SPEC_CFG[0], abs=1e-6)
    if "loss_fn_config" in model:
        loss = instantiate_from_config(model.loss_fn_config)
        assert isinstance(loss, VideoDiffusionLoss) and isinstance(loss.sigma_sampler, DiscreteSampling)
        assert loss.sigma_sampler.sigmas[0].item() == pytest.approx(TABLE_VALUES[shift][0], abs=1e-7)


def test_other_scalings_and_weightings():
    from sgm.modules.diffusionmodules import denoiser_scaling as sc
    from sgm.modules.diffusionmodules import denoiser_weighting as wt

    sigma = torch.tensor([0.5, 2.0])
    c_skip, c_out, c_in, c_noise = sc.EDMScaling()(sigma)
    torch.testing.assert_close(c_skip, 0.25 / (sigma ** 2 + 0.25))
    torch.testing.assert_close(c_out, sigma * 0.5 / (sigma ** 2 + 0.25).sqrt())
    torch.testing.assert_close(c_noise, 0.25 * sigma.log())
    c_skip, c_out, c_in, c_noise = sc.VScaling()(sigma)
    torch.testing.assert_close(c_skip, 1 / (sigma ** 2 + 1))
    torch.testing.assert_close(c_in, 1 / (sigma ** 2 + 1).sqrt())
    assert torch.equal(sc.EpsScaling()(sigma)[1], -sigma)
    torch.testing.assert_close(sc.VScalingWithEDMcNoise()(sigma)[3], 0.25 * sigma.log())
    s = torch.tensor([0.6])
    c_skip, c_out, c_in, c_noise = sc.VideoScaling()(s, idx=torch.tensor([7]))
    assert (c_skip.item(), c_in.item(), c_noise.item()) == (pytest.approx(0.6), 1.0, 7)
    assert c_out.item() == pytest.approx(-0.8)
    torch.testing.assert_close(wt.EpsWeighting()(sigma), sigma ** -2)
    torch.testing.assert_close(wt.VWeighting()(sigma), (sigma ** 2 + 1) / sigma ** 2)
    assert torch.equal(wt.UnitWeighting()(sigma), torch.ones(2))
