"""The structures (approximations) a Fisher can take, as an enum (no string dispatch inside)."""

from __future__ import annotations

from fim_linops.enums import ParsedEnum


class Structure(ParsedEnum):
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
    def _kind(cls) -> str:
        return "structure"

    @property
    def kronecker(self) -> bool:
        return self in (Structure.KFAC, Structure.EKFAC, Structure.KRON_SUM)
