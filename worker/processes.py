"""``--processes N``: N worker processes in one consumer group, started and stopped as one command.

Why: on a small machine one process running a 1-thread session call per core shares one GIL and
one event loop between the cores; `emostream bench` measured two 1-core worker processes in one
group ahead of one process with two streams in every run (section "1 vs 2 worker processes").
Each child is an ordinary ``emostream worker`` — same settings, its own metrics port — pinned to
a disjoint share of the cores, so its automatic thread plan sees only those. When one child ends,
the others are stopped and the command exits with that child's code: a crash takes the whole
command down for the orchestrator to restart, as it would a single-process worker.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import threading
from dataclasses import dataclass

from .logging_setup import configure_logging
from .settings import Settings, child_env, worker_command

log = logging.getLogger("emostream.worker")

STOP_TIMEOUT_S = 30.0
PR_SET_PDEATHSIG = 1  # prctl(2)


@dataclass(frozen=True)
class Child:
    """What one worker process gets: its cores (None = not pinned) and its settings overrides."""

    index: int
    cores: tuple[int, ...] | None
    overrides: dict[str, str]


def allowed_cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        from emostream.models.encoder import cpu_cores

        return list(range(cpu_cores()))


def resolve(processes: int, cores: int) -> int:
    """0 = one process per core."""
    return cores if processes == 0 else processes


def plan(settings: Settings, cores: list[int]) -> list[Child]:
    """Split ``cores`` into one contiguous, disjoint share per process; more processes than cores are
    not pinned and run one single-threaded session call each."""
    n = resolve(settings.processes, len(cores))
    pinned = n <= len(cores)
    children = []
    for i in range(n):
        share = tuple(cores[i * len(cores) // n:(i + 1) * len(cores) // n]) if pinned else None
        overrides = {"processes": "1"}
        if not pinned:
            overrides.update(inference_streams="1", inference_threads="1")
        if settings.metrics_port:
            overrides["metrics_port"] = str(settings.metrics_port + i)
        children.append(Child(i, share, overrides))
    return children


def _spawn(settings: Settings, child: Child) -> subprocess.Popen:
    libc = ctypes.CDLL(None, use_errno=True)

    def prepare() -> None:  # runs in the child before exec
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # the parent killed outright: stop, don't linger
        if child.cores is not None:
            os.sched_setaffinity(0, child.cores)  # every thread it starts inherits the mask

    # Its own process group: Ctrl-C reaches only this command, which stops each child once.
    return subprocess.Popen(worker_command(), env=child_env(settings, **child.overrides), preexec_fn=prepare,
                            process_group=0)


def exit_code(returncode: int) -> int:
    """A child killed by a signal exits the command as a shell would report it (128 + signal)."""
    return 128 - returncode if returncode < 0 else returncode


def run_processes(settings: Settings) -> int:
    """Start the children, forward SIGTERM/SIGINT to them, and return the first exit code seen."""
    children = plan(settings, allowed_cores())
    configure_logging(settings.log_level, json=settings.log_format == "json")
    if len(children) == 1:
        from .runner import run_worker

        return run_worker(settings.model_copy(update={"processes": 1}))
    stopping = threading.Event()
    procs: list[subprocess.Popen] = []
    signalled: set[int] = set()

    def stop_all(signum=None, frame=None) -> None:
        """SIGTERM each child once: a second one would cut faust's graceful shutdown short."""
        stopping.set()
        for p in procs:
            if p.pid not in signalled and p.poll() is None:
                signalled.add(p.pid)
                p.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, stop_all) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for child in children:
            procs.append(_spawn(settings, child))
            ports = child.overrides.get("metrics_port", "off")
            log.warning("worker process %d/%d: pid %d, cores %s, metrics port %s", child.index + 1, len(children),
                        procs[-1].pid, list(child.cores) if child.cores is not None else "any", ports)
        first: int | None = None
        while first is None:
            try:
                pid, status = os.wait()
            except ChildProcessError:  # pragma: no cover - every child already reaped
                break
            for p in procs:
                if p.pid == pid:
                    p.returncode = os.waitstatus_to_exitcode(status)
                    first = p.returncode
                    if not stopping.is_set():
                        log.error("worker process pid %d exited (%s); stopping the other %d",
                                  pid, exit_code(p.returncode), len(procs) - 1)
        stop_all()
        for p in procs:
            try:
                p.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.error("worker process pid %d did not stop within %.0f s; killing it", p.pid, STOP_TIMEOUT_S)
                p.kill()
                p.wait()
        codes = [exit_code(p.returncode) for p in procs]
        return exit_code(first) if first else max(codes, default=0)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
