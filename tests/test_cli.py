"""The `ddpm` CLI: each stage alone over one run folder, config resolution, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from flows.cli import main


def ddpm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=600)


def test_model_summary_prints_reference_parameter_counts():
    result = ddpm("model-summary", "--profile", "gpu")
    assert result.returncode == 0, result.stderr
    assert "403,409" in result.stdout and "44,426" in result.stdout
    assert "mid_attn" in result.stdout  # the middle self-attention layer is listed


@pytest.mark.system  # a stage end to end: seconds of training or sampling
def test_model_summary_follows_overrides():
    result = ddpm("model-summary", "--profile", "gpu", "--set", "unet.channel_multipliers=1,2")
    assert result.returncode == 0, result.stderr
    assert "403,409" not in result.stdout


@pytest.mark.system  # a stage end to end: seconds of training or sampling
def test_stages_one_by_one_make_a_whole_run(tmp_path, mirror):
    run = tmp_path / "run"
    for stage in (["data", "--profile", "smoke", "--mirror", str(mirror)], ["train-classifier"], ["train"],
                  ["sample"], ["evaluate"]):
        result = ddpm(*stage, "--out", str(run), "--quiet")
        assert result.returncode == 0, f"{stage}: {result.stderr[-2000:]}"
    config = json.loads((run / "config.json").read_text())
    assert config["profile"] == "smoke"  # later stages kept the run's config
    for name in ("data/manifest.json", "classifier/lenet.pt", "unet/model.pt", "unet/checkpoints/epoch_002.pt",
                 "samples/samples.parquet", "samples.png", "reverse_process.gif", "evaluation.json",
                 "loss_curves.png", "label_histogram.png", "evaluation.md", "samples_by_digit.png"):
        assert (run / name).is_file(), name
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert set(evaluation["fld"]) == {"generated_vs_test", "test_vs_test", "train_vs_test", "uniform_noise_vs_test"}
    assert evaluation["counts"]["generated"] == 64
    assert sum(evaluation["label_histogram"]["generated"]) == 64
    assert 0 <= evaluation["label_imbalance_tv"] <= 1
    assert evaluation["fld_ratio_to_train"]["train_vs_test"] == 1.0
    assert 0 <= evaluation["memorisation"]["near_copy_share"] <= 1
    # The original's class-mean distance on 500 test images: about its 0.0080, and noise farther off; nearest-mean
    # labels about its 82% right.
    nearest = evaluation["nearest_class_mean_distance"]
    assert set(nearest) == set(evaluation["predicted_class_mean_distance"]) == {"test", "train", "generated",
                                                                                "uniform_noise"}
    assert 0.007 < nearest["test"] < 0.009 < nearest["uniform_noise"]
    assert 0.7 < evaluation["nearest_mean_label_accuracy"] < 0.95
    prdc = evaluation["prdc"]
    assert prdc["k"] == 5 and set(prdc["generated_vs_test"]) == {"precision", "recall", "density", "coverage"}
    assert prdc["train_vs_test"]["recall"] > prdc["generated_vs_test"]["recall"]  # two epochs of a tiny model
    by_digit = evaluation["fld_by_digit"]
    assert set(by_digit) == {"generated", "train"}  # unconditional: no requested labels
    assert sum(by_digit["generated"]["images"].values()) == 64
    assert by_digit["train"]["worst"] in {str(d) for d in range(10)}
    report = (run / "evaluation.md").read_text()
    assert "| generated (ddpm) | 64 |" in report and "near-copies" in report
    assert "## Fidelity and diversity" in report and "## FLD by digit" in report
    check_compared_set_uses_the_main_sets_seeds(run, evaluation, report)
    check_trained_keys_are_refused(run)


def check_compared_set_uses_the_main_sets_seeds(run, evaluation, report):
    """The smoke profile compares DDIM-5 on the first 32 seeds: its images are exactly what DDIM-5 makes from
    those seeds, and the report sets its FLD beside the main set's on the same seeds."""
    import torch

    from ddpm.config import load_config
    from ddpm.generate import image_noise, load_for_sampling, run_sampler
    from ddpm.pipeline.samples import read_samples
    from ddpm.pixels import model_to_uint8

    compared, _ = read_samples(run / "samples" / "compare" / "ddim-5.parquet")
    model, cfg, diffusion = load_for_sampling(
        load_config("smoke", None, {"sample.sampler": "ddim", "sample.steps": "5"}), run / "unet" / "model.pt",
        torch.device("cpu"))
    expected = np.concatenate([model_to_uint8(run_sampler(model, diffusion, cfg, image_noise(cfg, first, 16),
                                                          None).images).numpy()[:, 0] for first in (0, 16)])
    assert np.array_equal(compared, expected)
    (row,) = evaluation["compare"]
    assert row["name"] == "ddim-5" and row["images"] == 32
    assert np.isfinite([row["fld"], row["main_fld_same_seeds"]]).all()
    assert row["fld"] != row["main_fld_same_seeds"]  # two samplers, two sets of images
    assert "## Samplers on the same seeds" in report and f"| ddim, 5 steps | 32 | {row['fld']:.3f} |" in report


