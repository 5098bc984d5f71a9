"""Rank/world size from each launcher's environment; 2-process gloo start; device resolution."""
import os
import subprocess
import sys

import pytest
import torch

from sat_cogvideo.distributed import process_info, resolve_device
from sat_cogvideo.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_process_info_sources():
    assert process_info({}).source == "single"
    p = process_info({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (p.rank, p.world_size, p.local_rank, p.source) == (3, 4, 1, "torchrun")
    p = process_info({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"})
    assert (p.rank, p.world_size, p.local_rank, p.source) == (5, 8, 1, "slurm")
    p = process_info({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"})
    assert (p.rank, p.world_size, p.source) == (1, 2, "openmpi")
    # torchrun wins over SLURM when both are set (torchrun inside an sbatch job)
    p = process_info({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert p.source == "torchrun" and p.world_size == 2
    with pytest.raises(UserError, match="RANK=4 is not in range for WORLD_SIZE=2"):
        process_info({"RANK": "4", "WORLD_SIZE": "2"})


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device(-1).type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device is available: use --device cpu"):
            resolve_device("cuda")
    with pytest.raises(UserError, match="is not a device"):
        resolve_device("gpu!")


WORKER = r"""
import sys, torch, torch.distributed as dist
from sat_cogvideo.distributed import init_distributed, data_parallel_rank_and_size
info = init_distributed(device="cpu")
t = torch.tensor([float(info.rank + 1)])
dist.all_reduce(t)
print("RESULT", info.rank, info.world_size, info.source, data_parallel_rank_and_size(), float(t), dist.get_backend())
"""


@pytest.mark.parametrize("launcher", ["torchrun", "slurm"])
def test_two_process_gloo(launcher):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, PYTHONPATH=ROOT, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
            env.pop(k, None)
        if launcher == "torchrun":
            env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
        else:
            env.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_NNODES="1")
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    results = sorted(line for out, _ in outs for line in out.splitlines() if line.startswith("RESULT"))
    assert results == [f"RESULT 0 2 {launcher} (0, 2) 3.0 gloo", f"RESULT 1 2 {launcher} (1, 2) 3.0 gloo"], outs


def test_is_cuda():
    from sat_cogvideo.distributed import is_cuda

    assert is_cuda("cuda:1") and is_cuda(torch.device("cuda")) and is_cuda(0)
    assert not is_cuda("cpu") and not is_cuda(torch.device("cpu"))
