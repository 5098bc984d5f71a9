"""The speed and memory options of ``sample_video`` and the Python API, in one place: arguments, the checks that
run before any weight loads, and :func:`apply` (after the engine is built and its weights loaded).

Order of application: low-bit weights, then the attention backend, then regional compile, then step caching (the
cache wraps the compiled layer, so a skipped step runs no compiled code).  Offloading is a placement (see
:mod:`offload`), chosen where the engine is placed.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from sat_cogvideo import rules
from sat_cogvideo.errors import UserError

OFFLOAD_MODES = ("model", "group", "sequential")
ATTENTION_BACKENDS = ("sdpa", "flash", "sage")


def add_accel_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--compile``, ``--weights-dtype``, ``--attention``, ``--cache`` (``--offload`` is an inference option)."""
    g = parser.add_argument_group("speed and memory", "each off by default; the model runs unchanged when off")
    g.add_argument("--compile", action="store_true",
                   help="regional torch.compile of the DiT layer (compiled once per layer shape; time reported)")
    g.add_argument("--weights-dtype", type=str, default=None, choices=["fp8", "int8"],
                   help="DiT linear weights stored in fp8 (diffusers layerwise casting) or int8 (torchao weight-only);"
                        " compute stays in the model dtype")
    g.add_argument("--attention", type=str, default="sdpa", choices=list(ATTENTION_BACKENDS),
                   help="attention kernel: sdpa (PyTorch, any device), flash (flash-attn) or sage (SageAttention), "
                        "the last two on CUDA only")
    g.add_argument("--cache", type=str, default=None, metavar="KIND:THRESHOLD",
                   help="step caching: teacache:<t> (0.1-0.3) or fbcache:<t> (0.05-0.15); prints skipped steps")
    return parser


def _device_type(args) -> str:
    return str(getattr(args, "device", "cpu") or "cpu").split(":")[0]


def check_accel_args(args) -> None:
    """Every refused value or combination, one line (exit 2), before any weight loads."""
    from sat_cogvideo.accel.attention_backends import check_backend
    from sat_cogvideo.accel.step_cache import parse_cache_spec

    if getattr(args, "cache", None):
        try:
            args.cache_spec = parse_cache_spec(args.cache)
        except ValueError as err:
            raise UserError(str(err)) from None
    else:
        args.cache_spec = None
    sp = max(getattr(args, "sp_size", None) or 1,
             (getattr(args, "ulysses_degree", None) or 1) * (getattr(args, "ring_degree", None) or 1))
    if args.cache_spec is not None and args.cache_spec[0] == "fbcache" and sp > 1:
        raise UserError(f"--cache {args.cache} with sequence parallelism ({sp} ranks): each rank would decide on "
                        "its own part of the sequence; use --cache teacache:<t> (decided on the time embedding)")
    offload = getattr(args, "offload", None)
    if offload not in (None, False, True) + OFFLOAD_MODES:
        raise UserError(f"--offload {offload}: use one of {', '.join(OFFLOAD_MODES)}")
    check_backend(getattr(args, "attention", "sdpa") or "sdpa", _device_type(args))
    rules.check_speed_options(bool(getattr(args, "compile", False)), getattr(args, "weights_dtype", None),
                              offload if isinstance(offload, str) else None)


def apply(engine, args, log=None) -> dict:
    """Apply the options of ``args`` to a built engine; returns what was applied (reports for the caller)."""
    import torch

    from sat_cogvideo.accel.attention_backends import set_attention_backend
    from sat_cogvideo.accel.compile import apply_compile
    from sat_cogvideo.accel.lowbit import apply_weights_dtype
    from sat_cogvideo.accel.step_cache import apply_step_cache

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    done = {}
    if getattr(args, "weights_dtype", None):
        n = apply_weights_dtype(engine, args.weights_dtype, compute_dtype=getattr(engine, "dtype", torch.float32))
        done["weights_dtype"] = n
        log(f"weights: {n} linear layers stored as {args.weights_dtype}")
    backend = getattr(args, "attention", None) or "sdpa"
    if backend != "sdpa":
        set_attention_backend(backend)
        done["attention"] = backend
    if getattr(args, "compile", False):
        done["compile"] = apply_compile(engine)
    spec = getattr(args, "cache_spec", None)
    if spec is None and getattr(args, "cache", None):
        from sat_cogvideo.accel.step_cache import parse_cache_spec

        spec = parse_cache_spec(args.cache)
    if spec is not None:
        done["cache"] = apply_step_cache(engine, *spec)
    return done


def compile_line(done: dict) -> Optional[str]:
    """The compile-time line to print after the first video (None without --compile)."""
    report = done.get("compile")
    return report.line() if report is not None else None


# the cluster scripts' variables (scripts/slurm_inference.sh -> launch.py) and the options they set
ENV_OPTIONS = (("WEIGHTS_DTYPE", "--weights-dtype"), ("OFFLOAD", "--offload"), ("ATTENTION", "--attention"),
               ("CACHE", "--cache"))


def launch_argv(env) -> list:
    """``sample_video`` arguments from COMPILE=1, WEIGHTS_DTYPE, OFFLOAD, ATTENTION, CACHE, checked here already
    (one line naming the variables, exit 2)."""
    get = lambda key: str(env.get(key) or "").strip()  # noqa: E731
    argv = ["--compile"] if get("COMPILE").lower() in ("1", "true", "yes", "on") else []
    argv += [a for key, flag in ENV_OPTIONS if get(key) for a in (flag, get(key))]
    if not argv:
        return argv
    parser = add_accel_args(argparse.ArgumentParser(add_help=False, exit_on_error=False))
    parser.add_argument("--offload", default=None)
    from sat_cogvideo.distributed import default_device

    device = get("DEVICE") or str(default_device())  # as sample_video resolves a missing --device
    try:
        args = parser.parse_args(argv)
        args.device = device
        check_accel_args(args)
    except (argparse.ArgumentError, UserError) as err:
        names = "COMPILE / " + " / ".join(key for key, _ in ENV_OPTIONS)
        raise UserError(f"{str(err).replace(chr(10), ' ')} (from the variables {names})") from None
    return argv
