"""SAT checkpoint layout (latest + <iter>/mp_rank_00_model_states.pt) and strict loading of the DiT."""
from __future__ import annotations

import os

import pytest
import torch

from helpers import build, inputs, random_model


class Custom:
    """A pickled Python object that a weights-only load must refuse."""


def _forward(model, cfg):
    x, ts, ctx, extra = inputs(model, cfg)
    with torch.no_grad():
        return model(x, ts, ctx, **extra)


@pytest.mark.parametrize("family", ["cogvideox_2b", "cogvideox1.5_5b_i2v"])
def test_save_load_round_trip_gives_identical_outputs(dist_cpu, tmp_path, family):
    from sat_cogvideo.checkpoint import (MODEL_STATES, checkpoint_file, load_state_dict_strict, read_state_dict,
                                         save_checkpoint)

    model, cfg = random_model(family)
    path = save_checkpoint(tmp_path / "transformer", model.state_dict(), 1000)
    assert path == tmp_path / "transformer" / "1000" / MODEL_STATES
    assert (tmp_path / "transformer" / "latest").read_text().strip() == "1000"
    assert not [f for f in os.listdir(tmp_path / "transformer" / "1000") if f != MODEL_STATES]  # no temp files
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) == {"module", "iteration"} and raw["iteration"] == 1000
    assert checkpoint_file(tmp_path / "transformer") == path

    fresh, _ = build(family)
    load_state_dict_strict(fresh, read_state_dict(tmp_path / "transformer"), known_unused=fresh.known_unused_keys())
    assert torch.equal(_forward(fresh.eval(), cfg), _forward(model, cfg))


def test_engine_prefixed_checkpoint(dist_cpu, tmp_path):
    from sat_cogvideo.checkpoint import load_state_dict_strict, read_state_dict, save_checkpoint

    model, cfg = random_model("cogvideox_5b")
    engine = {"model.diffusion_model." + k: v for k, v in model.state_dict().items()}
    engine["first_stage_model.decoder.conv_out.weight"] = torch.ones(2)
    save_checkpoint(tmp_path, engine, 7)
    sd = read_state_dict(tmp_path, prefix="model.diffusion_model.")
    assert set(sd) == set(model.state_dict())
    fresh, _ = build("cogvideox_5b")
    load_state_dict_strict(fresh, sd, known_unused=fresh.known_unused_keys())
    assert torch.equal(_forward(fresh.eval(), cfg), _forward(model, cfg))


def test_released_layouts_with_known_unused_keys_load(dist_cpu):
    """v1.0-era checkpoints carry RoPE buffers and the unused absolute table; 1.5 and 2B ones lack tables."""
    from sat_cogvideo.checkpoint import load_state_dict_strict

    five_b, _ = random_model("cogvideox_5b")
    sd = five_b.state_dict()
    assert "mixins.pos_embed.freqs_sin" in sd and "transformer.position_embeddings.weight" in sd
    fresh, _ = build("cogvideox_5b")
    load_state_dict_strict(fresh, sd, known_unused=fresh.known_unused_keys())  # all present: fine
    stripped = {k: v for k, v in sd.items() if "freqs" not in k and "position_embeddings" not in k}
    report = load_state_dict_strict(fresh, stripped, known_unused=fresh.known_unused_keys())
    assert set(report.ignored_missing) == {"mixins.pos_embed.freqs_sin", "mixins.pos_embed.freqs_cos",
                                           "transformer.position_embeddings.weight"}

    # 1.5: the model has the unused absolute table, released checkpoints lack it; 1.0-style extras are accepted
    v15, _ = build("cogvideox1.5_5b")
    sd15 = {k: v for k, v in v15.state_dict().items() if k != "transformer.position_embeddings.weight"}
    sd15["mixins.pos_embed.freqs_sin"] = torch.zeros(3)
    report = load_state_dict_strict(v15, sd15, known_unused=v15.known_unused_keys())
    assert report.ignored_missing == ["transformer.position_embeddings.weight"]
    assert report.ignored_unexpected == ["mixins.pos_embed.freqs_sin"]

    # 2B: the released checkpoint lacks the frozen sincos table; the computed one stays
    two_b, _ = build("cogvideox_2b")
    table = two_b.mixins["pos_embed"].pos_embedding.detach().clone()
    sd2 = {k: torch.randn_like(v) for k, v in two_b.state_dict().items() if k != "mixins.pos_embed.pos_embedding"}
    load_state_dict_strict(two_b, sd2, known_unused=two_b.known_unused_keys())
    assert torch.equal(two_b.mixins["pos_embed"].pos_embedding, table)
    assert table.abs().sum() > 0

    # 5B-I2V: its learned table is a real weight, never optional
    i2v, _ = build("cogvideox_5b_i2v")
    sdi = {k: v for k, v in i2v.state_dict().items() if k != "mixins.pos_embed.pos_embedding"}
    from sat_cogvideo.errors import UserError
    with pytest.raises(UserError, match="1 missing keys \\(mixins.pos_embed.pos_embedding\\)"):
        load_state_dict_strict(i2v, sdi, known_unused=i2v.known_unused_keys())


