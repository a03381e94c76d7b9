"""
Limits shared by every service: connection caps (total and per client
address, shared fairly when connections run short), per-source rate
limiting, the UDP source ports never answered, timeouts that really close
(the TLS handshake's too), and backpressure.

Twisted's C{policies.LimitConnectionsByPeer} crashes on C{IPv4Address}
(Twisted #12183), and C{TimeoutMixin} only calls C{loseConnection}, which
never completes against a peer that does not read; hence this module.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import itertools
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IReactorTime,
    ISSLTransport,
)
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sockd.core.config import SockdSettings
from sockd.core.interfaces import (
    IAccessControlled,
    IDrainable,
    IMetricsSource,
    PeerAddress,
    Reason,
    Sample,
)

__all__ = [
    "LOOP_PORTS",
    "PRIVILEGED_PORTS",
    "TIMERS",
    "AccessList",
    "ConnectionLimiter",
    "GuardedFactory",
    "GuardedProtocol",
    "IdleWheel",
    "PeerBudget",
    "RateLimiter",
    "Refusal",
    "Sample",
    "TokenBucket",
    "peer_key",
]

log = Logger(namespace="sockd")

#: UDP source ports a datagram service never answers (before validation,
#: for chat).  Behind each is a service that answers whatever it is sent,
#: so a datagram forged "from" it starts a ping-pong between the two
#: ("loops"), or one that answers with more than it got, so a forged
#: request turns us into a reflector toward it ("amplifies").  Port 0
#: cannot be answered at all.
LOOP_PORTS = frozenset(
    {
        0,  # unanswerable
        7,  # echo: loops
        9,  # discard: loops (some answer)
        13,  # daytime: loops
        17,  # qotd: amplifies
        19,  # chargen: amplifies
        37,  # time: loops
        53,  # dns: amplifies
        69,  # tftp: loops
        111,  # portmap: amplifies
        123,  # ntp: amplifies
        137,  # netbios-ns: amplifies
        138,  # netbios-dgm: loops
        161,  # snmp: amplifies
        162,  # snmp-trap: loops
        389,  # cldap: amplifies
        520,  # rip: amplifies
        1194,  # openvpn: loops
        1900,  # ssdp: amplifies
        3283,  # apple-remote-desktop: amplifies
        3702,  # ws-discovery: amplifies
        5353,  # mdns: amplifies
        5355,  # llmnr: loops
        5683,  # coap: amplifies
        8001,  # sockd-chat: loops (its default port)
        9001,  # sockd-echo: loops (its default port)
        10001,  # ubiquiti-discovery: amplifies
        11211,  # memcached: amplifies
        27015,  # steam/source: amplifies
    }
)

#: what a client that allow/deny do not admit is told
ACCESS_DENIED = "access denied"
#: the timers that close a connection (the C{timer} label of its timeouts)
TIMERS = ("idle", "request", "handshake")

#: what a connection closed to make room for another address is told
EVICTED = "server full: closing this idle connection to admit other addresses"

#: ports below 1024: only system services send from them, never a person's
#: client, so UDP echo drops them all unless C{udp_allow_privileged_ports}
PRIVILEGED_PORTS = frozenset(range(1024))


# Cached: parsing an address costs microseconds, and UDP services key every
# datagram by its source.  Bounded, so spoofed sources cannot grow it.
@functools.lru_cache(maxsize=4096)
def peer_key(host: str) -> str:
    """
    The key a client address is counted under: an IPv4 address as itself
    (also when written C{::ffff:a.b.c.d}), an IPv6 address by its /64, and
    anything else (a UNIX socket path) as it is.
    """
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        network = ipaddress.IPv6Network((int(address) >> 64 << 64, 64))
        return str(network)
    return str(address)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class AccessList:
    """
    C{allow} and C{deny} networks, with the precedence of xinetd's
    C{only_from} and C{no_access}: an address matching neither is served
    unless C{allow} is given; matching one, that one decides; matching
    both, the more specific network (the longer prefix) decides, and deny
    wins a tie.  An IPv4-mapped IPv6 address is matched as IPv4.  Anything
    not an IP address (a UNIX socket peer) is served when C{allow} is empty.
    """

    __slots__ = ("allow", "deny", "permits")

    def __init__(
        self, allow: Iterable[Network] = (), deny: Iterable[Network] = ()
    ) -> None:
        self.allow = tuple(allow)
        self.deny = tuple(deny)
        # Cached per list: UDP services check every datagram, and a reload
        # makes a new list, so a cache never outlives its rules.
        self.permits: Callable[[str], bool] = (
            functools.lru_cache(maxsize=4096)(self._permits)
            if self.allow or self.deny
            else _everyone
        )

    def __bool__(self) -> bool:
        """Whether any rule is set (an empty list serves everyone)."""
        return bool(self.allow or self.deny)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AccessList):
            return NotImplemented
        return (self.allow, self.deny) == (other.allow, other.deny)

    def __hash__(self) -> int:
        return hash((self.allow, self.deny))

    def _permits(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return not self.allow
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        allowed = _longest(self.allow, address)
        denied = _longest(self.deny, address)
        if allowed < 0 and denied < 0:
            return not self.allow
        return allowed > denied


def _everyone(host: str) -> bool:
    return True


def _longest(
    networks: tuple[Network, ...],
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> int:
    """The longest prefix in C{networks} holding C{address}; -1 if none."""
    return max(
        (n.prefixlen for n in networks if address in n),
        default=-1,
    )


def address_of(address: IAddress | None) -> str:
    """
    A peer as a log line names it: C{203.0.113.5:41234}, IPv6 in brackets
    (C{[2001:db8::1]:41234}), a UNIX socket by its path (or C{unix}).
    """
    host = host_of(address)
    port = getattr(address, "port", None)
    if not isinstance(port, int):
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def host_of(address: IAddress | None) -> str:
    host = getattr(address, "host", None)
    if isinstance(host, str):
        return host
    name = getattr(address, "name", None)
    if isinstance(name, bytes):
        return name.decode("utf-8", "backslashreplace")
    return str(name) if name else "unix"


class ConnectionLimiter:
    """
    Counts open connections, in total and per L{peer_key}, and shares them
    out when they run short:

     - under pressure (at least L{pressure} of C{max_total} open), an
       address already holding its fair share (C{max_total} divided by the
       number of addresses holding connections, its own included) is
       refused, so newcomers still find room;
     - when full, L{make_room} names the address holding the most, if it
       holds at least two more than the one asking: the caller closes one
       of its connections (L{take_back}) and admits the newcomer.

    The address holding the most is tracked by count, so every operation
    is O(1).
    """

    #: the share of C{max_total} open from which connections are shared out
    pressure = 0.9

    def __init__(self, max_total: int, max_per_peer: int) -> None:
        self.max_total = max_total
        self.max_per_peer = max_per_peer
        self.total = 0
        self.per_peer: dict[str, int] = {}
        self.refused = 0
        self.refused_by: dict[Reason, int] = {
            "total": 0,
            "per_ip": 0,
            "share": 0,
            # not admitted by allow/deny, and PROXY headers refused
            "acl": 0,
            "proxy": 0,
        }
        #: connections closed to make room for a less-served address
        self.evicted = 0
        #: count -> the keys holding that many connections, and the top count
        self._holding: dict[int, set[str]] = {}
        self._most = 0

    @property
    def pressed(self) -> bool:
        """Whether connections are being shared out (L{pressure} reached)."""
        return self.total >= self.max_total * self.pressure

    def acquire(self, key: str) -> str | None:
        """Take a slot for C{key}; on refusal return the reason instead."""
        count = self.per_peer.get(key, 0)
        if count >= self.max_per_peer:
            return self._refuse("per_ip", "too many connections from your address")
        if self.total >= self.max_total:
            return self._refuse("total", "too many connections to this server")
        if self.pressed and count >= self._share(key):
            return self._refuse(
                "share", "too many connections from your address; server busy"
            )
        self._move(key, count, count + 1)
        self.total += 1
        return None

    def refuse(self, reason: Reason, message: str) -> str:
        """Count a refusal for C{reason} decided elsewhere (C{acl}, C{proxy})."""
        return self._refuse(reason, message)

    def _refuse(self, reason: Reason, message: str) -> str:
        self.refused += 1
        self.refused_by[reason] += 1
        return message

    def _share(self, key: str) -> int:
        holders = len(self.per_peer) + (key not in self.per_peer)
        return max(1, self.max_total // holders)

    def make_room(self, key: str) -> str | None:
        """
        The server is full: the address to take a connection back from so
        that C{key} may have one, or None if none holds at least two more
        than C{key} (taking from an equal would only move the shortage).
        """
        if self.total < self.max_total:
            return None
        count = self.per_peer.get(key, 0)
        if self._most < count + 2 or count >= self.max_per_peer:
            return None
        if count >= self._share(key):
            return None  # refused for its share even after the room is made
        return next(iter(self._holding[self._most]))

    def take_back(self, key: str) -> None:
        """One of C{key}'s connections is being closed to make room."""
        self.evicted += 1
        self.release(key)

    def release(self, key: str) -> None:
        count = self.per_peer.get(key, 0)
        if count <= 0:
            return
        self.total -= 1
        self._move(key, count, count - 1)

    def _move(self, key: str, old: int, new: int) -> None:
        holding = self._holding
        if old:
            keys = holding[old]
            keys.discard(key)
            if not keys:
                del holding[old]
                if self._most == old:
                    # Counts move by one: the next lower count is held.
                    self._most = new
        if new:
            holding.setdefault(new, set()).add(key)
            self.per_peer[key] = new
            self._most = max(self._most, new)
        else:
            del self.per_peer[key]


