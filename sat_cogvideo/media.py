"""Reading and writing images and videos, and the resize rules of each model family.

Maps to the I/O parts of the original ``sample_video.py`` (``save_video_as_grid_and_mp4``, the image
loading of the I2V branch) without torchvision: PIL resizes images, ``imageio`` with ``imageio-ffmpeg``
reads and writes mp4 files.  Every file is written atomically (:mod:`sat_cogvideo.atomic`), so an interrupted run
never leaves a truncated output under the final name.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from sat_cogvideo.atomic import atomic_path
from sat_cogvideo.errors import UserError
from sat_cogvideo.families import get_generation

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


# --------------------------------------------------------------------------------------------------
# video output


def frames_to_uint8(video: torch.Tensor) -> np.ndarray:
    """``[F, 3, H, W]`` floats in [0, 1] -> ``[F, H, W, 3]`` uint8, converted by truncation as the original."""
    if video.ndim != 4 or video.shape[1] != 3:
        raise ValueError(f"expected a [frames, 3, H, W] tensor, got {tuple(video.shape)}")
    x = video.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    return (255.0 * x).astype(np.uint8)


def write_video(path: str, video, fps: int, quality: float | None = 5) -> str:
    """Write an mp4 at ``path`` (atomically) and return ``path``.

    ``video`` is a ``[F, 3, H, W]`` float tensor in [0, 1] or an ``[F, H, W, 3]`` uint8 array.  The
    writer is imageio's FFmpeg writer with its defaults (libx264, yuv420p), as the original.
    """
    import imageio

    frames = frames_to_uint8(video) if isinstance(video, torch.Tensor) else np.asarray(video, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"expected [frames, H, W, 3] uint8 frames, got {frames.shape}")
    with atomic_path(path, suffix=".mp4") as tmp:
        writer = imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, quality=quality)
        try:
            for frame in frames:
                writer.append_data(frame)
        finally:
            writer.close()
    return path


def preview_strip(video, max_frames: int = 8) -> np.ndarray:
    """Up to ``max_frames`` frames, evenly spaced from first to last, side by side: ``[H, n*W, 3]`` uint8.

    ``video`` is what :func:`write_video` takes (``[F, 3, H, W]`` floats in [0, 1] or ``[F, H, W, 3]`` uint8)."""
    frames = frames_to_uint8(video) if isinstance(video, torch.Tensor) else np.asarray(video, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"expected [frames, H, W, 3] uint8 frames, got {frames.shape}")
    n = min(max_frames, len(frames))
    picks = np.linspace(0, len(frames) - 1, n).round().astype(int)
    return np.concatenate([frames[i] for i in picks], axis=1)


def write_preview(path: str, video, max_frames: int = 8) -> str:
    """Write a PNG strip of frames (:func:`preview_strip`) at ``path``, atomically; return ``path``."""
    from PIL import Image

    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(preview_strip(video, max_frames)).save(tmp, format="PNG")
    return path


# --------------------------------------------------------------------------------------------------
# input


def read_image(path: str):
    """Open ``path`` as an RGB PIL image; a missing or undecodable file is a :class:`UserError`."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise UserError(f"image {path!r} does not exist: give an existing image file")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise UserError(f"image {path!r} cannot be decoded ({err.__class__.__name__}): give a JPEG/PNG/WebP image") from None


def read_video(path: str, max_frames: int | None = None) -> tuple[np.ndarray, float]:
    """Decode up to ``max_frames`` frames of ``path`` -> (``[F, H, W, 3]`` uint8, fps)."""
    import imageio

    if not os.path.isfile(path):
        raise UserError(f"video {path!r} does not exist: give an existing video file")
    frames = []
    try:
        reader = imageio.get_reader(path, format="FFMPEG")
    except Exception as err:  # imageio raises a mix of OSError/ValueError/RuntimeError
        raise UserError(f"video {path!r} cannot be decoded ({err.__class__.__name__}): give an mp4/avi/mov video") from None
    try:
        fps = float(reader.get_meta_data().get("fps", 0.0) or 0.0)
        for frame in reader:
            frames.append(np.asarray(frame)[..., :3])
            if max_frames is not None and len(frames) >= max_frames:
                break
    except Exception as err:
        if not frames:
            raise UserError(f"video {path!r} cannot be decoded ({err.__class__.__name__}): give an mp4/avi/mov video") from None
    finally:
        reader.close()
    if not frames:
        raise UserError(f"video {path!r} has no frames")
    return np.stack(frames), fps


# --------------------------------------------------------------------------------------------------
# resize rules


