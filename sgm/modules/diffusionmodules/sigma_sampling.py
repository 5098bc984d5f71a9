"""Training-time noise-level sampling (maps to ``sgm/modules/diffusionmodules/sigma_sampling.py``)."""
from __future__ import annotations

import torch

from sat_cogvideo.errors import UserError
from sgm.util import instantiate_from_config


class DiscreteSampling:
    """Draw DDPM timesteps and return their table values ``s`` (original ``DiscreteSampling``).

    ``uniform_sampling`` splits the timesteps into ``group_num`` contiguous ranges and gives each group of
    data-parallel ranks its own range, so every batch covers all noise levels.  ``group_num = 0`` (the 1.0
    configs) picks the group count automatically as the v1.0 code does; ``group_num > 0`` (the 1.5 configs,
    40) follows the 1.5 code, which turns uniform sampling off on 8 or fewer data-parallel ranks.
    Timesteps are drawn on the CPU generator, as in the original.
    """

    def __init__(self, discretization_config, num_idx, do_append_zero=False, flip=True, uniform_sampling=False,
                 group_num=0):
        discretization = instantiate_from_config(discretization_config)
        self.num_idx = num_idx
        self.sigmas = discretization(num_idx, do_append_zero=do_append_zero, flip=flip)
        self.uniform_sampling = uniform_sampling
        self.group_num = group_num

    def _group_range(self):
        from sat_cogvideo.distributed import data_parallel_rank_and_size

        rank, world_size = data_parallel_rank_and_size()
        group_num = self.group_num
        if group_num > 0:
            if world_size <= 8:
                return None
            if world_size % group_num or self.num_idx % group_num:
                raise UserError(f"DiscreteSampling group_num {group_num} must divide the data-parallel world size "
                                f"({world_size}) and num_idx ({self.num_idx}): change group_num in the loss config")
        else:
            i = 1
            while not (world_size % i == 0 and self.num_idx % (world_size // i) == 0):
                i += 1
            group_num = world_size // i
        interval = self.num_idx // group_num
        group_width = world_size // group_num
        group_index = rank // group_width
        return group_index * interval, (group_index + 1) * interval

    def idx_to_sigma(self, idx):
        return self.sigmas[idx]

    def __call__(self, n_samples, rand=None, return_idx=False):
        """``n_samples`` table values (and their int64 timesteps with ``return_idx``); ``rand`` gives the timesteps.

        The original's ``default(rand, torch.randint(...))`` draws the timesteps even when ``rand`` is given; the
        same draw is made and discarded here, so the RNG stream after the call is the original's.
        """
        bounds = self._group_range() if self.uniform_sampling else None
        low, high = bounds if bounds is not None else (0, self.num_idx)
        drawn = torch.randint(low, high, (n_samples,))
        idx = drawn if rand is None else rand
        sigmas = self.idx_to_sigma(idx)
        return (sigmas, idx) if return_idx else sigmas
