"""
The sd_notify(3) protocol: tell systemd (or anything listening on
C{$NOTIFY_SOCKET}) that the daemon is ready, what it is doing, that it is
stopping, and that it is still alive (the watchdog).

Each message is one datagram of C{KEY=value} lines sent to an C{AF_UNIX}
datagram socket named by C{NOTIFY_SOCKET}: a path, or C{@name} for the
abstract namespace.  No library is needed.  When the variable is unset every
call does nothing, so a daemon started by hand behaves as before.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from sockd.core.logs import escape

__all__ = ["Notifier", "notify_address", "watchdog_interval"]

log = Logger(namespace="sockd.notify")

#: longest STATUS= text sent; systemd shows one line in `systemctl status`
STATUS_LIMIT = 200


def notify_address(value: str) -> str | bytes | None:
    """
    The socket address C{NOTIFY_SOCKET} names: an absolute path, or C{@name}
    for the abstract namespace (sent with a leading NUL byte).  Anything
    else (unset, relative, C{vsock:...}) is C{None}: not supported.
    """
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode("utf-8", "surrogateescape")
    return None


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """
    Seconds between watchdog pings: half of C{WATCHDOG_USEC}, as
    sd_watchdog_enabled(3) advises; C{None} when no watchdog is asked for
    or C{WATCHDOG_PID} names another process.
    """
    raw = environ.get("WATCHDOG_USEC", "")
    if not raw.isdigit() or int(raw) == 0:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if owner and (not owner.isdigit() or int(owner) != pid):
        return None
    return int(raw) / 2 / 1_000_000


def one_line(text: str) -> str:
    """STATUS= must be a single line of printable text."""
    return escape(text, STATUS_LIMIT)


def _unix_datagram_socket() -> socket.socket:
    return socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)


class Notifier:
    """
    Sends sd_notify messages.  The environment, the process id and the
    clock are parameters, so tests give their own; failures to send are
    logged once and never stop the daemon.
    """

    def __init__(
        self,
        environ: Mapping[str, str],
        clock: IReactorTime | None = None,
        pid: int | None = None,
        make_socket: Callable[[], socket.socket] = _unix_datagram_socket,
    ) -> None:
        self.pid = os.getpid() if pid is None else pid
        raw = environ.get("NOTIFY_SOCKET", "")
        self.address = notify_address(raw)
        if raw and self.address is None:
            log.warn(
                "sockd: NOTIFY_SOCKET={value} is not supported (expected an "
                "absolute path or @name); not notifying",
                value=escape(raw),
            )
        self.interval = (
            watchdog_interval(environ, self.pid) if self.address is not None else None
        )
        self.clock = clock
        self._make_socket = make_socket
        self._socket: socket.socket | None = None
        self._failed = False
        self._watchdog: LoopingCall | None = None
        self.sent = 0

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: tuple[str, str]) -> bool:
        """Send one message of C{KEY=value} lines; True if it went out."""
        if self.address is None:
            return False
        message = "".join(f"{key}={value}\n" for key, value in fields).encode()
        try:
            if self._socket is None:
                self._socket = self._make_socket()
                self._socket.setblocking(False)
            self._socket.sendto(message, self.address)
        except OSError as e:
            if not self._failed:
                # systemd going away, or a full queue, must not stop serving.
                self._failed = True
                log.warn(
                    "sockd: cannot notify {where}: {error}",
                    where=escape(str(self.address)),
                    error=e.strerror or str(e),
                )
            return False
        self.sent += 1
        return True

    def ready(self, status: str) -> bool:
        """Every listener is bound: C{READY=1} with a summary."""
        return self.send(("READY", "1"), ("STATUS", one_line(status)))

    def status(self, status: str) -> bool:
        return self.send(("STATUS", one_line(status)))

    def stopping(self, status: str = "stopping") -> bool:
        return self.send(("STOPPING", "1"), ("STATUS", one_line(status)))

    def ping(self) -> bool:
        return self.send(("WATCHDOG", "1"))

    def start_watchdog(self) -> bool:
        """Ping every half C{WATCHDOG_USEC}, if the manager asks for it."""
        if self.interval is None or self.clock is None or self._watchdog is not None:
            return False
        self._watchdog = LoopingCall(self.ping)
        self._watchdog.clock = self.clock
        # Pings come from the reactor loop, so a wedged reactor stops them
        # and systemd restarts the daemon.
        self._watchdog.start(self.interval, now=True)
        return True

    def stop_watchdog(self) -> None:
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        self._watchdog = None

    def close(self) -> None:
        self.stop_watchdog()
        if self._socket is not None:
            self._socket.close()
            self._socket = None
