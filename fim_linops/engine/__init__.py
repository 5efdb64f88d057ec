"""The Jacobian engine: hooks, layer rules and the torch.func path."""

from fim_linops.engine.engine import BatchResult, Engine, FisherType, prepare_model

__all__ = ["BatchResult", "Engine", "FisherType", "prepare_model"]
