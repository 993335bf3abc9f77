"""`make bench` works: its tiny mode runs every column and writes the table's JSON (timings are not checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.system  # each bench runs whole stages, some the pipeline or the service


def test_tiny_bench_writes_every_column(tmp_path):
    out = tmp_path / "results.json"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "bench.py"), "--tiny", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    cpu = results["devices"]["cpu"]
    assert set(cpu["train"]) == {"batch 4"}
    has_diffusers = results["versions"]["diffusers"] is not None
    expected = {"project", "eager", "profile"} | ({"diffusers"} if has_diffusers else set())  # cpu: bf16
    assert set(cpu["train"]["batch 4"]) == expected
    assert all(v > 0 for v in cpu["train"]["batch 4"].values())
    assert len(cpu["sample"]) == 4 and all(r["project"] > 0 for r in cpu["sample"].values())
    assert results["fld_seconds_10k_x_84"] > 0 and results["peak_rss_mib"] > 0
    assert cpu["profile_switches"] == {"train.cpu_bf16": True}
    assert "| training step (images/s) | project | eager | diffusers | profile |" in result.stdout


def test_tiny_fast_path_bench_times_every_switch(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("fast_path", REPO / "bench" / "fast_path.py")
    fast_path = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fast_path)  # in this process: no second interpreter and torch import
    out = tmp_path / "fast_path.json"
    fast_path.main(["--tiny", "--device", "cpu", "--out", str(out)])
    results = json.loads(out.read_text())
    rows = results["train"]["batch 8"]
    assert len(rows) == 6 and all(r["images_per_s"] > 0 for r in rows.values())
    assert set(results["sample"]) == {f"{s}, noise {n}, compile off" for s in ("ddpm-20", "ddim-5")
                                      for n in ("generator", "philox")}
    assert all(r["seconds"] > 0 for r in results["sample"].values())


def test_tiny_orchestration_bench_runs_every_way(tmp_path):
    """The three ways (in-process, one Ray Train worker, the flow) each train, and their speed is read back."""
    out = tmp_path / "orchestration.json"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "orchestration.py"), "--tiny", "--out", str(out)],
                            capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert set(summary["median_images_per_s"]) == {"in-process", "ray-train", "flow"}
    assert all(r["images_per_s"] > 0 and len(r["epochs"]) == 1 for r in summary["runs"])  # epoch 2 of 2
    assert summary["ratio_to_in_process"]["in-process"] == 1.0
    assert summary["recipe"] == {"profile": "smoke", "steps_per_epoch": 4, "batch": 32, "epochs": 2, "repeats": 1}


@pytest.mark.slow  # two servers start: Ray Serve and the plain app, a minute on the 2-core machine
def test_tiny_serve_bench_measures_both_stacks_alike(tmp_path):
    """`make bench-serve` in its tiny mode: Ray Serve and the plain FastAPI app each serve the same champion and
    answer the same runs, and the table sets them side by side."""
    out = tmp_path / "serve.json"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "serve.py"), "--tiny", "--out", str(out)],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads(out.read_text())
    stacks = results["stacks"]
    assert list(stacks) == ["Ray Serve", "plain FastAPI"]
    assert {s["version"] for s in stacks.values()} == {results["model"]["version"]}
    assert results["same_images_seed_0"]  # the same model, drawn the same way
    assert len({s["device"] for s in stacks.values()}) == 1
    for stack in stacks.values():
        assert [(r["clients"], r["requests"]) for r in stack["runs"]] == [(1, 16), (16, 16)]
        assert all(r["p50_ms"] > 0 and r["requests_per_s"] > 0 for r in stack["runs"])
    batches = stacks["Ray Serve"]["runs"][1]["batch_sizes"]  # the service's own count, this run's only
    assert sum(int(size) * count for size, count in batches.items()) == 16
    assert [r["clients"] for r in results["compared"]] == [1, 16] and len(results["goal"]) == 2
    assert "| 16 | plain FastAPI |" in result.stdout and "| 1 | Ray Serve |" in result.stdout
