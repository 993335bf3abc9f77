"""Bad input is refused in one line that names the key or file, before any work, leaving the run as it was."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from flows.cli import main


def one_line_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("override, message", [
    ("sample.guidance_scale=-1", "sample.guidance_scale=-1.0 must be >= 0"),
    ("sample.guidance_scale=nan", "sample.guidance_scale=nan must be a finite number"),
    ("train.lr=inf", "train.lr=inf must be a finite number"),
    ("classifier.batch_size=0", "classifier.batch_size=0 must be >= 1"),
    ("eval.batch_size=0", "eval.batch_size=0 must be >= 1"),
])
def test_impossible_values_are_refused_by_key(tmp_path, capsys, override, message):
    assert main(["train", "--profile", "smoke", "--out", str(tmp_path / "r"), "--set", override, "--quiet"]) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "r").exists()


def test_bad_paths_are_named(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["data", "--profile", "smoke", "--out", str(afile), "--quiet"]) == 2
    assert f"--out {afile} is a file" in one_line_error(capsys)
    assert main(["data", "--profile", "smoke", "--out", str(tmp_path / "r"), "--mirror", str(afile), "--quiet"]) == 2
    assert "is a file, not a folder" in one_line_error(capsys)
    run = tmp_path / "broken"
    run.mkdir()
    (run / "config.json").write_text("{not json")
    assert main(["train", "--out", str(run), "--quiet"]) == 2
    assert f"{run / 'config.json'} is unreadable" in one_line_error(capsys)
    assert (run / "config.json").read_text() == "{not json"


def test_resume_applies_a_new_learning_rate(smoke_run):
    from ddpm.checkpoints import TRAINING_STATE, load_checkpoint
    from ddpm.config import load_config
    from ddpm.pipeline.run_folder import RunPaths
    from ddpm.pipeline.training import fit_in_folder

    paths = RunPaths(smoke_run)
    fit_in_folder(load_config("smoke", overrides={"train.epochs": 1}), paths, progress=False)
    fit_in_folder(load_config("smoke", overrides={"train.epochs": 2, "train.lr": 2e-4}), paths, progress=False)
    state = load_checkpoint(paths.last_checkpoint, (TRAINING_STATE,), "")
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [2e-4]


def test_leftovers_of_a_killed_writer_are_removed_but_a_live_ones_kept(tmp_path, mirror):
    from ddpm.config import DataConfig
    from ddpm.data import prepare_dataset

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = tmp_path / f".data.tmp-{dead.pid}-deadbeef"
    live = tmp_path / f".data.tmp-{os.getpid()}-cafebabe"
    for folder in (leftover, live):
        folder.mkdir()
        (folder / "train.parquet").write_bytes(b"half")
    prepare_dataset(tmp_path / "data", DataConfig(mirror=str(mirror)), progress=False)
    assert not leftover.exists() and live.exists()


@pytest.mark.parametrize("signum, code, word", [(signal.SIGINT, 130, "interrupted"),
                                                 (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_and_kill_are_a_message_not_a_traceback(tmp_path, mirror, signum, code, word):
    """SIGINT (Ctrl-C) or SIGTERM (`kill`) while `ddpm data` writes: one line, no temp folder left, exit 130 or
    143. SIGTERM is handled like Ctrl-C, so the stage's own clean-up runs."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for attempt in range(3):  # a run that finishes before the signal lands proves nothing: try again
        run, log = tmp_path / f"r{attempt}", tmp_path / f"stderr{attempt}.txt"
        with log.open("w") as stderr:
            process = subprocess.Popen([sys.executable, "-m", "flows.cli", "data", "--profile", "smoke", "--out",
                                        str(run), "--mirror", str(mirror), "--quiet"], stderr=stderr, env=env)
            deadline = time.monotonic() + 120
            while not list(run.glob(".data.tmp-*")) and process.poll() is None:
                assert time.monotonic() < deadline, "data preparation never started"
                time.sleep(0.02)
            process.send_signal(signum)
            process.wait(timeout=120)
        if process.returncode != 0:
            break
    message = log.read_text()
    assert process.returncode == code, message
    assert "Traceback" not in message and word in message
    assert not list(run.glob(".data.tmp-*")) and not (run / "config.json").exists()


