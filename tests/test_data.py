"""ddpm.data: strict MNIST parsing, mirror lookup, atomic preparation, split loading (no network)."""

from __future__ import annotations

import gzip
import json
import os
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ddpm import data
from ddpm.config import DataConfig
from ddpm.data import DataError


def idx_bytes(magic: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims) + payload


def write_idx(path: Path, magic: int, dims: tuple[int, ...], payload: bytes, gz: bool = True) -> Path:
    raw = idx_bytes(magic, dims, payload)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def tiny_mirror(folder: Path, n_train: int = 5, n_train_labels: int = 5, bad_label: bool = False) -> Path:
    """Four small, structurally valid IDX files (their md5s are of course not MNIST's)."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n_img, n_lab in (("train", n_train, n_train_labels), ("t10k", 3, 3)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", 0x803, (n_img, 28, 28), bytes(n_img * 784))
        labels = bytes([10 if bad_label else i % 10 for i in range(n_lab)])
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 0x801, (n_lab,), labels)
    return folder


def fake_mnist(n_train: int = 200, n_test: int = 50) -> dict:
    rng = np.random.default_rng(0)
    return {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(n_test) % 10).astype(np.uint8),
        "md5": {"fake": "0" * 32},
    }


# `mirror` and `prepared_data` (the full dataset, prepared once per session) come from conftest.py.


@pytest.fixture(scope="module")
def mnist(mirror):
    return data.load_mnist(mirror)


@pytest.fixture
def tiny_prepared(tmp_path, monkeypatch):
    """A small prepared dataset from fake arrays: cheap to corrupt, fail and re-prepare."""
    monkeypatch.setattr(data, "load_mnist", lambda folder: fake_mnist())
    out = tmp_path / "run" / "data"
    data.prepare_dataset(out, DataConfig(mirror=str(tmp_path)), progress=False)
    return out


# --- the real mirror ------------------------------------------------------------------------------


def test_real_mirror_parses(mnist):
    assert mnist["train_images"].shape == (60_000, 28, 28) and mnist["train_images"].dtype == np.uint8
    assert mnist["test_images"].shape == (10_000, 28, 28)
    assert mnist["train_labels"].shape == (60_000,) and mnist["test_labels"].shape == (10_000,)
    assert set(np.unique(mnist["train_labels"])) == set(range(10)) == set(np.unique(mnist["test_labels"]))
    assert mnist["md5"] == {f"{stem}.gz": md5 for stem, md5 in data.MNIST_FILES.values()}


def test_uncompressed_idx_is_accepted(tmp_path):
    path = write_idx(tmp_path / "labels", 0x801, (4,), bytes([1, 2, 3, 4]), gz=False)
    assert data.read_idx(path, None, kind="labels").tolist() == [1, 2, 3, 4]


# --- every kind of broken file --------------------------------------------------------------------


def test_md5_mismatch(tmp_path, mirror):
    # A real labels file with one label changed: structurally valid, only the md5 can tell.
    folder = tmp_path / "mirror"
    folder.mkdir()
    for stem, _ in data.MNIST_FILES.values():
        (folder / f"{stem}.gz").symlink_to((mirror / f"{stem}.gz").resolve())
    raw = bytearray(gzip.decompress((mirror / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    raw[100] = (raw[100] + 1) % 10
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(
        DataError, match=r"t10k-labels-idx1-ubyte.gz: md5 .* is [0-9a-f]{32}, expected 27ae3e4e"
    ) as e:
        data.load_mnist(folder)
    assert "MNIST_MIRROR" in str(e.value)


def test_bad_magic(tmp_path):
    labels = write_idx(tmp_path / "labels.gz", 0x801, (2,), bytes(2))
    with pytest.raises(DataError, match=r"magic number 0x00000801 is not an IDX image file.*re-download"):
        data.read_idx(labels, None, kind="images")
    junk = write_idx(tmp_path / "junk.gz", 0x12345678, (2,), bytes(2))
    with pytest.raises(DataError, match=r"junk.gz: magic number 0x12345678 is not an IDX"):
        data.read_idx(junk, None)


def test_wrong_image_size(tmp_path):
    path = write_idx(tmp_path / "img.gz", 0x803, (1, 32, 32), bytes(32 * 32))
    with pytest.raises(DataError, match="images are 32x32, expected 28x28"):
        data.read_idx(path, None, kind="images")


def test_truncated_payload(tmp_path):
    path = write_idx(tmp_path / "img.gz", 0x803, (3, 28, 28), bytes(2 * 784 + 100))
    with pytest.raises(DataError, match="img.gz: header says 3 images but file holds 2 and 100 stray bytes"):
        data.read_idx(path, None, kind="images")
    short = tmp_path / "short"
    short.write_bytes(idx_bytes(0x803, (3, 28, 28), b"")[:9])
    with pytest.raises(DataError, match="ends inside its 16-byte header"):
        data.read_idx(short, None, kind="images")


def test_wrong_count_in_header(tmp_path):
    path = write_idx(tmp_path / "labels.gz", 0x801, (60_000,), bytes(59_999))
    with pytest.raises(DataError, match="header says 60000 labels but file holds 59999;"):
        data.read_idx(path, None, kind="labels")


def test_image_label_count_mismatch(tmp_path):
    folder = tiny_mirror(tmp_path / "m", n_train=5, n_train_labels=4)
    with pytest.raises(DataError, match="hold 5 images but 4 labels"):
        data.load_mnist(folder, check_md5=False)


def test_label_out_of_range(tmp_path):
    folder = tiny_mirror(tmp_path / "m", bad_label=True)
    with pytest.raises(DataError, match=r"label 10 at index 0 is outside 0\.\.9"):
        data.load_mnist(folder, check_md5=False)


def test_missing_file(tmp_path):
    folder = tiny_mirror(tmp_path / "m")
    (folder / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: file is missing.*data.mirror"):
        data.load_mnist(folder, check_md5=False)


def test_corrupt_and_truncated_gzip(tmp_path):
    good = gzip.compress(idx_bytes(0x803, (50, 28, 28), np.random.default_rng(0).bytes(50 * 784)))
    (tmp_path / "cut.gz").write_bytes(good[: len(good) // 2])
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    (tmp_path / "flip.gz").write_bytes(bytes(flipped))
    for name in ("cut.gz", "flip.gz"):
        with pytest.raises(DataError, match=f"{name}: gzip stream is corrupt or truncated"):
            data.read_idx(tmp_path / name, None)


# --- locating the mirror --------------------------------------------------------------------------


def test_unreadable_mirror_file_is_named(mirror):
    """A mirror file the user may not read: one line naming it, exit 2, nothing written. Root reads every file,
    so as root the command runs as `nobody` (setpriv), in a folder outside pytest's private temp root."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    command = [str(Path(sys.executable).with_name("ddpm")), "data", "--quiet"]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: no way to make a file unreadable")
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    root = Path(tempfile.mkdtemp(prefix="ddpm-unreadable-"))
    try:
        root.chmod(0o777)
        (root / "m").mkdir(mode=0o755)
        for f in mirror.glob("*.gz"):
            shutil.copy(f, root / "m" / f.name)
        locked = root / "m" / "train-labels-idx1-ubyte.gz"
        locked.chmod(0)
        result = subprocess.run([*command, "--mirror", str(root / "m"), "--out", str(root / "run")],
                                capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(root)})
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.strip() == (f"error: {locked}: cannot be read (Permission denied); re-download MNIST, "
                                         "or point data.mirror, MNIST_MIRROR or --mirror at an intact copy")
        assert not (root / "run").exists()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_missing_mirror_folder(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'nope'} .*does not exist; point data.mirror"):
        data.resolve_mirror(str(tmp_path / "nope"))


