"""The CogVideoX diffusion transformer on SwissArmyTransformer (maps to ``sat/dit_video_concat.py``).

:class:`DiffusionTransformer` is a SAT ``BaseModel``: SAT's ``BaseTransformer`` holds the attention/MLP layers
(``transformer.layers.<i>.…``) and the CogVideoX behaviour lives in mixins that override SAT hooks
(``mixins.<name>.…``).  Class names, constructor parameters (config keys) and state-dict keys are those of the
original, so the original YAML ``network_config`` and the released SAT checkpoints work unchanged.

Both code generations run through the same classes:

* v1.0 (CogVideoX-2B/5B/5B-I2V): integer ``patch_size`` (temporal patch 1), Conv2d patch embedding, RoPE
  tables persisted as buffers ``mixins.pos_embed.freqs_sin/freqs_cos``;
* 1.5 (CogVideoX1.5-5B and -I2V): ``patch_size: [pt, ph, pw]``, Linear patch embedding, non-persistent RoPE
  tables, optional ``ofs`` embedding.

Deliberate differences from the original (see also "Differences from the original" in the README):

* building the model leaves every global RNG (Python, NumPy, torch CPU/CUDA) and the cuDNN/TF32 flags as they
  were (the original re-seeds everything with 1234);
* no hard-coded CUDA: RoPE tables are buffers that follow ``.to(device)``;
* the 2B ``height/width_interpolation`` may be given in ``pos_embed_config.params`` or at the top level;
* RoPE tables and unpatchify use the actual latent grid (``rope_T/H/W``) in both generations, and RoPE's text
  boundary is the runtime context length; at the configured resolution and text length this equals the v1.0
  flat-index lookup;
* the learned (5B-I2V) and sincos (2B) tables check that the context has the configured ``text_length``.

Speed: attention is one ``scaled_dot_product_attention`` call per layer (no materialised score matrix, no copies
of k/v).  With autograd off (sampling), modulation, gated residuals and RoPE run in place on fresh tensors;
with autograd on they use the plain functional form.  Both give the same numbers.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import random
from functools import partial
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sat.model.base_model import BaseMixin, BaseModel, non_conflict
from sat.ops.layernorm import LayerNorm, RMSNorm
from sat.transformer_defaults import attention_fn_default

from sat_cogvideo.errors import UserError

__all__ = [
    "DiffusionTransformer",
    "Basic3DPositionEmbeddingMixin",
    "Basic2DPositionEmbeddingMixin",
    "Rotary3DPositionEmbeddingMixin",
    "ImagePatchEmbeddingMixin",
    "AdaLNMixin",
    "FinalLayerMixin",
    "SwiGLUMixin",
    "timestep_embedding",
    "get_3d_sincos_pos_embed",
    "get_2d_sincos_pos_embed",
    "str_to_dtype",
]

str_to_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------

def _to_container(cfg) -> Any:
    """OmegaConf DictConfig/ListConfig -> plain Python containers; anything else unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return cfg
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def _patch_triple(patch_size) -> tuple[int, int, int]:
    """(pt, ph, pw): an int ``p`` (v1.0) means (1, p, p)."""
    patch_size = _to_container(patch_size)
    if isinstance(patch_size, int):
        return 1, patch_size, patch_size
    if isinstance(patch_size, (list, tuple)) and len(patch_size) == 3 and all(isinstance(p, int) for p in patch_size):
        return tuple(patch_size)
    raise UserError(f"network_config patch_size must be an int (v1.0) or a list [pt, ph, pw] (1.5), got {patch_size!r}")


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift`` with per-sample ``shift``/``scale`` broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


