"""
Echo, as in RFC 862, with the classic tutorial's twist: what comes back is
upper-cased.

 - L{LineEcho}: each C{\\n} or C{\\r\\n} line is answered, transformed, with
   the line ending the client used.  Telnet negotiation is refused and
   never echoed.
 - L{RawEcho}: each chunk is answered as it arrives, transformed byte-wise,
   so a client that sends no newline still gets its answer.
 - L{DatagramEcho}: one datagram in, one datagram back, never larger.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import DatagramProtocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sockd.core.config import Config, EchoSettings
from sockd.core.eager import eager_write, send_datagram
from sockd.core.interfaces import (
    IAccessControlled,
    IMetricsSource,
    IReconfigurable,
    PeerAddress,
    Reason,
)
from sockd.core.limits import (
    LOOP_PORTS,
    PRIVILEGED_PORTS,
    AccessList,
    GuardedFactory,
    GuardedProtocol,
    PeerBudget,
    RateLimiter,
    Sample,
    peer_key,
)
from sockd.core.logs import escape

__all__ = [
    "DatagramEcho",
    "EchoFactory",
    "LineEcho",
    "RawEcho",
    "TelnetFilter",
    "upper_bytes",
    "upper_line",
]

log = Logger(namespace="sockd.echo")


def upper_bytes(data: bytes) -> bytes:
    """Byte-wise upper-casing: ASCII letters only; length never changes."""
    return data.upper()


def upper_line(data: bytes) -> bytes:
    """
    Upper-case valid UTF-8 the Unicode way (C{é} becomes C{É}); anything
    else is upper-cased byte-wise.  The result may be longer than C{data}
    (U+0390 becomes three characters).
    """
    if data.isascii():
        return data.upper()
    try:
        return data.decode("utf-8").upper().encode("utf-8")
    except UnicodeDecodeError:
        return data.upper()


def upper_within(data: bytes) -> bytes:
    """L{upper_line}, but never longer than C{data}: characters whose upper
    case would grow are left as they are."""
    if data.isascii():
        return data.upper()  # the usual datagram: no call to upper_line
    result = upper_line(data)
    if len(result) <= len(data):
        return result
    text = data.decode("utf-8")
    return "".join(
        c.upper() if len(c.upper().encode()) == len(c.encode()) else c for c in text
    ).encode("utf-8")


def identity(data: bytes) -> bytes:
    return data


def _lines_upper(block: bytes) -> bytes:
    # A block of whole lines: decode once when it is all valid UTF-8, else
    # line by line so one bad line does not stop the others being converted.
    if block.isascii():
        return block.upper()
    try:
        return block.decode("utf-8").upper().encode("utf-8")
    except UnicodeDecodeError:
        return b"\n".join(upper_line(line) for line in block.split(b"\n"))


TRANSFORMS: dict[str, tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]] = {
    # name -> (for whole lines, byte-wise for raw chunks)
    "upper": (_lines_upper, upper_bytes),
    "none": (identity, identity),
}

IAC, DONT, DO, WONT, WILL, SB, SE = 255, 254, 253, 252, 251, 250, 240


class TelnetFilter:
    """
    Removes telnet commands (RFC 854) from a byte stream and collects the
    refusals owed for option requests: C{DO x} gets C{WONT x}, C{WILL x}
    gets C{DONT x}.  C{IAC IAC} is a literal 0xFF byte; a 0xFF followed by
    anything that is not a command is kept as data.
    """

    __slots__ = ("_sub", "_tail")

    def __init__(self) -> None:
        self._tail = b""
        self._sub = False

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        """Return (data without telnet commands, replies to send)."""
        if self._tail:
            data = self._tail + data
            self._tail = b""
        elif not self._sub and b"\xff" not in data:
            return data, b""
        out = bytearray()
        replies = bytearray()
        i, n = 0, len(data)
        while i < n:
            if self._sub:
                # Inside a subnegotiation: skip to IAC SE.
                end = data.find(b"\xff\xf0", i)
                if end < 0:
                    self._tail = b"\xff" if data.endswith(b"\xff") else b""
                    return bytes(out), bytes(replies)
                self._sub = False
                i = end + 2
                continue
            j = data.find(b"\xff", i)
            if j < 0:
                out += data[i:]
                break
            out += data[i:j]
            if j + 1 >= n:
                self._tail = data[j:]
                break
            command = data[j + 1]
            if command == IAC:
                out.append(IAC)
                i = j + 2
            elif command in (DO, DONT, WILL, WONT):
                if j + 2 >= n:
                    self._tail = data[j:]
                    break
                option = data[j + 2]
                if command == DO:
                    replies += bytes((IAC, WONT, option))
                elif command == WILL:
                    replies += bytes((IAC, DONT, option))
                i = j + 3
            elif command == SB:
                self._sub = True
                i = j + 2
            elif command >= SE:
                i = j + 2  # NOP, break, interrupt, ...: a command, not data
            else:
                out.append(IAC)  # not telnet: keep the byte
                i = j + 1
        return bytes(out), bytes(replies)


class LineEcho(GuardedProtocol):
    """Answers each line, transformed, with the client's own line ending."""

    __slots__ = ("_buffer", "_telnet")

    factory: EchoFactory
    _telnet: TelnetFilter | None

    def __init__(self) -> None:
        super().__init__()
        self._buffer = b""
        self._telnet = None

    def dataReceived(self, data: bytes) -> None:
        if not self.received():
            return
        self.bytes_in += len(data)
        factory = self.factory
        if self._telnet is not None or b"\xff" in data:
            if self._telnet is None:
                self._telnet = TelnetFilter()
            data, replies = self._telnet.feed(data)
            if replies:
                self.bytes_out += len(replies)
                self.transport.write(replies)  # type: ignore[union-attr]
        if self._buffer:
            data = self._buffer + data
        end = data.rfind(b"\n") + 1
        if end:
            self._buffer = rest = data[end:]
            limit = factory.max_line_length
            # Only a block longer than the limit can hold a line that is.
            if end > limit and self._tooLong(data[:end], limit):
                return
            answer = factory.transform_lines(data[:end])
            self.bytes_out += len(answer)
            # Sent at once when nothing is queued (see sockd.core.eager).
            eager_write(self.transport, answer)
            if not rest:
                if self._deadline is not None:
                    self.stopDeadline()
                return
            self.restartDeadline()
        else:
            self._buffer = rest = data
            self.startDeadline()
        # A trailing CR may be the first half of a CRLF, which does not count.
        if len(rest) - rest.endswith(b"\r") > factory.max_line_length:
            self._refuseLine()

    def _tooLong(self, block: bytes, limit: int) -> bool:
        start = 0
        while start < len(block):
            end = block.index(b"\n", start)
            length = end - start - (1 if end > start and block[end - 1] == 13 else 0)
            if length > limit:
                if start:
                    answer = self.factory.transform_lines(block[:start])
                    self.bytes_out += len(answer)
                    self.transport.write(answer)  # type: ignore[union-attr]
                self._buffer = b""
                self._refuseLine()
                return True
            start = end + 1
        return False

    def _refuseLine(self) -> None:
        limit = self.factory.max_line_length
        log.info(
            "echo: closing {peer}: line longer than {limit} bytes",
            peer=self._key,
            limit=limit,
        )
        self._buffer = b""
        self.close(f"ERR line longer than {limit} bytes; closing\r\n".encode())

    def inputEnded(self) -> None:
        # The client half-closed: answer an unterminated last line too.
        if self._buffer and not self.closing:
            answer = self.factory.transform_lines(self._buffer)
            self.bytes_out += len(answer)
            self.transport.write(answer)  # type: ignore[union-attr]
            self._buffer = b""
        self.close()


