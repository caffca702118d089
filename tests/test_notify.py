"""The sd_notify protocol against real AF_UNIX datagram sockets standing in for systemd."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sweeper.notify import Notifier


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket in tmp_path and the NOTIFY_SOCKET value that names it."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        yield sock, str(path)


@pytest.fixture
def abstract_receiver() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket in the abstract namespace and its ``@name`` NOTIFY_SOCKET value."""
    name = f"sweeper-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        yield sock, "@" + name


@pytest.mark.parametrize(
    ("send", "datagram"),
    [
        (Notifier.ready, b"READY=1"),
        (
            lambda notifier: notifier.status("sweeping /data: 3 of 7"),
            b"STATUS=sweeping /data: 3 of 7",
        ),
        (lambda notifier: notifier.status("two\nlines"), b"STATUS=two lines"),
        (lambda notifier: notifier.reloading(123456789), b"RELOADING=1\nMONOTONIC_USEC=123456789"),
        (Notifier.stopping, b"STOPPING=1"),
        (Notifier.watchdog, b"WATCHDOG=1"),
    ],
)
def test_sends_exact_datagram_to_path_socket(
    receiver: tuple[socket.socket, str], send: Callable[[Notifier], None], datagram: bytes
) -> None:
    sock, notify_socket = receiver
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": notify_socket})
    assert notifier.enabled

    send(notifier)

    assert sock.recv(4096) == datagram


def test_sends_to_abstract_socket(abstract_receiver: tuple[socket.socket, str]) -> None:
    sock, notify_socket = abstract_receiver
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": notify_socket})

    notifier.ready()
    notifier.status("idle")

    assert sock.recv(4096) == b"READY=1"
    assert sock.recv(4096) == b"STATUS=idle"


def test_without_notify_socket_is_a_no_op() -> None:
    notifier = Notifier.from_environment({})

    assert notifier == Notifier()
    assert not notifier.enabled
    assert notifier.watchdog_interval_seconds is None
    notifier.ready()
    notifier.reloading(1)
    notifier.status("idle")
    notifier.watchdog()
    notifier.stopping()


@pytest.mark.parametrize("notify_socket", ["relative/notify.sock", "@", "vsock:2:1234"])
def test_unsupported_address_is_a_no_op(
    notify_socket: str, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": notify_socket})

    assert not notifier.enabled
    assert "ignoring NOTIFY_SOCKET" in caplog.text


def test_vanished_socket_logs_instead_of_raising(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
    path.unlink()
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": str(path)})

    notifier.ready()
    notifier.watchdog()

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "READY=1" in warnings[0].getMessage()
    assert str(path) in warnings[0].getMessage()


def test_full_receive_queue_times_out_instead_of_hanging(
    receiver: tuple[socket.socket, str], caplog: pytest.LogCaptureFixture
) -> None:
    sock, notify_socket = receiver
    notifier = Notifier(address=notify_socket, send_timeout_seconds=0.05)
    try:
        queue_length = int(Path("/proc/sys/net/unix/max_dgram_qlen").read_text())
    except (OSError, ValueError):
        queue_length = 1000

    # Nobody reads, so the queue fills and a later send has to give up.
    for _ in range(queue_length + 3):
        notifier.status("busy")

    assert "timed out" in caplog.text
    assert sock.recv(4096) == b"STATUS=busy"


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "not-a-pid"}, None),
        ({"WATCHDOG_USEC": "1500"}, 0.00075),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_PID": str(os.getpid())}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_the_timeout_for_the_watched_pid(
    environ: dict[str, str], interval: float | None
) -> None:
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": "/run/systemd/notify", **environ})

    assert notifier.watchdog_interval_seconds == interval
