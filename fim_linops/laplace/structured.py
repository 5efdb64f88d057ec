r"""GLM predictive covariances J Sigma J^T of structured posteriors, without N x C x P Jacobians.

For a posterior covariance Sigma = P^-1 that is block-diagonal over the layers (diag, KFAC, EKFAC
precisions, scalar or per-layer priors), J Sigma J^T = sum_l J_l Sigma_l J_l^T, and each layer's
Sigma_l is diagonal in a known basis:

* diag: Sigma_l = diag(s_l), s = 1 / (precision diagonal);
* KFAC/EKFAC: Sigma_l = (Q_L kron Q_R) diag(w_l) (Q_L kron Q_R)^T over the row-major matrix view M
  of the layer ([W | b] for Linear, per group for convolutions), w = 1 / (damped eigenvalue).

A per-example gradient matrix M_{k,n} rotates to M' = Q_L^T M Q_R (Q = I for diag), and
J_l Sigma_l J_l^T [n, k, m, q] = sum_{r,o,j} M'_{k,n}[r, o, j] M'_{q,m}[r, o, j] w[r, o, j].

* Linear without positions: M_{k,n} = g_{k,n} ab_n^T (ab = [a; 1]), so M' = g' ab'^T with
  g' = Q_L^T g, ab' = Q_R^T ab and, per example,
  cov[n, k, q] = sum_o g'[n, k, o] g'[n, q, o] (sum_j ab'[n, j]^2 w[o, j]):
  O(N (K o + o j)) per batch, no gradient formed ("cheap contraction"). Jointly,
  cov[n, k, m, q] = sum_o g1'[n, k, o] g2'[m, q, o] B[n, m, o] with B = ab1' diag(w_o) ab2'^T.
* any other layer with a rule (convolutions, sequences, embeddings, norms): its per-example
  gradients (N, K, layer P) in the batch, rotated and scaled by sqrt(w): features F with
  cov = F F^T;
* parameters without a rule: their torch.func per-example gradients, scaled likewise.

Index convention: n, m examples; k, q output columns; r group; o rows (outputs) and j columns
(inputs + bias) of the matrix view; p parameters of a layer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from fim_linops.engine.engine import BatchResult
from fim_linops.engine.rules.linear import LinearRule, with_ones
from fim_linops.layout import ParamLayout
from fim_linops.operators import EKFAC, KFAC, Diag, Mixed
from fim_linops.operators.kron import KronSpec

#: elements of the (chunk, K, M, o) workspace of a joint Linear block
JOINT_CHUNK_ELEMENTS = 1 << 24


@dataclass
class DiagCov:
    """Sigma_l = diag(s), s (p,) over the layer's slice of the public vector."""

    s: Tensor


@dataclass
class KronCov:
    """Sigma_l = (Q_L kron Q_R) diag(w) (Q_L kron Q_R)^T over the matrix view of ``spec``:
    ql (g, rows, rows), qr (g, cols, cols), w (g, rows, cols)."""

    spec: KronSpec
    ql: Tensor
    qr: Tensor
    w: Tensor


LayerCov = DiagCov | KronCov


def _inverse(lam: Tensor) -> Tensor:
    """1 / lambda, 0 where lambda is not positive (a singular direction carries no variance)."""
    return torch.where(lam > 0, 1 / lam.clamp_min(torch.finfo(lam.dtype).tiny), 0)


def _kron_covs(op: KFAC | EKFAC, offset: int) -> dict[int, LayerCov]:
    """start -> KronCov for each block of a (damped) KFAC/EKFAC precision."""
    basis = op._eigenvectors()  # KronBasis: (ql, qr, ones) per block
    lams = op._block_eigenvalues()  # damped eigenvalues, public order of each block
    out: dict[int, LayerCov] = {}
    for i, (spec, lam) in enumerate(zip(op.specs, lams, strict=True)):
        ql, qr = basis.tensors[3 * i], basis.tensors[3 * i + 1]
        local = dataclasses.replace(spec, start=0, stop=spec.stop - spec.start)
        w = _inverse(local.to_mat(lam[:, None])[0])  # (g, rows, cols)
        out[offset + spec.start] = KronCov(local, ql, qr, w)
    return out


