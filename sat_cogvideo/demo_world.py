"""The demo model's small visual world: captioned clips of a coloured shape moving on a plain background, and the
oracle that checks whether a video shows what its caption says.

A clip (:func:`make_clip`) is ``FRAMES`` frames of ``SIZE`` x ``SIZE`` pixels: a filled circle or square of one
colour of :data:`COLORS` moves by a few pixels per frame to the left, right, up or down on the background
:data:`BACKGROUND`; its caption (:func:`caption`) reads "a red circle moving to the left".  :data:`HELD_OUT` are
combinations never shown together in training (each of their colour, shape and direction is seen in other
combinations); :data:`NEW_COLOR` is never shown at all (the LoRA demo teaches it).

The oracle (:func:`describe`) finds the pixels far from the background, names the mean colour of their core
(:func:`core_color`; nearest :data:`COLORS` entry, :data:`NEW_COLOR` included) and the direction of their centroid's motion from the first to
the last frames.  Ours: the original has no demo world; written here because it is a few lines of NumPy.
"""
from __future__ import annotations

import itertools
import os
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

SIZE = 32
FRAMES = 9  # 4N+1 with an odd number of latent frames (the VAE decoder's upsampling needs it)
FPS = 8
BACKGROUND = (24, 24, 32)
COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (225, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40),
}
NEW_COLOR = ("cyan", (40, 215, 215))
SHAPES = ("circle", "square")
DIRECTIONS: Dict[str, Tuple[int, int]] = {  # (dx, dy) in image coordinates (y grows downwards)
    "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1),
}
PHRASES = {"left": "moving to the left", "right": "moving to the right", "up": "moving up", "down": "moving down"}
HELD_OUT = (("red", "square", "up"), ("green", "circle", "left"), ("blue", "square", "right"),
            ("yellow", "circle", "down"), ("red", "circle", "right"), ("blue", "circle", "up"))


def caption(color: str, shape: str, direction: str) -> str:
    return f"a {color} {shape} {PHRASES[direction]}"


def combinations(colors: Iterable[str] = tuple(COLORS)) -> List[Tuple[str, str, str]]:
    return list(itertools.product(colors, SHAPES, DIRECTIONS))


def training_combinations() -> List[Tuple[str, str, str]]:
    return [c for c in combinations() if c not in HELD_OUT]


def rgb(color: str) -> Tuple[int, int, int]:
    return NEW_COLOR[1] if color == NEW_COLOR[0] else COLORS[color]


def make_clip(color: str, shape: str, direction: str, rng: np.random.Generator, size: int = SIZE,
              frames: int = FRAMES) -> np.ndarray:
    """One clip ``[frames, size, size, 3]`` uint8; start, speed and shape size are drawn from ``rng``."""
    dx, dy = DIRECTIONS[direction]
    radius = rng.uniform(0.14, 0.19) * size
    travel = rng.uniform(0.3, 0.38) * size  # pixels from the first frame to the last
    speed = travel / (frames - 1)
    lo, hi = radius + 1, size - radius - 1
    along = rng.uniform(lo, hi - travel)  # the start along the motion axis, so the shape stays inside
    across = rng.uniform(lo + 2, hi - 2)
    sign = dx + dy
    start = along if sign > 0 else size - along
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    clip = np.empty((frames, size, size, 3), np.uint8)
    clip[...] = BACKGROUND
    for t in range(frames):
        pos = start + sign * speed * t
        cx, cy = (pos, across) if dx else (across, pos)
        if shape == "circle":
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius ** 2
        else:
            mask = (np.abs(xx - cx) <= radius * 0.9) & (np.abs(yy - cy) <= radius * 0.9)
        clip[t][mask] = rgb(color)
    return clip


def write_dataset(folder: str, combos, clips_per_combo: int, seed: int) -> str:
    """A finetuning dataset ``folder/{labels,videos}/N.{txt,mp4}``: ``clips_per_combo`` clips of every
    ``(color, shape, direction)`` of ``combos``, drawn from ``seed``; written under a temporary name, then renamed
    (an existing dataset is kept)."""
    import shutil

    from sat_cogvideo.atomic import make_temp_dir
    from sat_cogvideo.media import write_video

    if os.path.isdir(os.path.join(folder, "videos")):
        return folder
    os.makedirs(os.path.dirname(os.path.abspath(folder)), exist_ok=True)
    tmp = make_temp_dir(os.path.dirname(os.path.abspath(folder)), prefix=".dataset-")
    os.makedirs(os.path.join(tmp, "labels"))
    rng = np.random.default_rng(seed)
    n = 0
    for _ in range(clips_per_combo):
        for combo in combos:
            n += 1
            write_video(os.path.join(tmp, "videos", f"{n}.mp4"), make_clip(*combo, rng), fps=FPS, quality=9)
            with open(os.path.join(tmp, "labels", f"{n}.txt"), "w", encoding="utf-8") as f:
                f.write(caption(*combo) + "\n")
    try:
        os.replace(tmp, folder)
    except OSError:  # written meanwhile by another process
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# -----------------------------------------------------------------------------------------------------------
# the oracle


