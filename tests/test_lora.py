"""SAT LoRA: export to diffusers (checked by running diffusers with the exported adapter) and merging."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from helpers import build, diffusers_model, inputs, max_rel_err, randomize_, reset_fixed_tables, run_both

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ("cogvideox_2b", "cogvideox_5b", "cogvideox_5b_i2v", "cogvideox1.5_5b", "cogvideox1.5_5b_i2v")


def lora_model(family, seed=0, lora_alpha=None):
    """A tiny DiT with LoRA (config *_lora.yaml), every tensor random, LoRA B non-zero."""
    overrides = {}
    if lora_alpha is not None:
        overrides["modules.lora_config.params.lora_alpha"] = lora_alpha
    model, cfg = build(family + "_lora", **overrides)
    randomize_(model, seed)
    reset_fixed_tables(model)
    with torch.no_grad():  # a LoRA update of the size of the weights, so a wrong scale or slot shows
        for name, p in model.named_parameters():
            if ".matrix_B." in name:
                p.mul_(20.0)
    return model.eval(), cfg


def test_key_map_names_and_count(dist_cpu):
    from sat_cogvideo.convert.lora import SAT_PREFIX, export_lora_sat_to_diffusers

    model, cfg = lora_model("cogvideox_2b")
    sd = {SAT_PREFIX + k: v for k, v in model.state_dict().items()}
    sd["first_stage_model.encoder.conv_in.conv.weight"] = torch.zeros(1)  # engine keys are ignored
    out = export_lora_sat_to_diffusers(sd, num_layers=cfg.params.num_layers)
    assert len(out) == 8 * cfg.params.num_layers
    a = sd[SAT_PREFIX + "transformer.layers.1.attention.query_key_value.matrix_B.2"]
    assert torch.equal(out["transformer.transformer_blocks.1.attn1.to_v.lora_B.weight"], a)
    assert torch.equal(out["transformer.transformer_blocks.0.attn1.to_out.0.lora_A.weight"],
                       sd[SAT_PREFIX + "transformer.layers.0.attention.dense.matrix_A.0"])
    r = cfg.params.modules.lora_config.params.r
    assert out["transformer.transformer_blocks.0.attn1.to_q.lora_A.weight"].shape == (r, cfg.params.hidden_size)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scale_into_weights", [False, True])
def test_exported_lora_in_diffusers_matches_sat(dist_cpu, tmp_path, family, scale_into_weights):
    from sat_cogvideo.convert.lora import (export_lora_sat_to_diffusers, lora_rank, save_diffusers_lora,
                                           split_lora_state_dict)

    alpha = 2.0
    model, cfg = lora_model(family, lora_alpha=alpha)
    sd = model.state_dict()
    base, lora = split_lora_state_dict(sd)
    r = lora_rank(lora)
    hf, conf = diffusers_model(cfg, base)
    x, ts, ctx, extra = inputs(model, cfg)
    _, ref_base = run_both(model, hf, conf, x, ts, ctx, extra)  # diffusers without the adapter
    folder = tmp_path / "lora"
    save_diffusers_lora(export_lora_sat_to_diffusers(sd, lora_alpha=alpha, scale_into_weights=scale_into_weights),
                        str(folder))
    hf.load_lora_adapter(str(folder), weight_name="pytorch_lora_weights.safetensors", adapter_name="sat",
                         prefix="transformer")
    hf.set_adapters(["sat"], weights=[1.0 if scale_into_weights else alpha / r])
    ours, ref = run_both(model, hf, conf, x, ts, ctx, extra)
    err = max_rel_err(ours, ref)
    assert err <= 1e-5, err  # measured 1.7e-7 (2B) and 1.6e-7 (5B); the brief's bound is 1e-4
    assert max_rel_err(ref_base, ref) > 1e-2  # the adapter really changes the output


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_weights_match_unmerged_lora(dist_cpu, family):
    from sat_cogvideo.checkpoint import load_state_dict_strict
    from sat_cogvideo.convert.lora import merge_lora_state_dict

    model, cfg = lora_model(family, lora_alpha=3.0)
    plain, _ = build(family)
    merged = merge_lora_state_dict(model.state_dict(), lora_alpha=3.0)
    assert not any("matrix_" in k or ".original." in k for k in merged)
    load_state_dict_strict(plain, merged, known_unused=plain.known_unused_keys())
    plain.eval()
    x, ts, ctx, extra = inputs(model, cfg)
    with torch.no_grad():
        a, b = model(x, ts, ctx, **extra), plain(x, ts, ctx, **extra)
    assert max_rel_err(b, a) <= 2e-6  # measured 1.7e-7
    # and the merge is not a no-op
    base_only = merge_lora_state_dict(model.state_dict(), lora_alpha=0.0)
    load_state_dict_strict(plain, base_only, known_unused=plain.known_unused_keys())
    with torch.no_grad():
        assert max_rel_err(plain(x, ts, ctx, **extra), a) > 1e-3


def test_merge_with_separate_base_and_round_trip(dist_cpu):
    from sat_cogvideo.convert.lora import (diffusers_lora_to_sat, export_lora_sat_to_diffusers,
                                           merge_lora_state_dict, split_lora_state_dict)

    model, _ = lora_model("cogvideox_5b")
    sd = model.state_dict()
    base, lora = split_lora_state_dict(sd)
    assert torch.equal(merge_lora_state_dict(lora, base=base)["transformer.layers.0.attention.dense.weight"],
                       merge_lora_state_dict(sd)["transformer.layers.0.attention.dense.weight"])
    for scaled in (False, True):
        hf = export_lora_sat_to_diffusers(sd, lora_alpha=2.0, scale_into_weights=scaled)
        back = diffusers_lora_to_sat(hf, lora_alpha=2.0, scaled_into_weights=scaled, prefix="")
        assert back.keys() == lora.keys()
        for k in lora:
            torch.testing.assert_close(back[k], lora[k], rtol=1e-6, atol=0)


def test_errors_name_the_problem(dist_cpu):
    from sat_cogvideo.convert.lora import export_lora_sat_to_diffusers, merge_lora_state_dict
    from sat_cogvideo.errors import UserError

    model, _ = lora_model("cogvideox_2b")
    sd = model.state_dict()
    with pytest.raises(UserError, match="no LoRA factors"):
        export_lora_sat_to_diffusers({k: v for k, v in sd.items() if "matrix" not in k})
    partial = {k: v for k, v in sd.items() if k != "transformer.layers.1.attention.dense.matrix_B.0"}
    with pytest.raises(UserError, match=r"layer 1 has an incomplete LoRA \(7 of 8"):
        export_lora_sat_to_diffusers(partial)
    only0 = {k: v for k, v in sd.items() if "layers.1." not in k}
    with pytest.raises(UserError, match="expected LoRA on all 2 layers"):
        export_lora_sat_to_diffusers(only0, num_layers=2)
    lora_only = {k: v for k, v in sd.items() if "matrix" in k}
    with pytest.raises(UserError, match="no base weight"):
        merge_lora_state_dict(lora_only)


def test_export_tool_cli(dist_cpu, tmp_path):
    from safetensors.torch import load_file

    from sat_cogvideo.checkpoint import load_state_dict_strict, read_state_dict, save_checkpoint
    from sat_cogvideo.convert.lora import SAT_PREFIX

    model, cfg = lora_model("cogvideox_2b")
    run = tmp_path / "run"
    save_checkpoint(run, {SAT_PREFIX + k: v for k, v in model.state_dict().items()}, 10)
    (run / "training_config.yaml").write_text(
        "model:\n  network_config:\n    params:\n      modules:\n        lora_config:\n"
        "          params: {r: 4, lora_alpha: 2}\n")
    tool = os.path.join(ROOT, "tools", "export_sat_lora_weight.py")
    out = subprocess.run([sys.executable, tool, "--sat_pt_path", str(run), "--lora_save_directory",
                          str(tmp_path / "hf"), "--merge", str(tmp_path / "merged"), "--num_layers", "2"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "set_adapters([name], [0.5])" in out.stdout  # alpha 2 / r 4, read from training_config.yaml
    sd = load_file(str(tmp_path / "hf" / "pytorch_lora_weights.safetensors"))
    assert len(sd) == 16 and all(k.startswith("transformer.transformer_blocks.") for k in sd)
    plain, _ = build("cogvideox_2b")
    merged = read_state_dict(tmp_path / "merged", prefix=SAT_PREFIX)
    load_state_dict_strict(plain, merged, known_unused=plain.known_unused_keys())
    bad = subprocess.run([sys.executable, tool, "--sat_pt_path", str(tmp_path / "nothing"), "--merge", "x"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "does not exist" in bad.stderr


def test_lora_checkpoint_without_lora_config_is_named(dist_cpu):
    from sat_cogvideo.convert.lora import lora_mismatch_message

    lora_model_, _ = lora_model("cogvideox_2b")
    plain, _ = build("cogvideox_2b")
    pre = "model.diffusion_model."
    ckpt = [pre + k for k in lora_model_.state_dict()]
    msg = lora_mismatch_message([pre + k for k in plain.state_dict()], ckpt, source="ckpts/run")
    assert msg.startswith("ckpts/run is a LoRA checkpoint (16 LoRA tensors") and "lora_config" in msg
    assert "--merge" in msg
    assert lora_mismatch_message(ckpt, ckpt) is None
    assert lora_mismatch_message([pre + k for k in plain.state_dict()], [pre + k for k in plain.state_dict()]) is None
    partial = [k for k in ckpt if "layers.1.attention.dense.matrix" not in k]
    assert "lacks 1.attention.dense.matrix_A.0" in lora_mismatch_message(ckpt, partial)
