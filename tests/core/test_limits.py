"""Tests of sockd.core.limits beyond what the echo tests exercise."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from sockd.core.limits import (
    LOOP_PORTS,
    AccessList,
    ConnectionLimiter,
    GuardedFactory,
    GuardedProtocol,
    PeerBudget,
    RateLimiter,
    TokenBucket,
    peer_key,
)
from tests.helpers import ROOT, connect


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

    def test_fair_share_under_pressure(self) -> None:
        limiter = ConnectionLimiter(10, 10)
        for _ in range(5):
            self.assertIsNone(limiter.acquire("a"))
        for _ in range(4):
            self.assertIsNone(limiter.acquire("b"))
        # 9 of 10 open: "a" holds its share (10 / 2 addresses), "b" does not.
        self.assertEqual(
            limiter.acquire("a"),
            "too many connections from your address; server busy",
        )
        self.assertIsNone(limiter.acquire("b"))
        self.assertEqual(
            limiter.refused_by,
            {"total": 0, "per_ip": 0, "share": 1, "acl": 0, "proxy": 0},
        )

    def test_no_sharing_below_pressure(self) -> None:
        limiter = ConnectionLimiter(10, 10)
        for _ in range(8):
            self.assertIsNone(limiter.acquire("a"))
        self.assertIsNone(limiter.acquire("b"))  # 9 open now
        self.assertIsNone(limiter.acquire("b"))  # b: 1 < 10 // 2

    def test_room_made_only_by_one_holding_two_more(self) -> None:
        limiter = ConnectionLimiter(10, 10)
        for key, count in (("a", 6), ("b", 4)):
            for _ in range(count):
                self.assertIsNone(limiter.acquire(key))
        self.assertEqual(limiter.acquire("c"), "too many connections to this server")
        self.assertEqual(limiter.make_room("b"), "a")
        limiter.take_back("a")
        self.assertIsNone(limiter.acquire("b"))
        self.assertEqual(limiter.per_peer, {"a": 5, "b": 5})
        # Taking from an equal, or from one holding one more, only moves
        # the shortage.
        self.assertIsNone(limiter.make_room("a"))
        self.assertIsNone(limiter.make_room("b"))
        self.assertIn(limiter.make_room("c"), ("a", "b"))
        limiter.take_back("a")
        self.assertIsNone(limiter.acquire("c"))
        self.assertEqual(limiter.per_peer, {"a": 4, "b": 5, "c": 1})
        self.assertEqual(limiter.evicted, 2)
        self.assertEqual(limiter.refused_by["total"], 1)
        # No room is made while the server is not full.
        limiter.release("b")
        self.assertIsNone(limiter.make_room("d"))

    def test_no_room_for_an_address_over_its_share(self) -> None:
        # 7 addresses: a holds 4, six others 1 each (10 of 10).  b holds 1
        # and a 3 more, but with 7 addresses b's share is 10 // 7 = 1.
        limiter = ConnectionLimiter(10, 10)
        for _ in range(4):
            limiter.acquire("a")
        for key in "bcdefg":
            limiter.acquire(key)
        self.assertIsNone(limiter.make_room("b"))
        self.assertEqual(limiter.make_room("h"), "a")

    @given(
        st.lists(
            st.tuples(st.booleans(), st.sampled_from("abcdef")),
            max_size=200,
        )
    )
    @settings(max_examples=200, deadline=None)
    def test_most_is_tracked(self, steps: list[tuple[bool, str]]) -> None:
        limiter = ConnectionLimiter(20, 8)
        for take, key in steps:
            if take:
                room = limiter.make_room(key)
                if room is not None:
                    self.assertGreaterEqual(
                        limiter.per_peer[room], limiter.per_peer.get(key, 0) + 2
                    )
                    limiter.take_back(room)
                limiter.acquire(key)
            else:
                limiter.release(key)
            counts = limiter.per_peer
            self.assertEqual(limiter._most, max(counts.values(), default=0))
            self.assertEqual(limiter.total, sum(counts.values()))
            self.assertLessEqual(limiter.total, 20)
            self.assertTrue(all(1 <= n <= 8 for n in counts.values()))
            for count, keys in limiter._holding.items():
                self.assertEqual({k for k, n in counts.items() if n == count}, keys)


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

    def test_newcomers_take_at_most_their_share(self) -> None:
        """
        A flood from ever new sources gets half the global rate; a source
        answered before is still answered at its own rate.
        """
        clock = Clock()
        limiter = RateLimiter(10, 10, 1000, clock)
        self.assertTrue(limiter.allow("known"))
        known = flood = 0
        for tick in range(10_000):  # 10 s: 1,000 new sources a second
            clock.advance(0.001)
            flood += limiter.allow(("forged", tick))
            if tick % 100 == 0:  # 10 a second
                known += limiter.allow("known")
        self.assertEqual(known, 100)
        self.assertLessEqual(flood, 500 + 10 * 500)  # the newcomers' burst + rate
        self.assertGreater(flood, 4000)  # and they do get that share

    def test_forged_sources_dropped_cost_no_memory(self) -> None:
        clock = Clock()
        limiter = RateLimiter(10, 10, 100, clock)
        answered = sum(limiter.allow(("forged", i)) for i in range(10_000))
        self.assertEqual(answered, 50)  # the newcomers' half of the burst
        self.assertEqual(len(limiter.sources), answered)

    def test_new_rates(self) -> None:
        clock = Clock()
        limiter = RateLimiter(10, 10, 100, clock)
        limiter.set_rates(1, 2, 1000)
        self.assertEqual((limiter.rate, limiter.burst), (1, 2))
        self.assertEqual((limiter.total.rate, limiter.total.burst), (1000, 1000))
        self.assertEqual((limiter.newcomers.rate, limiter.newcomers.burst), (500, 500))


class PeerBudgetTests(SynchronousTestCase):
    def test_loop_cut_after_budget(self) -> None:
        clock = Clock()
        budget = PeerBudget(100, 0.5, clock)
        peer = ("192.0.2.1", 40000)
        allowed = 0
        for _ in range(1000):  # answered at once, each time: a loop
            clock.advance(0.001)
            allowed += budget.allow(peer)
        self.assertEqual(allowed, 100)
        # Another port of the same host is another peer.
        self.assertTrue(budget.allow(("192.0.2.1", 40001)))
        # Once the peer pauses, it is answered again.
        clock.advance(0.5)
        self.assertTrue(budget.allow(peer))

    def test_a_client_that_waits_is_never_cut(self) -> None:
        clock = Clock()
        budget = PeerBudget(100, 0.5, clock)
        for _ in range(100):
            for _ in range(50):  # bursts of 50, then a pause
                clock.advance(0.01)
                self.assertTrue(budget.allow(("192.0.2.1", 40000)))
            clock.advance(0.5)

    def test_off(self) -> None:
        clock = Clock()
        budget = PeerBudget(0, 0.5, clock)
        self.assertTrue(all(budget.allow(("192.0.2.1", 1)) for _ in range(1000)))
        self.assertEqual(len(budget.peers), 0)

    def test_peers_bounded(self) -> None:
        budget = PeerBudget(10, 0.5, Clock(), max_peers=100)
        for port in range(10_000):
            budget.allow(("192.0.2.1", port))
        self.assertEqual(len(budget.peers), 100)


class LoopPortsTests(SynchronousTestCase):
    def test_reflectors_and_own_defaults_listed(self) -> None:
        for port in (0, 7, 19, 53, 123, 161, 389, 1900, 5353, 11211, 8001, 9001):
            self.assertIn(port, LOOP_PORTS)
        # Ephemeral ports, where people's clients send from, are not.
        self.assertFalse(any(port >= 32768 for port in LOOP_PORTS))


class Touchy(GuardedProtocol):
    """Any data counts as activity."""

    def dataReceived(self, data: bytes) -> None:
        self.touch()


class Receiving(GuardedProtocol):
    """Any data counts as activity, through received() as echo does."""

    def dataReceived(self, data: bytes) -> None:
        self.received()


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
        self.assertEqual(factory.timeouts, {"idle": 1, "request": 0, "handshake": 0})

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
        self.assertEqual(factory.timeouts, {"idle": 100, "request": 0, "handshake": 0})
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
        self.assertEqual(factory.timeouts, {"idle": 0, "request": 0, "handshake": 0})

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
        self.assertEqual(factory.timeouts, {"idle": 1, "request": 0, "handshake": 0})
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

    def test_reload_applies_at_next_received(self) -> None:
        # received() restarts the idle timer exactly as touch() does.
        clock = Clock()
        factory = guarded(clock, 300, Receiving)
        proto, transport = connect(factory)
        factory.set_limits(limits_for(10), 1000, 1000)
        clock.advance(100)
        self.assertTrue(transport.connected)
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
        self.assertEqual(factory.timeouts, {"idle": 1, "request": 0, "handshake": 0})
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
        self.assertEqual(factory.timeouts, {"idle": 0, "request": 0, "handshake": 0})
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

        from sockd.files.protocol import FileProtocol

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


def capped(
    clock: Clock, max_connections: int, per_ip: int, idle_timeout: float = 300
) -> GuardedFactory:
    factory = GuardedFactory(
        clock,
        SimpleNamespace(
            max_connections=max_connections,
            max_connections_per_ip=per_ip,
            idle_timeout=idle_timeout,
        ),
        request_timeout=1000,
        abort_grace=1000,
    )
    factory.protocol = Touchy
    return factory


def samples(factory: GuardedFactory) -> dict[tuple[str, str], float]:
    return {
        (name, labels.get("reason", "")): value
        for name, _, labels, value in factory.metrics()
    }


class FairShareTests(SynchronousTestCase):
    def test_sixteen_addresses_cannot_lock_out_a_seventeenth(self) -> None:
        """
        16 addresses each opening their per-address cap (64) used to take
        all 1000 connections until the idle timeout.  Now a newcomer takes
        the place of the longest idle connection of an address holding the
        most, and the squatters cannot take it back.
        """
        clock = Clock()
        factory = capped(clock, 1000, 64)
        squatters: list[tuple[str, Touchy, Any]] = []
        for n in range(16):
            for port in range(64):
                clock.advance(0.001)
                host = f"127.0.1.{n}"
                proto, transport = connect(factory, host, 40000 + port)
                squatters.append((host, proto, transport))
        limiter = factory.limiter
        self.assertEqual(limiter.total, 1000)
        # Full before the last ones came: they took from those with more.
        held = limiter.per_peer.values()
        self.assertEqual((min(held), max(held)), (62, 63))
        self.assertEqual(limiter.evicted, 22)
        # Everyone is active now but for one idle connection per address.
        idlest = {}
        for host, proto, transport in squatters:
            if transport.connected:
                if host in idlest:
                    proto.dataReceived(b"x")
                else:
                    idlest[host] = transport
        clock.advance(1)
        before = dict(limiter.per_peer)
        for n in range(20):
            _, transport = connect(factory, f"127.0.2.{n}")
            self.assertEqual(transport.value(), b"")
            self.assertTrue(transport.connected)
        self.assertEqual(limiter.total, 1000)
        self.assertEqual(limiter.evicted, 22 + 20)
        # Taken from those holding the most, each losing its idlest first.
        losers = [h for h in idlest if limiter.per_peer[h] < before[h]]
        self.assertGreaterEqual(len(losers), 10)
        held = [limiter.per_peer[h] for h in idlest]
        self.assertLessEqual(max(held) - min(held), 1)
        for host, transport in idlest.items():
            self.assertEqual(transport.connected, host not in losers)
        for host in losers:
            self.assertEqual(
                idlest[host].value(),
                b"ERR server full: closing this idle connection to admit other "
                b"addresses\r\n",
            )
        counts = samples(factory)
        self.assertEqual(counts[("connections_evicted_total", "")], 42)
        self.assertEqual(
            counts[("connections_refused_total", "total")], limiter.refused
        )
        self.assertEqual(counts[("connections_open", "")], 1000)
        # A squatter cannot take a place back: it holds at least as many
        # as anyone else less one.
        _, again = connect(factory, "127.0.1.0")
        self.assertFalse(again.connected)
        self.assertEqual(again.value(), b"ERR too many connections to this server\r\n")

    def test_equals_are_not_evicted(self) -> None:
        clock = Clock()
        factory = capped(clock, 4, 4)
        kept = [connect(factory, f"127.0.0.{n}")[1] for n in (1, 1, 2, 2)]
        _, third = connect(factory, "127.0.0.2")
        self.assertEqual(third.value(), b"ERR too many connections to this server\r\n")
        self.assertTrue(all(t.connected for t in kept))
        self.assertEqual(factory.limiter.evicted, 0)

    def test_a_transfer_in_progress_is_closed_without_a_line(self) -> None:
        clock = Clock()
        factory = capped(clock, 2, 2)
        first, transport = connect(factory, "127.0.0.1")
        clock.advance(1)
        connect(factory, "127.0.0.1")[0].dataReceived(b"x")
        transport.unregisterProducer()
        transport.registerProducer(object(), False)  # a file sender, say
        _, newcomer = connect(factory, "127.0.0.2")
        self.assertTrue(newcomer.connected)
        self.assertFalse(transport.connected)
        self.assertEqual(transport.value(), b"")

    def test_eviction_logged(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        clock = Clock()
        factory = capped(clock, 2, 2)
        connect(factory, "127.0.0.1")
        clock.advance(42)
        connect(factory, "127.0.0.1")[0].dataReceived(b"x")
        connect(factory, "127.0.0.2")
        self.assertIn(
            "sockd: server full: closing a connection of 127.0.0.1, idle for "
            "42s, to admit 127.0.0.2",
            [formatEvent(e) for e in events],
        )

    def test_idle_timeout_shortened_under_pressure(self) -> None:
        clock = Clock()
        factory = capped(clock, 10, 10, idle_timeout=100)
        conns = [connect(factory, "127.0.0.1", 40000 + n)[1] for n in range(8)]
        clock.advance(50)
        self.assertEqual(factory.idle_timeout, 100)
        busy, busy_transport = connect(factory, "127.0.0.2")  # 9 of 10: pressure
        self.assertTrue(factory.pressed)
        self.assertEqual(factory.idle_timeout, 10)
        # The overdue ones share one bucket, due now.
        self.assertEqual(
            sorted(call.getTime() for call in clock.getDelayedCalls()), [50, 60]
        )
        clock.advance(1)
        busy.dataReceived(b"x")
        # Connections silent for 50 s closed at once, until fewer than 80%
        # were open: then the configured timeout was back.
        self.assertEqual(sum(t.connected for t in conns), 6)
        self.assertEqual(factory.timeouts, {"idle": 2, "request": 0, "handshake": 0})
        self.assertFalse(factory.pressed)
        self.assertEqual(factory.idle_timeout, 100)
        clock.advance(48.9)  # 99.9 s
        self.assertEqual(sum(t.connected for t in conns), 6)
        clock.advance(0.2)
        self.assertFalse(any(t.connected for t in conns))
        self.assertTrue(busy_transport.connected)

    def test_pressure_ends_below_relief_only(self) -> None:
        clock = Clock()
        factory = capped(clock, 10, 10)
        conns = [connect(factory, "127.0.0.1", 40000 + n)[1] for n in range(9)]
        self.assertTrue(factory.pressed)
        conns.pop().loseConnection()  # 8: still 80%
        self.assertTrue(factory.pressed)
        conns.pop().loseConnection()  # 7
        self.assertFalse(factory.pressed)
        self.assertEqual(factory.idle_timeout, 300)

    def test_index_of_connections_by_address_is_exact(self) -> None:
        factory = capped(Clock(), 100, 10)
        conns = [connect(factory, host, 40000 + n) for n, host in enumerate("aabab")]
        held = factory.peers
        self.assertIsInstance(held["a"], set)
        self.assertEqual(len(held["a"]), 3)  # type: ignore[arg-type]
        conns[0][1].loseConnection()
        conns[1][1].loseConnection()
        self.assertIs(held["a"], conns[3][0])  # one left: kept as itself
        for _, transport in conns[2:]:
            transport.loseConnection()
        self.assertEqual(held, {})
        self.assertEqual(factory.limiter.per_peer, {})


def networks(text: str) -> Any:
    from sockd.core.config import networks as parse_networks

    return parse_networks(text, ROOT)


class AccessListTests(SynchronousTestCase):
    """allow/deny with xinetd's precedence: the more specific match decides."""

    def test_empty_serves_everyone(self) -> None:
        access = AccessList()
        self.assertFalse(access)
        self.assertTrue(access.permits("192.0.2.1"))
        self.assertTrue(access.permits("/run/sockd.sock"))

    def test_allow_only_refuses_the_rest(self) -> None:
        access = AccessList(networks("192.0.2.0/24 2001:db8::/32"))
        self.assertTrue(access.permits("192.0.2.200"))
        self.assertTrue(access.permits("2001:db8:1::5"))
        self.assertFalse(access.permits("198.51.100.1"))
        self.assertFalse(access.permits("2001:db9::1"))
        # Not an IP address (a UNIX socket peer): not in any allowed network.
        self.assertFalse(access.permits("unix"))

    def test_deny_only_serves_the_rest(self) -> None:
        access = AccessList(deny=networks("192.0.2.0/24"))
        self.assertFalse(access.permits("192.0.2.9"))
        self.assertTrue(access.permits("192.0.3.9"))

    def test_the_more_specific_match_wins(self) -> None:
        # Deny a network but allow one host in it, and the reverse.
        access = AccessList(networks("10.1.2.3"), networks("10.0.0.0/8"))
        self.assertTrue(access.permits("10.1.2.3"))
        self.assertFalse(access.permits("10.1.2.4"))
        access = AccessList(networks("10.0.0.0/8"), networks("10.9.0.0/16"))
        self.assertTrue(access.permits("10.1.0.1"))
        self.assertFalse(access.permits("10.9.0.1"))

    def test_deny_wins_a_tie(self) -> None:
        access = AccessList(networks("10.0.0.0/8"), networks("10.0.0.0/8"))
        self.assertFalse(access.permits("10.0.0.1"))

    def test_mapped_ipv6_counts_as_ipv4(self) -> None:
        access = AccessList(deny=networks("::ffff:192.0.2.0/120"))
        self.assertEqual(access.deny, networks("192.0.2.0/24"))
        self.assertFalse(access.permits("::ffff:192.0.2.7"))
        self.assertFalse(access.permits("192.0.2.7"))
        self.assertTrue(AccessList(networks("127.0.0.0/8")).permits("::ffff:127.0.0.2"))

    def test_ipv6_with_zone(self) -> None:
        access = AccessList(networks("fe80::/10"))
        self.assertTrue(access.permits("fe80::1%eth0"))


