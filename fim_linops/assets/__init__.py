"""Data files shipped with fim_linops (read with :func:`importlib.resources.files`).

``tiny_text.txt``: about 11 KB of public-domain English (the US Declaration of Independence and
four Shakespeare passages: Hamlet's and Macbeth's soliloquies, Antony's funeral oration, Sonnet
18), typed from memory, so it may differ from a critical edition in spelling and punctuation.
Used by :func:`fim_linops.examples.nanogpt.char_dataset`.
"""
