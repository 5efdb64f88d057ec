"""Layer rules, one file per family, registered by module type."""

from fim_linops.engine.rules import (  # noqa: F401
    conv,
    conv_transpose,
    embedding,
    hf_conv1d,
    linear,
    mha,
    norm,
)
from fim_linops.engine.rules.base import RULES, KronStats, LayerRule, rule_for

__all__ = ["RULES", "KronStats", "LayerRule", "rule_for"]
