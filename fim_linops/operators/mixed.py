r"""Per-layer mixed Fisher: F ~ blockdiag_g F_g over groups of layers, each group with its own
structure (e.g. KFAC for the Linear layers, block_diag for the norms).

Stored: one Fisher operator per group (over that group's parameters, in the public order restricted
to them) and the group's slices of the public vector (plain ints). Products, diagonal, trace and
Frobenius norm add up over groups; solve, log-determinant, roots and eigh are those of the groups'
operators (damping passed down exactly through ``add_diagonal``), so each is as exact as the
group structures allow. Roots are block-diagonal with the columns ordered by group.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
from linear_operator.operators import LinearOperator, RootLinearOperator
from torch import Tensor

from fim_linops.layout import LayerBlock
from fim_linops.operators.base import ExactSolveMixin, FisherOperator, as_columns, from_columns

Spans = tuple[tuple[int, int], ...]


def spans_of(blocks: Iterable[LayerBlock]) -> Spans:
    """The blocks' slices [start, stop) of the public vector, merged where they touch."""
    out: list[list[int]] = []
    for b in blocks:
        if out and out[-1][1] == b.start:
            out[-1][1] = b.stop
        else:
            out.append([b.start, b.stop])
    return tuple((lo, hi) for lo, hi in out)


class LayerInfo(NamedTuple):
    """One layer of a mixed operator, for :meth:`Mixed.describe`: the module's name and type, its
    parameter count, its structure and why it is not Kronecker-factored ("" when it is, or when
    the user chose its structure)."""

    name: str
    kind: str
    numel: int
    structure: str
    reason: str = ""


def gather(x: Tensor, spans: Spans) -> Tensor:
    """The rows of x (P, m) in the given slices, concatenated."""
    return torch.cat([x[lo:hi] for lo, hi in spans], dim=0)


def scatter(out: Tensor, y: Tensor, spans: Spans) -> None:
    """Write y (the concatenated slices) back into out (P, m) in place."""
    offset = 0
    for lo, hi in spans:
        out[lo:hi] = y[offset : offset + hi - lo]
        offset += hi - lo


