"""nn.MultiheadAttention's projections as Kronecker rules (engine/rules/mha.py): in_proj as three
Kronecker blocks (q, k, v), each with its own A from its own input and G from the gradients of
its own projected output, and out_proj through nn.Linear's rule. Against float64 references whose
a and g come from a hand-written twin of the attention, by torch.func per example."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from reference import _hessian_sqrt, exact_fisher, output_hessians
from torch import Tensor, nn
from torch.func import jacrev, vmap

import fim_linops as fl
from fim_linops.layout import ParamLayout
from fim_linops.operators import EKFAC, Mixed

pytestmark = pytest.mark.usefixtures("float64_default")


class AttnNet(nn.Module):
    """x (N, T + 2 S, d): queries x[:, :T], keys x[:, T:T+S], values x[:, T+S:] (``mode``
    "self": all three are x[:, :T]; "kv": keys and values both x[:, T:T+S]) -> MHA -> mean over
    the T positions -> Linear head. ``mask``: a fixed boolean attention mask (T, S)."""

    def __init__(
        self,
        mode: str = "self",
        t: int = 3,
        s: int = 2,
        batch_first: bool = True,
        need_weights: bool = True,
        mask: bool = False,
        d: int = 4,
        classes: int = 3,
    ):
        super().__init__()
        self.mode, self.t, self.s = mode, t, s
        self.need_weights = need_weights
        self.mha = nn.MultiheadAttention(d, 2, batch_first=batch_first)
        self.head = nn.Linear(d, classes)
        with torch.no_grad():
            self.mha.in_proj_bias.normal_()
            self.mha.out_proj.bias.normal_()
        length = t if mode == "self" else s
        m = torch.rand(t, length) < 0.4
        m[:, 0] = False  # every query sees a key
        self.register_buffer("mask", m if mask else None)

    def parts(self, x: Tensor, dim: int = 1) -> tuple[Tensor, Tensor, Tensor]:
        """query, key, value: slices of x along its position dim ``dim``."""
        t, s = self.t, self.s
        if self.mode == "self":
            q = x.narrow(dim, 0, t)
            return q, q, q
        k = x.narrow(dim, t, s)
        return x.narrow(dim, 0, t), k, k if self.mode == "kv" else x.narrow(dim, t + s, s)

    def forward(self, x: Tensor) -> Tensor:
        first = self.mha.batch_first
        q, k, v = self.parts(x) if first else self.parts(x.transpose(0, 1), dim=0)
        out = self.mha(q, k, v, need_weights=self.need_weights, attn_mask=self.mask)[0]
        return self.head((out if first else out.transpose(0, 1)).mean(1))


def twin(net: AttnNet, q_in: Tensor, k_in: Tensor, v_in: Tensor, dq, dk, dv, dout) -> Tensor:
    """The network on one example, attention written out, perturbations added to the projected
    q (T, E), k, v (S, E) and to out_proj's output (T, E)."""
    m = net.mha
    e, h = m.embed_dim, m.num_heads
    w, b = m.in_proj_weight, m.in_proj_bias
    q = q_in @ w[:e].T + b[:e] + dq
    k = k_in @ w[e : 2 * e].T + b[e : 2 * e] + dk
    v = v_in @ w[2 * e :].T + b[2 * e :] + dv
    q, k, v = (z.reshape(z.shape[0], h, e // h).transpose(0, 1) for z in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(e // h)
    if net.mask is not None:
        scores = scores.masked_fill(net.mask, float("-inf"))
    o = (torch.softmax(scores, -1) @ v).transpose(0, 1).reshape(-1, e)  # (T, E)
    out = o @ m.out_proj.weight.T + m.out_proj.bias + dout
    return net.head(out.mean(0)), o


def reference_factors(net: AttnNet, x: Tensor) -> dict[str, list[tuple[Tensor, Tensor]]]:
    """Per block ("mha": parts q, k, v; "out": out_proj), (G, A) with G = 1/N sum_{k,n,l} g g^T
    over the gradients g of the K = C columns of the output Hessian's square root w.r.t. the
    part's output, and A = 1/N sum_n 1/L sum_l [a;1][a;1]^T over the part's inputs a."""
    q_in, k_in, v_in = net.parts(x)
    n, t, s = x.shape[0], q_in.shape[1], k_in.shape[1]
    e = net.mha.embed_dim
    zq, zk, zout = torch.zeros(t, e), torch.zeros(s, e), torch.zeros(t, e)

    def f(qi, ki, vi, dq, dk, dv, dout):
        return twin(net, qi, ki, vi, dq, dk, dv, dout)[0]

    out, o = vmap(lambda qi, ki, vi: twin(net, qi, ki, vi, zq, zk, zk, zout))(q_in, k_in, v_in)
    torch.testing.assert_close(out, net(x), rtol=1e-12, atol=1e-12)  # the twin is the network
    jac = vmap(jacrev(f, argnums=(3, 4, 5, 6)), in_dims=(0, 0, 0, None, None, None, None))
    jq, jk, jv, jo = jac(q_in, k_in, v_in, zq, zk, zk, zout)  # (n, c, L, E) each
    sq = _hessian_sqrt(output_hessians("categorical", out))  # (n, c, K)

    def factors(j: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        # n: example, c: output, k: column, l: position, o/i: features
        g = torch.einsum("nck,nclo->knlo", sq, j).reshape(-1, j.shape[-1])
        ab = torch.cat([a, torch.ones(*a.shape[:-1], 1)], -1)
        big_a = torch.einsum("nli,nlj->ij", ab, ab) / (a.shape[1] * n)
        return g.T @ g / n, big_a

    return {
        "mha": [factors(jq, q_in), factors(jk, k_in), factors(jv, v_in)],
        "out": [factors(jo, o)],
    }


def kron_block(pairs: list[tuple[Tensor, Tensor]]) -> Tensor:
    """The block of groups G_j kron A_j over row-major [W_j | b_j], in the public order: the
    weight rows (j E + o) row-major, then the biases (j E + o)."""
    e, c = pairs[0][0].shape[0], pairs[0][1].shape[0]
    groups = len(pairs)
    full = torch.block_diag(*[torch.kron(g, a) for g, a in pairs])  # index (j E + o) c + i
    weight = [r * c + i for r in range(groups * e) for i in range(c - 1)]
    perm = torch.tensor(weight + [r * c + c - 1 for r in range(groups * e)])
    return full[perm][:, perm]


def _blocks(model: nn.Module) -> dict[str, slice]:
    return {b.module_name: slice(b.start, b.stop) for b in ParamLayout.from_model(model).blocks}


def _structures(F: fl.FisherOperator) -> dict[str, str]:
    """Layer name -> structure, of a Mixed operator or of a pure Kronecker one."""
    if isinstance(F, Mixed):
        return {i.name: i.structure for i in F.layers}
    return {spec.name: F.structure for spec in F.specs}


def _build(net: nn.Module, x: Tensor, structure: str, **kw) -> fl.FisherOperator:
    y = torch.randint(0, 3, (x.shape[0],))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no demotion, no restart
        return fl.fisher(net, (x, y), structure=structure, **kw)


CASES = {
    "self": dict(mode="self"),
    "self_seq_first": dict(mode="self", batch_first=False),
    "self_no_weights_masked": dict(mode="self", need_weights=False, mask=True),
    "cross_kv": dict(mode="kv", t=3, s=2),
    "cross_kv_seq_first_masked": dict(mode="kv", batch_first=False, mask=True),
    "cross_qkv": dict(mode="qkv", t=2, s=3, need_weights=False),
}


def _input(net: AttnNet, n: int) -> Tensor:
    return torch.randn(n, net.t + 2 * net.s, 4)


@pytest.mark.parametrize("case", list(CASES))
def test_kfac_factors_are_those_of_the_twins_a_and_g(case: str) -> None:
    torch.manual_seed(0)
    net = AttnNet(**CASES[case])
    x = _input(net, 5)
    F = _build(net, x, "kfac")
    assert _structures(F) == {
        "mha": "kfac",
        "mha.out_proj": "kfac",
        "head": "kfac",
    }
    ref = reference_factors(net, x)
    dense, sl = F.to_dense(), _blocks(net)
    torch.testing.assert_close(dense[sl["mha"], sl["mha"]], kron_block(ref["mha"]))
    torch.testing.assert_close(
        dense[sl["mha.out_proj"], sl["mha.out_proj"]], kron_block(ref["out"])
    )


def test_kfac_reduce_averages_a_and_sums_g_over_positions_per_part() -> None:
    torch.manual_seed(1)
    net = AttnNet(mode="qkv", t=2, s=3)
    x = _input(net, 4)
    F = _build(net, x, "kfac", kfac_approx="reduce")
    q_in, k_in, v_in = net.parts(x)
    # reduce on positions of one part: the expand factors of the twin with L = 1 per example,
    # i.e. a averaged and g summed: rebuild through a net whose inputs are those averages is not
    # the same function, so compare with the direct formula on the twin's g
    e = 4
    zq, zk, zo = torch.zeros(2, e), torch.zeros(3, e), torch.zeros(2, e)

    def f(qi, ki, vi, dq, dk, dv, dout):
        return twin(net, qi, ki, vi, dq, dk, dv, dout)[0]

    out = vmap(lambda a, b, c: f(a, b, c, zq, zk, zk, zo))(q_in, k_in, v_in)
    jac = vmap(jacrev(f, argnums=(3, 4, 5)), in_dims=(0, 0, 0, None, None, None, None))
    js = jac(q_in, k_in, v_in, zq, zk, zk, zo)
    sq = _hessian_sqrt(output_hessians("categorical", out))
    pairs = []
    for j, a in zip(js, (q_in, k_in, v_in), strict=True):
        g = torch.einsum("nck,nclo->kno", sq, j).reshape(-1, e)  # summed over positions
        ab = torch.cat([a.mean(1), torch.ones(a.shape[0], 1)], -1)
        pairs.append((g.T @ g / 4, ab.T @ ab / 4))
    sl = _blocks(net)["mha"]
    torch.testing.assert_close(F.to_dense()[sl, sl], kron_block(pairs))


@pytest.mark.parametrize("structure", ["kfac", "ekfac", "kron_sum"])
def test_kronecker_is_exact_for_one_example_at_one_query_position(structure: str) -> None:
    """Self-attention at T = 1: every part has one row, so each in_proj block is G_j kron A_j
    exactly (q and k get zero gradients: a softmax over one key), as is out_proj's. Cross
    attention with one query and S = 3 keys: the q part and out_proj are exact."""
    torch.manual_seed(2)
    kw = {"rank": 1} if structure == "kron_sum" else {}
    for mode, t, s in (("self", 1, 1), ("qkv", 1, 3)):
        net = AttnNet(mode=mode, t=t, s=s)
        x = _input(net, 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # kron_sum's precision-floor note
            F = fl.fisher(net, (x, torch.tensor([1])), structure=structure, **kw).to_dense()
        ref = exact_fisher(net, x, "categorical")
        sl = _blocks(net)
        exact = [sl["mha.out_proj"]]
        if mode == "self":
            exact.append(sl["mha"])
        else:  # the q rows of in_proj_weight, then the q entries of in_proj_bias
            lo = sl["mha"].start
            idx = torch.cat([lo + torch.arange(16), lo + 48 + torch.arange(4)])
            torch.testing.assert_close(F[idx][:, idx], ref[idx][:, idx], rtol=1e-8, atol=1e-10)
        for b in exact:
            torch.testing.assert_close(F[b, b], ref[b, b], rtol=1e-8, atol=1e-10)


def test_ekfac_refits_the_eigenvalues_of_each_part_from_the_exact_fisher() -> None:
    """EKFAC's in_proj block is blockdiag_j Q_j diag(s_j) Q_j^T with Q_j = Q_G kron Q_A the
    eigenbases of part j's reference factors and s_j = diag(Q_j^T F_jj Q_j), F_jj the exact
    Fisher's block of part j (the eigenvalue refit of George et al. 2018)."""
    torch.manual_seed(3)
    net = AttnNet(mode="qkv", t=2, s=3)
    x = _input(net, 4)
    F = _build(net, x, "ekfac")
    ops = F.ops if isinstance(F, Mixed) else (F,)
    ekfac = next(op for op in ops if isinstance(op, EKFAC))
    spec, ql, qr, s = next(tr for tr in ekfac.triples() if tr[0].name == "mha")
    assert (spec.groups, spec.rows, spec.cols) == (3, 4, 5)
    ref = reference_factors(net, x)["mha"]
    exact = exact_fisher(net, x, "categorical")
    sl = _blocks(net)["mha"]
    exact_mha = exact[sl, sl]
    e, c = 4, 5
    for j, (g, a) in enumerate(ref):
        lg, la = ql[j].T @ g @ ql[j], qr[j].T @ a @ qr[j]  # the bases diagonalise the factors
        torch.testing.assert_close(lg, torch.diag(lg.diagonal()), atol=1e-10, rtol=0)
        torch.testing.assert_close(la, torch.diag(la.diagonal()), atol=1e-10, rtol=0)
        # the part's exact block in row-major [W_j | b_j] order
        rows = torch.tensor(
            [(j * e + o) * e + i if i < e else 48 + j * e + o for o in range(e) for i in range(c)]
        )
        fjj = exact_mha[rows][:, rows]
        basis = torch.kron(ql[j], qr[j])
        want = (basis.T @ fjj @ basis).diagonal().reshape(e, c)
        torch.testing.assert_close(s[j], want, rtol=1e-9, atol=1e-12)


def test_factors_do_not_depend_on_the_batching() -> None:
    torch.manual_seed(4)
    net = AttnNet(mode="qkv", t=2, s=3)
    x, y = _input(net, 6), torch.randint(0, 3, (6,))
    whole = fl.fisher(net, (x, y), structure="kfac").to_dense()
    parts = [(x[i : i + 2], y[i : i + 2]) for i in (0, 2, 4)]
    torch.testing.assert_close(fl.fisher(net, parts, structure="kfac").to_dense(), whole)


def test_separate_weights_and_bias_kv_get_exact_blocks_with_their_reasons() -> None:
    torch.manual_seed(5)

    class Net(nn.Module):
        def __init__(self, **kw):
            super().__init__()
            self.mha = nn.MultiheadAttention(4, 2, batch_first=True, **kw)
            self.head = nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.mha(x[:, :2], x[:, 2:, :3], x[:, 2:, :3])[0].mean(1))

    cases = (
        (dict(kdim=3, vdim=3), "kdim or vdim differs from embed_dim"),
        (dict(kdim=3, vdim=3, add_bias_kv=True, add_zero_attn=True), "kdim or vdim"),
    )
    for kw, why in cases:
        net = Net(**kw)
        x = torch.randn(4, 5, 4)
        F = _build(net, x, "kfac")
        by = {i.name: i for i in F.layers}
        assert by["mha"].structure == "diag" or by["mha"].structure == "block_diag"
        assert why in by["mha"].reason
        assert by["mha.out_proj"].structure == "kfac"
        ref = exact_fisher(net, x, "categorical")
        sl = _blocks(net)["mha"]
        got, want = F.to_dense()[sl, sl], ref[sl, sl]
        if by["mha"].structure == "diag":
            want = torch.diag(want.diagonal())
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_bias_kv_of_a_packed_attention_is_named_in_the_reason() -> None:
    torch.manual_seed(6)
    net = AttnNet(mode="self")
    net.mha = nn.MultiheadAttention(4, 2, batch_first=True, add_bias_kv=True, add_zero_attn=True)
    x = _input(net, 3)
    F = _build(net, x, "kfac")
    by = {i.name: i for i in F.layers}
    assert by["mha"].structure == "block_diag" and "bias_k, bias_v" in by["mha"].reason
    assert by["mha.out_proj"].structure == "kfac"
    ref = exact_fisher(net, x, "categorical")
    sl = _blocks(net)["mha"]
    torch.testing.assert_close(F.to_dense()[sl, sl], ref[sl, sl], rtol=1e-9, atol=1e-12)
    # frozen bias_k / bias_v: in_proj is Kronecker again, with add_zero_attn in the attention
    net.mha.bias_k.requires_grad_(False)
    net.mha.bias_v.requires_grad_(False)
    F = _build(net, x, "kfac")
    assert _structures(F)["mha"] == "kfac"


def test_the_model_is_left_as_found() -> None:
    net = AttnNet(mode="qkv")
    x = _input(net, 3)
    before = net.mha.forward
    _build(net, x, "kfac")
    assert "forward" not in net.mha.__dict__ and net.mha.forward == before


class Encoder(nn.Module):
    """Embedding -> nn.TransformerEncoderLayer (causal mask, eval mode: its fast path is not taken
    while gradients are needed) -> mean -> Linear head; tokens (N, T) -> logits (N, 3)."""

    def __init__(self, vocab: int = 6, d: int = 4, t: int = 3):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.layer = nn.TransformerEncoderLayer(d, 2, 6, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, 3)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(t))
        with torch.no_grad():
            self.layer.self_attn.in_proj_bias.normal_()
            self.layer.norm1.weight.normal_()

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.layer(self.tok(tokens), src_mask=self.causal, is_causal=True)
        return self.head(h.mean(1))


@pytest.mark.parametrize("structure", ["kfac", "block_diag"])
def test_transformer_encoder_layer_attention_is_kronecker_and_its_exact_blocks_are_exact(
    structure: str,
) -> None:
    torch.manual_seed(7)
    net = Encoder().eval()
    x = torch.randint(0, 6, (4, 3))
    F = _build(net, x, structure)
    ref = exact_fisher(net, x, "categorical")
    sl = _blocks(net)
    if structure == "kfac":
        by = {i.name: i for i in F.layers}
        for name in ("tok", "layer.self_attn", "layer.self_attn.out_proj", "layer.linear1"):
            assert by[name].structure == "kfac", name
        assert by["layer.norm1"].structure == "block_diag"
        assert "self_attn " in F.describe() and "self_attn.out_proj" in F.describe()
        exact = ("layer.norm1", "layer.norm2")
    else:  # the captured projections give the exact per-example gradients
        exact = ("layer.self_attn", "layer.self_attn.out_proj", "layer.norm1")
    dense = F.to_dense()
    for name in exact:
        torch.testing.assert_close(dense[sl[name], sl[name]], ref[sl[name], sl[name]])
    assert not net.training and "forward" not in net.layer.self_attn.__dict__


def test_ntk_blocks_through_the_rules_equal_the_jacobian_products() -> None:
    from reference import per_example_jacobians

    torch.manual_seed(9)
    net = AttnNet(mode="qkv", t=2, s=3, batch_first=False)
    x1, x2 = _input(net, 3), _input(net, 2)
    j1, j2 = per_example_jacobians(net, x1), per_example_jacobians(net, x2)
    want = torch.einsum("ncp,mdp->ncmd", j1, j2).reshape(9, 6)
    got = fl.ntk(net, x1, x2, structure="dense").to_dense()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
