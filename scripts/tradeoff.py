"""Minutes against quality: the cpu profile's training levers, one pipeline run per point, and the curve.

    python scripts/tradeoff.py [--runs RUNS] [--profile cpu] run NAME [KEY=VALUE ...]   # one point
    python scripts/tradeoff.py [--runs RUNS] add NAME RUN_DIR   # a finished run of RUNS, as a point
    python scripts/tradeoff.py [--runs RUNS] plot [--png docs/tradeoff_cpu.png]

A point is the cpu profile with its overrides, compare sets off and nothing registered, so that what differs
between points is training. Run them one at a time on a quiet machine: the minutes are the measurement. Each
point's stage times come from its MLflow runs (the flow logs every stage as a child run), its scores from its
evaluation.json; `plot` draws FLD and recall against the training stage's minutes and prints the table for
docs/results.md ("Minutes against quality").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from ddpm.config import Config, config_from_dict  # reads the keys of older runs too (RENAMED_KEYS)
from flows.tracking import tracking_uri

ROOT = Path(__file__).resolve().parent.parent


def run_point(runs: Path, name: str, sets: list[str], profile: str) -> dict:
    # --out makes RUNS the runs folder too: the points share its cache (data, LeNet) and MLflow store.
    command = [str(Path(sys.executable).with_name("ddpm")), "pipeline", "--quiet", "--profile", profile,
               "--out", str(runs / name), "--set", "sample.compare=", "--set", "tracking.register_models=false"]
    for kv in sets:
        command += ["--set", kv]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return {"name": name, "sets": sets, "run_dir": str(runs / name), "wall_s": time.perf_counter() - start}


def stage_seconds(run_dir: Path, cfg: Config) -> dict[str, float]:
    """Each stage's seconds, and the flow's ("pipeline"), from the run's MLflow runs: in the store that
    `ddpm pipeline --out RUN_DIR` logs to (its runs folder is RUN_DIR's parent)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(cfg.tracking.mlflow_uri, run_dir.parent))
    experiment = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    parent = client.search_runs([experiment], f"attributes.run_name = '{run_dir.name}'",
                                order_by=["attributes.start_time DESC"])[0]
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    seconds = {run.data.tags["stage"]: (run.info.end_time - run.info.start_time) / 1000 for run in children}
    return {**seconds, "pipeline": (parent.info.end_time - parent.info.start_time) / 1000}


def describe(point: dict) -> dict:
    run_dir = Path(point["run_dir"])
    cfg = config_from_dict(json.loads((run_dir / "config.json").read_text()))
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    return {**point, **evaluation["prdc"]["generated_vs_test"], "seconds": stage_seconds(run_dir, cfg),
            "epochs": cfg.train.epochs, "batch": cfg.train.batch_size, "lr": cfg.train.lr,
            "fld": evaluation["fld"]["generated_vs_test"], "digit_deviation": evaluation["digit_share_max_deviation"]}


def plot(points: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    recipe = max(points, key=lambda p: p["seconds"]["train-unet"])  # the longest: the recipe the levers cut
    bounds = {"fld": (1.0, "FLD 1.0"), "recall": (recipe["recall"], f"recall of {recipe['name']}")}
    lines = sorted({(p["batch"], p["lr"]) for p in points})  # a line joins the points of one batch and lr
    for ax, score in zip(axes, ("fld", "recall"), strict=True):
        for batch, lr in lines:
            mine = sorted((p for p in points if (p["batch"], p["lr"]) == (batch, lr)),
                          key=lambda p: p["seconds"]["train-unet"])
            ax.plot([p["seconds"]["train-unet"] / 60 for p in mine], [p[score] for p in mine],
                    "o-" if batch == 32 else "s-", label=f"batch {batch}, lr {lr:g}")
            for p in mine:
                ax.annotate(f"{p['epochs']} epochs", (p["seconds"]["train-unet"] / 60, p[score]),
                            textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.axhline(bounds[score][0], color="grey", linestyle="--", linewidth=1, label=bounds[score][1])
        ax.set_xlabel("training stage, minutes")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("FLD vs test, 10,000 images (lower is better)")
    axes[1].set_ylabel("recall (k = 5)")
    fig.suptitle("The cpu profile's training levers on a 2-core machine: minutes against quality")
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def minutes(seconds: float) -> str:
    return "{} min {:02d} s".format(*divmod(round(seconds), 60))


def table(points: list[dict]) -> str:
    rows = ["| point | epochs | batch | lr | training | sampling | pipeline | FLD | precision | recall "
            "| worst digit share |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for p in sorted(points, key=lambda p: p["seconds"]["train-unet"]):
        rows.append(f"| {p['name']} | {p['epochs']} | {p['batch']} | {p['lr']:g} | "
                    f"{minutes(p['seconds']['train-unet'])} | {minutes(p['seconds']['sample'])} | "
                    f"{minutes(p['seconds']['pipeline'])} | "
                    f"{p['fld']:.3f} | {p['precision']:.3f} | {p['recall']:.4f} | {p['digit_deviation']:.1%} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "tradeoff", help="the points' runs folder")
    parser.add_argument("--profile", default="cpu", help="the config `run` overrides (smoke: to try the script)")
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run", help="run one point")
    one.add_argument("name")
    one.add_argument("sets", nargs="*", metavar="KEY=VALUE")
    add = sub.add_parser("add", help="count a finished run of the same runs folder as a point")
    add.add_argument("name")
    add.add_argument("run_dir", type=Path)
    drawn = sub.add_parser("plot", help="the figure and the table")
    drawn.add_argument("--png", type=Path, default=ROOT / "docs" / "tradeoff_cpu.png")
    args = parser.parse_args()
    runs = args.runs.resolve()
    runs.mkdir(parents=True, exist_ok=True)
    ledger = runs / "tradeoff.jsonl"
    if args.command in ("run", "add"):
        point = (run_point(runs, args.name, args.sets, args.profile) if args.command == "run" else
                 {"name": args.name, "sets": [], "run_dir": str(args.run_dir.resolve()), "wall_s": None})
        with ledger.open("a") as out:
            out.write(json.dumps(point) + "\n")
        return
    points = [describe(json.loads(line)) for line in ledger.read_text().splitlines() if line.strip()]
    plot(points, args.png)
    print(table(points))
    print(f"figure: {args.png}")


if __name__ == "__main__":
    main()
