r"""Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2's attention and MLP projections): a
Linear layer with its weight stored as (in, out), y = a W + b, inputs of any leading dims.

Registered lazily (rules/base.py, ``register_lazy``): the rule is attached to the class the first
time a lookup finds ``transformers.pytorch_utils`` already imported; fim_linops never imports
transformers.

Index convention: k back-propagated column, n example, t position (leading dims after the batch
dim flattened, T = 1 without them), i input feature, o output feature.

Per-example gradient: dW[k, n] = sum_t a[n, t] g[k, n, t]^T (i, o), db[k, n] = sum_t g[k, n, t].
The matrix view of the block is M = [W; b^T] ((i + 1) x o), whose row-major order is the public
order (W row-major, then b), so KFAC is (A / (N T)) kron (G / N) with the input covariance A on
the left (as for nn.Embedding): A = sum_{n,t} [a; 1][a; 1]^T, G = sum_{k,n,t} g g^T, the same
factors as nn.Linear's for W^T ("expand"; "reduce" averages a and sums g over positions first).
"""

from __future__ import annotations

from typing import cast

from torch import Tensor, nn

from fim_linops.engine.rules.base import KronStats, LayerRule, register_lazy
from fim_linops.engine.rules.linear import (
    add_linear_factor_sums,
    linear_factor_sums,
    linear_param_grads,
)


class HFConv1DRule(LayerRule):
    has_kfac = True
    kron_left_is_a = True

    def param_grads(
        self, module: nn.Module, a: Tensor, g: Tensor, names: tuple[str, ...]
    ) -> list[Tensor]:
        return linear_param_grads(a, g, names, "knto,nti->knio")  # dW (k, n, i, o)

    def kfac(
        self, module: nn.Module, a: Tensor, g: Tensor, names: tuple[str, ...], reduce: bool = False
    ) -> KronStats:
        a_sum, g_sum, rows = linear_factor_sums(a, g, names, reduce)  # A on the left
        return KronStats(left_sum=a_sum, right_sum=g_sum, a_rows=rows, left_is_a=True)

    def accumulate_kfac(
        self,
        acc: KronStats,
        module: nn.Module,
        a: Tensor,
        g: Tensor,
        names: tuple[str, ...],
        with_a: bool = True,
    ) -> None:
        acc.a_rows += add_linear_factor_sums(acc.left_sum[0], acc.right_sum[0], a, g, names, with_a)

    def kron_shape(self, module: nn.Module, names: tuple[str, ...]) -> tuple[int, int, int]:
        n_in, n_out = cast(Tensor, module.weight).shape
        rows = (n_in if "weight" in names else 0) + (1 if "bias" in names else 0)
        return 1, rows, n_out

    def kron_flags(self, names: tuple[str, ...]) -> tuple[bool, bool]:
        return True, False  # M = [W; b^T] row-major is the public order as it is


register_lazy("transformers.pytorch_utils", "Conv1D", HFConv1DRule())
