"""Sequence parallelism for the SAT DiT: one video's joint text+video sequence split over ranks.

Maps to nothing in the original (one video per GPU); the method is xDiT's USP (Ulysses × Ring):

* the sequence (text first, then video patches) is padded at its end to a multiple of the SP degree ``P`` and
  split into ``P`` equal chunks at the first layer; every per-token step (AdaLN modulation, LayerNorms, MLP,
  gated residuals) runs on the local chunk with the chunk's own text/video boundary; the final layer gathers;
* Ulysses: an ``all_to_all_single`` turns ``[B, heads, chunk, d]`` into ``[B, heads/U, U·chunk, d]``; heads
  that do not divide are padded with zero heads (discarded after the reverse all-to-all);
* Ring: each rank keeps its queries and passes K/V blocks around the ring (``isend``/``irecv``), merging
  the partial attentions by their log-sum-exp; the padded tail of the last block is cut off, so no mask;
* with ring degree 1 the padded tail is cut before attention and the model's own attention chain (qk-LN,
  RoPE, ``sdpa_attention``) runs unchanged on the full sequence; with ring degree > 1 the chain runs on the
  local ring chunk (``rope_rows`` selects its RoPE positions) and ``sdpa_attention`` hands the attention to
  :func:`ring_attention` (``attention_core``) — the two hooks in ``dit_video_concat.py``, both inert without SP.

Why our own module (measured here, torch 2.13 CPU, gloo, 2 processes): ``yunchang`` 0.6.4 is silently wrong
for ring modes on CPU (its math kernel returns a zero LSE), aborts on uneven shards and needs heads divisible by
the Ulysses degree (../shared/NOTES.md).  PyTorch's ``torch.distributed.tensor.experimental.context_parallel``
gives exact results on CPU/gloo for a sequence that divides (16 tokens on 2 ranks: 1.8e-7, with its
load-balanced round-robin layout) but hung on an uneven length (15 tokens on 2 ranks, killed after 100 s), has
no Ulysses mode, and shards whole buffers around a bare SDPA call, which SAT's hook chain (qk-LN and RoPE inside
``attention_fn``) does not expose.  The all-to-all and ring steps here are ~100 lines on ``all_to_all_single``
and ``isend``/``irecv``, which gloo and nccl both run.  Inference only (the collectives carry no gradients).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from sat.model.base_model import BaseMixin, non_conflict

from sat_cogvideo.distributed import is_cuda
from sat_cogvideo.errors import UserError


# ------------------------------------------------------------------------------------------------ shapes

@dataclass(frozen=True)
class Chunking:
    """A sequence of ``length`` real tokens padded to ``parts · chunk`` and split into ``parts`` chunks."""
    length: int
    parts: int

    @property
    def chunk(self) -> int:
        return -(-self.length // self.parts)

    @property
    def padded(self) -> int:
        return self.chunk * self.parts

    def start(self, index: int) -> int:
        return index * self.chunk

    def valid(self, index: int) -> int:
        """Real (not padding) tokens in chunk ``index``."""
        return max(0, min(self.chunk, self.length - self.start(index)))

    def text_in(self, index: int, text_length: int) -> int:
        """Text tokens in chunk ``index`` (text comes first, so they are its prefix)."""
        return max(0, min(self.chunk, text_length - self.start(index)))


def pad_dim(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``x`` zero-padded at the end of ``dim`` to ``size``."""
    extra = size - x.shape[dim]
    if extra <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


# ------------------------------------------------------------------------------------------------ Ulysses

