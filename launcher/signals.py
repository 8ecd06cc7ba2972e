"""Preemption: SIGTERM, SIGINT and (configurable) SIGUSR1 stop a run at the next step boundary
with a checkpoint, never in the middle of one.

A scheduler (SLURM, Kubernetes) or a launcher (torchrun forwards SIGTERM and SIGINT to its
workers) signals some or all ranks. While the training loop runs, the handler only records the
signal; the ranks agree once per step, inside the all-reduce that averages the loss, so either
every rank saves or none does, and the job exits with launcher.errors.PREEMPTED_EXIT. Before the loop (start-up,
data preparation, which resumes where it stopped) nothing is unsaved, so the signal stops the
process at once, with the same code. A second signal during the save is recorded and ignored:
the save finishes (and is atomic either way).
"""
from __future__ import annotations

import contextlib
import signal

ALWAYS = ("SIGTERM", "SIGINT")


class Preempted(Exception):
    """A stop signal arrived; str() says which and what was saved."""


class StopRequest:
    """The stop signals this process has received, handled as the module docstring says."""

    def __init__(self, extra_signal: str = "SIGUSR1"):
        self.signal: str | None = None
        self._deferred = False
        self.names = ALWAYS + ((extra_signal,) if extra_signal else ())

    def install(self) -> None:
        self._previous = {name: signal.signal(getattr(signal, name), self._handle) for name in self.names}

    def restore(self) -> None:
        """The handlers from before install(): once a run is over, a signal ends the process as usual."""
        for name, handler in getattr(self, "_previous", {}).items():
            signal.signal(getattr(signal, name), handler)

    def ignore(self) -> None:
        """While a rank reports why the job ends: a launcher's stop signal must not cut the line off."""
        for name in self.names:
            signal.signal(getattr(signal, name), signal.SIG_IGN)

    def _handle(self, signum, frame) -> None:
        first = self.signal is None
        if first:
            self.signal = signal.Signals(signum).name
        if first and not self._deferred:
            raise Preempted(f"stopped by {self.signal} before training started: nothing to save; "
                            "run the same command again to continue")

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @contextlib.contextmanager
    def deferred(self):
        """While in this block a signal is only recorded, for the loop to act on."""
        self._deferred = True
        try:
            yield self
        finally:
            self._deferred = False