def pil_to_tensor(img) -> torch.Tensor:
    """PIL RGB image -> ``[3, H, W]`` float32 in [0, 1] (torchvision's ``ToTensor``)."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255.0)


def nearest_multiple_of_16(n: float) -> int:
    """The nearer of ``16·floor(n/16)`` and ``16·(floor(n/16)+1)``; a tie goes to the upper one."""
    lower = 16 * int(n // 16)
    upper = lower + 16
    return lower if n - lower < upper - n else upper


def i2v_15_latent_size(width: int, height: int, short_side: int = 768) -> tuple[int, int]:
    """CogVideoX1.5 I2V: latent (h, w) for an image of ``width``×``height`` pixels.

    The short side becomes ``short_side`` pixels, the long side the image's aspect ratio times that,
    rounded to the nearest multiple of 16 (no crop).  1920×1080 -> (96, 170).
    """
    if height < width:
        return short_side // 8, nearest_multiple_of_16(width / height * short_side) // 8
    return nearest_multiple_of_16(height / width * short_side) // 8, short_side // 8


def resize_cover_crop_bicubic(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """CogVideoX 1.0 I2V rule: ``[..., 3, h0, w0]`` in [0, 1] resized to cover ``height``×``width``
    (bicubic, antialiased, as torchvision's tensor resize), then centre-cropped.  No clamping."""
    h0, w0 = image.shape[-2:]
    if w0 / h0 > width / height:
        new_h, new_w = height, int(w0 * height / h0)
    else:
        new_h, new_w = int(h0 * width / w0), width
    lead = image.shape[:-3]
    x = image.reshape(-1, *image.shape[-3:]).float()
    x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    x = x[..., top:top + height, left:left + width]
    return x.reshape(*lead, 3, height, width)


def resize_lanczos(img, height: int, width: int):
    """PIL LANCZOS resize to ``height``×``width`` (the CogVideoX1.5 I2V rule, no crop)."""
    from PIL import Image

    return img.resize((width, height), resample=Image.LANCZOS)


def resize_cover_crop_pil(img, height: int, width: int):
    """Aspect-preserving cover resize (LANCZOS) and centre crop of a PIL image (v2v frames)."""
    from PIL import Image

    w0, h0 = img.size
    scale = max(height / h0, width / w0)
    new_w, new_h = max(width, round(w0 * scale)), max(height, round(h0 * scale))
    img = img.resize((new_w, new_h), resample=Image.LANCZOS)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return img.crop((left, top, left + width, top + height))


def _cover_crop_bicubic(img, height: int, width: int) -> torch.Tensor:
    return resize_cover_crop_bicubic(pil_to_tensor(img), height, width)


def _lanczos(img, height: int, width: int) -> torch.Tensor:
    return pil_to_tensor(resize_lanczos(img, height, width))


# ``Generation.i2v_resize`` -> PIL image, height, width -> [3, H, W] in [0, 1]
I2V_RESIZE = {"cover_crop_bicubic": _cover_crop_bicubic, "lanczos": _lanczos}


def load_i2v_image(path: str, generation, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """Read the I2V conditioning image as the original does: ``[1, 3, 1, H, W]`` float32 in [-1, 1].

    ``generation`` ("1.0", "1.5" or a ``families.Generation``) picks the resize (``Generation.i2v_resize``):
    1.0 cover-resize + centre crop to ``height``×``width`` (480×720), bicubic; 1.5 LANCZOS to the size, by
    default short side 768 px and long side the aspect ratio rounded to 16 px (:func:`i2v_15_latent_size`).
    """
    img = read_image(path)
    if height is None or width is None:
        h, w = i2v_15_latent_size(*img.size)
        height, width = 8 * h, 8 * w
    x = I2V_RESIZE[get_generation(generation).i2v_resize](img, height, width)
    return (x * 2.0 - 1.0).unsqueeze(0).unsqueeze(2)


def load_v2v_video(path: str, num_frames: int, height: int, width: int) -> torch.Tensor:
    """First ``num_frames`` frames of a video, cover-resized (LANCZOS) and centre-cropped to
    ``height``×``width``: ``[1, 3, F, H, W]`` float32 in [-1, 1]."""
    from PIL import Image

    frames, _ = read_video(path, max_frames=num_frames)
    if len(frames) < num_frames:
        raise UserError(f"video {path!r} has {len(frames)} frames but {num_frames} are needed: "
                        f"give a longer video or fewer --num-frames")
    out = [pil_to_tensor(resize_cover_crop_pil(Image.fromarray(f), height, width)) for f in frames]
    x = torch.stack(out, dim=1)  # [3, F, H, W]
    return (x * 2.0 - 1.0).unsqueeze(0)
