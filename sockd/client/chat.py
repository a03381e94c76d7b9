"""
C{sockd chat HOST[:PORT] [--nick NAME] [--room ROOM]}: a terminal client
for the sockd UDP chat.

It shows incoming lines (with timestamps) while you type, completes the
address validation by itself, keeps its place with C{/ping}, and joins again
under the same nickname and room when the server restarts.  With standard
input from a pipe it sends each line (paced under the server's rate limit)
and exits a moment after the end of input, or on C{/quit}.
"""

from __future__ import annotations

import argparse
import re
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IReactorTime,
)
from twisted.internet.protocol import DatagramProtocol
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from sockd.chat.state import clean
from sockd.client.echo import split_address

__all__ = ["ChatClient", "add_arguments", "run"]

DEFAULT_PORT = 8001

# Only the server's welcome lines (never a topic or other notice a member
# could word) carry a cookie to return.
_TOKEN = re.compile(
    r"^\*\*\* (?:welcome to sockd chat\. To join #\S+, send: "
    r"|welcome to sockd chat; to join, send: |to join, send: )?"
    r"/v ([A-Za-z2-7]{8})\b"
)
_YOU_ARE = re.compile(r"^\*\*\* you are (\S+) in ")
_WELCOMED = re.compile(r"^\*\*\* welcome, you are (\S+)\.")
_NICK = re.compile(r"^\*\*\* you are now (\S+)$")
_JOINED = re.compile(r"^\*\*\* you joined #(\S+) ")
_DROPPED = re.compile(r"^\*\*\* you were dropped ")

#: the first datagram is padded so the server's reply (at most three times
#: what it received) can be the full welcome
HELLO = "/hello sockd-chat-client".ljust(48) + "\n"


