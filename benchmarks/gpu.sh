#!/bin/sh
# The GPU run, prepared: on a machine with one NVIDIA GPU and torch + torchvision preinstalled
# (onnxruntime-gpu and tensorrt are measured where present, recorded as skipped where not).
#   sh benchmarks/gpu.sh                                 # writes benchmarks/results/gpu.json
#   sh benchmarks/gpu.sh --dry-run --out /tmp/gpu.json   # CPU check of the script (what CI runs)
# Nothing is installed (the lent machine reaches no package index): prunekit runs from this
# checkout. Stops after 470 s, inside the 8 minutes a lent machine's call allows.
set -eu
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec timeout 470 python -m benchmarks.gpu "$@"
