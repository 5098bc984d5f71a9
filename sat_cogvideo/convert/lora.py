"""SAT LoRA <-> diffusers LoRA, and merging a LoRA into the base SAT weights (the original's
``tools/export_sat_lora_weight.py``, for every family).

SAT's ``LoraMixin`` wraps, in every layer ``i`` of its ``layer_range``, the fused q/k/v projection (three rank-r
adapters, one per third of the output) and the attention output projection.  Their tensors map one to one to
diffusers/PEFT LoRA tensors (:data:`LORA_KEY_MAP`), e.g.::

    model.diffusion_model.transformer.layers.5.attention.query_key_value.matrix_B.2
    -> transformer.transformer_blocks.5.attn1.to_v.lora_B.weight

Scaling: SAT adds ``(lora_alpha / r) * B A x``.  The exported file, like the original tool's, holds the factors
unchanged and no alpha, so PEFT uses scale 1 and the adapter weight must be ``lora_alpha / r``
(``pipe.set_adapters([name], [lora_alpha / r])``); with ``scale_into_weights=True`` the B factors are multiplied by
``lora_alpha / r`` instead and the adapter is used at weight 1.

Merging computes ``W + concat_j(B_j A_j) * lora_alpha / r`` in float32 (the original ``merge_linear_lora``), so the
merged checkpoint has plain ``query_key_value.weight`` / ``dense.weight`` keys, loads into a model built without
``lora_config`` and converts to diffusers.  The original offers no merge (its README says it cannot be done).

Public API::

    LORA_KEY_MAP                                         # ((SAT suffix, diffusers suffix), ...)
    find_lora_layers(state_dict) -> dict                 # {layer key prefix: number of factor pairs}
    lora_rank(state_dict) -> int
    export_lora_sat_to_diffusers(sd, *, num_layers=None, lora_alpha=1.0, scale_into_weights=False,
                                 prefix="transformer.") -> dict
    diffusers_lora_to_sat(sd, *, lora_alpha=1.0, scaled_into_weights=False) -> dict
    merge_lora_state_dict(sd, *, lora_alpha=1.0, base=None) -> dict
    split_lora_state_dict(sd) -> (base_sd, lora_sd)
    save_diffusers_lora(sd, folder, weight_name="pytorch_lora_weights.safetensors") -> path
    lora_mismatch_message(model_keys, checkpoint_keys, source="checkpoint") -> str | None
"""
from __future__ import annotations

import os
import re
from typing import Dict, Mapping, Optional, Tuple

import torch

from sat_cogvideo.atomic import atomic_path
from sat_cogvideo.checkpoint import SAT_PREFIX
from sat_cogvideo.errors import UserError

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"

# (SAT suffix after ``transformer.layers.{i}.``, diffusers suffix after ``transformer_blocks.{i}.``)
LORA_KEY_MAP: Tuple[Tuple[str, str], ...] = (
    ("attention.query_key_value.matrix_A.0", "attn1.to_q.lora_A.weight"),
    ("attention.query_key_value.matrix_A.1", "attn1.to_k.lora_A.weight"),
    ("attention.query_key_value.matrix_A.2", "attn1.to_v.lora_A.weight"),
    ("attention.query_key_value.matrix_B.0", "attn1.to_q.lora_B.weight"),
    ("attention.query_key_value.matrix_B.1", "attn1.to_k.lora_B.weight"),
    ("attention.query_key_value.matrix_B.2", "attn1.to_v.lora_B.weight"),
    ("attention.dense.matrix_A.0", "attn1.to_out.0.lora_A.weight"),
    ("attention.dense.matrix_B.0", "attn1.to_out.0.lora_B.weight"),
)
_SAT_LAYER = re.compile(r"^(?P<pre>.*?)transformer\.layers\.(?P<i>\d+)\.(?P<suffix>attention\..+)$")
_FACTOR = re.compile(r"^(?P<layer>.+)\.matrix_(?P<ab>[AB])\.(?P<j>\d+)$")
_HF_LAYER = re.compile(r"^(?P<pre>.*?)transformer_blocks\.(?P<i>\d+)\.(?P<suffix>attn1\..+)$")


