r"""``fisher_sharded``: the Fisher of a (FSDP2-sharded) model of which each rank keeps its share.

The pass over the data is that of :func:`fim_linops.fisher` on the gathered model (each rank its
own data shard); only the reduction differs. Instead of all-reducing every statistic:

* diag: the per-rank sum (P,) is reduce-scattered in the FSDP2 layout (one ``dist.reduce`` per
  rank of its dim-0 parameter shards); each rank keeps its shards' entries, P / world;
* kfac: each layer has one owner rank (greedy balance of factor sizes); its two factor sums are
  ``dist.reduce``-d to that rank and dropped elsewhere;
* ekfac: as kfac; the owners eigendecompose their factors and broadcast the eigenbases for the
  second pass (every rank projects its own data), whose eigenvalue sums are reduced to the owners;
  the other ranks drop the bases afterwards.

The example count (and KFAC's input-row counts) are all-reduced (a few numbers).
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fim_linops.builders.base import BuildContext, RecordingContext, kron_spec
from fim_linops.builders.everywhere import non_kronecker
from fim_linops.distributed import all_reduce_, all_reduce_count, resolve_group
from fim_linops.engine import Engine, FisherType
from fim_linops.layout import ParamLayout
from fim_linops.likelihoods import Likelihood
from fim_linops.operators import EKFAC, KFAC, Diag
from fim_linops.operators.base import sym_eigh
from fim_linops.operators.kron import KronSpec
from fim_linops.sharding import shards, stream
from fim_linops.sharding.gather import gathered, is_sharded, unwrap
from fim_linops.sharding.lockstep import Lockstep
from fim_linops.sharding.operator import ShardedFisher
from fim_linops.structures import Structure

SUPPORTED = (Structure.DIAG, Structure.KFAC, Structure.EKFAC)


def _check_local_shards(model: nn.Module, world: int, me: int) -> dict[str, int]:
    """The dim-0 rows of this rank's DTensor shard per parameter name, checked against the
    torch.chunk split that :func:`shards.param_ranges` assumes."""
    rows: dict[str, int] = {}
    for name, p in unwrap(model).named_parameters():
        local = getattr(p, "_local_tensor", None)
        if local is None:
            continue
        mesh = getattr(p, "device_mesh", None)
        size = mesh.size() if mesh is not None else world
        lo, hi = shards.rows_of(p.shape[0] if p.ndim else 1, world, me)
        if size != world or (p.ndim and local.shape[0] != hi - lo):
            raise ValueError(
                f"parameter '{name}' is sharded over {size} ranks ({local.shape[0]} local rows), "
                f"but fisher_sharded splits dim 0 over the {world} ranks of the process group "
                "like FSDP2's fully_shard on a 1-D mesh; pass that mesh's group as process_group, "
                "or use fl.fisher (replicated statistics)"
            )
        rows[name] = local.shape[0]
    return rows


def fisher_sharded(
    model: nn.Module,
    data: Any,
    likelihood: str | Likelihood = "categorical",
    structure: str | Structure = "kfac",
    fisher_type: str | FisherType = "exact",
    mc_samples: int = 1,
    params: Any = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    generator: torch.Generator | None = None,
    process_group: Any = None,
    kfac_approx: str = "expand",
    gather: str = "unit",
) -> ShardedFisher:
    r"""The Fisher of ``model`` on the data of all ranks, each rank keeping only its share.

    Opt-in: ``fl.fisher`` on an FSDP2 model still returns the full (replicated) operator on every
    rank; this function is the sharded alternative. Call it on every rank of the group, each with
    its own shard of ``data`` (a collective). The arguments are those of :func:`fim_linops.fisher`.

    Args:
        structure: "diag" (each rank keeps the diagonal entries of its FSDP2 parameter shards),
            "kfac" or "ekfac" (each rank keeps the factors of the layers assigned to it); every
            parameter must sit in a layer with Kronecker factors (Linear, Conv, Embedding).
        gather: how the data pass sees an FSDP2 model's parameters. "unit" (default): as FSDP's
            own forward and backward do, one ``fully_shard`` unit at a time (every rank runs the
            same number of forwards; a rank that runs out of data repeats its last batch, whose
            result is dropped; every rank needs at least one batch, every layer a rule, and
            ``device``/``dtype`` the model's own); :mod:`fim_linops.sharding.lockstep`. "all":
            every parameter all-gathered on every rank for the whole build
            (:func:`~fim_linops.sharding.gathered`), for models with torch.func layers or ranks
            without data.

    Returns:
        A :class:`~fim_linops.sharding.ShardedFisher`: a (P, P) LinearOperator on full vectors
        (products, solves, logdet, diagonal, roots: collectives), plus ``matmul_sharded`` /
        ``solve_sharded`` on vectors sharded like the parameters and ``held_numel()``.
    """
    from fim_linops.frame import run_build
    from fim_linops.options import BuildOptions

    arguments = locals()  # the public arguments, before any other name is bound
    if isinstance(structure, dict):
        raise ValueError(
            "fisher_sharded takes one structure ('diag', 'kfac' or 'ekfac'), not a per-layer mix; "
            "restrict it to the layers of one structure with params=, or use fl.fisher with the "
            "mix (every rank then holds the whole operator)"
        )
    struct = Structure.parse(structure)
    if struct not in SUPPORTED:
        raise ValueError(
            f"fisher_sharded supports structure='diag', 'kfac' or 'ekfac', got '{struct.value}'; "
            "use fl.fisher (every rank then holds the whole operator)"
        )
    group = resolve_group(process_group)
    world, me = shards.world_and_rank(group)
    _check_local_shards(model, world, me)
    per_unit = _per_unit(model, gather, device, dtype)

    def prepare(work: nn.Module, layout: ParamLayout, dt: torch.dtype):
        def build(ctx: BuildContext) -> ShardedFisher:
            lock = None
            if per_unit:
                lock = Lockstep(ctx.engine, ctx.group)
                ctx.data = lock.check_first_batch(ctx.data, ctx.device, ctx.dtype)
                _check_no_func(ctx.engine, struct)
            return _BUILD[struct](_Build(ctx, layout, world, me, lock))

        return build

    options = BuildOptions.of_arguments(arguments, max_bytes=None, process_group=group)
    context = nullcontext(unwrap(model)) if per_unit else gathered(model)
    with context as plain:
        return run_build(plain, data, options, prepare)


def _per_unit(model: nn.Module, gather: str, device: Any, dtype: Any) -> bool:
    """Whether the pass runs FSDP's own per-unit gathering (``gather="unit"`` on an FSDP2 model)."""
    if gather not in ("unit", "all"):
        raise ValueError(f"gather must be 'unit' or 'all', got {gather!r}")
    if gather == "all" or not is_sharded(unwrap(model)):  # inside gathered(): nothing to gather
        return False
    p = next(unwrap(model).parameters())
    moved = (dtype is not None and dtype != p.dtype) or (
        device is not None and torch.device(device) != p.device
    )
    if moved:
        raise ValueError(
            f"fisher_sharded(gather='unit') runs the FSDP2 model where it is ({p.dtype} on "
            f"{p.device}); device= and dtype= would copy it: move the model first, or use "
            "gather='all'"
        )
    return True


def _check_no_func(engine: Engine, struct: Structure) -> None:
    if struct is not Structure.DIAG:  # kfac/ekfac: _check_kronecker names them
        return
    bad = [b.module_name or "<model>" for b in engine.fallback]
    if bad:
        raise ValueError(
            f"fisher_sharded(gather='unit') cannot run {', '.join(repr(b) for b in bad)} "
            "through torch.func on an FSDP2 model (functional_call and FSDP's per-unit gathering "
            "both swap the parameters); use gather='all'"
        )


@dataclasses.dataclass
class _Build:
    ctx: BuildContext
    layout: ParamLayout
    world: int
    me: int
    lock: Lockstep | None

    def stream(self, ctx: BuildContext | None = None, columns: list[Tensor] | None = None):
        c = ctx if ctx is not None else self.ctx
        return stream.Pass(
            c.engine, c.results(columns=columns), c.group, self.me, c.dtype, c.device, self.lock
        )

    def operator(
        self,
        tensors: list[Tensor],
        local_cls: type,
        local_kwargs: dict[str, Any],
        owned: shards.Ownership,
        held: int,
    ) -> ShardedFisher:
        ctx = self.ctx
        out = ShardedFisher(
            *tensors,
            local_cls=local_cls if tensors else None,
            local_kwargs=local_kwargs,
            owned=owned,
            shards=shards.param_ranges(self.layout, self.world),
            numel=self.layout.numel,
            group=ctx.group,
            me=self.me,
            damping=torch.zeros((), dtype=ctx.dtype, device=ctx.device),
        )
        out.pass_held = held
        return out


def _build_diag(b: _Build) -> ShardedFisher:
    owned = shards.param_ranges(b.layout, b.world)
    p = b.stream()
    mine, n_local = stream.owned_diag(p, owned)
    n = all_reduce_count(n_local, b.ctx.group, b.ctx.device)
    return b.operator([mine / n], Diag, {}, owned, p.held)


def _check_kronecker(engine: Engine, struct: Structure) -> None:
    bad = [f"'{b.module_name or '<model>'}' ({why})" for b, why in non_kronecker(engine)]
    if bad:
        raise ValueError(
            f"fisher_sharded(structure='{struct.value}') needs Kronecker factors for every "
            f"layer, but {', '.join(bad)} have none; pass params= without those "
            "layers' parameters, use structure='diag', or "
            f"fl.fisher(structure='{struct.value}') (replicated, exact blocks for those layers)"
        )


def _reduced_factors(
    b: _Build, owners: tuple[int, ...], columns: list[Tensor] | None = None
) -> tuple[list[KronSpec], list[tuple[Tensor, Tensor] | None], int]:
    """The KFAC factors (left, right), normalised as ``fl.fisher`` does, on each layer's owner
    (None on the other ranks), reduced during the pass; and the entries held at once."""
    ctx = b.ctx
    engine = ctx.engine
    reduce = ctx.options.kfac_approx == "reduce"
    recording = RecordingContext.of(ctx, columns)
    p = b.stream(recording)
    sums, rows, n_local = stream.owned_kfac(p, owners, reduce)
    all_reduce_([rows], ctx.group)
    n = all_reduce_count(n_local, ctx.group, ctx.device)
    specs = [kron_spec(rb, rb.rule.kron_left_is_a) for rb in engine.ruled]
    out: list[tuple[Tensor, Tensor] | None] = []
    for i, (spec, pair) in enumerate(zip(specs, sums, strict=True)):
        if pair is None:
            out.append(None)
            continue
        a_count = max(int(rows[i]), 1)
        left, right = pair
        out.append((left / a_count, right / n) if spec.left_is_a else (left / n, right / a_count))
    return specs, out, p.held


def _rebased(specs: list[KronSpec], owners: tuple[int, ...], me: int) -> tuple[KronSpec, ...]:
    """This rank's specs, their ranges moved to the packed vector of its layers."""
    out, offset = [], 0
    for s, r in zip(specs, owners, strict=True):
        if r == me:
            p = s.stop - s.start
            out.append(dataclasses.replace(s, start=offset, stop=offset + p))
            offset += p
    return tuple(out)


def _owners(ctx: BuildContext, world: int) -> tuple[int, ...]:
    specs = [kron_spec(rb) for rb in ctx.engine.ruled]
    return shards.layer_owners(specs, world)


def _build_kfac(b: _Build) -> ShardedFisher:
    ctx = b.ctx
    _check_kronecker(ctx.engine, Structure.KFAC)
    if ctx.options.kfac_approx == "expand":  # as fl.fisher: rows as they come
        ctx.engine.rows_free.update(id(rb.module) for rb in ctx.engine.ruled)
    owners = _owners(ctx, b.world)
    specs, factors, held = _reduced_factors(b, owners)
    tensors = [t for f in factors if f is not None for t in f]
    owned = shards.layer_ranges(specs, owners, b.world)
    kw = {"specs": _rebased(specs, owners, b.me)}
    return b.operator(tensors, KFAC, kw, owned, held)


def _build_ekfac(b: _Build) -> ShardedFisher:
    ctx = b.ctx
    _check_kronecker(ctx.engine, Structure.EKFAC)
    columns: list[Tensor] | None = [] if ctx.engine.fisher_type is FisherType.MC else None
    owners = _owners(ctx, b.world)
    specs, factors, held = _reduced_factors(b, owners, columns)
    bases: list[tuple[Tensor, Tensor]] = []
    for spec, f, r in zip(specs, factors, owners, strict=True):
        if f is not None:
            # contiguous: eigh returns column-major eigenvectors; a collective sends raw memory
            ql, qr = sym_eigh(f[0])[1].contiguous(), sym_eigh(f[1])[1].contiguous()
        else:  # filled by the owner's broadcast
            ql = torch.empty(spec.groups, spec.rows, spec.rows, dtype=ctx.dtype, device=ctx.device)
            qr = torch.empty(spec.groups, spec.cols, spec.cols, dtype=ctx.dtype, device=ctx.device)
        if ctx.group is not None:
            src = shards._global(ctx.group, r)
            dist.broadcast(ql, src=src, group=ctx.group)
            dist.broadcast(qr, src=src, group=ctx.group)
        bases.append((ql, qr))
    del factors
    p = b.stream(columns=columns)
    sums, n_local = stream.owned_eigen_sums(p, owners, tuple(specs), bases)
    n = all_reduce_count(n_local, ctx.group, ctx.device)
    # every rank holds every layer's eigenbases for the second pass (it projects its own data)
    held = max(held, p.held + sum(ql.numel() + qr.numel() for ql, qr in bases))
    tensors: list[Tensor] = []
    for i, ((ql, qr), s) in enumerate(zip(bases, sums, strict=True)):
        if owners[i] == b.me:
            assert s is not None
            tensors += [ql, qr, s / max(n, 1)]
    bases.clear()  # the other ranks' layers' bases go here
    owned = shards.layer_ranges(specs, owners, b.world)
    kw = {"specs": _rebased(specs, owners, b.me)}
    return b.operator(tensors, EKFAC, kw, owned, held)


_BUILD = {
    Structure.DIAG: _build_diag,
    Structure.KFAC: _build_kfac,
    Structure.EKFAC: _build_ekfac,
}
