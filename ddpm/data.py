"""MNIST: find the four IDX files, parse them strictly, prepare parquet splits, load splits as tensors.

Preparation runs once per run folder: it writes `train/val/test.parquet` (images already scaled to
[-1, 1]) plus a `manifest.json` that records where the data came from and a sha256 of every file,
so later stages can tell a complete dataset from a half-written or altered one.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import struct
import uuid
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from ddpm.config import DataConfig
from ddpm.errors import UserError
from ddpm.pixels import NORMALISATION, model_to_unit, uint8_to_model

# Stem of each file (found as `<stem>.gz` or uncompressed) and the md5 of its uncompressed bytes.
MNIST_FILES = {
    "train_images": ("train-images-idx3-ubyte", "6bbc9ace898e44ae57da46a324031adb"),
    "train_labels": ("train-labels-idx1-ubyte", "a25bea736e30d166cdddb491f175f624"),
    "test_images": ("t10k-images-idx3-ubyte", "2646ac647ad5339dbf082846283269ea"),
    "test_labels": ("t10k-labels-idx1-ubyte", "27ae3e4e09519cfbb04c329615203637"),
}
IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}  # unsigned bytes (0x08); 3 or 1 dimensions
SPLITS = ("train", "val", "test")
SCALES = ("diffusion", "classifier")
FORMAT_VERSION = 1  # the prepared dataset's layout: bump when it changes (also invalidates cached data)
SIDE = 28
_REPO_ROOT = Path(__file__).resolve().parent.parent  # the default mirror is found from here too
_DEFAULT_MIRROR = Path("..") / "shared" / "data" / "mnist"
_DATASET_FILES = ("manifest.json", *(f"{split}.parquet" for split in SPLITS))
_FIX = "re-download MNIST, or point data.mirror, MNIST_MIRROR or --mirror at an intact copy"
_SCHEMA = pa.schema(
    [("image", pa.list_(pa.float32(), SIDE * SIDE)), ("label", pa.int8()), ("source_index", pa.int32())]
)


class DataError(UserError, ValueError):
    """MNIST files or a prepared dataset that cannot be used; the message names the file and the fix."""


# --- locating MNIST -------------------------------------------------------------------------------


def resolve_mirror(configured: str | None) -> Path | None:
    """data.mirror, else $MNIST_MIRROR, else ../shared/data/mnist (from cwd or the repo root), else None."""
    for value, source in (
        (configured, "data.mirror / --mirror"),
        (os.environ.get("MNIST_MIRROR"), "MNIST_MIRROR"),
    ):
        if value:
            path = Path(value).expanduser()
            # An explicit setting that is wrong fails loudly instead of silently falling back to a download.
            if not path.is_dir():
                what = "is a file, not a folder" if path.exists() else "does not exist"
                raise DataError(
                    f"MNIST mirror folder {path} (from {source}) {what}; point {source} at a folder "
                    "holding the four MNIST .gz files, or unset it to use ../shared/data/mnist or a download"
                )
            return path
    for base in (Path.cwd(), _REPO_ROOT):
        if (base / _DEFAULT_MIRROR).is_dir():
            return (base / _DEFAULT_MIRROR).resolve()
    return None


def fetch_mnist(mirror: str | None, download_dir: str) -> Path:
    """A folder holding the four MNIST files: the mirror if one resolves, else a torchvision download."""
    folder = resolve_mirror(mirror)
    if folder is not None:
        return folder
    root = Path(download_dir).expanduser()
    try:
        from torchvision.datasets import MNIST

        MNIST(str(root), train=True, download=True)  # fetches all four files, train and test
    except Exception as exc:
        raise DataError(
            f"no MNIST mirror was found and downloading to {root} failed ({exc}); set MNIST_MIRROR, "
            "data.mirror or `--mirror DIR` to a folder holding the four MNIST .gz files, "
            "or connect to the internet"
        ) from exc
    return root / "MNIST" / "raw"


# --- strict IDX parsing ---------------------------------------------------------------------------


def read_idx(path: Path, expected_md5: str | None, kind: str | None = None) -> np.ndarray:
    """Parse an IDX file (gzipped or not) of unsigned bytes; `kind` ("images"/"labels") pins the magic.

    Structure is checked before the md5 because its messages say more precisely what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file is missing; {_FIX}")
    try:
        raw = path.read_bytes()
    except OSError as exc:  # unreadable (permissions), a folder, a vanished network mount
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc}); {_FIX}") from None
    if raw[:2] == b"\x1f\x8b":  # the gzip magic; anything else is taken as an uncompressed IDX file
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: gzip stream is corrupt or truncated ({exc}); {_FIX}") from None
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    allowed = [IDX_MAGIC[kind]] if kind else list(IDX_MAGIC.values())
    if magic not in allowed:
        what = "too short to hold an IDX header" if magic is None else f"magic number 0x{magic:08x}"
        wanted = f"{kind[:-1]} file" if kind else "image or label file"
        expected = " or ".join(f"0x{m:08x}" for m in allowed)
        raise DataError(f"{path}: {what} is not an IDX {wanted} (expected {expected}); {_FIX}")
    ndim = raw[3]
    unit = "images" if ndim == 3 else "labels"
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: file ends inside its {header}-byte header ({len(raw)} bytes); {_FIX}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if ndim == 3 and dims[1:] != (SIDE, SIDE):
        raise DataError(f"{path}: images are {dims[1]}x{dims[2]}, expected {SIDE}x{SIDE}; {_FIX}")
    item = int(np.prod(dims[1:], dtype=np.int64))
    payload = len(raw) - header
    if payload != dims[0] * item:
        stray = f" and {payload % item} stray bytes" if payload % item else ""
        raise DataError(
            f"{path}: header says {dims[0]} {unit} but file holds {payload // item}{stray}; {_FIX}"
        )
    if expected_md5 is not None:
        md5 = hashlib.md5(raw).hexdigest()
        if md5 != expected_md5:
            raise DataError(
                f"{path}: md5 of the uncompressed content is {md5}, expected {expected_md5}; {_FIX}"
            )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims).copy()  # copy: writable for torch


