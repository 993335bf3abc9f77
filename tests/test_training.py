"""The library's training loop: checkpoints every epoch, resume, EMA, NaN guard, safe checkpoint loading."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch

from ddpm.batches import TrainBatches
from ddpm.checkpoints import (
    LENET,
    TRAINING_STATE,
    UNET,
    CheckpointError,
    checkpoint_config,
    load_checkpoint,
    load_model,
)
from ddpm.config import ConfigError, load_config
from ddpm.data import load_split
from ddpm.ema import EMA
from ddpm.pipeline.stages import RunPaths, train_unet
from ddpm.pipeline.training import fit_in_folder, load_training_state
from ddpm.training import DiffusionTrainer, NonFiniteLossError, learning_rate


def smoke(**overrides):
    return load_config("smoke", overrides={"train.epochs": 2, **overrides})


def run_folder(make_run, tmp_path, name):
    return RunPaths(make_run(tmp_path / name))


def state_of(path):
    return load_checkpoint(path, (TRAINING_STATE,), "")


def test_fit_writes_checkpoints_history_and_model(smoke_run):
    cfg = smoke()
    paths = RunPaths(smoke_run)
    history = train_unet(cfg, paths, progress=False)
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(h["train_loss"] > 0 and h["val_loss"] > 0 and h["images_per_s"] > 0 for h in history)
    for name in ("epoch_001.pt", "epoch_002.pt", "last.pt"):
        assert (paths.checkpoints / name).is_file()
    assert json.loads(paths.history.read_text()) == history
    assert paths.loss_png.stat().st_size > 1000
    model, loaded_cfg = load_model(paths.model)
    assert loaded_cfg.unet == cfg.unet
    assert not model.training
    # The exported weights are the EMA weights of the epoch with the lowest epoch FLD.
    assert all(h["fld"] > 0 for h in history)
    best = min(history, key=lambda h: h["fld"])["epoch"]
    chosen = load_checkpoint(paths.model, (UNET,), "")
    assert (chosen["epoch"], chosen["selection"]["rule"], chosen["selection"]["epochs"]) == (best, "best", 2)
    state = state_of(paths.epoch_checkpoint(best))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state["ema"][key])


@pytest.mark.system  # a stage end to end: seconds of training or sampling
def test_resume_continues_at_next_epoch_and_matches_uninterrupted_run(tmp_path, make_run):
    straight, split = run_folder(make_run, tmp_path, "a"), run_folder(make_run, tmp_path, "b")
    fit_in_folder(smoke(**{"train.epochs": 3}), straight, progress=False)
    fit_in_folder(smoke(**{"train.epochs": 2}), split, progress=False)
    history = fit_in_folder(smoke(**{"train.epochs": 3}), split, progress=False)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert json.loads(split.history.read_text()) == history
    a, b = state_of(straight.last_checkpoint), state_of(split.last_checkpoint)
    assert a["step"] == b["step"]
    # Same data order, timesteps and noise after resume: the weights agree to float tolerance.
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-4, atol=1e-5)


def test_resume_refuses_a_different_architecture_or_schedule(tmp_path, make_run):
    paths = run_folder(make_run, tmp_path, "r")
    fit_in_folder(smoke(**{"train.epochs": 1}), paths, progress=False)
    before = paths.last_checkpoint.read_bytes()
    for key, value in (("unet.base_channels", 16), ("diffusion.timesteps", 30), ("diffusion.schedule", "linear")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            fit_in_folder(smoke(**{"train.epochs": 2, key: value}), paths, progress=False)
    assert paths.last_checkpoint.read_bytes() == before


def test_conditional_training_feeds_the_labels_to_the_network(tmp_path, make_run):
    """Rows of the label embedding move only if their labels reached the network; p_uncond=0 leaves the null
    label's row untouched. (A model trained only on its null label would show the opposite.)"""
    paths = run_folder(make_run, tmp_path, "c")
    cfg = smoke(**{"train.epochs": 1, "unet.num_classes": 10, "train.p_uncond": 0.0})
    fit_in_folder(cfg, paths, progress=False)
    trained = state_of(paths.last_checkpoint)["model"]
    init = DiffusionTrainer(cfg, torch.device("cpu")).model.state_dict()
    (key,) = [k for k in trained if "label" in k and k.endswith("weight")]
    moved = (trained[key] - init[key]).abs().sum(dim=1)
    assert (moved[:10] > 0).all() and moved[10] == 0
    # The training split's label shares go into the checkpoint: what the model samples its digits in.
    _, labels = load_split(paths.data, "train", limit=cfg.train.max_train_images, seed=cfg.train.seed)
    recorded = checkpoint_config(state_of(paths.last_checkpoint), paths.last_checkpoint).unet.label_shares
    assert recorded == pytest.approx((torch.bincount(labels, minlength=10) / len(labels)).tolist(), abs=1e-6)


