r"""Implicit (matrix-free) Fisher: exact products F V = 1/N sum_n J_n^T H_n J_n V, never
materialised.

Stored: the model, a snapshot of the trainable parameters theta_0 (constructor tensors), the data
batches and, for MC/empirical Fishers, the fixed back-propagated output columns per batch (so the
operator is one fixed matrix). Per product and batch: one forward with all M tangents (``jvp``
under ``vmap``), the output-space Hessian (or the stored columns u: H = sum_k u_k u_k^T), and one
forward plus one batched backward (``vjp`` under ``vmap``): the linearisation is shared by all
columns of V. Diagonal and dense form come from per-example gradients (torch.func, chunked).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap

from fim_linops.data import move
from fim_linops.distributed import all_reduce_
from fim_linops.engine.functional import (
    FunctionalModel,
    jvp_columns,
    output_fn,
    transform_errors,
)
from fim_linops.engine.rules.base import chunk_size
from fim_linops.layout import ParamLayout
from fim_linops.likelihoods import Likelihood
from fim_linops.memory_guard import DEFAULT_MAX_BYTES, check_bytes
from fim_linops.operators.base import FisherOperator
from fim_linops.sharding.gather import on_gathered_model

#: bytes of per-example gradient chunks kept for the Frobenius norm before recomputing them
FROBENIUS_KEEP_BYTES = 1 << 28


class Implicit(FisherOperator):
    structure = "implicit"

    def __init__(
        self,
        *params: Tensor,
        damping: Tensor | None = None,
        model: nn.Module,
        layout: ParamLayout,
        batches: list[tuple[Any, Tensor | None]],
        likelihood: Likelihood,
        n_examples: int,
        group: Any = None,
        masks: list[Tensor | None] | None = None,
    ):
        if damping is None:
            damping = torch.zeros((), dtype=params[0].dtype, device=params[0].device)
        super().__init__(
            *params,
            damping=damping,
            model=model,
            layout=layout,
            batches=batches,
            likelihood=likelihood,
            n_examples=n_examples,
            group=group,
            masks=masks,
        )
        #: per batch, the kept entries (N, T*C) of the flat output (dropped positions) or None
        self.masks = masks if masks is not None else [None] * len(batches)
        self.group = group
        self.params = params
        self.model = model
        self.layout = layout
        self.batches = batches
        self.likelihood = likelihood
        self.n_examples = n_examples

    def _numel(self) -> int:
        return self.layout.numel

    @property
    def _run_dtype(self) -> torch.dtype:
        """The dtype the model runs in: its own for a half model (whose operator is float32),
        else the operator's."""
        dt = self.layout.entries[0].param.dtype
        return dt if dt in (torch.float16, torch.bfloat16) else self.dtype

    def _param_dict(self) -> dict[str, Tensor]:
        dt = self._run_dtype
        return {e.name: p.to(dt) for e, p in zip(self.layout.entries, self.params, strict=True)}

    def _batches(self):
        for x, cols in self.batches:
            yield move(x, self.device, self._run_dtype), cols

    def _hmm(self, i: int, f: Tensor, v: Tensor) -> Tensor:
        """H v of batch i, with its dropped positions masked: M H M v (M = diag(mask))."""
        m = self.masks[i]
        if m is None:
            return self.likelihood.hessian_matmul(f, v)
        m = m.to(v.dtype)
        return m * self.likelihood.hessian_matmul(f, m * v)

    def _root(self, i: int, f: Tensor) -> Tensor:
        """(K, N, C) columns of the output Hessian root of batch i (masked)."""
        s = self.likelihood.hessian_sqrt(f)
        m = self.masks[i]
        return (s if m is None else s * m[:, :, None].to(s.dtype)).permute(2, 0, 1)

    def _scaled(self, c: Tensor) -> FisherOperator:
        from fim_linops.operators.dense import Dense  # noqa: F401  (scaling keeps it implicit)

        return _ScaledImplicit(self, c)

    def _tangents(self, rhs: Tensor) -> dict[str, Tensor]:
        """name -> (M, *shape) tangents (Embedding ``padding_idx`` positions carry none in the
        forward: :mod:`fim_linops.engine.padding`)."""
        return self.layout.unflatten(rhs.T.to(self._run_dtype))

    @on_gathered_model
    def _matvec_forward_ad(self, rhs: Tensor) -> Tensor:
        """One column: a single forward carrying the tangent (forward-mode dual numbers) that
        also records the reverse graph, then one backward: J^T H (J v) at about 2x the cost of a
        plain forward+backward."""
        import torch.autograd.forward_ad as fwad

        tangents = self._tangents(rhs)
        out = torch.zeros(self._numel(), dtype=self.dtype, device=self.device)
        for i, (x, cols) in enumerate(self._batches()):
            params = {n: p.detach().requires_grad_() for n, p in self._param_dict().items()}
            # linear_operator calls _matmul inside an autograd.Function, where forward-mode AD
            # is switched off: switch it on for this forward
            with torch.enable_grad(), fwad._set_fwd_grad_enabled(True), fwad.dual_level():
                duals = {n: fwad.make_dual(p, tangents[n][0]) for n, p in params.items()}
                primal, jv = fwad.unpack_dual(output_fn(self.model, x, self.likelihood)(duals))
                jv = torch.zeros_like(primal) if jv is None else jv
            if cols is None:
                u = self._hmm(i, primal.detach(), jv)
            else:
                u = torch.einsum("knc,knd,nd->nc", cols.to(jv.dtype), cols.to(jv.dtype), jv)
            grads = torch.autograd.grad(primal, list(params.values()), u, allow_unused=True)
            filled = [
                torch.zeros_like(p) if g is None else g
                for g, p in zip(grads, params.values(), strict=True)
            ]
            out += self.layout.flatten(filled).to(self.dtype)
        all_reduce_([out], self.group)
        return out[:, None] / self.n_examples

    def _matmul_undamped(self, rhs: Tensor) -> Tensor:
        with transform_errors("the implicit Fisher's product"):
            return self._matmul_transforms(rhs)

    @on_gathered_model
    def _matmul_transforms(self, rhs: Tensor) -> Tensor:
        if rhs.shape[1] == 1 and not rhs.requires_grad:
            return self._matvec_forward_ad(rhs)
        params = self._param_dict()
        tangents = self._tangents(rhs)  # name -> (M, *shape)
        out = torch.zeros(rhs.shape[1], self._numel(), dtype=self.dtype, device=self.device)
        for i, (x, cols) in enumerate(self._batches()):
            f = output_fn(self.model, x, self.likelihood)
            # torch annotates vjp's result as a union over has_aux; without aux it is a pair
            fx, pullback = vjp(f, params)  # type: ignore[misc]
            jv = jvp_columns(f, params, tangents)  # (M, n, C)
            if cols is None:
                u = self._hmm(i, fx.detach(), jv)
            else:
                # k: stored column, n: example, c/d: output, m: right-hand side
                u = torch.einsum("knc,knd,mnd->mnc", cols.to(jv.dtype), cols.to(jv.dtype), jv)
            g = self.layout.flatten(vmap(pullback)(u)[0]).to(self.dtype)  # (M, P)
            out = out + g
        all_reduce_([out], self.group)
        return out.T / self.n_examples

    def per_example_grads(self):
        """Yield per-example gradient chunks (K*n, P) over the data (torch.func); on an FSDP
        model, consume it inside ``sharding.gathered(self.model)``."""
        func = FunctionalModel(self.model, self.layout.entries)
        params = self._param_dict()
        for i, (x, cols) in enumerate(self._batches()):
            with torch.no_grad():
                fx = output_fn(self.model, x, self.likelihood)(params)
            v = cols if cols is not None else self._root(i, fx)
            n = fx.shape[0]
            step = chunk_size(v.shape[0], n, self._numel(), v.element_size())
            for lo in range(0, n, step):
                hi = min(n, lo + step)
                grads = func.per_example_grads(x, v, lo, hi, self.likelihood, params)
                yield self.layout.flatten(grads).reshape(-1, self._numel()).to(self.dtype)

    @on_gathered_model
    def _diagonal_undamped(self) -> Tensor:
        total = torch.zeros(self._numel(), dtype=self.dtype, device=self.device)
        for g in self.per_example_grads():
            total += (g**2).sum(0)
        all_reduce_([total], self.group)
        return total / self.n_examples

    @on_gathered_model
    def to_dense(self) -> Tensor:
        total = torch.zeros(self._numel(), self._numel(), dtype=self.dtype, device=self.device)
        for g in self.per_example_grads():
            total += g.T @ g
        all_reduce_([total], self.group)
        return total / self.n_examples + self.damping * torch.eye(
            self._numel(), dtype=self.dtype, device=self.device
        )

    @on_gathered_model
    def _frobenius_sq_undamped(self) -> Tensor:
        r"""||F||_F^2 = ||G G^T||_F^2 / N^2 over the stacked per-example gradients G (N K, P),
        from pairs of gradient chunks: chunks are kept while they fit in ``chunk_size``'s budget
        (FROBENIUS_KEEP_BYTES); beyond it the earlier chunks are recomputed for each new one (exact,
        O(chunks^2) passes, memory of two chunks), never N K x P at once."""
        if self.group is not None:
            check_bytes(
                "the dense Fisher for the Frobenius norm across processes",
                (self._numel(), self._numel()),
                self.dtype,
                DEFAULT_MAX_BYTES,
                "estimate it with fl.spectral's Frobenius estimator instead",
            )
            return (self.to_dense() ** 2).sum()
        budget = FROBENIUS_KEEP_BYTES
        kept: list[Tensor] = []
        kept_bytes, streaming = 0, False
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for i, gi in enumerate(self.per_example_grads()):
            earlier = itertools.islice(self.per_example_grads(), i) if streaming else kept
            for gj in earlier:
                total = total + 2.0 * ((gi @ gj.T) ** 2).sum()
            total = total + ((gi @ gi.T) ** 2).sum()
            if not streaming:
                kept_bytes += gi.numel() * gi.element_size()
                if kept_bytes <= budget:
                    kept.append(gi)
                else:
                    streaming, kept = True, []
        return total / self.n_examples**2

    @on_gathered_model
    def quad_exact(self, v: Tensor) -> Tensor:
        """v^T (F + delta I) v with one JVP per batch (no VJP)."""
        params = self._param_dict()
        tangents = self._tangents(v[:, None])
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for i, (x, cols) in enumerate(self._batches()):
            f = output_fn(self.model, x, self.likelihood)
            jv = jvp_columns(f, params, tangents)[0]  # (n, C)
            if cols is None:
                with torch.no_grad():
                    fx = f(params)
                total = total + (jv * self._hmm(i, fx, jv)).to(self.dtype).sum()
            else:
                total = (
                    total + (torch.einsum("knc,nc->kn", cols.to(jv.dtype), jv).float() ** 2).sum()
                )
        all_reduce_([total], self.group)
        return total / self.n_examples + self.damping * (v * v).sum()

    def solve(self, right_tensor: Tensor, left_tensor: Tensor | None = None) -> Tensor:
        """(F + delta I)^-1 right by conjugate gradients with a relative tolerance of 1e-10 in
        float64 (1e-5 in float32) that really applies (linear_operator's default CG stops at 1.0)."""
        from fim_linops.solvers import cg

        tol = 1e-10 if self.dtype == torch.float64 else 1e-5
        res, _ = cg(self._matmul, right_tensor, tol=tol)
        return res if left_tensor is None else left_tensor @ res


class _ScaledImplicit(FisherOperator):
    """c * (F + delta I) for an implicit F, still implicit."""

    structure = "implicit"

    def __init__(self, base: Implicit, scale: Tensor, *, damping: Tensor | None = None):
        if damping is None:
            damping = torch.zeros((), dtype=scale.dtype, device=scale.device)
        super().__init__(base, scale, damping=damping)
        self.base = base
        self.scale = scale

    def _numel(self) -> int:
        return self.base._numel()

    def _matmul_undamped(self, rhs: Tensor) -> Tensor:
        return self.scale * self.base._matmul(rhs)

    def _diagonal_undamped(self) -> Tensor:
        return self.scale * self.base._diagonal()

    def _frobenius_sq_undamped(self) -> Tensor:
        return self.scale**2 * self.base.frobenius_sq_exact()

    def _trace_undamped(self) -> Tensor:
        return self.scale * self.base.trace_exact()
