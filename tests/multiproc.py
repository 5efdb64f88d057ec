"""Run a function in several processes joined by a torch.distributed process group, robustly.

Why a helper: on torch 2.13 the teardown of a gloo process group (``destroy_process_group`` and the
interpreter's exit after it) aborts now and then with ``terminate called without an active
exception`` (SIGABRT), even in a minimal two-process script. A test that judges its workers by
their exit status (``torch.multiprocessing.spawn(join=True)``) then fails at random although every
number it computed was right. Here the workers are judged by what they *report*, and they report
before any teardown:

1. the parent starts ``world_size`` fresh processes (``spawn`` start method, so nothing of the
   parent's state is inherited) with one private temporary folder;
2. each worker sends its stdout/stderr (C++ included) to a log file, joins the process group through
   a ``FileStore`` in that folder (no TCP port to pick, so no race for a free port), calls
   ``fn(rank, world_size, *args)`` and ``torch.save``-s its return value, or the traceback of the
   exception it raised, to ``rank<r>.pt`` (written to a side file, then renamed: the parent never
   reads half a file);
3. then, best effort, it waits for the other ranks at a barrier (so nobody closes its sockets while
   a peer still reads from them) and leaves with ``os._exit(0)``: no ``destroy_process_group``, no
   interpreter finalisation, no C++ destructors, hence no teardown to abort. The operating system
   frees what the process held;
4. the parent waits until every rank has reported (or one has died or raised, or ``timeout``
   passed), kills whatever is still running, and returns the results in rank order.

It still fails loudly when a worker really fails: an exception in ``fn`` is re-raised in the parent
as :class:`WorkerError` with the worker's traceback; a worker that dies before it reports
(segfault, abort, ``os._exit``, killed) or does not report in time is a :class:`WorkerError` naming
the rank, its exit code or signal and the tail of its log. Once every rank has reported, its exit
status is ignored: that is exactly the teardown abort this helper exists for.

API::

    from multiproc import run_in_processes  # tests/ is on sys.path under pytest

    def _work(rank: int, world_size: int, n: int) -> dict[str, torch.Tensor]:
        # module level (pickled by reference); torch.distributed is initialised here
        ...
        return {"F": F.to_dense()}           # anything torch.save can store (tensors, dicts...)

    def test_something() -> None:
        results = run_in_processes(_work, args=(12,), world_size=2)   # [rank 0's, rank 1's]

Options: ``backend`` ("gloo"), ``timeout`` (seconds for the whole run, also the process group's
collective timeout), ``threads`` (``torch.set_num_threads`` in each worker, 1), ``env`` (extra
environment variables for the workers, e.g. for FSDP), ``after_report`` (a function each worker
calls after reporting, e.g. ``dist.destroy_process_group``). The workers run on CPU unless ``fn`` moves
things to a device itself.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

#: seconds the parent keeps waiting for the other ranks after one rank failed (they are usually
#: blocked in a collective with the failed one and will never report)
GRACE_S = 5.0
_LOG_TAIL = 4000


class WorkerError(RuntimeError):
    """A worker raised, died before reporting, or did not report in time."""


def _bootstrap(
    rank: int,
    world_size: int,
    folder: str,
    fn: Callable[..., Any],
    args: Sequence[Any],
    backend: str,
    timeout: float,
    threads: int,
    env: Mapping[str, str],
    after_report: Callable[[], Any] | None,
) -> None:
    """The worker's whole life (runs in the child process; never returns)."""
    work = Path(folder)
    log = os.open(work / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)  # C++ writes (gloo, the abort message) land in the log too
    os.dup2(log, 2)
    os.environ.update(env)
    torch.set_num_threads(threads)
    import torch.distributed as dist

    try:
        dist.init_process_group(
            backend,
            init_method=f"file://{work / 'store'}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
        report: dict[str, Any] = {"ok": True, "result": fn(rank, world_size, *args)}
    except BaseException:  # noqa: BLE001 - reported to the parent, which re-raises
        report = {"ok": False, "error": traceback.format_exc()}
    part = work / f"rank{rank}.pt.part"
    try:
        torch.save(report, part)
    except BaseException:  # the result itself could not be pickled: say so
        torch.save({"ok": False, "error": traceback.format_exc()}, part)
    os.replace(part, work / f"rank{rank}.pt")  # atomic: the parent sees all of it or nothing
    try:
        if report["ok"] and dist.is_initialized():
            dist.barrier()  # every rank has reported: nobody still reads from our sockets
        if after_report is not None:
            after_report()
    except BaseException:  # noqa: BLE001 - the result is already out; the exit cannot spoil it
        pass
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)  # no destroy_process_group, no finalisation: no teardown to abort


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running (killed by the harness)"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _log_tail(folder: Path, rank: int) -> str:
    path = folder / f"rank{rank}.log"
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-_LOG_TAIL:] if text.strip() else "(empty log)"