class RawEcho(GuardedProtocol):
    """RFC 862: every chunk back as it arrives, transformed byte-wise."""

    __slots__ = ()

    factory: EchoFactory

    def dataReceived(self, data: bytes) -> None:
        if not self.received():
            return
        self.bytes_in += len(data)
        eager_write(self.transport, self.factory.transform_bytes(data))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # Byte-wise transforms keep the length: every byte read was answered
        # with one, so the hot path counts only what came in.
        self.bytes_out += self.bytes_in
        super().connectionLost(reason)


@implementer(IReconfigurable)
class EchoFactory(GuardedFactory):
    """Line or raw echo over TCP, under the limits of C{[echo]}."""

    service_name = "echo"

    def __init__(
        self, settings: EchoSettings, clock: IReactorTime, abort_grace: float = 5.0
    ) -> None:
        super().__init__(
            clock,
            settings,
            request_timeout=settings.line_timeout,
            abort_grace=abort_grace,
        )
        self._apply(settings)

    def _apply(self, settings: EchoSettings) -> None:
        self.settings = settings
        self.protocol = LineEcho if settings.mode == "line" else RawEcho  # type: ignore[assignment]
        self.max_line_length = settings.max_line_length
        self.transform_lines, self.transform_bytes = TRANSFORMS[settings.transform]

    def reconfigure(self, config: Config) -> None:
        """A reload: new connections get the new mode; limits apply now."""
        settings = config.echo
        self.set_limits(settings, settings.line_timeout, config.sockd.abort_grace)
        self._apply(settings)


