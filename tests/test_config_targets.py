"""Every `target:` in the shipped configs resolves to the module it should, and unknown targets fail clearly."""
import glob
import importlib
import os

import pytest
from omegaconf import OmegaConf

from sat_cogvideo.arguments import check_targets, iter_targets
from sat_cogvideo.errors import UserError
from sgm.util import get_obj_from_str, instantiate_from_config, resolve_target

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))

EXPECTED_PREFIX = {
    "dit_video_concat.": "sat_cogvideo.dit_video_concat.",
    "vae_modules.": "sat_cogvideo.vae_modules.",
    "data_video.": "sat_cogvideo.data_video.",
    "diffusion_video.": "sat_cogvideo.diffusion_video.",
    "sgm.": "sgm.",
    "sat.": "sat.",
    "torch.": "torch.",
}


def all_targets():
    for path in CONFIGS:
        for where, target in iter_targets(OmegaConf.load(path)):
            yield os.path.relpath(path, ROOT), where, target


def test_targets_found():
    targets = {t for _, _, t in all_targets()}
    assert "dit_video_concat.DiffusionTransformer" in targets
    assert "sat.model.finetune.lora2.LoraMixin" in targets
    assert "data_video.SFTDataset" in targets
    assert len(targets) >= 20


def unique_targets():
    seen = {}
    for path, where, target in all_targets():
        seen.setdefault(target, (path, where))
    return [(path, where, target) for target, (path, where) in sorted(seen.items())]


@pytest.mark.parametrize("path,where,target", unique_targets(), ids=lambda x: str(x))
def test_target_resolves(path, where, target):
    resolved = resolve_target(target)
    prefix = next(p for p in EXPECTED_PREFIX if target.startswith(p))
    assert resolved.startswith(EXPECTED_PREFIX[prefix])
    assert resolved.endswith(target.split(".", 1)[1])
    module_name = resolved.rpartition(".")[0]
    # every module is built: a target whose module is missing (a typo in a shipped config) fails here
    importlib.import_module(module_name)
    obj = get_obj_from_str(target, where=where)
    assert callable(obj)


def test_unknown_target_names_key_path():
    cfg = OmegaConf.create({"model": {"network_config": {"target": "dit_video_concat.NoSuchNet"}}})
    with pytest.raises(UserError, match=r"unknown config target 'dit_video_concat.NoSuchNet' "
                                        r"\(at model\.network_config\.target\)"):
        check_targets(cfg)
    cfg = OmegaConf.create({"model": {"loss": {"target": "nosuchpkg.mod.Cls"}}})
    with pytest.raises(UserError, match=r"'nosuchpkg.mod.Cls' \(at model\.loss\.target\): module 'nosuchpkg'"):
        check_targets(cfg)


def test_instantiate_from_config():
    obj = instantiate_from_config({"target": "torch.nn.Linear", "params": {"in_features": 3, "out_features": 2}})
    assert tuple(obj.weight.shape) == (2, 3)
    assert instantiate_from_config("__is_unconditional__") is None
    with pytest.raises(UserError, match="has no 'target:' key"):
        instantiate_from_config({"params": {}}, where="model.first_stage_config")
    with pytest.raises(UserError, match=r"model\.x\.params must be a mapping"):
        instantiate_from_config({"target": "torch.nn.Identity", "params": [1]}, where="model.x")
