"""Building blocks, encoder and decoder of the CogVideoX 3D causal VAE.

Maps to ``sat/vae_modules/cp_enc_dec.py`` of CogVideoX: same class names, constructor parameters, forward
signatures and state-dict keys.  Behaviour follows the v1.0 tag and diffusers (README, "Differences from the original"):

* first-frame rule: in a single process, the first frame is handled separately by the temporal
  down/up-sampling and the spatial norm iff the current time length is odd ("parity rule"), so 4N+1 frames
  ↔ N+1 latents and 21 latents decode to 81 frames (HEAD's 84 is the defect we fix); inside an active
  context-parallel region, CP rank 0 holds the clip's first frame and handles it separately (``fake_cp``),
  the other ranks never do;
* causal convolutions pad time with ``kt-1`` copies of frame 0, or with the cached last frames of the
  previous chunk (``clear_cache=False``), or across ranks with the previous rank's last frames;
* the frame cache is kept on the activation's device (the original's CPU round-trip has no numeric effect)
  and only for temporal kernels > 1.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from sat_cogvideo.vae_modules import context_parallel as cp


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    """swish; in place when no autograd graph is recorded (the input is always a fresh temporary)."""
    if torch.is_grad_enabled():
        return F.silu(x)
    return F.silu(x, inplace=True)


def _first_frame_special(length: int, fake_cp: bool = True) -> bool:
    state = cp.active()
    if state is None:
        return length > 1 and length % 2 == 1
    return state.rank == 0 and fake_cp and length > 1


def _compress_time_here(length: int) -> bool:
    # Inside a CP region a rank's share may be a single frame of a longer clip: it is still compressed.
    return length > 1 or cp.active() is not None


class SafeConv3d(nn.Conv3d):
    """Conv3d that convolves inputs estimated above 2 GiB (2 bytes per element) in temporal chunks.

    Maps to the original ``SafeConv3d``; temporal padding must be 0 and temporal stride 1 (always so here),
    which makes the chunked result equal to the plain convolution.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        gib = input.numel() * 2 / 1024**3
        if gib <= 2:
            return super().forward(input)
        kt = self.kernel_size[0]
        chunks = list(torch.chunk(input, int(gib / 2) + 1, dim=2))
        if kt > 1:
            chunks = [chunks[0]] + [torch.cat([prev[:, :, 1 - kt:], cur], dim=2) for prev, cur in zip(chunks, chunks[1:])]
        return torch.cat([super(SafeConv3d, self).forward(c) for c in chunks], dim=2)


class ContextParallelCausalConv3d(nn.Module):
    """Causal 3D convolution (original ``ContextParallelCausalConv3d``); keys ``conv.weight``, ``conv.bias``.

    Time is padded causally by ``kt-1`` frames (frame 0 replicated, the frame cache, or the previous CP rank's
    frames); height and width are zero-padded by ``k//2`` inside the inner convolution (same numbers as the
    original's explicit ``F.pad``, one copy less).
    """

    def __init__(self, chan_in, chan_out, kernel_size, stride=1, **kwargs):
        super().__init__()
        if isinstance(kernel_size, int):
            kernel_size = (kernel_size,) * 3
        kt, kh, kw = kernel_size
        assert kh % 2 == 1 and kw % 2 == 1, "height and width kernel sizes must be odd"
        self.time_pad = kt - 1
        self.height_pad = kh // 2
        self.width_pad = kw // 2
        self.time_kernel_size = kt
        self.conv = SafeConv3d(chan_in, chan_out, kernel_size, stride=(stride,) * 3, dilation=(1, 1, 1),
                               padding=(0, self.height_pad, self.width_pad), **kwargs)
        self.cache_padding = None

    def forward(self, input_: torch.Tensor, clear_cache: bool = True) -> torch.Tensor:
        kt = self.time_kernel_size
        x = input_
        if kt > 1:
            head = self.cache_padding
            if head is None:
                head = input_[:, :, :1].expand(-1, -1, kt - 1, -1, -1)
            x = cp.prepend_from_previous_rank(input_, kt - 1, head)
        self.cache_padding = None
        if not clear_cache and kt > 1:
            self.cache_padding = x[:, :, 1 - kt:].detach().clone()
        return self.conv(x)


class ContextParallelGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics cover the whole clip when it is split over context-parallel ranks.

    Original ``ContextParallelGroupNorm`` (gather, normalise, split); here the statistics are all-reduced.
    Equal to ``nn.GroupNorm`` outside an active CP region.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if cp.active() is None:
            return super().forward(input)
        return cp.gathered_group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


