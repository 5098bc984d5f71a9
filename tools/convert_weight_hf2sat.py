"""Convert a diffusers CogVideoX pipeline (or transformer / VAE folder) to a SAT model folder.

Writes ``<output>/transformer/{latest, 1/mp_rank_00_model_states.pt}``, ``<output>/vae/3d-vae.pt`` and, when the
pipeline has them, ``<output>/t5-v1_1-xxl/`` (T5 encoder + tokenizer), so diffusers weights can be used with the
SAT path (``sample_video.py``, finetuning).  Example::

    python tools/convert_weight_hf2sat.py --input_path CogVideoX-5b --output_path CogVideoX-5b-sat

The inverse of ``convert_weight_sat2hf.py``: SAT -> diffusers -> SAT -> diffusers gives the same tensors bit for bit.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sat_cogvideo.errors import UserError, require_packages, run_cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input_path", required=True,
                   help="diffusers pipeline folder (model_index.json) or its transformer/ or vae/ folder")
    p.add_argument("--output_path", required=True, help="SAT model folder to write")
    p.add_argument("--fp16", action="store_true", help="save in float16 (default: keep the stored dtype)")
    p.add_argument("--bf16", action="store_true", help="save in bfloat16")
    p.add_argument("--fp32", action="store_true", help="save in float32")
    p.add_argument("--iteration", default="1", help="iteration folder name written to 'latest' (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output_path")
    return p


@run_cli
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    require_packages("torch", what="tools/convert_weight_hf2sat.py")
    if args.fp16 + args.bf16 + args.fp32 > 1:
        raise UserError("choose one of --fp16, --bf16, --fp32")
    import torch

    from sat_cogvideo.convert.pipeline import convert_diffusers_to_sat

    dtype = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32 if args.fp32 else None
    convert_diffusers_to_sat(args.input_path, args.output_path, dtype=dtype, overwrite=args.overwrite,
                             iteration=args.iteration)
    return 0


if __name__ == "__main__":
    sys.exit(main())
