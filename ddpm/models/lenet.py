"""LeNet-5: the MNIST classifier whose penultimate features give the Frechet LeNet Distance."""

from __future__ import annotations

from torch import Tensor, nn


class LeNet5(nn.Module):
    """conv 5x5 1->6, pool, conv 5x5 6->16, pool, fc 256->120->84->10, ReLU throughout: 44,426 parameters."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Sequential(
            *(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2)),  # 28 -> 24 -> 12
            *(nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2)),  # 12 -> 8 -> 4
            nn.Flatten(),
        )
        self.fc = nn.Sequential(nn.Linear(16 * 4 * 4, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU())
        self.head = nn.Linear(84, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """[B, 1, 28, 28] images in [0, 1] -> [B, 84] penultimate ReLU activations."""
        return self.fc(self.conv(x))

    def forward(self, x: Tensor) -> Tensor:
        """[B, 1, 28, 28] images in [0, 1] -> [B, 10] logits."""
        return self.head(self.features(x))