def Normalize(in_channels, gather=False, **kwargs):
    """GroupNorm(32 groups, eps 1e-6, affine); the context-parallel variant when ``gather``."""
    cls = ContextParallelGroupNorm if gather else nn.GroupNorm
    return cls(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)


class SpatialNorm3D(nn.Module):
    """Decoder norm conditioned on the latent: ``GroupNorm(f) * conv_y(zq) + conv_b(zq)`` (original class).

    ``zq`` is resized to ``f``'s (T, H, W) by nearest interpolation; with the first-frame rule, latent frame 0
    is resized alone to frame 0 and the rest to the remaining frames.
    """

    def __init__(self, f_channels, zq_channels, freeze_norm_layer=False, add_conv=False, pad_mode="constant",
                 gather=False, **norm_layer_params):
        super().__init__()
        norm_cls = ContextParallelGroupNorm if gather else nn.GroupNorm
        self.norm_layer = norm_cls(num_channels=f_channels, **norm_layer_params)
        if freeze_norm_layer:
            for p in self.norm_layer.parameters():
                p.requires_grad = False
        self.add_conv = add_conv
        if add_conv:
            self.conv = ContextParallelCausalConv3d(zq_channels, zq_channels, kernel_size=3)
        self.conv_y = ContextParallelCausalConv3d(zq_channels, f_channels, kernel_size=1)
        self.conv_b = ContextParallelCausalConv3d(zq_channels, f_channels, kernel_size=1)

    def forward(self, f, zq, clear_fake_cp_cache=True, fake_cp=True):
        t, h, w = f.shape[-3:]
        if _first_frame_special(t, fake_cp):
            zq = torch.cat([F.interpolate(zq[:, :, :1], size=(1, h, w), mode="nearest"),
                            F.interpolate(zq[:, :, 1:], size=(t - 1, h, w), mode="nearest")], dim=2)
        else:
            zq = F.interpolate(zq, size=(t, h, w), mode="nearest")
        if self.add_conv:
            zq = self.conv(zq, clear_cache=clear_fake_cp_cache)
        out = self.norm_layer(f)
        if torch.is_grad_enabled():
            return out * self.conv_y(zq, clear_cache=clear_fake_cp_cache) + self.conv_b(zq, clear_cache=clear_fake_cp_cache)
        out.mul_(self.conv_y(zq, clear_cache=clear_fake_cp_cache))
        return out.add_(self.conv_b(zq, clear_cache=clear_fake_cp_cache))


def Normalize3D(in_channels, zq_ch, add_conv, gather=False):
    return SpatialNorm3D(in_channels, zq_ch, gather=gather, freeze_norm_layer=False, add_conv=add_conv,
                         num_groups=32, eps=1e-6, affine=True)


def _conv2d_per_frame(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    # The 2-D convolution applied to every frame, as a (1, kh, kw) 3-D convolution: no (B·T, C, H, W) copies.
    return F.conv3d(x, conv.weight.unsqueeze(2), conv.bias, stride=(1,) + conv.stride,
                    padding=(0,) + conv.padding)


class DownSample3D(nn.Module):
    """Average-pool time by 2 (first frame kept by the first-frame rule), then a 3×3 stride-2 conv per frame."""

    def __init__(self, in_channels, with_conv, compress_time=False, out_channels=None):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=0)
        self.compress_time = compress_time

    def forward(self, x, fake_cp=True):
        t = x.shape[2]
        if self.compress_time and _compress_time_here(t):
            start = 1 if _first_frame_special(t, fake_cp) else 0
            pairs = (t - start) // 2  # a trailing unpaired frame is dropped, as avg_pool1d does
            pooled = (x[:, :, start:start + 2 * pairs:2] + x[:, :, start + 1:start + 2 * pairs:2]) / 2
            x = torch.cat([x[:, :, :1], pooled], dim=2) if start else pooled
        if self.with_conv:
            return _conv2d_per_frame(self.conv, F.pad(x, (0, 1, 0, 1)))
        b, c, t, h, w = x.shape
        x = F.avg_pool2d(x.transpose(1, 2).reshape(b * t, c, h, w), kernel_size=2, stride=2)
        return x.reshape(b, t, c, *x.shape[-2:]).transpose(1, 2)


