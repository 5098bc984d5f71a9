#!/bin/bash
#SBATCH --job-name=cogvideo_ft
#SBATCH --partition=gpu
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --output=logs/finetune-%j.out
#SBATCH --error=logs/finetune-%j.err
#SBATCH --requeue
#
# Multi-node CogVideoX finetuning (LoRA or full, SAT + DeepSpeed) as a SLURM batch job.  See docs/cluster.md.
#
#   mkdir -p logs
#   sbatch scripts/slurm_finetune.sh                                  # 2 nodes x 8 GPUs, one task per GPU (srun)
#   sbatch --export=ALL,CONFIGS="configs/cogvideox_2b_lora.yaml configs/sft.yaml" scripts/slurm_finetune.sh
#   sbatch --nodes=4 --ntasks-per-node=1 --export=ALL,LAUNCHER=torchrun scripts/slurm_finetune.sh  # torchrun per node
#   full SFT of 5B / 1.5 with ZeRO-3 on cached latents (the cache folder on a shared file system; each rank encodes
#   every N-th missing video once, later runs and requeues read it):
#   sbatch --export=ALL,CONFIGS="configs/cogvideox_5b.yaml configs/sft.yaml configs/sft_zero3.yaml",\
#   EXTRA_ARGS="--cache-latents /shared/cache/disney" scripts/slurm_finetune.sh
#
# Two ways to start the processes; both take the rendezvous from SLURM's environment:
#   LAUNCHER=srun (default): one SLURM task per GPU (--ntasks-per-node = GPUs per node).  Each task gets
#     RANK=SLURM_PROCID, WORLD_SIZE=SLURM_NTASKS, LOCAL_RANK=SLURM_LOCALID; MASTER_ADDR is the first host of
#     SLURM_JOB_NODELIST and MASTER_PORT is derived from the job id.
#   LAUNCHER=torchrun: one SLURM task per node (--ntasks-per-node=1); torchrun starts GPUS_PER_NODE processes on
#     each node and meets the others through the c10d rendezvous at MASTER_ADDR:MASTER_PORT (id = job id).
# A requeued job (preemption, node failure) continues its newest run (--resume): iteration, optimizer, LR schedule,
# RNG and data position are restored; the number of processes must stay the same.

CONFIGS="${CONFIGS:-configs/cogvideox_5b_lora.yaml configs/sft.yaml}"   # --base files, model first
SEED="${SEED:-42}"
RESUME="${RESUME:-}"                    # "" (auto on requeue), "auto" (newest run), or a run folder
LAUNCHER="${LAUNCHER:-srun}"            # srun | torchrun
GPUS_PER_NODE="${GPUS_PER_NODE:-}"      # torchrun: processes per node (default: from SLURM_GPUS_ON_NODE / CUDA)
CONDA_ACTIVATE_CMD="${CONDA_ACTIVATE_CMD:-}"
PYTHON="${PYTHON:-}"
EXTRA_ARGS="${EXTRA_ARGS:-}"            # more train_video options, e.g. "--train-iters 2000 --save ckpts"

set -uo pipefail
die() { echo "error: $*" >&2; exit 2; }
mkdir -p logs || die "cannot create logs/ in $(pwd)"

if [ -n "$CONDA_ACTIVATE_CMD" ]; then
  eval "$CONDA_ACTIVATE_CMD" || die "CONDA_ACTIVATE_CMD failed: '$CONDA_ACTIVATE_CMD' (test it by hand on a login node)"
fi
is_repo() { [ -n "$1" ] && [ -f "$1/sat_cogvideo/train_video.py" ]; }
if [ -z "${REPO_DIR:-}" ]; then
  REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." 2>/dev/null && pwd)"
  if ! is_repo "$REPO_DIR" && [ -n "${SLURM_JOB_ID:-}" ] && command -v scontrol >/dev/null 2>&1; then
    SUBMITTED="$(timeout 20 scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | tr ' ' '\n' | sed -n 's/^Command=//p' | head -n 1)"
    [ -n "$SUBMITTED" ] && REPO_DIR="$(cd "$(dirname "$SUBMITTED")/.." 2>/dev/null && pwd)"
  fi
  is_repo "$REPO_DIR" || REPO_DIR="${SLURM_SUBMIT_DIR:-$(pwd)}"
