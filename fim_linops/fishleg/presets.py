r"""FishLeg's hyper-parameter presets and the checks of every hyper-parameter.

``preset="default"`` (ours) is chosen so that Q(lambda) learns (F + damping I)^-1 within a few
hundred auxiliary updates: Q starts at the Kronecker approximation of the damped KFAC inverse of
the first auxiliary batch that never exceeds it (exact where the Fisher is a Kronecker product, see
:func:`fim_linops.fishleg.init.kfac_init_factors`), and lambda moves by Adam at aux_lr 3e-3 every
``update_aux_every`` steps. ``preset="reference"`` gives the reference library's
(mtkresearch/FishLeg) hyper-parameters: Q = I at start, aux_lr 1e-4, an auxiliary update every 10
steps, lr 0.05, damping 0.5. With them Q hardly moves over a few thousand steps (Adam moves each
entry of lambda by about aux_lr per update): on a linear-Gaussian model, 100 epochs of 8 steps
leave |Q F_gamma - I| / |I| at 2.73 (0.093 with the defaults). Measurements in
``benchmarks/README.md`` (``python benchmarks/bench_fishleg_defaults.py``).
"""

from __future__ import annotations

from typing import Any

from fim_linops.fishleg.parameterisation import STRUCTURES

#: hyper-parameters that a preset sets (an explicit argument always wins)
PRESETS: dict[str, dict[str, Any]] = {
    "default": dict(
        lr=5e-2, damping=0.5, momentum=0.9, weight_decay=1e-5, aux_lr=3e-3, update_aux_every=5,
        init="kfac", init_scale=1.0,
    ),
    "reference": dict(
        lr=5e-2, damping=0.5, momentum=0.9, weight_decay=1e-5, aux_lr=1e-4, update_aux_every=10,
        init="scale", init_scale=1.0,
    ),
}  # fmt: skip

AUX_U = ("mixed", "gradient", "random")


def resolve(preset: str, given: dict[str, Any]) -> dict[str, Any]:
    """The preset's values, overridden by the arguments given (those not None)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
    out = dict(PRESETS[preset])
    out.update({k: v for k, v in given.items() if v is not None})
    return out


def check(h: dict[str, Any]) -> None:
    """ValueError naming the first bad hyper-parameter of ``h`` (FishLeg's keyword arguments)."""
    rules = [
        (h["structure"] in STRUCTURES, f"structure must be one of {STRUCTURES}"),
        (h["init"] in ("scale", "kfac"), "init must be 'scale' or 'kfac'"),
        (h["fisher"] in ("exact", "sampled"), "fisher must be 'exact' or 'sampled'"),
        (h["aux_u"] in AUX_U, f"aux_u must be one of {AUX_U}"),
        (h["nan_policy"] in ("skip", "raise"), "nan_policy must be 'skip' or 'raise'"),
    ]
    for ok, msg in rules:
        if not ok:
            key = msg.split()[0]
            raise ValueError(f"{msg}, got {h[key]!r}")
    if not (h["lr"] >= 0 and h["damping"] >= 0 and h["aux_lr"] >= 0):
        raise ValueError("lr, damping and aux_lr must be >= 0")
    if not 0 <= h["momentum"] < 1:
        raise ValueError(f"momentum must lie in [0, 1), got {h['momentum']}")
    if not 0 <= h["aux_mix"] <= 1:
        raise ValueError(f"aux_mix must lie in [0, 1], got {h['aux_mix']}")
    if not (h["update_aux_every"] >= 1 and h["aux_steps"] >= 1 and h["warmup"] >= 0):
        raise ValueError("update_aux_every and aux_steps must be >= 1, warmup >= 0")
    if not h["init_scale"] > 0:
        raise ValueError(f"init_scale must be > 0, got {h['init_scale']}")
