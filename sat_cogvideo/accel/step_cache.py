"""Step caching of the SAT DiT: TeaCache (``--cache teacache:<t>``) and First Block Cache (``--cache fbcache:<t>``).

Both skip DiT work when a sampler step would change the layer stack's output little, and add instead the residual
(stack output minus stack input) of the last step that was computed.  Off unless asked for; when off nothing is
wrapped, so the model runs unchanged.

- TeaCache (Liu et al., "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model", CVPR 2025; facts
  from ali-vilab/TeaCache ``TeaCache4CogVideoX1.5``): the indicator is the conditioning embedding ``emb`` (time, plus
  ofs), ``d = mean|emb - emb_prev| / mean|emb_prev|``; the polynomial ``c0 d^4 + ... + c4`` of the family's
  calibration coefficients is accumulated while it stays under the threshold, and the whole layer stack is skipped
  meanwhile.  The first and the last step of a run are always computed.
- First Block Cache (para-attn / diffusers ``FirstBlockCacheConfig``): layer 0 always runs; when its residual on the
  video tokens differs from the one of the last computed step by less than the threshold (same relative L1
  measure), layers 1..N-1 are skipped (all tokens, text included, get the cached residual).

Why written here rather than taken from diffusers: its cache hooks attach to diffusers transformer blocks (modules
called as ``block(hidden, encoder_hidden, temb)``), and TeaCache ships as a patched diffusers ``forward``; SAT runs
one joint text+image sequence through ``hooks['layer_forward']`` (see :mod:`layer_hooks`), which is where this
cache acts.  The classifier-free-guidance batch (conditional and unconditional halves) is one DiT evaluation,
decided together, as in both references.
"""
from __future__ import annotations

import functools
import inspect
import sys
from typing import Optional, Sequence

import torch

from sat_cogvideo.accel.layer_hooks import dit_of, layer_index, wrap_layer_forward

# TeaCache calibration coefficients (highest power first), keyed by (code generation, RoPE, I2V); the 1.0 models
# share one set between 5B and 5B-I2V.  Values from TeaCache4CogVideoX1.5's table.
TEACACHE_COEFFICIENTS = {
    ("1.0", False, False): (-3.10658903e+01, 2.54732368e+01, -5.92380459e+00, 1.75769064e+00, -3.61568434e-03),
    ("1.0", True, False): (-1.53880483e+03, 8.43202495e+02, -1.34363087e+02, 7.97131516e+00, -5.23162339e-02),
    ("1.0", True, True): (-1.53880483e+03, 8.43202495e+02, -1.34363087e+02, 7.97131516e+00, -5.23162339e-02),
    ("1.5", True, False): (2.50210439e+02, -1.65061612e+02, 3.57804877e+01, -7.81551492e-01, 3.58559703e-02),
    ("1.5", True, True): (1.22842302e+02, -1.04088754e+02, 2.62981677e+01, -3.06009921e-01, 3.71213220e-02),
}
KINDS = ("teacache", "fbcache")


RAW_DISTANCE = (1.0, 0.0)  # d itself: models of non-released sizes, for which no calibration exists


def teacache_coefficients(dit) -> Sequence[float]:
    """The released family's coefficients (from the DiT's structure and size); the raw distance for other sizes
    (tiny or demo models), where the calibration polynomial is meaningless (it goes negative outside the range
    it was fitted on, which would skip every step)."""
    from sat_cogvideo.dit_video_concat import Rotary3DPositionEmbeddingMixin

    released = (dit.hidden_size, dit.num_layers) in ((1920, 30), (3072, 42))
    if not released:
        return RAW_DISTANCE
    rotary = isinstance(dit.mixins["pos_embed"], Rotary3DPositionEmbeddingMixin)
    key = ("1.5" if dit.is_v15 else "1.0", rotary, dit.in_channels == 32)
    return TEACACHE_COEFFICIENTS[key]


def _polyval(coefficients: Sequence[float], x: float) -> float:
    acc = 0.0
    for c in coefficients:
        acc = acc * x + c
    return acc


def rel_l1(a: torch.Tensor, ref: torch.Tensor) -> float:
    """``mean|a - ref| / mean|ref|`` (the measure of both caches)."""
    return float((a - ref).abs().float().mean() / ref.abs().float().mean().clamp_min(1e-30))


