"""A run that continues another model's training: the parent's training state seeds the run folder, and its
config is the run's recipe.

Continuing rather than retraining is what makes a retrain worth running: training is deterministic, so the same
recipe from scratch gives the same model, byte for byte. A continued run resumes the parent's weights, EMA,
optimizer and step count (`ddpm.training.fit` resumes from unet/checkpoints/last.pt as after a crash) and
trains `more_epochs` epochs past the parent's; its epochs are numbered on from the parent's, and the exported
model is chosen among the new epochs only, since the parent's own checkpoints are not in the folder.

The parent's config is kept whole, sampling and evaluation included, so the new model is scored exactly as the
parent was; only where the run happens (`LOCAL_KEYS`) comes from here, and explicit overrides apply on top.
"""

from __future__ import annotations

import dataclasses
import filecmp
from pathlib import Path
from typing import Any

from ddpm.checkpoints import TRAINING_STATE, checkpoint_config, copy_file, load_checkpoint, write_json
from ddpm.config import ClusterConfig, Config, ConfigError, load_config, read_config_file, with_trained
from ddpm.pipeline.run_folder import RunPaths, read_json

# Where and on what a run happens, not what it learns or how it is scored: taken from this machine's config,
# not from the parent's (which may have run on another machine, with other services and hardware).
LOCAL_KEYS = ("runs_dir", "data.mirror", "data.download_dir", "train.device",
              *(f"cluster.{f.name}" for f in dataclasses.fields(ClusterConfig)),
              "tracking.mlflow_uri", "tracking.experiment", "tracking.register_models")


def parent_state(path: Path) -> tuple[dict[str, Any], Config]:
    """A parent's training state (weights, EMA, optimizer, epoch, step, config) and its config."""
    state = load_checkpoint(path, (TRAINING_STATE,), "")
    return state, checkpoint_config(state, path)


def continued_config(parent: Config, parent_epochs: int, here: Config, config_file: str | Path | None,
                     overrides: dict[str, Any], more_epochs: int) -> Config:
    """The parent's config with this machine's `LOCAL_KEYS` (from `here`), then the config file and the explicit
    `overrides`, and `train.epochs` = the parent's epochs + `more_epochs`."""
    if more_epochs < 1:
        raise ConfigError(f"more_epochs={more_epochs}: a continued run trains at least one more epoch")
    explicit = set(overrides) | set(read_config_file(config_file) if config_file else ())
    if "train.epochs" in explicit:
        raise ConfigError("train.epochs with a continued run: it trains the parent's epochs plus more_epochs "
                          "(--more-epochs); drop the train.epochs override")
    flat = here.flat()
    cfg = load_config(None, None, {key: flat[key] for key in LOCAL_KEYS}, base=parent)
    cfg = load_config(None, config_file, {**overrides, "train.epochs": parent_epochs + more_epochs}, base=cfg)
    # An override of what the weights were trained for (architecture, schedule) is refused here, before the run
    # folder is seeded, rather than when training loads the state.
    return with_trained(cfg, parent, explicit, "the champion's training state")


def seed_run_folder(paths: RunPaths, state_path: Path, lineage: dict[str, Any]) -> dict[str, Any]:
    """Put the parent's training state where training resumes from, and record where it came from. A folder
    seeded before (a rerun after a crash) keeps its own newer state and lineage."""
    if paths.lineage.exists():
        return read_lineage(paths)
    # A last.pt with the parent's bytes is a run stopped between the copy below and the lineage's write.
    if paths.last_checkpoint.exists() and not filecmp.cmp(paths.last_checkpoint, state_path, shallow=False):
        raise ConfigError(f"{paths.root} already holds a run trained from scratch: continue the champion in a new "
                          "run folder (another run name)")
    paths.checkpoints.mkdir(parents=True, exist_ok=True)
    copy_file(state_path, paths.last_checkpoint)
    write_json(paths.lineage, lineage)
    return lineage


def record_cold_start(paths: RunPaths, reason: str) -> dict[str, Any]:
    """Record that a run asked to continue a parent trains from scratch, and why (a rerun then does too)."""
    if paths.lineage.exists():
        return read_lineage(paths)
    paths.root.mkdir(parents=True, exist_ok=True)
    lineage = {"parent_version": None, "lineage": reason}
    write_json(paths.lineage, lineage)
    return lineage


def read_lineage(paths: RunPaths) -> dict[str, Any] | None:
    """What a run asked to continue a parent continued (`parent_version` None: it trained from scratch); None
    for a run that was never asked to."""
    if not paths.lineage.exists():
        return None
    return read_json(paths.lineage, "delete it and rerun the run from its parent", dict, ("parent_version",))
