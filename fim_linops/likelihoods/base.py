r"""The likelihood base class and how a model output is read.

Shapes: N examples, C outputs per example, K back-propagated columns; per-position outputs
(N, *T, C) are seen flat, (N, T*C), row-major.

Each likelihood provides

* ``nll(f, y)``: the negative log-likelihood per example, shape (N,);
* ``sample(f, n_samples, generator)``: labels y ~ p(y | f), shape (n_samples, N, ...);
* ``grad_output(f, y)``: d nll / d f, shape (..., N, C) (closed form, no autograd);
* ``hessian_sqrt(f)``: S of shape (N, C, K) with S S^T = H = d^2 nll / d f^2, the Hessian of the
  negative log-likelihood w.r.t. the output. For these exponential-family likelihoods
  E_y[g g^T] = H, so the exact Fisher equals the generalised Gauss-Newton matrix J^T H J.
* ``hessian_matmul(f, v)``: H v for v of shape (..., N, C) without forming H.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
from torch import Tensor

from fim_linops.positions import Positions, block_columns, check_ignore_index


def tensor_output(f: object) -> Tensor:
    """The model output as a tensor: a tensor as it is, the ``logits`` of a mapping or of an object
    with a ``logits`` attribute (Hugging Face ``ModelOutput``), else a TypeError that says how to
    get one."""
    if isinstance(f, Tensor):
        return f
    logits = f.get("logits") if isinstance(f, Mapping) else getattr(f, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    key = next(iter(f), "logits") if isinstance(f, Mapping) else None
    hint = f"model(x)[{key!r}]" if isinstance(f, Mapping) else "model(x)[0]"
    if not isinstance(f, (Mapping, tuple, list)):
        hint = "the logits"
    raise TypeError(
        f"the model returned a {type(f).__name__}; the Fisher needs one output tensor of shape "
        f"(N, C) or (N, *T, C), or a mapping / object with 'logits': wrap the model in a module "
        f"whose forward returns {hint}"
    )


class Likelihood:
    r"""Base class. Subclasses define the distribution of y given the model output f.

    Per-position outputs (N, *T, C): every position is a term. :meth:`check_output` flattens them
    row-major to (N, T*C) (the engine's view) and remembers C (``width``); the methods below take
    that flat output and act per position. Labels equal to ``ignore_index`` (and, for a Gaussian,
    NaN targets) drop their position; ``positions="mean"`` divides by the number of kept positions
    in all the data instead of the number of sequences; ``shift_labels`` scores the output at
    position t against the label at t + 1 (the last output position is dropped).
    """

    #: human-readable name, also accepted by :func:`get_likelihood`
    name: str = ""
    ignore_index: int | None = -100
    positions: Positions = Positions.SUM
    shift_labels: bool = False
    #: outputs per position of the last checked output (C); None before any
    width: int | None = None
    #: whether the last checked output had position dims
    sequence: bool = False

    def _set_positions(self, ignore_index: int | None, positions: str, shift_labels: bool) -> None:
        self.ignore_index = check_ignore_index(ignore_index)
        self.positions = Positions.parse(positions)
        if not isinstance(shift_labels, bool):
            raise TypeError(f"shift_labels must be True or False, got {shift_labels!r}")
        self.shift_labels = shift_labels

    def as_positions(self, f: Tensor) -> tuple[Tensor, bool]:
        """The output as (N, T, C) (T = 1 for one term per example) and whether it has position
        dims; overridden where the shapes differ."""
        if f.ndim < 2:
            raise ValueError(
                f"likelihood '{self.name}' expects model outputs of shape (N, C) or (N, *T, C), got "
                f"{tuple(f.shape)}; flatten or pool the output inside the model"
            )
        return f.reshape(f.shape[0], -1, f.shape[-1]), f.ndim > 2

    def check_output(self, f: Tensor) -> Tensor:
        """Validate the model output and return it flat, (N, T*C) ((N, C) for one term)."""
        f = tensor_output(f)
        seq, self.sequence = self.as_positions(f)
        if self.shift_labels:
            if seq.shape[1] < 2:
                raise ValueError(
                    "shift_labels=True scores the output at position t against the label at t + 1: "
                    f"it needs outputs (N, T, C) with T >= 2, got {tuple(f.shape)}"
                )
            seq = seq[:, :-1]
        self.width = seq.shape[-1]
        return seq.reshape(seq.shape[0], -1)

    def _rows(self, f: Tensor) -> Tensor:
        """(..., N, T*C) -> (..., N*T, C)."""
        w = self.width if self.width and f.shape[-1] % self.width == 0 else f.shape[-1]
        return f.reshape(*f.shape[:-2], -1, w)

    def _terms(self, f: Tensor) -> int:
        return self._rows(f).shape[-2] // f.shape[-2]

    def shifted_labels(self, y: Tensor) -> Tensor:
        """Labels (N, *T, ...) aligned with the (shifted) output positions."""
        return y[:, 1:] if self.shift_labels and self.sequence else y

    def position_mask(self, f: Tensor, y: Tensor | None) -> Tensor | None:
        """(N, T) kept positions from the checked labels y (from :meth:`check_target`); None when
        every position is kept."""
        return None

    def check_target(self, f: Tensor, y: Tensor, values: bool = True) -> Tensor:
        """Validate labels against the output; return them in the form ``nll`` expects.
        ``values=False`` checks shapes and dtypes only (no device synchronisation), for Fisher
        types that do not use the labels."""
        return y

    def nll(self, f: Tensor, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def sample(self, f: Tensor, n_samples: int, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def grad_output(self, f: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def root_rows(self, f: Tensor) -> Tensor:
        """Per-position roots (N, T, C, K0) of the flat output f (N, T*C): S_nt S_nt^T = H_nt."""
        r = self._root(self._rows(f))
        return r.reshape(f.shape[0], -1, *r.shape[1:])

    def _root(self, f: Tensor) -> Tensor:
        """(R, C, K0) roots for rows f (R, C); defined by the built-in likelihoods."""
        raise NotImplementedError(
            f"{type(self).__name__} has no per-position Hessian root (_root); per-position "
            "outputs need one"
        )

    def root_width(self, c: int) -> int:
        """K0, the number of root columns per position for C outputs per position."""
        return self._root(torch.zeros(1, c)).shape[-1]

    def root_columns(self, rows: Tensor, k: Tensor) -> Tensor:
        """Column k[r] of the root S_r (C, K0) of each output row: rows (R, C), k (R,) long ->
        (R, C). By default from the full roots (R, C, K0); a likelihood whose K0 grows with C
        (Categorical) forms only the asked columns, so that the engine's exact columns of
        vocabulary-size outputs never hold a (C, K0) root per row."""
        s = self._root(rows)
        return s.gather(-1, k[:, None, None].expand(-1, s.shape[1], 1))[..., 0]

    def hessian_sqrt(self, f: Tensor) -> Tensor:
        """S (N, T*C, T*K0), block diagonal over positions (dense per example: for small T*C;
        the engine makes the columns per position range, :func:`positions.block_columns`)."""
        s = self.root_rows(f)
        if s.shape[1] == 1:
            return s[:, 0]
        return block_columns(s, None, 0, s.shape[1]).permute(1, 2, 0)

    def sampled_grad_output(
        self, f: Tensor, n_samples: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """(S, N, C) gradients of the nll w.r.t. f at S labels sampled from p(y | f)."""
        return self.grad_output(f, self.sample(f, n_samples, generator=generator))

    def hessian_matmul(self, f: Tensor, v: Tensor) -> Tensor:
        # n: example, c/d: output, k: column of S; v: (..., N, C)
        s = self.hessian_sqrt(f)
        return torch.einsum("nck,ndk,...nd->...nc", s, s, v)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def _options(self) -> str:
        """The per-position options that differ from their defaults, for __repr__:
        ``ignore_index`` only for the likelihoods whose constructor takes it (a Gaussian drops
        the positions whose targets hold a NaN instead)."""
        parts = []
        takes = "ignore_index" in inspect.signature(type(self).__init__).parameters
        if takes and self.ignore_index != -100:
            parts.append(f"ignore_index={self.ignore_index}")
        if self.positions is not Positions.SUM:
            parts.append(f"positions='{self.positions.value}'")
        if self.shift_labels:
            parts.append("shift_labels=True")
        return ", ".join(parts)
