"""Convert CogVideoX SAT checkpoints (transformer + 3d-vae.pt) to a diffusers pipeline folder.

Maps to the original ``tools/convert_weight_sat2hf.py`` (same flags), for all five families including
CogVideoX1.5-5B and 1.5-5B-I2V.  The model is detected from the checkpoint; the original's model flags
(``--num_layers``, ``--num_attention_heads``, ``--use_rotary_positional_embeddings``, ``--version``, ``--i2v``) are
checked against it.  Example (CogVideoX-5B-I2V)::

    python tools/convert_weight_sat2hf.py --transformer_ckpt_path CogVideoX-5b-I2V-sat/transformer \\
        --vae_ckpt_path CogVideoX-5b-I2V-sat/vae/3d-vae.pt --text_encoder_path t5-v1_1-xxl \\
        --output_path CogVideoX-5b-I2V-diffusers --bf16 --i2v

Bad input (missing file, not a checkpoint, wrong family flag, existing output) ends with one line and exit code 2.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sat_cogvideo.errors import UserError, require_packages, run_cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transformer_ckpt_path", default=None,
                   help="SAT transformer: <SAT folder>/transformer (reads 'latest') or its mp_rank_00_model_states.pt")
    p.add_argument("--vae_ckpt_path", default=None, help="SAT VAE file: <SAT folder>/vae/3d-vae.pt")
    p.add_argument("--output_path", required=True, help="diffusers pipeline folder to write")
    p.add_argument("--fp16", action="store_true", help="save the transformer in float16")
    p.add_argument("--bf16", action="store_true", help="save the transformer in bfloat16")
    p.add_argument("--push_to_hub", action="store_true",
                   help="(original flag) not supported: this tool never uploads; push the folder yourself")
    p.add_argument("--text_encoder_path", default="google/t5-v1_1-xxl",
                   help="T5 v1.1 XXL: a local folder (the SAT release's t5-v1_1-xxl, or a diffusers pipeline with "
                        "text_encoder/ + tokenizer/) or a Hub id (downloaded, as the original; default "
                        "google/t5-v1_1-xxl)")
    p.add_argument("--no_text_encoder", action="store_true",
                   help="write no text_encoder/ and tokenizer/ (load with text_encoder=None, tokenizer=None)")
    p.add_argument("--text_encoder_cache_dir", default=None, help="cache folder for a downloaded T5")
    p.add_argument("--typecast_text_encoder", action="store_true", help="also cast T5 to --fp16/--bf16")
    p.add_argument("--num_layers", type=int, default=None, help="check: 30 for 2B, 42 for 5B/1.5 (default: detect)")
    p.add_argument("--num_attention_heads", type=int, default=None, help="check: 30 for 2B, 48 for 5B/1.5")
    p.add_argument("--use_rotary_positional_embeddings", action="store_true", default=None,
                   help="check: the model uses RoPE (5B, 5B-I2V, 1.5); default: detect")
    p.add_argument("--scaling_factor", type=float, default=None,
                   help="VAE scaling factor (default: the model's, 1.15258426 for 2B, 0.7 otherwise)")
    p.add_argument("--snr_shift_scale", type=float, default=None,
                   help="scheduler SNR shift (default: the model's, 3.0 for 2B, 1.0 otherwise)")
    p.add_argument("--i2v", action="store_true", help="image-to-video model (must match the checkpoint)")
    p.add_argument("--version", choices=["1.0", "1.5"], default=None,
                   help="CogVideoX generation (default: detected from the checkpoint; checked when given)")
    p.add_argument("--config", nargs="+", default=None,
                   help="SAT model YAML(s) of the checkpoint; needed only for models of non-released sizes")
    p.add_argument("--merge_lora", action="store_true",
                   help="fold the LoRA of a SAT LoRA finetune checkpoint into the base weights")
    p.add_argument("--lora_alpha", type=float, default=1.0, help="LoRA alpha of the finetune config (default 1)")
    p.add_argument("--base_transformer_ckpt_path", default=None,
                   help="base model checkpoint, for a LoRA checkpoint that holds only the LoRA factors")
    p.add_argument("--max_shard_size", default="5GB", help="safetensors shard size (default 5GB, as diffusers)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output_path")
    p.add_argument("--trust-pickle", "--trust_pickle", dest="trust_pickle", action="store_true",
                   help="allow checkpoints with pickled Python objects (runs code from the file: trusted files only)")
    return p


@run_cli
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    require_packages("torch", "omegaconf", "diffusers", what="tools/convert_weight_sat2hf.py")
    if args.fp16 and args.bf16:
        raise UserError("--fp16 and --bf16 together: choose one")
    if args.push_to_hub:
        raise UserError("--push_to_hub is not supported: convert to a folder, then upload it with "
                        "`huggingface-cli upload`")
    import torch

    from sat_cogvideo.convert.pipeline import convert_sat_to_diffusers

    dtype = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32
    convert_sat_to_diffusers(
        args.output_path, transformer_ckpt_path=args.transformer_ckpt_path, vae_ckpt_path=args.vae_ckpt_path,
        config=args.config, dtype=dtype, i2v=args.i2v, version=args.version, num_layers=args.num_layers,
        num_attention_heads=args.num_attention_heads,
        use_rotary_positional_embeddings=args.use_rotary_positional_embeddings, scaling_factor=args.scaling_factor,
        snr_shift_scale=args.snr_shift_scale,
        text_encoder_path=None if args.no_text_encoder else args.text_encoder_path,
        text_encoder_cache_dir=args.text_encoder_cache_dir, typecast_text_encoder=args.typecast_text_encoder,
        overwrite=args.overwrite, trust_pickle=args.trust_pickle, max_shard_size=args.max_shard_size,
        merge_lora_weights=args.merge_lora, lora_alpha=args.lora_alpha,
        base_transformer_ckpt_path=args.base_transformer_ckpt_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