def test_mnist_mirror_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MNIST_MIRROR", str(tmp_path))
    assert data.resolve_mirror(None) == tmp_path
    assert data.fetch_mnist(None, str(tmp_path / "dl")) == tmp_path
    assert data.resolve_mirror(str(tmp_path / ".")) == tmp_path  # the config value wins
    monkeypatch.setenv("MNIST_MIRROR", str(tmp_path / "gone"))
    with pytest.raises(DataError, match="from MNIST_MIRROR"):
        data.resolve_mirror(None)


def test_default_mirror_found_from_repo_root(tmp_path, monkeypatch, mirror):
    monkeypatch.delenv("MNIST_MIRROR", raising=False)
    monkeypatch.chdir(tmp_path)  # not found from here, so it must come from the repository root
    assert data.resolve_mirror(None) == mirror.resolve()


def test_download_when_no_mirror(tmp_path, monkeypatch):
    import torchvision.datasets

    monkeypatch.delenv("MNIST_MIRROR", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "_REPO_ROOT", tmp_path)
    assert data.resolve_mirror(None) is None

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(DataError, match="no MNIST mirror was found.*MNIST_MIRROR.*--mirror DIR.*internet"):
        data.fetch_mnist(None, str(tmp_path / "dl"))
    monkeypatch.setattr(torchvision.datasets, "MNIST", lambda root, train, download: None)
    assert data.fetch_mnist(None, str(tmp_path / "dl")) == tmp_path / "dl" / "MNIST" / "raw"


