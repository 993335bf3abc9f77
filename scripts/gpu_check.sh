#!/usr/bin/env bash
# Everything that needs a GPU, as one prepared script for a short loan of one (about 8 minutes of an H200):
#   1. the CUDA tests (pytest -m gpu);
#   2. bench/fast_path.py on CUDA: the trainer and the sampling loop under each fast-path switch (resident data,
#      deferred finiteness checks, fused AdamW, bf16, torch.compile with CUDA graphs; philox noise), the figures
#      that should set the gpu profile's defaults;
#   3. a shortened gpu-profile quality run (GPU_EPOCHS epochs, default 4) with its sampler comparison;
#   4. the tiny pipeline on CUDA: bf16 training in-process and through Ray Train (use_gpu, NCCL), GPU sampling
#      actors, evaluation;
#   5. `make bench`'s GPU column (project, eager, diffusers) and bench/variants.py on CUDA;
#   6. `ddpm serve` with its replica on the GPU (bench/serve.py: latency and images/s from 1 and 16 clients);
# then writes $OUT/gpu_check.json with every figure and the seconds and exit status of each part. A failing
# part does not stop the others (a loan is short): the JSON says which failed, and the script exits non-zero.
# Usage: bash scripts/gpu_check.sh [OUT_DIR]   (needs a CUDA device and the project's venv or an equivalent env)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-/tmp/gpu_check}}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PREFECT_SERVER_ANALYTICS_ENABLED=false RAY_USAGE_STATS_ENABLED=0
mkdir -p "$OUT"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
ddpm() { "$PY" -m flows.cli "$@"; }
declare -A SECONDS_OF STATUS_OF
part() {
    local name=$1; shift; local t=$(date +%s); echo "== $name"
    ( set -e; "$@" ); STATUS_OF[$name]=$?
    SECONDS_OF[$name]=$(( $(date +%s) - t )); echo "== $name: exit ${STATUS_OF[$name]}, ${SECONDS_OF[$name]} s"
}

part tests "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
part fast-path "$PY" bench/fast_path.py --device cuda --out "$OUT/fast_path.json"

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
from ddpm.pipeline.run_folder import RunPaths, read_config
from flows.distributed import shutdown_ray, train_with_ray

paths = RunPaths(Path(sys.argv[1]))
cfg = load_config(None, None, {"cluster.use_gpu": sys.argv[2]}, base=read_config(paths))
print("Ray Train epochs:", [(h["epoch"], round(h["fld"], 2)) for h in train_with_ray(cfg, paths, progress=False)])
shutdown_ray()
PYTHON
    ddpm sample --out "$run" --workers 2 --quiet                               # GPU actors (one per GPU)
    ddpm evaluate --out "$run" --quiet > /dev/null
}
part tiny-pipeline tiny
part bench bash -c "'$PY' bench/bench.py --out '$OUT/bench.json' | tail -30"
part variants "$PY" bench/variants.py --device cuda --out "$OUT/variants_cuda.json"
part serve "$PY" bench/serve.py --profile cpu --requests 100 --out "$OUT/serve.json"

PARTS=$(for k in "${!STATUS_OF[@]}"; do echo "$k=${STATUS_OF[$k]}:${SECONDS_OF[$k]}"; done)
"$PY" - "$OUT" $PARTS <<'PY'
import json, sys, torch
from pathlib import Path
out = Path(sys.argv[1])
parts = {k: {"exit": int(v.split(":")[0]), "seconds": int(v.split(":")[1])}
         for k, v in (a.split("=", 1) for a in sys.argv[2:])}

def read(path):
    path = out / path
    return json.loads(path.read_text()) if path.exists() else None

report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "parts": parts,
          "fast_path": read("fast_path.json"), "bench": read("bench.json"), "variants_cuda": read("variants_cuda.json"),
          "serve": read("serve.json"),
          "tiny_pipeline_fld": (read("tiny/evaluation.json") or {}).get("fld")}
evaluation, history = read("gpu-profile/evaluation.json"), read("gpu-profile/unet/history.json")
if evaluation and history:
    report["gpu_profile"] = {
        "epochs": len(history), "steps": history[-1]["step"],
        "training_seconds": sum(h["seconds"] for h in history), "images_per_s": [h["images_per_s"] for h in history],
        "epoch_fld": [h.get("fld") for h in history], "sampling": read("gpu-profile/samples/sampling.json"),
        "fld": evaluation["fld"], "fld_ratio_to_train": evaluation["fld_ratio_to_train"],
        "digit_share_max_deviation": evaluation["digit_share_max_deviation"], "compare": evaluation["compare"],
        "evaluate_seconds": evaluation.get("seconds")}
(out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
print(json.dumps({k: report[k] for k in ("device", "parts")}, indent=2))
if "gpu_profile" in report:
    print(json.dumps({k: report["gpu_profile"][k] for k in ("epochs", "training_seconds", "fld")}, indent=1))
failed = [k for k, v in parts.items() if v["exit"]]
sys.exit(f"gpu_check: failed parts: {failed}" if failed else 0)
PY
status=$?
echo "gpu_check $( [ $status = 0 ] && echo OK || echo FAILED ): $OUT/gpu_check.json"
exit $status
