#!/usr/bin/env bash
# Everything normlab needs on a fresh Debian/Ubuntu machine: the Fashion-MNIST package for the lab, the
# CPU build of torch, and normlab itself (editable) with its test dependencies. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  echo "[setup] installing Debian package dataset-fashion-mnist (the lab's default data)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

# torch is installed here rather than through pyproject so that the small CPU build is used; users with
# a GPU install the CUDA build that matches their driver instead (see README).
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0 (CPU build)"
  "$PYTHON" -m pip install -q torch==2.13.0
fi

# triton (Linux only) runs the GPU backend's tests on the CPU, under its interpreter.
MODULES="normlab, pytest, hypothesis, matplotlib, tqdm, numba"
if [ "$(uname -s)" = Linux ]; then MODULES="$MODULES, triton"; fi
if ! "$PYTHON" -c "import $MODULES" 2>/dev/null \
   || [ "$("$PYTHON" -c 'import normlab, pathlib; print(pathlib.Path(normlab.__file__).resolve().parent)')" \
        != "$(pwd -P)/src/normlab" ]; then
  echo "[setup] installing normlab (editable) with its test dependencies"
  "$PYTHON" -m pip install -q -e ".[test]"
fi
