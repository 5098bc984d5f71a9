"""The 3D causal VAE against diffusers' AutoencoderKLCogVideoX, plus shapes, checkpoints, errors and memory features.

Equality with diffusers: our state dict, renamed by ``sat_cogvideo.convert.vae``, strict-loads into
``AutoencoderKLCogVideoX``; encode compares posterior mean/logvar with ``vae.encode(x).latent_dist`` (diffusers'
default 8-frame batching: one batch for 9 frames = our whole-clip pass; for 17 frames both sides batch by 8);
decode compares the same latent through diffusers' ``decode`` with ``num_latent_frames_batch_size`` 2 (its
default: chunks [0,3), [3,5)) against ours with ``enable_frame_batching()``, and with a batch size covering the
clip against our whole-clip ``decode``.
"""
from __future__ import annotations

import os

import pytest
import torch

from helpers import build_tiny_vae, max_rel_err, randomize_, tiny_vae_config

from sat_cogvideo.convert.vae import (convert_vae_diffusers_to_sat, convert_vae_sat_to_diffusers,
                                      diffusers_to_sat_key, diffusers_vae_config, sat_to_diffusers_key)
from sat_cogvideo.errors import UserError
from sat_cogvideo.vae_modules import read_vae_checkpoint, save_vae_checkpoint
from sat_cogvideo.vae_modules.cp_enc_dec import ContextParallelCausalConv3d
from sgm.util import instantiate_from_config

TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny convolutions run several times faster on one thread than on two busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pair():
    """Our tiny VAE with random weights and diffusers' model holding the converted weights."""
    from diffusers import AutoencoderKLCogVideoX

    vae = build_tiny_vae(seed=0)
    hf = AutoencoderKLCogVideoX(**diffusers_vae_config(tiny_vae_config())).eval()
    hf.load_state_dict(convert_vae_sat_to_diffusers(vae.state_dict()), strict=True)
    return vae, hf


@pytest.fixture
def vae(pair):
    v = pair[0]
    v.disable_slicing(), v.disable_tiling(), v.disable_frame_batching()
    yield v
    v.disable_slicing(), v.disable_tiling(), v.disable_frame_batching()


def _video(frames, h=32, w=32, batch=1, seed=1):
    return torch.randn(batch, 3, frames, h, w, generator=torch.Generator().manual_seed(seed))