@implementer(IAccessControlled, IReconfigurable, IMetricsSource)
class DatagramEcho(DatagramProtocol):
    """
    UDP echo: one transformed datagram back to the sender, never larger than
    the request; loops, oversized datagrams and floods are dropped.

    Loops with another datagram service are stopped twice over: by source
    port (L{LOOP_PORTS}, this service's own ports, and every port below
    1024 unless C{udp_allow_privileged_ports}), and, for a service on any
    other port, by the C{udp_loop_budget} of datagrams a peer may send
    without a pause of C{udp_loop_pause} (L{PeerBudget}).
    """

    noisy = False
    #: who is answered; set at start and on each reload (before anything
    #: else: a datagram refused gets no reply, state or budget)
    access = AccessList()
    #: whether C{access} has rules (an empty list admits every source)
    screened = False

    def __init__(
        self,
        settings: EchoSettings,
        clock: IReactorTime,
        own_ports: Iterable[int] = (),
    ) -> None:
        self.own_ports = frozenset(own_ports)
        self.limiter = RateLimiter(
            settings.udp_rate, settings.udp_burst, settings.udp_total_rate, clock
        )
        self.loops = PeerBudget(
            settings.udp_loop_budget, settings.udp_loop_pause, clock
        )
        self.max_datagram = self.port_limit = settings.udp_max_datagram
        self._apply(settings)
        self.answered = 0
        self.dropped: dict[Reason, int] = {
            "loop": 0,
            "loop_budget": 0,
            "oversized": 0,
            "rate_limited": 0,
            "send_error": 0,
            "acl": 0,
        }

    def _apply(self, settings: EchoSettings) -> None:
        self.transform = upper_within if settings.transform == "upper" else identity
        blocked = LOOP_PORTS | self.own_ports
        if not settings.udp_allow_privileged_ports:
            blocked |= PRIVILEGED_PORTS
        self.blocked_ports = blocked

    def set_access(self, access: AccessList, trusted_proxies: AccessList) -> None:
        """Answer only the sources C{access} permits (no PROXY over UDP)."""
        self.access = access
        self.screened = bool(access)

    def reconfigure(self, config: Config) -> None:
        """A reload: new rates, ports, loop budget and transform at once."""
        settings = config.echo
        # The port reads at most the size it was opened with (plus one), so a
        # larger limit would need a restart; a smaller one applies now.
        self.max_datagram = min(settings.udp_max_datagram, self.port_limit)
        self._apply(settings)
        self.limiter.set_rates(
            settings.udp_rate, settings.udp_burst, settings.udp_total_rate
        )
        self.loops.budget = settings.udp_loop_budget
        self.loops.pause = settings.udp_loop_pause

    def metrics(self) -> list[Sample]:
        """What the UDP echo has counted, for L{sockd.core.metrics}."""
        service = {"service": "echo"}
        samples: list[Sample] = [
            ("datagrams_answered_total", "counter", service, self.answered)
        ]
        for reason, count in self.dropped.items():
            samples.append(
                (
                    "datagrams_dropped_total",
                    "counter",
                    {**service, "reason": reason},
                    count,
                )
            )
        return samples

    def datagramReceived(self, data: bytes, addr: PeerAddress) -> None:
        host, port = addr[0], addr[1]
        if self.screened and not self.access.permits(host):
            self.dropped["acl"] += 1
            return
        if port in self.blocked_ports:
            self.dropped["loop"] += 1
            return
        if len(data) > self.max_datagram:
            # The port reads one byte more than the limit, so anything over
            # it is known to be whole-or-truncated: drop, never answer a part.
            self.dropped["oversized"] += 1
            return
        loops = self.loops
        if loops.budget and not loops.allow(addr):
            self.dropped["loop_budget"] += 1
            return
        if not self.limiter.allow(peer_key(host)):
            self.dropped["rate_limited"] += 1
            return
        try:
            send_datagram(self.transport, self.transform(data), addr)
        except OSError as e:
            # ENOBUFS, EAGAIN, EHOSTUNREACH...: count and go on serving.
            self.dropped["send_error"] += 1
            log.debug(
                "echo: sendto {peer} failed: {error}",
                peer=escape(str(host)),
                error=str(e),
            )
            return
        self.answered += 1
