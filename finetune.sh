#!/usr/bin/env bash
# CogVideoX SAT finetuning (LoRA or full SFT) through SwissArmyTransformer's training loop and DeepSpeed.
#   bash finetune.sh                  demo: builds (once, cached) a tiny random-weight CogVideoX-2B and a generated
#                                     2-video dataset, then runs a few LoRA iterations on the CPU and saves a
#                                     checkpoint under outputs/tiny_ckpts/
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
  echo ">> demo: tiny random-weight CogVideoX-2B + a generated 2-video dataset in $SAT_COGVIDEO_DEMO" >&2
  [ -n "${FINETUNE_DRY_RUN:-}" ] || "$PY" -m sat_cogvideo.train_video --prepare-demo "$SAT_COGVIDEO_DEMO" >/dev/null
  ARGS=(--base "$HERE/configs/tiny/cogvideox_2b_lora.yaml" "$HERE/configs/tiny/sft.yaml" --device cpu)
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
  cat >&2 <<'EOF'
>> demo done: the checkpoint above (outputs/tiny_ckpts/tiny-lora-*/) holds the DiT with its LoRA, the optimizer
   state and the RNG state. The model has RANDOM weights; the run shows the whole finetuning path works here.
   Continue it:      bash finetune.sh --base configs/tiny/cogvideox_2b_lora.yaml configs/tiny/sft.yaml --resume \
                         --train-iters 8
   Export the LoRA:  python tools/export_sat_lora_weight.py --sat_pt_path outputs/tiny_ckpts/<run> \
                         --lora_save_directory outputs/tiny_lora
   Real finetuning:  set load/train_data/save in configs/sft.yaml, then
                     bash finetune.sh --base configs/cogvideox_2b_lora.yaml configs/sft.yaml
EOF
fi
