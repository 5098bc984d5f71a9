"""One video on several ranks: sequence parallelism (Ulysses / Ring / both), CFG parallelism and the
context-parallel VAE decode, set up from the command line.

Maps to nothing in the original's sampling script (one video per process); see ``docs/parallel.md``.
``sample_video`` calls :func:`configure` right after the process group starts (before the prompt list is
shared out, so data parallelism counts video groups), :func:`install` on the built engine, and
:func:`writes_outputs` before saving (only the first rank of a video's group writes its file).
"""
from __future__ import annotations

import argparse
from typing import Optional

from sat_cogvideo.parallel import groups as _groups
from sat_cogvideo.parallel.groups import Layout
from sat_cogvideo.rules import check_parallel_degrees as check_degrees


def add_parallel_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("one video on several processes", "the remaining processes share prompts")
    g.add_argument("--sp-size", type=int, default=None,
                   help="sequence-parallel degree: processes that split one video's token sequence (Ulysses "
                        "alone, or --ulysses-degree x --ring-degree)")
    g.add_argument("--ulysses-degree", type=int, default=None, help="all-to-all over attention heads")
    g.add_argument("--ring-degree", type=int, default=None, help="K/V blocks passed around a ring")
    g.add_argument("--cfg-parallel", action="store_true",
                   help="the conditional and unconditional halves of classifier-free guidance on two process "
                        "groups (needs 2 x sp-size processes per video)")
    g.add_argument("--parallel-vae", action="store_true",
                   help="decode each video with the context-parallel VAE over its processes (whole clip in one "
                        "pass: frames split in time)")
    return parser


ENV_OPTIONS = (("SP_SIZE", "--sp-size"), ("ULYSSES_DEGREE", "--ulysses-degree"), ("RING_DEGREE", "--ring-degree"))
ENV_FLAGS = (("CFG_PARALLEL", "--cfg-parallel"), ("PARALLEL_VAE", "--parallel-vae"))


def _env_world(env) -> int:
    """Processes the cluster script will start: NPROC (torchrun), else the SLURM tasks, else the GPUs when
    LAUNCHER=torchrun, else 1."""
    get = lambda key: str(env.get(key) or "").strip()  # noqa: E731
    if get("NPROC"):
        return int(get("NPROC"))
    if get("LAUNCHER") in ("", "auto", "srun") and int(get("SLURM_NTASKS") or 1) > 1:
        return int(get("SLURM_NTASKS"))
    if get("LAUNCHER") == "torchrun":
        import torch
        return max(torch.cuda.device_count(), 1)
    return 1


def launch_argv(env) -> list:
    """``sample_video`` arguments from SP_SIZE / ULYSSES_DEGREE / RING_DEGREE / CFG_PARALLEL / PARALLEL_VAE of the
    cluster scripts, checked against the processes they will start (one line naming the variables, exit 2)."""
    from sat_cogvideo.errors import UserError

    get = lambda key: str(env.get(key) or "").strip()  # noqa: E731
    values = {}
    for key, flag in ENV_OPTIONS:
        if get(key):
            try:
                values[key] = int(get(key))
            except ValueError:
                raise UserError(f"{key}={get(key)!r} is not an integer") from None
    flags = [flag for key, flag in ENV_FLAGS if get(key).lower() in ("1", "true", "yes", "on")]
    if not values and not flags:
        return []
    try:
        check_degrees(_env_world(env), values.get("SP_SIZE"), values.get("ULYSSES_DEGREE"), values.get("RING_DEGREE"),
                      "--cfg-parallel" in flags)
    except UserError as err:
        raise UserError(f"{err} (from SP_SIZE / ULYSSES_DEGREE / RING_DEGREE / CFG_PARALLEL with NPROC or "
                        f"--ntasks-per-node)") from None
    return [a for key, flag in ENV_OPTIONS if key in values for a in (flag, str(values[key]))] + flags


def degrees_from_args(args, world: int) -> tuple[int, int, int]:
    """(ulysses, ring, cfg) checked against ``world`` (UserError otherwise); nothing is started."""
    return check_degrees(world, getattr(args, "sp_size", None), getattr(args, "ulysses_degree", None),
                         getattr(args, "ring_degree", None), bool(getattr(args, "cfg_parallel", False)))


def configure(args) -> Optional[_groups.Groups]:
    """Create the groups (collective) when the options ask for more than one process per video."""
    import torch.distributed as dist

    _groups.reset()
    world = dist.get_world_size() if dist.is_initialized() else 1
    u, r, c = degrees_from_args(args, world)
    if u * r * c > 1 and getattr(args, "input_type", None) == "cli" and getattr(args, "prompt", None) is None:
        from sat_cogvideo.errors import UserError
        raise UserError("--sp-size/--cfg-parallel read prompts from a file or --prompt, not interactively from "
                        "stdin: pass --input-file prompts.txt (input_type: txt) or --prompt")
    if u * r * c > 1 and getattr(args, "cache", None):
        from sat_cogvideo.errors import UserError
        raise UserError(f"--cache {args.cache} with --sp-size/--cfg-parallel: each rank would decide from its own "
                        "share whether to skip a step, and the ranks of a video must agree: drop one of the two")
    if u * r * c == 1:
        if getattr(args, "parallel_vae", False):
            from sat_cogvideo.errors import UserError
            raise UserError("--parallel-vae needs more than one process per video: add --sp-size N or "
                            "--cfg-parallel")
        return None
    return _groups.setup(Layout(world, dist.get_rank(), ulysses=u, ring=r, cfg=c))


def install(dit, groups: Optional[_groups.Groups] = None):
    """Put the parallel pieces on a ``DiffusionTransformer`` (mixin + hooks); returns a handle whose ``remove()``
    takes them off again.  No-op handle without groups."""
    from sat_cogvideo.parallel.cfg import CFGParallel
    from sat_cogvideo.parallel.sequence import SequenceParallelMixin

    groups = groups or _groups.current()
    handle = _Installed(dit)
    if groups is None:
        return handle
    lay = groups.layout
    if lay.sp > 1:
        dit.add_mixin("sequence_parallel", SequenceParallelMixin(groups))
        handle.mixin = True
    if lay.cfg > 1:
        handle.cfg = CFGParallel(dit, groups.group("cfg"), lay.cfg, lay.cfg_index)
    return handle


def install_engine(engine, args, plan) -> None:
    """What the options ask for on a built ``SATVideoDiffusionEngine``: the DiT's mixin and hooks, and with
    ``--parallel-vae`` the context-parallel decode (collective: every rank calls it)."""
    groups = _groups.current()
    if groups is None:
        return
    install(engine.model.diffusion_model, groups)
    if getattr(args, "parallel_vae", False):
        from sat_cogvideo.parallel.vae import install_parallel_vae

        install_parallel_vae(engine, groups.layout.group_size, plan.latent_frames)


class _Installed:
    def __init__(self, dit):
        self.dit, self.mixin, self.cfg = dit, False, None

    def remove(self):
        if self.mixin:
            self.dit.del_mixin("sequence_parallel")
        if self.cfg is not None:
            self.cfg.remove()


def writes_outputs() -> bool:
    """Whether this rank writes the files of its videos (the first rank of each video group)."""
    g = _groups.current()
    return g is None or g.layout.video_rank == 0


def data_parallel() -> Optional[tuple[int, int]]:
    """(index, count) of this rank's video group among all groups, or None without a layout."""
    g = _groups.current()
    return None if g is None else (g.layout.video, g.layout.data)
