"""Kronecker rules for the layers transformers use: Hugging Face's Conv1D (weight (in, out)),
subclasses of ruled layers through the class hierarchy (NonDynamicallyQuantizableLinear, a
timm-style trivial subclass) with a subclass that changes forward caught, and KFAC "expand" on a
Linear whose rows are not the examples. Against float64 references."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from reference import exact_fisher
from torch import Tensor, nn

import fim_linops as fl
from fim_linops.engine.rules import rule_for
from fim_linops.engine.rules.linear import LinearRule
from fim_linops.operators import KFAC, Mixed

pytestmark = pytest.mark.usefixtures("float64_default")

pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
Conv1D = pytorch_utils.Conv1D


def test_importing_fim_linops_does_not_import_transformers() -> None:
    code = "import sys, fim_linops; assert 'transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=".")


class GPT2ish(nn.Module):
    """Conv1D(d -> h) over (N, T, d) positions, tanh, Conv1D(h -> c), mean over positions."""

    def __init__(self, d: int = 3, h: int = 4, c: int = 3):
        super().__init__()
        self.c_fc = Conv1D(h, d)
        self.c_proj = Conv1D(c, h)
        with torch.no_grad():
            self.c_fc.bias.normal_()
            self.c_proj.weight.normal_()

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(torch.tanh(self.c_fc(x))).mean(1)


class LinearTwin(nn.Module):
    """The same function with nn.Linear (weights transposed)."""

    def __init__(self, src: GPT2ish):
        super().__init__()
        self.c_fc = nn.Linear(*src.c_fc.weight.shape)
        self.c_proj = nn.Linear(*src.c_proj.weight.shape)
        with torch.no_grad():
            for mine, theirs in ((self.c_fc, src.c_fc), (self.c_proj, src.c_proj)):
                mine.weight.copy_(theirs.weight.T)
                mine.bias.copy_(theirs.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(torch.tanh(self.c_fc(x))).mean(1)


def _perm(src: GPT2ish) -> Tensor:
    """Public index of the Conv1D model for each public index of the Linear twin."""
    idx, offset = [], 0
    for layer in (src.c_fc, src.c_proj):
        i, o = layer.weight.shape
        idx.append(offset + torch.arange(i * o).reshape(i, o).T.reshape(-1))  # W^T row-major
        idx.append(offset + i * o + torch.arange(o))
        offset += i * o + o
    return torch.cat(idx)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_hf_conv1d_kfac_equals_linear_kfac_of_the_transposed_weight(approx: str) -> None:
    torch.manual_seed(0)
    model = GPT2ish()
    twin = LinearTwin(model)
    x, y = torch.randn(5, 2, 3), torch.randint(0, 3, (5,))
    assert rule_for(model.c_fc) is not None
    F = fl.fisher(model, (x, y), structure="kfac", kfac_approx=approx)
    assert isinstance(F, KFAC)  # every layer factored: no exact blocks
    ref = fl.fisher(twin, (x, y), structure="kfac", kfac_approx=approx).to_dense()
    p = _perm(model)
    want = torch.empty_like(ref)
    want[p[:, None], p[None, :]] = ref
    torch.testing.assert_close(F.to_dense(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("structure", ["diag", "block_diag", "dense"])
def test_hf_conv1d_per_example_statistics_match_the_reference(structure: str) -> None:
    torch.manual_seed(1)
    model = GPT2ish()
    x, y = torch.randn(4, 2, 3), torch.randint(0, 3, (4,))
    ref = exact_fisher(model, x, "categorical")
    F = fl.fisher(model, (x, y), structure=structure).to_dense()
    if structure == "diag":
        ref = torch.diag(ref.diagonal())
    elif structure == "block_diag":
        cut = 3 * 4 + 4
        ref[:cut, cut:] = 0
        ref[cut:, :cut] = 0
    torch.testing.assert_close(F, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("structure", ["kfac", "ekfac"])
def test_hf_conv1d_kronecker_is_exact_for_one_example_of_one_layer(structure: str) -> None:
    torch.manual_seed(2)
    layer = Conv1D(3, 4)
    with torch.no_grad():
        layer.bias.normal_()
    x, y = torch.randn(1, 4), torch.randint(0, 3, (1,))
    F = fl.fisher(layer, (x, y), structure=structure)
    torch.testing.assert_close(F.to_dense(), exact_fisher(layer, x, "categorical"))


class TimmLinear(nn.Linear):
    """timm's Linear: a subclass whose forward computes the same function."""

    def forward(self, input: Tensor) -> Tensor:
        return nn.functional.linear(input, self.weight, self.bias)