def check_trained_keys_are_refused(run):
    """What a checkpoint fixes (architecture, schedule) cannot be changed by --set: a one-line refusal naming
    the key, nothing in the run folder touched. The free sampling knobs stay free."""
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    refusals = [("sample", "diffusion.timesteps=10"), ("sample", "diffusion.schedule=linear"),
                ("sample", "diffusion.timesteps=50"), ("sample", "unet.base_channels=16"),
                ("train", "unet.base_channels=16"), ("train", "diffusion.cosine_s=0.1")]
    code = "\n".join(["import sys", "from flows.cli import main", "codes = []"] + [
        f"codes.append(main([{stage!r}, '--out', {str(run)!r}, '--set', {override!r}, '--quiet']))"
        for stage, override in refusals] + ["print(codes)"])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.stdout.strip() == str([2] * len(refusals)), result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == len(refusals), lines  # one line each
    for (_, override), line in zip(refusals, lines, strict=True):
        key = override.split("=")[0]
        assert line.startswith(f"error: {key}=") and "contradicts the trained model" in line, line
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # Free knobs: another sampler and fewer images work on the same model, and are recorded on success.
    result = ddpm("sample", "--out", str(run), "--set", "sample.sampler=dpm++2m", "--set", "sample.num_samples=8",
                  "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((run / "config.json").read_text())
    assert config["sample"]["sampler"] == "dpm++2m" and config["diffusion"]["timesteps"] == 20


def test_failed_stage_leaves_the_run_folder_as_it_was(tmp_path, mirror, monkeypatch, capsys):
    run = tmp_path / "run"
    assert main(["data", "--out", str(run), "--profile", "smoke", "--mirror", str(tmp_path / "bad"), "--quiet"]) == 2
    assert "bad" in capsys.readouterr().err
    assert not (run / "config.json").exists()
    # The fix the message suggests works, because the bad mirror was not saved into config.json.
    monkeypatch.setenv("MNIST_MIRROR", str(mirror))
    assert main(["data", "--out", str(run), "--profile", "smoke", "--quiet"]) == 0
    saved = (run / "config.json").read_bytes()
    assert json.loads(saved)["data"]["mirror"] is None
    # A failing stage on the now complete folder changes nothing either.
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(["data", "--out", str(run), "--mirror", str(tmp_path / "bad"), "--quiet"]) == 2
    assert main(["evaluate", "--out", str(run), "--quiet"]) == 2
    assert "ddpm train-classifier --out RUN_DIR" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("args, message", [
    (["train", "--out", "{run}", "--set", "train.epochs=0"], "train.epochs=0 must be >= 1"),
    (["train", "--out", "{run}", "--set", "train.batch_size=1", "--workers", "1-2"],
     "train.batch_size=1 is the global batch, split across up to 2 workers"),
    (["train", "--out", "{run}", "--workers", "3-2"], "cluster.workers=(3, 2): need 1 <= MIN <= MAX"),
    (["train", "--out", "{run}", "--workers", "two"], "write a count (2), or a range MIN-MAX for elastic training"),
    (["train", "--out", "{run}", "--profile", "smoke"], "ddpm train-classifier --out"),
    (["train", "--out", "{run}", "--profile", "smoke", "--set", "train.epoch_fld_samples=0"],
     "train.export='best' picks the epoch with the lowest epoch FLD"),
    (["train", "--out", "{run}", "--set", "nope.key=1"], "unknown config section 'nope'"),
    (["train", "--out", "{run}", "--set", "train.epoch=1"], "unknown config key 'train.epoch'"),
    (["train", "--out", "{run}", "--set", "train.lr=fast"], "train.lr='fast' is not a valid float"),
    (["train", "--out", "{run}", "--profile", "huge"], "unknown profile 'huge'"),
    (["train", "--out", "{run}", "--profile", "smoke", "--set", "unet.base_channels=10"],
     "unet.base_channels=10 is not divisible by unet.groups=4"),
    (["sample", "--out", "{run}", "--profile", "smoke"], "ddpm train --out RUN_DIR"),
    (["evaluate", "--out", "{run}", "--profile", "smoke"], "ddpm train-classifier --out RUN_DIR"),
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


@pytest.mark.system  # a stage end to end: seconds of training or sampling
def test_guidance_end_to_end_with_a_digit_grid(smoke_run, make_run, capsys):
    """A conditional U-Net trained with label dropout samples its digits in the training split's shares with
    guidance, and one digit on request; an unconditional one refuses --digit."""
    from ddpm.checkpoints import load_model
    from ddpm.pipeline.samples import read_samples

    run = str(smoke_run)
    common = ["--out", run, "--quiet"]
    assert main(["train", "--profile", "smoke", "--set", "train.epochs=1", "--set", "unet.num_classes=10",
                 "--set", "train.p_uncond=0.2", *common]) == 0
    assert main(["sample", "--set", "sample.guidance_scale=2", "--set", "sample.num_samples=40",
                 "--set", "sample.sampler=dpm++2m", *common]) == 0
    _, labels = read_samples(smoke_run / "samples" / "samples.parquet")
    _, trained = load_model(smoke_run / "unet" / "model.pt")
    shares = np.array(trained.unet.label_shares)  # the training split's, recorded when training began
    assert np.abs(np.bincount(labels, minlength=10) - 40 * shares).max() <= 2  # digits drawn in those shares
    assert main(["sample", "--digit", "7", "--count", "8", *common]) == 0
    grid = smoke_run / "digit_7.png"
    assert grid.is_file() and Image.open(grid).size[0] > Image.open(grid).size[1]  # 8 in a row
    assert main(["sample", "--digit", "10", *common]) == 2
    assert "--digit 10 must be in 0..9" in capsys.readouterr().err

    uncond = make_run(smoke_run.parent / "uncond")
    assert main(["train", "--profile", "smoke", "--set", "train.epochs=1", "--out", str(uncond), "--quiet"]) == 0
    assert main(["sample", "--digit", "3", "--out", str(uncond), "--quiet"]) == 2
    assert "unconditional" in capsys.readouterr().err