def layer_covariances(prec: LinearOperator, layout: ParamLayout) -> list[LayerCov] | None:
    """Sigma = prec^-1 per layout block, or None when the precision is not block-diagonal in a
    known basis (dense, block_diag, lowrank, mixed structures: the caller uses Jacobians)."""
    by_start: dict[int, LayerCov] = {}
    if isinstance(prec, Diag):
        s = _inverse(prec.diag + prec.damping)
        by_start = {b.start: DiagCov(s[b.start : b.stop]) for b in layout.blocks}
    elif isinstance(prec, (KFAC, EKFAC)):
        by_start = _kron_covs(prec, 0)
    elif isinstance(prec, Mixed) and not bool(prec.damping != 0):
        for op, spans in prec.groups():
            if not isinstance(op, (KFAC, EKFAC)) or len(spans) != 1 or len(op.specs) != 1:
                return None
            by_start.update(_kron_covs(op, spans[0][0]))
    else:
        return None
    out = []
    for b in layout.blocks:
        cov = by_start.get(b.start)
        size = cov.s.numel() if isinstance(cov, DiagCov) else None
        if isinstance(cov, KronCov):
            size = cov.spec.stop
        if cov is None or size != b.numel:
            return None
        out.append(cov)
    return out


# -- features of one batch ------------------------------------------------------------------------
@dataclass
class LinearFeats:
    """Rotated Linear features: g' (n, K, o) example-major, ab' (n, j), weights w (o, j)."""

    g: Tensor
    ab: Tensor
    w: Tensor


@dataclass
class GradFeats:
    """Rotated, sqrt(w)-scaled per-example gradients (n, K, p): cov = F F^T."""

    f: Tensor


Feats = LinearFeats | GradFeats


def _diag_matrix_view(s: Tensor, rows: int, cols: int, names: tuple[str, ...]) -> Tensor:
    """diag variances of a Linear block (public order W then b) as (rows, cols) over [W | b]."""
    spec = KronSpec("", 0, s.numel(), 1, rows, cols, "weight" in names, "bias" in names)
    return spec.to_mat(s[:, None])[0, 0]


def _scaled_grads(j: Tensor, cov: LayerCov) -> Tensor:
    """Per-example gradients (K, n, p) -> rotated, sqrt(w)-scaled features (n, K, p)."""
    k, n, p = j.shape
    if isinstance(cov, DiagCov):
        return (j * cov.s.clamp_min(0).sqrt()).transpose(0, 1)
    mat = cov.spec.to_mat(j.reshape(k * n, p).T)  # (k n, g, rows, cols)
    rot = cov.ql.transpose(-1, -2) @ mat @ cov.qr * cov.w.sqrt()
    return cov.spec.from_mat(rot).T.reshape(k, n, p).transpose(0, 1)


def batch_features(res: BatchResult, covs: list[LayerCov]) -> list[Feats]:
    """Per layout block, the covariance features of one batch."""
    engine = res.engine
    fallback = res.fallback_grads(0, res.n) if engine.fallback else {}
    out: list[Feats] = []
    for bi, block in enumerate(engine.layout.blocks):
        cov = covs[bi]
        kind, idx = engine.block_kind[bi]
        if kind == "ruled":
            rb = engine.ruled[idx]
            calls = res.calls.get(idx, [])
            feats = _linear_feats(rb.rule, calls, cov, rb.block.local_names)
            if feats is not None:
                out.append(feats)
                continue
            j = res.block_grads(idx, 0, res.n)  # (K, n, layer p)
        else:
            j = torch.cat([fallback[e.name].reshape(res.k, res.n, -1) for e in block.entries], -1)
        out.append(GradFeats(_scaled_grads(j, cov).contiguous()))
    return out


