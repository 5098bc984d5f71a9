#!/bin/bash
#SBATCH --job-name=cogvideo_infer
#SBATCH --partition=gpu
#SBATCH --gres=gpu:1
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=04:00:00
#SBATCH --output=logs/inference-%j.out
#SBATCH --error=logs/inference-%j.err
#SBATCH --requeue
#
# CogVideoX inference (SAT code path) as a SLURM batch job.  See docs/cluster.md.
#
#   mkdir -p logs outputs            # once: SLURM opens logs/ before this script runs
#   sbatch scripts/slurm_inference.sh "A cat playing piano" /data/CogVideoX1.5-5B-SAT
#   sbatch --export=ALL,PROMPT="A cat playing piano",MODEL_PATH=/data/CogVideoX-5B-SAT scripts/slurm_inference.sh
#   sbatch --partition=a100 --gres=gpu:1 scripts/slurm_inference.sh     # override any #SBATCH line
#
# Every variable below can be set in the environment (sbatch --export=ALL,NAME=value); PROMPT and MODEL_PATH
# also as the first and second argument.  Empty NUM_FRAMES / FPS / DTYPE take the model family's values
# (CogVideoX 1.0: 49 frames, 8 fps; CogVideoX1.5: 81 frames, 16 fps; 2B float16, 5B bfloat16).  The family is
# detected from the checkpoint; FAMILY (2b, 5b, 5b-i2v, 1.5-5b, 1.5-5b-i2v) may name it and must then agree.
# Everything is checked before anything is computed: a problem is one line "error: ..." in the .err log and
# exit code 2.
#
# Several processes (prompts of PROMPT_FILE shared out, one video each, none twice):
#   sbatch --ntasks-per-node=4 --gres=gpu:4 --export=ALL,PROMPT_FILE=prompts.txt scripts/slurm_inference.sh
#     -> srun starts one task per GPU; or LAUNCHER=torchrun NPROC=4 for torchrun in one task.
# One video on several GPUs (docs/parallel.md): SP_SIZE=4 splits each video's sequence over 4 GPUs, CFG_PARALLEL=1
# doubles that; the remaining GPUs still share the prompts:
#   sbatch --ntasks-per-node=8 --gres=gpu:8 --export=ALL,SP_SIZE=4,CFG_PARALLEL=1 scripts/slurm_inference.sh
# A requeued (preempted) job keeps its outputs and only generates the missing ones.
# DRY_RUN=1 checks everything and prints the command without running it.

# ---- parameters (the guide's names) -------------------------------------------------------------------------
PROMPT="${1:-${PROMPT:-A serene sunrise over a mountain lake, mist drifting over the water, birds flying past.}}"
MODEL_PATH="${2:-${MODEL_PATH:-THUDM/CogVideoX1.5-5b}}"   # HF id, diffusers folder or SAT folder (docs/cluster.md)
LORA_PATH="${LORA_PATH:-}"                        # SAT LoRA checkpoint folder (with 'latest'), merged into the model
OUTPUT_PATH="${OUTPUT_PATH:-}"                    # default: outputs/inference_${SLURM_JOB_ID}.mp4
IMAGE_OR_VIDEO_PATH="${IMAGE_OR_VIDEO_PATH:-}"    # i2v: image (required); v2v: input video (required)
GENERATE_TYPE="${GENERATE_TYPE:-}"                # t2v / i2v / v2v (default t2v; i2v for I2V models)
NUM_FRAMES="${NUM_FRAMES:-}"                      # default: the family's (49 or 81)
NUM_STEPS="${NUM_STEPS:-50}"                      # sampler steps, 30-100
GUIDANCE_SCALE="${GUIDANCE_SCALE:-6.0}"           # CFG scale, 5-10
DTYPE="${DTYPE:-}"                                # default: the family's (2B float16, 5B bfloat16)
FPS="${FPS:-}"                                    # default: the family's (8 or 16)
SEED="${SEED:-42}"
CONDA_ACTIVATE_CMD="${CONDA_ACTIVATE_CMD:-}"      # e.g. "source ~/miniconda3/etc/profile.d/conda.sh; conda activate cogvideo"
# ---- more (ours) ----------------------------------------------------------------------------------------------
FAMILY="${FAMILY:-}"                              # only to confirm/force the detected family
PROMPT_FILE="${PROMPT_FILE:-}"                    # one prompt per line ("prompt@@image" for i2v): replaces PROMPT
PROMPT_LINE="${PROMPT_LINE:-}"                    # with PROMPT_FILE: generate this 0-based line only (job arrays)
OUTPUT_DIR="${OUTPUT_DIR:-}"                      # PROMPT_FILE outputs: <dir>/<line>_<prompt>/0/000000.mp4
MODEL_CONFIG="${MODEL_CONFIG:-}"                  # a model YAML for a checkpoint of non-released size
REVISION="${REVISION:-}"                          # branch, tag or commit of a Hugging Face MODEL_PATH
T5_PATH="${T5_PATH:-}"                            # T5 folder when it is not inside MODEL_PATH
VAE_PATH="${VAE_PATH:-}"                          # 3d-vae.pt when it is not MODEL_PATH/vae/3d-vae.pt
SAMPLER="${SAMPLER:-}"                            # dpm (default) or ddim
STRENGTH="${STRENGTH:-}"                          # v2v: 0 keeps the input video, 1 ignores it (default 0.8)
DEVICE="${DEVICE:-}"                              # default: cuda:<local rank> when CUDA is available, else cpu
OVERWRITE="${OVERWRITE:-0}"                       # 1: regenerate existing outputs (default: keep them, resume)
LAUNCHER="${LAUNCHER:-auto}"                      # auto | srun | torchrun | none
NPROC="${NPROC:-}"                                # torchrun: processes per node (default: GPUs, else 1)
PYTHON="${PYTHON:-}"                              # default: python3 of the activated environment
LOG_DIR="${LOG_DIR:-logs}"
EXTRA_ARGS="${EXTRA_ARGS:-}"                      # more sample_video options, e.g. "--offload --vae-tiling"
COMPILE="${COMPILE:-0}"                           # 1: regional torch.compile of the DiT layers (docs/speed.md)
WEIGHTS_DTYPE="${WEIGHTS_DTYPE:-}"                # fp8 / int8 DiT weights; OFFLOAD: model / group / sequential
OFFLOAD="${OFFLOAD:-}"; ATTENTION="${ATTENTION:-}" # ATTENTION: sdpa / flash / sage
CACHE="${CACHE:-}"                                # step caching: teacache:0.2 or fbcache:0.1
SP_SIZE="${SP_SIZE:-}"                            # one video on SP_SIZE GPUs (sequence parallel; docs/parallel.md)
CFG_PARALLEL="${CFG_PARALLEL:-0}"                 # 1: CFG halves on two GPU groups (2 x SP_SIZE GPUs per video)
ULYSSES_DEGREE="${ULYSSES_DEGREE:-}"; RING_DEGREE="${RING_DEGREE:-}"; PARALLEL_VAE="${PARALLEL_VAE:-0}"
# SAT_COGVIDEO_TRUST_PICKLE=1 lets checkpoints holding pickled Python objects load (that runs code from the file:
# only for files you trust); by default they are refused before anything runs, DRY_RUN included.