class ChatClient:
    """
    The client's behaviour, without I/O: lines from the server come in
    through L{received}, lines typed through L{typed} and L{input_ended};
    datagrams go out through C{send} and text to the screen through C{show}.
    """

    def __init__(
        self,
        send: Callable[[bytes], None],
        show: Callable[[str], None],
        clock: IReactorTime,
        done: Callable[[int], None],
        *,
        nick: str | None = None,
        room: str | None = None,
        keepalive: float = 30.0,
        rate: float = 4.0,
        burst: int = 8,
        linger: float = 1.0,
        timeout: float = 10.0,
        timestamps: bool = True,
        notice: Callable[[str], None] | None = None,
    ) -> None:
        self.send_datagram = send
        self.show = show
        self.clock = clock
        self.done = done
        self.nick = nick
        self.room = room.lstrip("#") if room else None
        self.keepalive = keepalive
        self.rate = rate
        self.burst = float(burst)
        self.linger = linger
        self.timeout = timeout
        self.timestamps = timestamps
        self.notice = notice or (lambda text: None)
        self.joined = False
        self.ever_joined = False
        self.quitting = False
        self.finished = False
        self.eof = False
        self.heard = False
        self.queue: deque[str] = deque()
        self.tokens = float(burst)
        self.stamp = clock.seconds()
        self.last_sent = clock.seconds()
        self.auto_pings = 0
        self._hello: IDelayedCall | None = None
        self._pump: IDelayedCall | None = None
        self._ping: IDelayedCall | None = None
        self._end: IDelayedCall | None = None
        self._waiting: IDelayedCall | None = None

    # --- out -------------------------------------------------------------

    def send(self, line: str) -> None:
        self.last_sent = self.clock.seconds()
        self.send_datagram((line + "\n").encode("utf-8"))

    def start(self) -> None:
        self._say_hello()
        self._ping = self.clock.callLater(self.keepalive, self._keepalive)
        self._waiting = self.clock.callLater(self.timeout, self._no_server)

    def _say_hello(self) -> None:
        # Ask for the welcome (and its cookie) until it comes.
        if self.finished or self.joined:
            return
        self.send_datagram(HELLO.encode())
        self.last_sent = self.clock.seconds()
        self._hello = self.clock.callLater(1.0, self._say_hello)

    def _keepalive(self) -> None:
        if self.finished:
            return
        if self.clock.seconds() - self.last_sent >= self.keepalive * 0.9:
            if self.joined:
                self.auto_pings += 1
                self.send("/ping")
            else:
                self._say_hello()
        self._ping = self.clock.callLater(self.keepalive, self._keepalive)

    def _no_server(self) -> None:
        if not self.ever_joined:
            self.notice(
                "could not join the chat" if self.heard else "no answer from the server"
            )
            self.finish(1)

    # --- in --------------------------------------------------------------

    def received(self, data: bytes) -> None:
        """One datagram from the server."""
        self.heard = True
        text = clean(data.decode("utf-8", "replace")).rstrip("\n")
        for line in text.split("\n"):
            self._line(line)

    def _line(self, line: str) -> None:
        if line == "*** pong" and self.auto_pings > 0:
            self.auto_pings -= 1
            return
        self.show(self._stamp() + line)
        token = _TOKEN.match(line)
        if token is not None:
            # A welcome: first contact, or the server forgot us (restart).
            self.joined = False
            self.send("/v " + token.group(1))
            return
        match = _WELCOMED.match(line)
        if match is not None:
            self._welcomed()
            return
        match = _YOU_ARE.match(line)
        if match is not None and not self.joined:
            self.joined = self.ever_joined = True
            self._schedule()
            return
        match = _NICK.match(line)
        if match is not None:
            self.nick = match.group(1)
            return
        match = _JOINED.match(line)
        if match is not None:
            self.room = match.group(1)
            return
        if _DROPPED.match(line):
            self.joined = False
            self._say_hello()
        elif line == "*** bye" and self.quitting:
            self.finish(0)

    def _welcomed(self) -> None:
        self.joined = self.ever_joined = True
        if self._hello is not None and self._hello.active():
            self._hello.cancel()
        if self.nick:
            self.send("/nick " + self.nick)
        if self.room:
            self.send("/join " + self.room)
        self._schedule()

    def _stamp(self) -> str:
        if not self.timestamps:
            return ""
        return time.strftime("%H:%M:%S ", time.localtime(self.clock.seconds()))

    # --- typed -----------------------------------------------------------

    def typed(self, line: str) -> None:
        """One line of input."""
        line = line.rstrip("\r\n")
        if not line or self.quitting:
            return
        self.queue.append(line)
        self._schedule()

    def input_ended(self) -> None:
        self.eof = True
        self._schedule()

    def _schedule(self) -> None:
        if self._pump is None or not self._pump.active():
            self._pump = self.clock.callLater(0, self._drain)

    def _drain(self) -> None:
        # Send what is queued, paced under the server's rate limit.
        while self.joined and self.queue and not self.quitting:
            now = self.clock.seconds()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens < 1.0:
                wait = (1.0 - self.tokens) / self.rate
                self._pump = self.clock.callLater(wait, self._drain)
                return
            self.tokens -= 1.0
            line = self.queue.popleft()
            if line.split(" ", 1)[0].lower() == "/quit":
                self.quit()
                return
            self.send(line)
        if self.eof and not self.queue and self.joined and self._end is None:
            self._end = self.clock.callLater(self.linger, self.quit)

    def quit(self) -> None:
        """Leave: say /quit, and stop at the farewell or a moment after."""
        if self.quitting:
            return
        self.quitting = True
        if self.joined:
            self.send("/quit")
            self._end = self.clock.callLater(self.linger, self.finish, 0)
        else:
            self.finish(0 if self.heard else 1)

    def finish(self, status: int) -> None:
        if self.finished:
            return
        self.finished = True
        for call in (self._hello, self._pump, self._ping, self._end, self._waiting):
            if call is not None and call.active():
                call.cancel()
        self.done(status)