class FactoryAccessTests(SynchronousTestCase):
    """A client not admitted is refused before any byte of service."""

    def make(self) -> Any:
        from sockd.core.config import EchoSettings
        from sockd.echo.protocol import EchoFactory

        factory = EchoFactory(EchoSettings(), Clock(), 2.0)
        factory.set_access(AccessList(deny=networks("127.0.0.3")), AccessList())
        return factory

    def test_refused_with_one_line_and_counted(self) -> None:
        factory = self.make()
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        protocol, transport = connect(factory, "127.0.0.3")
        self.assertEqual(transport.value(), b"ERR access denied\r\n")
        self.assertFalse(transport.connected)
        protocol.dataReceived(b"hello\n")
        self.assertEqual(transport.value(), b"ERR access denied\r\n")
        self.assertEqual(factory.limiter.refused_by["acl"], 1)
        self.assertEqual(factory.limiter.total, 0)
        self.assertIn(
            "refused 127.0.0.3: access denied", [formatEvent(e) for e in logged][-1]
        )
        samples = {
            (name, labels.get("reason")): value
            for name, _, labels, value in factory.metrics()
        }
        self.assertEqual(samples["connections_refused_total", "acl"], 1)

    def test_other_address_served(self) -> None:
        protocol, transport = connect(self.make(), "127.0.0.2")
        protocol.dataReceived(b"hello\n")
        self.assertEqual(transport.value(), b"HELLO\n")

    def test_reload_applies_at_the_next_request(self) -> None:
        factory = self.make()
        protocol, transport = connect(factory, "127.0.0.2")
        protocol.dataReceived(b"one\n")
        # An equal list keeps the running one: nothing is checked again.
        factory.set_access(AccessList(deny=networks("127.0.0.3")), AccessList())
        protocol.dataReceived(b"two\n")
        factory.set_access(AccessList(deny=networks("127.0.0.0/24")), AccessList())
        self.assertTrue(transport.connected)  # nothing happens until it asks
        protocol.dataReceived(b"three\n")
        self.assertEqual(transport.value(), b"ONE\nTWO\nERR access denied\r\n")
        self.assertEqual(factory.limiter.refused_by["acl"], 1)
        self.assertFalse(transport.connected)
        self.assertEqual(factory.limiter.total, 0)

    def test_reload_that_still_admits(self) -> None:
        factory = self.make()
        protocol, transport = connect(factory, "127.0.0.2")
        factory.set_access(AccessList(networks("127.0.0.2")), AccessList())
        protocol.dataReceived(b"one\n")
        self.assertEqual(transport.value(), b"ONE\n")