def _find(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):  # torchvision keeps both; a hand-made mirror may hold either
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder / (stem + '.gz')}: file is missing from the MNIST folder; {_FIX}")


def load_mnist(folder: Path, check_md5: bool = True) -> dict[str, Any]:
    """`train_images`, `test_images` (uint8 [N,28,28]), `train_labels`, `test_labels` (uint8 [N]), `md5`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"MNIST folder {folder} does not exist; {_FIX}")
    out: dict[str, Any] = {"md5": {}}
    for key, (stem, md5) in MNIST_FILES.items():
        path = _find(folder, stem)
        out[key] = read_idx(path, md5 if check_md5 else None, kind=key.split("_")[1])
        out["md5"][path.name] = md5 if check_md5 else None  # None: not verified
    for split in ("train", "test"):
        images, labels = out[f"{split}_images"], out[f"{split}_labels"]
        names = f"{MNIST_FILES[split + '_images'][0]} / {MNIST_FILES[split + '_labels'][0]}"
        if len(images) != len(labels):
            raise DataError(f"{folder}: {names} hold {len(images)} images but {len(labels)} labels; {_FIX}")
        if len(labels) and labels.max() > 9:
            bad = int(np.argmax(labels > 9))
            raise DataError(f"{folder}: {names}: label {labels[bad]} at index {bad} is outside 0..9; {_FIX}")
    return out


# --- preparation ----------------------------------------------------------------------------------


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/val split of range(n); each part sorted so the files keep the source order."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_parquet(path: Path, images: np.ndarray, labels: np.ndarray, index: np.ndarray, bar: tqdm) -> None:
    """Write in row groups of 5,000 images: bounded memory, visible progress, cheap partial reads."""
    with pq.ParquetWriter(path, _SCHEMA) as writer:
        for start in range(0, len(index), 5_000):
            rows = index[start : start + 5_000]
            pixels = uint8_to_model(images[rows].reshape(-1)).numpy()
            batch = pa.record_batch(
                [
                    pa.FixedSizeListArray.from_arrays(pa.array(pixels), SIDE * SIDE),
                    pa.array(labels[rows].astype(np.int8)),
                    pa.array(rows.astype(np.int32)),
                ],
                schema=_SCHEMA,
            )
            writer.write_batch(batch)
            bar.update(len(rows))


def prepare_dataset(out_dir: Path, cfg: DataConfig, progress: bool = True) -> dict[str, Any]:
    """Write the three parquet splits and manifest.json to out_dir, all or nothing; return the manifest."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not _replaceable(out_dir):
        # Replacing means deleting: never do that to a folder holding anything but a prepared dataset.
        raise DataError(
            f"{out_dir} exists and holds more than a prepared MNIST dataset ({', '.join(_DATASET_FILES)}); "
            "choose an empty or new folder"
        )
    folder = fetch_mnist(cfg.mirror, cfg.download_dir)
    mnist = load_mnist(folder)
    train_idx, val_idx = split_indices(len(mnist["train_images"]), cfg.val_fraction, cfg.split_seed)
    splits = {
        "train": ("train", train_idx),
        "val": ("train", val_idx),
        "test": ("test", np.arange(len(mnist["test_images"]))),
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out_dir)
    tmp = _sibling(out_dir, "tmp")
    try:
        tmp.mkdir()  # inside the try: a Ctrl-C that lands just after the mkdir must still remove the folder
        manifest: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "source": str(folder.resolve()),
            "source_md5": mnist["md5"],
            "split_seed": cfg.split_seed,
            "val_fraction": cfg.val_fraction,
            "normalisation": NORMALISATION,
            "counts": {},
            "label_histograms": {},
            "files": {},
        }
        total = sum(len(index) for _, index in splits.values())
        with tqdm(total=total, unit="img", desc="prepare MNIST", disable=not progress) as bar:
            for split, (source, index) in splits.items():
                labels = mnist[f"{source}_labels"]
                _write_parquet(tmp / f"{split}.parquet", mnist[f"{source}_images"], labels, index, bar)
                manifest["counts"][split] = len(index)
                manifest["label_histograms"][split] = np.bincount(labels[index], minlength=10).tolist()
                sha = _sha256(tmp / f"{split}.parquet")
                manifest["files"][split] = {"path": f"{split}.parquet", "sha256": sha}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _replaceable(out_dir: Path) -> bool:
    return out_dir.is_dir() and all(p.name in _DATASET_FILES for p in out_dir.iterdir())


