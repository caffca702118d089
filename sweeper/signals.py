"""Signal handling: handlers only set flags; loops check them between items."""

from __future__ import annotations

import signal
import threading
from types import FrameType


class StopFlag:
    """Set by a signal handler, read by the work loop between items (and between copy chunks)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name: str | None = None

    def set(self, name: str = "request") -> None:
        self.signal_name = name
        self._event.set()

    def __call__(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)


def install_stop_handlers(
    flag: StopFlag, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)
) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        del frame
        flag.set(signal.Signals(signum).name)

    for signum in signals:
        signal.signal(signum, handler)
    # Probing for writers takes a read lease for an instant; a lease break must not kill us.
    signal.signal(signal.SIGIO, signal.SIG_IGN)
