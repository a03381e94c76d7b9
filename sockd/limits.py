"""
Limits shared by every service: connection caps (total and per client
address), per-source rate limiting, timeouts that really close, and
backpressure.

Twisted's C{policies.LimitConnectionsByPeer} crashes on C{IPv4Address}
(Twisted #12183), and C{TimeoutMixin} only calls C{loseConnection}, which
never completes against a peer that does not read; hence this module.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import math
from collections import OrderedDict
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = [
    "ConnectionLimiter",
    "GuardedFactory",
    "GuardedProtocol",
    "IdleWheel",
    "RateLimiter",
    "Refusal",
    "TokenBucket",
    "peer_key",
]

log = Logger(namespace="sockd")

#: one metric sample: (name, "counter" or "gauge", labels, value)
Sample = tuple[str, str, dict[str, str], float]


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


def host_of(address: IAddress | None) -> str:
    host = getattr(address, "host", None)
    if isinstance(host, str):
        return host
    name = getattr(address, "name", None)
    if isinstance(name, bytes):
        return name.decode("utf-8", "backslashreplace")
    return str(name) if name else "unix"


class ConnectionLimiter:
    """Counts open connections, in total and per L{peer_key}."""

    def __init__(self, max_total: int, max_per_peer: int) -> None:
        self.max_total = max_total
        self.max_per_peer = max_per_peer
        self.total = 0
        self.per_peer: dict[str, int] = {}
        self.refused = 0
        self.refused_by: dict[str, int] = {"total": 0, "per_ip": 0}

    def acquire(self, key: str) -> str | None:
        """Take a slot for C{key}; on refusal return the reason instead."""
        if self.total >= self.max_total:
            self.refused += 1
            self.refused_by["total"] += 1
            return "too many connections to this server"
        count = self.per_peer.get(key, 0)
        if count >= self.max_per_peer:
            self.refused += 1
            self.refused_by["per_ip"] += 1
            return "too many connections from your address"
        self.per_peer[key] = count + 1
        self.total += 1
        return None

    def release(self, key: str) -> None:
        count = self.per_peer.get(key, 0)
        if count <= 0:
            return
        self.total -= 1
        if count == 1:
            del self.per_peer[key]
        else:
            self.per_peer[key] = count - 1


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
        tokens = self.available()
        if tokens >= cost:
            self.tokens = tokens - cost
            return True
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
    One token bucket per source, plus a global one.  The table of sources is
    bounded: when it is full the least recently seen source is forgotten, so
    a flood from many spoofed sources costs bounded memory (the global
    bucket still caps what they get).
    """

    def __init__(
        self,
        rate: float,
        burst: float,
        total_rate: float,
        clock: IReactorTime,
        max_sources: int = 65536,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.max_sources = max_sources
        self.total = TokenBucket(total_rate, max(total_rate, burst), clock)
        self.sources: OrderedDict[Any, list[float]] = OrderedDict()
        self.dropped = 0

    def allow(self, source: Any, cost: float = 1.0) -> bool:
        """Charge C{cost} to C{source}; False means drop the request."""
        now = self.clock.seconds()
        state = self.sources.get(source)
        if state is None:
            if len(self.sources) >= self.max_sources:
                self.sources.popitem(last=False)
            state = self.sources[source] = [float(self.burst), now]
        else:
            self.sources.move_to_end(source)
        tokens = min(self.burst, state[0] + (now - state[1]) * self.rate)
        state[1] = now
        if tokens < cost or not self.total.take(cost):
            state[0] = tokens
            self.dropped += 1
            return False
        state[0] = tokens - cost
        return True


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

    A protocol is filed by its C{_due} (when it becomes idle-expired) in the
    bucket checked at the first multiple of L{idle_granularity} at or after
    it.  Data arriving only moves C{_due} (L{GuardedProtocol.touch}); when
    the bucket is checked, a protocol due later is filed again, so each
    connection is handled at most once per bucket, however busy it is.

    Timing: an idle connection is closed no earlier than its idle timeout
    after its last data and no later than the timeout plus one granularity.
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
        File C{protocol} by its C{_due}, with the granularity of its
        factory's idle timeout now, in a bucket later than C{after}.
        """
        granularity = protocol.factory.idle_granularity
        slot = math.ceil(protocol._due / granularity) * granularity
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
            if protocol._due > now:
                self.add(protocol, after=slot)  # touched since it was filed
            else:
                protocol._timedOut("idle")


@implementer(IHalfCloseableProtocol)
class GuardedProtocol(Protocol):
    """
    A TCP protocol with an idle timeout, a deadline for the request in
    progress, backpressure, and a close that really closes.

    Subclasses call L{touch} when data arrives, L{startDeadline} and
    L{stopDeadline} around a partial request, and L{close} to finish.
    When the peer half-closes (C{nc -N}), L{inputEnded} runs and, by
    default, closes once every answer is written.
    """

    factory: GuardedFactory
    #: when the connection becomes idle-expired, and the time of the
    #: L{IdleWheel} bucket it is filed in (None: not filed)
    _due = 0.0
    _slot: float | None = None
    _deadline: IDelayedCall | None = None
    _abort: IDelayedCall | None = None
    _key: str | None = None
    _opened = 0.0
    _lingering = False
    closing = False
    #: set TCP_NODELAY: small answers leave when written, as with asyncio
    #: (under Nagle's algorithm a reply written while an earlier one is
    #: unacknowledged waits for the client's, possibly delayed, ACK); bulk
    #: senders are faster without it
    nodelay = True

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
        self._due = self._opened + self.factory.idle_timeout
        self.factory.idle_wheel.add(self)

    def touch(self) -> None:
        """
        Data arrived: restart the idle timer.  Cheap on purpose: it only
        moves C{_due}, and the factory's L{IdleWheel} notices when it
        checks the bucket.  A reloaded idle timeout applies from here on.
        """
        factory = self.factory
        self._due = due = factory.clock.seconds() + factory.idle_timeout
        slot = self._slot
        # Filed too late for the new due only when a reload shortened the
        # timeout: file it again, or it would outlive the new timeout.
        if slot is not None and slot - due >= factory.idle_granularity:
            factory.idle_wheel.remove(self)
            factory.idle_wheel.add(self)

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
        for call in (self._deadline, self._abort):
            if call is not None and call.active():
                call.cancel()
        self._deadline = self._abort = None
        log.info(
            "{service}: {peer} disconnected after {duration:.3f}s: {outcome}",
            service=self.factory.service_name,
            peer=self._key,
            duration=self.factory.clock.seconds() - self._opened,
            outcome=reason.getErrorMessage(),
        )
        if self._key is not None:
            self.factory.limiter.release(self._key)
            self._key = None
        self.factory.connections.discard(self)
        if self.factory.draining and not self.factory.connections:
            self.factory.drained()

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


class GuardedFactory(ServerFactory):
    """
    Builds L{GuardedProtocol}s under a L{ConnectionLimiter}; clients over a
    cap get one line (L{refusal}) and are closed.
    """

    noisy = False
    service_name = "sockd"

    def __init__(
        self,
        clock: IReactorTime,
        settings: Any,
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
        self.set_limits(settings, request_timeout, abort_grace)
        self.connections: set[GuardedProtocol] = set()
        self.accepted = 0
        self.timeouts: dict[str, int] = {}
        self.draining = False
        self._drained: list[Deferred[None]] = []

    def set_limits(
        self, settings: Any, request_timeout: float, abort_grace: float
    ) -> None:
        """
        Take C{max_connections}, C{max_connections_per_ip} and
        C{idle_timeout} from a service's settings (at start, and on a reload:
        they apply to new connections and timers; a new idle timeout applies
        to an open connection from the next data it sends).
        """
        self.limiter.max_total = settings.max_connections
        self.limiter.max_per_peer = settings.max_connections_per_ip
        self.idle_timeout = settings.idle_timeout
        # Kept next to the timeout: touch() reads it on every read.
        self.idle_granularity = idle_granularity(settings.idle_timeout)
        self.request_timeout = request_timeout
        self.abort_grace = abort_grace

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

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        key = peer_key(host_of(addr))
        reason = self.limiter.acquire(key)
        if reason is not None:
            log.warn(
                "{service}: refused {peer}: {reason}",
                service=self.service_name,
                peer=key,
                reason=reason,
            )
            refusal = Refusal(self.refusal(reason), self.clock, self.abort_grace)
            refusal.factory = self
            return refusal
        protocol = super().buildProtocol(addr)
        assert isinstance(protocol, GuardedProtocol)
        protocol._key = key
        self.accepted += 1
        return protocol

    def metrics(self) -> list[Sample]:
        """What this factory has counted, for L{sockd.metrics}."""
        service = {"service": self.service_name}
        samples: list[Sample] = [
            ("connections_open", "gauge", service, len(self.connections)),
            ("connections_total", "counter", service, self.accepted),
        ]
        for reason, count in self.limiter.refused_by.items():
            samples.append(
                ("refused_total", "counter", {**service, "reason": reason}, count)
            )
        for which, count in self.timeouts.items():
            samples.append(
                ("timeouts_total", "counter", {**service, "timer": which}, count)
            )
        return samples
