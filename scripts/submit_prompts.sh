#!/usr/bin/env bash
# Submit one video per prompt of a file: a SLURM job array (default) or one job per prompt.
#
#   bash scripts/submit_prompts.sh prompts.txt                       # job array, element i = line i (0-based)
#   bash scripts/submit_prompts.sh --each prompts.txt                # one sbatch per prompt
#   MODEL_PATH=/data/CogVideoX-5B-SAT NUM_STEPS=50 bash scripts/submit_prompts.sh prompts.txt -- --partition=a100
#
# Each prompt writes its own video, <OUTPUT_DIR>/<line>_<prompt>/0/000000.mp4 (the layout of sample_video and
# the original; OUTPUT_DIR defaults to outputs/prompts).  Running the command again submits only the prompts
# whose video does not exist yet.  Empty lines are skipped; "prompt@@/path/image.jpg" lines carry their i2v image.
# All variables of scripts/slurm_inference.sh (MODEL_PATH, GENERATE_TYPE, NUM_FRAMES, ...) are passed on to the
# jobs (sbatch --export=ALL); arguments after "--" go to sbatch (partition, gres, time, ...).
#
# Options: --array (default) | --each;  --max-parallel N (array: at most N elements at once);
#          --dry-run (print the sbatch commands, submit nothing).
set -uo pipefail
die() { echo "error: $*" >&2; exit 2; }

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="${REPO_DIR:-$(cd "$HERE/.." && pwd)}"
MODE=array; MAX_PARALLEL=""; DRY_RUN="${DRY_RUN:-}"; PROMPTS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --array) MODE=array ;;
    --each) MODE=each ;;
    --max-parallel) shift; MAX_PARALLEL="${1:-}" ;;
    --max-parallel=*) MAX_PARALLEL="${1#*=}" ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    -*) die "unknown option $1 (sbatch options go after --)" ;;
    *) [ -z "$PROMPTS" ] || die "give one prompt file (got $PROMPTS and $1)"; PROMPTS="$1" ;;
  esac
  shift
done
[ -n "$PROMPTS" ] || die "usage: submit_prompts.sh [--array|--each] [--max-parallel N] [--dry-run] prompts.txt [-- sbatch options]"
[ -f "$PROMPTS" ] || die "prompt file $PROMPTS does not exist"
[ -z "$MAX_PARALLEL" ] || [[ "$MAX_PARALLEL" =~ ^[1-9][0-9]*$ ]] || die "--max-parallel takes a positive number, got '$MAX_PARALLEL'"
SBATCH_ARGS=("$@")
SCRIPT="${SCRIPT:-$REPO_DIR/scripts/slurm_inference.sh}"
PROMPT_FILE="$(cd "$(dirname "$PROMPTS")" && pwd)/$(basename "$PROMPTS")"
OUTPUT_DIR="${OUTPUT_DIR:-outputs/prompts}"
LOG_DIR="${LOG_DIR:-logs}"
mkdir -p "$LOG_DIR" "$OUTPUT_DIR" || die "cannot create $LOG_DIR/ and $OUTPUT_DIR/"

PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  if [ -x "$REPO_DIR/.venv/bin/python" ]; then PYTHON="$REPO_DIR/.venv/bin/python"; else PYTHON="$(command -v python3 || true)"; fi
fi
[ -n "$PYTHON" ] || die "no python3 found"
# line<TAB>done<TAB>output for every non-empty line (the same names the jobs write)
LIST="$(PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m sat_cogvideo.launch --pending "$PROMPT_FILE" "$OUTPUT_DIR")" \
  || exit $?
TODO=(); DONE=0
while IFS=$'\t' read -r line done _out; do
  [ -n "$line" ] || continue
  if [ "$done" = 1 ]; then DONE=$((DONE + 1)); else TODO+=("$line"); fi
done <<< "$LIST"
echo "$PROMPTS: ${#TODO[@]} prompt(s) to generate, $DONE already done (outputs in $OUTPUT_DIR)"
[ ${#TODO[@]} -gt 0 ] || exit 0

export PROMPT_FILE OUTPUT_DIR LOG_DIR
run() {
  echo "+ $*"
  [ -n "$DRY_RUN" ] && return 0
  "$@"
}

if [ "$MODE" = array ]; then
  # compress the line numbers into ranges: 0-3,5,7-8
  spec=""; start=""; prev=""
  for n in "${TODO[@]}" ""; do
    if [ -n "$start" ] && { [ -z "$n" ] || [ "$n" -ne $((prev + 1)) ]; }; then
      [ "$start" = "$prev" ] && part="$start" || part="$start-$prev"
      spec="${spec:+$spec,}$part"; start=""
    fi
    [ -n "$n" ] || break
    [ -n "$start" ] || start="$n"
    prev="$n"
  done
  run sbatch --array="${spec}${MAX_PARALLEL:+%$MAX_PARALLEL}" --export=ALL \
    --output="$LOG_DIR/inference-%A_%a.out" --error="$LOG_DIR/inference-%A_%a.err" \
    "${SBATCH_ARGS[@]}" "$SCRIPT" || die "sbatch failed"
else
  for n in "${TODO[@]}"; do
    run env PROMPT_LINE="$n" sbatch --export=ALL "${SBATCH_ARGS[@]}" "$SCRIPT" \
      || die "sbatch failed for line $n"
  done
fi