# --- preparation ----------------------------------------------------------------------------------


def test_prepare_full_dataset(prepared_data):
    out = prepared_data
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "test.parquet",
        "train.parquet",
        "val.parquet",
    ]
    assert manifest["counts"] == {"train": 54_000, "val": 6_000, "test": 10_000}
    assert manifest["normalisation"] == "x / 127.5 - 1" and manifest["split_seed"] == 0
    assert {split: sum(h) for split, h in manifest["label_histograms"].items()} == manifest["counts"]
    assert set(manifest["source_md5"].values()) == {md5 for _, md5 in data.MNIST_FILES.values()}
    assert data.prepared_ok(out)
    tables = {split: pq.read_table(out / f"{split}.parquet") for split in data.SPLITS}
    schema = tables["train"].schema
    assert schema.field("image").type == pa.list_(pa.float32(), 784)
    assert schema.field("label").type == pa.int8() and schema.field("source_index").type == pa.int32()
    train_idx = tables["train"].column("source_index").to_numpy()
    val_idx = tables["val"].column("source_index").to_numpy()
    assert not set(train_idx) & set(val_idx)
    assert sorted(np.concatenate([train_idx, val_idx]).tolist()) == list(range(60_000))
    expected_train, expected_val = data.split_indices(60_000, 0.1, 0)
    assert (train_idx == expected_train).all() and (val_idx == expected_val).all()


def test_prepared_values_match_source(prepared_data, mnist):
    out = prepared_data
    images, labels = data.load_split(out, "val")
    assert (
        images.shape == (6_000, 1, 28, 28) and images.dtype == torch.float32 and labels.dtype == torch.int64
    )
    assert images.min() == -1 and images.max() == 1
    source = pq.read_table(out / "val.parquet", columns=["source_index"]).column(0).to_numpy()
    expected = mnist["train_images"][source].astype(np.float32) / 127.5 - 1
    assert np.array_equal(images.numpy()[:, 0], expected)
    assert np.array_equal(labels.numpy(), mnist["train_labels"][source])


def test_split_is_seeded():
    a_train, a_val = data.split_indices(60_000, 0.1, seed=0)
    b_train, b_val = data.split_indices(60_000, 0.1, seed=0)
    c_train, c_val = data.split_indices(60_000, 0.1, seed=1)
    assert np.array_equal(a_val, b_val) and np.array_equal(a_train, b_train)
    assert len(c_val) == 6_000 and not np.array_equal(a_val, c_val)


def test_prepare_failure_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "load_mnist", lambda folder: fake_mnist())
    real_write = data._write_parquet

    def fail_on_val(path, *args):
        if path.name == "val.parquet":
            raise OSError("disk full")
        real_write(path, *args)

    monkeypatch.setattr(data, "_write_parquet", fail_on_val)
    out = tmp_path / "data"
    with pytest.raises(OSError, match="disk full"):
        data.prepare_dataset(out, DataConfig(mirror=str(tmp_path)), progress=False)
    assert list(tmp_path.iterdir()) == []  # neither out_dir nor a temp folder


