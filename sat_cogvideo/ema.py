"""The EMA weights as their own SAT checkpoint (``--save-ema`` or ``args: save_ema: true``).

The original's optimizer (``sat.ops.FusedEmaAdam``; :class:`sat_cogvideo.train_video.EmaAdamW` on CPU) keeps an
exponential moving average ("shadow") of every trainable parameter, and SAT wrote it beside each checkpoint as
``<iteration>-ema/`` (spec finetune.md section 9), which our checkpointing had dropped.  With ``--save-ema`` every
checkpoint save writes it again, in the original's place::

    <run>/<iteration>-ema/mp_rank_00_model_states.pt   {"module": ..., "iteration": ..., "ema": True}

with the same keys as the training checkpoint (the DiT, LoRA included), the trainable tensors replaced by their
shadow, cast to the parameter dtype.  It loads like any iteration folder: ``--load <run>/<iteration>-ema`` samples
from it (``checkpoint_file`` takes an iteration folder), ``tools/export_sat_lora_weight.py --sat_pt_path
<run>/<iteration>-ema`` exports its LoRA.  ``latest`` keeps naming the plain iteration (the original's final
state as well), so ``--resume`` continues from the training weights.

The shadow lives in DeepSpeed's fp32 optimizer partitions (ZeRO-1/2: flat per-rank partitions; ZeRO-3: per
parameter partitions); ``deepspeed.utils.safe_get_full_optimizer_state(param, "shadow")`` assembles it per
parameter on every rank (a collective, so every rank calls :func:`save_ema`).  Written with the atomic helpers
(temporary name, then rename).
"""
from __future__ import annotations

import os
from typing import Dict

import torch


def add_ema_args(parser):
    group = parser.add_argument_group("ema", "EMA checkpoints (sat_cogvideo.ema)")
    group.add_argument("--save-ema", action="store_true",
                       help="with each checkpoint, write the optimizer's EMA weights to <run>/<iteration>-ema/")
    return parser


def _link_optimizer_state(engine) -> None:
    """ZeRO-1/2 link each parameter to its optimizer-state fragments once, right after the first parameter group's
    first step: the other groups (SAT's no-weight-decay group of a full finetune) have no state yet then, and a
    resumed run that saves before stepping has none at all.  Link again, now that every group holds its state."""
    opt = getattr(engine, "optimizer", None)
    link = getattr(opt, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        opt._hp_optimizer_states_linked = False
        link()


def ema_state_dict(engine, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``state_dict`` (the training checkpoint's ``module``) with every trainable parameter replaced by its EMA
    shadow.  Every rank must call it (the shadow is gathered across ZeRO partitions)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    _link_optimizer_state(engine)
    module = engine.module if hasattr(engine, "module") else engine
    out = dict(state_dict)
    missing = []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        shadow = safe_get_full_optimizer_state(param, "shadow")
        if shadow is None:
            missing.append(name)
            continue
        if name in out:
            out[name] = shadow.detach().reshape(out[name].shape).to(dtype=out[name].dtype, device="cpu").clone()
    if missing:
        from sat_cogvideo.errors import UserError

        raise UserError(f"--save-ema: the optimizer keeps no EMA ('shadow') for {missing[0]} and {len(missing) - 1} "
                        f"more: use deepspeed.optimizer.type sat.ops.FusedEmaAdam (the CogVideoX configs' optimizer)")
    return out


def save_ema(iteration: int, engine, module_state: Dict[str, torch.Tensor], folder: str) -> str:
    """Write ``<folder>/<iteration>-ema/mp_rank_00_model_states.pt`` (rank 0 writes; every rank gathers)."""
    from sat_cogvideo.atomic import atomic_torch_save

    sd = ema_state_dict(engine, module_state)
    path = os.path.join(folder, f"{iteration}-ema", "mp_rank_00_model_states.pt")
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        atomic_torch_save({"module": sd, "iteration": int(iteration), "ema": True}, path)
    return path
