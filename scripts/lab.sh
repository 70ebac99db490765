#!/usr/bin/env bash
# Set up (if needed) and run normlab's main job: the lab's quick suite on Fashion-MNIST.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec normlab lab run --suite quick --out "${NORMLAB_OUT:-lab-report}" "$@"
