"""Buckets: one finetuning run over videos of several resolutions and lengths, each batch from one bucket.

No counterpart in the original, whose ``SFTDataset`` crops every video to one ``video_size`` and pads or cuts it
to ``max_num_frames``.  The data section names the buckets (docs/finetune.md, "Buckets")::

    data:
      params:
        video_size: [480, 720]          # still required: the size without buckets
        max_num_frames: 49
        buckets:
          video_sizes: [[480, 720], [720, 480], [480, 480]]   # [height, width]; default [video_size]
          num_frames: [49, 25]                                 # 4k+1 each; default [max_num_frames]

* **Resolution**: a video goes to the size whose aspect ratio is nearest its own (distance of ``log(h / w)``;
  ties to the larger area, then to the earlier entry), then is resized to cover it and centre-cropped as before.
* **Length**: the longest ``num_frames`` entry the clip can fill at ``fps`` (the frames
  :func:`~sat_cogvideo.data_video.select_frame_indices` finds for the longest entry); a clip shorter than every
  entry goes to the shortest and is padded with its last frame, as the original pads.
* **Batches**: :class:`BucketBatchSampler` draws a seeded permutation of the data per epoch, files each index
  under its bucket and emits a batch whenever a bucket holds ``batch_size x world_size`` indices (each rank takes
  its slice), carrying the rest into the next epoch; a step holds an item twice only when its bucket is smaller
  than a step.  The order depends only on the seed, so a resumed run skips the same batches it consumed and
  stays bit-exact.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from sat_cogvideo.errors import UserError
from sat_cogvideo.families import SPATIAL_COMPRESSION, TIME_COMPRESSION

__all__ = ["Buckets", "BucketBatchSampler", "check_fits_model", "bucketed_loaders"]

Key = Tuple[int, int, int]  # (frames, height, width)


def _pair(value, where: str) -> Tuple[int, int]:
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise UserError(f"{where} must be [height, width], got {value!r}") from None
    if h <= 0 or w <= 0:
        raise UserError(f"{where} must be positive, got {value!r}")
    return h, w


@dataclass(frozen=True)
class Buckets:
    """The bucket sizes ``[(h, w), ...]`` and frame counts of ``data.params.buckets``."""
    sizes: Tuple[Tuple[int, int], ...]
    frames: Tuple[int, ...]

    @classmethod
    def from_config(cls, value, video_size: Sequence[int], max_num_frames: int) -> Optional["Buckets"]:
        """``None`` without a ``buckets`` key; every mistake is a :class:`UserError` naming the key."""
        if value is None:
            return None
        if not hasattr(value, "get"):
            raise UserError(f"data.params.buckets must be a mapping with video_sizes and/or num_frames, got {value!r}")
        unknown = sorted(set(value) - {"video_sizes", "num_frames"})
        if unknown:
            raise UserError(f"data.params.buckets: unknown key(s) {', '.join(unknown)} (use video_sizes, num_frames)")
        sizes = value.get("video_sizes") or [list(video_size)]
        frames = value.get("num_frames") or [max_num_frames]
        sizes = tuple(dict.fromkeys(_pair(s, "data.params.buckets.video_sizes entries") for s in sizes))
        try:
            frames = tuple(sorted({int(f) for f in frames}))
        except (TypeError, ValueError):
            raise UserError(f"data.params.buckets.num_frames must be a list of integers, got {frames!r}") from None
        bad = [f for f in frames if f < 1 or (f - 1) % TIME_COMPRESSION]
        if bad:
            raise UserError(f"data.params.buckets.num_frames {bad[0]} is not 4k+1 (the VAE encodes 1, 5, 9, ... frames)")
        return cls(sizes, frames)

    def size_for(self, height: int, width: int) -> Tuple[int, int]:
        """The bucket size whose aspect ratio is nearest ``height / width``."""
        ratio = math.log(height / width)
        return min(self.sizes, key=lambda s: (round(abs(math.log(s[0] / s[1]) - ratio), 9), -s[0] * s[1],
                                              self.sizes.index(s)))

    def frames_for(self, available: int) -> int:
        """The longest bucket length within ``available`` frames, else the shortest."""
        fitting = [f for f in self.frames if f <= available]
        return fitting[-1] if fitting else self.frames[0]


class BucketBatchSampler:
    """Batches of ``batch_size`` dataset indices for rank ``rank`` of ``world_size``, all of one bucket.

    ``keys[i]`` is item ``i``'s bucket.  Endless (training asks for as many batches as it needs); ``len()`` is
    ``length``, what SAT reads for ``epochs``.
    """

    def __init__(self, keys: Sequence[Key], batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 length: int = 1):
        self.keys = list(keys)
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        self.seed, self.length = int(seed), int(length)
        if not self.keys:
            raise ValueError("BucketBatchSampler needs at least one item")

    def global_batches(self) -> Iterator[List[int]]:
        """Every rank's indices of each step, ``batch_size * world_size`` of them, in order.  An index joins the
        first open batch of its bucket that does not hold it yet, so a step repeats an item only when its bucket
        has fewer items than a step takes."""
        full = self.batch_size * self.world_size
        sizes = Counter(self.keys)
        open_batches: dict = {}  # bucket -> batches being filled, oldest first
        epoch = 0
        while True:
            for i in np.random.default_rng([self.seed, epoch]).permutation(len(self.keys)):
                key, i = self.keys[i], int(i)
                batches = open_batches.setdefault(key, [])
                target = next((b for b in batches if len(b) < full and (i not in b or sizes[key] < full)), None)
                if target is None:
                    target = []
                    batches.append(target)
                target.append(i)
                while batches and len(batches[0]) == full:
                    yield batches.pop(0)
            epoch += 1

    def __iter__(self) -> Iterator[List[int]]:
        lo = self.rank * self.batch_size
        for group in self.global_batches():
            yield group[lo:lo + self.batch_size]

    def __len__(self) -> int:
        return self.length


def _grid(model_config):
    """(patch (t, h, w), position grid (t, h, w), whether the table only fits its own resolution)."""
    from sat_cogvideo.families import detect_from_model_config

    net = model_config["network_config"]["params"]
    patch = net.get("patch_size", 2)
    pt, ph, pw = (1, int(patch), int(patch)) if isinstance(patch, int) else (int(p) for p in patch)
    grid_t = (int(net["num_frames"]) - 1) // int(net.get("time_compressed_rate", TIME_COMPRESSION)) + 1
    grid = (grid_t, int(net["latent_height"]) // ph, int(net["latent_width"]) // pw)
    found = detect_from_model_config(model_config)
    return (pt, ph, pw), grid, (not found.rotary) or found.learnable_pos_embed


def check_fits_model(model_config, sizes: Sequence[Tuple[int, int]], frames: Sequence[int]) -> None:
    """Refuse, before any weight loads, a training size or length the DiT's position grid cannot place: past the
    grid (RoPE models crop their tables), another resolution for a table model (2B's sincos table, the 5B-I2V's
    learned one: positions are flattened, so only fewer frames fit), a size not a multiple of the patch."""
    (pt, ph, pw), (gt, gh, gw), fixed = _grid(model_config)
    for h, w in sizes:
        if h % (SPATIAL_COMPRESSION * ph) or w % (SPATIAL_COMPRESSION * pw):
            raise UserError(f"training size {h}x{w} is not a multiple of {SPATIAL_COMPRESSION * ph} (VAE x patch): "
                            "change data.params.video_size / buckets.video_sizes")
        lh, lw = h // (SPATIAL_COMPRESSION * ph), w // (SPATIAL_COMPRESSION * pw)
        if fixed and (lh, lw) != (gh, gw):
            raise UserError(f"training size {h}x{w} differs from the model's {gh * ph * SPATIAL_COMPRESSION}x"
                            f"{gw * pw * SPATIAL_COMPRESSION}: this model's position table fits only its own "
                            "resolution (use buckets.num_frames alone, or a RoPE model)")
        if lh > gh or lw > gw:
            raise UserError(f"training size {h}x{w} exceeds the model's position grid "
                            f"({gh * ph * SPATIAL_COMPRESSION}x{gw * pw * SPATIAL_COMPRESSION}): use smaller "
                            "video_sizes or raise latent_height/latent_width of the network config")
    for f in frames:
        latents = (f - 1) // TIME_COMPRESSION + 1
        if latents % pt:
            raise UserError(f"{f} training frames give {latents} latent frames, not a multiple of the temporal patch "
                            f"{pt}: use {f + TIME_COMPRESSION} or {f - TIME_COMPRESSION} frames")
        if latents // pt > gt:
            raise UserError(f"{f} training frames exceed the model's {gt} latent frames (network num_frames): use "
                            "fewer frames")


# ------------------------------------------------------------------------------------------------------------
# the loaders of a bucketed run


def _source_datasets(dataset) -> list:
    """The datasets of the data folders under SAT's wrappers (random mapping, concatenation)."""
    while hasattr(dataset, "wrapped_data"):
        dataset = dataset.wrapped_data
    return list(getattr(dataset, "datasets", [dataset]))