@contextlib.contextmanager
def _preserved_global_rng():
    """Leave Python/NumPy/torch (CPU and CUDA) RNG states and the cuDNN/TF32 flags as they were."""
    py_state, np_state = random.getstate(), np.random.get_state()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = list(range(torch.cuda.device_count())) if cuda else []
    flags = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cudnn.enabled,
             torch.backends.cuda.matmul.allow_tf32)
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cudnn.enabled,
             torch.backends.cuda.matmul.allow_tf32) = flags


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000, repeat_only: bool = False,
                       dtype=torch.float32) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t f_k) | sin(t f_k)]``, ``f_k = max_period^(-k/half)`` (sgm ``timestep_embedding``)."""
    timesteps = torch.as_tensor(timesteps)
    if timesteps.ndim == 0:
        timesteps = timesteps[None]
    if repeat_only:
        return timesteps[:, None].expand(-1, dim).to(dtype)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(timesteps.device)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding.to(dtype)


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """``[sin(pos w) | cos(pos w)]`` with ``w_k = 10000^(-k/(dim/2))``, in float64; ``pos`` any shape -> [M, dim]."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.reshape(-1).double()[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_3d_sincos_pos_embed(embed_dim: int, grid_height: int, grid_width: int, t_size: int,
                            height_interpolation=1.0, width_interpolation=1.0, time_interpolation=1.0) -> torch.Tensor:
    """3-D sincos table ``[t_size, grid_height*grid_width, embed_dim]`` (float64).

    A quarter of the channels encode time, three quarters space; of the spatial part the first half encodes the
    column (w) coordinate and the second half the row (h) coordinate.
    """
    if embed_dim % 4:
        raise UserError(f"hidden_size {embed_dim} must be divisible by 4 for the 3-D sincos position embedding")
    dim_t, dim_s = embed_dim // 4, embed_dim // 4 * 3
    rows = torch.arange(grid_height, dtype=torch.float32) / height_interpolation
    cols = torch.arange(grid_width, dtype=torch.float32) / width_interpolation
    row_grid = rows[:, None].expand(grid_height, grid_width)
    col_grid = cols[None, :].expand(grid_height, grid_width)
    spatial = torch.cat([_sincos_1d(dim_s // 2, col_grid), _sincos_1d(dim_s // 2, row_grid)], dim=1)  # [h*w, Ds]
    temporal = _sincos_1d(dim_t, torch.arange(t_size, dtype=torch.float32) / time_interpolation)  # [t, Dt]
    return torch.cat([temporal[:, None, :].expand(-1, grid_height * grid_width, -1),
                      spatial[None].expand(t_size, -1, -1)], dim=-1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_height: int, grid_width: int) -> torch.Tensor:
    """2-D sincos table ``[grid_height*grid_width, embed_dim]`` (column coordinate first), float64."""
    rows = torch.arange(grid_height, dtype=torch.float32)[:, None].expand(grid_height, grid_width)
    cols = torch.arange(grid_width, dtype=torch.float32)[None, :].expand(grid_height, grid_width)
    return torch.cat([_sincos_1d(embed_dim // 2, cols), _sincos_1d(embed_dim // 2, rows)], dim=1)


# The kernel of the full-attention case below (None: torch's SDPA); ``--attention`` (sat_cogvideo.accel) sets it.
sdpa_kernel = None


def sdpa_attention(query_layer, key_layer, value_layer, attention_mask, attention_dropout=None,
                   log_attention_weights=None, scaling_attention_score=True, **kwargs):
    """SAT's default attention for the case CogVideoX uses (all-ones mask, equal q/kv heads): one
    ``scaled_dot_product_attention`` call, without SAT's copies of k and v.  Anything else goes to SAT's default."""
    if kwargs.get("attention_core") is not None:  # sequence parallel ring (sat_cogvideo.parallel.sequence)
        return kwargs["attention_core"](query_layer, key_layer, value_layer)
    full = attention_mask is None or (attention_mask.numel() == 1 and bool(attention_mask.reshape(-1)[0] > 0))
    if (full and scaling_attention_score and log_attention_weights is None
            and key_layer.shape[1] == query_layer.shape[1]):
        dropout_p = attention_dropout.p if attention_dropout is not None and attention_dropout.training else 0.0
        kernel = sdpa_kernel or F.scaled_dot_product_attention
        return kernel(query_layer, key_layer, value_layer, dropout_p=dropout_p)
    return attention_fn_default(query_layer, key_layer, value_layer, attention_mask,
                                attention_dropout=attention_dropout, log_attention_weights=log_attention_weights,
                                scaling_attention_score=scaling_attention_score, **kwargs)


def _modulate_streams(normed, text_length, t_shift, t_scale, shift, scale):
    """Modulate text tokens ``[:text_length]`` and image tokens with their own shift/scale."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():  # torch.compile: no out= into slices
        return torch.cat([modulate(normed[:, :text_length], t_shift, t_scale),
                          modulate(normed[:, text_length:], shift, scale)], dim=1)
    # inference: in place on the fresh LayerNorm output, no concatenation copy
    for part, sh, sc in ((normed[:, :text_length], t_shift, t_scale), (normed[:, text_length:], shift, scale)):
        torch.addcmul(sh.unsqueeze(1), part, 1 + sc.unsqueeze(1), out=part)
    return normed


def _gated_residual(hidden, out, text_length, t_gate, gate):
    """``hidden + gate * out`` with the text gate on the first ``text_length`` tokens."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return torch.cat([hidden[:, :text_length] + t_gate * out[:, :text_length],
                          hidden[:, text_length:] + gate * out[:, text_length:]], dim=1)
    # inference: written into ``out`` (the fresh attention/MLP output), one pass per stream
    for sl, g in ((slice(None, text_length), t_gate), (slice(text_length, None), gate)):
        torch.addcmul(hidden[:, sl], out[:, sl], g, out=out[:, sl])
    return out


# ----------------------------------------------------------------------------------------------------------
# position embeddings
# ----------------------------------------------------------------------------------------------------------

class Basic2DPositionEmbeddingMixin(BaseMixin):
    """Original ``Basic2DPositionEmbeddingMixin``: fixed 2-D sincos table (unused by the released models)."""

    def __init__(self, height, width, compressed_num_frames, hidden_size, text_length=0, **_unused):
        super().__init__()
        self.width, self.height = width, height
        self.spatial_length = height * width
        self.pos_embedding = nn.Parameter(torch.zeros(1, int(text_length + self.spatial_length), int(hidden_size)),
                                          requires_grad=False)

    def position_embedding_forward(self, position_ids, **kwargs):
        return self.pos_embedding

    def reinit(self, parent_model=None):
        del self.transformer.position_embeddings
        table = get_2d_sincos_pos_embed(self.pos_embedding.shape[-1], self.height, self.width)
        self.pos_embedding.data[:, -self.spatial_length:].copy_(table.float()[None])


class Basic3DPositionEmbeddingMixin(BaseMixin):
    """Original ``Basic3DPositionEmbeddingMixin`` (CogVideoX-2B): a fixed 3-D sincos table added to the sequence.

    ``pos_embedding`` is ``[1, text_length + frames*height*width, hidden]``; its text rows stay zero.
    """

    def __init__(self, height, width, compressed_num_frames, hidden_size, text_length=0,
                 height_interpolation=1.0, width_interpolation=1.0, time_interpolation=1.0):
        super().__init__()
        self.height, self.width = int(height), int(width)
        self.text_length = int(text_length)
        self.compressed_num_frames = int(compressed_num_frames)
        self.spatial_length = self.height * self.width
        self.num_patches = self.height * self.width * self.compressed_num_frames
        self.pos_embedding = nn.Parameter(torch.zeros(1, self.text_length + self.num_patches, int(hidden_size)),
                                          requires_grad=False)
        self.height_interpolation = height_interpolation
        self.width_interpolation = width_interpolation
        self.time_interpolation = time_interpolation

    def position_embedding_forward(self, position_ids, **kwargs):
        images, text_length = kwargs["images"], kwargs["text_length"]
        if text_length != self.text_length:
            raise UserError(f"the sincos position table expects {self.text_length} text tokens "
                            f"(pos_embed_config text_length) but the context has {text_length}")
        n = self.spatial_length if images.shape[1] == 1 else kwargs["seq_length"]
        if self.text_length + n > self.pos_embedding.shape[1]:
            raise UserError(f"{n} image tokens exceed the sincos table of {self.num_patches} positions "
                            f"({self.compressed_num_frames}x{self.height}x{self.width} patches): "
                            "the 2B model runs only at its configured resolution and frame count")
        return self.pos_embedding[:, : self.text_length + n]

    def reinit(self, parent_model=None):
        del self.transformer.position_embeddings
        self.reset_table()

    @torch.no_grad()
    def reset_table(self):
        """(Re)compute the sincos table: zero text rows, 3-D sincos image rows."""
        table = get_3d_sincos_pos_embed(self.pos_embedding.shape[-1], self.height, self.width,
                                        self.compressed_num_frames, self.height_interpolation,
                                        self.width_interpolation, self.time_interpolation)
        self.pos_embedding.data[:, : self.text_length].zero_()
        self.pos_embedding.data[:, -self.num_patches:].copy_(table.reshape(1, self.num_patches, -1).float())


def _rope_axis(n: int, dim: int, theta: float) -> torch.Tensor:
    """Angles ``[n, dim]`` of one axis: position times ``theta^(-2k/dim)``, each angle in two adjacent slots."""
    inv = 1.0 / theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim)
    angles = torch.arange(n, dtype=torch.float32)[:, None] * inv[None]
    return angles.repeat_interleave(2, dim=-1)


def _swap_pairs(x: torch.Tensor) -> torch.Tensor:
    """Swap each adjacent pair ``(a, b)`` of the last dim to ``(b, a)``; with a sign-alternating sine table,
    ``swap(x) * [-s, s, ...]`` is the usual ``rot(x) * sin`` with ``rot(a, b) = (-b, a)``."""
    return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)


class Rotary3DPositionEmbeddingMixin(BaseMixin):
    """Original ``Rotary3DPositionEmbeddingMixin`` (5B, 5B-I2V, 1.5): 3-D RoPE on the image tokens of q and k.

    Head dim ``d`` is split 16/24/24 (time/height/width for d = 64).  The tables ``freqs_cos``/``freqs_sin``
    hold ``[frames*height*width, d]`` in (t, h, w) order; they are persistent buffers for the v1.0 layout
    (``persistent_tables=True``, as in the released 1.0 checkpoints) and non-persistent for 1.5.
    ``learnable_pos_embed`` adds a trainable absolute table (5B-I2V).  The interpolation arguments are accepted
    and ignored, as in the original.
    """

    def __init__(self, height, width, compressed_num_frames, hidden_size, hidden_size_head, text_length,
                 theta=10000, rot_v=False, height_interpolation=1.0, width_interpolation=1.0,
                 time_interpolation=1.0, learnable_pos_embed=False, persistent_tables=False):
        super().__init__()
        self.rot_v = rot_v
        self.text_length = int(text_length)
        self.grid = (int(compressed_num_frames), int(height), int(width))
        dim_t = hidden_size_head // 4
        dim_h = dim_w = hidden_size_head // 8 * 3
        if dim_t + dim_h + dim_w != hidden_size_head:
            raise UserError(f"hidden_size_head {hidden_size_head} cannot be split 1/4, 3/8, 3/8 for 3-D RoPE")
        self.theta, self.axis_dims = theta, (dim_t, dim_h, dim_w)
        self._table_cache = None
        angles = self._angles()
        self.register_buffer("freqs_sin", angles.sin(), persistent=persistent_tables)
        self.register_buffer("freqs_cos", angles.cos(), persistent=persistent_tables)
        self.learnable_pos_embed = learnable_pos_embed
        if learnable_pos_embed:
            t, h, w = self.grid
            self.pos_embedding = nn.Parameter(torch.zeros(1, self.text_length + t * h * w, int(hidden_size)))
        else:
            self.pos_embedding = None

    def _angles(self) -> torch.Tensor:
        """RoPE angles ``[t*h*w, d]``: time (d/4), row (3d/8), column (3d/8) blocks, float32."""
        (t, h, w), (dim_t, dim_h, dim_w) = self.grid, self.axis_dims
        return torch.cat([
            _rope_axis(t, dim_t, self.theta)[:, None, None, :].expand(t, h, w, dim_t),
            _rope_axis(h, dim_h, self.theta)[None, :, None, :].expand(t, h, w, dim_h),
            _rope_axis(w, dim_w, self.theta)[None, None, :, :].expand(t, h, w, dim_w),
        ], dim=-1).reshape(t * h * w, dim_t + dim_h + dim_w)

    @torch.no_grad()
    def reset_tables(self):
        """Recompute ``freqs_sin``/``freqs_cos`` (e.g. after a test randomised every buffer)."""
        angles = self._angles().to(self.freqs_sin.device)
        self.freqs_sin.copy_(angles.sin())
        self.freqs_cos.copy_(angles.cos())

    def _tables(self, rope_T, rope_H, rope_W, dtype):
        t, h, w = self.grid
        if rope_T > t or rope_H > h or rope_W > w:
            raise UserError(f"latent patch grid {rope_T}x{rope_H}x{rope_W} exceeds the RoPE table {t}x{h}x{w} "
                            "(num_frames / latent_height / latent_width of the network config)")
        # One forward asks every layer for the same tables: keep the last ones while the buffers are unchanged
        # (not under torch.compile, where data_ptr() breaks the graph: the slicing is traced instead).
        key = None if torch.compiler.is_compiling() else (
            rope_T, rope_H, rope_W, dtype, self.freqs_cos.device, self.freqs_cos.data_ptr(),
            self.freqs_cos._version, self.freqs_sin.data_ptr(), self.freqs_sin._version)
        if key is not None and self._table_cache is not None and self._table_cache[0] == key:
            return self._table_cache[1]
        d = self.freqs_cos.shape[-1]
        cos = self.freqs_cos.view(t, h, w, d)[:rope_T, :rope_H, :rope_W].reshape(-1, d).to(dtype)
        sin = self.freqs_sin.view(t, h, w, d)[:rope_T, :rope_H, :rope_W].reshape(-1, d).to(dtype)
        signed_sin = sin * torch.tensor([-1.0, 1.0], dtype=dtype, device=sin.device).repeat(d // 2)
        if key is not None:
            self._table_cache = (key, (cos, signed_sin))
        return cos, signed_sin

    def rotary(self, x: torch.Tensor, text_length: int, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """``x * cos + rot(x) * sin`` on the image tokens (positions from ``text_length`` on) of ``[B, nh, S, d]``."""
        if torch.is_grad_enabled():
            image = x[:, :, text_length:]
            return torch.cat([x[:, :, :text_length], torch.addcmul(image * cos, _swap_pairs(image), signed_sin)],
                             dim=2)
        # inference: in place (q/k are fresh tensors here), one temporary
        out = x if x.is_contiguous() else x.contiguous()
        image = out[:, :, text_length:]
        swapped = _swap_pairs(image)
        image.mul_(cos).addcmul_(swapped, signed_sin)
        return out

    def position_embedding_forward(self, position_ids, **kwargs):
        if self.pos_embedding is None:
            return None
        text_length = kwargs["text_length"]
        if text_length != self.text_length:
            raise UserError(f"the learned position table expects {self.text_length} text tokens "
                            f"(pos_embed_config text_length) but the context has {text_length}")
        n = kwargs["seq_length"]
        if self.text_length + n > self.pos_embedding.shape[1]:
            raise UserError(f"{n} image tokens exceed the learned position table "
                            f"({self.pos_embedding.shape[1] - self.text_length} positions): run at the configured size")
        return self.pos_embedding[:, : self.text_length + n]

    def attention_fn(self, query_layer, key_layer, value_layer, attention_mask, attention_dropout=None,
                     log_attention_weights=None, scaling_attention_score=True, **kwargs):
        text_length = kwargs["text_length"]
        cos, sin = self._tables(kwargs["rope_T"], kwargs["rope_H"], kwargs["rope_W"], query_layer.dtype)
        if kwargs.get("rope_rows") is not None:  # sequence parallel: the image positions of a local chunk
            cos, sin = cos[kwargs["rope_rows"]], sin[kwargs["rope_rows"]]
        query_layer = self.rotary(query_layer, text_length, cos, sin)
        key_layer = self.rotary(key_layer, text_length, cos, sin)
        if self.rot_v:
            value_layer = self.rotary(value_layer, text_length, cos, sin)
        return sdpa_attention(query_layer, key_layer, value_layer, attention_mask,
                              attention_dropout=attention_dropout, log_attention_weights=log_attention_weights,
                              scaling_attention_score=scaling_attention_score, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# patch embedding, AdaLN layers, final layer
# ----------------------------------------------------------------------------------------------------------

class ImagePatchEmbeddingMixin(BaseMixin):
    """Original ``ImagePatchEmbeddingMixin``: text projection plus image patches -> the whole input sequence.

    v1.0 (int ``patch_size``): ``proj`` is a Conv2d applied per frame (weight ``[H, C, p, p]``).
    1.5 (``[pt, ph, pw]``): ``proj`` is a Linear on patch vectors ordered (channel, t, row, column)
    (weight ``[H, C*pt*ph*pw]``).  Tokens: text first, then image patches in (t, h, w) raster order.
    """

    def __init__(self, in_channels, hidden_size, patch_size, bias=True, text_hidden_size=None):
        super().__init__()
        patch_size = _to_container(patch_size)
        self.patch_size = patch_size
        self.pt, self.ph, self.pw = _patch_triple(patch_size)
        if isinstance(patch_size, int):
            self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=bias)
        else:
            self.proj = nn.Linear(in_channels * self.pt * self.ph * self.pw, hidden_size)
        self.text_proj = nn.Linear(text_hidden_size, hidden_size) if text_hidden_size is not None else None

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, T, C, Hl, Wl]`` -> image tokens ``[B, N, hidden]``."""
        b, t, c, h, w = images.shape
        if isinstance(self.proj, nn.Conv2d):
            x = self.proj(images.reshape(b * t, c, h, w))  # [B*T, H, h/p, w/p]
            return x.flatten(2).transpose(1, 2).reshape(b, -1, x.shape[1])
        pt, ph, pw = self.pt, self.ph, self.pw
        x = images.reshape(b, t // pt, pt, c, h // ph, ph, w // pw, pw)
        x = x.permute(0, 1, 4, 6, 3, 2, 5, 7).reshape(b, -1, c * pt * ph * pw)
        return self.proj(x)

    def word_embedding_forward(self, input_ids, **kwargs):
        images = kwargs["images"]
        b, t, c, h, w = images.shape
        if t % self.pt or h % self.ph or w % self.pw:
            raise UserError(f"latent of {t} frames x {h} x {w} is not divisible by the patch size "
                            f"({self.pt}, {self.ph}, {self.pw})")
        image_emb = self.patchify(images)
        text = kwargs["encoder_outputs"]
        if self.text_proj is not None:
            text = self.text_proj(text)
            return torch.cat([text, image_emb], dim=1).contiguous()
        return image_emb.contiguous()

    def reinit(self, parent_model=None):
        w = self.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.proj.bias is not None:
            nn.init.constant_(self.proj.bias, 0)
        del self.transformer.word_embeddings


class AdaLNMixin(BaseMixin):
    """Original ``AdaLNMixin``: per-layer 12-way adaptive LayerNorm for the image and text streams, and qk-LN.

    ``adaLN_modulations[i]`` = SiLU -> Linear(time_embed_dim, 12 H) giving, in order, shift/scale/gate for
    attention and MLP of the image stream, then the same six for the text stream.  ``width``/``height`` are
    accepted for the v1.0 signature and unused.
    """

    def __init__(self, hidden_size, num_layers, time_embed_dim, compressed_num_frames, qk_ln=True,
                 hidden_size_head=None, elementwise_affine=True, width=None, height=None):
        super().__init__()
        self.num_layers = num_layers
        self.width, self.height = width, height
        self.compressed_num_frames = compressed_num_frames
        self.adaLN_modulations = nn.ModuleList(
            [nn.Sequential(nn.SiLU(), nn.Linear(time_embed_dim, 12 * hidden_size)) for _ in range(num_layers)])
        self.qk_ln = qk_ln
        if qk_ln:
            self.query_layernorm_list = nn.ModuleList(
                [LayerNorm(hidden_size_head, eps=1e-6, elementwise_affine=elementwise_affine)
                 for _ in range(num_layers)])
            self.key_layernorm_list = nn.ModuleList(
                [LayerNorm(hidden_size_head, eps=1e-6, elementwise_affine=elementwise_affine)
                 for _ in range(num_layers)])

    def layer_forward(self, hidden_states, mask, *args, **kwargs):
        text_length = kwargs["text_length"]
        layer_id = int(kwargs["layer_id"])
        layer = self.transformer.layers[layer_id]
        (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp,
         t_shift_msa, t_scale_msa, t_gate_msa, t_shift_mlp, t_scale_mlp, t_gate_mlp) = \
            self.adaLN_modulations[layer_id](kwargs["emb"]).chunk(12, dim=1)
        gate_msa, gate_mlp = gate_msa.unsqueeze(1), gate_mlp.unsqueeze(1)
        t_gate_msa, t_gate_mlp = t_gate_msa.unsqueeze(1), t_gate_mlp.unsqueeze(1)

        # LayerNorm is per token, so one call on the joint sequence equals the two per-stream calls.
        attention_input = _modulate_streams(layer.input_layernorm(hidden_states), text_length,
                                            t_shift_msa, t_scale_msa, shift_msa, scale_msa)
        attention_output = layer.attention(attention_input, mask, **kwargs)
        if layer.layernorm_order == "sandwich":
            attention_output = layer.third_layernorm(attention_output)
        hidden_states = _gated_residual(hidden_states, attention_output, text_length, t_gate_msa, gate_msa)

        mlp_input = _modulate_streams(layer.post_attention_layernorm(hidden_states), text_length,
                                      t_shift_mlp, t_scale_mlp, shift_mlp, scale_mlp)
        mlp_output = layer.mlp(mlp_input, **kwargs)
        if layer.layernorm_order == "sandwich":
            mlp_output = layer.fourth_layernorm(mlp_output)
        return _gated_residual(hidden_states, mlp_output, text_length, t_gate_mlp, gate_mlp)

    def reinit(self, parent_model=None):
        for layer in self.adaLN_modulations:
            nn.init.constant_(layer[-1].weight, 0)
            nn.init.constant_(layer[-1].bias, 0)

    @non_conflict
    def attention_fn(self, query_layer, key_layer, value_layer, attention_mask, attention_dropout=None,
                     log_attention_weights=None, scaling_attention_score=True, old_impl=attention_fn_default,
                     **kwargs):
        if old_impl is attention_fn_default:
            old_impl = sdpa_attention
        if self.qk_ln:
            layer_id = int(kwargs["layer_id"])
            query_layer = self.query_layernorm_list[layer_id](query_layer)
            key_layer = self.key_layernorm_list[layer_id](key_layer)
        return old_impl(query_layer, key_layer, value_layer, attention_mask, attention_dropout=attention_dropout,
                        log_attention_weights=log_attention_weights,
                        scaling_attention_score=scaling_attention_score, **kwargs)


class FinalLayerMixin(BaseMixin):
    """Original ``FinalLayerMixin``: final adaLN (eps 1e-6), projection to patches and unpatchify."""

    def __init__(self, hidden_size, time_embed_dim, patch_size, out_channels, latent_width, latent_height,
                 elementwise_affine):
        super().__init__()
        self.hidden_size = hidden_size
        self.patch_size = _to_container(patch_size)
        self.pt, self.ph, self.pw = _patch_triple(self.patch_size)
        self.out_channels = out_channels
        self.latent_width, self.latent_height = latent_width, latent_height
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=elementwise_affine, eps=1e-6)
        self.linear = nn.Linear(hidden_size, self.pt * self.ph * self.pw * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(time_embed_dim, 2 * hidden_size))

    def final_forward(self, logits, **kwargs):
        x, emb = logits[:, kwargs["text_length"]:], kwargs["emb"]
        shift, scale = self.adaLN_modulation(emb).chunk(2, dim=1)
        x = self.linear(modulate(self.norm_final(x), shift, scale))
        return self.unpatchify(x, kwargs["rope_T"], kwargs["rope_H"], kwargs["rope_W"])

    def unpatchify(self, x: torch.Tensor, grid_t: int, grid_h: int, grid_w: int) -> torch.Tensor:
        """Tokens ``[B, N, C*pt*ph*pw]`` (features ordered c, t, row, column) -> ``[B, T, C, Hl, Wl]``."""
        b, c = x.shape[0], self.out_channels
        pt, ph, pw = self.pt, self.ph, self.pw
        x = x.reshape(b, grid_t, grid_h, grid_w, c, pt, ph, pw)
        x = x.permute(0, 1, 5, 4, 2, 6, 3, 7)  # b, t, o, c, h, p, w, q
        return x.reshape(b, grid_t * pt, c, grid_h * ph, grid_w * pw)

    def reinit(self, parent_model=None):
        nn.init.xavier_uniform_(self.linear.weight)
        nn.init.constant_(self.linear.bias, 0)


class SwiGLUMixin(BaseMixin):
    """Original ``SwiGLUMixin``: gated MLP ``dense_4h_to_h(act(w2 x) * dense_h_to_4h(x))`` (unused by releases)."""

    def __init__(self, num_layers, in_features, hidden_features, bias=False):
        super().__init__()
        self.w2 = nn.ModuleList([nn.Linear(in_features, hidden_features, bias=bias) for _ in range(num_layers)])

    def mlp_forward(self, hidden_states, **kwargs):
        origin = self.transformer.layers[int(kwargs["layer_id"])].mlp
        x1 = origin.dense_h_to_4h(hidden_states)
        x2 = self.w2[int(kwargs["layer_id"])](hidden_states)
        return origin.dense_4h_to_h(origin.activation_func(x2) * x1)


# ----------------------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------------------

def _mlp(dim_in: int, dim_hidden: int, dim_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim_in, dim_hidden), nn.SiLU(), nn.Linear(dim_hidden, dim_out))


def _sat_args(transformer_args, **sizes) -> argparse.Namespace:
    """The ``args`` namespace SAT's ``BaseModel`` builds its transformer from: the config's ``transformer_args``,
    the network's sizes, and SAT's defaults for what a DiT does not use."""
    args = _to_container(transformer_args)
    args = dict(args) if isinstance(args, Mapping) else dict(vars(args))
    args.update(sizes)
    args.setdefault("seed", None)  # SAT would otherwise re-seed every RNG with 1234
    for key, fallback in (("vocab_size", 1), ("max_sequence_length", 64), ("layernorm_order", "pre"),
                          ("skip_init", False), ("model_parallel_size", 1)):
        args.setdefault(key, fallback)
    return argparse.Namespace(**args)


class DiffusionTransformer(BaseModel):
    """Original ``DiffusionTransformer``: the CogVideoX DiT (config target ``dit_video_concat.DiffusionTransformer``).

    ``forward(x [B, T, C, Hl, Wl], timesteps [B], context [B, L, 4096], ofs=None, ...)`` returns the prediction
    ``[B, T, out_channels, Hl, Wl]`` in the model dtype (``dtype`` kwarg: fp32/fp16/bf16, injected by the engine).
    """

    def __init__(self, transformer_args, num_frames, time_compressed_rate, latent_width, latent_height, patch_size,
                 in_channels, out_channels, hidden_size, num_layers, num_attention_heads, elementwise_affine,
                 time_embed_dim=None, num_classes=None, modules=None, input_time="adaln", adm_in_channels=None,
                 parallel_output=True, height_interpolation=1.0, width_interpolation=1.0, time_interpolation=1.0,
                 use_SwiGLU=False, use_RMSNorm=False, zero_init_y_embed=False, ofs_embed_dim=None, **kwargs):
        modules = _to_container(modules) or {}
        patch_size = _to_container(patch_size)
        self.pt, self.ph, self.pw = _patch_triple(patch_size)
        self.is_v15 = not isinstance(patch_size, int)
        self.latent_width = latent_width
        self.latent_height = latent_height
        self.patch_size = patch_size
        self.num_frames = num_frames
        self.time_compressed_rate = time_compressed_rate
        self.spatial_length = latent_width * latent_height // (self.ph * self.pw)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.hidden_size = hidden_size
        self.model_channels = hidden_size
        self.time_embed_dim = time_embed_dim if time_embed_dim is not None else hidden_size
        self.ofs_embed_dim = ofs_embed_dim
        self.num_classes = num_classes
        self.adm_in_channels = adm_in_channels
        self.input_time = input_time
        self.num_layers = num_layers
        self.num_attention_heads = num_attention_heads
        self.elementwise_affine = elementwise_affine
        self.height_interpolation = height_interpolation
        self.width_interpolation = width_interpolation
        self.time_interpolation = time_interpolation
        self.inner_hidden_size = hidden_size * 4
        self.zero_init_y_embed = zero_init_y_embed
        self.use_SwiGLU = use_SwiGLU
        self.compressed_num_frames = (num_frames - 1) // time_compressed_rate + 1
        dtype_name = kwargs.pop("dtype", "fp32")
        self.dtype = str_to_dtype.get(dtype_name, torch.float32)
        if hidden_size % num_attention_heads:
            raise UserError(f"network_config hidden_size {hidden_size} is not divisible by "
                            f"num_attention_heads {num_attention_heads}")
        if input_time != "adaln":
            raise NotImplementedError(f"input_time {input_time!r}: only 'adaln' is implemented")

        args = _sat_args(transformer_args, num_layers=num_layers, hidden_size=hidden_size,
                         num_attention_heads=num_attention_heads, parallel_output=parallel_output)
        if use_SwiGLU:
            kwargs.setdefault("activation_func", F.silu)
        elif "activation_func" not in kwargs:
            kwargs["activation_func"] = nn.GELU(approximate="tanh")
        layernorm = RMSNorm if use_RMSNorm else partial(LayerNorm, elementwise_affine=elementwise_affine, eps=1e-6)

        with _preserved_global_rng():
            super().__init__(args=args, transformer=None, layernorm=layernorm, **kwargs)
            self._build_modules(modules)

    # -- construction ------------------------------------------------------------------------------------
    def _mixin(self, config, where: str, drop_if_present=(), **extra):
        from sgm.util import get_obj_from_str

        config = _to_container(config)
        if not isinstance(config, Mapping) or "target" not in config:
            raise UserError(f"network_config modules.{where} must be a mapping with 'target:' and 'params:'")
        params = dict(config.get("params") or {})
        cls = get_obj_from_str(config["target"], where=f"network_config.params.modules.{where}.target")
        for key in drop_if_present:
            if key in params:
                extra.pop(key, None)
        if cls is Rotary3DPositionEmbeddingMixin or (isinstance(cls, type) and
                                                     issubclass(cls, Rotary3DPositionEmbeddingMixin)):
            extra.setdefault("persistent_tables", not self.is_v15)
        clash = sorted(set(params) & set(extra))
        if clash:
            raise UserError(f"network_config modules.{where}.params sets {', '.join(clash)}, which the "
                            "DiffusionTransformer derives itself: remove them from the config")
        try:
            return cls(**params, **extra)
        except TypeError as err:
            raise UserError(f"network_config modules.{where}: {err}") from None

    def _build_modules(self, module_configs):
        hidden, ted = self.hidden_size, self.time_embed_dim
        self.time_embed = _mlp(hidden, ted, ted)
        if self.ofs_embed_dim is not None:
            self.ofs_embed = _mlp(self.ofs_embed_dim, self.ofs_embed_dim, self.ofs_embed_dim)
        if self.num_classes is not None:
            self._build_label_embedding()

        for name in ("pos_embed_config", "patch_embed_config", "adaln_layer_config", "final_layer_config"):
            if name not in module_configs:
                raise UserError(f"network_config params.modules has no {name}")
        interpolation = dict(height_interpolation=self.height_interpolation,
                             width_interpolation=self.width_interpolation,
                             time_interpolation=self.time_interpolation)
        self.add_mixin("pos_embed", self._mixin(
            module_configs["pos_embed_config"], "pos_embed_config", drop_if_present=tuple(interpolation),
            height=self.latent_height // self.ph, width=self.latent_width // self.pw,
            compressed_num_frames=self.compressed_num_frames, hidden_size=hidden, **interpolation), reinit=True)
        self.add_mixin("patch_embed", self._mixin(
            module_configs["patch_embed_config"], "patch_embed_config", patch_size=self.patch_size,
            hidden_size=hidden, in_channels=self.in_channels), reinit=True)
        self.add_mixin("adaln_layer", self._mixin(
            module_configs["adaln_layer_config"], "adaln_layer_config", hidden_size=hidden,
            num_layers=self.num_layers, compressed_num_frames=self.compressed_num_frames,
            hidden_size_head=hidden // self.num_attention_heads, time_embed_dim=ted,
            elementwise_affine=self.elementwise_affine))
        self.add_mixin("final_layer", self._mixin(
            module_configs["final_layer_config"], "final_layer_config", hidden_size=hidden,
            patch_size=self.patch_size, out_channels=self.out_channels, time_embed_dim=ted,
            latent_width=self.latent_width, latent_height=self.latent_height,
            elementwise_affine=self.elementwise_affine), reinit=True)
        if "lora_config" in module_configs:
            from sgm.util import instantiate_from_config

            lora = instantiate_from_config(_to_container(module_configs["lora_config"]),
                                           where="network_config.params.modules.lora_config",
                                           layer_num=self.num_layers)
            self.add_mixin("lora", lora, reinit=True)
        if self.use_SwiGLU:
            self.add_mixin("swiglu", SwiGLUMixin(self.num_layers, hidden, self.inner_hidden_size, bias=False),
                           reinit=True)

    def _build_label_embedding(self):
        ted, nc = self.time_embed_dim, self.num_classes
        if isinstance(nc, int):
            self.label_emb = nn.Embedding(nc, ted)
        elif nc == "continuous":
            self.label_emb = nn.Linear(1, ted)
        elif nc == "timestep":
            self.label_emb = nn.Sequential(_TimestepEmbedder(self.model_channels), _mlp(self.model_channels, ted, ted))
        elif nc == "sequential":
            if self.adm_in_channels is None:
                raise UserError("network_config num_classes 'sequential' needs adm_in_channels")
            self.label_emb = nn.Sequential(_mlp(self.adm_in_channels, ted, ted))
            if self.zero_init_y_embed:
                nn.init.zeros_(self.label_emb[0][2].weight)
                nn.init.zeros_(self.label_emb[0][2].bias)
        else:
            raise UserError(f"network_config num_classes {nc!r} is not an int, 'continuous', 'timestep' or "
                            "'sequential'")

    # -- keys ---------------------------------------------------------------------------------------------
    def known_unused_keys(self) -> set[str]:
        """State-dict keys this model may find missing from or extra in a checkpoint .

        RoPE tables (recomputed), the unused ``transformer.position_embeddings.weight`` and the frozen sincos
        table of the 2B model (recomputed).
        """
        keys = {"mixins.pos_embed.freqs_sin", "mixins.pos_embed.freqs_cos", "transformer.position_embeddings.weight"}
        pos = self.mixins["pos_embed"]
        if isinstance(pos, (Basic3DPositionEmbeddingMixin, Basic2DPositionEmbeddingMixin)):
            keys.add("mixins.pos_embed.pos_embedding")
        return keys

    # -- forward ------------------------------------------------------------------------------------------
    def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        concat_images = kwargs.get("concat_images")
        if concat_images is not None:
            if concat_images.shape[0] != x.shape[0]:
                concat_images = concat_images.repeat(2, 1, 1, 1, 1)
            x = torch.cat([x, concat_images.to(x.dtype)], dim=2)
        b, t, c, h, w = x.shape
        if c != self.in_channels:
            raise UserError(f"the DiT expects {self.in_channels} latent channels (in_channels) but got {c}")
        if (y is not None) != (self.num_classes is not None):
            raise UserError("y must be given exactly when the network config sets num_classes")
        if context is None:
            raise UserError("the DiT needs the text context (T5 features)")

        timesteps = torch.as_tensor(timesteps, device=x.device)
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels, dtype=self.dtype))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        if self.ofs_embed_dim is not None:
            if kwargs.get("ofs") is None:
                raise UserError("this model has an ofs embedding (ofs_embed_dim): pass ofs (2.0 at inference)")
            ofs = torch.as_tensor(kwargs["ofs"], device=x.device)
            emb = emb + self.ofs_embed(timestep_embedding(ofs, self.ofs_embed_dim, dtype=self.dtype))

        kwargs["seq_length"] = t * h * w // (self.pt * self.ph * self.pw)
        kwargs["images"] = x
        kwargs["emb"] = emb
        kwargs["encoder_outputs"] = context.to(self.dtype)
        kwargs["text_length"] = context.shape[1]
        kwargs["rope_T"], kwargs["rope_H"], kwargs["rope_W"] = t // self.pt, h // self.ph, w // self.pw
        ones = torch.ones((1, 1), dtype=x.dtype, device=x.device)
        kwargs["input_ids"] = kwargs["position_ids"] = kwargs["attention_mask"] = ones
        return super().forward(**kwargs)[0]


class _TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features (the ``Timestep`` module of sgm), used by ``num_classes: timestep``."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        return timestep_embedding(t, self.dim)