@pytest.mark.parametrize("check_every", [1, 3])
def test_nan_loss_raises_clear_error_and_keeps_finished_epochs(tmp_path, make_run, check_every):
    """Checked every step, or every 3 (the fast path's deferred check): either way the error names the first
    bad step, and the epoch's checkpoint is not written."""
    cfg = smoke(**{"train.epochs": 2, "train.check_every": check_every})
    paths = run_folder(make_run, tmp_path, "n")
    fit_in_folder(load_config("smoke", overrides={"train.epochs": 1}), paths, progress=False)
    trainer = DiffusionTrainer(cfg, torch.device("cpu"))
    trainer.load_state_dict(load_training_state(paths))
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))
    x = torch.zeros(8, 1, 28, 28)
    batches = TrainBatches(x, torch.zeros(8, dtype=torch.long), 4, seed=0)  # 2 steps: fewer than check_every=3
    with pytest.raises(NonFiniteLossError, match=f"step {trainer.step}: lower train.lr"):
        trainer.train_epoch(batches)
    assert state_of(paths.last_checkpoint)["epoch"] == 1


def test_ema_tracks_weights_with_warmup():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.5)
    before = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.add_(2.0)
    ema.update(model, num_updates=1000)  # warm-up over: decay 0.5
    torch.testing.assert_close(ema.model.weight, before + 1.0)
    # Early on the average follows the weights closely: (1 + 0) / (10 + 0) = 0.1 keeps 10% of the old value.
    ema = EMA(model, decay=0.999)
    with torch.no_grad():
        model.weight.add_(10.0)
    ema.update(model, num_updates=0)
    torch.testing.assert_close(ema.model.weight, model.weight - 1.0)
    assert ema.decay_at(10**6) == 0.999


