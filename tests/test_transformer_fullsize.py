"""The released (full-size) configs built on the meta device: parameter counts and key sets, no real memory."""
from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

from helpers import DEMO_FAMILIES as FAMILIES, build, network_config

# DiT parameters of each family (spec models.md §1): trainable, excluding SAT's unused absolute table
# `transformer.position_embeddings.weight` and frozen tables/buffers.
EXPECTED = {
    "cogvideox_2b": 1_693_783_872,
    "cogvideox_5b": 5_570_283_072,
    "cogvideox_5b_i2v": 5_625_087_552,
    "cogvideox1.5_5b": 5_570_676_352,
    "cogvideox1.5_5b_i2v": 5_571_594_880,
}


class _AllOnMeta(TorchFunctionMode):
    """Create every tensor on the meta device, even where the code names a device (SAT passes device='cpu')."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _device_constructors():
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def build_meta(family):
    with _AllOnMeta():
        model, cfg = build(family, tiny=False)
    return model, cfg


@pytest.mark.parametrize("family", FAMILIES)
def test_full_size_parameter_count_and_keys(dist_cpu, family):
    from diffusers import CogVideoXTransformer3DModel

    from sat_cogvideo.convert.transformer import diffusers_transformer_config, sat_to_diffusers_transformer

    model, cfg = build_meta(family)
    params = dict(model.named_parameters())
    assert all(p.device.type == "meta" for p in params.values())
    count = sum(p.numel() for name, p in params.items()
                if p.requires_grad and name != "transformer.position_embeddings.weight")
    assert count == EXPECTED[family]
    approx = 1.69e9 if family == "cogvideox_2b" else 5.56e9
    assert abs(count - approx) / approx < 0.02

    conf = diffusers_transformer_config(cfg)
    with torch.device("meta"):
        hf = CogVideoXTransformer3DModel(**conf)
    converted = sat_to_diffusers_transformer(model.state_dict(),
                                             learned_positional_embeddings=conf["use_learned_positional_embeddings"])
    hf_sd = hf.state_dict()
    assert converted.keys() == hf_sd.keys()
    for key, value in converted.items():
        assert value.shape == hf_sd[key].shape, key


def test_full_size_configs_match_the_family_table(dist_cpu):
    expected = {  # hidden, layers, heads, in_channels, patch
        "cogvideox_2b": (1920, 30, 30, 16, 2),
        "cogvideox_5b": (3072, 42, 48, 16, 2),
        "cogvideox_5b_i2v": (3072, 42, 48, 32, 2),
        "cogvideox1.5_5b": (3072, 42, 48, 16, [2, 2, 2]),
        "cogvideox1.5_5b_i2v": (3072, 42, 48, 32, [2, 2, 2]),
    }
    for family, (hidden, layers, heads, cin, patch) in expected.items():
        p = network_config(family, tiny=False).params
        assert (p.hidden_size, p.num_layers, p.num_attention_heads, p.in_channels, p.patch_size) == \
            (hidden, layers, heads, cin, patch)


def test_diffusers_configs_of_the_released_families():
    """diffusers_transformer_config gives the released diffusers configs (spec convert.md §4)."""
    from sat_cogvideo.convert.transformer import diffusers_transformer_config

    table = {  # heads, in, layers, rotary, learned, ofs, patch_t, bias, (h, w, frames), text length
        "cogvideox_2b": (30, 16, 30, False, False, None, None, True, (60, 90, 49), 226),
        "cogvideox_5b": (48, 16, 42, True, False, None, None, True, (60, 90, 49), 226),
        "cogvideox_5b_i2v": (48, 32, 42, True, True, None, None, True, (60, 90, 49), 226),
        "cogvideox1.5_5b": (48, 16, 42, True, False, None, 2, False, (96, 170, 81), 226),
        "cogvideox1.5_5b_i2v": (48, 32, 42, True, False, 512, 2, False, (96, 170, 81), 226),
    }
    for family, (heads, cin, layers, rotary, learned, ofs, pt, bias, sample, text) in table.items():
        c = diffusers_transformer_config(network_config(family, tiny=False))
        got = (c["num_attention_heads"], c["in_channels"], c["num_layers"], c["use_rotary_positional_embeddings"],
               c["use_learned_positional_embeddings"], c["ofs_embed_dim"], c["patch_size_t"], c["patch_bias"],
               (c["sample_height"], c["sample_width"], c["sample_frames"]), c["max_text_seq_length"])
        assert got == (heads, cin, layers, rotary, learned, ofs, pt, bias, sample, text), family
        assert (c["attention_head_dim"], c["time_embed_dim"], c["text_embed_dim"], c["patch_size"],
                c["norm_eps"], c["spatial_interpolation_scale"]) == (64, 512, 4096, 2, 1e-5, 1.875)