def test_ctrl_c_just_after_a_step_leaves_the_old_dataset_and_no_temp_folder(tiny_prepared, monkeypatch):
    """A signal lands at a bytecode boundary, so also just after the temp folder's mkdir or between the two
    renames of the swap. CI once caught the first (a `.data.tmp-*` left by Ctrl-C): each is forced here."""
    out = tiny_prepared
    before = (out / "manifest.json").read_text()
    real_mkdir, real_rename = Path.mkdir, Path.rename

    def interrupt_after(real, tag):
        def step(self, *args, **kwargs):
            result = real(self, *args, **kwargs)
            if f".{tag}-" in self.name or (tag == "swap" and self == out):
                raise KeyboardInterrupt
            return result
        return step

    for method, real, tag in (("mkdir", real_mkdir, "data.tmp"), ("rename", real_rename, "swap")):
        monkeypatch.setattr(Path, method, interrupt_after(real, tag))
        with pytest.raises(KeyboardInterrupt):
            data.prepare_dataset(out, DataConfig(mirror=str(out.parent.parent), split_seed=7), progress=False)
        monkeypatch.setattr(Path, method, real)
        assert [p.name for p in out.parent.iterdir()] == ["data"], tag
        assert (out / "manifest.json").read_text() == before and data.prepared_ok(out)


def test_a_dead_writers_set_aside_dataset_is_put_back_or_removed(tiny_prepared, tmp_path):
    """A writer killed between the swap's renames leaves `.data.old-<pid>-*` and no `data`: the next writer puts
    it back. Killed after the new dataset is in place, it leaves the old one beside it: removed (a link unlinked,
    its target kept). A live writer's are left alone."""
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tiny_prepared
    manifest = (out / "manifest.json").read_text()
    aside = out.with_name(f".data.old-{dead.pid}-deadbeef")
    out.rename(aside)
    data._remove_leftovers(out)
    assert (out / "manifest.json").read_text() == manifest and not aside.exists()

    target = tmp_path / "elsewhere"
    target.mkdir()
    live = out.with_name(f".data.old-{os.getpid()}-cafebabe")
    live.mkdir()
    copy = out.with_name(f".data.old-{dead.pid}-0000beef")
    copy.mkdir()
    (copy / "manifest.json").write_text(manifest)
    link = out.with_name(f".data.old-{dead.pid}-1111beef")
    link.symlink_to(target, target_is_directory=True)
    data._remove_leftovers(out)
    assert not copy.exists() and not link.is_symlink() and target.is_dir() and live.is_dir()
    assert data.prepared_ok(out)


def test_failed_reprepare_keeps_old_and_success_replaces(tiny_prepared, monkeypatch):
    out = tiny_prepared
    before = (out / "manifest.json").read_text()

    def disk_full(*args):
        raise OSError("disk full")

    monkeypatch.setattr(data, "_write_parquet", disk_full)
    with pytest.raises(OSError):
        data.prepare_dataset(out, DataConfig(mirror=str(out.parent.parent), split_seed=7), progress=False)
    assert (out / "manifest.json").read_text() == before and data.prepared_ok(out)
    assert [p.name for p in out.parent.iterdir()] == ["data"]
    monkeypatch.undo()
    monkeypatch.setattr(data, "load_mnist", lambda folder: fake_mnist())
    manifest = data.prepare_dataset(
        out, DataConfig(mirror=str(out.parent.parent), split_seed=7), progress=False
    )
    assert manifest["split_seed"] == 7 and data.prepared_ok(out)
    assert [p.name for p in out.parent.iterdir()] == ["data"]  # no temp or old folders left