class TokenBucket:
    """
    A token bucket: C{rate} tokens a second, at most C{burst} saved.

    L{take} charges only when the tokens are there.  A pacer instead pays in
    advance with L{spend}, which may leave the bucket in debt, and waits
    L{delay} before using what it paid for: whoever pays next waits longer,
    so users of a shared bucket queue up in order instead of all polling.
    """

    __slots__ = ("burst", "clock", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, clock: IReactorTime) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.tokens = float(burst)
        self.stamp = clock.seconds()

    def take(self, cost: float = 1.0) -> bool:
        """Charge C{cost} if that many tokens are there; say whether it was."""
        # available(), inline and without min() (about 80 ns less): UDP
        # services take a token per datagram, the chat one per message.
        now = self.clock.seconds()
        tokens = self.tokens + (now - self.stamp) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        self.stamp = now
        if tokens >= cost:
            self.tokens = tokens - cost
            return True
        self.tokens = tokens
        return False

    def available(self) -> float:
        """The tokens there now; negative while in debt."""
        now = self.clock.seconds()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return self.tokens

    def spend(self, cost: float) -> None:
        """Charge C{cost} whether or not the tokens are there."""
        self.tokens = self.available() - cost

    def refund(self, cost: float) -> None:
        """Give back C{cost} paid for and not used (never beyond C{burst})."""
        self.tokens = min(self.burst, self.available() + cost)

    def delay(self, cost: float = 0.0) -> float:
        """Seconds until C{cost} tokens are there (0: they are now)."""
        missing = cost - self.available()
        if missing <= 0:
            return 0.0
        return missing / self.rate if self.rate > 0 else math.inf


