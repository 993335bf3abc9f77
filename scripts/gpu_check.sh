#!/usr/bin/env bash
# The tiny pipeline on one GPU, in well under 3 minutes: CUDA training with bf16 autocast (in-process and through
# Ray Train with use_gpu/NCCL), sampling on a GPU Ray actor, evaluation, and the benchmark.
# Usage: bash scripts/gpu_check.sh [OUT_DIR]   (needs a CUDA device and the project's venv or an equivalent env)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-/tmp/gpu_check}}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PREFECT_SERVER_ANALYTICS_ENABLED=false RAY_USAGE_STATS_ENABLED=0
mkdir -p "$OUT"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
ddpm() { "$PY" -m flows.cli "$@"; }
RUN="$OUT/run"
rm -rf "$RUN"
start=$(date +%s)
ddpm data --profile smoke --out "$RUN" --quiet
ddpm train-classifier --out "$RUN" --quiet
ddpm train --out "$RUN" --set train.device=cuda --quiet                       # in-process, bf16 autocast
rm -rf "$RUN/unet"
ddpm train --out "$RUN" --workers 1 --set train.use_gpu=true --quiet          # Ray Train, use_gpu (NCCL backend)
ddpm sample --out "$RUN" --workers 2 --quiet                                  # GPU actors (one per GPU)
ddpm evaluate --out "$RUN" --quiet
"$PY" - "$RUN" <<'PY'
import json, sys, torch
from pathlib import Path
run = Path(sys.argv[1])
ev = json.loads((run / "evaluation.json").read_text())
state = torch.load(run / "unet/checkpoints/last.pt", map_location="cpu", weights_only=True)
print(json.dumps({"fld": ev["fld"], "epochs": state["epoch"], "counts": ev["counts"]}, indent=2))
PY
echo "pipeline seconds: $(( $(date +%s) - start ))"
"$PY" bench/bench.py | tail -40
cp bench/results.json "$OUT/bench_results.json" 2>/dev/null || true
echo "gpu_check OK"
