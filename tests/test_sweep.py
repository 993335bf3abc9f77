"""`ddpm sweep`: quality against guidance or sampler steps, scored like the report scores its compare sets."""

from __future__ import annotations

import json

import pytest

from ddpm.config import ConfigError, load_config
from ddpm.pipeline.sweep import guidance_specs
from flows.cli import main


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory, prepared_data, smoke_lenet):
    """A smoke run of a digit-conditional model, sampled with a DDIM compare set and evaluated."""
    from tests.conftest import new_run_folder

    run = new_run_folder(tmp_path_factory.mktemp("sweep") / "run", prepared_data, smoke_lenet)
    common = ["--out", str(run), "--quiet"]
    assert main(["train", "--profile", "smoke", "--set", "unet.num_classes=10", *common]) == 0
    assert main(["sample", "--set", "sample.compare=ddim:5", *common]) == 0
    assert main(["evaluate", *common]) == 0
    return run


@pytest.mark.system  # a stage end to end: seconds of training or sampling
def test_a_steps_point_is_the_reports_compare_set(conditional_run, capsys):
    """The same seeds, labels and scoring: the sweep's ddim-5 point and the report's ddim-5 set agree exactly."""
    evaluation = json.loads((conditional_run / "evaluation.json").read_text())
    (compare,) = evaluation["compare"]
    assert main(["sweep", "--out", str(conditional_run), "--steps", "3,5", "--samplers", "ddim,dpm++2m",
                 "--samples", str(compare["images"]), "--quiet"]) == 0
    result = json.loads((conditional_run / "sweep_steps.json").read_text())
    assert [(p["sampler"], p["steps"]) for p in result["points"]] == [("ddim", 3), ("ddim", 5), ("dpm++2m", 3),
                                                                       ("dpm++2m", 5)]
    point = next(p for p in result["points"] if p["name"] == compare["name"])
    assert point["fld"] == compare["fld"]
    assert all(0 <= p[s] <= 1 for p in result["points"] for s in ("precision", "recall", "coverage"))
    assert len({p["fld"] for p in result["points"]}) == 4  # each point drew other images
    assert (conditional_run / "sweep_steps.png").stat().st_size > 10_000
    assert "| ddim-5 |" in capsys.readouterr().out


@pytest.mark.system  # a stage end to end: seconds of training or sampling
def test_guidance_points_at_each_scale(conditional_run):
    assert main(["sweep", "--out", str(conditional_run), "--guidance", "0,2", "--samples", "16", "--quiet"]) == 0
    result = json.loads((conditional_run / "sweep_guidance.json").read_text())
    assert [p["guidance_scale"] for p in result["points"]] == [0.0, 2.0]
    assert [p["name"] for p in result["points"]] == ["ddpm-20-w0", "ddpm-20-w2"]  # the smoke profile's sampler
    assert result["points"][0]["fld"] != result["points"][1]["fld"]
    assert (conditional_run / "sweep_guidance.png").is_file()


@pytest.mark.parametrize(("args", "says"), [
    (["--steps", "4", "--samplers", "ddpm"], "takes all diffusion.timesteps steps"),
    (["--steps", "4", "--samplers", "euler"], "not one of"),
    (["--guidance", "0,abc"], "not a list of numbers"),
    (["--guidance", "-1"], "guidance scale -1 must be >= 0"),
    (["--steps", "4", "--samples", "5"], "must be in [6,"),
])
def test_bad_points_are_refused_in_one_line(conditional_run, capsys, args, says):
    assert main(["sweep", "--out", str(conditional_run), *args, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and "\n" not in err


def test_a_sweep_needs_a_trained_run_and_guidance_a_conditional_model(tmp_path, capsys):
    assert main(["sweep", "--out", str(tmp_path), "--steps", "4"]) == 2
    assert "needs --out RUN_DIR of a trained run" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="needs a digit-conditional model"):
        guidance_specs(load_config("smoke"), [0.0, 1.0])
