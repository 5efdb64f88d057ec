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

import torch
from torch import Tensor


def tensor_output(f: object) -> Tensor:
    """The model output as a tensor, or a TypeError that says how to get one."""
    if isinstance(f, Tensor):
        return f
    hint = "model(x)['logits']" if isinstance(f, dict) else "model(x)[0]"
    if not isinstance(f, (dict, tuple, list)):
        hint = "the logits"
    raise TypeError(
        f"the model returned a {type(f).__name__}; the Fisher needs one output tensor of shape "
        f"(N, C): wrap the model in a module whose forward returns {hint}"
    )


class Likelihood:
    """Base class. Subclasses define the distribution of y given the model output f."""

    #: human-readable name, also accepted by :func:`get_likelihood`
    name: str = ""

    def check_output(self, f: Tensor) -> Tensor:
        """Validate the model output and return it as (N, C)."""
        f = tensor_output(f)
        if f.ndim != 2:
            raise ValueError(
                f"likelihood '{self.name}' expects model outputs of shape (N, C), got "
                f"{tuple(f.shape)}; flatten or pool the output inside the model"
            )
        return f

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

    def hessian_sqrt(self, f: Tensor) -> Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

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


class Categorical(Likelihood):
    r"""Categorical likelihood on logits f (N, C): p = softmax(f); labels are class indices (N,)
    or soft (probability) targets (N, C), floating, each row a distribution over the classes.

    H = diag(p) - p p^T; its square root S = diag(sqrt p) - p sqrt(p)^T, i.e. column k of S is
    sqrt(p_k) (e_k - p), so that S S^T = diag(p) - p p^T (using sum p = 1). H, so the exact and
    MC Fishers, does not depend on the labels. Soft targets q: nll = -sum_c q_c log p_c (the soft
    cross-entropy) and d nll / d f = p - q (sum_c q_c = 1), which the empirical Fisher uses.
    """

    name = "categorical"

    def check_target(self, f: Tensor, y: Tensor, values: bool = True) -> Tensor:
        if y.ndim == 2 and y.shape == f.shape and y.is_floating_point():
            return self._check_soft(y.to(f.dtype), values)
        if y.shape != f.shape[:1] or y.is_floating_point() or y.is_complex():
            raise ValueError(
                f"categorical likelihood expects integer class indices of shape ({f.shape[0]},) "
                f"or floating probabilities of shape {tuple(f.shape)}, got {tuple(y.shape)} of "
                f"dtype {y.dtype}"
            )
        if values and y.numel() and bool((y.min() < 0) | (y.max() >= f.shape[-1])):
            raise ValueError(
                f"categorical labels out of range: the model has {f.shape[-1]} classes, labels must "
                f"lie in [0, {f.shape[-1] - 1}] (got min {int(y.min())}, max {int(y.max())})"
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
        if y.is_floating_point():  # soft targets (N, C): -sum_c q_c log softmax(f)_c
            return -(y * torch.log_softmax(f, dim=-1)).sum(-1)
        return torch.nn.functional.cross_entropy(f, y.long(), reduction="none")

    def sample(self, f: Tensor, n_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """(S, N) labels y ~ softmax(f)."""
        return self._sample(torch.softmax(f.detach(), dim=-1), n_samples, generator)

    @staticmethod
    def _sample(p: Tensor, n_samples: int, generator: torch.Generator | None) -> Tensor:
        """(S, N) labels from the probabilities p (N, C) by inverting the CDF:
        y = #{c : cdf_c < u}, u ~ U[0, 1) (one uniform per draw; about 5x faster than
        ``torch.multinomial`` on small C)."""
        u = torch.rand(p.shape[0], n_samples, dtype=p.dtype, device=p.device, generator=generator)
        y = torch.searchsorted(p.cumsum(-1), u)  # (N, S); cdf rows are sorted
        return y.clamp_(max=p.shape[-1] - 1).T.contiguous()  # round-off may leave cdf_C < u

    @staticmethod
    def _grad(p: Tensor, y: Tensor) -> Tensor:
        """p - onehot(y), shape (*y.shape, C), for labels y (N,) or (S, N)."""
        minus_one = torch.full((*y.shape, 1), -1.0, dtype=p.dtype, device=p.device)
        return p.expand(*y.shape, -1).scatter_add(-1, y.unsqueeze(-1), minus_one)

    def grad_output(self, f: Tensor, y: Tensor) -> Tensor:
        p = torch.softmax(f.detach(), dim=-1)
        if y.is_floating_point():  # soft targets q (N, C): p - q
            return p - y.to(p.dtype)
        return self._grad(p, y)

    def sampled_grad_output(
        self, f: Tensor, n_samples: int, generator: torch.Generator | None = None
    ) -> Tensor:
        p = torch.softmax(f.detach(), dim=-1)  # once for both the draw and the gradient
        return self._grad(p, self._sample(p, n_samples, generator))

    def hessian_sqrt(self, f: Tensor) -> Tensor:
        r"""A root with C - 1 columns (H has rank C - 1: H 1 = 0), so that the exact Fisher
        back-propagates one column fewer. Start from the square root
        S0[n, c, k] = sqrt(p_nk) (delta_ck - p_nc), whose null vector is sqrt(p_n) (unit norm),
        and apply the Householder reflection Q = I - 2 w w^T / |w|^2, w = sqrt(p_n) + e_last,
        which maps sqrt(p_n) to -e_last: S0 Q has a zero last column, and S0 Q Q^T S0^T = H.
        Column k < C - 1 of S0 Q is S0[:, k] - 2 S0[:, last] w_k / |w|^2 (|w|^2 >= 2: stable).
        Shape (N, C, C - 1); (N, 1, 1) zeros for a single class."""
        p = torch.softmax(f.detach(), dim=-1)  # (N, C)
        sq = p.sqrt()
        c = f.shape[-1]
        eye = torch.eye(c, dtype=f.dtype, device=f.device)
        s0 = (eye[None] - p[:, :, None]) * sq[:, None, :]  # S0[n, c, k]
        if c == 1:
            return s0
        w_norm2 = 2 + 2 * sq[:, -1:]  # (N, 1)
        coef = 2 * sq[:, :-1] / w_norm2  # (N, C-1): 2 w_k / |w|^2
        # S[n, c, k] = S0[n, c, k] - S0[n, c, last] coef[n, k]
        return s0[:, :, :-1] - s0[:, :, -1:] * coef[:, None, :]

    def hessian_matmul(self, f: Tensor, v: Tensor) -> Tensor:
        p = torch.softmax(f.detach(), dim=-1)
        return p * v - p * (p * v).sum(-1, keepdim=True)


class Gaussian(Likelihood):
    r"""Gaussian likelihood N(y; f, sigma^2 I) on outputs f (N, C) (or (N,): C = 1), targets y
    (N, C) (or (N,) when C = 1).

    nll = |y - f|^2 / (2 sigma^2) + C log(sigma sqrt(2 pi)); H = I / sigma^2, S = I / sigma.
    """

    name = "gaussian"

    def __init__(self, sigma: float | Tensor = 1.0):
        if not isinstance(sigma, Tensor) and (not math.isfinite(sigma) or sigma <= 0):
            raise ValueError(f"Gaussian sigma must be a positive finite number, got {sigma}")
        self.sigma = sigma

    def check_output(self, f: Tensor) -> Tensor:
        """(N, C); a scalar output per example, shape (N,), is taken as (N, 1)."""
        if isinstance(f, Tensor) and f.ndim == 1:
            f = f[:, None]
        return super().check_output(f)

    def check_target(self, f: Tensor, y: Tensor, values: bool = True) -> Tensor:
        if y.shape == f.shape[:1] and f.shape[1] == 1:
            y = y[:, None]
        if y.shape != f.shape:
            raise ValueError(
                f"gaussian likelihood expects targets of the output's shape {tuple(f.shape)}, "
                f"got {tuple(y.shape)}"
            )
        return y.to(f.dtype)

    def nll(self, f: Tensor, y: Tensor) -> Tensor:
        sigma = torch.as_tensor(self.sigma, dtype=f.dtype, device=f.device)
        c = f.shape[-1]
        return ((y - f) ** 2).sum(-1) / (2 * sigma**2) + c * torch.log(
            sigma * math.sqrt(2 * math.pi)
        )

    def sample(self, f: Tensor, n_samples: int, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(
            (n_samples, *f.shape), dtype=f.dtype, device=f.device, generator=generator
        )
        return f.detach() + self.sigma * noise

    def grad_output(self, f: Tensor, y: Tensor) -> Tensor:
        return (f.detach() - y) / self.sigma**2

    def hessian_sqrt(self, f: Tensor) -> Tensor:
        eye = torch.eye(f.shape[-1], dtype=f.dtype, device=f.device)
        return (eye / self.sigma).expand(f.shape[0], -1, -1)

    def hessian_matmul(self, f: Tensor, v: Tensor) -> Tensor:
        return v / self.sigma**2

    def __repr__(self) -> str:
        return f"Gaussian(sigma={self.sigma})"


class Bernoulli(Likelihood):
    r"""Bernoulli likelihood on one logit per example: f of shape (N, 1) (or (N,)), y in {0, 1}.

    p = sigmoid(f); H = p (1 - p); S = sqrt(p (1 - p)).
    """

    name = "bernoulli"

    def check_output(self, f: Tensor) -> Tensor:
        f = tensor_output(f)
        if f.ndim == 1:
            f = f[:, None]
        if f.ndim != 2 or f.shape[1] != 1:
            raise ValueError(
                f"bernoulli likelihood expects one logit per example, shape (N,) or (N, 1), got "
                f"{tuple(f.shape)}; use likelihood='categorical' for several classes"
            )
        return f

    def check_target(self, f: Tensor, y: Tensor, values: bool = True) -> Tensor:
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.shape != f.shape[:1]:
            raise ValueError(
                f"bernoulli likelihood expects labels of shape ({f.shape[0]},), got {tuple(y.shape)}"
            )
        y = y.to(f.dtype)
        if values and not bool(((y == 0) | (y == 1)).all()):
            raise ValueError("bernoulli likelihood expects labels in {0, 1}")
        return y

    def nll(self, f: Tensor, y: Tensor) -> Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(f[:, 0], y, reduction="none")

    def sample(self, f: Tensor, n_samples: int, generator: torch.Generator | None = None) -> Tensor:
        p = torch.sigmoid(f.detach()[:, 0]).expand(n_samples, -1)
        return torch.bernoulli(p, generator=generator)

    def grad_output(self, f: Tensor, y: Tensor) -> Tensor:
        return (torch.sigmoid(f.detach()[:, 0]) - y)[..., None]

    def hessian_sqrt(self, f: Tensor) -> Tensor:
        p = torch.sigmoid(f.detach())
        return (p * (1 - p)).sqrt()[:, :, None]

    def hessian_matmul(self, f: Tensor, v: Tensor) -> Tensor:
        p = torch.sigmoid(f.detach())
        return p * (1 - p) * v


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