class RateLimiter:
    """
    One token bucket per source, plus global ones.  A source that has been
    answered is remembered (in a bounded table: when it is full the least
    recently seen source is forgotten); one that has not, such as each of
    a flood of forged sources, costs no memory, and all of them together
    may take at most L{newcomer_share} of the global rate, so sources
    answered before keep the rest.
    """

    #: the part of C{total_rate} that sources not yet remembered may take
    newcomer_share = 0.5

    def __init__(
        self,
        rate: float,
        burst: float,
        total_rate: float,
        clock: IReactorTime,
        max_sources: int = 65536,
    ) -> None:
        self.clock = clock
        self.max_sources = max_sources
        self.total = TokenBucket(total_rate, burst, clock)
        self.newcomers = TokenBucket(total_rate, burst, clock)
        self.set_rates(rate, burst, total_rate)
        self.total.tokens = self.total.burst
        self.newcomers.tokens = self.newcomers.burst
        self.sources: OrderedDict[Hashable, list[float]] = OrderedDict()
        self.dropped = 0

    def set_rates(self, rate: float, burst: float, total_rate: float) -> None:
        """Per-source C{rate} and C{burst}, and C{total_rate} for everyone."""
        self.rate = rate
        self.burst = burst
        self.total.rate = total_rate
        self.total.burst = max(total_rate, burst)
        share = self.newcomer_share
        self.newcomers.rate = total_rate * share
        self.newcomers.burst = self.total.burst * share

    def allow(self, source: Hashable, cost: float = 1.0) -> bool:
        """Charge C{cost} to C{source}; False means drop the request."""
        now = self.clock.seconds()
        state = self.sources.get(source)
        if state is None:
            # Its bucket would start full: only the global ones can say no.
            if (
                cost > self.burst
                or not self.newcomers.take(cost)
                or not self.total.take(cost)
            ):
                self.dropped += 1
                return False
            if len(self.sources) >= self.max_sources:
                self.sources.popitem(last=False)
            self.sources[source] = [self.burst - cost, now]
            return True
        self.sources.move_to_end(source)
        tokens = min(self.burst, state[0] + (now - state[1]) * self.rate)
        state[1] = now
        if tokens < cost or not self.total.take(cost):
            state[0] = tokens
            self.dropped += 1
            return False
        state[0] = tokens - cost
        return True


class PeerBudget:
    """
    Bounds a loop with another datagram service: more than C{budget}
    datagrams from one address and port, each less than C{pause} seconds
    after the one before, and the rest are dropped until that peer pauses
    for C{pause} seconds.  A person's client sends and waits; a loop
    answers at once, forever, from one port.  C{budget} 0 turns it off.

    The table of peers is bounded: when full, the oldest entry goes.  A
    loop forgotten that way starts a new budget, but pushing it out takes
    C{max_peers} datagrams from other peers, far more than it would loop.
    """

    def __init__(
        self,
        budget: int,
        pause: float,
        clock: IReactorTime,
        max_peers: int = 65536,
    ) -> None:
        self.budget = budget
        self.pause = pause
        self.clock = clock
        self.max_peers = max_peers
        #: (host, port) -> [time of its last datagram, datagrams without a pause]
        self.peers: dict[PeerAddress, list[float]] = {}

    def allow(self, peer: PeerAddress) -> bool:
        """A datagram from C{peer}: False means drop it."""
        if not self.budget:
            return True
        now = self.clock.seconds()
        state = self.peers.get(peer)
        if state is None:
            peers = self.peers
            if len(peers) >= self.max_peers:
                del peers[next(iter(peers))]
            peers[peer] = [now, 1]
            return True
        streak = state[1] + 1 if now - state[0] < self.pause else 1
        state[0] = now
        state[1] = streak
        return streak <= self.budget