def test_reprepare_through_symlink_keeps_its_target(tiny_prepared, tmp_path):
    # conftest's smoke runs link run/data to the session's dataset: re-preparing must not delete that.
    link = tmp_path / "run2" / "data"
    link.parent.mkdir()
    link.symlink_to(tiny_prepared, target_is_directory=True)
    data.prepare_dataset(link, DataConfig(mirror=str(tmp_path), split_seed=5), progress=False)
    assert not link.is_symlink() and data.prepared_ok(link) and data.prepared_ok(tiny_prepared)
    assert [p.name for p in link.parent.iterdir()] == ["data"]


def test_prepare_refuses_to_replace_other_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "load_mnist", lambda folder: fake_mnist())
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.pt").write_text("precious")
    with pytest.raises(DataError, match="holds more than a prepared MNIST dataset"):
        data.prepare_dataset(tmp_path / "run", DataConfig(mirror=str(tmp_path)), progress=False)
    assert (tmp_path / "run" / "model.pt").read_text() == "precious"


# --- reading --------------------------------------------------------------------------------------


def test_load_split_scales_and_limit(tiny_prepared):
    images, labels = data.load_split(tiny_prepared, "train")
    assert images.shape == (180, 1, 28, 28) and labels.shape == (180,)
    assert images.min() == -1 and images.max() == 1
    small, small_labels = data.load_split(tiny_prepared, "train", scale="classifier", limit=20, seed=3)
    assert small.shape == (20, 1, 28, 28) and small.min() == 0 and small.max() == 1
    again, _ = data.load_split(tiny_prepared, "train", scale="classifier", limit=20, seed=3)
    other, _ = data.load_split(tiny_prepared, "train", scale="classifier", limit=20, seed=4)
    assert torch.equal(small, again) and not torch.equal(small, other)
    # Each limited image is one of the full split's images, rescaled.
    rows = {tuple(x.flatten().tolist()) for x in (images + 1) / 2}
    assert all(tuple(x.flatten().tolist()) in rows for x in small)
    assert data.load_split(tiny_prepared, "test", limit=10_000)[0].shape[0] == 50
    with pytest.raises(ValueError, match="unknown split"):
        data.load_split(tiny_prepared, "validation")
    with pytest.raises(ValueError, match="unknown scale"):
        data.load_split(tiny_prepared, "train", scale="unit")


def test_class_means(tiny_prepared):
    means = data.class_means(tiny_prepared)
    images, labels = data.load_split(tiny_prepared, "test")
    assert means.shape == (10, 1, 28, 28) and means.min() >= -1 and means.max() <= 1
    assert torch.allclose(means[3], images[labels == 3].mean(0))


def test_missing_or_corrupt_prepared_data(tiny_prepared, tmp_path):
    with pytest.raises(DataError, match="no manifest.json.*ddpm data --out RUN_DIR"):
        data.load_split(tmp_path / "nothing", "train")
    assert not data.prepared_ok(tmp_path / "nothing")
    raw = bytearray((tiny_prepared / "val.parquet").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (tiny_prepared / "val.parquet").write_bytes(bytes(raw))
    assert not data.prepared_ok(tiny_prepared)
    with pytest.raises(DataError, match="val.parquet .*sha256.*ddpm data --out RUN_DIR"):
        data.load_split(tiny_prepared, "val")
    data.load_split(tiny_prepared, "train")  # the intact splits still load
    (tiny_prepared / "manifest.json").write_text("{")
    with pytest.raises(DataError, match="manifest.json is unreadable"):
        data.load_split(tiny_prepared, "train")


def test_prepare_with_missing_mirror_writes_nothing(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.prepare_dataset(tmp_path / "out", DataConfig(mirror=str(tmp_path / "nope")), progress=False)
    assert not (tmp_path / "out").exists()


def test_uncompressed_mirror(tmp_path, mirror):
    # torchvision leaves the files uncompressed next to the .gz; a folder of those parses too.
    for stem, _ in data.MNIST_FILES.values():
        (tmp_path / stem).write_bytes(gzip.decompress((mirror / f"{stem}.gz").read_bytes()))
    assert data.load_mnist(tmp_path)["md5"] == {stem: md5 for stem, md5 in data.MNIST_FILES.values()}
