#!/usr/bin/env bash
# Everything that needs a GPU, as one prepared script for a short loan of one (about 8 minutes of an H200):
#   1. the CUDA tests (pytest -m gpu);
#   2. the tiny pipeline on CUDA: bf16 training in-process and through Ray Train (use_gpu, NCCL), GPU sampling
#      actors, evaluation;
#   3. `make bench`'s GPU column (project, eager, diffusers) and bench/variants.py on CUDA (channels_last,
#      torch.compile, bf16);
#   4. a shortened gpu-profile quality run (GPU_EPOCHS epochs, default 4) with its sampler comparison;
# then writes $OUT/gpu_check.json with every figure and the seconds of each part.
# Usage: bash scripts/gpu_check.sh [OUT_DIR]   (needs a CUDA device and the project's venv or an equivalent env)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-/tmp/gpu_check}}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PREFECT_SERVER_ANALYTICS_ENABLED=false RAY_USAGE_STATS_ENABLED=0
mkdir -p "$OUT"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
ddpm() { "$PY" -m flows.cli "$@"; }
declare -A SECONDS_OF
part() { local name=$1; shift; local t=$(date +%s); echo "== $name"; "$@"; SECONDS_OF[$name]=$(( $(date +%s) - t )); }

part tests "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py

tiny() {
    local run="$OUT/tiny"
    rm -rf "$run"
    ddpm data --profile smoke --out "$run" --quiet
    ddpm train-classifier --out "$run" --quiet
    ddpm train --out "$run" --set train.device=cuda --quiet                    # in-process, bf16 autocast
    rm -rf "$run/unet"
    # Ray Train on the GPU: one worker (`ddpm train --workers 1` would train in-process), epoch scoring included.
    "$PY" - "$run" "${RAY_TRAIN_USE_GPU:-true}" <<'PYTHON'
import sys
from pathlib import Path

from ddpm.config import load_config
from ddpm.run_folder import RunPaths, read_config
from flows.distributed import shutdown_ray, train_with_ray

paths = RunPaths(Path(sys.argv[1]))
cfg = load_config(None, None, {"train.use_gpu": sys.argv[2]}, base=read_config(paths))
print("Ray Train epochs:", [(h["epoch"], round(h["fld"], 2)) for h in train_with_ray(cfg, paths, progress=False)])
shutdown_ray()
PYTHON
    ddpm sample --out "$run" --workers 2 --quiet                               # GPU actors (one per GPU)
    ddpm evaluate --out "$run" --quiet > /dev/null
}
part tiny-pipeline tiny
part bench bash -c "'$PY' bench/bench.py --out '$OUT/bench.json' | tail -30"
part variants "$PY" bench/variants.py --device cuda --out "$OUT/variants_cuda.json"

quality() {
    local run="$OUT/gpu-profile"
    rm -rf "$run"
    ddpm data --profile gpu --out "$run" --quiet
    ddpm train-classifier --out "$run" --quiet
    ddpm train --out "$run" --set "train.epochs=${GPU_EPOCHS:-4}" --quiet
    ddpm sample --out "$run" --quiet
    ddpm evaluate --out "$run" --quiet > /dev/null
}
part gpu-profile quality

"$PY" - "$OUT" "${SECONDS_OF[tests]}" "${SECONDS_OF[tiny-pipeline]}" "${SECONDS_OF[bench]}" \
    "${SECONDS_OF[variants]}" "${SECONDS_OF[gpu-profile]}" <<'PY'
import json, sys, torch
from pathlib import Path
out = Path(sys.argv[1])
seconds = dict(zip(["tests", "tiny_pipeline", "bench", "variants", "gpu_profile"], map(int, sys.argv[2:])))
run = out / "gpu-profile"
evaluation = json.loads((run / "evaluation.json").read_text())
history = json.loads((run / "unet" / "history.json").read_text())
report = {
    "device": torch.cuda.get_device_name(), "torch": torch.__version__, "seconds": seconds,
    "gpu_profile": {"epochs": len(history), "steps": history[-1]["step"],
                    "training_seconds": sum(h["seconds"] for h in history),
                    "images_per_s": [h["images_per_s"] for h in history],
                    "sampling": json.loads((run / "samples" / "sampling.json").read_text()),
                    "fld": evaluation["fld"], "fld_ratio_to_train": evaluation["fld_ratio_to_train"],
                    "digit_share_max_deviation": evaluation["digit_share_max_deviation"],
                    "compare": evaluation["compare"], "evaluate_seconds": evaluation.get("seconds")},
    "tiny_pipeline_fld": json.loads((out / "tiny" / "evaluation.json").read_text())["fld"],
    "bench": json.loads((out / "bench.json").read_text()),
    "variants_cuda": json.loads((out / "variants_cuda.json").read_text()),
}
(out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
print(json.dumps({k: report[k] for k in ("device", "seconds")}, indent=2))
print(json.dumps({k: report["gpu_profile"][k] for k in ("epochs", "training_seconds", "fld", "compare")}, indent=1)[:3000])
PY
echo "gpu_check OK: $OUT/gpu_check.json"