def idle_granularity(timeout: float) -> float:
    """
    How coarsely L{IdleWheel} times an idle timeout of C{timeout} seconds:
    to the second, or to a tenth of the timeout when that is shorter.
    """
    return min(1.0, timeout / 10)


class IdleWheel:
    """
    The idle timers of one factory's connections, in coarse buckets: one
    C{callLater} per bucket instead of a C{DelayedCall} per connection,
    which costs memory for every idle connection and heap work on every
    read.

    A protocol is filed by when it becomes idle-expired (its C{_seen}, the
    time of its last data, plus the factory's idle timeout now) in the
    bucket checked at the first multiple of L{idle_granularity} at or after
    that.  Data arriving only moves C{_seen} (L{GuardedProtocol.touch});
    when the bucket is checked, a protocol due later is filed again, so
    each connection is handled at most once per bucket, however busy it is.

    Timing: an idle connection is closed no earlier than its idle timeout
    after its last data and no later than the timeout plus one granularity.
    The timeout is the one in force when its bucket is checked; when it
    becomes shorter under pressure, L{GuardedFactory} files every
    connection again at once (after a reload, each at its next data).
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        #: bucket time -> the protocols filed there, and its one timer; keyed
        #: by time, not by a tick number, so buckets filed with the
        #: granularities before and after a reload cannot be mixed up
        self._buckets: dict[float, set[GuardedProtocol]] = {}
        self._calls: dict[float, IDelayedCall] = {}

    def add(self, protocol: GuardedProtocol, after: float = -math.inf) -> None:
        """
        File C{protocol} by when it becomes idle-expired, with the
        granularity of its factory's idle timeout now, in a bucket later
        than C{after}.
        """
        factory = protocol.factory
        granularity = factory.idle_granularity
        # Already overdue (the timeout just became shorter): the bucket now
        # due, one for all of them rather than one per second they are late.
        due = max(protocol._seen + factory.idle_timeout, self.clock.seconds())
        slot = math.ceil(due / granularity) * granularity
        if slot <= after:
            # Rounding put it back in the bucket being checked: next one.
            slot = after + granularity
        members = self._buckets.get(slot)
        if members is None:
            members = self._buckets[slot] = set()
            delay = max(0.0, slot - self.clock.seconds())
            self._calls[slot] = self.clock.callLater(delay, self._check, slot)
        members.add(protocol)
        protocol._slot = slot

    def remove(self, protocol: GuardedProtocol) -> None:
        """Forget C{protocol}; a bucket left empty takes its timer along."""
        slot = protocol._slot
        if slot is None:
            return
        protocol._slot = None
        members = self._buckets.get(slot)
        if members is None:
            return  # that bucket is being checked right now
        members.discard(protocol)
        if not members:
            del self._buckets[slot]
            self._calls.pop(slot).cancel()

    def _check(self, slot: float) -> None:
        members = self._buckets.pop(slot)
        del self._calls[slot]
        now = self.clock.seconds()
        for protocol in members:
            if protocol._slot != slot:
                continue  # lost while another here was timed out
            protocol._slot = None
            if protocol.closing:
                continue  # close() has its own timer, and idleness is moot
            if protocol._seen + protocol.factory.idle_timeout > now:
                self.add(protocol, after=slot)  # touched since it was filed
            else:
                protocol._timedOut("idle")


@implementer(IHalfCloseableProtocol, IHandshakeListener)
class GuardedProtocol(Protocol):
    """
    A TCP protocol with an idle timeout, a deadline for the request in
    progress, a deadline for the TLS handshake (over C{ssl:}), backpressure,
    and a close that really closes.

    Subclasses call L{touch} when data arrives (or L{received}, which also
    checks the access list), L{startDeadline} and
    L{stopDeadline} around a partial request, and L{close} to finish.
    They add what they read to C{bytes_in} and what they write to
    C{bytes_out} (an integer add, no more, on the hot path), and may count
    requests in C{requests} and name the last in C{request}: the
    connection's one log line, at its end, says so.
    When the peer half-closes (C{nc -N}), L{inputEnded} runs and, by
    default, closes once every answer is written.
    """

    # Slots for what every connection sets: thousands of idle connections
    # each carry them.  What only some connections set (a deadline, a close,
    # a request count) stays a class default, so that it costs memory (an
    # instance dict) only on the connections that set it.
    __slots__ = (
        "_access",
        "_host",
        "_key",
        "_opened",
        "_seen",
        "_slot",
        "bytes_in",
        "bytes_out",
        "connected",
        "factory",
        "transport",
    )

    factory: GuardedFactory
    #: when data last arrived, and the time of the L{IdleWheel} bucket the
    #: connection is filed in (None: not filed)
    _seen: float
    _slot: float | None
    _deadline: IDelayedCall | None = None
    _abort: IDelayedCall | None = None
    _handshake: IDelayedCall | None = None
    _key: str | None
    #: its client's address, and the access list it was last admitted by
    _host: str
    _access: AccessList | None
    #: its slot was given back early, to make room (L{GuardedFactory})
    _evicted = False
    #: the timer that ran out, for the end line's outcome
    _expired: str | None = None
    _opened: float
    bytes_in: int
    bytes_out: int
    requests = 0
    request = ""
    _lingering = False
    closing = False
    #: set TCP_NODELAY: small answers leave when written, as with asyncio
    #: (under Nagle's algorithm a reply written while an earlier one is
    #: unacknowledged waits for the client's, possibly delayed, ACK); bulk
    #: senders are faster without it
    nodelay = True

    def __init__(self) -> None:
        self.connected = 0
        self.transport = None
        self._seen = self._opened = 0.0
        self._slot = None
        self._key = self._access = None
        self._host = ""
        self.bytes_in = self.bytes_out = 0

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        self._opened = self.factory.clock.seconds()
        self.factory.connections.add(self)
        # Stop reading from a peer that does not read our answers until the
        # write buffer drains; without this a sender that never reads grows
        # the buffer without bound.
        transport.registerProducer(transport, True)  # type: ignore[attr-defined]
        nodelay = getattr(transport, "setTcpNoDelay", None) if self.nodelay else None
        if nodelay is not None:
            with contextlib.suppress(OSError):
                nodelay(True)
        self._seen = self._opened
        factory = self.factory
        factory.idle_wheel.add(self)
        if self._key is not None:
            factory.file_peer(self._key, self)
        if ISSLTransport.providedBy(transport):
            # Under TLS (TLSMemoryBIOProtocol tells us through
            # handshakeCompleted): a client that never finishes its
            # handshake must not hold the connection until the idle timeout.
            self._handshake = factory.clock.callLater(
                factory.handshake_timeout, self._handshakeTimedOut
            )

    def handshakeCompleted(self) -> None:
        """The TLS handshake is done: its deadline is lifted."""
        if self._handshake is not None and self._handshake.active():
            self._handshake.cancel()
        self._handshake = None

    def _handshakeTimedOut(self) -> None:
        self._handshake = None
        self._expired = "handshake"
        timeouts = self.factory.timeouts
        timeouts["handshake"] = timeouts.get("handshake", 0) + 1
        log.info(
            "{service}: closing {peer}: handshake timeout",
            service=self.factory.service_name,
            peer=self._key,
        )
        # Nothing was said over TLS yet, so there is nothing to flush.
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def touch(self) -> None:
        """
        Data arrived: restart the idle timer.  Cheap on purpose: it only
        moves C{_seen}, and the factory's L{IdleWheel} notices when it
        checks the bucket.
        """
        factory = self.factory
        self._seen = now = factory.clock.seconds()
        slot = self._slot
        # Filed too late for the new due only when the timeout became
        # shorter: file it again, or it would outlive the new timeout.
        if slot is not None and slot - now >= factory.refile_after:
            factory.idle_wheel.remove(self)
            factory.idle_wheel.add(self)

    def received(self) -> bool:
        """
        Data arrived: whether to handle it (L{permitted}), and if so restart
        the idle timer (L{touch}).  The two at the cost of one call, for
        services that read small requests.
        """
        factory = self.factory
        if (factory.access is not self._access or self.closing) and (
            not self.permitted()
        ):
            return False
        # touch(), inline: this runs on every read.
        self._seen = now = factory.clock.seconds()
        slot = self._slot
        if slot is not None and slot - now >= factory.refile_after:
            factory.idle_wheel.remove(self)
            factory.idle_wheel.add(self)
        return True

    def permitted(self) -> bool:
        """
        At the start of a request: whether the client is still admitted
        (the access list may have changed on a reload).  If not, it is
        refused (C{ERR access denied}) and closed; the caller stops there.
        """
        factory = self.factory
        access = factory.access
        if access is self._access:
            return not self.closing
        if self.closing:
            return False
        self._access = access
        if access.permits(self._host):
            return True
        factory.limiter.refuse("acl", ACCESS_DENIED)
        log.warn(
            "{service}: closing {peer}: {reason} (after a reload)",
            service=factory.service_name,
            peer=self._key,
            reason=ACCESS_DENIED,
        )
        self.close(factory.refusal(ACCESS_DENIED))
        return False

    def evict(self) -> None:
        """
        Hook: closed to make room for a client from a less-served address.
        By default, say why (L{GuardedFactory.refusal}) unless something
        else than answers is being sent (a file body), then close.
        """
        transport = self.transport
        between_answers = getattr(transport, "producer", None) is transport
        self.close(self.factory.refusal(EVICTED) if between_answers else b"")

    def startDeadline(self) -> None:
        """A request has begun; it must complete within the request timeout."""
        if self._deadline is None or not self._deadline.active():
            self._deadline = self.factory.clock.callLater(
                self.factory.request_timeout, self._timedOut, "request"
            )

    def restartDeadline(self) -> None:
        """A request completed and the next has begun."""
        if self._deadline is not None and self._deadline.active():
            self._deadline.reset(self.factory.request_timeout)
        else:
            self.startDeadline()

    def stopDeadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _timedOut(self, which: str) -> None:
        self._expired = which
        timeouts = self.factory.timeouts
        timeouts[which] = timeouts.get(which, 0) + 1
        log.info(
            "{service}: closing {peer}: {which} timeout",
            service=self.factory.service_name,
            peer=self._key,
            which=which,
        )
        self.timedOut(which)

    def timedOut(self, which: str) -> None:
        """Hook: a timer ran out.  By default, close."""
        self.close()

    def close(self, message: bytes = b"") -> None:
        """
        Write C{message}, then close once the write buffer drains; abort if
        that takes longer than the grace period (a peer that never reads).
        """
        transport = self.transport
        if transport is None or self.closing:
            return
        self.closing = True
        self.stopDeadline()
        if message:
            self.bytes_out += len(message)
            transport.write(message)
        # Whatever producer is registered (the transport itself, or a file
        # sender) must go first: left registered, a paused connection stays
        # open forever after its buffer drains.
        if getattr(transport, "producer", None) is not None:
            transport.unregisterProducer()  # type: ignore[attr-defined]
        # Armed first: loseConnection may complete (and cancel it) at once.
        self._abort = self.factory.clock.callLater(
            self.factory.abort_grace,
            transport.abortConnection,  # type: ignore[attr-defined]
        )
        transport.loseConnection()

    def inputEnded(self) -> None:
        """Hook: the peer will send nothing more."""
        self.close()

    def readConnectionLost(self) -> None:
        if self._lingering:
            # Shutting down, and the peer has now sent everything.
            self.transport.loseConnection()  # type: ignore[union-attr]
        else:
            self.inputEnded()

    def writeConnectionLost(self) -> None:
        # Only a lingering shutdown half-closes on purpose; otherwise a peer
        # resetting its read side means our answers cannot arrive.
        if not self._lingering and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.idle_wheel.remove(self)
        for call in (self._deadline, self._abort, self._handshake):
            if call is not None and call.active():
                call.cancel()
        self._deadline = self._abort = self._handshake = None
        self._logEnd(reason)
        factory = self.factory
        if self._key is not None:
            factory.unfile_peer(self._key, self)
            if not self._evicted:
                factory.limiter.release(self._key)
                factory.check_pressure()
            self._key = None
        factory.connections.discard(self)
        if factory.draining and not factory.connections:
            factory.drained()

    def _logEnd(self, reason: Failure) -> None:
        # The connection's one line (event "connection" in the JSON logs,
        # docs/deploy.md): its fields are the schema's.
        if self._evicted:
            outcome = "evicted"
        elif self._expired is not None:
            outcome = f"{self._expired} timeout"
        else:
            outcome = "closed" if reason.check(ConnectionDone) else "lost"
        transport = self.transport
        fields: dict[str, Any] = {
            "event": "connection",
            "service": self.factory.service_name,
            "peer": address_of(transport.getPeer() if transport else None),
            "duration": self.factory.clock.seconds() - self._opened,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "outcome": outcome,
        }
        text = (
            "{service}: {peer} disconnected after {duration:.3f}s, "
            "{bytes_in} bytes in, {bytes_out} out"
        )
        if self.requests:
            fields["requests"] = self.requests
            fields["request"] = self.request
            text += ", {requests} requests (last: {request})"
        log.info(text + ": {outcome}", **fields)

    def shutdown(self) -> None:
        """
        Hook: the daemon is stopping.  By default, take no new requests,
        flush the answers already written, then close.  A service with work
        in flight (a file transfer) overrides this to finish it first.
        """
        transport = self.transport
        if transport is None or self.closing:
            return
        if not hasattr(transport, "loseWriteConnection"):
            self.close()
            return
        # A lingering close: closing while the peer's data sits unread would
        # send a reset and destroy the answers in flight.  So: ignore input
        # from now on but keep reading it, send FIN after the answers, and
        # close when the peer does (the drain deadline bounds the wait).
        self.closing = self._lingering = True
        self.stopDeadline()
        if getattr(transport, "producer", None) is transport:
            transport.unregisterProducer()  # type: ignore[union-attr]
            transport.resumeProducing()  # type: ignore[union-attr]
        transport.loseWriteConnection()  # type: ignore[union-attr]


class Refusal(Protocol):
    """Says one line to a client over a connection cap, then closes."""

    def __init__(self, message: bytes, clock: IReactorTime, grace: float) -> None:
        self.message = message
        self.clock = clock
        self.grace = grace
        self._abort: IDelayedCall | None = None

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        transport.write(self.message)
        transport.loseConnection()
        self._abort = self.clock.callLater(
            self.grace,
            transport.abortConnection,  # type: ignore[attr-defined]
        )

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._abort is not None and self._abort.active():
            self._abort.cancel()


class ConnectionSettings(TypingProtocol):
    """The settings of a stream service a L{GuardedFactory} reads."""

    @property
    def max_connections(self) -> int: ...

    @property
    def max_connections_per_ip(self) -> int: ...

    @property
    def idle_timeout(self) -> float: ...


@implementer(IAccessControlled, IDrainable, IMetricsSource)
class GuardedFactory(ServerFactory):
    """
    Builds L{GuardedProtocol}s under a L{ConnectionLimiter}; clients over a
    cap get one line (L{refusal}) and are closed.

    When connections run short the factory shares them out: under
    pressure (see L{ConnectionLimiter}) the idle timeout is cut to
    L{pressure_idle_share} of the configured one, so idle connections are
    reclaimed sooner, until fewer than L{relief} of C{max_connections} are
    open; when full, a client from an address holding at least two fewer
    connections than the address holding the most is admitted by closing
    that address's longest idle connection (L{GuardedProtocol.evict}).
    """

    noisy = False
    service_name = "sockd"
    #: the idle timeout under pressure, as a share of the configured one
    pressure_idle_share = 0.1
    #: pressure ends below this share of C{max_connections} (lower than
    #: where it starts, so a count that hovers does not refile every
    #: connection each time it crosses)
    relief = 0.8
    #: connections of the address to take from looked at for the idlest
    eviction_scan = 256
    #: seconds a TLS client has to finish its handshake; the service
    #: wiring sets C{[sockd] tls_handshake_timeout}
    handshake_timeout = SockdSettings.tls_handshake_timeout
    #: who is served (C{allow}/C{deny}); the service wiring sets it at
    #: start and on each reload, and open connections follow a new one at
    #: their next request (L{GuardedProtocol.permitted})
    access = AccessList()
    #: the proxies whose PROXY header is believed (L{sockd.core.proxy})
    trusted_proxies = AccessList()

    def __init__(
        self,
        clock: IReactorTime,
        settings: ConnectionSettings,
        *,
        request_timeout: float,
        abort_grace: float,
    ) -> None:
        self.clock = clock
        # Every connection's idle timer: a few timers, not one each.
        self.idle_wheel = IdleWheel(clock)
        self.limiter = ConnectionLimiter(
            settings.max_connections, settings.max_connections_per_ip
        )
        self.pressed = False
        self.set_limits(settings, request_timeout, abort_grace)
        self.connections: set[GuardedProtocol] = set()
        #: peer_key -> its open connection, or a set of them if several (a
        #: set each costs memory: docs/performance.md, "Memory per connection")
        self.peers: dict[str, GuardedProtocol | set[GuardedProtocol]] = {}
        self.accepted = 0
        # Every timer, so each series is there (at 0) before it first fires.
        self.timeouts: dict[str, int] = dict.fromkeys(TIMERS, 0)
        self.draining = False
        self._drained: list[Deferred[None]] = []

    def set_limits(
        self, settings: ConnectionSettings, request_timeout: float, abort_grace: float
    ) -> None:
        """
        Take C{max_connections}, C{max_connections_per_ip} and
        C{idle_timeout} from a service's settings (at start, and on a reload:
        they apply to new connections and timers; a new idle timeout applies
        to an open connection from the next data it sends, or when its
        current timer runs out).
        """
        self.limiter.max_total = settings.max_connections
        self.limiter.max_per_peer = settings.max_connections_per_ip
        self.idle_setting = settings.idle_timeout
        self._set_idle()
        self.request_timeout = request_timeout
        self.abort_grace = abort_grace

    def set_access(self, access: AccessList, trusted_proxies: AccessList) -> None:
        """Serve only what C{access} permits; believe C{trusted_proxies}."""
        if access != self.access:
            self.access = access
        if trusted_proxies != self.trusted_proxies:
            self.trusted_proxies = trusted_proxies

    def _set_idle(self) -> None:
        share = self.pressure_idle_share if self.pressed else 1.0
        self.idle_timeout = self.idle_setting * share
        self.idle_granularity = idle_granularity(self.idle_timeout)
        # touch() reads it on every read: a connection filed at least this
        # far after its data is filed too late for the timeout now.
        self.refile_after = self.idle_timeout + self.idle_granularity

    def check_pressure(self) -> None:
        """
        After a connection came or went: start or end the shorter idle
        timeout of L{pressure_idle_share}.  Starting it files every
        connection again, which the gap between the two thresholds pays
        for: at least a tenth of C{max_connections} must have been accepted
        since pressure last ended.
        """
        limiter = self.limiter
        if not self.pressed:
            if not limiter.pressed:
                return
            self.pressed = True
            self._set_idle()
            log.warn(
                "{service}: {count} of {most} connections open: idle "
                "connections close after {timeout:g}s until fewer than "
                "{relief:.0f} are open",
                service=self.service_name,
                count=limiter.total,
                most=limiter.max_total,
                timeout=self.idle_timeout,
                relief=limiter.max_total * self.relief,
            )
            wheel = self.idle_wheel
            for protocol in self.connections:
                slot = protocol._slot
                due = protocol._seen + self.idle_timeout
                if slot is not None and slot - due >= self.idle_granularity:
                    wheel.remove(protocol)
                    wheel.add(protocol)
        elif limiter.total < limiter.max_total * self.relief:
            # Connections filed by the short timeout are filed again by the
            # long one when their bucket is checked.
            self.pressed = False
            self._set_idle()
            log.info(
                "{service}: {count} connections open: idle timeout back to "
                "{timeout:g}s",
                service=self.service_name,
                count=limiter.total,
                timeout=self.idle_timeout,
            )

    def file_peer(self, key: str, protocol: GuardedProtocol) -> None:
        """Index C{protocol} under its address, for L{_evict}."""
        held = self.peers.get(key)
        if held is None:
            self.peers[key] = protocol
        elif isinstance(held, set):
            held.add(protocol)
        else:
            self.peers[key] = {held, protocol}

    def unfile_peer(self, key: str, protocol: GuardedProtocol) -> None:
        held = self.peers.get(key)
        if held is protocol:
            del self.peers[key]
        elif isinstance(held, set):
            held.discard(protocol)
            if len(held) == 1:
                self.peers[key] = held.pop()

    def _evict(self, key: str, newcomer: str) -> None:
        """Close the longest idle connection of C{key} to admit C{newcomer}."""
        held = self.peers.get(key)
        protocols = held if isinstance(held, set) else [held] if held else []
        victim: GuardedProtocol | None = None
        for protocol in itertools.islice(protocols, self.eviction_scan):
            if not protocol.closing and (
                victim is None or protocol._seen < victim._seen
            ):
                victim = protocol
        if victim is None:
            return  # all closing already: their slots come back soon
        self.unfile_peer(key, victim)
        victim._evicted = True
        self.limiter.take_back(key)
        log.warn(
            "{service}: server full: closing a connection of {peer}, idle "
            "for {idle:.0f}s, to admit {newcomer}",
            service=self.service_name,
            peer=key,
            idle=self.clock.seconds() - victim._seen,
            newcomer=newcomer,
        )
        victim.evict()

    def drain(self, deadline: float) -> Deferred[None]:
        """
        Ask every connection to finish (L{GuardedProtocol.shutdown}); fire
        when all are gone, aborting whatever is left after C{deadline}
        seconds.
        """
        self.draining = True
        done: Deferred[None] = Deferred()
        if not self.connections:
            done.callback(None)
            return done
        self._drained.append(done)
        for protocol in list(self.connections):
            protocol.shutdown()
        timer = self.clock.callLater(deadline, self._abort_all)
        done.addBoth(lambda result: timer.cancel() if timer.active() else None)
        return done

    def _abort_all(self) -> None:
        left = list(self.connections)
        if left:
            log.warn(
                "{service}: aborting {count} connection(s) still open at the "
                "shutdown deadline",
                service=self.service_name,
                count=len(left),
            )
        for protocol in left:
            if protocol.transport is not None:
                protocol.transport.abortConnection()  # type: ignore[attr-defined]
        self.drained()

    def drained(self) -> None:
        waiting, self._drained = self._drained, []
        for d in waiting:
            d.callback(None)

    def refusal(self, reason: str) -> bytes:
        """The line a refused client gets."""
        return f"ERR {reason}\r\n".encode()

    def refuse(self, key: str, reason: str) -> Protocol:
        """Log C{reason} for refusing C{key}: what to tell it before closing."""
        log.warn(
            "{service}: refused {peer}: {reason}",
            service=self.service_name,
            peer=key,
            reason=reason,
        )
        refusal = Refusal(self.refusal(reason), self.clock, self.abort_grace)
        refusal.factory = self
        return refusal

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        host = host_of(addr)
        key = peer_key(host)
        limiter = self.limiter
        # Before any slot is taken or evicted for it.
        if not self.access.permits(host):
            return self.refuse(key, limiter.refuse("acl", ACCESS_DENIED))
        crowded = limiter.make_room(key)
        if crowded is not None:
            self._evict(crowded, key)
        reason = limiter.acquire(key)
        if reason is not None:
            return self.refuse(key, reason)
        protocol = super().buildProtocol(addr)
        assert isinstance(protocol, GuardedProtocol)
        protocol._key = key
        protocol._host = host
        protocol._access = self.access
        self.accepted += 1
        self.check_pressure()
        return protocol

    def metrics(self) -> list[Sample]:
        """What this factory has counted, for L{sockd.core.metrics}."""
        service = {"service": self.service_name}
        samples: list[Sample] = [
            ("connections_open", "gauge", service, len(self.connections)),
            ("connections_accepted_total", "counter", service, self.accepted),
            ("connections_evicted_total", "counter", service, self.limiter.evicted),
        ]
        for reason, count in self.limiter.refused_by.items():
            samples.append(
                (
                    "connections_refused_total",
                    "counter",
                    {**service, "reason": reason},
                    count,
                )
            )
        for which, count in self.timeouts.items():
            samples.append(
                (
                    "connections_timed_out_total",
                    "counter",
                    {**service, "timer": which},
                    count,
                )
            )
        return samples
