"""The converter and LoRA-tool flags no other test reaches: ``convert_weight_hf2sat.py --fp32 --iteration``;
``convert_weight_sat2hf.py --scaling_factor --snr_shift_scale --num_attention_heads --text_encoder_cache_dir``;
``export_sat_lora_weight.py --base --lora_alpha --scale_into_weights`` (on the tiny demo models)."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from helpers import ROOT, build, randomize_, reset_fixed_tables

sys.path.insert(0, os.path.join(ROOT, "tools"))
PREFIX = "model.diffusion_model."


def sat2hf(argv):
    import convert_weight_sat2hf

    return convert_weight_sat2hf.main([str(a) for a in argv])


def hf2sat(argv):
    import convert_weight_hf2sat

    return convert_weight_hf2sat.main([str(a) for a in argv])


def tiny_5b(paths, out, *extra):
    return ["--transformer_ckpt_path", paths["cogvideox_5b"], "--vae_ckpt_path", paths["vae"], "--output_path", out,
            "--config", paths["config:cogvideox_5b"], *extra]


# ------------------------------------------------------------------------------------------------ sat2hf


def test_sat2hf_scaling_factor_and_snr_shift_scale(demo_paths, tmp_path, capsys):
    """Defaults: the model's values (tiny 5B: 0.7 and 1.0); the flags replace them in vae/ and scheduler/ (with a
    warning that they differ from the model's)."""
    assert sat2hf(tiny_5b(demo_paths, tmp_path / "default", "--no_text_encoder")) == 0
    assert sat2hf(tiny_5b(demo_paths, tmp_path / "flags", "--no_text_encoder", "--scaling_factor", "0.5",
                          "--snr_shift_scale", "2.5")) == 0
    out = capsys.readouterr().out
    assert "warning: --scaling_factor 0.5 differs from this model's 0.7" in out
    assert "warning: --snr_shift_scale 2.5 differs from this model's 1.0" in out
    for name, scale, shift in (("default", 0.7, 1.0), ("flags", 0.5, 2.5)):
        vae = json.load(open(tmp_path / name / "vae" / "config.json"))
        sched = json.load(open(tmp_path / name / "scheduler" / "scheduler_config.json"))
        assert vae["scaling_factor"] == pytest.approx(scale) and sched["snr_shift_scale"] == pytest.approx(shift)
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline.from_pretrained(str(tmp_path / "flags"), text_encoder=None, tokenizer=None)
    assert pipe.vae.config.scaling_factor == pytest.approx(0.5)
    assert pipe.scheduler.config.snr_shift_scale == pytest.approx(2.5)


def test_sat2hf_num_attention_heads_is_checked(demo_paths, tmp_path, capsys):
    heads = int(build("cogvideox_5b")[1].params.num_attention_heads)  # 2 in the tiny config
    assert sat2hf(tiny_5b(demo_paths, tmp_path / "ok", "--no_text_encoder", "--num_attention_heads", heads)) == 0
    assert json.load(open(tmp_path / "ok" / "transformer" / "config.json"))["num_attention_heads"] == heads
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        sat2hf(tiny_5b(demo_paths, tmp_path / "wrong", "--no_text_encoder", "--num_attention_heads", 4 * heads))
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: --num_attention_heads {4 * heads} given, but the checkpoint has {heads} heads")
    assert not (tmp_path / "wrong").exists()


def test_sat2hf_text_encoder_cache_dir_reaches_the_download(demo_paths, tmp_path, monkeypatch):
    """A Hub id for --text_encoder_path is downloaded into --text_encoder_cache_dir (the download is faked: it
    records its arguments and returns the local tiny T5 folder)."""
    import huggingface_hub

    calls = []

    def fake_download(repo_id, cache_dir=None, **kwargs):
        calls.append((repo_id, cache_dir))
        return demo_paths["t5"]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    cache = tmp_path / "t5-cache"
    assert sat2hf(tiny_5b(demo_paths, tmp_path / "out", "--text_encoder_path", "google/t5-v1_1-xxl",
                          "--text_encoder_cache_dir", cache)) == 0
    assert calls == [("google/t5-v1_1-xxl", str(cache))]
    assert os.path.isfile(tmp_path / "out" / "text_encoder" / "config.json")
    assert os.path.isfile(tmp_path / "out" / "tokenizer" / "spiece.model")