def heads_to_sequence(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """``[B, h, c, d]`` (all heads, local chunk; ``h`` divisible by ``size``) -> ``[B, h/size, size·c, d]``."""
    b, h, c, d = x.shape
    send = x.reshape(b, size, h // size, c, d).transpose(0, 1).contiguous()  # [size, B, h/size, c, d]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[i]: chunk i of my head group
    return recv.permute(1, 2, 0, 3, 4).reshape(b, h // size, size * c, d)


def sequence_to_heads(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """The inverse of :func:`heads_to_sequence`: ``[B, h/size, size·c, d]`` -> ``[B, h, c, d]``."""
    b, hs, sc, d = x.shape
    c = sc // size
    send = x.reshape(b, hs, size, c, d).permute(2, 0, 1, 3, 4).contiguous()  # [size, B, h/size, c, d]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[i]: head group i of my chunk
    return recv.transpose(0, 1).reshape(b, size * hs, c, d)


# ------------------------------------------------------------------------------------------------ Ring

def attention_with_lse(q, k, v):
    """Softmax attention and its log-sum-exp ``[B, h, Sq]`` (float32), scale ``1/sqrt(d)``.

    CPU: ATen's flash kernel returns both; CUDA: the flash (half types) or memory-efficient (float32) kernel;
    otherwise (another device, or a kernel that refuses the shapes) the float32 formula."""
    try:
        if not is_cuda(q.device):
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]
            return out, lse.float()
        if q.dtype in (torch.float16, torch.bfloat16):
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
            return out, lse.float()
        # float32: the memory-efficient kernel (its LSE may be padded to 32 rows)
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
        return out, lse[..., :q.shape[2]].float()
    except (RuntimeError, NotImplementedError):
        pass
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse[..., None]), v.float()).to(q.dtype), lse


def _merge(out, lse, part, part_lse):
    """Two partial attentions over disjoint key sets -> the attention over their union."""
    if out is None:
        return part.float(), part_lse
    new = torch.logaddexp(lse, part_lse)
    return out * torch.exp(lse - new)[..., None] + part.float() * torch.exp(part_lse - new)[..., None], new


def ring_attention(q, k, v, *, group, ranks, index: int, valid: tuple):
    """Attention of the local queries over the keys of every ring member: K/V blocks travel around the ring
    (member ``i`` sends to ``i+1``); block ``j`` holds ``valid[j]`` real tokens, the rest is padding."""
    size = len(ranks)
    kv = torch.stack([k, v]).contiguous()
    out = lse = None
    for step in range(size):
        owner = (index - step) % size
        pending = []
        if step < size - 1:
            incoming = torch.empty_like(kv)
            pending = [dist.isend(kv, ranks[(index + 1) % size], group=group),
                       dist.irecv(incoming, ranks[(index - 1) % size], group=group)]
        n = valid[owner]
        if n > 0:
            part, part_lse = attention_with_lse(q, kv[0][:, :, :n], kv[1][:, :, :n])
            out, lse = _merge(out, lse, part, part_lse)
        for work in pending:
            work.wait()
        if pending:
            kv = incoming
    return out.to(q.dtype)


# ------------------------------------------------------------------------------------------------ the mixin

class SequenceParallelMixin(BaseMixin):
    """Splits the DiT's sequence over the SP group (see the module docstring).  Added with
    ``model.add_mixin("sequence_parallel", SequenceParallelMixin(groups))`` after the model's own mixins, it
    wraps their ``layer_forward``, ``attention_fn`` and ``final_forward`` hooks (SAT ``non_conflict``)."""

    def __init__(self, groups):
        super().__init__()
        lay = groups.layout
        self.size, self.rank = lay.sp, lay.sp_rank
        self.ulysses, self.ring, self.ring_index = lay.ulysses, lay.ring, lay.ring_index
        self.sp_group, self.ulysses_group, self.ring_group = (groups.group("sp"), groups.group("ulysses"),
                                                              groups.group("ring"))
        self.ring_ranks = groups.ranks["ring"]

    def _full_length(self, kwargs) -> int:
        return int(kwargs["text_length"]) + int(kwargs["seq_length"])

    @non_conflict
    def layer_forward(self, hidden_states, mask, *args, old_impl=None, **kwargs):
        text_length, length = int(kwargs["text_length"]), self._full_length(kwargs)
        chunks = Chunking(length, self.size)
        if int(kwargs["layer_id"]) == 0:
            if hidden_states.shape[1] != length:
                raise UserError(f"sequence parallel: the DiT input has {hidden_states.shape[1]} tokens, "
                                f"expected text {text_length} + video {kwargs['seq_length']}")
            if torch.is_grad_enabled() and hidden_states.requires_grad:
                raise UserError("sequence parallelism is for inference only (its collectives carry no gradients)")
            start = chunks.start(self.rank)
            hidden_states = pad_dim(hidden_states, 1, chunks.padded)[:, start:start + chunks.chunk]
            hidden_states = hidden_states.contiguous()
        kwargs.update(text_length=chunks.text_in(self.rank, text_length), sp_text_length=text_length,
                      sp_length=length)
        return old_impl(hidden_states, mask, *args, **kwargs)

    @non_conflict
    def attention_fn(self, query_layer, key_layer, value_layer, attention_mask, attention_dropout=None,
                     log_attention_weights=None, scaling_attention_score=True, old_impl=None, **kwargs):
        text_length, length = kwargs.pop("sp_text_length"), kwargs.pop("sp_length")
        heads = query_layer.shape[1]
        qkv = (query_layer, key_layer, value_layer)
        if self.ulysses > 1:
            padded_heads = -(-heads // self.ulysses) * self.ulysses
            qkv = [heads_to_sequence(pad_dim(x, 1, padded_heads), self.ulysses_group, self.ulysses) for x in qkv]
        call = partial(old_impl, attention_dropout=attention_dropout, log_attention_weights=log_attention_weights,
                       scaling_attention_score=scaling_attention_score)
        if self.ring == 1:  # the whole (padded) sequence is here: cut the padding, run the model's chain
            padded = qkv[0].shape[2]
            qkv = [x[:, :, :length] for x in qkv]
            kwargs["text_length"] = text_length
            out = pad_dim(call(*qkv, attention_mask, **kwargs), 2, padded)
        else:
            out = call(*qkv, attention_mask, **self._ring_kwargs(kwargs, qkv[0], text_length, length))
        if self.ulysses > 1:
            out = sequence_to_heads(out.contiguous(), self.ulysses_group, self.ulysses)[:, :heads]
        return out

    def _ring_kwargs(self, kwargs, q, text_length: int, length: int) -> dict:
        """The chain's arguments on this rank's ring chunk: its text prefix, its RoPE rows and the ring core."""
        chunk = q.shape[2]  # U SP chunks: the padded sequence is ``ring`` such parts
        start = self.ring_index * chunk
        local_text = max(0, min(chunk, text_length - start))
        positions = torch.arange(start + local_text, start + chunk, device=q.device) - text_length
        rows = positions.clamp(min=0, max=max(length - text_length - 1, 0))
        valid = tuple(max(0, min(chunk, length - j * chunk)) for j in range(self.ring))
        core = partial(ring_attention, group=self.ring_group, ranks=self.ring_ranks, index=self.ring_index,
                       valid=valid)
        return dict(kwargs, text_length=local_text, rope_rows=rows, attention_core=core)

    @non_conflict
    def final_forward(self, logits, old_impl=None, **kwargs):
        length = self._full_length(kwargs)
        parts = [torch.empty_like(logits) for _ in range(self.size)]
        dist.all_gather(parts, logits.contiguous(), group=self.sp_group)
        return old_impl(torch.cat(parts, dim=1)[:, :length], **kwargs)
