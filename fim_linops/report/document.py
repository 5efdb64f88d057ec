"""The demo report document: settings, the sections in order, ``report.md`` and ``results.json``."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fim_linops.report.comparison import comparison_section
from fim_linops.report.fishleg import fishleg_section
from fim_linops.report.section import Section, all_finite
from fim_linops.report.spectrum import spectrum_section
from fim_linops.report.structures import structures_section
from fim_linops.report.task import N_DIGITS, DigitsTask


@dataclass
class DemoConfig:
    """Settings of the demo. ``quick()`` is the preset of ``fim-linops demo --quick``.

    Attributes:
        seconds: Adam training time of the CNN before its Fisher is taken.
        examples: digits in the Fisher (and FishLeg's auxiliary data).
        seed: seed of the initialisation, training, probes and minibatches.
        probes: Gaussian probes of the per-structure error.
        slq_probes, slq_steps: probes and Lanczos steps of each spectral density.
        compare_probes: Hutchinson probes of ``fl.compare``'s error estimate.
        fishleg_steps: steps of FishLeg and of Adam (0 leaves the section out).
        progress: tqdm progress bars while building the Fishers.
    """

    seconds: float = 5.0
    examples: int = 512
    seed: int = 0
    probes: int = 8
    slq_probes: int = 4
    slq_steps: int = 40
    compare_probes: int = 20
    fishleg_steps: int = 200
    progress: bool = False

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """A smaller run for tests and a first look (a fraction of the default's time)."""
        settings: dict[str, Any] = dict(
            seconds=0.5,
            examples=128,
            probes=4,
            slq_probes=2,
            slq_steps=15,
            compare_probes=8,
            fishleg_steps=30,
        )
        settings.update(overrides)
        return cls(**settings)

    def check(self) -> None:
        """Raise ValueError for settings out of range."""
        positive = ("probes", "slq_probes", "slq_steps", "compare_probes")
        bad = [name for name in positive if getattr(self, name) < 1]
        if bad:
            raise ValueError(f"demo settings {bad} must be >= 1")
        if not 1 <= self.examples <= N_DIGITS:
            raise ValueError(f"--examples must lie in [1, {N_DIGITS}], got {self.examples}")
        if self.seconds < 0:
            raise ValueError(f"--seconds must be >= 0, got {self.seconds}")
        if self.fishleg_steps < 0:
            raise ValueError(f"--fishleg-steps must be >= 0, got {self.fishleg_steps}")


def write_report(out: Path, config: DemoConfig) -> list[Section]:
    """Train the task, compute every section, and write ``out/report.md`` (sections in order,
    each referencing its png in ``out``) and ``out/results.json`` ({"config", "task", section
    results by key}). Returns the sections."""
    config.check()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    task = DigitsTask.make(config.seconds, config.examples, config.seed)
    print(
        f"trained a {task.n_params}-parameter CNN on digits for {config.seconds:g}s: "
        f"train accuracy {task.accuracy:.3f}; Fisher on {task.n_examples} examples",
        flush=True,
    )
    timings: dict[str, float] = {}

    def timed(key: str, make: Any) -> Any:
        t0 = time.perf_counter()
        result = make()
        timings[key] = time.perf_counter() - t0
        print(f"  {key}: {timings[key]:.1f}s", flush=True)
        return result

    table, ops = timed(
        "structures",
        lambda: structures_section(task, out, n_probes=config.probes, progress=config.progress),
    )
    sections = {"structures": table}
    sections["spectrum"] = timed(
        "spectrum",
        lambda: spectrum_section(
            ops["implicit"], ops["kfac"], out, config.slq_probes, config.slq_steps, config.seed
        ),
    )
    sections["comparison"] = timed(
        "comparison", lambda: comparison_section(task, out, n_probes=config.compare_probes)
    )
    if config.fishleg_steps:
        sections["fishleg"] = timed(
            "fishleg", lambda: fishleg_section(task, out, steps=config.fishleg_steps)
        )
    results: dict[str, Any] = {
        "config": asdict(config),
        "task": {
            "n_params": task.n_params,
            "n_examples": task.n_examples,
            "train_accuracy": task.accuracy,
        },
        "seconds": {**timings, "total": time.perf_counter() - start},
    }
    results.update({key: s.results for key, s in sections.items()})
    if not all_finite(results):
        print("warning: the report holds non-finite numbers (see results.json)", flush=True)
    header = [
        "# fim_linops demo report",
        "",
        f"A CNN ({task.n_params} parameters) trained with Adam for {config.seconds:g} s on "
        f"scikit-learn's digits ({task.accuracy:.3f} train accuracy); Fisher of the categorical "
        f"likelihood on {task.n_examples} examples, exact type. Total time "
        f"{results['seconds']['total']:.1f} s.",
        "",
        "Contents: " + ", ".join(s.title for s in sections.values()) + ".",
        "",
    ]
    body = "\n".join(s.markdown() for s in sections.values())
    (out / "report.md").write_text("\n".join(header) + "\n" + body)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(table.markdown(), flush=True)
    print(f"report written to {out / 'report.md'}", flush=True)
    return list(sections.values())
