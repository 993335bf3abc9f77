"""Shared fixtures: MNIST is prepared once per session from the local mirror; runs use the `smoke` profile."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
MIRROR = REPO.parent / "shared" / "data" / "mnist"


@pytest.fixture(scope="session")
def mirror() -> Path:
    if not MIRROR.is_dir():
        pytest.fail(f"the MNIST mirror {MIRROR} is missing: tests need ../shared/data/mnist beside the repo")
    return MIRROR


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory, mirror) -> Path:
    """The full prepared dataset (Parquet + manifest), built once for the session."""
    from ddpm.config import DataConfig
    from ddpm.data import prepare_dataset

    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare_dataset(out, DataConfig(mirror=str(mirror)), progress=False)
    return out


@pytest.fixture
def smoke_run(tmp_path, prepared_data) -> Path:
    """A fresh run folder whose data stage is already done (linked to the session's prepared data)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "data").symlink_to(prepared_data, target_is_directory=True)
    return run
