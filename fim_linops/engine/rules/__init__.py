"""Layer rules, one file per family, registered by module type."""

from fim_linops.engine.rules import conv, embedding, hf_conv1d, linear, norm  # noqa: F401
from fim_linops.engine.rules.base import RULES, KronStats, LayerRule, rule_for

__all__ = ["RULES", "KronStats", "LayerRule", "rule_for"]
