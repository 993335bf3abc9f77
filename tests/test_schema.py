"""Bad input derived from the schema, not from a list: every config key's bounds and choices give the values that
must be refused, every file of a finished run is damaged in every way that applies, and each refusal is one
line, exit 2, naming the key or file, with the run folder left as it was. A key or file added tomorrow is
covered by these tests the day it is added."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import shutil
import typing
from pathlib import Path

import pytest

from ddpm.config import Config, ConfigError, load_config
from ddpm.schema import BOUNDS, CHOICES
from flows.cli import main

# str keys without a fixed set of values, each checked by its own parser in `validate`.
FREE_FORM = {"profile", "runs_dir", "data.mirror", "data.download_dir",
             "train.epoch_fld_sampler", "sample.compare", "tracking.mlflow_uri", "tracking.experiment"}
COMMANDS = ("data", "train-classifier", "train", "sample", "evaluate", "pipeline")


def schema() -> list[tuple[str, typing.Any]]:
    """(key, element type) of every leaf of Config: a tuple key gives its elements' type."""
    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind = hints[f.name]
            if dataclasses.is_dataclass(kind):
                yield from walk(kind, f"{f.name}.")
                continue
            if typing.get_origin(kind) is tuple:
                kind = typing.get_args(kind)[0]
            if typing.get_origin(kind) is typing.Literal:  # a str key whose choices its type names
                kind = str
            args = [a for a in typing.get_args(kind) if a is not type(None)]
            yield f"{prefix}{f.name}", args[0] if typing.get_origin(kind) is not None and args else kind
    return list(walk(Config, ""))


def test_every_key_has_bounds_or_choices():
    """A numeric key without bounds, or a str key without choices or a parser, fails here."""
    keys = dict(schema())
    for key, kind in keys.items():
        if kind in (int, float):
            assert key in BOUNDS, f"{key} ({kind.__name__}) has no entry in ddpm.schema.BOUNDS"
        elif kind is str:
            assert key in CHOICES or key in FREE_FORM, f"{key} has neither CHOICES nor a parser (FREE_FORM)"
    assert set(BOUNDS) | set(CHOICES) <= set(keys), "BOUNDS or CHOICES name a key the config does not have"


def bad_values(key: str, kind: type) -> list[str]:
    """Below the low bound, above the high one, not finite, and of the wrong type."""
    b = BOUNDS[key]
    step = 1 if kind is int else 1e-3 * max(1.0, abs(b.low))
    values = [b.low if b.open_low else b.low - step]
    if math.isfinite(b.high):
        values.append(b.high if b.open_high else b.high + step)
    values = [f"{int(v)}" if kind is int else f"{v!r}" for v in values]
    return values + (["nan", "inf", "-inf"] if kind is float else ["2.5", "nan"]) + ["abc"]


CASES = [(key, value) for key, kind in schema() if key in BOUNDS for value in bad_values(key, kind)] + \
    [(key, "bogus") for key in CHOICES] + [("cluster.workers", v) for v in ("0", "3-2", "x")] + \
    [("cluster.use_gpu", "bogus")] + \
    [("train.epoch_fld_sampler", v) for v in ("euler", "ddpm:5", "ddim@-1")]


@pytest.mark.parametrize("key, value", CASES)
def test_a_bad_value_is_refused_naming_its_key(key, value):
    with pytest.raises(ConfigError) as err:
        load_config("smoke", overrides={key: value})
    assert str(err.value).startswith(f"{key}") or f" {key}" in str(err.value), str(err.value)


def one_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory) -> Path:
    """A run folder with a config.json, as any earlier stage leaves it."""
    run = tmp_path_factory.mktemp("existing") / "run"
    run.mkdir()
    (run / "config.json").write_text(load_config("smoke").to_json())
    return run


