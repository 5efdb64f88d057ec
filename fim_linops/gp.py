r"""The finite-width NTK as a GPyTorch kernel.

k(x, x') = J(x) J(x')^T with J = d f(x; theta_0) / d theta at the network's current parameters
theta_0 (held fixed: the network is not a submodule of the kernel, so GP training never touches
it). Wrap it in ``gpytorch.kernels.ScaleKernel`` for an outputscale; use it in an ``ExactGP`` for
training (marginal likelihood in the outputscale and the noise) and prediction, including
``gpytorch.settings.fast_pred_var()``.

Outputs: ``output=None`` and a network with C > 1 outputs gives the multi-output kernel
(N1*C, N2*C) with rows n*C + c (GPyTorch's interleaved multitask order;
``num_outputs_per_input`` returns C); an int c the kernel of output c; ``"sum"`` the trace over the
outputs (N1, N2).

Representation (``mode``): "auto" returns the root operator of the dense Jacobians
(``RootLinearOperator(J)`` when x1 is x2, ``MatmulLinearOperator(J1, J2^T)`` otherwise) when they
fit in ``max_jacobian_bytes``, else the implicit operator (products J1 (J2^T V)); "dense" the Gram
from the per-layer rules; "root"/"implicit" force one of the former. ``diag=True`` never forms
the Gram: the squared norms of the Jacobian rows come from the layer rules.
"""

from __future__ import annotations

import sys
from typing import Any

import gpytorch
import torch
from linear_operator.operators import LinearOperator
from torch import Tensor, nn

import fim_linops.ntk  # noqa: F401  (the module, even where fl.ntk is the function)
from fim_linops.layout import ParamLayout
from fim_linops.operators.ntk import gram_diagonal_of
from fim_linops.options import BuildOptions
from fim_linops.state import preserved_state

fntk = sys.modules["fim_linops.ntk"]
_MODES = ("auto", "dense", "root", "implicit")


class NTKKernel(gpytorch.kernels.Kernel):
    r"""Empirical NTK kernel k(x, x') = J(x) J(x')^T of a network at its current parameters.

    Args:
        model: the network; inputs are passed to it as ``model(x)`` with x of shape (N, d).
        output: None (all outputs, multi-output when C > 1), an output index, or "sum".
        params: None (all trainable parameters) or an iterable of parameters/modules.
        mode: "auto", "dense", "root" or "implicit" (see the module docstring).
        batch_size: examples per forward/backward pass.
        max_jacobian_bytes: the "auto" limit for dense Jacobians.
    """

    is_stationary = False

    def __init__(
        self,
        model: nn.Module,
        output: int | str | None = None,
        params: Any = None,
        mode: str = "auto",
        batch_size: int | None = fntk.DEFAULT_BATCH_SIZE,
        max_jacobian_bytes: int = 1 << 30,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if mode not in _MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {_MODES}")
        if output not in (None, "sum") and not (
            isinstance(output, int) and not isinstance(output, bool)
        ):
            raise ValueError(f"output must be None, an output index or 'sum', got {output!r}")
        object.__setattr__(self, "model", model)  # not a submodule: its parameters stay fixed
        self.layout = ParamLayout.from_model(model, params)
        self.output = output
        self.mode = mode
        self.batch_size = batch_size
        self.max_jacobian_bytes = max_jacobian_bytes
        self._n_outputs: int | None = None

    @property
    def _outputs(self) -> str | int:
        return "full" if self.output is None else self.output

    def n_outputs(self, x: Tensor) -> int:
        """C, the network's (selected) outputs per example."""
        if self._n_outputs is None:
            sel, _ = fntk._outputs(self._outputs)
            with preserved_state(self.model):
                self._n_outputs = fntk._n_outputs(self.model, x[:1], sel)
        return self._n_outputs

    def num_outputs_per_input(self, x1: Tensor, x2: Tensor) -> int:
        return self.n_outputs(x1) if self.output is None else 1

    def _jac(self, x: Tensor):
        sel, _ = fntk._outputs(self._outputs)
        options = BuildOptions.of(batch_size=self.batch_size)
        return fntk._jacobian_op(self.model, self.layout, x, sel, options)

    def forward(
        self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params
    ) -> Tensor | LinearOperator:
        if last_dim_is_batch:
            raise NotImplementedError("NTKKernel does not support last_dim_is_batch")
        if x1.ndim > 2 or x2.ndim > 2:
            raise NotImplementedError(
                f"NTKKernel takes inputs of shape (N, d), got {tuple(x1.shape)} and "
                f"{tuple(x2.shape)}; batched GPs are not supported"
            )
        same = x1 is x2 or (x1.shape == x2.shape and torch.equal(x1, x2))
        trace = self.output == "sum"
        if diag:
            if same:
                return gram_diagonal_of(self._jac(x1), trace)
            j1, j2 = self._jac(x1).to_dense(), self._jac(x2).to_dense()
            n = x1.shape[0]
            d = (j1 * j2).sum(-1)
            return d.reshape(n, -1).sum(-1) if trace else d
        mode = self.mode
        if mode == "auto":
            c = self.n_outputs(x1)
            itemsize = torch.empty((), dtype=x1.dtype).element_size()
            need = (x1.shape[0] + (0 if same else x2.shape[0])) * c * self.layout.numel * itemsize
            mode = "root" if need <= self.max_jacobian_bytes else "implicit"
        structure = {"root": "lowrank", "dense": "dense", "implicit": "implicit"}[mode]
        return fntk.ntk(
            self.model,
            x1,
            None if same else x2,
            structure=structure,
            outputs=self._outputs,
            params=self.layout.params,
            batch_size=self.batch_size,
        )
