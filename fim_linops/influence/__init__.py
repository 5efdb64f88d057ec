"""Influence functions on the Fisher operators: which training examples made this prediction."""

from fim_linops.influence.scores import influence, self_influence, top_influences

__all__ = ["influence", "self_influence", "top_influences"]
