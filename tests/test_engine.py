"""SATVideoDiffusionEngine: construction, prefixes, VAE calls, sampling entry points, training step, LoRA merge."""
from __future__ import annotations

import pytest
import torch

# demo_paths (fixture), model_config, make_engine and text_cond live in helpers.py (also imported from here by
# modules that predate it)
from helpers import make_engine, max_rel_err, text_cond


# ------------------------------------------------------------------------------------------------ tests


def test_construction_names_prefixes_and_frozen_vae(demo_paths):
    engine = make_engine("cogvideox_5b", demo_paths, dtype="bf16", load=False)
    assert engine.dtype is torch.bfloat16 and engine.dtype_str == "bf16"
    assert engine.model_config.network_config.params.dtype == "bf16"  # injected into the config, as the original
    assert engine.scale_factor == pytest.approx(0.7) and engine.generation == "1.0"
    keys = list(engine.state_dict())
    prefixes = {k.split(".")[0] for k in keys}
    assert prefixes == {"model", "conditioner", "first_stage_model"}, prefixes
    assert any(k.startswith("model.diffusion_model.transformer.layers.0.") for k in keys)
    assert any(k.startswith("conditioner.embedders.0.transformer.encoder.") for k in keys)
    assert any(k.startswith("first_stage_model.encoder.") for k in keys)
    assert any(k.startswith("first_stage_model.decoder.") for k in keys)
    assert not isinstance(engine.sampler, torch.nn.Module)
    assert engine.denoiser is not None and engine.loss_fn is not None
    assert all(not p.requires_grad for p in engine.first_stage_model.parameters())
    engine.train()
    assert not engine.first_stage_model.training  # .train() is a no-op on the VAE
    assert engine.model.training
    # 1.5 configs are recognised by their list patch size
    assert make_engine("cogvideox1.5_5b", demo_paths, load=False).generation == "1.5"


def test_decode_chunking_rules():
    from sat_cogvideo.families import decode_chunks_15, decode_pieces_10

    assert decode_chunks_15(21) == [3] + [2] * 9
    assert decode_chunks_15(41) == [5] + [4] * 9
    assert decode_chunks_15(5) == [3, 2]
    assert decode_pieces_10(13) == [(0, 3), (3, 5), (5, 7), (7, 9), (9, 11), (11, 13)]
    assert decode_pieces_10(3) == [(0, 3)]
    with pytest.raises(ValueError):
        decode_pieces_10(12)
    with pytest.raises(ValueError):
        decode_chunks_15(1)


def test_encode_first_stage_scales_and_latent_input(demo_paths):
    engine = make_engine("cogvideox_5b", demo_paths, load=False)
    x = torch.rand(1, 3, 5, 64, 96) * 2 - 1
    torch.manual_seed(3)
    z = engine.encode_first_stage(x, None)
    torch.manual_seed(3)
    raw = engine.first_stage_model.encode(x)
    assert z.shape == (1, 16, 2, 8, 12)
    assert torch.equal(z, 0.7 * raw)
    # latent_input: the data already holds latents [B, T, C, h, w]; no VAE call
    engine.latent_input = True
    lat = torch.randn(1, 3, 16, 8, 12)
    out = engine.encode_first_stage(lat, None)
    assert torch.equal(out, lat.permute(0, 2, 1, 3, 4) * 0.7)
    # ... but the inference encoder always encodes
    torch.manual_seed(3)
    assert torch.equal(engine.encode_pixels(x), z)


def test_decode_video_frame_counts_and_chunking(demo_paths):
    e10 = make_engine("cogvideox_5b", demo_paths, load=False)
    z = torch.randn(1, 3, 16, 8, 12)  # [B, T, C, h, w], scaled
    video = e10.decode_video(z)
    assert video.shape == (1, 9, 3, 64, 96) and video.dtype == torch.float32
    assert float(video.min()) >= 0 and float(video.max()) <= 1
    ref = e10.first_stage_model.decode(z.permute(0, 2, 1, 3, 4) / 0.7)
    assert max_rel_err(video.permute(0, 2, 1, 3, 4), ((ref + 1) / 2).clamp(0, 1)) < 1e-6

    e15 = make_engine("cogvideox1.5_5b", demo_paths, load=False)
    z = torch.randn(1, 6, 16, 8, 8)
    video = e15.decode_video(z)
    assert video.shape == (1, 17, 3, 64, 64)  # padding latent dropped, 5 latents -> 17 frames
    # the same as decoding latents 1..5 in pieces [3, 2] with the frame cache carried over
    lat = z.permute(0, 2, 1, 3, 4)[:, :, 1:] / 0.7
    vae = e15.first_stage_model
    a = vae.decode(lat[:, :, :3].contiguous(), clear_fake_cp_cache=False)
    b = vae.decode(lat[:, :, 3:].contiguous(), clear_fake_cp_cache=True)
    ref = torch.cat([a, b], dim=2)
    assert max_rel_err(video.permute(0, 2, 1, 3, 4), ((ref + 1) / 2).clamp(0, 1)) < 1e-6
    # the padding frame does not influence the result
    z2 = z.clone()
    z2[:, 0] = 5.0
    assert torch.equal(e15.decode_video(z2), video)