def run_in_processes(
    fn: Callable[..., Any],
    args: Sequence[Any] = (),
    world_size: int = 2,
    *,
    backend: str = "gloo",
    timeout: float = 300.0,
    threads: int = 1,
    env: Mapping[str, str] | None = None,
    after_report: Callable[[], Any] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes of one process group and
    return the values they returned, in rank order.

    ``fn`` must be picklable by reference (a module-level function) and so must ``args``; its
    return value must be storable by ``torch.save``. ``after_report`` (module-level, picklable) runs
    in each worker after its report is written and the barrier passed, just before ``os._exit(0)``:
    ``torch.distributed.destroy_process_group`` exercises torch's own teardown (an abort there does
    not fail the run), the harness's tests pass ``os.abort``. Raises :class:`WorkerError` if a worker raises
    (with its traceback), dies before reporting, or the run takes longer than ``timeout`` seconds.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="fim_linops_mp_") as tmp:
        folder = Path(tmp)
        procs = [
            ctx.Process(
                target=_bootstrap,
                args=(
                    rank,
                    world_size,
                    tmp,
                    fn,
                    tuple(args),
                    backend,
                    timeout,
                    threads,
                    dict(env or {}),
                    after_report,
                ),
                daemon=True,
            )  # fmt: skip
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        reports: dict[int, dict[str, Any]] = {}
        failed_at: float | None = None
        deadline = time.monotonic() + timeout
        try:
            while len(reports) < world_size:
                for rank in range(world_size):
                    path = folder / f"rank{rank}.pt"
                    if rank not in reports and path.exists():
                        reports[rank] = torch.load(path, weights_only=False)
                        if not reports[rank]["ok"] and failed_at is None:
                            failed_at = time.monotonic()
                dead = [r for r, p in enumerate(procs) if r not in reports and not p.is_alive()]
                # a rank that exited without a report file (checked after its exit) has failed
                if any(not (folder / f"rank{r}.pt").exists() for r in dead) and failed_at is None:
                    failed_at = time.monotonic()
                now = time.monotonic()
                if now > deadline or (failed_at is not None and now > failed_at + GRACE_S):
                    break
                time.sleep(0.05)
        finally:
            for p in procs:
                p.join(timeout=GRACE_S if len(reports) == world_size else 0.1)
                if p.is_alive():
                    p.kill()
                    p.join()
        problems = []
        for rank, p in enumerate(procs):
            rep = reports.get(rank)
            if rep is not None and rep["ok"]:
                continue
            if rep is not None:
                problems.append(f"rank {rank} raised:\n{rep['error']}")
            else:
                problems.append(
                    f"rank {rank} did not report ({_describe_exit(p.exitcode)}); its log:\n"
                    f"{_log_tail(folder, rank)}"
                )
        if problems:
            head = (
                f"{len(problems)} of {world_size} worker(s) failed"
                if time.monotonic() <= deadline
                else f"timed out after {timeout:g} s"
            )
            raise WorkerError(head + "\n\n" + "\n\n".join(problems))
        return [reports[r]["result"] for r in range(world_size)]
