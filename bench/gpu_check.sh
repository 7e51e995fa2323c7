#!/usr/bin/env bash
# The GPU checks, in one go (about 8 minutes on one GPU): the CUDA tests, then the throughput benchmark
# at the 80-device config's round, then 20 rounds of configs/fleet80.toml timed on the GPU.
#
#   bash bench/gpu_check.sh            # from the repository root, after `make setup`
#
# Every line it prints comes from the tests and scripts themselves; the last lines are their RESULTs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
export RAY_USAGE_STATS_ENABLED=0
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')"
timeout 240 "$PY" -m pytest -q tests/test_device.py tests/test_batched.py -m "not slow"
timeout 150 "$PY" bench/throughput.py --device cuda --repeats 3
out=$(mktemp -d)
start=$(date +%s)
timeout 120 .venv/bin/fedspine run --config configs/fleet80.toml --out "$out/fleet80" \
    --set run.device=cuda --set export.speed=false --set export.save=false > "$out/fleet80.log" 2>&1 \
    && status=finished || status="stopped at the 120 s limit"
echo "RESULT fleet80_rounds=20 fleet80_wall_seconds=$(( $(date +%s) - start )) fleet80=\"$status\""