def _linear_feats(
    rule: object, calls: list[tuple[Tensor, Tensor]], cov: LayerCov, names: tuple[str, ...]
) -> LinearFeats | None:
    """The cheap contraction's features of a Linear layer called once on (n, i) inputs."""
    if not (isinstance(rule, LinearRule) and len(calls) == 1 and calls[0][0].ndim == 2):
        return None
    a, g = calls[0]
    ab = with_ones(a, "weight" in names, "bias" in names)  # (n, j)
    gt = g.transpose(0, 1)  # (n, K, o)
    if isinstance(cov, DiagCov):
        return LinearFeats(
            gt.contiguous(), ab, _diag_matrix_view(cov.s, g.shape[-1], ab.shape[1], names)
        )
    spec = cov.spec
    if spec.groups != 1 or spec.left_is_a or (spec.rows, spec.cols) != (g.shape[-1], ab.shape[1]):
        return None
    return LinearFeats((gt @ cov.ql[0]).contiguous(), ab @ cov.qr[0], cov.w[0])


# -- covariances ----------------------------------------------------------------------------------
def per_example(feats: list[Feats]) -> Tensor:
    """sum over layers of J_l Sigma_l J_l^T per example, (n, K, K)."""
    out = None
    for f in feats:
        if isinstance(f, LinearFeats):
            d = (f.ab**2) @ f.w.T  # (n, o): sum_j ab'[n, j]^2 w[o, j]
            blk = (f.g * d[:, None, :]) @ f.g.transpose(1, 2)
        else:
            blk = f.f @ f.f.transpose(1, 2)
        out = blk if out is None else out + blk
    if out is None:
        raise ValueError("the posterior covers no parameters")
    return out


def _joint_linear(out: Tensor, f1: LinearFeats, f2: LinearFeats) -> None:
    """out (n K, m Q) += sum_o g1'[n, k, o] g2'[m, q, o] (ab1' diag(w_o) ab2'^T)[n, m]."""
    n, k, o = f1.g.shape
    m, q = f2.g.shape[:2]
    view = out.view(n, k, m, q)
    step = max(1, JOINT_CHUNK_ELEMENTS // max(1, k * m * o))
    for lo in range(0, n, step):  # chunks of examples bound the (c, K, m, o) workspace
        hi = min(n, lo + step)
        b = torch.einsum("cj,oj,mj->cmo", f1.ab[lo:hi], f1.w, f2.ab)  # (c, m, o)
        x = f1.g[lo:hi, :, None, :] * b[:, None]  # (c, K, m, o)
        # batched over m: (m, c K, o) @ (m, o, Q) -> (m, c K, Q)
        y = x.permute(2, 0, 1, 3).reshape(m, -1, o) @ f2.g.transpose(1, 2)
        view[lo:hi] += y.reshape(m, hi - lo, k, q).permute(1, 2, 0, 3)


def joint_block(out: Tensor, feats1: list[Feats], feats2: list[Feats]) -> Tensor:
    """out (n1 K, n2 Q) += sum over layers of J1_l Sigma_l J2_l^T between two batches."""
    for f1, f2 in zip(feats1, feats2, strict=True):
        if isinstance(f1, LinearFeats) and isinstance(f2, LinearFeats):
            _joint_linear(out, f1, f2)
        elif isinstance(f1, GradFeats) and isinstance(f2, GradFeats):
            p = f1.f.shape[-1]
            out.addmm_(f1.f.reshape(-1, p), f2.f.reshape(-1, p).T)
        else:  # pragma: no cover - both batches run the same layers the same way
            raise RuntimeError("a layer gave different feature kinds in two batches")
    return out


def joint(
    batch_feats: list[tuple[int, int, list[Feats]]], dtype: torch.dtype, device: Any
) -> Tensor:
    """The joint covariance (N K, N K) from per-batch (n, K, features); lower blocks computed,
    upper ones mirrored."""
    starts = [0]
    for n, k, _ in batch_feats:
        starts.append(starts[-1] + n * k)
    out = torch.zeros(starts[-1], starts[-1], dtype=dtype, device=device)
    for i, (_, _, fi) in enumerate(batch_feats):
        for j in range(i + 1):
            blk = out[starts[i] : starts[i + 1], starts[j] : starts[j + 1]]
            joint_block(blk, fi, batch_feats[j][2])
            if j < i:
                out[starts[j] : starts[j + 1], starts[i] : starts[i + 1]] = blk.T
    return out
