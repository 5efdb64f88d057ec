"""Function-space entry points (Jacobian, NTK, GP kernel, Laplace predictives) on models whose
layers the first-batch checks send to torch.func (calls shared by all examples, time-major
sequences, (N*T, D) flattening, keyword calls): against float64 references by torch.func.jacrev
and J P^-1 J^T with P the library's own posterior precision."""

from __future__ import annotations

import warnings

import pytest
import torch
from reference import per_example_jacobians
from torch import nn

import fim_linops as fl

pytestmark = pytest.mark.usefixtures("float64_default")
N, T = 5, 4


class SharedPositions(nn.Module):
    """pos(arange(T)[None]): a (1, T) call shared by all examples (GPT-2's wpe)."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos, self.out = nn.Embedding(11, 4), nn.Embedding(8, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos(torch.arange(x.shape[1])[None])
        return self.out(torch.tanh(h).mean(1))


class TimeMajorLSTM(nn.Module):
    """(T, N, D) into an LSTM and a Linear (batch_first=False)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.lin, self.out = nn.LSTM(3, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(x.transpose(0, 1))
        return self.out(torch.tanh(self.lin(h)).mean(0))


class Flattened(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.out = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.lin(x.reshape(-1, 3))).reshape(x.shape[0], -1, 4).mean(1))


class SharedInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head, self.lin = nn.Linear(3, 3), nn.Linear(4, 3)
        self.register_buffer("code", torch.randn(1, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x) + self.lin(self.code)


class KeywordCall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.out = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.lin(input=x)))


class TinyGPT2(nn.Module):
    """Hugging Face GPT-2 (random weights, eager attention), last-token logits (N, C)."""

    def __init__(self) -> None:
        super().__init__()
        transformers = pytest.importorskip("transformers")
        cfg = transformers.GPT2Config(
            n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
            attn_implementation="eager",
        )  # fmt: skip
        self.gpt = transformers.GPT2Model(cfg).eval()
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gpt(input_ids=x).last_hidden_state[:, -1])


MODELS = {
    "shared_positions": (SharedPositions, lambda: torch.randint(0, 11, (N, T)), False),
    "time_major_lstm": (TimeMajorLSTM, lambda: torch.randn(N, T, 3), True),
    "time_major_t_equals_n": (TimeMajorLSTM, lambda: torch.randn(N, N, 3), True),
    "flattened": (Flattened, lambda: torch.randn(N, T, 3), False),
    "shared_input": (SharedInput, lambda: torch.randn(N, 3), False),
    "keyword_call": (KeywordCall, lambda: torch.randn(N, 3), False),
    "gpt2": (TinyGPT2, lambda: torch.randint(0, 50, (N, T)), False),
}


def _case(name: str):
    make, make_x, loop = MODELS[name]
    torch.manual_seed(0)
    model = make().double()
    x = make_x()
    jac = per_example_jacobians(model, x, loop=loop)  # (N, C, P)
    return model, x, jac


@pytest.mark.parametrize("name", list(MODELS))
def test_jacobian_ntk_and_gp_kernel_match_reference(name: str) -> None:
    model, x, jac = _case(name)
    n, c, p = jac.shape
    j = jac.reshape(n * c, p)
    theta = j @ j.T
    kw = {"rtol": 1e-9, "atol": 1e-11}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        J = fl.jacobian(model, x, batch_size=2)
        torch.testing.assert_close(J.to_dense(), j, **kw)
        v, u = torch.randn(p, 2), torch.randn(n * c, 2)
        torch.testing.assert_close(J @ v, j @ v, **kw)
        torch.testing.assert_close(J.T @ u, j.T @ u, **kw)
        for structure in ("dense", "implicit", "lowrank"):
            K = fl.ntk(model, x, structure=structure, batch_size=2)
            torch.testing.assert_close(K.to_dense(), theta, **kw)
            torch.testing.assert_close(K.diagonal(), theta.diagonal(), **kw)
            s = fl.ntk(model, x, structure=structure, outputs="sum", batch_size=3).to_dense()
            torch.testing.assert_close(s, torch.einsum("ncp,mcp->nm", jac, jac), **kw)
        # x2 of one example beside x1 of N: the probe is the larger side
        cross = fl.ntk(model, x, x[:1], structure="dense").to_dense()
        torch.testing.assert_close(cross, theta[:, :c], **kw)
        if x.is_floating_point() and x.ndim == 2:
            kern = fl.gp.NTKKernel(model, mode="dense")
            torch.testing.assert_close(kern(x, x).to_dense(), theta, **kw)
            torch.testing.assert_close(kern(x, x, diag=True), theta.diagonal(), **kw)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("structure", ["diag", "dense", "block_diag", "lowrank", "mix"])
def test_laplace_predictive_is_j_inverse_precision_jt(name: str, structure: str) -> None:
    model, x, jac = _case(name)
    n, c, p = jac.shape
    y = torch.randint(0, c, (n,))
    demoted = {"shared_positions": "pos", "gpt2": "gpt.wpe"}.get(name, "lin")
    mix = {demoted: "diag", nn.Linear: "kfac", "default": "diag"}
    st = mix if structure == "mix" else structure
    kwargs = {"rank": 6} if structure == "lowrank" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        la = fl.laplace.Laplace(model, (x, y), structure=st, prior_precision=0.7, **kwargs)
        la.batch_size = 2
        j = jac.reshape(n * c, p)
        ref = j @ torch.linalg.solve(la.posterior_precision.to_dense(), j.T)
        _, cov = la.predictive(x)
        _, joint = la.predictive(x, joint=True)
    per = torch.stack([ref[i * c : (i + 1) * c, i * c : (i + 1) * c] for i in range(n)])
    torch.testing.assert_close(cov.detach(), per, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(joint.detach(), ref, rtol=1e-8, atol=1e-10)


def test_a_later_larger_batch_with_a_shared_call_raises_not_silently_wrong() -> None:
    model, x, _ = _case("shared_positions")
    y = torch.randint(0, 3, (N,))
    with pytest.raises(ValueError, match="put a batch of two or more examples first"):
        fl.fisher(model, [(x[:1], y[:1]), (x[1:], y[1:])], structure="diag")
