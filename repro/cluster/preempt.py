"""Preemption and time limits: a signal becomes a flag that training loops check between steps.

SLURM warns a job before its time limit (``--signal=USR1@120``, or submitit's USR2) and sends SIGTERM when it
preempts or requeues it. Saving the state inside a signal handler would catch the loop in the middle of an
optimizer step, so the handler only sets a flag. The loop checks it at its next step boundary (the only place
its state is consistent), saves that state, and raises :class:`Preempted`. Whoever runs the stage (the launcher)
catches it, requeues the job, and exits without a result, so the requeued job resumes from the saved state.

    with preempt.handle():                 # installed by the launcher around a stage
        for step in ...:
            ...one optimizer step...
            preempt.check(lambda: save_state(...))   # saves and raises Preempted if a signal came
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)

_received: list[int] = []


class Preempted(Exception):
    """The stage saved its state after a preemption signal and stopped; run it again to resume."""

    def __init__(self, signum: int, where: str = ""):
        self.signum = signum
        name = signal.Signals(signum).name if signum > 0 else "a request"
        super().__init__(f"stopped on {name}{' ' + where if where else ''}; state saved: run again to resume")


def requested() -> int:
    """The signal number received since the handlers were installed (0 if none)."""
    return _received[-1] if _received else 0


def request(signum: int = signal.SIGUSR1) -> None:
    """Ask the running loop to stop as if ``signum`` had arrived (tests, and code that sees a deadline)."""
    _received.append(signum)


def reset() -> None:
    _received.clear()


def _on_signal(signum, frame) -> None:
    if not _received:
        log.warning("received %s: saving at the next step boundary, then stopping", signal.Signals(signum).name)
    _received.append(signum)


@contextlib.contextmanager
def handle(signals: tuple[int, ...] = SIGNALS) -> Iterator[None]:
    """Turn ``signals`` into the stop flag for the duration of the block; restore the previous handlers after."""
    reset()
    previous = {s: signal.signal(s, _on_signal) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def check(save: Callable[[], None], where: str = "") -> None:
    """At a step boundary: if a stop was requested, call ``save()`` and raise :class:`Preempted`.

    With several processes, every rank must call it at the same step boundaries: the ranks agree (a signal
    seen by any rank stops them all at the same step), and all of them wait until ``save()`` (rank 0's, the
    only one that writes) is done, so no rank leaves early and has the launcher kill rank 0 mid-write.
    """
    from repro.cluster import distributed

    signum = distributed.all_max(requested())
    if signum:
        save()
        distributed.barrier()
        raise Preempted(signum, where)
