"""The same config gives the same images and the same scores across refactors of the code: to the last bit on the
machine that recorded the reference, within stated bounds on any other.

Two smoke runs (one unconditional, one digit-conditional under guidance) go through training, sampling with
every sampler in the registry and evaluation; their epoch losses and FLDs, the chosen epoch, every generated set
and the evaluation's FLDs are compared with `tests/data/results_reference.json` (images in
`tests/data/results_images_<machine>.npz`).

Float results are bit-exact only where the same kernels run: the same CPU features, the same torch and numpy, the
same thread count and ISA variables. Each recording is filed under a fingerprint of those (`kernel_fingerprint`).
Where the fingerprint matches, the check is bit-exact. Everywhere, it holds within the bounds below, which
docs/reliability.md justifies with measurements across kernel sets. A change that moves results must say why and
record them again (this adds or replaces this machine's entry):

    DDPM_RECORD_RESULTS=1 .venv/bin/python -m pytest tests/test_results_unchanged.py

To check the bounds against another machine's kernels without one, restrict this one's (docs/reliability.md):

    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 OPENBLAS_CORETYPE=Haswell \\
        .venv/bin/python -m pytest tests/test_results_unchanged.py
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from flows.cli import main

DATA = Path(__file__).parent / "data"
REFERENCE = DATA / "results_reference.json"
# Every sampler, each on the main set's first seeds; the unconditional case runs DDIM with noise (eta > 0).
COMPARE = "sample.compare=ddim:5,ddpm,dpm++2m:4,dpm++2m-sde:4@0"
CASES = {
    "unconditional": (["--set", "sample.eta=0.5"], ["--set", COMPARE]),
    "conditional": (["--set", "unet.num_classes=10"],
                    ["--set", COMPARE, "--set", "sample.sampler=dpm++2m-sde", "--set", "sample.guidance_scale=2"]),
}

# Float sums change with the thread count (another test may leave torch on one thread): the values were
# recorded with torch's default on the 2-core machines CI runs on.
RECORDED_THREADS = 2
# Variables that choose which CPU kernels torch (oneDNN, ATen, MKL) and numpy/scipy (OpenBLAS) run.
KERNEL_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS",
                    "MKL_CBWR", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")

# The bounds across machines: 50 to 100 times the largest drift measured between kernel sets (docs/reliability.md),
# and far below what a real change moves (DDIM's eta 0.49 for 0.5 moved FLDs about 1,000 times the drift).
LOSS_RTOL = 1e-5  # epoch train and validation losses, relative
FLD_RTOL = 1e-4  # FLDs, relative ...
FLD_ATOL = 1e-6  # ... and absolute, for test vs test, which is 0 up to rounding
PIXEL_LEVELS = 1  # no pixel of a generated set moves by more than one uint8 level
PIXEL_SHARE = 0.005  # and at most this share of a set's pixels move at all
HISTOGRAM_MOVES = 2  # generated images whose evaluator label may change (a borderline digit), per run


def kernel_fingerprint() -> dict:
    """What decides the bits of a float result on a CPU: its features, the libraries' versions, the kernels allowed."""
    flags = ""
    if Path("/proc/cpuinfo").exists():
        flags = next((line.split(":", 1)[1] for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith(("flags", "Features"))), "")
    return {"machine": platform.machine(), "cpu_flags": " ".join(sorted(flags.split())),
            "aten_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "numpy": np.__version__, "threads": RECORDED_THREADS,
            "variables": {k: os.environ[k] for k in KERNEL_VARIABLES if k in os.environ}}


