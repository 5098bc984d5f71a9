"""Finetuning through SAT's training loop and DeepSpeed: LoRA and full SFT on 2 processes (gloo, ZeRO-2), resume,
checkpoint contents, the CPU optimizer's update rule, and the errors raised before training starts.

The runs use the tiny CogVideoX-2B of the demo cache (hidden 64, 2 layers, 64x96 pixels, 9 frames) and a generated
2-video dataset; each run is a real ``python -m sat_cogvideo.train_video`` (``torchrun`` for 2 processes).
"""
from __future__ import annotations

import glob
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import run_folder, run_train, train_env
from sat_cogvideo.checkpoint import load_torch_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
LORA = os.path.join(ROOT, "configs", "tiny", "cogvideox_2b_lora.yaml")
FULL = os.path.join(ROOT, "configs", "tiny", "cogvideox_2b.yaml")
SFT = os.path.join(ROOT, "configs", "tiny", "sft.yaml")
PREFIX = "model.diffusion_model."


# ------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The tiny demo model (cached across runs when SAT_COGVIDEO_DEMO is set) and a generated 2-video dataset."""
    from sat_cogvideo.demo import prepare_demo

    before = os.environ.get("SAT_COGVIDEO_DEMO")
    folder = before or str(tmp_path_factory.mktemp("demo"))
    try:
        prepare_demo(folder)  # demo_dir() exports SAT_COGVIDEO_DEMO; keep the session's environment as it was
    finally:
        if before is None:
            os.environ.pop("SAT_COGVIDEO_DEMO", None)
        else:
            os.environ["SAT_COGVIDEO_DEMO"] = before
    return folder


@pytest.fixture(autouse=True)
def demo_env(demo, monkeypatch):
    """The tiny configs find the demo folder through $SAT_COGVIDEO_DEMO (restored after each test)."""
    monkeypatch.setenv("SAT_COGVIDEO_DEMO", demo)


env_for = train_env
train = run_train  # asserts success; runs in the folder above --save (SAT writes TensorBoard logs to ./runs)


def engine_args(demo, base, extra=()):
    from sat_cogvideo.arguments import get_args

    return get_args(["--base", base, SFT, *extra])


def fresh_engine(demo, base):
    """The engine as training starts: built from the config, base DiT checkpoint loaded."""
    from sat_cogvideo.diffusion_video import SATVideoDiffusionEngine
    from sat_cogvideo.train_video import _read_checkpoint, load_dit_weights
    from sat_cogvideo.checkpoint import checkpoint_file

    args = engine_args(demo, base)
    engine = SATVideoDiffusionEngine(args)
    load_dit_weights(engine, _read_checkpoint(str(checkpoint_file(args.load))), source=args.load)
    return engine.eval()


@torch.no_grad()
def fixed_loss(engine, batch, seeds=(11, 12, 13, 14)):
    """Mean training loss over fixed noise/timestep draws (the same draws for every model compared)."""
    values = []
    for s in seeds:
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)
        loss, _ = engine.shared_step(dict(batch))
        values.append(float(loss))
    return float(np.mean(values))


def demo_batch(demo):
    from sat_cogvideo.data_video import SFTDataset

    ds = SFTDataset(os.path.join(demo, "dataset"), video_size=[64, 96], fps=8, max_num_frames=9, skip_frms_num=0)
    return torch.utils.data.default_collate([ds[0], ds[1]])


# ------------------------------------------------------------------------------------------------- optimizer


def reference_ema_adamw(p, grads, lr, b1, b2, eps, wd, ema, adam_w=True):
    """The update rule of sat.ops.FusedEmaAdam written out with Python floats (spec finetune.md §9)."""
    m = v = 0.0
    shadow = p
    for t, g in enumerate(grads, start=1):
        d = min(ema, (1 + t) / (10 + t))
        if not adam_w:
            g = g + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        update = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)) ** 0.5 + eps)
        if adam_w:
            update += wd * p
        p = p - lr * update
        shadow = d * shadow + (1 - d) * p
    return p, shadow


