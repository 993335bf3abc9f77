"""A run that continues a parent (`ddpm.pipeline.continuation`): its config, its seeded run folder, and the
refusals of what cannot be continued. The whole loop through the flow and the registry is in test_flow.py."""

from __future__ import annotations

import pytest

from ddpm.checkpoints import TRAINING_STATE, save_checkpoint
from ddpm.config import ConfigError, load_config
from ddpm.pipeline.continuation import (
    LOCAL_KEYS,
    continued_config,
    read_lineage,
    record_cold_start,
    seed_run_folder,
)
from ddpm.pipeline.run_folder import RunPaths


def test_continued_config_keeps_the_parents_recipe_and_takes_only_local_keys_from_here():
    parent = load_config("smoke", overrides={"train.lr": "0.002", "sample.steps": "7", "data.mirror": "/elsewhere",
                                             "runs_dir": "/old/runs", "cluster.workers": "2"})
    here = load_config("cpu", overrides={"data.mirror": "/here", "runs_dir": "/new/runs"})
    cfg = continued_config(parent, 2, here, None, {"sample.seed": "9"}, more_epochs=3)
    assert cfg.train.epochs == 5  # the parent's 2, then 3 more
    assert (cfg.profile, cfg.unet, cfg.diffusion, cfg.train.lr, cfg.sample.steps) == \
        (parent.profile, parent.unet, parent.diffusion, 0.002, 7)  # what it learns and how it is scored
    flat, local = cfg.flat(), here.flat()
    assert all(flat[key] == local[key] for key in LOCAL_KEYS)  # where it runs
    assert cfg.data.mirror == "/here" and cfg.runs_dir == "/new/runs" and cfg.cluster.workers == (1, 1)
    assert cfg.sample.seed == 9  # an explicit override still applies


@pytest.mark.parametrize("overrides, more, problem", [
    ({"train.epochs": "4"}, 2, "drop the train.epochs override"),
    ({}, 0, "at least one more epoch"),
    ({"unet.base_channels": "0"}, 1, "unet.base_channels"),
    ({"unet.base_channels": "32"}, 1, "unet.base_channels=32 contradicts the trained model"),
    ({"diffusion.timesteps": "50"}, 1, "diffusion.timesteps=50 contradicts the trained model"),
])
def test_continued_config_refuses_what_cannot_continue(overrides, more, problem):
    parent = load_config("smoke")
    with pytest.raises(ConfigError, match=problem):
        continued_config(parent, 2, load_config("smoke"), None, overrides, more)


def test_seeding_puts_the_parent_state_where_training_resumes_and_keeps_a_rerun_on_it(tmp_path):
    state = tmp_path / "parent.pt"
    save_checkpoint({"kind": TRAINING_STATE, "config": load_config("smoke").to_dict(), "epoch": 2, "step": 16},
                    state)
    paths = RunPaths(tmp_path / "run")
    lineage = seed_run_folder(paths, state, {"parent_version": "3", "parent_epoch": 2})
    assert paths.last_checkpoint.read_bytes() == state.read_bytes()
    assert read_lineage(paths) == lineage
    # A rerun (after a crash) keeps the folder's own, newer state and its recorded parent.
    paths.last_checkpoint.write_bytes(b"newer")
    assert seed_run_folder(paths, state, {"parent_version": "4", "parent_epoch": 5}) == lineage
    assert paths.last_checkpoint.read_bytes() == b"newer"
    # Stopped after the copy, before the lineage was written: seeded again, not taken for a run from scratch.
    paths.lineage.unlink()
    paths.last_checkpoint.write_bytes(state.read_bytes())
    assert seed_run_folder(paths, state, lineage) == lineage and read_lineage(paths) == lineage


def test_a_folder_trained_from_scratch_is_not_seeded_over(tmp_path):
    paths = RunPaths(tmp_path / "run")
    paths.checkpoints.mkdir(parents=True)
    paths.last_checkpoint.write_bytes(b"from scratch")
    (tmp_path / "parent.pt").write_bytes(b"the champion's state")
    with pytest.raises(ConfigError, match="new run folder"):
        seed_run_folder(paths, tmp_path / "parent.pt", {"parent_version": "1"})
    assert paths.last_checkpoint.read_bytes() == b"from scratch"


def test_a_cold_start_is_recorded_once(tmp_path):
    paths = RunPaths(tmp_path / "run")
    assert read_lineage(paths) is None
    first = record_cold_start(paths, "cold start: no champion yet")
    assert first == {"parent_version": None, "lineage": "cold start: no champion yet"}
    assert record_cold_start(paths, "another reason") == first  # a rerun trains from scratch again


def test_cli_refuses_guidance_with_from_champion_in_one_line(capsys):
    from flows.cli import main

    assert main(["pipeline", "--profile", "smoke", "--from-champion", "--guidance", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--guidance with --from-champion" in err
    assert main(["pipeline", "--profile", "smoke", "--from-champion", "--more-epochs", "0"]) == 2
    assert "at least one more epoch" in capsys.readouterr().err


def test_a_champion_lookup_that_fails_raises(monkeypatch):
    """MLflow not answering is not "no champion yet": read that way, a retrain would start from scratch and the
    promotion rule would promote any model."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    from netcheck import free_ports

    from flows.tracking import champion_version

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    uri = f"http://127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    with pytest.raises(MlflowException):
        champion_version(MlflowClient(tracking_uri=uri, registry_uri=uri))
