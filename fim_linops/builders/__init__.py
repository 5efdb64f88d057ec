"""Structure builders: one function per structure, registered by :class:`Structure`.

A builder takes a :class:`BuildContext` (the engine, the data, the options) and returns the
operator. ``fisher()`` looks the structure up here; new structures register themselves with
:func:`register`.
"""

from fim_linops.builders import (
    core,  # noqa: F401,E402  (registration)
    ekfac,  # noqa: F401,E402,I001  (registration)
    kron_sum,  # noqa: F401  (registration)
    lowrank,  # noqa: F401  (registration)
    quasi_diag,  # noqa: F401  (registration)
)
from fim_linops.builders.base import BUILDERS, BuildContext, register

__all__ = ["BUILDERS", "BuildContext", "register"]
