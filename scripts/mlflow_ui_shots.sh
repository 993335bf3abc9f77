#!/usr/bin/env bash
# Real-browser check of the MLflow UI: headless Chromium screenshots of the experiment (model-training view),
# the newest cpu-profile run, its train-unet charts and U-Net version 1. Usage: scripts/mlflow_ui_shots.sh RUNS_DIR OUT_DIR (needs chromium).
set -u
RUNS=$1; OUT=$2; PORT=5077
mkdir -p "$OUT"
"$(dirname "$0")/../.venv/bin/mlflow" ui --backend-store-uri "sqlite:///$RUNS/mlflow.db" --host 127.0.0.1 --port $PORT > "$OUT/mlflow-ui.log" 2>&1 &
UI=$!
for i in $(seq 60); do curl -sf http://127.0.0.1:$PORT/health >/dev/null && break; sleep 1; done
# Charts draw late: without the compositor flag and a long virtual-time budget they are still spinners.
shot() { chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size=1600,1100 \
  --run-all-compositor-stages-before-draw --virtual-time-budget=90000 --screenshot="$OUT/$1.png" "$2" > /dev/null 2>&1
  echo "$1: $2"; }
EXP=$(curl -s "http://127.0.0.1:$PORT/api/2.0/mlflow/experiments/get-by-name?experiment_name=mnist-ddpm" | python3 -c 'import json,sys; print(json.load(sys.stdin)["experiment"]["experiment_id"])')
RUN=$(curl -s -X POST -H 'Content-Type: application/json' -d "{\"experiment_ids\":[\"$EXP\"],\"filter\":\"tags.profile = 'cpu'\"}" http://127.0.0.1:$PORT/api/2.0/mlflow/runs/search | python3 -c 'import json,sys; runs=[r for r in json.load(sys.stdin)["runs"] if not any(t["key"]=="stage" for t in r["data"].get("tags",[]))]; print(runs[0]["info"]["run_id"])')
TRAIN=$(curl -s -X POST -H 'Content-Type: application/json' -d "{\"experiment_ids\":[\"$EXP\"],\"filter\":\"tags.stage = 'train-unet' and tags.mlflow.parentRunId = '$RUN'\"}" http://127.0.0.1:$PORT/api/2.0/mlflow/runs/search | python3 -c 'import json,sys; print(json.load(sys.stdin)["runs"][0]["info"]["run_id"])')
shot experiment "http://127.0.0.1:$PORT/#/experiments/$EXP?workflowType=machine_learning"
# The train-unet run's charts: the losses and, beside them, the epoch FLD curve.
shot train-unet-metrics "http://127.0.0.1:$PORT/#/experiments/$EXP/runs/$TRAIN/model-metrics?workflowType=machine_learning"
shot run "http://127.0.0.1:$PORT/#/experiments/$EXP/runs/$RUN?workflowType=machine_learning"
shot run-artifacts "http://127.0.0.1:$PORT/#/experiments/$EXP/runs/$RUN/artifacts?workflowType=machine_learning"
shot model-version "http://127.0.0.1:$PORT/#/models/mnist-ddpm-unet/versions/1"
kill $UI; wait $UI 2>/dev/null
