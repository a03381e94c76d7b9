"""
C{sockd chat HOST[:PORT] [--nick NAME] [--room ROOM]}: a terminal client
for the sockd UDP chat.

It shows incoming lines (with timestamps) while you type, completes the
address validation by itself (the join prompts are not shown), keeps its
place with C{/ping}, and joins again under the same nickname and room when
the server restarts.  What the server's notices mean it learns from their
machine lines (L{sockd.chat.text.parse_event}), which it does not show.
With standard input from a pipe it sends each line (paced under the
server's rate limit) and exits a moment after the end of input, or on
C{/quit}.
"""

from __future__ import annotations

import argparse
import math
import random
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
    IReactorUDP,
)
from twisted.internet.protocol import DatagramProtocol
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from sockd.chat.text import BYE, PONG, Event, clean, parse_event
from sockd.client.echo import split_address
from sockd.client.exits import EXIT_USAGE
from sockd.core.interfaces import PeerAddress
from sockd.core.limits import TokenBucket

__all__ = ["ChatClient", "add_arguments", "run"]

DEFAULT_PORT = 8001

#: the first datagram is padded so the server's reply (at most three times
#: what it received) can be the full welcome
HELLO = "/hello sockd-chat-client".ljust(48) + "\n"


class ChatClient:
    """
    The client's behaviour, without I/O: lines from the server come in
    through L{received}, lines typed through L{typed} and L{input_ended};
    datagrams go out through C{send} and text to the screen through C{show}.

    Whatever the server sends, every datagram goes out through one
    L{TokenBucket} (C{rate} a second, bursts of C{burst}); the client's own
    messages (hello, C{/v}, C{/nick}, C{/join}, C{/ping}, C{/quit}) go
    before typed lines and are never queued twice.  Repeated join prompts
    are answered with growing, jittered waits (L{backoff}), and a hello
    that gets no answer is repeated likewise.

    A nickname it asks for that is taken is asked again after the wait the
    server names (its holder is silent; at most L{retry_max} seconds), or
    else with a C{_} added, as IRC clients do (C{ann_}, C{ann__}...), at
    most L{nick_fallbacks} times.
    """

    #: answers to repeated join prompts, and unanswered hellos, wait about
    #: 1, 2, 4 ... seconds (each between half and all of it), at most this
    backoff_max = 60.0
    #: a membership that lasted this long is over for good: the next join
    #: starts again without waiting (one that keeps breaking backs off)
    stable = 10.0
    #: the order the client's own messages go in
    _CONTROL = ("join", "nick", "room", "ping", "quit")
    #: names tried after the one asked for is taken (C{ann_}, C{ann__}, ...)
    nick_fallbacks = 3
    #: the longest wait the server may name for a taken nickname that the
    #: client waits for, rather than trying another
    retry_max = 10.0

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
        random: Callable[[], float] = random.random,
    ) -> None:
        self.send_datagram = send
        self.show = show
        self.clock = clock
        self.done = done
        self.nick = nick
        #: the nickname the client itself asked for, until answered
        self.asked: str | None = None
        #: retries and fallbacks spent on it
        self.nick_tries = 0
        self._nick_retry: IDelayedCall | None = None
        self.room = room.lstrip("#") if room else None
        self.keepalive = keepalive
        self.rate = rate
        self.linger = linger
        self.timeout = timeout
        self.timestamps = timestamps
        self.notice = notice or (lambda text: None)
        self.random = random
        self.joined = False
        self.ever_joined = False
        self.quitting = False
        self.finished = False
        self.eof = False
        self.heard = False
        #: typed lines, sent once joined
        self.queue: deque[str] = deque()
        #: the client's own messages waiting for the pace, by kind
        self.control: dict[str, str] = {}
        self.pace = TokenBucket(rate, float(burst), clock)
        self.last_sent = clock.seconds()
        self.auto_pings = 0
        #: the newest cookie not yet returned
        self.token: str | None = None
        #: hellos and /v sent since the server last answered or let us in
        self.hellos = 0
        self.validations = 0
        #: when the next /v may go
        self.next_validation = -math.inf
        self.joined_at: float | None = None
        self._hello: IDelayedCall | None = None
        self._validate: IDelayedCall | None = None
        self._pump: IDelayedCall | None = None
        self._ping: IDelayedCall | None = None
        self._end: IDelayedCall | None = None
        self._waiting: IDelayedCall | None = None

    def backoff(self, attempts: int) -> float:
        """
        Seconds to wait after the C{attempts}-th try: 1, 2, 4 ... up to
        L{backoff_max}, each scaled by a random factor from 0.5 to 1.
        """
        if attempts <= 0:
            return 0.0
        step = min(self.backoff_max, 2.0 ** (attempts - 1))
        return step * (0.5 + 0.5 * self.random())

    # --- out -------------------------------------------------------------

    def _transmit(self, line: str) -> None:
        self.last_sent = self.clock.seconds()
        self.send_datagram((line + "\n").encode("utf-8"))

    def _control(self, kind: str, line: str) -> None:
        """Send one of the client's own messages, replacing one not yet sent."""
        self.control[kind] = line
        self._schedule()

    def start(self) -> None:
        self._say_hello()
        self._ping = self.clock.callLater(self.keepalive, self._keepalive)
        self._waiting = self.clock.callLater(self.timeout, self._no_server)

    def _say_hello(self) -> None:
        # Ask for the welcome (and its cookie) until an answer comes.
        if self.finished or self.joined:
            return
        self._control("join", HELLO[:-1])
        self.hellos += 1
        self._hello = self.clock.callLater(self.backoff(self.hellos), self._say_hello)

    def _validate_now(self) -> None:
        # Return the newest cookie; if nothing comes back, hello again.
        if self.finished or self.joined or self.token is None:
            return
        self._control("join", "/v " + self.token)
        self.token = None
        self.validations += 1
        now = self.clock.seconds()
        self.next_validation = now + self.backoff(self.validations)
        self._cancel(self._hello)
        self._hello = self.clock.callLater(
            max(1.0, self.next_validation - now), self._say_hello
        )

    def _keepalive(self) -> None:
        if self.finished:
            return
        if self.clock.seconds() - self.last_sent >= self.keepalive * 0.9:
            if self.joined:
                self._control("ping", "/ping")
            elif not (self._active(self._hello) or self._active(self._validate)):
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
        lines = clean(data.decode("utf-8", "replace")).rstrip("\n").split("\n")
        events = [parse_event(line) for line in lines]
        # A join prompt (its machine line gives the cookie) is answered
        # here: none of its lines is shown.
        prompt = any(event is not None and event.name == "v" for event in events)
        for line, event in zip(lines, events, strict=True):
            if event is not None:
                self._event(event)
            elif not prompt:
                self._line(line)

    def _line(self, line: str) -> None:
        if line == PONG and self.auto_pings > 0:
            self.auto_pings -= 1
            return
        self.show(self._stamp() + line)
        if line == BYE and self.quitting:
            self.finish(0)

    def _event(self, event: Event) -> None:
        """What a machine line says (docs/protocol-chat.md, "Machine lines")."""
        name, value = event.name, event.value
        if name == "v" and value:
            # First contact, or the server forgot us (a restart).
            self._prompted(value)
        elif name == "welcome":
            self._welcomed()
        elif name == "member":
            if not self.joined:
                self._member()
                self._schedule()
        elif name == "nick" and value:
            # A guest name is the server's (the name was taken while we
            # were silent): not one to ask for again after a restart.
            self.nick = None if value.lower().startswith("guest") else value
            self.asked = None
        elif name == "taken" and value:
            self._taken(value, event.fields.get("retry", ""))
        elif name == "room" and value:
            self.room = value
        elif name == "dropped" and self.joined:
            self._lost()
            if not self._active(self._hello):
                self._say_hello()

    def _ask_nick(self, nick: str) -> None:
        self.asked = nick
        self._control("nick", "/nick " + nick)

    def _taken(self, nick: str, retry: str) -> None:
        """A nickname was refused as taken: wait, or try the next one."""
        asked = self.asked
        if asked is None or nick.lower() != asked.lower():
            return  # one the user typed: the error line says it all
        if self.nick_tries >= self.nick_fallbacks:
            self.asked = None
            self.notice(f"{asked} is taken too; /nick NAME to pick a name")
            return
        self.nick_tries += 1
        if retry.isdigit() and int(retry) <= self.retry_max:
            self.notice(f"{asked} is taken; its holder is silent, asking again")
            self._cancel(self._nick_retry)
            self._nick_retry = self.clock.callLater(
                int(retry) + 0.5, self._ask_nick, asked
            )
            return
        self.notice(f"{asked} is taken; trying {asked}_")
        self._ask_nick(asked + "_")

    def _lost(self) -> None:
        """The server no longer counts us as a member."""
        joined_at = self.joined_at
        if joined_at is not None and self.clock.seconds() - joined_at >= self.stable:
            self.hellos = self.validations = 0  # it lasted: start afresh
            self.next_validation = -math.inf
        self.joined = False
        self.joined_at = None

    def _prompted(self, token: str) -> None:
        if self.joined:
            self._lost()
        self.token = token
        self.hellos = 0
        self._cancel(self._hello)
        if self._active(self._validate):
            return  # it will return this newer cookie
        wait = max(0.0, self.next_validation - self.clock.seconds())
        self._validate = self.clock.callLater(wait, self._validate_now)

    def _member(self) -> None:
        self.joined = self.ever_joined = True
        self.joined_at = self.clock.seconds()
        self.token = None
        self._cancel(self._hello)
        self._cancel(self._validate)
        self.control.pop("join", None)

    def _welcomed(self) -> None:
        if self.joined:
            return  # not an answer to anything we sent
        self._member()
        self.nick_tries = 0
        if self.nick:
            self.asked = self.nick
            self.control["nick"] = "/nick " + self.nick
        if self.room:
            self.control["room"] = "/join " + self.room
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
        if not self._active(self._pump):
            self._pump = self.clock.callLater(0, self._drain)

    def _next(self) -> tuple[str, str] | None:
        """The next message to send (its kind, or "" for a typed line)."""
        for kind in self._CONTROL:
            if kind in self.control and (kind == "join" or self.joined):
                return kind, self.control[kind]
        if self.joined and self.queue and not self.quitting:
            return "", self.queue[0]
        return None

    def _drain(self) -> None:
        # Everything goes out at the pace of one token bucket.
        while not self.finished:
            message = self._next()
            if message is None:
                break
            kind, line = message
            if kind == "" and line.split(" ", 1)[0].lower() == "/quit":
                self.queue.popleft()
                self.quit()
                continue
            if not self.pace.take():
                self._pump = self.clock.callLater(1.0 / self.rate, self._drain)
                return
            if kind:
                del self.control[kind]
                if kind == "ping":
                    self.auto_pings += 1
            else:
                self.queue.popleft()
            self._transmit(line)
        if self.eof and not self.queue and self.joined and self._end is None:
            self._end = self.clock.callLater(self.linger, self.quit)

    def quit(self) -> None:
        """Leave: say /quit, and stop at the farewell or a moment after."""
        if self.quitting:
            return
        self.quitting = True
        if self.joined:
            self._control("quit", "/quit")
            self._cancel(self._end)
            self._end = self.clock.callLater(self.linger, self.finish, 0)
        else:
            self.finish(0 if self.heard else 1)

    def farewell(self) -> None:
        """Stopping (Ctrl-C, SIGTERM): say /quit now, if the pace allows."""
        if not self.finished and self.joined and not self.quitting:
            self.quitting = True
            if self.pace.take():
                self._transmit("/quit")

    def finish(self, status: int) -> None:
        if self.finished:
            return
        self.finished = True
        for call in (
            self._hello,
            self._validate,
            self._pump,
            self._ping,
            self._end,
            self._waiting,
            self._nick_retry,
        ):
            self._cancel(call)
        self.done(status)

    @staticmethod
    def _active(call: IDelayedCall | None) -> bool:
        return call is not None and call.active()

    @staticmethod
    def _cancel(call: IDelayedCall | None) -> None:
        if call is not None and call.active():
            call.cancel()


