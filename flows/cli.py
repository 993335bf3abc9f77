"""`ddpm`: each pipeline stage as a command over a run folder, plus the whole pipeline.

    ddpm data --out R [--mirror DIR]     ddpm train --out R [--workers N|MIN-MAX]
    ddpm train-classifier --out R        ddpm sample --out R [--workers N]
    ddpm evaluate --out R                ddpm pipeline [--out R] [--from-champion [--more-epochs N]]
    ddpm model-summary                   ddpm serve [--port 8000] [--mlflow URI] [--token T]
    ddpm sweep --out R --guidance 0,1,2  ddpm sweep --out R --steps 4,8,25 [--samplers ddim,dpm++2m]

Every command takes --profile NAME, --config FILE and --set section.key=value. A stage run on an existing run
folder starts from that run's saved config.json unless --profile is given.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from ddpm.config import Config, ConfigError, flag_names, load_config, parse_overrides
from ddpm.errors import UserError
from ddpm.schema import worker_range


def _common(parser: argparse.ArgumentParser, needs_out: bool = True) -> None:
    parser.add_argument("--profile", help="named config: smoke, cpu (default without GPU) or gpu")
    parser.add_argument("--config", dest="config_file", help="TOML or JSON file of config values")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one value, e.g. --set train.epochs=3 (repeatable)")
    if needs_out:
        parser.add_argument("--out", help="run folder (RUN_DIR) that the stages share")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


class OneLineParser(argparse.ArgumentParser):
    """argparse, whose refusals (a flag's value of the wrong type, a missing argument) are one line, exit 2,
    like every other refusal, instead of a usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def _number_list(kind: type) -> Callable[[str], list]:
    """A comma-separated list of numbers, as an argparse type: refused in one line when one is not a number."""

    def parse(text: str) -> list:
        try:
            values = [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a list of numbers like 1,2,3") from None
        if not values:
            raise argparse.ArgumentTypeError("give at least one number")
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="ddpm", description="Denoising diffusion on MNIST, stage by stage.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("data", help="verify MNIST and write the Parquet dataset")
    _common(p)
    p.add_argument("--mirror", help="folder with the four gzipped IDX files (overrides data.mirror)")
    _common(sub.add_parser("train-classifier", help="train the LeNet-5 evaluator"))
    p = sub.add_parser("train", help="train the U-Net (Ray Train with --workers N > 1)")
    _common(p)
    p.add_argument("--workers", help="Ray Train workers (cluster.workers): N, or MIN-MAX to train elastically")
    p.add_argument("--verbose", action="store_true", help="show Ray Train's own INFO lines too")
    p = sub.add_parser("sample", help="generate images (Ray actors with --workers N > 1)")
    _common(p)
    p.add_argument("--workers", type=int, help="Ray sampling actors (cluster.sample_actors)")
    p.add_argument("--digit", type=int, help="conditional models: write R/digit_<D>.png, a grid of digit D only")
    p.add_argument("--count", type=int, default=64, help="images in the --digit grid (default 64)")
    _common(sub.add_parser("evaluate", help="FLD, class-mean distances, label histogram -> evaluation.json"))
    p = sub.add_parser("sweep", help="quality against guidance or sampler steps -> R/sweep_<kind>.json and .png")
    _common(p)
    axis = p.add_mutually_exclusive_group(required=True)
    axis.add_argument("--guidance", type=_number_list(float), metavar="W,W,...",
                      help="guidance scales, e.g. 0,1,1.5,2,3 (a digit-conditional model), the main set's sampler")
    axis.add_argument("--steps", type=_number_list(int), metavar="N,N,...",
                      help="sampler step counts, e.g. 4,6,8,10,15,25, for each of --samplers")
    p.add_argument("--samplers", default="dpm++2m,dpm++2m-sde,ddim",
                   help="with --steps: samplers to compare (default dpm++2m,dpm++2m-sde,ddim)")
    p.add_argument("--samples", type=_within(int, 6, 100_000), default=2_000,
                   help="images a point, the main set's first seeds (default 2,000)")
    p = sub.add_parser("pipeline", help="the whole pipeline: the Prefect flow, embedded (what `make run` runs)")
    _common(p)
    p.add_argument("--mirror", help="folder with the four gzipped IDX files")
    p.add_argument("--guidance", type=float, help="train a digit-conditional U-Net and sample with this guidance")
    p.add_argument("--from-champion", action="store_true",
                   help="continue the registry's champion (training state and config) for --more-epochs epochs; "
                        "with no champion yet, train the profile from scratch")
    p.add_argument("--more-epochs", type=int, default=2, help="epochs past the champion's (default 2)")
    p.add_argument("--verbose", action="store_true", help="show Ray Train's own INFO lines too")
    _common(sub.add_parser("model-summary", help="per-layer parameter table of the U-Net and LeNet-5"),
            needs_out=False)
    p = sub.add_parser("serve", help="serve the registry's champion U-Net over HTTP on Ray Serve")
    p.add_argument("--host", default="127.0.0.1", help="address the HTTP proxy binds (default 127.0.0.1)")
    p.add_argument("--port", type=_within(int, 1, 65535), default=8000, help="HTTP port (default 8000)")
    p.add_argument("--mlflow", help="tracking URI of the registry (default $MLFLOW_TRACKING_URI, else the "
                                    "SQLite store under the runs folder)")
    p.add_argument("--runs-dir", help="runs folder of the default SQLite store (default $MNIST_DDPM_RUNS_DIR or runs)")
    p.add_argument("--poll-s", type=_within(float, 0.1, 3600), default=5.0,
                   help="seconds between checks of the champion alias (default 5)")
    p.add_argument("--max-images", type=_within(int, 1, 1024), default=64, help="most images a request may ask")
    p.add_argument("--max-steps", type=_within(int, 1, 10_000), default=100,
                   help="most network evaluations per image a request may ask (default 100)")
    p.add_argument("--replicas", type=_within(int, 1, 64), default=1, help="Serve replicas (default 1)")
    p.add_argument("--replica-cpus", type=_within(float, 0, 64), default=0.0,
                   help="Ray CPUs each replica holds (default 0: none, so training beside it is not starved)")
    p.add_argument("--max-queued", type=_within(int, 1, 512), default=32,
                   help="/generate requests a replica holds waiting; past it, 503 with Retry-After (default 32)")
    p.add_argument("--timeout-s", type=_within(float, 1, 3600), default=60.0,
                   help="seconds from a request's arrival to its answer; past it, 503 with Retry-After (default 60)")
    p.add_argument("--token", help="bearer token /generate and /version then need (default $DDPM_SERVE_TOKEN; "
                                   "the variable keeps it out of the process list)")
    return parser


def _within(kind: type, low: float, high: float):
    """An argparse type: a `kind` number in [low, high], else argparse's one-line refusal."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'a whole number' if kind is int else 'a number'}") from None
        if not low <= value <= high:  # NaN fails this too
            raise argparse.ArgumentTypeError(f"{text} must be in [{low:g}, {high:g}]")
        return value

    return parse


def resolve_config(args: argparse.Namespace, run_dir: Path | None) -> Config:
    """Defaults <- profile <- config file <- --set, on top of the run folder's saved config if it has one.

    For stages that use a trained U-Net, the architecture and diffusion schedule come from its checkpoint; an
    explicit --set or config-file value that contradicts them is refused.
    """
    from ddpm.config import read_config_file, with_trained
    from ddpm.pipeline.run_folder import RunPaths, read_config
    from ddpm.pipeline.training import trained_config

    overrides = parse_overrides(args.overrides)
    if getattr(args, "mirror", None):
        overrides["data.mirror"] = args.mirror
    workers, flags = getattr(args, "workers", None), {}
    if workers is not None:
        key = "cluster.workers" if args.command == "train" else "cluster.sample_actors"
        overrides[key], flags[key] = workers, "--workers"
    paths = RunPaths(run_dir) if run_dir is not None else None
    base = read_config(paths) if paths is not None else None
    with flag_names(flags):
        cfg = load_config(args.profile, args.config_file, overrides, base=base)
    if paths is not None and args.command in ("train", "sample"):
        trained = trained_config(paths)
        if trained is not None:
            explicit = set(overrides) | set(read_config_file(args.config_file) if args.config_file else ())
            cfg = with_trained(cfg, trained[0], explicit, trained[1])
    return cfg


def cmd_model_summary(cfg: Config) -> None:
    from ddpm.models import LeNet5, build_unet, summary_table

    print(summary_table(build_unet(cfg.unet, cfg.diffusion.timesteps), "U-Net"))
    print()
    print(summary_table(LeNet5(), "LeNet-5"))


def run_stage(command: str, cfg: Config, run_dir: Path, progress: bool,
              args_digit: tuple[int, int] | None = None, verbose: bool = False) -> object:
    """Run one stage; only when it succeeds is the config it ran with recorded in the run folder."""
    from ddpm.pipeline import stages
    from ddpm.pipeline.run_folder import commit_config

    paths = stages.RunPaths(run_dir)
    if command == "data":
        result: object = {"counts": stages.prepare_data(cfg, paths, progress=progress)["counts"]}
    elif command == "train-classifier":
        result = stages.train_classifier(cfg, paths, progress=progress)
    elif command == "train" and worker_range(cfg.cluster)[1] > 1:
        from flows.distributed import train_with_ray

        result = train_with_ray(cfg, paths, progress=progress, verbose=verbose)[-1]
    elif command == "train":
        result = stages.train_unet(cfg, paths, progress=progress)[-1]
    elif command == "sample" and args_digit is not None:
        result = str(stages.sample_digit(cfg, paths, args_digit[0], args_digit[1]))
    elif command == "sample" and cfg.cluster.sample_actors > 1:
        from flows.distributed import sample_with_ray

        result = str(sample_with_ray(cfg, paths, progress=progress))
    elif command == "sample":
        result = str(stages.sample(cfg, paths, progress=progress))
    elif command == "evaluate":
        evaluation = stages.evaluate(cfg, paths, progress=progress)
        result = {"fld": evaluation["fld"], "label_imbalance_tv": evaluation["label_imbalance_tv"]}
    else:
        raise ValueError(command)
    commit_config(cfg, paths)
    return result


def cmd_sweep(args: argparse.Namespace) -> None:
    """`ddpm sweep`: one curve over a finished run's model; the run's own config and files stay as they were."""
    from ddpm.pipeline.run_folder import RunPaths
    from ddpm.pipeline.sweep import guidance_specs, scores_table, steps_specs, sweep

    if not args.out or not (Path(args.out) / "unet" / "model.pt").is_file():
        raise ConfigError(f"`ddpm sweep` needs --out RUN_DIR of a trained run (unet/model.pt; got {args.out!r}): "
                          "run `ddpm pipeline --out RUN_DIR` or `ddpm train` first")
    cfg = resolve_config(args, Path(args.out))
    if args.guidance is not None:
        kind, specs = "guidance", guidance_specs(cfg, args.guidance)
    else:
        kind, specs = "steps", steps_specs([s.strip() for s in args.samplers.split(",") if s.strip()], args.steps)
    result = sweep(cfg, RunPaths(Path(args.out)), kind, specs, args.samples, progress=not args.quiet)
    print(scores_table(result))
    print(f"wrote {Path(args.out) / f'sweep_{kind}.json'} and .png")


def cmd_pipeline(args: argparse.Namespace) -> None:
    """The Prefect flow, embedded: no servers needed (ephemeral Prefect, local Ray, SQLite MLflow)."""
    from flows.pipeline import check_continuation, mnist_ddpm, pipeline_config
    from flows.preflight import check_services
    from flows.tracking import resolve_runs_dir, tracking_uri

    overrides = parse_overrides(args.overrides)
    if args.mirror:
        overrides["data.mirror"] = args.mirror
    # A bad value, flag or service address fails here, in one line, before the flow (and Prefect's log of the
    # traceback) starts.
    cfg = pipeline_config(args.profile, args.config_file, overrides, args.guidance)
    check_continuation(args.from_champion, args.more_epochs, args.guidance, cfg)
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: give a run folder (new or existing)")
    check_services(tracking_uri(cfg.tracking.mlflow_uri, resolve_runs_dir(cfg, str(out.parent) if out else None)))
    mnist_ddpm(profile=args.profile, overrides=overrides, config_file=args.config_file,
               run_name=out.name if out else None, runs_dir=str(out.parent) if out else None,
               guidance_scale=args.guidance, verbose=args.verbose, from_champion=args.from_champion,
               more_epochs=args.more_epochs)


def cmd_serve(args: argparse.Namespace) -> None:
    """`ddpm serve`: blocks until SIGTERM or Ctrl-C (flows/model_service.py)."""
    from flows.model_requests import Limits
    from flows.model_service import TOKEN_VARIABLE, ServiceOptions, check_listen, check_options, serve_until_stopped
    from flows.preflight import check_mlflow
    from flows.tracking import resolve_runs_dir, tracking_uri

    uri = tracking_uri(args.mlflow or "", resolve_runs_dir(Config(), args.runs_dir))
    options = ServiceOptions(
        tracking_uri=uri, host=args.host, port=args.port, poll_s=args.poll_s,
        limits=Limits(max_images=args.max_images, max_steps=args.max_steps), replicas=args.replicas,
        replica_cpus=args.replica_cpus, max_queued=args.max_queued, timeout_s=args.timeout_s,
        token=args.token if args.token is not None else os.environ.get(TOKEN_VARIABLE) or None)
    warning = check_listen(options)  # every refusal here comes before Ray starts
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    check_options(options)
    check_mlflow(uri)  # one bounded attempt; MLflow's own client would retry for minutes
    serve_until_stopped(options)


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a scheduler stopping the job), handled like Ctrl-C: one line, exit 143, the `finally`
    blocks and atexit run, finished work is kept. `ray.init` replaces this handler with Ray's own once a stage
    starts Ray in this process (docs/reliability.md, "Known gaps")."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or argparse's one-line refusal (2), returned like any other outcome
        return exc.code if isinstance(exc.code, int) else 2
    in_main_thread = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        if args.command == "model-summary":
            cmd_model_summary(resolve_config(args, None))
        elif args.command == "pipeline":
            cmd_pipeline(args)
        elif args.command == "serve":
            cmd_serve(args)
        elif args.command == "sweep":
            cmd_sweep(args)
        else:
            if not args.out:
                raise ConfigError(f"`ddpm {args.command}` needs --out RUN_DIR (the run folder the stages share)")
            if Path(args.out).exists() and not Path(args.out).is_dir():
                raise ConfigError(f"--out {args.out} is a file: give a run folder (new or existing)")
            cfg = resolve_config(args, Path(args.out))
            digit = (args.digit, args.count) if getattr(args, "digit", None) is not None else None
            result = run_stage(args.command, cfg, Path(args.out), not args.quiet, digit,
                               verbose=getattr(args, "verbose", False))
            print(json.dumps(result, indent=2, default=str))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        # Finished work is on disk already (atomic files, one checkpoint per epoch); rerunning resumes it.
        print(f"{'terminated' if isinstance(exc, Terminated) else 'interrupted'}: completed stages and epochs are "
              "kept; run the same command again to resume", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
        if "ray" in sys.modules:  # a stage used Ray: stop the local one cleanly, leaving no stray workers
            from flows.distributed import shutdown_ray

            shutdown_ray()
    return 0


if __name__ == "__main__":
    sys.exit(main())
