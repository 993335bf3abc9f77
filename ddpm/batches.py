"""Batches for training and validation: the same optimizer steps on the same images however many ranks share them.

`GlobalBatches` cuts each epoch's seeded permutation into global batches and gives each rank its rows;
`TrainBatches` delivers them on the device (indexing a resident copy, or through a DataLoader); `make_loader`
also serves validation and the LeNet, where each rank takes every world_size-th image (`RankShard`).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset


class GlobalBatches(torch.utils.data.Sampler):
    """This rank's part of each global batch, so that the batches do not depend on how many workers share them.

    Every rank draws the same seeded permutation per epoch and cuts it into global batches of `batch_size`
    (dropping the short last one); rank r takes rows [r B / W, (r + 1) B / W) of each, so shares differ by at
    most one image where W does not divide B. An elastic run that loses a worker therefore takes the same
    optimizer steps, on the same images, as one that did not; resuming replays the order of an uninterrupted run.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.lo, self.hi = rank * batch_size // world_size, (rank + 1) * batch_size // world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.batch_size

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        for first in range(0, len(self) * self.batch_size, self.batch_size):
            yield order[first + self.lo : first + self.hi]


class RankShard(torch.utils.data.Sampler):
    """Every world_size-th index from `rank`, in order (validation: sums are all-reduced, so shares may differ)."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, n, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


class TrainBatches:
    """This rank's part of every global batch of an epoch (`GlobalBatches`), delivered on `device`.

    Resident (`train.resident_data`): the split is copied to the device once, and each epoch's batch indices once
    per epoch, so a step costs one indexing kernel instead of a DataLoader collating single images and a
    host-to-device copy. Otherwise a DataLoader. Both give exactly the same batches.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, *, rank: int = 0,
                 world_size: int = 1, device: torch.device | str = "cpu", resident: bool = True):
        self.device = torch.device(device)
        self.resident = resident
        if resident:
            self.sampler = GlobalBatches(len(images), batch_size, seed, rank, world_size)
            self.images, self.labels = images.to(self.device), labels.to(self.device)
        else:
            self.loader = make_loader(images, labels, batch_size, shuffle=True, seed=seed, rank=rank,
                                      world_size=world_size, pin_memory=self.device.type == "cuda")
            self.sampler = self.loader.batch_sampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        if not self.resident:
            for x, y in self.loader:
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            return
        rows = torch.tensor(list(self.sampler), dtype=torch.int64).to(self.device)  # [batches, this rank's share]
        for index in rows:
            yield self.images[index], self.labels[index]


def make_loader(images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, shuffle: bool, seed: int,
                rank: int = 0, world_size: int = 1, pin_memory: bool = False) -> DataLoader:
    """Training (`shuffle`): this rank's part of every global batch of `batch_size` (`GlobalBatches`). Otherwise
    this rank's shard of the data in batches of `batch_size`."""
    dataset = TensorDataset(images, labels)
    if shuffle:
        return DataLoader(dataset, batch_sampler=GlobalBatches(len(dataset), batch_size, seed, rank, world_size),
                          pin_memory=pin_memory)
    return DataLoader(dataset, batch_size=batch_size, sampler=RankShard(len(dataset), rank, world_size),
                      pin_memory=pin_memory)
