"""The structures (approximations) a Fisher can take, as an enum (no string dispatch inside)."""

from __future__ import annotations

import enum


class Structure(enum.Enum):
    DENSE = "dense"
    BLOCK_DIAG = "block_diag"
    KFAC = "kfac"
    EKFAC = "ekfac"
    DIAG = "diag"
    QUASI_DIAG = "quasi_diag"
    LOWRANK = "lowrank"
    KRON_SUM = "kron_sum"
    IMPLICIT = "implicit"

    @classmethod
    def parse(cls, value: str | Structure) -> Structure:
        if isinstance(value, cls):
            return value
        if not isinstance(value, str):
            raise TypeError(f"structure must be a name or fl.Structure, got {type(value).__name__}")
        try:
            return cls(value.lower())
        except ValueError:
            names = ", ".join(repr(s.value) for s in cls)
            raise ValueError(f"unknown structure {value!r}; use one of {names}") from None

    @property
    def kronecker(self) -> bool:
        return self in (Structure.KFAC, Structure.EKFAC, Structure.KRON_SUM)
