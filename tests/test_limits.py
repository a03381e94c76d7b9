"""Tests of sockd.limits beyond what the echo tests exercise."""

from __future__ import annotations

from types import SimpleNamespace

from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from sockd.limits import (
    ConnectionLimiter,
    GuardedFactory,
    GuardedProtocol,
    RateLimiter,
    TokenBucket,
    peer_key,
)
from tests.helpers import connect


class PeerKeyTests(SynchronousTestCase):
    def test_ipv4(self) -> None:
        self.assertEqual(peer_key("127.0.0.2"), "127.0.0.2")

    def test_mapped(self) -> None:
        self.assertEqual(peer_key("::ffff:10.0.0.1"), "10.0.0.1")

    def test_ipv6_by_64(self) -> None:
        a = peer_key("2001:db8:1:2:aaaa::1")
        b = peer_key("2001:db8:1:2:bbbb::2")
        c = peer_key("2001:db8:1:3::1")
        self.assertEqual(a, b)
        self.assertNotEqual(a, c)
        self.assertEqual(a, "2001:db8:1:2::/64")

    def test_scoped_ipv6(self) -> None:
        self.assertEqual(peer_key("fe80::1%eth0"), "fe80::/64")

    def test_not_an_address(self) -> None:
        self.assertEqual(peer_key("/run/sock"), "/run/sock")


class ConnectionLimiterTests(SynchronousTestCase):
    def test_counts(self) -> None:
        limiter = ConnectionLimiter(3, 2)
        self.assertIsNone(limiter.acquire("a"))
        self.assertIsNone(limiter.acquire("a"))
        self.assertEqual(limiter.acquire("a"), "too many connections from your address")
        self.assertIsNone(limiter.acquire("b"))
        self.assertEqual(limiter.acquire("c"), "too many connections to this server")
        self.assertEqual(limiter.refused, 2)
        limiter.release("a")
        self.assertIsNone(limiter.acquire("c"))

    def test_release_unknown_is_harmless(self) -> None:
        limiter = ConnectionLimiter(3, 2)
        limiter.release("nobody")
        self.assertEqual(limiter.total, 0)


class TokenBucketTests(SynchronousTestCase):
    def test_burst_then_rate(self) -> None:
        clock = Clock()
        bucket = TokenBucket(2, 4, clock)
        self.assertEqual([bucket.take() for _ in range(6)], [True] * 4 + [False] * 2)
        clock.advance(0.5)
        self.assertEqual([bucket.take(), bucket.take()], [True, False])
        clock.advance(100)
        self.assertEqual(sum(bucket.take() for _ in range(10)), 4)

    def test_pay_in_advance(self) -> None:
        """A pacer's use: spend into debt, wait it out, refund what was unused."""
        clock = Clock()
        bucket = TokenBucket(1000, 1000, clock)
        self.assertEqual(bucket.available(), 1000)
        self.assertEqual(bucket.delay(1000), 0)
        bucket.spend(1500)
        self.assertEqual(bucket.available(), -500)
        self.assertAlmostEqual(bucket.delay(), 0.5)
        self.assertAlmostEqual(bucket.delay(500), 1.0)
        self.assertFalse(bucket.take(1))  # a debtor's bucket allows nothing
        clock.advance(0.5)
        self.assertAlmostEqual(bucket.available(), 0)
        bucket.refund(5000)
        self.assertEqual(bucket.available(), 1000)  # never beyond the burst
        clock.advance(10)
        self.assertEqual(bucket.available(), 1000)

    def test_zero_rate_never_refills(self) -> None:
        bucket = TokenBucket(0, 1, Clock())
        self.assertTrue(bucket.take())
        self.assertEqual(bucket.delay(1), float("inf"))