def _bucketed(loader, args, batch_size: int, length: int):
    """``loader`` rebuilt on a :class:`BucketBatchSampler` when its datasets have buckets (SAT's random mapping
    would mix sizes in a batch), else ``loader``.  Each folder counts once per epoch (no ``dataset_weights``)."""
    from sat import mpu

    parts = _source_datasets(loader.dataset)
    if all(getattr(d, "bucket_keys", None) is None for d in parts):
        return loader
    keys = [key for d in parts for key in d.bucket_keys]
    sampler = BucketBatchSampler(keys, batch_size, rank=mpu.get_data_parallel_rank(),
                                 world_size=mpu.get_data_parallel_world_size(), seed=args.seed, length=length)
    return torch.utils.data.DataLoader(
        torch.utils.data.ConcatDataset(parts), batch_sampler=sampler, num_workers=loader.num_workers,
        pin_memory=loader.pin_memory, collate_fn=loader.collate_fn,
        prefetch_factor=loader.prefetch_factor if loader.num_workers > 0 else None)


def bucketed_loaders(args, train, valid):
    """SAT's train and validation loaders, each on bucket batches where its data has buckets.  ``len(train)`` is
    what SAT reads for ``epochs`` (steps of ``batch_size x`` data-parallel ranks per pass over the data)."""
    if train is not None:
        from sat import mpu

        step = args.batch_size * mpu.get_data_parallel_world_size()
        per_epoch = max(1, math.ceil(sum(len(d) for d in _source_datasets(train.dataset)) / step))
        gas = int(args.gradient_accumulation_steps or 1)
        train = _bucketed(train, args, args.batch_size, per_epoch * args.epochs if args.epochs else args.train_iters * gas)
    if valid is not None:
        valid = _bucketed(valid, args, args.eval_batch_size or args.batch_size, 1 << 30)
    return train, valid
