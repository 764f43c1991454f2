"""Preemption signals: SIGTERM (Kubernetes eviction, 30 s grace by default) and SIGUSR1 (SLURM).

The handler only sets a flag: no I/O, no locks, nothing that could deadlock inside a signal
handler. The manager's next ``should_save`` sees the flag and the training loop saves and exits
cleanly. A previously installed Python handler is chained (called after the flag is set), never
clobbered; the previous handlers are put back on ``uninstall``.
"""

from __future__ import annotations

import os
import signal
import threading
import warnings
from types import FrameType
from typing import Any

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionWatcher:
    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal_number: int | None = None
        self._previous: dict[int, Any] = {}
        self._active = False

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    def request(self, signal_number: int | None = None) -> None:
        self.signal_number = signal_number
        self.event.set()

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            warnings.warn(
                "statevault: CheckpointManager created outside the main thread cannot install "
                "SIGTERM/SIGUSR1 handlers; call manager.request_preemption() from your own",
                stacklevel=3,
            )
            return
        for number in PREEMPTION_SIGNALS:
            self._previous[number] = signal.getsignal(number)
            signal.signal(number, self._handle)
        self._active = True

    def uninstall(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._active = False
        for number, previous in list(self._previous.items()):
            if signal.getsignal(number) == self._handle:
                signal.signal(number, previous)
                del self._previous[number]
        # A handler installed after ours still chains to ours: we stay a pass-through.

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self._active:
            self.request(number)
        previous = self._previous.get(number)
        if callable(previous):
            previous(number, frame)
        elif not self._active and previous == signal.SIG_DFL:
            # Closed, and the handler before ours was the default: act as the default would.
            signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)
