r"""The Jacobian engine: one forward per batch, hooks on ruled layers, one batched backward.

For a batch of N examples with model output f (N, C), the engine forms K back-propagated columns
V (K, N, C) of output-space vectors:

* exact:     V[k, n] = S_n[:, k], the columns of the square root of the nll Hessian (K = C);
* mc:        V[m, n] = d nll(f_n, y_m) / d f_n / sqrt(M) with y_m ~ p(y | f_n)     (K = M);
* empirical: V[0, n] = d nll(f_n, y_n) / d f_n with the labels of the data       (K = 1);

so that F = 1/N sum_n sum_k (J_n^T V[k, n]) (J_n^T V[k, n])^T. All K columns go back in one
``torch.autograd.grad(..., is_grads_batched=True)`` call to the outputs of the ruled layers; each
layer's rule turns (a, g) into its statistics. Parameters owned by modules without a rule, or shared
between modules, get per-example gradients from torch.func (vmap over examples of vjp).
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from collections.abc import Callable, Generator, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from fim_linops import positions
from fim_linops.data import call_model, check_finite, iter_batches
from fim_linops.engine import checks, functional
from fim_linops.engine.capture import capturing, rerouted
from fim_linops.engine.columns import (
    Columns,
    GivenColumns,
    RootColumns,
    backward_chunk,
    column_block,
    column_ranges,
    column_step,
    per_example_workspace,
    streams_roots,
)
from fim_linops.engine.result import BatchResult, Pending, join
from fim_linops.engine.ruled import RuledBlock
from fim_linops.engine.rules import rule_for
from fim_linops.enums import ParsedEnum
from fim_linops.layout import LayerBlock, ParamLayout
from fim_linops.likelihoods import Likelihood
from fim_linops.memory_guard import DEFAULT_MAX_BYTES
from fim_linops.naming import class_name

#: half-precision dtypes: the model runs in them, the statistics accumulate in float32
HALF = (torch.float16, torch.bfloat16)


class FisherType(ParsedEnum):
    """How the expectation over y ~ p(y | x) is taken."""

    EXACT = "exact"
    MC = "mc"
    EMPIRICAL = "empirical"

    @classmethod
    def _kind(cls) -> str:
        return "fisher_type"

    @classmethod
    def _choices(cls) -> str:
        return (
            "'exact' (closed-form expectation, = GGN), 'mc' (sampled labels, mc_samples=...) or "
            "'empirical' (the data's labels)"
        )


def _params_used_by_several_modules(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                seen[id(p)] = seen.get(id(p), 0) + 1
    return {pid for pid, count in seen.items() if count > 1}


def prepare_model(
    model: nn.Module, layout: ParamLayout, device: torch.device | None, dtype: torch.dtype | None
) -> tuple[nn.Module, ParamLayout]:
    """The model to run (a deep copy when another device or dtype is asked for) and its layout."""
    p0 = layout.entries[0].param
    if (device is None or torch.device(device) == p0.device) and (
        dtype is None or dtype == p0.dtype
    ):
        return model, layout
    work = copy.deepcopy(model).to(device=device, dtype=dtype)
    by_name = dict(work.named_parameters())
    return work, ParamLayout.from_model(work, params=[by_name[e.name] for e in layout.entries])


class Engine:
    """Runs batches through the model and exposes per-layer (a, g) and per-example gradients."""

    def __init__(
        self,
        model: nn.Module,
        layout: ParamLayout,
        likelihood: Likelihood,
        fisher_type: FisherType = FisherType.EXACT,
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        probe: Any = None,
    ):
        """``probe``: an input (its first two examples are used); when given,
        :meth:`exclude_raw_uses` runs on it (callers that hold their inputs pass the input with
        the most examples: the layer rules are exact only when the checks pass)."""
        self.model = model
        self.layout = layout
        self.likelihood = likelihood
        self.fisher_type = fisher_type
        self.mc_samples = mc_samples
        self.generator = generator
        #: memory budget of the exact Fisher's chunked backward passes (fisher(max_bytes=...))
        self.max_bytes: int | None = DEFAULT_MAX_BYTES
        #: numbers per column and example the statistics form at once (every block's per-example
        #: gradients: P for block_diag, dense, the low-rank SVD route), counted in each column
        #: chunk's working memory (:func:`~fim_linops.engine.columns.column_step`)
        self.workspace = 0
        self._warned_passes = False
        #: (K columns, step) -> a batch's backward passes' column ranges, set where ranks must run
        #: as many (FSDP2's per-unit pass: each backward re-gathers parameters, a collective)
        self.agree_chunks: Callable[[int, int], list[tuple[int, int]]] | None = None
        self._target_values = "values" in inspect.signature(likelihood.check_target).parameters
        for name, module in model.named_modules():
            if not isinstance(module, nn.modules.batchnorm._BatchNorm):
                continue
            if module.training:
                raise ValueError(
                    f"module '{name}' ({class_name(module)}) is in training mode: its batch "
                    "statistics couple the examples, so there is no per-example Fisher; call "
                    "model.eval() first (the Fisher is then computed with the running statistics)"
                )
            if not module.track_running_stats:
                raise ValueError(
                    f"module '{name}' ({class_name(module)}) has track_running_stats=False, so "
                    "it normalises with batch statistics even in eval mode: they couple the "
                    "examples and there is no per-example Fisher; use running statistics, or a "
                    "per-example normalisation (nn.LayerNorm, nn.GroupNorm)"
                )
        #: ruled modules whose rule would be wrong on this model (id -> why): per-example
        #: gradients through torch.func (:meth:`demote`)
        self.demoted: dict[int, str] = {}
        #: ruled modules (ids) whose statistics only need the rows of their calls as they come
        #: (KFAC "expand" factors): the first-batch check of example-major calls skips them
        self.rows_free: set[int] = set()
        #: the ids of ``rows_free`` whose calls' rows were found per-example (checks.py)
        self.rows_checked: set[int] = set()
        self._safe = False  # becomes True once an in-place op is seen on a kept tensor
        self._walked = False  # whether a forward's graph was checked for raw uses (paths.py)
        self._split()
        if probe is not None:
            self.exclude_raw_uses(probe)

    def _split(self) -> None:
        """Blocks with a layer rule (exact type, parameters owned by this module alone, not
        demoted) and the torch.func blocks."""
        shared = _params_used_by_several_modules(self.model)
        self.ruled: list[RuledBlock] = []
        self.fallback: list[LayerBlock] = []
        self.block_kind: dict[int, tuple[str, int]] = {}  # block index -> ("ruled"|"func", idx)
        for bi, block in enumerate(self.layout.blocks):
            rule = rule_for(block.module)
            uses_shared = any(
                id(p) in shared for p in block.module._parameters.values() if p is not None
            )
            if (
                rule is not None
                and not uses_shared
                and id(block.module) not in self.demoted
                and all(n in rule.param_names for n in block.local_names)
            ):
                self.block_kind[bi] = ("ruled", len(self.ruled))
                self.ruled.append(RuledBlock(block, block.module, rule))
            else:
                self.block_kind[bi] = ("func", len(self.fallback))
                self.fallback.append(block)
        # modules that use a shared parameter but own none of the selected ones must not be hooked
        self.hooked = {id(rb.module): (rb.module, rb.rule) for rb in self.ruled}
        #: modules whose forward is replaced by their capture forward while capturing
        self.reroute = rerouted(self.model, self.hooked)
        self.index = {id(rb.module): i for i, rb in enumerate(self.ruled)}
        self._func = functional.FunctionalModel(
            self.model, [e for b in self.fallback for e in b.entries]
        )

    def exclude_raw_uses(self, x: Any) -> None:
        """Move to torch.func, with a warning, every ruled module that its rule would get wrong,
        by the first batch's checks run on forwards of the input ``x`` (its first two examples,
        and its first one: :func:`checks.probe_checks`). Call before the builders read
        ``ruled``; the first batch of :meth:`run` then skips the check."""
        found = checks.probe_checks(self, x)
        self._walked = True
        if found:
            self.demote(found)

    def demote(self, reasons: dict[int, str]) -> None:
        """Per-example gradients of these ruled modules (id -> why their rule would be wrong)
        through torch.func from now on, with a warning that names them and says why."""
        lines = []
        for rb in self.ruled:
            why = reasons.get(id(rb.module))
            if why is not None:
                self.demoted[id(rb.module)] = why
                lines.append(f"'{rb.block.module_name}' ({class_name(rb.module)}): {why}")
        warnings.warn(
            "the layer rules would be wrong for module "
            + "; ".join(lines)
            + ". Their per-example gradients go through torch.func (correct, slower)",
            RuntimeWarning,
            stacklevel=4,
        )
        self._split()

    # -- columns ---------------------------------------------------------------------------------
    def columns(self, f: Tensor, y: Tensor | None, batch_index: int, x: Any = None) -> Tensor:
        """Back-propagated columns V (K, N, C) for the (flat) output f (N, C); per-position outputs
        get per-position columns with the dropped positions zeroed (:mod:`fim_linops.positions`)."""
        cols = self.column_source(f, y, batch_index, x)
        return cols.chunk(0, cols.k)

    def column_source(
        self, f: Tensor, y: Tensor | None, batch_index: int, x: Any = None
    ) -> Columns:
        """The batch's columns (:meth:`columns`), made a range at a time for the exact Fisher
        (:class:`~fim_linops.engine.columns.RootColumns`)."""
        lik = self.likelihood
        mask = self.mask(f, y, x)
        if self.fisher_type is FisherType.EXACT:
            if not lik.sequence and mask is None and not streams_roots(lik):
                return GivenColumns(lik.hessian_sqrt(f).permute(2, 0, 1))
            return RootColumns(lik, f, mask)
        if self.fisher_type is FisherType.MC:
            v = lik.sampled_grad_output(f, self.mc_samples, generator=self.generator)
            v = v if self.mc_samples == 1 else v / math.sqrt(self.mc_samples)
        else:
            if y is None:
                raise ValueError(
                    "fisher_type='empirical' needs labels: pass (x, y) batches (a mapping batch "
                    "needs a 'labels' key)"
                )
            v = lik.grad_output(f, self._check_target(f, y, values=False))[None]  # see output()
        if mask is not None:
            v = v * positions.flat_mask(mask, f.shape[1] // mask.shape[1]).to(v.dtype)
        return GivenColumns(v)

    def mask(self, f: Tensor, y: Tensor | None, x: Any = None) -> Tensor | None:
        """(N, T) kept positions: from the labels (ignore_index, NaN targets), else from a mapping
        batch's attention_mask; None when every position is kept."""
        lik = self.likelihood
        if not hasattr(lik, "position_mask"):  # a user likelihood without positions
            return None
        if y is not None:
            return lik.position_mask(f, self._check_target(f, y, values=False))
        if not lik.sequence:
            return None
        return positions.mapping_mask(x, f.shape[1] // (lik.width or 1), lik.shift_labels)

    def count(self, f: Tensor, mask: Tensor | None) -> int:
        """The batch's share of the normaliser: N (positions="sum") or its kept positions."""
        if getattr(self.likelihood, "positions", None) is not positions.Positions.MEAN:
            return f.shape[0]
        if mask is None:
            return f.shape[1] // (self.likelihood.width or f.shape[1]) * f.shape[0]
        return int(mask.sum())

    def output(self, x: Any, y: Tensor | None, batch_index: int) -> Tensor:
        f = self.likelihood.check_output(call_model(self.model, x))
        check_finite(f.detach(), "the model output", batch_index)
        if y is not None:  # label values matter (and are checked) for the empirical Fisher only
            self._check_target(f, y, values=self.fisher_type is FisherType.EMPIRICAL)
        return f

    def _check_target(self, f: Tensor, y: Tensor, values: bool) -> Tensor:
        """The likelihood's label check; ``values=False`` skips checks of the label values where
        the likelihood supports it (a user likelihood may define ``check_target(f, y)`` only)."""
        if self._target_values:
            return self.likelihood.check_target(f, y, values=values)
        return self.likelihood.check_target(f, y)

    # -- batches ---------------------------------------------------------------------------------
    def run(
        self,
        data: Any,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        progress: bool = False,
        need_grads: bool = True,
        columns: list[Tensor] | None = None,
        stream: bool = False,
    ) -> Generator[BatchResult, None, None]:
        """One forward per batch and its columns back-propagated in chunks within ``max_bytes``;
        yields one :class:`BatchResult` per batch, or with ``stream`` one per column chunk (the
        statistics are sums over the columns: each chunk is added and freed before the next one
        is made, so memory stays within one chunk whatever the number of columns)."""
        if self.model_dtype in HALF:  # a half model takes half inputs; statistics in float32
            dtype = self.model_dtype
        batches = iter_batches(data, device, dtype, need_targets=True, model=self.model)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="fisher", unit="batch")
        for index, (x, y) in enumerate(batches):
            pending = self._forward(x, y, index, columns, safe=self._safe)
            if pending is None:  # an in-place op rewrote a kept tensor: redo with private copies
                self._safe = True
                pending = self._forward(x, y, index, columns, safe=True)
                assert pending is not None  # the safe mode never needs a retry
            parts = self._results(pending, need_grads)
            del pending
            if stream:
                yield from parts
            else:
                yield join(list(parts))
            del parts  # one batch's (a, g) alive at a time, not two

    def _forward(
        self, x: Any, y: Tensor | None, index: int, columns: list[Tensor] | None, safe: bool
    ) -> Pending | None:
        """The batch's forward with the hooks on (None when an in-place op rewrote a kept
        tensor), its first-batch checks, calls and columns."""
        with capturing(self.hooked, safe=safe, reroute=self.reroute) as cap:
            f = self.output(x, y, index)
            if cap.modified():
                return None
            if not self._walked:  # the first forward: the rules must be exact on this model
                self._walked = True
                found = checks.first_batch_checks(self, x, f, cap)
                if found:
                    raise checks.UnruledLayers(found, x, y)
            else:
                checks.check_example_major(self, f, cap.calls, index)
                if len(cap.calls) < len(self.ruled):
                    checks.check_uncalled(self, f, cap.calls.keys(), index)
            cols = (
                self.column_source(f, y, index, x)
                if columns is None
                else GivenColumns(columns[index].to(f.dtype))
            )
            count = self.count(f, self.mask(f, y, x))
            half = f.dtype in HALF
            calls = [
                (
                    self.index[key],
                    c.a.float() if half and c.a.is_floating_point() else c.a,
                    c.output,
                )
                for key in list(cap.calls)
                for c in cap.calls[key]
            ]  # float32 statistics for a half model; token ids stay ints
        return Pending(f, x, calls, cols, count)

    def _results(self, p: Pending, need_grads: bool) -> Iterator[BatchResult]:
        """The batch's :class:`BatchResult` per chunk of its columns."""
        outputs = [o for _, _, o in p.calls]
        k = p.cols.k
        step = k
        if p.calls and need_grads:
            p_func = sum(b.numel for b in self.fallback)
            numel = [rb.block.numel for rb in self.ruled]
            work = per_example_workspace(numel, p.calls, p_func) + self.workspace
            step = column_step(outputs, p.cols, p.f, self.max_bytes, self._warned_passes, work)
            self._warned_passes = self._warned_passes or step < k
        half = p.f.dtype in HALF
        ranges = column_ranges(k, step)
        if self.agree_chunks is not None and p.calls and need_grads:
            ranges = self.agree_chunks(k, step)
        for index, (lo, hi) in enumerate(ranges):
            v, first = column_block(p.cols, lo, hi, p.f), index == 0
            grads: tuple = ()
            if p.calls and need_grads:
                grads = backward_chunk(p.f, outputs, v, last=index == len(ranges) - 1)
            calls: dict[int, list[tuple[Tensor, Tensor]]] = {}
            for (i, a, out), g in zip(p.calls, grads, strict=False):
                if g is None:
                    g = torch.zeros(hi - lo, *out.shape, dtype=v.dtype, device=v.device)
                calls.setdefault(i, []).append((a, g.detach().float() if half else g.detach()))
            vd = v.detach().float() if half else v.detach()
            n = p.f.shape[0]
            yield BatchResult(n, v.shape[0], calls, p.x, vd, self, p.count if first else 0, first)
            del calls, grads, v, vd

    def functional_grads(self, x: Any, v: Tensor, lo: int, hi: int) -> dict[str, Tensor]:
        """Per-example gradients of the torch.func blocks, in float32 for a half model."""
        dt = self.model_dtype
        if dt not in HALF:
            return self._func.per_example_grads(x, v, lo, hi, self.likelihood)
        out = self._func.per_example_grads(x, v.to(dt), lo, hi, self.likelihood)
        return {k: g.float() for k, g in out.items()}

    @property
    def model_dtype(self) -> torch.dtype:
        return self.layout.entries[0].param.dtype
