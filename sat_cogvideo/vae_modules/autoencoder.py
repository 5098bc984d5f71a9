"""The autoencoder classes the CogVideoX configs name (original ``sat/vae_modules/autoencoder.py``).

Only what CogVideoX uses: ``AbstractAutoencoder`` → ``AutoencodingEngine`` → ``VideoAutoencodingEngine`` →
``VideoAutoencoderInferenceWrapper`` (the ``first_stage_config.target`` of every CogVideoX config).

Public use (what the diffusion engine calls)::

    vae = instantiate_from_config(first_stage_config)      # loads ``ckpt_path`` strictly if given
    z = vae.encode(x)                                      # x (B, 3, 4N+1, H, W) in [-1, 1]; samples the posterior
    moments, _ = vae.encode(x, unregularized=True)         # (B, 2·z_channels, N+1, H/8, W/8): mean, logvar
    video = vae.decode(z, clear_fake_cp_cache=True, use_cp=True)   # (B, 3, T, H, W)

``decode(z_chunk, clear_fake_cp_cache=False)`` keeps the causal frame caches so that the next call continues
the clip (the original's chunked decode); the last chunk passes ``True``.  The engine multiplies encoded
latents by its ``scale_factor`` and divides by it before ``decode``; the VAE itself never scales.
Memory switches ``enable_slicing()``, ``enable_tiling(...)``, ``enable_frame_batching(...)``: see
:mod:`sat_cogvideo.vae_modules.tiling`.  Context parallelism: ``cp_size > 1`` splits time over the ranks of the
CP group (:mod:`sat_cogvideo.vae_modules.context_parallel`), created from the world on first use if needed.

Decisions against the original (the project README lists them): the first-frame rule is the v1.0/diffusers parity rule
in a single process (21 latents decode to 81 frames, not HEAD's 84); checkpoints load strictly (the original
printed missing keys and went on); no process group is needed for ``cp_size <= 1``.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn as nn

from sat_cogvideo.atomic import atomic_torch_save
from sat_cogvideo.errors import UserError
from sat_cogvideo.vae_modules import context_parallel as cp
from sat_cogvideo.vae_modules.cp_enc_dec import ContextParallelCausalConv3d
from sat_cogvideo.vae_modules.tiling import VAEMemoryFeatures, frame_batches


def _instantiate(config, where):
    from sgm.util import instantiate_from_config

    return instantiate_from_config(config, where=where)


class AbstractAutoencoder(nn.Module):
    """Base of the autoencoders (original, minus PyTorch Lightning): ``encode``, ``decode``, ``get_input``."""

    def __init__(self, ema_decay=None, monitor=None, input_key="jpg"):
        super().__init__()
        self.input_key = input_key
        self.use_ema = ema_decay is not None
        if monitor is not None:
            self.monitor = monitor

    def get_input(self, batch):
        return batch[self.input_key]

    def encode(self, *args, **kwargs):
        raise NotImplementedError

    def decode(self, *args, **kwargs):
        raise NotImplementedError


class AutoencodingEngine(AbstractAutoencoder):
    """Encoder, decoder, loss and regularizer built from ``{target, params}`` configs (original class)."""

    def __init__(self, *args, encoder_config, decoder_config, loss_config, regularizer_config,
                 optimizer_config=None, lr_g_factor=1.0, trainable_ae_params=None, ae_optimizer_args=None,
                 trainable_disc_params=None, disc_optimizer_args=None, disc_start_iter=0, diff_boost_factor=3.0,
                 ckpt_engine=None, ckpt_path=None, additional_decode_keys=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.encoder = _instantiate(encoder_config, "encoder_config")
        self.decoder = _instantiate(decoder_config, "decoder_config")
        self.loss = _instantiate(loss_config, "loss_config")
        self.regularization = _instantiate(regularizer_config, "regularizer_config")
        self.optimizer_config = optimizer_config or {"target": "torch.optim.Adam"}
        self.lr_g_factor = lr_g_factor
        self.diff_boost_factor = diff_boost_factor
        self.disc_start_iter = disc_start_iter
        self.additional_decode_keys = set(additional_decode_keys or [])

    def get_last_layer(self):
        return self.decoder.get_last_layer()

    def encode(self, x, return_reg_log=False, unregularized=False, **kwargs):
        z = self.encoder(x, **kwargs)
        if unregularized:
            return z, dict()
        z, reg_log = self.regularization(z)
        return (z, reg_log) if return_reg_log else z

    def decode(self, z, **kwargs):
        return self.decoder(z, **kwargs)

    def forward(self, x, **additional_decode_kwargs):
        z, reg_log = self.encode(x, return_reg_log=True)
        dec = self.decode(z, **additional_decode_kwargs)
        return z, dec, reg_log


class VideoAutoencodingEngine(AutoencodingEngine):
    """Adds checkpoint loading (``ckpt_path``, ``ignore_keys``) and the CP size (original class)."""

    def __init__(self, ckpt_path=None, ignore_keys=(), image_video_weights=(1, 1), only_train_decoder=False,
                 context_parallel_size=0, **kwargs):
        super().__init__(**kwargs)
        self.context_parallel_size = context_parallel_size
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    def apply_ckpt(self, ckpt):
        if ckpt is not None:
            self.init_from_ckpt(ckpt)

    def init_from_ckpt(self, path, ignore_keys=()):
        """Load ``path`` (``{"state_dict": ...}``) strictly, after dropping keys starting with any ``ignore_keys``."""
        sd = read_vae_checkpoint(path)
        sd = {k: v for k, v in sd.items() if not any(k.startswith(p) for p in ignore_keys)}
        own = self.state_dict()
        missing = [k for k in own if k not in sd]
        unexpected = [k for k in sd if k not in own]
        if missing or unexpected:
            what = []
            if missing:
                what.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
            if unexpected:
                what.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
            raise UserError(f"{path} does not fit this VAE config: {'; '.join(what)}; "
                            f"pass the CogVideoX 3d-vae.pt and the matching first_stage_config")
        for k, v in sd.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise UserError(f"{path}: key {k} has shape {tuple(v.shape)} but the config needs "
                                f"{tuple(own[k].shape)}; check ch/ch_mult/z_channels of first_stage_config")
        self.load_state_dict(sd, strict=True)


def read_vae_checkpoint(path) -> dict:
    """The ``state_dict`` of a ``3d-vae.pt`` file, through the project's one safe loader
    (:func:`sat_cogvideo.checkpoint.load_torch_file`); clear errors otherwise."""
    from sat_cogvideo.checkpoint import load_torch_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"VAE checkpoint {path} does not exist: set first_stage_config.params.ckpt_path")
    obj = load_torch_file(path, what="VAE checkpoint")
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        raise UserError(f"VAE checkpoint {path} has no 'state_dict' entry: it is not a CogVideoX 3d-vae.pt")
    return obj["state_dict"]


def save_vae_checkpoint(model_or_state_dict, path) -> None:
    """Write ``{"state_dict": ...}`` (the ``3d-vae.pt`` layout) to a temporary name, then rename it to ``path``."""
    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    atomic_torch_save({"state_dict": sd}, path)


class VideoAutoencoderInferenceWrapper(VAEMemoryFeatures, VideoAutoencodingEngine):
    """The CogVideoX VAE as configs name it: encode/decode with context parallelism and memory switches."""

    def __init__(self, cp_size=0, *args, **kwargs):
        self.cp_size = cp_size
        super().__init__(*args, **kwargs)
        self._decoder_convs = [m for m in self.decoder.modules() if isinstance(m, ContextParallelCausalConv3d)]
        self._encoder_convs = [m for m in self.encoder.modules() if isinstance(m, ContextParallelCausalConv3d)]
        self._fake_cp_caches = {}

    # -- helpers -------------------------------------------------------------------------------------------
    def _cp_on(self, use_cp: bool) -> bool:
        return self.cp_size > 1 and use_cp

    def _cp_region(self, use_cp: bool):
        if not self._cp_on(use_cp):
            return contextlib.nullcontext()
        if not cp.is_context_parallel_initialized():
            cp.initialize_context_parallel(self.cp_size)
        return cp.context_parallel_region(size=self.cp_size)

    def _check(self, x, channels, what, name):
        if not torch.is_tensor(x) or x.dim() != 5:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise UserError(f"VAE {what} expects {name} of shape (batch, {channels}, frames, height, width), got {shape}")
        if x.shape[1] != channels:
            raise UserError(f"VAE {what} expects {channels} channels in dim 1 of {name} (batch, channels, frames, "
                            f"height, width), got {x.shape[1]} (shape {tuple(x.shape)}); permute frames and channels?")

    @staticmethod
    def _set_caches(convs, caches):
        for m, c in zip(convs, caches):
            m.cache_padding = c

    # -- encode --------------------------------------------------------------------------------------------
    def encode(self, x, return_reg_log=False, unregularized=False, input_cp=False, output_cp=False, use_cp=True,
               generator=None):
        """Posterior sample (default), or ``(moments, {})`` with ``unregularized=True``.

        ``x``: (B, in_channels, 4N+1, H, W).  ``generator`` (ours) draws the posterior noise; without it the
        global RNG is used, as the original.
        """
        self._check(x, self.encoder.in_channels, "encode", "x")
        frames = x.shape[2]
        ratio = 2 ** self.encoder.temporal_compress_level
        if not input_cp and (frames - 1) % ratio:
            raise UserError(f"VAE encode needs {ratio}N+1 frames (1, {ratio + 1}, {2 * ratio + 1}, ...), got {frames}")
        if self._cp_on(use_cp) and not input_cp:
            cp.check_split(frames, self.cp_size, multiple=ratio)
        with self._cp_region(use_cp):
            if self.use_slicing and x.shape[0] > 1:
                z = torch.cat([self._encode_sample(xi, input_cp, output_cp) for xi in x.split(1)])
            else:
                z = self._encode_sample(x, input_cp, output_cp)
        if unregularized:
            return z, dict()
        z, reg_log = self.regularization(z, generator=generator) if generator is not None else self.regularization(z)
        return (z, reg_log) if return_reg_log else z

    def _encode_sample(self, x, input_cp, output_cp):
        if self._wants_tiles(x, latent=False):
            return self._tiled_encode(x, lambda tile: self._encode_frames(tile, input_cp, output_cp))
        return self._encode_frames(x, input_cp, output_cp)

    def _encode_frames(self, x, input_cp, output_cp):
        state = cp.active()
        if state is not None:
            if self.num_sample_frames_batch_size:
                raise UserError("frame-batched encoding cannot be combined with cp_size > 1: disable_frame_batching()")
            if not input_cp:
                x = cp.conv_split(cp.broadcast_from_first(x), dim=2, kernel_size=1)
            z = self.encoder(x, use_cp=True)
            return z if output_cp else cp.conv_gather(z, dim=2)
        self._set_caches(self._encoder_convs, [None] * len(self._encoder_convs))
        chunks = frame_batches(x.shape[2], self.num_sample_frames_batch_size)
        out = [self.encoder(x[:, :, a:b], use_cp=False, clear_fake_cp_cache=(k == len(chunks) - 1))
               for k, (a, b) in enumerate(chunks)]
        return out[0] if len(out) == 1 else torch.cat(out, dim=2)

    # -- decode --------------------------------------------------------------------------------------------
    def decode(self, z, input_cp=False, output_cp=False, use_cp=True, clear_fake_cp_cache=True,
               split_kernel_size=1, **kwargs):
        """Video (B, out_ch, T, H, W) from latents (B, z_channels, L, h, w).

        ``clear_fake_cp_cache=False`` keeps the frame caches (per sample and tile) for the next call.
        ``split_kernel_size`` (v1.0's argument) is accepted; the split always keeps frame 0 with CP rank 0.
        """
        self._check(z, self.decoder.conv_in.conv.in_channels, "decode", "z")
        if self._cp_on(use_cp):
            if not clear_fake_cp_cache or self.num_latent_frames_batch_size:
                raise UserError("chunked decoding (clear_fake_cp_cache=False or frame batching) cannot be combined "
                                "with cp_size > 1: decode all latents in one call")
            if not input_cp:
                cp.check_split(z.shape[2], self.cp_size, what="latent frames")
        with self._cp_region(use_cp):
            if self.use_slicing and z.shape[0] > 1:
                return torch.cat([self._decode_sample(zi, (b,), input_cp, output_cp, clear_fake_cp_cache, kwargs)
                                  for b, zi in enumerate(z.split(1))])
            return self._decode_sample(z, (), input_cp, output_cp, clear_fake_cp_cache, kwargs)

    def _decode_sample(self, z, key, input_cp, output_cp, clear, kwargs):
        if self._wants_tiles(z, latent=True):
            tiles = iter(range(1 << 30))
            return self._tiled_decode(z, lambda t: self._decode_frames(t, key + (next(tiles),), input_cp, output_cp,
                                                                       clear, kwargs))
        return self._decode_frames(z, key, input_cp, output_cp, clear, kwargs)

    def _decode_frames(self, z, key, input_cp, output_cp, clear, kwargs):
        state = cp.active()
        if state is not None:
            if not input_cp:
                z = cp.conv_split(cp.broadcast_from_first(z), dim=2, kernel_size=1)
            out = self.decoder(z, clear_fake_cp_cache=True, use_cp=True, **kwargs)
            return out if output_cp else cp.conv_gather(out, dim=2)
        convs = self._decoder_convs
        saved = self._fake_cp_caches.pop(key, None)
        if saved is not None:
            self._set_caches(convs, saved)
        chunks = frame_batches(z.shape[2], self.num_latent_frames_batch_size)
        out = []
        for k, (a, b) in enumerate(chunks):
            last = k == len(chunks) - 1
            out.append(self.decoder(z[:, :, a:b], clear_fake_cp_cache=clear if last else False, use_cp=use_first_rule(k),
                                    **kwargs))
        if not clear:
            self._fake_cp_caches[key] = [m.cache_padding for m in convs]
            self._set_caches(convs, [None] * len(convs))
        return out[0] if len(out) == 1 else torch.cat(out, dim=2)

    def forward(self, x, input_cp=False, latent_cp=False, output_cp=False, **additional_decode_kwargs):
        z, reg_log = self.encode(x, return_reg_log=True, input_cp=input_cp, output_cp=latent_cp)
        dec = self.decode(z, input_cp=latent_cp, output_cp=output_cp, **additional_decode_kwargs)
        return z, dec, reg_log


def use_first_rule(chunk_index: int) -> bool:
    """``use_cp`` of a frame batch, as the original engine passes it (only chunk 0 holds the clip's first frame)."""
    return chunk_index == 0
