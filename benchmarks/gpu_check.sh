#!/usr/bin/env bash
# The GPU check in one command (see benchmarks/gpu_check.py for what it measures):
#
#   bash benchmarks/gpu_check.sh --out DIR [--budget SECONDS] [--parts tests,dit,vae,accel,multi] [--wheels WHEELS]
#   bash benchmarks/gpu_check.sh --dry-run --out DIR      # CPU, tiny sizes: the same code, in seconds
#
# --wheels WHEELS: install the wheels of benchmarks/gpu_wheels.sh offline into a temporary folder first (pip
# --no-index --target, --no-deps; distributions the machine already has are left alone; removed at exit).  The
# machine's own Python and torch are used ($PYTHON; default the repository's .venv if there is one, else python3);
# no virtual environment is built.
# The whole run is also bounded from outside: killed at --budget + 180 s (the report written so far stays).
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
PY=${PYTHON:-}
if [ -z "$PY" ]; then [ -x "$ROOT/.venv/bin/python" ] && PY=$ROOT/.venv/bin/python || PY=python3; fi
WHEELS=""
BUDGET=480
ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) WHEELS=${2:?--wheels needs a folder}; shift 2 ;;
        --wheels=*) WHEELS=${1#--wheels=}; shift ;;
        --budget) BUDGET=${2:-480}; ARGS+=("$1" "${2:-}"); shift 2 ;;
        *) ARGS+=("$1"); shift ;;
    esac
done

TARGET=""
cleanup() { [ -n "$TARGET" ] && rm -rf "$TARGET"; }
trap cleanup EXIT
if [ -n "$WHEELS" ]; then
    if [ ! -d "$WHEELS" ]; then
        echo "error: --wheels $WHEELS is not a folder: run benchmarks/gpu_wheels.sh DIR" >&2
        exit 2
    fi
    TARGET=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-wheels.XXXXXX")
    TODO=()
    for whl in "$WHEELS"/*.whl; do
        [ -e "$whl" ] || continue
        dist=$(basename "$whl" | cut -d- -f1)
        if "$PY" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" 2>/dev/null; then
            echo "gpu_check: $dist is installed here, its wheel is not used" >&2
        else
            TODO+=("$whl")
        fi
    done
    if [ ${#TODO[@]} -gt 0 ]; then
        if "$PY" -m pip --version >/dev/null 2>&1; then
            "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" --target "$TARGET" --no-deps \
                --disable-pip-version-check "${TODO[@]}" ||
            { echo "error: offline install of $WHEELS failed (see pip's message above)" >&2; exit 2; }
        else  # no pip on the machine: a pure-Python wheel is a zip of the files to put on the path
            "$PY" -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" \
                "$TARGET" "${TODO[@]}" || exit 2
        fi
    fi
    export GPU_CHECK_WHEELS_TARGET=$TARGET
    export GPU_CHECK_WHEELS_INSTALLED="${TODO[*]##*/}"
    export PYTHONPATH="$TARGET:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
LIMIT=$("$PY" -c "import sys; print(int(float(sys.argv[1]) + 180))" "$BUDGET" 2>/dev/null || echo 660)
cd "$ROOT" && timeout --signal=TERM --kill-after=20 "$LIMIT" "$PY" "$HERE/gpu_check.py" "${ARGS[@]}"
