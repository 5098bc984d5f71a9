"""Finetuning at scale, end to end (real ``python -m sat_cogvideo.train_video`` runs of the tiny CogVideoX-2B LoRA):
a run on a complete latent cache (VAE and T5 never built) ends with the weights of the on-the-fly run; validation
videos, their previews and the loss curve appear at the right iterations; the EMA checkpoint holds the EMA of the
trained weights and loads for sampling.  All slow (each run starts DeepSpeed and SAT: 20-60 s on 2 cores)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from helpers import ROOT, run_folder, run_train
from sat_cogvideo.checkpoint import load_torch_file

TINY = os.path.join(ROOT, "configs", "tiny")
LORA = os.path.join(TINY, "cogvideox_2b_lora.yaml")
SFT = os.path.join(TINY, "sft.yaml")


@pytest.fixture(scope="module")
def demo(demo_paths):
    from sat_cogvideo.demo import build_demo_dataset

    build_demo_dataset(demo_paths["folder"])
    return demo_paths["folder"]


def lora_b(state):
    return {k: v for k, v in state.items() if ".matrix_B." in k}


@pytest.mark.slow  # two training runs (about 2-3 min on 2 cores)
def test_cached_run_equals_on_the_fly_run_with_validation_curve_and_ema(demo, tmp_path, monkeypatch):
    """Run A on the fly with validation prompts (eval_interval 2 of 3 iterations), the loss curve and --save-ema;
    run B with --cache-latents (empty: it encodes, then trains on the cache), without them: same final weights, bit
    for bit (validation draws from its own RNG, so it does not change training)."""
    monkeypatch.setenv("SAT_COGVIDEO_DEMO", demo)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\na blue cube\n")
    common = ["--base", LORA, SFT, "--train-iters", "3", "--save-interval", "1", "--seed", "6", "--lr", "0.05",
              "--log-interval", "1"]
    a_save, b_save, cache = tmp_path / "a", tmp_path / "b", tmp_path / "cache"
    out = run_train(demo, common + ["--save", a_save, "--validation-prompts", prompts, "--eval-interval", "2",
                                    "--validation-steps", "2", "--save-ema"],
                    SAT_COGVIDEO_FINAL_STATE=tmp_path / "a.pt")
    log_a = out.stdout + out.stderr
    # run B fills the empty cache before training (building the VAE and T5 draws random numbers: the RNG is
    # restored, so the LoRA factors start as in A), then trains on it; a complete cache builds nothing:
    # test_finetune_cache.py
    out = run_train(demo, common + ["--save", b_save, "--cache-latents", cache],
                    SAT_COGVIDEO_FINAL_STATE=tmp_path / "b.pt")
    log_b = out.stdout + out.stderr
    assert "0 of 2 videos found, 4 entries written by rank 0; built model.first_stage_config" in log_b, log_b[-3000:]
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    dit = [k for k in a if k.startswith("model.diffusion_model.")]
    assert dit and [k for k in dit if not torch.equal(a[k], b[k])] == []
    assert lora_b(a) and all(v.abs().max() > 0 for v in lora_b(a).values())  # it trained

    run = run_folder(a_save)
    # validation at iteration 2 only: 2 videos with previews
    assert sorted(os.listdir(os.path.join(run, "validation"))) == ["000002"]
    val = os.path.join(run, "validation", "000002")
    assert sorted(os.listdir(val)) == ["00.mp4", "00.png", "01.mp4", "01.png", "prompts.txt"]
    from helpers import read_frames

    frames = read_frames(os.path.join(val, "00.mp4"))
    assert frames.shape == (9, 64, 96, 3)
    assert "validation at iteration 2: 2 video(s)" in log_a
    # the curve: one point per iteration, the losses SAT logged
    history = json.load(open(os.path.join(run, "loss_history.json")))
    assert [p[0] for p in history] == [1, 2, 3]
    logged = [float(line.split("total loss ")[1].split(" ")[0]) for line in log_a.splitlines() if "total loss" in line]
    assert [p[1] for p in history] == pytest.approx(logged, rel=1e-5)
    from PIL import Image

    assert Image.open(os.path.join(run, "loss_curve.png")).size == (640, 360)
    assert_ema_checkpoints(run, demo, tmp_path)


def assert_ema_checkpoints(run, demo, tmp_path):
    """EMA of EmaAdamW: shadow_1 = d1 p0 + (1 - d1) p1 with d1 = 2/11 (p0 of the LoRA B factors is 0), then
    shadow_t = d_t shadow_{t-1} + (1 - d_t) p_t with d_t = (1 + t) / (10 + t)."""
    assert open(os.path.join(run, "latest")).read().strip() == "3"  # latest names the training weights
    ema = {t: load_torch_file(os.path.join(run, f"{t}-ema", "mp_rank_00_model_states.pt"))["module"]
           for t in (1, 2, 3)}
    trained = {t: load_torch_file(os.path.join(run, str(t), "mp_rank_00_model_states.pt"))["module"] for t in (1, 2, 3)}
    assert ema[3].keys() == trained[3].keys()
    shadow = {k: torch.zeros_like(v) for k, v in lora_b(trained[1]).items()}
    for t in (1, 2, 3):
        d = (1 + t) / (10 + t)
        shadow = {k: d * shadow[k] + (1 - d) * trained[t][k] for k in shadow}
        for k in shadow:
            torch.testing.assert_close(ema[t][k], shadow[k], rtol=1e-5, atol=1e-7)
            assert not torch.equal(ema[t][k], trained[t][k])
    frozen = [k for k in trained[3] if ".matrix_" not in k]
    assert frozen and all(torch.equal(ema[3][k], trained[3][k]) for k in frozen)
    # the EMA folder loads as a SAT checkpoint (strictly, through the same loader as --load)
    from helpers import make_engine
    from sat_cogvideo.checkpoint import checkpoint_file
    from sat_cogvideo.train_video import _read_checkpoint, load_dit_weights

    engine = make_engine("cogvideox_2b_lora", {}, load=False)
    folder = os.path.join(run, "3-ema")
    load_dit_weights(engine, _read_checkpoint(str(checkpoint_file(folder))), source=folder)
    sd = engine.state_dict()
    assert all(torch.equal(sd[k], ema[3][k]) for k in shadow)


# ------------------------------------------------------------------------------------------------- ZeRO-3

FULL = os.path.join(TINY, "cogvideox_2b.yaml")
ZERO3 = os.path.join(ROOT, "configs", "sft_zero3.yaml")


def same_tensors(a, b, where="") -> list:
    """Paths at which two nested checkpoint structures differ (tensors compared bit for bit)."""
    if isinstance(a, torch.Tensor):
        return [] if isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b) else [where]
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return [where]
        return [d for k in a for d in same_tensors(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return [where]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in same_tensors(x, y, f"{where}[{i}]")]
    return []


@pytest.mark.slow  # one training run (about 30 s on 2 cores)
def test_zero2_full_finetune_ema_covers_every_parameter_group(demo, tmp_path, monkeypatch):
    """A ZeRO-2 full finetune has two parameter groups (weights; biases and norms without weight decay).  DeepSpeed
    links each parameter to its optimizer state once, after the first group's first step, when the second group
    has none yet; --save-ema still writes the EMA of both groups.  shadow_1 = d p0 + (1 - d) p1 with
    d = (1 + k) / (10 + k), k counting step() calls: DeepSpeed steps the groups one after the other, so the weights
    see k = 1 (d = 2/11) and the biases and norms k = 2 (d = 3/12), as with the original's FusedEmaAdam."""
    monkeypatch.setenv("SAT_COGVIDEO_DEMO", demo)
    save = tmp_path / "z2"
    run_train(demo, ["--base", FULL, SFT, "--train-iters", "1", "--save-interval", "1", "--seed", "9", "--lr", "0.01",
                     "--save-ema", "--save", save])
    run = run_folder(save)
    ema = load_torch_file(os.path.join(run, "1-ema", "mp_rank_00_model_states.pt"))["module"]
    trained = load_torch_file(os.path.join(run, "1", "mp_rank_00_model_states.pt"))["module"]
    base = load_torch_file(os.path.join(demo, "cogvideox_2b", "transformer", "1", "mp_rank_00_model_states.pt"))
    base = base["module"]
    changed = [k for k in base if k in trained and not torch.equal(trained[k], base[k])]
    no_decay = [k for k in changed if k.endswith(".bias") or "norm" in k]
    weights = [k for k in changed if k not in no_decay]
    assert len(no_decay) > 10 and len(weights) > 10
    for keys, d in ((weights, 2 / 11), (no_decay, 3 / 12)):
        for k in keys:
            torch.testing.assert_close(ema[k], d * base[k] + (1 - d) * trained[k], rtol=1e-5, atol=1e-7)


