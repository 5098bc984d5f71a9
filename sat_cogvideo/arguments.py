"""Command-line arguments and YAML configuration: ``get_args(argv)``.

Maps to ``sat/arguments.py`` of the original: one argparse parser made of CogVideoX's model and sampling
groups, SwissArmyTransformer's training / evaluation / data groups and DeepSpeed's config flags; then the
``--base`` YAML files are loaded with OmegaConf, merged left to right (later files win), and

* ``args:``      is copied onto the namespace (keys the parser knows; others are reported and ignored),
* ``model:``     becomes ``args.model_config`` (an OmegaConf DictConfig),
* ``deepspeed:`` becomes ``args.deepspeed_config`` (a plain dict),
* ``data:``      becomes ``args.data_config`` (a DictConfig).

Differences from the original (README, "Differences from the original"): options given on the command line
override the YAML (the original lets the YAML win); ``--device`` also takes ``cpu``/``cuda``/``cuda:N``; the distributed backend
defaults to nccl on CUDA and gloo on CPU; bool-typed options parse "false"/"0" as False; CPU training is allowed.
Every problem with a YAML file is one :class:`~sat_cogvideo.errors.UserError` naming the file and key.

``--device -1`` (the default) is resolved here, as the original's ``get_args`` did: ``cpu`` without CUDA, else
``cuda:<local rank>``; ``args.device`` is always a device string afterwards.  Starting torch.distributed and
seeding are a separate step, :func:`initialize`, so that configs can be read and checked without side effects
(code that only calls ``get_args`` and builds the engine works too: the engine starts torch.distributed itself).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import warnings
from typing import Callable, Iterable, Iterator, Sequence

from sat_cogvideo.errors import UserError

# --------------------------------------------------------------------------------------------------------------
# value types


def str2bool(value) -> bool:
    """Parse a boolean option: true/false, yes/no, 1/0, on/off (the original took any non-empty string as True)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "y", "on"):
        return True
    if text in ("0", "false", "no", "n", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def image_size(value) -> list:
    """Parse ``H,W`` / ``HxW`` / ``[H, W]`` into ``[H, W]`` ints."""
    if isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = str(value).strip("[]() ").replace("x", ",").replace("X", ",").replace(" ", ",").split(",")
        parts = [p for p in parts if p]
    try:
        size = [int(p) for p in parts]
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected an image size like 768,1360, got {value!r}") from None
    if len(size) != 2 or min(size) <= 0:
        raise argparse.ArgumentTypeError(f"expected two positive sizes H,W, got {value!r}")
    return size


def device_arg(value):
    """``--device``: -1 or ``auto`` (CUDA if available, else CPU), a CUDA index, or a device string."""
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    return text


# --------------------------------------------------------------------------------------------------------------
# parser


def add_model_config_args(parser):
    """CogVideoX's model group (names and defaults of the original)."""
    group = parser.add_argument_group("model", "model configuration")
    group.add_argument("--base", type=str, nargs="*", help="YAML config files, merged left to right")
    group.add_argument("--model-parallel-size", type=int, default=1, help="size of the model parallel group")
    group.add_argument("--force-pretrain", action="store_true")
    group.add_argument("--device", type=device_arg, default=-1,
                       help="-1/auto: CUDA when available, else CPU; or cpu, cuda, cuda:N, N")
    group.add_argument("--debug", action="store_true")
    group.add_argument("--log-image", type=str2bool, default=True)
    group.add_argument("--trust-pickle", action="store_true",
                       help="load checkpoints that hold pickled Python objects (runs code from the file: only for "
                            "files you trust); also SAT_COGVIDEO_TRUST_PICKLE=1")
    return parser


def add_sampling_config_args(parser):
    """CogVideoX's sampling group (names and defaults of the original)."""
    group = parser.add_argument_group("sampling", "Sampling Configurations")
    group.add_argument("--output-dir", type=str, default="samples")
    group.add_argument("--input-dir", type=str, default=None)
    group.add_argument("--input-type", type=str, default="cli", choices=["cli", "txt"])
    group.add_argument("--input-file", type=str, default="input.txt")
    group.add_argument("--sampling-image-size", type=image_size, default=[768, 1360],
                       help="T2V video size H,W in pixels (1.5 models; 1.0 models are fixed at 480,720)")
    group.add_argument("--final-size", type=int, default=2048)
    group.add_argument("--sdedit", action="store_true")
    group.add_argument("--grid-num-rows", type=int, default=1)
    group.add_argument("--force-inference", action="store_true")
    group.add_argument("--lcm_steps", type=int, default=None)
    group.add_argument("--sampling-num-frames", type=int, default=32, help="number of LATENT frames")
    group.add_argument("--sampling-fps", type=int, default=8)
    group.add_argument("--only-save-latents", type=str2bool, default=False)
    group.add_argument("--only-log-video-latents", type=str2bool, default=False)
    group.add_argument("--latent-channels", type=int, default=32)
    group.add_argument("--image2video", action="store_true")
    return parser


def build_parser(extra: Iterable[Callable] = ()) -> argparse.ArgumentParser:
    """The full parser: CogVideoX groups, SAT's training/evaluation/data groups, DeepSpeed's flags.

    ``extra`` are functions ``f(parser)`` adding more options (e.g. the inference CLI's own).
    """
    from sat.arguments import add_data_args, add_evaluation_args, add_training_args

    parser = argparse.ArgumentParser(description="sat-cogvideo", allow_abbrev=False)
    add_model_config_args(parser)
    add_sampling_config_args(parser)
    add_training_args(parser)
    add_evaluation_args(parser)
    add_data_args(parser)
    try:
        import deepspeed

        deepspeed.add_config_arguments(parser)
    except ImportError:  # DeepSpeed is only needed for training
        parser.add_argument("--deepspeed", action="store_true")
        parser.add_argument("--deepspeed_config", type=str, default=None)
    # Ours: the backend follows the device unless given.
    parser.set_defaults(distributed_backend=None)
    from sat_cogvideo.hub import add_hub_args

    add_hub_args(parser)  # --revision of a Hugging Face id given to --load
    for add in extra:
        add(parser)
    for action in parser._actions:  # SAT's help texts carry bare '%' signs, which break --help
        if action.help and "%" in action.help and "%(" not in action.help:
            action.help = action.help.replace("%", "%%")
    return parser


# --------------------------------------------------------------------------------------------------------------
# YAML


def load_yaml_configs(paths: Sequence[str]):
    """Load and merge ``--base`` files with OmegaConf (later files win); every problem is one UserError."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    import yaml

    configs = []
    for path in paths:
        if not os.path.exists(path):
            raise UserError(f"config file {path} does not exist (--base takes YAML files, e.g. configs/cogvideox_5b.yaml)")
        if os.path.isdir(path):
            raise UserError(f"--base {path} is a folder; pass the YAML files in it, e.g. {os.path.join(path, 'model.yaml')}")
        try:
            cfg = OmegaConf.load(path)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise UserError(f"{path}: YAML syntax error{where}: {problem}") from None
        except (OmegaConfBaseException, UnicodeDecodeError, OSError) as err:
            raise UserError(f"{path}: cannot read config: {str(err).splitlines()[0]}") from None
        if cfg is None:
            cfg = OmegaConf.create({})
        if not isinstance(cfg, DictConfig):
            raise UserError(f"{path}: the top level must be a mapping with args:/model:/deepspeed:/data: sections")
        for section in ("args", "model", "deepspeed", "data"):
            if section in cfg and cfg[section] is not None and not isinstance(cfg[section], DictConfig):
                raise UserError(f"{path}: section '{section}:' must be a mapping, got {type(cfg[section]).__name__}")
        configs.append((path, cfg))
    if not configs:
        return OmegaConf.create({}), {}
    try:
        merged = OmegaConf.merge(*[c for _, c in configs])
    except OmegaConfBaseException as err:
        raise UserError(f"cannot merge configs {', '.join(paths)}: {str(err).splitlines()[0]}") from None
    # Which file set each args: key last, for error messages.
    origin = {}
    for path, cfg in configs:
        for key in (cfg.get("args") or {}):
            origin[key] = path
    return merged, origin


def _actions_by_dest(parser) -> dict:
    return {a.dest: a for a in parser._actions}


def _check_yaml_value(action, value, where: str):
    """Convert a YAML ``args:`` value with the option's own type; raise a UserError naming the key."""
    if value is None:
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if isinstance(value, bool):
            return value
        try:
            return str2bool(value)
        except argparse.ArgumentTypeError:
            raise UserError(f"{where} must be true or false, got {value!r}") from None
    if action.nargs in ("*", "+") or isinstance(action.nargs, int):
        values = value if isinstance(value, list) else [value]
        return [_convert(action, v, where) for v in values]
    if isinstance(value, (list, dict)) and action.type not in (image_size,):
        raise UserError(f"{where} must be a single {_type_name(action)}, got {type(value).__name__} {value!r}")
    return _convert(action, value, where)


def _type_name(action) -> str:
    t = action.type
    return {int: "integer", float: "number", str: "string", str2bool: "true/false",
            image_size: "image size [H, W]"}.get(t, getattr(t, "__name__", "value"))


def _convert(action, value, where):
    t = action.type
    try:
        if t is int:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)) or float(value) != int(float(value)):
                raise ValueError
            value = int(float(value))
        elif t is float:
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
        elif t is not None and t is not str:
            value = t(value)
        elif t is str and isinstance(value, (list, dict)):
            raise ValueError
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        name = _type_name(action)
        article = "an" if name[0] in "aeiou" else "a"
        raise UserError(f"{where} must be {article} {name}, got {value!r}") from None
    if action.choices is not None and value not in action.choices:
        raise UserError(f"{where} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return value


def _explicit_dests(parser, argv) -> set:
    """The destinations the user actually typed on the command line."""
    probe = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        kwargs = dict(dest=action.dest, default=argparse.SUPPRESS)
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction)):
            kwargs["action"] = "store_const"
            kwargs["const"] = True
        else:
            kwargs["nargs"] = action.nargs
        probe.add_argument(*action.option_strings, **kwargs)
    seen, _ = probe.parse_known_args(argv)
    return set(vars(seen))


