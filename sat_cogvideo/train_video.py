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
* ``datetime``: every rank uses rank 0's clock for the run-folder name (ranks crossing a minute boundary would
  otherwise write one checkpoint into two folders).

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
from functools import partial
from typing import Any, Dict, Optional

import numpy as np
import torch

from sat_cogvideo.atomic import atomic_torch_save, atomic_write_text, make_temp_dir
from sat_cogvideo.distributed import is_cuda
from sat_cogvideo.errors import UserError, run_cli

SAT_PREFIX = "model.diffusion_model."
RESUME_KEY = "sat_cogvideo_resume"
RESUME_MARKER = "sat_cogvideo_resume.json"
_LR_FIELDS = ("start_lr", "warmup_iter", "init_step", "num_iters", "end_iter", "decay_style", "decay_ratio",
              "auto_warmup_steps", "auto_warmup_rate", "lr_scale")


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


def write_training_config(args) -> None:
    """``<save>/training_config.yaml``: the merged ``--base`` configs (rank 0, once, atomically)."""
    if not args.save or getattr(args, "_training_config_written", False):
        return
    args._training_config_written = True
    if torch.distributed.get_rank() != 0:
        return
    path = os.path.join(args.save, "training_config.yaml")
    if os.path.exists(path):
        return
    from omegaconf import OmegaConf

    atomic_write_text(path, OmegaConf.to_yaml(args.config, resolve=True))


def forward_step(data_iterator, model, args, timers, data_class=None):
    """One training micro-step: next batch -> ``model.shared_step(batch)`` -> ``(loss, {"loss": loss})``."""
    from sat import mpu

    _apply_pending_rng(args)
    if mpu.get_model_parallel_rank() == 0:
        timers("data loader").start()
        batch = next(data_iterator)
        timers("data loader").stop()
        batch = to_device(batch, args.device)
        write_training_config(args)
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
        if not isinstance(value, torch.Tensor):
            continue
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
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def _apply_pending_rng(args) -> None:
    pending = getattr(args, "_pending_rng", None)
    if pending is not None:
        _set_rng_state(pending)
        args._pending_rng = None


def checkpoint_state_dict(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """What our checkpoints store of the engine: the DiT (``model.diffusion_model.*``, LoRA included) and any other
    trainable parameter; never the frozen VAE (``first_stage_model.*``) or T5 (``conditioner.*``)."""
    sd = module.state_dict()
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    return {k: v for k, v in sd.items() if k.startswith(SAT_PREFIX) or k in trainable}


def save_checkpoint(iteration, model, optimizer, lr_scheduler, args) -> None:
    """Replacement for SAT's ``save_checkpoint`` (same signature; every rank calls it)."""
    dist = torch.distributed
    tag = str(iteration)
    saved = args.__dict__.setdefault("_saved_iterations", set())
    if tag in saved:  # SAT's final save repeats the last periodic one (Q14)
        return
    saved.add(tag)
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
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(tmp_dir, RESUME_MARKER), "w") as f:
            json.dump(resume, f, indent=1)
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


def _read_checkpoint(path: str) -> dict:
    """A checkpoint dict; files holding Python objects (SAT/DeepSpeed training state) are unpickled, since the user
    chose this file as ``load``."""
    from sat_cogvideo.checkpoint import load_checkpoint_file

    try:
        return load_checkpoint_file(path)
    except UserError as err:
        if "weights-only" not in str(err):
            raise
        return load_checkpoint_file(path, allow_pickle=True)


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


def load_checkpoint(model, args, load_path=None, prefix="") -> int:
    """Replacement for SAT's ``load_checkpoint(model, args)``: returns the iteration to continue from."""
    from sat_cogvideo.checkpoint import checkpoint_file

    resume = getattr(args, "_resume", None)
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
    """Decide whether this run resumes one of ours (see the module docstring) and set ``args`` for it."""
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
    args._resume = info
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


