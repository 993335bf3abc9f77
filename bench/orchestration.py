"""What orchestration costs: the same training recipe, for the same steps, run three ways on one machine.

    .venv/bin/python bench/orchestration.py [--steps 300] [--epochs 3] [--repeats 3] [--profile cpu]
                                            [--out bench/orchestration.json] [--tiny]

- `in-process`: `ddpm train --out R` (the library's `fit`, epochs scored between epochs);
- `ray-train`: `flows.distributed.train_with_ray` on one Ray Train worker, outside any flow (epochs scored where
  `cluster.epoch_scoring` puts them);
- `flow`: `ddpm pipeline --out R`, what `make run` runs (one local worker trains in the flow's own process, MLflow
  logs live), with a token sample and evaluation after training.

Each way is a fresh process on a fresh run folder that shares one prepared dataset and LeNet evaluator (the
flow's cache), with epoch scoring on. The figure is the training loop's own images/s from `unet/history.json`
(train images over train seconds, epoch scoring and validation loss excluded, since those are the same work
every way), over every epoch after the first, the first having no score beside it.
The stage's wall time (start to model.pt) is reported beside it where the bench can see it. Runs are interleaved
(in-process, ray-train, flow, in-process, ...) and repeated; medians and ratios to in-process go to JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WAYS = ("in-process", "ray-train", "flow")
_RAY_TRAIN = """
import sys, time
from pathlib import Path
from ddpm.config import load_config
from ddpm.pipeline.run_folder import RunPaths
from flows.distributed import shutdown_ray, train_with_ray
cfg = load_config(sys.argv[1], None, sys.argv[3:])
start = time.perf_counter()
try:
    train_with_ray(cfg, RunPaths(Path(sys.argv[2])), progress=True)
finally:
    shutdown_ray()
print("STAGE_SECONDS", time.perf_counter() - start)
"""


def recipe(args: argparse.Namespace, runs: Path) -> list[str]:
    """The profile's recipe cut to `steps` optimizer steps per epoch; a token sample and evaluation for the flow."""
    sets = [f"train.epochs={args.epochs}", f"train.max_train_images={args.steps * args.batch}",
            f"train.batch_size={args.batch}", f"runs_dir={runs}", "sample.num_samples=250", "sample.compare=",
            "eval.max_reference_images=1000", "tracking.register_models=false"]
    if args.tiny:
        sets += ["train.max_val_images=64"]
    return sets + args.overrides


def _run(command: list[str], log: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command[:4])}... failed with exit {done.returncode}; see {log}")
    return time.perf_counter() - start


def _stage_seconds(log: Path) -> float | None:
    for line in log.read_text().splitlines():
        if line.startswith("STAGE_SECONDS"):
            return float(line.split()[1])
    return None


def training_speed(run_dir: Path) -> dict[str, float]:
    """Images/s of the training loop itself over the epochs after the first (all epochs if there is one)."""
    history = json.loads((run_dir / "unet" / "history.json").read_text())
    later = history[1:] or history
    images = [h["images_per_s"] for h in later]
    # Each epoch has the same images, so the loop's speed over them is the harmonic mean of the epochs' speeds.
    return {"images_per_s": len(images) / sum(1 / v for v in images), "epochs": [round(v, 1) for v in images]}


def one(way: str, args: argparse.Namespace, base: Path, runs: Path, env: dict[str, str], index: int) -> dict:
    run_dir = runs / f"{way}-{index}"
    bin_dir = Path(sys.executable).parent
    sets = recipe(args, runs)
    overrides = [x for s in sets for x in ("--set", s)]
    log = base / f"{way}-{index}.log"
    if way == "flow":
        wall = _run([str(bin_dir / "ddpm"), "pipeline", "--profile", args.profile, "--out", str(run_dir),
                     "--mirror", args.mirror, *overrides], log, env)
        stage = None
    else:
        # The run folder gets the shared dataset and evaluator the way the flow's cache hands them out: prepared
        # once (same recipe every way), then copied, its data link with it.
        prepared = runs / ".prepared"
        if not prepared.exists():
            _run([sys.executable, "-c", _PREPARE, args.profile, str(prepared), str(runs / "cache"), args.mirror,
                  *sets], base / "prepare.log", env)
        shutil.copytree(prepared, run_dir, symlinks=True)
        if way == "in-process":
            start = time.perf_counter()
            wall = _run([str(bin_dir / "ddpm"), "train", "--profile", args.profile, "--out", str(run_dir),
                         *overrides], log, env)
            stage = time.perf_counter() - start
        else:
            wall = _run([sys.executable, "-c", _RAY_TRAIN, args.profile, str(run_dir), *sets], log, env)
            stage = _stage_seconds(log)
    speed = training_speed(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"way": way, **speed, "stage_seconds": stage, "process_seconds": wall}


_PREPARE = """
import sys
from pathlib import Path
from ddpm.pipeline import stages
from ddpm.config import load_config
from ddpm.pipeline.run_folder import RunPaths, commit_config
cfg = load_config(sys.argv[1], None, ["data.mirror=" + sys.argv[4], *sys.argv[5:]])
paths, cache = RunPaths(Path(sys.argv[2])), Path(sys.argv[3])
stages.prepare_data(cfg, paths, cache=cache, progress=False)
stages.train_classifier(cfg, paths, cache=cache, progress=False)
commit_config(cfg, paths)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per epoch")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ways", default=",".join(WAYS), help="comma-separated subset of " + ", ".join(WAYS))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="one more config override for every way (repeatable)")
    parser.add_argument("--mirror", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "orchestration.json"))
    parser.add_argument("--tiny", action="store_true", help="smoke profile, few steps, one repeat: proves it runs")
    args = parser.parse_args()
    if args.tiny:
        args.profile, args.steps, args.epochs, args.repeats = "smoke", 4, 2, 1
    ways = [w.strip() for w in args.ways.split(",")]
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)  # a local Ray every time: this measures one machine
    base = Path(tempfile.mkdtemp(prefix="orchestration-"))
    runs = base / "runs"
    results: list[dict] = []
    for repeat in range(args.repeats):
        for way in ways:
            result = one(way, args, base, runs, env, repeat)
            results.append(result)
            print(f"{way:>10}  {result['images_per_s']:7.1f} images/s  epochs {result['epochs']}  "
                  f"stage {result['stage_seconds'] or float('nan'):6.1f} s  process {result['process_seconds']:6.1f} s",
                  flush=True)
    medians = {w: statistics.median(r["images_per_s"] for r in results if r["way"] == w) for w in ways}
    reference = medians.get("in-process")
    summary = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "recipe": {"profile": args.profile, "steps_per_epoch": args.steps, "batch": args.batch,
                   "epochs": args.epochs, "repeats": args.repeats},
        "median_images_per_s": medians,
        "ratio_to_in_process": {w: m / reference for w, m in medians.items()} if reference else {},
        "runs": results,
    }
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    for way, median in medians.items():
        ratio = f"  {median / reference:.2f}x in-process" if reference else ""
        print(f"median {way:>10}: {median:7.1f} images/s{ratio}")
    print(f"wrote {args.out}; logs in {base}")


if __name__ == "__main__":
    main()