@pytest.mark.slow  # three 2-process training runs (about 3-4 min on 2 cores)
def test_zero3_two_processes_train_and_resume_bit_exactly(demo, tmp_path, monkeypatch):
    """Full finetuning with configs/sft_zero3.yaml on 2 processes (gloo): the run trains the whole DiT, its checkpoint
    holds the gathered DiT under SAT's file name, and a run killed after the save at 2 and resumed ends with the
    model states and every rank's ZeRO-3 optimizer partition of the uninterrupted run."""
    import glob

    monkeypatch.setenv("SAT_COGVIDEO_DEMO", demo)
    common = ["--base", FULL, SFT, ZERO3, "--train-iters", "3", "--save-interval", "2", "--seed", "9", "--lr", "0.01",
              "--save-ema"]
    a_save, b_save = tmp_path / "a", tmp_path / "b"
    run_train(demo, common + ["--save", a_save], nproc=2)
    run_train(demo, common + ["--save", b_save, "--exit-interval", "3"], nproc=2)
    b_run = run_folder(b_save)
    assert open(os.path.join(b_run, "latest")).read().strip() == "2"
    out = run_train(demo, common + ["--save", b_save, "--resume"], nproc=2)
    assert f"resuming {b_run} at iteration 2" in out.stdout + out.stderr
    a_run = run_folder(a_save)
    a_sd = load_torch_file(os.path.join(a_run, "3", "mp_rank_00_model_states.pt"))["module"]
    b_sd = load_torch_file(os.path.join(b_run, "3", "mp_rank_00_model_states.pt"))["module"]
    base = load_torch_file(os.path.join(demo, "cogvideox_2b", "transformer", "1", "mp_rank_00_model_states.pt"))
    base = base["module"]
    dit_keys = {k for k in base if k.startswith("model.diffusion_model.")}
    assert dit_keys <= a_sd.keys() and all(k.startswith("model.diffusion_model.") for k in a_sd)  # DiT, gathered
    assert all(a_sd[k].shape == base[k].shape for k in dit_keys)
    changed = [k for k in base if k in a_sd and not torch.equal(a_sd[k], base[k])]
    assert len(changed) >= 0.9 * len(a_sd)
    assert same_tensors(a_sd, b_sd) == []
    shards = [sorted(glob.glob(os.path.join(r, "3", "zero_pp_rank_*_optim_states.pt"))) for r in (a_run, b_run)]
    assert len(shards[0]) == len(shards[1]) == 2
    for fa, fb in zip(*shards):
        sa, sb = load_torch_file(fa)["optimizer_state_dict"], load_torch_file(fb)["optimizer_state_dict"]
        assert same_tensors(sa, sb) == [], fa
    ema_a = load_torch_file(os.path.join(a_run, "3-ema", "mp_rank_00_model_states.pt"))["module"]
    ema_b = load_torch_file(os.path.join(b_run, "3-ema", "mp_rank_00_model_states.pt"))["module"]
    assert ema_a.keys() == a_sd.keys() and same_tensors(ema_a, ema_b) == []
    assert not torch.equal(ema_a[changed[0]], a_sd[changed[0]])