def _setup_model_and_optimizer(args, model, config_params=None):
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
    if not check_if_zero3(args):
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
    resume = getattr(args, "_resume", None)
    if resume is not None:
        load_path, _ = engine.load_checkpoint(resume["run_dir"], tag=resume["tag"], load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if load_path is None:
            raise UserError(f"cannot load the optimizer state of {_resume_files(resume)}")
    return engine, optimizer


def _module_state_dict_for(engine):
    def module_state_dict(destination=None, prefix="", keep_vars=False, exclude_frozen_parameters=False):
        return checkpoint_state_dict(engine.module)

    return module_state_dict


def _make_loaders_for(original):
    def make_loaders(args, create_dataset_function, collate_fn=None):
        train, valid, test = original(args, create_dataset_function, collate_fn=collate_fn)
        resume = getattr(args, "_resume", None)
        if resume is not None and train is not None:
            skip = int(resume["iteration"]) * int(args.gradient_accumulation_steps or 1)
            train = torch.utils.data.DataLoader(
                train.dataset, batch_sampler=SkipBatchSampler(train.batch_sampler, skip),
                num_workers=train.num_workers, pin_memory=train.pin_memory, collate_fn=train.collate_fn,
                prefetch_factor=train.prefetch_factor if train.num_workers > 0 else None)
        return train, valid, test

    return make_loaders


def _train_for(original):
    def train(model, optimizer, lr_scheduler, train_data, val_data, timers, args, **kwargs):
        resume = getattr(args, "_resume", None)
        if resume is not None:
            # ``lr_scale`` too: SAT's scheduler reads the per-group scale from the optimizer's 'lr' entries, which
            # the loaded optimizer state has already overwritten with learning rates.
            for key, value in resume["lr_scheduler"].items():
                setattr(lr_scheduler, key, value)
            lr_scheduler.step(resume["lr_scheduler"]["num_iters"])
            rng_file = os.path.join(_resume_files(resume), f"rng_state_rank{torch.distributed.get_rank():02d}.pt")
            if os.path.isfile(rng_file):
                args._pending_rng = torch.load(rng_file, weights_only=False)
        return original(model, optimizer, lr_scheduler, train_data, val_data, timers, args, **kwargs)

    return train


@contextlib.contextmanager
def patched_sat_loop():
    """Swap the pieces of ``sat.training.deepspeed_training`` listed in the module docstring while it runs."""
    from sat.training import deepspeed_training as dst

    replacements = {
        "save_checkpoint": save_checkpoint,
        "load_checkpoint": load_checkpoint,
        "setup_model_untrainable_params_and_optimizer": _setup_model_and_optimizer,
        "make_loaders": _make_loaders_for(dst.make_loaders),
        "train": _train_for(dst.train),
        "Timers": _CpuSafeTimers,
        "report_memory": _report_memory,
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
    if args.load and not os.path.exists(args.load):
        raise UserError(f"load: {args.load} does not exist (the CogVideoX SAT transformer folder with 'latest')")
    if args.mode == "inference":
        raise UserError("mode: inference cannot train; use finetune (new run from a base checkpoint) or pretrain")


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
    args = get_args(argv, extra=[add_finetune_args])
    check_args(args)
    initialize(args)
    info = resolve_resume(args)
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
    create_dataset_function = partial(data_class.create_dataset_function, **params)
    args.log_config = [OmegaConf.to_container(args.config, resolve=True)]
    with patched_sat_loop() as dst:
        engine = dst.training_main(args, model_cls=SATVideoDiffusionEngine,
                                   forward_step_function=partial(forward_step, data_class=data_class),
                                   forward_step_eval=partial(forward_step_eval, data_class=data_class,
                                                             only_log_video_latents=args.only_log_video_latents),
                                   create_dataset_function=create_dataset_function)
    dump = os.environ.get("SAT_COGVIDEO_FINAL_STATE")  # test hook: the whole engine, VAE and T5 included
    if dump and torch.distributed.get_rank() == 0:
        module = engine.module if hasattr(engine, "module") else engine
        torch.save({k: v.detach().cpu().clone() for k, v in module.state_dict().items()}, dump)
    return engine


@run_cli
def main(argv=None) -> int:
    run(argv)
    return 0


# ============================================================================================================
# demo


def build_demo_dataset(folder: str, num_videos: int = 2, height: int = 64, width: int = 96, frames: int = 24,
                       fps: int = 8) -> str:
    """``<folder>/dataset/{labels,videos}`` with ``num_videos`` small generated clips (a moving gradient), once."""
    from sat_cogvideo.media import write_video

    target = os.path.join(folder, "dataset")
    if os.path.isdir(os.path.join(target, "videos")):
        return target
    os.makedirs(folder, exist_ok=True)
    tmp = make_temp_dir(folder, prefix=".dataset-")
    captions = ["a red square drifts slowly to the right over a blue background",
                "green stripes scroll upwards on a dark screen"]
    yy, xx = np.mgrid[0:height, 0:width]
    for n in range(num_videos):
        clip = np.zeros((frames, height, width, 3), np.uint8)
        for t in range(frames):
            if n % 2 == 0:
                clip[t, ..., 2] = 160
                x0 = 8 + 2 * t
                clip[t, 20:44, x0:x0 + 24, 0] = 230
            else:
                clip[t, ..., 1] = (((yy + 3 * t) // 8) % 2 * 200).astype(np.uint8)
        write_video(os.path.join(tmp, "videos", f"{n + 1}.mp4"), clip, fps=fps)
        os.makedirs(os.path.join(tmp, "labels"), exist_ok=True)
        with open(os.path.join(tmp, "labels", f"{n + 1}.txt"), "w", encoding="utf-8") as f:
            f.write(captions[n % len(captions)] + "\n")
    try:
        os.replace(tmp, target)
    except OSError:  # built meanwhile by another process
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def prepare_demo(folder: Optional[str] = None) -> str:
    """Build the tiny demo model (CogVideoX-2B layout) and the 2-video dataset; return the demo folder."""
    from sat_cogvideo.demo import build_demo, demo_dir

    folder = demo_dir(folder)
    build_demo(folder, models=("cogvideox_2b",))
    build_demo_dataset(folder)
    return folder


if __name__ == "__main__":
    # Run through the importable module so that its classes (EmaAdamW, ...) are not ``__main__.*``.
    from sat_cogvideo import train_video as _module

    if len(sys.argv) > 1 and sys.argv[1] == "--prepare-demo":
        print(_module.prepare_demo(sys.argv[2] if len(sys.argv) > 2 else None))
        sys.exit(0)
    sys.exit(_module.main())
