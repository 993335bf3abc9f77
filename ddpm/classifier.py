"""Train the LeNet-5 evaluator whose 84-d penultimate features define the Frechet LeNet Distance.

The FLD depends on the exact LeNet instance, so the saved file carries a fingerprint of its weights
(`evaluator_id`): FLDs are comparable only between runs that used the same evaluator.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ddpm.batches import make_loader
from ddpm.checkpoints import LENET, CheckpointError, load_checkpoint, save_checkpoint
from ddpm.config import ClassifierConfig
from ddpm.data import load_split
from ddpm.errors import UserError
from ddpm.models import LeNet5


class AccuracyTooLowError(UserError):
    """The evaluator did not reach the accuracy that makes its features trustworthy."""


@torch.no_grad()
def accuracy(model: LeNet5, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
             batch_size: int = 2000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = model(images[i : i + batch_size].to(device))
        correct += (logits.argmax(1).cpu() == labels[i : i + batch_size]).sum().item()
    return correct / len(images)


def weights_fingerprint(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def train_lenet(cfg: ClassifierConfig, data_dir: Path, out_path: Path, device: torch.device,
                *, progress: bool = True) -> dict[str, Any]:
    """Train with Adam on the training split, pick nothing on test, save weights + metrics to `out_path`.

    An evaluator below `cfg.min_accuracy` is refused and not saved: its features would not be trustworthy."""
    torch.manual_seed(cfg.seed)
    train_x, train_y = load_split(data_dir, "train", "classifier", limit=cfg.max_train_images, seed=cfg.seed)
    val_x, val_y = load_split(data_dir, "val", "classifier")
    test_x, test_y = load_split(data_dir, "test", "classifier")
    model = LeNet5().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loader = make_loader(train_x, train_y, cfg.batch_size, shuffle=True, seed=cfg.seed)
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        loader.batch_sampler.set_epoch(epoch)
        model.train()
        bar = tqdm(loader, desc=f"LeNet epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
        for x, y in bar:
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    metrics = {
        "val_accuracy": accuracy(model, val_x, val_y, device),
        "test_accuracy": accuracy(model, test_x, test_y, device),
        "epochs": cfg.epochs,
        "train_images": len(train_x),
        "seconds": time.perf_counter() - start,
    }
    model = model.cpu()
    metrics["evaluator_id"] = weights_fingerprint(model)
    if metrics["test_accuracy"] < cfg.min_accuracy:
        raise AccuracyTooLowError(
            f"LeNet reached {metrics['test_accuracy']:.4f} test accuracy, below classifier.min_accuracy="
            f"{cfg.min_accuracy}: train longer (classifier.epochs) or on more images "
            "(classifier.max_train_images=0)"
        )
    save_checkpoint({"kind": LENET, "model": model.state_dict(), "metrics": metrics}, out_path)
    return metrics


def load_lenet(path: Path, device: torch.device | str = "cpu") -> tuple[LeNet5, dict[str, Any]]:
    state = load_checkpoint(path, (LENET,), "train the evaluator first with `ddpm train-classifier --out RUN_DIR`")
    model = LeNet5()
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{path} holds no LeNet-5 weights ({str(exc)[:120]}): delete it and rerun "
                              "`ddpm train-classifier`") from None
    return model.to(device).eval(), state["metrics"]
