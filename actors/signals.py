"""SIGTERM and SIGINT for `volumed run`: caught from the entry point's first line until the
process ends, so that a signal at any moment ends in exit 0 (CONTRACT §1).

The handler is a plain `signal.signal` one, never `loop.add_signal_handler`: asyncio's loop
puts the default action back when it closes, so a second signal during the teardown would
kill a process that had stopped cleanly (exit -15). Python does the same while it
finalizes, hence `ignore` once the exit status is decided.
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for the annotations only: catch() is meant to run before anything slow
    import asyncio
    from collections.abc import Callable
    from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Whether SIGTERM or SIGINT came, and whom to tell."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        """The first stop signal, or None while none has come."""
        self._notify: Callable[[], object] | None = None

    @classmethod
    def catch(cls) -> StopSignals:
        """Catch both signals from now on. Call it before anything slow: until then the
        default action kills the process."""
        stop = cls()
        for sig in STOP_SIGNALS:
            signal.signal(sig, stop._handle)
        # A parent may have left them blocked (the mask survives exec): we would never stop.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        return stop

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        # Runs in the main thread between two bytecodes, possibly inside the event loop's
        # own code: only call_soon_threadsafe is safe there (asyncio.Runner does the same).
        if self.received is None:
            self.received = signal.Signals(signum)
        if self._notify is not None:
            self._notify()

    def notify(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], object]) -> None:
        """Call ``callback`` in ``loop`` on the next signal, and at once if one already came.

        The loop wakes for a signal whichever thread gets it: uvloop writes it to the wakeup
        fd it sets while running (the stdlib loop relies on Linux giving it to the main
        thread)."""
        self._notify = lambda: loop.call_soon_threadsafe(callback)
        # After setting _notify: a signal in between calls back twice, never zero times.
        if self.received is not None:
            loop.call_soon_threadsafe(callback)

    def ignore(self) -> None:
        """Once the exit status is decided: from now on a signal changes nothing. Python
        puts the default action back while it finalizes; SIG_IGN it leaves alone."""
        self._notify = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
