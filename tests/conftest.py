"""Shared fixtures: MNIST is prepared once per session from the local mirror; runs use the `smoke` profile.

Two tiers. A test is marked `system` when it starts a server, a Ray cluster or the pipeline (by its module's
`pytestmark`, its own mark, or a fixture of SYSTEM_FIXTURES that it uses), or runs a stage end to end, seconds
of training or sampling. `make test-quick` runs the rest, the unit tier, in under 2 minutes; there the guard
below fails any test that would start a service anyway, so that part of the tier's promise is checked.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# `make test` runs two workers on a 2-core machine, each with its pipelines and Ray workers: OpenMP threads waiting
# for work then sleep instead of spinning on a core the other needs. The numerics do not change; the time does
# (docs/performance.md, "The test suite"). Read when torch first loads, which no import above does.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Tests start the services they need themselves: a shell that sourced .cluster/env must not point them at a
# running cluster (tests/test_cluster.py brings up its own).
for _var in ("RAY_ADDRESS", "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MNIST_DDPM_RUNS_DIR", "MNIST_MIRROR"):
    os.environ.pop(_var, None)
# As flows/__init__.py does for the product: the local Ray binds to loopback only. Ray reads it at import time,
# so it is set here, before any test module imports ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

# Prefect binds its console log handler to sys.stderr when it is first imported. Imported first inside a test that
# captures with capsys, that handler keeps the test's stream, which pytest closes when the test ends: every later
# in-process flow then fails on its first log line (RecursionError in Prefect's handler). Imported here, it binds
# to the session's capture, which lives as long as the tests do.
import prefect.main  # noqa: E402,F401  (`import prefect` alone defers it)

REPO = Path(__file__).resolve().parents[1]
# What a unit test may not run, as (program, first argument): each starts Ray, a server, or the whole pipeline.
SYSTEM_COMMANDS = {("ddpm", "pipeline"), ("ddpm", "serve"), ("ray", "start"), ("mlflow", "server"),
                   ("cluster.sh", None), ("uvicorn", None), ("orchestration.py", None), ("serve.py", None)}
# Module-scoped fixtures that start a service: whoever uses one is a system test.
SYSTEM_FIXTURES = {"served", "guarded", "mlflow_server", "ray_local"}
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


@pytest.fixture(scope="session")
def smoke_lenet(tmp_path_factory, prepared_data) -> Path:
    """The smoke profile's LeNet evaluator, trained once for the session (U-Net training scores each epoch
    with it, as the pipeline's run folder has it by then)."""
    import torch

    from ddpm.classifier import train_lenet
    from ddpm.config import load_config

    out = tmp_path_factory.mktemp("lenet") / "lenet.pt"
    train_lenet(load_config("smoke").classifier, prepared_data, out, torch.device("cpu"), progress=False)
    return out


def new_run_folder(root: Path, prepared_data: Path, lenet: Path | None) -> Path:
    """A run folder whose data stage is done (linked to the session's prepared data) and, with `lenet`, whose
    evaluator is trained."""
    import shutil

    root.mkdir(parents=True)
    (root / "data").symlink_to(prepared_data, target_is_directory=True)
    if lenet is not None:
        (root / "classifier").mkdir()
        shutil.copy(lenet, root / "classifier" / "lenet.pt")
    return root


@pytest.fixture
def make_run(prepared_data, smoke_lenet):
    """new_run_folder with the session's data and (unless lenet=False) evaluator: make_run(path) -> path."""
    return lambda root, lenet=True: new_run_folder(root, prepared_data, smoke_lenet if lenet else None)


@pytest.fixture
def seed_cache(prepared_data, smoke_lenet):
    """seed_cache(runs): the smoke profile's dataset and evaluator put in a runs folder's cache, as an earlier run
    would have left them, for a pipeline test whose subject is not the cold start (tests/test_flow.py and
    test_faults.py's two pipelines at once prepare them cold)."""
    import shutil

    from ddpm.config import load_config
    from ddpm.pipeline.cache import data_key, lenet_key

    def seed(runs: Path) -> Path:
        cfg, cache = load_config("smoke"), runs / "cache"
        lenet_entry = cache / f"lenet-{lenet_key(cfg)}"
        lenet_entry.mkdir(parents=True)
        (cache / f"data-{data_key(cfg)}").symlink_to(prepared_data, target_is_directory=True)
        shutil.copy(smoke_lenet, lenet_entry / "lenet.pt")
        return runs

    return seed


@pytest.fixture
def smoke_run(tmp_path, prepared_data, smoke_lenet) -> Path:
    """A fresh run folder with the data and LeNet stages done: where U-Net training starts."""
    return new_run_folder(tmp_path / "run", prepared_data, smoke_lenet)


# `make test` runs two pytest-xdist workers, a module to a worker (--dist loadscope): these modules take longest
# (docs/performance.md, "The test suite"), so they start first and the two workers finish together.
LONGEST_FIRST = ("test_cluster", "test_faults", "test_ray", "test_bench", "test_flow", "test_refusals", "test_serve",
                 "test_gpu_sharing", "test_cli")


def pytest_collection_modifyitems(items):
    for item in items:
        if SYSTEM_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.system)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: a module keeps its own order


_exit_status: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _exit_status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Once pytest has reported and written its files:
    - Prefect's temporary server logs "Stopping temporary server" at exit, through handlers that still point at
      pytest's capture streams, closed by then (a logging traceback after a green run): detach them first;
    - then the exit handlers (Prefect's server stopped, Ray shut down) and the exit, without the interpreter's
      teardown of every C extension loaded over the session. After a full serial run, every test green, that
      teardown once crashed (SIGSEGV) and failed `make test` (docs/reliability.md, "The suite's exit")."""
    import atexit
    import logging

    for logger in [logging.root, *map(logging.getLogger, list(logging.root.manager.loggerDict))]:
        for handler in list(getattr(logger, "handlers", [])):
            if type(handler).__module__.startswith("prefect"):
                logger.removeHandler(handler)
    logging.raiseExceptions = False  # whatever logs after this has nowhere useful to go
    if not _exit_status:
        return
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status[-1])


@pytest.fixture(autouse=True)
def unit_tier_starts_no_services(request, monkeypatch):
    """Outside the `system` mark: Ray, Prefect's temporary server and service subprocesses raise instead of
    starting, naming the mark that would allow them."""
    if request.node.get_closest_marker("system") is not None:
        yield
        return
    import subprocess

    import ray
    from prefect.server.api import server as prefect_server

    def refuse(what: str):
        def started(*args, **kwargs):
            raise AssertionError(f"{request.node.nodeid} starts {what}: mark it @pytest.mark.system")
        return started

    monkeypatch.setattr(ray, "init", refuse("Ray"))
    monkeypatch.setattr(prefect_server.SubprocessASGIServer, "start", refuse("Prefect's temporary server"))
    popen_init = subprocess.Popen.__init__

    def guarded_popen(self, args, *rest, **kwargs):
        words = [Path(str(w)).name for w in (args if isinstance(args, (list, tuple)) else str(args).split())]
        words = [w for w in words if not w.startswith("python")]  # `python -m x` and `python x.py` alike
        words = words[1:] if words[:1] == ["-m"] else words
        if words and ((words[0], None) in SYSTEM_COMMANDS or tuple(words[:2]) in SYSTEM_COMMANDS):
            refuse(f"`{' '.join(words)[:120]}`")()
        popen_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded_popen)
    yield