class Mixed(ExactSolveMixin, FisherOperator):
    r"""Block-diagonal over groups of layers with one structure per group.

    Args:
        ops: one Fisher operator per group (undamped).
        spans: per group, the (start, stop) slices of the public vector it covers.
        structures: the groups' structure names (for display).
        layers: per layer, a :class:`LayerInfo` (for :meth:`describe`); empty when unknown.
        damping: scalar delta, shared by all groups.
    """

    structure = "mixed"

    def __init__(
        self,
        *ops: FisherOperator,
        spans: tuple[Spans, ...],
        structures: tuple[str, ...] = (),
        layers: tuple[LayerInfo, ...] = (),
        damping: Tensor | None = None,
    ):
        if len(ops) != len(spans):
            raise ValueError("Mixed needs one tuple of spans per group operator")
        if damping is None:
            damping = torch.zeros((), dtype=ops[0].dtype, device=ops[0].device)
        layers = tuple(LayerInfo(*info) for info in layers)
        super().__init__(
            *ops,
            spans=tuple(spans),
            structures=tuple(structures),
            layers=layers,
            damping=damping,
        )
        self.ops = ops
        self.spans = tuple(spans)
        self.structures = tuple(structures)
        self.layers = layers

    def _numel(self) -> int:
        return sum(hi - lo for sp in self.spans for lo, hi in sp)

    def groups(self):
        return zip(self.ops, self.spans, strict=True)

    def _scaled(self, c: Tensor) -> Mixed:
        return Mixed(
            *[op * c for op in self.ops],
            spans=self.spans,
            structures=self.structures,
            layers=self.layers,
            damping=self.damping * c,
        )

    def _damped(self):
        """(group operator + delta I, spans) per group: the structure's exact damping."""
        for op, sp in self.groups():
            yield op.add_diagonal(self.damping), sp

    def _matmul_undamped(self, rhs: Tensor) -> Tensor:
        out = torch.empty_like(rhs)
        for op, sp in self.groups():
            scatter(out, op._matmul(gather(rhs, sp)), sp)
        return out

    def _diagonal_undamped(self) -> Tensor:
        out = torch.empty(self._numel(), 1, dtype=self.dtype, device=self.device)
        for op, sp in self.groups():
            scatter(out, op.diagonal()[:, None], sp)
        return out[:, 0]

    def _trace_undamped(self) -> Tensor:
        return sum((op.trace_exact() for op in self.ops), self.damping.new_zeros(()))

    def _frobenius_sq_undamped(self) -> Tensor:
        return sum((op.frobenius_sq_exact() for op in self.ops), self.damping.new_zeros(()))

    def to_dense(self) -> Tensor:
        return self._matmul(torch.eye(self._numel(), dtype=self.dtype, device=self.device))

    # -- per-group exact algebra -----------------------------------------------------------------
    def _solve_cols(self, rhs: Tensor) -> Tensor:
        out = torch.empty_like(rhs)
        for op, sp in self._damped():
            scatter(out, op.solve(gather(rhs, sp)), sp)
        return out

    def logdet(self) -> Tensor:
        return sum(op.inv_quad_logdet(logdet=True)[1] for op, _ in self._damped())

    def root_decomposition(self, method: str | None = None) -> LinearOperator:
        roots = [op.root_decomposition().root for op, _ in self._damped()]
        return RootLinearOperator(GroupBlocks(*roots, spans=self.spans))

    def root_inv_decomposition(
        self, initial_vectors=None, test_vectors=None, method=None
    ) -> LinearOperator:
        roots = [op.root_inv_decomposition().root for op, _ in self._damped()]
        return RootLinearOperator(GroupBlocks(*roots, spans=self.spans))

    def _symeig(self, eigenvectors: bool = False, return_evals_as_lazy: bool | None = False):
        pairs = [op.eigh() for op, _ in self._damped()]
        evals = torch.cat([e for e, _ in pairs])
        evecs = GroupBlocks(*[v for _, v in pairs], spans=self.spans) if eigenvectors else None
        return evals, evecs

    def eigh(self) -> tuple[Tensor, LinearOperator]:
        """Eigenvalues (P,) ordered by group and eigenvectors (P, P) block-diagonal by group."""
        return self._symeig(eigenvectors=True)

    def _eigenvalues(self) -> Tensor:
        """The undamped eigenvalues (P,), ordered by group (as :meth:`eigh`)."""
        return torch.cat(
            [op._eigenvalues() if hasattr(op, "_eigenvalues") else op.eigh()[0] for op in self.ops]
        )

    def describe(self) -> str:
        """One line per layer: name, type, parameter count, structure and, for a layer that is
        not Kronecker-factored in a kfac/ekfac/kron_sum build, why."""
        if not self.layers:
            return repr(self)
        rows = [("layer", "type", "params", "structure", "why not Kronecker")]
        rows += [(i.name, i.kind, str(i.numel), i.structure, i.reason) for i in self.layers]
        widths = [max(len(r[c]) for r in rows) for c in range(4)]
        lines = [
            "  ".join(r[c].rjust(widths[c]) if c == 2 else r[c].ljust(widths[c]) for c in range(4))
            + ("  " + r[4] if r[4] else "")
            for r in rows
        ]
        head = f"{type(self).__name__}(P={self._numel()}, groups: {', '.join(self.structures)})"
        return "\n".join([head, *("  " + line.rstrip() for line in lines)])

    def __repr__(self) -> str:
        if self.layers:
            return self.describe()
        inner = ", ".join(f"{s}: {op!r}" for s, op in zip(self.structures, self.ops, strict=False))
        return f"Mixed(P={self._numel()}, {inner})"


class GroupBlocks(LinearOperator):
    r"""A (P, K) matrix, block-diagonal over groups: rows of group g at its public slices, columns
    ordered by group (group g owns K_g consecutive columns). ``transposed``: the (K, P) adjoint."""

    def __init__(
        self, *blocks: LinearOperator | Tensor, spans: tuple[Spans, ...], transposed: bool = False
    ):
        super().__init__(*blocks, spans=spans, transposed=transposed)
        self.blocks = blocks
        self.spans = spans
        self.transposed = transposed
        self.widths = [b.shape[-1] for b in blocks]
        self.p = sum(hi - lo for sp in spans for lo, hi in sp)

    def _size(self) -> torch.Size:
        k = sum(self.widths)
        return torch.Size([k, self.p]) if self.transposed else torch.Size([self.p, k])

    def _transpose_nonbatch(self) -> LinearOperator:
        return GroupBlocks(*self.blocks, spans=self.spans, transposed=not self.transposed)

    def _matmul(self, rhs: Tensor) -> Tensor:
        cols, shape, vector = as_columns(rhs)
        outs = []
        offset = 0
        if self.transposed:  # (K, P) @ (P, m): per group B_g^T x[spans_g]
            for b, sp in zip(self.blocks, self.spans, strict=True):
                outs.append(b.mT @ gather(cols, sp))
            out = torch.cat(outs, dim=0)
        else:  # (P, K) @ (K, m): rows of group g get B_g x[cols_g]
            out = torch.empty(self.p, cols.shape[1], dtype=cols.dtype, device=cols.device)
            for b, sp, w in zip(self.blocks, self.spans, self.widths, strict=True):
                scatter(out, b @ cols[offset : offset + w], sp)
                offset += w
        return from_columns(out, shape, vector)

    def to_dense(self) -> Tensor:
        return self._matmul(torch.eye(self.shape[-1], dtype=self.dtype, device=self.device))