@pytest.mark.parametrize("adam_w", [True, False])
def test_ema_adamw_matches_fused_ema_adam_rule(adam_w):
    from sat_cogvideo.train_video import EmaAdamW

    grads = [0.3, -1.2, 0.7, 2.0]
    p = torch.nn.Parameter(torch.tensor([0.5], dtype=torch.float64))
    opt = EmaAdamW([p], lr=0.1, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.01, adam_w_mode=adam_w, ema_decay=0.99)
    for g in grads:
        p.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
    want_p, want_s = reference_ema_adamw(0.5, grads, 0.1, 0.9, 0.95, 1e-8, 0.01, 0.99, adam_w)
    assert p.detach().item() == pytest.approx(want_p, rel=1e-6)
    assert float(opt.state[p]["shadow"]) == pytest.approx(want_s, rel=1e-6)
    # num_updates (the EMA warm-up counter) survives a state_dict round trip
    q = torch.nn.Parameter(torch.tensor([0.5], dtype=torch.float64))
    opt2 = EmaAdamW([q], lr=0.1)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.num_updates == 4 and torch.equal(opt2.state[q]["exp_avg"], opt.state[p]["exp_avg"])


# ------------------------------------------------------------------------------------------------- 2 processes


@pytest.fixture(scope="module")
def lora_run(demo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora2")
    save = str(tmp / "ckpts")
    dump = str(tmp / "final.pt")
    out = train(demo, ["--base", LORA, SFT, "--save", save, "--train-iters", "8", "--save-interval", "8",
                       "--lr", "2.0", "--seed", "3"], nproc=2, SAT_COGVIDEO_FINAL_STATE=dump)
    return dict(save=save, run=run_folder(save), dump=dump, log=out.stdout + out.stderr)


def test_lora_two_processes_zero2_lowers_loss_and_trains_only_lora(demo, lora_run, dist_cpu):
    log = lora_run["log"]
    assert "Using optimizer sat_cogvideo.train_video.EmaAdamW (sat.ops.FusedEmaAdam)" in log
    assert "iteration        8/       8" in log
    final = torch.load(lora_run["dump"], map_location="cpu")
    base = fresh_engine(demo, LORA)
    base_sd = base.state_dict()
    assert final.keys() == base_sd.keys()
    lora_keys = [k for k in final if ".matrix_A." in k or ".matrix_B." in k]
    assert len(lora_keys) == 16
    # every non-LoRA tensor (DiT base weights, VAE, T5) is bit-identical to the start
    changed = [k for k in final if k not in lora_keys and not torch.equal(final[k], base_sd[k])]
    assert changed == []
    # the B factors start at zero and were trained on both ranks' data
    assert all(final[k].abs().max() > 0 for k in lora_keys if ".matrix_B." in k)
    # overfitting the two videos lowers the loss (same noise and timesteps for both models)
    batch = demo_batch(demo)
    before = fixed_loss(base, batch)
    trained = fresh_engine(demo, LORA)
    trained.load_state_dict(final, strict=True)
    after = fixed_loss(trained, batch)
    assert after < 0.97 * before, (before, after)  # 4.89 -> 4.67 when measured


def test_resume_needs_the_same_number_of_processes(lora_run, demo, dist_cpu):
    from sat_cogvideo.errors import UserError
    from sat_cogvideo.train_video import run

    with pytest.raises(UserError, match=r"trained with 2 processes; resume it with the same number \(NPROC=2\), not 1"):
        run(["--base", LORA, SFT, "--resume", lora_run["run"], "--train-iters", "10"])


def test_checkpoint_layout_and_contents(lora_run):
    run = lora_run["run"]
    assert os.path.basename(run).startswith("tiny-lora-")
    assert open(os.path.join(run, "latest")).read().strip() == "8"
    assert not glob.glob(os.path.join(run, ".partial-*")) and not glob.glob(os.path.join(run, ".old-*"))
    files = sorted(os.listdir(os.path.join(run, "8")))
    assert files == ["mp_rank_00_model_states.pt", "rng_state_rank00.pt", "rng_state_rank01.pt",
                     "sat_cogvideo_resume.json", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                     "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    sd = load_torch_file(os.path.join(run, "8", "mp_rank_00_model_states.pt"))  # weights-only: no flag needed
    module = sd["module"]
    assert module and all(k.startswith(PREFIX) for k in module)  # no VAE, no T5
    assert any(".matrix_B." in k for k in module) and any(".original.weight" in k for k in module)
    assert sd["iteration"] == 8 and sd[ "sat_cogvideo_resume"]["dp_world_size"] == 2
    assert os.path.isfile(os.path.join(run, "training_config.yaml"))
    resume = json.load(open(os.path.join(run, "8", "sat_cogvideo_resume.json")))
    assert resume["iteration"] == 8 and resume["lr_scheduler"]["init_step"] == 0


def test_lora_checkpoint_for_inference_and_export(lora_run, demo, dist_cpu, tmp_path):
    """The LoRA run folder loads with the *_lora.yaml config; export gives a diffusers LoRA file."""
    from sat_cogvideo.checkpoint import load_state_dict_strict, read_state_dict
    from sgm.util import instantiate_from_config

    args = engine_args(demo, LORA)
    dit = instantiate_from_config(args.model_config.network_config)
    sd = read_state_dict(load_torch_file(os.path.join(lora_run["run"], "8", "mp_rank_00_model_states.pt")),
                         prefix=PREFIX)
    load_state_dict_strict(dit, sd, known_unused=dit.known_unused_keys())
    # the inference CLI's loader takes the run folder with the *_lora.yaml config, and refuses it without
    # lora_config (the original, with force_inference, would load it partially and sample garbage)
    from sat_cogvideo import sample_video
    from sat_cogvideo.diffusion_video import SATVideoDiffusionEngine
    from sat_cogvideo.errors import UserError

    sample_video.load_transformer_checkpoint(SATVideoDiffusionEngine(args), lora_run["run"])
    with pytest.raises(UserError, match=r"is a LoRA checkpoint .*matrix_A.* no lora_config"):
        sample_video.load_transformer_checkpoint(SATVideoDiffusionEngine(engine_args(demo, FULL)), lora_run["run"])
    out = subprocess.run([PY, os.path.join(ROOT, "tools", "export_sat_lora_weight.py"), "--sat_pt_path",
                          lora_run["run"], "--lora_save_directory", str(tmp_path), "--num_layers", "2"],
                         capture_output=True, text=True, cwd=ROOT, env=env_for(demo))
    assert out.returncode == 0, out.stderr
    assert "set_adapters([name], [0.25])" in out.stdout  # r 4, lora_alpha 1 from training_config.yaml
    assert os.path.isfile(tmp_path / "pytorch_lora_weights.safetensors")


def test_full_sft_two_processes_trains_transformer_only(demo, dist_cpu, tmp_path):
    save, dump = str(tmp_path / "ckpts"), str(tmp_path / "final.pt")
    train(demo, ["--base", FULL, SFT, "--save", save, "--train-iters", "1", "--save-interval", "1",
                 "--experiment-name", "tiny-full", "--lr", "0.02"], nproc=2, SAT_COGVIDEO_FINAL_STATE=dump)
    final = torch.load(dump, map_location="cpu")
    base = fresh_engine(demo, FULL).state_dict()
    dit = [k for k in final if k.startswith(PREFIX)]
    vae_t5 = [k for k in final if k.startswith(("first_stage_model.", "conditioner."))]
    assert vae_t5 and dit
    assert [k for k in vae_t5 if not torch.equal(final[k], base[k])] == []
    trained = [n for n, p in fresh_engine(demo, FULL).named_parameters() if n.startswith(PREFIX) and p.requires_grad]
    changed = [k for k in trained if not torch.equal(final[k], base[k])]
    assert len(changed) >= 0.9 * len(trained), (len(changed), len(trained))
    module = load_torch_file(os.path.join(run_folder(save), "1", "mp_rank_00_model_states.pt"))["module"]
    assert set(module) == {k for k in base if k.startswith(PREFIX)}  # the whole DiT, no VAE or T5


# ------------------------------------------------------------------------------------------------- resume


def test_killed_and_resumed_run_equals_uninterrupted_run(demo, tmp_path, dist_cpu):
    """Single process on CPU: bit-identical weights and optimizer state after 3 iterations, whether the run went
    straight through or was killed at iteration 3 (after the save at 2, before the final save) and resumed with
    --resume."""
    common = ["--base", LORA, SFT, "--train-iters", "3", "--save-interval", "2", "--seed", "7"]
    a_save, b_save = str(tmp_path / "a"), str(tmp_path / "b")
    train(demo, common + ["--save", a_save], SAT_COGVIDEO_FINAL_STATE=tmp_path / "a.pt")
    train(demo, common + ["--save", b_save, "--exit-interval", "3"])  # dies between saves
    b_run = run_folder(b_save)
    assert open(os.path.join(b_run, "latest")).read().strip() == "2"
    out = train(demo, common + ["--save", b_save, "--resume"], SAT_COGVIDEO_FINAL_STATE=tmp_path / "b.pt")
    assert f"resuming {b_run} at iteration 2" in out.stdout + out.stderr
    assert run_folder(b_save) == b_run and open(os.path.join(b_run, "latest")).read().strip() == "3"
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert_same_optimizer_state(optimizer_shards(run_folder(a_save), 3), optimizer_shards(b_run, 3), updates=3)
    # resuming the finished run does nothing
    from sat_cogvideo.train_video import run

    assert run(common + ["--save", b_save, "--resume"]) is None
    assert run(common + ["--load", b_run]) is None  # load: pointing at our run folder resumes it too


# ------------------------------------------------------------------------------------------------- errors


def run_inprocess(argv):
    from sat_cogvideo.train_video import run

    return run(argv)


def test_errors_before_training(demo, tmp_path, dist_cpu):
    from sat_cogvideo.errors import UserError

    empty = tmp_path / "empty"
    (empty / "labels").mkdir(parents=True)
    (empty / "labels" / "1.txt").write_text("a caption without video")
    with pytest.raises(UserError, match=r"has no usable video/caption pair"):
        run_inprocess(["--base", LORA, SFT, "--train-data", str(empty), "--save", str(tmp_path / "s")])
    assert not (tmp_path / "s").exists()
    with pytest.raises(UserError, match="train_data/valid_data folder .*missing does not exist"):
        run_inprocess(["--base", LORA, SFT, "--train-data", str(tmp_path / "missing")])
    with pytest.raises(UserError, match="fp16 training needs CUDA"):
        run_inprocess(["--base", LORA, SFT, "--fp16", "--device", "cpu", "--save", str(tmp_path / "s")])
    with pytest.raises(UserError, match="no data: section"):
        run_inprocess(["--base", LORA])
    with pytest.raises(UserError, match="--resume: no resumable run tiny-lora-"):
        run_inprocess(["--base", LORA, SFT, "--save", str(tmp_path), "--resume"])
    with pytest.raises(UserError, match="not a run folder written by sat_cogvideo"):
        run_inprocess(["--base", LORA, SFT, "--resume", str(tmp_path)])


def test_original_finetune_checkpoint_with_vae_and_t5_keys_loads(demo, dist_cpu, tmp_path):
    """The original's finetune checkpoints hold VAE and T5 tensors and NumPy RNG state: the DiT part loads."""
    from sat_cogvideo.checkpoint import checkpoint_file, read_state_dict
    from sat_cogvideo.diffusion_video import SATVideoDiffusionEngine
    from sat_cogvideo.errors import UserError
    from sat_cogvideo.train_video import _read_checkpoint, load_dit_weights

    args = engine_args(demo, LORA)
    engine = SATVideoDiffusionEngine(args)
    base = read_state_dict(checkpoint_file(args.load))
    module = dict(base)
    for k, v in engine.state_dict().items():
        if k.startswith(("first_stage_model.", "conditioner.")):
            module[k] = torch.zeros_like(v)
    path = tmp_path / "orig" / "1000" / "mp_rank_00_model_states.pt"
    path.parent.mkdir(parents=True)
    torch.save({"module": module, "iteration": 1000, "np_rng_state": np.random.get_state()}, path)
    (tmp_path / "orig" / "latest").write_text("1000")
    load_dit_weights(engine, _read_checkpoint(str(tmp_path / "orig")), source="orig")
    sd = engine.state_dict()
    k = PREFIX + "transformer.layers.0.attention.dense.original.weight"
    assert torch.equal(sd[k], base[PREFIX + "transformer.layers.0.attention.dense.weight"])
    vae_key = next(k for k in sd if k.startswith("first_stage_model."))
    assert sd[vae_key].abs().max() > 0  # VAE weights come from 3d-vae.pt, not from the checkpoint's zeros
    module["bogus.weight"] = torch.zeros(1)
    with pytest.raises(UserError, match="neither the DiT .* bogus.weight"):
        load_dit_weights(engine, {"module": module}, source="x")


@pytest.mark.parametrize("lora", [True, False])
def test_checkpoint_activations_gives_the_same_gradients(dist_cpu, lora):
    """``transformer_args.checkpoint_activations`` (recompute each layer in backward) changes memory, not math."""
    from omegaconf import OmegaConf

    from helpers import randomize_
    from sgm.util import instantiate_from_config

    grads = []
    for ckpt in (False, True):
        cfg = OmegaConf.load(LORA if lora else FULL).model.network_config
        cfg.params.transformer_args.checkpoint_activations = ckpt
        dit = instantiate_from_config(cfg)
        randomize_(dit, seed=0)
        dit.mixins["pos_embed"].reset_table() if hasattr(dit.mixins["pos_embed"], "reset_table") else None
        dit.train()
        for n, p in dit.named_parameters():
            p.requires_grad_((".matrix_" in n) if lora else p.requires_grad)
        assert dit.transformer.checkpoint_activations is ckpt
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1, 3, 16, 8, 12, generator=g)
        ctx = torch.randn(1, 16, 32, generator=g)
        dit(x, torch.tensor([500.0]), ctx).pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in dit.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)