# --------------------------------------------------------------------------------------------------------------
# get_args


def get_args(args_list: Sequence[str] | None = None, extra: Iterable[Callable] = ()) -> argparse.Namespace:
    """Parse ``args_list`` (default ``sys.argv[1:]``), merge the ``--base`` YAML files, post-process
    (original ``arguments.get_args``).

    ``args.device`` comes back resolved (``cpu`` or ``cuda:N``); ``args.explicit`` is the frozenset of the
    destinations given on the command line.  Does not start torch.distributed or seed;
    call :func:`initialize` for that.
    """
    if args_list is None:
        args_list = sys.argv[1:]
    args_list = list(args_list)
    parser = build_parser(extra)
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # argparse already printed a one-line usage error
        if exc.code == 0:
            raise
        raise SystemExit(2) from None
    explicit = _explicit_dests(parser, args_list)
    apply_configs(args, parser, explicit)
    _post_process(args, explicit)
    args.explicit = frozenset(explicit)  # the options given on the command line (they win over the YAML)
    return args


def apply_configs(args, parser, explicit: set = frozenset()):
    """Merge ``args.base`` into ``args`` as described in the module docstring."""
    from omegaconf import OmegaConf

    merged, origin = load_yaml_configs(args.base or [])
    actions = _actions_by_dest(parser)
    unknown = []
    for key, value in (merged.get("args") or {}).items():
        if key not in actions or actions[key].dest in ("help",):
            unknown.append(key)
            continue
        if key in explicit:  # the command line wins over YAML
            continue
        plain = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        setattr(args, key, _check_yaml_value(actions[key], plain, f"{origin.get(key, 'config')}: args.{key}"))
    if unknown:
        warnings.warn(f"ignoring unknown args: keys in {', '.join(args.base)}: {', '.join(unknown)} "
                      f"(option names use underscores, e.g. sampling_num_frames)", stacklevel=2)
    args.model_config = merged.get("model", None)
    args.data_config = merged.get("data", None)
    ds = merged.get("deepspeed", None)
    if ds is not None:
        args.deepspeed_config = OmegaConf.to_container(ds, resolve=True)
    args.config = merged
    return args


