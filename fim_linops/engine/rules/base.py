r"""The layer-rule interface and registry.

A rule turns what one call of a module saw — its input features ``a`` (prepared in the forward
hook) and the gradients ``g`` of the back-propagated columns w.r.t. its output — into the layer's
per-example gradients, diagonal, Kronecker factors or NTK block, batched, with no Python loop over
examples.

Shapes: K back-propagated columns, N examples, p the block's trainable parameters (concatenated
in the module's named_parameters order, the public order).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fim_linops.naming import class_name


@dataclass
class KronStats:
    r"""Sums for one Kronecker block ``Left kron Right`` over the row-major matrix view M of the
    block (shape (groups, rows, cols)): ``left_sum`` (groups, rows, rows), ``right_sum``
    (groups, cols, cols); the operator uses Left = left_sum / left_count, Right = right_sum /
    right_count where the counts are the numbers of examples (G side) or of input rows (A side).
    ``left_is_a`` says which side the input covariance A sits on (False for Linear/Conv: the left
    factor is G over outputs; True for Embedding: the left factor is A over the vocabulary)."""

    left_sum: Tensor
    right_sum: Tensor
    a_rows: int  # number of input rows (examples x positions) summed into A
    left_is_a: bool = False


class LayerRule:
    """One family of layers. Subclasses set ``types`` and implement the methods they support."""

    types: tuple[type[nn.Module], ...] = ()
    #: whether ``kfac`` is available for this family
    has_kfac: bool = False
    #: whether the left Kronecker factor is the input covariance A (Embedding: W is (V, D))
    kron_left_is_a: bool = False
    #: the module's own parameters the rule covers (a module holding others goes to torch.func)
    param_names: tuple[str, ...] = ("weight", "bias")

    def supports(self, module: nn.Module) -> bool:
        """Whether this module instance can use the rule (e.g. BatchNorm only in eval mode)."""
        return True

    def unsupported_reason(self, module: nn.Module) -> str:
        return ""

    def prepare(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        """Features to keep from the forward call (detached): by default the input."""
        return inputs[0].detach()

    def param_grads(
        self, module: nn.Module, a: Tensor, g: Tensor, names: tuple[str, ...]
    ) -> list[Tensor]:
        """Per-example gradients, one (K, N, *shape) tensor per trainable parameter in ``names``."""
        raise NotImplementedError

    def grads(self, module: nn.Module, a: Tensor, g: Tensor, names: tuple[str, ...]) -> Tensor:
        """Per-example gradients (K, N, p) of the trainable parameters ``names``."""
        return flat_cat(self.param_grads(module, a, g, names))

    def add_diag(
        self, out: Tensor, module: nn.Module, a: Tensor, g: Tensor, names: tuple[str, ...]
    ) -> None:
        """``out += sum_{K, N}`` of the squared per-example gradients, out of shape (p,): the
        block's slice of the running total (squares in place in the fresh per-example tensors, no
        concatenation)."""
        lo = 0
        for t in self.param_grads(module, a, g, names):
            size = t[0, 0].numel()
            out[lo : lo + size] += t.square_().sum((0, 1)).reshape(-1)
            lo += size

    def diag_workspace(
        self, module: nn.Module, a: Tensor, g: Tensor, names: tuple[str, ...]
    ) -> int:
        """Elements per example that ``diag`` materialises (per-example gradients, K p by
        default; 0 when the rule contracts a and g directly). The caller chunks the examples so
        that this workspace stays cache-sized."""
        return g.shape[0] * sum(getattr(module, n).numel() for n in names)

    def kfac(
        self, module: nn.Module, a: Tensor, g: Tensor, names: tuple[str, ...], reduce: bool = False
    ) -> KronStats:
        """Kronecker factor sums; ``reduce``: KFAC-reduce over positions (Eschenhagen et al.
        2023) instead of expand, for rules that have positions."""
        raise NotImplementedError(f"no KFAC rule for {class_name(module)}")

    def add_kfac(
        self,
        acc: KronStats | None,
        module: nn.Module,
        a: Tensor,
        g: Tensor,
        names: tuple[str, ...],
        reduce: bool = False,
        with_a: bool = True,
    ) -> KronStats:
        """``acc`` (zero sums when None, on the first call) plus this call's Kronecker factor
        sums, in place: :meth:`accumulate_kfac` for the expand convention, the sums of
        :meth:`kfac` added for reduce. ``with_a=False`` adds the gradient factor only (a later
        chunk of the same batch's columns: its inputs are already in A)."""
        if acc is None:
            acc = self.zero_kron_stats(module, names, g.dtype, g.device)
        if reduce:
            _add_stats(acc, self.kfac(module, a, g, names, reduce=True), with_a)
        else:
            self.accumulate_kfac(acc, module, a, g, names, with_a)
        return acc

    def accumulate_kfac(
        self,
        acc: KronStats,
        module: nn.Module,
        a: Tensor,
        g: Tensor,
        names: tuple[str, ...],
        with_a: bool = True,
    ) -> None:
        """Add this call's factor sums ("expand") into ``acc`` (the gradient factor only unless
        ``with_a``); by default the sums of :meth:`kfac`, overridden by rules that can skip the
        per-call factor tensors."""
        _add_stats(acc, self.kfac(module, a, g, names), with_a)

    def zero_kron_stats(
        self, module: nn.Module, names: tuple[str, ...], dtype: torch.dtype, device: torch.device
    ) -> KronStats:
        """Zero factor sums of this block's Kronecker shape."""
        groups, rows, cols = self.kron_shape(module, names)
        return KronStats(
            torch.zeros(groups, rows, rows, dtype=dtype, device=device),
            torch.zeros(groups, cols, cols, dtype=dtype, device=device),
            0,
            self.kron_left_is_a,
        )

    def kron_shape(self, module: nn.Module, names: tuple[str, ...]) -> tuple[int, int, int]:
        """(groups, rows, cols) of the block's matrix view for Kronecker structures."""
        raise NotImplementedError(f"no Kronecker view for {class_name(module)}")

    def kron_flags(self, names: tuple[str, ...]) -> tuple[bool, bool]:
        """(has_weight, has_bias) of the block's :class:`KronSpec`: by default the bias is an
        extra column of the matrix view M = [W | b]; a rule whose M holds the parameters
        row-major in the public order as they are (HF Conv1D: M = [W; b^T]) says (True, False)."""
        return "weight" in names, "bias" in names

    def kron_kernel(self, module: nn.Module) -> int:
        """0, or the kernel size of a transposed convolution, whose weight (groups * in, rows,
        kernel) is not row-major in the matrix view (operators/kron.py, ``KronSpec.kernel``)."""
        return 0

    # -- NTK (Gram) blocks: q, k back-propagated columns of each side, n, m examples ------------
    def gram_from_ag(self, module: nn.Module, a: Tensor, g: Tensor, names: tuple[str, ...]) -> bool:
        """Whether :meth:`gram` from (a, g) is cheaper than a product of per-example gradients
        (the caller then keeps (a, g) instead of the (K, N, p) gradients). Default: no."""
        return False

    def gram(
        self,
        module: nn.Module,
        a1: Tensor,
        g1: Tensor,
        a2: Tensor,
        g2: Tensor,
        names: tuple[str, ...],
    ) -> Tensor:
        r"""This layer's NTK block sum_p J1[k, n, p] J2[q, m, p], shape (K1, N1, K2, N2).
        Default: through per-example gradients (K, N, p) of both sides."""
        j1, j2 = self.grads(module, a1, g1, names), self.grads(module, a2, g2, names)
        return torch.einsum("knp,qmp->knqm", j1, j2)

    def gram_diag(self, module: nn.Module, a: Tensor, g: Tensor, names: tuple[str, ...]) -> Tensor:
        """The diagonal sum_p J[k, n, p]^2 of this layer's NTK block, shape (K, N)."""
        return self.grads(module, a, g, names).square().sum(-1)


def _add_stats(acc: KronStats, s: KronStats, with_a: bool = True) -> None:
    """``acc += s``; the input side (A and its row count) only ``with_a``."""
    if with_a or not acc.left_is_a:
        acc.left_sum += s.left_sum
    if with_a or acc.left_is_a:
        acc.right_sum += s.right_sum
    if with_a:
        acc.a_rows += s.a_rows


RULES: dict[type[nn.Module], LayerRule] = {}
#: capture forwards, by module type: modules whose forward applies their own (or a submodule's)
#: parameters where no hook can see them get, while the engine captures, a forward that computes
#: the same function through hookable calls. Signature ``fn(module, record, *args, **kwargs)``,
#: ``record`` as in engine/capture.py (None when the module's own calls are not captured)
CAPTURE_FORWARDS: dict[type[nn.Module], Callable[..., Any]] = {}
#: rules for classes of optional packages, by (module path, class name): resolved into RULES the
#: first time a lookup finds that package already imported (``sys.modules``), so registering
#: them never imports the package (a model holding such a layer has imported it)
LAZY: dict[tuple[str, str], LayerRule] = {}


def register(rule: LayerRule) -> LayerRule:
    """Register a rule instance for each of its module types."""
    for t in rule.types:
        RULES[t] = rule
    return rule


def register_lazy(module_path: str, class_name: str, rule: LayerRule) -> None:
    """Register ``rule`` for the class ``module_path.class_name`` once that module is imported."""
    LAZY[(module_path, class_name)] = rule


def _resolve_lazy() -> None:
    for key in [k for k in LAZY if k[0] in sys.modules]:
        cls = getattr(sys.modules[key[0]], key[1], None)
        rule = LAZY.pop(key)
        if isinstance(cls, type):
            RULES[cls] = rule


def ruled_type(module: nn.Module) -> type[nn.Module] | None:
    """The nearest class in the module's class hierarchy (MRO) that has a rule: its own type, or
    a base class for a subclass (``NonDynamicallyQuantizableLinear``, timm's ``Linear``)."""
    if LAZY:
        _resolve_lazy()
    for cls in type(module).__mro__:
        if cls in RULES:
            return cls
    return None


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule of the nearest ruled class in the module's hierarchy. A subclass that overrides
    ``forward`` is checked on the first batch (engine/checks.py, :func:`forward_mismatch`): if
    its forward does not compute the ruled class's function it goes through torch.func."""
    cls = ruled_type(module)
    if cls is None:
        return None
    rule = RULES[cls]
    return rule if rule.supports(module) else None


#: bytes of per-example workspace for diagonal statistics: small enough to stay in cache
DIAG_CHUNK_BYTES = 1 << 22


#: the default budget of :func:`chunk_size` (per-example gradient chunks)
CHUNK_BYTES = 1 << 28


def chunk_size(k: int, n: int, p: int, itemsize: int, budget_bytes: int = CHUNK_BYTES) -> int:
    """How many examples to process at once so that a (K, n, p) tensor stays under the budget."""
    per_example = max(1, k * p * itemsize)
    return int(max(1, min(n, budget_bytes // per_example)))


#: ACCUMULATE: the Kronecker factors' running sums take ``acc += x^T @ y`` (a product, then an
#: add), not ``acc.addmm_(x^T, y)``: MKL's beta=1 path for small outputs with long inner
#: dimensions accumulates into the running sum and measured 2-4x larger float32 errors against
#: float64 (a (2304, 10) Gram over 4 batches: 1.2e-6 against 3.1e-7) for no measurable speed-up.
#: The Linear diagonal keeps ``addmm_`` (see there).


def column_square_sum(g: Tensor) -> Tensor:
    """sum_k g[k]^2 for g (K, ...) -> (...). For few columns one fused multiply-add per column
    into one output: no (K, ...) temporary of squares, whose fresh pages cost more than the
    arithmetic on a CPU (page faults)."""
    if g.shape[0] > 32:
        return g.square().sum(0)
    out = g[0].square()
    for k in range(1, g.shape[0]):  # columns, not examples
        out.addcmul_(g[k], g[k])
    return out


def flat_cat(parts: list[Tensor]) -> Tensor:
    """Concatenate per-parameter (K, N, *shape) tensors into (K, N, p)."""
    return torch.cat([t.reshape(t.shape[0], t.shape[1], -1) for t in parts], dim=-1)