@pytest.mark.system  # a stage end to end: seconds of training or sampling
def test_ema_weights_forget_the_initialisation_in_short_runs(smoke_run):
    """The EMA after a short run is close to the trained weights, not dragged towards the random init."""
    cfg = smoke(**{"train.epochs": 2, "train.ema_decay": 0.999})
    paths = RunPaths(smoke_run)
    train_unet(cfg, paths, progress=False)
    state = state_of(paths.last_checkpoint)
    init = DiffusionTrainer(cfg, torch.device("cpu")).model.state_dict()
    for key, raw in state["model"].items():
        if raw.dtype.is_floating_point and raw.numel() > 100:
            moved = (raw - init[key]).norm()
            assert (state["ema"][key] - raw).norm() < 0.5 * moved, key


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist: run this"):
        load_checkpoint(tmp_path / "missing.pt", (UNET,), "run this")
    truncated = tmp_path / "truncated.pt"
    torch.save({"kind": UNET, "model": {}, "config": {}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(truncated, (UNET,), "")
    lenet = tmp_path / "lenet.pt"
    torch.save({"kind": LENET, "model": {}}, lenet)
    with pytest.raises(CheckpointError, match="is not a mnist-ddpm-unet file"):  # the kind is checked
        load_model(lenet)


def test_the_same_state_saves_to_the_same_bytes(tmp_path):
    """Each save goes through a temporary file with a random name; the checkpoint's bytes must not carry it."""
    from ddpm.checkpoints import save_checkpoint

    state = {"kind": UNET, "model": {"w": torch.arange(6.0).reshape(2, 3)}, "config": {}, "epoch": 1}
    first, second = save_checkpoint(state, tmp_path / "a.pt"), save_checkpoint(state, tmp_path / "b" / "a.pt")
    assert first.read_bytes() == second.read_bytes()
    assert torch.equal(load_checkpoint(first, (UNET,), "")["model"]["w"], state["model"]["w"])


class Evil:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_checkpoints_load_with_weights_only(tmp_path, capsys):
    """A checkpoint that would run code when unpickled is refused, not executed."""
    path = tmp_path / "evil.pt"
    with path.open("wb") as f:
        torch.save({"kind": UNET, "model": Evil(), "config": {}}, f, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(path, (UNET,), "")
    assert "arbitrary code ran" not in capsys.readouterr().out


@pytest.mark.system  # a stage end to end: seconds of training or sampling
def test_the_fast_path_switches_train_exactly_the_same_model(tmp_path, make_run):
    """The training split resident on the device with the finiteness check every 5 steps, against a DataLoader
    and a check every step: the same batches and the same updates, so the same weights to the last bit."""
    results = {}
    for name, resident, check_every in (("plain", "false", "1"), ("fast", "true", "5")):
        paths = run_folder(make_run, tmp_path, name)
        history = fit_in_folder(smoke(**{"train.resident_data": resident, "train.check_every": check_every}), paths,
                      progress=False)
        results[name] = history, state_of(paths.last_checkpoint)
    (plain_history, plain), (fast_history, fast) = results["plain"], results["fast"]
    assert [(h["train_loss"], h["val_loss"], h["step"]) for h in plain_history] == \
           [(h["train_loss"], h["val_loss"], h["step"]) for h in fast_history]
    for key in ("model", "ema"):
        assert all(torch.equal(plain[key][k], fast[key][k]) for k in plain[key])
    assert plain["step"] == fast["step"] == 16  # 2 epochs of 256 images at batch 32


def test_resident_batches_are_the_data_loaders_batches():
    images, labels = torch.randn(70, 1, 28, 28), torch.arange(70)
    for rank, world in ((0, 1), (1, 3)):
        resident = TrainBatches(images, labels, 16, seed=3, rank=rank, world_size=world, resident=True)
        loader = TrainBatches(images, labels, 16, seed=3, rank=rank, world_size=world, resident=False)
        for epoch in (0, 1):
            resident.set_epoch(epoch), loader.set_epoch(epoch)
            pairs = list(zip(resident, loader, strict=True))
            assert len(pairs) == 70 // 16
            for (xa, ya), (xb, yb) in pairs:
                assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_fused_adamw_makes_the_same_updates_up_to_rounding():
    x, y = torch.rand(32, 1, 28, 28) * 2 - 1, torch.zeros(32, dtype=torch.long)
    weights = {}
    for fused in (False, True):
        trainer = DiffusionTrainer(smoke(**{"train.fused_optimizer": str(fused)}), torch.device("cpu"))
        assert trainer.optimizer.defaults["fused"] is (True if fused else None)
        for _ in range(5):
            trainer.train_step(x, y)
        weights[fused] = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    fresh = DiffusionTrainer(smoke(), torch.device("cpu")).model
    initial = torch.cat([p.detach().flatten() for p in fresh.parameters()])
    assert (weights[False] - initial).abs().max() > 1e-3  # five steps did move the weights
    torch.testing.assert_close(weights[True], weights[False], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_learning_rate_schedule(schedule):
    t = smoke(**{"train.lr": 1e-3, "train.lr_schedule": schedule, "train.warmup_steps": 10}).train
    rates = [learning_rate(t, step, 110) for step in range(110)]
    assert rates[0] == pytest.approx(1e-4) and rates[4] == pytest.approx(5e-4)  # linear warm-up
    assert rates[9] == pytest.approx(1e-3) and max(rates) == pytest.approx(1e-3)
    if schedule == "constant":
        assert rates[10:] == [1e-3] * 100
    else:  # from the peak down to 0 at the end, monotonically
        assert all(a >= b for a, b in zip(rates[9:], rates[10:], strict=False)) and rates[-1] < 2e-5
        half = 1e-3 * (0.5 if schedule == "linear" else 0.5 * (1 + math.cos(math.pi / 2)))
        assert rates[60] == pytest.approx(half)
    t = smoke(**{"train.lr": 1e-3}).train
    assert [learning_rate(t, s, 100) for s in (0, 50, 99)] == [1e-3] * 3  # the defaults: the original's rate


def test_trainer_steps_with_the_scheduled_rate(tmp_path, make_run):
    """Every optimizer step takes the schedule's rate for its step of the whole run (epochs x batches)."""
    cfg = smoke(**{"train.lr_schedule": "cosine", "train.warmup_steps": 3, "train.max_train_images": 128})
    paths = run_folder(make_run, tmp_path, "sched")
    fit_in_folder(cfg, paths, progress=False)
    total = 2 * (128 // 32)
    for epoch, last_step in ((1, 3), (2, 7)):  # the rate the epoch's last step was taken with
        state = state_of(paths.epoch_checkpoint(epoch))
        assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(learning_rate(cfg.train, last_step, total))
    assert state_of(paths.epoch_checkpoint(2))["optimizer"]["param_groups"][0]["lr"] < 0.1 * cfg.train.lr  # decayed
