"""Parameters of ruled modules that reach the output other than through the module's own calls
(``F.linear(x, self.lin.weight)``, an embedding matrix reused as the output projection, a module
called and its weight also used directly): the layer rule would miss those paths, so the engine
finds them by walking the autograd graph of one probe forward and moves such modules to torch.func,
with a warning. Against the dense float64 torch.func reference."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from reference import (
    assert_matches,
    exact_fisher,
    per_example_jacobians,
)
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import fim_linops as fl

N = 6


pytestmark = pytest.mark.usefixtures("float64_default")  # float64 references


class Functional(nn.Module):
    """lin is never called: its parameters are used through F.linear."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(F.linear(x, self.lin.weight, self.lin.bias)))


class TiedOutput(nn.Module):
    """The embedding matrix is also the output projection (used directly, not shared with a
    second module)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.mid = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.tanh(self.mid(self.emb(x).mean(1))), self.emb.weight)


class CalledAndDirect(nn.Module):
    """lin is called, and its weight is used once more outside the call."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.out = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.lin(x)) + x @ self.lin.weight.T)


class TimeMajor(nn.Module):
    """(N, T, D) in, a Linear on the time-major (T, N, D) view (batch_first=False style)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.lin(x.transpose(0, 1))).mean(0))


class Flattened(nn.Module):
    """Examples and positions flattened into (N*T, D) rows before a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(x.reshape(-1, 3))).reshape(x.shape[0], -1, 4)
        return self.out(h.mean(1))


class SharedInput(nn.Module):
    """A Linear applied to a buffer: one output shared by every example."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 3)
        self.lin = nn.Linear(4, 3)
        self.register_buffer("code", torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x) + self.lin(self.code)


class KeywordCall(nn.Module):
    """A Linear called by keyword (forward hooks see no positional input)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.lin(input=x)))


LAYOUT_CASES = {
    "time_major": (TimeMajor, (N, 4, 3), "the first dim"),
    "time_major_t_equals_n": (TimeMajor, (N, N, 3), "the first dim"),
    "flattened": (Flattened, (N, 4, 3), "the first dim"),
    "shared_input": (SharedInput, (N, 3), "the first dim"),
    "keyword_call": (KeywordCall, (N, 3), "a call by keyword"),
}


@pytest.mark.parametrize("name", list(LAYOUT_CASES))
@pytest.mark.parametrize("structure", ["dense", "diag"])
def test_calls_without_examples_along_dim_0(name: str, structure: str) -> None:
    """The rules index examples along a call's first dim; a call that does not (or that the
    hooks cannot see) sends its module to torch.func. (T, N, D) with T = N is told from
    (N, T, D) by a forward of one example."""
    make, shape, why = LAYOUT_CASES[name]
    torch.manual_seed(0)
    model, x, y = make(), torch.randn(*shape), torch.randint(0, 3, (N,))
    ref = exact_fisher(model, x, "categorical")
    with pytest.warns(RuntimeWarning, match=f"'lin' \\(nn.Linear\\): .*{why}"):
        got = fl.fisher(model, (x, y), structure=structure)
    want = ref if structure == "dense" else torch.diag(ref.diagonal())
    torch.testing.assert_close(got.to_dense(), want, rtol=1e-10, atol=1e-12)


CASES = {
    "functional": (Functional, lambda: torch.randn(N, 3), "'lin' (nn.Linear)"),
    "tied_output": (TiedOutput, lambda: torch.randint(0, 5, (N, 3)), "'emb' (nn.Embedding)"),
    "called_and_direct": (CalledAndDirect, lambda: torch.randn(N, 3), "'lin' (nn.Linear)"),
}


def _case(name: str):
    make, make_x, module = CASES[name]
    torch.manual_seed(0)
    return make(), make_x(), torch.randint(0, 3, (N,)), module


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("structure", ["dense", "diag", "block_diag"])
def test_fisher_matches_reference_and_warns(name: str, structure: str) -> None:
    model, x, y, module = _case(name)
    ref = exact_fisher(model, x, "categorical")
    with pytest.warns(
        RuntimeWarning,
        match=f"module {re.escape(module)}: its parameters reach the output other than through",
    ):
        got = fl.fisher(model, (x, y), structure=structure)
    assert_matches(got, ref, model, structure)


@pytest.mark.parametrize("name", list(CASES))
def test_kfac_names_the_reason_and_a_mix_that_works(name: str) -> None:
    model, x, y, module = _case(name)
    layer = module.split("'")[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(ValueError, match="other than through its own calls") as err:
            fl.fisher(model, (x, y), structure="kfac", strict=True)
        mix = {layer: "block_diag", "default": "kfac"}
        assert str(mix) in str(err.value)
        F = fl.fisher(model, (x, y), structure=mix)
    assert F.shape == (sum(p.numel() for p in model.parameters()),) * 2


@pytest.mark.parametrize("name", list(CASES))
def test_jacobian_and_ntk_match_reference(name: str) -> None:
    model, x, _, _ = _case(name)
    jac = per_example_jacobians(model, x)  # (N, C, P)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got_j = fl.jacobian(model, x).to_dense()
        got_k = fl.ntk(model, x).to_dense()
    c = jac.shape[1]
    torch.testing.assert_close(got_j, jac.reshape(N * c, -1), rtol=1e-10, atol=1e-12)
    want_k = torch.einsum("ncp,mdp->ncmd", jac, jac).reshape(N * c, N * c)
    torch.testing.assert_close(got_k, want_k, rtol=1e-10, atol=1e-12)


def test_ordinary_models_do_not_warn_and_data_is_read_once() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 3))
    x, y = torch.randn(N, 3), torch.randint(0, 3, (N,))

    class Counting:
        def __init__(self) -> None:
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            return iter([(x[:4], y[:4]), (x[4:], y[4:])])

    data = Counting()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = fl.fisher(model, data, structure="dense")
    assert data.passes == 1  # the check walks the first batch's own graph: no extra pass
    torch.testing.assert_close(got.to_dense(), exact_fisher(model, x, "categorical"))
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)
    torch.manual_seed(5)
    fl.fisher(model, loader, structure="diag")
    after = torch.get_rng_state()
    torch.manual_seed(5)
    list(iter(loader))  # one epoch: the sampler's draw from the global random state
    assert torch.equal(after, torch.get_rng_state())


