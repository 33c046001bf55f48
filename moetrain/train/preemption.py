"""Clean stops on SIGTERM (what Slurm and Kubernetes send before a kill), SIGINT and SIGUSR1
(what `sbatch --signal=USR1@N` and Lightning's Slurm jobs send).

While the loop runs, a signal only raises a flag; the loop folds it into the step's one
all-reduce, so every rank sees the same flag after the same step, writes the same checkpoint
and exits with the same code. Before the loop starts (start-up, loading) there is nothing to
save: the process exits at once, quietly. The exit code is 128 + the signal's number (130 for
SIGINT, 143 for SIGTERM, 138 for SIGUSR1), what a shell reports for a process the signal
killed, so a scheduler's requeue rule for preempted jobs applies unchanged (launch/slurm.sbatch
requeues on 143 and 138).
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Preempted(Exception):
    """The run stopped on a signal; `message` is the one line to print, `code` the exit code."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.code = 128 + signum


class StopOnSignal:
    """Installed for the whole process (main thread only); `armed` while the loop can stop
    at a step boundary."""

    def __init__(self):
        self.signum: int | None = None
        self.armed = False
        self._previous = {}

    def install(self) -> bool:
        """Install the handlers unless they are (or this is not the main thread, where
        Python cannot); True if this call installed them."""
        if self._previous or threading.current_thread() is not threading.main_thread():
            return False
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return True

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if not self.armed:
            raise SystemExit(128 + signum)
        # A launcher forwards the signal the terminal already sent to the whole process
        # group: the first one decides, repeats change nothing.
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


STOP = StopOnSignal()  # one per process: signal handlers are process-wide
