"""``sample_video.main`` on the paths users run besides t2v: i2v (1.0 and 1.5) and v2v from the command line,
compared with diffusers' pipelines; ``--lora-path`` / ``--lora-scale`` with a LoRA run made by ``finetune.sh``;
``--overwrite``; the float16 warning.

The i2v/v2v comparisons are the ones of test_engine_diffusers (same tiny weights in diffusers' pipelines, same
prompt embeddings and seed, diffusers' ᾱ table given to our sampler, v2v with constant CFG), here reached through
the command line: prompt files with ``prompt@@image`` lines, ``--image-or-video-path``, ``--strength``, the
per-line seed ``seed + 1000·line``, the 1.5-I2V size taken from the image, and the latents ``--only-save-latents``
writes.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from helpers import (diffusers_pipeline, max_rel_err, read_frames, run_diffusers, use_diffusers_schedule,
                     write_image)

STEPS = 5  # a divisor of 1000: SAT and diffusers then pick the same timesteps
SEED = 1234
TOL = 1e-4  # as test_engine_diffusers (float32 reorderings give ~1e-6)


def cli_argv(paths, model, steps=STEPS, seed=SEED):
    """The tiny ``model`` at its configured frame count, without size options (the plan takes the size from the
    config or, 1.5-I2V, the image)."""
    from helpers import model_config

    frames = int(model_config(model).network_config.params.num_frames)
    return ["--base", paths["config:" + model], "--load", paths[model], "--num-steps", str(steps), "--device", "cpu",
            "--seed", str(seed), "--num-frames", str(frames)]


@pytest.fixture
def diffusers_numbers(monkeypatch):
    """Make the engine that ``main`` builds use diffusers' ᾱ table (and, for v2v, constant CFG), and keep the
    diffusers pipeline that holds its weights."""
    from sat_cogvideo import sample_video

    got = {}
    real = sample_video.build_engine

    def setup(kind, constant_cfg=False):
        def build(args):
            engine = real(args)
            if constant_cfg:
                from sgm.modules.diffusionmodules.guiders import VanillaCFG

                engine.sampler.guider = VanillaCFG(scale=6.0)  # diffusers' v2v shortens the dynamic-CFG step count
            pipe = diffusers_pipeline(engine, kind)
            use_diffusers_schedule(engine, pipe.scheduler)
            got["engine"], got["pipe"] = engine, pipe
            return engine

        monkeypatch.setattr(sample_video, "build_engine", build)
        return got

    return setup


def saved_latents(path, engine):
    """``latent.pt`` ([1, C, T, h, w] divided by the scale factor) as sampled: [1, T, C, h, w] scaled."""
    return torch.load(path).permute(0, 2, 1, 3, 4) * engine.scale_factor


def embeddings(engine, text):
    from sat_cogvideo.sample_video import conditionings

    return conditionings(engine, text, torch.device("cpu"))


def test_i2v_prompt_file_with_image_lines_matches_diffusers(demo_paths, tmp_path, diffusers_numbers):
    """CogVideoX-5B-I2V (1.0): a prompt file of ``prompt@@image`` lines; line 1 is seeded with seed + 1000."""
    from sat_cogvideo import media, sample_video

    got = diffusers_numbers("i2v")
    img0, img1 = write_image(tmp_path / "a.png", 64, 96, seed=0), write_image(tmp_path / "b.png", 64, 96, seed=1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a red fox@@{img0}\na blue bird @@ {img1}\n")
    out = tmp_path / "out"
    written = sample_video.main(cli_argv(demo_paths, "cogvideox_5b_i2v") + [
        "--input-type", "txt", "--input-file", str(prompts), "--output-dir", str(out), "--batch-size", "1",
        "--only-save-latents", "true"])
    expect = [out / "0_a_red_fox" / "0" / "latent.pt", out / "1_a_blue_bird" / "0" / "latent.pt"]
    assert sorted(written) == sorted(map(str, expect))
    engine, pipe = got["engine"], got["pipe"]
    z = saved_latents(expect[1], engine)
    assert z.shape == (1, 3, 16, 8, 12)
    c, uc = embeddings(engine, "a blue bird")
    image = media.pil_to_tensor(media.read_image(img1)).unsqueeze(0)
    latents, _ = run_diffusers(pipe, "i2v", c, uc, (9, 64, 96), SEED + 1000, STEPS,
                               image=image)
    err = max_rel_err(z, latents)
    print(f"i2v 1.0 through the CLI: latents rel. err {err:.2e}")
    assert err < TOL, err
    # line 0 has its own image and seed
    assert max_rel_err(saved_latents(expect[0], engine), z) > 1e-3


def test_i2v_15_image_path_size_from_image_matches_diffusers(demo_paths, tmp_path, diffusers_numbers):
    """CogVideoX1.5-5B-I2V: ``--image-or-video-path``, no size options: the video size follows the image (a
    128x96 image gives 96x128 pixels here, the tiny model's grid being 128x128)."""
    from sat_cogvideo import media, sample_video

    got = diffusers_numbers("i2v")
    img = write_image(tmp_path / "wide.png", 96, 128, seed=2)
    out = tmp_path / "v.mp4"
    sample_video.main(cli_argv(demo_paths, "cogvideox1.5_5b_i2v") + [
        "--prompt", "a cat", "--image-or-video-path", img, "--output-path", str(out), "--only-save-latents", "true"])
    engine, pipe = got["engine"], got["pipe"]
    z = saved_latents(tmp_path / "v.pt", engine)
    assert z.shape == (1, 6, 16, 12, 16)  # 17 frames: 5 latents + the 1.5 padding latent; 96x128 pixels
    pipe.vae_scaling_factor_image = 1.0  # SAT 1.5 conditions on the raw latent z
    c, uc = embeddings(engine, "a cat")
    image = media.pil_to_tensor(media.read_image(img)).unsqueeze(0)
    latents, _ = run_diffusers(pipe, "i2v", c, uc, (17, 96, 128), SEED, STEPS, image=image)
    err = max_rel_err(z, latents)
    print(f"i2v 1.5 through the CLI: latents rel. err {err:.2e}")
    assert err < TOL, err


def test_v2v_video_path_and_strength_match_diffusers(demo_paths, tmp_path, diffusers_numbers):
    """CogVideoX-5B with a video (v2v guessed from the path) and ``--strength 0.6``."""
    from sat_cogvideo import media, sample_video

    got = diffusers_numbers("v2v", constant_cfg=True)
    rng = np.random.default_rng(1)
    path = str(tmp_path / "in.mp4")
    media.write_video(path, rng.integers(0, 255, (12, 80, 112, 3), dtype=np.uint8), fps=8)
    runs = {}
    for strength in ("0.6", "1.0"):
        out = tmp_path / f"s{strength}.mp4"
        sample_video.main(cli_argv(demo_paths, "cogvideox_5b") + [
            "--prompt", "a cat", "--image-or-video-path", path, "--strength", strength, "--output-path", str(out),
            "--only-save-latents", "true"])
        runs[strength] = saved_latents(tmp_path / f"s{strength}.pt", got["engine"])
    engine, pipe = got["engine"], got["pipe"]
    c, uc = embeddings(engine, "a cat")
    frames = media.load_v2v_video(path, 9, 64, 96)  # what ours read: [1, 3, F, H, W] in [-1, 1]
    video = ((frames + 1) / 2).permute(0, 2, 1, 3, 4)  # [1, F, 3, H, W] in [0, 1]
    latents, _ = run_diffusers(pipe, "v2v", c, uc, (9, 64, 96), SEED, STEPS, video=video, strength=0.6,
                               dynamic=False)
    err = max_rel_err(runs["0.6"], latents)
    print(f"v2v through the CLI: latents rel. err {err:.2e}")
    assert err < TOL, err
    assert max_rel_err(runs["1.0"], runs["0.6"]) > 1e-3  # --strength reaches the sampler


# ------------------------------------------------------------------------------------------------ --lora-path


def lora_factors(run):
    from sat_cogvideo.checkpoint import load_checkpoint_file

    sd = load_checkpoint_file(run)["module"]
    pre = "model.diffusion_model."
    return {k[len(pre):]: v for k, v in sd.items() if ".matrix_A." in k or ".matrix_B." in k}


def test_lora_path_and_scale_merge_a_finetune_sh_run(demo_paths, finetune_sh_run, tmp_path, monkeypatch):
    """``--lora-path`` with the run ``bash finetune.sh`` made: the DiT weights become W + scale·B·A per projection
    (scale = lora_alpha / r = 1/4 by default, ``--lora-scale`` when given), and the latents equal those of the LoRA
    model itself (``--base cogvideox_2b_lora.yaml --load <run>``, here with lora_alpha 100 to match
    ``--lora-scale 25``: the 4 demo iterations leave a LoRA too small to see at scale 1/4)."""
    from sat_cogvideo import sample_video

    assert finetune_sh_run.proc.returncode == 0, finetune_sh_run.proc.stderr[-3000:]
    (run,) = finetune_sh_run.runs
    engines = []
    real = sample_video.build_engine

    def build(args):
        engines.append(real(args))
        return engines[-1]

    monkeypatch.setattr(sample_video, "build_engine", build)

    def latents(name, argv):
        out = tmp_path / f"{name}.mp4"
        sample_video.main(argv + ["--prompt", "a cat", "--output-path", str(out), "--only-save-latents", "true"])
        return torch.load(tmp_path / f"{name}.pt"), engines[-1]

    plain_argv = cli_argv(demo_paths, "cogvideox_2b", steps=2)
    plain, plain_engine = latents("plain", plain_argv)
    _, default_engine = latents("default", plain_argv + ["--lora-path", run])
    scaled, scaled_engine = latents("scaled", plain_argv + ["--lora-path", run, "--lora-scale", "25"])
    alpha = tmp_path / "alpha100.yaml"
    alpha.write_text("model:\n  network_config:\n    params:\n      modules:\n        lora_config:\n"
                     "          params:\n            lora_alpha: 100\n")
    lora_config = demo_paths["config:cogvideox_2b"].replace("cogvideox_2b.yaml", "cogvideox_2b_lora.yaml")
    lora_model, _ = latents("lora_model", ["--base", lora_config, str(alpha), "--load", run] + plain_argv[4:])

    factors = lora_factors(run)
    assert len(factors) == 16 and all(v.abs().max() > 0 for k, v in factors.items() if ".matrix_B." in k)
    base = dict(plain_engine.model.diffusion_model.named_parameters())
    for engine, scale in ((default_engine, 0.25), (scaled_engine, 25.0)):
        own = dict(engine.model.diffusion_model.named_parameters())
        for layer in sorted({k.rsplit(".matrix_", 1)[0] for k in factors}):
            parts = 3 if "query_key_value" in layer else 1
            delta = torch.cat([factors[f"{layer}.matrix_B.{j}"] @ factors[f"{layer}.matrix_A.{j}"]
                               for j in range(parts)]) * scale
            torch.testing.assert_close(own[layer + ".weight"] - base[layer + ".weight"], delta, rtol=1e-3,
                                       atol=1e-7)
    err, effect = max_rel_err(scaled, lora_model), max_rel_err(plain, lora_model)
    print(f"--lora-path --lora-scale 25 vs the LoRA model (lora_alpha 100): latents rel. err {err:.2e}; "
          f"without the LoRA {effect:.2e}")
    assert err < 1e-5, err
    assert effect > 100 * err


# ------------------------------------------------------------------------------------------------ --overwrite


def test_overwrite_replaces_an_existing_output(demo_paths, tmp_path, capsys):
    from helpers import sample_argv
    from sat_cogvideo import sample_video

    out = tmp_path / "v.mp4"
    out.write_bytes(b"an old output")
    argv = sample_argv(demo_paths, "cogvideox_5b", steps=1) + ["--prompt", "a cat", "--output-path", str(out)]
    with pytest.raises(SystemExit) as exc:
        sample_video.main(argv)
    assert exc.value.code == 2 and "exists: pass --skip-existing" in capsys.readouterr().err
    assert sample_video.main(argv + ["--skip-existing"]) == [str(out)]
    assert out.read_bytes() == b"an old output"
    assert sample_video.main(argv + ["--overwrite"]) == [str(out)]
    assert read_frames(out).shape == (9, 64, 96, 3)
    assert not [p for p in os.listdir(tmp_path) if p != "v.mp4"]  # no temporary file left


# ------------------------------------------------------------------------------------------------ float16 warning


@pytest.mark.parametrize("config,dtype,warns", [
    ("cogvideox_5b", "float16", True), ("cogvideox1.5_5b_i2v", "float16", True),
    ("cogvideox_5b", "bfloat16", False), ("cogvideox_2b", "float16", False)])
def test_float16_warning_for_bfloat16_families(config, dtype, warns, tmp_path, monkeypatch):
    """The released 5B / 1.5 models in float16 give a warning before anything is loaded (2B is a float16 model)."""
    import warnings

    from sat_cogvideo import sample_video

    class Stop(Exception):
        pass

    def stop(args):
        raise Stop

    monkeypatch.setattr(sample_video, "build_engine", stop)
    # no released weights here: the weight-file checks are skipped (the warning comes from the configs alone)
    monkeypatch.setattr(sample_video, "preflight_weights", lambda args: None, raising=False)
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    inference = "inference_1.5.yaml" if config.startswith("cogvideox1.5") else "inference.yaml"
    argv = ["--base", f"{root}/{config}.yaml", f"{root}/{inference}", "--device", "cpu", "--load", str(tmp_path),
            "--prompt", "a cat", "--output-path", str(tmp_path / "a.mp4"), "--dtype", dtype]
    if "i2v" in config:
        argv += ["--image-or-video-path", write_image(tmp_path / "i.png", 96, 160)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(Stop):
            sample_video.main(argv)
    messages = [str(w.message) for w in caught if "float16 often gives black" in str(w.message)]
    assert len(messages) == int(warns), [str(w.message) for w in caught]
    if warns:
        assert messages[0].endswith("use --dtype bfloat16")