def _dit_view(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Bare DiT keys: engine keys lose ``model.diffusion_model.``; other engine keys (VAE, T5) are dropped."""
    if any(k.startswith(SAT_PREFIX) for k in state_dict):
        return {k[len(SAT_PREFIX):]: v for k, v in state_dict.items() if k.startswith(SAT_PREFIX)}
    return dict(state_dict)


def find_lora_layers(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, int]:
    """``{wrapped layer key: number of (A, B) pairs}`` of the LoRA factors in ``state_dict`` (any prefix)."""
    parts: Dict[str, set] = {}
    for key in state_dict:
        m = _FACTOR.match(key)
        if m:
            parts.setdefault(m["layer"], set()).add(int(m["j"]))
    return {layer: len(js) for layer, js in sorted(parts.items())}


def lora_rank(state_dict: Mapping[str, torch.Tensor]) -> int:
    """The rank ``r`` (rows of every ``matrix_A``); a mix of ranks is a :class:`UserError`."""
    ranks = {tuple(v.shape)[0] for k, v in state_dict.items() if _FACTOR.match(k) and ".matrix_A." in k}
    if not ranks:
        raise UserError("the state dict holds no LoRA factors (no …matrix_A.N / matrix_B.N keys)")
    if len(ranks) != 1:
        raise UserError(f"the LoRA factors have different ranks {sorted(ranks)}; expected one r")
    return ranks.pop()


def export_lora_sat_to_diffusers(state_dict: Mapping[str, torch.Tensor], *, num_layers: Optional[int] = None,
                                 lora_alpha: float = 1.0, scale_into_weights: bool = False,
                                 prefix: str = "transformer.") -> Dict[str, torch.Tensor]:
    """The LoRA factors of a SAT state dict (engine or bare DiT keys) as a diffusers LoRA state dict.

    Every wrapped layer must have all eight tensors; with ``num_layers`` every layer ``0..num_layers-1`` must be
    present (the original insisted on exactly 240 tensors, i.e. CogVideoX-2B).  Tensors keep their dtype; with
    ``scale_into_weights`` the B factors are multiplied by ``lora_alpha / r``.
    """
    sd = _dit_view(state_dict)
    by_suffix = dict(LORA_KEY_MAP)
    out: Dict[str, torch.Tensor] = {}
    layers: Dict[int, set] = {}
    r = lora_rank(sd)
    scale = float(lora_alpha) / r
    for key, value in sd.items():
        if not _FACTOR.match(key):
            continue
        m = _SAT_LAYER.match(key)
        if m is None or m["suffix"] not in by_suffix:
            raise UserError(f"LoRA tensor {key} is not on a DiT attention layer (only query_key_value and dense are "
                            f"adapted by SAT's LoraMixin); cannot export it to diffusers")
        i = int(m["i"])
        tensor = value.detach()
        if scale_into_weights and ".matrix_B." in key:
            tensor = (tensor.float() * scale).to(value.dtype)
        out[f"{prefix}transformer_blocks.{i}.{by_suffix[m['suffix']]}"] = tensor.contiguous()
        layers.setdefault(i, set()).add(m["suffix"])
    complete = set(by_suffix)
    for i, found in sorted(layers.items()):
        if found != complete:
            missing = sorted(complete - found)
            raise UserError(f"layer {i} has an incomplete LoRA ({len(found)} of 8 tensors; missing "
                            f"transformer.layers.{i}.{missing[0]})")
    if num_layers is not None and set(layers) != set(range(num_layers)):
        missing = sorted(set(range(num_layers)) - set(layers))
        raise UserError(f"expected LoRA on all {num_layers} layers ({8 * num_layers} tensors), found "
                        f"{len(layers)} layers; missing layer {missing[0] if missing else '?'}")
    return out


def diffusers_lora_to_sat(state_dict: Mapping[str, torch.Tensor], *, lora_alpha: float = 1.0,
                          scaled_into_weights: bool = False, prefix: str = SAT_PREFIX) -> Dict[str, torch.Tensor]:
    """Inverse of :func:`export_lora_sat_to_diffusers` (``transformer.`` prefix optional)."""
    by_hf = {hf: sat for sat, hf in LORA_KEY_MAP}
    out = {}
    r = None
    for key, value in state_dict.items():
        if key.endswith("lora_A.weight"):
            r = value.shape[0]
    for key, value in state_dict.items():
        m = _HF_LAYER.match(key)
        if m is None or m["suffix"] not in by_hf:
            raise UserError(f"{key} is not a CogVideoX attention LoRA tensor (expected transformer_blocks.N.attn1.to_q/"
                            f"to_k/to_v/to_out.0.lora_A/lora_B.weight)")
        tensor = value
        if scaled_into_weights and key.endswith("lora_B.weight"):
            tensor = (value.float() / (float(lora_alpha) / r)).to(value.dtype)
        out[f"{prefix}transformer.layers.{int(m['i'])}.{by_hf[m['suffix']]}"] = tensor
    return out


def split_lora_state_dict(state_dict: Mapping[str, torch.Tensor]
                          ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """``(base, lora)``: base weights with the un-adapted names (``X.original.weight`` -> ``X.weight``), and the
    LoRA factors.  Keys keep their prefix."""
    base, lora = {}, {}
    for key, value in state_dict.items():
        if _FACTOR.match(key):
            lora[key] = value
        elif ".original." in key:
            base[key.replace(".original.", ".")] = value
        else:
            base[key] = value
    return base, lora


def merge_lora_state_dict(state_dict: Mapping[str, torch.Tensor], *, lora_alpha: float = 1.0,
                          base: Optional[Mapping[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """Fold every LoRA of ``state_dict`` into its layer: ``W + concat_j(B_j @ A_j) * lora_alpha / r``.

    ``state_dict`` is a SAT state dict (any prefix) with ``X.original.weight``/``bias`` beside the factors, as SAT
    and our finetuning save them; or only the factors, with the base weights (``X.weight`` or
    ``X.original.weight``) in ``base``.  Returns a state dict without LoRA keys (``X.weight``, ``X.bias``).
    The sum is computed in float32 and cast back to the weight's dtype; devices are kept.
    """
    merged, lora = split_lora_state_dict(state_dict)
    if base is not None:
        base_plain, _ = split_lora_state_dict(base)
        for key, value in base_plain.items():
            merged.setdefault(key, value)
    if not lora:
        raise UserError("nothing to merge: the checkpoint holds no LoRA factors (matrix_A/matrix_B keys)")
    r = lora_rank(lora)
    scale = float(lora_alpha) / r
    for layer, n_parts in find_lora_layers(lora).items():
        w_key = f"{layer}.weight"
        if w_key not in merged:
            raise UserError(f"no base weight {layer}.original.weight for the LoRA of {layer}: give the base checkpoint")
        weight = merged[w_key]
        try:
            deltas = [lora[f"{layer}.matrix_B.{j}"].float() @ lora[f"{layer}.matrix_A.{j}"].float()
                      for j in range(n_parts)]
        except KeyError as err:
            raise UserError(f"incomplete LoRA for {layer}: missing {err.args[0]}") from None
        delta = torch.cat(deltas, dim=0) * scale
        if tuple(delta.shape) != tuple(weight.shape):
            raise UserError(f"LoRA of {layer} gives a {list(delta.shape)} update for a {list(weight.shape)} weight "
                            f"(checkpoint and base model do not match)")
        merged[w_key] = (weight.float() + delta.to(weight.device)).to(weight.dtype)
    return merged


def save_diffusers_lora(state_dict: Mapping[str, torch.Tensor], folder: str,
                        weight_name: str = LORA_WEIGHT_NAME) -> str:
    """Write ``<folder>/pytorch_lora_weights.safetensors`` (metadata ``{"format": "pt"}``) atomically."""
    from safetensors.torch import save_file

    path = os.path.join(folder, weight_name)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in state_dict.items()}, tmp, metadata={"format": "pt"})
    return path


def _run_folder(path: str) -> str | None:
    """The run folder of a checkpoint path (the folder holding ``training_config.yaml``), if any."""
    path = os.path.abspath(path)
    for candidate in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
        if os.path.isfile(os.path.join(candidate, "training_config.yaml")):
            return candidate
    return None


def lora_params_from_run(path: str) -> dict:
    """``lora_config.params`` of the run's ``training_config.yaml`` ({} when there is none)."""
    folder = _run_folder(path)
    if folder is None:
        return {}
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.load(os.path.join(folder, "training_config.yaml"))
        lora = OmegaConf.select(cfg, "model.network_config.params.modules.lora_config.params")
    except Exception:
        return {}
    return dict(OmegaConf.to_container(lora, resolve=False)) if lora is not None else {}


def lora_mismatch_message(model_keys, checkpoint_keys, source: str = "checkpoint") -> Optional[str]:
    """One clear line when a LoRA checkpoint meets a model built without ``lora_config`` (the original then loads
    with ``force_inference`` and silently produces garbage), or when a LoRA model gets a checkpoint whose LoRA
    factors are partial; ``None`` when LoRA is not the problem.  Keys may carry any common prefix."""
    model_lora = any(_FACTOR.match(k) for k in model_keys)
    ckpt_factors = [k for k in checkpoint_keys if _FACTOR.match(k)]
    if ckpt_factors and not model_lora:
        return (f"{source} is a LoRA checkpoint ({len(ckpt_factors)} LoRA tensors such as {sorted(ckpt_factors)[0]}) "
                f"but the model config has no lora_config: use the *_lora.yaml model config (network_config.params."
                f"modules.lora_config with the run's r), or merge the LoRA first with "
                f"tools/export_sat_lora_weight.py --sat_pt_path <run> --merge <folder>")
    if model_lora and ckpt_factors:
        model_factors = {k.split("transformer.layers.", 1)[-1] for k in model_keys if _FACTOR.match(k)}
        have = {k.split("transformer.layers.", 1)[-1] for k in ckpt_factors}
        if have != model_factors:
            missing = sorted(model_factors - have)
            extra = sorted(have - model_factors)
            what = f"lacks {missing[0]}" if missing else f"has {extra[0]} that the model does not"
            return (f"{source}: its LoRA does not match the model's lora_config ({what}); check r and layer_range "
                    f"against the run's training_config.yaml")
    return None
