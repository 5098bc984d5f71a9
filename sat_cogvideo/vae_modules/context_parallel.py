"""Context parallelism over time for the 3D VAE: the CP group state and the time-axis communication.

Maps to the context-parallel globals of the original ``sgm/util.py`` (``initialize_context_parallel``,
``get_context_parallel_*``) and to the split/gather/boundary helpers of ``vae_modules/cp_enc_dec.py``.

Two layers of state:

* the *configured* CP group (``set_context_parallel_group`` / ``initialize_context_parallel``), as the
  original keeps it globally; without a process group the CP size is 1 and the rank 0 (the original
  failed there), and ``initialize_context_parallel`` lets every rank create every group, as torch.distributed
  requires (the original created only its own);
* the *active* region (:func:`context_parallel_region`): the VAE layers exchange frames only inside it.
  ``VideoAutoencoderInferenceWrapper`` opens it around its encoder/decoder call when its ``cp_size > 1``, so
  the model code stays plain math outside (a directly called decoder never talks to other ranks).

Layout over the time axis (CP size ``P``, clip length ``T``): rank 0 holds frame 0 plus ``(T-1)/P`` frames,
every other rank ``(T-1)/P`` frames, in rank order.  The communication here is for inference
(``torch.no_grad``): no gradient flows across ranks.  Works on gloo (CPU tensors) and nccl (CUDA tensors).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sat_cogvideo.errors import UserError

_CONTEXT_PARALLEL_GROUP = None
_CONTEXT_PARALLEL_SIZE = None


def is_context_parallel_initialized() -> bool:
    return _CONTEXT_PARALLEL_GROUP is not None


def set_context_parallel_group(size: int, group) -> None:
    """Use an existing process group (e.g. SAT's model-parallel group) as the CP group."""
    global _CONTEXT_PARALLEL_GROUP, _CONTEXT_PARALLEL_SIZE
    _CONTEXT_PARALLEL_GROUP, _CONTEXT_PARALLEL_SIZE = group, int(size)


def initialize_context_parallel(size: int) -> None:
    """Split the world into consecutive groups of ``size`` ranks; this rank joins its own.

    Every rank creates every group (``new_group`` is collective), unlike the original which stopped after
    its own group and could deadlock.
    """
    global _CONTEXT_PARALLEL_GROUP, _CONTEXT_PARALLEL_SIZE
    if is_context_parallel_initialized():
        raise UserError("context parallel group is already initialized")
    world, rank = dist.get_world_size(), dist.get_rank()
    if size < 1 or world % size:
        raise UserError(f"world size {world} is not a multiple of the context-parallel size {size}")
    for start in range(0, world, size):
        group = dist.new_group(list(range(start, start + size)))
        if start <= rank < start + size:
            _CONTEXT_PARALLEL_GROUP = group
    _CONTEXT_PARALLEL_SIZE = size


def get_context_parallel_group():
    if _CONTEXT_PARALLEL_GROUP is None:
        raise UserError("context parallel group is not initialized: call initialize_context_parallel(size)")
    return _CONTEXT_PARALLEL_GROUP


def get_context_parallel_world_size() -> int:
    return 1 if _CONTEXT_PARALLEL_SIZE is None else _CONTEXT_PARALLEL_SIZE


def get_context_parallel_rank() -> int:
    if not dist.is_initialized():
        return 0
    return dist.get_rank() % get_context_parallel_world_size()


def get_context_parallel_group_rank() -> int:
    if not dist.is_initialized():
        return 0
    return dist.get_rank() // get_context_parallel_world_size()


# ----------------------------------------------------------------------------------------------------------
# Active region

@dataclass(frozen=True)
class ActiveCP:
    group: object
    size: int
    rank: int
    global_ranks: tuple  # global rank of each CP rank

    def global_rank(self, cp_rank: int) -> int:
        return self.global_ranks[cp_rank]


_ACTIVE: ActiveCP | None = None


def active() -> ActiveCP | None:
    """The CP group the VAE layers communicate over right now, or None (single-process behaviour)."""
    return _ACTIVE


@contextlib.contextmanager
def context_parallel_region(group=None, size: int | None = None):
    """Make the VAE layers split work over ``group`` (default: the configured CP group) while inside."""
    global _ACTIVE
    group = get_context_parallel_group() if group is None else group
    size = dist.get_world_size(group) if size is None else size
    if size != dist.get_world_size(group):
        raise UserError(f"cp_size {size} does not match the context-parallel group size {dist.get_world_size(group)}")
    ranks = tuple(dist.get_process_group_ranks(group))
    state = ActiveCP(group, size, dist.get_rank(group), ranks)
    previous, _ACTIVE = _ACTIVE, state
    try:
        yield state
    finally:
        _ACTIVE = previous


# ----------------------------------------------------------------------------------------------------------
# Time-axis communication (identity outside an active region)

def check_split(length: int, size: int, multiple: int = 1, what: str = "frames") -> None:
    """Raise unless ``length - 1`` splits into ``size`` equal non-empty shares that are multiples of ``multiple``."""
    if size > 1 and ((length - 1) < size * multiple or (length - 1) % (size * multiple)):
        raise UserError(f"{length} {what} cannot be split over {size} context-parallel ranks: "
                        f"{what} - 1 must be a positive multiple of {size * multiple}")


def broadcast_from_first(x: torch.Tensor) -> torch.Tensor:
    """Every rank of the active group gets CP rank 0's ``x`` (same shape on all ranks)."""
    cp = _ACTIVE
    if cp is None:
        return x
    x = x.contiguous()
    dist.broadcast(x, src=cp.global_rank(0), group=cp.group)
    return x


def conv_split(x: torch.Tensor, dim: int = 2, kernel_size: int = 1) -> torch.Tensor:
    """This rank's share: rank 0 frames ``[0, n + k)``, rank r frames ``[r n + k, (r+1) n + k)``, ``n = (T-k)/P``."""
    cp = _ACTIVE
    if cp is None:
        return x
    length = x.shape[dim]
    n = (length - kernel_size) // cp.size
    if n < 1 or (length - kernel_size) % cp.size:
        raise UserError(f"{length} frames cannot be split over {cp.size} context-parallel ranks: "
                        f"frames - {kernel_size} must be a positive multiple of {cp.size}")
    if cp.rank == 0:
        return x.narrow(dim, 0, n + kernel_size)
    return x.narrow(dim, cp.rank * n + kernel_size, n)


def conv_gather(x: torch.Tensor, dim: int = 2) -> torch.Tensor:
    """Concatenate every rank's share along ``dim`` in rank order (shares may differ in length)."""
    cp = _ACTIVE
    if cp is None:
        return x
    length = torch.tensor([x.shape[dim]], dtype=torch.long, device=x.device)
    lengths = [torch.zeros_like(length) for _ in range(cp.size)]
    dist.all_gather(lengths, length, group=cp.group)
    lengths = [int(v) for v in lengths]
    longest = max(lengths)
    if x.shape[dim] < longest:  # all_gather needs equal shapes: pad, then trim
        pad_shape = list(x.shape)
        pad_shape[dim] = longest - x.shape[dim]
        x = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(cp.size)]
    dist.all_gather(parts, x, group=cp.group)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, lengths)], dim=dim)


