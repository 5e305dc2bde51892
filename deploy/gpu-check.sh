#!/usr/bin/env bash
# Run this on a new GPU host, inside the arcdiff image (or a checkout with arcdiff installed):
#   docker compose run --rm --entrypoint bash worker /opt/arcdiff/deploy/gpu-check.sh
#   bash deploy/gpu-check.sh                          # from a checkout with arcdiff installed
# It installs nothing and downloads nothing. It runs the engine benchmark for the cifar10 UNet
# (random weights) at batch 1, 8 and 64, eager float32 and torch.compile + bf16, and prints a
# table; it is written to finish in under 5 minutes (runs that would start after the budget are
# listed as skipped). Settings, all optional:
#   DEVICE=cuda:0  CONFIG=cifar10  STEPS=20  BATCHES="1 8 64"  VARIANTS=eager-fp32,compile-bf16
#   BUDGET_S=270  OUT=gpu-check.json  PYTHON=python3
set -euo pipefail

DEVICE=${DEVICE:-cuda}
CONFIG=${CONFIG:-cifar10}
STEPS=${STEPS:-20}
BATCHES=${BATCHES:-1 8 64}
VARIANTS=${VARIANTS:-eager-fp32,compile-bf16}
BUDGET_S=${BUDGET_S:-270}
OUT=${OUT:-gpu-check-$(date +%Y%m%d-%H%M%S).json}
PYTHON=${PYTHON:-python3}
if ! command -v "$PYTHON" >/dev/null && [ -x "$(dirname "$0")/../.venv/bin/python" ]; then
  PYTHON="$(dirname "$0")/../.venv/bin/python"
fi

echo "== host"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
else
  echo "nvidia-smi not found (fine inside a container without it; torch reports the card below)"
fi
"$PYTHON" - <<'PY'
import torch
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, CUDA available: {torch.cuda.is_available()}")
for i in range(torch.cuda.device_count()):
    print(f"  cuda:{i} {torch.cuda.get_device_name(i)}")
PY

echo "== engine benchmark: $CONFIG, ddim $STEPS steps, batches $BATCHES, on $DEVICE"
# shellcheck disable=SC2086  # BATCHES is a list on purpose
exec "$PYTHON" -m arcdiff.cli bench gpu-check --config "$CONFIG" --steps "$STEPS" --batches $BATCHES \
  --variants "$VARIANTS" --device "$DEVICE" --budget-s "$BUDGET_S" --json "$OUT"