def optimizer_shards(run, tag):
    """The DeepSpeed optimizer state of every rank of a run at iteration ``tag``."""
    files = sorted(glob.glob(os.path.join(run, str(tag), "zero_pp_rank_*_mp_rank_00_optim_states.pt")))
    assert files
    return [load_torch_file(f)["optimizer_state_dict"] for f in files]


def assert_same_optimizer_state(a, b, updates):
    assert len(a) == len(b)
    for oa, ob in zip(a, b):
        for x, y in zip(oa["single_partition_of_fp32_groups"], ob["single_partition_of_fp32_groups"]):
            assert torch.equal(x, y)
        sa, sb = oa["base_optimizer_state"], ob["base_optimizer_state"]
        assert sa["num_updates"] == sb["num_updates"] == updates
        assert sa["state"].keys() == sb["state"].keys() and sa["state"]
        for i in sa["state"]:
            for key in ("exp_avg", "exp_avg_sq", "shadow"):
                assert torch.equal(sa["state"][i][key], sb["state"][i][key])


@pytest.mark.slow  # reason: three 2-process trainings (~60 s); the one-process resume test stays in the default run
def test_killed_and_resumed_two_process_run_equals_uninterrupted_run(demo, tmp_path):
    """2 processes, ZeRO-2: killed after the save at iteration 2 and resumed, the run ends with the weights and
    every rank's optimizer state of the uninterrupted run (a resume that silently retrained from scratch would not
    say "resuming", and would end at a different optimizer step count)."""
    common = ["--base", LORA, SFT, "--train-iters", "3", "--save-interval", "2", "--seed", "9", "--lr", "2.0"]
    a_save, b_save = str(tmp_path / "a"), str(tmp_path / "b")
    train(demo, common + ["--save", a_save], nproc=2, SAT_COGVIDEO_FINAL_STATE=tmp_path / "a.pt")
    train(demo, common + ["--save", b_save, "--exit-interval", "3"], nproc=2)
    b_run = run_folder(b_save)
    assert open(os.path.join(b_run, "latest")).read().strip() == "2"  # killed between the saves
    assert not os.path.isdir(os.path.join(b_run, "3"))
    out = train(demo, common + ["--save", b_save, "--resume"], nproc=2, SAT_COGVIDEO_FINAL_STATE=tmp_path / "b.pt")
    assert f"resuming {b_run} at iteration 2" in out.stdout + out.stderr
    assert run_folder(b_save) == b_run and open(os.path.join(b_run, "latest")).read().strip() == "3"
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert_same_optimizer_state(optimizer_shards(run_folder(a_save), 3), optimizer_shards(b_run, 3), updates=3)


