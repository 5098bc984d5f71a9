"""Finetuning CLI (maps to the original ``sat/train_video.py``): LoRA or full SFT through SAT's training loop.

``python -m sat_cogvideo.train_video --base configs/cogvideox_2b_lora.yaml configs/sft.yaml`` (or
``bash finetune.sh ...``) parses the configs with :func:`sat_cogvideo.arguments.get_args`, starts
torch.distributed, and runs SwissArmyTransformer's ``training_main`` with this module's ``forward_step``,
``forward_step_eval`` and the dataset factory of ``data.target`` (``SFTDataset``), on DeepSpeed (ZeRO stage, fp16 /
bf16 / fp32 and gradient clipping from the ``deepspeed:`` section).  LoRA or full finetuning is chosen by the model
config alone (``lora_config`` + ``not_trainable_prefixes: [all]``, as the original).

SAT's loop runs unchanged; a few of its module-level functions are replaced while it runs
(:func:`patched_sat_loop`), each for a stated reason:

* ``save_checkpoint`` / ``load_checkpoint``: the original writes the frozen VAE and T5 into every checkpoint (tens
  of GB) and no optimizer state, so runs cannot resume.  Ours writes the SAT layout
  (``<save>/<experiment>-MM-DD-HH-MM/<iteration>/mp_rank_00_model_states.pt`` and ``latest``) with only the DiT
  (``model.diffusion_model.*``, LoRA included) plus DeepSpeed's per-rank ZeRO optimizer shards, the LR schedule and
  per-rank RNG states; each iteration folder is written under a temporary name and renamed, then ``latest`` is
  replaced atomically.  Loading a base checkpoint is strict for the DiT (:mod:`sat_cogvideo.checkpoint`) and ignores
  the VAE/T5 keys that the original's finetune checkpoints hold (VAE and T5 come from their own files).
* ``setup_model_untrainable_params_and_optimizer``: the same steps as SAT's, but ``sat.ops.FusedEmaAdam`` (a CUDA
  kernel) becomes :class:`EmaAdamW` (same update rule, pure PyTorch) on CPU, a dotted optimizer path of ours is
  accepted, and on resume the ZeRO optimizer shards are loaded after ``deepspeed.initialize``.
* ``make_loaders``: on resume the train loader starts at the saved data position.
* ``train``: on resume the LR schedule is restored to its saved step.
* ``Timers``, ``report_memory``: SAT's call ``torch.cuda.synchronize`` / CUDA memory stats, which fail on CPU.
* ``print_args``: SAT writes TensorBoard files (and ``--save-args``) to ``<summary_dir>/runs/``, and its
  ``summary_dir`` default "" means the working folder; an unset ``summary_dir`` becomes the run folder, so the
  events land in ``<run>/runs/<experiment>/`` (``print_args`` runs just before the summary writer is made).
* ``datetime``: every rank uses rank 0's clock for the run-folder name (ranks crossing a minute boundary would
  otherwise write one checkpoint into two folders).
* ``train_step``: after each step, the loss curve and the validation videos (:mod:`sat_cogvideo.validation`).
* ``get_model``: under ZeRO-3 the engine is built whole and partitioned by ``deepspeed.initialize`` (SAT's
  ``deepspeed.zero.Init`` path cannot build its own parallel linear layers); the frozen VAE/T5 stay outside ZeRO,
  and checkpoints gather the DiT (:func:`_zero3_checkpoint_state_dict`).

Scale options (docs/finetune.md): ``--cache-latents DIR`` (:mod:`sat_cogvideo.latent_cache`), ``--validation-prompts``
(:mod:`sat_cogvideo.validation`), ``--save-ema`` (:mod:`sat_cogvideo.ema`), ``configs/sft_zero3*.yaml``.

What a run knows beyond SAT's ``args`` (the resumed run, its pending RNG states, the iterations saved so far, whether
``training_config.yaml`` was written) is one :class:`RunState`, made in :func:`run` and handed to these pieces.

Resume: ``--resume`` (the newest run ``<save>/<experiment_name>-*``), ``--resume RUN_FOLDER``, or ``load:`` pointing
at one of our run folders continues its iteration count, optimizer (moments, EMA shadow, step), LR schedule, RNG and
data position in the same folder; on CPU a run killed between saves and resumed ends with the same weights as an
uninterrupted one.  Same number of processes and the same ``deepspeed:`` section are required.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import random
import shutil
import sys
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Dict, Optional, Set

import numpy as np
import torch

from sat_cogvideo.atomic import atomic_torch_save, atomic_write_text
from sat_cogvideo.checkpoint import SAT_PREFIX, load_torch_file, trusting
from sat_cogvideo.distributed import is_cuda
from sat_cogvideo.errors import UserError, run_cli

RESUME_KEY = "sat_cogvideo_resume"
RESUME_MARKER = "sat_cogvideo_resume.json"
_LR_FIELDS = ("start_lr", "warmup_iter", "init_step", "num_iters", "end_iter", "decay_style", "decay_ratio",
              "auto_warmup_steps", "auto_warmup_rate", "lr_scale")


@dataclass
class RunState:
    """What one :func:`run` knows beyond SAT's ``args``, handed to the replaced SAT pieces (:func:`patched_sat_loop`).

    ``resume``: the resumed run's information (:func:`find_run`), or None for a new run; ``pending_rng``: the saved
    RNG states, applied at the first training step (after SAT has seeded everything); ``saved_iterations``: the
    iterations this run has saved (SAT's final save repeats the last periodic one); ``training_config_written``:
    whether ``<save>/training_config.yaml`` has been dealt with; ``validator``/``curve``: validation videos and the
    loss curve (:mod:`sat_cogvideo.validation`).
    """

    resume: Optional[dict] = None
    pending_rng: Optional[dict] = None
    saved_iterations: Set[str] = field(default_factory=set)
    training_config_written: bool = False
    validator: Any = None  # sat_cogvideo.validation.Validator with --validation-prompts
    curve: Any = None  # sat_cogvideo.validation.LossCurve, made at the first step (rank 0)


# ============================================================================================================
# optimizer


class EmaAdamW(torch.optim.Optimizer):
    """AdamW with an EMA shadow of every parameter: the update rule of SAT's CUDA ``sat.ops.FusedEmaAdam``.

    Per ``step()``: ``k += 1``; ``d = min(ema_decay, (1 + k) / (10 + k))`` (``ema_decay`` if not
    ``use_num_upates``); per parameter, with ``t`` its step count::

        adam_w_mode:  m = b1 m + (1-b1) g ;  v = b2 v + (1-b2) g^2
                      p = p - lr * (m/(1-b1^t) / (sqrt(v/(1-b2^t)) + eps) + wd * p)
        L2 mode:      g = g + wd * p first, and no wd term in the update
        shadow = d * shadow + (1 - d) * p      (shadow starts as p)

    The math runs in float32; state tensors have the parameter's dtype (under ZeRO, the fp32 master partition).
    ``k`` counts ``step()`` calls: ZeRO-1/2 steps each parameter group on its own, so a full finetune (weights; biases
    and norms) advances ``k`` twice per iteration, as the original's ``FusedEmaAdam`` under DeepSpeed.
    ``copy_to()``, ``store(params)`` and ``restore(params)`` as the original.
    """

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, adam_w_mode=True,
                 weight_decay=0.0, amsgrad=False, set_grad_none=True, ema_decay=0.9999, use_num_upates=True):
        if amsgrad:
            raise UserError("EmaAdamW (FusedEmaAdam) does not support amsgrad: remove it from deepspeed.optimizer")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=tuple(betas), eps=eps,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.adam_w_mode = bool(adam_w_mode)
        self.set_grad_none = set_grad_none
        self.ema_decay = float(ema_decay)
        self.num_updates = 0 if use_num_upates else -1
        self.collected_params = []

    def zero_grad(self, set_to_none: bool = True):
        super().zero_grad(set_to_none=self.set_grad_none)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        decay = self.ema_decay
        if self.num_updates >= 0:
            self.num_updates += 1
            decay = min(self.ema_decay, (1 + self.num_updates) / (10 + self.num_updates))
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("EmaAdamW does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = group.get("step", 0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    state["shadow"] = p.detach().clone()
                state["step"] += 1
                t = state["step"]
                c1 = 1 - beta1 ** t if group["bias_correction"] else 1.0
                c2 = 1 - beta2 ** t if group["bias_correction"] else 1.0
                g = p.grad.float()
                w = p.float()
                m, v, s = state["exp_avg"].float(), state["exp_avg_sq"].float(), state["shadow"].float()
                if not self.adam_w_mode:
                    g = g + wd * w
                m.mul_(beta1).add_((1 - beta1) * g)
                v.mul_(beta2).add_((1 - beta2) * g * g)
                update = (m / c1) / ((v / c2).sqrt() + eps)
                if self.adam_w_mode:
                    update = update + wd * w
                w = w - lr * update
                s = decay * s + (1 - decay) * w
                p.copy_(w)
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
                state["shadow"].copy_(s)
        return loss

    def state_dict(self):
        sd = super().state_dict()
        sd["num_updates"] = self.num_updates
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        self.num_updates = state_dict.pop("num_updates", self.num_updates)
        super().load_state_dict(state_dict)

    def copy_to(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad and "shadow" in self.state[p]:
                    p.data.copy_(self.state[p]["shadow"])

    def store(self, parameters):
        self.collected_params = [p.clone() for p in parameters]

    def restore(self, parameters):
        for saved, p in zip(self.collected_params, parameters):
            p.data.copy_(saved.data)


def resolve_optimizer(args):
    """The client optimizer for DeepSpeed from ``deepspeed.optimizer`` (removing that entry, as SAT does), or None
    to let DeepSpeed build a type it knows (``Adam``, ``AdamW``, ...)."""
    from importlib import import_module

    opt = args.deepspeed_config.get("optimizer") or {}
    name = opt.get("type", "") or ""
    params = dict(opt.get("params") or {})
    if not name or "." not in name:
        return None
    if name == "sat.ops.FusedEmaAdam" and not is_cuda(args.device):
        cls = EmaAdamW  # the CUDA kernel cannot run here; same update rule
    else:
        module, _, attr = name.rpartition(".")
        try:
            cls = getattr(import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise UserError(f"deepspeed.optimizer.type {name!r} cannot be imported ({err})") from None
    del args.deepspeed_config["optimizer"]
    print(f"Using optimizer {cls.__module__}.{cls.__name__} ({name})", flush=True)
    return partial(cls, **params)


# ============================================================================================================
# data


def to_device(batch: Dict[str, Any], device) -> Dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def broad_cast_batch(batch: Dict[str, Any], device) -> None:
    """Send the batch of the first rank of each model-parallel group to the others (original ``broad_cast_batch``)."""
    from sat import mpu

    if mpu.get_model_parallel_world_size() == 1:
        return
    group = mpu.get_model_parallel_group()
    src = mpu.get_model_parallel_src_rank() if hasattr(mpu, "get_model_parallel_src_rank") else \
        torch.distributed.get_rank() - mpu.get_model_parallel_rank()
    if mpu.get_model_parallel_rank() == 0:
        meta = [batch["txt"], [batch["mp4"].shape, batch["fps"].shape, batch["num_frames"].shape]]
    else:
        meta = [None, None]
    torch.distributed.broadcast_object_list(meta, src=src, group=group)
    if mpu.get_model_parallel_rank() != 0:
        batch["txt"] = meta[0]
        batch["mp4"] = torch.zeros(meta[1][0], dtype=torch.float32, device=device)
        batch["fps"] = torch.zeros(meta[1][1], dtype=torch.long, device=device)
        batch["num_frames"] = torch.zeros(meta[1][2], dtype=torch.long, device=device)
    for key in ("mp4", "fps", "num_frames"):
        torch.distributed.broadcast(batch[key], src=src, group=group)


def write_training_config(args, state: RunState) -> None:
    """``<save>/training_config.yaml``: the merged ``--base`` configs (rank 0, once, atomically)."""
    if not args.save or state.training_config_written:
        return
    state.training_config_written = True
    if torch.distributed.get_rank() != 0:
        return
    path = os.path.join(args.save, "training_config.yaml")
    if os.path.exists(path):
        return
    from omegaconf import OmegaConf

    atomic_write_text(path, OmegaConf.to_yaml(args.config, resolve=True))


def forward_step(data_iterator, model, args, timers, data_class=None, state: Optional[RunState] = None):
    """One training micro-step: next batch -> ``model.shared_step(batch)`` -> ``(loss, {"loss": loss})``."""
    from sat import mpu

    state = state if state is not None else RunState()
    _apply_pending_rng(state)
    if mpu.get_model_parallel_rank() == 0:
        timers("data loader").start()
        batch = next(data_iterator)
        timers("data loader").stop()
        batch = to_device(batch, args.device)
        write_training_config(args, state)
    else:
        batch = {"mp4": None, "fps": None, "num_frames": None, "txt": None}
    batch["global_step"] = args.iteration
    broad_cast_batch(batch, args.device)
    loss, loss_dict = model.shared_step(batch)
    return loss, loss_dict


def forward_step_eval(data_iterator, model, args, timers, only_log_video_latents=False, data_class=None):
    """Evaluation micro-step: like :func:`forward_step`, and on data-parallel rank 0 log sampled videos."""
    from sat import mpu

    if mpu.get_model_parallel_rank() == 0:
        timers("data loader").start()
        batch = next(data_iterator)
        timers("data loader").stop()
        batch = to_device(batch, args.device)
        if batch["mp4"].ndim == 6:  # (b, v, ...) -> (b*v, ...), texts reordered as the original
            b, v = batch["mp4"].shape[:2]
            batch["mp4"] = batch["mp4"].reshape(b * v, *batch["mp4"].shape[2:])
            batch["txt"] = [batch["txt"][j][i] for i in range(b) for j in range(v)]
    else:
        batch = {"mp4": None, "fps": None, "num_frames": None, "txt": None}
    batch["global_step"] = args.iteration
    broad_cast_batch(batch, args.device)
    if mpu.get_data_parallel_rank() == 0:
        log_video(batch, model, args, only_log_video_latents=only_log_video_latents)
    loss, loss_dict = model.shared_step(batch)
    return loss, {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in loss_dict.items()}


def log_video(batch, model, args, only_log_video_latents=False) -> None:
    """Write the batch captions, then sampled latents (``latent.pt``) or videos, under ``<save>``."""
    from sat_cogvideo.media import write_video

    if not args.save:
        return
    step = args.iteration
    atomic_write_text(os.path.join(args.save, "video_texts", f"{step:08d}"), "\n".join(batch["txt"]) + "\n")
    module = model.module if hasattr(model, "module") else model
    with torch.no_grad():
        videos = module.log_video(batch, only_log_video_latents=only_log_video_latents)
    if torch.distributed.get_rank() != 0:
        return
    root = os.path.join(args.save, "video")
    if only_log_video_latents:
        atomic_torch_save(videos["latents"].cpu(), os.path.join(root, "latents", f"latents_gs-{step:06d}", "latent.pt"))
        return
    fps = int(batch["fps"][0]) if isinstance(batch.get("fps"), torch.Tensor) else 8
    for key, value in videos.items():
        if not isinstance(value, torch.Tensor) or (key == "inputs" and "txt_emb" in batch):
            continue  # a cached batch's inputs are VAE moments, not pixels
        value = ((value.float().clamp(-1.0, 1.0) + 1.0) / 2.0).cpu()
        for i, video in enumerate(value):
            write_video(os.path.join(root, f"{key}_gs-{step:06d}", f"{i:06d}.mp4"), video, fps=fps)


class SkipBatchSampler:
    """A batch sampler that drops its first ``skip`` batches once (indices only, nothing is decoded)."""

    def __init__(self, batch_sampler, skip: int):
        self.batch_sampler = batch_sampler
        self.skip = int(skip)

    def __iter__(self):
        it = iter(self.batch_sampler)
        for _ in range(self.skip):
            if next(it, None) is None:
                break
        self.skip = 0
        yield from it

    def __len__(self):
        return len(self.batch_sampler)


# ============================================================================================================
# checkpoints


def _rng_state() -> dict:
    """Every RNG's state as tensors and plain numbers, so that it reloads with ``weights_only=True``."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(words), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys  # files of earlier versions hold an array
    np.random.set_state((kind, keys.astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def _apply_pending_rng(state: RunState) -> None:
    """Restore the resumed run's RNG states once (the first training step after a resume)."""
    if state.pending_rng is not None:
        _set_rng_state(state.pending_rng)
        state.pending_rng = None


def checkpoint_state_dict(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """What our checkpoints store of the engine: the DiT (``model.diffusion_model.*``, LoRA included) and any other
    trainable parameter; never the frozen VAE (``first_stage_model.*``) or T5 (``conditioner.*``)."""
    sd = module.state_dict()
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    return {k: v for k, v in sd.items() if k.startswith(SAT_PREFIX) or k in trainable}


def save_checkpoint(iteration, model, optimizer, lr_scheduler, args, state: Optional[RunState] = None) -> None:
    """Replacement for SAT's ``save_checkpoint`` (SAT's signature plus the run's state; every rank calls it)."""
    dist = torch.distributed
    tag = str(iteration)
    state = state if state is not None else RunState()
    if tag in state.saved_iterations:  # SAT's final save repeats the last periodic one
        return
    state.saved_iterations.add(tag)
    tmp_tag = f".partial-{tag}"
    tmp_dir = os.path.join(args.save, tmp_tag)
    final_dir = os.path.join(args.save, tag)
    if dist.get_rank() == 0:
        os.makedirs(args.save, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
    dist.barrier()
    resume = {
        "version": 1,
        "iteration": int(iteration),
        "lr_scheduler": {k: getattr(lr_scheduler, k) for k in _LR_FIELDS if hasattr(lr_scheduler, k)},
        "dp_world_size": torch.distributed.get_world_size(),
        "train_iters": args.train_iters,
    }
    client = {"iteration": int(iteration), "client_lr_scheduler": lr_scheduler.state_dict(), RESUME_KEY: resume}
    model.save_checkpoint(args.save, tag=tmp_tag, client_state=client, save_latest=False,
                          exclude_frozen_parameters=True)
    torch.save(_rng_state(), os.path.join(tmp_dir, f"rng_state_rank{dist.get_rank():02d}.pt"))
    if getattr(args, "save_ema", False):  # every rank: the EMA shadow is gathered across ZeRO partitions
        from sat_cogvideo.ema import save_ema

        save_ema(int(iteration), model, model.module_state_dict(), args.save)
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(tmp_dir, RESUME_MARKER), "w") as f:
            json.dump(resume, f, indent=1)
        _sat_model_states_name(tmp_dir)
        if os.path.exists(final_dir):  # a re-save of the same iteration: replace it
            old = os.path.join(args.save, f".old-{tag}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final_dir, old)
            os.replace(tmp_dir, final_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_dir, final_dir)
        atomic_write_text(os.path.join(args.save, "latest"), tag)
        atomic_write_text(os.path.join(args.save, "model_config.json"),
                          json.dumps({"model_class": "SATVideoDiffusionEngine"}, indent=4))
        print(f"saved checkpoint {final_dir}", flush=True)
    dist.barrier()


def _sat_model_states_name(folder: str) -> None:
    """ZeRO-3 names the model states ``zero_pp_rank_<r>_mp_rank_00_model_states.pt`` (one per rank; rank 0's holds
    the gathered DiT) where SAT, our loaders and the export tools read ``mp_rank_00_model_states.pt``: link (or copy)
    rank 0's file to that name; DeepSpeed's resume keeps reading its own names."""
    sat_name = os.path.join(folder, "mp_rank_00_model_states.pt")
    zero_name = os.path.join(folder, "zero_pp_rank_0_mp_rank_00_model_states.pt")
    if os.path.exists(sat_name) or not os.path.exists(zero_name):
        return
    try:
        os.link(zero_name, sat_name)
    except OSError:
        shutil.copyfile(zero_name, sat_name)


def _read_checkpoint(path: str) -> dict:
    """A checkpoint dict, loaded weights-only (pickled objects only with ``--trust-pickle``)."""
    from sat_cogvideo.checkpoint import load_checkpoint_file

    return load_checkpoint_file(path)


def load_dit_weights(engine: torch.nn.Module, checkpoint: dict, source: str) -> None:
    """Strictly load the DiT part (``model.diffusion_model.*``) of an engine checkpoint; VAE/T5 keys (present in the
    original's finetune checkpoints) are ignored, anything else unknown is an error."""
    from sat_cogvideo.checkpoint import load_state_dict_strict, read_state_dict

    sd = read_state_dict(checkpoint)
    if any(k.startswith(SAT_PREFIX) for k in sd):
        other = [k for k in sd if not k.startswith(SAT_PREFIX)]
        ignorable = ("first_stage_model.", "conditioner.")
        unknown = [k for k in other if not k.startswith(ignorable)]
        own = dict(engine.named_parameters())
        trainable_extra = {k: sd[k] for k in unknown if k in own}
        unknown = [k for k in unknown if k not in own]
        if unknown:
            raise UserError(f"{source} holds keys that are neither the DiT (model.diffusion_model.*) nor VAE/T5: "
                            f"{', '.join(sorted(unknown)[:3])}")
        if trainable_extra:
            engine.load_state_dict(trainable_extra, strict=False)
        dit_sd = {k[len(SAT_PREFIX):]: v for k, v in sd.items() if k.startswith(SAT_PREFIX)}
    else:
        dit_sd = sd
    dit = engine.model.diffusion_model
    known = dit.known_unused_keys() if hasattr(dit, "known_unused_keys") else ()
    report = load_state_dict_strict(dit, dit_sd, known_unused=known, source=source)
    if report.lora_initialised:
        print(f"loaded base weights from {source}; {len(report.lora_initialised)} LoRA tensors keep their "
              f"initial values", flush=True)


def load_checkpoint(model, args, load_path=None, prefix="", state: Optional[RunState] = None) -> int:
    """Replacement for SAT's ``load_checkpoint(model, args)``: returns the iteration to continue from."""
    from sat_cogvideo.checkpoint import checkpoint_file

    resume = state.resume if state is not None else None
    if getattr(args, "model_source", None) is not None and resume is None and load_path is None:
        args.model_source.load_into(model)  # a diffusers pipeline: DiT and VAE streamed from its files
        return 0
    path = load_path or args.load
    file = str(checkpoint_file(path))
    checkpoint = _read_checkpoint(file)
    load_dit_weights(model, checkpoint, source=file)
    if resume is not None:
        print(f"resuming {resume['run_dir']} at iteration {resume['iteration']}", flush=True)
        return int(resume["iteration"])
    if args.mode == "finetune":
        return 0
    return int(checkpoint.get("iteration", 0) or 0)


def find_run(run_dir: str) -> Optional[dict]:
    """Resume information of one of our run folders (``latest`` + ``<tag>/sat_cogvideo_resume.json``), or None."""
    latest = os.path.join(run_dir, "latest")
    if not os.path.isfile(latest):
        return None
    tag = open(latest).read().strip()
    marker = os.path.join(run_dir, tag, RESUME_MARKER)
    if not os.path.isfile(marker):
        return None
    with open(marker) as f:
        info = json.load(f)
    info.update(run_dir=os.path.abspath(run_dir), tag=tag)
    return info


def resolve_resume(args) -> Optional[dict]:
    """Decide whether this run resumes one of ours (see the module docstring), set ``args`` for it and return its
    information (:func:`find_run`), or None for a new run."""
    run_dir = None
    if args.resume == "auto":
        if not args.save or not os.path.isdir(args.save):
            raise UserError(f"--resume: no run to resume, save folder {args.save!r} does not exist")
        runs = [os.path.join(args.save, d) for d in os.listdir(args.save)
                if d.startswith(args.experiment_name + "-") and find_run(os.path.join(args.save, d))]
        if not runs:
            raise UserError(f"--resume: no resumable run {args.experiment_name}-* in {args.save} (a run folder has "
                            f"latest and <iteration>/{RESUME_MARKER})")
        run_dir = max(runs, key=lambda d: os.path.getmtime(os.path.join(d, "latest")))
    elif args.resume:
        run_dir = args.resume
        if find_run(run_dir) is None:
            raise UserError(f"--resume {run_dir}: not a run folder written by sat_cogvideo finetuning (expected "
                            f"{run_dir}/latest and <iteration>/{RESUME_MARKER})")
    elif args.load and os.path.isdir(args.load) and find_run(args.load) is not None:
        run_dir = args.load
    if run_dir is None:
        return None
    info = find_run(run_dir)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else \
        int(os.environ.get("WORLD_SIZE", "1"))
    if info["dp_world_size"] != world:
        raise UserError(f"{run_dir} was trained with {info['dp_world_size']} processes; resume it with the same "
                        f"number (NPROC={info['dp_world_size']}), not {world}")
    args.load = info["run_dir"]
    args.save = os.path.dirname(info["run_dir"])
    args.mode = "pretrain"  # SAT then continues in the folder basename(load)
    return info


def _resume_files(info: dict) -> str:
    return os.path.join(info["run_dir"], info["tag"])


# ============================================================================================================
# the patched pieces of SAT's loop


class _CpuSafeTimers:
    """SAT's ``Timers`` without ``torch.cuda.synchronize`` on CPU."""

    class Timer:
        def __init__(self, name):
            self.name_, self.elapsed_, self.started_ = name, 0.0, False
            self.start_time = 0.0

        @staticmethod
        def _sync():
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()

        def start(self):
            import time

            self._sync()
            self.start_time, self.started_ = time.time(), True

        def stop(self):
            import time

            self._sync()
            self.elapsed_ += time.time() - self.start_time
            self.started_ = False

        def reset(self):
            self.elapsed_, self.started_ = 0.0, False

        def elapsed(self, reset=True):
            started = self.started_
            if started:
                self.stop()
            value = self.elapsed_
            if reset:
                self.reset()
            if started:
                self.start()
            return value

    def __init__(self):
        self.timers = {}

    def __call__(self, name):
        if name not in self.timers:
            self.timers[name] = self.Timer(name)
        return self.timers[name]

    def log(self, names, normalizer=1.0, reset=True):
        from sat.helpers import print_rank0

        parts = [f"{n}: {self.timers[n].elapsed(reset=reset) * 1000.0 / normalizer:.2f}"
                 for n in names if n in self.timers]
        if parts:
            print_rank0("time (ms) | " + " | ".join(parts))


def _report_memory(name):
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        from sat.training.utils import report_memory

        report_memory(name)


def _fixed_datetime(stamp: _dt.datetime):
    """A ``datetime`` whose first ``now()`` (SAT's run-folder name) is rank 0's ``stamp``; later calls are real."""
    first = [True]

    class FixedDatetime(_dt.datetime):
        @classmethod
        def now(cls, tz=None):
            if first[0]:
                first[0] = False
                return stamp
            return _dt.datetime.now(tz)

    return FixedDatetime


def _rank0_now() -> _dt.datetime:
    now = [_dt.datetime.now().timestamp()]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast_object_list(now, src=0)
    return _dt.datetime.fromtimestamp(now[0])


def _setup_model_and_optimizer(args, model, config_params=None, state: Optional[RunState] = None):
    """SAT's ``setup_model_untrainable_params_and_optimizer`` with our optimizer resolution, checkpoint contents and
    optimizer-state resume (see the module docstring)."""
    import deepspeed
    from sat import mpu
    from sat.helpers import check_if_zero3
    from sat.training import deepspeed_training as dst

    if hasattr(model, "disable_untrainable_params"):
        model.disable_untrainable_params()
    param_groups = dst.get_optimizer_param_groups(model)
    if not param_groups:
        raise UserError("no trainable parameters: model.not_trainable_prefixes freezes everything and the model "
                        "config has no lora_config")
    if check_if_zero3(args):
        _keep_encoders_whole(model)
    else:
        for group in param_groups:
            for param in group["params"]:
                if not param.model_parallel:
                    torch.distributed.broadcast(param.data, src=0)
                else:
                    torch.distributed.broadcast(param.data, src=mpu.get_model_parallel_rank(),
                                                group=mpu.get_data_parallel_group())
    if args.train_data is None:
        return model, None
    optimizer_callable = resolve_optimizer(args)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups,
                                                   optimizer=optimizer_callable, args=args, mpu=mpu,
                                                   dist_init_required=False)
    engine.module_state_dict = _module_state_dict_for(engine)
    # DeepSpeed's own reads (model states, ZeRO shards) go through our safe loader too.
    engine.checkpoint_engine.load = _safe_deepspeed_load
    resume = state.resume if state is not None else None
    if resume is not None:
        # ZeRO-3: the DiT is already loaded (whole, before partitioning, by load_checkpoint) and its partitions
        # come from the fp32 optimizer state; DeepSpeed would load the gathered states into partitioned tensors
        skip_module = (lambda src, dst: None) if check_if_zero3(args) else None
        load_path, _ = engine.load_checkpoint(resume["run_dir"], tag=resume["tag"], load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=False,
                                              custom_load_fn=skip_module)
        if load_path is None:
            raise UserError(f"cannot load the optimizer state of {_resume_files(resume)}")
    return engine, optimizer


def _keep_encoders_whole(engine: torch.nn.Module) -> None:
    """ZeRO-3 partitions every parameter of the module it is given; the frozen VAE reads its convolution weights
    outside their modules' ``forward`` (where ZeRO-3 would gather them) and neither encoder is trained, so both
    leave the module tree before ``deepspeed.initialize``: plain attributes, whole on every rank (as the other
    trainers keep them), still on the engine's device.  The checkpoints never held them."""
    holders = [(engine, "first_stage_model")]
    for embedder in getattr(engine.conditioner, "embedders", []):
        holders += [(embedder, name) for name, sub in embedder.named_children()
                    if not any(p.requires_grad for p in sub.parameters())]
    for owner, name in holders:
        module = owner._modules.pop(name, None)
        if module is not None:
            owner.__dict__[name] = module


def _safe_deepspeed_load(path, map_location=None):
    """DeepSpeed's ``checkpoint_engine.load`` through :func:`sat_cogvideo.checkpoint.load_torch_file` (CPU)."""
    return load_torch_file(path, what="DeepSpeed checkpoint")


def _module_state_dict_for(engine):
    def module_state_dict(destination=None, prefix="", keep_vars=False, exclude_frozen_parameters=False):
        if engine.zero_optimization_partition_weights():  # ZeRO-3: every rank takes part in the gathers
            return _zero3_checkpoint_state_dict(engine.module)
        return checkpoint_state_dict(engine.module)

    return module_state_dict


def _zero3_checkpoint_state_dict(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """:func:`checkpoint_state_dict` of a module whose parameters ZeRO-3 has partitioned: each parameter gathered
    in turn on every rank (one at a time, so no rank holds more than one full tensor beyond the result) and kept,
    on the CPU, on rank 0 (the rank that writes the model states).  DeepSpeed's own
    ``stage3_gather_16bit_weights_on_model_save`` would gather the frozen VAE and T5 too."""
    import deepspeed

    sd = checkpoint_state_dict(module)
    rank0 = torch.distributed.get_rank() == 0
    for name, param in module.named_parameters():
        if name not in sd or not hasattr(param, "ds_id"):
            continue
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if rank0:
                sd[name] = param.data.detach().to("cpu", copy=True)
    return sd


def _make_loaders_for(original, state: RunState):
    from sat_cogvideo.buckets import bucketed_loaders

    def make_loaders(args, create_dataset_function, collate_fn=None):
        train, valid, test = original(args, create_dataset_function, collate_fn=collate_fn)
        train, valid = bucketed_loaders(args, train, valid)
        resume = state.resume
        if resume is not None and train is not None:
            skip = int(resume["iteration"]) * int(args.gradient_accumulation_steps or 1)
            train = torch.utils.data.DataLoader(
                train.dataset, batch_sampler=SkipBatchSampler(train.batch_sampler, skip),
                num_workers=train.num_workers, pin_memory=train.pin_memory, collate_fn=train.collate_fn,
                prefetch_factor=train.prefetch_factor if train.num_workers > 0 else None)
        return train, valid, test

    return make_loaders


def _train_for(original, state: RunState):
    def train(model, optimizer, lr_scheduler, train_data, val_data, timers, args, **kwargs):
        resume = state.resume
        if resume is not None:
            # ``lr_scale`` too: SAT's scheduler reads the per-group scale from the optimizer's 'lr' entries, which
            # the loaded optimizer state has already overwritten with learning rates.
            for key, value in resume["lr_scheduler"].items():
                setattr(lr_scheduler, key, value)
            lr_scheduler.step(resume["lr_scheduler"]["num_iters"])
            rng_file = os.path.join(_resume_files(resume), f"rng_state_rank{torch.distributed.get_rank():02d}.pt")
            if os.path.isfile(rng_file):
                state.pending_rng = load_torch_file(rng_file, what="RNG state")
        return original(model, optimizer, lr_scheduler, train_data, val_data, timers, args, **kwargs)

    return train


def _train_step_for(original, state: RunState):
    def train_step(data_iterator, model, optimizer, lr_scheduler, args, timers, hooks=None, **kwargs):
        from sat_cogvideo.validation import after_train_step

        out = original(data_iterator, model, optimizer, lr_scheduler, args, timers, hooks=hooks, **kwargs)
        after_train_step(state, model, args, out[0])
        return out

    return train_step


def _get_model_for(original):
    def get_model(args, model_cls, **kwargs):
        """SAT's ``get_model`` without ``deepspeed.zero.Init`` under ZeRO-3: that path cannot build SAT's own
        parallel linear layers (``ColumnParallelLinear`` gets ``module`` twice), and the base checkpoint loads
        strictly into a whole model; ``deepspeed.initialize`` partitions it afterwards."""
        import sat.helpers

        saved = sat.helpers.check_if_zero3
        sat.helpers.check_if_zero3 = lambda _args: False
        try:
            return original(args, model_cls, **kwargs)
        finally:
            sat.helpers.check_if_zero3 = saved

    return get_model


def _print_args_for(original):
    def print_args(args):
        if not args.summary_dir and args.save:
            args.summary_dir = args.save  # the run folder by now: training_main has joined the experiment name
        return original(args)

    return print_args


@contextlib.contextmanager
def patched_sat_loop(state: RunState):
    """Swap the pieces of ``sat.training.deepspeed_training`` listed in the module docstring while it runs; those
    that need the run's resume and save state get ``state``."""
    from sat.training import deepspeed_training as dst

    replacements = {
        "save_checkpoint": partial(save_checkpoint, state=state),
        "load_checkpoint": partial(load_checkpoint, state=state),
        "setup_model_untrainable_params_and_optimizer": partial(_setup_model_and_optimizer, state=state),
        "make_loaders": _make_loaders_for(dst.make_loaders, state),
        "train": _train_for(dst.train, state),
        "train_step": _train_step_for(dst.train_step, state),
        "get_model": _get_model_for(dst.get_model),
        "Timers": _CpuSafeTimers,
        "report_memory": _report_memory,
        "print_args": _print_args_for(dst.print_args),
        "datetime": _fixed_datetime(_rank0_now()),
    }
    saved = {name: getattr(dst, name) for name in replacements}
    try:
        for name, value in replacements.items():
            setattr(dst, name, value)
        yield dst
    finally:
        for name, value in saved.items():
            setattr(dst, name, value)


# ============================================================================================================
# CLI


def add_finetune_args(parser):
    group = parser.add_argument_group("finetune", "sat-cogvideo finetuning")
    group.add_argument("--resume", nargs="?", const="auto", default=None, metavar="RUN_FOLDER",
                       help="continue a run: the newest <save>/<experiment_name>-* (no value) or RUN_FOLDER")
    return parser


def check_args(args) -> None:
    """Everything that can be checked before the model is built."""
    if args.data_config is None or "target" not in args.data_config:
        raise UserError("the configs have no data: section with target: data_video.SFTDataset (add configs/sft.yaml "
                        "to --base)")
    if not args.train_data:
        raise UserError("no training data: set args.train_data (folders with labels/ and videos/) in the sft config "
                        "or pass --train-data FOLDER")
    for folder in list(args.train_data) + list(args.valid_data or []):
        if not os.path.isdir(folder):
            raise UserError(f"train_data/valid_data folder {folder} does not exist (expected labels/N.txt and "
                            f"videos/N.mp4 inside)")
    if args.model_config is None:
        raise UserError("the configs have no model: section: pass a model file first, e.g. --base "
                        "configs/cogvideox_2b_lora.yaml configs/sft.yaml")
    check_training_sizes(args)
    if args.load and not os.path.exists(args.load):
        raise UserError(f"load: {args.load} does not exist (the CogVideoX SAT transformer folder with 'latest')")
    if args.mode == "inference":
        raise UserError("mode: inference cannot train; use finetune (new run from a base checkpoint) or pretrain")


def check_training_sizes(args) -> None:
    """The data's size(s) and length(s), buckets included, against the DiT's position grid (before any weight)."""
    from sat_cogvideo.buckets import Buckets, check_fits_model

    params = args.data_config.get("params") or {}
    if "video_size" not in params or "max_num_frames" not in params or args.model_config.get("latent_input", False):
        return  # another dataset class, or latents as data: nothing to compare
    size, frames = [int(v) for v in params["video_size"]], int(params["max_num_frames"])
    buckets = Buckets.from_config(params.get("buckets"), size, frames)
    sizes, lengths = (buckets.sizes, buckets.frames) if buckets else ([tuple(size)], [frames])
    check_fits_model(args.model_config, sizes, lengths)


def _prepare_deepspeed_config(args) -> None:
    ds = args.deepspeed_config
    zero = ds.setdefault("zero_optimization", {})
    # Exact resume in fp16/bf16 needs the fp32 master weights of the checkpoint (SAT never loaded optimizer state,
    # so the shipped `false` had no effect there).
    zero["load_from_fp32_weights"] = True
    if not is_cuda(args.device):
        if args.fp16:
            raise UserError("fp16 training needs CUDA (DeepSpeed's CPU accelerator has no fp16): on CPU set "
                            "bf16.enabled: true or train in float32 (both disabled in the deepspeed: section)")
        zero["overlap_comm"] = False  # needs CUDA streams
        zero.pop("cpu_offload", None)


def run(argv=None):
    """Parse, check and train; returns the DeepSpeed engine (None when there was nothing to do)."""
    from sat_cogvideo.arguments import get_args, initialize

    argv = list(sys.argv[1:] if argv is None else argv)
    from sat_cogvideo.latent_cache import add_cache_args
    from sat_cogvideo.ema import add_ema_args
    from sat_cogvideo.validation import Validator, add_validation_args

    args = get_args(argv, extra=[add_finetune_args, add_cache_args, add_validation_args, add_ema_args])
    from sat_cogvideo.convert.diffusers_source import use_pipeline_load

    use_pipeline_load(args)  # --load <diffusers folder or Hub id>: T5/VAE from it, DiT+VAE in load_checkpoint
    check_args(args)
    validator = Validator(args) if args.validation_prompts else None  # prompt-file errors before any weight
    initialize(args)
    state = RunState(resume=resolve_resume(args), validator=validator)
    info = state.resume
    if info is not None and info["iteration"] >= args.train_iters:
        print(f"{info['run_dir']} already reached iteration {info['iteration']} (train_iters {args.train_iters}); "
              f"raise train_iters to continue", flush=True)
        return None
    _prepare_deepspeed_config(args)
    if args.local_rank is None:
        args.local_rank = 0
    # DeepSpeed insists on the launcher's variables even for one process (finetune_single_gpu.sh sets them).
    for key, value in (("LOCAL_RANK", args.local_rank), ("RANK", args.rank), ("WORLD_SIZE", args.world_size),
                       ("LOCAL_WORLD_SIZE", 1 if args.world_size == 1 else None)):
        if value is not None:
            os.environ.setdefault(key, str(value))

    from omegaconf import OmegaConf

    from sgm.util import get_obj_from_str
    from sat_cogvideo.diffusion_video import SATVideoDiffusionEngine

    data_class = get_obj_from_str(args.data_config["target"], where="data.target")
    params = args.data_config.get("params") or {}
    params = OmegaConf.to_container(params, resolve=True) if OmegaConf.is_config(params) else dict(params)
    if args.cache_latents:  # encode what is missing, then train on the cache (sat_cogvideo.latent_cache)
        from sat_cogvideo.latent_cache import prepare_cache

        prepare_cache(args, data_class, params)
    create_dataset_function = partial(data_class.create_dataset_function, **params)
    args.log_config = [OmegaConf.to_container(args.config, resolve=True)]
    with trusting(args.trust_pickle), patched_sat_loop(state) as dst:
        return dst.training_main(args, model_cls=SATVideoDiffusionEngine,
                                 forward_step_function=partial(forward_step, data_class=data_class, state=state),
                                 forward_step_eval=partial(forward_step_eval, data_class=data_class,
                                                           only_log_video_latents=args.only_log_video_latents),
                                 create_dataset_function=create_dataset_function)


@run_cli
def main(argv=None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    # Run through the importable module so that its classes (EmaAdamW, ...) are not ``__main__.*``.
    from sat_cogvideo import train_video as _module

    if len(sys.argv) > 1 and sys.argv[1] == "--prepare-demo":  # finetune.sh and the SLURM tests call this
        from sat_cogvideo.demo import prepare_demo

        print(prepare_demo(sys.argv[2] if len(sys.argv) > 2 else None))
        sys.exit(0)
    sys.exit(_module.main())