class Upsample3D(nn.Module):
    """Nearest ×2 in space (and in time, first frame kept by the first-frame rule), then a 3×3 conv per frame."""

    def __init__(self, in_channels, with_conv, compress_time=False):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)
        self.compress_time = compress_time

    def forward(self, x, fake_cp=True):
        b, c, t, h, w = x.shape
        if self.compress_time and _compress_time_here(t):
            if _first_frame_special(t, fake_cp):
                out = x.new_empty((b, c, 2 * t - 1, 2 * h, 2 * w))
                out[:, :, :1] = F.interpolate(x[:, :, :1], size=(1, 2 * h, 2 * w), mode="nearest")
                out[:, :, 1:] = F.interpolate(x[:, :, 1:], scale_factor=2.0, mode="nearest")
                x = out
            else:
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=(t, 2 * h, 2 * w), mode="nearest")
        if self.with_conv:
            x = _conv2d_per_frame(self.conv, x)
        return x


class ContextParallelResnetBlock3D(nn.Module):
    """Pre-activation ResNet block with causal 3×3×3 convs (original ``ContextParallelResnetBlock3D``)."""

    def __init__(self, *, in_channels, out_channels=None, conv_shortcut=False, dropout, temb_channels=512,
                 zq_ch=None, add_conv=False, gather_norm=False, normalization=Normalize):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.use_conv_shortcut = conv_shortcut
        self.norm1 = normalization(in_channels, zq_ch=zq_ch, add_conv=add_conv, gather=gather_norm)
        self.conv1 = ContextParallelCausalConv3d(in_channels, out_channels, kernel_size=3)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = normalization(out_channels, zq_ch=zq_ch, add_conv=add_conv, gather=gather_norm)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = ContextParallelCausalConv3d(out_channels, out_channels, kernel_size=3)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = ContextParallelCausalConv3d(in_channels, out_channels, kernel_size=3)
            else:
                self.nin_shortcut = SafeConv3d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def _norm(self, norm, x, zq, clear_fake_cp_cache, fake_cp):
        if zq is None:
            return norm(x)
        return norm(x, zq, clear_fake_cp_cache=clear_fake_cp_cache, fake_cp=fake_cp)

    def forward(self, x, temb, zq=None, clear_fake_cp_cache=True, fake_cp=True):
        h = nonlinearity(self._norm(self.norm1, x, zq, clear_fake_cp_cache, fake_cp))
        h = self.conv1(h, clear_cache=clear_fake_cp_cache)
        if temb is not None:
            h = h + self.temb_proj(nonlinearity(temb))[:, :, None, None, None]
        h = nonlinearity(self._norm(self.norm2, h, zq, clear_fake_cp_cache, fake_cp))
        h = self.dropout(h)
        h = self.conv2(h, clear_cache=clear_fake_cp_cache)
        if self.in_channels != self.out_channels:
            if self.use_conv_shortcut:
                x = self.conv_shortcut(x, clear_cache=clear_fake_cp_cache)
            else:
                x = self.nin_shortcut(x)
        if torch.is_grad_enabled():
            return x + h
        return h.add_(x)


class ContextParallelEncoder3D(nn.Module):
    """Video encoder: (B, in_channels, T, H, W) → (B, 2·z_channels, T', H/2^(L-1), W/2^(L-1)) posterior moments.

    Original ``ContextParallelEncoder3D``; time is compressed by ``temporal_compress_times`` over the first
    levels (4N+1 frames → N+1 latents).
    """

    def __init__(self, *, ch, out_ch, ch_mult=(1, 2, 4, 8), num_res_blocks, attn_resolutions, dropout=0.0,
                 resamp_with_conv=True, in_channels, resolution, z_channels, double_z=True, pad_mode="first",
                 temporal_compress_times=4, gather_norm=False, **ignore_kwargs):
        super().__init__()
        self.ch = ch
        self.temb_ch = 0
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.temporal_compress_level = int(math.log2(temporal_compress_times))

        self.conv_in = ContextParallelCausalConv3d(in_channels, ch, kernel_size=3)
        curr_res = resolution
        in_ch_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block = nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ContextParallelResnetBlock3D(in_channels=block_in, out_channels=block_out,
                                                          dropout=dropout, temb_channels=self.temb_ch,
                                                          gather_norm=gather_norm))
                block_in = block_out
            down = nn.Module()
            down.block = block
            down.attn = nn.ModuleList()
            if i_level != self.num_resolutions - 1:
                down.downsample = DownSample3D(block_in, resamp_with_conv,
                                               compress_time=i_level < self.temporal_compress_level)
                curr_res = curr_res // 2
            self.down.append(down)

        self.mid = nn.Module()
        self.mid.block_1 = ContextParallelResnetBlock3D(in_channels=block_in, out_channels=block_in, dropout=dropout,
                                                        temb_channels=self.temb_ch, gather_norm=gather_norm)
        self.mid.block_2 = ContextParallelResnetBlock3D(in_channels=block_in, out_channels=block_in, dropout=dropout,
                                                        temb_channels=self.temb_ch, gather_norm=gather_norm)
        self.norm_out = Normalize(block_in, gather=gather_norm)
        self.conv_out = ContextParallelCausalConv3d(block_in, 2 * z_channels if double_z else z_channels,
                                                    kernel_size=3)

    def forward(self, x, use_cp=True, clear_fake_cp_cache=True):
        """``clear_fake_cp_cache=False`` keeps the causal caches for a following chunk (frame-batched encode)."""
        h = self.conv_in(x, clear_cache=clear_fake_cp_cache)
        for i_level in range(self.num_resolutions):
            down = self.down[i_level]
            for block in down.block:
                h = block(h, None, clear_fake_cp_cache=clear_fake_cp_cache)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_1(h, None, clear_fake_cp_cache=clear_fake_cp_cache)
        h = self.mid.block_2(h, None, clear_fake_cp_cache=clear_fake_cp_cache)
        h = nonlinearity(self.norm_out(h))
        return self.conv_out(h, clear_cache=clear_fake_cp_cache)


