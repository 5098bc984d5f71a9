"""Finetuning data: ``SFTDataset`` (maps to ``SFTDataset`` in the original ``sat/data_video.py``).

A dataset folder holds captions and videos with the same stem::

    <data_dir>/labels/1.txt   <data_dir>/videos/1.mp4
    <data_dir>/labels/2.txt   <data_dir>/videos/2.mp4   ...

(the caption path is the video path with ``videos`` -> ``labels`` and ``.mp4`` -> ``.txt``, as the original;
sub-folders are searched too).  Each item is the batch dict of the original::

    {"mp4": float32 [max_num_frames, 3, H, W] in [-1, 1], "txt": str, "num_frames": int, "fps": int}

Videos are decoded with ``imageio-ffmpeg`` (the original uses decord, which is not used here).

Differences from the original (README, "Differences from the original"):

* frames are sampled at the times nearest to ``fps`` (the original floors the frame step, so a 30 fps clip is
  sampled at 10 fps instead of 8); the original's errors for sources below ``fps`` and near the end of a clip
  are gone (indices are clamped to the clip);
* files are indexed in sorted order (the original uses ``os.walk`` order, which depends on the file system);
* bad data is reported once per file with its path and skipped instead of crashing a run: a caption without a
  video, a video without a caption, an empty caption, a caption that is not UTF-8, a video that cannot be
  decoded or is too short.  A folder with no usable pair is a :class:`~sat_cogvideo.errors.UserError` when the
  dataset is built, i.e. before training starts.  A video that only fails while training is replaced by the
  next usable item, so an epoch never dies on one bad file.
"""
from __future__ import annotations

import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from sat_cogvideo.errors import UserError

__all__ = ["SFTDataset", "select_frame_indices", "resize_for_rectangle_crop", "pad_last_frame", "decode_frames",
           "BadVideo"]


class BadVideo(Exception):
    """A video that cannot be used (undecodable, no frame rate, too short)."""


def _is_main_process() -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return True


# ------------------------------------------------------------------------------------------------------------
# frame selection


