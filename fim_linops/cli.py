"""The ``fim-linops`` command.

``fim-linops demo`` trains a small CNN on scikit-learn's digits for a few seconds and writes a
markdown report of its Fisher: the Fisher at each structure (build time, trace, error against the
exact operator, top eigenvalues), the spectral density of the exact Fisher against KFAC's,
``fl.compare``'s accuracy/cost table of diag, kfac and ekfac, and a short FishLeg run against
Adam, each with its figure. The sections live in :mod:`fim_linops.report`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fim_linops.report import DemoConfig, write_report
from fim_linops.report.structures import top_eigenvalues

# the demo's task, importable from here as before (notebooks and docs use it)
from fim_linops.report.task import digits_cnn, load_digits_tensors, train

__all__ = [
    "build_parser",
    "demo",
    "digits_cnn",
    "load_digits_tensors",
    "main",
    "top_eigenvalues",
    "train",
]

DEMO_DESCRIPTION = """\
Train a small CNN (3,818 parameters) on scikit-learn's 8x8 digits with Adam, then write to OUT:

  report.md          the report, in four sections:
                       1. the Fisher at each structure (implicit = exact, diag, kfac): build
                          time, trace, relative error on random probes, top-5 eigenvalues
                       2. spectrum: SLQ densities of the exact Fisher and of KFAC
                       3. approximation comparison: fl.compare of diag, kfac, ekfac
                       4. FishLeg vs Adam: training-loss curves on the same minibatches
  *.png              the figures the report references (top_eigenvalues, spectrum,
                     comparison, fishleg)
  results.json       every number of the report, with the settings and timings

Takes about a minute on two CPU cores; --quick takes a fraction of that with smaller settings
(given options override the preset)."""


def build_parser() -> argparse.ArgumentParser:
    """The ``fim-linops`` argument parser (one sub-command: ``demo``)."""
    parser = argparse.ArgumentParser(
        prog="fim-linops",
        description="Fisher information, Gauss-Newton and NTK matrices of PyTorch models as "
        "linear_operator LinearOperators. Sub-commands:\n"
        "  demo    train a small CNN on digits and write a report of its Fisher\n"
        "Run `fim-linops <sub-command> --help` for its options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo}")
    d = sub.add_parser(
        "demo",
        help="train a small CNN on digits and write a report of its Fisher",
        description=DEMO_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    full = DemoConfig()
    d.add_argument(
        "--out",
        type=Path,
        default=Path("fim_linops_report"),
        help="folder for report.md, the figures and results.json (created; default: %(default)s)",
    )
    d.add_argument(
        "--quick",
        action="store_true",
        help="small preset for a smoke test: 0.5 s training, 128 examples, fewer probes and "
        "Lanczos steps, 30 FishLeg steps",
    )
    d.add_argument(
        "--seconds", type=float, help=f"Adam training time in seconds (default {full.seconds:g})"
    )
    d.add_argument(
        "--examples", type=int, help=f"digits in the Fisher, 1 to 1797 (default {full.examples})"
    )
    d.add_argument(
        "--slq-steps",
        type=int,
        help=f"Lanczos steps of each spectral density (default {full.slq_steps})",
    )
    d.add_argument(
        "--slq-probes",
        type=int,
        help=f"probes of each spectral density (default {full.slq_probes})",
    )
    d.add_argument(
        "--compare-probes",
        type=int,
        help=f"Hutchinson probes of fl.compare's error estimate (default {full.compare_probes})",
    )
    d.add_argument(
        "--fishleg-steps",
        type=int,
        help=f"steps of FishLeg and of Adam; 0 leaves the section out (default {full.fishleg_steps})",
    )
    d.add_argument("--seed", type=int, help=f"seed of everything random (default {full.seed})")
    d.add_argument("--progress", action="store_true", help="tqdm progress bars for the builds")
    return parser


def demo(out: Path, config: DemoConfig) -> int:
    """Write the demo report to ``out`` with ``config``; returns the exit status 0."""
    write_report(out, config)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fim-linops`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        names = (
            "seconds",
            "examples",
            "slq_steps",
            "slq_probes",
            "compare_probes",
            "fishleg_steps",
            "seed",
        )
        given = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
        config = DemoConfig.quick(**given) if args.quick else DemoConfig(**given)
        config.progress = args.progress
        try:
            return demo(args.out, config)
        except ValueError as exc:
            print(f"fim-linops demo: error: {exc}", file=sys.stderr)
            return 2
    return 2  # pragma: no cover - argparse requires a sub-command


if __name__ == "__main__":
    sys.exit(main())