class RateLimiterTests(SynchronousTestCase):
    def test_sources_bounded(self) -> None:
        clock = Clock()
        limiter = RateLimiter(1, 1, 1e9, clock, max_sources=100)
        for i in range(10_000):
            limiter.allow(i)
        self.assertEqual(len(limiter.sources), 100)

    def test_recent_sources_kept(self) -> None:
        clock = Clock()
        limiter = RateLimiter(1, 1, 1e9, clock, max_sources=3)
        limiter.allow("busy")
        for other in ("x", "y"):
            limiter.allow(other)
            # "busy" keeps sending, so it is the last to be forgotten.
            self.assertFalse(limiter.allow("busy"))
        limiter.allow("z")
        self.assertIn("busy", limiter.sources)
        self.assertNotIn("x", limiter.sources)

    def test_global_bucket_caps_everyone(self) -> None:
        clock = Clock()
        limiter = RateLimiter(100, 100, 10, clock)
        allowed = sum(limiter.allow(i % 50) for i in range(1000))
        self.assertEqual(allowed, 100)  # the global burst
        self.assertEqual(limiter.dropped, 900)


class Touchy(GuardedProtocol):
    """Any data counts as activity."""

    def dataReceived(self, data: bytes) -> None:
        self.touch()


class Warner(Touchy):
    """Says so instead of closing when a timer runs out."""

    def timedOut(self, which: str) -> None:
        self.transport.write(f"{which} timeout\n".encode())  # type: ignore[union-attr]


def limits_for(idle_timeout: float) -> SimpleNamespace:
    return SimpleNamespace(
        max_connections=1000, max_connections_per_ip=1000, idle_timeout=idle_timeout
    )


def guarded(
    clock: Clock, idle_timeout: float, protocol: type[GuardedProtocol] = Touchy
) -> GuardedFactory:
    factory = GuardedFactory(
        clock, limits_for(idle_timeout), request_timeout=1000, abort_grace=1000
    )
    factory.protocol = protocol
    return factory