fi
export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "$PYTHON" ]; then
  if [ -z "$CONDA_ACTIVATE_CMD" ] && [ -x "$REPO_DIR/.venv/bin/python" ]; then PYTHON="$REPO_DIR/.venv/bin/python"
  else PYTHON="$(command -v python3 || command -v python)"; fi
fi
"$PYTHON" -c "import sat_cogvideo.train_video" 2>/dev/null \
  || die "$PYTHON cannot import sat_cogvideo.train_video: activate its environment (CONDA_ACTIVATE_CMD) or set REPO_DIR"

# shellcheck disable=SC2206
BASE=($CONFIGS)
for i in "${!BASE[@]}"; do  # relative paths: the working directory first, then the repository
  f="${BASE[$i]}"
  [ -f "$f" ] || { [ -f "$REPO_DIR/$f" ] && BASE[$i]="$REPO_DIR/$f"; } \
    || die "config file $f does not exist (CONFIGS is a list of --base YAML files)"
done
ARGS=(--base "${BASE[@]}" --seed "$SEED")
if [ -z "$RESUME" ] && [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then RESUME=auto; fi
if [ "$RESUME" = auto ]; then ARGS+=(--resume); elif [ -n "$RESUME" ]; then ARGS+=(--resume "$RESUME"); fi
# shellcheck disable=SC2206
[ -n "$EXTRA_ARGS" ] && ARGS+=($EXTRA_ARGS)

# ---- rendezvous from SLURM's environment ----------------------------------------------------------------------
NNODES="${SLURM_NNODES:-1}"
if [ -z "${MASTER_ADDR:-}" ]; then
  if [ "$NNODES" -gt 1 ]; then
    # (the whole list is read first: "| head -n 1" under pipefail fails when scontrol gets SIGPIPE)
    HOSTS="$(scontrol show hostnames "${SLURM_JOB_NODELIST:-}" 2>/dev/null)" && [ -n "$HOSTS" ] \
      || die "cannot expand SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}' with scontrol: set MASTER_ADDR"
    MASTER_ADDR="${HOSTS%%$'\n'*}"
  else
    MASTER_ADDR=127.0.0.1
  fi
fi
export MASTER_ADDR
export MASTER_PORT="${MASTER_PORT:-$(( 20000 + ${SLURM_JOB_ID:-$$} % 20000 ))}"
# srun (Slurm >= 22.05) no longer inherits --cpus-per-task from the job; threads follow the allocation.
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && export SRUN_CPUS_PER_TASK="${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}" \
  OMP_NUM_THREADS="${OMP_NUM_THREADS:-$SLURM_CPUS_PER_TASK}"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
echo "job ${SLURM_JOB_ID:-local} on ${SLURM_JOB_NODELIST:-$(hostname)}: $NNODES node(s), launcher $LAUNCHER," \
     "rendezvous $MASTER_ADDR:$MASTER_PORT, restart ${SLURM_RESTART_COUNT:-0}"

case "$LAUNCHER" in
  srun)
    # One task per GPU: the torch.distributed variables come from the task's SLURM variables.
    TASK_ENV='L=${SLURM_NTASKS_PER_NODE:-1}; export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID LOCAL_WORLD_SIZE=${L%%(*};'
    CMD=(srun --kill-on-bad-exit=1 bash -c "$TASK_ENV"' exec "$0" -m sat_cogvideo.train_video "$@"'
         "$PYTHON" "${ARGS[@]}") ;;
  torchrun)
    if [ -z "$GPUS_PER_NODE" ]; then
      GPUS_PER_NODE="${SLURM_GPUS_ON_NODE:-$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))' 2>/dev/null || echo 1)}"
    fi
    CMD=(srun --kill-on-bad-exit=1 --ntasks-per-node=1 "$PYTHON" -m torch.distributed.run
         --nnodes="$NNODES" --nproc_per_node="$GPUS_PER_NODE" --rdzv_backend=c10d
         --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="${SLURM_JOB_ID:-$$}"
         -m sat_cogvideo.train_video "${ARGS[@]}") ;;
  *) die "LAUNCHER=$LAUNCHER is not one of srun, torchrun" ;;
esac
echo "+ ${CMD[*]}"
[ -n "${DRY_RUN:-}" ] && exit 0
"${CMD[@]}"
rc=$?
[ $rc -eq 0 ] || echo "error: finetuning failed with exit code $rc (see the lines above in this log)" >&2
exit $rc
