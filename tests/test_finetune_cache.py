"""--cache-latents (sat_cogvideo.latent_cache): the loss on cached entries equals the on-the-fly loss for the same
random draws; a second pass reads every item from the cache without building the VAE or T5; a changed setting
misses; damaged entries are re-encoded with a warning.  In-process on the tiny CogVideoX-2B of the demo (2 videos,
9 frames of 64x96); the end-to-end training runs on the cache are in test_finetune_scale.py (slow)."""
from __future__ import annotations

import copy
import os
import random

import numpy as np
import pytest
import torch

from helpers import ROOT

TINY = os.path.join(ROOT, "configs", "tiny")
LORA = os.path.join(TINY, "cogvideox_2b_lora.yaml")
SFT = os.path.join(TINY, "sft.yaml")


@pytest.fixture(scope="module")
def dataset(demo_paths):
    from sat_cogvideo.demo import build_demo_dataset

    build_demo_dataset(demo_paths["folder"])
    return os.path.join(demo_paths["folder"], "dataset")


def cache_args(dataset, cache, *extra):
    from sat_cogvideo.arguments import get_args
    from sat_cogvideo.latent_cache import add_cache_args
    from sat_cogvideo.train_video import add_finetune_args

    args = get_args(["--base", LORA, SFT, "--train-data", dataset, "--cache-latents", str(cache), "--device", "cpu",
                     *extra], extra=[add_finetune_args, add_cache_args])
    return args


def data_params(args):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(args.data_config.params, resolve=True)


def prepare(args, monkeypatch=None, forbid_build=False):
    from sat_cogvideo import latent_cache
    from sat_cogvideo.data_video import SFTDataset

    if forbid_build:
        def refuse(self, config, where):
            raise AssertionError(f"{where} was built although the cache is complete")

        monkeypatch.setattr(latent_cache._Encoders, "_make", refuse)
    counts = latent_cache.prepare_cache(args, SFTDataset, data_params(args))
    return counts, latent_cache.prepared_dataset(args.train_data[0])


def engine_for(args, model_config):
    from sat_cogvideo.checkpoint import checkpoint_file
    from sat_cogvideo.diffusion_video import SATVideoDiffusionEngine
    from sat_cogvideo.train_video import _read_checkpoint, load_dit_weights

    a = copy.copy(args)
    a.model_config = copy.deepcopy(model_config)
    engine = SATVideoDiffusionEngine(a)
    load_dit_weights(engine, _read_checkpoint(str(checkpoint_file(args.load))), source=args.load)
    return engine.train()


def seeded_losses(engine, batch, seeds):
    out = []
    for s in seeds:
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)
        with torch.no_grad():
            loss, _ = engine.shared_step(dict(batch))
        out.append(float(loss))
    return out


def test_cache_loss_reads_misses_and_damage(dataset, tmp_path, dist_cpu, monkeypatch, capsys):
    """One cache, four prepare_cache passes: fill, complete (nothing built), changed setting, damaged entries."""
    from sat_cogvideo.data_video import SFTDataset
    from sat_cogvideo.latent_cache import CachedPosterior, CachedTextEmbedder

    args = cache_args(dataset, tmp_path / "cache")
    original_config = copy.deepcopy(args.model_config)
    counts, cached = prepare(args)
    assert counts["videos"] == 2 and counts["found"] == 0 and counts["written"] == 4  # 2 latents + 2 captions
    assert len(counts["built"]) == 2  # the VAE and T5, to encode
    pixels = SFTDataset(data_dir=dataset, **data_params(args))
    live, on_cache = engine_for(args, original_config), engine_for(args, args.model_config)
    assert isinstance(on_cache.first_stage_model, CachedPosterior)
    assert isinstance(on_cache.conditioner.embedders[0], CachedTextEmbedder)
    assert not any(k.startswith(("first_stage_model.", "conditioner.")) for k in on_cache.state_dict())
    # 4 draws: timesteps, posterior noise and caption dropout (ucg_rate 0.1) all agree
    seeds = (0, 1, 2, 3)
    a = seeded_losses(live, torch.utils.data.default_collate([pixels[1]]), seeds)
    b = seeded_losses(on_cache, torch.utils.data.default_collate([cached[1]]), seeds)
    assert a == b, (a, b)
    assert len(set(a)) == len(a)  # the draws differ from seed to seed: the comparison is not of constants
    assert on_cache.first_stage_model.__dict__["_vae"] is None  # training never built the VAE
    assert on_cache.conditioner.embedders[0].__dict__["_t5"] is None
    # the posterior draw is fresh per step: with the mean instead, the loss changes
    on_cache.first_stage_model.sample = False
    assert seeded_losses(on_cache, torch.utils.data.default_collate([cached[1]]), seeds[:1]) != a[:1]

    # a second run: everything found, nothing built, every item read from the cache (twice over two epochs)
    args2 = cache_args(dataset, tmp_path / "cache")
    counts, cached2 = prepare(args2, monkeypatch, forbid_build=True)
    assert counts == {"videos": 2, "found": 2, "written": 0, "built": []}
    for _ in range(2):
        for i in range(len(cached2)):
            item = cached2[i]
            assert torch.equal(item["mp4"], cached[i]["mp4"]) and item["txt"] == pixels.captions[i]
    assert cached2.reads == 4
    monkeypatch.undo()

    changed_setting_misses_and_damage_is_reencoded(dataset, tmp_path / "cache", tmp_path, capsys)