def test_sample_noise_contract_and_seed(demo_paths):
    engine = make_engine("cogvideox_5b", demo_paths, num_steps=3)
    c, uc = text_cond(engine)
    assert torch.count_nonzero(uc["crossattn"]) == 0 and torch.count_nonzero(c["crossattn"]) > 0
    shape = (3, 16, 8, 12)
    torch.manual_seed(11)
    out = engine.sample(c, uc=uc, batch_size=1, shape=shape)
    # the initial noise is one float32 CPU draw of [B, *shape], then the sampler runs on it
    torch.manual_seed(11)
    noise = torch.randn(1, *shape)
    with torch.no_grad():  # as engine.sample (grad mode can change the attention kernel)
        ref = engine.sampler(engine._denoiser_closure(), noise, c, uc=uc)
    assert out.shape == (1, *shape) and out.dtype == torch.float32
    assert torch.equal(out, ref)
    torch.manual_seed(12)
    other = engine.sample(c, uc=uc, batch_size=1, shape=shape)
    assert (other - out).abs().max() > 1e-3
    # an explicit generator replaces the CPU default one for the initial noise
    g = torch.Generator().manual_seed(11)
    torch.manual_seed(11)
    torch.randn(1, *shape)  # the global RNG where the default-generator run left it for the step noise
    assert torch.equal(engine.sample(c, uc=uc, batch_size=1, shape=shape, generator=g), out)


def test_sample_from_strength_rules(demo_paths):
    engine = make_engine("cogvideox_5b", demo_paths, num_steps=5)
    assert engine.start_step(1.0) == 0 and engine.start_step(0.0) == 5 and engine.start_step(0.4) == 3
    assert engine.start_step(0.8, 50) == 10  # diffusers: 50 - int(50 * 0.8)
    c, uc = text_cond(engine)
    shape = (3, 16, 8, 12)
    z0 = torch.randn(1, *shape)
    noise = torch.randn(1, *shape)
    # strength 0: the input latents come back unchanged
    assert torch.equal(engine.sample_from(z0, c, uc, strength=0.0, noise=noise), z0)
    # strength 1: s_0 = 0, so the start is pure noise and the run equals t2v sampling from that noise
    torch.manual_seed(5)
    full = engine.sample_from(z0, c, uc, strength=1.0, noise=noise)
    torch.manual_seed(5)
    with torch.no_grad():
        ref = engine.sampler(engine._denoiser_closure(), noise.clone(), c, uc=uc)
    assert torch.equal(full, ref)
    # strength 0.4: starts at step 3 from s_3·z0 + sqrt(1 - s_3²)·ε, steps 3 and 4 only
    calls = []
    orig = engine.denoiser.forward

    def spy(network, x, sigma, cond, **kw):
        calls.append(float(sigma.flatten()[0]))
        return orig(network, x, sigma, cond, **kw)

    engine.denoiser.forward = spy
    torch.manual_seed(5)
    part = engine.sample_from(z0, c, uc, strength=0.4, noise=noise)
    s, _ = engine.sampler.discretization(5, return_idx=True, do_append_zero=False)
    assert len(calls) == 2 and calls[0] == pytest.approx(float(s[3]), abs=1e-3)
    assert part.shape == z0.shape and torch.isfinite(part).all()
    with pytest.raises(ValueError):
        engine.start_step(1.5)


def test_shared_step_t2v_and_i2v_concat(demo_paths, monkeypatch):
    engine = make_engine("cogvideox_5b", demo_paths)
    batch = {"mp4": torch.rand(1, 5, 3, 64, 96) * 2 - 1, "txt": ["a cat"]}
    torch.manual_seed(0)
    loss, log = engine.shared_step(batch)
    assert loss.ndim == 0 and torch.isfinite(loss) and log["loss"] is loss
    loss.backward()
    grads = [p.grad for n, p in engine.named_parameters() if n.startswith("model.") and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)

    i2v = make_engine("cogvideox_5b_i2v", demo_paths)
    assert i2v.noised_image_input and i2v.noised_image_dropout == pytest.approx(0.05)
    seen = {}
    real_forward = type(i2v).forward

    def capture(self, x, b):
        seen["x"], seen["concat"] = x, b["concat_images"]
        return real_forward(self, x, b)

    monkeypatch.setattr(type(i2v), "forward", capture)
    monkeypatch.setattr("random.random", lambda: 0.99)  # no image dropout
    batch = {"mp4": torch.rand(1, 5, 3, 64, 96) * 2 - 1, "txt": ["a cat"]}
    loss, _ = i2v.shared_step(batch)
    assert torch.isfinite(loss)
    x, concat = seen["x"], seen["concat"]
    assert x.shape == (1, 2, 16, 8, 12) and concat.shape == x.shape
    assert torch.count_nonzero(concat[:, 1:]) == 0 and torch.count_nonzero(concat[:, 0]) > 0
    monkeypatch.setattr("random.random", lambda: 0.0)  # dropout: the whole image condition is zero
    i2v.shared_step({"mp4": batch["mp4"], "txt": ["a cat"]})
    assert torch.count_nonzero(seen["concat"]) == 0