# ------------------------------------------------------------------------------------------------ hf2sat


def test_hf2sat_fp32_and_iteration(demo_paths, tmp_path):
    """A bfloat16 diffusers folder back to SAT with --fp32 --iteration 500: float32 tensors (the bfloat16 values),
    ``latest`` = 500, the checkpoint in ``500/``; the inference loader reads it."""
    from sat_cogvideo.convert.safetensors_io import open_weights_folder

    assert sat2hf(tiny_5b(demo_paths, tmp_path / "hf", "--no_text_encoder", "--bf16")) == 0
    hf = open_weights_folder(str(tmp_path / "hf" / "transformer"), "diffusion_pytorch_model")
    assert {t.dtype for t in hf.values()} == {torch.bfloat16}
    assert hf2sat(["--input_path", tmp_path / "hf", "--output_path", tmp_path / "sat", "--fp32",
                   "--iteration", "500"]) == 0
    transformer = tmp_path / "sat" / "transformer"
    assert (transformer / "latest").read_text().strip() == "500"
    assert sorted(os.listdir(transformer)) == ["500", "latest"]
    sd = torch.load(transformer / "500" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert {v.dtype for v in sd.values()} == {torch.float32}
    key = PREFIX + "transformer.layers.0.attention.dense.weight"
    assert torch.equal(sd[key], hf["transformer_blocks.0.attn1.to_out.0.weight"].float())
    vae = torch.load(tmp_path / "sat" / "vae" / "3d-vae.pt", weights_only=True)["state_dict"]
    assert {v.dtype for v in vae.values()} == {torch.float32}
    # without --fp32 the stored dtype is kept
    assert hf2sat(["--input_path", tmp_path / "hf" / "transformer", "--output_path", tmp_path / "keep"]) == 0
    kept = torch.load(tmp_path / "keep" / "transformer" / "1" / "mp_rank_00_model_states.pt", weights_only=True)
    assert kept["module"][key].dtype == torch.bfloat16
    from helpers import make_engine
    from sat_cogvideo.sample_video import load_transformer_checkpoint

    engine = make_engine("cogvideox_5b", demo_paths, load=False)
    load_transformer_checkpoint(engine, str(transformer))
    assert torch.equal(engine.state_dict()[key], sd[key])


# ------------------------------------------------------------------------------------------------ LoRA export tool


@pytest.fixture
def lora_run(tmp_path):
    """A SAT LoRA run folder of the tiny 2B (random factors, B non-zero) whose training_config.yaml says r 4,
    lora_alpha 2; and the same checkpoint split into the LoRA factors alone and the base weights."""
    from sat_cogvideo.checkpoint import save_checkpoint

    model, _ = build("cogvideox_2b_lora")
    randomize_(model, 0)
    reset_fixed_tables(model)
    sd = {PREFIX + k: v for k, v in model.state_dict().items()}
    run = tmp_path / "run"
    save_checkpoint(run, sd, 10)
    (run / "training_config.yaml").write_text(
        "model:\n  network_config:\n    params:\n      modules:\n        lora_config:\n"
        "          params: {r: 4, lora_alpha: 2}\n")
    factors, base = tmp_path / "factors", tmp_path / "base"
    save_checkpoint(factors, {k: v for k, v in sd.items() if ".matrix_" in k}, 10)
    save_checkpoint(base, {k.replace(".original.", "."): v for k, v in sd.items() if ".matrix_" not in k}, 1)
    return {"run": run, "sd": sd, "factors": factors, "base": base}


@pytest.fixture
def export_tool(capsys):
    """tools/export_sat_lora_weight.py in this process: (returncode, stdout, stderr) as a subprocess would give."""
    from types import SimpleNamespace

    import export_sat_lora_weight

    def run(*args):
        capsys.readouterr()
        try:
            code = export_sat_lora_weight.main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    return run


def expected_merge(sd, scale):
    layer = PREFIX + "transformer.layers.1.attention.query_key_value"
    delta = torch.cat([sd[f"{layer}.matrix_B.{j}"] @ sd[f"{layer}.matrix_A.{j}"] for j in range(3)])
    return sd[layer + ".original.weight"] + scale * delta


def test_lora_tool_lora_alpha_and_scale_into_weights(lora_run, tmp_path, export_tool):
    from safetensors.torch import load_file

    b_key = PREFIX + "transformer.layers.1.attention.query_key_value.matrix_B.2"
    hf_key = "transformer.transformer_blocks.1.attn1.to_v.lora_B.weight"
    sd = lora_run["sd"]
    out = export_tool("--sat_pt_path", lora_run["run"], "--lora_save_directory", tmp_path / "plain")
    assert out.returncode == 0, out.stderr
    assert "set_adapters([name], [0.5])" in out.stdout  # lora_alpha 2 (training_config.yaml) / r 4
    assert torch.equal(load_file(str(tmp_path / "plain" / "pytorch_lora_weights.safetensors"))[hf_key], sd[b_key])
    # --lora_alpha replaces the run's value; --scale_into_weights bakes alpha / r into B (adapter weight 1)
    out = export_tool("--sat_pt_path", lora_run["run"], "--lora_save_directory", tmp_path / "scaled",
                      "--lora_alpha", "8", "--scale_into_weights")
    assert out.returncode == 0, out.stderr
    assert "lora_alpha=8" in out.stdout and "set_adapters([name], [1])" in out.stdout
    scaled = load_file(str(tmp_path / "scaled" / "pytorch_lora_weights.safetensors"))
    torch.testing.assert_close(scaled[hf_key], sd[b_key] * 2.0, rtol=1e-6, atol=0)  # 8 / 4
    out = export_tool("--sat_pt_path", lora_run["run"], "--lora_save_directory", tmp_path / "alpha8",
                      "--lora_alpha", "8")
    assert out.returncode == 0 and "set_adapters([name], [2])" in out.stdout
    assert torch.equal(load_file(str(tmp_path / "alpha8" / "pytorch_lora_weights.safetensors"))[hf_key], sd[b_key])


def test_lora_tool_merge_with_base_and_lora_alpha(lora_run, tmp_path, export_tool):
    """A checkpoint of LoRA factors only merges with ``--base`` (refused without); ``--lora_alpha`` sets the
    scale alpha / r of the merge."""
    from sat_cogvideo.checkpoint import read_state_dict

    key = PREFIX + "transformer.layers.1.attention.query_key_value.weight"
    out = export_tool("--sat_pt_path", lora_run["factors"], "--merge", tmp_path / "refused")
    assert out.returncode == 2 and out.stderr.startswith("error: ") and "no base weight" in out.stderr
    assert not (tmp_path / "refused").exists()
    out = export_tool("--sat_pt_path", lora_run["factors"], "--merge", tmp_path / "merged", "--base",
                      lora_run["base"], "--lora_alpha", "3")
    assert out.returncode == 0, out.stderr
    merged = read_state_dict(str(tmp_path / "merged"))
    assert not any(".matrix_" in k or ".original." in k for k in merged)
    torch.testing.assert_close(merged[key], expected_merge(lora_run["sd"], 3 / 4), rtol=1e-6, atol=1e-7)
    # the full run (base inside) with the run's lora_alpha 2 gives the same as --base with --lora_alpha 2
    out = export_tool("--sat_pt_path", lora_run["run"], "--merge", tmp_path / "merged_run")
    out2 = export_tool("--sat_pt_path", lora_run["factors"], "--merge", tmp_path / "merged_base", "--base",
                       lora_run["base"], "--lora_alpha", "2")
    assert out.returncode == 0 and out2.returncode == 0, out.stderr + out2.stderr
    a, b = read_state_dict(str(tmp_path / "merged_run")), read_state_dict(str(tmp_path / "merged_base"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.testing.assert_close(a[key], expected_merge(lora_run["sd"], 2 / 4), rtol=1e-6, atol=1e-7)