def _as_frames(video) -> np.ndarray:
    """``[F, H, W, 3]`` uint8 array, or ``[F, 3, H, W]`` floats in [0, 1] (torch or NumPy) -> float ``[F, H, W, 3]``
    in 0..255."""
    x = video.detach().cpu().float().numpy() if hasattr(video, "detach") else np.asarray(video)
    if x.dtype == np.uint8:
        return x.astype(np.float32)
    if x.ndim == 4 and x.shape[1] == 3 and x.shape[-1] != 3:
        x = x.transpose(0, 2, 3, 1)
    return np.clip(x, 0.0, 1.0).astype(np.float32) * 255.0


def foreground(frames: np.ndarray, threshold: float = 60.0) -> np.ndarray:
    """``[F, H, W]`` bool: pixels whose colour is farther than ``threshold`` from :data:`BACKGROUND`."""
    return np.linalg.norm(frames - np.asarray(BACKGROUND, np.float32), axis=-1) > threshold


def core_color(frames: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """Mean colour of the shape's core: the foreground pixels at least as far from the background as the median
    one.  A generated shape's rim blends into the dark background, and at 32x32 the rim is half the shape: its
    mean would darken every colour toward the background (a dim cyan lies nearer green than cyan)."""
    pixels = frames[fg]
    dist = np.linalg.norm(pixels - np.asarray(BACKGROUND, np.float32), axis=-1)
    return pixels[dist >= np.median(dist)].mean(axis=0)


def nearest_color(mean_rgb, names: Optional[Iterable[str]] = None) -> str:
    names = list(names) if names is not None else list(COLORS) + [NEW_COLOR[0]]
    dist = [np.linalg.norm(np.asarray(mean_rgb, np.float32) - np.asarray(rgb(n), np.float32)) for n in names]
    return names[int(np.argmin(dist))]


def describe(video, names: Optional[Iterable[str]] = None) -> dict:
    """What a viewer sees: ``color`` (nearest palette name of the foreground core's mean colour, None if no
    foreground), ``direction`` (of the centroid from the first third of frames to the last third, None if it
    moves less than a pixel or the shape vanishes), ``shift`` (dx, dy) and ``mean_rgb``."""
    frames = _as_frames(video)
    fg = foreground(frames)
    if fg.sum() < 4:
        return {"color": None, "direction": None, "shift": (0.0, 0.0), "mean_rgb": None}
    mean_rgb = core_color(frames, fg)
    yy, xx = np.mgrid[0:frames.shape[1], 0:frames.shape[2]]
    cents = [(float(xx[m].mean()), float(yy[m].mean())) if m.sum() >= 2 else None for m in fg]
    k = max(1, len(cents) // 3)
    first = [c for c in cents[:k] if c is not None]
    last = [c for c in cents[-k:] if c is not None]
    direction, shift = None, (0.0, 0.0)
    if first and last:
        shift = tuple(float(np.mean([c[i] for c in last]) - np.mean([c[i] for c in first])) for i in (0, 1))
        if max(abs(shift[0]), abs(shift[1])) >= 1.0:
            if abs(shift[0]) >= abs(shift[1]):
                direction = "right" if shift[0] > 0 else "left"
            else:
                direction = "down" if shift[1] > 0 else "up"
    return {"color": nearest_color(mean_rgb, names), "direction": direction, "shift": shift,
            "mean_rgb": tuple(float(v) for v in mean_rgb)}


def follows(video, color: str, direction: str, names: Optional[Iterable[str]] = None) -> bool:
    """Whether ``video`` shows a shape of ``color`` moving in ``direction``."""
    seen = describe(video, names)
    return seen["color"] == color and seen["direction"] == direction


def parse_caption(text: str) -> Tuple[str, str, str]:
    """``(color, shape, direction)`` of a caption made by :func:`caption`."""
    words = text.strip().split()
    direction = next(d for d, p in PHRASES.items() if text.strip().endswith(p))
    return words[1], words[2], direction
