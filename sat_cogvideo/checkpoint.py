"""SAT checkpoint layout and strict state-dict loading.

Layout (as SAT/DeepSpeed write it)::

    <dir>/latest                              text file naming the iteration, e.g. "1000"
    <dir>/<iteration>/mp_rank_00_model_states.pt   dict with the weights under "module" (+ optional extras)

API:

``atomic_write(path, write)``
    Call ``write(f)`` on a temporary file next to ``path``, fsync, then rename it to ``path``.
``save_checkpoint(directory, state_dict, iteration, extra=None) -> Path``
    Write ``{"module": state_dict, "iteration": iteration, **extra}`` and then ``latest``, each atomically
    (temporary name + rename).  Returns the path of the ``.pt`` file.
``checkpoint_file(path) -> Path``
    Resolve a checkpoint folder (via ``latest``), an iteration folder or a ``.pt`` file to the ``.pt`` file.
``load_torch_file(path, trust_pickle=None, what=...)``
    The one ``torch.load`` of the project: CPU, memory-mapped, ``weights_only=True``; full unpickling only when
    trusted (``--trust-pickle``, the :func:`trusting` scope or ``SAT_COGVIDEO_TRUST_PICKLE=1``).
``load_checkpoint_file(path, trust_pickle=None, what="checkpoint") -> dict``
    :func:`load_torch_file` of :func:`checkpoint_file`.
``read_state_dict(path_or_dict, prefix=None) -> dict``
    The weights: the ``module`` (or ``model``/``state_dict``) entry; with ``prefix`` only keys under it, prefix
    removed (``prefix="model.diffusion_model."`` gives the DiT of an engine checkpoint).
``load_state_dict_strict(module, state_dict, known_unused=(), source="checkpoint") -> LoadReport``
    Load with strict key and shape checks.  Keys in ``known_unused`` may be missing or extra (the DiT lists them:
    ``DiffusionTransformer.known_unused_keys()``).  A base checkpoint loads into a LoRA model (``X.weight`` ->
    ``X.original.weight``, LoRA factors keep their values) unless the checkpoint holds some LoRA factors but not
    all.  Anything else raises :class:`~sat_cogvideo.errors.UserError` naming the first few keys and, for DiT keys,
    the configuration value that disagrees ("checkpoint has hidden_size 3072, config says 1920").
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch

from sat_cogvideo.atomic import atomic_path
from sat_cogvideo.errors import UserError

MODEL_STATES = "mp_rank_00_model_states.pt"
SAT_PREFIX = "model.diffusion_model."  # the DiT's keys inside an engine checkpoint


# ----------------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------------

def atomic_write(path, write) -> None:
    """Call ``write(f)`` on a binary file opened at a temporary name next to ``path``, fsync it, then rename it
    to ``path`` (:func:`sat_cogvideo.atomic.atomic_path`)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())


def save_checkpoint(directory, state_dict: Mapping[str, torch.Tensor], iteration, extra: Mapping | None = None) -> Path:
    """Write ``<directory>/<iteration>/mp_rank_00_model_states.pt`` (weights under ``module``) and ``latest``."""
    directory = Path(directory)
    iteration = str(iteration)
    if not iteration or "/" in iteration or iteration in (".", ".."):
        raise UserError(f"checkpoint iteration {iteration!r} is not a folder name")
    payload = {"module": {k: v.detach() for k, v in state_dict.items()},
               "iteration": int(iteration) if iteration.isdigit() else iteration}
    if extra:
        payload.update(extra)
    target = directory / iteration / MODEL_STATES
    atomic_write(target, lambda f: torch.save(payload, f))
    atomic_write(directory / "latest", lambda f: f.write(f"{iteration}\n".encode()))
    return target


_HF_TO_SAT = ("--load and MODEL_PATH take diffusers pipelines and Hugging Face ids; here a SAT checkpoint is "
              "needed: convert it once with python tools/convert_weight_hf2sat.py --input_path <diffusers folder> "
              "--output_path <SAT folder> and use <SAT folder>/transformer")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def not_sat_reason(path) -> str | None:
    """Why ``path`` is a diffusers folder or a Hugging Face id rather than a SAT checkpoint (None otherwise);
    for the places that need a SAT checkpoint (``--lora-path``, ``--resume``, the converters, ...)."""
    path = Path(path)
    if not path.exists() and _HUB_ID.match(str(path)):
        return f"{path} does not exist here and looks like a Hugging Face id: {_HF_TO_SAT}"
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return f"{path} is a diffusers pipeline folder, not a SAT checkpoint: {_HF_TO_SAT}"
        if any(path.glob("diffusion_pytorch_model*.safetensors")):
            return f"{path} is a diffusers model folder, not a SAT checkpoint: {_HF_TO_SAT} (its pipeline folder)"
    return None


