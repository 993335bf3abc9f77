"""`ddpm serve` for the tests and bench/serve.py: a real MLflow registry (SQLite file) holding small U-Net versions,
and the service as a real subprocess, started, waited for and stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DDPM = REPO / ".venv" / "bin" / "ddpm"


def weights(profile: str, conditional: bool, seed: int) -> dict:
    """A `model.pt`-kind state (the checkpoint writer's format) of an untrained `profile` U-Net, its final
    convolution drawn from `seed`: untrained, it is zero, and every version would draw the same images."""
    import torch

    from ddpm.checkpoints import sampling_weights
    from ddpm.config import load_config
    from ddpm.training import DiffusionTrainer

    cfg = load_config(profile, overrides={"unet.num_classes": "10" if conditional else "0"})
    state = sampling_weights(DiffusionTrainer(cfg, torch.device("cpu")).state_dict())
    final = state["model"]["final.weight"]
    state["model"]["final.weight"] = 0.2 * torch.randn(final.shape, generator=torch.Generator().manual_seed(seed))
    return state


def register_versions(root: Path, specs: list[tuple[str, bool, int]]) -> tuple[str, list[str]]:
    """A SQLite registry under `root` with one version per (profile, conditional, seed), registered as the pipeline
    registers them (`Tracker.register_unet`). Returns its URI and the versions; no alias is set."""
    from ddpm.checkpoints import save_checkpoint
    from flows.tracking import Tracker

    uri = f"sqlite:///{root.resolve()}/mlflow.db"
    tracker = Tracker.start(uri, "serve-test", "serve-test", root, tags={})
    versions = []
    for i, (profile, conditional, seed) in enumerate(specs):
        path = save_checkpoint(weights(profile, conditional, seed), root / f"v{i + 1}" / "model.pt")
        versions.append(tracker.register_unet(tracker.parent_id, path, {
            "fld": 10.0 + i, "model_epoch": i + 1, "profile": profile, "evaluator_id": "test"}))
    return uri, versions


def set_champion(uri: str, version: str) -> None:
    from mlflow.tracking import MlflowClient

    from flows.tracking import CHAMPION, UNET_MODEL

    MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias(UNET_MODEL, CHAMPION, version)


def get(url: str, timeout: float = 60, headers: dict[str, str] | None = None, method: str = "GET"
        ) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of a GET (or `method`), 4xx/5xx included."""
    try:
        request = urllib.request.Request(url, headers=headers or {}, method=method)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def get_json(url: str) -> dict:
    status, _, body = get(url)
    assert status == 200, (status, body)
    return json.loads(body)


@dataclass
class Service:
    """A `ddpm serve` subprocess (its own session, so that its whole process tree can be found and stopped)."""

    process: subprocess.Popen
    url: str
    log: Path

    @classmethod
    def start(cls, uri: str, port: int, log: Path, *args: str, timeout: float = 120,
              env: dict[str, str] | None = None) -> Service:
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
        env.pop("RAY_ADDRESS", None)
        process = subprocess.Popen([str(DDPM), "serve", "--port", str(port), *args], env=env, cwd=REPO,
                                   stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        service = cls(process, f"http://127.0.0.1:{port}", log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"`ddpm serve` exited {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if get(service.url + "/health", timeout=5)[0] == 200:
                    return service
            except OSError:
                pass
            time.sleep(0.5)
        service.stop()
        raise RuntimeError(f"`ddpm serve` did not answer /health in {timeout} s:\n{log.read_text()[-3000:]}")

    def health(self) -> dict:
        return get_json(self.url + "/health")

    def wait_for_version(self, version: str, timeout: float = 60) -> None:
        """Until /health names `version` (the replica's poll found and loaded it)."""
        deadline = time.monotonic() + timeout
        while self.health()["version"] != version:
            if time.monotonic() > deadline:
                raise AssertionError(f"the service still serves {self.health()} after {timeout} s, not v{version}")
            time.sleep(0.2)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, as a scheduler stops a service; its exit status (killed after `timeout`: -9)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


if __name__ == "__main__":  # a registry to try the service by hand: python tests/served.py DIR
    folder = Path(sys.argv[1])
    folder.mkdir(parents=True, exist_ok=True)
    found_uri, found = register_versions(folder, [("smoke", False, 1), ("smoke", True, 2)])
    set_champion(found_uri, found[0])
    print(found_uri, found)
