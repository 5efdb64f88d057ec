r"""Likelihoods p(y | f) on the model output f, and what the Fisher needs of them.

Shapes: N examples, C outputs per example, K back-propagated columns.

For each likelihood we provide

* ``nll(f, y)``: the negative log-likelihood per example, shape (N,);
* ``sample(f, n_samples, generator)``: labels y ~ p(y | f), shape (n_samples, N, ...);
* ``grad_output(f, y)``: d nll / d f, shape (..., N, C) (closed form, no autograd);
* ``hessian_sqrt(f)``: S of shape (N, C, K) with S S^T = H = d^2 nll / d f^2, the Hessian of the
  negative log-likelihood w.r.t. the output. For these exponential-family likelihoods
  E_y[g g^T] = H, so the exact Fisher equals the generalised Gauss-Newton matrix J^T H J.
* ``hessian_matmul(f, v)``: H v for v of shape (..., N, C) without forming H.
"""

from __future__ import annotations

import math
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
        """The per-position options that differ from their defaults, for __repr__."""
        parts = []
        if self.ignore_index != -100:
            parts.append(f"ignore_index={self.ignore_index}")
        if self.positions is not Positions.SUM:
            parts.append(f"positions='{self.positions.value}'")
        if self.shift_labels:
            parts.append("shift_labels=True")
        return ", ".join(parts)


