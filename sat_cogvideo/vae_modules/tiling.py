"""Memory features of diffusers' ``AutoencoderKLCogVideoX``, on our VAE: slicing, spatial tiling, frame batching.

None of this exists in the original SAT code; it wraps the encoder/decoder from outside (``VideoAutoencoderInferenceWrapper``
mixes :class:`VAEMemoryFeatures` in).  Switches (names and defaults as diffusers):

* ``enable_slicing()`` / ``disable_slicing()``: batch items are encoded/decoded one at a time.  Same numbers as
  the whole batch (float32 rounding).
* ``enable_tiling(tile_sample_min_height=None, tile_sample_min_width=None, tile_overlap_factor_height=None,
  tile_overlap_factor_width=None)`` / ``disable_tiling()``: inputs larger than the tile (default 240×360 pixels,
  i.e. 30×45 latents; overlaps 1/6 and 1/5) are processed in overlapping spatial tiles, blended linearly over
  the overlap exactly as diffusers does.  Tiles are written into a preallocated output as they are produced
  (only the overlap strips of the neighbours are kept), so peak memory is one tile's activations plus the output.
* ``enable_frame_batching(num_latent_frames_batch_size=2, num_sample_frames_batch_size=8)`` /
  ``disable_frame_batching()``: decode (encode) in temporal chunks carrying the causal-conv frame cache, as the
  original's inference script and diffusers do; chunk 0 is ``batch + T mod batch`` frames, then ``batch`` each.
  GroupNorm statistics are per chunk, so the numbers equal diffusers' default decode (encode), not the
  whole-clip pass.  ``None`` (the default here, as the original ``decode``) processes the whole clip at once.
"""
from __future__ import annotations

import torch