@pytest.mark.parametrize("index, key, value", [(i, k, v) for i, (k, v) in enumerate(CASES)])
def test_every_command_refuses_it_in_one_line_and_changes_nothing(index, key, value, existing_run, capsys):
    """Each case goes to one command (in turn, so all six see bad values), on a new folder and on an existing
    one: exit 2, one line naming the key, no folder made, no file changed."""
    command = COMMANDS[index % len(COMMANDS)]
    new = existing_run.parent / f"new-{index}"
    before = snapshot(existing_run)
    for out in (new, existing_run):
        args = [command, "--profile", "smoke", "--out", str(out), "--set", f"{key}={value}", "--quiet"]
        assert main(args) == 2
        assert key in one_line(capsys)
    assert not new.exists() and snapshot(existing_run) == before


FLAGS = [("pipeline", "--guidance", "sample.guidance_scale"), ("sample", "--workers", "cluster.sample_actors")]


@pytest.mark.parametrize("command, flag, key, value",
                         [(c, f, k, v) for c, f, k in FLAGS for v in bad_values(k, dict(schema())[k])] +
                         [("train", "--workers", "cluster.workers", v) for v in ("0", "2-1", "x")] +
                         [("sample", "--count", None, v) for v in ("x",)])
def test_flags_are_checked_as_the_keys_they_set(command, flag, key, value, tmp_path, capsys):
    """A flag's bad value (out of its key's bounds, or not even of its type) is one line naming the flag."""
    assert main([command, "--profile", "smoke", "--out", str(tmp_path / "r"), flag, value, "--quiet"]) == 2
    line = one_line(capsys)
    assert flag in line and (key is None or key in line or f"argument {flag}" in line), line  # or argparse's
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("encoding, ok", [("utf-8", True), ("utf-8-sig", True), ("utf-16", True),
                                          ("latin-1", False), ("cp1252", False)])
@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_config_files_in_any_encoding(tmp_path, capsys, encoding, ok, suffix):
    """UTF-8 (with or without a byte-order mark) and UTF-16 with its mark are read; other encodings of non-ASCII
    text are refused in one line naming the file."""
    text = '[tracking]\nexperiment = "débruitage"\n' if suffix == ".toml" else \
        '{"tracking": {"experiment": "débruitage"}}'
    path = tmp_path / f"c{suffix}"
    path.write_bytes(text.encode(encoding))
    if ok:
        assert load_config("smoke", path).tracking.experiment == "débruitage"
    else:
        assert main(["train", "--profile", "smoke", "--config", str(path), "--out", str(tmp_path / "r")]) == 2
        assert str(path) in one_line(capsys) and not (tmp_path / "r").exists()


@pytest.mark.parametrize("content", ["[1, 2]", '"text"', "{\"train\": 3}", "", "{\"train\": {\"epochs\": true}}"])
def test_config_files_of_the_wrong_shape(tmp_path, capsys, content):
    path = tmp_path / "c.json"
    path.write_text(content)
    assert main(["train", "--profile", "smoke", "--config", str(path), "--out", str(tmp_path / "r")]) == 2
    line = one_line(capsys)
    assert str(path) in line or "train" in line, line
    assert not (tmp_path / "r").exists()


# ---- every file of a finished run, damaged ----

TEXT_SUFFIXES = {".json", ".md", ".jsonl"}
# The stage that reads a folder's files when a run is resumed or taken further; a file added to one of these
# folders tomorrow is damaged and read by that stage without this list changing.
READERS = {"data": ("train", "evaluate"), "classifier": ("evaluate",), "unet": ("train",), "samples": ("evaluate",),
           ".": ("train",)}


def damages(path: Path) -> list[str]:
    kinds = ["truncated", "empty", "wrong schema"]
    return kinds + (["wrong encoding"] if path.suffix in TEXT_SUFFIXES else ["garbage"])


def damage(path: Path, kind: str, other: Path) -> None:
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "wrong encoding":
        path.write_bytes(b"\xff\xfe\xfa" + data[3:])  # not UTF-8, and no byte-order mark either
    elif kind == "garbage":
        path.write_bytes(bytes(range(256)) * 4)
    elif path.suffix == ".json":
        path.write_text('{"unexpected": [1, 2, 3]}' if data.lstrip().startswith(b"[") else "[1, 2, 3]")
    else:  # another file of the run in its place: a valid file of the wrong kind
        shutil.copyfile(other, path)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, prepared_data, smoke_lenet) -> Path:
    """A smoke run through evaluation, its data copied (not linked) so that damage stays in this folder."""
    run = tmp_path_factory.mktemp("finished") / "run"
    run.mkdir()
    shutil.copytree(prepared_data, run / "data")
    (run / "classifier").mkdir()
    shutil.copy(smoke_lenet, run / "classifier" / "lenet.pt")
    common = ["--out", str(run), "--quiet"]
    assert main(["train", "--profile", "smoke", "--set", "train.epochs=1", *common]) == 0
    assert main(["sample", "--set", "sample.num_samples=40", *common]) == 0
    assert main(["evaluate", *common]) == 0
    return run


