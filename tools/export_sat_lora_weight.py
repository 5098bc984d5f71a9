#!/usr/bin/env python
"""Export the LoRA of a SAT finetuning checkpoint for diffusers, or merge it into the base SAT weights.

Maps to the original ``tools/export_sat_lora_weight.py`` (same two flags), without its 2B-only tensor count, and
adds ``--merge`` (the original says merging cannot be done)::

    # diffusers LoRA: <out>/pytorch_lora_weights.safetensors
    python tools/export_sat_lora_weight.py --sat_pt_path ckpts/lora-disney-11-22-04-30 --lora_save_directory out
    #   pipe.load_lora_weights("out", adapter_name="lora"); pipe.set_adapters(["lora"], [lora_alpha / r])
    # or bake the scale in and use the adapter at weight 1:
    python tools/export_sat_lora_weight.py ... --scale_into_weights

    # merged SAT checkpoint (loads with the model config without lora_config; converts to diffusers)
    python tools/export_sat_lora_weight.py --sat_pt_path <run folder> --merge merged_transformer

``--sat_pt_path`` takes a run folder (``latest``), an iteration folder or the ``mp_rank_00_model_states.pt`` file.
``lora_alpha`` is read from ``training_config.yaml`` of the run when present (SAT default 1), else ``--lora_alpha``.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sat_cogvideo.convert.lora import lora_params_from_run  # noqa: E402
from sat_cogvideo.errors import UserError, require_packages, run_cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sat_pt_path", required=True,
                   help="SAT checkpoint: run folder (with latest), iteration folder or mp_rank_00_model_states.pt")
    p.add_argument("--lora_save_directory", default=None, help="write <dir>/pytorch_lora_weights.safetensors")
    p.add_argument("--merge", default=None, metavar="FOLDER",
                   help="write the LoRA merged into the base weights as a SAT checkpoint folder (latest, 1/...)")
    p.add_argument("--base", default=None,
                   help="base SAT checkpoint for --merge when the LoRA checkpoint holds only the LoRA factors")
    p.add_argument("--lora_alpha", type=float, default=None,
                   help="SAT lora_alpha (scaling alpha/r); default: from the run's training_config.yaml, else 1")
    p.add_argument("--scale_into_weights", action="store_true",
                   help="multiply the B factors by alpha/r so diffusers uses the adapter at weight 1")
    p.add_argument("--num_layers", type=int, default=None, help="require a LoRA on every one of this many layers")
    p.add_argument("--trust-pickle", "--trust_pickle", dest="trust_pickle", action="store_true",
                   help="allow checkpoints with pickled Python objects (runs code from the file: trusted files only)")
    return p


@run_cli
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    require_packages("torch", "safetensors", "omegaconf", what="tools/export_sat_lora_weight.py")
    if not args.lora_save_directory and not args.merge:
        raise UserError("nothing to do: give --lora_save_directory (diffusers LoRA) and/or --merge FOLDER")
    from sat_cogvideo.checkpoint import trusting

    with trusting(args.trust_pickle):
        return export(args)


def export(args) -> int:
    """Write what ``args`` ask for (see the module docstring)."""
    from sat_cogvideo.checkpoint import read_state_dict, save_checkpoint
    from sat_cogvideo.convert.lora import (SAT_PREFIX, export_lora_sat_to_diffusers, lora_rank,
                                           merge_lora_state_dict, save_diffusers_lora, split_lora_state_dict)

    sd = read_state_dict(args.sat_pt_path)
    params = lora_params_from_run(args.sat_pt_path)
    alpha = args.lora_alpha if args.lora_alpha is not None else float(params.get("lora_alpha", 1.0))
    _, lora = split_lora_state_dict(sd)
    if not lora:
        raise UserError(f"{args.sat_pt_path} holds no LoRA factors (matrix_A/matrix_B keys): it is not a LoRA "
                        f"checkpoint (a full finetune converts directly with the transformer converter)")
    r = lora_rank(lora)
    if "r" in params and int(params["r"]) != r:
        raise UserError(f"training_config.yaml says lora r {params['r']} but the factors have rank {r}")
    if args.lora_save_directory:
        exported = export_lora_sat_to_diffusers(sd, num_layers=args.num_layers, lora_alpha=alpha,
                                                scale_into_weights=args.scale_into_weights)
        path = save_diffusers_lora(exported, args.lora_save_directory)
        weight = 1.0 if args.scale_into_weights else alpha / r
        print(f"wrote {path} ({len(exported)} tensors, r={r}, lora_alpha={alpha:g}); in diffusers use "
              f"set_adapters([name], [{weight:g}])")
    if args.merge:
        base = read_state_dict(args.base) if args.base else None
        merged = merge_lora_state_dict(sd, lora_alpha=alpha, base=base)
        dit = {k: v for k, v in merged.items() if k.startswith(SAT_PREFIX)} or merged
        if not any(k.startswith(SAT_PREFIX) for k in dit):
            dit = {SAT_PREFIX + k: v for k, v in dit.items()}
        path = save_checkpoint(args.merge, dit, 1)
        print(f"wrote {path} (LoRA r={r}, lora_alpha={alpha:g} merged; load it with the model config without "
              f"lora_config)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
