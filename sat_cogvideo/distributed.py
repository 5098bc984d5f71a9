"""Starting torch.distributed and SwissArmyTransformer's model-parallel state from the environment.

Maps to ``initialize_distributed`` of the original ``arguments.py``, without its hard-coded CUDA:
the backend is ``nccl`` for CUDA devices and ``gloo`` otherwise, and a single process works with no
environment variables at all.  Rank and world size come from torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``),
SLURM (``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``) or OpenMPI (``OMPI_COMM_WORLD_*``), in that order.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sat_cogvideo.errors import UserError

_ENV_SOURCES = (
    ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
)


@dataclass(frozen=True)
class ProcessInfo:
    rank: int
    world_size: int
    local_rank: int
    source: str  # "torchrun", "slurm", "openmpi" or "single"


def process_info(environ=None) -> ProcessInfo:
    """Rank, world size and local rank of this process, read from the launcher's environment."""
    env = os.environ if environ is None else environ
    for (r, w, lr), source in zip(_ENV_SOURCES, ("torchrun", "slurm", "openmpi")):
        if r in env and w in env:
            try:
                rank, world = int(env[r]), int(env[w])
                local = int(env.get(lr, rank))
            except ValueError:
                raise UserError(f"environment variables {r}/{w}/{lr} must be integers, got "
                                f"{env.get(r)!r}/{env.get(w)!r}/{env.get(lr)!r}") from None
            if world < 1 or not 0 <= rank < world:
                raise UserError(f"{r}={rank} is not in range for {w}={world}")
            return ProcessInfo(rank, world, local, source)
    return ProcessInfo(0, 1, 0, "single")


def is_cuda(device) -> bool:
    """Whether ``device`` (a torch.device, a string such as ``cuda:1``, or an int CUDA index) is a CUDA device.

    The one place that compares device types, so the rest of the code never spells a device out.
    """
    if isinstance(device, int):
        return True
    device_type = torch.device(device).type
    return device_type == "cuda"


def _cuda_device(index: int) -> torch.device:
    return torch.device(f"cuda:{index % torch.cuda.device_count()}")


def default_device(local_rank: int = 0) -> torch.device:
    """``cuda:<local_rank>`` when CUDA is available, else ``cpu``."""
    if torch.cuda.is_available():
        return _cuda_device(local_rank)
    return torch.device("cpu")


def resolve_device(device=None, local_rank: int = 0) -> torch.device:
    """Turn a ``--device`` value into a torch.device.

    Accepts None / -1 / "auto" (CUDA when available, else CPU), an int (a CUDA index, as the original's
    ``--device``), or any torch device string (cpu, cuda, cuda:1, mps).
    """
    if device is None or device == -1 or device == "-1" or device == "auto":
        return default_device(local_rank)
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, int) or (isinstance(device, str) and device.isdigit()):
        dev = torch.device(f"cuda:{int(device)}")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            raise UserError(f"--device {device!r} is not a device: use cpu, cuda, cuda:N or auto") from None
    if is_cuda(dev):
        if not torch.cuda.is_available():
            raise UserError(f"--device {device} asks for CUDA but no CUDA device is available: use --device cpu")
        if dev.index is None:
            dev = _cuda_device(local_rank)
    return dev


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _master_addr(environ) -> str:
    if "MASTER_ADDR" in environ:
        return environ["MASTER_ADDR"]
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if nodelist and int(environ.get("SLURM_NNODES", "1")) > 1:
        # First host of a SLURM node list such as "node[01-04],gpu7": scontrol expands it exactly.
        import subprocess
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                                 text=True, check=True, timeout=30).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
        raise UserError(f"cannot find the first host of SLURM node list {nodelist!r}: export MASTER_ADDR")
    return "127.0.0.1"


def init_distributed(device=None, backend: str | None = None, model_parallel_size: int = 1,
                     environ=None, timeout_minutes: float = 30) -> ProcessInfo:
    """Start torch.distributed (if not yet started) and SAT's model-parallel groups.

    Returns this process's :class:`ProcessInfo`.  Safe to call more than once.
    """
    env = os.environ if environ is None else environ
    info = process_info(env)
    dev = resolve_device(device, info.local_rank)
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if is_cuda(dev) else "gloo"
        if backend == "nccl" and not is_cuda(dev):
            raise UserError("the nccl backend needs CUDA devices: use --distributed-backend gloo on CPU")
        if is_cuda(dev):
            torch.cuda.set_device(dev)
        if info.world_size == 1:
            port = env.get("MASTER_PORT") or str(_free_port())
        else:
            port = env.get("MASTER_PORT", "29500")
            if port == "0":
                raise UserError("MASTER_PORT=0 cannot be shared by the ranks of a multi-process run: "
                                "set MASTER_PORT to a free port (e.g. torchrun --master_port 29511)")
        init_method = f"tcp://{_master_addr(env)}:{port}"
        from datetime import timedelta
        dist.init_process_group(backend=backend, init_method=init_method, world_size=info.world_size,
                                rank=info.rank, timeout=timedelta(minutes=timeout_minutes))
    elif dist.get_world_size() != info.world_size and info.source != "single":
        raise UserError(f"torch.distributed already runs with world size {dist.get_world_size()}, "
                        f"but the environment says {info.world_size}")
    _init_sat_model_parallel(model_parallel_size)
    return ProcessInfo(dist.get_rank(), dist.get_world_size(), info.local_rank, info.source)


def _init_sat_model_parallel(size: int) -> None:
    from sat import mpu

    if mpu.model_parallel_is_initialized():
        have = mpu.get_model_parallel_world_size()
        if have != size:
            raise UserError(f"model parallel size is already {have}; cannot switch to {size} in one process")
        return
    if dist.get_world_size() % size:
        raise UserError(f"world size {dist.get_world_size()} is not a multiple of --model-parallel-size {size}")
    mpu.initialize_model_parallel(size)


def data_parallel_rank_and_size() -> tuple[int, int]:
    """This process's index among data-parallel ranks and their number ((0, 1) without torch.distributed);
    with several processes per video (:mod:`sat_cogvideo.parallel`), the index of its video group."""
    if not dist.is_initialized():
        return 0, 1
    from sat_cogvideo.parallel import data_parallel

    video_groups = data_parallel()  # --sp-size / --cfg-parallel: the ranks of one video count once
    if video_groups is not None:
        return video_groups
    from sat import mpu

    if mpu.model_parallel_is_initialized():
        return mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()
    return dist.get_rank(), dist.get_world_size()
