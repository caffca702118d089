"""The systemd service notification protocol (sd_notify(3)), spoken directly.

systemd hands a ``Type=notify`` service the address of a datagram socket in ``NOTIFY_SOCKET``;
each state change is one datagram of newline-separated ``KEY=value`` assignments. Speaking it
takes a few lines, so sweeper carries no binding to libsystemd. Outside systemd (``NOTIFY_SOCKET``
unset) every method is a no-op, so callers never need to ask whether they run under systemd.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# A datagram send blocks while the receiver's queue is full. PID 1 drains it promptly, so a send
# that waits longer than this means systemd is wedged; giving up beats hanging the sweep loop.
DEFAULT_SEND_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class Notifier:
    """Sends state changes to systemd; a no-op when ``address`` is None.

    ``address`` is a socket address as Python's AF_UNIX sockets take it: a filesystem path, or
    ``"\\0name"`` for a name in the abstract namespace.
    ``watchdog_interval_seconds`` is how often the service should call :meth:`watchdog` (half
    the ``WatchdogSec=`` the unit configured), or None when systemd is not watching this process.
    """

    address: str | None = None
    watchdog_interval_seconds: float | None = None
    send_timeout_seconds: float = DEFAULT_SEND_TIMEOUT_SECONDS

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> Notifier:
        """Build the notifier systemd asked for through ``environ`` (normally ``os.environ``)."""
        return cls(
            address=_socket_address(environ.get("NOTIFY_SOCKET", "")),
            watchdog_interval_seconds=_watchdog_interval_seconds(environ),
        )

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def ready(self) -> None:
        """Startup (or a reload) is finished; systemd starts ordering dependents after this."""
        self._send("READY=1")

    def reloading(self, monotonic_usec: int) -> None:
        """A reload has begun; send :meth:`ready` when it is done.

        ``monotonic_usec`` is CLOCK_MONOTONIC in microseconds, ``time.monotonic_ns() // 1000``.
        """
        self._send(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec}")

    def status(self, text: str) -> None:
        """A one-line description of what the service is doing, shown by ``systemctl status``."""
        # A newline would end the STATUS= assignment and start a bogus one.
        self._send("STATUS=" + " ".join(text.splitlines()))

    def stopping(self) -> None:
        """Shutdown has begun."""
        self._send("STOPPING=1")

    def watchdog(self) -> None:
        """The service is alive; must come every ``watchdog_interval_seconds`` when that is set."""
        self._send("WATCHDOG=1")

    def _send(self, message: str) -> None:
        if self.address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(self.send_timeout_seconds)
                # Connected, so that a full receive queue makes the send wait (up to the timeout)
                # for room instead of failing at once or spinning.
                sock.connect(self.address)
                sock.send(message.encode())
        except OSError as error:
            logger.warning(
                "could not notify systemd (%s) via %r: %s",
                message.replace("\n", " "),
                _printable_address(self.address),
                error,
            )


def _socket_address(notify_socket: str) -> str | None:
    if not notify_socket:
        return None
    if notify_socket.startswith("/"):
        return notify_socket
    if notify_socket.startswith("@") and len(notify_socket) > 1:
        return "\0" + notify_socket[1:]
    # Newer systemd also passes vsock: addresses, which only matter inside virtual machines.
    logger.warning(
        "ignoring NOTIFY_SOCKET=%r: not a path or an abstract socket name", notify_socket
    )
    return None


def _watchdog_interval_seconds(environ: Mapping[str, str]) -> float | None:
    watchdog_usec = environ.get("WATCHDOG_USEC")
    if watchdog_usec is None:
        return None
    # WATCHDOG_PID names the process systemd watches; a child that inherited the environment
    # must not ping on the parent's behalf.
    watchdog_pid = environ.get("WATCHDOG_PID")
    if watchdog_pid is not None and _parse_int(watchdog_pid) != os.getpid():
        return None
    usec = _parse_int(watchdog_usec)
    if usec is None or usec <= 0:
        logger.warning("ignoring WATCHDOG_USEC=%r: not a positive integer", watchdog_usec)
        return None
    # Half the timeout, as sd_watchdog_enabled(3) advises, leaves room for one late ping.
    return usec / 2_000_000


def _parse_int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _printable_address(address: str) -> str:
    return "@" + address[1:] if address.startswith("\0") else address