def test_strict_loading_names_the_problem(dist_cpu):
    from sat_cogvideo.checkpoint import load_state_dict_strict
    from sat_cogvideo.errors import UserError

    model, _ = build("cogvideox_5b")
    unused = model.known_unused_keys()
    good = model.state_dict()

    deleted = dict(good)
    del deleted["transformer.layers.1.mlp.dense_4h_to_h.bias"]
    with pytest.raises(UserError, match=r"1 missing keys \(transformer\.layers\.1\.mlp\.dense_4h_to_h\.bias\)"):
        load_state_dict_strict(model, deleted, known_unused=unused)

    extra = dict(good, **{"mixins.adaln_layer.bogus": torch.zeros(1)})
    with pytest.raises(UserError, match=r"1 unexpected keys \(mixins\.adaln_layer\.bogus\)"):
        load_state_dict_strict(model, extra, known_unused=unused)

    wrong = dict(good, **{"time_embed.2.bias": torch.zeros(5)})
    with pytest.raises(UserError, match=r"time_embed\.2\.bias is \[5\] in the checkpoint, \[32\] in the model"):
        load_state_dict_strict(model, wrong, known_unused=unused)

    # nothing was half-loaded by the failed attempts
    assert torch.equal(model.state_dict()["time_embed.2.bias"], good["time_embed.2.bias"])


def test_mismatch_message_names_the_config(dist_cpu):
    from sat_cogvideo.checkpoint import load_state_dict_strict
    from sat_cogvideo.errors import UserError

    wide, _ = build("cogvideox_5b", hidden_size=128, num_attention_heads=4)
    model, _ = build("cogvideox_5b")
    with pytest.raises(UserError, match="checkpoint has hidden_size 128, config says 64"):
        load_state_dict_strict(model, wide.state_dict(), known_unused=model.known_unused_keys())
    deep, _ = build("cogvideox_5b", num_layers=3)
    with pytest.raises(UserError, match="checkpoint has num_layers 3, config says 2"):
        load_state_dict_strict(model, deep.state_dict(), known_unused=model.known_unused_keys())
    v15, _ = build("cogvideox1.5_5b")
    with pytest.raises(UserError, match=r"patch embedding is 1\.5"):
        load_state_dict_strict(model, v15.state_dict(), known_unused=model.known_unused_keys())


def test_weights_only_and_bad_paths(tmp_path):
    from sat_cogvideo.checkpoint import checkpoint_file, load_checkpoint_file, read_state_dict
    from sat_cogvideo.errors import UserError

    (tmp_path / "1").mkdir()
    torch.save({"module": {"w": torch.ones(1)}, "obj": Custom()}, tmp_path / "1" / "mp_rank_00_model_states.pt")
    (tmp_path / "latest").write_text("1")
    with pytest.raises(UserError, match="holds pickled Python objects that a safe load refuses .*--trust-pickle"):
        load_checkpoint_file(tmp_path)
    with pytest.warns(UserWarning, match="--trust-pickle: unpickling .*mp_rank_00_model_states.pt fully"):
        assert torch.equal(read_state_dict(load_checkpoint_file(tmp_path, trust_pickle=True))["w"], torch.ones(1))

    with pytest.raises(UserError, match="does not exist"):
        checkpoint_file(tmp_path / "nope")
    (tmp_path / "latest").write_text("2")
    with pytest.raises(UserError, match="names iteration '2'"):
        checkpoint_file(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="not a SAT checkpoint"):
        checkpoint_file(empty)


def test_lora_checkpoint_is_strict_about_its_factors(dist_cpu):
    from sat_cogvideo.checkpoint import load_state_dict_strict
    from sat_cogvideo.errors import UserError

    lora, _ = build("cogvideox_5b_lora")
    sd = {k: torch.randn_like(v) for k, v in lora.state_dict().items()}
    fresh, _ = build("cogvideox_5b_lora")
    report = load_state_dict_strict(fresh, sd, known_unused=fresh.known_unused_keys())
    assert report.lora_initialised == []
    key = "transformer.layers.1.attention.dense.matrix_B.0"
    assert torch.equal(fresh.state_dict()[key], sd[key])
    del sd["transformer.layers.0.attention.query_key_value.matrix_A.1"]
    with pytest.raises(UserError, match=r"1 missing keys \(transformer\.layers\.0\.attention\.query_key_value"
                                        r"\.matrix_A\.1\)"):
        load_state_dict_strict(fresh, sd, known_unused=fresh.known_unused_keys())