class ContextParallelDecoder3D(nn.Module):
    """Video decoder: latents (B, z_channels, L, h, w) → (B, out_ch, T, 2^(N-1)·h, 2^(N-1)·w).

    Original ``ContextParallelDecoder3D``: every norm is a ``SpatialNorm3D`` conditioned on the input latent.
    ``clear_fake_cp_cache=False`` keeps the causal caches so the next call continues the clip.
    """

    def __init__(self, *, ch, out_ch, ch_mult=(1, 2, 4, 8), num_res_blocks, attn_resolutions, dropout=0.0,
                 resamp_with_conv=True, in_channels, resolution, z_channels, give_pre_end=False, zq_ch=None,
                 add_conv=False, pad_mode="first", temporal_compress_times=4, gather_norm=False, **ignorekwargs):
        super().__init__()
        self.ch = ch
        self.temb_ch = 0
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.give_pre_end = give_pre_end
        self.temporal_compress_level = int(math.log2(temporal_compress_times))
        zq_ch = z_channels if zq_ch is None else zq_ch

        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, curr_res, curr_res)
        self.conv_in = ContextParallelCausalConv3d(z_channels, block_in, kernel_size=3)

        def resblock(cin, cout):
            return ContextParallelResnetBlock3D(in_channels=cin, out_channels=cout, temb_channels=self.temb_ch,
                                                dropout=dropout, zq_ch=zq_ch, add_conv=add_conv,
                                                normalization=Normalize3D, gather_norm=gather_norm)

        self.mid = nn.Module()
        self.mid.block_1 = resblock(block_in, block_in)
        self.mid.block_2 = resblock(block_in, block_in)

        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block = nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(resblock(block_in, block_out))
                block_in = block_out
            up = nn.Module()
            up.block = block
            up.attn = nn.ModuleList()
            if i_level != 0:
                up.upsample = Upsample3D(block_in, with_conv=resamp_with_conv,
                                         compress_time=i_level >= self.num_resolutions - self.temporal_compress_level)
                curr_res = curr_res * 2
            self.up.insert(0, up)

        self.norm_out = Normalize3D(block_in, zq_ch, add_conv=add_conv, gather=gather_norm)
        self.conv_out = ContextParallelCausalConv3d(block_in, out_ch, kernel_size=3)

    def forward(self, z, clear_fake_cp_cache=True, use_cp=True):
        self.last_z_shape = z.shape
        zq = z
        h = self.conv_in(z, clear_cache=clear_fake_cp_cache)
        kw = dict(zq=zq, clear_fake_cp_cache=clear_fake_cp_cache, fake_cp=use_cp)
        h = self.mid.block_1(h, None, **kw)
        h = self.mid.block_2(h, None, **kw)
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for block in up.block:
                h = block(h, None, **kw)
            if i_level != 0:
                h = up.upsample(h, fake_cp=use_cp)
        if self.give_pre_end:
            return h
        h = nonlinearity(self.norm_out(h, zq, clear_fake_cp_cache=clear_fake_cp_cache, fake_cp=use_cp))
        return self.conv_out(h, clear_cache=clear_fake_cp_cache)

    def get_last_layer(self):
        return self.conv_out.conv.weight