def read_files(run: Path) -> list[Path]:
    return [p for p in sorted(run.rglob("*")) if p.is_file() and p.suffix not in (".png", ".gif", ".md")]


@pytest.mark.system  # a stage end to end: seconds of training or sampling
def test_the_damage_cases_cover_every_stage_file(finished_run):
    """What the next test damages: every file of the run's folders, as listed now (no list of names)."""
    found = {str(p.relative_to(finished_run)) for p in read_files(finished_run)}
    for expected in ("config.json", "data/manifest.json", "data/train.parquet", "classifier/lenet.pt",
                     "unet/history.json", "unet/model.pt", "unet/checkpoints/last.pt", "unet/epoch_fld/epoch_001.json",
                     "samples/samples.parquet", "samples/sampling.json"):
        assert expected in found


@pytest.mark.system  # a stage end to end: seconds of training or sampling
@pytest.mark.parametrize("kind", ["truncated", "empty", "wrong schema", "wrong encoding or garbage"])
def test_every_damaged_file_is_refused_in_one_line_or_remade(finished_run, tmp_path, capsys, kind):
    """Each file, damaged this way in a copy of the run, then the stage that reads it: either the stage
    succeeds (it remade or did not need the file) or it exits 2 with one line naming the file and leaves the
    folder as it was; never a traceback."""
    refused = []
    for index, original in enumerate(read_files(finished_run)):
        relative = original.relative_to(finished_run)
        run = tmp_path / f"r{index}"
        shutil.copytree(finished_run, run)
        path = run / relative
        applies = [k for k in damages(path) if k == kind or (kind.startswith("wrong encoding") and
                                                             k in ("wrong encoding", "garbage"))]
        if not applies:
            continue
        others = [p for p in read_files(run) if p.suffix == path.suffix and p != path]
        damage(path, applies[0], others[0] if others else run / "config.json")
        for command in READERS[relative.parts[0] if len(relative.parts) > 1 else "."]:
            before = snapshot(run)
            code = main([command, "--out", str(run), "--quiet"])
            err = capsys.readouterr().err.strip().splitlines()
            assert code in (0, 2), (str(relative), applies[0], command, code, err[-3:])
            if code == 2:
                break
        if code == 2:
            assert len(err) == 1 and (relative.name in err[0] or str(relative.parent) in err[0]), \
                (str(relative), applies[0], err)
            assert snapshot(run) == before, (str(relative), applies[0])
            refused.append(str(relative))
        shutil.rmtree(run)
    # The damage reached the stages: every file they read back was refused (evaluation.json is read by none).
    assert set(refused) >= {"config.json", "data/manifest.json", "data/test.parquet", "classifier/lenet.pt",
                             "unet/history.json", "unet/model.pt", "unet/checkpoints/last.pt",
                             "samples/samples.parquet"}, refused


# ---- every service address, every wait bounded ----

def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


@pytest.mark.parametrize("variable, address", [
    ("RAY_ADDRESS", "127.0.0.1:{port}"),
    ("RAY_ADDRESS", "ray://127.0.0.1:{port}"),
    ("PREFECT_API_URL", "http://127.0.0.1:{port}/api"),
    ("MLFLOW_TRACKING_URI", "http://bob:pw@127.0.0.1:{port}"),
])
def test_unreachable_services_fail_within_the_timeout(variable, address, tmp_path, capsys, monkeypatch):
    """An address that points nowhere: exit 2 at once, one line naming the variable (its password masked) and
    the fix, nothing made."""
    import time

    monkeypatch.setenv(variable, address.format(port=closed_port()))
    start = time.monotonic()
    assert main(["pipeline", "--profile", "smoke", "--out", str(tmp_path / "r")]) == 2
    line = one_line(capsys)
    assert ("MLflow at" if variable == "MLFLOW_TRACKING_URI" else variable) in line and "does not answer" in line
    assert "pw@" not in line and "make cluster-up" in line
    assert time.monotonic() - start < 30 and not (tmp_path / "r").exists()