def test_broken_samples_and_checkpoint_configs_are_named(smoke_run, capsys):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from ddpm.checkpoints import UNET

    samples = smoke_run / "samples" / "samples.parquet"
    samples.parent.mkdir()  # the run folder has its evaluator (smoke_run), so only the samples are at fault
    for content in (b"PAR1 truncated", None):
        if content is None:  # right column names, wrong types
            pq.write_table(pa.table({"index": [0], "label": [1], "image": [np.zeros(784, np.float32)]}), samples)
        else:
            samples.write_bytes(content)
        assert main(["evaluate", "--out", str(smoke_run), "--quiet"]) == 2
        assert f"{samples} is not a samples file of this project" in one_line_error(capsys)
    model = smoke_run / "unet" / "model.pt"
    model.parent.mkdir()
    torch.save({"kind": UNET, "config": {"unet": {"base_channels": "wide"}}, "model": {}}, model)
    assert main(["sample", "--out", str(smoke_run), "--quiet"]) == 2
    assert f"{model} holds no usable config" in one_line_error(capsys)


def test_sampling_without_a_model_fails_before_ray_starts(tmp_path):
    code = ("import sys; from flows.cli import main\n"
            f"code = main(['sample', '--profile', 'smoke', '--out', {str(tmp_path / 'r')!r}, '--workers', '2',"
            " '--quiet'])\nprint(code, 'ray' in sys.modules)")
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["2", "False"], result.stderr
    assert "unet/model.pt does not exist" in result.stderr and time.monotonic() - start < 60


@pytest.mark.system  # a stage end to end: seconds of training or sampling
@pytest.mark.parametrize("workers", [1, 2])
def test_a_diverging_run_stops_with_its_last_good_checkpoint(smoke_run, capsys, workers):
    """End to end, in-process and on 2 Ray workers: a learning rate that blows the weights up stops training in
    one line, without Ray restarts, and the last completed epoch stays the run's checkpoint. (The good first epoch
    trains in-process either way: the run it resumes may come from anywhere.)"""
    from ddpm.checkpoints import TRAINING_STATE, load_checkpoint

    common = ["--out", str(smoke_run), "--quiet"]
    assert main(["train", "--profile", "smoke", "--set", "train.epochs=1", "--workers", "1", *common]) == 0
    last = smoke_run / "unet" / "checkpoints" / "last.pt"
    before = last.read_bytes()
    assert main(["train", "--set", "train.epochs=3", "--set", "train.lr=1e30", "--workers", str(workers),
                 *common]) == 2
    (message,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]  # Ray logs too
    assert "loss became" in message and "epoch 2" in message and "lower train.lr" in message
    assert last.read_bytes() == before and load_checkpoint(last, (TRAINING_STATE,), "")["epoch"] == 1
    if workers == 2:
        from flows.distributed import read_events

        events = read_events(smoke_run / ".ray", f"unet-{smoke_run.name}")
        assert [e["event"] for e in events].count("start") == 1  # one attempt on Ray: no restarts


def test_a_sample_stage_stopped_part_way_leaves_the_old_sets(smoke_run):
    """Every set of the sample stage (the main one, then the compared ones) moves into place only when all are
    done: a stage that dies while drawing the compared set leaves the earlier samples, not a mix."""
    import torch

    from ddpm.config import load_config
    from ddpm.generate import load_for_sampling
    from ddpm.pipeline.run_folder import RunPaths
    from ddpm.pipeline.samples import sample_shard
    from ddpm.pipeline.stages import sample, shard_file, train_unet

    paths = RunPaths(smoke_run)
    cfg = load_config("smoke", overrides={"train.epochs": 1, "sample.num_samples": 32, "sample.batch_size": 8})
    train_unet(cfg, paths, progress=False)
    sample(cfg, paths, progress=False)
    before = {p: p.read_bytes() for p in (paths.samples, paths.sampling, paths.compare_set("ddim-5"))}

    def dies_on_the_compared_set(cfg, paths, shards, folder):
        if cfg.sample.sampler == "ddim":
            raise RuntimeError("killed while drawing the compared set")
        model, cfg, diffusion = load_for_sampling(cfg, paths.model, torch.device("cpu"))
        for shard in shards:
            sample_shard(model, diffusion, cfg, shard, shard_file(folder, shard))

    changed = load_config("smoke", overrides={"sample.num_samples": 32, "sample.batch_size": 8, "sample.seed": 7})
    with pytest.raises(RuntimeError, match="compared set"):
        sample(changed, paths, progress=False, run_shards=dies_on_the_compared_set)
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in paths.samples.parent.rglob("*")) == sorted(
        ["compare", "ddim-5.parquet", "samples.parquet", "sampling.json"])