def frame_batches(length: int, batch: int | None):
    """Diffusers' temporal chunks ``[(start, end), ...]``: the remainder goes into the first chunk."""
    if not batch or length <= batch:
        return [(0, length)]
    rem = length % batch
    return [(0, batch + rem)] + [(batch * k + rem, batch * (k + 1) + rem) for k in range(1, length // batch)]


def blend_v(a: torch.Tensor, b: torch.Tensor, extent: int) -> torch.Tensor:
    """Blend the top rows of ``b`` with the bottom rows of ``a`` (in place on ``b``), linear ramp over ``extent``."""
    extent = min(a.shape[3], b.shape[3], extent)
    for y in range(extent):
        b[:, :, :, y, :] = a[:, :, :, -extent + y, :] * (1 - y / extent) + b[:, :, :, y, :] * (y / extent)
    return b


def blend_h(a: torch.Tensor, b: torch.Tensor, extent: int) -> torch.Tensor:
    """Blend the left columns of ``b`` with the right columns of ``a`` (in place on ``b``)."""
    extent = min(a.shape[4], b.shape[4], extent)
    for x in range(extent):
        b[:, :, :, :, x] = a[:, :, :, :, -extent + x] * (1 - x / extent) + b[:, :, :, :, x] * (x / extent)
    return b


def tiled_apply(x, fn, out_size, tile, stride, blend, limit):
    """Apply ``fn`` to overlapping spatial tiles of ``x`` (B, C, T, H, W) and assemble the blended result.

    ``tile``/``stride`` are (h, w) in input units; ``blend``/``limit`` (h, w) in output units; ``out_size(n)``
    gives the output extent of an input extent ``n``.  Equal to diffusers' ``tiled_encode``/``tiled_decode``
    (same tiles, same blending order), but streaming: tile (i, j) is blended with the already blended bottom
    strip of tile (i-1, j) and right strip of tile (i, j-1), cropped to ``limit`` and written out at once.
    """
    height, width = x.shape[-2:]
    row_starts, col_starts = range(0, height, stride[0]), range(0, width, stride[1])
    crop_h = [min(out_size(min(tile[0], height - i)), limit[0]) for i in row_starts]
    crop_w = [min(out_size(min(tile[1], width - j)), limit[1]) for j in col_starts]
    out = None
    above = [None] * len(col_starts)  # bottom strips of the previous row's tiles
    y0 = 0
    for ti, i in enumerate(row_starts):
        left, x0 = None, 0
        for tj, j in enumerate(col_starts):
            t = fn(x[:, :, :, i:i + tile[0], j:j + tile[1]])
            if above[tj] is not None:
                t = blend_v(above[tj], t, blend[0])
            if left is not None:
                t = blend_h(left, t, blend[1])
            above[tj] = t[:, :, :, -min(t.shape[3], blend[0]):, :].clone() if blend[0] > 0 else None
            left = t[:, :, :, :, -min(t.shape[4], blend[1]):].clone() if blend[1] > 0 else None
            if out is None:
                out = t.new_empty(t.shape[:3] + (sum(crop_h), sum(crop_w)))
            out[:, :, :, y0:y0 + crop_h[ti], x0:x0 + crop_w[tj]] = t[:, :, :, :crop_h[ti], :crop_w[tj]]
            x0 += crop_w[tj]
            del t
        y0 += crop_h[ti]
    return out


class VAEMemoryFeatures:
    """Slicing, tiling and frame-batching switches (see the module docstring)."""

    use_slicing = False
    use_tiling = False
    num_latent_frames_batch_size: int | None = None
    num_sample_frames_batch_size: int | None = None
    tile_sample_min_height = 240
    tile_sample_min_width = 360
    tile_overlap_factor_height = 1 / 6
    tile_overlap_factor_width = 1 / 5

    @property
    def spatial_compression(self) -> int:
        return 2 ** (self.encoder.num_resolutions - 1)

    @property
    def tile_latent_min_height(self) -> int:
        return int(self.tile_sample_min_height / self.spatial_compression)

    @property
    def tile_latent_min_width(self) -> int:
        return int(self.tile_sample_min_width / self.spatial_compression)

    def enable_slicing(self) -> None:
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self, tile_sample_min_height=None, tile_sample_min_width=None,
                      tile_overlap_factor_height=None, tile_overlap_factor_width=None) -> None:
        self.use_tiling = True
        self.tile_sample_min_height = tile_sample_min_height or self.tile_sample_min_height
        self.tile_sample_min_width = tile_sample_min_width or self.tile_sample_min_width
        self.tile_overlap_factor_height = tile_overlap_factor_height or self.tile_overlap_factor_height
        self.tile_overlap_factor_width = tile_overlap_factor_width or self.tile_overlap_factor_width

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def enable_frame_batching(self, num_latent_frames_batch_size: int | None = 2,
                              num_sample_frames_batch_size: int | None = 8) -> None:
        self.num_latent_frames_batch_size = num_latent_frames_batch_size
        self.num_sample_frames_batch_size = num_sample_frames_batch_size

    def disable_frame_batching(self) -> None:
        self.num_latent_frames_batch_size = None
        self.num_sample_frames_batch_size = None

    # -- tiled paths: ``one`` maps a tile to its output --------------------------------------------------
    def _wants_tiles(self, x, latent: bool) -> bool:
        if not self.use_tiling:
            return False
        th, tw = ((self.tile_latent_min_height, self.tile_latent_min_width) if latent
                  else (self.tile_sample_min_height, self.tile_sample_min_width))
        return x.shape[-2] > th or x.shape[-1] > tw

    def _tiled_encode(self, x, one):
        ts, tl = (self.tile_sample_min_height, self.tile_sample_min_width), (self.tile_latent_min_height, self.tile_latent_min_width)
        fh, fw = self.tile_overlap_factor_height, self.tile_overlap_factor_width
        stride = (int(ts[0] * (1 - fh)), int(ts[1] * (1 - fw)))
        blend = (int(tl[0] * fh), int(tl[1] * fw))
        limit = (tl[0] - blend[0], tl[1] - blend[1])
        levels = self.encoder.num_resolutions - 1

        def out_size(n):
            for _ in range(levels):
                n //= 2
            return n

        return tiled_apply(x, one, out_size, ts, stride, blend, limit)

    def _tiled_decode(self, z, one):
        ts, tl = (self.tile_sample_min_height, self.tile_sample_min_width), (self.tile_latent_min_height, self.tile_latent_min_width)
        fh, fw = self.tile_overlap_factor_height, self.tile_overlap_factor_width
        stride = (int(tl[0] * (1 - fh)), int(tl[1] * (1 - fw)))
        blend = (int(ts[0] * fh), int(ts[1] * fw))
        limit = (ts[0] - blend[0], ts[1] - blend[1])
        scale = self.spatial_compression
        return tiled_apply(z, one, lambda n: n * scale, tl, stride, blend, limit)