def _post_process(args, explicit: set):
    from sat_cogvideo.distributed import process_info, resolve_device

    if args.mode != "inference":
        if args.train_iters is not None and args.epochs is not None:
            raise UserError("give only one of --train-iters and --epochs (train_iters / epochs in the YAML)")
        if args.train_iters is None and args.epochs is None:
            args.train_iters = 10000
    info = process_info()
    args.rank, args.world_size = info.rank, info.world_size
    if args.local_rank is None:
        args.local_rank = info.local_rank
    args.device = str(resolve_device(args.device, args.local_rank))
    import torch

    args.cuda = torch.cuda.is_available()
    if args.fp16 and args.bf16:
        raise UserError("choose one of fp16 and bf16, not both")
    if args.mode != "inference":
        args.deepspeed = True
        ds = getattr(args, "deepspeed_config", None)
        if not isinstance(ds, dict):
            ds = default_deepspeed_config(args)
        else:
            # Command-line values win over the deepspeed: section too.
            if "batch_size" in explicit:
                ds["train_micro_batch_size_per_gpu"] = args.batch_size
            if "gradient_accumulation_steps" in explicit:
                ds["gradient_accumulation_steps"] = args.gradient_accumulation_steps
            for name in ("lr", "weight_decay"):
                if name in explicit:
                    ds.setdefault("optimizer", {}).setdefault("params", {})[name] = getattr(args, name)
            for name in ("fp16", "bf16"):
                if name in explicit:
                    ds.setdefault(name, {})["enabled"] = True
                    other = "bf16" if name == "fp16" else "fp16"
                    ds.setdefault(other, {})["enabled"] = False
            if "zero_stage" in explicit:
                ds.setdefault("zero_optimization", {})["stage"] = args.zero_stage
        args.deepspeed_config = ds
        args.fp16 = bool(ds.get("fp16", {}).get("enabled", False))
        args.bf16 = bool(ds.get("bf16", {}).get("enabled", False))
        if args.fp16 and args.bf16:
            raise UserError("the deepspeed: section enables both fp16 and bf16; enable one")
        args.batch_size = ds.get("train_micro_batch_size_per_gpu", args.batch_size)
        args.gradient_accumulation_steps = ds.get("gradient_accumulation_steps", 1)
        opt = ds.get("optimizer", {}).get("params", {})
        args.lr = opt.get("lr", args.lr)
        args.weight_decay = opt.get("weight_decay", args.weight_decay)
        args.zero_stage = ds.get("zero_optimization", {}).get("stage", args.zero_stage)
    args.deepspeed_activation_checkpointing = args.checkpoint_activations
    return args


