"""Small deterministic test models and data.

Every factory seeds torch itself and returns ``(model, x, y)`` with N = 6..8 examples, float32
parameters and a model small enough (P up to ~2000) that a dense float64 Fisher is cheap.
Outputs are (N, C); ``y`` holds class indices (N,) int64 unless the factory says otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from fim_linops.likelihoods import Likelihood, get_likelihood

Batch = tuple[nn.Module, Tensor, Tensor]

#: number of outputs of :func:`mlp` per likelihood name
MLP_OUTPUTS: dict[str, int] = {"categorical": 4, "gaussian": 3, "bernoulli": 1}


def _labels(likelihood: str, n: int, c: int) -> Tensor:
    """Targets for ``likelihood``: (N,) int64 classes, (N, C) floats, or (N,) {0, 1} floats."""
    if likelihood == "categorical":
        return torch.randint(0, c, (n,))
    if likelihood == "gaussian":
        return torch.randn(n, c)
    if likelihood == "bernoulli":
        return torch.randint(0, 2, (n,)).float()
    raise ValueError(f"no labels for likelihood {likelihood!r}")


def _perturb_affine(module: nn.Module) -> None:
    """Move norm-layer affine parameters away from (1, 0) so their Fisher is non-trivial."""
    with torch.no_grad():
        if getattr(module, "weight", None) is not None:
            module.weight.copy_(1 + 0.3 * torch.randn_like(module.weight))
        if getattr(module, "bias", None) is not None:
            module.bias.copy_(0.2 * torch.randn_like(module.bias))


def linear(n: int = 6, d_in: int = 4, d_out: int = 3, bias: bool = True, seed: int = 0) -> Batch:
    """One nn.Linear(d_in, d_out); x (N, d_in), y (N, d_out) Gaussian targets."""
    torch.manual_seed(seed)
    model = nn.Linear(d_in, d_out, bias=bias)
    return model, torch.randn(n, d_in), torch.randn(n, d_out)


def mlp(likelihood: str | Likelihood = "categorical") -> Batch:
    """Linear(5,7)-Tanh-Linear(7,6)-ReLU-Linear(6,C): C = 4 / 3 / 1 for categorical / gaussian /
    bernoulli. x (8, 5); y (8,) int64, (8, 3) float, or (8,) {0, 1} float. P = 42+48+7C."""
    name = get_likelihood(likelihood).name
    c = MLP_OUTPUTS[name]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, c))
    n = 8
    x = torch.randn(n, 5)
    return model, x, _labels(name, n, c)


def uneven_mlp() -> tuple[nn.Module, Tensor, Tensor]:
    """A float64 MLP 5-7-3-3 (seed 0) whose dim-0 FSDP shards over 2 ranks are uneven (7 rows ->
    4 + 3, 3 rows -> 2 + 1), x (12, 5), y (12,) categorical labels."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 3)
    ).double()
    x = torch.randn(12, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    return model, x, y


def cnn() -> Batch:
    """Conv2d(stride 2, padding 1) - Conv2d(dilation 2, groups 2) - Conv2d(padding='same',
    reflect) - flatten - Linear to C = 3. x (6, 2, 9, 9), y (6,) int64. P = 491."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1),  # (N, 4, 5, 5)
        nn.Tanh(),
        nn.Conv2d(4, 4, 3, dilation=2, padding=2, groups=2),  # (N, 4, 5, 5)
        nn.ReLU(),
        nn.Conv2d(4, 3, 3, padding="same", padding_mode="reflect"),  # (N, 3, 5, 5)
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(75, 3),
    )
    n = 6
    return model, torch.randn(n, 2, 9, 9), torch.randint(0, 3, (n,))


def cnn1d() -> Batch:
    """Conv1d(stride 2, padding 1) - Conv1d(padding 1, groups 2) - flatten - Linear to C = 3.
    x (6, 3, 11), y (6,) int64. P = 40+28+75."""
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv1d(3, 4, 3, stride=2, padding=1),  # (N, 4, 6)
        nn.Tanh(),
        nn.Conv1d(4, 4, 3, padding=1, groups=2),  # (N, 4, 6)
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(24, 3),
    )
    n = 6
    return model, torch.randn(n, 3, 11), torch.randint(0, 3, (n,))


class SeqModel(nn.Module):
    """Embedding(11, 6) on tokens (N, T) -> LayerNorm(6) -> Linear(6, 6) on every position
    (input (N, T, 6)) -> Tanh -> mean over T -> Linear(6, 3): output (N, 3)."""

    def __init__(self, vocab: int = 11, d: int = 6, c: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, c)

    def forward(self, tokens: Tensor) -> Tensor:
        h = torch.tanh(self.mix(self.norm(self.embed(tokens))))  # (N, T, d)
        return self.head(h.mean(1))


def seq_model() -> Batch:
    """:class:`SeqModel`; x (7, 5) int64 tokens in [0, 11), y (7,) int64 in [0, 3). P = 66+12+42+21."""
    torch.manual_seed(3)
    model = SeqModel()
    _perturb_affine(model.norm)
    n = 7
    return model, torch.randint(0, 11, (n, 5)), torch.randint(0, 3, (n,))


class Affine(nn.Module):
    """Elementwise ``x * scale + shift`` with raw nn.Parameters scale, shift of shape (d,)."""

    def __init__(self, d: int):
        super().__init__()
        self.scale = nn.Parameter(1 + 0.3 * torch.randn(d))
        self.shift = nn.Parameter(0.2 * torch.randn(d))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale + self.shift


class RawParamModel(nn.Module):
    """Linear(5, 6) -> Affine(6) -> Tanh -> Linear(6, 3), output scaled by a top-level raw
    parameter ``temperature`` (3,): output (N, 3). ``temperature`` comes first in the flat order."""

    def __init__(self):
        super().__init__()
        self.temperature = nn.Parameter(1 + 0.2 * torch.randn(3))
        self.fc1 = nn.Linear(5, 6)
        self.affine = Affine(6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.affine(self.fc1(x)))) * self.temperature


def raw_param_model() -> Batch:
    """:class:`RawParamModel`; x (6, 5), y (6,) int64 in [0, 3). P = 3+36+12+21."""
    torch.manual_seed(4)
    model = RawParamModel()
    n = 6
    return model, torch.randn(n, 5), torch.randint(0, 3, (n,))


def frozen_model() -> Batch:
    """Linear(5,7)-Tanh-Linear(7,6)-Tanh-Linear(6,4) with ``0.weight`` and ``2.bias`` frozen
    (requires_grad False). x (8, 5), y (8,) int64 in [0, 4). P = 7+42+28."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 4))
    model[0].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    n = 8
    return model, torch.randn(n, 5), torch.randint(0, 4, (n,))


def norm_model() -> Batch:
    """Linear(5,8) - GroupNorm(2, 8) - Tanh - Linear(8,6) - BatchNorm1d(6) - Tanh - Linear(6,4),
    the whole model in eval mode (BatchNorm uses its non-trivial running statistics).
    x (8, 5), y (8,) int64 in [0, 4). P = 48+16+54+12+28."""
    torch.manual_seed(6)
    model = nn.Sequential(
        nn.Linear(5, 8),
        nn.GroupNorm(2, 8),
        nn.Tanh(),
        nn.Linear(8, 6),
        nn.BatchNorm1d(6),
        nn.Tanh(),
        nn.Linear(6, 4),
    )
    _perturb_affine(model[1])
    _perturb_affine(model[4])
    with torch.no_grad():
        model[4].running_mean.copy_(0.3 * torch.randn(6))
        model[4].running_var.copy_(0.5 + torch.rand(6))
    model.eval()
    n = 8
    return model, torch.randn(n, 5), torch.randint(0, 4, (n,))


class SharedModel(nn.Module):
    """Linear(5, 6) -> Tanh -> shared Linear(6, 6) -> Tanh -> the same shared Linear -> Tanh ->
    Linear(6, 4): output (N, 4). The shared layer's weight appears once in the flat order."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.shared = nn.Linear(6, 6)
        self.out = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))
        return self.out(h)


def shared_model() -> Batch:
    """:class:`SharedModel`; x (7, 5), y (7,) int64 in [0, 4). P = 36+42+28."""
    torch.manual_seed(7)
    model = SharedModel()
    n = 7
    return model, torch.randn(n, 5), torch.randint(0, 4, (n,))


class TiedModel(nn.Module):
    """Embedding(11, 6) on tokens (N, T) -> Linear(6, 6) -> Tanh -> mean over T -> Linear(6, 11)
    whose weight *is* the embedding's weight Parameter (tied): output (N, 11) logits over the
    vocabulary. The tied weight appears once in the flat order, at ``embed.weight``."""

    def __init__(self, vocab: int = 11, d: int = 6):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.out = nn.Linear(d, vocab)
        self.out.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        h = torch.tanh(self.mix(self.embed(tokens)))  # (N, T, d)
        return self.out(h.mean(1))


def tied_model() -> Batch:
    """:class:`TiedModel`; x (6, 4) int64 tokens in [0, 11), y (6,) int64 in [0, 11). P = 66+42+11."""
    torch.manual_seed(8)
    model = TiedModel()
    n = 6
    return model, torch.randint(0, 11, (n, 4)), torch.randint(0, 11, (n,))


#: every model above in its categorical version, by name, for parametrized tests
ALL_MODELS: dict[str, Callable[[], Batch]] = {
    "mlp": mlp,
    "cnn": cnn,
    "cnn1d": cnn1d,
    "seq": seq_model,
    "raw_param": raw_param_model,
    "frozen": frozen_model,
    "norm": norm_model,
    "shared": shared_model,
    "tied": tied_model,
}
