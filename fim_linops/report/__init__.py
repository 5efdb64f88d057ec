"""The demo report of the ``fim-linops`` command, one module per section.

:func:`write_report` trains the digits CNN (:mod:`.task`) and writes ``report.md``, its figures
and ``results.json`` to a folder: the Fisher at each structure (:mod:`.structures`), its spectral
density against KFAC's (:mod:`.spectrum`), ``fl.compare`` (:mod:`.comparison`) and a FishLeg run
against Adam (:mod:`.fishleg`).
"""

from __future__ import annotations

from fim_linops.report.document import DemoConfig, write_report
from fim_linops.report.section import Section
from fim_linops.report.task import DigitsTask, digits_cnn, load_digits_tensors, train

__all__ = [
    "DemoConfig",
    "DigitsTask",
    "Section",
    "digits_cnn",
    "load_digits_tensors",
    "train",
    "write_report",
]
