# Sourced by test.sh, inference.sh and finetune.sh: find or build a Python that has every dependency.
# After `sat_cogvideo_python [test]`, $PY is that Python.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

_deps_ok() {  # $1: python, $2: "test" to also require the test extras
  local mods="torch sat deepspeed omegaconf einops sentencepiece transformers imageio imageio_ffmpeg safetensors tqdm PIL diffusers torchao"
  [ "${2:-}" = test ] && mods="$mods pytest peft skimage"
  "$1" - $mods >/dev/null 2>&1 <<'PYEOF'
import importlib, sys
for m in sys.argv[1:]:
    importlib.import_module(m)
PYEOF
}

_stamp() { cat "$ROOT/setup.py" "$ROOT/scripts/env.sh" | sha256sum | cut -c1-16; }

sat_cogvideo_python() {
  local want="${1:-}" venv="$ROOT/.venv"
  if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.stamp-$want" 2>/dev/null)" = "$(_stamp)" ]; then
    PY="$venv/bin/python"; return 0
  fi
  local active; active="$(command -v python3 || command -v python || true)"
  if [ -z "${SAT_COGVIDEO_FORCE_VENV:-}" ] && [ -n "$active" ] && _deps_ok "$active" "$want"; then
    PY="$active"; return 0
  fi
  [ -n "$active" ] || { echo "error: no python3 on PATH; install Python 3.9 or newer" >&2; exit 2; }
  echo ">> setting up $venv (first run only; takes a few minutes)" >&2
  [ -x "$venv/bin/python" ] || "$active" -m venv "$venv"
  local pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
  if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      "${pip[@]}" torch
    else
      "${pip[@]}" "torch==2.13.0"
    fi
  fi
  "$venv/bin/python" -c "import deepspeed" 2>/dev/null || "${pip[@]}" --no-build-isolation deepspeed
  if [ "$want" = test ]; then "${pip[@]}" -e "$ROOT[test]"; else "${pip[@]}" -e "$ROOT"; fi
  _deps_ok "$venv/bin/python" "$want" || { echo "error: dependencies still not importable in $venv; see pip output above" >&2; exit 2; }
  _stamp > "$venv/.stamp-$want"
  [ "$want" = test ] && _stamp > "$venv/.stamp-"
  PY="$venv/bin/python"
}