def _latents(frames, h=4, w=4, batch=1, seed=2):
    return torch.randn(batch, 16, frames, h, w, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ structure
def test_released_config_has_the_checkpoint_keys_and_sizes():
    cfg = tiny_vae_config(ch=128, ch_mult=(1, 2, 2, 4), num_res_blocks=3)
    with torch.device("meta"):
        model = instantiate_from_config(cfg)
    sd = model.state_dict()
    assert sum(k.startswith("encoder.") for k in sd) == 128 and sum(k.startswith("decoder.") for k in sd) == 308
    assert len(sd) == 436
    assert sum(p.numel() for p in model.encoder.parameters()) == 92_215_456
    assert sum(p.numel() for p in model.decoder.parameters()) == 123_368_451
    assert tuple(sd["decoder.up.2.block.0.nin_shortcut.weight"].shape) == (256, 512, 1, 1, 1)
    assert tuple(sd["decoder.norm_out.conv_y.conv.weight"].shape) == (128, 16, 1, 1, 1)
    assert tuple(sd["encoder.down.0.downsample.conv.weight"].shape) == (128, 128, 3, 3)
    assert tuple(sd["encoder.conv_out.conv.weight"].shape) == (32, 512, 3, 3, 3)
    # the key map turns every one of them into a diffusers key of the same shape
    from diffusers import AutoencoderKLCogVideoX

    with torch.device("meta"):
        hf = AutoencoderKLCogVideoX(**diffusers_vae_config(cfg))
    hf_sd = hf.state_dict()
    conv = convert_vae_sat_to_diffusers(sd)
    assert set(conv) == set(hf_sd)
    assert all(conv[k].shape == hf_sd[k].shape for k in conv)


def test_key_map_is_two_way_and_drops_loss_keys(vae):
    assert sat_to_diffusers_key("decoder.up.3.block.0.norm1.norm_layer.weight") == \
        "decoder.up_blocks.0.resnets.0.norm1.norm_layer.weight"
    assert sat_to_diffusers_key("decoder.up.1.upsample.conv.bias") == "decoder.up_blocks.2.upsamplers.0.conv.bias"
    assert sat_to_diffusers_key("encoder.down.1.block.0.nin_shortcut.weight") == \
        "encoder.down_blocks.1.resnets.0.conv_shortcut.weight"
    assert sat_to_diffusers_key("encoder.mid.block_2.conv1.conv.bias") == "encoder.mid_block.resnets.1.conv1.conv.bias"
    assert sat_to_diffusers_key("loss.discriminator.main.0.weight") is None
    assert diffusers_to_sat_key("decoder.up_blocks.3.resnets.0.conv_shortcut.weight") == \
        "decoder.up.0.block.0.nin_shortcut.weight"
    sd = vae.state_dict()
    with_loss = dict(sd, **{"loss.logvar": torch.zeros(1), "loss.perceptual_loss.net.w": torch.ones(2)})
    hf_sd = convert_vae_sat_to_diffusers(with_loss)
    assert len(hf_sd) == len(sd)
    back = convert_vae_diffusers_to_sat(hf_sd)
    assert back.keys() == sd.keys() and all(back[k] is sd[k] for k in sd)
    with pytest.raises(UserError, match="'model.diffusion_model.x' is not a CogVideoX VAE key"):
        convert_vae_sat_to_diffusers({"model.diffusion_model.x": torch.zeros(1)})


def test_diffusers_config_for_the_released_vae():
    cfg = diffusers_vae_config(None, scaling_factor=0.7, version="1.5")
    assert cfg["block_out_channels"] == [128, 256, 256, 512] and cfg["layers_per_block"] == 3
    assert cfg["latent_channels"] == 16 and cfg["norm_eps"] == 1e-6 and cfg["scaling_factor"] == 0.7
    assert cfg["invert_scale_latents"] is True
    assert "invert_scale_latents" not in diffusers_vae_config(None, version="1.0")


# ----------------------------------------------------------------------------------------- against diffusers
@pytest.mark.parametrize("scale", [1.0, 1e-3])
def test_encode_matches_diffusers(pair, vae, scale):
    hf = pair[1]
    x = _video(9) * scale
    with torch.no_grad():
        moments, log = vae.encode(x, unregularized=True)
        post = hf.encode(x).latent_dist
    assert log == {} and moments.shape == (1, 32, 3, 4, 4)
    mean, logvar = moments.chunk(2, dim=1)
    assert max_rel_err(mean, post.mean) <= TOL
    assert max_rel_err(logvar.clamp(-30, 20), post.logvar) <= TOL


def test_frame_batched_encode_matches_diffusers_default(pair, vae):
    hf = pair[1]
    x = _video(17, 16, 16)
    vae.enable_frame_batching(num_latent_frames_batch_size=2, num_sample_frames_batch_size=8)
    with torch.no_grad():
        moments, _ = vae.encode(x, unregularized=True)
        ref = hf.encode(x).latent_dist
    mean, logvar = moments.chunk(2, dim=1)
    assert mean.shape[2] == 5
    assert max_rel_err(mean, ref.mean) <= TOL and max_rel_err(logvar, ref.logvar) <= TOL


@pytest.mark.parametrize("scale", [1.0, 1e-3])
def test_decode_matches_diffusers(pair, vae, scale):
    hf = pair[1]
    z = _latents(5) * scale
    with torch.no_grad():
        whole = vae.decode(z)
        hf.num_latent_frames_batch_size = 64
        ref_whole = hf.decode(z).sample
        hf.num_latent_frames_batch_size = 2
        ref_batched = hf.decode(z).sample
        vae.enable_frame_batching()
        batched = vae.decode(z)
    assert whole.shape == (1, 3, 17, 32, 32) == batched.shape
    assert max_rel_err(whole, ref_whole) <= TOL
    assert max_rel_err(batched, ref_batched) <= TOL
    if scale == 1.0:
        assert max_rel_err(whole, batched) > 1e-3  # per-chunk GroupNorm statistics really differ


def test_tiled_encode_and_decode_match_diffusers_tiling(pair, vae):
    hf = pair[1]
    # 64-pixel (8-latent) tiles overlapping by 1/4: 2x3 tiles, the last row and column cut by the border
    tiles = dict(tile_sample_min_height=64, tile_sample_min_width=64, tile_overlap_factor_height=1 / 4,
                 tile_overlap_factor_width=1 / 4)
    x, z = _video(9, 80, 112), _latents(3, 10, 14)
    with torch.no_grad():
        plain_dec, plain_enc = vae.decode(z), vae.encode(x, unregularized=True)[0]
        vae.enable_tiling(**tiles), vae.enable_frame_batching()
        hf.enable_tiling(**tiles)
        try:
            dec, ref_dec = vae.decode(z), hf.decode(z).sample
            enc, ref_enc = vae.encode(x, unregularized=True)[0], hf.encode(x).latent_dist
        finally:
            hf.disable_tiling()
    assert dec.shape == ref_dec.shape == (1, 3, 9, 80, 112)
    assert max_rel_err(dec, ref_dec) <= TOL
    assert enc.shape == (1, 32, 3, 10, 14)
    assert max_rel_err(enc.chunk(2, 1)[0], ref_enc.mean) <= TOL
    # tiling changes the numbers, within a bound (random weights, tiles of 4x6 latents)
    assert 1e-4 < max_rel_err(dec, plain_dec) < 0.5
    assert 1e-4 < max_rel_err(enc, plain_enc) < 0.5


def test_tiling_and_slicing_without_effect_keep_the_numbers(vae):
    x, z = _video(5, 16, 16, batch=2), _latents(3, 2, 2, batch=2)
    with torch.no_grad():
        ref_enc, ref_dec = vae.encode(x, unregularized=True)[0], vae.decode(z)
        vae.enable_slicing()
        vae.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=16)  # input fits in one tile
        enc, dec = vae.encode(x, unregularized=True)[0], vae.decode(z)
    assert max_rel_err(enc, ref_enc) <= TOL and max_rel_err(dec, ref_dec) <= TOL  # float32 rounding (batch 1 vs 2)


