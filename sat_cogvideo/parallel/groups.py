"""Which ranks work together on one video: the layout ``world = data × cfg × ring × ulysses`` and its groups.

The original has no such layout (one video per GPU); it follows xDiT's ordering: the Ulysses degree is innermost
(its all-to-alls stay inside a node where possible), then the ring, then the CFG halves, and the remaining factor
shares out prompts as before (data parallel).  With ``G = cfg · ring · ulysses`` consecutive ranks per video:

* ``video``  rank // G, the prompt share of the group (data parallel index), ``video_rank`` = rank % G;
* ``cfg_index`` (video_rank // sp): which half of the CFG batch (unconditional first) this rank computes;
* ``sp_rank`` (video_rank % sp) = ``ring_index · ulysses + ulysses_index``: which sequence chunk it holds.

:class:`Layout` is plain arithmetic (testable without processes); :func:`setup` creates the torch.distributed
groups (every rank creates every group, in the same order, as ``new_group`` requires).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch.distributed as dist



@dataclass(frozen=True)
class Layout:
    """Degrees of one run and this rank's place in them."""
    world: int
    rank: int
    ulysses: int = 1
    ring: int = 1
    cfg: int = 1

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    @property
    def group_size(self) -> int:
        return self.cfg * self.sp

    @property
    def data(self) -> int:
        return self.world // self.group_size

    @property
    def video(self) -> int:
        return self.rank // self.group_size

    @property
    def video_rank(self) -> int:
        return self.rank % self.group_size

    @property
    def cfg_index(self) -> int:
        return self.video_rank // self.sp

    @property
    def sp_rank(self) -> int:
        return self.video_rank % self.sp

    @property
    def ring_index(self) -> int:
        return self.sp_rank // self.ulysses

    @property
    def ulysses_index(self) -> int:
        return self.sp_rank % self.ulysses

    def _base(self, video: int, cfg_index: int) -> int:
        return video * self.group_size + cfg_index * self.sp

    def all_groups(self) -> dict:
        """Every group of every kind as lists of global ranks, in one fixed order (the same on every rank)."""
        kinds = {"sp": [], "ulysses": [], "ring": [], "cfg": [], "video": []}
        for v in range(self.data):
            kinds["video"].append(list(range(v * self.group_size, (v + 1) * self.group_size)))
            for c in range(self.cfg):
                base = self._base(v, c)
                kinds["sp"].append(list(range(base, base + self.sp)))
                for r in range(self.ring):
                    kinds["ulysses"].append(list(range(base + r * self.ulysses, base + (r + 1) * self.ulysses)))
                for u in range(self.ulysses):
                    kinds["ring"].append([base + r * self.ulysses + u for r in range(self.ring)])
            for p in range(self.sp):
                kinds["cfg"].append([v * self.group_size + c * self.sp + p for c in range(self.cfg)])
        return kinds

    def my_groups(self) -> dict:
        """The rank lists this rank belongs to, one per kind."""
        return {kind: next(g for g in groups if self.rank in g) for kind, groups in self.all_groups().items()}


@dataclass
class Groups:
    """The torch.distributed groups of this rank (``None`` where a kind has one member) and their rank lists."""
    layout: Layout
    ranks: dict = field(default_factory=dict)
    handles: dict = field(default_factory=dict)

    def group(self, kind: str):
        return self.handles.get(kind)

    def size(self, kind: str) -> int:
        return len(self.ranks[kind])


_CURRENT: Optional[Groups] = None


def setup(layout: Layout) -> Groups:
    """Create every group of ``layout`` (collective: all ranks call it) and make it the current one."""
    global _CURRENT
    mine = layout.my_groups()
    handles = {}
    for kind, groups in layout.all_groups().items():
        for ranks in groups:
            if len(ranks) == 1 or len(ranks) == layout.world:
                handle = None if len(ranks) == 1 else dist.group.WORLD
            else:
                handle = dist.new_group(ranks)
            if ranks == mine[kind]:
                handles[kind] = handle
    _CURRENT = Groups(layout, mine, handles)
    return _CURRENT


def current() -> Optional[Groups]:
    """The groups set up by :func:`setup` in this process, or None (one video per rank)."""
    return _CURRENT


def reset() -> None:
    """Forget the current layout (tests; the groups themselves stay until the process group ends)."""
    global _CURRENT
    _CURRENT = None
