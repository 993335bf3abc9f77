"""The library's training loop: checkpoints every epoch, resume, EMA, NaN guard, safe checkpoint loading."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from ddpm.config import load_config
from ddpm.stages import RunPaths, train_unet
from ddpm.training import (
    EMA,
    CheckpointError,
    DiffusionTrainer,
    NonFiniteLossError,
    fit,
    load_checkpoint,
    load_model,
    make_loader,
)


def smoke(**overrides):
    return load_config("smoke", overrides={"train.epochs": 2, **overrides})


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
    # The exported weights are the EMA weights of the last checkpoint.
    state = load_checkpoint(paths.checkpoints / "last.pt")
    assert state["epoch"] == 2
    for key, value in model.state_dict().items():
        assert torch.equal(value, state["ema"][key])


def test_resume_continues_at_next_epoch_and_matches_uninterrupted_run(tmp_path, prepared_data):
    straight, split = tmp_path / "a", tmp_path / "b"
    fit(smoke(**{"train.epochs": 3}), prepared_data, straight, progress=False)
    fit(smoke(**{"train.epochs": 2}), prepared_data, split, progress=False)
    history = fit(smoke(**{"train.epochs": 3}), prepared_data, split, progress=False)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    a = load_checkpoint(straight / "checkpoints" / "last.pt")
    b = load_checkpoint(split / "checkpoints" / "last.pt")
    assert a["step"] == b["step"]
    # Same data order, timesteps and noise after resume: the weights agree to float tolerance.
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-4, atol=1e-5)


def test_nan_loss_raises_clear_error_and_keeps_finished_epochs(tmp_path, prepared_data):
    cfg = smoke(**{"train.epochs": 2})
    fit(load_config("smoke", overrides={"train.epochs": 1}), prepared_data, tmp_path, progress=False)
    trainer = DiffusionTrainer(cfg, torch.device("cpu"))
    trainer.load_state_dict(load_checkpoint(tmp_path / "checkpoints" / "last.pt"))
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))
    x = torch.zeros(8, 1, 28, 28)
    loader = make_loader(x, torch.zeros(8, dtype=torch.long), 4, shuffle=True, seed=0)
    with pytest.raises(NonFiniteLossError, match="train.lr"):
        trainer.train_epoch(loader)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["epoch"] == 1


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


def test_ema_weights_forget_the_initialisation_in_short_runs(smoke_run):
    """The EMA after a short run is close to the trained weights, not dragged towards the random init."""
    cfg = smoke(**{"train.epochs": 2, "train.ema_decay": 0.999})
    paths = RunPaths(smoke_run)
    train_unet(cfg, paths, progress=False)
    state = load_checkpoint(paths.checkpoints / "last.pt")
    init = DiffusionTrainer(cfg, torch.device("cpu")).model.state_dict()
    for key, raw in state["model"].items():
        if raw.dtype.is_floating_point and raw.numel() > 100:
            moved = (raw - init[key]).norm()
            assert (state["ema"][key] - raw).norm() < 0.5 * moved, key


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    truncated = tmp_path / "truncated.pt"
    torch.save({"model": {}, "config": {}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(truncated)


class Evil:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_checkpoints_load_with_weights_only(tmp_path):
    """A checkpoint that would run code when unpickled is refused, not executed."""
    path = tmp_path / "evil.pt"
    with path.open("wb") as f:
        torch.save({"model": Evil(), "config": {}}, f, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(path)
