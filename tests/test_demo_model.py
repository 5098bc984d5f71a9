"""The trained demo model (``demo_model/``, ``tools/train_demo_model.py``) generates what its prompt says.

What a viewer would check, measured by the oracle of :mod:`sat_cogvideo.demo_world` on the mp4 files the CLI writes:
the dominant non-background colour and the direction the shape's centroid moves.  The prompts are combinations held
out of training (each word was seen, never together).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from sat_cogvideo import demo_world as world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "demo_model")
HELD_OUT_PROMPTS = [world.caption(*c) for c in world.HELD_OUT for _ in range(2)]  # two seeds each (line number)


def generate(tmp_path, prompts, extra=(), name="gen"):
    """Run ``sample_video`` once on a prompt file with the trained model; returns the decoded videos (uint8)."""
    from sat_cogvideo import media, sample_video
    from sat_cogvideo.demo import trained_argv

    folder = tmp_path / name
    folder.mkdir()
    (folder / "prompts.txt").write_text("\n".join(prompts) + "\n")
    argv = trained_argv("x", "x.mp4", steps=10)
    argv = argv[:argv.index("--prompt")] + argv[argv.index("--num-steps"):]
    argv += ["--input-type", "txt", "--input-file", str(folder / "prompts.txt"), "--output-dir", str(folder)]
    written = sample_video.main(argv + list(extra))
    assert len(written) == len(prompts)
    return [media.read_video(path)[0] for path in written]


def follow_rate(videos, prompts) -> float:
    hits = [world.follows(v, c, d) for v, (c, _, d) in zip(videos, map(world.parse_caption, prompts))]
    return sum(hits) / len(hits)


def test_oracle_reads_every_training_clip():
    """The oracle itself: on generated ground-truth clips it names the colour and direction of every combination
    (new colour included), and it reports no direction for a still shape."""
    rng = np.random.default_rng(5)
    for combo in world.combinations(list(world.COLORS) + [world.NEW_COLOR[0]]):
        clip = world.make_clip(*combo, rng)
        seen = world.describe(clip)
        assert (seen["color"], seen["direction"]) == (combo[0], combo[2]), (combo, seen)
    still = np.repeat(world.make_clip("red", "circle", "left", rng)[:1], world.FRAMES, axis=0)
    assert world.describe(still)["direction"] is None
    assert world.describe(np.zeros_like(still) + np.uint8(world.BACKGROUND))["color"] is None


def test_world_is_seeded_and_holds_out_its_combinations(tmp_path):
    """Clips come from the seed alone; the held-out combinations and the new colour never reach the DiT's data."""
    a = [world.make_clip(*c, np.random.default_rng(1)) for c in world.HELD_OUT]
    b = [world.make_clip(*c, np.random.default_rng(1)) for c in world.HELD_OUT]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    train = world.training_combinations()
    assert not set(world.HELD_OUT) & set(train) and len(train) == len(world.combinations()) - len(world.HELD_OUT)
    for part in range(3):  # every colour, shape and direction of the held-out set is seen in training
        assert {c[part] for c in world.HELD_OUT} <= {c[part] for c in train}
    folder = world.write_dataset(str(tmp_path / "data"), train[:2], 1, seed=0)
    labels = sorted(os.listdir(os.path.join(folder, "labels")))
    assert labels == ["1.txt", "2.txt"] and sorted(os.listdir(os.path.join(folder, "videos"))) == ["1.mp4", "2.mp4"]
    assert world.parse_caption(open(os.path.join(folder, "labels", "2.txt")).read()) == train[1]


