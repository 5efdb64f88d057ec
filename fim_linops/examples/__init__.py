"""Small, self-contained example models and data used by the tutorials and benchmarks.

:mod:`fim_linops.examples.nanogpt`: a nanoGPT-style character-level transformer and a
character dataset over the public-domain text shipped in :mod:`fim_linops.assets`.
"""