class _Datagrams(DatagramProtocol):
    noisy = False

    # Not a connected socket: Twisted closes a connected UDP port on some
    # ICMP errors, and the server may not be up yet.
    def __init__(self, client: ChatClient, server: tuple[str, int]) -> None:
        self.client = client
        self.server = server
        self.failed = False

    def datagramReceived(self, data: bytes, addr: PeerAddress) -> None:
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
        rest = self.clearLineBuffer()
        if rest:
            self.lineReceived(rest)
        self.client.input_ended()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self.client.eof:
            self.client.input_ended()


#: the pace, for --help and docs/protocol-chat.md
PACE = (
    "Pace: whatever the server sends, the client sends at most RATE datagrams "
    "a second (--rate, default 4) in bursts of at most BURST, twice RATE (at "
    "least 1): typed lines, pings and joins together, so at most BURST + RATE "
    "x T datagrams in any T seconds.  A join prompt that comes again and again is "
    "answered after about 1, 2, 4 ... seconds (each between half and all of "
    "that, at most 60), and so is a hello that gets no answer; a join after a "
    "membership of 10 seconds or more starts again without waiting."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = PACE
    parser.add_argument("address", metavar="HOST[:PORT]", help="default port 8001")
    parser.add_argument(
        "--nick",
        help="nickname to take once joined; if it is taken, NICK_, NICK__ and "
        "NICK___ are tried in turn (a name whose holder has been silent a few "
        "seconds is asked for again first), then the guest name stays",
    )
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
        help="datagrams per second sent at most, everything counted (default 4)",
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


def burst_for(rate: float) -> int:
    """The burst that goes with C{rate} (see L{PACE})."""
    return max(1, int(rate * 2))


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
        return EXIT_USAGE
    if args.rate <= 0 or args.keepalive <= 0:
        print("sockd chat: --rate and --keepalive must be positive", file=sys.stderr)
        return EXIT_USAGE
    status: list[int] = []
    screen: list[Any] = []

    def show(line: str) -> None:
        screen[0].write((line + "\n").encode("utf-8"))

    def notice(text: str) -> None:
        print(f"sockd chat: {text}", file=sys.stderr, flush=True)

    def done(code: int) -> None:
        status.append(code)
        reactor.callLater(0.05, reactor.stop)

    datagrams: _Datagrams | None = None

    def send(data: bytes) -> None:
        assert datagrams is not None
        datagrams.write(data)

    client = ChatClient(
        send,
        show,
        reactor,
        done,
        nick=args.nick,
        room=args.room,
        keepalive=args.keepalive,
        rate=args.rate,
        burst=burst_for(args.rate),
        linger=args.linger,
        timeout=args.timeout,
        timestamps=not args.no_timestamps,
        notice=notice,
    )
    datagrams = _Datagrams(client, (str(sockaddr[0]), int(sockaddr[1])))
    # 8192: the reactor's default, which the interface does not declare.
    IReactorUDP(reactor).listenUDP(
        0, datagrams, "::" if family == socket.AF_INET6 else "", 8192
    )
    screen.append(stdio.StandardIO(_Keyboard(client)))

    reactor.addSystemEventTrigger("before", "shutdown", client.farewell)
    client.start()
    reactor.run()
    return status[0] if status else 1