def test_demo_model_folder_is_small_and_in_the_real_formats():
    from sat_cogvideo.checkpoint import load_torch_file

    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(MODEL) for f in fs)
    assert total <= 20 * 2 ** 20, f"demo_model/ holds {total / 2 ** 20:.1f} MB"
    vae = load_torch_file(os.path.join(MODEL, "vae", "3d-vae.pt"))
    assert set(vae) == {"state_dict"} and any(k.startswith("encoder.") for k in vae["state_dict"])
    tdir = os.path.join(MODEL, "cogvideox_5b", "transformer")
    tag = open(os.path.join(tdir, "latest")).read().strip()
    sd = load_torch_file(os.path.join(tdir, tag, "mp_rank_00_model_states.pt"))["module"]
    assert all(k.startswith("model.diffusion_model.") for k in sd)
    assert os.path.isfile(os.path.join(MODEL, "t5", "spiece.model"))


def color_rate(videos, prompts) -> float:
    hits = [world.describe(v)["color"] == world.parse_caption(p)[0] for v, p in zip(videos, prompts)]
    return sum(hits) / len(hits)


@pytest.fixture(scope="module", params=["dpm", "ddim"])
def held_out(request, tmp_path_factory):
    """The held-out prompts generated at 10 steps with each sampler: (sampler, videos)."""
    tmp = tmp_path_factory.mktemp(f"held_out_{request.param}")
    return request.param, generate(tmp, HELD_OUT_PROMPTS, ["--sampler", request.param])


def test_held_out_prompts_get_their_colour(held_out):
    """What the committed model has learned (demo_model/README.md): the prompt's colour, on held-out combinations,
    with both samplers at 10 steps (a regression oracle for the whole T5 -> DiT -> sampler -> VAE chain)."""
    sampler, videos = held_out
    seen = [(p, world.describe(v)["color"]) for p, v in zip(HELD_OUT_PROMPTS, videos)]
    assert color_rate(videos, HELD_OUT_PROMPTS) >= 0.6, (sampler, seen)


def test_held_out_prompts_are_followed(held_out):
    """The issue's criterion: colour AND direction right for >= 90% of held-out prompts, 10 steps, both samplers."""
    sampler, videos = held_out
    seen = [(p, world.describe(v)["color"], world.describe(v)["direction"]) for p, v in zip(HELD_OUT_PROMPTS, videos)]
    assert follow_rate(videos, HELD_OUT_PROMPTS) >= 0.9, (sampler, seen)


def test_video_to_video_strength(tmp_path):
    """v2v from a clip of a green square moving left, prompted with a red circle moving right: strength 0.3 stays
    close to the input (its shape where the input's is: mask IoU more than twice strength 1.0's), strength 1.0
    follows the prompt (colour and direction).  The committed model takes the prompt's colour and direction already
    at 0.3 (its last 30% of the noise schedule decide both on 32x32 frames; see demo_model/README.md)."""
    from sat_cogvideo import media

    clip = world.make_clip("green", "square", "left", np.random.default_rng(3))
    source = str(tmp_path / "source.mp4")
    media.write_video(source, clip, fps=world.FPS, quality=9)
    source_frames = media.read_video(source)[0].astype(np.float32)
    prompt = [world.caption("red", "circle", "right")]
    seen, overlap = {}, {}
    for strength in (0.3, 1.0):
        (video,) = generate(tmp_path, prompt, ["--generate-type", "v2v", "--image-or-video-path", source,
                                               "--strength", str(strength)], name=f"s{strength}")
        seen[strength] = world.describe(video)
        fg, fg_in = world.foreground(video.astype(np.float32)), world.foreground(source_frames)
        overlap[strength] = float((fg & fg_in).sum() / max((fg | fg_in).sum(), 1))  # where the shape is, per frame
    assert overlap[0.3] >= 2 * overlap[1.0] and overlap[0.3] >= overlap[1.0] + 0.1, (seen, overlap)
    assert seen[1.0]["color"] == "red" and seen[1.0]["direction"] == "right", seen


