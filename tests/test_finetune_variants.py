"""Finetuning beyond the tiny 2B t2v float32 runs of test_train.py: one iteration of image-to-video (CogVideoX-5B-I2V
LoRA, with an evaluation step that samples latents) and one of CogVideoX1.5-I2V (LoRA, bf16: DeepSpeed's bf16
engine, autocast on CPU; with an evaluation step too).  (Gradient accumulation: test_train.py::test_gradient_accumulation_equals_the_larger_batch.)"""
from __future__ import annotations

import glob
import os

import pytest
import torch

from helpers import ROOT, run_folder, run_train
from sat_cogvideo.checkpoint import load_torch_file

TINY = os.path.join(ROOT, "configs", "tiny")
SFT = os.path.join(TINY, "sft.yaml")
PREFIX = "model.diffusion_model."


@pytest.fixture(scope="module")
def demo(demo_paths):
    from sat_cogvideo.demo import build_demo_dataset

    build_demo_dataset(demo_paths["folder"])
    return demo_paths


def trained(demo, model, tmp_path, *extra):
    """One iteration of ``model`` (a tiny *_lora config) from the demo's base checkpoint; the run folder, the final
    engine state and the log."""
    save, dump = tmp_path / "ckpts", tmp_path / "final.pt"
    out = run_train(demo["folder"], ["--base", os.path.join(TINY, f"{model}_lora.yaml"), SFT, *extra,
                                     "--load", demo[model], "--save", save, "--train-iters", "1",
                                     "--save-interval", "1", "--seed", "4", "--lr", "0.05"],
                    SAT_COGVIDEO_FINAL_STATE=dump)
    return run_folder(save), torch.load(dump), out.stdout + out.stderr


def evaluation(demo, tmp_path):
    """An evaluation step at iteration 1 (eval_interval <= train_iters) on the demo dataset; its sampling (the
    logged latents) in 2 steps instead of the config's 50."""
    steps = tmp_path / "eval_steps.yaml"
    steps.write_text("model:\n  sampler_config:\n    params:\n      num_steps: 2\n      guider_config:\n"
                     "        params:\n          num_steps: 2\n")
    return [str(steps), "--valid-data", os.path.join(demo["folder"], "dataset"), "--eval-interval", "1",
            "--eval-iters", "1"]


def lora_b(state):
    return {k: v for k, v in state.items() if ".matrix_B." in k}


def test_i2v_lora_iteration_with_evaluation(demo, tmp_path):
    """CogVideoX-5B-I2V: the first frame is encoded and concatenated to the noised latents (32 input channels);
    the LoRA trains; eval_interval 1 runs an evaluation step that samples and saves video latents."""
    run, state, log = trained(demo, "cogvideox_5b_i2v", tmp_path, *evaluation(demo, tmp_path))
    assert "iteration        1/       1" in log
    assert all(v.abs().max() > 0 for v in lora_b(state).values()) and lora_b(state)
    assert state[PREFIX + "mixins.patch_embed.proj.weight"].shape[1] == 32  # image latents concatenated
    assert "validation loss at iteration 1" in log, log[-3000:]
    latents = glob.glob(os.path.join(run, "video", "latents", "latents_gs-000001", "latent.pt"))
    assert latents, os.listdir(run)
    z = torch.load(latents[0])
    assert z.ndim == 5 and torch.isfinite(z).all()
    assert open(os.path.join(run, "latest")).read().strip() == "1"


def test_15_lora_iteration_in_bf16(demo, tmp_path):
    """CogVideoX1.5-I2V LoRA with ``bf16.enabled: true``: the model trains in bfloat16 (checkpoint tensors
    bfloat16, fp32 master weights in the optimizer), the LoRA factors move.  (The 1.5 T2V configs say
    ``latent_input: true``, as the original's: they train on pre-encoded latents, not on SFTDataset's videos.)"""
    bf16 = tmp_path / "bf16.yaml"
    # 5 frames: 2 latents, a multiple of the 1.5 temporal patch 2 (9 frames give 3 and are refused); 32x32 pixels
    # (bfloat16 convolutions are slow on CPUs without bf16 instructions)
    bf16.write_text("deepspeed:\n  bf16:\n    enabled: true\ndata:\n  params:\n    max_num_frames: 5\n"
                    "    video_size: [32, 32]\n")
    run, state, log = trained(demo, "cogvideox1.5_5b_i2v", tmp_path, str(bf16), *evaluation(demo, tmp_path))
    assert "iteration        1/       1" in log
    assert "validation loss at iteration 1" in log
    assert glob.glob(os.path.join(run, "video", "latents", "latents_gs-000001", "latent.pt"))
    b = lora_b(state)
    assert b and all(v.abs().max() > 0 for v in b.values())
    module = load_torch_file(os.path.join(run, "1", "mp_rank_00_model_states.pt"))["module"]
    assert {v.dtype for k, v in module.items() if k.startswith(PREFIX) and v.is_floating_point()} == {torch.bfloat16}
    (shard,) = glob.glob(os.path.join(run, "1", "*zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    shard = load_torch_file(shard)["optimizer_state_dict"]
    assert {t.dtype for t in shard["single_partition_of_fp32_groups"]} == {torch.float32}