# ------------------------------------------------------------------------------------------------- data parallel


SEEDED = os.path.join(ROOT, "tests", "train_seeded_per_sample.py")


@pytest.fixture(scope="module")
def per_sample_runs(demo, tmp_path_factory):
    """One iteration over the whole 2-video dataset, split three ways, with each sample's loss noise seeded from
    its caption (tests/train_seeded_per_sample.py): 2 processes × batch 1 (ZeRO-2 averages the ranks' gradients),
    1 process × batch 2, and 1 process × batch 1 × 2 gradient-accumulation steps."""
    tmp = tmp_path_factory.mktemp("per_sample")
    # uniform_sampling gives each data-parallel rank its own timestep range (by design, so a global batch covers
    # all noise levels): off here, so that a sample's timestep does not depend on its rank
    same_t = tmp / "same_timestep_range.yaml"
    same_t.write_text("model:\n  loss_fn_config:\n    params:\n      sigma_sampler_config:\n        params:\n"
                      "          uniform_sampling: false\n")
    common = ["--base", LORA, SFT, str(same_t), "--train-iters", "1", "--save-interval", "1", "--seed", "5", "--lr", "0.5"]
    runs = {}
    for name, nproc, extra in (("dp2", 2, ["--batch-size", "1"]), ("batch2", 1, ["--batch-size", "2"]),
                               ("accum2", 1, ["--batch-size", "1", "--gradient-accumulation-steps", "2"])):
        dump = tmp / f"{name}.pt"
        out = train(demo, common + extra + ["--save", str(tmp / name)], nproc=nproc, script=SEEDED,
                    SAT_COGVIDEO_FINAL_STATE=dump)
        samples = [line.split(": ", 1) for line in out.stdout.splitlines() if line.startswith("sample rank=")]
        runs[name] = {"state": torch.load(dump), "samples": samples, "run": run_folder(tmp / name)}
    return runs