class _Datagrams(DatagramProtocol):
    noisy = False

    # Not a connected socket: Twisted closes a connected UDP port on some
    # ICMP errors, and the server may not be up yet.
    def __init__(self, client: ChatClient, server: tuple[str, int]) -> None:
        self.client = client
        self.server = server
        self.failed = False

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        if (addr[0], addr[1]) == self.server:
            self.client.received(data)

    def write(self, data: bytes) -> None:
        try:
            self.transport.write(data, self.server)  # type: ignore[union-attr]
        except OSError as e:
            if not self.failed:
                self.failed = True
                self.client.notice(f"send failed: {e.strerror or e}")


@implementer(IHalfCloseableProtocol)
class _Keyboard(LineReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 1 << 20

    def __init__(self, client: ChatClient) -> None:
        self.client = client

    def lineReceived(self, line: bytes) -> None:
        self.client.typed(line.decode("utf-8", "replace"))

    def readConnectionLost(self) -> None:
        # End of input (the screen stays open); an unterminated last line
        # counts too.
        if self._buffer:  # type: ignore[has-type]
            self.lineReceived(self._buffer)  # type: ignore[has-type]
            self._buffer = b""
        self.client.input_ended()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self.client.eof:
            self.client.input_ended()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", metavar="HOST[:PORT]", help="default port 8001")
    parser.add_argument("--nick", help="nickname to take once joined")
    parser.add_argument("--room", help="room to join instead of the default")
    parser.add_argument(
        "--keepalive",
        type=float,
        default=30.0,
        help="seconds between /ping when silent (default 30)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=4.0,
        help="lines per second sent at most (default 4)",
    )
    parser.add_argument(
        "--linger",
        type=float,
        default=1.0,
        help="seconds to keep listening after the end of input (default 1)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="give up if the server does not answer within this (default 10)",
    )
    parser.add_argument(
        "--no-timestamps", action="store_true", help="do not prefix lines with time"
    )


def run(args: argparse.Namespace) -> int:
    from twisted.internet import reactor, stdio

    try:
        host, port = split_address(args.address, DEFAULT_PORT)
        found = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        # IPv4 first: "localhost" often lists ::1 first, daemons listen on
        # 127.0.0.1 by default.
        found.sort(key=lambda info: info[0] != socket.AF_INET)
        family, _, _, _, sockaddr = found[0]
    except (ValueError, OSError) as e:
        print(f"sockd chat: {e}", file=sys.stderr)
        return 2
    if args.rate <= 0 or args.keepalive <= 0:
        print("sockd chat: --rate and --keepalive must be positive", file=sys.stderr)
        return 2
    status: list[int] = []
    screen: list[Any] = []

    def show(line: str) -> None:
        screen[0].write((line + "\n").encode("utf-8"))

    def notice(text: str) -> None:
        print(f"sockd chat: {text}", file=sys.stderr, flush=True)

    def done(code: int) -> None:
        status.append(code)
        reactor.callLater(0.05, reactor.stop)  # type: ignore[attr-defined]

    datagrams: _Datagrams | None = None

    def send(data: bytes) -> None:
        assert datagrams is not None
        datagrams.write(data)

    client = ChatClient(
        send,
        show,
        reactor,  # type: ignore[arg-type]
        done,
        nick=args.nick,
        room=args.room,
        keepalive=args.keepalive,
        rate=args.rate,
        burst=max(1, int(args.rate * 2)),
        linger=args.linger,
        timeout=args.timeout,
        timestamps=not args.no_timestamps,
        notice=notice,
    )
    datagrams = _Datagrams(client, (str(sockaddr[0]), int(sockaddr[1])))
    reactor.listenUDP(  # type: ignore[attr-defined]
        0, datagrams, interface="::" if family == socket.AF_INET6 else ""
    )
    screen.append(stdio.StandardIO(_Keyboard(client)))

    def farewell() -> None:
        # Ctrl-C or SIGTERM: leave politely.
        if not client.finished and client.joined and not client.quitting:
            client.send("/quit")

    reactor.addSystemEventTrigger("before", "shutdown", farewell)  # type: ignore[attr-defined]
    client.start()
    reactor.run()  # type: ignore[attr-defined]
    return status[0] if status else 1