set -uo pipefail
die() { echo "error: $*" >&2; exit 2; }

if [ -n "${SLURM_ARRAY_JOB_ID:-}" ] && [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
  JOB_ID="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
  # An array over a prompt file: element i generates line i (0-based), unless PROMPT_LINE is set.
  [ -n "$PROMPT_FILE" ] && [ -z "$PROMPT_LINE" ] && PROMPT_LINE="$SLURM_ARRAY_TASK_ID"
else
  JOB_ID="${SLURM_JOB_ID:-local-$$}"
fi
[ -n "$OUTPUT_PATH" ] || [ -n "$PROMPT_FILE" ] || OUTPUT_PATH="outputs/inference_${JOB_ID}.mp4"

mkdir -p "$LOG_DIR" outputs || die "cannot create $LOG_DIR/ and outputs/ in $(pwd)"
[ -n "$OUTPUT_PATH" ] && { mkdir -p "$(dirname "$OUTPUT_PATH")" || die "cannot create the folder of OUTPUT_PATH $OUTPUT_PATH"; }

# ---- environment ----------------------------------------------------------------------------------------------
if [ -n "$CONDA_ACTIVATE_CMD" ]; then
  eval "$CONDA_ACTIVATE_CMD" || die "CONDA_ACTIVATE_CMD failed: '$CONDA_ACTIVATE_CMD' (test it by hand on a login node)"
fi
# The repository: this script's folder when run with bash; under sbatch the script is a copy in the spool,
# so the path given to sbatch (scontrol), the submit directory, or REPO_DIR.
is_repo() { [ -n "$1" ] && [ -f "$1/sat_cogvideo/launch.py" ]; }
if [ -z "${REPO_DIR:-}" ]; then
  REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." 2>/dev/null && pwd)"
  if ! is_repo "$REPO_DIR" && [ -n "${SLURM_JOB_ID:-}" ] && command -v scontrol >/dev/null 2>&1; then
    # the path sbatch was given (this file is a copy in slurmd's spool)
    SUBMITTED="$(timeout 20 scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | tr ' ' '\n' | sed -n 's/^Command=//p' | head -n 1)"
    [ -n "$SUBMITTED" ] && REPO_DIR="$(cd "$(dirname "$SUBMITTED")/.." 2>/dev/null && pwd)"
  fi
  is_repo "$REPO_DIR" || REPO_DIR="${SLURM_SUBMIT_DIR:-}"
  is_repo "$REPO_DIR" || REPO_DIR="$(pwd)"
  is_repo "$REPO_DIR" || REPO_DIR=""
fi
if [ -n "${REPO_DIR:-}" ]; then
  export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"
  [ -z "$PYTHON" ] && [ -z "$CONDA_ACTIVATE_CMD" ] && [ -x "$REPO_DIR/.venv/bin/python" ] && PYTHON="$REPO_DIR/.venv/bin/python"
fi
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
[ -n "$PYTHON" ] || die "no python3 found: set CONDA_ACTIVATE_CMD to activate the environment with sat-cogvideo"
"$PYTHON" -c "import sat_cogvideo.launch" 2>/dev/null \
  || die "$PYTHON cannot import sat_cogvideo: activate its environment (CONDA_ACTIVATE_CMD) or submit from the repository (or set REPO_DIR)"

echo "job ${JOB_ID} on $(hostname) at $(date -u +%FT%TZ), restart ${SLURM_RESTART_COUNT:-0}, tasks ${SLURM_NTASKS:-1}"

# ---- the guide's rules, checked before anything is computed --------------------------------------------------
export MODEL_PATH REVISION LORA_PATH PROMPT PROMPT_FILE PROMPT_LINE OUTPUT_PATH OUTPUT_DIR IMAGE_OR_VIDEO_PATH GENERATE_TYPE \
  NUM_FRAMES NUM_STEPS GUIDANCE_SCALE DTYPE FPS SEED FAMILY MODEL_CONFIG T5_PATH VAE_PATH SAMPLER STRENGTH DEVICE \
  OVERWRITE JOB_ID COMPILE WEIGHTS_DTYPE OFFLOAD ATTENTION CACHE \
  SP_SIZE CFG_PARALLEL ULYSSES_DEGREE RING_DEGREE PARALLEL_VAE NPROC LAUNCHER
export JOB_YAML="$LOG_DIR/inference-${JOB_ID}.yaml"
ARGS_FILE="$LOG_DIR/inference-${JOB_ID}.args"
"$PYTHON" -m sat_cogvideo.launch --args-file "$ARGS_FILE" || exit $?
mapfile -d '' -t ARGS < "$ARGS_FILE"
rm -f "$ARGS_FILE"
# shellcheck disable=SC2206
[ -n "$EXTRA_ARGS" ] && ARGS+=($EXTRA_ARGS)

# ---- launch: one process, srun (one task per GPU), or torchrun ----------------------------------------------
NTASKS="${SLURM_NTASKS:-1}"
if [ "$LAUNCHER" = auto ]; then
  if [ "$NTASKS" -gt 1 ] && command -v srun >/dev/null 2>&1; then LAUNCHER=srun
  elif [ -n "$NPROC" ] && [ "$NPROC" -gt 1 ]; then LAUNCHER=torchrun
  else LAUNCHER=none; fi
fi
# One rendezvous port per job (several jobs can share a node).
export MASTER_PORT="${MASTER_PORT:-$(( 20000 + ${SLURM_JOB_ID:-$$} % 20000 ))}"
# srun (Slurm >= 22.05) no longer inherits --cpus-per-task from the job; threads follow the allocation.
USER_OMP="${OMP_NUM_THREADS:-}"
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && export SRUN_CPUS_PER_TASK="${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}" \
  OMP_NUM_THREADS="${OMP_NUM_THREADS:-$SLURM_CPUS_PER_TASK}"
case "$LAUNCHER" in
  srun)
    # Each task reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; the first node is the rendezvous host.
    if [ -z "${MASTER_ADDR:-}" ] && [ -n "${SLURM_JOB_NODELIST:-}" ] && command -v scontrol >/dev/null 2>&1; then
      HOSTS="$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null)"; MASTER_ADDR="${HOSTS%%$'\n'*}"
      [ "${SLURM_NNODES:-1}" -gt 1 ] || MASTER_ADDR=127.0.0.1
      export MASTER_ADDR
    fi
    L="${SLURM_NTASKS_PER_NODE:-$NTASKS}"; export LOCAL_WORLD_SIZE="${L%%(*}"
    CMD=(srun --kill-on-bad-exit=1 "$PYTHON" -m sat_cogvideo.sample_video "${ARGS[@]}") ;;
  torchrun)
    if [ -z "$NPROC" ]; then
      NPROC="$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))' 2>/dev/null || echo 1)"
    fi
    # the task's CPUs are shared by its NPROC processes
    [ -z "$USER_OMP" ] && [ -n "${SLURM_CPUS_PER_TASK:-}" ] && \
      export OMP_NUM_THREADS=$(( SLURM_CPUS_PER_TASK / NPROC > 0 ? SLURM_CPUS_PER_TASK / NPROC : 1 ))
    CMD=("$PYTHON" -m torch.distributed.run --nnodes=1 --nproc_per_node="$NPROC" --master_addr=127.0.0.1
         --master_port="$MASTER_PORT" -m sat_cogvideo.sample_video "${ARGS[@]}") ;;
  none)
    CMD=("$PYTHON" -m sat_cogvideo.sample_video "${ARGS[@]}") ;;
  *) die "LAUNCHER=$LAUNCHER is not one of auto, srun, torchrun, none" ;;
esac

echo "+ ${CMD[*]}"
[ -n "${DRY_RUN:-}" ] && exit 0
"${CMD[@]}"
rc=$?
if [ $rc -eq 0 ]; then
  echo "done: ${OUTPUT_PATH:-$OUTPUT_DIR} ($(date -u +%FT%TZ))"
else
  echo "error: inference failed with exit code $rc (see the lines above in this log)" >&2
fi
exit $rc