def select_frame_indices(num_source_frames: int, source_fps: float, fps: int, max_num_frames: int,
                         skip_frms_num: float = 3) -> Tuple[List[int], int]:
    """Which source frames make one sample, and the ``num_frames`` field of the batch.

    Returns ``(indices, num_frames)``; ``indices`` has at most ``max_num_frames`` entries (the caller pads with
    the last frame).  The original's three cases:

    * A, the clip lasts longer than ``max_num_frames`` frames at ``fps``: frames at times ``k / fps`` after the
      first ``skip_frms_num`` frames, each the source frame nearest to that time (the fix; see module docstring);
    * B, otherwise but the clip has more than ``max_num_frames`` frames: every ``step``-th frame as the original;
    * C, shorter clips: the longest ``4k+1`` run of consecutive frames after the skipped ones.

    Raises :class:`BadVideo` when nothing usable remains.
    """
    n_src, target, skip = int(num_source_frames), int(max_num_frames), int(skip_frms_num)
    if source_fps is None or not math.isfinite(source_fps) or source_fps <= 0:
        raise BadVideo("no frame rate in the file")
    if n_src <= 0:
        raise BadVideo("no frames")
    if n_src / source_fps * fps > target:  # case A
        ratio = source_fps / fps
        indices = [min(skip + int(math.floor(k * ratio + 0.5)), n_src - 1) for k in range(target)]
        return indices, target
    start, end = skip, int(n_src - skip)
    if n_src > target:  # case B
        step = max((end - start) // target, 1)
        indices = list(range(start, end, step))[:target]
        if not indices:
            raise BadVideo(f"too short: {n_src} frames, {skip} skipped at each end")
        return indices, target
    n = end - start  # case C
    if n < 1:
        raise BadVideo(f"too short: {n_src} frames, {skip} skipped at each end")
    num_frames = n - 3 if n % 4 == 0 else n - (n % 4) + 1
    return list(range(start, start + num_frames)), num_frames


def pad_last_frame(frames: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Repeat the last frame up to ``num_frames`` frames, or keep the first ``num_frames`` (original helper)."""
    if frames.shape[0] >= num_frames:
        return frames[:num_frames]
    pad = frames[-1:].expand(num_frames - frames.shape[0], *frames.shape[1:])
    return torch.cat([frames, pad], dim=0)


def resize_for_rectangle_crop(frames: torch.Tensor, video_size: Sequence[int], reshape_mode: str = "center"
                              ) -> torch.Tensor:
    """``[T, C, H, W]`` uint8-valued frames -> resized to cover ``video_size`` (bicubic, antialiased, rounded and
    clamped to 0..255 as torchvision's uint8 resize) and cropped to it (centre, or random offsets drawn with
    ``np.random`` for ``reshape_mode="random"``).  Returns float32 values in 0..255."""
    h, w = int(video_size[0]), int(video_size[1])
    src_h, src_w = frames.shape[-2:]
    if src_w / src_h > w / h:
        new_h, new_w = h, int(src_w * h / src_h)
    else:
        new_h, new_w = int(src_h * w / src_w), w
    x = frames.float()
    if (new_h, new_w) != (src_h, src_w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        x = x.round_().clamp_(0, 255)
    if reshape_mode == "random":
        top = int(np.random.randint(0, new_h - h + 1))
        left = int(np.random.randint(0, new_w - w + 1))
    elif reshape_mode == "center":
        top, left = (new_h - h) // 2, (new_w - w) // 2
    else:
        raise ValueError(f"reshape_mode must be 'center' or 'random', got {reshape_mode!r}")
    return x[..., top:top + h, left:left + w]


# ------------------------------------------------------------------------------------------------------------
# decoding


def _ffmpeg_reason(err: Exception) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[-1] if lines else err.__class__.__name__


def count_frames(path: str) -> int:
    """Number of video frames of ``path`` (ffmpeg stream copy, no decoding); raises :class:`BadVideo`."""
    import imageio_ffmpeg

    try:
        n, _ = imageio_ffmpeg.count_frames_and_secs(path)
    except Exception as err:  # RuntimeError from ffmpeg, OSError, ...
        raise BadVideo(f"cannot be decoded: {_ffmpeg_reason(err)}") from None
    if n <= 0:
        raise BadVideo("no video frames")
    return int(n)


def decode_frames(path: str, indices: Optional[Sequence[int]] = None) -> Tuple[np.ndarray, float]:
    """Decode ``path`` -> (``[len(indices), H, W, 3]`` uint8 in the order of ``indices``, fps).

    Without ``indices`` every frame is returned.  Decoding stops after the last needed frame.  Raises
    :class:`BadVideo` if the file cannot be decoded or lacks a requested frame.
    """
    import imageio_ffmpeg

    wanted = None if indices is None else sorted(set(int(i) for i in indices))
    last = None if wanted is None else wanted[-1]
    found: Dict[int, np.ndarray] = {}
    frames_all: List[np.ndarray] = []
    gen = None
    try:
        gen = imageio_ffmpeg.read_frames(path, pix_fmt="rgb24")
        meta = next(gen)
        width, height = meta["size"]
        fps = float(meta.get("fps") or 0.0)
        for i, raw in enumerate(gen):
            if wanted is None or i in wanted:
                frame = np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3)
                if wanted is None:
                    frames_all.append(frame)
                else:
                    found[i] = frame
            if last is not None and i >= last:
                break
    except BadVideo:
        raise
    except Exception as err:
        raise BadVideo(f"cannot be decoded: {_ffmpeg_reason(err)}") from None
    finally:
        if gen is not None:
            gen.close()
    if wanted is None:
        if not frames_all:
            raise BadVideo("no video frames")
        return np.stack(frames_all), fps
    missing = [i for i in wanted if i not in found]
    if missing:
        raise BadVideo(f"frame {missing[0]} cannot be decoded (the file has {len(found) and max(found) + 1} readable frames)")
    return np.stack([found[int(i)] for i in indices]), fps


def read_video_meta(path: str) -> dict:
    """What ffmpeg reports of ``path`` before decoding (``fps``, ``size`` as (width, height)); raises
    :class:`BadVideo`."""
    import imageio_ffmpeg

    gen = None
    try:
        gen = imageio_ffmpeg.read_frames(path, pix_fmt="rgb24")
        return next(gen)
    except Exception as err:
        raise BadVideo(f"cannot be decoded: {_ffmpeg_reason(err)}") from None
    finally:
        if gen is not None:
            gen.close()


def read_video_fps(path: str) -> float:
    """The frame rate ffmpeg reports for ``path``; raises :class:`BadVideo`."""
    return float(read_video_meta(path).get("fps") or 0.0)


# ------------------------------------------------------------------------------------------------------------
# the dataset


def caption_path_for(video_path: str) -> str:
    """The original rule: replace ``.mp4`` by ``.txt`` and ``videos`` by ``labels`` in the whole path."""
    return video_path.replace(".mp4", ".txt").replace("videos", "labels")


def video_path_for(caption_path: str) -> str:
    return caption_path.replace(".txt", ".mp4").replace("labels", "videos")


def read_caption(path: str) -> str:
    """First line of a caption file; raises ``ValueError`` with the reason if unusable."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"caption is not UTF-8 text (byte {err.start}): save it as UTF-8") from None
    lines = text.splitlines()
    caption = lines[0].strip() if lines else ""
    if not caption:
        raise ValueError("empty caption (the first line of the file is the caption)")
    return caption


class SFTDataset(Dataset):
    """Video/caption folder dataset for supervised finetuning (original ``data_video.SFTDataset``).

    ``SFTDataset(data_dir, video_size, fps, max_num_frames, skip_frms_num=3)``: ``video_size`` is ``[H, W]``,
    ``fps`` the sampling rate, ``max_num_frames`` the frames per sample (``4k+1``), ``skip_frms_num`` frames
    skipped at the start (and, for short clips, at the end).  ``probe_workers`` threads count the frames of every
    video when the dataset is built, so unreadable and too-short videos are reported up front.  ``buckets`` (not in
    the original; :mod:`sat_cogvideo.buckets`) gives each video its own size and length, ``bucket_keys[i]`` =
    ``(frames, height, width)`` of item ``i`` (``None`` without buckets).
    """

    def __init__(self, data_dir, video_size, fps, max_num_frames, skip_frms_num=3, probe_workers: int = 8,
                 reshape_mode: str = "center", buckets=None):
        super().__init__()
        data_dir = os.fspath(data_dir)
        self._check_params(data_dir, video_size, fps, max_num_frames)
        from sat_cogvideo.buckets import Buckets

        self.buckets = Buckets.from_config(buckets, self.video_size, int(max_num_frames))
        self.data_dir = data_dir
        self.fps = int(fps)
        self.max_num_frames = int(max_num_frames)
        self.skip_frms_num = skip_frms_num
        self.reshape_mode = reshape_mode
        self._reported: set = set()
        self.skipped: Dict[str, str] = {}  # path -> reason, for every file left out
        self._bad_items: set = set()
        self.video_paths: List[str] = []
        self.captions: List[str] = []
        self.frame_counts: List[int] = []
        self.bucket_keys: Optional[List[Tuple[int, int, int]]] = [] if self.buckets else None
        candidates = self._captioned_videos(data_dir)
        for (video, caption), (n, key, reason) in zip(candidates, self._probe_all(candidates, probe_workers)):
            if reason is not None:
                self._skip(video, reason)
                continue
            self.video_paths.append(video)
            self.captions.append(caption)
            self.frame_counts.append(n)
            if self.buckets:
                self.bucket_keys.append(key)
        if not self.video_paths:
            detail = f"; {len(self.skipped)} file(s) skipped, see the warnings above" if self.skipped else ""
            raise UserError(f"dataset folder {data_dir} has no usable video/caption pair (expected labels/N.txt "
                            f"with a one-line UTF-8 caption beside videos/N.mp4){detail}")

    # --- building

    def _check_params(self, data_dir: str, video_size, fps, max_num_frames) -> None:
        if not os.path.isdir(data_dir):
            raise UserError(f"dataset folder {data_dir} does not exist: train_data must name folders holding "
                            f"labels/N.txt and videos/N.mp4")
        try:
            self.video_size = [int(v) for v in video_size]
        except (TypeError, ValueError):
            raise UserError(f"data.params.video_size must be [height, width], got {video_size!r}") from None
        if len(self.video_size) != 2 or min(self.video_size) <= 0:
            raise UserError(f"data.params.video_size must be [height, width] with positive sizes, got {video_size!r}")
        if int(max_num_frames) < 1 or int(fps) < 1:
            raise UserError(f"data.params.max_num_frames and fps must be positive, got {max_num_frames} and {fps}")

    def _captioned_videos(self, data_dir: str) -> List[tuple]:
        """(video, caption) of every ``videos/N.mp4`` with a readable ``labels/N.txt``; the rest is reported."""
        videos, labels = [], []
        for root, dirs, files in os.walk(data_dir):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(root, name)
                if name.endswith(".mp4"):
                    videos.append(path)
                elif name.endswith(".txt") and "labels" in path:
                    labels.append(path)
        video_set = set(videos)
        for label in labels:
            if video_path_for(label) not in video_set:
                self._skip(label, f"caption without video (expected {video_path_for(label)})")
        candidates = []
        for video in videos:
            label = caption_path_for(video)
            if not os.path.isfile(label):
                self._skip(video, f"video without caption (expected {label})")
                continue
            try:
                candidates.append((video, read_caption(label)))
            except (ValueError, OSError) as err:
                self._skip(label, str(err))
        return candidates

    def _probe_all(self, candidates, workers: int) -> List[tuple]:
        """(frame count, bucket key or None, None) or (None, None, reason) per candidate: every video is opened
        once (twice with buckets: its size and rate), in ``workers`` threads, so unreadable and too-short videos are
        reported before training."""
        def probe(item):
            try:
                n = count_frames(item[0])
                select_frame_indices(n, 1.0, 1, self.max_num_frames, self.skip_frms_num)  # length check only
                return n, self._bucket_key(item[0], n) if self.buckets else None, None
            except BadVideo as err:
                return None, None, str(err)

        if workers and len(candidates) > 1:
            with ThreadPoolExecutor(max_workers=min(int(workers), len(candidates))) as pool:
                return list(pool.map(probe, candidates))
        return [probe(c) for c in candidates]

    def _bucket_key(self, path: str, num_source_frames: int) -> Tuple[int, int, int]:
        """(frames, height, width) of the bucket of a video (rules in :mod:`sat_cogvideo.buckets`)."""
        meta = read_video_meta(path)
        width, height = meta["size"]
        longest = self.buckets.frames[-1]
        _, available = select_frame_indices(num_source_frames, float(meta.get("fps") or 0.0), self.fps, longest,
                                            self.skip_frms_num)
        return (self.buckets.frames_for(available), *self.buckets.size_for(height, width))

    def item_settings(self, index: int) -> dict:
        """The size and length item ``index`` is cut to (its bucket's, or the dataset's)."""
        if self.bucket_keys is None:
            return {"video_size": list(self.video_size), "max_num_frames": self.max_num_frames}
        frames, height, width = self.bucket_keys[index]
        return {"video_size": [height, width], "max_num_frames": frames}

    # --- reporting

    def _skip(self, path: str, reason: str) -> None:
        self.skipped[path] = reason
        self._report(path, reason)

    def _report(self, path: str, reason: str) -> None:
        if path in self._reported:
            return
        self._reported.add(path)
        if _is_main_process():
            print(f"warning: skipping {path}: {reason}", file=sys.stderr, flush=True)

    # --- items

    def __len__(self) -> int:
        return len(self.video_paths)

    def load_item(self, index: int) -> dict:
        """Decode item ``index``; raises :class:`BadVideo` if the video fails."""
        path = self.video_paths[index]
        source_fps = read_video_fps(path)
        settings = self.item_settings(index)
        indices, num_frames = select_frame_indices(self.frame_counts[index], source_fps, self.fps,
                                                   settings["max_num_frames"], self.skip_frms_num)
        frames, _ = decode_frames(path, indices)
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # T, C, H, W
        x = resize_for_rectangle_crop(x, settings["video_size"], reshape_mode=self.reshape_mode)
        x = pad_last_frame(x, settings["max_num_frames"])
        x = (x - 127.5) / 127.5
        return {"mp4": x.contiguous(), "txt": self.captions[index], "num_frames": num_frames, "fps": self.fps}

    def __getitem__(self, index: int) -> dict:
        n = len(self.video_paths)
        index = int(index) % n
        for offset in range(n):
            i = (index + offset) % n
            if i in self._bad_items:
                continue
            try:
                return self.load_item(i)
            except BadVideo as err:
                self._bad_items.add(i)
                self._skip(self.video_paths[i], str(err))
        raise UserError(f"no video of dataset {self.data_dir} can be decoded (every file failed, see the warnings above)")

    @classmethod
    def create_dataset_function(cls, path, args, **kwargs):
        """SAT's dataset factory: ``create_dataset_function(path, args)`` -> ``SFTDataset(data_dir=path, ...)``, or
        with ``--cache-latents`` the dataset on the cache that :func:`sat_cogvideo.latent_cache.prepare_cache` made."""
        if getattr(args, "cache_latents", None):
            from sat_cogvideo.latent_cache import prepared_dataset

            cached = prepared_dataset(path)
            if cached is not None:
                return cached
        return cls(data_dir=path, **kwargs)