@pytest.mark.slow  # two 2-process training runs (about 1.5 min on 2 cores)
def test_zero3_offload_moves_states_not_numbers(demo, tmp_path, monkeypatch):
    """configs/sft_zero3_offload.yaml (optimizer and parameters offloaded to the CPU, the EMA optimizer kept) trains
    to the weights of configs/sft_zero3.yaml: offloading changes where the states live, not the arithmetic."""
    monkeypatch.setenv("SAT_COGVIDEO_DEMO", demo)
    common = ["--base", FULL, SFT, "--train-iters", "2", "--save-interval", "2", "--seed", "9", "--lr", "0.01"]
    offload = os.path.join(ROOT, "configs", "sft_zero3_offload.yaml")
    states = {}
    for name, config in (("plain", ZERO3), ("offload", offload)):
        out = run_train(demo, common[:3] + [config] + common[3:] + ["--save", tmp_path / name], nproc=2)
        run = run_folder(tmp_path / name)
        states[name] = load_torch_file(os.path.join(run, "2", "mp_rank_00_model_states.pt"))["module"]
        if name == "offload":
            assert "offload_optimizer" in (out.stdout + out.stderr)  # DeepSpeed printed the offload config it ran
    base = load_torch_file(os.path.join(demo, "cogvideox_2b", "transformer", "1", "mp_rank_00_model_states.pt"))
    changed = [k for k in base["module"] if k in states["plain"] and not torch.equal(states["plain"][k],
                                                                                         base["module"][k])]
    assert len(changed) >= 0.9 * len(states["plain"])
    assert same_tensors(states["plain"], states["offload"]) == []
