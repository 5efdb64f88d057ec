"""One Adam step on FishLeg's auxiliary parameters lambda, skipped (or raised) when the auxiliary
loss or its gradient is not finite."""

from __future__ import annotations

import torch
from torch import Tensor


def adam_step_or_skip(
    adam: torch.optim.Adam,
    lam: list[Tensor],
    grads: list[Tensor],
    ok: Tensor,
    *,
    raise_msg: str | None,
    sync_free: bool,
) -> Tensor:
    """Adam step on ``lam`` along ``grads`` when the boolean tensor ``ok`` holds; returns the number
    of skipped steps (0 or 1, a tensor).

    ``raise_msg`` set (``nan_policy="raise"``): FloatingPointError(raise_msg) when not ok (one host
    sync). Otherwise a non-finite step is skipped, lambda and the Adam state left as they were: by
    a host check when not ``sync_free`` (CPU, where it is free), else without a sync by stepping
    with zeroed gradients and copying back (lambda, state) where not ok (state created by this step
    starts from zero gradients)."""
    skipped = torch.zeros((), dtype=torch.long, device=ok.device)
    if raise_msg is not None or not sync_free:
        if not bool(ok):
            if raise_msg is not None:
                raise FloatingPointError(raise_msg)
            skipped += 1
        else:
            for t, gr in zip(lam, grads, strict=True):
                t.grad = gr
            adam.step()
    else:
        live = lam + [s for st in adam.state.values() for s in st.values() if isinstance(s, Tensor)]
        saved = [(cur, cur.clone()) for cur in live if cur.device == ok.device]
        for t, gr in zip(lam, grads, strict=True):
            t.grad = torch.where(ok, gr, torch.zeros_like(gr))
        adam.step()
        for cur, old in saved:
            cur.copy_(torch.where(ok, cur, old))
        skipped += (~ok).long()
    for t in lam:
        t.grad = None
    return skipped