def fingerprint_key(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def images_file(key: str) -> Path:
    return DATA / f"results_images_{key}.npz"


@pytest.fixture
def recorded_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(RECORDED_THREADS)
    yield
    torch.set_num_threads(before)


def read_set(path: Path) -> dict[str, np.ndarray]:
    """A samples file's indices, labels and images (not its bytes: Parquet's metadata names its writer)."""
    table = pq.read_table(path)
    images = table.column("image").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return {"index": table.column("index").to_numpy(), "label": table.column("label").to_numpy(),
            "image": images.astype(np.uint8).reshape(len(table), -1)}


def set_hash(columns: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for column in ("index", "label", "image"):
        digest.update(columns[column].tobytes())
    return digest.hexdigest()


def results(run: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The run's comparable results, and its generated sets' images by set name."""
    history = json.loads((run / "unet" / "history.json").read_text())
    evaluation = json.loads((run / "evaluation.json").read_text())
    paths = {"main": run / "samples" / "samples.parquet",
             **{p.stem: p for p in sorted((run / "samples" / "compare").glob("*.parquet"))}}
    sets = {name: read_set(path) for name, path in paths.items()}
    found = {
        "epochs": [{k: h[k] for k in ("epoch", "train_loss", "val_loss", "step", "fld")} for h in history],
        "exported_epoch": evaluation["model"]["epoch"],
        "sets": {name: set_hash(columns) for name, columns in sets.items()},
        "set_labels": {name: columns["label"].tolist() for name, columns in sets.items()},
        "fld": evaluation["fld"],
        "compare_fld": {c["name"]: c["fld"] for c in evaluation["compare"]},
        "label_histogram": evaluation["label_histogram"],
    }
    return found, {name: columns["image"] for name, columns in sets.items()}


def _close(found: float, expected: float, rtol: float, atol: float = 0.0) -> bool:
    return abs(found - expected) <= atol + rtol * abs(expected)


def differences(found: dict, images: dict[str, np.ndarray], expected: dict, expected_images: dict[str, np.ndarray]
                ) -> list[str]:
    """Where `found` leaves the cross-machine bounds around `expected`, one line each (empty: within them)."""
    problems = []
    if [(e["epoch"], e["step"]) for e in found["epochs"]] != [(e["epoch"], e["step"]) for e in expected["epochs"]]:
        problems.append(f"epochs/steps {found['epochs']} != {expected['epochs']}")
    for got, want in zip(found["epochs"], expected["epochs"], strict=False):
        for key, rtol in (("train_loss", LOSS_RTOL), ("val_loss", LOSS_RTOL), ("fld", FLD_RTOL)):
            if not _close(got[key], want[key], rtol):
                problems.append(f"epoch {want['epoch']} {key} {got[key]!r} vs {want[key]!r}")
    if found["exported_epoch"] != expected["exported_epoch"]:
        problems.append(f"exported epoch {found['exported_epoch']} vs {expected['exported_epoch']}")
    for group in ("fld", "compare_fld"):
        if found[group].keys() != expected[group].keys():
            problems.append(f"{group} names {sorted(found[group])} vs {sorted(expected[group])}")
        for name in found[group].keys() & expected[group].keys():
            if not _close(found[group][name], expected[group][name], FLD_RTOL, FLD_ATOL):
                problems.append(f"{group}.{name} {found[group][name]!r} vs {expected[group][name]!r}")
    if found["set_labels"] != expected["set_labels"]:
        problems.append("the generated sets' requested labels differ")
    if images.keys() != expected_images.keys():
        problems.append(f"sets {sorted(images)} vs {sorted(expected_images)}")
    for name in images.keys() & expected_images.keys():
        got, want = images[name].astype(np.int16), expected_images[name].astype(np.int16)
        if got.shape != want.shape:
            problems.append(f"set {name}: shape {got.shape} vs {want.shape}")
            continue
        moved = np.abs(got - want)
        if moved.max() > PIXEL_LEVELS or (moved > 0).mean() > PIXEL_SHARE:
            problems.append(f"set {name}: pixels moved by up to {moved.max()} levels, "
                            f"{(moved > 0).mean():.4%} of them moved")
    for split in ("generated", "test"):
        moves = np.abs(np.subtract(found["label_histogram"][split], expected["label_histogram"][split])).sum() / 2
        if moves > (HISTOGRAM_MOVES if split == "generated" else 0):
            problems.append(f"{split} label histogram {found['label_histogram'][split]} vs "
                            f"{expected['label_histogram'][split]}")
    return problems


def record(case: str, found: dict, images: dict[str, np.ndarray]) -> None:
    fingerprint = kernel_fingerprint()
    key = fingerprint_key(fingerprint)
    recorded = json.loads(REFERENCE.read_text()) if REFERENCE.exists() else {"machines": {}}
    entry = recorded["machines"].setdefault(key, {"fingerprint": fingerprint})
    entry[case] = found
    REFERENCE.write_text(json.dumps(recorded, indent=2, sort_keys=True) + "\n")
    path = images_file(key)
    stored = dict(np.load(path)) if path.exists() else {}
    stored.update({f"{case}/{name}": array for name, array in images.items()})
    np.savez_compressed(path, **stored)


@pytest.mark.system  # a stage end to end: seconds of training or sampling
@pytest.mark.parametrize("case", sorted(CASES))
def test_same_config_same_results(case, make_run, tmp_path, recorded_threads):
    train_args, sample_args = CASES[case]
    run = make_run(tmp_path / "run")
    common = ["--out", str(run), "--quiet"]
    assert main(["train", "--profile", "smoke", *train_args, *common]) == 0
    assert main(["sample", *sample_args, *common]) == 0
    assert main(["evaluate", *common]) == 0
    found, images = results(run)
    if os.environ.get("DDPM_RECORD_RESULTS") == "1":
        record(case, found, images)
        pytest.skip(f"recorded {case} in {REFERENCE} for this machine")
    machines = json.loads(REFERENCE.read_text())["machines"]
    assert machines, f"{REFERENCE} records no machine: record one (see this module's docstring)"
    for key, entry in machines.items():
        with np.load(images_file(key)) as stored:
            expected_images = {name.split("/", 1)[1]: stored[name] for name in stored.files
                               if name.startswith(f"{case}/")}
        problems = differences(found, images, entry[case], expected_images)
        assert not problems, f"results moved beyond the cross-machine bounds of {key}'s recording:\n" + \
            "\n".join(problems)
    here = machines.get(fingerprint_key(kernel_fingerprint()))
    if here is not None:  # the kernels that recorded it: the same bits
        assert found == here[case]


def test_bounds_see_real_moves():
    """The cross-machine bounds pass the recording itself and refuse moves a real change would make."""
    key, entry = next(iter(json.loads(REFERENCE.read_text())["machines"].items()))
    case = sorted(CASES)[0]
    with np.load(images_file(key)) as stored:
        images = {name.split("/", 1)[1]: stored[name] for name in stored.files if name.startswith(f"{case}/")}
    expected = entry[case]
    assert differences(expected, images, expected, images) == []

    def moved(change) -> list[str]:
        found, found_images = json.loads(json.dumps(expected)), {k: v.copy() for k, v in images.items()}
        change(found, found_images)
        return differences(found, found_images, expected, images)

    def fld(found, _):
        found["fld"]["generated_vs_test"] *= 1 + 10 * FLD_RTOL

    def loss(found, _):
        found["epochs"][-1]["val_loss"] *= 1 + 10 * LOSS_RTOL

    def pixel(_, found_images):
        found_images["main"][0, 0] = (int(found_images["main"][0, 0]) + 2) % 256

    def many_pixels(_, found_images):
        share = int(found_images["main"].size * PIXEL_SHARE * 2)
        flat = found_images["main"].reshape(-1)
        flat[:share] = np.where(flat[:share] < 255, flat[:share] + 1, flat[:share] - 1)

    def histogram(found, _):
        found["label_histogram"]["generated"][0] += HISTOGRAM_MOVES + 1
        found["label_histogram"]["generated"][1] -= HISTOGRAM_MOVES + 1

    def epoch(found, _):
        found["exported_epoch"] += 1

    for change, says in ((fld, "generated_vs_test"), (loss, "val_loss"), (pixel, "set main"),
                         (many_pixels, "set main"), (histogram, "generated label histogram"),
                         (epoch, "exported epoch")):
        problems = moved(change)
        assert len(problems) == 1 and says in problems[0], (change.__name__, problems)