def test_a_silent_service_is_waited_on_for_the_configured_timeout_only(tmp_path, capsys, monkeypatch):
    """A server that accepts connections and never answers is given $DDPM_CONNECT_TIMEOUT_S seconds, no more;
    a timeout that is not a number of seconds is itself refused."""
    import socket
    import time

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshakes; nothing ever reads or replies
        monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{silent.getsockname()[1]}/api")
        monkeypatch.setenv("DDPM_CONNECT_TIMEOUT_S", "1.5")
        start = time.monotonic()
        assert main(["pipeline", "--profile", "smoke", "--out", str(tmp_path / "r")]) == 2
        waited = time.monotonic() - start
    line = one_line(capsys)
    assert "PREFECT_API_URL" in line and "within 1.5 s" in line and "DDPM_CONNECT_TIMEOUT_S" in line
    assert 1.5 <= waited < 20  # the wait it was given (plus start-up), not Prefect's minutes of retries
    for bad in ("abc", "0", "-1", "1e9"):
        monkeypatch.setenv("DDPM_CONNECT_TIMEOUT_S", bad)
        assert main(["pipeline", "--profile", "smoke", "--out", str(tmp_path / "r")]) == 2
        assert "DDPM_CONNECT_TIMEOUT_S" in one_line(capsys)
    assert not (tmp_path / "r").exists()


def test_a_lock_held_by_a_live_run_is_waited_on_for_the_configured_time_only(tmp_path, capsys, monkeypatch):
    """A shared cache entry held by a live process (a hung run) is waited on for $DDPM_LOCK_WAIT_S seconds, then
    refused naming the holder and the fix; released in time, it is taken; a bad bound is refused up front."""
    import os
    import subprocess
    import sys
    import threading
    import time

    from ddpm.pipeline.locks import BusyError, exclusive

    lock = tmp_path / ".data-abc.lock"
    hold = ("import sys\nfrom ddpm.pipeline.locks import exclusive\n"
            "with exclusive(sys.argv[1], 'x'):\n    print('held', flush=True)\n    sys.stdin.readline()")

    def holder() -> subprocess.Popen:
        """A process that holds the lock until a line arrives on its stdin."""
        process = subprocess.Popen([sys.executable, "-c", hold, str(lock)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "held"
        return process

    monkeypatch.setenv("DDPM_LOCK_WAIT_S", "1.5")
    hung = holder()
    try:
        start = time.monotonic()
        with pytest.raises(BusyError) as refused, exclusive(lock, "the cache entry data-abc"):
            pytest.fail("entered a lock another live process holds")
        waited = time.monotonic() - start
    finally:
        hung.kill()
        hung.wait()
    message = str(refused.value)
    assert f"pid {hung.pid}" in message and "after 1.5 s" in message and "DDPM_LOCK_WAIT_S" in message
    assert 1.5 <= waited < 20 and "at most 1.5 s" in capsys.readouterr().err

    monkeypatch.setenv("DDPM_LOCK_WAIT_S", "60")
    slow = holder()  # lets go within the bound: the waiting run goes on
    threading.Timer(1.0, lambda: slow.communicate("done\n")).start()
    with exclusive(lock, "the cache entry data-abc"):
        assert lock.read_text().strip() == str(os.getpid())
    assert slow.wait(30) == 0 and "waiting for another run" in capsys.readouterr().err

    for bad in ("abc", "0", "-1", "1e9"):
        monkeypatch.setenv("DDPM_LOCK_WAIT_S", bad)
        assert main(["pipeline", "--profile", "smoke", "--out", str(tmp_path / "r")]) == 2
        assert "DDPM_LOCK_WAIT_S" in one_line(capsys)
    assert not (tmp_path / "r").exists()