def test_chunked_decode_with_frame_cache_equals_frame_batching(vae):
    """The engine's way: decode pieces with clear_fake_cp_cache=False, the last with True (also sliced)."""
    z = _latents(7, 2, 2, batch=2)
    with torch.no_grad():
        vae.enable_frame_batching()
        ref = vae.decode(z)
        vae.disable_frame_batching()
        vae.enable_slicing()
        pieces = [vae.decode(z[:, :, a:b], clear_fake_cp_cache=(b == 7), use_cp=(a == 0))
                  for a, b in [(0, 3), (3, 5), (5, 7)]]
    out = torch.cat(pieces, dim=2)
    assert out.shape == (2, 3, 25, 16, 16)
    assert max_rel_err(out, ref) <= TOL  # sliced (batch 1) vs batch 2: float32 rounding only
    assert all(m.cache_padding is None for m in vae.decoder.modules() if isinstance(m, ContextParallelCausalConv3d))


def test_causal_conv_cache_continues_the_clip():
    conv = randomize_(ContextParallelCausalConv3d(4, 5, kernel_size=3), seed=3)
    x = torch.randn(2, 4, 7, 5, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = conv(x)
        parts = [conv(x[:, :, :3], clear_cache=False), conv(x[:, :, 3:4], clear_cache=False), conv(x[:, :, 4:])]
    assert conv.cache_padding is None
    assert torch.allclose(torch.cat(parts, 2), whole, atol=1e-6)
    # causal padding replicates frame 0: the first output sees frame 0 three times
    first = torch.nn.functional.conv3d(x[:, :, :1].expand(-1, -1, 3, -1, -1), conv.conv.weight, conv.conv.bias,
                                       padding=(0, 1, 1))
    assert torch.allclose(whole[:, :, :1], first, atol=1e-6)


@pytest.mark.parametrize("frames,latents", [(1, 1), (5, 2), (9, 3), (17, 5), (81, 21)])
def test_encode_frame_counts(vae, frames, latents):
    with torch.no_grad():
        moments, _ = vae.encode(_video(frames, 16, 16), unregularized=True)
    assert moments.shape == (1, 32, latents, 2, 2)


@pytest.mark.parametrize("latents,frames", [(1, 1), (2, 8), (3, 9), (13, 49), (21, 81)])
def test_decode_frame_counts(vae, latents, frames):
    """Parity rule of v1.0/diffusers: 21 latents give 81 frames (HEAD's 84 is the defect we fix)."""
    with torch.no_grad():
        assert vae.decode(_latents(latents, 1, 1)).shape == (1, 3, frames, 8, 8)


def test_encode_samples_the_posterior(vae):
    x = _video(5, 16, 16)
    with torch.no_grad():
        moments, _ = vae.encode(x, unregularized=True)
        torch.manual_seed(11)
        z, log = vae.encode(x, return_reg_log=True)
        torch.manual_seed(11)
        noise = torch.randn_like(moments[:, :16])
        z_gen = vae.encode(x, generator=torch.Generator().manual_seed(4))
    mean, logvar = moments.chunk(2, dim=1)
    expected = mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * noise
    assert z.shape == (1, 16, 2, 2, 2) and torch.allclose(z, expected, atol=1e-6)
    assert "kl_loss" in log and log["kl_loss"].ndim == 0
    noise4 = torch.randn(mean.shape, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(z_gen, mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * noise4, atol=1e-6)
    vae.regularization.sample = False
    try:
        assert torch.allclose(vae.encode(x), mean, atol=1e-6)
    finally:
        vae.regularization.sample = True


# ---------------------------------------------------------------------------------- checkpoints and errors
def test_checkpoint_round_trip_in_original_layout(vae, tmp_path):
    path = tmp_path / "vae" / "3d-vae.pt"
    sd = vae.state_dict()
    save_vae_checkpoint(dict(sd, **{"loss.logvar": torch.zeros(())}), path)
    assert os.listdir(path.parent) == ["3d-vae.pt"]  # no temporary file left
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"state_dict"} and len(raw["state_dict"]) == len(sd) + 1
    other = instantiate_from_config(tiny_vae_config(ckpt_path=str(path)))
    for k, v in other.state_dict().items():
        assert torch.equal(v, sd[k]), k
    with torch.no_grad():
        assert torch.equal(other.eval().decode(_latents(1, 1, 1)), vae.decode(_latents(1, 1, 1)))


def test_bad_checkpoints_give_one_clear_error(vae, tmp_path):
    sd = vae.state_dict()
    partial = tmp_path / "partial.pt"
    save_vae_checkpoint({k: v for k, v in sd.items() if not k.startswith("decoder.")}, partial)
    with pytest.raises(UserError, match=r"partial\.pt does not fit this VAE config: \d+ missing keys"):
        instantiate_from_config(tiny_vae_config(ckpt_path=str(partial)))
    transformer = tmp_path / "transformer.pt"
    torch.save({"module": {"model.diffusion_model.x": torch.zeros(1)}}, transformer)
    with pytest.raises(UserError, match="has no 'state_dict' entry"):
        instantiate_from_config(tiny_vae_config(ckpt_path=str(transformer)))
    good = tmp_path / "good.pt"
    save_vae_checkpoint(sd, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError, match=r"cannot read VAE checkpoint .*truncated\.pt: it is truncated or damaged"):
        instantiate_from_config(tiny_vae_config(ckpt_path=str(truncated)))
    with pytest.raises(UserError, match="does not exist"):
        instantiate_from_config(tiny_vae_config(ckpt_path=str(tmp_path / "missing.pt")))
    wrong = tmp_path / "wrong_size.pt"
    save_vae_checkpoint(build_tiny_vae(ch=64), wrong)  # same keys, other shapes
    with pytest.raises(UserError, match="has shape .* but the config needs"):
        instantiate_from_config(tiny_vae_config(ckpt_path=str(wrong)))


def test_bad_inputs_give_one_clear_error(vae):
    with pytest.raises(UserError, match="needs 4N\\+1 frames .* got 8"):
        vae.encode(_video(8, 8, 8))
    with pytest.raises(UserError, match="expects 3 channels in dim 1 of x .* got 4"):
        vae.encode(torch.zeros(1, 4, 5, 8, 8))
    with pytest.raises(UserError, match="expects 16 channels in dim 1 of z .* got 32"):
        vae.decode(torch.zeros(1, 32, 3, 1, 1))
    with pytest.raises(UserError, match="expects x of shape"):
        vae.encode(torch.zeros(3, 5, 8, 8))
