#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and a CUDA build of torch (with triton): check the Triton backend there
# and time it, in one command. Nothing is installed: normlab runs from this checkout (PYTHONPATH=src).
#
#   bash scripts/gpu.sh [OUTDIR] [-- BENCH OPTIONS...]
#
# Writes into OUTDIR (default gpu-results/):
#   env.txt     the GPU, torch, triton and Python versions
#   tests.txt   pytest of TestOnCuda (tests/kernels/triton/test_backend.py): every layer the backend runs,
#               in float32, float64, float16 and bfloat16, both layouts, train and eval, against torch.nn in
#               float64 (the interpreter tests are CI's, on the CPU)
#   bench.json  `normlab bench --device cuda --json` (default options: --no-compile; pass others after --)
#   bench.txt   the same records as a table
# Exits 2 where torch sees no CUDA device, 1 if the tests or the benchmark failed, else 0.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUTDIR=gpu-results
if [ $# -gt 0 ] && [ "$1" != "--" ]; then OUTDIR=$1; shift; fi
if [ $# -gt 0 ] && [ "$1" = "--" ]; then shift; fi
BENCH_ARGS=("$@")
if [ ${#BENCH_ARGS[@]} -eq 0 ]; then BENCH_ARGS=(--no-compile); fi
export PYTHONPATH="$(pwd -P)/src${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "scripts/gpu.sh: $PYTHON's torch sees no CUDA device here; run this on a machine with an NVIDIA GPU" \
       "and a CUDA build of torch (CPU-only machines run the test suite with scripts/test.sh)." >&2
  exit 2
fi
mkdir -p "$OUTDIR"
status=0

"$PYTHON" - > "$OUTDIR/env.txt" <<'EOF'
import platform, torch
props = torch.cuda.get_device_properties(0)
print(f"gpu: {props.name}, {props.multi_processor_count} multiprocessors, {props.total_memory / 2**30:.0f} GiB")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), python {platform.python_version()}")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError:
    print("triton: not installed (CUDA tensors then run the torch engine)")
EOF
cat "$OUTDIR/env.txt"

echo "[gpu] tests: TestOnCuda"
"$PYTHON" -m pytest -q -p no:cacheprovider tests/kernels/triton/test_backend.py -k TestOnCuda 2>&1 \
  | tee "$OUTDIR/tests.txt" || status=1

echo "[gpu] normlab bench --device cuda ${BENCH_ARGS[*]}"
"$PYTHON" -m normlab.cli bench --device cuda --json "${BENCH_ARGS[@]}" > "$OUTDIR/bench.json.part" || status=1
if [ -s "$OUTDIR/bench.json.part" ]; then
  mv "$OUTDIR/bench.json.part" "$OUTDIR/bench.json"
  "$PYTHON" -m normlab.cli bench --render "$OUTDIR/bench.json" > "$OUTDIR/bench.txt" || status=1
  cat "$OUTDIR/bench.txt"
else
  echo "[gpu] the benchmark printed no records (see its messages above)" >&2
fi
exit $status