class StepCache:
    """TeaCache or First Block Cache state for one DiT (no counterpart in the original, which has neither)."""

    def __init__(self, kind: str, threshold: float, num_layers: int, coefficients: Optional[Sequence[float]] = None):
        if kind not in KINDS:
            raise ValueError(f"unknown cache {kind!r}")
        self.kind, self.threshold, self.num_layers = kind, float(threshold), int(num_layers)
        self.coefficients = tuple(coefficients) if coefficients is not None else None
        self.evaluations = self.skipped = 0
        self.start()

    def start(self, num_steps: Optional[int] = None) -> None:
        """Forget the previous run (call at the start of each sampling run; ``num_steps``: its DiT evaluations)."""
        self.num_steps, self.step = num_steps, 0
        self._prev = self._residual = self._stack_input = None
        self._accumulated, self._skipping = 0.0, False

    def line(self) -> str:
        what = "whole DiT evaluations" if self.kind == "teacache" else "evaluations of layers 1..N-1"
        ratio = self.evaluations / max(self.evaluations - self.skipped, 1)
        return (f"{self.kind}:{self.threshold:g}: skipped {self.skipped} of {self.evaluations} {what} "
                f"({ratio:.2f}x fewer)")

    # -- decisions ----------------------------------------------------------------------------------------
    def _teacache_computes(self, emb: torch.Tensor) -> bool:
        first = self._prev is None or self._prev.shape != emb.shape or self.step == 0
        last = self.num_steps is not None and self.step >= self.num_steps - 1
        if first or last:
            self._accumulated = 0.0
            return True
        self._accumulated += _polyval(self.coefficients, rel_l1(emb, self._prev))
        if self._accumulated < self.threshold:
            return False
        self._accumulated = 0.0
        return True

    def _residual_fits(self, hidden: torch.Tensor) -> bool:
        return self._residual is not None and self._residual.shape == hidden.shape

    # -- the wrapped hook ---------------------------------------------------------------------------------
    def wrap(self, hook):
        def layer_forward(hidden_states, mask, *args, layer_id=None, **kwargs):
            i = layer_index(layer_id)
            call = functools.partial(hook, layer_id=layer_id, **kwargs)
            if i == 0:
                return self._first_layer(call, hidden_states, (mask,) + args, kwargs["emb"], kwargs["text_length"])
            if self._skipping:
                return hidden_states  # skipped layer: the cached residual was added at layer 0
            out = call(hidden_states, mask, *args)
            if i == self.num_layers - 1:
                self._residual = out - self._stack_input
            return out

        return layer_forward

    def _first_layer(self, call, hidden, args, emb, text_length):
        self.evaluations += 1
        self.step += 1
        if self.kind == "teacache":
            computes = self._teacache_computes(emb) or not self._residual_fits(hidden)
            self._prev = emb
            if not computes:
                return self._skip(hidden)
            self._skipping, self._stack_input = False, hidden
            out = call(hidden, *args)
        else:
            out = call(hidden, *args)
            # the video tokens only: diffusers' blocks keep the text apart (encoder_hidden_states) and measure
            # hidden_states
            first_residual = (out - hidden)[:, text_length:]
            prev, self._prev = self._prev, first_residual
            if (prev is not None and prev.shape == first_residual.shape and self._residual_fits(out)
                    and rel_l1(first_residual, prev) < self.threshold):
                self._prev = prev  # compare with the last computed step, as the reference
                return self._skip(out)
            self._skipping, self._stack_input = False, out
        if self.num_layers == 1:
            self._residual = out - self._stack_input
        return out

    def _skip(self, hidden):
        self.skipped += 1
        self._skipping = True
        return hidden + self._residual


def parse_cache_spec(spec: str, flag: str = "--cache"):
    """``teacache:0.2`` -> ("teacache", 0.2); raises ValueError with the reason."""
    kind, sep, value = spec.partition(":")
    if kind not in KINDS or not sep:
        raise ValueError(f"{flag} {spec!r}: use teacache:<threshold> or fbcache:<threshold>, e.g. teacache:0.2")
    try:
        threshold = float(value)
    except ValueError:
        raise ValueError(f"{flag} {spec!r}: the threshold {value!r} is not a number") from None
    if not threshold > 0 or threshold != threshold:
        raise ValueError(f"{flag} {spec!r}: the threshold must be > 0 (0.1-0.3 typical for teacache, 0.05-0.15 for "
                         "fbcache)")
    return kind, threshold


def apply_step_cache(model, kind: str, threshold: float) -> StepCache:
    """Attach the cache to ``model`` (engine or DiT).  On an engine, ``sample``/``sample_from`` start a fresh run
    and print the number of skipped evaluations at the end."""
    dit = dit_of(model)
    coefficients = teacache_coefficients(dit) if kind == "teacache" else None
    cache = StepCache(kind, threshold, dit.num_layers, coefficients)
    wrap_layer_forward(dit, cache.wrap)
    if dit is not model and hasattr(model, "sample"):
        _around_runs(model, cache)
    return cache


def _around_runs(engine, cache: StepCache) -> None:
    def steps_sample(bound):
        return int(engine.sampler.num_steps)

    def steps_sample_from(bound):
        n = int(engine.sampler.num_steps)
        return n - engine.start_step(bound.arguments.get("strength", 0.8), n)

    for name, steps in (("sample", steps_sample), ("sample_from", steps_sample_from)):
        method = getattr(engine, name)
        signature = inspect.signature(method)

        def run(*a, _method=method, _sig=signature, _steps=steps, **k):
            bound = _sig.bind(*a, **k)
            cache.start(_steps(bound))
            before = (cache.evaluations, cache.skipped)
            try:
                return _method(*a, **k)
            finally:
                n, s = cache.evaluations - before[0], cache.skipped - before[1]
                print(f"{cache.kind}:{cache.threshold:g}: skipped {s} of {n} DiT evaluations", file=sys.stderr,
                      flush=True)

        object.__setattr__(engine, name, functools.wraps(method)(run))