def _sibling(out_dir: Path, tag: str) -> Path:
    """A hidden, unique name next to out_dir: same filesystem, so renames between them are atomic. It carries
    the writer's pid, so that a later run can tell a killed writer's leftovers from a live writer's work."""
    return out_dir.parent / f".{out_dir.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _remove_leftovers(out_dir: Path) -> None:
    """Temp folders and set-aside old datasets of earlier writers that died (SIGTERM, a crash) before they could
    clean up. An old dataset with nothing in its place (the writer died between the swap's two renames) is put
    back instead: it is still the only copy."""
    for tag in ("tmp", "old"):
        for leftover in out_dir.parent.glob(f".{out_dir.name}.{tag}-*"):
            pid = leftover.name.split("-")[-2]
            if not pid.isdigit() or psutil.pid_exists(int(pid)):
                continue
            if tag == "old" and not (out_dir.exists() or out_dir.is_symlink()):
                leftover.rename(out_dir)
            else:
                _discard(leftover)


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """Rename tmp to out_dir; an old out_dir is moved aside first and deleted only once tmp is in place."""
    old = _sibling(out_dir, "old") if out_dir.exists() else None
    try:
        if old is not None:
            out_dir.rename(old)
        tmp.rename(out_dir)
    except BaseException:
        if old is not None and old.exists() and not out_dir.exists():
            old.rename(out_dir)  # interrupted between the two renames: put the old dataset back
        raise
    if old is not None:
        _discard(old)