def changed_setting_misses_and_damage_is_reencoded(dataset, cache, tmp_path, capsys):
    from safetensors.torch import load_file

    entries = sorted(str(p) for p in (cache / "latents").rglob("*.safetensors"))
    texts = sorted(str(p) for p in (cache / "text").rglob("*.safetensors"))
    assert len(entries) == 2 and len(texts) == 2
    before = {p: {k: v.clone() for k, v in load_file(p).items()} for p in entries}
    # a changed frame count: new latent entries, the captions' entries are still hits (fps, size, dtype and the
    # VAE weights: test_vae_weights_are_part_of_the_key)
    frames = tmp_path / "frames.yaml"
    frames.write_text("data:\n  params:\n    max_num_frames: 5\n")
    counts, _ = prepare(_with_base(dataset, cache, frames))
    assert counts["found"] == 0 and counts["written"] == 2, counts
    assert len(list((cache / "latents").rglob("*.safetensors"))) == 4
    # damage: one entry truncated, one with a flipped byte in its data
    with open(entries[0], "r+b") as f:
        f.truncate(os.path.getsize(entries[0]) - 7)
    raw = bytearray(open(entries[1], "rb").read())
    raw[-3] ^= 0xFF
    open(entries[1], "wb").write(bytes(raw))
    capsys.readouterr()
    counts, cached = prepare(cache_args(dataset, cache))
    err = capsys.readouterr().err
    assert counts["written"] == 2 and err.count("is damaged") == 2 and "encoding it again" in err, err
    for p in entries:
        after = load_file(p)
        assert torch.equal(after["moments"], before[p]["moments"])  # re-encoded to the same values
    assert not list(cache.rglob("*.tmp*")) and not [p for p in cache.rglob("*") if p.name.startswith(".")]


def _with_base(dataset, cache, override):
    from sat_cogvideo.arguments import get_args
    from sat_cogvideo.latent_cache import add_cache_args
    from sat_cogvideo.train_video import add_finetune_args

    return get_args(["--base", LORA, SFT, str(override), "--train-data", dataset, "--cache-latents", str(cache),
                     "--device", "cpu"], extra=[add_finetune_args, add_cache_args])


def test_vae_weights_are_part_of_the_key(tmp_path):
    """Same config, VAE file with one changed byte: a different latent key (content hash, not the path)."""
    from omegaconf import OmegaConf

    from sat_cogvideo.latent_cache import Fingerprints, digest, latent_settings

    vae = tmp_path / "vae.pt"
    vae.write_bytes(b"weights-1")
    mc = OmegaConf.create({"first_stage_config": {"target": "x.VAE", "params": {"ckpt_path": str(vae)}}})
    params = {"video_size": [64, 96], "fps": 8, "max_num_frames": 9}
    prints = Fingerprints(str(tmp_path))
    a = digest(latent_settings(mc, params, "float32", prints))
    assert digest(latent_settings(mc, params, "float32", prints)) == a
    vae.write_bytes(b"weights-2")
    os.utime(vae, ns=(1, 1))  # a new mtime too, as any rewrite gives
    assert digest(latent_settings(mc, params, "float32", prints)) != a
    assert digest(latent_settings(mc, params, "bfloat16", prints)) != a
    assert digest(latent_settings(mc, dict(params, video_size=[32, 32]), "float32", prints)) != a


def test_unsupported_configs_are_refused_in_one_line(dataset, tmp_path, dist_cpu):
    from sat_cogvideo.errors import UserError
    from sat_cogvideo.latent_cache import check_supported

    args = cache_args(dataset, tmp_path / "cache")
    args.model_config.noised_image_input = True
    with pytest.raises(UserError, match="image-to-video models cannot train on cached latents"):
        check_supported(args)
    args = cache_args(dataset, tmp_path / "cache")
    args.data_config.params.reshape_mode = "random"
    with pytest.raises(UserError, match="reshape_mode: center"):
        check_supported(args)
