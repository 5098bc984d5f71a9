"""Validation videos and the loss curve (sat_cogvideo.validation), in-process on the tiny CogVideoX-2B: the files,
their size and length, the training RNG left as it was, the steps at which the hook samples
and redraws, and a resumed history.  (The same inside a real training run: test_finetune_scale.py, slow.)"""
from __future__ import annotations

import json
import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import make_engine, read_frames


def validator_args(tmp_path, prompts=("a red ball", "a blue cube"), interval=2):
    from omegaconf import OmegaConf

    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n\n")
    data = OmegaConf.create({"params": {"video_size": [64, 96], "max_num_frames": 9, "fps": 8}})
    return SimpleNamespace(validation_prompts=str(path), data_config=data, validation_steps=2, validation_seed=3,
                           eval_interval=interval)


def rng_states():
    return torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()


def test_validation_videos_previews_and_untouched_rng(demo_paths, tmp_path, dist_cpu):
    from sat_cogvideo.validation import Validator

    engine = make_engine("cogvideox_2b", demo_paths, num_steps=50).train()
    v = Validator(validator_args(tmp_path))
    assert v.prompts == ["a red ball", "a blue cube"] and v.due(4) and not v.due(3)
    torch.manual_seed(5)
    before = rng_states()
    paths = v.run(engine, str(tmp_path / "run"), 4)
    after = rng_states()
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and np.array_equal(before[2], after[2])
    assert engine.training  # back in training mode
    assert engine.sampler.num_steps == 50  # --validation-steps only for the validation
    out = tmp_path / "run" / "validation" / "000004"
    assert sorted(os.listdir(out)) == ["00.mp4", "00.png", "01.mp4", "01.png", "prompts.txt"]
    assert sorted(paths) == sorted(str(out / n) for n in ("00.mp4", "00.png", "01.mp4", "01.png"))
    frames = read_frames(out / "00.mp4")
    assert frames.shape == (9, 64, 96, 3)
    from PIL import Image

    assert Image.open(out / "00.png").size[1] == 64
    # one seed per prompt: the two videos differ
    assert np.abs(read_frames(out / "00.mp4").astype(float) - read_frames(out / "01.mp4").astype(float)).max() > 0


def test_hook_samples_and_redraws_at_the_right_steps(tmp_path, dist_cpu, monkeypatch):
    from sat_cogvideo.train_video import RunState
    from sat_cogvideo.validation import Validator, after_train_step

    runs = []
    v = Validator(validator_args(tmp_path, interval=2))
    monkeypatch.setattr(v, "run", lambda model, folder, it: runs.append(it) or [])
    state = RunState(validator=v)
    args = SimpleNamespace(save=str(tmp_path / "run"), log_interval=2, iteration=0)
    os.makedirs(args.save)
    for it, loss in enumerate([4.0, 3.0, 2.5, 2.0, 1.5]):
        args.iteration = it
        after_train_step(state, None, args, torch.tensor(loss))
        curve = os.path.join(args.save, "loss_curve.png")
        assert os.path.isfile(curve) == (it + 1 >= 2)  # first drawn at the first log interval
    assert runs == [2, 4]
    history = json.load(open(os.path.join(args.save, "loss_history.json")))
    assert history == [[1, 4.0], [2, 3.0], [3, 2.5], [4, 2.0]]  # as of the last log interval (4)
    from PIL import Image

    img = np.asarray(Image.open(os.path.join(args.save, "loss_curve.png")))
    blue = (img[..., 2] > 150) & (img[..., 0] < 80)
    assert blue.sum() > 50  # the line is drawn
    cols = np.nonzero(blue.any(axis=0))[0]
    rows_left, rows_right = np.nonzero(blue[:, cols[0]])[0], np.nonzero(blue[:, cols[-1]])[0]
    assert rows_left.mean() < rows_right.mean()  # falling loss: high on the left, low on the right
    # a resumed run from iteration 3 keeps the history up to 3 and continues it
    resumed = RunState(resume={"iteration": 3})
    args.iteration = 3
    after_train_step(resumed, None, args, torch.tensor(1.0))
    resumed.curve.flush()
    assert json.load(open(os.path.join(args.save, "loss_history.json"))) == [[1, 4.0], [2, 3.0], [3, 2.5], [4, 1.0]]


def test_prompt_file_errors(tmp_path):
    from sat_cogvideo.errors import UserError
    from sat_cogvideo.validation import read_prompts

    with pytest.raises(UserError, match="no such file"):
        read_prompts(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(UserError, match="holds no prompt"):
        read_prompts(str(tmp_path / "empty.txt"))