class Categorical(Likelihood):
    r"""Categorical likelihood on logits f (N, C), or (N, *T, C) with a term per position:
    p = softmax(f) over the classes (last dim), labels are class indices (N,) or (N, *T), or soft
    (probability) targets (N, C), floating, each row a distribution over the classes (outputs
    (N, C) only).

    H = diag(p) - p p^T per position; its square root S = diag(sqrt p) - p sqrt(p)^T, i.e.
    column k of S is sqrt(p_k) (e_k - p), so that S S^T = diag(p) - p p^T (using sum p = 1).
    Labels equal to ``ignore_index`` drop their term (padding, prompts). H, so the exact and MC
    Fishers, does not depend on the labels. Soft targets q: nll = -sum_c q_c log p_c (the soft
    cross-entropy) and d nll / d f = p - q (sum_c q_c = 1), which the empirical Fisher uses.
    """

    name = "categorical"

    def __init__(
        self, ignore_index: int | None = -100, positions: str = "sum", shift_labels: bool = False
    ):
        self._set_positions(ignore_index, positions, shift_labels)

    def _kept(self, y: Tensor) -> Tensor | None:
        return None if self.ignore_index is None else y != self.ignore_index

    def position_mask(self, f: Tensor, y: Tensor | None) -> Tensor | None:
        if y is None or self.ignore_index is None:
            return None
        return (y != self.ignore_index).reshape(f.shape[0], -1)

    def check_target(self, f: Tensor, y: Tensor, values: bool = True) -> Tensor:
        terms = self._terms(f)
        if not self.sequence:
            if y.ndim == 2 and y.shape == f.shape and y.is_floating_point():
                return self._check_soft(y.to(f.dtype), values)
            want: tuple[int, ...] = (f.shape[0],)
        else:
            y = self.shifted_labels(y)
            want = (f.shape[0], terms)
            y = y.reshape(f.shape[0], -1) if y.ndim >= 2 and y[0].numel() == terms else y
        if tuple(y.shape) != want or y.is_floating_point() or y.is_complex():
            read = (
                f"the output is read as {terms} positions of {self.width} classes (outputs "
                f"(N, *T, C)), so the labels must be integer class indices of shape (N, *T) "
                f"({want} with the positions flattened"
                + (
                    ", one label more per sequence with shift_labels=True"
                    if self.shift_labels
                    else ""
                )
                + ")"
                if self.sequence
                else f"the labels must be integer class indices of shape {want}"
            )
            raise ValueError(
                f"categorical likelihood: {read}, got {tuple(y.shape)} of dtype {y.dtype}"
            )
        if values and y.numel():
            kept = self._kept(y)
            z = y if kept is None else torch.where(kept, y, 0)
            c = self.width or f.shape[-1]
            if bool((z.min() < 0) | (z.max() >= c)):
                raise ValueError(
                    f"categorical labels out of range: the model has {c} classes, labels must lie "
                    f"in [0, {c - 1}] or equal ignore_index={self.ignore_index} (got min "
                    f"{int(y.min())}, max {int(y.max())})"
                )
        return y.long()  # any integer dtype in, int64 indices out (a no-op for int64)

    @staticmethod
    def _check_soft(q: Tensor, values: bool) -> Tensor:
        """Soft targets (N, C): each row non-negative and summing to 1 (checked with ``values``)."""
        if values and q.numel():
            sums = q.sum(-1)
            tol = 1e-3 if q.dtype in (torch.float16, torch.bfloat16) else 1e-5
            if bool((q < 0).any()) or not bool(((sums - 1).abs() <= tol).all()):
                raise ValueError(
                    "categorical soft targets of shape (N, C) must be probabilities: non-negative, "
                    f"each row summing to 1 (got min {float(q.min()):.3g}, row sums in "
                    f"[{float(sums.min()):.6g}, {float(sums.max()):.6g}]); normalise them "
                    "(e.g. y / y.sum(-1, keepdim=True)), or pass class indices of shape (N,)"
                )
        return q

    def nll(self, f: Tensor, y: Tensor) -> Tensor:
        """(N,): the sum over the kept positions of -log p(y_t | f_t)."""
        if y.is_floating_point():  # soft targets (N, C): -sum_c q_c log softmax(f)_c
            return -(y * torch.log_softmax(f, dim=-1)).sum(-1)
        ii = -100 if self.ignore_index is None else self.ignore_index
        rows = self._rows(f)
        out = torch.nn.functional.cross_entropy(
            rows, y.reshape(-1).long(), reduction="none", ignore_index=ii
        )
        return out.reshape(f.shape[0], -1).sum(-1)

    def _shape_labels(self, y: Tensor, f: Tensor) -> Tensor:
        """(S, N*T) sampled labels -> (S, N) or (S, N, T)."""
        return y.reshape(y.shape[0], f.shape[0], -1) if self.sequence else y

    def sample(self, f: Tensor, n_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """(S, N) (or (S, N, T)) labels y ~ softmax(f)."""
        p = torch.softmax(self._rows(f.detach()), dim=-1)
        return self._shape_labels(self._sample(p, n_samples, generator), f)

    @staticmethod
    def _sample(p: Tensor, n_samples: int, generator: torch.Generator | None) -> Tensor:
        """(S, R) labels from the probabilities p (R, C) by inverting the CDF:
        y = #{c : cdf_c < u}, u ~ U[0, 1) (one uniform per draw; about 5x faster than
        ``torch.multinomial`` on small C)."""
        u = torch.rand(p.shape[0], n_samples, dtype=p.dtype, device=p.device, generator=generator)
        y = torch.searchsorted(p.cumsum(-1), u)  # (R, S); cdf rows are sorted
        return y.clamp_(max=p.shape[-1] - 1).T.contiguous()  # round-off may leave cdf_C < u

    @staticmethod
    def _grad(p: Tensor, y: Tensor) -> Tensor:
        """p - onehot(y), shape (*y.shape, C), for labels y (R,) or (S, R)."""
        minus_one = torch.full((*y.shape, 1), -1.0, dtype=p.dtype, device=p.device)
        return p.expand(*y.shape, -1).scatter_add(-1, y.unsqueeze(-1), minus_one)

    def grad_output(self, f: Tensor, y: Tensor) -> Tensor:
        """(..., N, T*C): p - onehot(y) per position, zero at ignored positions."""
        p = torch.softmax(self._rows(f.detach()), dim=-1)  # (N*T, C)
        if y.is_floating_point():  # soft targets q (N, C), outputs (N, C): p - q
            return p - y.to(p.dtype)
        y = y.reshape(*y.shape[: y.ndim - (2 if self.sequence else 1)], -1)  # (..., N*T)
        kept = self._kept(y)
        if kept is None:
            return self._grad(p, y).reshape(*y.shape[:-1], *f.shape)
        g = self._grad(p, torch.where(kept, y, 0)) * kept[..., None].to(p.dtype)
        return g.reshape(*y.shape[:-1], *f.shape)

    def sampled_grad_output(
        self, f: Tensor, n_samples: int, generator: torch.Generator | None = None
    ) -> Tensor:
        p = torch.softmax(self._rows(f.detach()), dim=-1)  # once for both the draw and the gradient
        return self._grad(p, self._sample(p, n_samples, generator)).reshape(n_samples, *f.shape)

    def _root(self, f: Tensor) -> Tensor:
        r"""A root with C - 1 columns (H has rank C - 1: H 1 = 0), so that the exact Fisher
        back-propagates one column fewer. Start from the square root
        S0[n, c, k] = sqrt(p_nk) (delta_ck - p_nc), whose null vector is sqrt(p_n) (unit norm),
        and apply the Householder reflection Q = I - 2 w w^T / |w|^2, w = sqrt(p_n) + e_last,
        which maps sqrt(p_n) to -e_last: S0 Q has a zero last column, and S0 Q Q^T S0^T = H.
        Column k < C - 1 of S0 Q is S0[:, k] - 2 S0[:, last] w_k / |w|^2 (|w|^2 >= 2: stable).
        Shape (R, C, C - 1) for rows (R, C); (R, 1, 1) zeros for a single class."""
        p = torch.softmax(f.detach(), dim=-1)  # (R, C)
        sq = p.sqrt()
        c = f.shape[-1]
        eye = torch.eye(c, dtype=f.dtype, device=f.device)
        s0 = (eye[None] - p[:, :, None]) * sq[:, None, :]  # S0[n, c, k]
        if c == 1:
            return s0
        w_norm2 = 2 + 2 * sq[:, -1:]  # (R, 1)
        coef = 2 * sq[:, :-1] / w_norm2  # (R, C-1): 2 w_k / |w|^2
        # S[n, c, k] = S0[n, c, k] - S0[n, c, last] coef[n, k]
        return s0[:, :, :-1] - s0[:, :, -1:] * coef[:, None, :]

    def hessian_matmul(self, f: Tensor, v: Tensor) -> Tensor:
        """H v per position for v (..., N, T*C)."""
        p = torch.softmax(self._rows(f.detach()), dim=-1)
        vr = self._rows(v) if v.ndim >= 2 else v
        return (p * vr - p * (p * vr).sum(-1, keepdim=True)).reshape(v.shape)

    def __repr__(self) -> str:
        return f"Categorical({self._options()})"


class Gaussian(Likelihood):
    r"""Gaussian likelihood N(y; f, sigma^2 I) on outputs f (N, C) (or (N,): C = 1), targets y
    of the output's shape; or outputs (N, *T, D) with a term per position, targets (N, *T, D)
    (or (N, *T) when D = 1). A position whose target holds a NaN is dropped (the mask of
    padded sequences; a mapping batch without labels uses its attention_mask).

    nll = |y - f|^2 / (2 sigma^2) + C log(sigma sqrt(2 pi)); H = I / sigma^2, S = I / sigma.
    """

    name = "gaussian"

    def __init__(
        self,
        sigma: float | Tensor = 1.0,
        positions: str = "sum",
        shift_labels: bool = False,
    ):
        if not isinstance(sigma, Tensor) and (not math.isfinite(sigma) or sigma <= 0):
            raise ValueError(f"Gaussian sigma must be a positive finite number, got {sigma}")
        self.sigma = sigma
        self._set_positions(None, positions, shift_labels)

    def as_positions(self, f: Tensor) -> tuple[Tensor, bool]:
        """(N, 1, C); a scalar output per example, shape (N,), is taken as (N, 1)."""
        if f.ndim == 1:
            f = f[:, None]
        return super().as_positions(f)

    def position_mask(self, f: Tensor, y: Tensor | None) -> Tensor | None:
        if y is None or not y.is_floating_point():
            return None
        return ~self._rows(y).isnan().any(-1).reshape(f.shape[0], -1)

    def check_target(self, f: Tensor, y: Tensor, values: bool = True) -> Tensor:
        if self.sequence:
            y = self.shifted_labels(y)
            y = y.reshape(y.shape[0], -1) if y.numel() == f.numel() else y
        elif y.shape == f.shape[:1] and f.shape[1] == 1:
            y = y[:, None]
        if y.shape != f.shape:
            raise ValueError(
                f"gaussian likelihood expects targets of the output's shape (flattened: "
                f"{tuple(f.shape)}), got {tuple(y.shape)}"
            )
        return y.to(f.dtype)

    def _clean(self, y: Tensor) -> Tensor:
        return torch.nan_to_num(y, nan=0.0) if y.is_floating_point() else y

    def nll(self, f: Tensor, y: Tensor) -> Tensor:
        sigma = torch.as_tensor(self.sigma, dtype=f.dtype, device=f.device)
        kept = ~self._rows(y).isnan().any(-1)  # (N*T,)
        rows = ((self._rows(self._clean(y)) - self._rows(f)) ** 2).sum(-1) / (2 * sigma**2)
        rows = rows + self._rows(f).shape[-1] * torch.log(sigma * math.sqrt(2 * math.pi))
        return (rows * kept).reshape(f.shape[0], -1).sum(-1)

    def sample(self, f: Tensor, n_samples: int, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(
            (n_samples, *f.shape), dtype=f.dtype, device=f.device, generator=generator
        )
        return f.detach() + self.sigma * noise

    def grad_output(self, f: Tensor, y: Tensor) -> Tensor:
        """(..., N, T*D): (f - y) / sigma^2, zero at positions with a NaN target."""
        g = (f.detach() - self._clean(y)) / self.sigma**2
        if y.is_floating_point():
            nan = self._rows(y).isnan().any(-1, keepdim=True)  # (..., N*T, 1)
            g = self._rows(g).masked_fill(nan, 0.0).reshape(g.shape)
        return g

    def _root(self, f: Tensor) -> Tensor:
        eye = torch.eye(f.shape[-1], dtype=f.dtype, device=f.device)
        return (eye / self.sigma).expand(f.shape[0], -1, -1)

    def hessian_matmul(self, f: Tensor, v: Tensor) -> Tensor:
        return v / self.sigma**2

    def __repr__(self) -> str:
        opts = self._options()
        return f"Gaussian(sigma={self.sigma}" + (f", {opts})" if opts else ")")


class Bernoulli(Likelihood):
    r"""Bernoulli likelihood on one logit per example, f of shape (N,) or (N, 1), labels y in
    {0, 1} of shape (N,); or one logit per position, f (N, *T) or (N, *T, 1), labels (N, *T).
    Labels equal to ``ignore_index`` drop their term.

    p = sigmoid(f); H = p (1 - p); S = sqrt(p (1 - p)).
    """

    name = "bernoulli"

    def __init__(
        self, ignore_index: int | None = -100, positions: str = "sum", shift_labels: bool = False
    ):
        self._set_positions(ignore_index, positions, shift_labels)

    def as_positions(self, f: Tensor) -> tuple[Tensor, bool]:
        if f.ndim == 1 or (f.ndim == 2 and f.shape[1] == 1):
            return f.reshape(f.shape[0], 1, 1), False
        if f.ndim >= 2 and not (f.ndim > 2 and f.shape[-1] != 1):
            return f.reshape(f.shape[0], -1, 1), True
        raise ValueError(
            f"bernoulli likelihood expects one logit per example or per position, shape (N,), "
            f"(N, 1), (N, *T) or (N, *T, 1), got {tuple(f.shape)}; use likelihood='categorical' "
            "for several classes"
        )

    def position_mask(self, f: Tensor, y: Tensor | None) -> Tensor | None:
        if y is None or self.ignore_index is None:
            return None
        return (y != self.ignore_index).reshape(f.shape[0], -1)

    def check_target(self, f: Tensor, y: Tensor, values: bool = True) -> Tensor:
        if self.sequence:
            y = self.shifted_labels(y)
            y = y.reshape(y.shape[0], -1) if y.numel() == f.numel() else y
            want = tuple(f.shape)
        else:
            y = y[:, 0] if y.ndim == 2 and y.shape[1] == 1 else y
            want = tuple(f.shape[:1])
        if tuple(y.shape) != want and self.sequence:
            raise ValueError(
                f"bernoulli likelihood expects one logit per example or per position: the output is "
                f"read as {f.shape[1]} positions of one logit, so the labels must have shape "
                f"{want}, got {tuple(y.shape)}; use likelihood='categorical' for several classes"
            )
        if tuple(y.shape) != want:
            raise ValueError(
                f"bernoulli likelihood expects labels of shape {want}, got {tuple(y.shape)}"
            )
        y = y.to(f.dtype)
        kept = y != self.ignore_index if self.ignore_index is not None else torch.ones_like(y)
        if values and not bool((((y == 0) | (y == 1)) | ~kept.bool()).all()):
            raise ValueError(
                f"bernoulli likelihood expects labels in {{0, 1}} (or ignore_index={self.ignore_index})"
            )
        return y

    def _kept(self, y: Tensor) -> Tensor:
        return torch.ones_like(y) if self.ignore_index is None else (y != self.ignore_index).to(y)

    def nll(self, f: Tensor, y: Tensor) -> Tensor:
        y = y.reshape(f.shape[0], -1)
        kept = self._kept(y)
        terms = torch.nn.functional.binary_cross_entropy_with_logits(
            f, torch.where(kept.bool(), y, 0.0), reduction="none"
        )
        return (terms * kept).sum(-1)

    def sample(self, f: Tensor, n_samples: int, generator: torch.Generator | None = None) -> Tensor:
        p = torch.sigmoid(f.detach()).expand(n_samples, -1, -1)
        y = torch.bernoulli(p, generator=generator)
        return y if self.sequence else y[..., 0]

    def grad_output(self, f: Tensor, y: Tensor) -> Tensor:
        y = y.reshape(*y.shape[: y.ndim - (2 if self.sequence else 1)], *f.shape)
        kept = self._kept(y)
        return (torch.sigmoid(f.detach()) - torch.where(kept.bool(), y, 0.0)) * kept

    def _root(self, f: Tensor) -> Tensor:
        p = torch.sigmoid(f.detach())
        return (p * (1 - p)).sqrt()[:, :, None]

    def hessian_matmul(self, f: Tensor, v: Tensor) -> Tensor:
        p = torch.sigmoid(f.detach())
        return p * (1 - p) * v

    def __repr__(self) -> str:
        return f"Bernoulli({self._options()})"


_BY_NAME: dict[str, type[Likelihood]] = {
    "categorical": Categorical,
    "classification": Categorical,
    "cross_entropy": Categorical,
    "gaussian": Gaussian,
    "regression": Gaussian,
    "mse": Gaussian,
    "bernoulli": Bernoulli,
    "binary": Bernoulli,
}


def get_likelihood(likelihood: str | Likelihood) -> Likelihood:
    """Return a :class:`Likelihood` from an instance or a name ("categorical", "gaussian", "bernoulli")."""
    if isinstance(likelihood, Likelihood):
        return likelihood
    if isinstance(likelihood, str):
        cls = _BY_NAME.get(likelihood.lower())
        if cls is None:
            raise ValueError(
                f"unknown likelihood {likelihood!r}; use 'categorical', 'gaussian', 'bernoulli' "
                "or an fl.Likelihood instance such as fl.Gaussian(sigma=0.1)"
            )
        return cls()
    raise TypeError(
        f"likelihood must be a name or an fl.Likelihood instance, got {type(likelihood).__name__}"
    )
