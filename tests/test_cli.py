"""The `ddpm` CLI: each stage alone over one run folder, config resolution, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flows.cli import main


def ddpm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=600)


def test_model_summary_prints_reference_parameter_counts():
    result = ddpm("model-summary", "--profile", "gpu")
    assert result.returncode == 0, result.stderr
    assert "403,409" in result.stdout and "44,426" in result.stdout
    assert "mid_attn" in result.stdout  # the middle self-attention layer is listed


def test_model_summary_follows_overrides():
    result = ddpm("model-summary", "--profile", "gpu", "--set", "unet.channel_multipliers=1,2")
    assert result.returncode == 0, result.stderr
    assert "403,409" not in result.stdout


def test_stages_one_by_one_make_a_whole_run(tmp_path, mirror):
    run = tmp_path / "run"
    for stage in (["data", "--profile", "smoke", "--mirror", str(mirror)], ["train"], ["sample"], ["evaluate"]):
        result = ddpm(*stage, "--out", str(run), "--quiet")
        assert result.returncode == 0, f"{stage}: {result.stderr[-2000:]}"
    config = json.loads((run / "config.json").read_text())
    assert config["profile"] == "smoke"  # later stages kept the run's config
    for name in ("data/manifest.json", "classifier/lenet.pt", "unet/model.pt", "unet/checkpoints/epoch_002.pt",
                 "samples/samples.parquet", "samples.png", "reverse_process.gif", "evaluation.json",
                 "loss_curves.png", "label_histogram.png"):
        assert (run / name).is_file(), name
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert set(evaluation["fld"]) == {"generated_vs_test", "test_vs_test", "train_vs_test", "uniform_noise_vs_test"}
    assert evaluation["counts"]["generated"] == 64
    assert sum(evaluation["label_histogram"]["generated"]) == 64
    assert 0 <= evaluation["label_imbalance_tv"] <= 1


@pytest.mark.parametrize("args, message", [
    (["train", "--out", "{run}", "--set", "train.epochs=0"], "train needs epochs >= 1"),
    (["train", "--out", "{run}", "--set", "nope.key=1"], "unknown config section 'nope'"),
    (["train", "--out", "{run}", "--set", "train.epoch=1"], "unknown config key 'train.epoch'"),
    (["train", "--out", "{run}", "--set", "train.lr=fast"], "train.lr='fast' is not a valid float"),
    (["train", "--out", "{run}", "--profile", "huge"], "unknown profile 'huge'"),
    (["train", "--out", "{run}", "--profile", "smoke", "--set", "unet.base_channels=10"],
     "unet.base_channels=10 is not divisible by unet.groups=4"),
    (["sample", "--out", "{run}", "--profile", "smoke"], "ddpm train --out RUN_DIR"),
    (["evaluate", "--out", "{run}", "--profile", "smoke"], "ddpm data --out RUN_DIR"),
    (["data", "--out", "{run}", "--mirror", "{run}/no-such-folder"], "no-such-folder"),
    (["train"], "needs --out RUN_DIR"),
])
def test_bad_input_gives_a_clear_error(tmp_path, capsys, args, message):
    code = main([a.format(run=tmp_path / "run") for a in args] + ["--quiet"])
    assert code == 2
    assert message in capsys.readouterr().err


def test_config_file_and_overrides_layer_on_the_profile(tmp_path):
    from ddpm.config import load_config

    toml = tmp_path / "c.toml"
    toml.write_text('[train]\nepochs = 7\nlr = 0.0005\n[unet]\nchannel_multipliers = [1, 2]\n')
    cfg = load_config("smoke", toml, ["train.epochs=9"])
    assert (cfg.train.epochs, cfg.train.lr, cfg.unet.channel_multipliers) == (9, 0.0005, (1, 2))
    assert cfg.diffusion.timesteps == 20  # from the smoke profile
    gpu = load_config("gpu")
    assert (gpu.diffusion.timesteps, gpu.train.batch_size, gpu.train.lr, gpu.train.epochs,
            gpu.sample.num_samples) == (100, 32, 1e-3, 15, 10_000)


def test_library_imports_no_orchestration_packages():
    """ddpm/ is plain PyTorch: importing every module pulls in no Ray, Prefect or MLflow."""
    code = ("import pkgutil, importlib, sys, ddpm\n"
            "for m in pkgutil.walk_packages(ddpm.__path__, 'ddpm.'): importlib.import_module(m.name)\n"
            "print(sorted({n.split('.')[0] for n in sys.modules} & {'ray', 'prefect', 'mlflow'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
