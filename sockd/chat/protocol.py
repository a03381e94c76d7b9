"""
The chat relay's datagram I/O: L{ChatProtocol} parses each datagram (size,
UTF-8, terminal safety) for a L{sockd.chat.state.ChatState}, sends what it
decides and counts C{sendto} errors.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable

from twisted.internet.error import MessageLengthError
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from zope.interface import implementer

from sockd.chat.state import ChatState
from sockd.chat.text import clean
from sockd.core.config import Config
from sockd.core.interfaces import (
    IAccessControlled,
    IMetricsSource,
    IReconfigurable,
    PeerAddress,
    Sample,
)
from sockd.core.limits import AccessList
from sockd.core.logs import escape

__all__ = ["ChatProtocol"]

log = Logger(namespace="sockd.chat")


@implementer(IAccessControlled, IReconfigurable, IMetricsSource)
class ChatProtocol(DatagramProtocol):
    """
    Parses chat datagrams (size, UTF-8, terminal safety) for a
    L{ChatState}, and sends what it decides.  The listening port must read
    at least C{max_datagram + 1} bytes, so an oversized datagram is seen as
    such instead of being silently truncated.
    """

    noisy = False
    #: who is served (L{set_access}); refused datagrams, counted
    access = AccessList()
    acl_dropped = 0
    #: kernel buffer sizes asked for (the kernel caps them at
    #: net.core.rmem_max and wmem_max): a burst of datagrams, spoofed or
    #: not, or a fan-out to a large room should not overflow them
    socket_buffer = 4 * 1024 * 1024

    def __init__(self, state: ChatState) -> None:
        self.state = state
        # A message may end in CRLF on top of the limit.
        self.max_datagram = state.max_message + 2
        #: what the port reads is fixed when it opens: a reload may lower
        #: the message limit, not raise it past this
        self.port_limit = state.max_message
        self.send_errors = 0
        if state.reporter is None:
            state.reporter = self
        self._sendto: Callable[[bytes, PeerAddress], object] | None = None

    def startProtocol(self) -> None:
        sock = getattr(self.transport, "socket", None)
        if sock is None:
            return
        # Port.write checks the address's syntax (three parses) on every
        # datagram; ours come from recvfrom, so send straight away
        # (docs/performance.md, "Chat fan-out straight to sendto").  Errors
        # are the same OSErrors.
        self._sendto = sock.sendto
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):  # else keep the default
                sock.setsockopt(socket.SOL_SOCKET, option, self.socket_buffer)

    def datagramReceived(self, data: bytes, addr: PeerAddress) -> None:
        if not self.access.permits(addr[0]):
            self.acl_dropped += 1  # before any reply, state or cookie
            return
        size = len(data)
        if size > self.max_datagram:
            self._oversized(addr, size)
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            self.state.refuse(self, addr, size, "message is not valid UTF-8", "invalid")
            return
        if size > self.state.max_message and (
            len(data.rstrip(b"\r\n")) > self.state.max_message
        ):
            self._oversized(addr, size)
            return
        self.state.receive(self, addr, size, clean(text))

    def _oversized(self, addr: PeerAddress, size: int) -> None:
        message = f"message longer than {self.state.max_message} bytes"
        self.state.refuse(self, addr, size, message, "oversized")

    def set_access(self, access: AccessList, trusted_proxies: AccessList) -> None:
        """Serve only the sources C{access} permits."""
        self.access = access

    def stopProtocol(self) -> None:
        self._sendto = None

    def reconfigure(self, config: Config) -> None:
        """A reload (SIGHUP): the shared state takes the new settings."""
        settings = config.chat
        max_message = min(settings.max_message, self.port_limit)
        self.max_datagram = max_message + 2
        if self.state.settings is not settings:
            self.state.reconfigure(settings, max_message)

    def metrics(self) -> list[Sample]:
        """Counters for L{sockd.core.metrics}; the shared state's only once."""
        chat = {"service": "chat"}
        samples: list[Sample] = [
            (
                "datagrams_dropped_total",
                "counter",
                {**chat, "reason": "send_error"},
                self.send_errors,
            ),
            (
                "datagrams_dropped_total",
                "counter",
                {**chat, "reason": "acl"},
                self.acl_dropped,
            ),
        ]
        state = self.state
        if state.reporter is not self:
            return samples
        samples += state.backend.metrics()
        stats = state.stats
        samples += [
            ("chat_members", "gauge", chat, len(state.members)),
            ("chat_rooms", "gauge", chat, len(state.rooms)),
            ("chat_relayed_total", "counter", chat, stats["relayed"]),
            ("chat_joined_total", "counter", chat, stats["joined"]),
            ("chat_timed_out_total", "counter", chat, stats["timed_out"]),
            (
                "chat_stranger_received_bytes_total",
                "counter",
                chat,
                stats["stranger_bytes_in"],
            ),
            (
                "chat_stranger_sent_bytes_total",
                "counter",
                chat,
                stats["stranger_bytes_out"],
            ),
        ]
        for reason, count in state.refused.items():
            samples.append(
                (
                    "chat_joins_refused_total",
                    "counter",
                    {**chat, "reason": reason},
                    count,
                )
            )
        for reason, count in state.dropped.items():
            samples.append(
                (
                    "datagrams_dropped_total",
                    "counter",
                    {**chat, "reason": reason},
                    count,
                )
            )
        return samples

    def send(self, data: bytes, addr: PeerAddress) -> None:
        try:
            if self._sendto is not None:
                self._sendto(data, addr)
            else:
                self.transport.write(data, addr)  # type: ignore[union-attr]
        except (OSError, MessageLengthError) as e:
            self._failed(addr, e)

    def send_many(self, data: bytes, addrs: list[PeerAddress]) -> None:
        """L{send} to each of C{addrs}, without a call per datagram."""
        sendto = self._sendto
        if sendto is None:
            for addr in addrs:
                self.send(data, addr)
            return
        for addr in addrs:
            try:
                sendto(data, addr)
            except OSError as e:
                self._failed(addr, e)

    def _failed(self, addr: PeerAddress, error: Exception) -> None:
        # ENOBUFS, EAGAIN, EHOSTUNREACH...: count it, serve the others.
        self.send_errors += 1
        log.debug(
            "chat: sendto {peer} failed: {error}",
            peer=escape(str(addr)),
            error=str(error),
        )
