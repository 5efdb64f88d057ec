"""Modules without a layer rule (torch.func path) and the rarer options of ruled ones, against the
dense float64 torch.func reference: nn.MultiheadAttention (captured through its capture forward),
nn.Bilinear, nn.ConvTranspose2d, nn.Conv3d, BatchNorm1d in eval mode,
circular and replicate padding, 'same' padding with an even kernel, strides per dimension."""

from __future__ import annotations

import pytest
import torch
from reference import assert_matches, exact_fisher
from torch import nn

import fim_linops as fl

N = 5


pytestmark = pytest.mark.usefixtures("float64_default")  # float64 references


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(4, 2, batch_first=True)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.att(x, x, x)[0].mean(1))


class BilinearModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bil = nn.Bilinear(3, 3, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.bil(x, x)))


def _eval_with_statistics(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    return model.eval()


CASES = {
    "attention": (Attention, (N, 3, 4)),
    "bilinear": (BilinearModel, (N, 3)),
    "conv_transpose_bn1d": (
        lambda: _eval_with_statistics(
            nn.Sequential(
                nn.ConvTranspose2d(2, 3, 3, stride=2),
                nn.Tanh(),
                nn.Flatten(),
                nn.Linear(147, 5),
                nn.BatchNorm1d(5),
                nn.Linear(5, 3),
            )
        ),
        (N, 2, 3, 3),
    ),
    "conv3d": (
        lambda: nn.Sequential(nn.Conv3d(1, 2, 2), nn.Flatten(), nn.Linear(16, 3)),
        (N, 1, 3, 3, 3),
    ),
    "conv1d_circular_dilated_grouped": (
        lambda: nn.Sequential(
            nn.Conv1d(4, 8, 3, padding="same", dilation=3, groups=4, padding_mode="circular"),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(72, 3),
        ),
        (N, 4, 9),
    ),
    "conv2d_same_even_kernel_replicate": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, (2, 4), padding="same", padding_mode="replicate"),
            nn.Tanh(),
            nn.Conv2d(3, 2, 3, stride=(2, 1), bias=False),
            nn.Flatten(),
            nn.Linear(16, 3),
        ),
        (N, 2, 5, 6),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("structure", ["dense", "diag", "block_diag", "implicit"])
def test_matches_reference(name: str, structure: str) -> None:
    make, shape = CASES[name]
    torch.manual_seed(0)
    model = make()
    x = torch.randn(*shape)
    y = torch.randint(0, 3, (N,))
    ref = exact_fisher(model, x, "categorical")
    F = fl.fisher(model, (x, y), structure=structure)
    assert_matches(F, ref, model, structure)
    v = torch.randn(ref.shape[0])
    torch.testing.assert_close(F @ v, F.to_dense() @ v, rtol=1e-10, atol=1e-12)
    assert torch.linalg.matrix_norm(ref) > 0