def checkpoint_file(path) -> Path:
    """The ``.pt`` file of a checkpoint folder (``latest``), an iteration folder or a file path."""
    path = Path(path)
    if path.is_file():
        return path
    reason = not_sat_reason(path)
    if reason:
        raise UserError(reason)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    if (path / MODEL_STATES).is_file():
        return path / MODEL_STATES
    latest = path / "latest"
    if latest.is_file():
        iteration = latest.read_text().strip()
        target = path / iteration / MODEL_STATES
        if not target.is_file():
            raise UserError(f"{latest} names iteration {iteration!r} but {target} does not exist")
        return target
    raise UserError(f"{path} is not a SAT checkpoint: expected {path}/latest or {path}/{MODEL_STATES}")


# ----------------------------------------------------------------------------------------------------------
# the one place that unpickles

TRUST_ENV = "SAT_COGVIDEO_TRUST_PICKLE"
_TRUST: contextvars.ContextVar[bool] = contextvars.ContextVar("sat_cogvideo_trust_pickle", default=False)
_TRUST_FIX = f"if you trust the file, pass --trust-pickle (or set {TRUST_ENV}=1)"


def pickle_trusted(trust_pickle: bool | None = None) -> bool:
    """Whether full unpickling is allowed: ``trust_pickle``, the CLI's :func:`trusting` scope or the
    ``SAT_COGVIDEO_TRUST_PICKLE`` environment variable (1/true/yes/on)."""
    env = os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    return bool(trust_pickle) or _TRUST.get() or env


@contextlib.contextmanager
def trusting(trust_pickle: bool):
    """While the block runs, checkpoints that hold pickled objects may be unpickled (the CLI's --trust-pickle)."""
    token = _TRUST.set(bool(trust_pickle))
    try:
        yield
    finally:
        _TRUST.reset(token)


