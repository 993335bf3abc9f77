"""Collect a finished run's figures into docs/results.json, the data behind docs/results.md's table.

    python scripts/results.py RUN_DIR --label cpu --command "make run"

One entry per label (rerunning replaces it): the command that produced the run, its profile and recipe, the
training and sampling time, and the report's figures. It reads the run folder only; it times nothing itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

from ddpm.config import config_from_dict  # reads the keys of older runs too (RENAMED_KEYS)


def collect(run: Path, command: str) -> dict:
    config = json.loads((run / "config.json").read_text())
    evaluation = json.loads((run / "evaluation.json").read_text())
    history = json.loads((run / "unet" / "history.json").read_text())
    sampling = json.loads((run / "samples" / "sampling.json").read_text())
    gen, test = evaluation["label_histogram"]["generated"], evaluation["label_histogram"]["test"]
    return {
        "command": command,
        "run": str(run),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "profile": config["profile"],
        "recipe": {"epochs": history[-1]["epoch"], "steps": history[-1]["step"],
                   "batch_size": config["train"]["batch_size"],
                   "workers": config_from_dict(config).cluster.workers_text,
                   "conditional": config["unet"]["num_classes"] > 0},
        "training_seconds": sum(h["seconds"] for h in history),
        # Sample quality per epoch (ddpm.pipeline.epoch_fld) and the epoch that became the model.
        "epoch_fld": {h["epoch"]: h["fld"] for h in history if "fld" in h},
        "model": evaluation.get("model"),
        "sampling": sampling,
        "fld": evaluation["fld"],
        "fld_ratio_to_train": evaluation["fld_ratio_to_train"]["generated_vs_test"],
        "nearest_class_mean_distance": evaluation["nearest_class_mean_distance"],
        "predicted_class_mean_distance": evaluation["predicted_class_mean_distance"],
        "nearest_mean_label_accuracy": evaluation["nearest_mean_label_accuracy"],
        "label_imbalance_tv": evaluation["label_imbalance_tv"],
        "digit_share_max_deviation": evaluation["digit_share_max_deviation"],
        "digit_shares": {"generated": [g / sum(gen) for g in gen], "test": [t / sum(test) for t in test]},
        "memorisation": evaluation["memorisation"],
        "evaluator_id": evaluation["lenet"]["evaluator_id"],
        "compare": [{k: c[k] for k in ("name", "sampler", "steps", "guidance_scale", "images", "fld",
                                      "fld_ratio_to_train", "main_fld_same_seeds", "digit_share_max_deviation",
                                      "images_per_s")} for c in evaluation.get("compare", [])],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--label", required=True)
    parser.add_argument("--command", required=True, help="the command that produced the run")
    parser.add_argument("--wall", type=float, default=0.0, help="the command's wall-clock seconds, if timed")
    parser.add_argument("--evaluate-seconds", type=float, default=0.0,
                        help="the evaluate stage's seconds (default: evaluation.json's)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "results.json")
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results[args.label] = entry = collect(args.run, args.command)
    if args.wall:
        # Outside the work: start-up, Ray, Prefect, MLflow (and, conservatively, data preparation and LeNet).
        sets = [entry["sampling"], *entry["sampling"].get("compare", [])]
        evaluate = args.evaluate_seconds or json.loads((args.run / "evaluation.json").read_text()).get("seconds", 0)
        work = entry["training_seconds"] + sum(s["seconds"] for s in sets) + evaluate
        entry["wall_seconds"], entry["outside_work_share"] = args.wall, 1 - work / args.wall
        print(f"wall {args.wall / 60:.1f} min; training, sampling and evaluation {work / 60:.1f} min; "
              f"outside them {entry['outside_work_share']:.1%}")
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    s = entry["sampling"]
    steps, minutes = entry["recipe"]["steps"], entry["training_seconds"] / 60
    print(f"| {args.label} | `{args.command}` | {steps:,} steps, {minutes:.1f} min | "
          f"{s['images']:,} {s['sampler']} ({s['steps']} steps), {s['seconds'] / 60:.1f} min | "
          f"{entry['fld']['generated_vs_test']:.2f} | {entry['fld']['train_vs_test']:.2f} | "
          f"{entry['fld_ratio_to_train']:.1f}x | {entry['digit_share_max_deviation']:.0%} |")


if __name__ == "__main__":
    main()
