"""The demo task: a small CNN trained for a few seconds on scikit-learn's 8x8 digits."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

#: number of images in scikit-learn's digits data set
N_DIGITS = 1797


def digits_cnn() -> nn.Module:
    """Conv(1->8, 3x3, pad 1) - ReLU - Conv(8->16, 3x3, stride 2, pad 1) - ReLU - Linear(256->10)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


def load_digits_tensors() -> tuple[Tensor, Tensor]:
    """The 1,797 8x8 digits shipped with scikit-learn: x (N, 1, 8, 8) in [0, 1], y (N,)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a test extra
        raise ImportError(
            "the demo needs scikit-learn's digits: pip install scikit-learn (or fim_linops[test])"
        ) from exc

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0, torch.tensor(y)


def train(model: nn.Module, x: Tensor, y: Tensor, seconds: float, seed: int) -> float:
    """Adam (lr 3e-3) on shuffled minibatches of 64, whole epochs until ``seconds`` have passed
    (at least one epoch); returns the training accuracy."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = time.perf_counter()
    while True:
        perm = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        if time.perf_counter() - start >= seconds:
            break
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


@dataclass
class DigitsTask:
    """A trained digits CNN (in eval mode) and the data of the report.

    Attributes:
        model: the trained CNN.
        x, y: all 1,797 digits, (N, 1, 8, 8) and (N,).
        batches: the first ``n_examples`` digits in (x, y) batches of 128: the Fisher's data.
        accuracy: training accuracy after ``seconds`` of Adam.
        seconds, seed: the settings used.
    """

    model: nn.Module
    x: Tensor
    y: Tensor
    batches: list[tuple[Tensor, Tensor]]
    accuracy: float
    seconds: float
    seed: int

    @property
    def n_examples(self) -> int:
        return sum(int(b[1].shape[0]) for b in self.batches)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @classmethod
    def make(cls, seconds: float, n_examples: int, seed: int) -> DigitsTask:
        """Seed torch, load the digits, train a fresh CNN for ``seconds``, batch the first
        ``n_examples`` (1 <= n_examples <= 1797) digits."""
        torch.manual_seed(seed)
        x, y = load_digits_tensors()
        if not 1 <= n_examples <= x.shape[0]:
            raise ValueError(f"--examples must lie in [1, {x.shape[0]}], got {n_examples}")
        if seconds < 0:
            raise ValueError(f"--seconds must be >= 0, got {seconds}")
        model = digits_cnn()
        acc = train(model, x, y, seconds, seed)
        model.eval()
        xs, ys = x[:n_examples], y[:n_examples]
        batches = [(xs[i : i + 128], ys[i : i + 128]) for i in range(0, n_examples, 128)]
        return cls(model, x, y, batches, acc, seconds, seed)
