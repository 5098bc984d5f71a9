"""Buckets (``data.params.buckets``, sat_cogvideo/buckets.py): videos of two resolutions and two lengths are each
resized and cut to their own bucket instead of one ``video_size``; every batch comes from one bucket, on every rank;
the order depends only on the seed, so a killed and resumed run ends bit-exactly as the uninterrupted one."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import ROOT, clean_env, run_folder, run_train
from sat_cogvideo.buckets import BucketBatchSampler, Buckets, check_fits_model
from sat_cogvideo.data_video import SFTDataset
from sat_cogvideo.errors import UserError

TINY = os.path.join(ROOT, "configs", "tiny")
BUCKETS = {"video_sizes": [[64, 96], [48, 48]], "num_frames": [5, 9]}
# (stem, source frames, source height, width) -> the bucket (frames, height, width) it belongs to
CLIPS = [("land_long_a", 12, 64, 96, (9, 64, 96)), ("land_long_b", 14, 72, 120, (9, 64, 96)),
         ("land_short_a", 6, 64, 96, (5, 64, 96)), ("land_short_b", 7, 60, 100, (5, 64, 96)),
         ("square_long_a", 12, 80, 80, (9, 48, 48)), ("portrait_long", 13, 96, 64, (9, 48, 48)),
         ("square_short_a", 6, 80, 80, (5, 48, 48)), ("square_short_b", 6, 50, 48, (5, 48, 48))]


def write_clip(root, stem, frames, height, width, fps=8):
    """Frame k: value 20k in the left half, 200 in the right half (so crops and frame order show)."""
    import imageio

    for sub in ("videos", "labels"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    writer = imageio.get_writer(os.path.join(root, "videos", f"{stem}.mp4"), format="FFMPEG", mode="I", fps=fps,
                                macro_block_size=1, quality=10)
    for k in range(frames):
        frame = np.full((height, width, 3), 200, np.uint8)
        frame[:, : width // 2] = min(20 * k, 255)
        writer.append_data(frame)
    writer.close()
    with open(os.path.join(root, "labels", f"{stem}.txt"), "w") as f:
        f.write(f"a clip called {stem.replace('_', ' ')}\n")


@pytest.fixture(scope="module")
def bucket_data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("buckets") / "data")
    for stem, frames, h, w, _ in CLIPS:
        write_clip(root, stem, frames, h, w)
    return root


def dataset(root, **kw):
    return SFTDataset(root, video_size=[64, 96], fps=8, max_num_frames=9, skip_frms_num=0, buckets=BUCKETS, **kw)


def test_each_video_goes_to_its_bucket_and_is_cut_to_it(bucket_data):
    ds = dataset(bucket_data)
    expected = {stem: key for stem, *_, key in CLIPS}
    got = {os.path.basename(p)[:-4]: key for p, key in zip(ds.video_paths, ds.bucket_keys)}
    assert got == expected
    for i, (frames, h, w) in enumerate(ds.bucket_keys):
        item = ds[i]
        assert item["mp4"].shape == (frames, 3, h, w)
        assert item["num_frames"] == frames
        # frame k of the clip: left half 20k (sampled at the source rate of 8 fps, nothing skipped)
        left = ((item["mp4"][:, 0, h // 2, 2] + 1) * 127.5).round()
        assert left.tolist() == pytest.approx([20 * k for k in range(frames)], abs=6)


def test_a_clip_shorter_than_every_bucket_is_padded_to_the_shortest(tmp_path):
    write_clip(str(tmp_path), "tiny", 3, 64, 96)
    ds = dataset(str(tmp_path))
    assert ds.bucket_keys == [(5, 64, 96)]
    item = ds[0]
    assert item["mp4"].shape == (5, 3, 64, 96) and item["num_frames"] == 1  # case C: one 4k+1 frame, padded
    assert torch.equal(item["mp4"][1:], item["mp4"][:1].expand(4, -1, -1, -1))


def test_without_buckets_every_item_has_the_one_size(bucket_data):
    ds = SFTDataset(bucket_data, video_size=[64, 96], fps=8, max_num_frames=9, skip_frms_num=0)
    assert ds.bucket_keys is None
    assert {tuple(ds[i]["mp4"].shape) for i in range(len(ds))} == {(9, 3, 64, 96)}


def test_bucket_choice_rules():
    b = Buckets.from_config({"video_sizes": [[48, 96], [64, 64], [96, 48], [32, 32]], "num_frames": [17, 9, 5]},
                            [64, 64], 17)
    assert b.frames == (5, 9, 17)
    assert b.size_for(720, 1280) == (48, 96)   # log-ratio distance 0.118 vs 0.575
    assert b.size_for(500, 480) == (64, 64)    # square: the larger of the two square buckets
    assert b.size_for(1920, 1080) == (96, 48)
    assert [b.frames_for(n) for n in (1, 5, 8, 9, 16, 17, 200)] == [5, 5, 5, 9, 9, 17, 17]
    assert Buckets.from_config(None, [64, 64], 9) is None
    only_frames = Buckets.from_config({"num_frames": [9, 5]}, [64, 96], 9)
    assert only_frames.sizes == ((64, 96),) and only_frames.frames == (5, 9)


@pytest.mark.parametrize("value, message", [
    ({"num_frames": [8]}, "num_frames 8 is not 4k+1"),
    ({"sizes": [[64, 64]]}, "unknown key(s) sizes"),
    ({"video_sizes": [[64]]}, "video_sizes entries must be [height, width]"),
    ([[64, 64]], "must be a mapping"),
])
def test_bad_bucket_configs_are_one_line(value, message):
    with pytest.raises(UserError, match=None) as err:
        Buckets.from_config(value, [64, 64], 9)
    assert message in str(err.value)


def test_sampler_batches_come_from_one_bucket_on_every_rank_and_repeat_by_seed():
    keys = [(9, 64, 96)] * 7 + [(5, 64, 96)] * 3 + [(9, 48, 48)] * 5  # the middle bucket is smaller than a step
    ranks = [BucketBatchSampler(keys, batch_size=2, rank=r, world_size=2, seed=3, length=10) for r in range(2)]
    def first(sampler, n=40):
        return [batch for _, batch in zip(range(n), iter(sampler))]

    steps = [first(s) for s in ranks]  # 40 steps per rank
    seen = set()
    for a, b in zip(*steps):
        assert len(a) == len(b) == 2
        assert len({keys[i] for i in a + b}) == 1  # the step's 4 items share one bucket
        assert len(set(a + b)) == 4 or keys[a[0]] == (5, 64, 96)  # repeats only where a bucket is too small
        seen |= set(a) | set(b)
    assert seen == set(range(len(keys)))
    groups = [g for _, g in zip(range(200), ranks[0].global_batches())]
    assert all(len(g) == 4 for g in groups)  # no step over- or under-filled
    assert first(BucketBatchSampler(keys, batch_size=2, rank=0, world_size=2, seed=3)) == steps[0]
    assert first(BucketBatchSampler(keys, batch_size=2, rank=0, world_size=2, seed=4)) != steps[0]
    assert len(ranks[0]) == 10


@pytest.mark.parametrize("model, sizes, frames, message", [
    ("cogvideox_2b", [(48, 48)], [9], "fits only its own resolution"),
    ("cogvideox_5b_i2v", [(48, 48)], [9], "fits only its own resolution"),
    ("cogvideox_5b", [(128, 96)], [9], "exceeds the model's position grid (64x96)"),
    ("cogvideox_5b", [(56, 96)], [9], "not a multiple of 16"),
    ("cogvideox_5b", [(64, 96)], [13], "13 training frames exceed the model's 3 latent frames"),
    ("cogvideox1.5_5b", [(32, 32)], [9], "3 latent frames, not a multiple of the temporal patch 2"),
])
def test_sizes_the_position_grid_cannot_place_are_refused(model, sizes, frames, message):
    from omegaconf import OmegaConf

    config = OmegaConf.load(os.path.join(TINY, f"{model}.yaml")).model
    with pytest.raises(UserError) as err:
        check_fits_model(config, sizes, frames)
    assert message in str(err.value)
    check_fits_model(config, [(16 * (config.network_config.params.latent_height // 2),
                               16 * (config.network_config.params.latent_width // 2))], [5 if "1.5" in model else 9])


def test_finetune_cli_refuses_resolution_buckets_for_the_2b_before_loading(bucket_data, tmp_path):
    extra = tmp_path / "buckets.yaml"
    extra.write_text("data:\n  params:\n    buckets:\n      video_sizes: [[64, 96], [48, 48]]\n")
    out = subprocess.run([sys.executable, "-m", "sat_cogvideo.train_video", "--base",
                          os.path.join(TINY, "cogvideox_2b_lora.yaml"), os.path.join(TINY, "sft.yaml"), str(extra),
                          "--train-data", bucket_data, "--load", str(tmp_path)],
                         cwd=tmp_path, env=clean_env(PYTHONPATH=ROOT), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith("error: training size 48x48 differs from the model's 64x96")
    assert "Traceback" not in out.stderr


# ------------------------------------------------------------------------------------------------- training


def train_buckets(demo, data, tmp_path, name, run, *extra):
    """A 4-iteration tiny 5B LoRA run (saves at 2 and 4) into ``tmp_path/name``; the log, the save folder and the
    batch shapes the engine saw in this process (``run`` names the record)."""
    cfg = tmp_path / "buckets.yaml"
    cfg.write_text("data:\n  params:\n    buckets:\n      video_sizes: [[64, 96], [48, 48]]\n"
                   "      num_frames: [5, 9]\ndeepspeed:\n  train_micro_batch_size_per_gpu: 2\n")
    save, shapes = tmp_path / name, tmp_path / f"{run}_shapes.jsonl"
    argv = ["--base", os.path.join(TINY, "cogvideox_5b_lora.yaml"), os.path.join(TINY, "sft.yaml"), str(cfg),
            "--load", demo["cogvideox_5b"], "--train-data", data, "--save", save, "--train-iters", "4",
            "--save-interval", "2", "--seed", "5", "--lr", "0.05", *extra]
    out = run_train(demo["folder"], argv, SAT_COGVIDEO_FINAL_STATE=tmp_path / f"{run}.pt",
                    SAT_COGVIDEO_BATCH_SHAPES=shapes)
    return out.stdout + out.stderr, save, [tuple(json.loads(line)) for line in open(shapes)]


@pytest.mark.slow  # four tiny 5B LoRA runs with mp4 decoding (about 1.5 min on 2 cores)
def test_bucketed_run_trains_resumes_bit_exactly_and_equals_its_cached_run(demo_paths, bucket_data, tmp_path):
    demo = demo_paths
    _, _, shapes = train_buckets(demo, bucket_data, tmp_path, "a", "a")
    # every batch: 2 videos of one bucket ([B, F, C, H, W] pixels); all four buckets within 4 steps is luck of
    # seed 5, so only both sizes and both lengths are asserted
    assert len(shapes) == 4 and all(s[0] == 2 for s in shapes)
    assert {s[1] for s in shapes} == {5, 9} and {s[3:] for s in shapes} == {(64, 96), (48, 48)}
    train_buckets(demo, bucket_data, tmp_path, "b", "killed", "--exit-interval", "3")  # dies between the saves
    log, b_save, resumed = train_buckets(demo, bucket_data, tmp_path, "b", "b", "--resume")
    assert f"resuming {run_folder(b_save)} at iteration 2" in log
    assert resumed == shapes[2:]  # the batches the killed run had not reached
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    # on a latent cache (filled by this run: one entry per video at its bucket's size and length) the batches and
    # the trained weights are those of the run on the fly
    log, _, cached = train_buckets(demo, bucket_data, tmp_path, "c", "c", "--cache-latents", tmp_path / "cache")
    assert "0 of 8 videos found, 16 entries written by rank 0" in log, log[-3000:]
    # cached batches hold posterior moments [B, T latents, 32, h, w] in place of pixels [B, F, 3, H, W]
    assert cached == [(b, (f - 1) // 4 + 1, 32, h // 8, w // 8) for b, f, _, h, w in shapes]
    c = torch.load(tmp_path / "c.pt")
    dit = [k for k in a if k.startswith("model.diffusion_model.")]
    # not bit for bit: on the fly the VAE encodes the batch's 2 videos together, the cache one at a time, and the
    # batched convolutions round differently (measured: 3e-6 on LoRA factors of 1e-2 after 4 steps; at batch 1
    # the runs are bit-identical, test_finetune_scale.py)
    assert dit
    for k in dit:
        torch.testing.assert_close(c[k], a[k], rtol=1e-3, atol=2e-5, msg=k)
