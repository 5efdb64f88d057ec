r"""FishLeg (Garcia, Sharma, Hennequin et al., ICLR 2023): natural gradient with a learned inverse
Fisher, as a ``torch.optim.Optimizer`` for the ordinary ``loss.backward(); opt.step()`` loop.

Parameters theta (P,) move along Q(lambda) g, where Q(lambda) ~ (F + gamma I)^-1 is block-diagonal
over the layers (see :mod:`fim_linops.fishleg.parameterisation`). lambda is learned by Adam on the
auxiliary loss

    A(lambda) = 1/2 u^T Q F_gamma Q u - u^T Q u,      F_gamma = F + gamma I,

minimal at Q = F_gamma^-1 with value -1/2 u^T F_gamma^-1 u. Since dA = <dQ u, F_gamma Q u - u>,
its gradient in lambda is that of the surrogate <Q u, stopgrad(F_gamma Q u - u)>: one exact
Fisher-vector product F (Q u) per auxiliary step (:func:`fim_linops.fishleg.fvp.fisher_vector_product`,
jvp then vjp on an auxiliary batch), normalised by |u|^2.

Differences from the reference library (mtkresearch/FishLeg): its default "rank-1" Fisher-vector
estimator multiplies the sampled gradient's projection by Q u itself, (g^T Q u) Q u, instead of by the
sampled gradient g; that is not a Fisher product, and Q does not converge to F^-1 with it (the fix
lives only on a side branch). We use exact GGN products (or the unbiased one-sample estimate
g (g^T Q u), ``fisher="sampled"``), on a separate auxiliary batch. u mixes the normalised gradient
with random Gaussian probes: with gradient directions alone Q only learns F^-1 along them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fim_linops.fishleg import presets
from fim_linops.fishleg.aux_data import AuxData
from fim_linops.fishleg.aux_update import adam_step_or_skip
from fim_linops.fishleg.block_diag import BlockDiagonal
from fim_linops.fishleg.cached import apply_block, cache_block
from fim_linops.fishleg.fvp import FISHER_TYPES, fisher_product, fishleg_options
from fim_linops.fishleg.init import kfac_factors
from fim_linops.fishleg.parameterisation import BlockSpec, block_operator, block_spec, init_lambda
from fim_linops.likelihoods import Likelihood
from fim_linops.options import BuildOptions


class FishLeg(torch.optim.Optimizer):
    r"""FishLeg optimiser over all trainable parameters of ``model``.

    Update, per step (g = the gradient in ``.grad``, left by the user's ``loss.backward()``):

        m <- momentum * m + (1 - momentum) * Q(lambda) g      (exponential average, as the
        theta <- theta - lr * (m + weight_decay * theta)       reference library)

    Auxiliary updates (Adam on lambda, see the module docstring) run at every step during the first
    ``warmup`` steps (parameters frozen then), and afterwards every ``update_aux_every`` steps,
    ``aux_steps`` Adam steps each, before the parameter update.

    Args (``default`` preset / ``reference`` preset where they differ; an argument left at None
    takes the preset's value, see :mod:`fim_linops.fishleg.presets`):
        model: the network; all its ``requires_grad`` parameters are optimised.
        likelihood: ``"categorical"``, ``"gaussian"``, ``"bernoulli"`` or a
            :class:`fim_linops.likelihoods.Likelihood`; defines the Fisher on the model output.
        aux_data: one batch ``(x, y)`` (or ``x``) or an iterable / DataLoader of batches, cycled.
            Only the inputs x are used; put them on the model's device.
        lr: learning rate eta (5e-2).
        damping: gamma, Q learns (F + gamma I)^-1 (0.5).
        structure: ``"kron"`` (default), ``"kron_diag"`` or ``"kron_sum"`` for Linear/Conv2d layers;
            other parameters get a diagonal Q.
        momentum: beta of the exponential average of Q g (0.9; 0 gives plain steps -lr Q g).
        weight_decay: decoupled L2 coefficient, not preconditioned (1e-5).
        aux_lr, aux_betas, aux_eps: Adam on lambda (3e-3 / 1e-4, (0.9, 0.999), 1e-8). Too large
            and lambda diverges (see ``nan_policy``); Adam moves each entry of lambda by about
            aux_lr per update, so 1e-4 hardly moves Q in a few thousand steps.
        update_aux_every: auxiliary update period in steps after warm-up (5 / 10).
        aux_steps: Adam steps per auxiliary update, each with a fresh probe and batch (1).
        warmup: number of initial steps that only train lambda (0).
        init: ``"kfac"`` (default): each Kronecker block starts at the Kronecker Q nearest, in
            FishLeg's own auxiliary loss, to (F_KFAC + damping I)^-1 of the first aux batch without
            exceeding it: exactly that inverse where it is a Kronecker product (damping 0, or A or
            G a multiple of I, e.g. a Linear layer under a Gaussian likelihood; see
            :func:`fim_linops.fishleg.init.kfac_init_factors`), diagonal blocks at
            init_scale * I; ``"scale"`` (reference): Q = init_scale * I, so the first steps are SGD
            with step lr * init_scale (the library's ``scale``, 1.0).
        fisher: ``"exact"`` GGN products (ours, default) or ``"sampled"`` (one label per example).
        aux_u: probe u: ``"mixed"`` (default, ours) sqrt(1 - aux_mix) g/|g| + sqrt(aux_mix) z/|z|
            with z ~ N(0, I); ``"gradient"`` g/|g| (the library's choice); ``"random"`` z/|z|.
        aux_mix: weight of the random part in ``"mixed"`` (0.5).
        nan_policy: ``"skip"`` (default): an auxiliary step with a non-finite loss or gradient is
            skipped (lambda and its Adam state left as they were; on an accelerator without a host
            sync, by undoing the step) and counted in ``opt.aux_skipped``; ``"raise"``: raise
            FloatingPointError (one host sync per auxiliary update).
        seed: seed of the optimiser's own generator (probes, sampled labels, kron_sum init).
        preset: ``"default"`` (ours: Q learns (F + damping I)^-1 in a few hundred auxiliary
            updates) or ``"reference"`` (the hyper-parameters of the reference library,
            mtkresearch/FishLeg: init ``"scale"``, aux_lr 1e-4, an update every 10 steps).

    Tuning. The paper's experiments (its JAX code) use lr 0.05, Q initialised at
    (nu_sgd / lr) I = 0.2 I, damping 1e-3, aux_lr 1e-4 with an update every 10 steps, momentum 0.9
    on the gradient and an L2 term 1e-5, for tens of thousands of steps. On the deep auto-encoder
    of ``benchmarks/bench_fishleg.py`` (2,000 steps) ``init="kfac"``, lr 0.05, damping 0.15,
    aux_lr 3e-3 and ``update_aux_every=50`` worked best of the settings tried (see
    ``benchmarks/fishleg_results/README.md``); lr / damping (the step along flat directions) of
    0.5 or more diverged or stalled there.

    Cost per step: two matrix products per layer with the squared factors cached per auxiliary
    update; an auxiliary update adds one Fisher-vector product on an ``aux_data`` batch (about
    three forward passes) and a backward pass through Q(lambda).

    Attributes:
        inverse_fisher: block-diagonal LinearOperator (P, P) ~ (F + damping I)^-1, in the order of
            ``torch.nn.utils.parameters_to_vector``.
        aux_loss: the last auxiliary loss A(lambda) / |u|^2 (a tensor; no sync).
        aux_skipped: number of auxiliary steps undone by ``nan_policy="skip"`` (a tensor).
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str | Likelihood,
        aux_data: Any,
        lr: float | None = None,
        damping: float | None = None,
        structure: str = "kron",
        momentum: float | None = None,
        weight_decay: float | None = None,
        aux_lr: float | None = None,
        aux_betas: tuple[float, float] = (0.9, 0.999),
        aux_eps: float = 1e-8,
        update_aux_every: int | None = None,
        aux_steps: int = 1,
        warmup: int = 0,
        init: str | None = None,
        init_scale: float | None = None,
        fisher: str = "exact",
        aux_u: str = "mixed",
        aux_mix: float = 0.5,
        nan_policy: str = "skip",
        seed: int = 0,
        preset: str = "default",
    ):
        given = dict(
            lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay, aux_lr=aux_lr,
            update_aux_every=update_aux_every, init=init, init_scale=init_scale,
        )  # fmt: skip
        h = presets.resolve(preset, given)
        h.update(
            aux_betas=tuple(aux_betas), aux_eps=aux_eps, aux_steps=aux_steps, warmup=warmup,
            structure=structure, fisher=fisher, aux_u=aux_u, aux_mix=aux_mix,
            nan_policy=nan_policy,
        )  # fmt: skip
        presets.check(h)
        self.model = model
        first = next((p for p in model.parameters() if p.requires_grad), None)
        self._generator = torch.Generator(
            device=first.device if first is not None else "cpu"
        ).manual_seed(seed)
        #: the Fisher of the auxiliary products, checked once (likelihood, exact/mc, generator)
        self.options = fishleg_options(likelihood, fisher, self._generator)
        self.likelihood = self.options.likelihood
        self.layout = self.options.layout_of(model)
        super().__init__(self.layout.params, h)

        self._aux = AuxData(aux_data, model)
        self._t = 0  # step() calls so far
        like = self.layout.params[0]
        init_gen = torch.Generator().manual_seed(seed)

        self.specs: list[BlockSpec] = [block_spec(b, h["structure"]) for b in self.layout.blocks]
        kfac = {}
        if h["init"] == "kfac":
            layers = {s.name: (s.module, s.has_bias) for s in self.specs if s.kind != "diag"}
            kfac = kfac_factors(model, self.likelihood, self._aux.next(), layers)
        self.lambdas: list[dict[str, Tensor]] = [
            {
                k: v.requires_grad_(True)
                for k, v in init_lambda(
                    s, h["init_scale"], like, kfac.get(s.name), h["damping"], init_gen
                ).items()
            }
            for s in self.specs
        ]
        self.aux_opt = torch.optim.Adam(
            self.aux_parameters(),
            lr=h["aux_lr"],
            betas=h["aux_betas"],
            eps=h["aux_eps"],
            capturable=like.device.type == "cuda",  # Adam's step counter on the device: no syncs
            foreach=True,
        )
        self._cache: list[tuple[Tensor, ...]] | None = None
        # skip non-finite auxiliary steps by a host check on CPU (free there), else without a sync
        self._sync_free = like.device.type != "cpu"
        self.aux_loss = torch.full((), float("nan"), dtype=like.dtype, device=like.device)
        self.aux_skipped = torch.zeros((), dtype=torch.long, device=like.device)

    # -- lambda and Q -------------------------------------------------------------------------------
    def aux_parameters(self) -> list[Tensor]:
        """The auxiliary parameters lambda, block by block (in a fixed order)."""
        return [t for lam in self.lambdas for t in lam.values()]

    def _blocks(self, detach: bool) -> list:
        return [
            block_operator(s, {k: v.detach() if detach else v for k, v in lam.items()})
            for s, lam in zip(self.specs, self.lambdas, strict=True)
        ]

    @property
    def inverse_fisher(self) -> BlockDiagonal:
        r"""Q(lambda) ~ (F + damping I)^-1 as a block-diagonal LinearOperator of shape (P, P) (a
        snapshot of the current lambda): ``@``, ``diagonal()``, ``to_dense()``, exact
        ``root_decomposition()``."""
        return BlockDiagonal(*self._blocks(detach=True))

    def _apply_q(self, v: Tensor, detach: bool) -> Tensor:
        """Q v for a flat vector v (P,); differentiable in lambda unless ``detach``."""
        parts = [
            op._matmul(v[s.start : s.stop, None])[:, 0]
            for s, op in zip(self.specs, self._blocks(detach), strict=True)
        ]
        return torch.cat(parts)

    # -- auxiliary data and probes ------------------------------------------------------------------
    def _gradient(self) -> Tensor:
        """The flat gradient (P,) from ``.grad`` (zeros where a parameter has none)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.layout.params]
        return torch.cat([g.reshape(-1) for g in grads]).detach()

    def _probe(self, g: Tensor, aux_u: str, aux_mix: float) -> Tensor:
        """u (P,), unit norm: normalised gradient, Gaussian probe, or their mix."""
        z = torch.randn(g.shape, generator=self._generator, dtype=g.dtype, device=g.device)
        z = z / z.norm()
        if aux_u == "random":
            return z
        gn = g.norm()  # g_hat = g / |g| (z where g = 0)
        g_hat = torch.where(gn > 0, g / gn.clamp_min(torch.finfo(g.dtype).tiny), z)
        if aux_u == "gradient":
            return g_hat
        u = (1 - aux_mix) ** 0.5 * g_hat + aux_mix**0.5 * z
        return u / u.norm()

    # -- the auxiliary objective --------------------------------------------------------------------
    def _fvp(self, x: Any, w: Tensor, group: dict, y: Tensor | None = None) -> Tensor:
        """(F + damping I) w for a flat w (P,) on the batch x (labels y: the kept positions)."""
        fw = fisher_product(self.model, x, self.layout.unflatten(w), self._fisher(group), y)
        return self.layout.flatten(fw) + group["damping"] * w

    def _fisher(self, group: dict) -> BuildOptions:
        """The options of the Fisher products, again if ``group["fisher"]`` was changed."""
        if FISHER_TYPES.get(group["fisher"]) != self.options.fisher_type.value:
            self.options = fishleg_options(self.likelihood, group["fisher"], self._generator)
        return self.options

    def auxiliary_loss(self, u: Tensor, x: Any = None, y: Tensor | None = None) -> Tensor:
        r"""A(lambda) = 1/2 u^T Q F_gamma Q u - u^T Q u for a flat u (P,) on the batch x (default:
        the last auxiliary batch, with its labels) with labels y (only their ignore_index
        positions matter). Its minimum over Q is -1/2 u^T F_gamma^-1 u."""
        group = self.param_groups[0]
        if x is None:
            x, y = self._aux.last, self._aux.last_labels if y is None else y
        w = self._apply_q(u, detach=True)
        return 0.5 * (w * self._fvp(x, w, group, y)).sum() - (u * w).sum()

    @torch.no_grad()
    def _aux_step(self, group: dict, g: Tensor) -> None:
        """One Adam step on lambda along the surrogate <Q u, stopgrad(F_gamma Q u - u)> / |u|^2."""
        aux = self.aux_opt.param_groups[0]
        aux["lr"], aux["betas"], aux["eps"] = group["aux_lr"], group["aux_betas"], group["aux_eps"]
        x = self._aux.next()
        u = self._probe(g, group["aux_u"], group["aux_mix"])
        lam = self.aux_parameters()
        with torch.enable_grad():
            qu = self._apply_q(u, detach=False)
            w = qu.detach()
            fw = self._fvp(x, w, group, self._aux.last_labels)
            u2 = (u * u).sum()
            surrogate = (qu * (fw - u)).sum() / u2
            raw = torch.autograd.grad(surrogate, lam, allow_unused=True)
        grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(lam, raw, strict=True)]
        self.aux_loss = (0.5 * (w * fw).sum() - (u * w).sum()) / u2
        ok = (
            torch.isfinite(surrogate)
            & torch.stack([torch.isfinite(gr).all() for gr in grads]).all()
        )
        msg = None
        if group["nan_policy"] == "raise":
            msg = (
                f"FishLeg: the auxiliary loss or its gradient is not finite at step {self._t}; "
                f"lower aux_lr (now {group['aux_lr']}), raise damping (now {group['damping']}) or "
                "update the auxiliary parameters less often (update_aux_every)"
            )
        self.aux_skipped += adam_step_or_skip(
            self.aux_opt, lam, grads, ok, raise_msg=msg, sync_free=self._sync_free
        )
        self._cache = None  # lambda moved: the squared factors are formed again at the next step

    # -- the optimiser step -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One FishLeg step from the gradients in ``.grad``: auxiliary updates when scheduled, then
        theta <- theta - lr * (EMA_momentum(Q g) + weight_decay * theta) (frozen during warm-up)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        t, warmup = self._t, group["warmup"]
        in_warmup = t < warmup
        if in_warmup or (t > 0 and (t - warmup) % group["update_aux_every"] == 0):
            g = self._gradient()
            for _ in range(group["aux_steps"]):
                self._aux_step(group, g)
        self._t += 1
        if in_warmup:
            return loss
        if self._cache is None:  # squared factors of Q, formed once per auxiliary update
            self._cache = [
                cache_block(s, lam) for s, lam in zip(self.specs, self.lambdas, strict=True)
            ]
        params: list[Tensor] = []
        qgs: list[Tensor] = []
        for spec, block, factors in zip(self.specs, self.layout.blocks, self._cache, strict=True):
            grads = [
                e.param.grad if e.param.grad is not None else torch.zeros_like(e.param)
                for e in block.entries
            ]
            for e, q in zip(block.entries, apply_block(spec, factors, grads), strict=True):
                if e.param.grad is not None:
                    params.append(e.param)
                    qgs.append(q)
        if not params:
            return loss
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            bufs.append(state["momentum_buffer"])
        beta, wd, lr = group["momentum"], group["weight_decay"], group["lr"]
        torch._foreach_mul_(bufs, beta)  # m <- beta m + (1 - beta) Q g
        torch._foreach_add_(bufs, qgs, alpha=1 - beta)
        if wd:
            torch._foreach_add_(params, torch._foreach_add(bufs, params, alpha=wd), alpha=-lr)
        else:
            torch._foreach_add_(params, bufs, alpha=-lr)
        return loss

    # -- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The torch optimiser state plus FishLeg's: lambda, the Adam state on lambda, the step
        counter, the generator state and the position in an iterable ``aux_data``."""
        sd = super().state_dict()
        sd["fishleg"] = {
            "t": self._t,
            "lambda": [t.detach().clone() for t in self.aux_parameters()],
            "aux_opt": self.aux_opt.state_dict(),
            "generator": self._generator.get_state(),
            "aux_batches": self._aux.drawn,
            "aux_loss": self.aux_loss.clone(),
            "aux_skipped": self.aux_skipped.clone(),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; an iterable ``aux_data`` is re-iterated from the start and
        fast-forwarded to the saved position (same batches if its order is deterministic)."""
        state_dict = dict(state_dict)
        fl = state_dict.pop("fishleg", None)
        if fl is None:
            raise ValueError("not a FishLeg state_dict (no 'fishleg' entry)")
        super().load_state_dict(state_dict)
        lam = self.aux_parameters()
        if len(fl["lambda"]) != len(lam) or any(
            a.shape != b.shape for a, b in zip(lam, fl["lambda"], strict=True)
        ):
            raise ValueError(
                "FishLeg state_dict: the auxiliary parameters do not match this model/structure"
            )
        with torch.no_grad():
            for t, v in zip(lam, fl["lambda"], strict=True):
                t.copy_(v)
        self.aux_opt.load_state_dict(fl["aux_opt"])
        self._t = int(fl["t"])
        self._generator.set_state(fl["generator"])
        self.aux_loss = fl["aux_loss"].clone().to(self.aux_loss.device)
        self.aux_skipped = fl["aux_skipped"].clone().to(self.aux_skipped.device)
        self._cache = None
        self._aux.restore(int(fl["aux_batches"]))

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "layout", None) is not None and self.param_groups:
            raise ValueError(
                "FishLeg optimises all trainable parameters of its model in one group; freeze "
                "parameters with requires_grad_(False) before building it instead"
            )
        super().add_param_group(param_group)

    def __repr__(self) -> str:
        g = self.param_groups[0]
        return (
            f"FishLeg(P={self.layout.numel}, structure={g['structure']!r}, lr={g['lr']}, "
            f"damping={g['damping']}, aux_lr={g['aux_lr']}, blocks={len(self.specs)})"
        )
