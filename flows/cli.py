"""`ddpm`: each pipeline stage as a command over a run folder, plus the whole pipeline.

    ddpm data --out R [--mirror DIR]     ddpm train --out R [--workers N]
    ddpm train-classifier --out R        ddpm sample --out R [--workers N]
    ddpm evaluate --out R                ddpm pipeline [--out R]
    ddpm model-summary

Every command takes --profile NAME, --config FILE and --set section.key=value. A stage run on an existing run
folder starts from that run's saved config.json unless --profile is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ddpm.config import Config, ConfigError, config_from_dict, load_config, parse_overrides


def _common(parser: argparse.ArgumentParser, needs_out: bool = True) -> None:
    parser.add_argument("--profile", help="named config: smoke, cpu (default without GPU) or gpu")
    parser.add_argument("--config", dest="config_file", help="TOML or JSON file of config values")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one value, e.g. --set train.epochs=3 (repeatable)")
    if needs_out:
        parser.add_argument("--out", help="run folder (RUN_DIR) that the stages share")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddpm", description="Denoising diffusion on MNIST, stage by stage.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("data", help="verify MNIST and write the Parquet dataset")
    _common(p)
    p.add_argument("--mirror", help="folder with the four gzipped IDX files (overrides data.mirror)")
    _common(sub.add_parser("train-classifier", help="train the LeNet-5 evaluator"))
    p = sub.add_parser("train", help="train the U-Net (Ray Train with --workers N > 1)")
    _common(p)
    p.add_argument("--workers", type=int, help="Ray Train workers (train.num_workers)")
    p = sub.add_parser("sample", help="generate images (Ray actors with --workers N > 1)")
    _common(p)
    p.add_argument("--workers", type=int, help="Ray sampling actors (sample.num_actors)")
    _common(sub.add_parser("evaluate", help="FLD, class-mean distance, label histogram -> evaluation.json"))
    p = sub.add_parser("pipeline", help="the whole pipeline: the Prefect flow, embedded (what `make run` runs)")
    _common(p)
    p.add_argument("--mirror", help="folder with the four gzipped IDX files")
    _common(sub.add_parser("model-summary", help="per-layer parameter table of the U-Net and LeNet-5"),
            needs_out=False)
    return parser


def resolve_config(args: argparse.Namespace, run_dir: Path | None) -> Config:
    overrides = list(args.overrides)
    if getattr(args, "mirror", None):
        overrides.append(f"data.mirror={args.mirror}")
    workers = getattr(args, "workers", None)
    if workers is not None:
        overrides.append(f"{'train.num_workers' if args.command == 'train' else 'sample.num_actors'}={workers}")
    base = None
    if run_dir is not None and (run_dir / "config.json").exists():
        base = config_from_dict(json.loads((run_dir / "config.json").read_text()))
    return load_config(args.profile, args.config_file, overrides, base=base)


def cmd_model_summary(cfg: Config) -> None:
    from ddpm.models import LeNet5, build_unet, summary_table

    print(summary_table(build_unet(cfg.unet, cfg.diffusion.timesteps), "U-Net"))
    print()
    print(summary_table(LeNet5(), "LeNet-5"))


def run_stage(command: str, cfg: Config, run_dir: Path, progress: bool) -> object:
    from ddpm import stages

    paths = stages.RunPaths(run_dir)
    stages.save_config(cfg, paths)
    if command == "data":
        manifest = stages.prepare_data(cfg, paths, progress=progress)
        return {k: manifest[k] for k in ("counts",) if k in manifest}
    if command == "train-classifier":
        return stages.train_classifier(cfg, paths, progress=progress)
    if command == "train":
        if cfg.train.num_workers > 1:
            from flows.distributed import train_with_ray

            return train_with_ray(cfg, paths, progress=progress)[-1]
        return stages.train_unet(cfg, paths, progress=progress)[-1]
    if command == "sample":
        if cfg.sample.num_actors > 1:
            from flows.distributed import sample_with_ray

            return str(sample_with_ray(cfg, paths, progress=progress))
        return str(stages.sample(cfg, paths, progress=progress))
    if command == "evaluate":
        result = stages.evaluate(cfg, paths, progress=progress)
        return {"fld": result["fld"], "label_imbalance_tv": result["label_imbalance_tv"]}
    raise ValueError(command)


def cmd_pipeline(args: argparse.Namespace) -> None:
    """The Prefect flow, embedded: no servers needed (ephemeral Prefect, local Ray, SQLite MLflow)."""
    from flows.pipeline import mnist_ddpm

    overrides = parse_overrides(args.overrides)
    if args.mirror:
        overrides["data.mirror"] = args.mirror
    load_config(args.profile, args.config_file, overrides)  # fail on a bad config before anything starts
    out = Path(args.out) if args.out else None
    mnist_ddpm(profile=args.profile, overrides=overrides, config_file=args.config_file,
               run_name=out.name if out else None, runs_dir=str(out.parent) if out else None)


def _known_errors() -> tuple[type[BaseException], ...]:
    from ddpm.classifier import AccuracyTooLowError
    from ddpm.data import DataError
    from ddpm.training import CheckpointError, NonFiniteLossError

    return (ConfigError, DataError, CheckpointError, NonFiniteLossError, AccuracyTooLowError,
            FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "model-summary":
            cmd_model_summary(resolve_config(args, None))
        elif args.command == "pipeline":
            cmd_pipeline(args)
        else:
            if not args.out:
                raise ConfigError(f"`ddpm {args.command}` needs --out RUN_DIR (the run folder the stages share)")
            cfg = resolve_config(args, Path(args.out))
            result = run_stage(args.command, cfg, Path(args.out), not args.quiet)
            print(json.dumps(result, indent=2, default=str))
    except _known_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if "ray" in sys.modules:  # a stage used Ray: stop the local one cleanly, leaving no stray workers
            from flows.distributed import shutdown_ray

            shutdown_ray()
    return 0


if __name__ == "__main__":
    sys.exit(main())
