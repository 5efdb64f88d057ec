"""Bridges from fim_linops to other libraries.

Each bridge is a submodule imported on its own, so that ``import fim_linops`` never needs the other
library: ``fim_linops.integrations.laplace_torch`` (laplace-torch backends, needs
``pip install laplace-torch``).
"""
