"""Files that must never be half-written, and checkpoints that must never run code.

Every file a stage leaves in a run folder is written here: to a temporary name beside it, then renamed, so a
crash leaves the old file or the new one, never a truncated one. Checkpoints are plain dicts of tensors and
numbers with a `kind` field; they load with `torch.load(weights_only=True)`, which refuses pickled code, and a
file of another kind is refused with a message naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ddpm.errors import UserError, first_line

TRAINING_STATE = "mnist-ddpm-unet-checkpoint"  # unet/checkpoints/*.pt: weights, EMA, optimizer, counters
UNET = "mnist-ddpm-unet"  # unet/model.pt: the sampling weights and the config that builds them
LENET = "mnist-ddpm-lenet"  # classifier/lenet.pt: the evaluator's weights and metrics


class CheckpointError(UserError):
    """A checkpoint file is missing, unreadable, or not the kind of file expected."""


def write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` to a temporary name beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Hidden, unique, same folder (so the rename is atomic), same suffix (so writers that go by it still work).
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: Path, text: str) -> Path:
    return write_atomically(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, payload: Any) -> Path:
    return write_text(path, json.dumps(payload, indent=2) + "\n")


def read_json(path: Path, remake: str, kind: type = dict, keys: tuple[str, ...] = ()) -> Any:
    """A JSON file a stage wrote: a `kind` (dict, or list of dicts) whose dicts hold `keys`. Missing, damaged
    (truncated, empty, not UTF-8) or of another shape, it is refused in one line naming the file and `remake`,
    the command that writes it again."""
    path = Path(path)
    try:
        value = json.loads(path.read_bytes())  # json detects UTF-8/16/32 by itself
    except FileNotFoundError:
        raise UserError(f"{path} is missing: {remake}") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is damaged ({first_line(exc)}): {remake}") from None
    items = value if kind is list and isinstance(value, list) else [value]
    if not isinstance(value, kind) or not all(isinstance(i, dict) and all(k in i for k in keys) for i in items):
        shape = f"{kind.__name__}{' of objects' if kind is list else ''} with {', '.join(keys)}" if keys else \
            kind.__name__
        raise UserError(f"{path} is not what this project writes there (expected a {shape}): {remake}")
    return value


def copy_file(source: Path, target: Path) -> Path:
    return write_atomically(target, lambda tmp: shutil.copyfile(source, tmp))


def save_checkpoint(state: dict[str, Any], path: Path) -> Path:
    if "kind" not in state:
        raise ValueError("a checkpoint needs a `kind` field")
    def write(tmp: Path) -> None:
        # Through a file object, so the zip's top folder is torch's fixed "archive", not the temporary file's
        # random name: the same state gives the same bytes, whichever write made them.
        with open(tmp, "wb") as handle:
            torch.save(state, handle)

    return write_atomically(path, write)


def load_checkpoint(path: Path, kinds: tuple[str, ...], missing_hint: str) -> dict[str, Any]:
    """The dict saved at `path`, if it is one of `kinds`. `missing_hint` says which command makes the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: {missing_hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, a pickle with disallowed globals, not a torch file at all
        raise CheckpointError(f"{path} cannot be read ({first_line(exc)}): delete it and rerun the stage that "
                              "made it") from None
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind not in kinds:
        raise CheckpointError(
            f"{path} is not a {' or '.join(kinds)} file (kind: {kind!r}): point at the file the stage wrote"
        )
    return state