def default_deepspeed_config(args) -> dict:
    """A DeepSpeed config built from the arguments, for runs whose YAML has no ``deepspeed:`` section."""
    return {
        "train_micro_batch_size_per_gpu": args.batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": args.zero_stage},
        "fp16": {"enabled": bool(args.fp16)},
        "bf16": {"enabled": bool(args.bf16)},
        "optimizer": {"type": "Adam", "params": {"lr": args.lr, "weight_decay": args.weight_decay}},
        "zero_allow_untested_optimizer": True,
    }


# --------------------------------------------------------------------------------------------------------------
# side effects: distributed start and seeding


def initialize(args) -> argparse.Namespace:
    """Start torch.distributed and SAT's mpu on ``args.device``, and seed every RNG with ``seed + dp_rank``
    (the rest of the original's ``get_args``: ``initialize_distributed`` and ``set_random_seed``)."""
    from sat_cogvideo.distributed import data_parallel_rank_and_size, init_distributed, is_cuda, resolve_device

    device = resolve_device(args.device, args.local_rank)
    args.device = str(device)
    if args.distributed_backend is None:
        args.distributed_backend = "nccl" if is_cuda(device) else "gloo"
    info = init_distributed(device=device, backend=args.distributed_backend,
                            model_parallel_size=args.model_parallel_size)
    args.rank, args.world_size = info.rank, info.world_size
    dp_rank, _ = data_parallel_rank_and_size()
    args.seed = args.seed + dp_rank
    set_random_seed(args.seed)
    return args


def set_random_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device) with ``seed``."""
    import numpy as np
    import torch

    if seed is None or seed < 0:
        raise UserError(f"--seed must be a non-negative integer, got {seed}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------------------------
# config targets


def iter_targets(node, path: str = "") -> Iterator[tuple[str, str]]:
    """Every ``target:`` string in a config, with the dotted key path of its mapping."""
    from omegaconf import DictConfig, ListConfig

    if isinstance(node, (dict, DictConfig)):
        for key, value in node.items():
            sub = f"{path}.{key}" if path else str(key)
            if key == "target" and isinstance(value, str):
                yield path or "<top>", value
            else:
                yield from iter_targets(value, sub)
    elif isinstance(node, (list, ListConfig)):
        for i, value in enumerate(node):
            yield from iter_targets(value, f"{path}[{i}]")


def check_targets(config) -> None:
    """Import every ``target:`` of a config; an unknown one is a UserError naming it and its key path."""
    from sgm.util import get_obj_from_str

    for where, target in iter_targets(config):
        get_obj_from_str(target, where=f"{where}.target")