@pytest.mark.slow  # reason: 12 more generations (~30 s on a busy 2-core machine)
def test_a_perturbed_sampler_is_caught(tmp_path, monkeypatch):
    """The oracle is sensitive: with a sign slip in DDIM's update the videos stop following the prompts."""
    from sgm.modules.diffusionmodules import sampling

    def wrong(x, denoised, s, s_next):  # a sign slip in the prediction's coefficient
        a = ((1 - s_next ** 2) / (1 - s ** 2)) ** 0.5
        b = s * a - s_next
        return sampling.append_dims(a, x.ndim) * x + sampling.append_dims(b, x.ndim) * denoised

    monkeypatch.setattr(sampling, "ddim_update", wrong)
    videos = generate(tmp_path, HELD_OUT_PROMPTS, ["--sampler", "ddim"])
    rates = color_rate(videos, HELD_OUT_PROMPTS), follow_rate(videos, HELD_OUT_PROMPTS)
    assert rates[1] <= 0.5, rates  # the right formula: >= 0.9 (test_held_out_prompts_are_followed)


@pytest.mark.slow  # reason: runs the whole recipe (data, VAE, T5, the DiT on cached latents) at tiny counts, ~1 min
def test_one_command_runs_the_recipe(tmp_path):
    """``tools/train_demo_model.py`` makes the final DiT in one command: from scratch (``mode: pretrain``, no
    ``load``) on cached latents, the EMA weights of its last checkpoint copied as ``transformer/<iter>``;
    training.json holds the curve;
    the README keeps its hand-written text and only the block between the curves markers is regenerated."""
    import json
    import subprocess
    import sys

    import torch

    from sat_cogvideo.checkpoint import load_torch_file

    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    (out / "README.md").write_text("# hand\nmeasured text\n<!-- curves:begin -->\nold table\n<!-- curves:end -->\ntail\n")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train_demo_model.py"), "--output", str(out), "--work",
           str(work), "--clips", "1", "--vae-steps", "2", "--dit-iters", "3", "--batch", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", SAT_COGVIDEO_DEMO_MODEL=str(out))
    run = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    tdir = out / "cogvideox_5b" / "transformer"
    assert (tdir / "latest").read_text().strip() == "3" and sorted(os.listdir(tdir)) == ["3", "latest"]
    final = load_torch_file(str(tdir / "3" / "mp_rank_00_model_states.pt"))["module"]
    assert final and all(k.startswith("model.diffusion_model.") for k in final)
    (run_dir,) = (work / "runs").iterdir()
    ema = load_torch_file(str(run_dir / "3-ema" / "mp_rank_00_model_states.pt"))["module"]
    raw = load_torch_file(str(run_dir / "3" / "mp_rank_00_model_states.pt"))["module"]
    assert set(ema) == set(final) and all(torch.equal(final[k], ema[k]) for k in final)  # the EMA weights ship
    assert any(not torch.equal(final[k], raw[k]) for k in final)
    sft = (work / "sft_cogvideox_5b.yaml").read_text()
    assert "mode: pretrain" in sft and "load: null" in sft and f"cache_latents: {work / 'latent_cache'}" in sft
    entries = [f for _, _, files in os.walk(work / "latent_cache" / "latents") for f in files]
    assert len(entries) == len(os.listdir(work / "dataset" / "videos"))  # every clip encoded once
    report = json.loads((out / "training.json").read_text())
    dit = report["cogvideox_5b"]
    assert [c[0] for c in dit["curve"]] == [1, 2, 3] and dit["iteration"] == 3 and dit["cache_seconds"] > 0
    assert "--dit-iters 3" in report["command"] and report["total_seconds"] > 0
    readme = (out / "README.md").read_text()
    assert readme.startswith("# hand\nmeasured text\n<!-- curves:begin -->") and readme.endswith("-->\ntail\n")
    assert "old table" not in readme and "| 3 | " in readme
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import train_demo_model

    (tmp_path / "fresh").mkdir()  # no README there: a minimal one, the command and the curves
    train_demo_model.write_readme(str(tmp_path / "fresh"), report, "cogvideox_5b")
    fresh = (tmp_path / "fresh" / "README.md").read_text()
    assert report["command"] in fresh and fresh.count("<!-- curves:") == 2 and "| 3 | " in fresh
