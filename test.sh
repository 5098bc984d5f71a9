#!/usr/bin/env bash
# Set up (once) and run the test suite.  Usage: bash test.sh [pytest args...]
#   Uses the active Python if it already imports every dependency; otherwise creates .venv and installs
#   torch (CPU build when no NVIDIA GPU is visible), DeepSpeed (--no-build-isolation), then `pip install -e .[test]`.
#   A stamp of the dependency files makes the second run skip the install.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/env.sh
sat_cogvideo_python test
"$PY" -m pytest "$@"
