"""What a run folder holds, where, and how it changes.

A run folder holds one run: each stage reads what earlier stages wrote there and adds its own part, so the
stages can run one by one (`ddpm data --out R`, `ddpm train --out R`, ...) or from the Prefect flow, and both
leave the same files:

    R/config.json                     the config of the last stage that succeeded
    R/data/                           train/val/test Parquet + manifest.json
    R/classifier/lenet.pt             the LeNet evaluator (+ metrics)
    R/unet/checkpoints/epoch_NNN.pt   one training checkpoint per epoch; last.pt is a copy of the newest
    R/unet/history.json               per-epoch losses, throughput, workers, step and epoch FLD
    R/unet/epoch_fld/epoch_NNN.json   each epoch's sample-quality score (ddpm.pipeline.epoch_fld)
    R/unet/model.pt                   the sampling (EMA) weights of the chosen epoch, why, and the config
    R/samples/samples.parquet         generated images (uint8) with their index and label
    R/samples/sampling.json           how they were made: sampler, steps, guidance, seconds
    R/samples.png, R/reverse_process.gif, R/loss_curves.png, R/label_histogram.png, R/samples_by_digit.png
    R/evaluation.json, R/evaluation.md
    R/lineage.json                    a run continued from another model: its version, epoch and steps

Files are written atomically (ddpm.checkpoints), and `config.json` only after a stage succeeds, so a stage that
fails leaves the folder as it was, apart from finished work it keeps on purpose (completed epochs' checkpoints).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddpm.checkpoints import write_text
from ddpm.config import Config, ConfigError, config_from_dict
from ddpm.errors import UserError, first_line


@dataclass(frozen=True)
class RunPaths:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    config = property(lambda self: self.root / "config.json")
    data = property(lambda self: self.root / "data")
    lenet = property(lambda self: self.root / "classifier" / "lenet.pt")
    unet = property(lambda self: self.root / "unet")
    checkpoints = property(lambda self: self.root / "unet" / "checkpoints")
    last_checkpoint = property(lambda self: self.root / "unet" / "checkpoints" / "last.pt")
    history = property(lambda self: self.root / "unet" / "history.json")
    model = property(lambda self: self.root / "unet" / "model.pt")
    samples = property(lambda self: self.root / "samples" / "samples.parquet")
    sampling = property(lambda self: self.root / "samples" / "sampling.json")
    samples_png = property(lambda self: self.root / "samples.png")
    animation = property(lambda self: self.root / "reverse_process.gif")
    loss_png = property(lambda self: self.root / "loss_curves.png")
    histogram_png = property(lambda self: self.root / "label_histogram.png")
    samples_by_digit_png = property(lambda self: self.root / "samples_by_digit.png")
    evaluation = property(lambda self: self.root / "evaluation.json")
    evaluation_md = property(lambda self: self.root / "evaluation.md")
    lineage = property(lambda self: self.root / "lineage.json")  # ddpm.pipeline.continuation
    unlogged = property(lambda self: self.root / "unlogged.json")  # what a tracking outage kept out of MLflow

    def compare_set(self, name: str) -> Path:
        """A generated set beside the main one (`sample.compare`), for the report's sampler comparison."""
        return self.root / "samples" / "compare" / f"{name}.parquet"

    def epoch_checkpoint(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch_{epoch:03d}.pt"


# history.json grows epoch by epoch with the checkpoints, so a damaged one is remade by training again.
HISTORY_REMAKE = "delete the run's unet/ folder and train again (`ddpm train --out RUN_DIR`)"


def commit_config(cfg: Config, paths: RunPaths) -> None:
    """Record the config of a stage that succeeded (never before: a failed stage must not change the run)."""
    write_text(paths.config, cfg.to_json())


def read_config(paths: RunPaths) -> Config | None:
    """The run's saved config, or None for a new folder."""
    if not paths.config.is_file():
        return None
    fix = "fix or delete it, or pass --profile"
    try:
        tree = json.loads(paths.config.read_bytes())
        if not isinstance(tree, dict):
            raise ValueError(f"a {type(tree).__name__}, not a table of sections")
        return config_from_dict(tree)
    except ConfigError as exc:
        raise ConfigError(f"{paths.config} holds a config this version refuses ({exc}): {fix}") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{paths.config} is unreadable ({first_line(exc)}): {fix}") from None


def read_json(path: Path, remake: str, kind: type = dict, keys: tuple[str, ...] = ()) -> Any:
    """A JSON file a stage wrote: a `kind` (dict, or list of dicts) whose dicts hold `keys`. Missing, damaged
    (truncated, empty, not UTF-8) or of another shape, it is refused in one line naming the file and `remake`,
    the command that writes it again."""
    path = Path(path)
    try:
        value = json.loads(path.read_bytes())  # json detects UTF-8/16/32 by itself
    except FileNotFoundError:
        raise UserError(f"{path} is missing: {remake}") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is damaged ({first_line(exc)}): {remake}") from None
    items = value if kind is list and isinstance(value, list) else [value]
    if not isinstance(value, kind) or not all(isinstance(i, dict) and all(k in i for k in keys) for i in items):
        shape = f"{kind.__name__}{' of objects' if kind is list else ''} with {', '.join(keys)}" if keys else \
            kind.__name__
        raise UserError(f"{path} is not what this project writes there (expected a {shape}): {remake}")
    return value