def prepend_from_previous_rank(x: torch.Tensor, num_frames: int, first_rank_head: torch.Tensor) -> torch.Tensor:
    """Causal temporal padding across ranks: prepend ``num_frames`` frames along dim 2.

    CP rank 0 (and the single-process case) prepends ``first_rank_head``; rank r > 0 prepends the last
    ``num_frames`` frames of rank r-1's padded input, so even a rank holding fewer frames than the kernel
    needs gets the right context.  The exchange runs as a chain 0 → 1 → … → P-1.
    """
    cp = _ACTIVE
    if cp is None or cp.rank == 0:
        padded = torch.cat([first_rank_head.to(device=x.device, dtype=x.dtype), x], dim=2)
    else:
        shape = list(x.shape)
        shape[2] = num_frames
        head = x.new_empty(shape)
        dist.recv(head, src=cp.global_rank(cp.rank - 1), group=cp.group)
        padded = torch.cat([head, x], dim=2)
    if cp is not None and cp.rank < cp.size - 1:
        dist.send(padded[:, :, -num_frames:].contiguous(), dst=cp.global_rank(cp.rank + 1), group=cp.group)
    return padded


def gathered_group_norm(x: torch.Tensor, num_groups: int, weight, bias, eps: float) -> torch.Tensor:
    """GroupNorm whose statistics cover the whole clip split over the active group.

    Sums (then centred sums of squares, two passes for accuracy) are all-reduced in float32 instead of
    gathering the activations, which gives the statistics of the concatenated clip at a fraction of the memory.
    """
    cp = _ACTIVE
    shape = x.shape
    xg = x.reshape(shape[0], num_groups, -1)
    stats_dtype = torch.promote_types(x.dtype, torch.float32)
    total = torch.tensor([xg.shape[-1]], dtype=stats_dtype, device=x.device)
    mean = xg.sum(-1, dtype=stats_dtype)
    dist.all_reduce(total, group=cp.group)
    dist.all_reduce(mean, group=cp.group)
    mean /= total
    centred = xg.to(stats_dtype) - mean[..., None]
    var = centred.square().sum(-1)
    dist.all_reduce(var, group=cp.group)
    var /= total
    out = (centred * torch.rsqrt(var + eps)[..., None]).to(x.dtype).reshape(shape)
    view = (1, -1) + (1,) * (len(shape) - 2)
    if weight is not None:
        out = out * weight.view(view) + bias.view(view)
    return out
