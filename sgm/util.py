"""Config-driven construction: ``instantiate_from_config`` and ``get_obj_from_str`` as in sgm.

The original CogVideoX YAML files name their classes by the module paths of the original ``sat/`` folder
(``dit_video_concat.DiffusionTransformer``, ``vae_modules.autoencoder.…``, ``sgm.modules.…``,
``sat.model.finetune.lora2.LoraMixin``).  :data:`TARGET_ALIASES` maps those top-level module names onto
this package so the files load unchanged.
"""
from __future__ import annotations

import importlib
from typing import Any, Mapping

from sat_cogvideo.errors import UserError

# Top-level module of a `target:` string -> the module that holds it here.
TARGET_ALIASES = {
    "dit_video_concat": "sat_cogvideo.dit_video_concat",
    "diffusion_video": "sat_cogvideo.diffusion_video",
    "vae_modules": "sat_cogvideo.vae_modules",
    "data_video": "sat_cogvideo.data_video",
}


def resolve_target(target: str) -> str:
    """The importable dotted path a config `target:` string stands for."""
    head, _, rest = target.partition(".")
    if head in TARGET_ALIASES:
        return TARGET_ALIASES[head] + ("." + rest if rest else "")
    return target


def get_obj_from_str(string: str, reload: bool = False, where: str | None = None) -> Any:
    """Import ``package.module.Name`` (after alias resolution) and return ``Name``.

    ``where`` names the config key path, for the error message.
    """
    at = f" (at {where})" if where else ""
    if not isinstance(string, str) or "." not in string:
        raise UserError(f"config target {string!r}{at} is not a dotted 'module.Class' path")
    path = resolve_target(string)
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
        if reload:
            module = importlib.reload(module)
    except ModuleNotFoundError as err:
        missing = err.name or module_name
        raise UserError(
            f"unknown config target {string!r}{at}: module {missing!r} cannot be imported; "
            f"check the spelling of the target"
        ) from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise UserError(
            f"unknown config target {string!r}{at}: module {module_name!r} has no {attr!r}"
        ) from None


def instantiate_from_config(config: Mapping, where: str | None = None, **extra_kwargs) -> Any:
    """Build ``config["target"](**config.get("params", {}))``.

    As in sgm, the two special strings ``"__is_first_stage__"`` and ``"__is_unconditional__"`` give ``None``.
    """
    if config is None:
        raise UserError(f"missing config{f' at {where}' if where else ''}: expected a mapping with 'target:'")
    if not isinstance(config, Mapping) or "target" not in config:
        if config in ("__is_first_stage__", "__is_unconditional__"):
            return None
        at = f" at {where}" if where else ""
        raise UserError(f"config{at} has no 'target:' key: expected a mapping with 'target:' and optional 'params:'")
    params = config.get("params", None) or {}
    if not isinstance(params, Mapping):
        at = f"{where}.params" if where else "params"
        raise UserError(f"config key {at} must be a mapping, got {type(params).__name__}")
    cls = get_obj_from_str(config["target"], where=f"{where}.target" if where else "target")
    return cls(**params, **extra_kwargs)


def default(value, fallback):
    """``value`` unless it is None."""
    return fallback if value is None else value


def append_dims(x, target_dims: int):
    """Append trailing singleton dimensions to ``x`` until it has ``target_dims`` dimensions."""
    missing = target_dims - x.ndim
    if missing < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * missing]


# The helpers of the original sgm/util.py that the samplers and the conditioner use.
def append_zero(x):
    """``x`` (1-D) with a single 0 appended."""
    import torch

    return torch.cat([x, x.new_zeros([1])])


def expand_dims_like(x, y):
    """Unsqueeze ``x`` at the end until it has as many dims as ``y``."""
    while x.dim() != y.dim():
        x = x.unsqueeze(-1)
    return x


def disabled_train(self, mode: bool = True):
    """Replacement for ``nn.Module.train`` on frozen modules: does nothing, returns ``self``."""
    return self