def test_disable_untrainable_params(demo_paths):
    engine = make_engine("cogvideox_5b", demo_paths, load=False)
    n = engine.disable_untrainable_params()
    dit = sum(p.numel() for k, p in engine.named_parameters() if k.startswith("model.") and p.requires_grad)
    assert n == dit > 0
    assert not any(p.requires_grad for k, p in engine.named_parameters() if k.startswith("conditioner."))
    lora = make_engine("cogvideox_5b_lora", demo_paths, load=False)
    assert lora.not_trainable_prefixes == ["all"]
    n = lora.disable_untrainable_params()
    trainable = [k for k, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("matrix_A" in k or "matrix_B" in k for k in trainable)
    assert n == sum(p.numel() for p in lora.parameters() if p.requires_grad)


def test_lora_checkpoint_merge_equals_lora_model(demo_paths, tmp_path):
    """--lora-path: the factors of a SAT LoRA checkpoint merged into the plain weights give the LoRA model's DiT."""
    from sat_cogvideo.atomic import atomic_torch_save, atomic_write_text
    from sat_cogvideo.sample_video import merge_lora_checkpoint

    lora_engine = make_engine("cogvideox_5b_lora", demo_paths, load=False)
    plain = make_engine("cogvideox_5b", demo_paths)
    gen = torch.Generator().manual_seed(0)
    sd = lora_engine.state_dict()
    base = plain.state_dict()
    new = {}
    for k, v in sd.items():
        if not k.startswith("model.diffusion_model."):
            continue
        if ".matrix_A." in k or ".matrix_B." in k:
            new[k] = 0.5 * torch.randn(v.shape, generator=gen)
        else:
            plain_key = k.replace(".original.", ".")
            new[k] = base[plain_key].clone()
    lora_engine.load_state_dict(new, strict=False)
    folder = tmp_path / "lora"
    atomic_torch_save({"module": new}, str(folder / "1" / "mp_rank_00_model_states.pt"))
    atomic_write_text(str(folder / "latest"), "1")
    # default scale: SAT's lora_alpha (default 1) / r, the rank read from the checkpoint
    merge_lora_checkpoint(plain, str(folder), None, plain.model_config)

    x = torch.randn(2, 3, 16, 8, 12)
    t = torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 16, 32)
    with torch.no_grad():
        ref = lora_engine.model(x, t, {"crossattn": ctx})
        out = plain.model(x, t, {"crossattn": ctx})
        before = make_engine("cogvideox_5b", demo_paths).model(x, t, {"crossattn": ctx})
    assert max_rel_err(out, ref) < 1e-5
    assert max_rel_err(before, ref) > 1e-3  # the LoRA factors do change the output


def test_checkpoint_loading_sat_layout(demo_paths, tmp_path):
    """SAT layout: DiT keys loaded strictly; T5/VAE keys of finetune checkpoints ignored; a wrong config refused."""
    from sat_cogvideo.errors import UserError
    from sat_cogvideo.atomic import atomic_torch_save, atomic_write_text
    from sat_cogvideo.sample_video import load_transformer_checkpoint

    engine = make_engine("cogvideox_5b", demo_paths)
    full = {k: v.clone() for k, v in engine.state_dict().items()}  # DiT + T5 + VAE, as a finetune checkpoint
    full["model.diffusion_model.transformer.layers.0.attention.dense.weight"] += 1.0
    rope = "model.diffusion_model.mixins.pos_embed.freqs_sin"
    computed = full[rope].clone()
    full[rope] += 1.0  # stored tables are ignored: they are computed
    folder = tmp_path / "ft"
    atomic_torch_save({"module": full}, str(folder / "1000" / "mp_rank_00_model_states.pt"))
    atomic_write_text(str(folder / "latest"), "1000\n")
    fresh = make_engine("cogvideox_5b", demo_paths)
    load_transformer_checkpoint(fresh, str(folder))
    key = "model.diffusion_model.transformer.layers.0.attention.dense.weight"
    assert torch.equal(fresh.state_dict()[key], full[key])
    assert torch.equal(fresh.state_dict()[rope], computed)
    with pytest.raises(UserError, match="does not fit the model"):
        load_transformer_checkpoint(make_engine("cogvideox_5b_i2v", demo_paths, load=False), demo_paths["cogvideox_5b"])
    with pytest.raises(UserError, match="latest"):
        load_transformer_checkpoint(fresh, str(tmp_path))
