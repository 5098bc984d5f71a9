#!/usr/bin/env bash
# CogVideoX SAT inference.
#   bash inference.sh                 demo: the trained tiny model of demo_model/ draws "a red circle moving to the
#                                     right" (outputs/demo.mp4 + demo.png, a strip of its frames) on the CPU;
#                                     python -m sat_cogvideo.demo --help: other prompts, the random-weight models
#   bash inference.sh ARGS...         python -m sat_cogvideo.sample_video ARGS..., e.g.
#       bash inference.sh --base configs/cogvideox_5b.yaml configs/inference.yaml \
#            --load /ckpts/CogVideoX-5b-sat/transformer --prompt "A cat ..." --output-path out.mp4
#     t2v / i2v / v2v: --generate-type, --image-or-video-path; frames: --num-frames 49 (1.0) / 81 (1.5);
#     --num-steps, --guidance-scale, --sampler dpm|ddim, --seed, --dtype, --device, --offload, --skip-existing.
#   Multi-GPU data parallel: torchrun --nproc_per_node N -m sat_cogvideo.sample_video ARGS (prompts are sharded).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
source "$HERE/scripts/env.sh"   # relative paths in the arguments stay relative to the current folder
sat_cogvideo_python
export SAT_COGVIDEO_DEMO="${SAT_COGVIDEO_DEMO:-${SAT_COGVIDEO_CACHE:-$HOME/.cache/sat-cogvideo}/demo}"
if [ "$#" -eq 0 ]; then
  exec "$PY" -m sat_cogvideo.demo
fi
exec "$PY" -m sat_cogvideo.sample_video "$@"