def _discard(dataset: Path) -> None:
    """Delete a dataset folder; a linked dataset (e.g. shared between runs) is only unlinked, never deleted."""
    if dataset.is_symlink():
        dataset.unlink()
    else:
        shutil.rmtree(dataset, ignore_errors=True)


def _read_manifest(data_dir: Path) -> dict[str, Any]:
    fix = f"prepare it first with `ddpm data --out RUN_DIR` (data_dir: {data_dir})"
    try:
        manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
    except FileNotFoundError:
        raise DataError(f"{data_dir} holds no prepared MNIST dataset (no manifest.json); {fix}") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{data_dir}/manifest.json is unreadable ({exc}); {fix}") from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format_version") != FORMAT_VERSION
        or not isinstance(manifest.get("files"), dict)
    ):
        raise DataError(f"{data_dir}/manifest.json is not a format {FORMAT_VERSION} MNIST manifest; {fix}")
    return manifest


def _check_file(data_dir: Path, manifest: dict[str, Any], split: str) -> Path:
    entry = manifest.get("files", {}).get(split, {})
    path = Path(data_dir) / entry.get("path", f"{split}.parquet")
    if not path.is_file() or _sha256(path) != entry.get("sha256"):
        raise DataError(
            f"{path} is missing or does not match the sha256 in manifest.json; "
            "prepare the data again with `ddpm data --out RUN_DIR`"
        )
    return path


def prepared_ok(out_dir: Path) -> bool:
    """True when out_dir holds a complete prepared dataset: a manifest and parquet files with its sha256s."""
    try:
        manifest = _read_manifest(out_dir)
        for split in SPLITS:
            _check_file(out_dir, manifest, split)
    except DataError:
        return False
    return True


# --- reading --------------------------------------------------------------------------------------


def load_split(
    data_dir: Path, split: str, scale: str = "diffusion", limit: int = 0, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images float32 [N,1,28,28] in [-1,1] ("diffusion") or [0,1] ("classifier"), labels int64 [N].

    limit > 0 keeps a seeded random subset (in file order; a larger limit with the same seed is a superset);
    limit <= 0 or >= N loads the whole split.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    path = _check_file(data_dir, _read_manifest(data_dir), split)
    try:
        table = pq.read_table(path, columns=["image", "label"])
    except (OSError, pa.ArrowException) as exc:
        raise DataError(
            f"{path} is unreadable ({exc}); prepare the data again with `ddpm data --out RUN_DIR`"
        ) from None
    if 0 < limit < table.num_rows:
        table = table.take(np.sort(np.random.default_rng(seed).permutation(table.num_rows)[:limit]))
    pixels = table.column("image").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    images = torch.tensor(pixels.reshape(-1, 1, SIDE, SIDE))
    labels = torch.tensor(table.column("label").to_numpy(zero_copy_only=False), dtype=torch.int64)
    if scale == "classifier":
        images = model_to_unit(images)
    return images, labels


def class_means(data_dir: Path, split: str = "test") -> torch.Tensor:
    """Mean image of each digit, [10,1,28,28] in [-1,1]."""
    images, labels = load_split(data_dir, split)
    counts = torch.bincount(labels, minlength=10)
    if (counts == 0).any():
        missing = counts.eq(0).nonzero().flatten().tolist()
        raise DataError(f"{data_dir}: split {split!r} has no images of digit(s) {missing}")
    sums = torch.zeros(10, 1, SIDE, SIDE).index_add_(0, labels, images)
    return sums / counts.view(10, 1, 1, 1)
