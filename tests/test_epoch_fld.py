"""Sample quality per epoch and the model it picks; the global batch that does not depend on the worker count."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ddpm.batches import GlobalBatches, make_loader
from ddpm.checkpoints import UNET, load_checkpoint
from ddpm.config import load_config
from ddpm.pipeline.epoch_fld import epoch_fld_path, finish_training, read_scores
from ddpm.pipeline.stages import RunPaths, train_unet
from ddpm.training import DiffusionTrainer


def smoke(**overrides):
    return load_config("smoke", overrides={"train.epochs": 3, **overrides})


@pytest.mark.system  # a stage end to end: seconds of training or sampling
def test_every_epoch_is_scored_and_the_best_becomes_the_model(smoke_run):
    paths = RunPaths(smoke_run)
    history = train_unet(smoke(), paths, progress=False)
    scores = read_scores(paths)
    assert sorted(scores) == [1, 2, 3]
    assert [h["fld"] for h in history] == [scores[e]["fld"] for e in (1, 2, 3)]
    assert {(s["images"], s["sampler"], s["steps"]) for s in scores.values()} == {(32, "ddim", 5)}
    best = min(history, key=lambda h: h["fld"])["epoch"]
    model = load_checkpoint(paths.model, (UNET,), "")
    assert model["epoch"] == best and f"{model['selection']['epoch_fld']:.3f}" in model["selection"]["reason"]

    # A score lost with its validation task is computed again when training finishes: the same one, because
    # each epoch draws the same seeds from the same weights.
    lost = epoch_fld_path(paths, 2)
    kept = json.loads(lost.read_text())
    lost.unlink()
    finish_training(smoke(), paths, progress=False)
    assert json.loads(lost.read_text())["fld"] == pytest.approx(kept["fld"], rel=1e-9)

    # "last" exports the last epoch whatever the scores say.
    finish_training(smoke(**{"train.export": "last"}), paths, progress=False)
    assert load_checkpoint(paths.model, (UNET,), "")["epoch"] == 3


@pytest.mark.system  # a stage end to end: seconds of training or sampling
def test_scoring_off_exports_the_last_epoch_and_needs_no_evaluator(tmp_path, make_run):
    paths = RunPaths(make_run(tmp_path / "run", lenet=False))
    train_unet(smoke(**{"train.epoch_fld_samples": 0, "train.export": "last", "train.epochs": 2}), paths,
               progress=False)
    model = load_checkpoint(paths.model, (UNET,), "")
    assert (model["epoch"], model["selection"]["reason"]) == (2, "last epoch")
    assert read_scores(paths) == {}


def test_global_batches_do_not_depend_on_the_worker_count():
    one = list(GlobalBatches(100, 33, seed=5, rank=0, world_size=1))
    assert len(one) == 3 and all(len(b) == 33 for b in one)
    for world in (2, 3, 4):
        parts = [list(GlobalBatches(100, 33, seed=5, rank=r, world_size=world)) for r in range(world)]
        assert [sum((p[i] for p in parts), []) for i in range(3)] == one
        assert {len(p[0]) for p in parts} <= {33 // world, 33 // world + 1}


def _gradient(rank: int, world: int, port: int, micro: int, out: str) -> None:
    """The gradient of one step of the smoke U-Net on one global batch of 33 images, split over `world` ranks
    (DDP over gloo) and cut into micro-batches of `micro`. The loss is made deterministic per image (t = 0, no
    noise), so that only the split can change the result."""
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = load_config("smoke", overrides={"train.batch_size": 33, "train.micro_batch": micro, "train.grad_clip": 0,
                                          "cluster.workers": str(world)})
    trainer = DiffusionTrainer(cfg, torch.device("cpu"), rank=rank, world_size=world)
    with torch.no_grad():  # the same nudge on every rank: the zeroed output convolution would pass no gradient
        noise = torch.Generator().manual_seed(7)
        for p in trainer.model.parameters():
            p.add_(torch.randn(p.shape, generator=noise) * 0.05)
    trainer._loss = lambda model, x, y, p: (model(x, torch.zeros(len(x), dtype=torch.long)) - x).pow(2).mean()
    images = torch.rand(66, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    loader = make_loader(images, torch.zeros(66, dtype=torch.long), 33, shuffle=True, seed=0, rank=rank,
                         world_size=world)
    trainer.train_step(*next(iter(loader)))
    if rank == 0:
        torch.save({name: p.grad for name, p in trainer.model.named_parameters()}, out)
    if world > 1:
        dist.destroy_process_group()


@pytest.mark.system  # a stage end to end: seconds of training or sampling
@pytest.mark.parametrize("world, micro", [(1, 5), (2, 0), (3, 4)])
def test_the_gradient_is_the_global_batch_mean_however_it_is_split(tmp_path, world, micro):
    from flows.distributed import free_loopback_port

    _gradient(0, 1, 0, 0, str(tmp_path / "whole.pt"))
    if world == 1:
        _gradient(0, 1, 0, micro, str(tmp_path / "split.pt"))
    else:
        mp.spawn(_gradient, args=(world, free_loopback_port(), micro, str(tmp_path / "split.pt")), nprocs=world)
    whole, split = torch.load(tmp_path / "whole.pt"), torch.load(tmp_path / "split.pt")
    assert all(g.norm() > 0 for g in whole.values())
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-7)
