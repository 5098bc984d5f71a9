#!/usr/bin/env bash
# CogVideoX SAT finetuning (LoRA or full SFT) through SwissArmyTransformer's training loop and DeepSpeed.
#   bash finetune.sh                  demo: LoRA on the trained demo model (demo_model/) with generated clips of a
#                                     colour it has never seen (cyan), on the CPU (a few minutes); saves the run under
#                                     outputs/demo_lora/ and writes before/after previews (outputs/demo_lora_*.png)
#   bash finetune.sh ARGS...          python -m sat_cogvideo.train_video ARGS..., e.g.
#       bash finetune.sh --base configs/cogvideox_2b_lora.yaml configs/sft.yaml     (LoRA)
#       bash finetune.sh --base configs/cogvideox_2b.yaml configs/sft.yaml          (full finetuning)
#     Set load: (the CogVideoX SAT transformer folder), train_data: (folders with labels/N.txt, videos/N.mp4) and
#     save: in configs/sft.yaml, or pass --load / --train-data / --save.  --resume continues the newest run.
#   Several processes (data parallel, ZeRO): NPROC=8 bash finetune.sh ARGS  or  bash finetune.sh --nproc 8 ARGS
#     (torchrun --standalone; for several nodes run torchrun yourself with -m sat_cogvideo.train_video).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
source "$HERE/scripts/env.sh"   # relative paths in the arguments stay relative to the current folder
sat_cogvideo_python

NPROC="${NPROC:-1}"
ARGS=()
while [ "$#" -gt 0 ]; do
  case "$1" in
    --nproc) [ "$#" -ge 2 ] || { echo "error: --nproc needs a number" >&2; exit 2; }; NPROC="$2"; shift 2 ;;
    --nproc=*) NPROC="${1#--nproc=}"; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
case "$NPROC" in
  ''|*[!0-9]*|0) echo "error: NPROC/--nproc must be a positive integer, got '$NPROC'" >&2; exit 2 ;;
esac

if [ "${#ARGS[@]}" -eq 0 ]; then
  export SAT_COGVIDEO_DEMO="${SAT_COGVIDEO_DEMO:-${SAT_COGVIDEO_CACHE:-$HOME/.cache/sat-cogvideo}/demo}"
  export SAT_COGVIDEO_DEMO_MODEL="${SAT_COGVIDEO_DEMO_MODEL:-$HERE/demo_model}"
  echo ">> demo: LoRA on the trained demo model ($SAT_COGVIDEO_DEMO_MODEL) with clips of a new colour (cyan)" >&2
  [ -n "${FINETUNE_DRY_RUN:-}" ] || "$PY" -m sat_cogvideo.demo --prepare-finetune >/dev/null
  ARGS=(--base "$SAT_COGVIDEO_DEMO_MODEL/cogvideox_5b_lora.yaml" "$HERE/configs/tiny/sft_demo_lora.yaml" --device cpu
        ${FINETUNE_DEMO_ITERS:+--train-iters "$FINETUNE_DEMO_ITERS"})
  DEMO=1
fi

if [ "$NPROC" -gt 1 ]; then
  CMD=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m sat_cogvideo.train_video "${ARGS[@]}")
else
  CMD=("$PY" -m sat_cogvideo.train_video "${ARGS[@]}")
fi
if [ -n "${FINETUNE_DRY_RUN:-}" ]; then  # print the command instead of running it
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
"${CMD[@]}"

if [ -n "${DEMO:-}" ]; then
  "$PY" -m sat_cogvideo.demo --compare-lora auto
  cat >&2 <<'EOF'
>> demo done: the run above (outputs/demo_lora/demo-lora-*/) holds the DiT with its LoRA, the optimizer state and
   the RNG state; outputs/demo_lora_before_after.png shows the prompts with the new colour before and after.
   Generate with it: bash inference.sh --base demo_model/cogvideox_5b.yaml demo_model/inference.yaml \
                         --load demo_model/cogvideox_5b/transformer --lora-path outputs/demo_lora/<run> \
                         --prompt "a cyan square moving to the left" --output-path cyan.mp4 --preview
   Continue it:      bash finetune.sh --base demo_model/cogvideox_5b_lora.yaml configs/tiny/sft_demo_lora.yaml \
                         --resume --train-iters 120
   Export the LoRA:  python tools/export_sat_lora_weight.py --sat_pt_path outputs/demo_lora/<run> \
                         --lora_save_directory outputs/demo_lora_hf
   Real finetuning:  set load/train_data/save in configs/sft.yaml, then
                     bash finetune.sh --base configs/cogvideox_2b_lora.yaml configs/sft.yaml
EOF
fi