class Doubled(nn.Linear):
    """A subclass whose forward computes something else."""

    def forward(self, input: Tensor) -> Tensor:
        return 2 * super().forward(input)


class Plain(nn.Linear):
    """A subclass that does not override forward."""


def _mlp(cls: type[nn.Linear]) -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), cls(5, 3))


@pytest.mark.parametrize("cls", [TimmLinear, Plain])
def test_subclasses_computing_linear_get_the_linear_rule(cls: type[nn.Linear]) -> None:
    model, twin = _mlp(cls), _mlp(nn.Linear)
    assert isinstance(rule_for(model[2]), LinearRule)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no demotion
        F = fl.fisher(model, (x, y), structure="kfac")
    assert isinstance(F, KFAC)
    torch.testing.assert_close(F.to_dense(), fl.fisher(twin, (x, y), structure="kfac").to_dense())


def test_multihead_attention_out_proj_gets_the_linear_rule_through_the_hierarchy() -> None:
    """out_proj (NonDynamicallyQuantizableLinear) is called as a module by nn.MultiheadAttention's
    capture forward (engine/rules/mha_forward.py), so nn.Linear's rule serves it."""
    mha = nn.MultiheadAttention(4, 2)
    assert type(mha.out_proj) is not nn.Linear and isinstance(mha.out_proj, nn.Linear)
    assert isinstance(rule_for(mha.out_proj), LinearRule)


def test_a_subclass_that_changes_forward_is_sent_to_torch_func() -> None:
    model = _mlp(Doubled)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    with pytest.warns(
        RuntimeWarning,
        match="'2' \\(test_rules_transformers.Doubled\\): its forward .* not compute nn.Linear",
    ):
        F = fl.fisher(model, (x, y), structure="kfac")
    assert isinstance(F, Mixed)
    info = {i.name: i for i in F.layers}
    assert info["2"].structure == "block_diag" and "not compute nn.Linear" in info["2"].reason
    ref = exact_fisher(model, x, "categorical")
    torch.testing.assert_close(F.to_dense()[-18:, -18:], ref[-18:, -18:])
    with pytest.warns(RuntimeWarning):
        D = fl.fisher(model, (x, y), structure="dense")
    torch.testing.assert_close(D.to_dense(), ref)


class PairsFlat(nn.Module):
    """Reward-model layout: (B, 2, D) reshaped into (2B, D) rows for the first Linear."""

    def __init__(self, d: int = 3, h: int = 4, c: int = 2):
        super().__init__()
        self.enc = nn.Linear(d, h)
        self.head = nn.Linear(2 * h, c)

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        h = torch.tanh(self.enc(x.reshape(2 * b, -1)))
        return self.head(h.reshape(b, -1))


class PairsSeq(PairsFlat):
    """The same function with the (B, 2, D) input given to the Linear as it is."""

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.enc(x)).reshape(x.shape[0], -1))


def test_kfac_expand_takes_the_rows_as_they_come() -> None:
    torch.manual_seed(4)
    flat = PairsFlat()
    seq = PairsSeq()
    seq.load_state_dict(flat.state_dict())
    x, y = torch.randn(5, 2, 3), torch.randint(0, 2, (5,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # kfac expand: no demotion
        F = fl.fisher(flat, (x, y), structure="kfac")
    assert isinstance(F, KFAC)
    want = fl.fisher(seq, (x, y), structure="kfac").to_dense()
    torch.testing.assert_close(F.to_dense(), want)
    # the per-example statistics still need the examples on dim 0: torch.func, exact
    ref = exact_fisher(flat, x, "categorical")
    for structure in ("diag", "ekfac"):
        with pytest.warns(RuntimeWarning, match="'enc'.*examples along the first dim"):
            G = fl.fisher(flat, (x, y), structure=structure)
        if structure == "diag":
            torch.testing.assert_close(G.diagonal(), ref.diagonal())
        else:
            assert {i.name: i.structure for i in G.layers} == {"enc": "block_diag", "head": "ekfac"}
            torch.testing.assert_close(G.to_dense()[:16, :16], ref[:16, :16])
