"""Stopping a search by a signal: SIGTERM (kill, scancel, Slurm's preemption) and SIGINT (Ctrl-C).

Inside `on_signals()` either signal raises Interrupted in the main thread, wherever the search waits
(the harness, an agent, a model's reply). The search records the attempt in flight as `interrupted`,
the operators and the harness close (an MCP endpoint removes its files), and the entry point ends
with one line and exit status 128 + the signal's number. Further signals are ignored until then, so
that clean-up (bounded: each part has its own timeout) is not cut short half-way.

With several workers the signal reaches the main thread while the others are mid-attempt: they get
GRACE_S to end (an attempt that ends is judged as usual), the ones still busy then are recorded as
interrupted and disowned, and only then does the harness close. The interpreter must not exit with
a thread inside native code (the compiler, Parquet): that aborts the process.

On Slurm, submitit's timeout path (its USR2 handler checkpoints, requeues and exits) reaches the
search as SystemExit; that attempt is recorded as interrupted too, and the requeued job resumes the
lineage. A resumed search may submit an interrupted attempt's source again: it was never judged.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

from avo.types import EvalResult, Status


class Interrupted(BaseException):
    """A stop signal arrived (a BaseException: `except Exception` in the code it interrupts lets it pass)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


# how long a stop waits for work it cannot cut short (a compile, the other workers' attempts in flight):
# under Slurm's default KillWait of 30 s, so the lineage is written before the SIGKILL
GRACE_S = 25.0

# what ends a search from outside: our signals, a KeyboardInterrupt before they are handled, submitit's exit
STOPS = (Interrupted, KeyboardInterrupt, SystemExit)


def reason(e: BaseException) -> str:
    if isinstance(e, Interrupted):
        return str(e)
    if isinstance(e, KeyboardInterrupt):
        return "interrupted by SIGINT"
    return f"the job exited (status {getattr(e, 'code', None)}; on Slurm: requeued or timed out)"


def result(e: BaseException) -> EvalResult:
    """The lineage's record of an attempt a stop cut off: no verdict on the candidate."""
    return EvalResult(Status.INTERRUPTED, error=f"{reason(e)} before the attempt finished; the search stopped here")


@contextmanager
def on_signals():
    """SIGTERM and SIGINT raise Interrupted (once) in the main thread while this is open."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield
        return
    fired: list[int] = []

    def handler(signum, frame):
        if not fired:
            fired.append(signum)
            raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def exit_status(e: Interrupted) -> int:
    return 128 + e.signum
