"""The family table and family detection from shapes and configs."""
import os

import pytest
import torch
from omegaconf import OmegaConf

from sat_cogvideo.errors import UserError
from sat_cogvideo.families import (FAMILIES, check_num_frames, detect_from_model_config, detect_from_state_dict,
                                   get_family)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_table_values():
    assert get_family("2b").dtype == "float16" and get_family("2b").fps == 8 and get_family("2b").num_frames == 49
    assert get_family("CogVideoX1.5-5B-I2V").ofs and get_family("1.5-5b").fps == 16
    assert get_family("cogvideox-5b-i2v").in_channels == 32 and get_family("5b").dtype == "bfloat16"
    with pytest.raises(UserError, match="unknown model family 'cogvideox-9b'"):
        get_family("cogvideox-9b")


def test_latent_frames():
    assert get_family("5b").latent_frames(49) == 13
    assert get_family("5b").latent_frames(33) == 9
    assert get_family("1.5-5b").latent_frames(81) == 22  # 21 + 1 padding frame for the temporal patch of 2
    assert get_family("1.5-5b").latent_frames(161) == 42
    with pytest.raises(UserError, match=r"--num-frames 48 is not of the form 4N\+1.*49 or 41 or 33"):
        check_num_frames(get_family("2b"), 48)


def fake_sd(proj_shape, final_out, extra=(), layers=2, prefix=""):
    sd = {prefix + "mixins.patch_embed.proj.weight": torch.empty(proj_shape),
          prefix + "mixins.final_layer.linear.weight": torch.empty(final_out, proj_shape[0])}
    for i in range(layers):
        sd[f"{prefix}transformer.layers.{i}.attention.query_key_value.weight"] = torch.empty(1)
    for k in extra:
        sd[prefix + k] = torch.empty(1)
    return sd


@pytest.mark.parametrize("name,proj,final,extra", [
    ("cogvideox-2b", (1920, 16, 2, 2), 64, ()),
    ("cogvideox-5b", (3072, 16, 2, 2), 64, ("transformer.position_embeddings.weight",)),
    ("cogvideox-5b-i2v", (3072, 32, 2, 2), 64, ("mixins.pos_embed.pos_embedding",)),
    ("cogvideox1.5-5b", (3072, 128), 128, ()),
    ("cogvideox1.5-5b-i2v", (3072, 256), 128, ("ofs_embed.0.weight",)),
])
def test_detect_released_shapes(name, proj, final, extra):
    for prefix in ("", "model.diffusion_model."):
        d = detect_from_state_dict(fake_sd(proj, final, extra, prefix=prefix))
        assert d.family is FAMILIES[name]
        assert d.num_layers == 2
        assert d.ofs == (name == "cogvideox1.5-5b-i2v")


def test_detect_tiny():
    d = detect_from_state_dict(fake_sd((64, 32, 2, 2), 64, ("transformer.position_embeddings.weight",)))
    assert d.family is None and d.generation == "1.0" and d.i2v and d.rotary and d.hidden_size == 64
    d = detect_from_state_dict(fake_sd((64, 16, 2, 2), 64))
    assert not d.rotary and not d.i2v


def test_detect_not_a_transformer():
    with pytest.raises(UserError, match="not a CogVideoX transformer checkpoint"):
        detect_from_state_dict({"encoder.conv_in.weight": torch.empty(1)})


@pytest.mark.parametrize("name", list(FAMILIES))
def test_detect_from_shipped_configs(name):
    fam = FAMILIES[name]
    cfg = OmegaConf.load(os.path.join(ROOT, fam.config)).model
    d = detect_from_model_config(cfg)
    assert d.family is fam and d.rotary == fam.rotary and d.learnable_pos_embed == fam.learnable_pos_embed
    assert d.ofs == fam.ofs and d.num_layers == fam.num_layers
    tiny = detect_from_model_config(OmegaConf.load(os.path.join(ROOT, "configs", "tiny",
                                                                os.path.basename(fam.config))).model)
    assert tiny.family is None and (tiny.generation, tiny.i2v, tiny.rotary, tiny.ofs) == \
        (fam.generation, fam.i2v, fam.rotary, fam.ofs)
