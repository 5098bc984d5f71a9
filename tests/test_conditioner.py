"""GeneralConditioner as configured by the CogVideoX YAML (conditioner.md)."""
import pytest
import torch

from sat_cogvideo.errors import UserError
from sat_cogvideo.tiny_t5 import build_tiny_t5
from sgm.modules.encoders.modules import AbstractEmbModel
from sgm.util import instantiate_from_config


class DummyEmb(AbstractEmbModel):
    """Returns a tensor of the requested rank filled from the inputs (for vector/concat keys)."""

    def __init__(self, rank=2, width=3, value=1.0):
        super().__init__()
        self.rank, self.width, self.value = rank, width, value
        self.lin = torch.nn.Linear(1, 1)

    def forward(self, x):
        x = torch.as_tensor(x, dtype=torch.float32)
        shape = (x.shape[0], self.width) + (2,) * (self.rank - 2)
        return (x.reshape(-1, *([1] * (self.rank - 1))) + self.value).expand(shape).clone()


class NotAnEmbedder(torch.nn.Module):
    pass


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return build_tiny_t5(tmp_path_factory.mktemp("t5c") / "t5-v1_1-xxl")


def yaml_conditioner(t5_dir, ucg_rate=0.1, max_length=16):
    # the conditioner_config of cogvideox_2b.yaml, with the tiny T5 folder
    return instantiate_from_config({"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": [{
        "is_trainable": False, "input_key": "txt", "ucg_rate": ucg_rate,
        "target": "sgm.modules.encoders.modules.FrozenT5Embedder",
        "params": {"model_dir": t5_dir, "max_length": max_length}}]}})


def test_conditional_and_zero_unconditional(t5_dir):
    cond = yaml_conditioner(t5_dir)
    t5 = cond.embedders[0]
    assert "embedders.0.transformer.encoder.block.0.layer.0.SelfAttention.q.weight" in cond.state_dict()
    cond.train()
    assert not t5.training and not t5.transformer.training and not any(p.requires_grad for p in cond.parameters())
    batch, batch_uc = {"txt": ["a cat on a roof"]}, {"txt": [""]}
    c, uc = cond.get_unconditional_conditioning(batch, batch_uc=batch_uc, force_uc_zero_embeddings=["txt"])
    assert set(c) == {"crossattn"} and set(uc) == {"crossattn"}
    with torch.no_grad():
        expected = t5(["a cat on a roof"])
    assert c["crossattn"].shape == (1, 16, 64) and torch.equal(c["crossattn"], expected)
    assert torch.equal(uc["crossattn"], torch.zeros(1, 16, 64))
    assert t5.ucg_rate == 0.1  # restored
    # without the force list the unconditional branch is the encoding of the negative prompt
    _, uc2 = cond.get_unconditional_conditioning(batch, batch_uc=batch_uc)
    with torch.no_grad():
        assert torch.equal(uc2["crossattn"], t5([""]))


def test_caption_dropout_zeroes_whole_samples(t5_dir):
    cond = yaml_conditioner(t5_dir, ucg_rate=0.5)
    prompts = ["a dog", "a cat", "snow", "rain", "a bird", "the sea", "a kite", "a fox"]
    with torch.no_grad():
        full = cond.embedders[0](prompts)
    torch.manual_seed(4)
    out = cond({"txt": prompts})["crossattn"]
    torch.manual_seed(4)
    keep = torch.bernoulli(torch.full((8,), 0.5))  # the original's mask draw
    assert 0 < keep.sum() < 8
    torch.testing.assert_close(out, full * keep[:, None, None], rtol=0, atol=0)


def test_vector_concat_keys_and_errors():
    cond = instantiate_from_config({"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": [
        {"target": "test_conditioner.DummyEmb", "input_key": "a", "params": {"rank": 2, "width": 3}},
        {"target": "test_conditioner.DummyEmb", "input_key": "b", "params": {"rank": 2, "width": 2, "value": 5}},
        {"target": "test_conditioner.DummyEmb", "input_key": "a", "params": {"rank": 4, "width": 2}},
    ]}})
    out = cond({"a": [1.0, 2.0], "b": [0.0, 0.0]})
    assert out["vector"].shape == (2, 5) and out["concat"].shape == (2, 2, 2, 2)
    assert out["vector"][:, 3:].eq(5).all() and torch.equal(out["vector"][:, 0], torch.tensor([2.0, 3.0]))
    c, uc = cond.get_unconditional_conditioning({"a": [1.0, 2.0], "b": [0.0, 0.0]}, force_uc_zero_embeddings=["b"])
    assert torch.equal(c["vector"][:, :3], uc["vector"][:, :3]) and uc["vector"][:, 3:].eq(0).all()

    with pytest.raises(UserError, match="must derive from AbstractEmbModel"):
        instantiate_from_config({"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": [
            {"target": "test_conditioner.NotAnEmbedder", "input_key": "a"}]}})
    with pytest.raises(UserError, match="needs 'input_key' or 'input_keys'"):
        instantiate_from_config({"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": [
            {"target": "test_conditioner.DummyEmb"}]}})