def _plain_data_globals() -> list:
    """Classes that checkpoints hold besides tensors and that rebuild as plain data (no code from the file runs):
    NumPy arrays and scalars (the original's RNG states) and DeepSpeed's optimizer-shard records.  Allow-listed
    for weights-only loads."""
    import numpy as np

    try:
        from numpy._core import multiarray
    except ImportError:  # NumPy 1.x
        from numpy.core import multiarray

    allowed = [np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar]
    allowed += [type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"]
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return allowed
    return allowed + [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _check_header(path: Path, what: str) -> None:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as err:
        raise UserError(f"cannot read {what} {path} ({err.strerror or err})") from None
    if size == 0:
        raise UserError(f"{what} {path} is empty (0 bytes): the download or copy was interrupted; fetch it again")
    if head[:2] != b"PK" and head[:1] != b"\x80":  # torch.save's zip, or a legacy pickle
        raise UserError(f"{what} {path} is not a PyTorch checkpoint (neither a torch.save zip nor a pickle)")


def _torch_load(path: Path, weights_only: bool):
    with torch.serialization.safe_globals(_plain_data_globals()):
        try:
            return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err) and "zip" not in str(err).lower():
                raise
        return torch.load(path, map_location="cpu", weights_only=weights_only)  # legacy format: not mappable


def load_torch_file(path, *, trust_pickle: bool | None = None, what: str = "checkpoint"):
    """``torch.load`` of a file on CPU, memory-mapped, ``weights_only=True``.

    Every checkpoint the project reads comes through here.  A file that holds other pickled objects is refused
    with one line naming the file and the flag; only when trusted (:func:`pickle_trusted`) is it unpickled fully,
    with a warning naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist" if not path.exists() else f"{what} {path} is not a file")
    _check_header(path, what)
    try:
        try:
            return _torch_load(path, weights_only=True)
        except pickle.UnpicklingError as err:
            refusal = [ln.strip() for ln in str(err).splitlines() if "unsupported" in ln.lower()]
            if not refusal:  # not a refusal: the file is damaged
                raise
            if not pickle_trusted(trust_pickle):
                detail = refusal[0].split(" was not")[0].split(" whose")[0][:120]
                raise UserError(f"{what} {path} holds pickled Python objects that a safe load refuses ({detail}); "
                                f"loading it could run code from the file: {_TRUST_FIX}") from None
        warnings.warn(f"--trust-pickle: unpickling {path} fully (this runs code from the file)")
        return _torch_load(path, weights_only=False)
    except UserError:
        raise
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"cannot read {what} {path}: it is truncated or damaged ({first[:160]}); fetch it "
                        f"again") from None


def load_checkpoint_file(path, trust_pickle: bool | None = None, what: str = "checkpoint") -> dict:
    """The dict of a SAT checkpoint (folder, iteration folder or ``.pt`` file), through :func:`load_torch_file`."""
    file = checkpoint_file(path)
    obj = load_torch_file(file, trust_pickle=trust_pickle, what=what)
    if not isinstance(obj, dict):
        raise UserError(f"{file} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def read_state_dict(path_or_dict, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Weights of a checkpoint (path or loaded dict): its ``module``/``model``/``state_dict`` entry.

    With ``prefix``, keep only keys starting with it and strip it; a dict without any such key is returned
    unchanged (a bare DiT state dict)."""
    obj = path_or_dict if isinstance(path_or_dict, Mapping) else load_checkpoint_file(path_or_dict)
    sd = obj
    for key in ("module", "model", "state_dict"):
        if isinstance(obj.get(key), Mapping):
            sd = obj[key]
            break
    sd = dict(sd)
    if not sd:
        raise UserError("the checkpoint holds no weights (an empty 'module'/'model'/'state_dict')")
    if prefix and any(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"checkpoint entry {bad[0]!r} is a {type(sd[bad[0]]).__name__}, not a tensor")
    return sd


# ----------------------------------------------------------------------------------------------------------
# strict loading
# ----------------------------------------------------------------------------------------------------------

@dataclass
class LoadReport:
    """What :func:`load_state_dict_strict` did: keys loaded, accepted-missing and accepted-extra."""

    loaded: list[str] = field(default_factory=list)
    ignored_missing: list[str] = field(default_factory=list)
    ignored_unexpected: list[str] = field(default_factory=list)
    lora_initialised: list[str] = field(default_factory=list)


_LORA_FACTOR = re.compile(r"\.matrix_[AB]\.\d+$")

# (key regex, dim, config name, how to turn the size into the config value) for the DiT; used in messages.
_HINTS = (
    (re.compile(r"(^|\.)transformer\.final_layernorm\.weight$"), 0, "hidden_size", lambda n, s: n),
    (re.compile(r"(^|\.)transformer\.layers\.\d+\.input_layernorm\.weight$"), 0, "hidden_size", lambda n, s: n),
    (re.compile(r"(^|\.)time_embed\.0\.weight$"), 0, "time_embed_dim", lambda n, s: n),
    (re.compile(r"(^|\.)time_embed\.0\.weight$"), 1, "hidden_size", lambda n, s: n),
    (re.compile(r"(^|\.)mixins\.patch_embed\.proj\.weight$"), 1, "in_channels",
     lambda n, s: n if len(s) == 4 else None),
    (re.compile(r"(^|\.)mixins\.adaln_layer\.query_layernorm_list\.\d+\.weight$"), 0, "head dim (hidden_size / "
     "num_attention_heads)", lambda n, s: n),
    (re.compile(r"(^|\.)mixins\.patch_embed\.text_proj\.weight$"), 1, "text_hidden_size", lambda n, s: n),
    (re.compile(r"(^|\.)mixins\.final_layer\.linear\.weight$"), 0, "out_channels x patch volume", lambda n, s: n),
    (re.compile(r"(^|\.)ofs_embed\.0\.weight$"), 0, "ofs_embed_dim", lambda n, s: n),
)
_LAYER = re.compile(r"(^|\.)transformer\.layers\.(\d+)\.")


def _shape(t) -> tuple[int, ...]:
    return tuple(t.shape)


def _num_layers(keys: Iterable[str]) -> int | None:
    ids = {int(m.group(2)) for k in keys for m in [_LAYER.search(k)] if m}
    return max(ids) + 1 if ids else None


def _config_hints(model_shapes: Mapping[str, tuple], ckpt_shapes: Mapping[str, tuple]) -> list[str]:
    hints = []
    for key in model_shapes.keys() & ckpt_shapes.keys():
        ms, cs = model_shapes[key], ckpt_shapes[key]
        if ms == cs:
            continue
        for regex, dim, name, conv in _HINTS:
            if regex.search(key) and len(ms) > dim and len(cs) > dim and len(ms) == len(cs) and ms[dim] != cs[dim]:
                have, want = conv(cs[dim], cs), conv(ms[dim], ms)
                if have is not None:
                    hint = f"checkpoint has {name} {have}, config says {want}"
                    if hint not in hints:
                        hints.append(hint)
        if key.endswith("mixins.patch_embed.proj.weight") and len(ms) != len(cs):
            gen = {4: "1.0 (int patch_size, Conv2d)", 2: "1.5 (patch_size [pt, ph, pw], Linear)"}
            hints.append(f"checkpoint patch embedding is {gen.get(len(cs), cs)}, config builds "
                         f"{gen.get(len(ms), ms)}")
    lm, lc = _num_layers(model_shapes), _num_layers(ckpt_shapes)
    if lm is not None and lc is not None and lm != lc:
        hints.insert(0, f"checkpoint has num_layers {lc}, config says {lm}")
    return hints


def _first(keys, n=3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def load_state_dict_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor],
                           known_unused: Iterable[str] = (), source: str = "checkpoint") -> LoadReport:
    """Copy ``state_dict`` into ``module`` with strict key/shape checks (see the module docstring)."""
    known_unused = set(known_unused)
    model_sd = module.state_dict()
    model_shapes = {k: _shape(v) for k, v in model_sd.items()}
    sd = dict(state_dict)

    # A base (un-adapted) checkpoint into a LoRA model: X.weight -> X.original.weight.
    lora_keys = [k for k in model_shapes if _LORA_FACTOR.search(k)]
    for key in list(sd):
        for suffix in ("weight", "bias"):
            if key.endswith("." + suffix):
                alias = key[: -len(suffix)] + "original." + suffix
                if alias in model_shapes and key not in model_shapes and alias not in sd:
                    sd[alias] = sd.pop(key)
    lora_in_ckpt = [k for k in lora_keys if k in sd]
    report = LoadReport()
    ckpt_shapes = {k: _shape(v) for k, v in sd.items()}
    missing = [k for k in model_shapes if k not in sd]
    if lora_keys and not lora_in_ckpt:
        report.lora_initialised = [k for k in missing if _LORA_FACTOR.search(k)]
        missing = [k for k in missing if not _LORA_FACTOR.search(k)]
    unexpected = [k for k in sd if k not in model_shapes]
    report.ignored_missing = sorted(k for k in missing if k in known_unused)
    report.ignored_unexpected = sorted(k for k in unexpected if k in known_unused)
    missing = [k for k in missing if k not in known_unused]
    unexpected = [k for k in unexpected if k not in known_unused]
    mismatched = [k for k in model_shapes.keys() & ckpt_shapes.keys() if model_shapes[k] != ckpt_shapes[k]]
    if missing or unexpected or mismatched:
        from sat_cogvideo.convert.lora import lora_mismatch_message

        # A LoRA checkpoint for a model built without lora_config gets its own message.
        lora_problem = None if lora_keys else lora_mismatch_message(model_shapes.keys(), sd.keys(), source)
        if lora_problem:
            raise UserError(lora_problem)
        problems = []
        if mismatched:
            k = sorted(mismatched)[0]
            problems.append(f"{len(mismatched)} shape mismatches (first: {k} is {list(ckpt_shapes[k])} in the "
                            f"checkpoint, {list(model_shapes[k])} in the model)")
        if missing:
            problems.append(f"{len(missing)} missing keys ({_first(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys ({_first(unexpected)})")
        hints = _config_hints(model_shapes, ckpt_shapes)
        hint = ("; " + "; ".join(hints[:3])) if hints else ""
        raise UserError(f"{source} does not fit the model: {'; '.join(problems)}{hint}")
    to_load = {k: v for k, v in sd.items() if k in model_shapes}
    result = module.load_state_dict(to_load, strict=False)
    # The LoRA wrappers' own loaders may swallow keys; anything still reported is a bug of ours.
    leftover = [k for k in result.unexpected_keys]
    if leftover:
        raise UserError(f"{source}: keys {_first(leftover)} were not taken by the model")
    report.loaded = sorted(to_load)
    return report