def lora_factors(state):
    return {k: v for k, v in state.items() if ".matrix_A." in k or ".matrix_B." in k}


def test_two_processes_train_on_both_ranks_data(per_sample_runs):
    """2 processes × batch 1 give the weights of 1 process × batch 2: the update averages both ranks' gradients
    (with one rank's gradient only, or ranks updating their ZeRO partitions from their own data, they differ)."""
    dp, single = per_sample_runs["dp2"], per_sample_runs["batch2"]
    captions = {text for _, text in single["samples"]}
    assert len(captions) == 2  # the global batch holds both videos
    assert {rank for rank, _ in dp["samples"]} == {"sample rank=0", "sample rank=1"}
    assert {text for _, text in dp["samples"]} == captions  # each rank trained on its own video
    a, b = lora_factors(dp["state"]), lora_factors(single["state"])
    assert a.keys() == b.keys() and len(a) == 16
    assert all(a[k].abs().max() > 0 for k in a if ".matrix_B." in k)  # trained (the B factors start at zero)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)


def test_gradient_accumulation_equals_the_larger_batch(per_sample_runs):
    """1 process × batch 1 × 2 accumulation steps = 1 process × batch 2: one optimizer step on the mean gradient."""
    acc, single = per_sample_runs["accum2"], per_sample_runs["batch2"]
    assert len(acc["samples"]) == 2 and {t for _, t in acc["samples"]} == {t for _, t in single["samples"]}
    assert open(os.path.join(acc["run"], "latest")).read().strip() == "1"
    a, b = lora_factors(acc["state"]), lora_factors(single["state"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)
    (shard,) = optimizer_shards(acc["run"], 1)
    assert shard["base_optimizer_state"]["num_updates"] == 1  # one step, not two