@pytest.mark.parametrize("kind", ["generator", "iterable_dataset", "counting"])
def test_the_restart_keeps_every_batch(kind: str) -> None:
    """A module found in the first forward restarts the build with it on torch.func: a
    re-iterable is read again, a one-shot iterator gives back the batch it already gave."""
    model, x, y, _ = _case("functional")
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    ref = exact_fisher(model, x, "categorical")

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(zip(x, y, strict=True))

    data = {
        "generator": lambda: (b for b in batches),
        "iterable_dataset": lambda: DataLoader(Stream(), batch_size=4),
        "counting": lambda: batches,
    }[kind]()
    with pytest.warns(RuntimeWarning, match="'lin'"):
        got = fl.fisher(model, data, structure="dense")
    torch.testing.assert_close(got.to_dense(), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="torch.compile unsupported")
def test_compiled_model_is_never_silently_zero() -> None:
    """A model compiled (eager backend: no C++ compiler needed) before the Fisher's hooks were
    registered may replay its graph without them: the build must then raise (or, where the
    hooks did run, be right), never return the zeros of hooks that did not run."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(N, 3), torch.randint(0, 3, (N,))
    ref = exact_fisher(model, x, "categorical")
    compiled = torch.compile(model, backend="eager")
    compiled(x)
    try:
        got = fl.fisher(compiled, (x, y), structure="diag")
    except ValueError as e:
        assert "hooks did not run" in str(e) and "_orig_mod" in str(e)
    else:
        torch.testing.assert_close(got.diagonal(), ref.diagonal(), rtol=1e-10, atol=1e-12)
    got = fl.fisher(compiled._orig_mod, (x, y), structure="diag")  # the advice works
    torch.testing.assert_close(got.diagonal(), ref.diagonal(), rtol=1e-10, atol=1e-12)


def test_unused_layer_is_zero_without_error() -> None:
    """A ruled layer that the output does not depend on has zero Fisher blocks (no error)."""

    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(3, 3)
            self.spare = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    torch.manual_seed(0)
    model = Unused()
    x, y = torch.randn(N, 3), torch.randint(0, 3, (N,))
    got = fl.fisher(model, (x, y), structure="diag").diagonal()
    assert torch.all(got[12:] == 0) and torch.all(got[:12] > 0)


def test_user_hooks_that_change_inputs_and_outputs() -> None:
    """The engine's hooks run before the user's forward hooks (they see the module's own output,
    whose gradient the rule needs) and after the user's pre-hooks (they see the input the module
    computed with); the user's hooks are left in place."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    model[0].register_forward_hook(lambda mod, i, o: o * 2 + 1)
    model[2].register_forward_pre_hook(lambda mod, i: (i[0] * 3,))
    x, y = torch.randn(N, 3), torch.randint(0, 3, (N,))
    ref = exact_fisher(model, x, "categorical")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        dense = fl.fisher(model, (x, y), structure="dense").to_dense()
        diag = fl.fisher(model, (x, y), structure="diag").diagonal()
    torch.testing.assert_close(dense, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(diag, ref.diagonal(), rtol=1e-10, atol=1e-12)
    assert len(model[0]._forward_hooks) == 1 and len(model[2]._forward_pre_hooks) == 1


@pytest.mark.parametrize("length", [5, N])
def test_positional_embedding_on_positions_not_examples(length: int) -> None:
    """A GPT-style position table: Embedding(arange(T)) gives (T, D), shared by the examples.
    With T = N its first dim looks like the examples; the forward of one example tells."""

    class PositionTable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(11, 4)
            self.pos = nn.Embedding(8, 4)
            self.out = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            positions = torch.arange(x.shape[1])
            return self.out(torch.tanh(self.tok(x) + self.pos(positions)).mean(1))

    torch.manual_seed(0)
    model = PositionTable()
    x, y = torch.randint(0, 11, (N, length)), torch.randint(0, 3, (N,))
    ref = exact_fisher(model, x, "categorical")
    with pytest.warns(RuntimeWarning, match="'pos' \\(nn.Embedding\\): its calls do not have"):
        got = fl.fisher(model, (x, y), structure="dense")
    assert_matches(got, ref, model, "dense")


def test_the_restart_draws_the_same_mc_labels() -> None:
    """The restart happens before any label is drawn: an MC Fisher with a seeded generator is the
    same as for the equivalent model whose layers are called normally."""

    class Called(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 4)
            self.out = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.tanh(self.lin(x)))

    torch.manual_seed(0)
    called, direct = Called(), Functional()
    direct.load_state_dict(called.state_dict())
    x, y = torch.randn(8, 3), torch.randint(0, 3, (8,))
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]

    def mc(model: nn.Module) -> torch.Tensor:
        gen = torch.Generator().manual_seed(7)
        F = fl.fisher(
            model, batches, structure="dense", fisher_type="mc", mc_samples=3, generator=gen
        )
        return F.to_dense()

    with pytest.warns(RuntimeWarning, match="'lin'"):
        got = mc(direct)
    torch.testing.assert_close(got, mc(called), rtol=1e-10, atol=1e-12)