class IdleWheelTests(SynchronousTestCase):
    def test_within_one_granularity_never_early(self) -> None:
        """
        Closed no earlier than the idle timeout after the last data, and no
        later than one granularity (a second, or a tenth of a short timeout)
        after that, wherever the last data falls within a bucket.
        """
        for timeout, granularity in [(10.0, 1.0), (3.0, 0.3), (0.5, 0.05)]:
            for offset in [0.0, 0.01, 0.25, 0.999]:
                case = f"timeout {timeout}, offset {offset}"
                clock = Clock()
                clock.advance(offset)
                proto, transport = connect(guarded(clock, timeout))
                clock.advance(timeout / 3)
                proto.dataReceived(b"x")
                due = clock.seconds() + timeout
                clock.advance(due - clock.seconds() - 1e-9)
                self.assertTrue(transport.connected, case)
                clock.advance(granularity + 2e-9)
                self.assertFalse(transport.connected, case)

    def test_closed_at_the_bucket(self) -> None:
        clock = Clock()
        clock.advance(0.25)
        factory = guarded(clock, 10)
        _, transport = connect(factory)
        clock.advance(10.74)  # 10.99: idle for 10.74 s, its bucket is at 11
        self.assertTrue(transport.connected)
        clock.advance(0.01)
        self.assertFalse(transport.connected)
        self.assertEqual(factory.timeouts, {"idle": 1})

    def test_touch_postpones(self) -> None:
        clock = Clock()
        proto, transport = connect(guarded(clock, 10))
        for _ in range(5):
            clock.advance(9)
            proto.dataReceived(b"x")
            self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(9.99)
        self.assertTrue(transport.connected)  # 55 s in, never 10 s idle
        clock.advance(1)
        self.assertFalse(transport.connected)

    def test_one_timer_for_a_bucket(self) -> None:
        clock = Clock()
        clock.advance(0.05)
        factory = guarded(clock, 10)
        transports = []
        for port in range(40000, 40100):
            transports.append(connect(factory, port=port)[1])
            clock.advance(0.009)  # all due between 10.05 and 10.95
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(10.99 - clock.seconds())
        self.assertTrue(all(t.connected for t in transports))
        clock.advance(0.01)
        self.assertFalse(any(t.connected for t in transports))
        self.assertEqual(factory.timeouts, {"idle": 100})
        self.assertEqual(factory.connections, set())
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_lost_connections_leave_no_timer(self) -> None:
        clock = Clock()
        factory = guarded(clock, 10)
        _, first = connect(factory, port=40000)
        _, second = connect(factory, port=40001)
        clock.advance(2.5)
        _, third = connect(factory, port=40002)  # another bucket
        self.assertEqual(len(clock.getDelayedCalls()), 2)
        first.loseConnection()
        self.assertEqual(len(clock.getDelayedCalls()), 2)
        second.loseConnection()
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        third.loseConnection()
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(100)
        self.assertEqual(factory.timeouts, {})

    def test_lost_while_its_bucket_is_checked(self) -> None:
        """One connection's timeout closing another in the same bucket."""
        clock = Clock()
        factory = guarded(clock, 10)
        (a, ta), (b, tb) = connect(factory, port=40000), connect(factory, port=40001)
        a.timedOut = b.timedOut = lambda which: [
            ta.loseConnection(),
            tb.loseConnection(),
        ]  # type: ignore[method-assign]
        clock.advance(10)
        self.assertFalse(ta.connected or tb.connected)
        self.assertEqual(factory.timeouts, {"idle": 1})
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_reload_applies_at_next_touch(self) -> None:
        clock = Clock()
        factory = guarded(clock, 300)
        proto, transport = connect(factory)
        factory.set_limits(limits_for(10), 1000, 1000)
        clock.advance(100)
        self.assertTrue(transport.connected)  # nothing sent since: still 300 s
        proto.dataReceived(b"x")
        clock.advance(9.99)
        self.assertTrue(transport.connected)
        clock.advance(1.01)
        self.assertFalse(transport.connected)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_reload_longer(self) -> None:
        clock = Clock()
        factory = guarded(clock, 10)
        proto, transport = connect(factory)
        factory.set_limits(limits_for(300), 1000, 1000)
        clock.advance(5)
        proto.dataReceived(b"x")
        clock.advance(299.99)
        self.assertTrue(transport.connected)
        clock.advance(1.01)
        self.assertFalse(transport.connected)

    def test_overridden_hook(self) -> None:
        clock = Clock()
        factory = guarded(clock, 10, Warner)
        _, transport = connect(factory)
        clock.advance(10)
        self.assertEqual(transport.value(), b"idle timeout\n")
        self.assertTrue(transport.connected)
        self.assertEqual(factory.timeouts, {"idle": 1})
        clock.advance(100)  # once, as a timer runs out once
        self.assertEqual(transport.value(), b"idle timeout\n")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_logged(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        clock = Clock()
        connect(guarded(clock, 10))
        clock.advance(10)
        self.assertIn(
            "sockd: closing 127.0.0.1: idle timeout", [formatEvent(e) for e in events]
        )

    def test_closing_left_to_its_abort_timer(self) -> None:
        """A connection already closing is not timed out for idleness too."""
        clock = Clock()
        factory = guarded(clock, 10)
        proto, transport = connect(factory)
        transport.loseConnection = lambda: None  # type: ignore[method-assign]
        aborted: list[bool] = []
        transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
        proto.close()
        clock.advance(10)
        self.assertEqual(factory.timeouts, {})
        self.assertEqual(len(clock.getDelayedCalls()), 1)  # the abort
        clock.advance(990)
        self.assertEqual(aborted, [True])


class NoDelayTests(SynchronousTestCase):
    def test_answers_are_not_held_back_by_nagle(self) -> None:
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        class TCPTransport(StringTransport):
            nodelay: list[bool]

            def setTcpNoDelay(self, enabled: bool) -> None:
                self.nodelay.append(enabled)

        factory = guarded(Clock(), 10)
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        assert protocol is not None
        transport = TCPTransport()
        transport.nodelay = []
        protocol.makeConnection(transport)
        self.assertEqual(transport.nodelay, [True])

    def test_a_transport_refusing_it_still_connects(self) -> None:
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        class Refusing(StringTransport):
            def setTcpNoDelay(self, enabled: bool) -> None:
                raise OSError(95, "Operation not supported")

        factory = guarded(Clock(), 10)
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        assert protocol is not None
        protocol.makeConnection(Refusing())
        self.assertIn(protocol, factory.connections)

    def test_bulk_senders_keep_nagle(self) -> None:
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        from sockd.files import FileProtocol

        class Bulk(Touchy):
            nodelay = FileProtocol.nodelay

        class TCPTransport(StringTransport):
            def setTcpNoDelay(self, enabled: bool) -> None:
                raise AssertionError("TCP_NODELAY set on a bulk sender")

        factory = guarded(Clock(), 10, Bulk)
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        assert protocol is not None
        protocol.makeConnection(TCPTransport())
        self.assertIn(protocol, factory.connections)
