"""Models and data of the Fisher benchmark (``bench_fisher.py``).

* ``mlp()``: Linear 64-256-256-10 with ReLU (85,002 parameters), for flattened 8x8 digits;
* ``cnn()``: two 3x3 convolutions (1->16, max-pool, 16->32) and a Linear 512->10 (9,930
  parameters), for (1, 8, 8) digits;
* ``resnet18()``: a hand-written CIFAR ResNet-18 (3x3 stem, four stages of two BasicBlocks with
  64/128/256/512 channels, BatchNorm, global average pool, Linear 512->10; 11,173,962
  parameters), in eval mode, for (3, 32, 32) inputs;
* ``digits_batches(image)``: the first 1024 digits of ``sklearn.datasets.load_digits`` in
  batches of 256, float32;
* ``cifar_like_batches()``: 256 random CIFAR-shaped inputs with random labels.

Every constructor seeds torch so that all libraries see the same weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

N_DIGITS, BATCH = 1024, 256


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18 (He et al. 2016, the 3x3-stem variant), 10 classes."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        layers: list[nn.Module] = []
        c_in = 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(
                nn.Sequential(BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1))
            )
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.pool(x)))


def resnet18() -> nn.Module:
    """ResNet-18 in eval mode, with non-trivial BatchNorm running statistics and affine
    parameters (so that BN is not the identity)."""
    torch.manual_seed(0)
    model = ResNet18()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return model.eval()


def digits_batches(image: bool, n: int = N_DIGITS, batch: int = BATCH) -> DataLoader:
    """The first ``n`` digits as float32 batches (not shuffled; NNGeometry needs a DataLoader and
    every library and the floor get the same one): x (B, 64) or (B, 1, 8, 8) in [0, 1], y (B,)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x[:n] / 16.0, dtype=torch.float32)
    y = torch.tensor(y[:n], dtype=torch.long)
    if image:
        x = x.reshape(-1, 1, 8, 8)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def cifar_like_batches(n: int = 256, batch: int = 256) -> DataLoader:
    """``n`` random (3, 32, 32) float32 inputs (standard normal) with random labels in 0..9."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
