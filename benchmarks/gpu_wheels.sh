#!/usr/bin/env bash
# Download, here (where PyPI is reachable), the wheels benchmarks/gpu_check.sh needs on a bare offline GPU machine
# (Linux x86-64, Python 3.12, its own CUDA torch, numpy, einops, imageio, transformers, sentencepiece, safetensors,
# peft, huggingface_hub).  Usage:  bash benchmarks/gpu_wheels.sh DIR   (then copy DIR and the repository over).
#
# What the check imports that such a machine lacks, measured by importing everything with only those packages
# visible (tests/test_gpu_check.py::test_wheels_download_and_install_offline does it again):
#   SwissArmyTransformer, omegaconf, diffusers, requests (+ urllib3, certifi, idna) and pytest (+ pluggy, iniconfig);
#   torchao for the --weights-dtype int8 row (abi3 wheel, 3.4 MB; its optional kernels may not load beside another
#   torch version, it then runs its plain-torch path).
# Left out on purpose:
#   - DeepSpeed: inference never calls it, and with DeepSpeed installed `import sat` also imports SAT's training
#     loop, which needs wandb, boto3/botocore, webdataset, tensorboardX and datasets (pyarrow, pandas): > 100 MB.
#     Without it SAT prints "DeepSpeed Not Installed" and everything the check runs works.  WITH_DEEPSPEED=1 adds a
#     pure-Python DeepSpeed wheel (built with DS_BUILD_OPS=0, PyPI has only its sdist) and its small dependencies,
#     for a machine that has SAT's training dependencies already.
#   - triton (comes with CUDA torch), imageio-ffmpeg (the check writes no mp4), wandb.
# Versions are pinned to the ones the test suite runs with.  Total ~13 MB (limit 60 MB).
set -euo pipefail
DIR=${1:?usage: gpu_wheels.sh DIR}
PY=${PYTHON:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}
[ -x "$PY" ] || PY=python3
mkdir -p "$DIR"
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
          --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
PACKAGES=(SwissArmyTransformer==0.4.12 omegaconf==2.4.0 diffusers==0.42.1 "requests>=2.32" "urllib3>=2" certifi idna
          "pytest>=8" pluggy iniconfig torchao==0.18.0)
"$PY" -m pip download --quiet --no-deps "${PLATFORM[@]}" -d "$DIR" "${PACKAGES[@]}"
if [ "${WITH_DEEPSPEED:-0}" = 1 ]; then
    "$PY" -m pip download --quiet --no-deps "${PLATFORM[@]}" -d "$DIR" hjson py-cpuinfo msgpack ninja
    "$PY" -m pip download --quiet "${PLATFORM[@]}" -d "$DIR" "pydantic>=2"  # with its matching pydantic-core
    DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation --no-binary deepspeed -w "$DIR" \
        deepspeed==0.19.8
fi
du -ch "$DIR"/*.whl | tail -1
ls "$DIR"