class Counting(Touchy):
    """Counts like a service does, and answers each chunk doubled."""

    def dataReceived(self, data: bytes) -> None:
        self.touch()
        self.bytes_in += len(data)
        self.bytes_out += 2 * len(data)
        self.transport.write(data * 2)  # type: ignore[union-attr]


class ConnectionLineTests(SynchronousTestCase):
    """Each connection is one log line at its end, with the schema's fields."""

    def ended(
        self, events: list[dict[str, Any]], count: int = 1
    ) -> list[dict[str, Any]]:
        lines = [e for e in events if e.get("event") == "connection"]
        self.assertEqual(len(lines), count, [formatEvent(e) for e in events])
        return lines

    def test_fields_and_text(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        clock = Clock()
        factory = guarded(clock, 100, Counting)
        factory.service_name = "echo"
        proto, transport = connect(factory, "127.0.0.1", 41234)
        proto.dataReceived(b"hello")
        clock.advance(1.5)
        proto.close(b"bye\n")
        (line,) = self.ended(events)
        self.assertEqual(
            {k: line[k] for k in ("service", "peer", "bytes_in", "bytes_out")},
            {
                "service": "echo",
                "peer": "127.0.0.1:41234",
                "bytes_in": 5,
                "bytes_out": 14,  # the answer and the closing message
            },
        )
        self.assertEqual((line["duration"], line["outcome"]), (1.5, "closed"))
        self.assertNotIn("requests", line)
        self.assertEqual(
            formatEvent(line),
            "echo: 127.0.0.1:41234 disconnected after 1.500s, 5 bytes in, "
            "14 out: closed",
        )

    def test_ipv6_peer_in_brackets(self) -> None:
        from twisted.internet.address import IPv6Address
        from twisted.internet.testing import StringTransportWithDisconnection

        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        factory = guarded(Clock(), 100)
        addr = IPv6Address("TCP", "2001:db8::1", 5555)
        proto = factory.buildProtocol(addr)
        transport = StringTransportWithDisconnection(peerAddress=addr)
        transport.protocol = proto
        proto.makeConnection(transport)
        transport.loseConnection()
        self.assertEqual(self.ended(events)[0]["peer"], "[2001:db8::1]:5555")

    def test_outcomes(self) -> None:
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure

        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        clock = Clock()
        factory = guarded(clock, 10)
        proto, _ = connect(factory)
        proto.connectionLost(Failure(ConnectionLost()))  # a reset
        connect(factory)
        clock.advance(11)  # idle: closed by the timer
        outcomes = [line["outcome"] for line in self.ended(events, 2)]
        self.assertEqual(outcomes, ["lost", "idle timeout"])

    def test_evicted(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        clock = Clock()
        factory = capped(clock, 2, 2)
        connect(factory, "127.0.0.1")
        clock.advance(42)
        connect(factory, "127.0.0.1")[0].dataReceived(b"x")
        connect(factory, "127.0.0.2")
        self.assertEqual(self.ended(events)[0]["outcome"], "evicted")

    def test_requests_named_when_counted(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        proto, transport = connect(guarded(Clock(), 100))
        proto.requests, proto.request = 3, "GET docs/a.txt"
        transport.loseConnection()
        (line,) = self.ended(events)
        self.assertEqual((line["requests"], line["request"]), (3, "GET docs/a.txt"))
        self.assertTrue(
            formatEvent(line).endswith(", 3 requests (last: GET docs/a.txt): closed")
        )
