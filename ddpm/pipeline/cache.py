"""Work shared between runs: the flow's `<runs>/cache/` holds prepared datasets and trained evaluators, keyed by
everything that shapes them, so runs with the same data and classifier config prepare each once and their FLDs
stay comparable (they share the evaluator). Where work runs (the config's `cluster` section) shapes neither, so
no key holds it: a run on more workers reuses what a run on one prepared."""

from __future__ import annotations

import hashlib
import json
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from ddpm.config import Config
from ddpm.data import FORMAT_VERSION
from ddpm.pipeline.locks import exclusive


def _key(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def data_key(cfg: Config) -> str:
    return _key({"format": FORMAT_VERSION, "split_seed": cfg.data.split_seed, "val_fraction": cfg.data.val_fraction})


def lenet_key(cfg: Config) -> str:
    return _key({"data": data_key(cfg), "classifier": cfg.classifier.__dict__})


def cache_lock(cache: Path | None, entry: str):
    """Runs sharing the cache prepare each entry once: the second waits for the first, then reuses its work."""
    return nullcontext() if cache is None else exclusive(cache / f".{entry}.lock", f"the cache entry {entry}")


def link(link: Path, target: Path) -> None:
    if link.is_symlink() or link.exists():
        if link.resolve() == target.resolve():
            return
        link.unlink() if link.is_symlink() else shutil.rmtree(link)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target.resolve(), target_is_directory=target.is_dir())
